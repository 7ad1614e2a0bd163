# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. MobileNet-V1, layer by layer
#
# Tutorial 1 built one depthwise-separable convolution. MobileNet-V1 (Howard et al. 2017,
# [arXiv:1704.04861](https://arxiv.org/abs/1704.04861)) is a full 3x3 convolution followed by
# thirteen of them, average pooling and one fully connected layer. This tutorial takes the network
# apart: it regenerates the paper's Table 1 *from the Flax model*, reproduces the paper's tables of
# cost (Tables 2, 4, 6 and 7) by counting, and then looks at what the layers do to a real image.
#
# Run it as a notebook or as `python tutorials/02_mobilenet_layer_by_layer.py` (a few minutes on
# 2 CPU cores, most of it a short training run at the end).

# %%
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import traverse_util

from minimobile import costs, steps, summary
from minimobile.assets import load_cifar100_sample
from minimobile.augment import normalize
from minimobile.layers import ConvBN
from minimobile.model import MobileNetV1

# MINIMOBILE_TUTORIAL_QUICK=1 (the test suite's setting) runs every tutorial with small sizes, and draws
# its figures in a temporary folder (or MINIMOBILE_FIGURES_DIR), never over those committed beside this file.
QUICK = os.environ.get("MINIMOBILE_TUTORIAL_QUICK") == "1"
HERE = pathlib.Path(__file__).parent if "__file__" in globals() else pathlib.Path.cwd()  # Jupyter: no __file__
FIGURES = pathlib.Path(os.environ.get("MINIMOBILE_FIGURES_DIR") or
                       (pathlib.Path(tempfile.gettempdir(), "minimobile-quick-figures") if QUICK else HERE / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)


def save(fig, name: str) -> None:
    fig.savefig(FIGURES / name, dpi=120, bbox_inches="tight")
    print("wrote", FIGURES / name)


# %% [markdown]
# ## Table 1, from the model
#
# `minimobile.model.MobileNetV1` is built from one list, `MOBILENET_V1_BLOCKS`: thirteen
# `(output channels, stride)` pairs. `minimobile.costs` reads the same list to count parameters and
# mult-adds, and `minimobile.summary` prints the result in the layout of the paper's Table 1:

# %%
table1 = costs.mobilenet_v1_layers(width=1.0, resolution=224)   # the paper's 1.0 MobileNet-224
print(summary.format_table(table1, "1.0 MobileNet-224 (the paper's Table 1, with each layer's cost)"))

# %% [markdown]
# That table is arithmetic on a list. Is it the network we actually train? Ask the model itself.
# `jax.eval_shape` runs `init` and `apply` *abstractly*: it traces the network and returns the shape
# of every parameter and (with `capture_intermediates=True`) of every layer's output, without
# computing or even allocating anything. From those shapes alone we rebuild the table: a layer's
# parameters are its kernel's size, and its mult-adds are the kernel's size times the number of
# output positions (each position applies every weight of the kernel once).

# %%
net = MobileNetV1(width=1.0, num_classes=1000, stem="imagenet")
image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)       # a shape, not an array
variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), image)
_, state = jax.eval_shape(lambda v, x: net.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
                          variables, image)
kernels = traverse_util.flatten_dict(variables["params"])          # {("block01", ..., "kernel"): shape}
outputs = traverse_util.flatten_dict(state["intermediates"])       # {("block01", ..., "__call__"): (shape,)}

# Flax stores modules by name; put them back in the order the image flows through them.
order = lambda path: (path[0] != "stem", path[0] == "classifier", path)
rows = []
for path in sorted((p for p in kernels if p[-1] == "kernel"), key=order):
    kernel = kernels[path].shape                                   # [K, K, C_in/groups, C_out] or [C_in, C_out]
    out = outputs[path[:-1] + ("__call__",)][0].shape              # [1, H', W', C_out] or [1, classes]
    positions = int(np.prod(out[1:-1]))                            # H' * W' (1 for the classifier)
    bias = kernels.get(path[:-1] + ("bias",))
    params = int(np.prod(kernel)) + (int(np.prod(bias.shape)) if bias is not None else 0)
    rows.append(("/".join(path[:-1]), kernel, out[1:], params, int(np.prod(kernel)) * positions))

