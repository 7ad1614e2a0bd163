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
# # 5. Why depthwise is fast on paper and slow in practice
#
# Tutorial 2 found that depthwise convolutions are 3 % of MobileNet's mult-adds. Time the network,
# though, and they take a far larger share of the clock. The reason is not the arithmetic but the
# memory: a depthwise convolution does very little work for each byte it reads and writes, and on
# modern hardware moving a byte costs much more than multiplying it. This tutorial makes that
# precise with the *roofline model*: it measures this machine's peak arithmetic and memory speed,
# computes each layer's arithmetic intensity, times every layer of MobileNet-V1, and finally times
# the depthwise implementations of tutorial 1, forward and backward, to see what each does about it.
#
# Every number below is measured on the machine that runs the notebook. The committed figures come
# from 2 shared CPU cores; yours will differ, and should. Run it as a notebook or as
# `python tutorials/05_why_depthwise_is_slow.py` (one to two minutes on 2 CPU cores).

# %%
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax import lax

from minimobile import costs, depthwise, depthwise_vjp

# MINIMOBILE_TUTORIAL_QUICK=1 (the test suite's setting) runs every tutorial with small sizes, and draws
# its figures in a temporary folder (or MINIMOBILE_FIGURES_DIR), never over those committed beside this file.
QUICK = os.environ.get("MINIMOBILE_TUTORIAL_QUICK") == "1"
HERE = pathlib.Path(__file__).parent if "__file__" in globals() else pathlib.Path.cwd()  # Jupyter: no __file__
FIGURES = pathlib.Path(os.environ.get("MINIMOBILE_FIGURES_DIR") or
                       (pathlib.Path(tempfile.gettempdir(), "minimobile-quick-figures") if QUICK else HERE / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
REPEATS = 3 if QUICK else 20


def save(fig, name: str) -> None:
    fig.savefig(FIGURES / name, dpi=120, bbox_inches="tight")
    print("wrote", FIGURES / name)


def times(fn, *args, repeats=REPEATS):
    """Wall-clock seconds of `repeats` calls of a jitted fn, after one untimed call that compiles it."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))  # JAX returns before the work is done; wait for it
        out.append(time.perf_counter() - start)
    return np.array(out)


print("backend:", jax.default_backend(), jax.devices()[0].device_kind, "| quick mode" if QUICK else "")

# %% [markdown]
# ## Two numbers that describe a machine
#
# How fast can this machine multiply, and how fast can it move data? We measure both with programs
# that do nothing else:
#
# * **Peak arithmetic**: a large matrix multiply, `n x n` by `n x n`, which does `2 n³` floating-point
#   operations (a mult-add is two FLOPs: the roofline convention) on only `3 n²` numbers, so memory
#   cannot be what limits it.
# * **Memory bandwidth**: `y = 2 * x + 1` on a large array: 2 FLOPs per element, 8 bytes moved (read
#   4, write 4), so arithmetic cannot be what limits it. We run it twice: on an array far larger than
#   the caches (main memory), and on a small one that stays in cache.
#
# We keep the *best* of several runs: the slower ones measure other programs sharing the machine.

# %%
def peak_arithmetic(n=512 if QUICK else 2048):
    a = jnp.ones((n, n), jnp.float32)
    return 2 * n**3 / times(jax.jit(lambda a: a @ a), a).min()             # FLOP / second


def bandwidth(num_floats):
    x = jnp.ones(num_floats, jnp.float32)
    return 8 * num_floats / times(jax.jit(lambda x: 2 * x + 1), x).min()   # bytes / second


def measure_roof():
    """(peak FLOP/s, bandwidth from main memory, bandwidth from cache), in that order."""
    return np.array([peak_arithmetic(),
                     bandwidth(2**22 if QUICK else 2**26),   # 256 MiB (16 MiB in quick mode): main memory
                     bandwidth(2**18)])                      # 1 MiB: stays in cache


peak_flops, dram_bw, cache_bw = roof = measure_roof()
print(f"peak arithmetic {peak_flops / 1e9:.0f} GFLOP/s; bandwidth {dram_bw / 1e9:.1f} GB/s from memory, "
      f"{cache_bw / 1e9:.1f} GB/s from cache")
print(f"ridge point: {peak_flops / dram_bw:.0f} FLOPs per byte of memory traffic")

# %% [markdown]
# The ratio of the two is the machine's **ridge point**: a computation must do at least that many
# FLOPs per byte it moves to keep the arithmetic units busy. Below it, the arithmetic waits for
# memory, and more mult-adds would be free.
#
# ## Arithmetic intensity of each layer
#
# A layer's **arithmetic intensity** is its FLOPs divided by the bytes it must move at least once:
# read its input and its weights, write its output (float32, 4 bytes each). From the layer table of
# `minimobile.costs` (1.0 MobileNet-224, one image, as on a phone):
#
# * a **depthwise** 3x3 layer does 9 mult-adds (18 FLOPs) per output value and moves about 8 bytes
#   per output value (read one input value, write one output), so its intensity is about **2 FLOPs
#   per byte**, whatever the number of channels (about 1 at stride 2, which reads 4 inputs per output);
# * a **pointwise** layer does `C_in` mult-adds per output value (32 to 1,024), so its intensity grows
#   with the width, to tens of FLOPs per byte;
# * a **full** 3x3 convolution does 9 times as much again per value.

# %%
BATCH = 1
RESOLUTION = 64 if QUICK else 224                # quick mode: 64x64 images, to keep the timings short
table = [layer for layer in costs.mobilenet_v1_layers(resolution=RESOLUTION) if layer.kind != "pool"]
baseline = [layer for layer in costs.mobilenet_v1_layers(resolution=RESOLUTION, block="standard")
            if layer.kind == "conv"][1:]         # the full-convolution network's 13 middle layers


def flops(layer):
    return 2 * layer.macs * BATCH


def bytes_moved(layer):
    """The minimum traffic: input and output activations of the batch, and the weights, once each."""
    return 4 * (BATCH * (np.prod(layer.input_shape) + np.prod(layer.output_shape)) + layer.params)


def intensity(layer):
    return flops(layer) / bytes_moved(layer)


for kind, name in [("conv", "full 3x3 (stem)"), ("dw", "depthwise 3x3"), ("pw", "pointwise 1x1"), ("fc", "classifier")]:
    values = [intensity(layer) for layer in table if layer.kind == kind]
    print(f"{name:<18} intensity {min(values):7.1f} to {max(values):7.1f} FLOPs/byte")
values = [intensity(layer) for layer in baseline]
print(f"{'full 3x3 (Conv MobileNet)':<18} intensity {min(values):7.1f} to {max(values):7.1f} FLOPs/byte")

# %% [markdown]
# ## Every layer, timed
#
# Now run each layer on its own, compiled by XLA, on one image of the right shape, and measure how
# many FLOP/s it actually achieves. The depthwise layers run twice, with two of tutorial 1's
# implementations: XLA's grouped convolution (`feature_group_count`) and `shift_add`.

# %%
def conv(x, w, stride=1, groups=1):
    """XLA convolution, NHWC / HWIO, SAME padding."""
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)


def layer_fn(layer, dw_impl):
    """A jitted function computing `layer`, and its random input and weights."""
    key = jax.random.key(0)
    if layer.kind == "fc":
        c_in, c_out = layer.filter_shape
        x, w = jax.random.normal(key, (BATCH, c_in)), jax.random.normal(key, (c_in, c_out))
        return jax.jit(lambda x, w: x @ w), x, w
    h, wd, c_in = layer.input_shape
    c_out = layer.output_shape[-1]
    k = 1 if layer.kind == "pw" else 3
    x = jax.random.normal(key, (BATCH, h, wd, c_in))                          # [B, H, W, C_in]
    if layer.kind == "dw":
        w = jax.random.normal(key, (3, 3, 1, c_out))                          # [3, 3, 1, C]
        return jax.jit(lambda x, w: dw_impl(x, w, layer.stride)), x, w
    w = jax.random.normal(key, (k, k, c_in, c_out))                           # [K, K, C_in, C_out]
    return jax.jit(lambda x, w: conv(x, w, layer.stride)), x, w


def measure(layers_, dw_impl=depthwise.depthwise_conv_grouped):
    """Best time of each layer, in seconds. Identical layers (blocks 7 to 11 are five copies) are timed once."""
    best = {}
    for layer in layers_:
        shape = (layer.kind, layer.input_shape, layer.output_shape, layer.stride)
        if shape not in best:
            best[shape] = times(*layer_fn(layer, dw_impl)).min()
    return np.array([best[layer.kind, layer.input_shape, layer.output_shape, layer.stride] for layer in layers_])


t_grouped = measure(table)
t_shift_add = measure([layer for layer in table if layer.kind == "dw"], depthwise.depthwise_conv_shift_add)
t_baseline = measure(baseline)
achieved = np.array([flops(layer) for layer in table]) / t_grouped
print(f"1.0 MobileNet-{RESOLUTION}, batch {BATCH}: {t_grouped.sum() * 1e3:.1f} ms with grouped depthwise, "
      f"{(t_grouped.sum() - t_grouped[[l.kind == 'dw' for l in table]].sum() + t_shift_add.sum()) * 1e3:.1f} ms "
      f"with shift_add (layers alone, without BatchNorm or ReLU6)")

# %% [markdown]
# ## The roofline
#
# A roof is a ceiling: a disturbance while we measured it (another program taking a core) can only
# make it look lower than it is. So we measure it once more, now that the layers have run, and keep
# the better of the two measurements of each number. And if some layer ran faster than the matrix
# multiply did, that layer's rate is the better estimate of the peak: nothing runs faster than the
# machine can. (On a busy machine, a short program such as one layer slips into the quiet moments
# more easily than a long matrix multiply.)

# %%
again = measure_roof()
print("roof measured twice (peak GFLOP/s, memory GB/s, cache GB/s):", np.round(roof / 1e9, 1), np.round(again / 1e9, 1))
peak_flops, dram_bw, cache_bw = roof = np.maximum(roof, again)
fastest_layer = max(achieved.max(), max(flops(l) / t for l, t in zip(baseline, t_baseline)))
print(f"fastest layer: {fastest_layer / 1e9:.0f} GFLOP/s")
peak_flops = max(peak_flops, fastest_layer)
ridge = peak_flops / dram_bw

# %% [markdown]
# Now put it together. The x axis is arithmetic intensity, the y axis achieved FLOP/s, both logarithmic.
# The *roof* is the best any program can do on this machine: `min(peak, intensity x bandwidth)`, a
# slope where memory limits (left of the ridge) and a flat ceiling where arithmetic does (right).
# The dashed slope uses the cache's bandwidth instead: small layers whose data stays in cache can
# climb above the main-memory slope.

# %%
kinds = {"conv": ("full 3x3 conv (stem)", "C3", "s"), "dw": ("depthwise 3x3, grouped", "C1", "v"),
         "pw": ("pointwise 1x1", "C0", "o"), "fc": ("classifier (matrix-vector)", "C2", "D")}
dw_layers = [layer for layer in table if layer.kind == "dw"]
fig, ax = plt.subplots(figsize=(8, 5))
xs = np.logspace(-1, 3, 200)
ax.plot(xs, np.minimum(peak_flops, xs * dram_bw) / 1e9, "k-", lw=2,
        label="roof: min(peak, intensity x memory bandwidth)")
ax.plot(xs, np.minimum(peak_flops, xs * cache_bw) / 1e9, "k--", lw=1, label="roof with cache bandwidth")
for kind, (label, color, marker) in kinds.items():
    idx = [i for i, layer in enumerate(table) if layer.kind == kind]
    ax.scatter([intensity(table[i]) for i in idx], achieved[idx] / 1e9, color=color, marker=marker, label=label)
ax.scatter([intensity(layer) for layer in dw_layers], [flops(l) / t / 1e9 for l, t in zip(dw_layers, t_shift_add)],
           facecolors="none", edgecolors="C1", marker="v", label="depthwise 3x3, shift_add")
ax.scatter([intensity(layer) for layer in baseline], [flops(l) / t / 1e9 for l, t in zip(baseline, t_baseline)],
           facecolors="none", edgecolors="C3", marker="s", label="full 3x3 (Conv MobileNet's layers)")
ax.axvline(ridge, color="gray", lw=0.5)
ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOPs per byte moved)", ylabel="achieved GFLOP/s",
       title=f"MobileNet-V1's layers on this machine ({jax.default_backend().upper()}, batch {BATCH}, "
             f"{RESOLUTION}x{RESOLUTION})")
ax.legend(fontsize=7, loc="lower right")
save(fig, "05_roofline.png")

# %% [markdown]
# ![Roofline of this machine with every layer of MobileNet-V1 placed by intensity and measured speed](figures/05_roofline.png)
#
# Read it from left to right. The depthwise layers sit far left, at 1 to 2 FLOPs per byte: even a
# perfect implementation can only go as fast as memory delivers their data, a small fraction of the
# peak. With `shift_add` (hollow triangles) they come within about a factor of 2 of the main-memory
# slope, a few reach it; with the grouped convolution
# (filled triangles) they stay far below even that: those layers are limited neither by memory nor
# by arithmetic but by the implementation. The pointwise layers sit near the ridge; they are matrix
# multiplies, the operation hardware is built for, and they come close to the roof. The full 3x3 convolutions of the
# baseline are further right still. The classifier, one image times a 1024x1000 matrix, reads 4 MB
# of weights to do 2 MFLOPs and is memory-bound too (a larger batch would share the weights).
#
# On a shared machine, read every number here as give or take a third: compare the two
# measurements of the roof above to see how much it moved while the notebook ran.
#
# So the mult-adds MobileNet removes were the cheap kind, done at high speed, and the ones it keeps
# in its depthwise layers are the expensive kind. The share of time shows it:

# %%
def shares(values, kinds_of):
    total = values.sum()
    return [100 * values[[k == kind for k in kinds_of]].sum() / total for kind in kinds]


layer_kinds = [layer.kind for layer in table]
t_with_shift_add = t_grouped.copy()
t_with_shift_add[[k == "dw" for k in layer_kinds]] = t_shift_add
bars = {"mult-adds": shares(np.array([layer.macs for layer in table], float), layer_kinds),
        "time, grouped depthwise": shares(t_grouped, layer_kinds),
        "time, shift_add depthwise": shares(t_with_shift_add, layer_kinds)}
for name, values in bars.items():
    print(f"{name:<28}", "  ".join(f"{kinds[k][0].split(',')[0]} {v:5.1f}%" for k, v in zip(kinds, values)))

fig, ax = plt.subplots(figsize=(7, 3.2))
left = np.zeros(len(bars))
for i, (kind, (label, color, _)) in enumerate(kinds.items()):
    values = np.array([v[i] for v in bars.values()])
    ax.barh(list(bars), values, left=left, color=color, label=label.split(",")[0])
    left += values
ax.invert_yaxis()
ax.set(xlabel="% of the network's total", xlim=(0, 100),
       title=f"Depthwise: {bars['mult-adds'][1]:.0f} % of the mult-adds, "
             f"{bars['time, grouped depthwise'][1]:.0f} % of the time (grouped)")
ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
save(fig, "05_share_of_time.png")

# %% [markdown]
# ![Share of mult-adds against share of measured time, by layer type](figures/05_share_of_time.png)
#
# ## What the implementations do about it
#
# Nothing can raise a depthwise layer's intensity; the best an implementation can do is move
# exactly the minimum: read each input value once, write each output value once, and keep the
# nine-fold reuse of each input (every input pixel feeds nine outputs) inside the cache. Then its
# time is its bytes divided by the bandwidth. Here are the JAX implementations at one layer
# shape, forward and forward + backward (the backward pass of a depthwise layer is two more
# depthwise-like operations: one for the input's gradient, one for the kernel's), and a pointwise
# layer of the same size for scale, which does 14 times the mult-adds.

# %%
B, H, C = (2, 28, 32) if QUICK else (8, 56, 128)      # full mode: block 3 of MobileNet-224, batch 8
kx, kw = jax.random.split(jax.random.key(1))
x = jax.random.normal(kx, (B, H, H, C))               # [B, H, W, C]
dw_kernel = jax.random.normal(kw, (3, 3, 1, C))       # [3, 3, 1, C]
pw_kernel = jax.random.normal(kw, (1, 1, C, C))       # [1, 1, C, C]

candidates = {"split": depthwise.depthwise_conv_split, "feature_group_count": depthwise.depthwise_conv_grouped,
              "shift_add": depthwise.depthwise_conv_shift_add,
              "shift_add_vjp": depthwise_vjp.depthwise_conv_shift_add_vjp,
              "pointwise 1x1 (reference)": lambda x, w: conv(x, w)}
kernels = {name: pw_kernel if name.startswith("pointwise") else dw_kernel for name in candidates}
results = {}
for name, fn in candidates.items():
    forward = jax.jit(fn)
    # Forward + backward: the gradient of a scalar with respect to both input and kernel.
    backward = jax.jit(jax.grad(lambda x, w, fn=fn: jnp.sum(fn(x, w) ** 2), argnums=(0, 1)))
    results[name] = (times(forward, x, kernels[name]), times(backward, x, kernels[name]))

min_bytes = 4 * 2 * x.size                             # read the input, write the output (same size here)
print(f"input [{B}, {H}, {H}, {C}]; times in ms, best and median of {REPEATS}")
for name, (fwd, fwd_bwd) in results.items():
    print(f"{name:<28} forward {fwd.min() * 1e3:8.2f} ({np.median(fwd) * 1e3:8.2f})   "
          f"forward+backward {fwd_bwd.min() * 1e3:8.2f} ({np.median(fwd_bwd) * 1e3:8.2f})   "
          f"forward at {min_bytes / fwd.min() / 1e9:5.1f} GB/s of minimum traffic")
print(f"(memory bandwidth measured above: {dram_bw / 1e9:.1f} GB/s from memory, {cache_bw / 1e9:.1f} from cache)")

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
names = list(results)
y = np.arange(len(names))
fwd = np.array([results[k][0].min() for k in names]) * 1e3
both = np.array([results[k][1].min() for k in names]) * 1e3
ax.barh(y - 0.2, fwd, 0.4, color="C0", label="forward")
ax.barh(y + 0.2, both, 0.4, color="C3", label="forward + backward")
for yi, f, b in zip(y, fwd, both):
    ax.text(f * 1.1, yi - 0.2, f"{f:.3g}", va="center", fontsize=7)
    ax.text(b * 1.1, yi + 0.2, f"{b:.3g}", va="center", fontsize=7)
ax.set_yticks(y, names)
ax.invert_yaxis()
ax.set(xscale="log", xlabel="milliseconds, best of several runs (log scale)",
       title=f"Depthwise 3x3 on [{B}, {H}, {H}, {C}], four ways ({jax.default_backend().upper()})")
ax.set_xlim(right=ax.get_xlim()[1] * 5)
ax.legend(fontsize=8, loc="lower right")
save(fig, "05_depthwise_impls.png")

# %% [markdown]
# ![Forward and forward+backward times of four depthwise implementations and a pointwise layer](figures/05_depthwise_impls.png)
#
# What each implementation does about memory traffic:
#
# * **`split`** slices out each channel, runs one single-channel convolution per channel and
#   concatenates the results: several passes over memory and one small convolution per channel,
#   each too small to keep the cores busy. Its cost grows with the number of channels.
# * **`feature_group_count`** is one XLA operation, but on a CPU XLA runs it with a general
#   convolution routine designed for dense channel mixing; it gains nothing from the layer's
#   simplicity, and its backward pass is two more grouped convolutions, slower still. On a GPU,
#   cuDNN has kernels written for exactly this case, which is why `minimobile` uses it there.
# * **`shift_add`** writes the layer as what it is, nine per-channel multiply-adds of shifted views.
#   XLA fuses all nine into one loop that reads each input once (the neighbouring reads hit the
#   cache) and writes each output once: the minimum traffic, at a rate of the order of the memory's
#   bandwidth, which is as fast as a depthwise layer can go. Its backward pass, left to autodiff, is
#   much slower than its forward: the input's gradient becomes nine zero-padded copies of the output
#   gradient added up, and the kernel's gradient nine reductions that each first copy a shifted input.
# * **`shift_add_vjp`** (the default on CPU, `layers.resolve_depthwise_impl`) keeps that forward and
#   writes the backward by hand (`jax.custom_vjp`, in `minimobile/depthwise_vjp.py`): the input's
#   gradient is itself a depthwise convolution of the output gradient with the kernel flipped (one
#   fused loop again), and the kernel's gradient is nine multiply-and-sum loops. Those nine are now
#   the most expensive part of the layer: each one is a full pass over both the input and the output
#   gradient, and XLA has no way to compute all nine sums in one pass (that would be one loop with
#   nine outputs). A profile of the CPU train step (`jax.profiler.trace`) shows one such tap
#   costing about as much as the whole forward pass of its layer.
#
# Beyond one layer, the only way to do better is to move fewer bytes in total: keep the depthwise
# output in cache and feed it straight to the pointwise layer (and fold BatchNorm and ReLU6 into the
# same pass), so the intermediate map never goes to memory at all. That is a matter of fusing
# layers, which compilers and inference engines do to different degrees; the roofline tells you
# when it is worth the trouble: whenever a layer sits on the sloped part of the roof.
#
# **About the measurements.** They are best-of-N wall-clock times on a machine shared with other
# work, printed beside their medians so you can see the spread; on 2 shared cores the median can be
# twice the best. The bandwidth and peak are also measured, not taken from a data sheet, so the
# roof is this machine's as it was when the notebook ran. The shape of the picture (depthwise on
# the slope, pointwise near the ridge, the time shares) is what survives from one machine to another.
