"""Every layer of MobileNet-V1 in plain NumPy, forward *and* backward, written out by hand.

JAX is the fast path; this module is the transparent one. Nothing here differentiates anything
automatically: each backward pass is derived in its docstring and then typed in, and
tests/test_numpy_nn.py checks every one against `jax.grad` and against finite differences.
`numpy_mobilenet.py` snaps these layers together into the whole network.

Every layer is a pair of pure functions with one convention, so they compose like Lego:

    y, cache = layer_forward(x, *params)       # cache: what the backward pass will need
    dx, *dparams = layer_backward(dy, cache)   # dL/dx, then dL/dparam in the forward's order

`dy` is dL/dy for some scalar loss L, so it has the shape of `y`, and every gradient returned has
the shape of the thing it is the gradient of. Layers without parameters return just `dx`.

    conv2d            full KxK convolution        w: [KH, KW, C_in, C_out]
    depthwise_conv    one filter per channel      w: [KH, KW, 1, C * m]
    pointwise_conv    1x1: a matrix multiply      w: [1, 1, C_in, C_out]
    batchnorm_train   normalise with the batch's own statistics
    batchnorm_inference   normalise with fixed (running) statistics
    relu6, global_avg_pool, dense, softmax_cross_entropy

Images are NHWC and kernels HWIO, exactly the layout of the Flax model, so its parameters can be
used here as they are. Convolutions use SAME padding the way XLA does (`depthwise.same_padding`).
"""

from __future__ import annotations

import numpy as np

# BatchNorm's epsilon, as in `layers.ConvBN`: keeps 1/sqrt(var + eps) finite for a constant channel.
from minimobile.depthwise import same_padding
from minimobile.layers import BN_EPSILON

# --------------------------------------------------------------------------------------------
# Convolutions. All three are written the same way: a 3x3 convolution is nine "taps", and tap
# (di, dj) is one strided view of the padded input, the pixel each output position reads at that
# offset. The full conv multiplies each view by a [C_in, C_out] matrix; the depthwise conv only
# scales it channel by channel; the pointwise conv has a single tap. The backward pass walks the
# same nine views: dw reads them, dx scatters into them (a transposed convolution).
# --------------------------------------------------------------------------------------------


