"""How fast is it? The train step, the eval step and the input pipeline, in images per second.

    python -m minimobile.bench                                   # width 1.0, batch 128, float32, auto
    python -m minimobile.bench --compare torch                   # and PyTorch's, in the same run
    python -m minimobile.bench --all-impls --width 0.25          # one row per depthwise implementation but split
    python -m minimobile.bench --json | tail -n 1                # one JSON object, for scripts
    python -m minimobile.bench --per-layer --compare torch       # each layer alone: where the time goes

What is timed is exactly what the trainer runs: the compiled call `train.build_run` makes from the
default recipe at the given width and batch (CIFAR stem, 100 classes) on one device, over a dataset of
random uint8 pictures [N, 32, 32, 3] on the device: each step gathers its batch, augments (pad-4 crop
+ flip), normalises and steps, with as many steps per call as the trainer makes (16 on CPU for the
default network, `steps.auto_steps_per_call`) and the state donated from call to call.
`--steps-per-call 1` times one call per step, the way an eager framework runs. The eval column is
the trainer's evaluation too: one call over a test split of `--steps` batches, a scan on the device.
Compilation happens first and is reported on its own; then `--repeats` timed runs of `--steps` steps
each (16 by default), and we report the median. With `--compare torch` the same
architecture in PyTorch (`torch_reference.py`: channels_last, SGD with Nesterov momentum,
cross-entropy, as many threads as cores, one fixed batch, no augmentation) runs interleaved with ours,
repeat by repeat, so both see the same machine load, and the ratio of the medians is printed, with
the ratio of the fastest repeats beside it. These are measurements,
not tests: on a shared machine they move by tens of percent from run to run, so compare figures from
one run only. Other processes on the same cores hurt PyTorch's OpenMP threads far more than XLA's; for
a comparison that load cannot tilt, pin both to one core: `taskset -c 0 python -m minimobile.bench ...`.

Mult-adds per second follow the paper's convention (`costs.py`: every kernel tap of every output, SAME
padding included), and count a train step as 3x the forward pass (forward, then the gradients with
respect to the activations and to the weights, each about one forward's worth).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from minimobile import augment as augment_lib
from minimobile import costs
from minimobile import data as data_lib
from minimobile import parallel as parallel_lib
from minimobile import steps as steps_lib
from minimobile import train as train_lib
from minimobile.config import Config
from minimobile.errors import ArgumentParser, UserError, exit_on_user_error
from minimobile.layers import DEPTHWISE_IMPLS, ConvBN, resolve_depthwise_impl
from minimobile.model import MAX_WIDTH

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 100
TRAIN_MACS_PER_FORWARD = 3  # forward + activation gradients + weight gradients

# A timed function runs `n` steps and returns when the last result is ready.
Runner = Callable[[int], None]


def cpu_count() -> int:
    """Cores this process may use (what both frameworks should use too)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# What we time, on the JAX side.
# --------------------------------------------------------------------------------------------


def bench_config(width: float, batch_size: int, dtype: str, depthwise_impl: str,
                 steps_per_call: int = Config.steps_per_call) -> Config:
    """The default recipe at this size: same optimizer, decay, augmentation and label smoothing as a real run."""
    return Config(width=width, batch_size=batch_size, dtype=dtype, depthwise_impl=depthwise_impl,
                  steps_per_call=steps_per_call, parallel="jit")


def random_dataset(num_train: int, num_test: int = NUM_CLASSES, seed: int = 0) -> data_lib.Dataset:
    """Random uint8 pictures shaped like CIFAR-100's: what a step costs does not depend on what they show."""
    rng = np.random.default_rng(seed)
    split = lambda n: data_lib.Split(rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8),
                                     np.arange(n, dtype=np.int32) % NUM_CLASSES)
    return data_lib.Dataset("random", split(num_train), split(num_test), NUM_CLASSES,
                            tuple(f"class {i}" for i in range(NUM_CLASSES)),
                            mean=(129.3, 124.1, 112.4), std=(68.2, 65.4, 70.4))  # CIFAR-100's, near enough


