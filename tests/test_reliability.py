"""Damage done on purpose: killed, interrupted or fed bad input, a run loses nothing and says what happened."""

import contextlib
import errno
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from minimobile import data as data_lib
from minimobile import train
from minimobile.checkpoint import Checkpoints
from minimobile.errors import UserError
from test_train import TINY, sample_dataset

# A run of 48 steps (12 epochs of 4) on the prepared fake CIFAR-100 dir, checkpointed every epoch.
COMMAND = ["--dataset", "cifar100", "--epochs", "12", "--batch-size", "16", "--width", "0.0625", "--no-progress",
           "--depthwise-impl", "shift_add", "--parallel", "jit", "--learning-rate", "0.02"]


def start(workdir, data_dir, *extra):
    return subprocess.Popen([sys.executable, "-u", "-m", "minimobile.train", "--workdir", str(workdir),
                             "--data-dir", data_dir, *COMMAND, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc, text, timeout=240):
    """Read stdout until a line contains `text` (the run is then past compilation and stepping)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.stderr.read()}")
    raise AssertionError(f"no line with {text!r} within {timeout} s")


def wait_for_checkpoint(workdir, timeout=120):
    """Until a finished checkpoint is in workdir (orbax renames a complete one to its step number)."""
    deadline = time.time() + timeout
    while not any(p.name.isdigit() for p in (pathlib.Path(workdir) / "checkpoints").glob("*")):
        assert time.time() < deadline, f"no checkpoint in {workdir} within {timeout} s"
        time.sleep(0.05)


def final_params(workdir):
    """The parameters of the last checkpoint, read back by orbax without any template."""
    step = max(Checkpoints(workdir).steps())
    return step, ocp.StandardCheckpointer().restore(pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "default")["params"]


def eval_records(workdir):
    return [r for r in map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
            if "eval_loss" in r]


def test_sigkill_at_random_moments_then_the_same_command_ends_exactly_like_an_uninterrupted_run(
        tmp_path, cifar100_data_dir):
    reference = start(tmp_path / "reference", cifar100_data_dir)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    rng = random.Random(0)
    workdir = tmp_path / "killed"
    for attempt in range(2):
        proc = start(workdir, cifar100_data_dir)
        wait_for_line(proc, "epoch ")            # stepping now, checkpoints being written each epoch
        wait_for_line(proc, "epoch ")
        wait_for_checkpoint(workdir)             # one on disk (a loaded machine may still be writing the first)
        time.sleep(rng.uniform(0.0, 0.6))        # somewhere in a step, or in a checkpoint write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert all(p.name.isdigit() for p in (workdir / "checkpoints").iterdir() if "tmp" not in p.name)
    proc = start(workdir, cifar100_data_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed from epoch" in out and "train longer" not in out, out + err  # the same run, not a longer one

    assert eval_records(workdir) == eval_records(tmp_path / "reference")  # every evaluation, bit for bit
    step_a, params_a = final_params(tmp_path / "reference")
    step_b, params_b = final_params(workdir)
    assert step_a == step_b == 48
    jax.tree.map(np.testing.assert_array_equal, params_b, params_a)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])  # a scheduler's preemption; Ctrl-C
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_exits_within_seconds(tmp_path, cifar100_data_dir, signum):
    proc = start(tmp_path, cifar100_data_dir)
    wait_for_line(proc, "epoch ")
    proc.send_signal(signum)
    sent = time.time()
    out, err = proc.communicate(timeout=60)
    assert time.time() - sent < 20
    assert proc.returncode == 128 + signum
    assert f"{signal.Signals(signum).name} received: saved a checkpoint at step" in out and "Traceback" not in err
    saved = int(out.split("saved a checkpoint at step ")[1].split(";")[0].replace(",", ""))
    assert saved in Checkpoints(tmp_path).steps()
    assert (tmp_path / "curves.png").stat().st_size > 0  # the curves so far, as a finished run draws them


def test_a_reader_that_leaves_does_not_stop_training(tmp_path, cifar100_data_dir):
    # `python -m minimobile.train ... | head -1`: the pipe closes after one line; the run goes on to its end.
    proc = start(tmp_path, cifar100_data_dir)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert err.strip() == "stdout was closed; training goes on, its log is in metrics.jsonl."
    assert max(Checkpoints(tmp_path).steps()) == 48 and len(eval_records(tmp_path)) == 12


def test_a_signal_while_the_last_checkpoint_is_written_lets_it_finish(tmp_path, monkeypatch):
    # A scheduler's SIGTERM can come after the last step, while the last checkpoint is still being
    # written: the run, complete by then, finishes the write and ends normally.
    got_past = []  # what this test process would otherwise have died of
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got_past.append(signum))
    wait = Checkpoints.wait

    def a_signal_then_wait(self):
        os.kill(os.getpid(), signal.SIGTERM)
        wait(self)

    monkeypatch.setattr(Checkpoints, "wait", a_signal_then_wait)
    try:
        final = train.train_and_evaluate(TINY.replace(epochs=1), tmp_path, dataset=sample_dataset())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert got_past == [] and final["count"] == 24
    monkeypatch.undo()
    assert Checkpoints(tmp_path).steps() == [4]


def test_the_same_seed_gives_the_same_result_twice(tmp_path):
    ds = sample_dataset()
    config = TINY.replace(epochs=1, dropout_rate=0.2, augment="seed")
    assert train.train_and_evaluate(config, tmp_path / "a", dataset=ds) == \
        train.train_and_evaluate(config, tmp_path / "b", dataset=ds)


def run_main(argv, capsys):
    """train.main in-process; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("argv, message", [
    # No network here, and none for this test anywhere (it would download CIFAR-100 into TMP/tfds):
    (["--dataset", "cifar100", "--data-dir", "TMP/tfds", "--epochs", "1"],
     "error: cifar100 is not prepared in TMP/tfds and cannot be downloaded from here: pass --data-dir"),
    # argparse's own refusals, one line too (how it lists the choices varies with the Python version):
    (["--dataset", "imagenet"], "error: argument --dataset: invalid choice: 'imagenet' (choose from "),
    (["--epochs", "x"], "error: argument --epochs: invalid int value: 'x'; see"),
    (["--epochs", "0"], "error: --epochs must be positive"),
    (["--epochs", "-3"], "error: --epochs must be positive"),
    (["--width", "0"], "error: --width must be positive"),
    (["--batch-size", "12", "--parallel", "mesh"], "error: --batch-size 12 does not split evenly across 8 devices"),
    (["--width", "inf"], "error: --width must be positive and finite"),
    (["--width", "1e9"], "error: --width must be at most 16"),
    (["--dropout", "1"], "error: --dropout is the fraction of features dropped"),
    (["--weight-decay", "-1"], "error: --weight-decay must be 0 or positive"),
    (["--seed", str(2 ** 64)], "error: --seed must be between 0 and 2**32 - 1"),
    (["--log-every", "0"], "error: --log-every must be at least 1"),
    (["--learning-rate", "nan"], "error: --learning-rate must be positive, got nan"),
    (["--steps", "-1"], "error: --steps must be positive (or 0 to count in epochs)"),
    (["--steps-per-call", "-1"], "error: --steps-per-call must be positive (or 0 for auto)"),
    (["--keep-checkpoints", "0"], "error: --keep-checkpoints must be at least 1"),
    (["--peer-timeout", "-5"], "error: --peer-timeout must be at least 1 second, got -5."),
    (["--epochs", "3", "--steps", "30"], "error: give --epochs or --steps, not both"),
    (["--recipe", "seed-tf", "--width", "0.25"], "error: --width shapes MobileNet only, and the seed-tf recipes"),
    (["--recipe", "seed-tf", "--width", "1.0"], "error: --width shapes MobileNet only"),  # MobileNet's default, too
    (["--recipe", "seed-tf-ours", "--dropout", "0.5"], "error: --dropout shapes MobileNet only"),
    (["--coordinator", "127.0.0.1:1"], "error: a run of several processes needs all of --coordinator"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "error: a run of several"),
    # Every process checks the coordinator's form, not only process 0, which serves it:
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "1"],
     "error: --coordinator must be HOST:PORT"),
])
def test_bad_input_ends_in_one_sentence_and_a_nonzero_exit(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(data_lib, "_reachable", lambda url: False)
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    code, err = run_main(["--workdir", str(tmp_path / "w"), *argv], capsys)
    assert code != 0 and err.startswith(message.replace("TMP", str(tmp_path)))
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_an_unwritable_workdir_is_named(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run_main(["--workdir", str(blocker / "run")], capsys)
    assert code != 0 and err.startswith(f"error: cannot write to --workdir {blocker / 'run'}")
    # Also as one process of several, whose watchdog would log into it before the training could check it.
    multi_host = ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1"]
    code, err = run_main(["--workdir", str(blocker / "run"), *multi_host], capsys)
    assert code != 0 and err.startswith(f"error: cannot write to --workdir {blocker / 'run'}")
    code, err = run_main(["--workdir", str(blocker)], capsys)  # not "(File exists)", mkdir's reason
    assert code != 0 and err == f"error: --workdir {blocker} is a file, not a directory; choose a directory."
    (tmp_path / "link").symlink_to(tmp_path / "unmounted")  # a link to nowhere: not "(File exists)" either
    code, err = run_main(["--workdir", str(tmp_path / "link")], capsys)
    assert code != 0 and err == (f"error: --workdir {tmp_path / 'link'} is a link to {tmp_path / 'unmounted'}, which "
                                 "does not exist; create that directory (or mount its disk), or choose another --workdir.")
    assert not (tmp_path / "unmounted").exists()


def test_a_failed_write_of_config_json_leaves_the_old_one_whole(tmp_path, monkeypatch):
    # config.json records how the checkpoints beside it were made: a half-written one would stop
    # every later resume, evaluate and predict.
    work = train.Workdir(tmp_path)
    (tmp_path / "config.json").write_text("the old record\n")
    write_text = pathlib.Path.write_text

    def half_then_disk_full(path, text, *args, **kwargs):
        write_text(path, text[:len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_disk_full)
    with pytest.raises(UserError, match=r"^cannot write .*config.json \(No space left on device\); free some space "
                                        r"and rerun the same command to resume from the last checkpoint, if there is one\.$"):
        work.save_config(TINY, sample_dataset())
    assert (tmp_path / "config.json").read_text() == "the old record\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # and no partial file


def test_a_second_run_on_a_busy_workdir_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, cifar100_data_dir,
                                                                                    capsys):
    # Two runs writing checkpoints into one workdir would interleave them; the second is refused
    # (before it reads any data), naming the first. SIGKILL gives no chance to clean up, yet the
    # workdir is free again at once: the OS drops the lock with the process.
    first = start(tmp_path, cifar100_data_dir)
    wait_for_line(first, "epoch ")
    code, err = run_main(["--workdir", str(tmp_path), "--data-dir", cifar100_data_dir, *COMMAND], capsys)
    assert code != 0 and err == (f"error: --workdir {tmp_path} is in use by another training run (process "
                                 f"{first.pid}); wait for it to end, or choose another --workdir.")
    first.kill()
    first.wait(timeout=60)
    with train.Workdir(tmp_path).lock():
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_run_refused_before_it_writes_anything_leaves_no_trace(tmp_path, capsys, monkeypatch):
    # A mistyped --data-dir is refused in seconds; the user should not then find runs/a/b holding
    # nothing but our lock file. A workdir that already held something keeps all of it.
    no_data = ["--data-dir", str(tmp_path / "nowhere"), *COMMAND]
    code, err = run_main(["--workdir", str(tmp_path / "runs" / "a" / "b"), *no_data], capsys)
    assert code == 2 and "cifar100 is not prepared" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine\n")
    code, _ = run_main(["--workdir", str(tmp_path / "kept"), *no_data], capsys)
    assert code == 2 and sorted(p.name for p in (tmp_path / "kept").iterdir()) == [".lock", "notes.txt"]

    # Removing the lock file is safe only if a run that opened it just before never takes a lock on
    # the removed file for the workdir's: here the file goes between our open and our flock.
    import fcntl

    real_flock, removed = fcntl.flock, []

    def flock_after_a_removal(f, op):
        if not removed:
            os.unlink(tmp_path / "kept" / ".lock")
            removed.append(f.name)
        return real_flock(f, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_removal)
    with train.Workdir(tmp_path / "kept").lock():
        assert removed and (tmp_path / "kept" / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError, match="is in use by another training run"):  # flock: per open file
            with train.Workdir(tmp_path / "kept").lock():
                pass


def files_of_at_most(size: int, command: list[str]) -> list[str]:
    """`command`, run with every file it writes stopped from growing past `size` bytes.

    A write past it fails with EFBIG, as one on a full disk fails with ENOSPC (no root needed, unlike
    a small filesystem): the same failure, in the same place. A small Python sets the limit and ignores
    SIGXFSZ, which would otherwise kill the writer, then becomes the command: both pass on through exec.
    """
    limit = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
             "os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", limit, *command]


def test_a_checkpoint_the_disk_refuses_stops_the_run_in_one_sentence_and_keeps_the_last_good_one(
        tmp_path, cifar100_data_dir):
    # orbax writes in background threads, through TensorStore: a write that fails there surfaces at the
    # next save or at the end, as a ValueError, among tracebacks from every thread it touched.
    # (A resume from what such a run leaves, a temporary directory beside the good checkpoints, is what
    # the SIGKILL test above does many times.)
    def run(*flags, limit=lambda command: command):
        command = [sys.executable, "-m", "minimobile.train", "--workdir", str(tmp_path), "--data-dir",
                   cifar100_data_dir, *COMMAND, *flags]
        return subprocess.run(limit(command), capture_output=True, text=True, timeout=240)

    assert run("--epochs", "1").returncode == 0                           # step 4 is safely on disk
    # Its checkpoints' files are larger than 20 kB (no compilation cache: its files are too).
    refused = run("--epochs", "3", "--compilation-cache", "none", limit=lambda c: files_of_at_most(20_000, c))
    assert refused.returncode != 0 and refused.stderr.strip() == (
        f"error: could not write a checkpoint to {tmp_path / 'checkpoints'} (File too large); the last good "
        "checkpoint (step 4) is intact: once it can be written to again, rerun the same command to resume.")
    assert Checkpoints(tmp_path).steps() == [4]


def test_a_full_disk_is_named_and_any_other_failure_to_save_is_not_taken_for_one(tmp_path, monkeypatch):
    import types

    from minimobile import checkpoint

    monkeypatch.setattr(checkpoint.ORBAX_NOISE, "write_failed", False)  # set by a failure; put back after the test
    checkpoints = Checkpoints(tmp_path)
    state = types.SimpleNamespace(step=0, params={}, batch_stats={}, opt_state={})
    for failure, raised in [
        # What TensorStore reports for a full disk, and what Python's own writes raise.
        (ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x/d/1\": Failed writing: \"x/d/1\": Failed "
                    "to write 42644 bytes to file 9: No space left on device [os_error_code='28']"), UserError),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), UserError),
        (ValueError("a bug of ours, not a disk's"), ValueError),
        (TimeoutError("Timed out while waiting for async_write_complete barrier."), TimeoutError),  # a dead peer
    ]:
        def failing_save(*args, failure=failure, **kwargs):
            raise failure

        monkeypatch.setattr(checkpoints.manager, "save", failing_save)
        with pytest.raises(raised) as error:
            checkpoints.save(4, state)
        if raised is UserError:
            assert str(error.value) == (f"could not write a checkpoint to {tmp_path / 'checkpoints'} (No space left on "
                                        "device); no earlier checkpoint exists: free some space and rerun the same "
                                        "command to resume.")
        else:
            assert error.value is failure
    checkpoints.close()


