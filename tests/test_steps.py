"""What one train step and one evaluation compute, against the formulas written out by hand.

The other tests show that the step is the same under jit, pmap and a mesh, and the same after a
resume; these show that it is the *right* step: the loss with smoothed targets, SGD with Nesterov
momentum, weight decay on the kernels the paper says, the learning rate the recipe names, and an
evaluation that counts top-1, top-5 and the loss as NumPy does, padding excluded.
"""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from minimobile import parallel, steps, train
from minimobile.config import Config, recipe
from minimobile.data import Split

from oracles import log_softmax, normalised
from test_train import TINY, sample_dataset


@pytest.mark.parametrize("mode", ["jit", "mesh", "pmap"])  # 8 devices: each holds 2 images of a batch
def test_evaluation_counts_top1_top5_and_the_loss_as_numpy_does_and_ignores_the_padding(mode):
    # 24 test images in batches of 16: the second batch is half padding. An untrained network gets
    # about nothing right, so the labels are chosen from its own logits: 8 images labelled with their
    # top class, 8 with their 5th (top-5, not top-1), 8 with their 6th (neither). On 8 devices, the
    # counts are summed over all of them, and the predictions come back in the test split's order.
    ds, config = sample_dataset(), TINY.replace(parallel=mode, eval_subset=8)  # the report's "first N" too
    run = train.build_run(config, ds, parallel.setup(mode))
    state = jax.device_get(parallel.unreplicate(run.state, run.par))
    x = normalised(ds.test.images, ds.mean, ds.std)
    # An untrained network gives every image the same top class: its pooled features differ little from
    # image to image. A classifier that reads only how they differ (random weights on the features less
    # their mean) answers by the image, so that the order in which the predictions come back shows.
    features = np.asarray(jax.jit(lambda v, x: steps.build_model(TINY, 0).apply(v, x, train=False))(
        {"params": state.params, "batch_stats": state.batch_stats}, x))                             # [24, C]
    centred = features - features.mean(0)
    kernel = np.random.default_rng(0).standard_normal((features.shape[1], 100)) / centred.std()
    classifier = {"kernel": kernel.astype(np.float32), "bias": (-features.mean(0) @ kernel).astype(np.float32)}
    state = state.replace(params={**state.params, "classifier": classifier})
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    apply = jax.jit(lambda variables, x: steps.build_model(TINY, 100).apply(variables, x, train=False))
    logits = np.asarray(apply(variables, x))                                                            # [24, 100]
    ranked = np.argsort(-logits, axis=-1)
    labels = np.concatenate([ranked[:8, 0], ranked[8:16, 4], ranked[16:, 5]]).astype(np.int32)

    evaluation = train.build_evaluation(config, Split(ds.test.images, labels), ds.mean, ds.std, run.par)
    metrics, predictions = evaluation(parallel.replicate_device_tree(state, run.par))
    expected_loss = -log_softmax(logits)[np.arange(24), labels].mean()
    assert metrics["count"] == 24
    assert metrics["accuracy"] == pytest.approx(8 / 24) and metrics["accuracy_top5"] == pytest.approx(16 / 24)
    assert metrics["accuracy_first_8"] == 1.0                          # the 8 labelled with their top class
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_array_equal(predictions, ranked[:, 0])
    assert len(set(ranked[:, 0])) > 4  # so the order of the predictions shows


@flax.struct.dataclass
class StepOnly:
    """All of a TrainState that `train_step_on_device_data` reads itself: the step."""
    step: jax.Array


def test_each_device_draws_its_own_dropout_key_and_each_step_a_new_one(monkeypatch):
    # On 8 devices each holds 2 images of a batch. With one key for all, the 8 shares of every batch
    # would drop the very same features; and step 4, the first of epoch 2 (4 steps an epoch), must not
    # repeat step 0's randomness. train_step is replaced by one that returns the key it gets.
    def keys_of(state, batch, rng, **_):
        return state.replace(step=state.step + 1), {"key": jax.random.key_data(rng)[None]}   # [1, 2] a device

    monkeypatch.setattr(steps, "train_step", keys_of)
    par, config = parallel.setup("mesh"), TINY.replace(augment="none")
    body = functools.partial(steps.train_step_on_device_data, config=config, steps_per_epoch=4,
                             mean=(0.0,) * 3, std=(1.0,) * 3)
    step = parallel.distribute(body, par, out_specs=(P(), P(parallel.AXIS)), donate_first=False)
    images, labels = np.zeros((64, 32, 32, 3), np.uint8), np.zeros(64, np.int32)
    data = parallel.replicate((images, labels, np.arange(64, dtype=np.int32)), par)
    base_rng = parallel.on_all_devices(lambda: jax.random.key(0), par)()
    lr_numbers = parallel.replicate(steps.schedule_numbers(config, 4, 8), par)
    state = parallel.replicate(StepOnly(step=np.int32(0)), par)
    state, first = step(state, *data, base_rng, lr_numbers)
    _, second = step(state, *data, base_rng, lr_numbers)
    _, next_epoch = step(parallel.replicate(StepOnly(step=np.int32(4)), par), *data, base_rng, lr_numbers)
    keys = np.concatenate([np.asarray(k["key"]) for k in (first, second, next_epoch)])       # [24, 2]
    assert par.num_shards == 8 and len({tuple(k) for k in keys}) == 24


