"""The paper's arithmetic: parameters and mult-adds of every layer, counted by hand.

MobileNets are judged by two numbers, "Million Mult-Adds" and "Million Parameters" (Tables 4-7 of the
paper). A K x K convolution from M to N channels on a D_F x D_F output map costs

    standard:   D_K * D_K * M * N * D_F * D_F          (the paper's equation 2)
    depthwise:  D_K * D_K * M * D_F * D_F              (equation 4: one filter per channel)
    pointwise:  M * N * D_F * D_F                      (a 1x1 conv is a matrix multiply over channels)

so a separable layer, depthwise + pointwise (equation 5), costs `1/N + 1/D_K^2` of a standard one. We count those formulas
layer by layer from the same table the model is built from (model.MOBILENET_V1_BLOCKS).

Conventions, as in the paper: parameters are conv kernels plus the classifier's weights and bias;
BatchNorm's scale and shift are *not* included (reported separately as `bn_params`). Mult-adds count
every kernel tap, including taps that land on SAME zero padding (`macs`); `macs_valid` skips those,
which is what XLA's cost analysis counts, and is how tests check our counts against the compiler.
"""

from __future__ import annotations

import dataclasses

from minimobile.depthwise import same_padding
from minimobile.model import MOBILENET_V1_BLOCKS, STEM_CHANNELS, STEM_STRIDES, thin


@dataclasses.dataclass(frozen=True)
class Layer:
    """One row of the paper's Table 1, with its cost."""

    kind: str                       # "conv", "dw", "pw", "pool", "fc"
    stride: int
    # conv [K, K, M, N]; dw [K, K, M] ([K, K, 1, M*m] with a depth multiplier m > 1); fc [M, N]
    filter_shape: tuple[int, ...]
    input_shape: tuple[int, int, int]   # [H, W, C] of this layer's input
    output_shape: tuple[int, int, int]
    params: int                     # weights (and the classifier's bias)
    macs: int                       # the paper's mult-adds: every tap of every output
    macs_valid: int                 # mult-adds that do not read padding (XLA's count)
    bn_params: int                  # BatchNorm scale + shift after this layer (0 if none)

    @property
    def type_stride(self) -> str:
        """Table 1's first column: 'Conv dw / s2'."""
        name = {"conv": "Conv", "dw": "Conv dw", "pw": "Conv", "pool": "Avg Pool", "fc": "FC"}[self.kind]
        return f"{name} / s{self.stride}"

    @property
    def filter_text(self) -> str:
        """Table 1's second column: '3 x 3 x 32 dw', '1 x 1 x 32 x 64', 'Pool 7 x 7'."""
        if self.kind == "pool":
            return "Pool " + " x ".join(map(str, self.filter_shape))
        return " x ".join(map(str, self.filter_shape)) + (" dw" if self.kind == "dw" else "")


def valid_taps(size: int, kernel: int, stride: int) -> int:
    """Along one axis, how many (output position, kernel tap) pairs read a real pixel, not padding."""
    before, _ = same_padding(size, kernel, stride)
    out = -(-size // stride)
    return sum(1 for o in range(out) for k in range(kernel) if 0 <= o * stride - before + k < size)


def conv_layer(kind: str, h: int, w: int, c_in: int, c_out: int, kernel: int, stride: int) -> Layer:
    """Cost of a SAME conv: kind 'conv' (full), 'dw' (c_out = c_in * multiplier) or 'pw' (1x1)."""
    ho, wo = -(-h // stride), -(-w // stride)
    inputs_per_output = 1 if kind == "dw" else c_in  # a depthwise filter reads one channel
    macs = kernel * kernel * inputs_per_output * c_out * ho * wo
    macs_valid = valid_taps(h, kernel, stride) * valid_taps(w, kernel, stride) * inputs_per_output * c_out
    shape = (kernel, kernel, c_in) if kind == "dw" and c_out == c_in else (kernel, kernel, inputs_per_output, c_out)
    return Layer(kind, stride, shape, (h, w, c_in), (ho, wo, c_out),
                 params=kernel * kernel * inputs_per_output * c_out, macs=macs, macs_valid=macs_valid,
                 bn_params=2 * c_out)


def mobilenet_v1_layers(width: float = 1.0, resolution: int = 224, num_classes: int = 1000,
                        stem: str = "imagenet", block: str = "separable", depth_multiplier: int = 1) -> list[Layer]:
    """Table 1 for one configuration, from the same block list the model is built from."""
    h = w = resolution
    c = thin(STEM_CHANNELS, width)
    layers = [conv_layer("conv", h, w, 3, c, 3, STEM_STRIDES[stem])]
    h, w = layers[-1].output_shape[:2]
    for channels, stride in MOBILENET_V1_BLOCKS:
        out = thin(channels, width)
        if block == "separable":
            layers.append(conv_layer("dw", h, w, c, c * depth_multiplier, 3, stride))
            h, w, c = layers[-1].output_shape
            layers.append(conv_layer("pw", h, w, c, out, 1, 1))
        else:
            layers.append(conv_layer("conv", h, w, c, out, 3, stride))
        h, w, c = layers[-1].output_shape
    layers.append(Layer("pool", 1, (h, w), (h, w, c), (1, 1, c), 0, 0, 0, 0))
    if num_classes:
        fc_macs = c * num_classes
        layers.append(Layer("fc", 1, (c, num_classes), (1, 1, c), (1, 1, num_classes),
                            params=c * num_classes + num_classes, macs=fc_macs, macs_valid=fc_macs, bn_params=0))
    return layers


def totals(layers: list[Layer]) -> dict[str, int]:
    """Sums over the table: params, macs, macs_valid, bn_params."""
    return {k: sum(getattr(layer, k) for layer in layers) for k in ("params", "macs", "macs_valid", "bn_params")}


def separable_cost_ratio(c_out: int, kernel: int = 3) -> float:
    """A separable conv costs 1/N + 1/D_K^2 of a standard one (equation 5 divided by equation 2)."""
    return 1 / c_out + 1 / kernel**2
