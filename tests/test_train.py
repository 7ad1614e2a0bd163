"""The training loop: one step under jit, pmap and a mesh gives one answer; runs resume exactly; the CLIs work."""

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from minimobile import parallel, steps, train
from minimobile.assets import load_cifar100_sample
from minimobile.checkpoint import Checkpoints
from minimobile.config import Config, recipe
from minimobile.data import Dataset, Split
from minimobile.errors import TrainingDiverged, UserError
from oracles import log_softmax, normalised

REPO = pathlib.Path(__file__).resolve().parents[1]

# Every layer of the real network at 1/16 width: compiles in seconds, learns something in a few steps.
TINY = Config(width=0.0625, batch_size=16, epochs=2, warmup_epochs=0.0, learning_rate=0.05, log_every_steps=2,
              depthwise_impl="shift_add", parallel="jit")


def sample_dataset(n_train=64, n_test=24) -> Dataset:
    """Real CIFAR-100 pictures from the shipped sample, as a small Dataset."""
    s = load_cifar100_sample()
    images, labels = s["image"], s["label"].astype(np.int32)
    return Dataset("cifar100-sample", Split(images[:n_train], labels[:n_train]),
                   Split(images[n_train:n_train + n_test], labels[n_train:n_train + n_test]),
                   100, tuple(s["label_names"]), mean=(129.3, 124.1, 112.4), std=(68.2, 65.4, 70.4))


# Equivalence tests step gently: near initialisation this tiny net is well conditioned (see below).
GENTLE = TINY.replace(learning_rate=0.01)


def reference_chain(num_steps: int = 3):
    """The 1-device run: the state before each step (host arrays) and each step's loss."""
    run = train.build_run(GENTLE.replace(parallel="jit"), sample_dataset(), parallel.setup("jit"))
    states, losses, state = [], [], run.state
    for _ in range(num_steps):
        states.append(jax.device_get(state))
        state, metrics = run.step(state, run.epoch_order(0))
        losses.append(float(metrics["loss"]))
    states.append(jax.device_get(state))
    return states, losses


def step_from(run, host_state):
    """One step of `run` (any mode) from a given state: (loss, new state on the host)."""
    state = run.state.replace(**{k: getattr(host_state, k) for k in ("step", "params", "batch_stats", "opt_state")})
    state, metrics = run.step(parallel.replicate_device_tree(state, run.par), run.epoch_order(0))
    return float(parallel.unreplicate(metrics, run.par)["loss"]), jax.device_get(parallel.unreplicate(state, run.par))


def assert_same_update(start, new, expected_new, tol=0.05):
    """new - start equals expected_new - start to within `tol` of its size (over all leaves of the tree).

    Not element by element: a unit that rounding pushes across ReLU6's kink changes its gradient by a
    finite amount. Measured at the 1/16 width: the 8-device update of step 2 differs from the 1-device
    one by 1 % of its size (0.0036 in one element of 0.08), steps 1 and 3 by 1e-5; with ReLU6 swapped
    for a smooth function, all three steps agree to 1e-4.
    """
    size = lambda t: np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(t)))
    error = size(jax.tree.map(np.subtract, new, expected_new))
    assert error <= tol * size(jax.tree.map(np.subtract, expected_new, start)), error


def test_jit_pmap_and_mesh_steps_compute_the_same_update():
    # The same global batch of 16: on 1 device, and on 8 devices with 2 examples each, two ways.
    # Augmentation keys follow each example's position in the global batch and BatchNorm averages its
    # statistics across devices, so only float summation order differs.
    # Each step starts from the 1-device run's state: after a step or two this tiny network amplifies
    # a rounding difference 100-1000x per step (measured: a 1e-13 nudge of the parameters grows to
    # 2e-8 in three float64 steps), so independent chains drift apart although every step agrees;
    # and one step's float32 rounding can move a unit across ReLU6's kink (see assert_same_update).
    # (The bug this test was written for, gradients summed instead of averaged over 8 devices, makes
    # the update about 8 times too large: off by some 700 %, against the 5 % allowed.)
    states, losses = reference_chain()
    for mode in ("pmap", "mesh"):
        run = train.build_run(GENTLE.replace(parallel=mode), sample_dataset(), parallel.setup(mode))
        for k in range(len(losses)):
            loss, state = step_from(run, states[k])
            assert loss == pytest.approx(losses[k], rel=1e-5), (mode, k)
            assert_same_update(states[k].params, state.params, states[k + 1].params)
            assert_same_update(states[k].batch_stats, state.batch_stats, states[k + 1].batch_stats)
            assert int(state.step) == k + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_with_two_devices_each_compute_the_same_update(tmp_path):
    # Two real processes on loopback (gloo collectives), 2 CPU devices each: one 4-device mesh.
    states, losses = reference_chain()
    np.savez(tmp_path / "reference.npz", *[leaf for s in states for leaf in jax.tree.leaves(s)])
    port, out = free_port(), tmp_path / "result.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "distributed_worker.py"), str(port), str(i),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    got = np.load(out)
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
    for k in range(len(losses)):
        for part in ("params", "batch_stats"):  # BatchNorm's statistics too: averaged over both processes
            start, expected = (jax.tree.leaves(getattr(s, part)) for s in (states[k], states[k + 1]))
            assert_same_update(start, [got[f"{part}_{k}_{i}"] for i in range(len(start))], expected)
        assert int(got[f"step_{k}"]) == k + 1


