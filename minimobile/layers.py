"""The two convolutions MobileNet is made of, as Flax modules, and the block that pairs them.

A standard 3x3 convolution mixes space and channels in one step: each of its `C_out` filters is
`3 x 3 x C_in`. MobileNet factorises it into two cheaper steps (Howard et al. 2017, section 3.1):

  depthwise  3x3, one filter per input channel    kernel [3, 3, 1, C * depth_multiplier]
  pointwise  1x1, a matrix multiply over channels kernel [1, 1, C_in, C_out]

each followed by BatchNorm and ReLU6 (the paper writes ReLU; Google's released TensorFlow MobileNet,
`mobilenet_v1_arg_scope` in TF-slim, uses ReLU6 = min(max(x, 0), 6), and so do we). The depthwise
step is one operation with five implementations (`depthwise.py`, and `depthwise_vjp.py` for the
one with a hand-written backward pass), named here in `DEPTHWISE_IMPLS`. The model's own default is
the grouped convolution, `nn.Conv` itself (`depthwise_conv`); the trainer's `depthwise_impl="auto"`
keeps it on GPU and TPU and picks `shift_add_vjp` on CPU (`resolve_depthwise_impl` says why).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from minimobile.depthwise import (depthwise_conv_grouped, depthwise_conv_shift_add, depthwise_conv_split, pad_same,
                                  tap_view)
from minimobile.depthwise_vjp import depthwise_conv_shift_add_vjp

Dtype = Any

# BatchNorm as PyTorch and most CIFAR recipes set it (TF-slim's ImageNet MobileNet used 0.9997 / 1e-3).
BN_MOMENTUM = 0.9    # running = 0.9 * running + 0.1 * this batch
BN_EPSILON = 1e-5

DEPTHWISE_IMPLS: dict[str, Callable[..., jax.Array]] = {
    "feature_group_count": depthwise_conv_grouped,
    "shift_add": depthwise_conv_shift_add,
    "shift_add_vjp": depthwise_conv_shift_add_vjp,
    "split": depthwise_conv_split,
}


def resolve_depthwise_impl(impl: str) -> str:
    """'auto' picks the fastest implementation we measured for the current backend.

    On GPU, cuDNN has dedicated depthwise kernels, so the grouped convolution is the right call.
    On CPU, XLA's grouped convolution (and especially its backward pass) is slow, while shift-and-add
    becomes nine fused elementwise loops, and with its hand-written backward pass the whole train step
    is about 1.5x faster again than with autodiff's (`python -m minimobile.bench --all-impls`).
    """
    if impl == "auto":
        return "feature_group_count" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "shift_add_vjp"
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be 'auto' or one of {sorted(DEPTHWISE_IMPLS)}, got {impl!r}")
    return impl


# --------------------------------------------------------------------------------------------
# Flax modules.
# --------------------------------------------------------------------------------------------


class DepthwiseConv(nn.Module):
    """A depthwise 3x3 convolution with a choice of implementation.

    Its parameters are exactly those of `nn.Conv(C*m, (3, 3), feature_group_count=C)`, a `kernel`
    [3, 3, 1, C*m] (and a `bias` [C*m] if asked), so a checkpoint trained with one implementation
    runs with any other.
    """

    depth_multiplier: int = 1
    kernel_size: tuple[int, int] = (3, 3)
    strides: int = 1
    use_bias: bool = False
    impl: str = "shift_add"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1] * self.depth_multiplier
        # Same initialiser as nn.Conv: lecun_normal over fan-in = 3*3*1 taps.
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_size, 1, channels), self.param_dtype)  # [3, 3, 1, C*m]
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = DEPTHWISE_IMPLS[resolve_depthwise_impl(self.impl)](x, kernel, self.strides)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype).astype(self.dtype)
        return y


def depthwise_conv(channels_in: int, *, depth_multiplier: int = 1, strides: int = 1, use_bias: bool = False,
                   impl: str = "feature_group_count", dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32, name: str = "depthwise") -> nn.Module:
    """The depthwise layer, x: [B, H, W, C] -> [B, H/s, W/s, C*m]. By default literally
    `nn.Conv(C*m, (3, 3), feature_group_count=C)`; impl: 'auto' or a key of DEPTHWISE_IMPLS."""
    impl = resolve_depthwise_impl(impl)
    if impl == "feature_group_count":
        return nn.Conv(channels_in * depth_multiplier, (3, 3), strides=strides, padding="SAME",
                       feature_group_count=channels_in,  # one group per channel: kernel [3, 3, 1, C*m]
                       use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)
    return DepthwiseConv(depth_multiplier, strides=strides, use_bias=use_bias, impl=impl,
                         dtype=dtype, param_dtype=param_dtype, name=name)


class PointwiseConv(nn.Module):
    """A 1x1 convolution written as what it is, a matrix multiply over channels.

    x: [B, H, W, C_in] -> [B, H, W, C_out] = x @ kernel[0, 0]. The parameter is exactly
    `nn.Conv(C_out, (1, 1), use_bias=False)`'s, a `kernel` [1, 1, C_in, C_out] with the same
    initialiser, so checkpoints are interchangeable. Why not just use `nn.Conv`? On CPU, XLA sends a
    1x1 convolution's *backward* pass (the kernel gradient is a convolution with the batch as its
    contraction) through a generic convolution path, several times slower than the two matrix
    multiplies a `dot` differentiates into; the forward pass is about the same either way.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (1, 1, x.shape[-1], self.features), self.param_dtype)  # [1, 1, C_in, C_out]
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        # Every pixel of every image is one row of a [B*H*W, C_in] matrix. Flattening here (free: a
        # reshape of contiguous NHWC memory) also keeps the backward pass two plain 2-D matmuls; left
        # 4-D, XLA rewrites the kernel gradient with a slow transposed copy of the gradient.
        *lead, c_in = x.shape
        y = jnp.dot(x.reshape(-1, c_in), kernel[0, 0])  # [B*H*W, C_in] @ [C_in, C_out]
        return y.reshape(*lead, self.features)          # [B, H, W, C_out]


