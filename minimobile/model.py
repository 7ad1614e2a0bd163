"""MobileNet-V1 (Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile
Vision Applications", arXiv:1704.04861), as a functional Flax linen module.

The whole architecture is the paper's Table 1: a full 3x3 convolution, then 13 depthwise-separable
blocks, average pooling and one fully connected layer. `MOBILENET_V1_BLOCKS` below *is* that table;
the model and the cost counter (`costs.py`) both read it, so they cannot drift apart.

Two knobs shrink the network (section 3.3-3.4): the width multiplier alpha thins every layer to
`int(c * alpha)` channels (at least 1), and the resolution multiplier is simply the input size you feed in.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from minimobile.layers import ConvBN, SeparableBlock

STEM_CHANNELS = 32  # Table 1, row 1: Conv / s2, 3x3x3x32 (stride 1 with the "cifar" stem)
# Table 1, rows after the first conv: (output channels, stride) of each depthwise-separable block.
# (The paper's table prints "s2" on the last depthwise row, a known typo: its input and output are
# both 7x7, so the stride is 1, as in every released implementation.)
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2), (128, 1),
    (256, 2), (256, 1),
    (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)
STEM_STRIDES = {
    "imagenet": 2,  # 224x224 in, 7x7 before pooling: the paper's network
    "cifar": 1,     # 32x32 in, 2x2 before pooling: keep resolution for tiny images (the usual adaptation)
}
BLOCK_TYPES = ("separable", "standard")
# The widest alpha the tools accept: far past the paper's 1.0, so that a typo (1e9, inf) is one sentence
# instead of a crash in the allocator.
MAX_WIDTH = 16.0


def thin(channels: int, width: float) -> int:
    """The width multiplier: alpha thins every layer to int(channels * alpha) channels, at least 1 (section 3.3)."""
    return max(1, int(channels * width))


class MobileNetV1(nn.Module):
    """MobileNet-V1. x: [B, H, W, 3] float -> logits [B, num_classes] (float32), or [B, C] features if num_classes=0.

    Attributes:
      num_classes: classifier outputs; 0 returns the pooled features instead.
      width: the width multiplier alpha (1.0, 0.75, 0.5, 0.25 in the paper).
      stem: "imagenet" (first conv stride 2) or "cifar" (stride 1).
      block: "separable" (MobileNet) or "standard" (the paper's full-convolution baseline, Table 4).
      depth_multiplier: filters per input channel in each depthwise conv (1 in the paper).
      dropout_rate: dropout before the classifier.
      dtype: compute dtype (bfloat16 on GPU); params stay in `param_dtype` (float32).
      bn_axis_name: the data-parallel axis BatchNorm averages its statistics over (None under plain jit).
      depthwise_impl: "auto" or a key of layers.DEPTHWISE_IMPLS; the parameters are the same for every choice.
    """

    num_classes: int = 1000
    width: float = 1.0
    stem: str = "imagenet"
    block: str = "separable"
    depth_multiplier: int = 1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    depthwise_impl: str = "feature_group_count"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.stem not in STEM_STRIDES:
            raise ValueError(f"stem must be one of {sorted(STEM_STRIDES)}, got {self.stem!r}")
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"block must be one of {BLOCK_TYPES}, got {self.block!r}")
        kw = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)

        # Table 1, row 1: Conv / s2, 3x3x3x32.                        [B, H, W, 3] -> [B, H/s, W/s, 32a]
        x = ConvBN(thin(STEM_CHANNELS, self.width), strides=STEM_STRIDES[self.stem], name="stem", **kw)(x, train)
        for i, (channels, stride) in enumerate(MOBILENET_V1_BLOCKS):
            features = thin(channels, self.width)
            if self.block == "separable":
                x = SeparableBlock(features, strides=stride, depth_multiplier=self.depth_multiplier,
                                   depthwise_impl=self.depthwise_impl, name=f"block{i + 1:02d}", **kw)(x, train)
            else:  # the baseline: one full 3x3 conv where MobileNet has a depthwise + pointwise pair
                x = ConvBN(features, strides=stride, name=f"block{i + 1:02d}", **kw)(x, train)
        # Avg Pool 7x7 (global: at 224 input the map is 7x7, on CIFAR 2x2).    [B, h, w, C] -> [B, C]
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes == 0:
            return x
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        # FC: logits in float32 so the softmax and loss are computed in full precision.
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype, name="classifier")(x)


# Presets. The paper's four widths at ImageNet resolution (Table 6), and their CIFAR adaptations.
MobileNetV1_100 = functools.partial(MobileNetV1, width=1.0)
MobileNetV1_075 = functools.partial(MobileNetV1, width=0.75)
MobileNetV1_050 = functools.partial(MobileNetV1, width=0.5)
MobileNetV1_025 = functools.partial(MobileNetV1, width=0.25)
MobileNetV1_CIFAR = functools.partial(MobileNetV1, stem="cifar", num_classes=100)
# For tests only: every layer of the real network, 1/16 of the channels (2 to 64), about 17 k params.
MobileNetV1_Tiny = functools.partial(MobileNetV1, width=0.0625, stem="cifar", num_classes=10)


def jit_init(fn, **jit_kwargs):
    """`jax.jit` for an initialisation: a program that runs once per run.

    Most of its compile time is XLA optimising the random number generator of each of the 28
    randomly initialised kernels (on 2 CPU cores: 5.8 s for the 1/16-width network, 2.4 s without the
    optimisation passes), to save microseconds of a single run. So on CPU it is compiled unoptimised; the numbers
    it draws are the same up to rounding in the last bit. (GPUs keep XLA's defaults: not measured there.)
    """
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(fn, compiler_options=options, **jit_kwargs)


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, int, int] = (32, 32, 3)) -> dict:
    """{'params': ..., 'batch_stats': ...} for one [1, H, W, C] input; shapes do not depend on the batch size."""
    return jit_init(model.init, static_argnames="train")(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