def test_several_steps_in_one_call_equal_the_same_steps_one_call_each_bit_for_bit():
    # The trainer runs up to `steps_per_call` steps per compiled call (a loop on the device). Every step
    # runs the same compiled loop body whatever the count, so grouping cannot change a single bit.
    run = train.build_run(TINY.replace(steps_per_call=3), sample_dataset(), parallel.setup("jit"))  # on any backend
    order, start = run.epoch_order(0), jax.device_get(run.state)
    # The step donates its input state. Copies are placed as the trainer places it: an array that is not
    # committed to a device would be traced and compiled for separately (13 s more here).
    fresh = lambda: jax.device_put(start, jax.tree.map(lambda x: x.sharding, run.state))
    together, summed = run.steps(fresh(), order, 3)
    apart, losses = fresh(), []
    for i in range(3):
        # On the way, what README promises of every call: nothing crosses from the host once each step
        # count has been seen (JAX's transfer guard raises at any copy from the host), and the count is
        # an argument of one compiled program, not a constant of several.
        with jax.transfer_guard_host_to_device("disallow_explicit" if i else "allow"):
            apart, metrics = run.step(apart, order)
        losses.append(float(metrics["loss"]))
    assert run.step_fn._cache_size() == 1
    assert int(together.step) == int(apart.step) == 3 and int(summed["steps"]) == 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(together), jax.device_get(apart))
    assert float(summed["loss"]) == pytest.approx(sum(losses), rel=1e-6)  # metrics come back summed


def test_a_log_line_holds_the_means_of_its_steps_metrics(tmp_path):
    # metrics.jsonl at step s: the train loss, accuracy and learning rate averaged over the steps since
    # the previous line. Against the same steps taken one call each (bit for bit the trainer's steps,
    # as above). A warmup of 2 steps, then the cosine: the rate differs at every step.
    config = TINY.replace(epochs=1, warmup_epochs=0.5, log_every_steps=2)           # 4 steps, 2 per line
    train.train_and_evaluate(config, tmp_path, dataset=sample_dataset())
    logged = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    run = train.build_run(config, sample_dataset(), parallel.setup("jit"))
    state, order, each = run.state, run.epoch_order(0), []
    for _ in range(4):
        state, metrics = run.step(state, order)
        each.append({k: float(metrics[k]) for k in ("loss", "accuracy", "learning_rate")})
    assert [r["step"] for r in logged] == [2, 4]
    for line, steps_of_line in zip(logged, (each[:2], each[2:])):
        for key in ("loss", "accuracy", "learning_rate"):
            mean = sum(m[key] for m in steps_of_line) / 2
            assert line[key if key == "learning_rate" else f"train_{key}"] == pytest.approx(mean, rel=1e-6), key
    assert len({m["learning_rate"] for m in each}) == 4


def test_auto_loops_on_cpu_only_where_the_network_has_no_xla_convolution():
    # Inside a loop XLA:CPU runs convolutions through a slow generic emitter (6-14x slower, README), so
    # "auto" loops the MobileNet whose convolutions are all shifts and matmuls, and not the others.
    ds = sample_dataset()
    per_call = lambda c: train.build_run(c, ds, parallel.setup("jit")).steps_per_call
    assert per_call(TINY) == 16                                          # shift_add, PatchConv stem, matmuls
    assert per_call(TINY.replace(depthwise_impl="feature_group_count")) == 1
    assert per_call(TINY.replace(block="standard")) == 1
    assert per_call(TINY.replace(steps_per_call=3)) == 3                 # asked for: taken as is


def test_a_run_of_one_step_per_call_compiles_no_loop_and_takes_the_same_step():
    # A loop with a traced count costs even when it runs once (XLA:CPU's slow convolutions in a loop
    # body, XLA:GPU's wait on the loop condition), so a run of one step per call compiles no loop.
    ds, one_device = sample_dataset(), parallel.setup("jit")
    grouped = TINY.replace(depthwise_impl="feature_group_count")
    single, looped = train.build_run(grouped, ds, one_device), train.build_run(grouped.replace(steps_per_call=2),
                                                                               ds, one_device)
    assert single.steps_per_call == 1                                   # auto, for an XLA convolution on CPU
    loops = lambda run: steps.primitive_counts(
        jax.make_jaxpr(run.step_fn)(*run.step_args(run.state, run.epoch_order(0), 1)).jaxpr)["while"]
    assert loops(single) == 0 and loops(looped) == 1
    # The same step either way, the loop program the oracle: not bit for bit, since XLA compiles the
    # two apart (the convolution in the loop is another kernel, which sums in another order).
    start = jax.device_get(single.state)
    (a, metrics_a), (b, metrics_b) = (run.step(jax.device_put(start), run.epoch_order(0)) for run in (single, looped))
    assert int(a.step) == int(b.step) == 1 and int(metrics_a["steps"]) == 1
    assert_same_update(start.params, jax.device_get(a.params), jax.device_get(b.params), tol=1e-4)
    assert float(metrics_a["loss"]) == pytest.approx(float(metrics_b["loss"]), rel=1e-5)
    with pytest.raises(ValueError, match="a call makes 1 to 1 steps in this run, not 2"):
        single.steps(a, single.epoch_order(0), 2)                       # it would silently take one


