"""Checkpoints: 'best' means the best evaluation, and the wrong run's checkpoints are refused, never moved.

A small state of the trainer's shape (step, params, BatchNorm statistics, an optax state) keeps these
checks to a second: what is tested is the bookkeeping around orbax, not the network.
"""

import re
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minimobile.checkpoint import Checkpoints
from minimobile.errors import UserError


@flax.struct.dataclass
class State:
    """The four things a TrainState saves (checkpoint.state_to_tree), nothing else."""
    step: Any
    params: Any
    batch_stats: Any
    opt_state: Any


def make_state(step: int, value: float, optimizer=optax.sgd(0.1, momentum=0.9)) -> State:
    params = {"conv": {"kernel": jnp.full((3, 3, 1, 4), value)}, "bn": {"scale": jnp.ones(4)}}
    return State(step=jnp.array(step, jnp.int32), params=params,
                 batch_stats={"bn": {"mean": jnp.zeros(4)}}, opt_state=optimizer.init(params))


def save_all(directory, accuracies: dict[int, float | None], keep: int = 3) -> None:
    """One checkpoint per step, its params filled with the step number, saved with its eval accuracy (if any)."""
    checkpoints = Checkpoints(directory, keep=keep)
    for step, accuracy in accuracies.items():
        metrics = None if accuracy is None else {"eval_accuracy": accuracy}
        checkpoints.save(step, make_state(step, float(step)), metrics)
    checkpoints.wait()
    checkpoints.close()


def test_best_is_the_checkpoint_with_the_highest_eval_accuracy_and_outlives_later_runs(tmp_path):
    save_all(tmp_path, {1: 0.50, 2: 0.90, 3: 0.20})
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.best_step() == 2                    # not the latest, 3
    restored = checkpoints.restore(2, make_state(0, 0.0))
    assert int(restored.step) == 2 and np.all(np.asarray(restored.params["conv"]["kernel"]) == 2.0)
    checkpoints.close()
    # A resumed run (a new process, so only what is on disk counts) keeps the last 3 and the best.
    save_all(tmp_path, {4: 0.30, 5: 0.40, 6: 0.10})
    assert Checkpoints(tmp_path).steps() == [2, 4, 5, 6] and Checkpoints(tmp_path).best_step() == 2


def test_a_checkpoint_saved_without_an_evaluation_goes_once_it_is_not_among_the_newest(tmp_path):
    # A SIGTERM save has no eval accuracy: it cannot be the best, so only "the last `keep`" keeps it.
    save_all(tmp_path, {1: None, 2: 0.5, 3: 0.4}, keep=2)
    assert Checkpoints(tmp_path).steps() == [2, 3]


def test_a_checkpoint_of_another_optimizer_is_refused_in_one_sentence_and_nothing_is_moved(tmp_path):
    # SGD's momentum and Adam's two moments are different arrays: the checkpoint is fine, the run is wrong.
    save_all(tmp_path, {1: 0.5, 2: 0.6})
    checkpoints = Checkpoints(tmp_path)
    with pytest.raises(UserError, match=r"checkpoint 2 .* was written by another model, optimizer or version .*"
                                        r"arrays this run needs missing there, e.g. opt_state/0/"):
        checkpoints.restore_latest(make_state(0, 0.0, optimizer=optax.adam(1e-3)))
    assert checkpoints.steps() == [1, 2] and not (tmp_path / "checkpoints-unreadable").exists()
    # Another shape (a wider model) is named with both shapes.
    wider = make_state(0, 0.0).replace(params={"conv": {"kernel": jnp.zeros((3, 3, 1, 8))}, "bn": {"scale": jnp.ones(4)}})
    wider = wider.replace(opt_state=optax.sgd(0.1, momentum=0.9).init(wider.params))
    with pytest.raises(UserError, match=r"e.g. opt_state/0/trace/conv/kernel \(3, 3, 1, 4\) there vs \(3, 3, 1, 8\) now"):
        checkpoints.restore_latest(wider)
    # The right state still restores the latest, untouched.
    restored, step = checkpoints.restore_latest(make_state(0, 0.0))
    assert step == 2 and np.all(np.asarray(restored.params["conv"]["kernel"]) == 2.0)
    # And the other way round: the momentum it holds has no place in a run of plain SGD.
    plain_sgd = make_state(0, 0.0, optimizer=optax.sgd(0.1))
    with pytest.raises(UserError, match=r"checkpoint 2 .* \(2 arrays there that this run does not have, e.g. "
                                        r"opt_state/0/trace/"):
        checkpoints.restore_latest(plain_sgd)
    assert checkpoints.steps() == [1, 2] and not (tmp_path / "checkpoints-unreadable").exists()


