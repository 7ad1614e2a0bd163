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
# # 1. Depthwise-separable convolution from scratch
#
# MobileNet is one idea applied thirteen times: replace each standard 3x3 convolution by a
# *depthwise* 3x3 convolution (one filter per channel) followed by a *pointwise* 1x1 convolution
# (a matrix multiply over channels). This tutorial builds that idea from loops, counts what it saves,
# derives the saving as a formula, and then checks four real implementations against each other and
# against the clock.
#
# Run it as a notebook (`pip install jupyterlab jupytext`, `jupyter lab tutorials/`, then right-click
# this `.py` file, Open With, Notebook) or as a script: `python tutorials/01_depthwise_separable_from_scratch.py`
# (about a minute on 2 CPU cores).
# Everything it uses comes from the `minimobile` package; nothing is copied here except the
# deliberately naive loops we start from.

# %%
import fractions
import os
import pathlib
import tempfile
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

from minimobile import costs, depthwise, numpy_nn
from minimobile.model import MOBILENET_V1_BLOCKS

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
# ## A standard convolution, in loops
#
# A convolution slides a small window over the image. Each output value is one dot product: a
# `K x K x C_in` window of the input against one `K x K x C_in` filter. With `C_out` filters, every
# output pixel gets `C_out` values. Here is that definition with no padding ("VALID": the window
# stays inside the image, so a 7x7 input gives a 5x5 output), counting the multiplications as it goes.

# %%
def conv2d_loops(x, w):
    """Standard VALID convolution. x: [H, W, C_in], w: [K, K, C_in, C_out] -> ([H-K+1, W-K+1, C_out], mults)."""
    k, _, _, c_out = w.shape
    ho, wo = x.shape[0] - k + 1, x.shape[1] - k + 1
    y, mults = np.zeros((ho, wo, c_out)), 0
    for i in range(ho):
        for j in range(wo):
            window = x[i:i + k, j:j + k, :]              # [K, K, C_in]: every input channel
            for o in range(c_out):
                y[i, j, o] = np.sum(window * w[..., o])  # one filter: K*K*C_in multiplications
                mults += window.size
    return y, mults


# %% [markdown]
# The worked example we follow (from the project's original report): a 7x7 RGB image, 128 filters of
# size 3x3x3, giving a 5x5x128 output.

# %%
rng = np.random.default_rng(0)
x = rng.normal(size=(7, 7, 3))           # [H, W, C_in]
w = rng.normal(size=(3, 3, 3, 128))      # [K, K, C_in, C_out]
y_standard, standard_mults = conv2d_loops(x, w)
print("output", y_standard.shape, "multiplications", f"{standard_mults:,}")

# %% [markdown]
# ## The same job in two cheaper steps
#
# A standard filter does two things at once: it looks at a neighbourhood (*space*) and it mixes the
# input channels (*depth*). A depthwise-separable convolution does them one after the other.
#
# **Depthwise**: one `K x K` filter *per input channel*, applied to that channel only. No mixing:
# channel `c` of the output depends only on channel `c` of the input.

# %%
def depthwise_loops(x, d):
    """One filter per channel, VALID. x: [H, W, C], d: [K, K, C] -> ([H-K+1, W-K+1, C], mults)."""
    k, _, channels = d.shape
    ho, wo = x.shape[0] - k + 1, x.shape[1] - k + 1
    y, mults = np.zeros((ho, wo, channels)), 0
    for i in range(ho):
        for j in range(wo):
            for c in range(channels):
                window = x[i:i + k, j:j + k, c]          # [K, K]: this channel only
                y[i, j, c] = np.sum(window * d[:, :, c])
                mults += window.size
    return y, mults


# %% [markdown]
# **Pointwise**: a 1x1 convolution. Its window is a single pixel, so it is the same `[C_in, C_out]`
# matrix applied at every pixel: stack the pixels as the rows of a matrix and it is *one matrix
# multiply*. An `[n, m] @ [m, k]` product does `n * m * k` multiplications.

# %%
def pointwise(x, p):
    """1x1 convolution. x: [H, W, C_in], p: [C_in, C_out] -> ([H, W, C_out], mults)."""
    h, wd, c_in = x.shape
    pixels = x.reshape(h * wd, c_in)                     # [H*W, C_in]: one row per pixel
    return (pixels @ p).reshape(h, wd, -1), pixels.shape[0] * p.shape[0] * p.shape[1]


