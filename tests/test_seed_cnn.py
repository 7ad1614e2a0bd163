"""The report's small CIFAR-10 network (issue 8): its block against the report's code, its shapes and
parameters counted by hand, and its recipe trained, evaluated and resumed end to end, offline."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from minimobile import augment, numpy_nn, parallel, steps, train
from minimobile import data as data_lib
from minimobile.checkpoint import Checkpoints
from minimobile.config import RECIPES, recipe
from minimobile.errors import UserError
from minimobile.seed_cnn import SeedCNN, SeedSeparableBlock, fold_batch_norm, parameter_count
from minimobile.evaluate import evaluate_workdir
from minimobile.predict import predict
from minimobile.train import parse_args, train_and_evaluate

from cifar_files import make_prepared_cifar_dir
from oracles import log_softmax

IMPLS = ["feature_group_count", "shift_add", "split"]


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def random_variables(module, x, seed=0, scale=0.3) -> dict:
    """Random values for every variable of `module`, from shapes alone (jax.eval_shape: nothing compiles).

    Parameters ~ N(0, scale^2) (biases too, so they are really tested, where init would give zeros);
    BatchNorm's running means ~ N(0, scale^2) and running variances ~ U(0.5, 2).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
    draw = lambda path, s: (rng.uniform(0.5, 2.0, s.shape) if path[-1].key == "var"
                            else scale * rng.standard_normal(s.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


# ----------------------------------------------------------------------------------------------------
# The separable block is the report's split-into-channels code.
# ----------------------------------------------------------------------------------------------------


def reports_separable_block(x, dw_kernel, dw_bias, pw_kernel, pw_bias):
    """The report's block, written as its TensorFlow 1 code did it (the oracle).

    x: [B, H, W, C]; dw_kernel: [3, 3, 1, C]; dw_bias: [C]; pw_kernel: [1, 1, C, C_out]; pw_bias: [C_out].
    Split into C one-channel images, one ordinary 3x3 conv with ONE output channel + bias + ReLU on
    each, concatenate, then a 1x1 conv + bias + ReLU.
    """
    conv = lambda a, k: lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    channels = jnp.split(x, x.shape[-1], axis=-1)                            # C x [B, H, W, 1]
    outs = [jax.nn.relu(conv(xc, dw_kernel[..., c:c + 1]) + dw_bias[c])       # [B, H, W, 1]
            for c, xc in enumerate(channels)]
    y = jnp.concatenate(outs, axis=-1)                                        # [B, H, W, C]
    return jax.nn.relu(conv(y, pw_kernel) + pw_bias)                          # [B, H, W, C_out]


@pytest.mark.parametrize("impl", IMPLS)
def test_separable_block_equals_the_reports_per_channel_split_version(impl):
    x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 32)).astype(np.float32)  # in [-1, 1], as the report's
    block = SeedSeparableBlock(32, depthwise_impl=impl)
    params = random_variables(block, x)["params"]
    dw, pw = params["depthwise"]["depthwise"], params["pointwise"]["pointwise"]
    assert dw["kernel"].shape == (3, 3, 1, 32) and dw["bias"].shape == (32,)    # one filter and bias per channel
    assert pw["kernel"].shape == (1, 1, 32, 32) and pw["bias"].shape == (32,)

    got = jax.jit(block.apply, static_argnames="train")({"params": params}, x, train=False)
    expected = jax.jit(reports_separable_block)(x, dw["kernel"], dw["bias"], pw["kernel"], pw["bias"])
    assert got.shape == (2, 8, 8, 32)
    assert float(jnp.mean(expected > 0)) > 0.2  # the ReLUs pass a fair share: the comparison means something
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Layers, shapes and parameters.
# ----------------------------------------------------------------------------------------------------


def test_layers_shapes_and_parameter_count_by_hand():
    # Shapes only (jax.eval_shape): nothing is computed, so this is instant.
    model = SeedCNN()
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    _, state = jax.eval_shape(lambda v: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
                              variables)
    shapes = {name: v["__call__"][0].shape for name, v in state["intermediates"].items() if name != "__call__"}
    assert shapes == {"stem": (2, 32, 32, 32),                            # conv 3x3, 32, before the first pool
                      "block1": (2, 16, 16, 32), "block2": (2, 16, 16, 32),  # after max-pool 32 -> 16
                      "block3": (2, 8, 8, 32), "block4": (2, 8, 8, 32),      # after max-pool 16 -> 8
                      "classifier": (2, 10)}                                 # max-pool 8 -> 4, flatten 512
    p = variables["params"]
    assert p["stem"]["conv"]["kernel"].shape == (3, 3, 3, 32)
    assert p["classifier"]["kernel"].shape == (4 * 4 * 32, 10)
    # By hand: stem 3*3*3*32+32 = 896; each block (3*3*32+32) + (32*32+32) = 1,376; dense 512*10+10 = 5,130.
    assert count(p) == parameter_count() == 896 + 4 * 1_376 + 5_130 == 11_530
    assert "batch_stats" not in variables  # no BatchNorm, as in the report