def test_the_learning_rate_and_the_run_length_are_inputs_of_the_compiled_step_not_part_of_it():
    # So a run resumed with a larger --epochs, or run again with another --learning-rate, finds its
    # step already compiled in the compilation cache.
    ds, one_device = sample_dataset(), parallel.setup("jit")
    a = train.build_run(TINY, ds, one_device)                                           # lr 0.05, 2 epochs
    b = train.build_run(TINY.replace(learning_rate=0.01, epochs=5), ds, one_device)
    program = lambda run: run.step_fn.lower(*run.step_args(run.state, run.epoch_order(0), 1)).as_text()
    assert program(a) == program(b) != program(train.build_run(TINY.replace(label_smoothing=0.2), ds, one_device))
    # And the numbers passed in are the ones used. From the same start, the first step (no warmup, no
    # momentum yet) moves the parameters by -lr * (1 + momentum) * (gradient + decay): b's by a's x 0.2.
    start = jax.device_get(a.state)
    (state_a, metrics_a), (state_b, metrics_b) = (run.step(jax.device_put(start), run.epoch_order(0)) for run in (a, b))
    assert (float(metrics_a["learning_rate"]), float(metrics_b["learning_rate"])) == pytest.approx((0.05, 0.01))
    params_a, params_b = jax.device_get(state_a.params), jax.device_get(state_b.params)
    expected_b = jax.tree.map(lambda p, p_a: p + 0.2 * (p_a - p), start.params, params_a)
    assert_same_update(start.params, params_b, expected_b, tol=1e-4)
    # Through a warmup and into the decay, each step uses the rate worked out by hand (same program
    # again): 4 steps an epoch, so a warmup of 2 steps, then a cosine to 0 at step 12.
    c = train.build_run(TINY.replace(warmup_epochs=0.5, epochs=3), ds, one_device)
    state, used = c.state, []
    for _ in range(4):
        state, metrics = c.step(state, c.epoch_order(0))
        used.append(float(metrics["learning_rate"]))
    assert used == pytest.approx([0.0, 0.05 / 2, 0.05, 0.05 * 0.5 * (1 + np.cos(np.pi / 10))], abs=1e-8)


def test_calls_end_on_every_step_where_something_happens():
    sched = train.Schedule(steps_per_epoch=10, total_steps=23, eval_every=10, eval_at=(7,), checkpoint_every=5,
                           log_every=4)
    ends, step = [], 0
    while step < sched.total_steps:
        n = sched.steps_in_call(step, most=3)
        assert 1 <= n <= 3
        step += n
        ends.append(step)
    assert ends == [3, 4, 5, 7, 8, 10, 12, 15, 16, 19, 20, 23]  # logs at 4k, checkpoints at 5k, eval at 7, 10k
    # An epoch's end, where nothing else happens, ends a call too: the next step reads the next epoch's order.
    quiet = train.Schedule(steps_per_epoch=6, total_steps=14, eval_every=100, eval_at=(), checkpoint_every=100,
                           log_every=100)
    ends, step = [], 0
    while step < quiet.total_steps:
        step += quiet.steps_in_call(step, most=4)
        ends.append(step)
    assert ends == [4, 6, 10, 12, 14]


def test_every_epoch_has_its_own_order_of_the_whole_train_split():
    run = train.build_run(TINY, sample_dataset(), parallel.setup("jit"))
    orders = [np.asarray(run.epoch_order(epoch)) for epoch in range(3)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(64))  # each image once
    assert len({order.tobytes() for order in orders}) == 3            # reshuffled every epoch


# Mid-epoch 2 under a mesh; the end of epoch 2 (whose evaluation must not be lost) under pmap, whose
# state carries a leading device axis that the checkpoint must drop on saving and restore on resuming.
@pytest.mark.parametrize("stop_at, mode", [(6, "mesh"), (8, "pmap")])
def test_an_interrupted_run_resumes_to_the_same_result_as_an_uninterrupted_one(tmp_path, monkeypatch, capsys, stop_at,
                                                                              mode):
    ds = sample_dataset()
    # 4 steps/epoch, 12 in all; keep_checkpoints 1: the newest checkpoint and the best, no others.
    config = TINY.replace(epochs=3, parallel=mode, dropout_rate=0.1, keep_checkpoints=1)
    uninterrupted = train.train_and_evaluate(config, tmp_path / "a", dataset=ds)  # 2 steps a call (log_every)

    # As if SIGTERM arrived during the call that ends at step `stop_at` (calls end at every log step,
    # here every 2 steps; a real signal is sent in test_reliability.py).
    stop, steps = train.StopRequest(), train.Run.steps

    def steps_then_signal(run, state, order, n):
        first = int(parallel.unreplicate(state, run.par).step)
        stop.signal = signal.SIGTERM if first < stop_at <= first + n else None
        return steps(run, state, order, n)

    monkeypatch.setattr(train, "StopRequest", lambda: stop)
    monkeypatch.setattr(train.Run, "steps", steps_then_signal)
    with pytest.raises(SystemExit) as exit_info:
        train.train_and_evaluate(config, tmp_path / "b", dataset=ds)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert f"SIGTERM received: saved a checkpoint at step {stop_at}" in capsys.readouterr().out
    monkeypatch.undo()

    if stop_at % 4:  # mid-epoch: the seed decided the rest of this epoch's order, so it may not change now
        with pytest.raises(UserError, match=f"stopped in the middle of epoch 2 .step {stop_at}.*--seed 0 decided: "
                                            "with --seed 1 the rest of it would show some images twice"):
            train.train_and_evaluate(config.replace(seed=1), tmp_path / "b", dataset=ds)
        assert Config.from_json((tmp_path / "b" / "config.json").read_text()).seed == 0
    resumed = train.train_and_evaluate(config, tmp_path / "b", dataset=ds)
    assert f"resumed from epoch {stop_at // 4} (step {stop_at})" in capsys.readouterr().out
    assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-6)
    a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    logged = lambda records: [(r["step"], "eval_loss" in r) for r in records]
    assert logged(a) == logged(b)  # no step logged twice, none missing, no evaluation lost
    train_losses = lambda records: [r["train_loss"] for r in records if "train_loss" in r]
    assert train_losses(b) == pytest.approx(train_losses(a), rel=1e-6)
    kept = Checkpoints(tmp_path / "b").steps()
    assert kept[-1] == 12 and len(kept) <= 2  # the newest, and the best if that is another