def test_a_full_disk_while_logging_stops_in_one_sentence_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    ds = sample_dataset()
    train.train_and_evaluate(TINY.replace(epochs=1), tmp_path, dataset=ds)   # step 4 is safely on disk
    logged = (tmp_path / "metrics.jsonl").read_text()
    real_open = pathlib.Path.open

    def disk_full_for(full_mode):  # the log's files, opened in that mode, as on a full disk
        def patched_open(self, mode="r", *args, **kwargs):
            if self.name.startswith("metrics.jsonl") and mode == full_mode:
                real_open(self, mode, *args, **kwargs).close()  # opening works ("w" empties the file) ...
                return open("/dev/full", "w")                   # ... and writing fails: ENOSPC
            return real_open(self, mode, *args, **kwargs)
        return patched_open

    # A resume first rewrites the log without the lines of the steps it will redo: it must not lose
    # the lines it keeps. Then every log step appends a line.
    for mode in ("w", "a"):
        monkeypatch.setattr(pathlib.Path, "open", disk_full_for(mode))
        with pytest.raises(UserError, match=r"cannot write .*metrics.jsonl\S* \(No space left on device\); free "
                                            r"some space and rerun the same command to resume from the last checkpoint"):
            train.train_and_evaluate(TINY.replace(epochs=2), tmp_path, dataset=ds)
        monkeypatch.undo()
        assert Checkpoints(tmp_path).steps() == [4]
        assert (tmp_path / "metrics.jsonl").read_text() == logged
        assert not (tmp_path / "metrics.jsonl.partial").exists()
    assert train.train_and_evaluate(TINY.replace(epochs=2), tmp_path, dataset=ds)["count"] == 24  # and it resumes


