"""The train step and the evaluation, as pure functions of explicit state.

`train_step(state, batch, rng) -> (state, metrics)` is the whole of learning: forward, loss, backward,
gradient averaging across devices, optimizer update. It never touches the host. The same body runs

  * under plain `jax.jit` on one device            (axis_name=None: nothing to average),
  * under `jax.pmap` over the local devices         (axis_name="batch"),
  * under `jax.jit(jax.shard_map(...))` over a mesh of every device of every process,

and `parallel.py` is where it gets wrapped. `train_step_on_device_data` adds the input pipeline in
front of it (pick this step's examples from the dataset already on the device, augment, normalise), so
that one compiled program does everything a training step needs and the host only says "go", and
`train_steps_on_device_data` runs several such steps in one call, as a loop on the device.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state
from jax import lax

from minimobile import augment as augment_lib
from minimobile import data as data_lib
from minimobile.config import Config
from minimobile.errors import UserError
from minimobile.layers import resolve_depthwise_impl
from minimobile.model import MobileNetV1, jit_init


class TrainState(train_state.TrainState):
    """step, params, opt_state (from flax) plus BatchNorm's running statistics: the whole of a run's state."""

    batch_stats: Any = None


def compute_dtype(config: Config) -> jnp.dtype:
    """bfloat16 where the hardware has fast bf16 matrix units (GPU, TPU); float32 on CPU."""
    if config.dtype == "auto":
        return jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    return jnp.dtype(config.dtype)


def build_model(config: Config, num_classes: int, bn_axis_name: str | None = None):
    """The network a config describes. `bn_axis_name` must be the data-parallel axis of the step."""
    if config.model == "seed_cnn":
        from minimobile.seed_cnn import SeedCNN  # the report's small CIFAR-10 network (issue 8)

        return SeedCNN(num_classes=num_classes, batch_norm=config.batch_norm, bn_axis_name=bn_axis_name,
                       depthwise_impl=resolve_depthwise_impl(config.depthwise_impl), dtype=compute_dtype(config))
    dtype = compute_dtype(config)
    return MobileNetV1(num_classes=num_classes, width=config.width, stem=config.stem, block=config.block,
                       depth_multiplier=config.depth_multiplier, dropout_rate=config.dropout_rate,
                       dtype=dtype, bn_axis_name=bn_axis_name,
                       # float64 (with jax_enable_x64) is for numerical checks: parameters follow it.
                       param_dtype=jnp.float64 if dtype == jnp.float64 else jnp.float32,
                       depthwise_impl=resolve_depthwise_impl(config.depthwise_impl))


# The pixel scalings a config can ask for: the dataset's own statistics, or the report's fixed x / 127.5 - 1.
NORMALIZATIONS = ("dataset", "minus_one_to_one")


def input_normalization(config: Config, dataset_mean, dataset_std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) that `augment.normalize` should use for this config, train and test alike.

    "dataset" centres each channel on the training set's mean and std (about zero mean, unit std);
    "minus_one_to_one" is the report's x / 127.5 - 1, which is the same formula with mean = std = 127.5.
    """
    if config.normalization == "dataset":
        return tuple(dataset_mean), tuple(dataset_std)
    if config.normalization == "minus_one_to_one":
        return (127.5,) * 3, (127.5,) * 3  # 0 -> -1, 255 -> 1, whatever the data
    raise UserError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {config.normalization!r}.")


def decay_mask(params) -> Any:
    """Weight decay on conv and dense kernels only.

    Not on BatchNorm's scale/shift or biases (decaying them only fights the normalisation), and not
    on depthwise kernels: "we found that it was important to put very little or no weight decay (l2
    regularization) on the depthwise filters since their [sic] are so few parameters in them" (the
    MobileNet paper, section 3.2). A depthwise kernel is known by its layer's name, `depthwise`
    (`layers.depthwise_conv`; in the seed CNN too).
    """
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {path: path[-1] == "kernel" and path[-2] != "depthwise" for path in flat})


def schedule_numbers(config: Config, steps_per_epoch: int, total_steps: int) -> dict[str, np.ndarray]:
    """The numbers that shape a run's learning-rate schedule: its peak, warmup steps and decay steps.

    The train step takes them as an argument rather than as constants compiled into it, so that a run
    with another `--learning-rate` or length (`--epochs 40` resuming a run of 20) finds its compiled
    step in the compilation cache.
    """
    warmup = int(config.warmup_epochs * steps_per_epoch)
    return {"peak": np.float32(config.learning_rate), "warmup_steps": np.int32(warmup),
            "decay_steps": np.int32(max(total_steps, warmup + 1))}


