"""The hand-written NumPy layers and network, against JAX and against finite differences.

Every layer's backward pass is checked two independent ways: against `jax.grad` of the same
function written with JAX and Flax (XLA's convolution, Flax's BatchNorm, optax's loss), and against
central finite differences of the NumPy forward pass itself. Then the whole network: the NumPy
MobileNet-V1 must give the Flax model's logits, and its hand-derived gradients must be `jax.grad`'s.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax import lax

from minimobile.depthwise import depthwise_conv_loops
from minimobile.model import MobileNetV1, MobileNetV1_Tiny, init_variables
from minimobile.numpy_mobilenet import loss_and_grads, mobilenet_forward, predict, to_numpy, train_step
from minimobile.numpy_nn import (batchnorm_inference_backward, batchnorm_inference_forward, batchnorm_train_backward,
                                 batchnorm_train_forward, conv2d_backward, conv2d_forward, dense_backward,
                                 dense_forward, depthwise_conv_backward, depthwise_conv_forward,
                                 global_avg_pool_backward, global_avg_pool_forward, pointwise_conv_backward,
                                 pointwise_conv_forward, relu6_backward, relu6_forward,
                                 softmax_cross_entropy_backward, softmax_cross_entropy_forward)

# --------------------------------------------------------------------------------------------
# Each layer, and the same function in JAX.
# --------------------------------------------------------------------------------------------


def xla_conv(x, w, stride, groups=1):
    """XLA's own convolution with SAME padding: the oracle for all three NumPy convolutions."""
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)


