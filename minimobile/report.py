"""What a run leaves for people to read: metrics.jsonl, TensorBoard event files, and PNG figures.

`metrics.jsonl` holds one JSON object per line: every log step of training
(`{"step", "epoch", "train_loss", "train_accuracy", "learning_rate", "images_per_sec"}`) and every
evaluation (`{"step", "epoch", "eval_loss", "eval_accuracy", "eval_accuracy_top5"}`). The train
figures, the learning rate among them, are means over the steps since the previous log line, not
values at `step`; `images_per_sec` leaves out the time spent compiling, evaluating and checkpointing
in that stretch. It is the boring, greppable record; TensorBoard shows the same numbers as curves.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from minimobile.errors import UserError


class MetricsWriter:
    """Appends to workdir/metrics.jsonl and writes TensorBoard events to workdir/tensorboard."""

    def __init__(self, workdir: str | pathlib.Path, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.tensorboard = None
        if not enabled:
            return
        # A run killed after its last checkpoint logged steps it will now redo: drop those lines,
        # so the file reads as one uninterrupted run.
        if self.path.exists():
            kept = [line for line in _lines(self.path) if _parse(line)["step"] <= resume_step]
            write_whole(self.path, "".join(line + "\n" for line in kept))  # a failed write cannot cost them
        try:
            from tensorboardX import SummaryWriter

            # tensorboardX names its file by the second and the host only: a resume within the same
            # second (a test, a script) would overwrite the first run's file. The suffix keeps both.
            self.tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), purge_step=resume_step + 1,
                                             filename_suffix=f".{os.getpid()}.{resume_step}")
        except ImportError:  # TensorBoard is a nicety; the JSON lines are the record
            pass

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise cannot_write(self.path, e) from None
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    # train/... and eval/... are TensorBoard's sections; learning_rate is no "learning" section.
                    tag = key.replace("_", "/", 1) if key.startswith(("train_", "eval_")) else key
                    self.tensorboard.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()
            except OSError:  # events are a nicety: never let them hide why a run stopped
                _abandon(self.tensorboard)


def _abandon(summary_writer) -> None:
    """Give up a tensorboardX writer whose last flush failed (a full disk), without a word.

    tensorboardX then leaves its writer thread running and its event file open, and tries the same
    flush again at exit: two tracebacks after our one-sentence error. These are its private parts,
    so anything unexpected is ignored (and only brings the tracebacks back).
    """
    try:
        for file_writer in summary_writer.all_writers.values():
            events = file_writer.event_writer
            worker = events._worker                  # its thread: told to stop, waited for briefly, never blocking
            if worker.is_alive():
                try:
                    worker._queue.put(worker._shutdown_signal, timeout=1)
                except Exception:  # noqa: BLE001 - a full queue: the (daemon) thread ends with the process
                    pass
                worker.join(timeout=1)
            events._closed = True                    # its exit hook now does nothing
            try:
                events._ev_writer._py_recordio_writer._writer.close()
            except OSError:                          # the same full disk: the file is closed all the same
                pass
    except Exception:  # noqa: BLE001
        pass


def write_whole(path: pathlib.Path, text: str) -> None:
    """Into a new file, renamed over the old one: a full disk or a kill mid-write leaves the old file whole."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text)
        partial.replace(path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise cannot_write(path, e) from None


def cannot_write(path: pathlib.Path, error: OSError) -> UserError:
    """A full disk, most likely: the checkpoints are what a resume needs, and they are on disk.

    config.json is written before the first checkpoint, hence "if there is one"."""
    return UserError(f"cannot write {path} ({error.strerror or error}); free some space and rerun the "
                     "same command to resume from the last checkpoint, if there is one.")


def _parse(line: str) -> dict:
    """One record; a line cut short by a kill, or damaged otherwise (not a record with a step), gets step inf."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
        return record
    return {"step": float("inf")}


def _lines(path: pathlib.Path) -> list[str]:
    """The file's lines; bytes that are not UTF-8 (a damaged disk block) spoil only their own line."""
    return path.read_text(errors="replace").splitlines()


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
    return [r for r in map(_parse, _lines(pathlib.Path(path))) if r["step"] != float("inf")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files, not windows: works on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict[str, Any]], path: str | pathlib.Path, title: str = "",
                train_loss_floor: float | None = None, augmented: bool = True) -> pathlib.Path:
    """Loss and accuracy against step, train and test, in one PNG.

    train_loss_floor: the lowest training loss label smoothing allows (`steps.lowest_train_loss`),
    drawn as a dotted line, so that nobody reads the gap between it and the test loss as a verdict.
    augmented: whether the train figures are of augmented images (the legend says so).
    """
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for prefix, style in (("train", "-"), ("eval", "o-")):
        rows = [r for r in records if f"{prefix}_loss" in r]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        label = f"train ({'augmented, ' * augmented}running)" if prefix == "train" else "test"
        ax_loss.plot(steps, [r[f"{prefix}_loss"] for r in rows], style, label=label, markersize=3)
        ax_acc.plot(steps, [100 * r[f"{prefix}_accuracy"] for r in rows], style, label=label, markersize=3)
    if train_loss_floor:
        ax_loss.axhline(train_loss_floor, color="C0", linestyle=":", linewidth=1,
                        label=f"lowest train loss ({train_loss_floor:.2f}: smoothed targets)")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return pathlib.Path(path)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray, class_names: list[str]) -> dict[str, float | None]:
    """Each class's top-1 accuracy: right answers over its test images (its row of the confusion matrix).

    A class with no test image has no accuracy (None, null in JSON), rather than a 0 % that would put it
    among the hardest classes (a small or custom test split, a coarse label that is never used).
    """
    return {name: float(matrix[k, k] / matrix[k].sum()) if matrix[k].sum() else None
            for k, name in enumerate(class_names)}


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: str | pathlib.Path) -> pathlib.Path:
    """The confusion matrix, rows normalised to 1, as a PNG (class names shown when there are few)."""
    plt = _pyplot()
    k = len(class_names)
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6 + k / 12, 5.5 + k / 12))
    image = ax.imshow(rates, cmap="viridis", vmin=0, vmax=1)
    if k <= 20:
        ax.set_xticks(range(k), class_names, rotation=90)
        ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title="confusion matrix (each row sums to 1)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return pathlib.Path(path)