print(f"{'layer (from the model)':<28} {'kernel':<18} {'output':<16} {'params':>10} {'mult-adds':>13}")
for name, kernel, out, params, macs in rows:
    print(f"{name:<28} {str(kernel):<18} {str(out):<16} {params:>10,} {macs:>13,}")
model_params, model_macs = sum(r[3] for r in rows), sum(r[4] for r in rows)
print(f"{'total':<64} {model_params:>10,} {model_macs:>13,}")

# Row by row, the model and the counted table must agree (the pooling row has no kernel).
counted = [layer for layer in table1 if layer.kind != "pool"]
assert [(r[3], r[4]) for r in rows] == [(layer.params, layer.macs) for layer in counted]
print(f"\nThe model and costs.py agree on all {len(rows)} layers: "
      f"{model_params / 1e6:.2f} M parameters, {model_macs / 1e6:.1f} M mult-adds.")

# %% [markdown]
# The paper reports 4.2 M parameters and 569 M mult-adds for this network: we count 4.21 M and
# 568.7 M. As in the paper, BatchNorm's scale and shift (about 0.02 M numbers) are not counted.
#
# ## Where the cost is: the paper's Table 2
#
# Table 2 of the paper splits the budget by layer type. The striking line is the first: 95 % of the
# mult-adds are in the 1x1 pointwise convolutions, and the depthwise convolutions, the layers the
# whole design is named after, are 3 %. (The 1x1 layers are also the *fast* kind of mult-add, a
# matrix multiply; tutorial 5 shows why that matters more than the count.)

# %%
PAPER_TABLE2 = {"pw": ("Conv 1x1", 94.86, 74.59), "dw": ("Conv DW 3x3", 3.06, 1.06),
                "conv": ("Conv 3x3", 1.19, 0.02), "fc": ("Fully Connected", 0.18, 24.33)}
total = costs.totals(table1)
print(f"{'type':<16} {'mult-adds %':>12} {'paper':>7} {'params %':>10} {'paper':>7}")
for kind, (name, paper_macs, paper_params) in PAPER_TABLE2.items():
    macs = 100 * sum(layer.macs for layer in table1 if layer.kind == kind) / total["macs"]
    params = 100 * sum(layer.params for layer in table1 if layer.kind == kind) / total["params"]
    print(f"{name:<16} {macs:>12.2f} {paper_macs:>7.2f} {params:>10.2f} {paper_params:>7.2f}")

# %% [markdown]
# Every row matches but one: the paper prints 1.19 % for the full 3x3 convolution where the count is
# 1.91 %. Its four percentages add up to 99.29; with 1.91 they add up to 100.01, so the printed
# figure is most likely two transposed digits. (The parameter shares differ by 0.02 points, the
# size of a rounding choice such as counting the classifier's bias.)

# %%
kinds = {"conv": ("full 3x3 conv", "C3"), "dw": ("depthwise 3x3", "C1"), "pw": ("pointwise 1x1", "C0"),
         "fc": ("fully connected", "C2")}
shown = [layer for layer in table1 if layer.kind != "pool"]
fig, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
for ax, field, unit in [(axes[0], "macs", "M mult-adds"), (axes[1], "params", "M parameters")]:
    for kind, (label, color) in kinds.items():
        idx = [i for i, layer in enumerate(shown) if layer.kind == kind]
        ax.bar(idx, [getattr(shown[i], field) / 1e6 for i in idx], color=color, label=label)
    ax.set_ylabel(unit)
    ax.set_ylim(0, 1.3 * max(getattr(layer, field) for layer in shown) / 1e6)   # headroom for the legend
