"""The paper's arithmetic: our counts against the paper's tables, the seed report's example, and XLA."""

import json

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from minimobile import summary
from minimobile.costs import mobilenet_v1_layers, separable_cost_ratio, totals
from minimobile.model import MobileNetV1

# Howard et al. 2017 (arXiv:1704.04861): (width, resolution, block) -> (Million Mult-Adds, Million Parameters).
PAPER_FIGURES = {
    (1.0, 224, "separable"): (569, 4.2),    # Tables 1, 4, 6, 7
    (0.75, 224, "separable"): (325, 2.6),   # Table 6
    (0.5, 224, "separable"): (149, 1.3),    # Table 6
    (0.25, 224, "separable"): (41, 0.5),    # Table 6
    (1.0, 192, "separable"): (418, 4.2),    # Table 7
    (1.0, 160, "separable"): (290, 4.2),    # Table 7
    (1.0, 128, "separable"): (186, 4.2),    # Table 7
    (1.0, 224, "standard"): (4866, 29.3),   # Table 4, "Conv MobileNet"
}


@pytest.mark.parametrize("config", sorted(PAPER_FIGURES))
def test_totals_reproduce_the_papers_published_figures(config):
    width, resolution, block = config
    paper_macs, paper_params = PAPER_FIGURES[config]
    t = totals(mobilenet_v1_layers(width, resolution, 1000, "imagenet", block))
    assert round(t["params"] / 1e6, 1) == paper_params
    # Six of the eight mult-add figures are our exact count rounded. Two sit just below it
    # (160: 290.7 -> printed 290; Conv MobileNet: 4867.3 -> printed 4866), so the paper rounded
    # those down or counted them slightly differently; all agree to within 1.5 M mult-adds.
    assert abs(t["macs"] / 1e6 - paper_macs) < 1.5
    if config not in [(1.0, 160, "separable"), (1.0, 224, "standard")]:
        assert round(t["macs"] / 1e6) == paper_macs


def test_resource_split_by_layer_type_matches_table_2():
    # Table 2: 1x1 convs hold 94.86 % of the mult-adds and 74.59 % of the parameters, and so on.
    # (Table 2 counts the classifier's weights but not its 1,000 biases: 4,209,088 parameters.)
    layers = mobilenet_v1_layers()
    t = totals(layers)
    t["params"] -= 1000
    kind_of = {"pw": "Conv 1x1", "dw": "Conv DW 3x3", "conv": "Conv 3x3", "fc": "Fully Connected"}
    # Its "Conv 3x3" mult-adds, 1.19 %, cannot be right: the four rows would then sum to 99.29 %.
    # The first conv's share is 10.84 M / 568.7 M = 1.91 %, which closes the sum to 100.00 %.
    paper = {"Conv 1x1": (94.86, 74.59), "Conv DW 3x3": (3.06, 1.06), "Conv 3x3": (1.91, 0.02),
             "Fully Connected": (0.18, 24.33)}
    for name, (macs_pct, params_pct) in paper.items():
        ours = [layer for layer in layers if kind_of.get(layer.kind) == name]
        weights = sum(layer.params - (1000 if layer.kind == "fc" else 0) for layer in ours)
        assert sum(layer.macs for layer in ours) / t["macs"] * 100 == pytest.approx(macs_pct, abs=0.01)
        assert weights / t["params"] * 100 == pytest.approx(params_pct, abs=0.01)


def test_the_seed_reports_worked_example():
    # A 7x7x3 input to a 5x5x128 output with 3x3 kernels (no padding): the original report's numbers.
    standard = 3 * 3 * 3 * 128 * 5 * 5
    depthwise, pointwise = 3 * 3 * 3 * 5 * 5, 3 * 128 * 5 * 5
    assert (standard, depthwise, pointwise) == (86_400, 675, 9_600)
    assert (depthwise + pointwise) / standard == pytest.approx(separable_cost_ratio(c_out=128, kernel=3))
    # And the compiler agrees: XLA counts 2 flops (a multiply and an add) per mult-add.
    x, w = jnp.zeros((1, 7, 7, 3)), jnp.zeros((3, 3, 3, 128))
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert jax.jit(conv).lower(x, w).compile().cost_analysis()["flops"] == 2 * 86_400