def flax_batchnorm_train(x, scale, bias):
    """Flax's BatchNorm in training mode (as in layers.ConvBN), as a function of x and its parameters."""
    bn = nn.BatchNorm(use_running_average=False, epsilon=1e-5, dtype=x.dtype, param_dtype=x.dtype)
    stats = {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}  # not used in training mode
    y, _ = bn.apply({"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x, mutable=["batch_stats"])
    return y


def flax_batchnorm_inference(mean, var):
    """Flax's BatchNorm in inference mode, with running statistics `mean` and `var`."""
    bn = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=jnp.float64, param_dtype=jnp.float64)
    return lambda x, scale, bias: bn.apply({"params": {"scale": scale, "bias": bias},
                                           "batch_stats": {"mean": mean, "var": var}}, x)


def layer_cases():
    """name -> (NumPy forward, NumPy backward, the same function in JAX, the forward's array arguments)."""
    rng = np.random.default_rng(0)
    normal = rng.standard_normal
    mean, var = normal(4), rng.uniform(0.5, 2.0, 4)
    labels = np.array([0, 3, 1, 4, 4])
    return {
        "conv2d stride 1": (conv2d_forward, conv2d_backward, lambda x, w: xla_conv(x, w, 1),
                            (normal((2, 6, 6, 3)), normal((3, 3, 3, 4)))),
        # Odd sizes: SAME pads unevenly (the extra row goes after) and 7 -> 4 rows, 6 -> 3 columns.
        "conv2d stride 2, odd size": (functools.partial(conv2d_forward, stride=2), conv2d_backward,
                                      lambda x, w: xla_conv(x, w, 2), (normal((2, 7, 6, 3)), normal((3, 3, 3, 4)))),
        "depthwise stride 1": (depthwise_conv_forward, depthwise_conv_backward,
                               lambda x, w: xla_conv(x, w, 1, groups=3), (normal((2, 6, 5, 3)), normal((3, 3, 1, 3)))),
        # Depth multiplier 2: kernel [3, 3, 1, 2C], output channels 2c and 2c+1 read input channel c.
        "depthwise stride 2, multiplier 2": (functools.partial(depthwise_conv_forward, stride=2),
                                             depthwise_conv_backward, lambda x, w: xla_conv(x, w, 2, groups=3),
                                             (normal((2, 7, 6, 3)), normal((3, 3, 1, 6)))),
        "pointwise": (pointwise_conv_forward, pointwise_conv_backward, lambda x, w: xla_conv(x, w, 1),
                      (normal((2, 5, 4, 3)), normal((1, 1, 3, 4)))),
        # A shifted, scaled input, so that subtracting the batch mean actually matters.
        "batchnorm train": (batchnorm_train_forward, batchnorm_train_backward, flax_batchnorm_train,
                            (1 + 2 * normal((3, 4, 5, 4)), 1 + 0.2 * normal(4), normal(4))),
        "batchnorm inference": (functools.partial(batchnorm_inference_forward, mean=mean, var=var),
                                batchnorm_inference_backward, flax_batchnorm_inference(mean, var),
                                (1 + 2 * normal((3, 4, 5, 4)), 1 + 0.2 * normal(4), normal(4))),
        "relu6": (relu6_forward, relu6_backward, jax.nn.relu6, (4 * normal((2, 5, 5, 3)),)),  # below 0 and above 6
        "global average pool": (global_avg_pool_forward, global_avg_pool_backward,
                                lambda x: jnp.mean(x, axis=(1, 2)), (normal((2, 3, 4, 5)),)),
        "dense": (dense_forward, dense_backward, lambda x, w, b: x @ w + b,
                  (normal((5, 6)), normal((6, 3)), normal(3))),
        "softmax cross-entropy": (functools.partial(softmax_cross_entropy_forward, labels=labels),
                                  softmax_cross_entropy_backward,
                                  lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean(),
                                  (3 * normal((5, 6)),)),
    }


CASES = layer_cases()


def numpy_gradients(forward, backward, args, dy):
    """(dx, *dparams) from the hand-written backward pass, for the scalar L = sum(dy * forward(*args))."""
    _, cache = forward(*args)
    grads = backward(dy, cache)
    return grads if isinstance(grads, tuple) else (grads,)  # layers without parameters return dx alone


def random_cotangent(forward, args, seed=1):
    """A random dy = dL/dy: checks every output's gradient path at once, unlike dy = ones."""
    y, _ = forward(*args)
    return np.random.default_rng(seed).standard_normal(np.shape(y))


@pytest.mark.parametrize("name", list(CASES))
def test_forward_computes_the_same_function_as_jax(name):
    forward, _, jax_fn, args = CASES[name]
    with jax.enable_x64(True):  # both sides in float64: any difference is a bug, not rounding
        expected = jax_fn(*args)
    y, _ = forward(*args)
    assert np.shape(y) == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_backward_equals_jax_grad(name):
    forward, backward, jax_fn, args = CASES[name]
    dy = random_cotangent(forward, args)
    with jax.enable_x64(True):
        # jax.grad of L = sum(dy * f(args)) is exactly what a backward pass computes from dy.
        expected = jax.grad(lambda *a: jnp.sum(dy * jax_fn(*a)), argnums=tuple(range(len(args))))(*args)
    got = numpy_gradients(forward, backward, args, dy)
    assert len(got) == len(args)
    for g, e, arg in zip(got, expected, args):
        assert g.shape == arg.shape  # every gradient has the shape of what it is the gradient of
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", list(CASES))
def test_backward_equals_finite_differences(name):
    # (L(a + h e_i) - L(a - h e_i)) / 2h is the derivative along coordinate i up to O(h^2): no autodiff,
    # no JAX, only the NumPy forward pass. A few random coordinates of every argument.
    forward, backward, _, args = CASES[name]
    dy = random_cotangent(forward, args)
    loss = lambda *a: np.sum(dy * forward(*a)[0])
    got = numpy_gradients(forward, backward, args, dy)
    rng, h = np.random.default_rng(2), 1e-6
    for k, arg in enumerate(args):
        for _ in range(3):
            i = tuple(rng.integers(0, n) for n in arg.shape)
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[k][i] += h
            minus[k][i] -= h
            numeric = (loss(*plus) - loss(*minus)) / (2 * h)
            np.testing.assert_allclose(got[k][i], numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("m, stride", [(1, 1), (3, 2)])
def test_depthwise_forward_is_the_definition(m, stride):
    # The project's definition of a depthwise convolution is the loop in depthwise.py; the nine-tap
    # vectorised version must compute exactly it, including the depth-multiplier channel layout.
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 7, 5, 2)), rng.standard_normal((3, 3, 1, 2 * m))
    y, _ = depthwise_conv_forward(x, w, stride)
    np.testing.assert_allclose(y, depthwise_conv_loops(x, w, stride), rtol=1e-12, atol=1e-12)


