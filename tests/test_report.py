"""What a run leaves to read: the metrics log survives a kill and a resume; the figures are what they say."""

import json
import struct

import matplotlib.figure
import numpy as np
import pytest

from minimobile import report


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_line_cut_short_by_a_kill_or_damaged_is_skipped_and_a_resume_drops_the_steps_it_will_redo(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(b'{"step": 10, "train_loss": 4.5}\n42\n{"step": 20, "eval_accuracy": 0.1}\n'
                    b'\xff\xfe{"step"\n{"step": "x"}\n\n'                         # damaged: JSON, but no record
                    b'{"step": 30, "train_loss": 4.1}\n{"step": 40, "train_lo')        # killed mid-write
    assert [r["step"] for r in report.read_metrics(log)] == [10, 20, 30]
    # The run resumes from its checkpoint at step 20: steps after it will be logged again, so they go,
    # and the cut line with them; what follows is appended as if the run had never stopped.
    writer = report.MetricsWriter(tmp_path, resume_step=20)
    assert lines(log) == [{"step": 10, "train_loss": 4.5}, {"step": 20, "eval_accuracy": 0.1}]
    writer.write({"step": 30, "epoch": 1.5, "train_loss": 4.0})
    writer.close()
    assert [r["step"] for r in report.read_metrics(log)] == [10, 20, 30]
    assert not (tmp_path / "metrics.jsonl.partial").exists() and any((tmp_path / "tensorboard").iterdir())


def test_the_confusion_matrix_counts_true_classes_in_rows_and_predictions_in_columns():
    labels, predictions = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 0, 2, 2])
    by_hand = np.array([[1, 1, 0],    # two 0s: one right, one taken for a 1
                        [0, 1, 0],
                        [1, 0, 2]])
    np.testing.assert_array_equal(report.confusion_matrix(labels, predictions, 3), by_hand)


def test_a_class_accuracy_is_its_right_answers_over_its_own_test_images_and_none_without_any():
    matrix = np.array([[2, 1, 0],     # class a: 3 test images, 2 right
                       [3, 0, 0],     # class b: 3 test images, none right (3 taken for an a)
                       [0, 0, 0]])    # class c: no test image, so no accuracy (not a 0 % among the hardest)
    assert report.per_class_accuracy(matrix, ["a", "b", "c"]) == {"a": 2 / 3, "b": 0.0, "c": None}


def test_the_figures_are_png_files(tmp_path):
    records = [{"step": s, "epoch": s / 10, "train_loss": 4 - s / 100, "train_accuracy": s / 200}
               for s in (10, 20, 30)] + [{"step": 30, "epoch": 3.0, "eval_loss": 3.9, "eval_accuracy": 0.1,
                                          "eval_accuracy_top5": 0.3}]
    curves = report.plot_curves(records, tmp_path / "curves.png", title="a run", train_loss_floor=0.78)
    matrix = report.plot_confusion(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "confusion.png")
    for path in (curves, matrix):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


@pytest.fixture
def saved_figures(monkeypatch):
    """Every figure `report` saves, kept to look at (the PNG is still written)."""
    figures, save = [], matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figures


def test_the_confusion_figure_shows_each_true_class_as_a_row_of_rates(tmp_path, saved_figures):
    # By hand: class a has 3 images (2 right, 1 taken for b), class b has 1 (taken for a).
    report.plot_confusion(np.array([[2, 1], [1, 0]]), ["a", "b"], tmp_path / "c.png")
    ax = saved_figures[0].axes[0]
    np.testing.assert_allclose(ax.get_images()[0].get_array(), [[2 / 3, 1 / 3], [1.0, 0.0]])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")


def test_the_curves_show_loss_and_accuracy_in_percent_against_the_step(tmp_path, saved_figures):
    records = [{"step": 10, "train_loss": 4.0, "train_accuracy": 0.05},
               {"step": 20, "eval_loss": 3.9, "eval_accuracy": 0.1, "eval_accuracy_top5": 0.3}]
    report.plot_curves(records, tmp_path / "curves.png")
    ax_loss, ax_acc = saved_figures[0].axes
    points = lambda ax: {line.get_label(): line.get_xydata().tolist() for line in ax.lines}
    assert points(ax_loss) == {"train (augmented, running)": [[10, 4.0]], "test": [[20, 3.9]]}
    assert points(ax_acc) == {"train (augmented, running)": [[10, 5.0]], "test": [[20, 10.0]]}
    # A run without augmentation (the seed-tf recipes) does not say it had any.
    report.plot_curves(records, tmp_path / "curves.png", augmented=False)
    assert {line.get_label() for line in saved_figures[1].axes[0].lines} == {"train (running)", "test"}


def tensorboard_events(directory) -> list:
    """Every Event in the event files of `directory`, read by hand: TFRecords of Event protos
    (8 bytes length, 4 bytes its CRC, the record, 4 bytes its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.iterdir()):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            events.append(Event.FromString(data[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return events


def test_a_resume_tells_tensorboard_to_drop_only_the_steps_after_the_checkpoint(tmp_path):
    writer = report.MetricsWriter(tmp_path)
    for step in (10, 20, 30):
        writer.write({"step": step, "epoch": step / 10, "train_loss": 1.0, "learning_rate": 0.1})
    writer.close()
    writer = report.MetricsWriter(tmp_path, resume_step=20)  # resumed from the checkpoint at step 20
    writer.write({"step": 30, "epoch": 3.0, "train_loss": 0.5})
    writer.close()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # one file per run, though in the same second
    events = tensorboard_events(tmp_path / "tensorboard")
    # Each run tells TensorBoard where it starts (its file's first step): from the resumed run's
    # marker on, TensorBoard drops what was logged before at steps >= 21 (the first 30), and keeps 20.
    assert [e.step for e in events if e.HasField("session_log")] == [1, 21]
    # train_* and eval_* in their sections; step and epoch are axes.
    assert {v.tag for e in events for v in e.summary.value} == {"train/loss", "learning_rate"}