def test_a_new_seed_may_take_over_at_an_epochs_end_or_on_a_fresh_run_but_not_mid_epoch():
    seed_0, seed_1 = TINY, TINY.replace(seed=1)
    train.check_seed_may_change(seed_0, seed_1, 8, 4)      # step 8 of 4-step epochs: the end of epoch 2
    train.check_seed_may_change(seed_0, seed_1, None, 4)   # nothing to resume
    train.check_seed_may_change(None, seed_1, None, 4)     # a new workdir
    train.check_seed_may_change(seed_0, seed_0, 6, 4)      # the same seed, mid-epoch
    with pytest.raises(UserError, match=r"middle of epoch 2 \(step 6\)"):
        train.check_seed_may_change(seed_0, seed_1, 6, 4)


class StandInRun:
    """What the loop (`train._loop`) asks of a Run, with no model behind it: a step adds 1 to the
    state, a call returns its steps' metrics, an evaluation fixed figures. So a test of the loop's
    bookkeeping (when it logs, evaluates, saves and stops) takes milliseconds, not a compile."""

    def __init__(self, config: Config, num_train: int = 64):
        self.config, self.par, self.steps_per_call = config, parallel.setup("jit"), config.steps_per_call
        self.sched = train.make_schedule(config, num_train)

    def epoch_order(self, epoch):
        return None

    def steps(self, state, order, n):
        return state + n, {"steps": jax.numpy.int32(n), "loss": jax.numpy.float32(n), "accuracy": 0.0,
                           "learning_rate": 0.1}

    def evaluate(self, state):
        return {"loss": 1.0, "accuracy": 0.5, "accuracy_top5": 0.9, "count": 24}, None


class Recorded(list):
    """Stands in for the checkpoints (`save`) and the metrics writer (`write`): keeps what they get."""
    save = lambda self, step, state, metrics: self.append(step)
    write = list.append


def run_loop(run, stop=None):
    """train._loop from step 0: (steps taken, checkpoints saved, records written, stopped early?)."""
    checkpoints, records = Recorded(), Recorded()
    state, _, _, stopped = train._loop(run, 0, 0, checkpoints, records, stop or train.StopRequest(), False)
    return state, checkpoints, records, stopped


def test_each_checkpoint_carries_the_top1_accuracy_of_its_steps_evaluation_which_ranks_it_for_best():
    # `--checkpoint best` is the checkpoint saved with the highest value (tests/test_checkpoint.py); the
    # loop must give each one its own step's test top-1 (not top-5, not the previous evaluation's).
    run = StandInRun(TINY.replace(epochs=2, log_every_steps=4, steps_per_call=2))        # 4 steps an epoch
    run.evaluate = lambda state: ({"loss": 1.0, "accuracy": state / 100, "accuracy_top5": 1 - state / 100,
                                   "count": 24}, None)
    saved = []
    train._loop(run, 0, 0, types.SimpleNamespace(save=lambda step, state, metrics: saved.append((step, metrics))),
                Recorded(), train.StopRequest(), False)
    assert saved == [(4, {"eval_accuracy": 0.04}), (8, {"eval_accuracy": 0.08})]


def test_a_signal_stops_a_run_after_the_call_it_arrived_in_not_at_the_next_log():
    # Calls of 2 steps, a log, evaluation and checkpoint every 4: a signal during steps 1-2 stops at step 2
    # (one process waits for no one; several stop together where the host waits anyway, see README).
    stop = train.StopRequest()
    run = StandInRun(TINY.replace(epochs=1, log_every_steps=4, steps_per_call=2))
    steps = run.steps

    def signal_then_steps(state, order, n):
        stop.signal = signal.SIGTERM
        return steps(state, order, n)

    run.steps = signal_then_steps
    state, checkpoints, records, stopped = run_loop(run, stop)
    assert (state, checkpoints, stopped) == (2, [2], True)
    assert [r["step"] for r in records] == [2]  # the steps it took are logged


def test_a_signal_while_the_host_waits_stops_the_run_there_and_one_in_the_last_call_lets_it_end(monkeypatch):
    # Calls of 2 steps; 4 steps an epoch, with an evaluation and a checkpoint at its end; 8 in all.
    config, stop = TINY.replace(epochs=2, log_every_steps=8, steps_per_call=2), train.StopRequest()

    def signal_then(wait, when=lambda *args: True):
        def waiting(*args):
            if when(*args):
                stop.signal = signal.SIGTERM
            return wait(*args)
        return waiting

    # 1. While the host waits for the evaluation at step 4: the run stops at step 4, not a call later.
    run = StandInRun(config)
    run.evaluate = signal_then(run.evaluate)
    assert run_loop(run, stop)[:2] == (4, [4])
    # 2. While the host waits for steps 1-2, with steps 3-4 queued behind them: it queues no more,
    #    so the run stops after steps 3-4 (without that wait it would queue calls up to the next read).
    stop.signal = None
    block_until_ready = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", signal_then(block_until_ready))
    assert run_loop(StandInRun(config), stop)[:2] == (4, [4])
    monkeypatch.setattr(jax, "block_until_ready", block_until_ready)
    # 3. During the last call (steps 7-8): the run is complete, so it ends as one, not as stopped.
    stop.signal, run = None, StandInRun(config)
    run.steps = signal_then(run.steps, when=lambda state, order, n: state == 6)  # state: the steps taken
    state, checkpoints, _, stopped = run_loop(run, stop)
    assert (state, checkpoints, stopped) == (8, [4, 8], False)