def _pad_same(x: np.ndarray, kh: int, kw: int, stride: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Zero-pad x: [B, H, W, C] for a SAME convolution; returns (padded, (top, left), (H_out, W_out))."""
    _, h, w, _ = x.shape
    (top, bottom), (left, right) = same_padding(h, kh, stride), same_padding(w, kw, stride)
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))  # [B, H + pad, W + pad, C]
    return xp, (top, left), (-(-h // stride), -(-w // stride))       # ceil(H / stride)


def _tap(di: int, dj: int, out_hw: tuple[int, int], stride: int) -> tuple[slice, ...]:
    """Index of tap (di, dj) in the padded input: rows di, di+s, ..., one per output row.

    The same index reads the view in the forward pass (`xp[tap]`: [B, H_out, W_out, C]) and
    writes its gradient in the backward pass (`dxp[tap] += ...`).
    """
    ho, wo = out_hw
    return (slice(None), slice(di, di + (ho - 1) * stride + 1, stride),
            slice(dj, dj + (wo - 1) * stride + 1, stride), slice(None))


def conv2d_forward(x: np.ndarray, w: np.ndarray, stride: int = 1) -> tuple[np.ndarray, tuple]:
    """Full convolution, SAME padding: y[b, i, j, o] = sum_{di, dj, c} xp[b, i*s + di, j*s + dj, c] w[di, dj, c, o].

    x: [B, H, W, C_in], w: [KH, KW, C_in, C_out] -> y: [B, ceil(H/s), ceil(W/s), C_out].
    Computed as KH*KW matrix multiplies, one per tap: y = sum_taps view_tap @ w[di, dj].
    """
    kh, kw, _, _ = w.shape
    xp, corner, out_hw = _pad_same(x, kh, kw, stride)
    y = 0
    for di in range(kh):
        for dj in range(kw):
            y = y + xp[_tap(di, dj, out_hw, stride)] @ w[di, dj]  # [B, H', W', C_in] @ [C_in, C_out]
    return y, (xp, w, stride, corner, x.shape)


def conv2d_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray]:
    """dy: [B, H', W', C_out] -> (dx: [B, H, W, C_in], dw: [KH, KW, C_in, C_out]).

    Each tap is a matrix multiply y += V @ W (V: [N, C_in] pixels, W: [C_in, C_out]), whose gradients
    are the matrix-multiply rules dW = V^T dy and dV = dy W^T:

      dw[di, dj] = sum_{b, i, j} view[b, i, j, :]^T dy[b, i, j, :]        [C_in, C_out]
      dxp[tap]  += dy @ w[di, dj]^T                                        [B, H', W', C_in]

    A padded pixel is read by up to nine taps, so its gradient is the sum of what each tap sends
    back. The padding itself is a constant: we drop its gradient by cropping dxp back to [H, W].
    """
    xp, w, stride, (top, left), (_, h, width, _) = cache
    kh, kw, _, _ = w.shape
    out_hw = dy.shape[1:3]
    dxp, dw = np.zeros_like(xp, dtype=dy.dtype), np.zeros_like(w, dtype=dy.dtype)
    for di in range(kh):
        for dj in range(kw):
            tap = _tap(di, dj, out_hw, stride)
            dw[di, dj] = np.tensordot(xp[tap], dy, axes=([0, 1, 2], [0, 1, 2]))  # sum over b, i, j
            dxp[tap] += dy @ w[di, dj].T
    return dxp[:, top:top + h, left:left + width], dw


def depthwise_conv_forward(x: np.ndarray, w: np.ndarray, stride: int = 1) -> tuple[np.ndarray, tuple]:
    """Depthwise convolution, SAME padding: y[b, i, j, o] = sum_{di,dj} xp[b, i*s+di, j*s+dj, o // m] w[di, dj, 0, o].

    x: [B, H, W, C], w: [KH, KW, 1, C*m] -> y: [B, ceil(H/s), ceil(W/s), C*m]. With depth multiplier
    m, input channel c owns the m output channels c*m .. c*m + m-1 (the grouped-convolution layout),
    so we first repeat each input channel m times; after that it is one filter per channel: the
    nine taps are elementwise products with a per-channel weight, no channel mixing at all.
    """
    kh, kw, _, cm = w.shape
    m = cm // x.shape[-1]
    xr = np.repeat(x, m, axis=-1)  # [B, H, W, C*m]: channel o is a copy of input channel o // m
    xp, corner, out_hw = _pad_same(xr, kh, kw, stride)
    y = 0
    for di in range(kh):
        for dj in range(kw):
            y = y + xp[_tap(di, dj, out_hw, stride)] * w[di, dj, 0]  # [B, H', W', C*m] * [C*m]
    return y, (xp, w, stride, corner, x.shape)


def depthwise_conv_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray]:
    """dy: [B, H', W', C*m] -> (dx: [B, H, W, C], dw: [KH, KW, 1, C*m]).

    Each tap is y += V * w_tap with a per-channel weight broadcast over [B, H', W'], so

      dw[di, dj, 0, o] = sum_{b, i, j} view[b, i, j, o] dy[b, i, j, o]     [C*m]
      dxp[tap]        += dy * w[di, dj, 0]                                 [B, H', W', C*m]

    then crop the padding, and undo the repeat: input channel c was copied into m output channels,
    so its gradient is the sum of theirs, dx[..., c] = sum_k dxr[..., c*m + k].
    """
    xp, w, stride, (top, left), (b, h, width, c) = cache
    kh, kw, _, cm = w.shape
    out_hw = dy.shape[1:3]
    dxp, dw = np.zeros_like(xp, dtype=dy.dtype), np.zeros_like(w, dtype=dy.dtype)
    for di in range(kh):
        for dj in range(kw):
            tap = _tap(di, dj, out_hw, stride)
            dw[di, dj, 0] = np.sum(xp[tap] * dy, axis=(0, 1, 2))
            dxp[tap] += dy * w[di, dj, 0]
    dxr = dxp[:, top:top + h, left:left + width]                       # [B, H, W, C*m]
    return dxr.reshape(b, h, width, c, cm // c).sum(axis=-1), dw      # [B, H, W, C]


def pointwise_conv_forward(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, tuple]:
    """1x1 convolution: the same [C_in, C_out] matrix applied at every pixel, y = x @ w[0, 0].

    x: [B, H, W, C_in], w: [1, 1, C_in, C_out] (the Flax kernel shape) -> y: [B, H, W, C_out].
    """
    return x @ w[0, 0], (x, w)


def pointwise_conv_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray]:
    """dy: [B, H, W, C_out] -> (dx: [B, H, W, C_in], dw: [1, 1, C_in, C_out]).

    Treat the B*H*W pixels as rows of one matrix X: [N, C_in]; then Y = X W and

      dX = dY W^T          [N, C_out] @ [C_out, C_in]
      dW = X^T dY          [C_in, N] @ [N, C_out]: every pixel contributes to the one shared matrix
    """
    x, w = cache
    dw = np.tensordot(x, dy, axes=([0, 1, 2], [0, 1, 2]))  # [C_in, C_out]
    return dy @ w[0, 0].T, dw[None, None]


# --------------------------------------------------------------------------------------------
# BatchNorm. Per channel, over every other axis (B, H, W for images): x_hat = (x - mean) / std,
# y = scale * x_hat + bias. Training mode uses this batch's mean and (biased) variance, so every
# output depends on every input of its channel; inference mode uses fixed running statistics,
# which makes it a plain per-channel affine map. Same formula, two different backward passes.
# --------------------------------------------------------------------------------------------


def batch_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and *biased* variance (divide by N, as Flax does) over all axes but the last.

    x: [B, H, W, C] (or [B, C]) -> (mean: [C], var: [C]).
    """
    axes = tuple(range(x.ndim - 1))
    return x.mean(axis=axes), x.var(axis=axes)


def batchnorm_train_forward(x: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                            eps: float = BN_EPSILON) -> tuple[np.ndarray, tuple]:
    """Training-mode BatchNorm: normalise each channel with this batch's statistics.

    x: [B, H, W, C], scale, bias: [C] -> y: [B, H, W, C]. The running averages are not touched
    here (a pure function); `batch_moments(x)` gives the statistics to fold into them.
    """
    mean, var = batch_moments(x)
    inv_std = 1.0 / np.sqrt(var + eps)  # [C]
    x_hat = (x - mean) * inv_std        # [B, H, W, C], zero mean and unit variance per channel
    return scale * x_hat + bias, (x_hat, inv_std, scale)


def batchnorm_train_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dy: [B, H, W, C] -> (dx: [B, H, W, C], dscale: [C], dbias: [C]).

    With g = dL/dx_hat = dy * scale and every mean taken per channel over the N = B*H*W positions:

      dbias  = sum(dy)
      dscale = sum(dy * x_hat)
      dx     = inv_std * (g - mean(g) - x_hat * mean(g * x_hat))

    The first term is the direct path. The other two exist because the batch statistics depend on
    x: nudging one input moves the mean, shifting every x_hat of the channel (-mean(g)), and moves
    the variance, rescaling every x_hat (-x_hat * mean(g * x_hat)). So dx sums to zero per channel:
    adding a constant to a whole channel changes nothing after normalisation.
    """
    x_hat, inv_std, scale = cache
    axes = tuple(range(dy.ndim - 1))
    g = dy * scale
    dx = inv_std * (g - g.mean(axis=axes) - x_hat * (g * x_hat).mean(axis=axes))
    return dx, np.sum(dy * x_hat, axis=axes), np.sum(dy, axis=axes)


def batchnorm_inference_forward(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray,
                                var: np.ndarray, eps: float = BN_EPSILON) -> tuple[np.ndarray, tuple]:
    """Inference-mode BatchNorm: normalise with fixed statistics (the Flax `batch_stats`).

    x: [B, H, W, C], scale, bias, mean, var: [C] -> y: [B, H, W, C]. The statistics are constants,
    not parameters: the backward pass returns no gradient for them.
    """
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean) * inv_std
    return scale * x_hat + bias, (x_hat, inv_std, scale)


def batchnorm_inference_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dy: [B, H, W, C] -> (dx: [B, H, W, C], dscale: [C], dbias: [C]).

    y = scale * inv_std * (x - mean) + bias is a per-channel affine map of x alone, so

      dx = dy * scale * inv_std,   dscale = sum(dy * x_hat),   dbias = sum(dy)

    (compare batchnorm_train_backward: the two extra terms are the price of batch statistics).
    """
    x_hat, inv_std, scale = cache
    axes = tuple(range(dy.ndim - 1))
    return dy * scale * inv_std, np.sum(dy * x_hat, axis=axes), np.sum(dy, axis=axes)


# --------------------------------------------------------------------------------------------
# The rest: activation, pooling, classifier and loss.
# --------------------------------------------------------------------------------------------


def relu6_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """y = min(max(x, 0), 6), elementwise. Any shape."""
    return np.clip(x, 0.0, 6.0), (x > 0) & (x < 6)


def relu6_backward(dy: np.ndarray, cache: np.ndarray) -> np.ndarray:
    """dx = dy where 0 < x < 6, else 0: the slope is 1 on the ramp and 0 on both flat parts.

    At exactly 0 and 6 the slope is undefined; we take 0, the same choice as `jax.nn.relu6`.
    """
    return dy * cache


def global_avg_pool_forward(x: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Mean over the spatial axes: x: [B, H, W, C] -> y: [B, C]."""
    return x.mean(axis=(1, 2)), x.shape


def global_avg_pool_backward(dy: np.ndarray, cache: tuple) -> np.ndarray:
    """dy: [B, C] -> dx: [B, H, W, C], dx[b, i, j, c] = dy[b, c] / (H*W).

    Each of the H*W pixels contributes 1/(H*W) of the mean, so each gets that share of the gradient.
    """
    b, h, w, c = cache
    return np.broadcast_to(dy[:, None, None, :] / (h * w), (b, h, w, c)).copy()


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Fully connected: y = x @ w + b. x: [B, D_in], w: [D_in, D_out], b: [D_out] -> y: [B, D_out]."""
    return x @ w + b, (x, w)


def dense_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dy: [B, D_out] -> (dx: [B, D_in], dw: [D_in, D_out], db: [D_out]).

      dx = dy @ w^T,   dw = x^T @ dy,   db = sum_b dy[b]   (the bias is added to every row)
    """
    x, w = cache
    return dy @ w.T, x.T @ dy, dy.sum(axis=0)


def softmax_cross_entropy_forward(logits: np.ndarray, labels: np.ndarray) -> tuple[float, tuple]:
    """Mean over the batch of -log softmax(logits)[label]. logits: [B, K], labels: [B] ints -> scalar.

    Subtracting each row's max first changes nothing (softmax is shift-invariant) but keeps exp()
    from overflowing: the computed log_softmax stays finite and accurate even for logits of 1000.
    """
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))  # [B, K] log-probabilities
    batch = np.arange(len(labels))
    return -np.mean(log_p[batch, labels]), (np.exp(log_p), labels)


def softmax_cross_entropy_backward(dloss: float, cache: tuple) -> np.ndarray:
    """dloss: scalar (1.0 when this is the loss) -> dlogits: [B, K].

    For one example, L = logsumexp(z) - z[label], so dL/dz = softmax(z) - onehot(label): push the
    probabilities towards the one-hot target. The batch mean divides by B.
    """
    p, labels = cache
    dlogits = p.copy()
    dlogits[np.arange(len(labels)), labels] -= 1.0
    return dloss * dlogits / len(labels)