def start_processes(workdir, data_dir, *extra, each=((), ()), peer_timeout=10, started=(0, 1)):
    """The run of COMMAND (its mesh, not "jit") as two processes of 2 CPU devices each, on loopback.

    `each`: flags for process 0 and for process 1 alone; `started`: which of them to start. Each
    process is a session of its own, so a test can kill one whole (its watchdog and the training).
    """
    from test_train import free_port

    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return [subprocess.Popen([sys.executable, "-u", "-m", "minimobile.train", "--workdir", str(workdir),
                              "--data-dir", data_dir, *COMMAND[:-4], *extra, *own, "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", str(len(each)), "--process-id", str(i),
                              "--peer-timeout", str(peer_timeout)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
            for i, own in enumerate(each) if i in started]


@contextlib.contextmanager
def killed_at_the_end(procs):
    try:
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.multiprocess
def test_processes_that_disagree_each_say_on_what_and_stop(tmp_path, cifar100_data_dir):
    # Unchecked, another seed trains another model on each process (the checkpoint is process 0's,
    # the metrics a mixture), and another batch size waits forever in the first collective.
    import cifar_files

    other_data = cifar_files.make_prepared_cifar_dir(tmp_path / "other", "cifar100", n_train=64, n_test=20, seed=5)
    busy = tmp_path / "busy"
    busy.mkdir()
    cases = [
        (tmp_path / "flags", (("--seed", "1"), ("--seed", "7", "--batch-size", "32")),
         "the processes of this run were started with different settings (--batch-size, --seed); start every process "
         "with the same flags."),
        (tmp_path / "data", ((), ("--data-dir", other_data)),  # the later --data-dir wins
         "the processes of this run see different train images, train labels, test images, test labels; give every "
         "process the same data (--data-dir) and one --workdir on a filesystem they all share."),
        (busy, ((), ()), "--workdir {busy} is in use by another training run ({owner}); wait for it to end, or "
                         "choose another --workdir."),
    ]
    with train.Workdir(busy).lock():                      # another run holds `busy`: only process 0 can tell
        for workdir, each, message in cases:
            with killed_at_the_end(start_processes(workdir, cifar100_data_dir, each=each)) as procs:
                results = [p.communicate(timeout=120) for p in procs]
            owners = (f"process {os.getpid()}", "process 0 of this run found it locked")
            for i, (p, (out, err)) in enumerate(zip(procs, results)):
                assert p.returncode == 2 and err.strip() == "error: " + message.format(busy=busy, owner=owners[i])


@pytest.mark.multiprocess
def test_two_processes_stop_together_fall_back_together_and_outlive_a_dead_peer(tmp_path, cifar100_data_dir):
    # 1. A scheduler may signal only some processes; one that stopped alone would leave the other
    #    waiting forever. Both stop, at one step, with one checkpoint.
    with killed_at_the_end(start_processes(tmp_path, cifar100_data_dir, "--epochs", "500")) as procs:
        # After the second epoch: a signal is honoured as soon as the host has waited for a read, so one
        # sent after the first epoch's line may stop the run at that epoch's own checkpoint, and step 2
        # below needs a checkpoint before the one the stop saved.
        wait_for_line(procs[0], "epoch ")
        wait_for_line(procs[0], "epoch ")
        procs[1].send_signal(signal.SIGTERM)                    # process 1's watchdog passes it on
        results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, results
    out = results[0][0]
    assert "SIGTERM (by another process) received: saved a checkpoint at step" in out
    saved = int(out.split("saved a checkpoint at step ")[1].split(";")[0].replace(",", ""))
    assert max(Checkpoints(tmp_path).steps()) == saved

    # 2. That checkpoint damaged, both resume: process 0 alone moves it aside, and both go back to
    #    the one before it (an epoch earlier), together.
    for f in (tmp_path / "checkpoints" / str(saved)).glob("*/d/*"):
        f.write_bytes(b"\0" * 7)
    with killed_at_the_end(start_processes(tmp_path, cifar100_data_dir, "--epochs", "500")) as procs:
        assert f"resumed from epoch {saved // 4 - 1} (step {saved - 4})" in wait_for_line(procs[0], "resumed from")
        wait_for_line(procs[0], "epoch ")
        assert [p.name for p in (tmp_path / "checkpoints-unreadable").iterdir()] == [str(saved)]

        # 3. Then process 1 dies (killed whole: its watchdog and the training). Process 0 says so in
        #    one sentence, within --peer-timeout (10 s) and some, rather than hang.
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed = time.time()
        out, err = procs[0].communicate(timeout=120)
    assert time.time() - killed < 60 and procs[0].returncode != 0
    warning, error = err.strip().splitlines()  # process 0's warning reaches the user, not only its log
    assert warning.startswith(f"warning: checkpoint {saved} is unreadable")
    assert error.startswith("error: another process of this run stopped answering for 10 s")
    logs = [(tmp_path / "logs" / f"process-{i}.log").read_text() for i in range(2)]
    assert "unreadable" not in logs[1] and "Traceback" not in logs[1]
    assert not any("Event loop is closed" in log for log in logs)


@pytest.mark.multiprocess
def test_a_run_that_cannot_assemble_says_why_in_one_sentence(tmp_path, cifar100_data_dir):
    import socket

    from minimobile.train import check_coordinator_port

    # Process 0 of two, alone: nobody joins it.
    with killed_at_the_end(start_processes(tmp_path, cifar100_data_dir, peer_timeout=3, started=(0,))) as procs:
        out, err = procs[0].communicate(timeout=60)
    assert procs[0].returncode != 0 and err.strip() == (
        "error: not every process of this run joined within 3 s, so process 0 stopped; start all of them with the "
        "same --coordinator and --num-processes (and a larger --peer-timeout if they start far apart).")
    # The coordinator's port taken by another program (JAX would crash): one sentence, before JAX starts.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(UserError, match=f"another program listens on port {port} there; choose another port"):
            check_coordinator_port(f"127.0.0.1:{port}")
    check_coordinator_port(f"127.0.0.1:{port}")  # free again
    for malformed in ("127.0.0.1", "127.0.0.1:99999", "127.0.0.1:0"):
        with pytest.raises(UserError, match="--coordinator must be HOST:PORT, PORT from 1 to 65535"):
            check_coordinator_port(malformed)


def test_the_watchdog_blames_a_dead_peer_even_when_it_is_only_the_cause_of_the_error_raised():
    from minimobile.watchdog import explain_failure

    log = pathlib.Path("logs/process-0.log")
    # What CI once saw: orbax's checkpoint barrier raised TimeoutError "from" the coordination service's
    # report of the dead peer. Blaming process 0 sends the user after the wrong process.
    orbax_barrier = (
        "Traceback (most recent call last):\n  File \"async_checkpointer.py\", line 115, in _background\n"
        "jax.errors.JaxRuntimeError: INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: "
        "Task 1 heartbeat timeout.\n\nThe above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n  File \"train.py\", line 507, in _loop\n"
        "TimeoutError: Timed out while waiting for async_write_complete barrier.\n")
    assert explain_failure(orbax_barrier, 1, 0, 10, log).startswith(
        "error: another process of this run stopped answering for 10 s")
    # A collective whose peer went away, raised before JAX's own report of the death reached the log.
    gloo = ("Traceback (most recent call last):\n  File \"train.py\", line 465, in _loop\n"
            "jax.errors.JaxRuntimeError: UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538]"
            " Read error [127.0.0.1]:41355: Connection reset by peer\n")
    assert explain_failure(gloo, 1, 0, 10, log).startswith("error: another process of this run stopped answering")
    # A failure of its own stays its own.
    own_bug = ("Traceback (most recent call last):\n  File \"train.py\", line 1, in <module>\n"
               "ZeroDivisionError: division by zero\n")
    assert explain_failure(own_bug, 1, 0, 10, log) == (
        f"error: process 0 failed (ZeroDivisionError: division by zero); see {log}.")
    assert explain_failure("error: --seed must be positive.\n", 2, 0, 10, log) == "error: --seed must be positive."
    # The child's last error is the one that stopped it (a checkpoint write that failed while stopping, say).
    assert explain_failure("error: first.\nwarning: w\nerror: last.\n", 2, 0, 10, log) == "error: last."


def test_a_child_killed_by_a_signal_is_named_and_its_watchdog_exits_non_zero(tmp_path, monkeypatch, capsys):
    from minimobile import watchdog

    # The child: a process that warns, then is killed as the out-of-memory killer would kill it.
    dies = [sys.executable, "-c", "import os, signal, sys; print('warning: short of memory', file=sys.stderr, "
            "flush=True); os.kill(os.getpid(), signal.SIGKILL)"]
    popen = subprocess.Popen
    monkeypatch.setattr(watchdog.subprocess, "Popen", lambda argv, **kwargs: popen(dies, **kwargs))
    assert watchdog.run_watched([], str(tmp_path), 0, 10) == 1  # not -9: an exit status is 0..255
    err = capsys.readouterr().err
    assert err.startswith("warning: short of memory\n")  # process 0's warnings reach the user as they come
    assert "error: process 0 was killed by SIGKILL (out of memory, perhaps" in err
    assert "warning: short of memory" in (tmp_path / "logs" / "process-0.log").read_text()


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_child_stopped_by_ctrl_c_before_training_says_so_at_its_terminal(tmp_path, monkeypatch, capsys, process_id):
    # Interrupted before training began, the child prints "interrupted." to its stderr, which the
    # watchdog sends to the log; the user at that process's terminal must see it too, not a silent exit 130.
    from minimobile import watchdog

    stopped = [sys.executable, "-c", "import sys; print('interrupted.', file=sys.stderr); sys.exit(130)"]
    popen = subprocess.Popen
    monkeypatch.setattr(watchdog.subprocess, "Popen", lambda argv, **kwargs: popen(stopped, **kwargs))
    assert watchdog.run_watched([], str(tmp_path), process_id, 10) == 130
    assert capsys.readouterr().err == "interrupted.\n"
    assert (tmp_path / "logs" / f"process-{process_id}.log").read_text() == "interrupted.\n"


def test_joining_a_multi_process_run_leaves_sigterm_to_our_handler():
    # jax.distributed.initialize starts JAX's preemption notifier, which takes SIGTERM over in C++ (it
    # logs "SIGTERM caught" and nothing else happens): a scheduler's SIGTERM between joining and the
    # training loop was swallowed, and the run trained to its end. A process of its own: JAX joins once.
    program = (
        "import os, signal, sys, time\n"
        "from minimobile import parallel\n"
        "got = []\n"
        "signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))\n"
        "parallel.initialize_distributed(f'127.0.0.1:{sys.argv[1]}', 1, 0, timeout_s=20)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.5)\n"
        "print(got == [signal.SIGTERM])\n")
    from test_train import free_port

    ended = subprocess.run([sys.executable, "-c", program, str(free_port())], capture_output=True, text=True, timeout=120)
    assert ended.stdout == "True\n", ended.stderr[-2000:]