def jax_runners(config: Config, eval_batches: int = steps_lib.LOOP_STEPS_PER_CALL
                ) -> tuple[Runner, Runner, float, int]:
    """The trainer's compiled call and its evaluation: (train, evaluate, compile seconds, steps per call).

    `train(n)` runs n steps exactly as `python -m minimobile.train` runs them on one device: the call
    `train.build_run` compiles (each step picks its batch from a uint8 dataset on the device, augments and
    normalises it, then steps), as many steps per call as the trainer makes, each call feeding the next its
    donated state (donation lets XLA update parameters and optimizer moments in place). `evaluate(n)`
    runs the trainer's own evaluation (`Run.evaluate`: one call, a `lax.scan` over the test split's
    batches, never augmented, running BatchNorm statistics) over a test split of `eval_batches` batches,
    n / eval_batches times. Like the train loop, the scan reuses one call's scratch memory for every
    batch: one call per batch would pay the page faults of fresh scratch memory each time (on 2 CPU
    cores, width 1.0, batch 128, 2,260 img/s against the scan's 2,920).
    """
    dataset = random_dataset(4 * config.batch_size, eval_batches * config.batch_size)
    run = train_lib.build_run(config, dataset, parallel_lib.setup("jit"))
    order = run.epoch_order(0)
    start = time.perf_counter()
    compiled = run.step_fn.lower(*run.step_args(run.state, order, 1)).compile()
    compile_s = time.perf_counter() - start
    box = {"state": run.state}

    def train(n: int) -> None:
        state = box["state"]
        while n > 0:
            k = min(n, run.steps_per_call)
            state, metrics = compiled(*run.step_args(state, order, k))
            n -= k
        jax.block_until_ready(metrics)
        box["state"] = state

    def evaluate(n: int) -> None:
        if n % eval_batches:
            raise ValueError(f"evaluate runs whole test splits of {eval_batches} batches, not {n}")
        for _ in range(n // eval_batches):
            run.evaluate(box["state"])  # returns host numbers: the device has finished

    train(1)  # the first call also allocates; keep it out of the timings
    evaluate(eval_batches)
    return train, evaluate, compile_s, run.steps_per_call


def input_pipeline_runner(batch_size: int, augment: str = "standard", num_images: int = 50_000) -> Runner:
    """What `steps.train_step_on_device_data` does before the model: gather, augment, normalise.

    A CIFAR-sized uint8 training set [N, 32, 32, 3] sits on the device; each call picks B random
    examples, augments each with its own key and normalises them, in one jitted program.
    """
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (num_images, *IMAGE_SHAPE), dtype=np.uint8))
    mean, std = (129.3, 124.1, 112.4), (68.2, 65.4, 70.4)  # CIFAR-100's, near enough for timing

    @jax.jit
    def pipeline(images, key):
        index_key, augment_key = jax.random.split(key)
        indices = jax.random.randint(index_key, (batch_size,), 0, num_images)      # [B]
        keys = augment_lib.example_keys(augment_key, jnp.arange(batch_size))       # [B] keys
        x = augment_lib.augment_batch(keys, images[indices], augment)              # [B, 32, 32, 3] float32
        return augment_lib.normalize(x, mean, std)

    def run(n: int) -> None:
        for i in range(n):
            out = pipeline(images, jax.random.key(i))
        jax.block_until_ready(out)

    run(1)
    return run


# --------------------------------------------------------------------------------------------
# The same on the PyTorch side (optional).
# --------------------------------------------------------------------------------------------


def import_torch():
    """PyTorch, or one sentence saying how to install it (or why it would not load)."""
    try:
        import torch
    except ImportError:
        raise UserError("--compare torch needs PyTorch: pip install 'minimobile[torch]'.") from None
    except OSError as e:  # installed, but a library of its own (CUDA's, say) would not load
        raise UserError(f"PyTorch is installed but would not load ({e}); reinstall it, or drop --compare.") from None
    return torch