def learning_rate(step, kind: str, numbers: dict) -> jax.Array:
    """The rate at `step`: linear warmup from 0 to the peak, then a cosine to 0 at decay_steps ("cosine")
    or the peak ever after ("constant"). Works on arrays, traced or not."""
    step = jnp.asarray(step, jnp.float32)
    peak, warmup, decay = (jnp.asarray(numbers[k], jnp.float32) for k in ("peak", "warmup_steps", "decay_steps"))
    warming_up = peak * step / jnp.maximum(warmup, 1.0)
    if kind == "cosine":
        after = peak * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip((step - warmup) / (decay - warmup), 0.0, 1.0)))
    elif kind == "constant":
        after = peak
    else:
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {kind!r}")
    return jnp.where(step < warmup, warming_up, after)


def learning_rate_schedule(config: Config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """A run's schedule as a function of the step: linear warmup from 0, then cosine decay to 0 (or constant)."""
    return functools.partial(learning_rate, kind=config.schedule,
                             numbers=schedule_numbers(config, steps_per_epoch, total_steps))


def make_optimizer(config: Config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with Nesterov momentum and L2 weight decay added to the gradient, or Adam with decoupled
    weight decay (AdamW) when it has any; the decay only on the kernels `decay_mask` picks."""
    if config.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                           optax.sgd(schedule, momentum=config.momentum, nesterov=True))
    if config.optimizer == "adam":
        if config.weight_decay:
            return optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
        return optax.adam(schedule)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")


def create_train_state(rng: jax.Array, model, tx: optax.GradientTransformation,
                       image_shape: tuple[int, int, int]) -> TrainState:
    """Initial parameters, BatchNorm statistics and optimizer state (jit this: it is one XLA program)."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables.get("batch_stats", {}), tx=tx)
    # An int32 step, as a restored checkpoint has: flax's Python 0 would come out of jit weakly typed,
    # and the train step would then compile twice, once for a fresh run and once for a resumed one.
    return state.replace(step=jnp.zeros((), jnp.int32))


def init_train_state(rng: jax.Array, model, tx: optax.GradientTransformation,
                     image_shape: tuple[int, int, int]) -> TrainState:
    """`create_train_state`, compiled as an initialisation (see `model.jit_init`), on the default device."""
    return jit_init(lambda rng: create_train_state(rng, model, tx, image_shape))(rng)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy against (optionally smoothed) one-hot targets. logits: [B, K] -> [B]."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def lowest_train_loss(num_classes: int, label_smoothing: float) -> float:
    """The training loss of a network that predicts the smoothed targets exactly: their entropy.

    With smoothing the targets are 1 - s + s/K on the label and s/K on every other class, so even a
    perfect network's training loss stays above 0 (0.78 for s = 0.1, K = 100), while the test loss,
    measured against the label alone, has no such floor: the two curves are not the same quantity.
    """
    if label_smoothing == 0:
        return 0.0
    elsewhere = label_smoothing / num_classes
    on_label = 1 - label_smoothing + elsewhere
    return -on_label * math.log(on_label) - (num_classes - 1) * elsewhere * math.log(elsewhere)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               label_smoothing: float = 0.0, learning_rate_fn: Callable | None = None,
               axis_name: str | None = None, tx: optax.GradientTransformation | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (SGD or Adam, as `tx` says: by default `state.tx`).

    batch: {"image": [B, H, W, 3] float (normalised), "label": [B] int}.
    tx: the trainer's compiled step passes one built around `lr_numbers`, arguments of the step, so
    that another learning rate or run length compiles nothing new; `state.tx` (the same optimizer)
    then only lays out `state.opt_state`.

    With `axis_name`, this body sees only its device's share of the batch: gradients and metrics are
    averaged over the axis (and BatchNorm, built with the same axis name, averages its statistics),
    so every device ends the step with identical parameters.
    """

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                         train=True, mutable=["batch_stats"], rngs={"dropout": rng})
        loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = lax.pmean(grads, axis_name)  # the gradient of the *global* batch's mean loss
    updates, opt_state = (tx or state.tx).update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, batch_stats=batch_stats)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    if axis_name is not None:
        metrics = lax.pmean(metrics, axis_name)
    if learning_rate_fn is not None:
        metrics["learning_rate"] = learning_rate_fn(state.step - 1)  # the rate this step used
    return state, metrics


def shard_position(axis_name: str | None, num_shards: int):
    """Which block of the global batch this device holds: 0 of 1 without an axis."""
    return (lax.axis_index(axis_name), num_shards) if axis_name is not None else (0, 1)


def train_step_on_device_data(state: TrainState, images: jax.Array, labels: jax.Array, perm: jax.Array,
                              base_rng: jax.Array, lr_numbers: dict, *, config: Config, steps_per_epoch: int,
                              mean, std, axis_name: str | None = None,
                              num_shards: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """Select, augment and normalise this step's examples on the device, then `train_step`.

    images: [N, H, W, 3] uint8 and labels: [N], the whole split, already on every device;
    perm: [N], this epoch's shuffled order. Everything else (step, RNG) derives from `state.step`,
    so no value crosses from the host per step, and a resumed run sees exactly the same batches.
    lr_numbers: `schedule_numbers(...)`; the optimizer (the config's, as `state.tx`) is built here
    around them, so that they stay arguments of the compiled step rather than constants in it.
    """
    shard, num_shards = shard_position(axis_name, num_shards)
    global_batch = config.batch_size
    local = global_batch // num_shards
    indices = data_lib.train_batch_indices(perm, state.step % steps_per_epoch, global_batch)  # [B]
    indices = data_lib.shard_slice(indices, num_shards, shard)                                # [B / devices]
    step_rng = jax.random.fold_in(base_rng, state.step)
    # One key per example, from its position in the *global* batch: augmentation does not depend on
    # how many devices share the batch. Dropout keys differ per device (each masks its own examples).
    positions = shard * local + jnp.arange(local)
    augment_keys = augment_lib.example_keys(jax.random.fold_in(step_rng, 0), positions)
    dropout_rng = jax.random.fold_in(jax.random.fold_in(step_rng, 1), shard)
    batch = data_lib.gather_batch(images, labels, indices)                          # [B/d, H, W, 3] uint8
    x = augment_lib.augment_batch(augment_keys, batch["image"], config.augment)      # [B/d, H, W, 3] float32
    batch = {"image": augment_lib.normalize(x, mean, std), "label": batch["label"]}
    learning_rate_fn = functools.partial(learning_rate, kind=config.schedule, numbers=lr_numbers)
    return train_step(state, batch, dropout_rng, label_smoothing=config.label_smoothing,
                      learning_rate_fn=learning_rate_fn, axis_name=axis_name,
                      tx=make_optimizer(config, learning_rate_fn))


def train_steps_on_device_data(state: TrainState, images: jax.Array, labels: jax.Array, perm: jax.Array,
                               base_rng: jax.Array, lr_numbers: dict, num_steps: jax.Array, *, loop: bool = True,
                               **step_kwargs) -> tuple[TrainState, dict[str, jax.Array]]:
    """`num_steps` consecutive `train_step_on_device_data` steps in one call: a loop on the device.

    Why a loop: every call of a compiled program gets fresh scratch memory for its intermediates. On
    CPU that is ~0.5 GB for MobileNet at batch 128, and the kernel maps and zero-fills it page by page
    (~127,000 page faults, ~0.2 s of a ~0.4 s step); inside one call the loop reuses it, step after
    step. `num_steps` is a traced value, so one compiled program serves every count, and every step
    runs the same compiled body: how steps are grouped into calls never changes the result, bit for bit
    (the program of `loop=False` is compiled apart, and may differ from it in the last bits).

    `loop=False` compiles one step and no loop, for runs of one step per call (`num_steps` must be 1).
    A loop whose count is traced costs even when it runs once: XLA:CPU keeps the convolutions of a
    loop body out of its fast kernels (a step of the grouped depthwise at width 0.25, batch 32, took 4.3x
    as long in a loop run once as with no loop: 59.8 vs 255.8 img/s, README's Speed section),
    and XLA:GPU reads the loop's condition back to the host after each pass, so the host waits for
    every step before it can queue the next.

    Returns the state and each metric *summed* over the steps (their mean is sum / "steps").
    """
    keys = ("loss", "accuracy", "learning_rate")
    as_sums = lambda metrics: {k: jnp.asarray(metrics[k], jnp.float32) for k in keys}
    if not loop:
        state, metrics = train_step_on_device_data(state, images, labels, perm, base_rng, lr_numbers, **step_kwargs)
        return state, {**as_sums(metrics), "steps": num_steps}

    def one_step(_, carry):
        state, sums = carry
        state, metrics = train_step_on_device_data(state, images, labels, perm, base_rng, lr_numbers,
                                                   **step_kwargs)
        return state, jax.tree.map(jnp.add, sums, as_sums(metrics))

    sums = {k: jnp.zeros((), jnp.float32) for k in keys}
    state, sums = lax.fori_loop(0, num_steps, one_step, (state, sums))
    return state, {**sums, "steps": num_steps}


LOOP_STEPS_PER_CALL = 16  # what "auto" picks where a loop pays (README, Speed: 8 -> 382 img/s, 16 -> 396)


def auto_steps_per_call(model, image_shape: tuple[int, int, int]) -> int:
    """How many steps per call pay on this backend for this model: LOOP_STEPS_PER_CALL, or 1.

    The loop pays on CPU (see `train_steps_on_device_data`), unless the network has XLA convolutions:
    inside a loop body XLA:CPU leaves them out of its fast convolution kernels (their gradients keep a
    layout those kernels do not take), and a step got 6-14x slower than one call per step (measured, in
    README's Speed section: the grouped depthwise, the standard-block MobileNet, the seed CNN). On GPU
    the allocator keeps its memory between calls, so there is nothing to gain there, and a loop would
    make the host wait for each step (see `train_steps_on_device_data`). Where this says 1, the trainer
    compiles its step with no loop.
    """
    if jax.default_backend() != "cpu":
        return 1
    x = jnp.zeros((1, *image_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    return 1 if primitive_counts(jaxpr.jaxpr)["conv_general_dilated"] else LOOP_STEPS_PER_CALL


def primitive_counts(jaxpr, counts: collections.Counter | None = None) -> collections.Counter:
    """How often each primitive occurs in a jaxpr, counting its sub-programs (jit, scan, cond, custom_vjp ...)."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    primitive_counts(inner, counts)
    return counts


def evaluate_on_device_data(state: TrainState, images: jax.Array, labels: jax.Array, indices: jax.Array,
                            mask: jax.Array, *, mean, std, axis_name: str | None = None,
                            num_shards: int = 1) -> tuple[dict[str, jax.Array], jax.Array]:
    """The whole test split in one call: a `lax.scan` over batches, never augmented.

    indices, mask: [S, B] from `data.eval_batches` (padding rows have mask False and count for nothing).
    Returns sums over the split (loss, top-1 and top-5 correct, count) and this device's top-1
    predictions [S, B / devices], for confusion matrices.
    """
    shard, num_shards = shard_position(axis_name, num_shards)
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def one_batch(_, row):
        idx, m = (data_lib.shard_slice(r, num_shards, shard) for r in row)
        batch = data_lib.gather_batch(images, labels, idx)
        x = augment_lib.normalize(batch["image"].astype(jnp.float32), mean, std)
        logits = state.apply_fn(variables, x, train=False)                       # [b, K]
        y = batch["label"]
        top5 = lax.top_k(logits, min(5, logits.shape[-1]))[1]                    # [b, 5]
        m = m.astype(jnp.float32)
        batch_sums = {"loss": jnp.sum(cross_entropy(logits, y) * m),
                      "correct": jnp.sum((top5[:, 0] == y) * m),
                      "correct_top5": jnp.sum(jnp.any(top5 == y[:, None], -1) * m),
                      "count": jnp.sum(m)}
        return None, (batch_sums, top5[:, 0])

    _, (per_batch, predictions) = lax.scan(one_batch, None, (indices, mask))
    sums = jax.tree.map(jnp.sum, per_batch)                                      # [S] -> scalars
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
    return sums, predictions


def summarize_eval(sums: dict[str, Any]) -> dict[str, float]:
    """Sums over the split -> {"loss", "accuracy", "accuracy_top5", "count"} (host floats)."""
    count = float(sums["count"])
    return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count,
            "accuracy_top5": float(sums["correct_top5"]) / count, "count": int(count)}