d = rng.normal(size=(3, 3, 3))           # [K, K, C]: one 3x3 filter for each of the 3 channels
p = rng.normal(size=(3, 128))            # [C_in, C_out]
y_depthwise, depthwise_mults = depthwise_loops(x, d)
y_separable, pointwise_mults = pointwise(y_depthwise, p)
print("depthwise", y_depthwise.shape, f"{depthwise_mults:,} multiplications")
print("pointwise", y_separable.shape, f"{pointwise_mults:,} multiplications")
print(f"separable total {depthwise_mults + pointwise_mults:,} against standard {standard_mults:,}")

# %% [markdown]
# Same output shape, 5x5x128, for `675 + 9,600 = 10,275` multiplications instead of `86,400`: the
# loops counted them, nobody typed them. It is not the *same function*, though. A separable
# convolution is a standard convolution whose kernel is forced to be a product,
# `w[di, dj, c, o] = d[di, dj, c] * p[c, o]`: it has 27 + 384 = 411 parameters where the standard one
# has 3,456. We can check that claim directly.

# %%
w_factorised = d[:, :, :, None] * p[None, None, :, :]    # [3, 3, 3, 1] * [1, 1, 3, 128] -> [3, 3, 3, 128]
y_check, _ = conv2d_loops(x, w_factorised)
print("standard conv with the factorised kernel == depthwise then pointwise:",
      np.allclose(y_check, y_separable))
print("parameters: standard", w.size, " separable", d.size + p.size)

# %% [markdown]
# So MobileNet bets that the restricted family is good enough, and spends the savings on more
# layers and channels. The paper's ImageNet result (70.6 % against 71.7 % for the same network with
# full convolutions, at less than an eighth of the mult-adds) says the bet pays.
#
# ## The saving, as a formula
#
# For a `K x K` convolution from `M` to `N` channels with a `D x D` output map (the paper's equations
# 1 to 5, with `D_K = K`, `D_F = D`):
#
# | step | multiplications |
# |---|---|
# | standard | `K² · M · N · D²` |
# | depthwise | `K² · M · D²` |
# | pointwise | `M · N · D²` |
#
# Divide the separable cost by the standard one; `M` and `D²` cancel:
#
# `(K² M D² + M N D²) / (K² M N D²)  =  1/N + 1/K²`
#
# With exact fractions, the worked example lands on it precisely:

# %%
counted = fractions.Fraction(depthwise_mults + pointwise_mults, standard_mults)
formula = fractions.Fraction(1, 128) + fractions.Fraction(1, 3**2)
print(f"counted {counted} = {float(counted):.4f};  1/128 + 1/9 = {formula};  equal: {counted == formula}")
print("costs.separable_cost_ratio(128, 3) =", round(costs.separable_cost_ratio(128, 3), 4))

# %% [markdown]
# The `1/K²` term is the floor: however many channels, a 3x3 separable convolution costs at least
# 1/9 of a standard one, and MobileNet's layers (64 to 1,024 output channels) sit close to that floor.
# The markers below are not the formula: they divide each of MobileNet's 13 separable blocks' counted
# mult-adds by those of the same block with a full 3x3 convolution, from `minimobile.costs`. (A
# *mult-add*, the paper's unit, is one of the multiplications counted above, with the addition that
# puts its product into a sum.)

# %%
c_out = np.arange(1, 1025)
separable = costs.mobilenet_v1_layers(block="separable")
standard = costs.mobilenet_v1_layers(block="standard")
dw, pw = [l for l in separable if l.kind == "dw"], [l for l in separable if l.kind == "pw"]
full = [l for l in standard if l.kind == "conv"][1:]     # skip the stem: it is a full conv in both
block_ratio = [(a.macs + b.macs) / f.macs for a, b, f in zip(dw, pw, full)]

fig, ax = plt.subplots(figsize=(7, 4))
for k, style in [(3, "-"), (5, "--"), (7, ":")]:
    ax.plot(c_out, [costs.separable_cost_ratio(int(n), k) for n in c_out], style, color="C0",
            label=f"1/C_out + 1/{k}²")
    ax.axhline(1 / k**2, color="gray", lw=0.6, ls=style)
ax.plot([c for c, _ in MOBILENET_V1_BLOCKS], block_ratio, "o", color="C3",
        label="MobileNet-V1's 13 blocks, counted (5 distinct widths)")
ax.plot([128], [float(counted)], "*", ms=14, color="C2", label="worked example: 10,275 / 86,400")
ax.set(xscale="log", yscale="log", xlabel="output channels C_out", ylabel="separable cost / standard cost",
       title="A separable conv costs 1/C_out + 1/K² of a standard one")