def torch_runners(width: float, batch_size: int, threads: int, dtype: str = "float32") -> tuple[Runner, Runner]:
    """PyTorch's train step and eval forward for the same network, channels_last.

    On the GPU when JAX is on one and torch has CUDA, else on the CPU with `threads` threads. bfloat16
    runs under `torch.autocast`, PyTorch's usual mixed precision (float32 weights, bf16 compute).
    """
    torch = import_torch()
    from minimobile import torch_reference

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    # Let cuDNN time its kernels for these shapes and keep the fastest, as PyTorch users training a
    # fixed shape do (the warm-up steps below pay for the search); XLA autotunes its own by default.
    torch.backends.cudnn.benchmark = device == "cuda"
    torch.manual_seed(0)
    model = torch_reference.MobileNetV1(NUM_CLASSES, width).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, *IMAGE_SHAPE[:2], device=device).contiguous(
        memory_format=torch.channels_last)  # NCHW shape, NHWC in memory, like our arrays
    y = torch.arange(batch_size, device=device) % NUM_CLASSES
    half = torch.bfloat16 if dtype == "bfloat16" else None
    train_step = torch_reference.make_train_step(model, autocast_dtype=half)
    finish = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # CPU torch is synchronous

    def train(n: int) -> None:
        model.train()
        for _ in range(n):
            train_step(x, y)
        finish()

    def evaluate(n: int) -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast(device, dtype=half, enabled=half is not None):
            for _ in range(n):
                model(x)
        finish()

    train(1)
    evaluate(1)
    return train, evaluate


# --------------------------------------------------------------------------------------------
# Layer by layer: where the step's time goes, in both frameworks.
# --------------------------------------------------------------------------------------------


def network_layers(width: float):
    """(name, kind, c_in, c_out, stride, input height) of each conv layer of the CIFAR-stem network, in order.

    Read off the cost table (`costs.py`), which walks Table 1 the way the model does.
    """
    kinds = {"conv": "full", "dw": "depthwise", "pw": "pointwise"}
    convs = [layer for layer in costs.mobilenet_v1_layers(width, IMAGE_SHAPE[0], NUM_CLASSES, "cifar")
             if layer.kind in kinds]
    for i, layer in enumerate(convs):
        name = "stem" if i == 0 else f"block{(i + 1) // 2:02d} {kinds[layer.kind]}"
        yield name, kinds[layer.kind], layer.input_shape[2], layer.output_shape[2], layer.stride, layer.input_shape[0]


def layer_runners(kind: str, c_in: int, c_out: int, stride: int, height: int, batch_size: int,
                  depthwise_impl: str, torch_threads: int | None) -> dict[str, Runner]:
    """Forward + backward of one conv -> BatchNorm -> ReLU6 layer in training mode, in JAX (and PyTorch).

    The loss is sum(y * r) for a fixed random r, and the gradient is taken with respect to the
    parameters and, except for the stem (whose input is the images), the input, as in a train step.
    """
    ho = -(-height // stride)
    module = ConvBN(c_out, conv=kind, strides=stride, depthwise_impl=resolve_depthwise_impl(depthwise_impl))
    x = jax.random.normal(jax.random.key(0), (batch_size, height, height, c_in))  # [B, H, W, C_in]
    variables = module.init(jax.random.key(1), x, True)
    r = jax.random.normal(jax.random.key(2), (batch_size, ho, ho, c_out))           # [B, H', W', C_out]

    def loss(params, x):
        y, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, True,
                            mutable=["batch_stats"])
        return jnp.sum(y * r)

    grad = jax.jit(jax.grad(loss, argnums=0 if kind == "full" else (0, 1)))
    runners = {"jax": lambda n: jax.block_until_ready([grad(variables["params"], x) for _ in range(n)])}
    if torch_threads is not None:
        torch = import_torch()
        from minimobile import torch_reference
        torch.set_num_threads(torch_threads)
        layer = torch_reference.ConvBN(c_in, c_out, 3 if kind != "pointwise" else 1, stride,
                                       groups=c_in if kind == "depthwise" else 1).to(memory_format=torch.channels_last)
        xt = torch.randn(batch_size, c_in, height, height).to(memory_format=torch.channels_last)
        xt.requires_grad_(kind != "full")
        rt = torch.randn(batch_size, c_out, ho, ho).to(memory_format=torch.channels_last)

        def torch_run(n: int) -> None:
            for _ in range(n):
                layer.zero_grad(set_to_none=True)
                xt.grad = None
                (layer(xt) * rt).sum().backward()

        runners["torch"] = torch_run
    for run in runners.values():
        run(1)  # compile / warm up
    return runners