def test_batchnorm_train_gradient_sums_to_zero_over_each_channel():
    # Adding a constant to a whole channel changes nothing after normalising with the batch mean,
    # so the gradient along that direction, sum(dx) per channel, must vanish. In inference mode it does not.
    forward, backward, _, args = CASES["batchnorm train"]
    dx, _, _ = numpy_gradients(forward, backward, args, random_cotangent(forward, args))
    np.testing.assert_allclose(dx.sum(axis=(0, 1, 2)), 0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# The whole network against the Flax model.
# --------------------------------------------------------------------------------------------


def random_variables(model, image_shape, stem, seed=0):
    """Variables with exactly the Flax model's tree, random values, and realistic running statistics.

    `jax.eval_shape(model.init)` gives the tree (every name and shape) without computing or compiling
    anything. The values are random rather than the initial ones, whose BatchNorms (mean 0, var 1,
    scale 1, bias 0) would be close to identities and let the logits fade to ~1e-6. The running
    statistics are those of *another* batch, as after training: the same batch would let an
    inference mode that wrongly used batch statistics pass.
    """
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, *image_shape)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":  # lecun-normal scale: variance 1 / fan-in keeps activations O(1)
            return rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape)
        return 0.1 * rng.standard_normal(leaf.shape)  # bias, mean

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    other_batch = rng.standard_normal((8, *image_shape))
    _, stats, _ = mobilenet_forward(variables["params"], variables["batch_stats"], other_batch, stem=stem,
                                    train=True, momentum=0.0)  # momentum 0: running stats := that batch's
    return to_numpy({"params": variables["params"], "batch_stats": stats}, np.float32)


NETWORKS = [  # (stem, width, block, depth_multiplier, image shape)
    ("cifar", 0.0625, "separable", 1, (32, 32, 3)),
    ("cifar", 0.125, "separable", 1, (32, 32, 3)),
    ("cifar", 0.25, "separable", 1, (32, 32, 3)),
    ("imagenet", 0.0625, "separable", 1, (48, 40, 3)),  # stride-2 stem; odd maps on the way: 6x5, 3x3, 2x2
    ("cifar", 0.0625, "standard", 1, (16, 16, 3)),     # the paper's full-convolution baseline
    ("cifar", 0.0625, "separable", 2, (16, 16, 3)),    # depth multiplier 2
]


@pytest.mark.parametrize("stem, width, block, depth_multiplier, image_shape", NETWORKS)
def test_numpy_network_gives_the_flax_logits(stem, width, block, depth_multiplier, image_shape):
    model = MobileNetV1(num_classes=10, width=width, stem=stem, block=block, depth_multiplier=depth_multiplier)
    variables = random_variables(model, image_shape, stem)
    images = np.random.default_rng(1).standard_normal((2, *image_shape)).astype(np.float32)
    expected = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, images))
    got = predict(variables["params"], variables["batch_stats"], images, stem=stem)
    assert got.shape == expected.shape == (2, 10)
    assert expected.std() > 0.1  # logits that differ from each other: we are not comparing two zeros
    # Flax computes in float32, NumPy in float64: after 28 layers float32 rounding leaves up to ~4e-5
    # of the largest logit; a wrong layer would change the logits by order 1.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-4 * np.abs(expected).max())


@pytest.fixture(scope="module")
def training_batch():
    """The tiny model at its real initial values, a batch of 4 CIFAR-sized images, and Flax's answers.

    Flax runs in float64 here. In float32 some gradients agree to only a few percent, and so does
    NumPy in float32 with NumPy in float64: rounding, amplified through 27 training-mode BatchNorms on
    4 images. In float64 (the model keeps its classifier head in float32) they agree to about 1e-7,
    which is what shows that the NumPy backward pass is exact.
    """
    model = MobileNetV1_Tiny()  # width 1/16, CIFAR stem, 10 classes
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    rng = np.random.default_rng(0)
    images, labels = rng.standard_normal((4, 32, 32, 3)), rng.integers(0, 10, 4)
    with jax.enable_x64(True):
        model64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
        params, batch_stats = to_numpy(variables["params"]), to_numpy(variables["batch_stats"])

        def loss_fn(params):
            logits, updates = model64.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                            mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

        (loss, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    flax = dict(loss=float(loss), grads=to_numpy(grads), batch_stats=to_numpy(new_stats))
    return dict(params=params, batch_stats=batch_stats, images=images, labels=labels, flax=flax)


def assert_trees_close(got, expected, rtol, path=""):
    """Same keys at every level, and every leaf close, relative to that leaf's largest entry."""
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected), path
        for k in expected:
            assert_trees_close(got[k], expected[k], rtol, f"{path}/{k}")
    else:
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max(), err_msg=path)


def test_numpy_gradients_of_every_parameter_equal_jax_grad_of_the_flax_model(training_batch):
    b = training_batch
    loss, grads, new_stats = loss_and_grads(b["params"], b["batch_stats"], b["images"], b["labels"], stem="cifar")
    np.testing.assert_allclose(loss, b["flax"]["loss"], rtol=1e-6)
    assert_trees_close(grads, b["flax"]["grads"], rtol=1e-5)  # all 83 leaves, stem to classifier
    # Training mode also folds each batch's statistics into the running averages, as Flax does.
    assert_trees_close(new_stats, b["flax"]["batch_stats"], rtol=1e-9)


