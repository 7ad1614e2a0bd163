"""MobileNetV1 as a functional module: shapes from the paper, stems, dtypes, dropout, sync BatchNorm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from minimobile.model import MobileNetV1, MobileNetV1_Tiny, init_variables


def features_shape(model, resolution):
    """Shape of the pooled features, computed without running anything."""
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)))
    return jax.eval_shape(model.apply, variables, jnp.zeros((2, resolution, resolution, 3))).shape


def test_imagenet_stem_reduces_224_to_7x7_before_pooling_as_in_table_1():
    model = MobileNetV1(num_classes=0)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    _, state = jax.eval_shape(functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"]),
                              variables, jnp.zeros((1, 224, 224, 3)))
    shapes = {k: v["__call__"][0].shape for k, v in state["intermediates"].items() if k != "__call__"}
    assert shapes["stem"] == (1, 112, 112, 32)
    assert shapes["block01"] == (1, 112, 112, 64)
    assert shapes["block13"] == (1, 7, 7, 1024)
    assert features_shape(model, 224) == (2, 1024)


def test_the_width_thins_every_layer_of_table_1_at_any_resolution():
    table_1 = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]  # the stem's, each block's
    for width in (0.5, 0.25):
        model = MobileNetV1(num_classes=0, stem="cifar", width=width)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
        channels = [params["stem"]["conv"]["kernel"].shape[-1]] + [
            params[b]["pointwise"]["pointwise"]["kernel"].shape[-1] for b in sorted(p for p in params if "block" in p)]
        assert channels == [int(c * width) for c in table_1]
    assert features_shape(MobileNetV1(num_classes=0, stem="cifar", width=0.5), 32) == (2, 512)
    assert features_shape(MobileNetV1(num_classes=0, stem="cifar", width=0.25), 32) == (2, 256)
    # The resolution multiplier is just the input size: same parameters, any resolution.
    assert features_shape(MobileNetV1(num_classes=0, width=0.25), 160) == (2, 256)


def test_apply_is_a_pure_function_of_its_variables():
    model = MobileNetV1_Tiny()
    variables = init_variables(model, jax.random.key(0))
    before = jax.tree.map(np.array, variables)                       # host copies, out of JAX's reach
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    # Training mode returns the new BatchNorm statistics instead of hiding them in the module ...
    logits, updates = apply(variables, x, train=True, mutable=("batch_stats",))
    assert logits.shape == (4, 10)
    old, new = variables["batch_stats"]["stem"]["bn"]["mean"], updates["batch_stats"]["stem"]["bn"]["mean"]
    assert not np.allclose(old, new)
    # ... or in the variables it was given: those are untouched, and the module remembers nothing, so
    # it evaluates exactly as a model built afresh does from the same variables.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, variables), before)
    np.testing.assert_array_equal(apply(variables, x), jax.jit(MobileNetV1_Tiny().apply)(before, x))


def test_bfloat16_compute_keeps_float32_params_and_logits_and_agrees_with_float32():
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    f32 = MobileNetV1_Tiny(width=0.25)
    bf16 = MobileNetV1_Tiny(width=0.25, dtype=jnp.bfloat16)
    variables = init_variables(f32, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(init_variables(bf16, jax.random.key(0))))
    y32, y16 = jax.jit(f32.apply)(variables, x), jax.jit(bf16.apply)(variables, x)
    assert y16.dtype == jnp.float32
    # Measured: off by 1.3 % of the largest logit (bfloat16 keeps 8 bits of mantissa, ~0.4 % per rounding).
    np.testing.assert_allclose(y16, y32, atol=0.03 * float(jnp.abs(y32).max()))


def test_dropout_before_the_classifier_is_active_only_in_training():
    model = MobileNetV1_Tiny(dropout_rate=0.5)
    variables = init_variables(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    train = jax.jit(lambda rng: model.apply(variables, x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": rng})[0])
    assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))
    # Evaluation drops nothing: the same logits as the network without dropout, from the same variables.
    without = MobileNetV1_Tiny(dropout_rate=0.0)
    np.testing.assert_array_equal(jax.jit(model.apply)(variables, x), jax.jit(without.apply)(variables, x))


def test_dropout_zeroes_a_fraction_p_of_the_pooled_features_and_scales_the_rest_by_1_over_1_minus_p():
    # With an identity classifier the logits *are* the classifier's input (plus its bias), so they can
    # be compared with the pooled features of the same network without its head (num_classes=0). The
    # bias of 1 shows where the dropout is: before the classifier a dropped feature comes out as 1.0,
    # after it as 0.
    p = 0.3
    model = MobileNetV1_Tiny(num_classes=64, dropout_rate=p)             # 64 = the tiny net's last width
    variables = init_variables(model, jax.random.key(0))
    variables["params"]["classifier"] = {"kernel": jnp.eye(64), "bias": jnp.ones(64)}
    x = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
    dropped = np.asarray(jax.jit(lambda: model.apply(variables, x, train=True, mutable=["batch_stats"],
                                                     rngs={"dropout": jax.random.key(2)})[0])())
    headless = MobileNetV1_Tiny(num_classes=0)
    body = {"params": {k: v for k, v in variables["params"].items() if k != "classifier"},
            "batch_stats": variables["batch_stats"]}
    features = np.asarray(jax.jit(lambda: headless.apply(body, x, train=True, mutable=["batch_stats"])[0])())
    zero = dropped == 1.0                                              # 0 * 1 + 1, exactly
    np.testing.assert_allclose(dropped[~zero] - 1, features[~zero] / (1 - p), rtol=1e-5, atol=1e-6)
    assert abs(zero.mean() - p) < 0.06                                 # 1,024 features: sd of the rate 0.014


def test_standard_block_replaces_each_separable_pair_with_one_full_conv():
    model = MobileNetV1_Tiny(block="standard")
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert variables["params"]["block02"]["conv"]["kernel"].shape == (3, 3, 4, 8)


def test_unknown_stem_is_rejected():
    with pytest.raises(ValueError, match="stem"):
        features_shape(MobileNetV1(stem="mnist"), 32)


def test_batchnorm_over_8_devices_normalises_like_one_device_with_the_whole_batch():
    # Sync BatchNorm: with bn_axis_name set, statistics are averaged across the data-parallel axis,
    # so sharding the batch over 8 devices changes nothing, outputs or updated running statistics.
    devices = jax.devices()[:8]
    assert len(devices) == 8, "tests/conftest.py sets --xla_force_host_platform_device_count=8"
    single = MobileNetV1_Tiny(width=0.125)
    sharded = MobileNetV1_Tiny(width=0.125, bn_axis_name="batch")
    variables = init_variables(single, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
    expected, expected_stats = jax.jit(lambda v, x: single.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)

    def per_device(variables, x):
        return sharded.apply(variables, x, train=True, mutable=["batch_stats"])

    mesh = Mesh(np.array(devices), ("batch",))
    got, got_stats = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("batch")),
                                           out_specs=(P("batch"), P())))(variables, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got_stats, expected_stats)


def test_the_width_multiplier_rounds_channels_down_and_keeps_at_least_one():
    # int(channels * alpha) (section 3.3), by hand: 32 x 0.3 = 9.6 -> 9, 512 x 0.3 = 153.6 -> 153.
    from minimobile.model import thin

    assert [thin(c, 0.3) for c in (32, 64, 512, 1024)] == [9, 19, 153, 307]
    assert thin(32, 0.01) == 1


def test_cifar_stem_keeps_32x32_so_the_last_blocks_see_2x2():
    # Table 1 with a stride-1 stem on 32x32: stem 32x32, the four stride-2 blocks halve it to 2x2.
    model = MobileNetV1(num_classes=0, stem="cifar", width=0.0625)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    _, state = jax.eval_shape(functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"]),
                              variables, x)
    sizes = {k: v["__call__"][0].shape[1:3] for k, v in state["intermediates"].items() if k != "__call__"}
    assert sizes["stem"] == sizes["block01"] == (32, 32)
    assert [sizes[f"block{i:02d}"] for i in (2, 4, 6, 12, 13)] == [(16, 16), (8, 8), (4, 4), (2, 2), (2, 2)]


def test_the_presets_are_the_papers_four_widths_and_the_cifar_adaptation():
    # Table 6: 1.0, 0.75, 0.5 and 0.25 MobileNet-224; the CIFAR preset keeps 32x32 and has 100 classes.
    from minimobile import model as model_lib

    presets = (model_lib.MobileNetV1_100, model_lib.MobileNetV1_075, model_lib.MobileNetV1_050, model_lib.MobileNetV1_025)
    assert [(p().width, p().stem, p().num_classes) for p in presets] == [
        (1.0, "imagenet", 1000), (0.75, "imagenet", 1000), (0.5, "imagenet", 1000), (0.25, "imagenet", 1000)]
    assert (model_lib.MobileNetV1_CIFAR().stem, model_lib.MobileNetV1_CIFAR().num_classes) == ("cifar", 100)
