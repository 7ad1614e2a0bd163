"""The whole MobileNet-V1 in plain NumPy: forward, backward and an SGD step, on a Flax model's variables.

`numpy_nn.py` has the layers; this file wires them into the network of `model.MobileNetV1` and
runs it on that model's own parameters and batch statistics:

    variables = init_variables(MobileNetV1_Tiny(), jax.random.key(0))      # width 1/16, CIFAR stem
    params, batch_stats = variables["params"], variables["batch_stats"]
    logits = predict(params, batch_stats, images, stem="cifar")           # = model.apply(variables, images)
    params, batch_stats, loss = train_step(params, batch_stats, images, labels, lr=0.1, stem="cifar")

tests/test_numpy_nn.py checks the logits against `model.apply` and the gradients against `jax.grad`.
Every layer is a Flax `ConvBN` unit (convolution -> BatchNorm -> ReLU6), so the network is just a
list of units, then pooling and the classifier; the backward pass walks that list in reverse.

Dropout is left out: it is the identity at inference and at the model's default rate of 0, the
only rate the NumPy train step reproduces. Everything runs in float64 by default (`dtype=`), so
NumPy's own rounding is negligible next to that of a float32 model it is compared with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from minimobile.layers import BN_MOMENTUM
from minimobile.model import MOBILENET_V1_BLOCKS, STEM_STRIDES
from minimobile.numpy_nn import (batch_moments, batchnorm_inference_backward, batchnorm_inference_forward,
                                 batchnorm_train_backward, batchnorm_train_forward, conv2d_backward,
                                 conv2d_forward, dense_backward, dense_forward, depthwise_conv_backward,
                                 depthwise_conv_forward, global_avg_pool_backward, global_avg_pool_forward,
                                 pointwise_conv_backward, pointwise_conv_forward, relu6_backward, relu6_forward,
                                 softmax_cross_entropy_backward, softmax_cross_entropy_forward)

Tree = dict[str, Any]  # a nested dict of arrays, shaped like Flax's `params` or `batch_stats`


# --------------------------------------------------------------------------------------------
# Parameter trees: nested dicts, addressed by paths like ("block03", "depthwise").
# --------------------------------------------------------------------------------------------


def to_numpy(tree: Tree, dtype: Any = np.float64) -> Tree:
    """A copy of a Flax variable tree as nested dicts of NumPy arrays of `dtype`."""
    if isinstance(tree, Mapping):
        return {k: to_numpy(v, dtype) for k, v in tree.items()}
    return np.asarray(tree, dtype)


def _get(tree: Tree, path: tuple[str, ...]) -> Tree:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Tree, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def conv_bn_units(params: Tree, stem: str) -> list[tuple[tuple[str, ...], int]]:
    """The network as a flat list of ConvBN units, input to output: (path in the param tree, stride).

    The strides come from `model.MOBILENET_V1_BLOCKS` (the paper's Table 1) and `model.STEM_STRIDES`;
    the block type is read off the parameters: a "standard" block has one full `conv`, a separable
    one a `depthwise` unit (which carries the stride) then a `pointwise` unit.
    """
    if stem not in STEM_STRIDES:
        raise ValueError(f"stem must be one of {sorted(STEM_STRIDES)}, got {stem!r}")
    units = [(("stem",), STEM_STRIDES[stem])]
    for i, (_, stride) in enumerate(MOBILENET_V1_BLOCKS):
        name = f"block{i + 1:02d}"  # Flax's module name, as in model.MobileNetV1
        if "conv" in params[name]:
            units.append(((name,), stride))
        else:
            units += [((name, "depthwise"), stride), ((name, "pointwise"), 1)]
    return units


# --------------------------------------------------------------------------------------------
# One ConvBN unit, and the network.
# --------------------------------------------------------------------------------------------

_CONVS = {  # the unit's convolution, by its name in the param tree
    "conv": (conv2d_forward, conv2d_backward),
    "depthwise": (depthwise_conv_forward, depthwise_conv_backward),
    "pointwise": (lambda x, w, stride: pointwise_conv_forward(x, w), pointwise_conv_backward),  # always stride 1
}


def conv_bn_relu6_forward(x: np.ndarray, params: Tree, stats: Tree, *, stride: int, train: bool,
                          momentum: float = BN_MOMENTUM) -> tuple[np.ndarray, Tree, tuple]:
    """One `layers.ConvBN`: convolution, BatchNorm, ReLU6. x: [B, H, W, C_in] -> y: [B, H/s, W/s, C_out].

    params: {<conv>: {"kernel"}, "bn": {"scale", "bias"}} with <conv> one of "conv", "depthwise",
    "pointwise" (as in the Flax tree); stats: {"bn": {"mean", "var"}}. Returns (y, new_stats, cache): in
    training mode new_stats are the running averages updated with this batch, else `stats` itself.
    """
    (conv,) = [name for name in params if name != "bn"]
    forward, _ = _CONVS[conv]
    x, conv_cache = forward(x, params[conv]["kernel"], stride)
    scale, bias = params["bn"]["scale"], params["bn"]["bias"]
    if train:
        mean, var = batch_moments(x)  # the statistics batchnorm_train_forward normalises with
        x, bn_cache = batchnorm_train_forward(x, scale, bias)
        running = stats["bn"]
        stats = {"bn": {"mean": momentum * running["mean"] + (1 - momentum) * mean,
                        "var": momentum * running["var"] + (1 - momentum) * var}}
    else:
        x, bn_cache = batchnorm_inference_forward(x, scale, bias, stats["bn"]["mean"], stats["bn"]["var"])
    x, relu_cache = relu6_forward(x)
    return x, stats, (conv, conv_cache, train, bn_cache, relu_cache)


def conv_bn_relu6_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, Tree]:
    """dy: [B, H', W', C_out] -> (dx: [B, H, W, C_in], grads shaped like the unit's params).

    The chain rule is the forward pass read backwards: ReLU6, then BatchNorm, then the convolution.
    """
    conv, conv_cache, train, bn_cache, relu_cache = cache
    dy = relu6_backward(dy, relu_cache)
    dy, dscale, dbias = (batchnorm_train_backward if train else batchnorm_inference_backward)(dy, bn_cache)
    _, backward = _CONVS[conv]
    dx, dkernel = backward(dy, conv_cache)
    return dx, {conv: {"kernel": dkernel}, "bn": {"scale": dscale, "bias": dbias}}


def mobilenet_forward(params: Tree, batch_stats: Tree, images: np.ndarray, *, stem: str, train: bool = False,
                      momentum: float = BN_MOMENTUM, dtype: Any = np.float64) -> tuple[np.ndarray, Tree, tuple]:
    """The network of `model.MobileNetV1(stem=stem)` on its variables. images: [B, H, W, 3] -> logits [B, K].

    Returns (logits, new_batch_stats, cache). train=True normalises with batch statistics and
    returns the updated running averages (what Flax's `mutable=["batch_stats"]` returns);
    train=False uses `batch_stats` and returns them unchanged.
    """
    params, batch_stats = to_numpy(params, dtype), to_numpy(batch_stats, dtype)
    x = np.asarray(images, dtype)
    units = conv_bn_units(params, stem)
    new_stats, unit_caches = {}, []
    for path, stride in units:  # stem, then 13 blocks             [B, H, W, 3] -> [B, h, w, 1024a]
        x, stats, cache = conv_bn_relu6_forward(x, _get(params, path), _get(batch_stats, path),
                                                stride=stride, train=train, momentum=momentum)
        _set(new_stats, path, stats)
        unit_caches.append(cache)
    x, pool_cache = global_avg_pool_forward(x)                    # [B, 1024a]
    logits, dense_cache = dense_forward(x, params["classifier"]["kernel"], params["classifier"]["bias"])
    return logits, new_stats, (units, unit_caches, pool_cache, dense_cache)


def mobilenet_backward(dlogits: np.ndarray, cache: tuple) -> tuple[np.ndarray, Tree]:
    """dlogits: [B, K] -> (dimages: [B, H, W, 3], grads shaped like `params`)."""
    units, unit_caches, pool_cache, dense_cache = cache
    grads = {}
    dx, dkernel, dbias = dense_backward(dlogits, dense_cache)
    grads["classifier"] = {"kernel": dkernel, "bias": dbias}
    dx = global_avg_pool_backward(dx, pool_cache)
    for (path, _), unit_cache in zip(reversed(units), reversed(unit_caches)):  # last unit first
        dx, unit_grads = conv_bn_relu6_backward(dx, unit_cache)
        _set(grads, path, unit_grads)
    return dx, grads


def predict(params: Tree, batch_stats: Tree, images: np.ndarray, *, stem: str, dtype: Any = np.float64) -> np.ndarray:
    """Inference-mode logits, like `model.apply(variables, images, train=False)`. images: [B, H, W, 3] -> [B, K]."""
    logits, _, _ = mobilenet_forward(params, batch_stats, images, stem=stem, train=False, dtype=dtype)
    return logits


def loss_and_grads(params: Tree, batch_stats: Tree, images: np.ndarray, labels: np.ndarray, *, stem: str,
                   momentum: float = BN_MOMENTUM, dtype: Any = np.float64) -> tuple[float, Tree, Tree]:
    """Training-mode softmax cross-entropy and its gradient for every parameter, by hand.

    images: [B, H, W, 3], labels: [B] ints -> (loss, grads shaped like params, new_batch_stats).
    """
    logits, new_stats, cache = mobilenet_forward(params, batch_stats, images, stem=stem, train=True,
                                                 momentum=momentum, dtype=dtype)
    loss, loss_cache = softmax_cross_entropy_forward(logits, labels)
    dlogits = softmax_cross_entropy_backward(1.0, loss_cache)  # dL/dL = 1 starts the chain rule
    _, grads = mobilenet_backward(dlogits, cache)
    return loss, grads, new_stats


def sgd_update(params: Tree, grads: Tree, lr: float) -> Tree:
    """Plain gradient descent, p <- p - lr * dL/dp, leaf by leaf."""
    if isinstance(params, dict):
        return {k: sgd_update(params[k], grads[k], lr) for k in params}
    return params - lr * grads


def train_step(params: Tree, batch_stats: Tree, images: np.ndarray, labels: np.ndarray, *, lr: float, stem: str,
               momentum: float = BN_MOMENTUM, dtype: Any = np.float64) -> tuple[Tree, Tree, float]:
    """One SGD step, forward + backward + update: -> (new_params, new_batch_stats, loss before the step)."""
    params = to_numpy(params, dtype)
    loss, grads, new_stats = loss_and_grads(params, batch_stats, images, labels, stem=stem,
                                            momentum=momentum, dtype=dtype)
    return sgd_update(params, grads, lr), new_stats, loss
