"""The depthwise convolution, the operation at MobileNet's heart, in four ways that agree.

A depthwise 3x3 convolution gives every input channel its own 3x3 filter (Howard et al. 2017,
section 3.1): it filters space and never mixes channels; the pointwise 1x1 convolution after it
mixes them (`layers.py`). It is *one* operation with several equally correct implementations, and
comparing them is the quickest way to understand it:

  depthwise_conv_loops      NumPy loops, the definition itself (the test oracle; slow)
  depthwise_conv_split      one 1-channel convolution per input channel, concatenated (naive TF code)
  depthwise_conv_grouped    XLA's grouped convolution, `feature_group_count=C` (what `nn.Conv` does)
  depthwise_conv_shift_add  nine shifted copies of the input, each scaled per channel and summed

and a fifth, `depthwise_vjp.depthwise_conv_shift_add_vjp`: the same forward pass as shift-and-add with
its backward pass written by hand, the fastest on CPU. All take `x: [B, H, W, C]` and
`kernel: [3, 3, 1, C * m]` and use SAME padding, and all agree (tests/test_layers.py checks outputs
and gradients against the loops). `layers.DEPTHWISE_IMPLS` names them, and `layers.resolve_depthwise_impl`
says which one the trainer uses where.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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
# Four implementations of one depthwise convolution (the fifth is in depthwise_vjp.py).
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
            term = tap_view(xp, di, dj, stride, ho, wo) * kernel[di, dj, 0].astype(xp.dtype)
            out = term if out is None else out + term
    return out


def tap_view(xp: jax.Array, di: int, dj: int, stride: int, ho: int, wo: int) -> jax.Array:
    """The input pixels tap (di, dj) reads for every output pixel: rows di, di+s, ... of the padded input.

    xp: [B, H + pad, W + pad, C] -> [B, H', W', C].
    """
    b, _, _, c = xp.shape
    return lax.slice(xp, (0, di, dj, 0), (b, di + (ho - 1) * stride + 1, dj + (wo - 1) * stride + 1, c),
                     (1, stride, stride, 1))

