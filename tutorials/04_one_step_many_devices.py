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
# # 4. One step, many devices
#
# Data parallelism in one sentence: give every device a copy of the model and a slice of the batch,
# average the gradients, and every copy takes the same step. This tutorial runs *one* train step,
# `minimobile.steps.train_step`, three ways (plain `jax.jit` on one device, `jax.pmap` over 8 devices,
# and `jax.shard_map` over a mesh of 8 devices) and checks that all three compute the same thing. Then
# it breaks one of them on purpose, by leaving BatchNorm unsynchronised, to show why MobileNet's
# BatchNorm layers must average their statistics across devices. Last, two separate processes join
# into one 4-device system with `jax.distributed`, which is how the same code spans several machines.
#
# No accelerator needed: XLA can split a CPU into several "devices". Run it as a notebook or as
# `python tutorials/04_one_step_many_devices.py` (under a minute on 2 CPU cores).

# %% [markdown]
# ## Eight devices on one CPU
#
# `--xla_force_host_platform_device_count=8` asks XLA's CPU backend to present 8 devices. They share
# the same cores, so nothing gets faster, but every collective (`psum`, `pmean`, ...) really runs, and
# the code is exactly the code that would run on 8 GPUs. XLA reads the flag once, when JAX starts, so
# it has to be set *before* `import jax` (in Jupyter: restart the kernel if JAX was already imported).
# We also pin JAX to the CPU, so that a machine with one GPU still sees the same 8 devices.

# %%
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import pathlib  # noqa: E402  (after the environment, on purpose)
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from minimobile import steps  # noqa: E402
from minimobile.assets import load_cifar100_sample  # noqa: E402
from minimobile.augment import normalize  # noqa: E402
from minimobile.layers import ConvBN, SeparableBlock  # noqa: E402

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


print(jax.device_count(), "devices:", jax.devices())

# %% [markdown]
# ## A tiny MobileNet and one global batch
#
# The full network would spend most of this tutorial compiling, so we assemble a small one from the
# same building blocks (`ConvBN`, `SeparableBlock` from `minimobile.layers`): a stem convolution and
# two depthwise-separable blocks, each followed by BatchNorm. Everything below applies unchanged to
# `MobileNetV1`. The model takes `bn_axis_name`: the name of the device axis over which its BatchNorm
# layers average their statistics, or `None` to use each device's own.

# %%
class TinyMobileNet(nn.Module):
    """A stem and two separable blocks, made of minimobile's layers. x: [B, 32, 32, 3] -> [B, 100]."""

    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = dict(bn_axis_name=self.bn_axis_name)
        x = ConvBN(16, strides=2, name="stem", **bn)(x, train)                 # [B, 16, 16, 16]
        x = SeparableBlock(32, strides=2, name="block01", **bn)(x, train)      # [B, 8, 8, 32]
        x = SeparableBlock(64, strides=2, name="block02", **bn)(x, train)      # [B, 4, 4, 64]
        return nn.Dense(100, name="classifier")(jnp.mean(x, axis=(1, 2)))      # [B, 100]


sample = load_cifar100_sample()
images = normalize(sample["image"][:64], sample["image"].mean((0, 1, 2)), sample["image"].std((0, 1, 2)))
batch = {"image": images, "label": jnp.asarray(sample["label"][:64])}   # the global batch: 64 images
N_STEPS = 2 if QUICK else 5
rng = jax.random.key(1)        # dropout's key; this model has no dropout, so it changes nothing here

tx = optax.sgd(0.1, momentum=0.9)
state = steps.init_train_state(jax.random.key(0), TinyMobileNet(), tx, (32, 32, 3))
print("parameters:", sum(x.size for x in jax.tree.leaves(state.params)))

# %% [markdown]
# `state` holds the parameters, the optimizer's momentum and BatchNorm's running statistics, plus
# `apply_fn`, the model's `apply`. The parameters do not depend on `bn_axis_name`, so every version
# below starts from this same state and only swaps in the model it should run.
#
# ## 1. Plain `jit`: one device, the reference
#
# `train_step(state, batch, rng, axis_name=None)` is the whole of learning: forward, loss, backward,
# optimizer update. With `axis_name=None` there is nobody to average with.

# %%
def run(step_fn, state, batch, n_steps):
    """Apply step_fn n_steps times to the same batch; return the final state and the loss of each step."""
    losses = []
    for _ in range(n_steps):
        state, metrics = step_fn(state, batch)
        losses.append(float(np.asarray(metrics["loss"]).ravel()[0]))  # pmap returns one copy per device
    return state, losses


step_jit = jax.jit(lambda s, b: steps.train_step(s, b, rng))
state_jit, losses_jit = run(step_jit, state, batch, N_STEPS)
print("jit   losses", np.round(losses_jit, 5))

# %% [markdown]
# ## 2. `pmap`: one copy per device, stacked
#
# `jax.pmap(f, axis_name="batch")` runs `f` once on each device, in parallel. Every argument gets a
# leading axis of length 8, one slice per device: the state is *replicated* (8 identical copies
# stacked), the batch is *split* into 8 slices of 8 images. Inside, `train_step` sees only its own
# 8 images, and `axis_name="batch"` makes it average the gradients and metrics over the devices with
# `lax.pmean`. The model gets the same axis name, so its BatchNorm layers average their statistics too.

