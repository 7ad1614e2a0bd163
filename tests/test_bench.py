"""The benchmark runs and reports what it promises; its PyTorch twin is the same network.

No timing is asserted anywhere: figures on a shared machine are measurements, not facts to test.
What is tested is that the comparison is honest: same parameter count, and with the same weights,
the same eval-mode logits.
"""

import json
import sys
import types

import jax
import numpy as np
import pytest

from minimobile import bench
from minimobile.model import MobileNetV1

WIDTH = 0.0625  # every layer of the real network, 2 to 64 channels: compiles in seconds


def test_bench_cli_prints_one_json_object_with_the_figures_and_times_the_trainers_evaluation(capsys, monkeypatch):
    # The eval column is the trainer's own evaluation (`Run.evaluate`, one scan over a test split), each
    # call over a split of --steps (3) whole batches of --batch-size (4): 12 images, once to warm up, then
    # once for the one repeat.
    from minimobile import train

    evaluated = []
    trainers_evaluate = train.Run.evaluate
    monkeypatch.setattr(train.Run, "evaluate", lambda run, state: evaluated.append(
        trainers_evaluate(run, state)[0]["count"]) or (None, None))
    # feature_group_count compiles fastest; `auto` is what the trainer's own tests exercise.
    bench.main(["--width", str(WIDTH), "--batch-size", "4", "--repeats", "1", "--steps", "3",
                "--steps-per-call", "2", "--depthwise-impl", "feature_group_count", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert "train img/s" in "\n".join(out)                    # the human-readable table comes first
    result = json.loads(out[-1])                               # and one JSON object on the last line
    for key in ("images_per_sec", "eval_images_per_sec", "compile_s", "train_macs_per_sec",
                "input_pipeline_images_per_sec", "macs_per_image", "depthwise_impl", "backend"):
        assert key in result, key
    assert result["depthwise_impl"] == "feature_group_count" and result["batch_size"] == 4
    assert result["steps_per_call"] == 2 and result["steps_per_repeat"] == 3
    assert "ours up to 2 steps per call, as --steps-per-call asked" in "\n".join(out)  # a call of 2, then of 1
    assert result["images_per_sec"] > 0 and result["input_pipeline_images_per_sec"] > 0
    assert evaluated == [3 * 4, 3 * 4]


def test_the_table_says_how_many_steps_each_timed_call_ran():
    def phrase(trainer, steps, asked=0):
        n = min(trainer, steps)  # as bench times them: calls of the trainer's count, at most a repeat's steps
        return bench.calls_phrase({"steps_per_call": n, "steps_per_repeat": steps, "steps_per_call_asked": asked,
                                   "depthwise_impl": "x", "impls": {"x": {"trainer_steps_per_call": trainer}}})

    assert phrase(16, 16) == "16 steps per call, as the trainer makes them"
    assert phrase(16, 2) == "2 steps per call, as the trainer makes them (16), but --steps is 2"
    assert phrase(16, 20) == "up to 16 steps per call, as the trainer makes them"  # 16, then 4
    assert phrase(1, 3) == "1 step per call, as the trainer makes them"


def test_per_layer_times_every_conv_layer_of_the_paper_table_once(capsys):
    # One stem, then a depthwise and a pointwise layer per row of Table 1 (13 rows): 27 layers, whose
    # channels are those of the Flax model's own kernels, in the model's order (an independent source).
    bench.main(["--per-layer", "--width", str(WIDTH), "--batch-size", "2", "--repeats", "1", "--steps", "1",
                "--depthwise-impl", "feature_group_count", "--json"])
    layers = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layers"]
    assert [r["kind"] for r in layers] == ["full"] + ["depthwise", "pointwise"] * 13
    assert all(r["jax_ms"] > 0 for r in layers)
    params = MobileNetV1(num_classes=100, width=WIDTH, stem="cifar").init(
        jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)["params"]
    from_model = [params["stem"]["conv"]["kernel"].shape[2:]]                  # [3, 3, 3, C]: (3, C)
    for block in sorted(k for k in params if k.startswith("block")):
        c = params[block]["depthwise"]["depthwise"]["kernel"].shape[3]           # [3, 3, 1, C]: C -> C
        from_model += [(c, c), params[block]["pointwise"]["pointwise"]["kernel"].shape[2:]]  # [1, 1, C_in, C_out]
    assert [(c_in, c_out) for _, _, c_in, c_out, _, _ in bench.network_layers(WIDTH)] == from_model
    # Strides and sizes as Table 1 gives them: the depthwise layers of rows 2, 4, 6 and 12 halve 32 -> 2.
    strides = [stride for _, _, _, _, stride, _ in bench.network_layers(WIDTH)]
    assert [i for i, s in enumerate(strides) if s == 2] == [3, 7, 11, 23]
    assert [h for _, _, _, _, _, h in bench.network_layers(WIDTH)][-1] == 2


def test_a_pytorch_that_fails_costs_the_comparison_only(capsys, monkeypatch):
    # On a lent GPU, PyTorch running out of memory (or its CUDA failing to load) must not throw away
    # our own figures for the same configuration.
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "torch_runners", out_of_memory)
    bench.main(["--width", str(WIDTH), "--batch-size", "4", "--repeats", "1", "--steps", "1", "--no-pipeline",
                "--depthwise-impl", "feature_group_count", "--compare", "torch", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["images_per_sec"] > 0 and "ratio" not in result
    assert result["torch_error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "PyTorch: failed, no comparison (RuntimeError: CUDA out of memory" in "\n".join(out)


@pytest.mark.parametrize("argv, message", [
    (["--depthwise-impl", "winograd"], "error: depthwise_impl must be 'auto' or one of"),
    (["--width", "0"], "error: --width must be positive and at most 16"),
    (["--width", "nan"], "error: --width must be positive and at most 16"),
    (["--batch-size", "0"], "error: --width must be positive and at most 16, --batch-size at least 1."),
    (["--repeats", "0"], "error: --repeats and --steps must be at least 1"),
    (["--steps-per-call", "-1"], "error: --repeats and --steps must be at least 1, --steps-per-call at least 0"),
    (["--per-layer", "--dtype", "bfloat16"], "error: --per-layer times float32 layers only; drop --dtype."),
    (["--per-layer", "--all-impls"], "error: --per-layer times one depthwise implementation at a time"),
    (["--dtype", "float16"], "error: argument --dtype: invalid choice: 'float16'"),  # argparse's own, one line too
])
def test_impossible_settings_are_a_one_line_error_before_anything_is_measured(capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        bench.main(argv)
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and captured.err.startswith(message) and len(captured.err.splitlines()) == 1
    assert captured.out == ""  # refused before building or timing anything


@pytest.fixture(scope="module")
def twins():
    """A Flax model with random variables of every kind, and the PyTorch one with those copied in."""
    torch = pytest.importorskip("torch")
    from minimobile import torch_reference

    flax_model = MobileNetV1(num_classes=100, width=WIDTH, stem="cifar")
    # The variables' structure without running (or compiling) the initialisers; then random values,
    # so every weight, BatchNorm scale, shift and running statistic matters to the check.
    shapes = jax.eval_shape(flax_model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(0)

    def random_like(path, s):
        name = path[-1].key
        if name == "kernel":  # lecun-normal-like, so activations stay in ReLU6's working range
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        low, high = {"scale": (0.5, 1.5), "var": (0.5, 1.5)}.get(name, (-0.2, 0.2))  # bias, mean
        return rng.uniform(low, high, s.shape).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(random_like, shapes)
    torch_model = torch_reference.MobileNetV1(100, WIDTH, same_padding=True)
    torch_reference.load_flax_variables(torch_model, variables)
    return torch, flax_model, variables, torch_model


def test_pytorch_reference_has_the_same_parameter_count(twins):
    torch, _, variables, torch_model = twins
    # Trainable parameters on both sides: conv kernels, BatchNorm scale and shift, the classifier.
    flax_count = sum(np.size(p) for p in jax.tree.leaves(variables["params"]))
    assert sum(p.numel() for p in torch_model.parameters()) == flax_count
    # And the idiomatic padding=1 model the benchmark times has the very same parameters.
    from minimobile import torch_reference
    timed = torch_reference.MobileNetV1(100, WIDTH)
    assert [p.shape for p in timed.parameters()] == [p.shape for p in torch_model.parameters()]


def test_same_weights_give_the_same_eval_logits(twins):
    torch, flax_model, variables, torch_model = twins
    images = np.random.default_rng(1).standard_normal((4, 32, 32, 3)).astype(np.float32)  # [B, H, W, C]
    expected = flax_model.apply(variables, images, train=False)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # NCHW view
    with torch.no_grad():
        got = torch_model.eval()(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bfloat16_compute_is_as_accurate_as_pytorch_autocast(twins, train):
    # The GPU trains in bfloat16 (`--dtype auto`); PyTorch's usual mixed precision is autocast. Both
    # are measured against the same network in float64, on real pictures. In eval mode both stay
    # within a fraction of a percent. In train mode both are off by about 25 %: BatchNorm divides by
    # each channel's spread over the batch, and where a channel barely varies (ReLU6 saturated or
    # off for most images) that amplifies bf16's rounding. That is the network's property, not a
    # flaw of ours: PyTorch's error is the same to within 2 % of itself (measured for 3 random
    # weight draws at widths 1/16 and 1/4: ratios 0.99-1.02 in train mode, 0.39-0.55 in eval).
    import copy

    torch, flax_model, variables, torch_model = twins
    from minimobile.assets import load_cifar100_sample

    images = (load_cifar100_sample()["image"][::10][:32].astype(np.float32) - 127.5) / 64.0  # [32, 32, 32, 3]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # copies: a train-mode forward updates the running statistics
        exact = copy.deepcopy(torch_model).double().train(train)(x.double()).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = copy.deepcopy(torch_model).train(train)(x).float().numpy()
    bf16 = MobileNetV1(num_classes=100, width=WIDTH, stem="cifar", dtype=jax.numpy.bfloat16)
    ours = bf16.apply(variables, images, train=train, mutable=["batch_stats"])[0] if train else \
        bf16.apply(variables, images, train=False)
    error = lambda logits: np.linalg.norm(np.asarray(logits, np.float64) - exact) / np.linalg.norm(exact)
    assert error(ours) <= 1.1 * error(theirs), (error(ours), error(theirs))
    if not train:
        assert error(ours) < 0.01


@pytest.mark.slow
def test_the_gpu_check_runs_every_section_and_writes_its_table(tmp_path):
    # A lent GPU gives one try: this dry run on the CPU (tiny sizes, ~2 minutes) is how to know the
    # script will get through all of it. `pytest -m slow tests/test_bench.py` before a device session.
    from minimobile import gpu_check

    out = tmp_path / "gpu_check.txt"
    gpu_check.main(["--out", str(out), "--allow-cpu", "--width", str(WIDTH), "--batch-size", "8", "--repeats", "1",
                    "--steps", "2", "--sweep", "4", "--budget-s", "1000"])
    text = out.read_text()
    rows = [json.loads(line) for line in text.split("\n\n")[0].splitlines()]
    kinds = [r["what"] for r in rows]
    assert "error" not in kinds and "skipped" not in kinds, rows
    # Every impl x dtype, the default one at the recipe's batch, then the sweep's batch.
    assert kinds.count("train_step") == 2 * len(gpu_check.IMPLS) + 2
    assert "recipe_estimate" in kinds and "| implementation | dtype |" in text
    assert [r["flag"] for r in rows if r["what"] == "deterministic_ops"] == list(gpu_check.DETERMINISM_FLAGS[1:])
    assert {"jax", "flax", "torch"} <= set(rows[0])                       # the machine row: versions too
    assert "| implementation | dtype |" in out.with_suffix(".md").read_text()  # kept current, for a cut-short run


def test_the_gpu_check_without_a_gpu_says_what_to_do_and_measures_nothing(tmp_path):
    from minimobile import gpu_check

    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU: the check would measure it")
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--out", str(tmp_path / "gpu_check.txt")])
    assert "JAX sees no GPU here" in str(stopped.value.code) and "--allow-cpu" in str(stopped.value.code)
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.txt").read_text().splitlines()]
    assert [r["what"] for r in rows] == ["machine", "error"]


@pytest.mark.parametrize("flags, message", [
    (["--sweep", "256,abc"], "argument --sweep: not a whole number: 'abc'"),
    (["--width", "0"], "argument --width: must be positive and finite, got '0'"),
    (["--budget-s", "nan"], "argument --budget-s: must be positive and finite, got 'nan'"),
    (["--out", "OUT/no-such-folder/gpu_check.txt"], "cannot write the results to OUT/no-such-folder/gpu_check.txt "
                                                    "(No such file or directory); choose another --out."),
])
def test_the_gpu_check_refuses_bad_flags_in_one_sentence_before_measuring_anything(tmp_path, capsys, flags, message):
    # On a lent GPU a typo found at step 5 would have spent the minutes of steps 1 to 4.
    from minimobile import gpu_check

    flags = [f.replace("OUT", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--allow-cpu", "--out", str(tmp_path / "gpu_check.txt"), *flags])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and err.startswith("error: " + message.replace("OUT", str(tmp_path))), err
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_the_figures_are_the_timed_steps_images_and_mult_adds_per_second(monkeypatch):
    # No compilation: stand-in runners and timings fixed by hand, so every figure is worked out on paper.
    # Batch 4; ours train [0.5, 0.25, 1.0] s/step (median 0.5, best 0.25), eval median 0.2; PyTorch train
    # [1.0, 2.0, 0.8] (median 1.0, best 0.8), eval median 0.4; the input pipeline median 0.01 s.
    from minimobile import costs

    nothing = lambda n: None
    monkeypatch.setattr(bench, "jax_runners", lambda config, eval_batches: (nothing, nothing, 1.25, 16))
    monkeypatch.setattr(bench, "torch_runners", lambda *args, **kwargs: (nothing, nothing))
    monkeypatch.setattr(bench, "input_pipeline_runner", lambda batch_size: nothing)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="0.0-stand-in"))  # none needed
    timings = iter([{"feature_group_count": [0.5, 0.25, 1.0], "torch": [1.0, 2.0, 0.8]},
                    {"feature_group_count": [0.1, 0.2, 0.4], "torch": [0.4, 0.4, 0.8]},
                    {"pipeline": [0.01, 0.02, 0.005]}])
    monkeypatch.setattr(bench, "interleaved_timings", lambda runners, repeats, steps: next(timings))
    result = bench.benchmark(WIDTH, 4, impls=("feature_group_count",), repeats=3, steps_per_repeat=16,
                             compare="torch", log=lambda line: None)
    macs = costs.totals(costs.mobilenet_v1_layers(WIDTH, 32, 100, "cifar"))["macs"]  # the paper's count
    assert result["macs_per_image"] == macs
    ours = result["impls"]["feature_group_count"]
    assert (ours["images_per_sec"], ours["best_images_per_sec"], ours["eval_images_per_sec"]) == (8.0, 16.0, 20.0)
    assert ours["train_macs_per_sec"] == round(3 * macs * 4 / 0.5)     # forward + two backward passes
    assert ours["eval_macs_per_sec"] == round(macs * 4 / 0.2)
    torch = result["torch"]
    assert (torch["images_per_sec"], torch["best_images_per_sec"], torch["eval_images_per_sec"]) == (4.0, 5.0, 10.0)
    assert (result["ratio"], result["best_ratio"], result["eval_ratio"]) == (2.0, 3.2, 2.0)
    assert (result["images_per_sec"], result["compile_s"], result["input_pipeline_images_per_sec"]) == (8.0, 1.25, 400.0)
    table = bench.format_table(result)
    assert "train 2.00x (best repeats 3.20x), eval 2.00x" in table and "torch 0.0-stand-in" in table
    assert "input pipeline (gather + standard augment + normalise): 400 img/s, 50x the train step's" in table


def test_per_layer_rows_are_named_after_the_models_blocks():
    # The names a --per-layer table prints: the stem, then each Flax block's depthwise and pointwise layer,
    # block01 to block13 as model.MobileNetV1 names its modules (no compilation: the cost table only).
    names = [name for name, *_ in bench.network_layers(WIDTH)]
    params = jax.eval_shape(lambda: MobileNetV1(num_classes=100, width=WIDTH, stem="cifar").init(
        jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False))["params"]
    blocks = sorted(k for k in params if k.startswith("block"))
    assert names == ["stem"] + [f"{b} {kind}" for b in blocks for kind in ("depthwise", "pointwise")]
    assert names[1:3] == ["block01 depthwise", "block01 pointwise"] and names[-1] == "block13 pointwise"


def test_a_repeat_shorter_than_the_trainers_call_reports_the_calls_it_made(monkeypatch):
    # The trainer makes calls of 16 steps; a repeat of 3 steps is one call of 3, and that is what is reported.
    nothing = lambda n: None
    monkeypatch.setattr(bench, "jax_runners", lambda config, eval_batches: (nothing, nothing, 1.0, 16))
    monkeypatch.setattr(bench, "interleaved_timings", lambda runners, repeats, steps: {k: [0.5] for k in runners})
    result = bench.benchmark(WIDTH, 4, impls=("feature_group_count",), repeats=1, steps_per_repeat=3,
                             pipeline=False, log=lambda line: None)
    assert result["steps_per_call"] == 3 and result["impls"]["feature_group_count"]["trainer_steps_per_call"] == 16
    assert "ours 3 steps per call, as the trainer makes them (16), but --steps is 3" in bench.format_table(result)