# After a failed read, orbax's I/O threads report to Python's hook for uncatchable errors that its
# event loop is closed: hundreds of tracebacks. Made an error here, so the test fails if any gets through.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damaged", ["every file", "the array data only"])
def test_a_damaged_checkpoint_is_moved_aside_in_one_line_beside_one_moved_before(tmp_path, capfd, damaged):
    # Every file: even the metrics, which orbax reads when it starts. The array data only: the
    # checkpoint still lists the right arrays, and only reading them fails.
    save_all(tmp_path, {1: 0.5, 2: 0.6})
    (tmp_path / "checkpoints-unreadable" / "2").mkdir(parents=True)  # an earlier run's damaged step 2
    for f in (tmp_path / "checkpoints" / "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and (damaged == "every file" or f.parent.name == "d"):
            f.write_bytes(b"\0" * 7)
    checkpoints = Checkpoints(tmp_path)
    restored, step = checkpoints.restore_latest(make_state(0, 0.0))
    assert checkpoints.steps() == [1] and checkpoints.best_step() == 1  # the moved checkpoint is forgotten
    checkpoints.close()
    assert step == 1 and np.all(np.asarray(restored.params["conv"]["kernel"]) == 1.0)
    assert sorted(p.name for p in (tmp_path / "checkpoints-unreadable").iterdir()) == ["2", "2.1"]
    err = capfd.readouterr().err
    assert err.startswith("warning: checkpoint 2 is unreadable") and len(err.splitlines()) == 1, err


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_checkpoint_asked_for_by_name_is_one_sentence_and_stays_where_it_is(tmp_path, capfd):
    # `evaluate --checkpoint 2` (or `best`, when 2 is the best) asks for that one: falling back to
    # another would answer a different question, so it says so and names the others.
    from minimobile.evaluate import restore

    save_all(tmp_path, {1: 0.5, 2: 0.6})
    for f in (tmp_path / "checkpoints" / "2").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * 7)
    checkpoints = Checkpoints(tmp_path)
    for which in ("2", "best"):
        with pytest.raises(UserError, match=r"^checkpoint 2 in .* is unreadable \(\w+\); choose another "
                                            r"\(other steps: 1\), or 'latest', the newest readable one\.$"):
            restore(checkpoints, make_state(0, 0.0), which)
    assert checkpoints.steps() == [1, 2] and not (tmp_path / "checkpoints-unreadable").exists()
    assert capfd.readouterr().err == ""
    _, step = restore(checkpoints, make_state(0, 0.0), "latest")  # and 'latest' falls back past it
    checkpoints.close()
    assert step == 1


def test_a_checkpoint_or_run_that_is_not_there_is_one_sentence_naming_the_choices(tmp_path):
    from minimobile.evaluate import load_run_config, restore

    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(4, make_state(4, 4.0))                      # saved without an evaluation (a SIGTERM save)
    checkpoints.wait()
    for which, message in [("bset", r"no checkpoint 'bset' .* available steps: 4 \(or 'latest', 'best'\)"),
                           ("7", r"no checkpoint '7' .* available steps: 4"),
                           ("\u00b2", r"no checkpoint '\u00b2' .* available steps: 4"),  # a digit to str.isdigit
                           ("best", r"no checkpoint .* has an evaluation yet, so none is best; use --checkpoint latest")]:
        with pytest.raises(UserError, match=message):
            restore(checkpoints, make_state(0, 0.0), which)
    checkpoints.close()
    for config_json, dataset_json in [("{ not json", "{}"), ("null", "{}"), ("{}", "{}")]:  # "{}": no facts
        (tmp_path / "config.json").write_text(config_json)
        (tmp_path / "dataset.json").write_text(dataset_json)
        with pytest.raises(UserError, match="cannot read the run in .*restore them, or point --workdir at another run"):
            load_run_config(tmp_path)
    with pytest.raises(UserError, match="cannot read the run in .*restore them, or point --workdir at another run"):
        load_run_config(tmp_path / "config.json")                # a file given as the workdir
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "checkpoints").write_text("")     # orbax would fail in a thread, with a traceback
    with pytest.raises(UserError, match=r"checkpoints is a file, not a directory of checkpoints; move it away"):
        Checkpoints(tmp_path / "elsewhere")