ax.legend(fontsize=8)
save(fig, "01_cost_ratio.png")

# %% [markdown]
# ![The ratio 1/C_out + 1/K² against C_out, for K = 3, 5, 7, with MobileNet's blocks on the K = 3 curve](figures/01_cost_ratio.png)
#
# ## From loops to the `minimobile` layers
#
# The loops above are the definition, and far too slow for real images. `minimobile.numpy_nn` writes
# the same three layers in vectorised NumPy, with the padding MobileNet uses ("SAME": pad so that a
# stride-1 output has the input's size). The trick is to loop over the 9 kernel *taps* instead of
# the output pixels: tap `(di, dj)` is one shifted view of the padded input, and
#
# * the standard conv multiplies each view by a `[C_in, C_out]` matrix,
# * the depthwise conv multiplies each view by a per-channel weight (a broadcast, no mixing),
# * the pointwise conv has a single tap: `x @ w[0, 0]`.
#
# SAME padding is just zero padding followed by our VALID loops, so the loops check the layers.
# The layers work on batches, `[B, H, W, C]`, with Flax's kernel shapes.

# %%
xb = x[None]                                             # [1, 7, 7, 3]: a batch of one image
x_padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))           # SAME for a 3x3 kernel: one pixel each side

y_std, _ = numpy_nn.conv2d_forward(xb, w)                                # w: [3, 3, C_in, C_out]
y_dw, dw_cache = numpy_nn.depthwise_conv_forward(xb, d[:, :, None, :])    # [3, 3, 1, C]
y_sep, pw_cache = numpy_nn.pointwise_conv_forward(y_dw, p[None, None])   # [1, 1, C_in, C_out]
print("standard ", y_std.shape, np.abs(y_std[0] - conv2d_loops(x_padded, w)[0]).max())
print("separable", y_sep.shape, np.abs(y_sep[0] - pointwise(depthwise_loops(x_padded, d)[0], p)[0]).max())

# %% [markdown]
# Training also needs the backward pass. `numpy_nn` has it for every layer, derived by hand and
# checked against `jax.grad` in the tests. Backpropagating through the separable pair is the chain
# rule in reverse order: pointwise first, then depthwise.

# %%
dy = np.ones_like(y_sep)                                          # dL/dy for L = sum(y)
d_dw_out, d_p = numpy_nn.pointwise_conv_backward(dy, pw_cache)    # [1, 7, 7, 3], [1, 1, 3, 128]
d_x, d_d = numpy_nn.depthwise_conv_backward(d_dw_out, dw_cache)   # [1, 7, 7, 3], [3, 3, 1, 3]
print("dL/dx", d_x.shape, " dL/d(depthwise kernel)", d_d.shape, " dL/d(pointwise kernel)", d_p.shape)

# %% [markdown]
# ## Five implementations of the depthwise step
#
# The depthwise step is one operation with several correct implementations, and `minimobile`
# keeps five, because comparing them is the quickest way to understand it. Four compute the
# forward pass differently:
#
# | name | how |
# |---|---|
# | `depthwise_conv_loops` | NumPy loops over channels and pixels: the definition (the test oracle) |
# | `depthwise_conv_split` | one ordinary 1-channel convolution per channel, concatenated |
# | `depthwise_conv_grouped` | XLA's grouped convolution with `feature_group_count=C` (what `nn.Conv` does) |
# | `depthwise_conv_shift_add` | nine shifted views, each scaled per channel, summed (as in `numpy_nn`, but in XLA) |
#
# All four are in `minimobile/depthwise.py`. A fifth, `depthwise_conv_shift_add_vjp`
# (`minimobile/depthwise_vjp.py`), has `shift_add`'s forward pass and a backward pass written by hand
# (tutorial 5 shows why); it is what training on a CPU uses.
#
# The last three are JAX functions, compiled by XLA with `jax.jit`. We also time
# `numpy_nn.depthwise_conv_forward`, the vectorised NumPy version. First, do they agree? The input is
# that of MobileNet's second depthwise layer on CIFAR, a batch of 32x32 maps with 64 channels, which
# that layer convolves at stride 2; we check both strides.

# %%
B, H, C = (2, 16, 16) if QUICK else (8, 32, 64)
xs = rng.normal(size=(B, H, H, C)).astype(np.float32)    # [B, H, W, C]
ks = rng.normal(size=(3, 3, 1, C)).astype(np.float32)    # [3, 3, 1, C]: one 3x3 filter per channel

jax_impls = {"split": depthwise.depthwise_conv_split, "feature_group_count": depthwise.depthwise_conv_grouped,
             "shift_add": depthwise.depthwise_conv_shift_add}