# %%
n = jax.device_count()
state_sync = state.replace(apply_fn=TinyMobileNet(bn_axis_name="batch").apply)
replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * n), tree)            # [8, ...]
split = lambda tree: jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), tree)    # [64, ...] -> [8, 8, ...]

step_pmap = jax.pmap(lambda s, b: steps.train_step(s, b, rng, axis_name="batch"), axis_name="batch")
state_pmap, losses_pmap = run(step_pmap, replicate(state_sync), split(batch), N_STEPS)
print("pmap  losses", np.round(losses_pmap, 5))

# %% [markdown]
# ## 3. A mesh: one program over global arrays
#
# The modern API. A `Mesh` names the devices' layout (here one axis, `"batch"`, of 8 devices), and
# `jax.shard_map` runs the same per-device body over it. Instead of stacking, we say with a
# `PartitionSpec` how each *global* array is laid out: `P()` replicated on every device, `P("batch")`
# split along its first axis. The batch goes in as one `[64, 32, 32, 3]` array and each device
# receives its `[8, 32, 32, 3]` block; the outputs are `P()`, identical on every device.
#
# `check_vma=False`: `train_step` averages its gradients itself with `lax.pmean`, exactly as under
# `pmap`. With the check on, `shard_map` tracks which values vary across devices, and the gradient of
# the replicated parameters would come back already *summed* over the 8 devices; averaging that again
# would train with 8 times the intended step. (`minimobile.parallel.distribute` makes the same choice.)

# %%
mesh = Mesh(np.array(jax.devices()), ("batch",))
step_mesh = jax.jit(jax.shard_map(
    lambda s, b: steps.train_step(s, b, rng, axis_name="batch"),
    mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P(), P()), check_vma=False))
state_mesh, losses_mesh = run(step_mesh, state_sync, batch, N_STEPS)
print("mesh  losses", np.round(losses_mesh, 5))

# %% [markdown]
# (`minimobile.parallel` wraps the step this way for training, with one difference: there the whole
# dataset already lives on every device, so the batch goes in replicated and each device picks its
# own block by `lax.axis_index`. Nothing crosses from the host per step.)
#
# ## The same numbers?
#
# Same step, same global batch, same starting point: the three should agree to float32 rounding. They
# need not agree bit for bit, because averaging 8 partial results adds the same numbers in a different
# order than one device summing 64 examples (often the rounding happens to land on the same float).

# %%
def max_abs_diff(a, b):
    """Largest absolute difference between two trees of arrays with the same structure."""
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


unstack = lambda tree: jax.tree.map(lambda x: x[0], tree)            # pmap: device 0's copy
for name, s, losses in [("pmap", unstack(state_pmap), losses_pmap), ("mesh", state_mesh, losses_mesh)]:
    print(f"{name} vs jit after {N_STEPS} steps: "
          f"max |loss diff| {np.max(np.abs(np.subtract(losses, losses_jit))):.1e}, "
          f"max |param diff| {max_abs_diff(s.params, state_jit.params):.1e}, "
          f"max |BatchNorm statistics diff| {max_abs_diff(s.batch_stats, state_jit.batch_stats):.1e}")

# %% [markdown]
# Differences of order 1e-6 to 1e-7: rounding, not a different computation. 8 devices with 8 images
# each took exactly the step that 1 device takes with 64.
#
# ## Break it: BatchNorm without synchronisation
#
# Now the same `pmap` with one change: the model's BatchNorm layers get `bn_axis_name=None`. The
# gradients are still averaged across devices; only the normalisation is local.
#
# In training mode, BatchNorm normalises each channel with the *batch's* mean and variance. Without
# an axis name, "the batch" means this device's 8 images, not the global 64, and 8 images give
# different (and noisier) statistics than 64. So each device normalises with different numbers: the
# network computes a different function of its input, the loss and the gradients change, and the
# result is no longer the one-device step. Worse, each device folds its *own* statistics into its
# running averages, so the 8 copies of `batch_stats` drift apart: after one step the replicas are
# no longer the same model, and which copy you save decides what you evaluate.

# %%
state_local = state.replace(apply_fn=TinyMobileNet(bn_axis_name=None).apply)
state_unsync, losses_unsync = run(step_pmap, replicate(state_local), split(batch), N_STEPS)
print("pmap, local BatchNorm, losses", np.round(losses_unsync, 5))
print("vs jit: max |loss diff|", f"{np.max(np.abs(np.subtract(losses_unsync, losses_jit))):.1e},",
      "max |param diff|", f"{max_abs_diff(unstack(state_unsync.params), state_jit.params):.1e}")

running_mean = lambda s: np.asarray(s.batch_stats["stem"]["bn"]["mean"])   # stem BatchNorm's running mean, [.., 16]
spread = lambda x: float(np.max(x.max(axis=0) - x.min(axis=0)))
print("spread of the running mean across the 8 devices' copies: synchronised",
      f"{spread(running_mean(state_pmap)):.1e}, local {spread(running_mean(state_unsync)):.1e}")