class PatchConv(nn.Module):
    """A KxK convolution (SAME) on few input channels, written as image patches times a matrix.

    x: [B, H, W, C_in] -> [B, H', W', features]. Each output pixel's KxK x C_in input patch is one row
    of a [B*H'*W', K*K*C_in] matrix (for the RGB stem, 27 columns), multiplied by the kernel reshaped to
    [K*K*C_in, features]. Same parameter as `nn.Conv(features, (K, K), use_bias=False)`, a `kernel`
    [K, K, C_in, features] with the same initialiser, so checkpoints are interchangeable. Why: on CPU,
    XLA runs a convolution with 3 input channels, and its kernel gradient, on one core, and the stem is
    the first layer forward and the last backward, so nothing else can run beside it; as a matmul
    both passes use every core. The patches cost K*K times the input, which is small only when C_in
    is, so `ConvBN` uses this for narrow inputs (the stem) and `nn.Conv` elsewhere.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c_in = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, c_in, self.features), self.param_dtype)  # [K, K, C_in, C_out]
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        b, h, w, _ = x.shape
        ho, wo = -(-h // self.strides), -(-w // self.strides)
        xp = pad_same(x, (k, k), self.strides)
        # Columns in the kernel's own (row, column, channel) order, so kernel.reshape lines up with them.
        patches = jnp.concatenate([tap_view(xp, di, dj, self.strides, ho, wo)
                                   for di in range(k) for dj in range(k)], axis=-1)  # [B, H', W', K*K*C_in]
        y = jnp.dot(patches.reshape(-1, k * k * c_in), kernel.reshape(k * k * c_in, self.features))
        return y.reshape(b, ho, wo, self.features)


# Up to this many input channels a full convolution runs as PatchConv (see there why).
PATCH_CONV_MAX_CHANNELS = 4


class BatchNorm(nn.Module):
    """BatchNorm over the last axis, a drop-in for `nn.BatchNorm` that is cheaper to differentiate.

    Same variables as `nn.BatchNorm` (params `scale`, `bias`; batch_stats `mean`, `var`), same
    statistics (float32, var = E[x^2] - E[x]^2, averaged over `axis_name` when data-parallel), same
    running-average update, so checkpoints are interchangeable. One difference, in how the output is
    written: nn.BatchNorm computes (x - mean) * (scale / std) + bias, and autodiff then keeps
    x - mean, a whole extra activation-sized tensor per layer, to sum it against the gradient.
    Here y = x * a + b with per-channel a = scale / std and b = bias - mean * a, whose gradients
    need only sums of x * dy and dy over tensors already in memory; on CPU the train step is about
    15 % faster. In float32 the rounding differs by ~1e-7 * |mean| / std, far below what training notices.

    x: [..., C] -> [..., C] in `dtype`.
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        # Statistics and normalisation in at least float32, whatever the compute dtype (float64 stays).
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype).astype(dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype).astype(dtype)
        x = x.astype(dtype)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))                      # every axis but the channels
            mean, mean_sq = jnp.mean(x, axes), jnp.mean(x * x, axes)   # [C], [C]: one pass over x
            if self.axis_name is not None and not self.is_initializing():
                mean, mean_sq = lax.pmean(jnp.stack([mean, mean_sq]), self.axis_name)  # one collective
            var = jnp.maximum(mean_sq - mean * mean, 0.0)        # rounding can make it slightly negative
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        a = scale * lax.rsqrt(var + self.epsilon)  # [C]
        b = bias - mean * a                         # [C]
        return (x * a + b).astype(self.dtype)