def test_images_per_sec_counts_training_only_not_compiling_evaluating_or_saving(monkeypatch):
    # A clock that moves only when told: a step takes 1 s; compiling the step (in the first call), an
    # evaluation and a checkpoint 100 s each. 4 steps an epoch, calls of 2, a log line every 2.
    import types

    now = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    run, steps, calls = StandInRun(TINY.replace(epochs=2, log_every_steps=2)), StandInRun.steps, []

    def taking_time(state, order, n):
        calls.append(n)
        now[0] += n + (100 if len(calls) == 1 else 0)
        return steps(run, state, order, n)

    def taking_100_s(method):
        def timed(*args):
            now[0] += 100
            return method(*args)
        return timed

    run.steps, run.evaluate = taking_time, taking_100_s(run.evaluate)
    checkpoints, records = Recorded(), Recorded()
    checkpoints.save = taking_100_s(checkpoints.save)
    train._loop(run, 0, 0, checkpoints, records, train.StopRequest(), False)
    rates = [r["images_per_sec"] for r in records if "images_per_sec" in r]
    # After an evaluation and a checkpoint (step 4), 2 steps of 16 images in 2 s, as every window.
    assert len(rates) == 4 and rates[1:] == [16.0] * 3
    # The first window's clock starts once the first call has compiled and returned. Here a call
    # returns only when its steps are done, so that window comes out faster still; on a device a
    # call returns as soon as its steps are queued.
    assert rates[0] > 16.0


def test_a_larger_epochs_trains_longer_and_a_corrupt_latest_checkpoint_falls_back(tmp_path, capsys):
    ds = sample_dataset()
    train.train_and_evaluate(TINY, tmp_path, dataset=ds)                    # epochs 1-2: steps 4, 8
    assert Checkpoints(tmp_path).steps() == [4, 8]
    for f in (tmp_path / "checkpoints" / "8").rglob("*"):                   # damage the newest checkpoint
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)
    train.train_and_evaluate(TINY.replace(epochs=3), tmp_path, dataset=ds)
    captured = capsys.readouterr()
    assert "checkpoint 8 is unreadable" in captured.err and "falling back" in captured.err
    assert (tmp_path / "checkpoints-unreadable" / "8").is_dir()  # kept for inspection, out of the way
    assert "resumed from epoch 1 (step 4)" in captured.out and "train longer" in captured.out
    assert 12 in Checkpoints(tmp_path).steps()
    # What the user gets in the workdir.
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "dataset.json", "metrics.jsonl", "curves.png", "tensorboard", "checkpoints"} <= names
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "train_loss", "train_accuracy", "learning_rate", "images_per_sec"} <= set(records[0])
    assert [r["step"] for r in records if "eval_accuracy" in r] == [4, 8, 12]
    # The same command once more: nothing left to train. It says how to train on, and evaluates again
    # what step 12 evaluated, writing nothing.
    again = train.train_and_evaluate(TINY.replace(epochs=3), tmp_path, dataset=ds)
    assert "already trained for 12 steps; pass a larger --epochs to train longer." in capsys.readouterr().out
    assert again["loss"] == pytest.approx(records[-1]["eval_loss"], rel=1e-6)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == records
    # A lost dataset.json: evaluate and predict name it, and the same command writes it again.
    from minimobile.evaluate import load_run_config

    facts = (tmp_path / "dataset.json").read_text()
    (tmp_path / "dataset.json").unlink()
    with pytest.raises(UserError, match=r"has no dataset.json; rerun the training command that made the run"):
        load_run_config(tmp_path)
    train.train_and_evaluate(TINY.replace(epochs=3), tmp_path, dataset=ds)
    assert (tmp_path / "dataset.json").read_text() == facts
    # A smaller --epochs trains nothing either, and leaves config.json the record of what trained step 12
    # (so it names no changed setting); so the first command again is not "train longer".
    saved = (tmp_path / "config.json").read_text()
    train.train_and_evaluate(TINY.replace(epochs=1, learning_rate=0.5), tmp_path, dataset=ds)
    out = capsys.readouterr().out
    assert "already trained for 12 steps" in out and "settings changed" not in out
    assert (tmp_path / "config.json").read_text() == saved
    (tmp_path / "curves.png").unlink()
    (tmp_path / "curves.png").mkdir()                    # a figure that cannot be drawn is a warning, not a claim
    train.train_and_evaluate(TINY.replace(epochs=3), tmp_path, dataset=ds)
    captured = capsys.readouterr()
    assert "(train longer)" not in captured.out and "curves in" not in captured.out
    assert "warning: could not write" in captured.err