jitted = {(name, s): jax.jit(fn, static_argnums=2) for name, fn in jax_impls.items() for s in (1, 2)}
for stride in (1, 2):
    reference = depthwise.depthwise_conv_loops(xs, ks, stride)        # float64 loops
    diffs = {"numpy_nn": numpy_nn.depthwise_conv_forward(xs, ks, stride)[0]}
    diffs |= {name: jitted[name, stride](xs, ks, stride) for name in jax_impls}
    print(f"stride {stride}: output {reference.shape}, max |difference| from the loops:",
          ", ".join(f"{name} {np.abs(np.asarray(y) - reference).max():.1e}" for name, y in diffs.items()))

# %% [markdown]
# Differences of about 1e-6 are float32 rounding: the loops add in float64, and each implementation
# adds the nine products in its own order.
#
# ## And against the clock
#
# Now time them at stride 1. We report the *best* of several runs: on a shared machine the slower
# runs measure the neighbours as much as the code. The JAX functions are compiled before timing (the
# first call compiles; we exclude it) and `block_until_ready` waits for the result, because JAX
# returns before the computation has finished. NumPy gets float32 input too, so that both move the
# same number of bytes.

# %%
def best_time(fn, repeats):
    """Best wall-clock seconds of `repeats` calls (after one untimed warm-up call, which compiles JAX functions)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


repeats = 2 if QUICK else 10
timings = {
    "NumPy loops\n(depthwise_conv_loops)": best_time(lambda: depthwise.depthwise_conv_loops(xs, ks), 1 if QUICK else 2),
    "NumPy vectorised\n(numpy_nn)": best_time(lambda: numpy_nn.depthwise_conv_forward(xs, ks)[0], repeats),
}
for name in jax_impls:
    timings[f"JAX jit\n{name}"] = best_time(lambda: jitted[name, 1](xs, ks, 1), repeats)
for name, t in timings.items():
    print(f"{name.replace(chr(10), ' '):<45} {t * 1e3:9.3f} ms")

# %%
fig, ax = plt.subplots(figsize=(7, 3.6))
names = list(timings)
bars = ax.barh(names, [timings[n] * 1e3 for n in names], color=["C3", "C1", "C0", "C0", "C0"])
ax.bar_label(bars, [f"{timings[n] * 1e3:.3g} ms" for n in names], padding=3, fontsize=8)
ax.invert_yaxis()
ax.set(xscale="log", xlabel="milliseconds, best of several runs (log scale)",
       title=f"Depthwise 3x3 forward, input [{B}, {H}, {H}, {C}] float32, {jax.default_backend().upper()}")
ax.set_xlim(right=ax.get_xlim()[1] * 8)  # room for the labels
save(fig, "01_depthwise_timings.png")

# %% [markdown]
# ![Bar chart of depthwise convolution times: NumPy loops, NumPy vectorised, and three JAX implementations](figures/01_depthwise_timings.png)
#
# The figure above was made on 2 shared CPU cores; your numbers will differ, the gaps are what
# matters. The loops are slower than everything else: 14 times the slowest JAX version, 50 times
# vectorised NumPy. Python runs one small NumPy call per output channel and pixel. Vectorised NumPy
# is far better, but it still creates nine full-size
# temporaries (one per tap) and walks memory for each. XLA compiles `shift_add` into a single fused
# loop that reads the input and writes the output once, several times faster again.
#
# The other two JAX versions compute the same numbers and were *slower than NumPy* here. `split`
# launches one tiny convolution per channel and then copies the pieces together; the grouped
# convolution is a general-purpose kernel that XLA's CPU backend handles poorly. (GPUs have dedicated
# depthwise kernels, which is why `layers.resolve_depthwise_impl("auto")` picks `feature_group_count`
# on a GPU and `shift_add_vjp`, this `shift_add` with a hand-written backward pass, on a CPU.) So a compiler is not magic: how you express an operation
# decides what it can do with it. What XLA adds beyond speed is why the rest of this project uses it:
# gradients by `jax.grad` instead of by hand, the whole train step compiled as one program, and the
# same code on a GPU or on many devices (tutorial 4).
#
# Tutorial 5 explains the reason underneath these timings: a depthwise convolution does very little
# arithmetic per byte it moves, so its speed is decided by memory traffic, not by mult-adds.
#
# **Next:** [2. MobileNet-V1, layer by layer](02_mobilenet_layer_by_layer.py) stacks thirteen of these
# blocks into the paper's network and reproduces its tables of cost.