def test_a_reader_creates_nothing_and_leaves_a_write_in_progress_alone(tmp_path):
    # evaluate and predict may run while the trainer writes a checkpoint: a write in progress is a
    # temporary directory, which a writer's cleanup deletes (a killed write) and a reader must not.
    from minimobile.evaluate import restore

    save_all(tmp_path, {1: 0.5})
    in_progress = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1764561234"
    in_progress.mkdir()
    (in_progress / "part").write_text("being written")
    reader = Checkpoints(tmp_path, read_only=True)
    reader.wait()                                             # orbax's cleanup runs in a background thread
    assert reader.steps() == [1] and (in_progress / "part").exists()
    reader.close()
    empty = tmp_path / "not-trained-yet"
    empty.mkdir()
    reader = Checkpoints(empty, read_only=True)
    with pytest.raises(UserError, match=r"^no checkpoint in .*not-trained-yet/checkpoints; train first, "
                                        r"or check --workdir\.$"):
        restore(reader, make_state(0, 0.0), "latest")
    reader.close()
    assert list(empty.iterdir()) == []


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_reader_skips_what_it_cannot_read_or_what_vanished_and_moves_nothing(tmp_path, capfd):
    # The workdir may be read-only, or the trainer's: evaluate and predict fall back, and leave it as it is.
    import shutil

    save_all(tmp_path, {1: 0.5, 2: 0.9, 3: 0.6})
    for f in (tmp_path / "checkpoints" / "3").rglob("*"):         # every file, the metrics too
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)
    reader = Checkpoints(tmp_path, read_only=True)
    assert reader.best_step() == 2 and reader.steps() == [1, 2, 3]
    assert capfd.readouterr().err == ("warning: checkpoint 3's metrics are unreadable; it cannot be 'best' "
                                      "(left where it is: evaluate and predict only read).\n")

    def trainer_deletes_2_as_it_is_read(step, **kwargs):
        if step == 2:
            shutil.rmtree(tmp_path / "checkpoints" / "2")
        return read(step, **kwargs)

    read, reader.manager.restore = reader.manager.restore, trainer_deletes_2_as_it_is_read
    restored, step = reader.restore_latest(make_state(0, 0.0))
    assert step == 1 and np.all(np.asarray(restored.params["conv"]["kernel"]) == 1.0)
    assert re.fullmatch(r"warning: checkpoint 3 is unreadable \(\w+\); falling back to the previous one "
                        r"\(left where it is: evaluate and predict only read\)\.\n",  # none for 2, which vanished
                        capfd.readouterr().err)
    assert reader.steps() == [1, 3]                                  # a reader lists afresh each time
    reader.close()
    assert (tmp_path / "checkpoints" / "3").is_dir() and not (tmp_path / "checkpoints-unreadable").exists()


def test_orbax_noise_is_dropped_and_any_other_error_reaches_the_user(tmp_path, caplog):
    # What is noise, and why, is in checkpoint._OrbaxNoise's docstring.
    import logging

    Checkpoints(tmp_path).close()  # a run's Checkpoints puts the filter on orbax's loggers
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING):
        absl.warning("Waiting for previous save to complete took %f seconds. If this number is high, consider "
                     "checkpointing less frequently.", 1.2)
        absl.warning("Metrics: None; the run did not provide metrics for step 8")
        absl.warning("Metadata file does not exist: /w/checkpoints/16/_CHECKPOINT_METADATA")  # deleted as listed
        absl.error("Failed to json parse Metadata file: /w/checkpoints/16/_CHECKPOINT_METADATA, file content: ")
        absl.error("_SignalingThread.run() raised an exception: RESOURCE_EXHAUSTED: Failed to write 42644 bytes "
                   "to file 9: No space left on device [os_error_code='28']")
        absl.error("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