def per_layer(width: float, batch_size: int, depthwise_impl: str, repeats: int, steps_per_repeat: int,
              compare: str | None, log: Callable[[str], None] = print) -> list[dict]:
    """Milliseconds per forward + backward of each layer: [{name, kind, jax_ms, torch_ms?}, ...]."""
    rows, compiled = [], {}
    for name, kind, c_in, c_out, stride, height in network_layers(width):
        log(f"timing {name} ({c_in} -> {c_out}, stride {stride}, {height}x{height}) ...")
        shape = (kind, c_in, c_out, stride, height)
        if shape not in compiled:  # the five identical rows of Table 1 (512 -> 512) share one program
            compiled[shape] = layer_runners(*shape, batch_size, depthwise_impl,
                                            cpu_count() if compare == "torch" else None)
        runners = compiled[shape]
        seconds = interleaved_timings(runners, repeats, steps_per_repeat)
        rows.append({"name": name, "kind": kind,
                     **{f"{k}_ms": round(1e3 * statistics.median(v), 3) for k, v in seconds.items()}})
    return rows


def format_per_layer(rows: list[dict]) -> str:
    """One line per layer, then the sums by kind (stem, depthwise, pointwise)."""
    torch_too = "torch_ms" in rows[0]
    lines = [f"{'layer':22s} {'ours ms':>9s}" + (f" {'torch ms':>9s} {'torch/ours':>10s}" if torch_too else "")]
    for kind in (None, "full", "depthwise", "pointwise"):
        picked = rows if kind is None else [r for r in rows if r["kind"] == kind]
        if kind is not None:
            picked = [{"name": f"all {kind if kind != 'full' else 'stem'}", "jax_ms": sum(r["jax_ms"] for r in picked),
                       **({"torch_ms": sum(r["torch_ms"] for r in picked)} if torch_too else {})}]
        for r in picked:
            line = f"{r['name']:22s} {r['jax_ms']:9.2f}"
            if torch_too:
                line += f" {r['torch_ms']:9.2f} {r['torch_ms'] / r['jax_ms']:9.2f}x"
            lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


def interleaved_timings(runners: dict[str, Runner], repeats: int, steps_per_repeat: int) -> dict[str, list[float]]:
    """Seconds per step of each runner in each repeat, timed in turns (a, b, a, b, ...) so they share the load."""
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            # A pause, untimed: both frameworks' worker threads spin for a while after their work,
            # and would otherwise steal the first moments of the next runner's cores.
            time.sleep(0.1)
            start = time.perf_counter()
            run(steps_per_repeat)
            seconds[name].append((time.perf_counter() - start) / steps_per_repeat)
    return seconds