def numpy_seed_cnn(p, x: np.ndarray) -> np.ndarray:
    """The report's network in NumPy (the oracle): numpy_nn's convolutions, pooling and flattening by hand.

    p: SeedCNN's params; x: [B, 32, 32, 3] -> logits [B, 10].
    """
    relu = lambda z: np.maximum(z, 0.0)

    def max_pool_2x2(z):  # [B, H, W, C] -> [B, H/2, W/2, C]: the largest of each 2x2 tile
        return np.maximum(np.maximum(z[:, 0::2, 0::2], z[:, 0::2, 1::2]), np.maximum(z[:, 1::2, 0::2], z[:, 1::2, 1::2]))

    x = max_pool_2x2(relu(numpy_nn.conv2d_forward(x, p["stem"]["conv"]["kernel"])[0] + p["stem"]["conv"]["bias"]))
    for name in ("block1", "block2", "block3", "block4"):
        dw, pw = p[name]["depthwise"]["depthwise"], p[name]["pointwise"]["pointwise"]
        x = relu(numpy_nn.depthwise_conv_forward(x, dw["kernel"])[0] + dw["bias"])
        x = relu(numpy_nn.pointwise_conv_forward(x, pw["kernel"])[0] + pw["bias"])
        if name in ("block2", "block4"):
            x = max_pool_2x2(x)                                                           # ends [B, 4, 4, 32]
    # TensorFlow's flatten of an NHWC tensor: feature (i * 4 + j) * 32 + c is pixel (i, j), channel c.
    b, h, w, c = x.shape
    flat = np.array([[x[n, i, j, k] for i in range(h) for j in range(w) for k in range(c)] for n in range(b)])
    return numpy_nn.dense_forward(flat, p["classifier"]["kernel"], p["classifier"]["bias"])[0]


