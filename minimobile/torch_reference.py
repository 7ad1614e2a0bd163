"""The same MobileNet-V1 in PyTorch, for `python -m minimobile.bench --compare torch` (torch is optional).

A speed comparison is only honest if both sides compute the same thing. This module builds, from the
same table (`model.MOBILENET_V1_BLOCKS`), the network `model.MobileNetV1` is: a full 3x3 stem, 13
depthwise-separable blocks (depthwise 3x3 -> BN -> ReLU6 -> pointwise 1x1 -> BN -> ReLU6), global
average pooling and one Linear layer; no conv biases, BatchNorm with our momentum and epsilon.
tests/test_bench.py copies Flax weights into it and checks the logits agree.

Written the way a PyTorch user would write it for speed on CPU: `channels_last` memory format (NHWC,
what oneDNN's depthwise and 1x1 kernels prefer) and `groups=C` convolutions.

One honest difference, which is free: where a stride-2 3x3 layer puts its one row of padding. PyTorch's
`padding=1` pads one row before and one after and lets the stride skip the last; XLA's SAME pads zero
before and one after (see `depthwise.same_padding`). Same shapes, same mult-adds, different pixels. With
`same_padding=True` the stride-2 layers pad like XLA (an explicit `F.pad`, then no padding), which is
what the logits check uses; the benchmark times the idiomatic `padding=1` model, so PyTorch is never
handicapped by our convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimobile.depthwise import same_padding
from minimobile.layers import BN_EPSILON, BN_MOMENTUM
from minimobile.model import MOBILENET_V1_BLOCKS, STEM_CHANNELS, STEM_STRIDES, thin


class ConvBN(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6, like `layers.ConvBN`. groups = C_in makes it depthwise."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1,
                 same_padding: bool = False):
        self.stride, self.kernel, self.same_padding = stride, kernel, same_padding
        pad = 0 if (same_padding and stride > 1) else kernel // 2
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=pad, groups=groups, bias=False),
            # PyTorch's momentum is the weight of the *new* batch: 1 - ours (0.9 keeps 90 % of the old).
            nn.BatchNorm2d(c_out, eps=BN_EPSILON, momentum=1 - BN_MOMENTUM),
            nn.ReLU6(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_padding and self.stride > 1:
            # XLA's SAME: (before, after) rows and columns, the odd one after.
            (top, bottom), (left, right) = (same_padding(s, self.kernel, self.stride) for s in x.shape[2:])
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class MobileNetV1(nn.Module):
    """x: [B, 3, H, W] (pass it `channels_last`) -> logits [B, num_classes]."""

    def __init__(self, num_classes: int = 100, width: float = 1.0, stem: str = "cifar",
                 same_padding: bool = False):
        super().__init__()
        c = thin(STEM_CHANNELS, width)
        layers = [ConvBN(3, c, 3, STEM_STRIDES[stem], same_padding=same_padding)]
        for channels, stride in MOBILENET_V1_BLOCKS:
            out = thin(channels, width)
            layers.append(ConvBN(c, c, 3, stride, groups=c, same_padding=same_padding))  # depthwise
            layers.append(ConvBN(c, out, 1, 1))                                           # pointwise
            c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)                       # [B, C, h, w]
        return self.classifier(x.mean(dim=(2, 3)))  # [B, C] -> [B, num_classes]


def load_flax_variables(module: MobileNetV1, variables: dict) -> None:
    """Copies a Flax `MobileNetV1` (same width, separable, depth multiplier 1) into `module`, in place.

    Kernels go HWIO -> OIHW (a depthwise [3, 3, 1, C] becomes [C, 1, 3, 3], PyTorch's grouped layout),
    the classifier [C, K] -> [K, C]; BatchNorm scale/bias/mean/var map one to one.
    """
    import numpy as np

    params, stats = variables["params"], variables["batch_stats"]
    names = ["stem"] + [f"block{i + 1:02d}/{part}" for i in range(len(MOBILENET_V1_BLOCKS))
                        for part in ("depthwise", "pointwise")]

    def leaf(tree, path):
        for key in path.split("/"):
            tree = tree[key]
        return tree

    def put(tensor: torch.Tensor, value) -> None:
        tensor.data.copy_(torch.from_numpy(np.array(value, dtype=np.float32)))

    with torch.no_grad():
        for name, layer in zip(names, module.features):
            conv_name = "conv" if name == "stem" else name.split("/")[1]
            put(layer[0].weight, np.transpose(leaf(params, name)[conv_name]["kernel"], (3, 2, 0, 1)))
            bn, bn_stats = leaf(params, name)["bn"], leaf(stats, name)["bn"]
            put(layer[1].weight, bn["scale"])
            put(layer[1].bias, bn["bias"])
            put(layer[1].running_mean, bn_stats["mean"])
            put(layer[1].running_var, bn_stats["var"])
        put(module.classifier.weight, np.asarray(params["classifier"]["kernel"]).T)
        put(module.classifier.bias, params["classifier"]["bias"])


def make_train_step(module: MobileNetV1, learning_rate: float = 0.2, momentum: float = 0.9,
                    weight_decay: float = 5e-4, label_smoothing: float = 0.1, autocast_dtype=None):
    """One step of our default recipe (`steps.train_step` with `config.Config()`, at its peak learning
    rate): returns step(x, y) -> loss.

    SGD with Nesterov momentum, weight decay on conv and linear weights except the depthwise ones
    (`steps.decay_mask`), cross-entropy with label smoothing. `autocast_dtype=torch.bfloat16` runs the
    forward pass and loss under `torch.autocast`, PyTorch's usual mixed precision.
    """
    decayed = [m.weight for m in module.modules()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    others = [p for p in module.parameters() if all(p is not q for q in decayed)]
    optimizer = torch.optim.SGD([{"params": decayed, "weight_decay": weight_decay},
                                 {"params": others, "weight_decay": 0.0}],
                                lr=learning_rate, momentum=momentum, nesterov=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(module(x), y, label_smoothing=label_smoothing)
        loss.backward()
        optimizer.step()
        return loss

    return step