axes[0].legend(ncol=4, fontsize=8, loc="upper left")
axes[0].set_title("1.0 MobileNet-224, layer by layer: the 1x1 convolutions carry the cost")
names = ["stem"] + [f"{i // 2 + 1} {'dw' if i % 2 == 0 else 'pw'}" for i in range(26)] + ["FC"]  # block number
axes[1].set_xticks(range(len(shown)), names, rotation=90, fontsize=7)
axes[1].set_xlabel("layer (block 1 to 13: depthwise, then pointwise)")
fig.tight_layout()
save(fig, "02_layer_costs.png")

# %% [markdown]
# ![Mult-adds and parameters of each of the 28 layers of 1.0 MobileNet-224, coloured by layer type](figures/02_layer_costs.png)
#
# The mult-adds are spread evenly over the network (each stride-2 block halves the map and doubles
# the channels, which keeps `H * W * C_in * C_out` roughly constant), while the parameters pile up at
# the end, where the channels are widest: the last pointwise layer and the classifier hold half of them.
#
# ## Two knobs: width and resolution (Tables 6 and 7)
#
# The *width multiplier* `alpha` thins every layer to `alpha * C` channels. A pointwise layer's cost
# is `C_in * C_out * H * W`, so it shrinks by about `alpha²`, and so do the parameters. The
# *resolution multiplier* is simply a smaller input image: every map shrinks, so the mult-adds fall
# by about `rho²`, but the parameters do not change at all. The paper's numbers are ImageNet results
# quoted from it (accuracy is not something counting can reproduce); ours are counted.

# %%
def compare(rows, paper):
    """Print counted (M mult-adds, M params) beside the paper's (top-1 %, M mult-adds, M params)."""
    print(f"{'model':<26} {'M mult-adds':>11} {'paper':>6} {'M params':>9} {'paper':>6} {'paper top-1':>12}")
    for (name, layers_), (top1, paper_macs, paper_params) in zip(rows, paper):
        t = costs.totals(layers_)
        print(f"{name:<26} {t['macs'] / 1e6:>11.1f} {paper_macs:>6} {t['params'] / 1e6:>9.2f} {paper_params:>6}"
              f" {top1:>11.1f}%")


print("Table 6: width multiplier")
compare([(f"{w} MobileNet-224", costs.mobilenet_v1_layers(width=w)) for w in (1.0, 0.75, 0.5, 0.25)],
        [(70.6, 569, 4.2), (68.4, 325, 2.6), (63.7, 149, 1.3), (50.6, 41, 0.5)])
print("\nTable 7: resolution multiplier")
compare([(f"1.0 MobileNet-{r}", costs.mobilenet_v1_layers(resolution=r)) for r in (224, 192, 160, 128)],
        [(70.6, 569, 4.2), (69.1, 418, 4.2), (67.2, 290, 4.2), (64.4, 186, 4.2)])

# %% [markdown]
# All eight rows agree with the paper to its printed precision, with one small exception: at 160
# pixels we count 290.7 M mult-adds, which rounds to 291, where the paper prints 290.
#
# ## Separable against standard convolutions (Table 4)
#
# The paper's baseline is the same network with every depthwise + pointwise pair replaced by one full
# 3x3 convolution (`MobileNetV1(block="standard")`). Tutorial 1's ratio `1/C_out + 1/9` predicts the
# outcome: about 8.5 times fewer mult-adds and 7 times fewer parameters, for 1.1 points of accuracy.

# %%
print("Table 4: depthwise-separable against full convolutions")
compare([("Conv MobileNet", costs.mobilenet_v1_layers(block="standard")), ("MobileNet", table1)],
        [(71.7, 4866, 29.3), (70.6, 569, 4.2)])

