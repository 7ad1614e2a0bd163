"""`python -m minimobile.train --dataset cifar100`: the training loop and its command line.

    train_and_evaluate(config, workdir)   the loop; tests, tutorials and notebooks call it directly
    main()                                parses flags into a Config and calls it

The loop owns everything that is *not* the math of a step (that is steps.py): putting the data on
the devices once, calling the compiled step, reading metrics back every `log_every_steps` (never per
step: each read would make the host wait for the device), evaluating, checkpointing, resuming, and
stopping cleanly on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import dataclasses
import functools
import json
import math
import pathlib
import signal
import sys
import tempfile
import textwrap
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from minimobile import augment as augment_lib
from minimobile import data as data_lib
from minimobile import parallel, report, steps, watchdog
from minimobile.checkpoint import Checkpoints
from minimobile.config import MODEL_FIELDS, RECIPES, Config, recipe
from minimobile.errors import (ArgumentParser, TrainingDiverged, UserError, exit_at_once, exit_on_user_error,
                               silence_stdout)
from minimobile.layers import DEPTHWISE_IMPLS
from minimobile.model import MAX_WIDTH


def validate(config: Config) -> None:
    """Reject settings that cannot work, each with one sentence saying what to change."""
    positive = {"--epochs": config.epochs if not config.steps else 1, "--width": config.width,
                "--batch-size": config.batch_size, "--learning-rate": config.learning_rate}
    for flag, value in positive.items():
        if not 0 < value < math.inf:  # also refuses nan
            raise UserError(f"{flag} must be positive{' and finite' if value == math.inf else ''}, got {value}.")
    if config.width > MAX_WIDTH:
        raise UserError(f"--width must be at most {MAX_WIDTH} (the paper's widest is 1.0), got {config.width}.")
    if not 0 <= config.dropout_rate < 1:
        raise UserError(f"--dropout is the fraction of features dropped: at least 0, below 1; got {config.dropout_rate}.")
    if not 0 <= config.weight_decay < math.inf:
        raise UserError(f"--weight-decay must be 0 or positive, got {config.weight_decay}.")
    if not 0 <= config.seed < 2 ** 32:
        raise UserError(f"--seed must be between 0 and 2**32 - 1, got {config.seed}.")
    if config.log_every_steps < 1:
        raise UserError(f"--log-every must be at least 1 step, got {config.log_every_steps}.")
    if config.steps < 0:
        raise UserError(f"--steps must be positive (or 0 to count in epochs), got {config.steps}.")
    if config.keep_checkpoints < 1:
        raise UserError(f"--keep-checkpoints must be at least 1 (the one to resume from), "
                        f"got {config.keep_checkpoints}.")
    if config.steps_per_call < 0:
        raise UserError(f"--steps-per-call must be positive (or 0 for auto), got {config.steps_per_call}.")
    if config.augment not in augment_lib.AUGMENTATIONS:
        raise UserError(f"--augment must be one of {', '.join(augment_lib.AUGMENTATIONS)}, got {config.augment!r}.")
    if config.model == "seed_cnn":  # the report's network is fixed: a MobileNet knob would be ignored silently
        for flag in MOBILENET_ONLY:
            if getattr(config, FLAGS[flag]) != getattr(Config(), FLAGS[flag]):
                refuse_mobilenet_flag(flag)


MOBILENET_ONLY = ("--width", "--block", "--dropout")


def refuse_mobilenet_flag(flag: str):
    raise UserError(f"{flag} shapes MobileNet only, and the seed-tf recipes train the report's fixed "
                    f"network (minimobile/seed_cnn.py); drop {flag}.")


class Workdir:
    """workdir/: config.json, dataset.json, checkpoints/, metrics.jsonl, tensorboard/, curves.png, .lock;
    and, when they happen, checkpoints-unreadable/ (damaged ones, moved aside), logs/ (one per process
    of a multi-host run) and eval/ (`python -m minimobile.evaluate`)."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--workdir {self.path} is a file, not a directory; choose a directory.")
        if self.path.is_symlink() and not self.path.exists():  # mkdir would say only "File exists"
            # Not created for the user: a link to nowhere is often a disk not mounted yet.
            raise UserError(f"--workdir {self.path} is a link to {os.readlink(self.path)}, which does not exist; "
                            "create that directory (or mount its disk), or choose another --workdir.")
        # The folders this run makes (deepest first): a run refused before it writes anything takes them away again.
        self.made = [d for d in (self.path, *self.path.parents) if not d.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".writable-{os.getpid()}"  # per process: hosts may share the workdir
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to --workdir {self.path} ({e.strerror or e}); "
                            "choose a directory you can write to.") from None

    def check_same_model(self, config: Config) -> Config | None:
        """A workdir holds one model: resuming it with other shapes would fail deep inside orbax.

        Returns the config the workdir's run was started with, if there is one.
        """
        saved_path = self.path / "config.json"
        if not saved_path.exists():
            return None
        try:
            saved = Config.from_json(saved_path.read_text())
        except (OSError, ValueError, TypeError) as e:  # not JSON, or not a config: never overwrite it
            raise UserError(f"cannot read {saved_path} ({getattr(e, 'strerror', None) or e}); it records how the "
                            "checkpoints beside it were made: restore it, or choose another --workdir.") from None
        different = [f for f in MODEL_FIELDS if getattr(saved, f) != getattr(config, f)]
        if different:
            what = ", ".join(f"{f} {getattr(saved, f)!r} there vs {getattr(config, f)!r} now" for f in different)
            raise UserError(f"--workdir {self.path} holds a run that cannot go on with these settings ({what}); "
                            "use a new --workdir, or the settings it was made with.")
        return saved

    @contextlib.contextmanager
    def lock(self):
        """Only one run at a time may write here: a second would interleave its checkpoints with ours.

        An OS lock (flock) on `workdir/.lock`, held while the run lasts; the OS lets it go when the
        process ends however it ends (even SIGKILL), so no stale lock is ever left. Several processes
        of one multi-host run share the workdir: process 0 holds the lock for all of them, and tells
        them whether it got it (else they would wait for it in the run's first collective).
        """
        busy = lambda owner: UserError(f"--workdir {self.path} is in use by another training run ({owner}); "
                                       "wait for it to end, or choose another --workdir.")
        if jax.process_index() != 0:
            if parallel.largest_across_processes(0):
                raise busy("process 0 of this run found it locked")
            yield
            return
        import fcntl  # POSIX only, like the signals the loop handles

        path = self.path / ".lock"
        while True:
            self.path.mkdir(parents=True, exist_ok=True)  # a run that gave up beside us may have taken it away
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "unknown"
                f.close()
                parallel.largest_across_processes(1)
                raise busy(f"process {owner}") from None
            # Locked, but perhaps a file its last holder removed (below) as we opened it: then again.
            try:
                if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            f.close()
        with f:  # closing the file releases the lock
            parallel.largest_across_processes(0)
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            try:
                yield
            finally:
                self.remove_if_unused()

    def remove_if_unused(self) -> None:
        """A run that stopped before writing anything (no data there, say) leaves no trace: no `.lock`,
        and none of the folders it made. Called while the lock is held: a run that opened the file meanwhile
        finds, once it has the lock, that the file is gone, and makes its own (`lock` above)."""
        try:
            if [p.name for p in self.path.iterdir()] != [".lock"]:
                return
            (self.path / ".lock").unlink()
            for folder in self.made:
                folder.rmdir()  # only an empty one goes
        except OSError:
            pass  # something else lives there now: leave it all

    def save_config(self, config: Config, dataset: data_lib.Dataset, data_dir: str | None = None) -> None:
        if jax.process_index() != 0:  # one writer, even when every host sees the same directory
            return
        report.write_whole(self.path / "config.json", config.to_json() + "\n")  # a half one would stop every resume
        self.save_dataset_facts(dataset, data_dir)

    def save_dataset_facts(self, dataset: data_lib.Dataset, data_dir: str | None = None) -> None:
        """dataset.json: what `evaluate` and `predict` need to know of the data (classes, normalisation)."""
        if jax.process_index() != 0:
            return
        info = {"name": dataset.name, "num_classes": dataset.num_classes, "class_names": dataset.class_names,
                "mean": dataset.mean, "std": dataset.std, "image_shape": dataset.train.images.shape[1:],
                "train_examples": len(dataset.train.labels), "test_examples": len(dataset.test.labels),
                # Where the data came from (None: TFDS's default), so that `evaluate` finds it without asking.
                "data_dir": str(pathlib.Path(data_dir).expanduser().absolute()) if data_dir else None}
        report.write_whole(self.path / "dataset.json", json.dumps(info, indent=2) + "\n")


