"""The original report's second network: a small depthwise-separable CNN for CIFAR-10 (issue 8).

The report this project grew from trained it in TensorFlow 1 on a laptop CPU (batch 20, Adam 1e-3) and
reported 58.35 % test accuracy after 5,000 steps, 64.6 % after 10,000 and 69.35 % after 100,000. It is
small enough (11,530 parameters) to train anywhere in minutes, which makes it the one result of the
report every reader can reproduce end to end: `python -m minimobile.train --recipe seed-tf`.

Layer by layer, exactly as the report's code builds it (shapes for a 32x32 CIFAR image):

    input, scaled to [-1, 1]                                       [B, 32, 32, 3]
    conv 3x3, 32 filters, bias, ReLU, SAME                         [B, 32, 32, 32]
    max-pool 2x2                                                   [B, 16, 16, 32]
    separable block 32, separable block 32                         [B, 16, 16, 32]
    max-pool 2x2                                                   [B,  8,  8, 32]
    separable block 32, separable block 32                         [B,  8,  8, 32]
    max-pool 2x2                                                   [B,  4,  4, 32]
    flatten                                                        [B, 512]
    dense to 10 classes (logits)                                   [B, 10]

(Initialisers are Flax's defaults, LeCun-normal kernels and zero biases: the report does not record its own.)

The report wrote its separable block the naive way: split the input into its 32 channels, run an
ordinary 3x3 convolution with one output channel (plus bias and ReLU) on each, concatenate, then a 1x1
convolution with bias and ReLU. That split-and-concatenate *is* a depthwise convolution with a bias
per channel, so here it is one `depthwise_conv(..., use_bias=True)` followed by a ReLU (applied
elementwise, so per channel too); tests/test_seed_cnn.py checks the two agree numerically.

The [-1, 1] input scaling is not done here: our input pipeline normalises images before the model
sees them, and `Config.normalization = "minus_one_to_one"` (see steps.input_normalization) makes it
compute x / 127.5 - 1, the report's scaling.

`batch_norm=True` is ours, not the report's (it had none): BatchNorm after every convolution, for the
`seed-tf-ours` recipe. Its conv biases are then dropped (BatchNorm's shift replaces them) and BatchNorm
learns no scale (the ReLU and the linear layer after it can absorb a positive per-channel scale, the
reason Keras gives for `scale=False` before a ReLU). So the trainable parameters are the same 11,530
numbers in the same places; BatchNorm only adds its running mean and variance (576 statistics, not
trained), and at inference each BatchNorm folds into the conv before it, giving back the report's
network exactly (`fold_batch_norm`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from minimobile.layers import BN_EPSILON, BN_MOMENTUM, depthwise_conv

Dtype = Any

CHANNELS = 32  # every conv of the network has 32 output channels


class ConvReLU(nn.Module):
    """One convolution, then (optionally) BatchNorm, then ReLU.

    `conv` is "full" (3x3, mixes channels), "depthwise" (3x3, one filter per channel, kernel [3, 3, 1, C])
    or "pointwise" (1x1, kernel [1, 1, C_in, C_out]). Without BatchNorm the conv has a bias, as in the
    report; with it, BatchNorm's learned shift plays the bias's part and no scale is learned.
    """

    features: int
    conv: str = "full"
    batch_norm: bool = False
    bn_axis_name: str | None = None
    depthwise_impl: str = "feature_group_count"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(use_bias=not self.batch_norm, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.conv == "depthwise":
            # The report's split-into-channels loop, as one layer: C independent 3x3 filters, C biases.
            x = depthwise_conv(x.shape[-1], impl=self.depthwise_impl, name="depthwise", **kw)(x)  # [B, H, W, C]
        elif self.conv == "pointwise":
            x = nn.Conv(self.features, (1, 1), name="pointwise", **kw)(x)                      # [B, H, W, C_out]
        else:
            x = nn.Conv(self.features, (3, 3), padding="SAME", name="conv", **kw)(x)           # [B, H, W, C_out]
        if self.batch_norm:
            # use_scale=False: a positive per-channel scale passes through the ReLU and max-pool and is
            # absorbed by the next linear layer, so learning one adds parameters but (almost) no expressiveness.
            x = nn.BatchNorm(use_running_average=not train, use_scale=False, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON, axis_name=self.bn_axis_name, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x)


class SeedSeparableBlock(nn.Module):
    """The report's separable block: depthwise 3x3 + bias + ReLU, then pointwise 1x1 + bias + ReLU.

    x: [B, H, W, C_in] -> [B, H, W, features]. Unlike MobileNet's block (layers.SeparableBlock) it has
    biases instead of BatchNorm, plain ReLU instead of ReLU6, and never strides: max-pooling downsamples.
    """

    features: int
    batch_norm: bool = False
    bn_axis_name: str | None = None
    depthwise_impl: str = "feature_group_count"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(batch_norm=self.batch_norm, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x = ConvReLU(x.shape[-1], conv="depthwise", depthwise_impl=self.depthwise_impl, name="depthwise",
                     **kw)(x, train)                                              # filters space, per channel
        return ConvReLU(self.features, conv="pointwise", name="pointwise", **kw)(x, train)  # mixes channels


def max_pool(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2: [B, H, W, C] -> [B, H/2, W/2, C]."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class SeedCNN(nn.Module):
    """The report's CIFAR-10 network. x: [B, 32, 32, 3] (scaled to [-1, 1]) -> logits [B, num_classes] float32.

    Attributes:
      num_classes: 10 for CIFAR-10.
      batch_norm: False is the report's network; True adds BatchNorm after every conv (ours; see above).
      bn_axis_name: the data-parallel axis BatchNorm averages its statistics over (None under plain jit).
      depthwise_impl: see layers.DEPTHWISE_IMPLS; "split" is literally the report's code.
      dtype: compute dtype; params stay in `param_dtype`.
    """

    num_classes: int = 10
    batch_norm: bool = False
    bn_axis_name: str | None = None
    depthwise_impl: str = "feature_group_count"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(batch_norm=self.batch_norm, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        block = lambda name: SeedSeparableBlock(CHANNELS, depthwise_impl=self.depthwise_impl, name=name, **kw)

        x = ConvReLU(CHANNELS, conv="full", name="stem", **kw)(x, train)  # [B, 32, 32, 3] -> [B, 32, 32, 32]
        x = max_pool(x)                                                    # -> [B, 16, 16, 32]
        x = block("block1")(x, train)
        x = block("block2")(x, train)                                      # [B, 16, 16, 32]
        x = max_pool(x)                                                    # -> [B, 8, 8, 32]
        x = block("block3")(x, train)
        x = block("block4")(x, train)                                      # [B, 8, 8, 32]
        x = max_pool(x)                                                    # -> [B, 4, 4, 32]
        # Flatten in NHWC order, as TensorFlow's reshape did: the dense kernel's rows are (h, w, c).
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)                  # -> [B, 512]
        # Logits in float32, so the softmax and loss are computed in full precision.
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype, name="classifier")(x)


def fold_batch_norm(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The `batch_norm=True` network's variables -> parameters of the report's network (`batch_norm=False`)
    that compute the same function at inference.

    In inference mode BatchNorm is a fixed affine map per channel, y = (z - mean) / sqrt(var + eps) + shift,
    and z = conv(x) is linear in its kernel, so with s = 1 / sqrt(var + eps):
        kernel' = kernel * s          (scales each output channel: the last axis, depthwise or not)
        bias'   = shift - mean * s
    """
    def fold(params, stats):
        if "bn" in params:  # a ConvReLU with BatchNorm: {"conv"|"depthwise"|"pointwise": {kernel}, "bn": {bias}}
            (name,) = [k for k in params if k != "bn"]
            s = 1.0 / jnp.sqrt(stats["bn"]["var"] + BN_EPSILON)                              # [C_out]
            bias = params["bn"]["bias"] - stats["bn"]["mean"] * s
            return {name: {"kernel": params[name]["kernel"] * s, "bias": bias}}
        return {k: fold(v, stats[k]) if k in stats else v for k, v in params.items()}      # e.g. the classifier

    return fold(variables["params"], variables["batch_stats"])


def parameter_count(num_classes: int = 10, channels: int = CHANNELS, image_size: int = 32) -> int:
    """The network's trainable parameters, counted by hand (kernels plus one bias per output channel).

        stem conv   3*3*3*32 + 32            =    896
        depthwise   3*3*1*32 + 32            =    320   x 4 blocks
        pointwise   1*1*32*32 + 32           =  1,056   x 4 blocks
        dense       (4*4*32)*10 + 10         =  5,130
        total                                  11,530

    With `batch_norm=True` the count is the same: each conv bias becomes BatchNorm's shift.
    """
    c, flat = channels, (image_size // 8) ** 2 * channels
    stem = 3 * 3 * 3 * c + c
    block = (3 * 3 * 1 * c + c) + (1 * 1 * c * c + c)
    return stem + 4 * block + flat * num_classes + num_classes