def flat(tree) -> dict:
    return {"/".join(path): np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(tree).items()}


def paper_decayed(weights: dict) -> set[str]:
    """The kernels weight decay applies to, by name: the paper (section 3.2) wants little or none on the
    depthwise filters, and none goes on BatchNorm or biases. The stem's conv, the 13 pointwise convs
    and the classifier's kernel."""
    decayed = {p for p in weights if p.endswith("/kernel") and p.split("/")[0] in ("stem", "classifier")
               or p.endswith("/pointwise/pointwise/kernel")}
    assert len(decayed) == 1 + 13 + 1 and not any("depthwise/kernel" in p for p in decayed)
    return decayed


def test_one_train_step_is_nesterov_sgd_on_smoothed_targets_with_decay_on_conv_and_dense_kernels_only():
    # By hand: targets t = (1 - a) * onehot + a / K; loss = mean over the batch of -sum(t * log_softmax);
    # g = its gradient (jax.grad: the differentiation is not what is tested here, the formula is);
    # d = g + wd * w on the decayed kernels; from zero momentum, Nesterov's update is d + m * d;
    # w' = w - lr * (1 + m) * d.
    config = TINY.replace(augment="none", schedule="constant", label_smoothing=0.1, weight_decay=5e-4,
                          momentum=0.9, learning_rate=0.05)
    # A mean and std that make (x - mean) / std exact in float32, however it is computed: the step and
    # the formula must see the very same input bits. An untrained network's loss gradient can jump: with
    # the sample's own mean and std, moving image 2 (a bowl, 31 of its pixels pure white) by one ulp changed
    # block01's BatchNorm bias gradient by 15 %, in float64 too, and NumPy's (x - m) / s and XLA's fused
    # one differ by an ulp on JAX 0.12.
    ds = dataclasses.replace(sample_dataset(), mean=(128.0,) * 3, std=(64.0,) * 3)
    run = train.build_run(config, ds, parallel.setup("jit"))
    before = jax.device_get(run.state)
    order = run.epoch_order(0)
    after, metrics = run.step(jax.tree.map(jnp.copy, run.state), order)

    batch = np.asarray(order)[:config.batch_size]                      # step 0 takes the first batch
    x, y = normalised(ds.train.images[batch], ds.mean, ds.std), ds.train.labels[batch]
    k, a = ds.num_classes, config.label_smoothing
    targets = (1 - a) * jax.nn.one_hot(y, k) + a / k

    def loss_fn(params):
        logits, updates = run.model.apply({"params": params, "batch_stats": before.batch_stats}, x, train=True,
                                          mutable=["batch_stats"])
        return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1)), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(before.params)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(metrics["accuracy"]) == np.mean(np.argmax(logits, -1) == y)   # the batch's top-1, not its smoothing
    # BatchNorm's running statistics move to what the training-mode forward pass measured on this batch.
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 jax.device_get(after.batch_stats), jax.device_get(batch_stats))

    weights, gradients = flat(before.params), flat(grads)
    decayed = paper_decayed(weights)
    m = config.momentum
    for path, w in weights.items():
        d = gradients[path] + (config.weight_decay * w if path in decayed else 0.0)
        expected = w - config.learning_rate * (1 + m) * d
        got = flat(jax.device_get(after.params))[path]
        # float32: the new weight and the formula's each round (a BatchNorm scale near 1 moves by 1e-5),
        # and XLA sums the stem BatchNorm scale's gradient, 16,384 terms that nearly cancel, a little
        # differently in the two programs (measured with JAX 0.12: 1.5 ulps of a weight near 1). The
        # errors looked for are far larger: the decay moves the largest weight of a tensor by ~400 ulps.
        tolerance = 1e-4 * np.abs(expected - w).max() + 4 * np.spacing(np.abs(w).max().astype(np.float32))
        assert np.abs(got - expected).max() <= tolerance, path