def test_sgd_step_moves_every_parameter_by_minus_lr_times_its_gradient(training_batch):
    b, lr = training_batch, 0.1
    new_params, new_stats, loss = train_step(b["params"], b["batch_stats"], b["images"], b["labels"], lr=lr,
                                             stem="cifar")
    # The oracle is JAX's gradient: every parameter moved by exactly -lr * jax.grad. (Comparing the
    # step, not p - lr * g, keeps a wrong gradient from hiding under the much larger parameter.)
    step = jax.tree.map(lambda p, q: (p - q) / lr, b["params"], new_params)
    assert_trees_close(step, b["flax"]["grads"], rtol=1e-5)
    assert_trees_close(new_stats, b["flax"]["batch_stats"], rtol=1e-9)
    np.testing.assert_allclose(loss, b["flax"]["loss"], rtol=1e-6)


def test_numpy_network_gradient_equals_finite_differences(training_batch):
    # Float64 end to end, no JAX: the hand-written backward against the NumPy network's own loss.
    # The step is small because ReLU6 has kinks: with h = 1e-5, moving one stem weight shifts
    # thousands of pre-activations and a few cross 0 or 6 inside [-h, h], spoiling the estimate.
    b = training_batch
    params = to_numpy(b["params"])  # a copy we may nudge
    loss = lambda: loss_and_grads(params, b["batch_stats"], b["images"], b["labels"], stem="cifar")[0]
    _, grads, _ = loss_and_grads(params, b["batch_stats"], b["images"], b["labels"], stem="cifar")
    rng, h = np.random.default_rng(4), 1e-7
    for path in [("stem", "conv", "kernel"), ("block04", "depthwise", "depthwise", "kernel"),
                 ("block09", "pointwise", "pointwise", "kernel"), ("block13", "pointwise", "bn", "scale"),
                 ("classifier", "kernel")]:
        leaf, grad = params, grads
        for key in path:
            leaf, grad = leaf[key], grad[key]
        for _ in range(2):
            i = tuple(rng.integers(0, n) for n in leaf.shape)
            old = leaf[i]
            leaf[i] = old + h
            plus = loss()
            leaf[i] = old - h
            minus = loss()
            leaf[i] = old
            np.testing.assert_allclose(grad[i], (plus - minus) / (2 * h), rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_a_few_numpy_sgd_steps_fit_one_batch(training_batch):
    # The point of a train step: repeated on one batch, the loss must go down.
    b = training_batch
    params, batch_stats, losses = b["params"], b["batch_stats"], []
    for _ in range(5):
        params, batch_stats, loss = train_step(params, batch_stats, b["images"], b["labels"], lr=0.1, stem="cifar")
        losses.append(loss)
    assert losses[-1] < losses[0] - 0.1, losses


def test_relu6_backward_is_zero_at_both_kinks_like_jax():
    # The slope at exactly 0 and exactly 6 is a choice; the docstring promises jax.nn.relu6's: 0 at both.
    from minimobile.numpy_nn import relu6_backward, relu6_forward

    x = np.array([-1.0, 0.0, 3.0, 6.0, 7.0])
    y, cache = relu6_forward(x)
    np.testing.assert_array_equal(y, [0, 0, 3, 6, 6])
    np.testing.assert_array_equal(relu6_backward(np.ones(5), cache), [0, 0, 1, 0, 0])  # by hand
    np.testing.assert_array_equal(relu6_backward(np.ones(5), cache), jax.vmap(jax.grad(jax.nn.relu6))(x))


def test_cross_entropy_is_exact_for_huge_logits():
    # By hand: logits (1000, 0, -1000): log-softmax is (0, -1000, -2000) to float64 precision, so the loss
    # of label 0 is 0 and of label 1 is 1000; and the gradient is softmax - onehot = (1, 0, 0) - onehot.
    from minimobile.numpy_nn import softmax_cross_entropy_backward, softmax_cross_entropy_forward

    logits = np.array([[1000.0, 0.0, -1000.0]] * 2)
    loss, cache = softmax_cross_entropy_forward(logits, np.array([0, 1]))
    assert loss == pytest.approx(500.0)                                     # mean of 0 and 1000
    np.testing.assert_allclose(softmax_cross_entropy_backward(1.0, cache), [[0, 0, 0], [0.5, -0.5, 0]], atol=1e-12)
