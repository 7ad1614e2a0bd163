"""`python -m minimobile.evaluate --workdir W`: test-split accuracy of a trained run, per class too.

    python -m minimobile.evaluate --workdir runs/default              # the latest checkpoint
    python -m minimobile.evaluate --workdir runs/default --checkpoint best --json

Prints loss, top-1 and top-5 accuracy over the whole test split (never augmented); writes
`W/eval/per_class_accuracy.json` (class name -> fraction of its test images classified right; null for
a class with none) and `W/eval/confusion_matrix.png`. With `--json`, the last line is
one JSON object with at least `accuracy`, `accuracy_top5`, `loss`, `step`.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax

from minimobile import parallel, report, steps
from minimobile.checkpoint import Checkpoints
from minimobile.config import Config
from minimobile.errors import ArgumentParser, UserError, exit_on_user_error


# What evaluate and predict need to know of the data a run was trained on (train.py writes dataset.json).
DATASET_FACTS = {"num_classes", "class_names", "mean", "std", "image_shape"}


def load_run_config(workdir: str | pathlib.Path) -> tuple[Config, dict]:
    """The config and dataset facts a training run saved in its workdir."""
    workdir = pathlib.Path(workdir).expanduser()
    try:
        config = Config.from_json((workdir / "config.json").read_text())
        info = json.loads((workdir / "dataset.json").read_text())
        missing = sorted(DATASET_FACTS - set(info if isinstance(info, dict) else ()))
        if missing:
            raise ValueError(f"dataset.json lacks {', '.join(missing)}")
    except FileNotFoundError as e:
        if pathlib.Path(e.filename).name == "dataset.json":  # the run is there, its data's facts are lost
            raise UserError(f"{workdir} has no dataset.json; rerun the training command that made the run "
                            "(the same --dataset and --data-dir): it writes the file again.") from None
        raise UserError(f"{workdir} holds no training run (no config.json); train one first with "
                        f"`python -m minimobile.train --workdir {workdir}`.") from None
    except (OSError, ValueError) as e:  # a file for a workdir, a damaged config.json, ...
        raise UserError(f"cannot read the run in {workdir} ({getattr(e, 'strerror', None) or e}); its "
                        "config.json and dataset.json record how it was trained: restore them, or point "
                        "--workdir at another run.") from None
    return config, info


def restore(checkpoints: Checkpoints, state, which: str):
    """The state at checkpoint `which`: 'latest', 'best' or a step number; and that step."""
    available = checkpoints.steps()
    if not available:
        raise UserError(f"no checkpoint in {checkpoints.directory}; train first, or check --workdir.")
    if which == "latest":
        restored, step = checkpoints.restore_latest(state)
        if step is None:
            raise UserError(f"no readable checkpoint in {checkpoints.directory}; retrain or restore a backup.")
        return restored, step
    if which == "best":
        step = checkpoints.best_step()
        if step is None:
            raise UserError(f"no checkpoint in {checkpoints.directory} has an evaluation yet, so none is best; "
                            "use --checkpoint latest.")
    else:
        step = int(which) if which.isascii() and which.isdigit() else None  # not "²", a digit to isdigit
    if step not in available:
        raise UserError(f"no checkpoint {which!r} in {checkpoints.directory}; available steps: "
                        f"{', '.join(map(str, available))} (or 'latest', 'best').")
    return checkpoints.restore(step, state), step


def abstract_state(config: Config, info: dict, sharding: jax.sharding.Sharding) -> steps.TrainState:
    """A TrainState of shapes and dtypes only (`jax.ShapeDtypeStruct`s placed by `sharding`).

    All a checkpoint needs to be read back: nothing is initialised, nothing compiled. The optimizer
    is the config's, so its state has the saved structure (the learning rate does not matter here);
    `apply_fn` is the model's, ready to evaluate.
    """
    model = steps.build_model(config, info["num_classes"])
    tx = steps.make_optimizer(config, lambda step: config.learning_rate)
    shapes = jax.eval_shape(lambda: steps.create_train_state(jax.random.key(0), model, tx, tuple(info["image_shape"])))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def evaluate_workdir(workdir: str | pathlib.Path, data_dir: str | None = None, which: str = "latest") -> dict:
    """Evaluate a run's checkpoint on its test split; writes per-class accuracy and the confusion matrix.

    Reads only the test split: the normalisation uses the train statistics the run saved. data_dir:
    by default the one the run trained from (its dataset.json says), else TFDS's default.
    """
    from minimobile import data as data_lib
    from minimobile.train import build_evaluation

    workdir = pathlib.Path(workdir).expanduser()
    config, info = load_run_config(workdir)
    par = parallel.setup("jit")  # one device is plenty for 10,000 images, and works with any batch size
    checkpoints = Checkpoints(workdir, read_only=True)
    try:  # before the data: a run with no checkpoint says so at once
        state, step = restore(checkpoints, abstract_state(config, info, par.sharding()), which)
    finally:
        checkpoints.close()
    data_dir = data_dir or info.get("data_dir")  # by default, where the run found its data
    test = data_lib.load_split(config.dataset, data_dir, "test", label_key=config.label_key)
    metrics, predictions = build_evaluation(config, test, info["mean"], info["std"], par)(state)

    matrix = report.confusion_matrix(test.labels, predictions, info["num_classes"])
    class_names = info["class_names"]
    per_class = report.per_class_accuracy(matrix, class_names)
    out = workdir / "eval"
    try:
        out.mkdir(exist_ok=True)
        (out / "per_class_accuracy.json").write_text(json.dumps(per_class, indent=2) + "\n")
        report.plot_confusion(matrix, list(class_names), out / "confusion_matrix.png")
        files = {"per_class_accuracy": str(out / "per_class_accuracy.json"),
                 "confusion_matrix": str(out / "confusion_matrix.png")}
    except OSError as e:  # a read-only workdir (someone else's run, a mounted archive): the figures still count
        print(f"warning: cannot write to {out} ({e.strerror or e}); per-class accuracy and the confusion "
              "matrix are not saved.", file=sys.stderr)
        files = {"per_class_accuracy": None, "confusion_matrix": None}
    return {**metrics, "step": step, "checkpoint": which, "worst_classes": hardest_classes(per_class), **files}


def hardest_classes(per_class: dict[str, float | None], n: int = 5) -> list[tuple[str, float]]:
    """The n classes with the lowest accuracy, lowest first; a class with no test image (None) has none to rank."""
    return sorted(((name, acc) for name, acc in per_class.items() if acc is not None), key=lambda kv: kv[1])[:n]


@exit_on_user_error
def main(argv=None) -> None:
    from minimobile.train import default_compilation_cache, use_compilation_cache

    p = ArgumentParser(prog="python -m minimobile.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the training run's directory")
    p.add_argument("--data-dir", default=None,
                   help="TFDS data dir (default: the one the run trained from, as its dataset.json says)")
    p.add_argument("--checkpoint", default="latest", help="'latest', 'best', or a step number")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--compilation-cache", default=default_compilation_cache(), metavar="DIR",
                   help="as for train: where compiled programs are kept ('none': off; default: %(default)s)")
    args = p.parse_args(argv)
    use_compilation_cache(args.compilation_cache)
    result = evaluate_workdir(args.workdir, args.data_dir, args.checkpoint)
    print(f"step {result['step']:,} ({args.checkpoint}): test loss {result['loss']:.4f}, "
          f"top-1 {100 * result['accuracy']:.2f} %, top-5 {100 * result['accuracy_top5']:.2f} % "
          f"on {result['count']:,} images")
    print("hardest classes: " + ", ".join(f"{name} {100 * acc:.0f} %" for name, acc in result["worst_classes"]))
    if result["per_class_accuracy"]:
        print(f"per-class accuracy: {result['per_class_accuracy']}; confusion matrix: {result['confusion_matrix']}")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "worst_classes"}))


if __name__ == "__main__":
    main()