class ConvBN(nn.Module):
    """Convolution -> BatchNorm -> ReLU6: the unit every MobileNet layer is made of.

    x: [B, H, W, C_in] -> [B, H/s, W/s, features] (a "depthwise" conv gives C_in * depth_multiplier
    channels, whatever `features` says; a "pointwise" one has stride 1).
    `conv` names the convolution kind: "full" (an ordinary 3x3 conv; as `PatchConv` on inputs of at most
    PATCH_CONV_MAX_CHANNELS channels, such as the RGB stem), "depthwise" or "pointwise".
    BatchNorm statistics are averaged over `bn_axis_name` when training data-parallel (None under
    plain `jit`), so 8 devices with 16 images each normalise exactly like 1 device with 128.
    """

    features: int
    conv: str = "full"
    strides: int = 1
    depth_multiplier: int = 1
    depthwise_impl: str = "feature_group_count"
    bn_axis_name: str | None = None
    bn_momentum: float = BN_MOMENTUM
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.conv == "depthwise":
            x = depthwise_conv(x.shape[-1], depth_multiplier=self.depth_multiplier, strides=self.strides,
                               impl=self.depthwise_impl, name="depthwise", **kw)(x)  # [B, H', W', C*m]
        elif self.conv == "pointwise":
            x = PointwiseConv(self.features, name="pointwise", **kw)(x)  # [B, H, W, C_out]
        elif x.shape[-1] <= PATCH_CONV_MAX_CHANNELS:
            x = PatchConv(self.features, strides=self.strides, name="conv", **kw)(x)  # [B, H', W', C_out]
        else:
            x = nn.Conv(self.features, (3, 3), strides=self.strides, padding="SAME", use_bias=False,
                        name="conv", **kw)(x)  # [B, H', W', C_out]
        # No conv bias: BatchNorm's beta already provides one.
        x = BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=BN_EPSILON,
                      axis_name=self.bn_axis_name, name="bn", **kw)(x)
        return jax.nn.relu6(x)


class SeparableBlock(nn.Module):
    """Depthwise 3x3 (+BN+ReLU6) then pointwise 1x1 (+BN+ReLU6): the paper's Figure 3, right (with ReLU6).

    x: [B, H, W, C_in] -> [B, ceil(H/stride), ceil(W/stride), features]
    """

    features: int
    strides: int = 1
    depth_multiplier: int = 1
    depthwise_impl: str = "feature_group_count"
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvBN(x.shape[-1] * self.depth_multiplier, conv="depthwise", strides=self.strides,
                   depth_multiplier=self.depth_multiplier, depthwise_impl=self.depthwise_impl,
                   name="depthwise", **kw)(x, train)      # filters space, channel by channel
        x = ConvBN(self.features, conv="pointwise", name="pointwise", **kw)(x, train)  # mixes channels
        return x