def benchmark(width: float = 1.0, batch_size: int = 128, dtype: str = "float32", impls: tuple[str, ...] = ("auto",),
              repeats: int = 5, steps_per_repeat: int | None = None, compare: str | None = None,
              pipeline: bool = True, log: Callable[[str], None] = print,
              steps_per_call: int = Config.steps_per_call) -> dict:
    """Runs the benchmark and returns its figures (see `main` for the printed form).

    steps_per_call 0 (the default) makes calls as the trainer does (`steps.auto_steps_per_call`).
    """
    steps_per_repeat = steps_per_repeat or steps_lib.LOOP_STEPS_PER_CALL
    macs = costs.totals(costs.mobilenet_v1_layers(width, IMAGE_SHAPE[0], NUM_CLASSES, "cifar"))["macs"]
    threads = cpu_count()
    result = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
              "cpu_count": threads, "width": width, "batch_size": batch_size, "dtype": dtype,
              "macs_per_image": macs, "repeats": repeats, "steps_per_repeat": steps_per_repeat,
              "steps_per_call_asked": steps_per_call,
              "load_average_start": round(os.getloadavg()[0], 2), "impls": {}}
    train, evaluate = {}, {}
    for impl in impls:
        config = bench_config(width, batch_size, dtype, impl, steps_per_call)
        name = resolve_depthwise_impl(impl)
        log(f"compiling the train step ({name}) ...")
        train[name], evaluate[name], compile_s, per_call = jax_runners(config, steps_per_repeat)
        # The calls a repeat makes: the trainer's count, unless a repeat has fewer steps than that.
        result["impls"][name] = {"compile_s": round(compile_s, 2), "steps_per_call": min(per_call, steps_per_repeat),
                                 "trainer_steps_per_call": per_call}
    if compare == "torch":
        log("building the PyTorch reference ...")
        try:
            train["torch"], evaluate["torch"] = torch_runners(width, batch_size, threads, dtype)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - out of GPU memory, a kernel it lacks: our figures still count
            result["torch_error"] = f"{type(e).__name__}: {e}"[:300]
            log(f"PyTorch failed ({result['torch_error']}); timing ours alone.")
    if pipeline:
        log("compiling the input pipeline ...")
        pipeline_run = input_pipeline_runner(batch_size)

    log(f"timing: {repeats} repeats x {steps_per_repeat} steps, interleaved ...")
    train_s = interleaved_timings(train, repeats, steps_per_repeat)
    eval_s = interleaved_timings(evaluate, repeats, steps_per_repeat)
    for name in train_s:
        entry = result["impls"].setdefault(name, {}) if name != "torch" else result.setdefault("torch", {})
        train_median, eval_median = statistics.median(train_s[name]), statistics.median(eval_s[name])
        entry["images_per_sec"] = round(batch_size / train_median, 1)
        # The fastest repeat: what the step does when nothing else runs (PyTorch's threads suffer
        # more than XLA's when other processes share the cores, so on a busy machine compare these too).
        entry["best_images_per_sec"] = round(batch_size / min(train_s[name]), 1)
        entry["eval_images_per_sec"] = round(batch_size / eval_median, 1)
        entry["train_macs_per_sec"] = round(TRAIN_MACS_PER_FORWARD * macs * batch_size / train_median)
        entry["eval_macs_per_sec"] = round(macs * batch_size / eval_median)
    if pipeline:
        pipeline_s = statistics.median(interleaved_timings({"pipeline": pipeline_run}, repeats, steps_per_repeat)["pipeline"])
        result["input_pipeline_images_per_sec"] = round(batch_size / pipeline_s, 1)

    # The headline: the first implementation asked for (the default "auto": what training uses).
    first = result["impls"][resolve_depthwise_impl(impls[0])]
    result.update(depthwise_impl=resolve_depthwise_impl(impls[0]), steps_per_call=first["steps_per_call"],
                  images_per_sec=first["images_per_sec"],
                  eval_images_per_sec=first["eval_images_per_sec"], compile_s=first["compile_s"],
                  train_macs_per_sec=first["train_macs_per_sec"])
    if "torch" in result:
        result["torch_images_per_sec"] = result["torch"]["images_per_sec"]
        result["ratio"] = round(first["images_per_sec"] / result["torch"]["images_per_sec"], 3)
        result["best_ratio"] = round(first["best_images_per_sec"] / result["torch"]["best_images_per_sec"], 3)
        result["eval_ratio"] = round(first["eval_images_per_sec"] / result["torch"]["eval_images_per_sec"], 3)
        result["torch_version"] = import_torch().__version__  # loaded already, by torch_runners
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    return result


def calls_phrase(result: dict) -> str:
    n, trainer = result["steps_per_call"], result["impls"][result["depthwise_impl"]]["trainer_steps_per_call"]
    how = "as the trainer makes them" if not result["steps_per_call_asked"] else "as --steps-per-call asked"
    if n < trainer:
        how += f" ({trainer}), but --steps is {result['steps_per_repeat']}"
    up_to = "up to " if result["steps_per_repeat"] % n else ""  # e.g. 20 steps: a call of 16, then one of 4
    return f"{up_to}{n} step{'s' * (n > 1)} per call, {how}"


