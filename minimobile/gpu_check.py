"""The GPU speed check: one command, a few minutes, every figure written to a file as it comes.

    python3 -m minimobile.gpu_check --out gpu_check.txt

On one GPU it times the trainer's train step (the same as `python -m minimobile.bench`), most
important first, since a lent GPU's minutes are few:

  1. the default depthwise implementation ('feature_group_count', what 'auto' picks on GPU) in
     float32 and bfloat16 at batch 1024, MobileNet-V1 x1.0 on 32x32 CIFAR images, interleaved with
     PyTorch's CUDA build on the same network (channels_last; float32, and bf16 under autocast),
     skipped and said so when torch or its CUDA is missing;
  2. what determinism costs: the default ('auto') train step in bfloat16 at batch 1024, as it is,
     with XLA_FLAGS=--xla_gpu_deterministic_ops=true (deterministic kernels, and no autotuning:
     XLA then takes its default kernel for each operation), and with
     --xla_gpu_exclude_nondeterministic_ops=true (deterministic kernels, still autotuned), each in a
     fresh process, since XLA reads its flags when it starts; and the ratios;
  3. the default in bfloat16 at the default recipe's batch (256), beside PyTorch, and what that makes
     the recipe's 200 epochs of CIFAR-100 take;
  4. every other depthwise implementation (except 'split', which compiles one conv per channel) in
     both dtypes at the batch of step 1;
  5. the fastest implementation in bfloat16 at batch 256 and 4096, to see where the GPU fills up.

Each line of the output file is one measurement as JSON (a skipped one too), then a readable table
at the end; the table is also rewritten after every measurement beside it (`--out` with `.md`), so a
run cut short still leaves both. Budget: `--budget-s` of measuring, by default what keeps the whole
check under 5 minutes, most important first; what does not fit is skipped and listed, and a larger
`--budget-s` measures more of it. A measurement begun in time may run on, the fresh processes of
step 2 at most OVERRUN_S past it. Compiles dominate (tens of seconds each).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time

# Leave GPU memory for PyTorch's side of the comparison (JAX takes 75 % up front by default).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import jax  # noqa: E402

from minimobile import bench  # noqa: E402
from minimobile.config import Config  # noqa: E402
from minimobile.errors import ArgumentParser, UserError, exit_on_user_error  # noqa: E402
from minimobile.layers import DEPTHWISE_IMPLS, resolve_depthwise_impl  # noqa: E402

IMPLS = tuple(i for i in DEPTHWISE_IMPLS if i != "split")
DTYPES = ("float32", "bfloat16")
SWEEP_BATCH_SIZES = (256, 1024, 4096)  # CIFAR images are small: 4096 is ~20 GB of activations
RECIPE = Config()  # the default recipe: batch 256, 200 epochs
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000  # images in CIFAR-100's splits
CHILD_TIMEOUT_S = 150  # step 2's fresh processes: start, compile and time one configuration
OVERRUN_S = 60         # how far past --budget-s step 2's processes may run (a command has a limit)
BUDGET_S = 210.0       # the default --budget-s: with OVERRUN_S and start-up, the whole check in 5 minutes
DETERMINISM_FLAGS = ("", "--xla_gpu_deterministic_ops=true", "--xla_gpu_exclude_nondeterministic_ops=true")


def gpu_name() -> str:
    """The accelerator as nvidia-smi names it, or JAX's device kind."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out or jax.devices()[0].device_kind
    except (OSError, subprocess.SubprocessError):
        return jax.devices()[0].device_kind


def train_in_fresh_process(args, xla_flag: str, timeout_s: float) -> float | str:
    """Train images/s of the default step (bfloat16) in a new process with `xla_flag` added to XLA_FLAGS.

    A new process because XLA reads its flags once, when it starts. Returns an error message instead
    when the child fails or outlives `timeout_s` (a hung child must not eat a lent GPU's minutes).
    """
    # This process already holds 0.6 of the GPU; the child takes memory as it needs it, up to 0.3.
    env = {**os.environ, "XLA_FLAGS": " ".join(filter(None, (os.environ.get("XLA_FLAGS", ""), xla_flag))),
           "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    cmd = [sys.executable, "-m", "minimobile.bench", "--width", str(args.width), "--batch-size", str(args.batch_size),
           "--dtype", "bfloat16", "--repeats", str(args.repeats), "--steps", str(args.steps), "--no-pipeline", "--json"]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"no result within {timeout_s:.0f} s"
    try:
        return float(json.loads(out.stdout.strip().splitlines()[-1])["images_per_sec"])
    except (IndexError, ValueError, KeyError):
        return (out.stderr or out.stdout)[-500:]


def positive(kind: type):
    """An argparse type: a positive, finite `kind`; anything else is argparse's one-line refusal."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'a whole' if kind is int else 'a'} number: {text!r}") from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"must be positive and finite, got {text!r}")
        return value
    return parse


def batch_sizes(text: str) -> list[int]:
    """--sweep: "256,1024,4096". Checked before anything is measured: a lent GPU's minutes are few."""
    return [positive(int)(b) for b in text.split(",")]


