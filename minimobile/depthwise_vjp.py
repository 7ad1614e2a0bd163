"""Shift-and-add depthwise convolution with a hand-written backward pass: the default on CPU.

`depthwise_conv_shift_add_vjp(x, kernel, stride)` takes what every implementation in `depthwise.py`
takes, `x: [B, H, W, C]` and `kernel: [3, 3, 1, C * m]`, and gives the same values as
`depthwise.depthwise_conv_shift_add`. Only its gradients are computed another way: autodiff's are
correct but slow on CPU, for reasons the comment below names, and these make the whole train step
about 1.5x faster.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from minimobile.depthwise import depthwise_conv_shift_add, pad_same, same_padding, tap_view

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
            term = tap_view(gp, di, dj, 1, h, w) * flipped[di, dj, 0]
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
    products = [tap_view(xp, di, dj, 1, h, w).astype(jnp.float32) * g for di in range(kh) for dj in range(kw)]
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

