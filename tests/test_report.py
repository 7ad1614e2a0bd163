"""What a run leaves to read: the metrics log survives a kill and a resume; the figures are what they say."""

import json

import numpy as np

from minimobile import report


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_line_cut_short_by_a_kill_is_skipped_and_a_resume_drops_the_steps_it_will_redo(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 10, "train_loss": 4.5}\n{"step": 20, "eval_accuracy": 0.1}\n'
                   '{"step": 30, "train_loss": 4.1}\n{"step": 40, "train_lo')        # killed mid-write
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


def test_the_figures_are_png_files(tmp_path):
    records = [{"step": s, "epoch": s / 10, "train_loss": 4 - s / 100, "train_accuracy": s / 200}
               for s in (10, 20, 30)] + [{"step": 30, "epoch": 3.0, "eval_loss": 3.9, "eval_accuracy": 0.1,
                                          "eval_accuracy_top5": 0.3}]
    curves = report.plot_curves(records, tmp_path / "curves.png", title="a run", train_loss_floor=0.78)
    matrix = report.plot_confusion(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "confusion.png")
    for path in (curves, matrix):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