@exit_on_user_error
def main(argv=None) -> None:
    p = ArgumentParser(prog="python3 -m minimobile.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check.txt", help="results file (JSON lines, then a table)")
    p.add_argument("--width", type=positive(float), default=1.0)
    p.add_argument("--batch-size", type=positive(int), default=1024, help="batch for the per-implementation table")
    p.add_argument("--repeats", type=positive(int), default=5)
    p.add_argument("--steps", type=positive(int), default=16, help="steps per timed repeat")
    p.add_argument("--sweep", type=batch_sizes, default=",".join(map(str, SWEEP_BATCH_SIZES)),
                   help="batch sizes for step 5, comma-separated (default: %(default)s)")
    p.add_argument("--budget-s", type=positive(float), default=BUDGET_S,
                   help="stop starting new measurements after this many seconds (default: %(default)s, so that "
                        "the whole check takes under 5 minutes; more measures more rows)")
    p.add_argument("--allow-cpu", action="store_true", help="a dry run of this script without a GPU (use tiny sizes)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows: list[dict] = []
    skipped: list[str] = []

    table_path = pathlib.Path(args.out).with_suffix(".md")
    try:
        f = open(args.out, "w")
    except OSError as e:
        raise UserError(f"cannot write the results to {args.out} ({e.strerror or e}); choose another --out.") from None
    with f:
        def write(row: dict) -> None:
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)
            table_path.write_text(table(rows) + "\n")  # as it stands: a run cut short keeps it

        write({"what": "machine", "date": datetime.date.today().isoformat(), "gpu": gpu_name(),
               "backend": jax.default_backend(), "python": platform.python_version(), **versions(),
               "width": args.width, "repeats": args.repeats, "steps": args.steps})

        elapsed = lambda: time.perf_counter() - start

        def skip(label: str) -> None:
            skipped.append(label)
            write({"what": "skipped", "config": label, "at_s": round(elapsed())})

        def over_budget(label: str) -> bool:
            if elapsed() > args.budget_s:
                skip(label)
                return True
            return False

        def measure(impl: str, dtype: str, batch_size: int, compare: str | None = None) -> dict | None:
            """Times one configuration and writes its row; returns it (None if skipped or failed)."""
            label = f"{impl} {dtype} batch {batch_size}" + (" + torch" if compare else "")
            if over_budget(label):
                return None
            try:
                r = bench.benchmark(args.width, batch_size, dtype, (impl,), args.repeats, args.steps,
                                    compare=compare, pipeline=False, log=lambda s: None)
            except Exception as e:  # one failing configuration (say, out of memory) must not cost the rest
                write({"what": "error", "config": label, "error": f"{type(e).__name__}: {e}"[:500]})
                return None
            finally:
                if compare:  # PyTorch keeps the memory it freed for itself; give it back to JAX
                    gc.collect()
                    sys.modules["torch"].cuda.empty_cache()
            row = {"what": "train_step", "impl": impl, "dtype": dtype, "batch_size": batch_size,
                   "images_per_sec": r["images_per_sec"], "eval_images_per_sec": r["eval_images_per_sec"],
                   "compile_s": r["compile_s"], "train_tflops": round(2 * r["train_macs_per_sec"] / 1e12, 2)}
            if "torch_error" in r:
                row.update(torch_error=r["torch_error"])
            if "torch" in r:
                row.update(torch_images_per_sec=r["torch"]["images_per_sec"], ratio=r["ratio"],
                           torch_eval_images_per_sec=r["torch"]["eval_images_per_sec"],
                           torch_version=r["torch_version"])
            write(row)
            return row

        if jax.default_backend() != "gpu" and not args.allow_cpu:
            write({"what": "error", "error": f"JAX sees no GPU (backend {jax.default_backend()}): nothing measured"})
            raise SystemExit(f"error: JAX sees no GPU here (backend {jax.default_backend()}), so nothing was measured; "
                             "install JAX's CUDA build (pip install -e '.[cuda12]', or '.[cuda13]'), "
                             "or pass --allow-cpu for a dry run.")
        try:
            import torch

            compare = "torch" if torch.cuda.is_available() else None
            why_not = "torch has no CUDA here"
        except Exception as e:  # noqa: BLE001 - not installed, or its CUDA libraries would not load
            compare, why_not = None, f"torch would not import ({type(e).__name__}: {e})"[:300]
        if compare is None:
            write({"what": "note", "note": f"{why_not}: PyTorch comparison skipped"})

        # 1. The default implementation, both dtypes, one large batch, PyTorch beside it.
        default = resolve_depthwise_impl("auto")  # feature_group_count on a GPU
        for dtype in DTYPES:
            measure(default, dtype, args.batch_size, compare)
        # 2. The cost of deterministic GPU kernels (README, Reliability): the same step without the flags,
        # then with each, every flagged run against the plain one (so without it they are skipped).
        plain, *determinism = DETERMINISM_FLAGS
        if not over_budget(f"auto bfloat16 batch {args.batch_size} with and without {' or '.join(determinism)}"):
            timeout_s = lambda: min(CHILD_TIMEOUT_S, args.budget_s + OVERRUN_S - elapsed())
            timed = {}
            for flag in DETERMINISM_FLAGS:  # the plain run first: a ratio needs it
                if (timeout := timeout_s()) < 30 or isinstance(timed.get(plain), str):
                    skip(f"auto bfloat16 batch {args.batch_size} XLA_FLAGS+={flag!r}")
                    continue
                timed[flag] = train_in_fresh_process(args, flag, timeout)
                if isinstance(timed[flag], str):
                    write({"what": "error", "config": f"auto bfloat16 batch {args.batch_size} XLA_FLAGS+={flag!r}",
                           "error": timed[flag]})
                elif flag:
                    write({"what": "deterministic_ops", "flag": flag, "batch_size": args.batch_size,
                           "dtype": "bfloat16", "images_per_sec": timed[plain],
                           "deterministic_images_per_sec": timed[flag], "ratio": round(timed[flag] / timed[plain], 3)})
        # 3. As the default recipe trains (its batch, bfloat16): how long its 200 epochs take.
        recipe_row = measure(default, "bfloat16", RECIPE.batch_size, compare)
        if recipe_row is not None:
            epoch_s = CIFAR_TRAIN / recipe_row["images_per_sec"] + CIFAR_TEST / recipe_row["eval_images_per_sec"]
            write({"what": "recipe_estimate", "width": args.width, "batch_size": RECIPE.batch_size,
                   "epochs": RECIPE.epochs, "epoch_s": round(epoch_s, 2),
                   "total_min": round(RECIPE.epochs * epoch_s / 60, 1)})
        # 4. The other implementations, both dtypes.
        for dtype in DTYPES:
            for impl in (i for i in IMPLS if i != default):
                measure(impl, dtype, args.batch_size)
        # 5. The fastest implementation in bf16 (at the table's batch size) across batch sizes.
        timed = [r for r in rows if r.get("what") == "train_step" and r["dtype"] == "bfloat16"
                 and r["batch_size"] == args.batch_size]
        best = max(timed, key=lambda r: r["images_per_sec"])["impl"] if timed else "auto"
        done = {(r["impl"], r["dtype"], r["batch_size"]) for r in rows if r.get("what") == "train_step"}
        for batch_size in args.sweep:
            if (best, "bfloat16", batch_size) not in done:
                measure(best, "bfloat16", batch_size)
        if skipped:
            write({"what": "skipped", "over_budget": skipped})
        f.write("\n" + table(rows) + f"\ntotal {time.perf_counter() - start:.0f} s\n")
    print(table(rows))