def xla_flops(fn, *shapes):
    return jax.jit(fn).lower(*[jnp.zeros(s) for s in shapes]).compile().cost_analysis()["flops"]


# At 50 pixels a stride-2 layer meets an odd size (25 -> 13): SAME rounds the output up.
@pytest.mark.parametrize("width, resolution, stem", [(0.25, 224, "imagenet"), (0.5, 32, "cifar"),
                                                      (0.25, 50, "imagenet")])
def test_every_layers_count_equals_xlas_cost_analysis(width, resolution, stem):
    # XLA skips the taps that read zero padding, so it is compared with `macs_valid`, exactly; and each
    # layer's output shape is the one XLA's convolution gives.
    for layer in mobilenet_v1_layers(width, resolution, 100, stem):
        h, w, c = layer.input_shape
        if layer.kind in ("conv", "dw", "pw"):
            k = layer.filter_shape[0]
            c_out = layer.output_shape[2]
            groups = c if layer.kind == "dw" else 1
            conv = lambda x, kern: lax.conv_general_dilated(
                x, kern, (layer.stride,) * 2, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=groups)
            assert xla_flops(conv, (1, h, w, c), (k, k, c // groups, c_out)) == 2 * layer.macs_valid, layer
            out = jax.eval_shape(conv, jnp.zeros((1, h, w, c)), jnp.zeros((k, k, c // groups, c_out))).shape
            assert out[1:] == layer.output_shape, layer
        elif layer.kind == "fc":
            assert xla_flops(jnp.dot, (1, c), layer.filter_shape) == 2 * layer.macs


def test_whole_model_flops_are_the_conv_count_plus_a_few_percent_elementwise():
    # The compiled forward pass also runs BatchNorm, ReLU6 and pooling: a few percent on top of the convs.
    model = MobileNetV1(width=1.0)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    flops = jax.jit(model.apply).lower(variables, jnp.zeros((1, 224, 224, 3))).compile().cost_analysis()["flops"]
    ratio = flops / 2 / totals(mobilenet_v1_layers())["macs_valid"]
    assert 1.0 < ratio < 1.08


@pytest.mark.parametrize("width, resolution, block, multiplier", [(1.0, 224, "separable", 1), (0.5, 160, "standard", 1),
                                                                (0.25, 128, "separable", 2)])
def test_flax_model_has_exactly_the_counted_parameters(width, resolution, block, multiplier):
    model = MobileNetV1(width=width, block=block, depth_multiplier=multiplier)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)))
    leaves = jax.tree_util.tree_leaves_with_path(variables["params"])
    in_bn = lambda path: any(getattr(k, "key", None) == "bn" for k in path)
    t = totals(mobilenet_v1_layers(width, resolution, 1000, "imagenet", block, depth_multiplier=multiplier))
    assert sum(x.size for p, x in leaves if not in_bn(p)) == t["params"]
    assert sum(x.size for p, x in leaves if in_bn(p)) == t["bn_params"]


def test_summary_prints_table_1_and_json_on_the_last_line(capsys):
    summary.main(["--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert "Conv dw / s1" in out[4] and "3 x 3 x 32 dw" in out[4] and "112 x 112 x 32" in out[4]
    record = json.loads(out[-1])
    assert (record["params"], record["macs"]) == (4_210_088, 568_740_352)
    assert record["bn_params_included"] is False
    summary.main(["--stem", "cifar", "--width", "0.5", "--block", "standard", "--json"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["resolution"] == 32 and record["num_classes"] == 100 and record["block"] == "standard"
    # --num-classes 0: the network without its classifier (a feature extractor), 1024 x 1000 + 1000 fewer.
    summary.main(["--num-classes", "0", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    record = json.loads(out[-1])
    assert record["params"] == 4_210_088 - (1024 * 1000 + 1000) and "no classifier" in out[-2]
    assert record["macs"] == 568_740_352 - 1024 * 1000 and record["layers"][-1]["type"].startswith("Avg Pool")


def test_summary_rejects_a_zero_width_with_one_sentence(capsys):
    with pytest.raises(SystemExit) as exit_info:
        summary.main(["--width", "0"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --width must be positive") and len(err.splitlines()) == 1