def format_table(result: dict) -> str:
    """The human-readable report: one row per implementation (and PyTorch)."""
    lines = [f"MobileNet-V1 x{result['width']}, CIFAR stem, 100 classes, batch {result['batch_size']}, "
             f"{result['dtype']}, {result['backend']} ({result['device']}, {result['cpu_count']} cores); "
             f"{result['macs_per_image'] / 1e6:.1f} M mult-adds per image forward, x{TRAIN_MACS_PER_FORWARD} per train step",
             f"median of {result['repeats']} repeats x {result['steps_per_repeat']} steps; ours "
             f"{calls_phrase(result)}; load average "
             f"{result['load_average_start']} -> {result['load_average_end']}",
             f"{'':22s} {'train img/s':>12s} {'(best)':>8s} {'eval img/s':>11s} {'train GMAC/s':>13s} {'compile s':>10s}"]
    rows = list(result["impls"].items()) + ([("torch " + result["torch_version"], result["torch"])]
                                            if "torch" in result else [])
    for name, r in rows:
        compile_s = f"{r['compile_s']:10.1f}" if "compile_s" in r else f"{'-':>10s}"
        lines.append(f"{name:22s} {r['images_per_sec']:12.1f} {r['best_images_per_sec']:8.1f} {r['eval_images_per_sec']:11.1f} "
                     f"{r['train_macs_per_sec'] / 1e9:13.2f} {compile_s}")
    if "torch_error" in result:
        lines.append(f"PyTorch: failed, no comparison ({result['torch_error']})")
    if "ratio" in result:
        lines.append(f"ratio {result['depthwise_impl']} / torch: train {result['ratio']:.2f}x "
                     f"(best repeats {result['best_ratio']:.2f}x), eval {result['eval_ratio']:.2f}x")
    if "input_pipeline_images_per_sec" in result:
        p = result["input_pipeline_images_per_sec"]
        lines.append(f"input pipeline (gather + standard augment + normalise): {p:,.0f} img/s, "
                     f"{p / result['images_per_sec']:.0f}x the train step's")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m minimobile.bench", description=__doc__.split("\n")[0])
    p.add_argument("--width", type=float, default=1.0, help="width multiplier alpha (default 1.0)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (default %(default)s)")
    p.add_argument("--depthwise-impl", default="auto",
                   help=f"auto, or one or more (comma-separated) of {', '.join(DEPTHWISE_IMPLS)}")
    p.add_argument("--all-impls", action="store_true",
                   help="every implementation except 'split' (it compiles one conv per channel: minutes)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats; the median is reported (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="steps per repeat (default 16; 3 with --per-layer)")
    p.add_argument("--steps-per-call", type=int, default=0,
                   help="train steps per compiled call (default 0: as many as the trainer makes; 1 = one call per step)")
    p.add_argument("--compare", choices=("torch",), default=None, help="also time PyTorch, interleaved")
    p.add_argument("--no-pipeline", action="store_true", help="skip the input-pipeline figure")
    p.add_argument("--per-layer", action="store_true",
                   help="instead, time each layer's forward + backward (conv, BatchNorm, ReLU6) on its own, "
                        "in float32")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    impls = tuple(i for i in DEPTHWISE_IMPLS if i != "split") if args.all_impls else \
        tuple(args.depthwise_impl.split(","))
    for impl in impls:
        try:
            resolve_depthwise_impl(impl)
        except ValueError as e:
            raise UserError(f"{e}.") from None
    if not (0 < args.width <= MAX_WIDTH and args.batch_size >= 1):  # the width test also refuses nan
        raise UserError(f"--width must be positive and at most {MAX_WIDTH:g}, --batch-size at least 1.")
    if args.repeats < 1 or (args.steps is not None and args.steps < 1) or args.steps_per_call < 0:
        raise UserError("--repeats and --steps must be at least 1, --steps-per-call at least 0 (auto).")
    if args.per_layer:
        if args.dtype != "float32":
            raise UserError("--per-layer times float32 layers only; drop --dtype.")
        if len(impls) > 1:
            raise UserError("--per-layer times one depthwise implementation at a time; give one --depthwise-impl.")
        print(f"each layer's forward + backward on its own, depthwise {resolve_depthwise_impl(impls[0])}, "
              f"width {args.width:g}, batch {args.batch_size}, float32; median of {args.repeats} repeats", flush=True)
        rows = per_layer(args.width, args.batch_size, impls[0], args.repeats, args.steps or 3, args.compare,
                         log=lambda s: print(s, flush=True))
        print(format_per_layer(rows))
        if args.json:
            print(json.dumps({"width": args.width, "batch_size": args.batch_size,
                              "depthwise_impl": resolve_depthwise_impl(impls[0]), "layers": rows}))
        return
    result = benchmark(args.width, args.batch_size, args.dtype, impls, args.repeats, args.steps, args.compare,
                       pipeline=not args.no_pipeline, log=lambda s: print(s, flush=True),
                       steps_per_call=args.steps_per_call)
    print(format_table(result))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