# %% [markdown]
# Again one digit off: we count 4,867.3 M mult-adds for Conv MobileNet, the paper prints 4,866.
# The difference is 0.03 %; we have not found which layer the paper counted differently.
#
# The paper's Figures 4 and 5 plot accuracy against mult-adds and parameters for 16 models: every
# combination of the four widths and four resolutions. Accuracy needs ImageNet training, but the
# costs we can draw: width moves a model diagonally (both costs shrink), resolution moves it
# straight down (mult-adds only).

# %%
widths, resolutions = (1.0, 0.75, 0.5, 0.25), (224, 192, 160, 128)
fig, ax = plt.subplots(figsize=(7, 4.5))
for i, w in enumerate(widths):
    points = [costs.totals(costs.mobilenet_v1_layers(width=w, resolution=r)) for r in resolutions]
    ax.plot([p["params"] / 1e6 for p in points], [p["macs"] / 1e6 for p in points], "o-", color=f"C{i}",
            label=f"width {w}, resolution 224 to 128")
    for p, r in zip(points, resolutions):
        ax.annotate(str(r), (p["params"] / 1e6, p["macs"] / 1e6), textcoords="offset points", xytext=(5, -3),
                    fontsize=7)
conv = costs.totals(costs.mobilenet_v1_layers(block="standard"))
ax.plot([conv["params"] / 1e6], [conv["macs"] / 1e6], "s", color="k", label="Conv MobileNet (full 3x3), 224")
ax.set(xscale="log", yscale="log", xlabel="million parameters", ylabel="million mult-adds",
       title="MobileNet-V1's 16 width x resolution models, counted")
ax.legend(fontsize=8, loc="upper left")
save(fig, "02_cost_grid.png")

# %% [markdown]
# ![Mult-adds against parameters for 16 MobileNets: four widths, four resolutions, and the full-convolution baseline](figures/02_cost_grid.png)
#
# ## A real image through the network
#
# Numbers describe the network; feature maps show it working. We take one of the 1,000 CIFAR-100
# images that ship with the package and pass it through the CIFAR variant of MobileNet-V1 (first
# convolution at stride 1, because 32x32 images are already small), capturing every layer's output
# with `capture_intermediates=True`.
#
# A network that has never been trained computes random features, so first we train it, briefly, on
# those 1,000 images. Be clear about what this is: ten epochs on 10 images per class teach the
# first layers some edge and colour detectors and let the network start memorising its training
# images. It is not a CIFAR-100 classifier (tutorial 3 trains one). `steps.train_step` is the
# project's real train step; here it runs under a plain `jax.jit`, on one device.

# %%
sample = load_cifar100_sample()
images, labels = sample["image"], sample["label"]                 # [1000, 32, 32, 3] uint8, [1000]
mean, std = images.mean(axis=(0, 1, 2)), images.std(axis=(0, 1, 2))
x_all = normalize(images, mean, std)                               # [1000, 32, 32, 3] float32, about N(0, 1)

WIDTH = 0.5                        # half of every layer's channels: a few times faster to train on a CPU
STEPS = 2 if QUICK else 100        # full mode: 10 epochs of batches of 100
cifar_net = MobileNetV1(width=WIDTH, stem="cifar", num_classes=100)
tx = optax.adam(2e-3)
state = steps.init_train_state(jax.random.key(0), cifar_net, tx, (32, 32, 3))
train_step = jax.jit(steps.train_step)

order_rng = np.random.default_rng(0)
for step in range(STEPS):
    if step % 10 == 0:
        epoch_order = order_rng.permutation(len(images))      # a fresh shuffle every 10 batches of 100
    idx = epoch_order[(step % 10) * 100:(step % 10 + 1) * 100]  # [100] indices of this step's batch
    state, metrics = train_step(state, {"image": x_all[idx], "label": labels[idx]}, jax.random.key(step))
    if step % 20 == 0 or step == STEPS - 1:
        print(f"step {step:3d}  loss {float(metrics['loss']):.3f}  batch accuracy {float(metrics['accuracy']):.2f}")