def test_the_network_computes_what_the_reports_layers_compute_in_numpy():
    x = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    params = random_variables(SeedCNN(), x)["params"]
    expected = numpy_seed_cnn(jax.tree.map(lambda a: np.asarray(a, np.float64), params), x.astype(np.float64))
    got = jax.jit(SeedCNN().apply)({"params": params}, x)
    assert float(np.std(expected[0] - expected[1])) > 0.1  # the two images reach different logits
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_batch_norm_version_has_the_same_trainable_parameters():
    variables = jax.eval_shape(SeedCNN(batch_norm=True).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    p = variables["params"]
    # Each conv's bias moved into its BatchNorm's shift; BatchNorm learns no scale.
    assert "bias" not in p["block1"]["depthwise"]["depthwise"] and set(p["block1"]["depthwise"]["bn"]) == {"bias"}
    assert count(p) == 11_530
    assert count(variables["batch_stats"]) == 9 * 2 * 32  # running mean and variance of 9 convs: not trained


def test_batch_norm_folds_into_the_reports_network_at_inference():
    # Ours trains with BatchNorm, but what it deploys is the report's network, with the same 11,530 numbers.
    with_bn = SeedCNN(batch_norm=True)
    variables = random_variables(with_bn, jnp.zeros((1, 32, 32, 3)))
    # The stem's running variances as small as BatchNorm's epsilon (a channel that barely varies), so
    # that a fold which forgot epsilon would be far off, not off by 1e-5 of a variance near 1.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: v * 1e-5 if path[-1].key == "var" and path[-3].key == "stem" else v, variables)
    folded = fold_batch_norm(variables)
    assert jax.tree.map(jnp.shape, folded) == jax.tree.map(jnp.shape, jax.eval_shape(
        SeedCNN().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    expected = jax.jit(with_bn.apply)(variables, x)
    got = jax.jit(SeedCNN().apply)({"params": folded}, x)
    assert float(jnp.std(expected[0] - expected[1])) > 0.1  # the two images reach different logits
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


def test_seed_tf_recipe_scales_inputs_to_minus_one_to_one():
    mean, std = steps.input_normalization(recipe("seed-tf"), (125.0, 123.0, 114.0), (63.0, 62.0, 66.0))
    pixels = jnp.array([0, 127.5, 255], jnp.float32)[:, None] * jnp.ones(3)  # [3 pixels, 3 channels]
    np.testing.assert_allclose(augment.normalize(pixels, mean, std), [[-1] * 3, [0] * 3, [1] * 3])
    assert steps.input_normalization(recipe("default"), (1, 2, 3), (4, 5, 6)) == ((1, 2, 3), (4, 5, 6))


# ----------------------------------------------------------------------------------------------------
# The recipes, the command line and the trainer.
# ----------------------------------------------------------------------------------------------------


def test_recipes_are_the_reports_setup_and_ours_keeps_the_budget():
    tf = RECIPES["seed-tf"]
    assert (tf.dataset, tf.model, tf.batch_norm, tf.normalization) == ("cifar10", "seed_cnn", False, "minus_one_to_one")
    assert (tf.optimizer, tf.learning_rate, tf.weight_decay, tf.schedule) == ("adam", 1e-3, 0.0, "constant")
    assert (tf.augment, tf.label_smoothing, tf.dtype) == ("none", 0.0, "float32")
    assert (tf.batch_size, tf.steps, tf.eval_at_steps, tf.eval_subset) == (20, 10_000, (5_000, 10_000), 2_000)
    ours = RECIPES["seed-tf-ours"]
    assert (ours.model, ours.batch_norm) == ("seed_cnn", True)
    assert ours.batch_size * ours.steps <= tf.batch_size * tf.steps  # no more images seen than the report's run
    # README: ours changes three things, all about optimisation: BatchNorm, the inputs' normalisation,
    # and the learning rate (2e-3 after a warmup, then a cosine). Nothing else.
    changed = {f for f in dataclasses.asdict(tf) if getattr(tf, f) != getattr(ours, f)}
    assert changed == {"batch_norm", "normalization", "learning_rate", "warmup_epochs", "schedule"}
    assert (ours.normalization, ours.learning_rate, ours.schedule) == ("dataset", 2e-3, "cosine")
    # `--recipe seed-tf` alone picks CIFAR-10; --dataset and --steps still override.
    assert parse_args(["--recipe", "seed-tf"])[0] == tf
    assert parse_args(["--recipe", "seed-tf", "--steps", "30"])[0].steps == 30
    # A recipe counted in steps counts the epochs a user asks for instead, never ignores them.
    by_epochs = parse_args(["--recipe", "seed-tf", "--epochs", "3"])[0]
    assert (by_epochs.steps, by_epochs.epochs) == (0, 3)
    with pytest.raises(UserError, match="give --epochs or --steps, not both"):
        parse_args(["--epochs", "3", "--steps", "30"])


def test_our_recipe_warms_up_then_anneals_and_its_batch_norm_network_learns():
    ours = recipe("seed-tf-ours")
    # On CIFAR-10's 50,000 images a pass is 2,500 steps of 20: 0.2 of one is 500 steps of warmup.
    lr = steps.learning_rate_schedule(ours, steps_per_epoch=2_500, total_steps=ours.steps)
    np.testing.assert_allclose([lr(0), lr(500), lr(5_250), lr(10_000)], [0, 2e-3, 1e-3, 0], atol=1e-9)

    # Three steps on one fixed batch: the loss falls and BatchNorm's running statistics move.
    model = steps.build_model(ours.replace(depthwise_impl="feature_group_count"), num_classes=10)
    variables = random_variables(model, jnp.zeros((1, 32, 32, 3)), scale=0.1)
    state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    batch_stats=variables["batch_stats"], tx=steps.make_optimizer(ours, lambda _: 2e-3))
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((20, 32, 32, 3)).astype(np.float32), "label": np.arange(20) % 10}
    step = jax.jit(steps.train_step)
    trained, losses = state, []
    for _ in range(3):
        trained, metrics = step(trained, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    before, after = state.batch_stats["stem"]["bn"]["mean"], trained.batch_stats["stem"]["bn"]["mean"]
    assert not np.allclose(before, after)


def test_help_works_with_the_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--recipe", "seed-tf", "--help"])
    assert e.value.code == 0 and "--steps" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    """A TFDS data dir with a tiny CIFAR-10 (40 train, 12 test images), prepared offline by the real builder."""
    return make_prepared_cifar_dir(tmp_path_factory.mktemp("data"), "cifar10", n_train=40, n_test=12)


def read_records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_seed_tf_recipe_trains_evaluates_at_its_steps_and_resumes_from_the_command_line(tmp_path, cifar10_dir):
    # The recipe, shrunk: 40 steps of 20 (2 steps an epoch on 40 images), evaluated at 20 and 40 on the
    # whole test split and on its first 8 images, a checkpoint every 20 steps. jit: 20 does not split
    # over the test run's 8 devices. (feature_group_count only because it compiles fastest on CPU.)
    config = recipe("seed-tf").replace(steps=40, eval_at_steps=(20, 40), eval_subset=8, eval_every_steps=1_000,
                                       checkpoint_every_steps=20, log_every_steps=10, parallel="jit",
                                       depthwise_impl="feature_group_count")
    workdir = tmp_path / "seed-tf"
    final = train_and_evaluate(config, workdir, data_dir=cifar10_dir, progress=False)
    evals = {r["step"]: r for r in read_records(workdir) if "eval_accuracy" in r}
    assert sorted(evals) == [20, 40]
    for r in evals.values():  # 12 test images, of which the first 8: whole counts of each
        assert (12 * r["eval_accuracy"]) == pytest.approx(round(12 * r["eval_accuracy"]))
        assert (8 * r["eval_accuracy_first_8"]) == pytest.approx(round(8 * r["eval_accuracy_first_8"]))
    assert final["count"] == 12 and final["accuracy"] == evals[40]["eval_accuracy"]
    # The report's figure, accuracy on the first 8 test images, against the saved network's own answers
    # for exactly those images (inputs scaled to [-1, 1] by hand, as the report's code did).
    ds = data_lib.load_dataset("cifar10", cifar10_dir, download=False)
    run = train.build_run(config, ds, parallel.setup("jit"))
    checkpoints = Checkpoints(workdir)
    state = checkpoints.restore(40, run.state)
    checkpoints.close()
    logits = run.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             ds.test.images[:8] / 127.5 - 1, train=False)
    assert evals[40]["eval_accuracy_first_8"] == np.mean(np.argmax(logits, -1) == ds.test.labels[:8])
    # predict scales its inputs as training did: its answers are those logits' softmax, to within 1 % of
    # how much they differ from image to image (measured: 0.002 %; with the dataset's mean and std in
    # place of [-1, 1], 3,300 %).
    probabilities, _ = predict(workdir, ds.test.images[:8], "40")
    deviation = np.abs(np.log(probabilities) - log_softmax(logits)).max()
    assert deviation < 0.01 * log_softmax(logits).std(0).mean(), deviation
    # evaluate at a checkpoint named by its step, or the best one, gives back what training measured there.
    at_20, best = (evaluate_workdir(workdir, cifar10_dir, which) for which in ("20", "best"))
    assert at_20["step"] == 20 and best["accuracy"] == max(r["eval_accuracy"] for r in evals.values())
    for evaluated in (at_20, best):
        assert evaluated["loss"] == pytest.approx(evals[evaluated["step"]]["eval_loss"], rel=1e-5)
        assert evaluated["accuracy"] == pytest.approx(evals[evaluated["step"]]["eval_accuracy"])

    # Then the command line, as a user runs it on one device (the test run's fake devices dropped), asked
    # for 60 steps in the same workdir: it continues from step 40's checkpoint to 60.
    env = {**os.environ, "XLA_FLAGS": " ".join(
        f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)}
    cmd = [sys.executable, "-m", "minimobile.train", "--recipe", "seed-tf", "--steps", "60", "--data-dir",
           cifar10_dir, "--workdir", str(workdir), "--depthwise-impl", "feature_group_count", "--no-progress"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from epoch 20 (step 40)" in result.stdout
    assert "cifar10: 40 train / 12 test images, 10 classes; 2 steps of 20 per epoch; 60 steps on 1" in result.stdout
    records = read_records(workdir)
    assert sorted(r["step"] for r in records if "eval_accuracy" in r) == [20, 40, 60]
    last = [r for r in records if "eval_accuracy" in r][-1]  # the recipe's own subset: here all 12 test images
    assert last["eval_accuracy_first_2000"] == pytest.approx(last["eval_accuracy"])
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert np.all(np.isfinite(train_losses)) and train_losses[-1] < train_losses[0]  # it learns the 40 images
    assert (workdir / "checkpoints" / "60").is_dir()
    saved = json.loads((workdir / "config.json").read_text())
    assert (saved["model"], saved["steps"], saved["batch_size"]) == ("seed_cnn", 60, 20)


def test_the_trainer_feeds_the_network_the_recipes_scaling(tmp_path, cifar10_dir, monkeypatch):
    seen = []
    normalize = augment.normalize

    def spy(images, mean, std):
        seen.append((tuple(np.asarray(mean, float)), tuple(np.asarray(std, float))))
        return normalize(images, mean, std)

    monkeypatch.setattr(augment, "normalize", spy)
    config = recipe("seed-tf").replace(steps=2, eval_every_steps=2, eval_at_steps=(), checkpoint_every_steps=2,
                                       parallel="jit", depthwise_impl="feature_group_count")
    train_and_evaluate(config, tmp_path / "w", data_dir=cifar10_dir, progress=False)
    assert seen and set(seen) == {((127.5,) * 3, (127.5,) * 3)}  # train and test steps alike
