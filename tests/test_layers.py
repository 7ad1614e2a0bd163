"""Depthwise and pointwise convolutions: every implementation against the NumPy definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from minimobile.depthwise import depthwise_conv_loops, same_padding
from minimobile.layers import (DEPTHWISE_IMPLS, BatchNorm, DepthwiseConv, PatchConv, PointwiseConv, SeparableBlock,
                               resolve_depthwise_impl)

CASES = [  # (height, width, channels, depth_multiplier, stride)
    (6, 6, 3, 1, 1),
    (7, 5, 2, 1, 2),   # odd sizes: SAME pads unevenly, the extra row after
    (8, 8, 2, 2, 2),   # depth multiplier 2: each input channel owns two filters
    (7, 8, 2, 1, 3),   # stride 3: three input phases per axis, one read from the row before
    (5, 6, 3, 3, 1),
]


def random_case(h, w, c, m, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, h, w, c)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 1, c * m)).astype(np.float32)
    return x, kernel


def test_same_padding_puts_the_odd_pixel_after_like_xla():
    assert same_padding(32, 3, 1) == (1, 1)
    assert same_padding(32, 3, 2) == (0, 1)
    assert same_padding(7, 3, 2) == (1, 1)
    assert same_padding(5, 1, 1) == (0, 0)


@pytest.mark.parametrize("impl", sorted(DEPTHWISE_IMPLS))
@pytest.mark.parametrize("h, w, c, m, stride", CASES)
def test_every_implementation_computes_the_numpy_definition(impl, h, w, c, m, stride):
    x, kernel = random_case(h, w, c, m)
    expected = depthwise_conv_loops(x, kernel, stride)
    got = jax.jit(DEPTHWISE_IMPLS[impl], static_argnums=2)(x, kernel, stride)
    assert got.shape == expected.shape == (2, -(-h // stride), -(-w // stride), c * m)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", sorted(DEPTHWISE_IMPLS))
@pytest.mark.parametrize("h, w, c, m, stride", CASES[:4])  # stride 1, odd sizes at 2, multiplier 2, stride 3
def test_every_implementation_has_the_gradient_of_the_definition(impl, h, w, c, m, stride):
    # The convolution is linear in x and in the kernel, so the gradient of L = <g, conv(x, k)> with
    # respect to one kernel entry is exactly <g, conv(x, that unit kernel)>: an oracle that needs
    # nothing but the NumPy loops, no autodiff at all.
    x, kernel = random_case(h, w, c, m, seed=1)
    g = np.random.default_rng(2).standard_normal(depthwise_conv_loops(x, kernel, stride).shape)

    def unit(shape, index):
        e = np.zeros(shape, np.float32)
        e[index] = 1
        return e

    expected_dk = np.array([np.sum(g * depthwise_conv_loops(x, unit(kernel.shape, i), stride))
                            for i in np.ndindex(kernel.shape)]).reshape(kernel.shape)
    expected_dx = np.array([np.sum(g * depthwise_conv_loops(unit(x.shape, i), kernel, stride))
                            for i in np.ndindex(x.shape)]).reshape(x.shape)

    loss = lambda x, k: jnp.sum(g * DEPTHWISE_IMPLS[impl](x, k, stride))
    dx, dk = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)
    np.testing.assert_allclose(dk, expected_dk, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-4)


def test_depth_multiplier_gives_each_input_channel_its_own_filters():
    # The bug in some public Flax ports: with m > 1, output channel o must read input channel o // m
    # (grouped-convolution layout), not o % C. Changing input channel 1 may only change outputs 2 and 3.
    x, kernel = random_case(6, 6, c=3, m=2)
    x2 = x.copy()
    x2[..., 1] += 1.0
    for impl, conv in DEPTHWISE_IMPLS.items():
        changed = np.abs(np.asarray(conv(x2, kernel, 1) - conv(x, kernel, 1))).max(axis=(0, 1, 2)) > 0
        assert changed.tolist() == [False, False, True, True, False, False], impl


@pytest.mark.parametrize("impl", sorted(set(DEPTHWISE_IMPLS) - {"feature_group_count"}))
def test_depthwise_module_is_a_drop_in_for_nn_conv_with_feature_group_count(impl):
    # Same parameter names and shapes as `nn.Conv(C*m, (3, 3), feature_group_count=C)`, the same
    # initial values from the same key (so a run starts alike whichever implementation its backend
    # picks), same outputs: a checkpoint trained with one implementation runs with any other.
    x, _ = random_case(9, 9, c=4, m=2)
    reference = nn.Conv(8, (3, 3), strides=2, padding="SAME", feature_group_count=4, use_bias=True)
    params = reference.init(jax.random.key(0), x)
    module = DepthwiseConv(depth_multiplier=2, strides=2, use_bias=True, impl=impl)
    own = module.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, params)
    jax.tree.map(np.testing.assert_array_equal, own, params)
    np.testing.assert_allclose(module.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)


def test_separable_block_is_a_depthwise_then_a_pointwise_convolution():
    x = jnp.ones((2, 8, 8, 16))
    block = SeparableBlock(features=32, strides=2)
    variables = block.init(jax.random.key(0), x, train=False)
    params = variables["params"]
    assert params["depthwise"]["depthwise"]["kernel"].shape == (3, 3, 1, 16)   # one 3x3 filter per channel
    assert params["pointwise"]["pointwise"]["kernel"].shape == (1, 1, 16, 32)  # a 16 -> 32 matrix
    assert set(params["depthwise"]) == {"depthwise", "bn"} and set(params["pointwise"]) == {"pointwise", "bn"}
    assert block.apply(variables, x, train=False).shape == (2, 4, 4, 32)
    # ReLU6 after each BatchNorm: outputs live in [0, 6].
    y = block.apply(variables, 10 * jax.random.normal(jax.random.key(1), x.shape), train=False)
    assert float(y.min()) >= 0 and float(y.max()) <= 6


def test_pointwise_convolution_is_a_matrix_multiply_over_channels():
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 6))
    conv = nn.Conv(4, (1, 1), use_bias=False)
    params = conv.init(jax.random.key(1), x)
    w = params["params"]["kernel"][0, 0]  # [C_in, C_out]
    np.testing.assert_allclose(conv.apply(params, x), np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-5)


def test_pointwise_module_is_a_drop_in_for_a_1x1_nn_conv():
    # PointwiseConv computes the 1x1 convolution as a matmul (faster to differentiate on CPU), with
    # nn.Conv's parameter name, shape and initialiser: same init from the same key, same outputs.
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 6))
    reference = nn.Conv(4, (1, 1), use_bias=False)
    params = reference.init(jax.random.key(1), x)
    own = PointwiseConv(4).init(jax.random.key(1), x)
    np.testing.assert_array_equal(own["params"]["kernel"], params["params"]["kernel"])  # [1, 1, 6, 4]
    np.testing.assert_allclose(PointwiseConv(4).apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h, w, stride", [(6, 6, 1), (7, 5, 2), (8, 8, 2)])
def test_patch_conv_is_a_drop_in_for_a_3x3_nn_conv(h, w, stride):
    # PatchConv (the stem: image patches times a matrix) against XLA's own convolution, nn.Conv with
    # the same kernel: same parameter and initialiser, same outputs and kernel gradient, odd sizes too.
    x = jax.random.normal(jax.random.key(0), (2, h, w, 3))
    reference = nn.Conv(5, (3, 3), strides=stride, padding="SAME", use_bias=False)
    params = reference.init(jax.random.key(1), x)
    ours = PatchConv(5, strides=stride)
    np.testing.assert_array_equal(ours.init(jax.random.key(1), x)["params"]["kernel"], params["params"]["kernel"])
    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)
    g = jax.random.normal(jax.random.key(2), reference.apply(params, x).shape)
    grad = lambda module: jax.grad(lambda p: jnp.sum(g * module.apply(p, x)))(params)["params"]["kernel"]
    np.testing.assert_allclose(grad(ours), grad(reference), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_is_a_drop_in_for_flax_batch_norm(train):
    # Same variables, outputs, updated statistics and gradients as nn.BatchNorm, so checkpoints move
    # freely between the two; only the algebra of the output differs (x * a + b, cheaper to differentiate).
    x = 3 * jax.random.normal(jax.random.key(0), (8, 4, 4, 6)) + 1
    ours, flax_bn = BatchNorm(not train), nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    variables = flax_bn.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, variables)
    variables = {"params": {"scale": jnp.linspace(0.5, 2, 6), "bias": jnp.linspace(-1, 1, 6)},
                 "batch_stats": {"mean": jnp.linspace(0, 1, 6), "var": jnp.linspace(1, 2, 6)}}

    def run(module, params):
        y, stats = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, stats)

    (_, (y, stats)), grads = jax.value_and_grad(lambda p: run(ours, p), has_aux=True)(variables["params"])
    (_, (y_ref, stats_ref)), grads_ref = jax.value_and_grad(lambda p: run(flax_bn, p), has_aux=True)(variables["params"])
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves((stats, grads)), jax.tree.leaves((stats_ref, grads_ref))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_auto_picks_a_known_implementation_and_unknown_names_fail_clearly():
    assert resolve_depthwise_impl("auto") in DEPTHWISE_IMPLS
    with pytest.raises(ValueError, match="depthwise_impl"):
        resolve_depthwise_impl("winograd")
    # Wherever an implementation is named (the model, its layers), not only in the trainer's config.
    x = jax.random.normal(jax.random.key(1), (1, 5, 5, 2))
    for module in (DepthwiseConv(impl="auto"), DepthwiseConv(impl="feature_group_count")):
        variables = module.init(jax.random.key(0), x)
        np.testing.assert_allclose(module.apply(variables, x), depthwise_conv_loops(x, variables["params"]["kernel"]),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="depthwise_impl"):
        DepthwiseConv(impl="winograd").init(jax.random.key(0), x)


def test_initialising_batch_norm_in_training_mode_leaves_the_running_statistics_as_flax_does():
    # Initialisation is not a training step: like nn.BatchNorm, the running mean and variance start at
    # 0 and 1 whatever batch the module is initialised on (an update here would make them 0.1 * mean, ...).
    x = 3 * jax.random.normal(jax.random.key(0), (8, 4, 4, 6)) + 1
    ours = BatchNorm(use_running_average=False).init(jax.random.key(0), x)["batch_stats"]
    flax_stats = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)["batch_stats"]
    np.testing.assert_array_equal(ours["mean"], np.zeros(6))
    np.testing.assert_array_equal(ours["var"], np.ones(6))
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_stats)):
        np.testing.assert_array_equal(got, want)


def test_depthwise_module_has_a_bias_only_when_asked():
    x = jnp.ones((1, 4, 4, 3))
    assert set(DepthwiseConv().init(jax.random.key(0), x)["params"]) == {"kernel"}
    assert set(DepthwiseConv(use_bias=True).init(jax.random.key(0), x)["params"]) == {"kernel", "bias"}