# %% [markdown]
# Now one image through the trained network, keeping the output of every `ConvBN` unit (convolution,
# BatchNorm, ReLU6): the full convolution at the start, then the depthwise and pointwise halves of
# each block. The filter passed to `capture_intermediates` picks those modules; the modules inside
# each unit (its convolution, its BatchNorm) and the classifier are skipped.

# %%
INDEX = 600                      # a bicycle: its thin, sharp edges make the early feature maps easy to read
x_one = x_all[INDEX:INDEX + 1]   # [1, 32, 32, 3]
logits, captured = cifar_net.apply(
    {"params": state.params, "batch_stats": state.batch_stats}, x_one, train=False,
    capture_intermediates=lambda module, method: isinstance(module, ConvBN), mutable=["intermediates"])
maps = {"/".join(path[:-1]): value[0][0] for path, value in
        traverse_util.flatten_dict(captured["intermediates"]).items()}  # name -> [H, W, C]
top = np.argsort(np.asarray(logits[0]))[::-1][:3]
print("image", INDEX, "is a", sample["label_names"][labels[INDEX]], "; the network's top 3:",
      [sample["label_names"][i] for i in top])
print(len(maps), "ConvBN outputs, e.g.", {k: maps[k].shape for k in ("stem", "block01/depthwise", "block13/pointwise")})

# %% [markdown]
# Each row below is one layer; its columns are the 8 channels with the largest mean activation for
# this image (out of 16 to 512). The maps shrink at each stride-2 block, 32 to 16, 8, 4 and 2 pixels,
# while the channels multiply: early maps still look like the picture, late ones are a handful of
# pixels that say *what* rather than *where*.
#
# The second row shows the *same* channels as the first: depthwise channel `c` is stem channel `c`
# filtered on its own by one 3x3 kernel, so each still shows its own version of the picture, only
# sharpened or shifted. The pointwise row below mixes all 16 of them into 32 new combinations.

# %%
shown_layers = ["stem", "block01/depthwise", "block01/pointwise", "block02/pointwise", "block04/pointwise",
                "block06/pointwise", "block12/pointwise", "block13/pointwise"]
fig, axes = plt.subplots(len(shown_layers), 9, figsize=(10, 1.3 * len(shown_layers)))
for row, name in zip(axes, shown_layers):
    fmap = np.asarray(maps[name])                                  # [H, W, C], ReLU6: values in [0, 6]
    if name != "block01/depthwise":                                # the depthwise row repeats the stem's channels
        channels = np.argsort(fmap.mean(axis=(0, 1)))[::-1][:8]
    row[0].imshow(images[INDEX])
    row[0].set_title("input" if name == shown_layers[0] else "", fontsize=8)
    for ax, c in zip(row[1:], channels):
        ax.imshow(fmap[:, :, c], cmap="viridis", vmin=0, vmax=max(fmap.max(), 1e-6))
    same = ", the stem's channels above, each filtered alone" if name == "block01/depthwise" else ""
    row[1].set_title(f"{name}  {fmap.shape[0]}x{fmap.shape[1]}x{fmap.shape[2]}{same}", fontsize=8, loc="left")
    for ax in row:
        ax.axis("off")
fig.suptitle(f"One CIFAR-100 image through MobileNet-V1 (width {WIDTH}, CIFAR stem), "
             f"after {STEPS} training steps on 1,000 images", fontsize=10)
fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.94, wspace=0.08, hspace=0.3)  # row titles span columns
save(fig, "02_feature_maps.png")

# %% [markdown]
# ![A bicycle and the 8 most active channels of eight layers of MobileNet-V1, from 32x32 down to 2x2](figures/02_feature_maps.png)
#
# **Next:** tutorial 3 trains this network on CIFAR-100 properly;
# [4. One step, many devices](04_one_step_many_devices.py) runs its train step on several devices at once.