# %% [markdown]
# The figure shows both effects: how far each version's loss is from the one-device loss, and the
# running mean of one channel of the first BatchNorm layer as each device's copy holds it after the
# last step.

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.6))
steps_axis = np.arange(1, N_STEPS + 1)
gap = lambda losses: np.maximum(np.abs(np.subtract(losses, losses_jit)), 1e-9)   # log scale: no zeros
ax0.plot(steps_axis, gap(losses_pmap), "x--", color="C1", label="pmap, 8 devices x 8 images, synchronised BatchNorm")
ax0.plot(steps_axis, gap(losses_mesh), "+:", color="C2", ms=10, label="mesh, 8 x 8, synchronised BatchNorm")
ax0.plot(steps_axis, gap(losses_unsync), "s-", color="C3", label="pmap, 8 x 8, local BatchNorm")
ax0.set(yscale="log", ylim=(1e-9, 1), xlabel="step", ylabel="|loss - loss of jit on 1 device|",
        title="Distance from the one-device step")
ax0.set_xticks(steps_axis)
ax0.text(N_STEPS, 2e-9, "on the bottom edge: exactly equal", ha="right", va="bottom", fontsize=7, color="gray")
ax0.legend(fontsize=7)
channel = 0
ax1.bar(np.arange(n) - 0.2, running_mean(state_pmap)[:, channel], 0.4, color="C1", label="synchronised")
ax1.bar(np.arange(n) + 0.2, running_mean(state_unsync)[:, channel], 0.4, color="C3", label="local")
ax1.axhline(float(running_mean(state_jit)[channel]), color="C0", lw=2, alpha=0.5, label="jit (1 device)")
ax1.set(xlabel="device", ylabel=f"running mean, stem channel {channel}",
        title=f"Each device's copy of BatchNorm's running mean, step {N_STEPS}")
ax1.legend(fontsize=7)
fig.tight_layout()
save(fig, "04_batchnorm_sync.png")

# %% [markdown]
# ![Left: pmap and mesh stay within float32 rounding of the one-device loss, local BatchNorm does not. Right: 8 identical running means when synchronised, 8 different ones when local](figures/04_batchnorm_sync.png)
#
# With synchronised statistics, the losses stay within float32 rounding (below 1e-6) of the
# one-device loss, and the 8 bars are one value, the one-device value. With local statistics the
# loss is off from the very first step, by thousands of times the rounding, and the 8 bars scatter.
#
# How much that matters depends on the per-device batch: with 128 images per device the local
# statistics are close to the global ones and many recipes accept the difference; with 8, or with
# the 2 x 2 maps of MobileNet's last layers on CIFAR, they are not. `minimobile` always synchronises
# (`train.py` builds the model with `bn_axis_name` set to the step's axis name), so a run's result
# does not depend on how many devices it ran on.
#
# ## Two processes, one system
#
# `pmap` and the mesh above used the devices of one process. To use several machines, start one
# process per machine; `jax.distributed.initialize` connects them through a coordinator (process 0's
# address) and from then on `jax.devices()` lists every device of every process, so a `Mesh` over
# `jax.devices()` spans them all and the same `shard_map` code runs across machines. Collectives
# between processes go over the network (on CPU through the gloo library).
#
# We can try this on one machine: two processes, 2 CPU devices each, talking over loopback
# (127.0.0.1). Each runs [`two_processes.py`](two_processes.py), which does two things over the
# 4-device mesh: a `psum` of the device positions (0 + 1 + 2 + 3 = 6 on every device), and the mean
# and variance of a batch split between the processes, computed as synchronised BatchNorm
# (`layers.BatchNorm`) does: one `lax.pmean` of each device's `[E[x], E[x^2]]`, then
# `var = E[x^2] - E[x]^2`. Each process holds only half of the data, and both get the global
# statistics.

# %%
with socket.socket() as s:          # a free port for the coordinator, on loopback only
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

worker = HERE / "two_processes.py"
env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}      # the worker asks for its own 2 devices
procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i)], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
try:
    outputs = [p.communicate(timeout=120)[0] for p in procs]
finally:
    for p in procs:                  # never leave a process behind, even if one of them hung
        if p.poll() is None:
            p.kill()
for i, (p, out) in enumerate(zip(procs, outputs)):
    print(f"--- process {i} (exit code {p.returncode})")
    print("\n".join(line for line in out.splitlines() if not line.startswith("[Gloo]")))  # skip gloo's chatter
assert all(p.returncode == 0 for p in procs), "a worker failed; its output is above"

# %% [markdown]
# On a real cluster, replace `127.0.0.1:PORT` by process 0's hostname (or let
# `jax.distributed.initialize()` read it from SLURM and similar schedulers) and start one process
# per machine. `python -m minimobile.train` takes `--coordinator`, `--num-processes` and
# `--process-id` for exactly this, and runs the mesh version of the step you have seen here.
#
# **Next:** [5. Why depthwise is fast on paper and slow in practice](05_why_depthwise_is_slow.py).
