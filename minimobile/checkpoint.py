"""Checkpoints with orbax: atomic, the last few kept and always the best, a corrupt one skipped.

Orbax writes each checkpoint into a temporary directory and renames it into place only once every
file is complete, so a process killed mid-write leaves no half-checkpoint that could be mistaken for
a good one. If the newest checkpoint is damaged anyway (a disk error, a file truncated by hand), we
fall back to the one before it, with a warning, rather than refuse to resume. A checkpoint that reads
fine but holds other arrays than the run expects (another optimizer, another version of the model) is
not damaged: it is the wrong run, so we stop and say so, and move nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import re
import sys
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from minimobile import parallel
from minimobile.errors import UserError


def state_to_tree(state) -> dict[str, Any]:
    """The arrays of a TrainState (its functions are rebuilt from the config, not saved)."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


def _arrays_handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's handler for a tree of arrays, told how to write a replicated array on CPU.

    By default orbax copies a replicated array to the host from all of its replicas at once, a slice
    from each device: on GPUs and across hosts that spreads the copies out. CPU devices share one
    memory, so there it only adds a slicing program per array and device (with 8 CPU devices a save of
    the 1/16-width network took 1.2 s that way, 0.4 s whole).
    """
    if jax.default_backend() != "cpu":
        return ocp.PyTreeCheckpointHandler()
    whole = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    return ocp.PyTreeCheckpointHandler(
        type_handler_registry=ocp.type_handlers.create_type_handler_registry((jax.Array, whole)))


def write_error_code(error: Exception | str) -> int | None:
    """The errno of a failed write that orbax reports as TensorStore's ValueError, or None if it is not one.

    orbax writes arrays with TensorStore, whose errors arrive as `ValueError("RESOURCE_EXHAUSTED: ...
    No space left on device [os_error_code='28']")`, not as OSError.
    """
    found = re.search(r"os_error_code='?(\d+)", str(error))
    return int(found.group(1)) if found else None


def _test_accuracy(metrics: dict[str, float]) -> float:
    """What makes a checkpoint the best: the test accuracy it was saved with."""
    return metrics["eval_accuracy"]


class _ClosedEventLoopIsNoise:
    """A `sys.unraisablehook` that drops the "Event loop is closed" errors of a failed orbax read.

    When reading a damaged checkpoint fails, orbax closes its event loop while its I/O threads are
    still finishing, and each of them then reports, through Python's hook for errors nobody can catch,
    that the loop is closed: hundreds of tracebacks around our one-line warning, some after the
    restore has returned. They say nothing the warning does not; any other error goes to the hook
    that was there before.
    """

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self.previous(unraisable)


def _quiet_failed_reads() -> None:
    """Install `_ClosedEventLoopIsNoise` once per process (for good: the noise outlives the read)."""
    if not isinstance(sys.unraisablehook, _ClosedEventLoopIsNoise):
        sys.unraisablehook = _ClosedEventLoopIsNoise(sys.unraisablehook)


class _OrbaxNoise(logging.Filter):
    """Drops the orbax log records that would only bury our own messages.

    - the warning for a checkpoint saved without metrics: ours are on purpose (a SIGTERM save);
    - the advice to checkpoint less often when a save waited a second for the one before: on a busy
      machine that happens with a checkpoint per epoch, and the wait shows in the run's img/s anyway;
    - the tracebacks of a background write that failed (a full disk), from each of orbax's threads
      and asyncio tasks: `Checkpoints` says it in one sentence when the next save or `wait` finds it;
    - once that sentence is said, any later error of those threads (they stumble over the shut-down
      manager on the way out): the run is over, and they only repeat why;
    - a step's missing or damaged metadata file (missing: seen by evaluate when training deletes an
      old checkpoint as evaluate lists them): whether a checkpoint is readable is for the restore to
      find out, and to say in its own warning.
    """

    def __init__(self):
        super().__init__()
        self.write_failed = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        failed_write = write_error_code(f"{message} {record.exc_info[1] if record.exc_info else ''}") is not None
        after_failure = self.write_failed and record.levelno >= logging.ERROR
        advice = "did not provide metrics" in message or "consider checkpointing less frequently" in message
        metadata = message.startswith(("Metadata file does not exist", "Failed to json parse Metadata file"))
        return not (advice or failed_write or after_failure or metadata)


ORBAX_NOISE = _OrbaxNoise()  # one object: adding it again is a no-op


def array_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"opt_state/0/mu/stem/conv/kernel": shape, ...} for every array in `tree`.

    Paths are spelled the same whether a level is a dict key, a named field (optax's states) or a list
    index, because orbax's metadata keeps named fields as dict keys. Leaves without a shape (orbax's
    entries for None) are not arrays and are left out.
    """
    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return {"/".join(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if getattr(leaf, "shape", None) is not None}


def describe_mismatch(saved: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    """What differs between two `array_shapes`, in a few words; None if they hold the same arrays."""
    only_saved, only_expected = sorted(saved.keys() - expected.keys()), sorted(expected.keys() - saved.keys())
    reshaped = sorted(k for k in saved.keys() & expected.keys() if saved[k] != expected[k])
    arrays = lambda keys: f"{len(keys)} array{'s' if len(keys) > 1 else ''}"
    if only_expected:
        return f"{arrays(only_expected)} this run needs missing there, e.g. {only_expected[0]}"
    if only_saved:
        return f"{arrays(only_saved)} there that this run does not have, e.g. {only_saved[0]}"
    if reshaped:
        k = reshaped[0]
        return f"{arrays(reshaped)} of another shape, e.g. {k} {saved[k]} there vs {expected[k]} now"
    return None


def _restore_args(state) -> ocp.args.PyTreeRestore:
    """Read back into `state`'s structure, shapes, dtypes and shardings (arrays or ShapeDtypeStructs)."""
    tree = state_to_tree(state)
    return ocp.args.PyTreeRestore(item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))


class Checkpoints:
    """`workdir/checkpoints/<step>/`, one per save; keeps the last `keep` and the best by eval accuracy."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 3, *, read_only: bool = False):
        """read_only: for evaluate and predict, which may run while a training writes to the same folder.

        A reader creates nothing (no `checkpoints/` where there is none), deletes nothing, and moves
        nothing aside: it skips what it cannot read, with a warning, and leaves the folder to the trainer.
        """
        self.directory = pathlib.Path(workdir).expanduser().absolute() / "checkpoints"
        self.read_only = read_only
        if self.directory.exists() and not self.directory.is_dir():  # orbax would fail in a background thread
            raise UserError(f"{self.directory} is a file, not a directory of checkpoints; "
                            "move it away, or choose another --workdir.")
        if read_only:
            # lightweight_initialize: orbax reads no checkpoint's metadata or metrics when it starts (one
            # damaged, or deleted by the trainer as it was listed, would stop it); `best_step` reads them.
            options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False,
                                                   lightweight_initialize=True)
        else:
            policy = policies.AnyPreservationPolicy([
                policies.LatestN(keep),
                policies.BestN(get_metric_fn=_test_accuracy, n=1, keep_checkpoints_without_metrics=False),
            ])
            # cleanup_tmp_directories: a write killed midway leaves a temporary directory, never a step.
            # best_fn: without it orbax neither writes the metrics to disk nor ranks by them, so a new
            # process (a resumed run) would not know which checkpoint is the best, and would delete it.
            options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                                   cleanup_tmp_directories=True, enable_async_checkpointing=True,
                                                   best_fn=_test_accuracy, best_mode="max")
            self._set_aside_unreadable_metrics()
        ORBAX_NOISE.write_failed = False  # a new run (in the same process): its errors are news again
        for logger in ("absl", "asyncio"):  # orbax logs through absl; its failed tasks through asyncio
            logging.getLogger(logger).addFilter(ORBAX_NOISE)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_arrays_handler())
        except OSError as e:
            raise UserError(f"cannot write checkpoints to {self.directory} ({e.strerror or e}); "
                            "choose a writable --workdir.") from None

    def steps(self) -> list[int]:
        """The finished checkpoints' steps. A reader looks afresh each time: a training may be changing them."""
        if self.read_only:
            return sorted(ocp.utils.checkpoint_steps(self.directory)) if self.directory.is_dir() else []
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, metrics: dict[str, float] | None = None) -> None:
        """Start writing (asynchronously: training goes on while the files are written).

        A write that fails in the background (a full disk) is reported here, by the next save, or by `wait`.
        """
        try:
            self.manager.save(step, args=ocp.args.PyTreeSave(state_to_tree(state)), metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - _lost_write re-raises what is not a failed write
            self._lost_write(e)

    def wait(self) -> None:
        """Block until the last save is complete on disk."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - as in save
            self._lost_write(e)

    def _lost_write(self, error: Exception):
        """One sentence for a checkpoint the disk refused; any other error goes on as it was.

        TimeoutError is an OSError too, but orbax raises it when the processes of a run stop meeting at
        its barriers (a peer died): that is not the disk's doing, and the watchdog says what it is.
        """
        if isinstance(error, OSError) and not isinstance(error, TimeoutError):
            code, reason = error.errno, error.strerror or str(error)
        elif (code := write_error_code(error)) is not None:
            reason = os.strerror(code)
        else:
            raise error
        ORBAX_NOISE.write_failed = True
        # The failed write's coroutines that never ran are collected at exit, each with a warning.
        warnings.filterwarnings("ignore", message=r"coroutine 'async_serialize_from_host\b.*' was never awaited",
                                category=RuntimeWarning)
        kept = self.steps()  # finished checkpoints only: a failed write leaves a temporary directory
        last = f"the last good checkpoint (step {kept[-1]}) is intact" if kept else "no earlier checkpoint exists"
        todo = "free some space and" if code in (errno.ENOSPC, errno.EDQUOT) else "once it can be written to again,"
        raise UserError(f"could not write a checkpoint to {self.directory} ({reason}); "
                        f"{last}: {todo} rerun the same command to resume.") from None

    def restore_latest(self, state) -> tuple[Any, int | None]:
        """(state, step) from the newest readable checkpoint, or (state, None) if there is none.

        `state` is a freshly initialised TrainState: it gives the structure, shapes and shardings.
        A writer moves an unreadable checkpoint aside; a reader only skips it.
        """
        target = _restore_args(state)
        _quiet_failed_reads()
        tried = set()
        while untried := [step for step in self.steps() if step not in tried]:
            step = untried[-1]
            tried.add(step)
            self._check_holds_arrays_of(step, state)
            try:
                tree, why = self.manager.restore(step, args=target), None
            except Exception as e:  # noqa: BLE001 - any failure to read means "try the previous one"
                tree, why = None, type(e).__name__
            if self.read_only:
                if tree is not None:
                    return state.replace(**tree), step
                if (self.directory / str(step)).exists():  # else the trainer deleted it as we read: not news
                    print(f"warning: checkpoint {step} is unreadable ({why}); falling back to the previous one "
                          "(left where it is: evaluate and predict only read).", file=sys.stderr)
                continue
            # Every process of a run resumes from the same step, or they would train apart.
            if parallel.largest_across_processes(why is not None):
                self._move_aside(step, why or "unreadable by another process")
                parallel.barrier(f"checkpoint {step} moved aside")
                self.manager.reload()
                continue
            return state.replace(**tree), step
        return state, None

    def _move_aside(self, step: int | str, why: str) -> None:
        """Moves an unreadable checkpoint to `checkpoints-unreadable/`, with a warning.

        Moved, not deleted (someone may want to look at it), and out of the way of the new checkpoint
        this run will write at the same step. The processes of a multi-host run share the folder:
        process 0 moves it, and the caller makes the others wait until it has (`parallel.barrier`).
        """
        if jax.process_index() != 0:
            return
        aside = self.directory.parent / "checkpoints-unreadable" / str(step)
        aside.parent.mkdir(exist_ok=True)
        copies = 0
        while aside.exists():  # the same step was moved aside before: keep both
            copies += 1
            aside = aside.with_name(f"{step}.{copies}")
        (self.directory / str(step)).rename(aside)
        print(f"warning: checkpoint {step} is unreadable ({why}: moved to {aside}); "
              "falling back to the previous one.", file=sys.stderr)

    def _set_aside_unreadable_metrics(self) -> None:
        """Orbax reads every checkpoint's metrics when it starts, and one damaged file stops it: move those aside."""
        for path in sorted(self.directory.glob("*/metrics/metrics")) if jax.process_index() == 0 else []:
            if path.parent.parent.name.isdigit():  # a step, not a temporary directory of a killed write
                try:
                    json.loads(path.read_text())
                except (OSError, ValueError):  # ValueError: not JSON, or not even text
                    self._move_aside(path.parent.parent.name, "its metrics")
        parallel.barrier("unreadable metrics moved aside")  # the others read the folder only after

    def _check_holds_arrays_of(self, step: int, state) -> None:
        """Stop with one sentence if checkpoint `step` is readable but holds other arrays than `state`.

        Such a checkpoint is not damaged, so falling back would move every good checkpoint of the
        workdir aside and train from scratch. If even its metadata is unreadable, it is damaged: the
        restore that follows finds out, and falls back.
        """
        try:
            saved = array_shapes(self.manager.item_metadata(step))
        except Exception:  # noqa: BLE001 - unreadable metadata: leave the verdict to the restore
            return
        mismatch = describe_mismatch(saved, array_shapes(state_to_tree(state)))
        if mismatch:
            raise UserError(f"checkpoint {step} in {self.directory} was written by another model, optimizer or "
                            f"version of minimobile ({mismatch}); rerun with the settings in its config.json, "
                            "or choose another --workdir.")

    def best_step(self) -> int | None:
        """The step with the highest eval accuracy among the checkpoints saved with one, or None.

        Read from each checkpoint's metrics file, afresh (evaluate may run beside a training); ties go to
        the newest. A checkpoint whose metrics are unreadable is left out, with a warning.
        """
        accuracy = {}
        for step in self.steps():
            metrics = self.directory / str(step) / "metrics" / "metrics"  # where orbax writes them
            try:
                accuracy[step] = float(_test_accuracy(json.loads(metrics.read_text())))
            except FileNotFoundError:  # saved without an evaluation (a signal), or deleted by the trainer
                continue
            except (OSError, ValueError, TypeError, KeyError):  # not JSON, or not ours
                print(f"warning: checkpoint {step}'s metrics are unreadable; it cannot be 'best' "
                      "(left where it is: evaluate and predict only read).", file=sys.stderr)
        return max(accuracy, key=lambda step: (accuracy[step], step)) if accuracy else None

    def restore(self, step: int, state):
        """The state at checkpoint `step`, asked for by name; one sentence if it is unreadable (left where it is)."""
        _quiet_failed_reads()
        self._check_holds_arrays_of(step, state)
        try:
            tree = self.manager.restore(step, args=_restore_args(state))
        except Exception as e:  # noqa: BLE001 - any failure to read: damaged, or half-copied from elsewhere
            others = ", ".join(str(s) for s in self.steps() if s != step) or "none"
            raise UserError(f"checkpoint {step} in {self.directory} is unreadable ({type(e).__name__}); choose "
                            f"another (other steps: {others}), or 'latest', the newest readable one.") from None
        return state.replace(**tree)

    def close(self) -> None:
        self.manager.close()