def test_adam_decays_the_same_kernels_as_sgd_decoupled_from_the_gradient():
    # AdamW (Loshchilov & Hutter 2019): w' = w - lr * (adam_direction + wd * w) on the decayed kernels,
    # Adam's w' = w - lr * adam_direction on the rest. So from the same gradients the update with decay
    # is Adam's minus lr * wd * w on exactly the paper's kernels, and Adam's own everywhere else.
    from minimobile.model import init_variables

    params = init_variables(steps.build_model(TINY, 100), jax.random.key(0))["params"]
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda w: rng.standard_normal(w.shape).astype(np.float32), params)
    lr, wd = 1e-3, 1e-2

    def update(weight_decay):
        tx = steps.make_optimizer(TINY.replace(optimizer="adam", weight_decay=weight_decay), lambda step: lr)
        return flat(tx.update(grads, tx.init(params), params)[0])

    adam, adamw, weights = update(0.0), update(wd), flat(params)
    decayed = paper_decayed(weights)
    for path, w in weights.items():
        expected = adam[path] - (lr * wd * w if path in decayed else 0.0)
        np.testing.assert_allclose(adamw[path], expected, rtol=1e-6, atol=1e-10, err_msg=path)


@pytest.mark.parametrize("num_classes, smoothing", [(100, 0.1), (20, 0.3)])
def test_with_smoothed_targets_the_lowest_train_loss_is_reached_by_predicting_them(num_classes, smoothing):
    # The network that predicts the smoothed targets themselves (logits = their log) reaches the floor
    # the curves draw; any other prediction scores higher. (0.778 for CIFAR-100's default recipe.)
    floor = steps.lowest_train_loss(num_classes, smoothing)
    targets = np.full(num_classes, smoothing / num_classes)
    targets[3] += 1 - smoothing
    best = np.log(targets)[None]                                                     # [1, K]
    labels = jnp.array([3])
    assert float(steps.cross_entropy(best, labels, smoothing)[0]) == pytest.approx(floor, abs=1e-5)
    others = best + np.random.default_rng(0).normal(0, 0.5, (64, num_classes))        # [64, K]
    assert np.all(np.asarray(steps.cross_entropy(others, jnp.full(64, 3), smoothing)) > floor)
    if (num_classes, smoothing) == (100, 0.1):
        assert floor == pytest.approx(0.778, abs=1e-3)
    assert steps.lowest_train_loss(num_classes, 0.0) == 0  # plain one-hot targets: a perfect network scores 0


def test_the_default_recipe_warms_up_for_5_epochs_then_decays_as_a_cosine_to_zero():
    # CIFAR-100's 50,000 images in batches of 256: 195 steps an epoch, 975 of warmup, 39,000 in all.
    config = recipe("default")
    spe, total = 50_000 // 256, 200 * (50_000 // 256)
    schedule = steps.learning_rate_schedule(config, spe, total)
    warmup, peak = 5 * spe, 0.2
    by_hand = {0: 0.0, warmup // 2: peak * (warmup // 2) / warmup, warmup: peak,
               (warmup + total) // 2: peak * 0.5 * (1 + np.cos(np.pi * ((warmup + total) // 2 - warmup) / (total - warmup))),
               total: 0.0}
    for step, lr in by_hand.items():
        assert float(schedule(step)) == pytest.approx(lr, abs=1e-7), step


def test_a_constant_schedule_warms_up_and_then_holds_and_the_seed_recipe_is_constant():
    schedule = steps.learning_rate_schedule(Config(schedule="constant", warmup_epochs=1.0, learning_rate=0.1), 100, 1000)
    assert [float(schedule(s)) for s in (0, 50, 100, 999)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
    seed = steps.learning_rate_schedule(recipe("seed"), 12, 600)
    assert [float(seed(s)) for s in (0, 300, 600)] == pytest.approx([1e-3] * 3)


def test_training_augments_with_the_configs_recipe_and_evaluation_never_augments(monkeypatch):
    from minimobile import augment

    kinds = []                                     # recorded while jax traces: once per compiled program
    augment_batch = augment.augment_batch
    monkeypatch.setattr(augment, "augment_batch", lambda keys, images, kind: (
        kinds.append(kind), augment_batch(keys, images, kind))[1])
    run = train.build_run(TINY.replace(augment="seed"), sample_dataset(), parallel.setup("jit"))
    run.step(jax.tree.map(jnp.copy, run.state), run.epoch_order(0))
    assert kinds == ["seed"]
    run.evaluate(run.state)
    assert kinds == ["seed"]                       # the evaluation traced no augmentation
