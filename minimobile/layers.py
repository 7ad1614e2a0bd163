"""The two convolutions MobileNet is made of, and the block that pairs them.

A standard 3x3 convolution mixes space and channels in one step: each of its `C_out` filters is
`3 x 3 x C_in`. MobileNet factorises it into two cheaper steps (Howard et al. 2017, section 3.1):

  depthwise  3x3, one filter per input channel    kernel [3, 3, 1, C * depth_multiplier]
  pointwise  1x1, a matrix multiply over channels kernel [1, 1, C_in, C_out]

each followed by BatchNorm and ReLU6 (the paper writes ReLU; Google's released TensorFlow MobileNet,
`mobilenet_v1_arg_scope` in TF-slim, uses ReLU6 = min(max(x, 0), 6), and so do we). The depthwise
step is *one* operation with several equally correct implementations; we keep five, because
comparing them is the quickest way to understand it:

  depthwise_conv_loops   NumPy loops, the definition itself (the test oracle; slow)
  depthwise_conv_split   one 1-channel convolution per input channel, concatenated (naive TF code)
  depthwise_conv_grouped XLA's grouped convolution, `feature_group_count=C` (what `nn.Conv` does)
  depthwise_conv_shift_add nine shifted copies of the input, each scaled per channel and summed
  depthwise_conv_shift_add_vjp  the same forward pass, with its backward pass written by hand

All take `x: [B, H, W, C]` and `kernel: [3, 3, 1, C * m]` and use SAME padding, and all agree
(tests/test_layers.py checks outputs and gradients against the loops). The model's own default is
the grouped convolution, `nn.Conv` itself (`depthwise_conv`); the trainer's `depthwise_impl="auto"`
keeps it on GPU and TPU and picks `shift_add_vjp` on CPU (`resolve_depthwise_impl` says why).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

Dtype = Any

# BatchNorm as PyTorch and most CIFAR recipes set it (TF-slim's ImageNet MobileNet used 0.9997 / 1e-3).
BN_MOMENTUM = 0.9    # running = 0.9 * running + 0.1 * this batch
BN_EPSILON = 1e-5

# --------------------------------------------------------------------------------------------
# SAME padding, spelled out once: every implementation below must pad exactly like XLA does.
# --------------------------------------------------------------------------------------------


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding for SAME: output size is ceil(size / stride).

    When the total is odd the extra row goes *after* (TensorFlow/XLA convention), so a stride-2
    3x3 conv on a 32-pixel input pads 0 before and 1 after.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: jax.Array, kernel_hw: tuple[int, int], stride: int) -> jax.Array:
    """x: [B, H, W, C] zero-padded for a SAME convolution -> [B, H + pad, W + pad, C]."""
    (top, bottom), (left, right) = (same_padding(n, k, stride) for n, k in zip(x.shape[1:3], kernel_hw))
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


# --------------------------------------------------------------------------------------------
# Five implementations of one depthwise convolution.
# --------------------------------------------------------------------------------------------


def depthwise_conv_loops(x: np.ndarray, kernel: np.ndarray, stride: int = 1) -> np.ndarray:
    """The definition, in NumPy loops.

    out[b, i, j, c*m + k] = sum over (di, dj) of x_padded[b, i*s + di, j*s + dj, c] * w[di, dj, 0, c*m + k]

    x: [B, H, W, C], kernel: [KH, KW, 1, C*m] -> [B, ceil(H/s), ceil(W/s), C*m]. Output channel `o`
    reads input channel `o // m`: a depth multiplier m gives each input channel m filters of its own.
    """
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    b, h, w, c = x.shape
    kh, kw, _, cm = kernel.shape
    m = cm // c
    (top, bottom), (left, right) = same_padding(h, kh, stride), same_padding(w, kw, stride)
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    ho, wo = -(-h // stride), -(-w // stride)
    out = np.zeros((b, ho, wo, cm))
    for o in range(cm):
        for i in range(ho):
            for j in range(wo):
                window = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, o // m]  # [B, KH, KW]
                out[:, i, j, o] = np.sum(window * kernel[:, :, 0, o], axis=(1, 2))
    return out


def _conv(x, kernel, stride, groups=1):
    """XLA convolution, NHWC / HWIO, SAME padding."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def depthwise_conv_grouped(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """A grouped convolution with one group per input channel: `feature_group_count=C`.

    With C groups, group g sees input channel g only and owns output channels g*m .. g*m+m-1,
    which is exactly the depthwise layout of `kernel: [3, 3, 1, C*m]`.
    """
    return _conv(x, kernel, stride, groups=x.shape[-1])


def depthwise_conv_split(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """One ordinary 1-input-channel convolution per channel, then concatenate (how naive TF1 code did it)."""
    c = x.shape[-1]
    m = kernel.shape[-1] // c
    outs = [_conv(x[..., i:i + 1], kernel[..., i * m:(i + 1) * m], stride) for i in range(c)]
    return jnp.concatenate(outs, axis=-1)  # [B, H', W', C*m]


def depthwise_conv_shift_add(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Nine shifted views of the padded input, each multiplied by one tap per channel, summed.

    A depthwise filter never mixes channels, so it is just `KH*KW` elementwise multiply-adds with
    a per-channel weight broadcast over [B, H, W]. Written this way XLA fuses all nine into one
    loop over the output, with no im2col buffer and no grouped-convolution kernel; on CPU that is
    much faster, forward and backward (see `python -m minimobile.bench --depthwise-impl ...`).
    """
    b, h, w, c = x.shape
    kh, kw, _, cm = kernel.shape
    m = cm // c
    if m > 1:
        x = jnp.repeat(x, m, axis=-1)  # output channel o reads input channel o // m
    xp = pad_same(x, (kh, kw), stride)
    ho, wo = -(-h // stride), -(-w // stride)
    out = None
    for di in range(kh):
        for dj in range(kw):
            term = _tap_view(xp, di, dj, stride, ho, wo) * kernel[di, dj, 0].astype(xp.dtype)
            out = term if out is None else out + term
    return out


def _tap_view(xp: jax.Array, di: int, dj: int, stride: int, ho: int, wo: int) -> jax.Array:
    """The input pixels tap (di, dj) reads for every output pixel: rows di, di+s, ... of the padded input.

    xp: [B, H + pad, W + pad, C] -> [B, H', W', C].
    """
    b, _, _, c = xp.shape
    return lax.slice(xp, (0, di, dj, 0), (b, di + (ho - 1) * stride + 1, dj + (wo - 1) * stride + 1, c),
                     (1, stride, stride, 1))


# The hand-written backward pass. Autodiff of shift-and-add is correct but slow on CPU, for two
# reasons the profile shows (python -m minimobile.bench; jax.jit(...).lower(...).compile().as_text()):
#   * the input gradient becomes a sum of nine zero-padded copies of the output gradient, and XLA
#     fuses each pad as a per-element bounds test, re-computing the upstream BatchNorm backward nine
#     times over;
#   * the kernel gradient becomes nine reductions over [B, H, W], each of which first writes a
#     shifted copy of the input to memory (XLA's fast reduction kernels take no slices).
# Written out, the input gradient is itself a depthwise convolution and the kernel gradient nine
# multiply-and-sums that XLA turns into loops it fuses well: the whole CPU train step (width 1.0,
# batch 128) runs about 1.5x faster than with autodiff's (`python -m minimobile.bench --all-impls`).
#
# Strided layers read the input through its stride x stride *phases* (polyphase decomposition):
# phase (p, q) holds the pixels x[s*i + p, s*j + q], and tap (di, dj) of a stride-s filter reads one
# phase, shifted by at most one pixel. The forward pass then needs no padded copy of the input, and
# the input gradient is computed phase by phase from the taps that touch it (4 + 2 + 2 + 1 of the
# nine at stride 2) instead of from a copy of g spread out with zeros, three quarters of them.

KERNEL_GRAD_FOLD = 8  # how many rows one fused loop adds up before the final reduction (see below)


def _shift_hw(v: jax.Array, di: int, dj: int) -> jax.Array:
    """v: [B, H, W, C] -> out[:, i, j] = v[:, i + di, j + dj], zero where that falls outside v. Same shape."""
    _, h, w, _ = v.shape
    v = v[:, max(di, 0):h + min(di, 0), max(dj, 0):w + min(dj, 0)]
    return jnp.pad(v, ((0, 0), (max(-di, 0), max(di, 0)), (max(-dj, 0), max(dj, 0)), (0, 0)))


def _tap_phases(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int
                ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """For each tap d of a SAME stride-s filter, per spatial axis: (phase, shift) of the input it reads.

    Output pixel i reads input pixel s*i + d - before = s*(i + shift) + phase. Returns (rows, cols):
    the list for the taps along H and the list for the taps along W.
    """
    def along(size: int, kernel: int) -> list[tuple[int, int]]:
        before = same_padding(size, kernel, stride)[0]
        return [((d - before) % stride, (d - before) // stride) for d in range(kernel)]
    return along(x_shape[1], kernel_shape[0]), along(x_shape[2], kernel_shape[1])


def _phases(x: jax.Array, stride: int) -> jax.Array:
    """x: [B, H, W, C] -> [B, H', s, W', s, C] with out[:, i, p, j, q] = x[:, s*i + p, s*j + q] (zeros past the edge).

    A reshape, free when H and W are multiples of the stride (a zero row/column is added otherwise).
    """
    b, h, w, c = x.shape
    ho, wo = -(-h // stride), -(-w // stride)
    if (ho * stride, wo * stride) != (h, w):
        x = jnp.pad(x, ((0, 0), (0, ho * stride - h), (0, wo * stride - w), (0, 0)))
    return x.reshape(b, ho, stride, wo, stride, c)


def _depthwise_forward_strided(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Shift-and-add for stride > 1, tap by tap from the input's phases. -> [B, H', W', C]."""
    rows, cols = _tap_phases(x.shape, kernel.shape, stride)
    xs = _phases(x, stride)                                            # [B, H', s, W', s, C]
    out = None
    for di, (p, shift_i) in enumerate(rows):
        for dj, (q, shift_j) in enumerate(cols):
            view = _shift_hw(xs[:, :, p, :, q], shift_i, shift_j)  # x[s*(i+shift_i)+p, s*(j+shift_j)+q]
            term = view * kernel[di, dj, 0].astype(x.dtype)
            out = term if out is None else out + term
    return out


def _depthwise_input_grad_strided(g: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...], stride: int) -> jax.Array:
    """dL/dx for stride > 1, one input phase at a time. g: [B, H', W', C] -> [B, H, W, C].

    Input pixel s*a + p was read by tap d (of phase p, shift t) for output pixel a - t, so phase p's
    gradient is the sum over its taps of g shifted back by t, times the tap's weight.
    """
    b, h, w, c = x_shape
    ho, wo = g.shape[1:3]
    rows, cols = _tap_phases(x_shape, kernel.shape, stride)
    kernel = kernel.astype(g.dtype)
    phases = [[jnp.zeros_like(g) for _ in range(stride)] for _ in range(stride)]  # a phase no tap reads: 0
    for di, (p, shift_i) in enumerate(rows):
        for dj, (q, shift_j) in enumerate(cols):
            phases[p][q] = phases[p][q] + _shift_hw(g, -shift_i, -shift_j) * kernel[di, dj, 0]
    grid = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # [B, H', s, W', s, C]
    return grid.reshape(b, ho * stride, wo * stride, c)[:, :h, :w]


def _depthwise_input_grad(g: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...], stride: int) -> jax.Array:
    """dL/dx of a depthwise convolution, given g = dL/dy: a depthwise convolution of g with the flipped kernel.

    y[i] = sum_d xp[i*s + d] k[d] sends g[i] * k[d] back to input pixel i*s + d - before. At stride 1
    that is g, padded by (K - 1 - before) in front, correlated with the kernel reversed in both spatial
    axes. g: [B, H', W', C], kernel: [KH, KW, 1, C] -> [B, H, W, C].
    """
    if stride > 1:
        return _depthwise_input_grad_strided(g, kernel, x_shape, stride)
    _, h, w, _ = x_shape
    kh, kw = kernel.shape[:2]
    top, left = same_padding(h, kh, 1)[0], same_padding(w, kw, 1)[0]
    gp = jnp.pad(g, ((0, 0), (kh - 1 - top, top), (kw - 1 - left, left), (0, 0)))  # [B, H + KH - 1, W + KW - 1, C]
    flipped = kernel[::-1, ::-1].astype(g.dtype)
    out = None
    for di in range(kh):
        for dj in range(kw):
            term = _tap_view(gp, di, dj, 1, h, w) * flipped[di, dj, 0]
            out = term if out is None else out + term
    return out


def _depthwise_kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], stride: int) -> jax.Array:
    """dL/dkernel: for each tap, sum over [B, H', W'] of (the input pixels it reads) * g. -> [KH, KW, 1, C].

    Products and sums are float32, whatever the compute dtype: the kernel gradient adds up B*H'*W'
    terms. At stride 1 the taps read shifted views of one padded copy of x.
    """
    if stride > 1:
        return _depthwise_kernel_grad_strided(x, g, kernel_shape, stride)
    kh, kw = kernel_shape[:2]
    h, w = g.shape[1:3]
    xp = pad_same(x, (kh, kw), 1)
    g = g.astype(jnp.float32)
    products = [_tap_view(xp, di, dj, 1, h, w).astype(jnp.float32) * g for di in range(kh) for dj in range(kw)]
    return _sum_per_tap(products).reshape(kernel_shape)


def _depthwise_kernel_grad_strided(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], stride: int) -> jax.Array:
    """dL/dkernel for stride > 1, from the input's phases: tap d reads phase p shifted by t, so its
    products pair phase p with g shifted back by t (g is s*s times smaller than x: shifting it, not
    the input, is ~20 % faster on CPU than strided views of a padded input). -> [KH, KW, 1, C].
    """
    rows, cols = _tap_phases(x.shape, kernel_shape, stride)
    xs = _phases(x, stride).astype(jnp.float32)                        # [B, H', s, W', s, C]
    g = g.astype(jnp.float32)
    products = [xs[:, :, p, :, q] * _shift_hw(g, -shift_i, -shift_j)
                for p, shift_i in rows for q, shift_j in cols]
    return _sum_per_tap(products).reshape(kernel_shape)


def _sum_per_tap(products: list[jax.Array]) -> jax.Array:
    """[KH*KW] x [B, H', W', C] -> [KH*KW, C]: each tap's products summed over batch and space.

    Nine reductions over the whole batch would each write a shifted copy of x first (XLA's fast
    reduction kernels take no slices). Instead each tap first folds KERNEL_GRAD_FOLD groups of rows
    together by plain additions, which XLA fuses into one loop that reads x and g once and writes 1/8
    as much; one small reduction finishes. (Much more than 8 terms and XLA splits the loop apart again.
    The stack matters too: summing each tap's partial on its own lets XLA fuse the fold into that
    reduction, which runs 2.5x slower on CPU.)
    """
    b, ho, wo, c = products[0].shape
    rows = b * ho
    fold = next(f for f in (KERNEL_GRAD_FOLD, 4, 2, 1) if rows % f == 0)
    sums = []
    for product in products:
        product = product.reshape(fold, rows // fold, wo, c)     # [fold, B*H'/fold, W', C]: a free reshape
        partial = product[0]
        for i in range(1, fold):
            partial = partial + product[i]                      # elementwise: stays in one fused loop
        sums.append(partial)
    return jnp.sum(jnp.stack(sums), axis=(1, 2))               # [9, rows/fold, W', C] -> [9, C]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shift_add_same_channels(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Shift-and-add with a hand-written VJP; x: [B, H, W, C], kernel: [KH, KW, 1, C] (multiplier 1)."""
    if stride > 1:
        return _depthwise_forward_strided(x, kernel, stride)
    return depthwise_conv_shift_add(x, kernel, stride)


def _shift_add_forward(x, kernel, stride):
    return _shift_add_same_channels(x, kernel, stride), (x, kernel)


def _in_memory(g: jax.Array) -> jax.Array:
    """g, unchanged (for finite g), but computed once into memory rather than inside each of its readers.

    The backward pass reads g in ten loops (the input gradient and the nine kernel-gradient taps),
    and g is itself an elementwise function of two tensors (BatchNorm's backward). XLA fuses cheap
    elementwise producers into every consumer, so each loop would read both tensors and redo the
    arithmetic; a division, which XLA counts as expensive, is never duplicated that way. x / 1 == x
    exactly in IEEE arithmetic, so only the memory traffic changes: the train step runs ~5 % faster
    on CPU (width 1.0, batch 128). (`lax.optimization_barrier` would say this more plainly, but
    XLA:CPU removes barriers before fusion.)
    """
    return g / (g * 0 + 1)


def _shift_add_backward(stride, residuals, g):
    x, kernel = residuals
    g = _in_memory(g)
    dx = _depthwise_input_grad(g, kernel, x.shape, stride)
    dk = _depthwise_kernel_grad(x, g, kernel.shape, stride)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_shift_add_same_channels.defvjp(_shift_add_forward, _shift_add_backward)


def depthwise_conv_shift_add_vjp(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Shift-and-add forward, hand-written backward (`jax.custom_vjp`): the fastest on CPU.

    Same values as `depthwise_conv_shift_add`, same gradients up to float rounding (the tests check
    both against the NumPy loops). A depth multiplier m > 1 repeats the input's channels first and
    lets autodiff sum the m copies' gradients back.
    """
    m = kernel.shape[-1] // x.shape[-1]
    if m > 1:
        x = jnp.repeat(x, m, axis=-1)  # output channel o reads input channel o // m
    return _shift_add_same_channels(x, kernel, stride)


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
        patches = jnp.concatenate([_tap_view(xp, di, dj, self.strides, ho, wo)
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