@pytest.mark.parametrize("change, message", [
    (dict(width=0.0), "--width must be positive"),
    (dict(epochs=0), "--epochs must be positive"),
    (dict(epochs=10 ** 9), r"--epochs 1,000,000,000 \(4,000,000,000 steps\) is longer than a run can be: at most "
                           r"2,147,483,647 steps"),  # the step counter is an int32
    (dict(steps=2 ** 31), r"--steps 2,147,483,648 is longer than a run can be"),
    (dict(batch_size=12, parallel="mesh"), "does not split evenly across 8 devices"),
])
def test_impossible_settings_end_in_one_sentence(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        train.train_and_evaluate(TINY.replace(**change), tmp_path, dataset=sample_dataset())


@pytest.mark.parametrize("saved, message", [
    (dict(width=0.5), "width 0.5 there vs 0.0625 now"),
    (dict(optimizer="adam"), "optimizer 'adam' there vs 'sgd' now"),   # SGD's momentum is not Adam's moments
    (dict(batch_size=32), "batch_size 32 there vs 16 now"),             # step s would be another batch
    (dict(dataset="cifar10"), "dataset 'cifar10' there vs 'cifar100' now"),  # other pictures, other classes
    (dict(normalization="minus_one_to_one"), "normalization 'minus_one_to_one' there vs 'dataset' now"),  # other inputs
    # The same parameter shapes, so the checkpoint itself cannot tell: another network all the same.
    (dict(stem="imagenet"), "stem 'imagenet' there vs 'cifar' now"),
    (dict(block="standard"), "block 'standard' there vs 'separable' now"),
    (dict(depth_multiplier=2), "depth_multiplier 2 there vs 1 now"),
    (dict(batch_norm=False), "batch_norm False there vs True now"),
    (dict(model="seed_cnn"), "model 'seed_cnn' there vs 'mobilenet_v1' now"),
    (dict(label_key="coarse_label"), "label_key 'coarse_label' there vs 'label' now"),  # other classes
])
def test_a_workdir_of_another_model_or_optimizer_is_refused(tmp_path, saved, message):
    (tmp_path / "config.json").write_text(TINY.replace(**saved).to_json())
    with pytest.raises(UserError, match=f"holds a run that cannot go on with these settings .*{message}"):
        train.train_and_evaluate(TINY, tmp_path, dataset=sample_dataset())


@pytest.mark.parametrize("damaged", ['{"dataset": "cifar1', "null"])  # cut short; JSON, but not a config
def test_a_damaged_config_json_is_one_sentence_and_is_left_as_it_is(tmp_path, damaged):
    (tmp_path / "config.json").write_text(damaged)
    with pytest.raises(UserError, match="cannot read .*config.json .*restore it, or choose another --workdir"):
        train.train_and_evaluate(TINY, tmp_path, dataset=sample_dataset())
    assert (tmp_path / "config.json").read_text() == damaged


def test_a_resume_names_every_setting_it_changes_except_the_runs_length():
    # The line a resume prints: whatever else differs from config.json is named, so that nothing changes
    # silently; only --epochs and --steps, which a resume exists to change, go unmentioned.
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 0.5, str: lambda v: v + "x",
             tuple: lambda v: (*v, 7)}
    for field in dataclasses.fields(Config):
        value = getattr(TINY, field.name)
        line = train.settings_changed(TINY, TINY.replace(**{field.name: other[type(value)](value)}))
        if field.name in ("epochs", "steps"):
            assert line is None
        else:
            assert line.startswith("settings changed") and f" {field.name} " in f" {line}", field.name


def test_settings_that_may_change_on_a_resume_are_named_when_they_do(tmp_path):
    (tmp_path / "config.json").write_text(TINY.to_json())
    previous = train.Workdir(tmp_path).check_same_model(TINY.replace(learning_rate=0.01, epochs=5))  # accepted
    assert train.settings_changed(previous, TINY.replace(learning_rate=0.01, epochs=5)) == (
        "settings changed since the last run here: learning_rate 0.05 -> 0.01 (config.json now says so)")
    assert train.settings_changed(previous, TINY.replace(epochs=5)) is None  # a longer run changes nothing
    # --steps-per-call's auto is stored as 0, and named as what the user typed.
    assert train.settings_changed(previous, TINY.replace(steps_per_call=3)) == (
        "settings changed since the last run here: steps_per_call auto -> 3 (config.json now says so)")


def test_checkpoints_of_another_optimizer_state_are_refused_and_the_workdir_is_left_as_it_was(tmp_path):
    # Adam with weight decay is AdamW, whose state holds one more array than Adam's: config.json's
    # fields agree (optimizer 'adam' both), the checkpoints do not. Nothing may change in the workdir.
    adam = TINY.replace(optimizer="adam", weight_decay=0.0, learning_rate=1e-3, epochs=1)
    train.train_and_evaluate(adam, tmp_path, dataset=sample_dataset())
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(UserError, match="checkpoint 4 in .* was written by another model, optimizer or version"):
        train.train_and_evaluate(adam.replace(weight_decay=1e-4, epochs=2), tmp_path, dataset=sample_dataset())
    assert (tmp_path / "config.json").read_text() == before and Checkpoints(tmp_path).steps() == [4]
    assert not (tmp_path / "checkpoints-unreadable").exists()


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    ds = sample_dataset()
    train.train_and_evaluate(TINY.replace(epochs=1), tmp_path, dataset=ds)    # a good checkpoint at step 4
    with pytest.raises(TrainingDiverged, match="between steps 4 and 6; the last good checkpoint .step 4. is kept"):
        train.train_and_evaluate(TINY.replace(epochs=2, learning_rate=1e30), tmp_path, dataset=ds)
    assert Checkpoints(tmp_path).steps() == [4]


