"""`python -m minimobile.summary`: the paper's Table 1 for any configuration, with params and mult-adds.

    python -m minimobile.summary                              # 1.0 MobileNet-224: 4.2 M params, 569 M mult-adds
    python -m minimobile.summary --width 0.5 --resolution 160
    python -m minimobile.summary --stem cifar --resolution 32 --num-classes 100
    python -m minimobile.summary --block standard --json      # the full-convolution baseline, as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from minimobile.costs import mobilenet_v1_layers, totals
from minimobile.errors import ArgumentParser, UserError, exit_on_user_error
from minimobile.model import BLOCK_TYPES, MAX_WIDTH, STEM_STRIDES


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m minimobile.summary", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stem", choices=sorted(STEM_STRIDES), default="imagenet")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier alpha (paper: 1.0, 0.75, 0.5, 0.25)")
    p.add_argument("--resolution", type=int, default=None, help="input size (default 224, or 32 for --stem cifar)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default 1000, or 100 for cifar)")
    p.add_argument("--block", choices=BLOCK_TYPES, default="separable",
                   help="'standard' replaces every separable pair by one full 3x3 conv (the paper's Table 4 baseline)")
    p.add_argument("--depth-multiplier", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = p.parse_args(argv)
    cifar = args.stem == "cifar"
    if args.resolution is None:
        args.resolution = 32 if cifar else 224
    args.num_classes = (100 if cifar else 1000) if args.num_classes is None else args.num_classes
    if not 0 < args.width <= MAX_WIDTH:  # also refuses nan
        raise UserError(f"--width must be positive and at most {MAX_WIDTH} (the paper uses 1.0, 0.75, 0.5, 0.25), got {args.width}.")
    if args.resolution <= 0 or args.num_classes < 0 or args.depth_multiplier <= 0:
        raise UserError("--resolution and --depth-multiplier must be positive and --num-classes non-negative.")
    return args


def format_table(layers, config: str) -> str:
    """Table 1 as text, one row per layer, with params and mult-adds."""
    header = f"{'Type / Stride':<14} {'Filter Shape':<20} {'Input Size':<16} {'Params':>11} {'Mult-Adds':>14}"
    rows = [config, header, "-" * len(header)]
    for layer in layers:
        size = " x ".join(map(str, layer.input_shape))
        rows.append(f"{layer.type_stride:<14} {layer.filter_text:<20} {size:<16} {layer.params:>11,} {layer.macs:>14,}")
    t = totals(layers)
    classifier = " + classifier" if any(layer.kind == "fc" for layer in layers) else ", no classifier"
    rows += ["-" * len(header),
             f"{'Total':<52} {t['params']:>11,} {t['macs']:>14,}",
             f"= {t['params'] / 1e6:.2f} M params (conv kernels{classifier}; BatchNorm's {t['bn_params']:,} "
             f"scale/shift parameters not included), {t['macs'] / 1e6:.1f} M mult-adds."]
    return "\n".join(rows)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    layers = mobilenet_v1_layers(args.width, args.resolution, args.num_classes, args.stem, args.block,
                                 args.depth_multiplier)
    config = (f"MobileNet-V1 ({args.block}), width {args.width}, {args.resolution}x{args.resolution} input, "
              f"{args.stem} stem, {args.num_classes} classes")
    print(format_table(layers, config))
    if args.json:
        t = totals(layers)
        record = dict(vars(args), **t, bn_params_included=False,
                      layers=[dataclasses.asdict(layer) | {"type": layer.type_stride} for layer in layers])
        record.pop("json")
        print(json.dumps(record))


if __name__ == "__main__":
    main()