class StopRequest:
    """SIGTERM (a scheduler preempting us) or Ctrl-C: finish the call the device is running and the one
    queued behind it (of --steps-per-call steps each at most), save, exit."""

    def __init__(self):
        self.signal: int | None = None
        self.by_another_process = False

    def agree(self) -> bool:
        """Stop now? The same answer on every process: a signal that reached one of them stops all.

        (A scheduler may signal only some processes of a run; one that stopped alone would leave the
        others waiting for it in the next step's collectives.)
        """
        signum = parallel.largest_across_processes(self.signal or 0)
        if signum and self.signal is None:
            self.signal, self.by_another_process = signum, True
        return bool(signum)

    @contextlib.contextmanager
    def installed(self):
        handler = lambda signum, frame: setattr(self, "signal", signum)
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


@dataclasses.dataclass
class Schedule:
    """When things happen, in steps."""

    steps_per_epoch: int
    total_steps: int
    eval_every: int
    eval_at: tuple[int, ...]
    checkpoint_every: int
    log_every: int

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def is_eval(self, step: int) -> bool:
        return step % self.eval_every == 0 or step in self.eval_at or step == self.total_steps

    def is_checkpoint(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.total_steps

    def steps_in_call(self, step: int, most: int) -> int:
        """How many steps the call starting after `step` runs: at most `most`, ending on the next step
        where something happens (a log line, an evaluation, a checkpoint, a new epoch, the end)."""
        def next_multiple(every: int) -> int:
            return (step // every + 1) * every
        events = [next_multiple(e) for e in (self.steps_per_epoch, self.log_every, self.eval_every,
                                             self.checkpoint_every)]
        events += [s for s in self.eval_at if s > step] + [self.total_steps]
        return max(1, min(most, min(events) - step))


MAX_STEPS = 2 ** 31 - 1  # the step counter, and the step each batch's randomness is drawn from, are int32s


def make_schedule(config: Config, num_train: int) -> Schedule:
    spe = data_lib.steps_per_epoch(num_train, config.batch_size)
    total = config.steps or config.epochs * spe
    if total > MAX_STEPS:
        asked = f"--steps {config.steps:,}" if config.steps else f"--epochs {config.epochs:,} ({total:,} steps)"
        raise UserError(f"{asked} is longer than a run can be: at most {MAX_STEPS:,} steps; ask for fewer.")
    return Schedule(spe, total, eval_every=config.eval_every_steps or spe, eval_at=tuple(config.eval_at_steps),
                    checkpoint_every=config.checkpoint_every_steps or spe,
                    log_every=max(1, min(config.log_every_steps, spe)))


def say(*args) -> None:
    """Print on the first process only (every process runs this same loop).

    If stdout's reader has gone (`python -m minimobile.train ... | head`), training goes on: hours of
    work are not thrown away for a closed pipe, and metrics.jsonl keeps the record.
    """
    if jax.process_index() == 0:
        try:
            print(*args, flush=True)
        except BrokenPipeError:
            silence_stdout()
            print("stdout was closed; training goes on, its log is in metrics.jsonl.", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Evaluation:
    """The test split on the devices and its compiled evaluation: `evaluation(state)` is one call.

    Each device takes its share of every batch of `rows`; `mask` marks the padding of the last batch.
    Returns the test metrics and the top-1 prediction for every test image, in order.
    """

    config: Config
    par: parallel.Parallel
    labels: np.ndarray               # [N] the test labels, on the host
    eval_fn: Any
    images: jax.Array                # [N, H, W, 3] uint8, on the devices (all the following too)
    device_labels: jax.Array         # [N]
    rows: jax.Array                  # [num_batches, batch_size] indices into the split
    mask: jax.Array                  # [num_batches, batch_size] True for an image, False for padding

    def __call__(self, state) -> tuple[dict[str, float], np.ndarray]:
        sums, predictions = self.eval_fn(state, self.images, self.device_labels, self.rows, self.mask)
        metrics = steps.summarize_eval(parallel.to_host(sums, self.par))
        predictions = parallel.to_host(predictions, self.par, batch_axis=1).reshape(-1)[:metrics["count"]]
        subset = self.config.eval_subset
        if subset:  # the report's habit: accuracy on the first N test images only
            metrics[f"accuracy_first_{subset}"] = float(np.mean(predictions[:subset] == self.labels[:subset]))
        return metrics, predictions


def build_evaluation(config: Config, test: data_lib.Split, mean, std, par: parallel.Parallel) -> Evaluation:
    """The test split sent to the devices once, and the evaluation compiled for `par`.

    mean, std: the train images' per-channel statistics (0..255 scale), as the train step normalises.
    """
    mean, std = steps.input_normalization(config, mean, std)  # the dataset's, or the report's [-1, 1]
    eval_fn = parallel.distribute(functools.partial(steps.evaluate_on_device_data, mean=mean, std=std), par,
                                  out_specs=(P(), P(None, parallel.AXIS)), donate_first=False)
    rows, mask = data_lib.eval_batches(len(test.labels), config.batch_size)
    on_devices = parallel.replicate((test.images, test.labels, rows, mask), par)
    return Evaluation(config, par, test.labels, eval_fn, *on_devices)


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once from a config, a dataset and a device layout.

    `steps(state, order, n)` runs n training steps in one compiled call (each step's batch is picked
    on the device from `order`, this epoch's permutation) and returns (new state, metrics summed over them);
    `step(state, order)` is one of them. `evaluate(state)` is the whole test split in one call.
    Tests and tutorials build a Run to drive steps by hand.
    """

    config: Config
    par: parallel.Parallel
    sched: Schedule
    dataset: data_lib.Dataset
    model: Any
    state: steps.TrainState          # freshly initialised, replicated for `par`
    step_fn: Any
    evaluation: Evaluation
    epoch_order_fn: Any
    device_data: tuple               # train images [N, H, W, 3] uint8, train labels [N], on the devices
    base_rng: jax.Array
    lr_numbers: dict                 # the schedule's peak, warmup and decay steps, on the devices
    steps_per_call: int              # the most steps the loop puts in one call (config's, or auto's)
    counts: dict = dataclasses.field(default_factory=dict, repr=False)  # n -> n on the devices

    def epoch_order(self, epoch: int) -> jax.Array:
        return self.epoch_order_fn(np.int32(epoch))

    def step_args(self, state, order, n: int) -> tuple:
        """What `steps` passes the compiled step, in order (also for tracing or lowering it by hand)."""
        if n not in self.counts:  # each count is sent to the devices once, so a call sends nothing
            self.counts[n] = parallel.replicate(np.int32(n), self.par)
        return (state, *self.device_data, order, self.base_rng, self.lr_numbers, self.counts[n])

    def steps(self, state, order, n: int):
        if not 1 <= n <= self.steps_per_call:  # a one-step run's program has no loop: it would do 1 step
            raise ValueError(f"a call makes 1 to {self.steps_per_call} steps in this run, not {n}")
        return self.step_fn(*self.step_args(state, order, n))

    def step(self, state, order):
        return self.steps(state, order, 1)

    def evaluate(self, state) -> tuple[dict[str, float], np.ndarray]:
        """Test metrics and the top-1 prediction for every test image, in order."""
        return self.evaluation(state)


def build_run(config: Config, ds: data_lib.Dataset, par: parallel.Parallel) -> Run:
    """Model, optimizer, initial state, the data on the devices, and the compiled step and evaluation."""
    sched = make_schedule(config, len(ds.train.labels))
    # BatchNorm averages over the same axis the step averages gradients over.
    model = steps.build_model(config, ds.num_classes, bn_axis_name=par.axis_name)
    # The state's optimizer lays out the optimizer state, and serves code that calls steps.train_step on
    # this state directly; the compiled step builds the same optimizer around `lr_numbers` (below).
    tx = steps.make_optimizer(config, steps.learning_rate_schedule(config, sched.steps_per_epoch, sched.total_steps))
    image_shape = ds.train.images.shape[1:]
    # Initialised on one device and copied to all: one program for every parallel mode (compiled once,
    # then found in the cache), and every process starts from the same numbers.
    state = parallel.replicate(
        jax.device_get(steps.init_train_state(jax.random.key(config.seed), model, tx, image_shape)), par)

    # The data goes to the devices once; every step reads its batch there.
    device_data = parallel.replicate((ds.train.images, ds.train.labels), par)
    data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    epoch_order_fn = parallel.on_all_devices(
        lambda epoch: data_lib.epoch_permutation(jax.random.fold_in(data_key, epoch), len(ds.train.labels)), par)
    base_rng = parallel.on_all_devices(lambda: jax.random.fold_in(jax.random.key(config.seed), 2), par)()

    mean, std = steps.input_normalization(config, ds.mean, ds.std)  # the dataset's, or the report's [-1, 1]
    steps_per_call = config.steps_per_call or steps.auto_steps_per_call(model, image_shape)
    # The schedule's numbers go in as arguments: another learning rate or run length compiles nothing new.
    lr_numbers = parallel.replicate(steps.schedule_numbers(config, sched.steps_per_epoch, sched.total_steps), par)
    step_fn = parallel.distribute(functools.partial(
        steps.train_steps_on_device_data, config=config, steps_per_epoch=sched.steps_per_epoch,
        mean=mean, std=std, loop=steps_per_call > 1), par, out_specs=(P(), P()))
    evaluation = build_evaluation(config, ds.test, ds.mean, ds.std, par)
    return Run(config, par, sched, ds, model, state, step_fn, evaluation, epoch_order_fn, device_data, base_rng,
               lr_numbers, steps_per_call)


def train_and_evaluate(config: Config, workdir: str | pathlib.Path, *, data_dir: str | None = None,
                       dataset: data_lib.Dataset | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `workdir` to the end of its schedule; returns the final test metrics.

    `dataset` may be given directly (tests, tutorials); otherwise it is loaded from TFDS.
    """
    # First: a process that refused its own flags alone would leave the others waiting for it.
    different = parallel.differ_across_processes(dataclasses.asdict(config))
    if different:
        flag_of = {field: flag for flag, field in FLAGS.items()}
        names = ", ".join(flag_of.get(f, f) for f in different)
        raise UserError(f"the processes of this run were started with different settings ({names}); "
                        "start every process with the same flags.")
    validate(config)
    par = parallel.setup(config.parallel)
    parallel.check_batch_size(config.batch_size, par)
    work = Workdir(workdir)
    with work.lock():
        return _train(config, par, work, data_dir, dataset, progress)


def check_processes_see_the_same(things: dict[str, Any]) -> None:
    """Stop every process of a multi-host run in one sentence if they read different data or checkpoints."""
    different = parallel.differ_across_processes(things)
    if different:
        raise UserError(f"the processes of this run see different {', '.join(different)}; give every process the "
                        "same data (--data-dir) and one --workdir on a filesystem they all share.")


def settings_changed(previous: Config, config: Config) -> str | None:
    """The line that names the settings a resume changes (a lower learning rate for the rest of a run,
    say): allowed, but never silently. None if none changed (the run's length does not count)."""
    changed = [f.name for f in dataclasses.fields(Config) if f.name not in ("epochs", "steps")
               and getattr(previous, f.name) != getattr(config, f.name)]
    if not changed:
        return None
    shown = lambda field, value: "auto" if field == "steps_per_call" and value == 0 else repr(value)
    return "settings changed since the last run here: " + ", ".join(
        f"{f} {shown(f, getattr(previous, f))} -> {shown(f, getattr(config, f))}" for f in changed
    ) + " (config.json now says so)"


def check_seed_may_change(previous: Config | None, config: Config, start: int | None, steps_per_epoch: int) -> None:
    """A new --seed may take over at an epoch's end, never in the middle of one.

    The seed decides each epoch's order of the train split (`Run.epoch_order`). Resumed mid-epoch with
    another seed, the rest of the epoch would follow another order: some images seen twice, others not
    at all. `previous` is the config the workdir's last run started with, `start` the step resumed from.
    """
    if previous is None or not start or start % steps_per_epoch == 0 or previous.seed == config.seed:
        return
    raise UserError(f"this run stopped in the middle of epoch {start // steps_per_epoch + 1} (step {start:,}), whose "
                    f"order --seed {previous.seed} decided: with --seed {config.seed} the rest of it would show some "
                    f"images twice and others not at all; resume with --seed {previous.seed} (a new seed can take "
                    "over at an epoch's end).")


def _train(config: Config, par: parallel.Parallel, work: Workdir, data_dir: str | None,
           dataset: data_lib.Dataset | None, progress: bool | None) -> dict[str, Any]:
    """`train_and_evaluate`, once the workdir is ours."""
    previous = work.check_same_model(config)
    ds = dataset or data_lib.load_dataset(config.dataset, data_dir, label_key=config.label_key)
    check_processes_see_the_same({"train images": ds.train.images, "train labels": ds.train.labels,
                                  "test images": ds.test.images, "test labels": ds.test.labels,
                                  "class names": ds.class_names})
    run = build_run(config, ds, par)
    sched = run.sched

    # Resume from the newest readable checkpoint, if any.
    checkpoints = Checkpoints(work.path, keep=config.keep_checkpoints)
    check_processes_see_the_same({"checkpoints": checkpoints.steps()})
    restored, start = checkpoints.restore_latest(parallel.unreplicate(run.state, par))
    check_seed_may_change(previous, config, start, sched.steps_per_epoch)
    # Only now: a run refused by its checkpoints leaves the settings they need. And not by a run with
    # nothing left to train (a smaller --epochs): config.json stays the record of what trained them.
    if previous is None or (start or 0) < sched.total_steps:
        if previous and (changes := settings_changed(previous, config)):
            say(changes)
        work.save_config(config, ds, None if dataset else data_dir)
    elif not (work.path / "dataset.json").exists():  # lost: evaluate and predict cannot do without it
        work.save_dataset_facts(ds, None if dataset else data_dir)
    state = run.state
    if start:
        state = parallel.replicate_device_tree(restored, par)
        # Longer than the run was started for (a larger --epochs), not merely stopped at an epoch's end.
        planned = make_schedule(previous, len(ds.train.labels)).total_steps if previous else sched.total_steps
        longer = " (train longer)" if sched.total_steps > max(planned, start) else ""
        say(f"resumed from epoch {start // sched.steps_per_epoch} (step {start:,}) in {work.path}{longer}")
    start = start or 0

    dropped = data_lib.dropped_per_epoch(len(ds.train.labels), config.batch_size)
    say(f"{ds.name}: {len(ds.train.labels):,} train / {len(ds.test.labels):,} test images, {ds.num_classes} classes; "
        f"{sched.steps_per_epoch} step{'s' * (sched.steps_per_epoch != 1)} of {config.batch_size} per epoch"
        + (f" (the last {dropped} of each epoch's shuffled order are skipped; the next epoch reshuffles)"
           if dropped else "")
        + f"; {sched.total_steps:,} step{'s' * (sched.total_steps != 1)} on {par.num_shards} "
          f"{jax.default_backend()} device(s), {config.parallel}.")

    writer = report.MetricsWriter(work.path, resume_step=start, enabled=jax.process_index() == 0)
    stop = StopRequest()
    # The handler stays until the last checkpoint is on disk: a signal that comes after the last step
    # cannot cut that write short, and the run, complete by then, ends normally a moment later.
    with stop.installed():
        try:
            state, final, last_checkpoint, stopped = _loop(run, state, start, checkpoints, writer, stop, progress)
            if start >= sched.total_steps:
                flag = "--steps" if config.steps else "--epochs"
                say(f"already trained for {start:,} steps; pass a larger {flag} to train longer.")
                final = run.evaluate(state)[0]
        except BaseException as stopping:
            # Let the pending write finish, or fail, before we stop. The error in flight is the one to
            # report; a write that failed too (not the same failure again) gets its own line first.
            try:
                checkpoints.wait()
            except UserError as also:
                if str(also) != str(stopping):
                    print(f"error: {also}", file=sys.stderr)
            raise
        else:
            checkpoints.wait()
        finally:
            checkpoints.close()
            writer.close()
    # The curves so far, a stopped run's too (its checkpoint is on disk: the figure risks nothing).
    records = report.read_metrics(writer.path) if writer.path.exists() else []
    curves = work.path / "curves.png"
    where = f"; curves in {curves}"
    if jax.process_index() == 0 and records:
        try:
            report.plot_curves(records, curves, title=f"{work.path.name}: {config.model} on {ds.name}",
                               train_loss_floor=steps.lowest_train_loss(ds.num_classes, config.label_smoothing),
                               augmented=config.augment != "none")
        except OSError as e:  # the run itself is saved: a missing figure is no reason to fail it
            print(f"warning: could not write {curves} ({e.strerror or e}).", file=sys.stderr)
            where = ""
    if stopped:
        name = signal.Signals(stop.signal).name + (" (by another process)" if stop.by_another_process else "")
        say(f"{name} received: saved a checkpoint at step {last_checkpoint:,}; "
            "rerun the same command to resume from there.")
        raise SystemExit(128 + stop.signal)
    say(f"test: loss {final['loss']:.4f}, top-1 {100 * final['accuracy']:.2f} %, "
        f"top-5 {100 * final['accuracy_top5']:.2f} %  ({final['count']:,} images){where}")
    return final


def _loop(run: Run, state, start: int, checkpoints: Checkpoints, writer: report.MetricsWriter,
          stop: StopRequest, progress: bool | None):
    """The steps themselves. Returns (state, last eval metrics, last checkpointed step, stopped early?)."""
    from tqdm.auto import tqdm

    config, sched, par = run.config, run.sched, run.par
    final: dict[str, Any] = {}
    pending: list[dict] = []          # device metrics (sums over each call's steps) not yet read back
    # images_per_sec counts training only: the clock restarts once the first call has compiled (or
    # loaded from the cache) and after each evaluation and checkpoint, which are not training.
    tick, tick_step, compiled = time.perf_counter(), start, False
    order, bar, train_summary = None, None, {}
    last_good, last_checkpoint = start, start or None
    step = start
    while step < sched.total_steps:
        epoch, step_in_epoch = divmod(step, sched.steps_per_epoch)
        if order is None or step_in_epoch == 0:
            order = run.epoch_order(epoch)
            if bar is not None:
                bar.close()
            total = min(sched.steps_per_epoch, sched.total_steps - epoch * sched.steps_per_epoch)
            # disable=None: a bar on a terminal, none in logs and CI.
            hide = True if jax.process_index() != 0 else (not progress if progress is not None else None)
            bar = tqdm(total=total, initial=step_in_epoch, desc=f"epoch {epoch + 1}", leave=False, unit="step",
                       disable=hide)

        # Several steps per call (a loop on the device), never past the next log, evaluation or checkpoint.
        n = sched.steps_in_call(step, run.steps_per_call)
        state, metrics = run.steps(state, order, n)
        if not compiled:  # the call returns once its steps are queued on the device, not when they are done
            tick, compiled = time.perf_counter(), True
        pending.append(metrics)
        # The device runs one call while the next waits in its queue, no more: left alone, the host
        # would queue every call up to the next read, and a signal would stop the run only there.
        if len(pending) > 1:
            jax.block_until_ready(pending[-2])
        done = step = step + n
        reads = done % sched.log_every == 0 or done == sched.total_steps or sched.is_eval(done)
        # Several processes agree on a stop where the host waits for the device anyway.
        waits = reads or sched.is_checkpoint(done)
        stopping = stop.agree() if waits or jax.process_count() == 1 else False

        if reads or stopping:
            # The only place the host waits for the device during training.
            values = jax.device_get([parallel.unreplicate(m, par) for m in pending])
            num_steps = sum(int(v["steps"]) for v in values)
            mean = {k: float(sum(v[k] for v in values)) / num_steps for k in values[0] if k != "steps"}
            if not math.isfinite(mean["loss"]):
                bar.close()
                kept = (f"the last good checkpoint (step {last_checkpoint:,}) is kept" if last_checkpoint
                        else "no checkpoint had been written yet")
                raise TrainingDiverged(f"the training loss became {mean['loss']} between steps {last_good:,} and "
                                       f"{done:,}; {kept}, so lower --learning-rate and rerun.")
            last_good = done
            now = time.perf_counter()
            images_per_sec = (done - tick_step) * config.batch_size / max(now - tick, 1e-9)
            tick, tick_step = now, done
            writer.write({"step": done, "epoch": round(sched.epoch(done), 4), "train_loss": mean["loss"],
                          "train_accuracy": mean["accuracy"], "learning_rate": mean.get("learning_rate"),
                          "images_per_sec": round(images_per_sec, 1)})
            bar.set_postfix(loss=f"{mean['loss']:.3f}", acc=f"{100 * mean['accuracy']:.1f}%",
                            img_s=f"{images_per_sec:,.0f}", refresh=False)
            bar.update(num_steps)
            pending, train_summary = [], mean

        if sched.is_eval(done):  # before a stop too: a resumed run never redoes this step's evaluation
            final = run.evaluate(state)[0]
            writer.write({"step": done, "epoch": round(sched.epoch(done), 4),
                          **{f"eval_{k}": v for k, v in final.items() if k != "count"}})
            extra = "".join(f", {k.replace('_', ' ')} {100 * v:.2f} %" for k, v in final.items()
                            if k.startswith("accuracy_first"))
            bar.clear()
            say(f"epoch {sched.epoch(done):6.2f}  step {done:>7,}  train loss {train_summary['loss']:.3f} "
                f"acc {100 * train_summary['accuracy']:5.1f} %  |  test loss {final['loss']:.3f} "
                f"top-1 {100 * final['accuracy']:5.2f} % top-5 {100 * final['accuracy_top5']:5.2f} %{extra}"
                f"  |  {images_per_sec:,.0f} img/s")
        if reads and not stopping:  # the host has just waited for the device: a signal may have come meanwhile
            stopping = stop.agree()
        if done == sched.total_steps:  # a signal during the last call: the run is complete, not stopped
            stopping = False
        if sched.is_checkpoint(done) or stopping:
            metrics = {"eval_accuracy": final["accuracy"]} if sched.is_eval(done) else None
            checkpoints.save(done, parallel.unreplicate(state, par), metrics)
            last_checkpoint = done
        if stopping:
            bar.close()
            return state, final, done, True
        if sched.is_eval(done) or sched.is_checkpoint(done):  # both wait for the steps before them
            tick, tick_step = time.perf_counter(), done
    if bar is not None:
        bar.close()
    return state, final, last_checkpoint, False


# --------------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------------

def default_compilation_cache() -> str:
    """JAX_COMPILATION_CACHE_DIR if set, else the user's cache folder (~/.cache/minimobile/xla)."""
    cache_home = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_home / "minimobile" / "xla")


def use_compilation_cache(directory: str) -> None:
    """Keep XLA's compiled programs in `directory` (JAX's persistent compilation cache), or 'none'.

    Compiling the width-1.0 train step, its evaluation and the initialisation takes about 15 s on
    2 CPU cores, every time a process starts: a resumed run, `evaluate`, the same config again. With
    the cache, only the first start compiles. Entries are keyed by the program, the devices and the
    XLA flags, so a stale one is never used; the folder can be deleted at any time.
    """
    if directory.lower() == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return
    try:
        pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
        # A folder that exists but takes no files (a read-only disk, another user's folder) would make
        # JAX warn, in two lines, at every program it compiles: find out once, here.
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:  # not worth stopping for: the run only compiles as it would without a cache
        print(f"warning: no compilation cache in {directory} ({e.strerror or e}); compiling every time "
              "(--compilation-cache DIR picks another folder).", file=sys.stderr)
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_compilation_cache_dir", directory)


FLAGS = {  # flag -> Config field; every one overrides the recipe
    "--dataset": "dataset", "--labels": "label_key", "--epochs": "epochs", "--steps": "steps",
    "--batch-size": "batch_size", "--width": "width", "--seed": "seed", "--dtype": "dtype",
    "--learning-rate": "learning_rate", "--weight-decay": "weight_decay", "--augment": "augment",
    "--depthwise-impl": "depthwise_impl", "--parallel": "parallel", "--dropout": "dropout_rate",
    "--block": "block", "--log-every": "log_every_steps", "--steps-per-call": "steps_per_call",
    "--keep-checkpoints": "keep_checkpoints",
}


def recipes_help() -> str:
    """--help's last part: what each recipe sets, as the flags that would set it."""
    differ = [flag for flag, field in FLAGS.items() if len({getattr(c, field) for c in RECIPES.values()}) > 1]
    lines = ["recipes (--recipe NAME; a flag given overrides the recipe's value; config.py says why each):"]
    for name, c in RECIPES.items():
        shown = [flag for flag in differ if flag != ("--epochs" if c.steps else "--steps")]
        values = " ".join(f"{flag}\0{getattr(c, FLAGS[flag])}" for flag in shown)  # \0: never split the pair
        text = f"{name}: {c.model}, {c.optimizer} ({c.schedule} learning rate), {values}"
        lines += [line.replace("\0", " ") for line in
                  textwrap.wrap(text, width=100, initial_indent="  ", subsequent_indent="      ",
                                break_on_hyphens=False)]
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    p = ArgumentParser(prog="python -m minimobile.train",
                       description="Train MobileNet-V1 on CIFAR with one pure, data-parallel step.",
                       epilog=recipes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                   help="a documented starting config (default: %(default)s; listed below)")
    p.add_argument("--dataset", choices=data_lib.DATASETS,
                   help="cifar100 or cifar10 (default: the recipe's; cifar10 for seed-tf*)")
    p.add_argument("--labels", choices=("label", "coarse_label"), help="cifar100: fine (100) or coarse (20) labels")
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's own, ~/tensorflow_datasets)")
    p.add_argument("--workdir", default="runs/default", help="checkpoints, metrics and figures go here; "
                   "rerunning with the same workdir resumes (default: %(default)s)")
    p.add_argument("--epochs", type=int, help="passes over the train split, in place of a recipe's --steps "
                                                "(more than a finished run's: it trains on)")
    p.add_argument("--steps", type=int, help="count the run in steps instead of epochs (0: in epochs)")
    p.add_argument("--batch-size", type=int, help="global batch, split evenly across all devices")
    p.add_argument("--width", type=float, help="width multiplier alpha (1.0, 0.75, 0.5, 0.25)")
    p.add_argument("--block", choices=("separable", "standard"), help="'standard' = the full-convolution baseline")
    p.add_argument("--seed", type=int, help="one seed for the initialisation, data order, augmentation and dropout "
                                            "(dropout's masks also depend on the number of devices)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), help="compute dtype (params stay float32)")
    p.add_argument("--learning-rate", type=float, help="the peak learning rate (after warmup)")
    p.add_argument("--weight-decay", type=float,
                   help="on conv and dense kernels (not depthwise kernels, BatchNorm or biases): L2 with SGD, "
                        "decoupled (AdamW) with Adam")
    p.add_argument("--dropout", type=float, help="dropout rate before the classifier")
    p.add_argument("--augment", choices=augment_lib.AUGMENTATIONS,
                   help="standard: pad-4 crop + flip; seed: the report's; none")
    p.add_argument("--depthwise-impl", choices=("auto", *DEPTHWISE_IMPLS),
                   help="auto (default): feature_group_count on GPU, shift_add_vjp on CPU")
    p.add_argument("--parallel", choices=parallel.MODES, help="mesh (default), pmap, or jit on one device")
    p.add_argument("--log-every", type=int, help="read metrics back from the device every N steps")
    p.add_argument("--steps-per-call", type=int,
                   help="steps per compiled call, a loop on the device (default: 1 on GPU; on CPU 16 if the network "
                        "has no XLA convolution, else 1); 1 compiles the step with no loop, which may change "
                        "the last bits of the results, any larger count gives the same results as any other")
    p.add_argument("--keep-checkpoints", type=int, metavar="N",
                   help="keep the last N checkpoints, and always the one with the best test accuracy (default: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, only a line per evaluation")
    p.add_argument("--compilation-cache", default=default_compilation_cache(), metavar="DIR",
                   help="keep compiled programs here, so that a rerun (a resume, the same config again) "
                        "starts without compiling; 'none' turns it off (default: %(default)s)")
    p.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0 (then --num-processes, --process-id)")
    p.add_argument("--num-processes", type=int, help="multi-host: how many processes in all")
    p.add_argument("--process-id", type=int, help="multi-host: this process's number, 0 .. N-1")
    p.add_argument("--peer-timeout", type=int, default=60,
                   help="multi-host: seconds without a heartbeat before a peer counts as dead")
    args = p.parse_args(argv)
    config = recipe(args.recipe)
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field in FLAGS.items()}
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    if args.epochs is not None and args.steps:
        raise UserError("give --epochs or --steps, not both: a run counts in one of them.")
    if args.epochs is not None and args.steps is None:
        config = config.replace(steps=0)  # a recipe counted in steps (seed-tf) now counts the epochs asked for
    if config.model == "seed_cnn":  # even at MobileNet's default (`--width 1.0`), which `validate` cannot tell
        for flag in MOBILENET_ONLY:
            if getattr(args, flag[2:]) is not None:
                refuse_mobilenet_flag(flag)
    return config, args


def check_coordinator_port(coordinator: str, serves: bool = True) -> None:
    """Every process checks the form of HOST:PORT; process 0 (`serves`), which serves the run's coordinator
    on PORT, also checks that it can: if it cannot, JAX crashes. Either way, say why now."""
    import socket

    host, _, port = coordinator.rpartition(":")
    if not (host and port.isascii() and port.isdigit() and 0 < int(port) < 2 ** 16):
        raise UserError(f"--coordinator must be HOST:PORT, PORT from 1 to 65535 (e.g. 10.0.0.1:8476), "
                        f"got {coordinator!r}.")
    if not serves:
        return
    # JAX's coordinator listens on every address of the host ([::]:PORT), with SO_REUSEADDR: so only
    # another program listening on PORT stops it, and that is what this probe finds.
    for family, anywhere in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((anywhere, int(port)))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"process 0 cannot serve the coordinator at {coordinator}: another program listens "
                                f"on port {port} there; choose another port.") from None
    # No IPv6 and no IPv4 socket to probe with: leave the verdict to JAX.


@exit_on_user_error
def main(argv=None) -> None:
    config, args = parse_args(argv)
    hosts = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in hosts) and not (None not in hosts and 0 <= args.process_id < args.num_processes):
        raise UserError("a run of several processes needs all of --coordinator HOST:PORT, --num-processes N and "
                        "--process-id I (0 <= I < N), the same coordinator and N on every host.")
    if args.peer_timeout < 1:  # JAX would take a negative one as "every peer is dead at once"
        raise UserError(f"--peer-timeout must be at least 1 second, got {args.peer_timeout}.")
    if args.coordinator and not watchdog.is_child():  # see watchdog.py: a dead peer becomes one sentence
        check_coordinator_port(args.coordinator, serves=args.process_id == 0)
        Workdir(args.workdir)  # the watchdog logs into it: a workdir it cannot write to is one sentence, first
        sys.exit(watchdog.run_watched(sys.argv[1:] if argv is None else list(argv), args.workdir,
                                      args.process_id, args.peer_timeout))
    try:
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id, args.peer_timeout)
        use_compilation_cache(args.compilation_cache)
        train_and_evaluate(config, args.workdir, data_dir=args.data_dir, progress=False if args.no_progress else None)
    except KeyboardInterrupt as e:  # a signal before training began (while it steps, the loop saves and says so)
        if not args.coordinator:
            raise
        # One process of several: at exit, JAX shuts jax.distributed down, which waits for peers that a
        # Ctrl-C may have stopped first, and crashed (SIGSEGV) when one had. The workdir is tidy by now
        # (the `finally`s have run): leave without that shutdown.
        exit_at_once(getattr(e, "signum", signal.SIGINT))


if __name__ == "__main__":
    main()