def test_an_infinite_loss_stops_the_run_as_a_nan_does(tmp_path, monkeypatch):
    # An overflow makes inf before it makes nan; the loss is made inf here, after the real steps.
    steps = train.Run.steps

    def steps_to_infinity(run, state, order, n):
        state, metrics = steps(run, state, order, n)
        return state, {**metrics, "loss": metrics["loss"] + float("inf")}

    monkeypatch.setattr(train.Run, "steps", steps_to_infinity)
    with pytest.raises(TrainingDiverged, match="the training loss became inf between steps 0 and 2; no checkpoint"):
        train.train_and_evaluate(TINY.replace(epochs=1), tmp_path, dataset=sample_dataset())


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env)


def test_train_evaluate_and_predict_from_the_command_line(tmp_path, cifar100_data_dir, capsys, monkeypatch):
    workdir, compiled = tmp_path / "run", str(tmp_path / "compiled")
    trained = cli("minimobile.train", "--dataset", "cifar100", "--data-dir", cifar100_data_dir, "--workdir",
                  str(workdir), "--epochs", "1", "--batch-size", "16", "--width", "0.0625", "--no-progress",
                  "--depthwise-impl", "shift_add", "--parallel", "jit", "--compilation-cache", compiled)
    assert trained.returncode == 0, trained.stderr
    assert "64 train / 20 test images, 100 classes; 4 steps of 16 per epoch" in trained.stdout

    # evaluate reads only the test split (here the train files are gone), and runs the evaluation
    # training compiled: it finds it in the compilation cache training filled, as JAX's compile log says.
    test_only = tmp_path / "test-only"
    shutil.copytree(cifar100_data_dir, test_only)
    train_files = list(test_only.glob("cifar100/*/cifar100-train.*"))
    assert train_files
    for path in train_files:
        path.unlink()
    evaluated = cli("minimobile.evaluate", "--workdir", str(workdir), "--data-dir", str(test_only), "--json",
                    "--compilation-cache", compiled, env=dict(os.environ, JAX_LOG_COMPILES="1"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "Persistent compilation cache hit for 'jit_evaluate_on_device_data'" in evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    last_eval = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["accuracy"] == pytest.approx(last_eval["eval_accuracy"])
    assert result["loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-5)
    assert result["count"] == 20 and (workdir / "eval" / "confusion_matrix.png").exists()
    per_class = json.loads((workdir / "eval" / "per_class_accuracy.json").read_text())
    # A workdir evaluate cannot write to (another user's, read-only): the figures still, and a warning.
    from minimobile.evaluate import evaluate_workdir

    shutil.rmtree(workdir / "eval")
    (workdir / "eval").write_text("")                                      # so eval/ cannot be made
    monkeypatch.setenv("HOME", str(tmp_path))  # "~/run" (a quoted ~ or --workdir=~/run, which no shell expands)
    again = evaluate_workdir("~/run")   # no data dir: the one the run trained from, which its dataset.json names
    assert json.loads((workdir / "dataset.json").read_text())["data_dir"] == str(pathlib.Path(cifar100_data_dir))
    assert again["accuracy"] == pytest.approx(result["accuracy"]) and again["confusion_matrix"] is None
    assert "warning: cannot write to" in capsys.readouterr().err
    (workdir / "eval").unlink()

    from PIL import Image

    image = tmp_path / "apple.png"
    Image.fromarray(load_cifar100_sample()["image"][0]).resize((64, 64)).save(image)
    from minimobile import predict as predict_cli

    predict_cli.main(["--workdir", "~/run", str(image)])  # in-process: train and evaluate showed the CLI
    printed = capsys.readouterr().out
    assert printed.startswith(f"{image}: ") and printed.count("%") == 5
    percents = [float(part.rsplit(" ", 2)[1]) for part in printed.split(": ", 1)[1].split(", ")]
    assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.05

    # predict and evaluate are two ways to the same numbers: predict's probabilities on the test split
    # give evaluate's accuracy and loss.
    from minimobile import data as data_lib
    from minimobile.predict import predict

    test = data_lib.load_split("cifar100", cifar100_data_dir, "test")
    probabilities, names = predict(workdir, test.images)
    assert probabilities.shape == (20, 100) and len(names) == 100
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    assert np.mean(probabilities.argmax(-1) == test.labels) == pytest.approx(result["accuracy"])
    nll = -np.log(probabilities[np.arange(20), test.labels].astype(np.float64)).mean()
    assert nll == pytest.approx(result["loss"], rel=1e-4)
    # evaluate's per-class accuracy, from predict's answers: the fraction of each class's test images
    # whose most likely class is theirs, and no figure at all (null) for the classes with no test image.
    predicted = probabilities.argmax(-1)
    expected = {name: float(np.mean(predicted[test.labels == k] == k)) if np.any(test.labels == k) else None
                for k, name in enumerate(names)}
    assert list(per_class) == names and per_class == pytest.approx(expected)
    assert sum(a is not None for a in per_class.values()) == len(set(test.labels)) < 100
    # A network trained for 4 steps answers almost the same whatever it sees, so the figures above
    # hardly depend on the input. So also: predict's log-probabilities are those of the network's
    # logits on (x - mean) / std with the train statistics the run saved (in NumPy here), to within
    # 5 % of how much they differ from one image to the next (predict without normalising: 900 %).
    from minimobile.evaluate import abstract_state, load_run_config, restore

    config, info = load_run_config(workdir)
    checkpoints = Checkpoints(workdir)
    state, _ = restore(checkpoints, abstract_state(config, info, jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                       "latest")
    checkpoints.close()
    x = normalised(test.images, info["mean"], info["std"])
    forward = jax.jit(functools.partial(state.apply_fn, train=False))
    expected = log_softmax(forward({"params": state.params, "batch_stats": state.batch_stats}, x))
    spread = expected.std(0).mean()
    assert np.abs(np.log(probabilities) - expected).max() < 0.05 * spread  # float32 itself: ~0.01 * spread


def test_the_hardest_classes_are_the_five_lowest_accuracies_lowest_first():
    from minimobile.evaluate import hardest_classes

    per_class = {"apple": 0.9, "bear": 0.1, "cloud": None, "dolphin": 0.5, "fox": 0.0, "girl": 0.3, "house": 0.7}
    assert hardest_classes(per_class) == [("fox", 0.0), ("bear", 0.1), ("girl", 0.3), ("dolphin", 0.5), ("house", 0.7)]
    assert hardest_classes({"cloud": None}) == []  # a class with no test image has no accuracy to rank


def test_an_unusable_compilation_cache_is_a_warning_not_an_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # A folder that cannot be made (a file is in the way), and one that exists but takes no files, even
    # from root: /proc (as a read-only disk would, where JAX warned at every program it compiled).
    for unusable in (blocker / "cache", pathlib.Path("/proc")):
        enabled = jax.config.jax_enable_compilation_cache
        try:
            train.use_compilation_cache(str(unusable))
            assert not jax.config.jax_enable_compilation_cache  # the run goes on, compiling as without a cache
        finally:
            jax.config.update("jax_enable_compilation_cache", enabled)
        warning = capsys.readouterr().err
        assert warning.startswith(f"warning: no compilation cache in {unusable} (") and warning.count("\n") == 1


def test_every_flag_sets_the_config_field_it_names_and_nothing_else():
    config, _ = train.parse_args([
        "--dataset", "cifar10", "--labels", "coarse_label", "--steps", "11", "--batch-size", "24",
        "--width", "0.3", "--seed", "5", "--dtype", "bfloat16", "--learning-rate", "0.07", "--weight-decay", "0.001",
        "--augment", "none", "--depthwise-impl", "shift_add", "--parallel", "pmap", "--dropout", "0.2",
        "--block", "standard", "--log-every", "9", "--steps-per-call", "3", "--keep-checkpoints", "2"])
    assert config == Config(
        dataset="cifar10", label_key="coarse_label", steps=11, batch_size=24, width=0.3, seed=5,
        dtype="bfloat16", learning_rate=0.07, weight_decay=0.001, augment="none", depthwise_impl="shift_add",
        parallel="pmap", dropout_rate=0.2, block="standard", log_every_steps=9, steps_per_call=3,
        keep_checkpoints=2)
    assert train.parse_args([])[0] == Config()  # no flag: the default recipe, untouched
    assert train.parse_args(["--epochs", "7"])[0] == Config(epochs=7)  # --epochs and --steps: one or the other


def test_train_help_lists_the_promised_flags():
    out = cli("minimobile.train", "--help").stdout
    for flag in ("--dataset", "--data-dir", "--workdir", "--epochs", "--batch-size", "--width", "--seed",
                 "--recipe", "--dtype"):
        assert flag in out
    # Every option says what it does, and the recipes' values are listed as the flags that set them:
    # passing a recipe's listed flags to the default recipe gives that recipe's settings for them.
    assert "--learning-rate LEARNING_RATE\n " in out and "--num-processes NUM_PROCESSES\n " in out
    recipes = " ".join(out.split("recipes (")[1].split())           # the list, unwrapped
    seed_line = recipes.split(" seed: ")[1].split(" seed-tf: ")[0]  # "mobilenet_v1, adam (...), --dataset ..."
    flags = seed_line[seed_line.index("--"):].split()
    config, _ = train.parse_args(flags)
    seed = recipe("seed")
    assert (config.epochs, config.batch_size, config.learning_rate, config.augment) == (
        seed.epochs, seed.batch_size, seed.learning_rate, seed.augment) == (50, 4096, 1e-3, "seed")


def test_the_recipes_are_the_settings_readme_gives_them():
    # README's Train table, field by field: what a user is told each recipe trains with.
    default, seed = recipe("default"), recipe("seed")
    assert (default.optimizer, default.momentum, default.learning_rate, default.batch_size) == ("sgd", 0.9, 0.2, 256)
    assert (default.warmup_epochs, default.schedule, default.weight_decay) == (5.0, "cosine", 5e-4)
    assert (default.label_smoothing, default.augment, default.epochs, default.dtype) == (0.1, "standard", 200, "auto")
    # The original report: Adam 1e-3, plain cross-entropy, its torchvision augmentations, batch 4096, 50 epochs.
    assert (seed.optimizer, seed.learning_rate, seed.schedule, seed.warmup_epochs) == ("adam", 1e-3, "constant", 0.0)
    assert (seed.label_smoothing, seed.weight_decay, seed.augment) == (0.0, 0.0, "seed")
    assert (seed.batch_size, seed.epochs, seed.model) == (4096, 50, "mobilenet_v1")


@pytest.mark.parametrize("name", ["default", "seed", "seed-tf", "seed-tf-ours"])
def test_a_saved_config_reads_back_as_the_same_config(name):
    # config.json is how a resumed or evaluated run learns its settings: JSON has no tuples, so a list
    # read back must become the tuple again, or eval_at_steps would always look changed on a resume.
    config = recipe(name)
    assert Config.from_json(config.to_json()) == config