def versions() -> dict[str, str]:
    """The versions the figures depend on, as installed (None where one is missing)."""
    found = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def table(rows: list[dict]) -> str:
    """The measurements as a Markdown table, ready for the README."""
    machine = next((r for r in rows if r.get("what") == "machine"), {})
    torch_version = next((r["torch_version"] for r in rows if "torch_version" in r), None)
    lines = [f"{machine.get('date')}, {machine.get('gpu')}; JAX {machine.get('jax')}, Flax {machine.get('flax')}"
             + (f", PyTorch {torch_version}" if torch_version else "") + f"; MobileNet-V1 x{machine.get('width')}, "
             f"32x32 inputs, median of {machine.get('repeats')} repeats x {machine.get('steps')} steps",
             "",
             "| implementation | dtype | batch | train img/s | eval img/s | train TFLOP/s | compile s | PyTorch img/s "
             "| ratio | eval ratio |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("what") != "train_step":
            continue
        torch_cols = (f"{r['torch_images_per_sec']:,.0f} | {r['ratio']:.2f}x | "
                      f"{r['eval_images_per_sec'] / r['torch_eval_images_per_sec']:.2f}x" if "ratio" in r else "- | - | -")
        lines.append(f"| {r['impl']} | {r['dtype']} | {r['batch_size']} | {r['images_per_sec']:,.0f} | "
                     f"{r['eval_images_per_sec']:,.0f} | {r['train_tflops']} | {r['compile_s']:.0f} | {torch_cols} |")
    lines.append("\nfloat32 rows: the convolutions run on TF32 tensor cores on both sides (JAX's default precision; "
                 "PyTorch's cudnn.allow_tf32, on by default). PyTorch: channels_last, cudnn.benchmark on. Compile "
                 "times depend on the order: XLA reuses, within a process, the autotuning of earlier rows.")
    for r in rows:
        if r.get("what") == "recipe_estimate":
            lines.append(f"\nThe default recipe (x{r['width']}, batch {r['batch_size']}, bfloat16): "
                         f"{r['epoch_s']:.1f} s an epoch of CIFAR-100 (train steps and one evaluation), "
                         f"{r['epochs']} epochs in about {r['total_min']:.0f} minutes")
        if r.get("what") == "deterministic_ops":
            how = ("deterministic kernels, no autotuning" if r["flag"].startswith("--xla_gpu_deterministic_ops")
                   else "deterministic kernels, autotuned")
            lines.append(f"\n{r['flag']} ({how}): {r['deterministic_images_per_sec']:,.0f} img/s against "
                         f"{r['images_per_sec']:,.0f} without ({r['ratio']:.2f}x), bfloat16, batch {r['batch_size']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
