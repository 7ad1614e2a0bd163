"""Data parallelism: one step body, three ways to run it on many devices.

The step functions in `steps.py` are written for *one* device's share of the batch, and take an
`axis_name` over which they average gradients, BatchNorm statistics and metrics. Here they are wrapped:

  "jit"   one device; axis_name=None, so the averages are no-ops.
  "pmap"  the classic API: every argument gets a leading device axis; state is replicated by stacking.
  "mesh"  the modern one (default): `jax.jit(jax.shard_map(body, mesh))` over every device of every
          process. Arguments are global arrays, replicated (P()) here; each device picks its own block
          of the batch by `lax.axis_index`, so nothing is copied per step.

Several hosts: launch one process per host with `--coordinator HOST:PORT --num-processes N --process-id I`
(on a cluster, from the values its scheduler gives each task); `jax.devices()` then lists every device
of every process, and the mesh spans them all.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import signal
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minimobile.errors import UserError

AXIS = "batch"
MODES = ("mesh", "pmap", "jit")


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How a run spreads over devices."""

    mode: str
    mesh: Mesh  # mesh: every device of every process; pmap: the local devices; jit: the first device

    @property
    def num_shards(self) -> int:
        return self.mesh.devices.size

    @property
    def axis_name(self) -> str | None:
        return None if self.mode == "jit" else AXIS

    def sharding(self, spec: P = P()) -> NamedSharding:
        return NamedSharding(self.mesh, spec)


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None,
                           timeout_s: int = 60) -> None:
    """Join a multi-process run (before any other JAX call).

    timeout_s bounds every wait for a peer: one that never comes, one whose heartbeat stops, and, at
    exit, one that never reaches the shutdown barrier (JAX's default there is 300 s: a process that
    stopped with a one-sentence error could sit that long before exiting).
    """
    if coordinator is None:
        return
    # Collectives between CPU processes go over gloo (TCP). It only affects the CPU backend, and asking
    # which backend we are on would start it, which must not happen before initialize().
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sigterm = signal.getsignal(signal.SIGTERM)
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s, heartbeat_timeout_seconds=timeout_s,
                               shutdown_timeout_seconds=timeout_s)
    # initialize() starts JAX's preemption notifier, which takes SIGTERM over in C++: a SIGTERM that
    # came before training installed its own handler was swallowed, and the run trained to its end.
    # We handle SIGTERM ourselves (the loop saves a checkpoint; before it, the command stops): give it back.
    if sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)


def setup(mode: str) -> Parallel:
    """The devices a mode trains on: mesh, every device of every process; pmap, this process's; jit, one."""
    if mode not in MODES:
        raise UserError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}.")
    if mode == "mesh":
        devices = np.array(jax.devices())
    elif mode == "pmap":
        if jax.process_count() > 1:
            raise UserError("--parallel pmap runs on one process's devices; use --parallel mesh for several hosts.")
        devices = np.array(jax.local_devices())
    else:
        if jax.process_count() > 1:
            raise UserError("--parallel jit runs on one device; use --parallel mesh for several hosts.")
        devices = np.array(jax.local_devices()[:1])
    return Parallel(mode, Mesh(devices, (AXIS,)))


def check_batch_size(batch_size: int, par: Parallel) -> None:
    """Each device takes an equal share of the global batch: refuse, in one sentence, one that does not split."""
    if batch_size % par.num_shards:
        one_device = ", or --parallel jit to train on one device" if jax.process_count() == 1 else ""
        raise UserError(f"--batch-size {batch_size} does not split evenly across {par.num_shards} devices; "
                        f"use a multiple of {par.num_shards}, e.g. "
                        f"{max(1, batch_size // par.num_shards) * par.num_shards}{one_device}.")


def replicate(tree: Any, par: Parallel) -> Any:
    """Host arrays -> the same values on every device, in the form the mode's step expects.

    mesh: a global array with a replicated sharding (made from each process's identical copy);
    pmap: a stacked [devices, ...] array, one slice per device; jit: on the one device.
    """
    def put(x):
        x = np.asarray(x)
        if par.mode == "pmap":
            return jax.device_put(np.broadcast_to(x, (par.num_shards, *x.shape)), par.sharding(P(AXIS)))
        return jax.make_array_from_process_local_data(par.sharding(), x)
    return jax.tree.map(put, tree)


def replicate_device_tree(tree: Any, par: Parallel) -> Any:
    """Device arrays (e.g. a restored state) -> replicated on every device, for the mode."""
    if par.mode == "pmap":  # through the host: nothing to compile (a broadcast per array shape compiled 50-odd)
        return replicate(jax.device_get(tree), par)
    return jax.device_put(tree, par.sharding())


@jax.jit
def _first_copy(tree: Any) -> Any:
    """[devices, ...] -> [...] for every array of a tree, in one compiled program."""
    return jax.tree.map(lambda x: x[0], tree)


def unreplicate(tree: Any, par: Parallel) -> Any:
    """One copy of a replicated tree (pmap outputs carry a leading device axis)."""
    return _first_copy(tree) if par.mode == "pmap" else tree


def on_all_devices(fn: Callable, par: Parallel) -> Callable:
    """jit `fn` (no arguments sharded) so that its outputs come out replicated the way `replicate` makes them."""
    if par.mode == "pmap":
        stack = lambda *a: jax.tree.map(lambda x: jnp.broadcast_to(x, (par.num_shards, *jnp.shape(x))), fn(*a))
        return jax.jit(stack, out_shardings=par.sharding(P(AXIS)))
    return jax.jit(fn, out_shardings=par.sharding())


def distribute(body: Callable, par: Parallel, out_specs: Any, *, donate_first: bool = True) -> Callable:
    """Wrap a per-device step body `body(*args, axis_name=..., num_shards=...)` for the mode.

    Every argument is replicated (each device finds its own share of the batch inside the body).
    out_specs, for the mesh: P() for values that are the same on every device (state, averaged
    metrics), P(..., AXIS) for per-device values (predictions), concatenated along that axis.
    """
    body = functools.partial(body, axis_name=par.axis_name, num_shards=par.num_shards)
    donate = (0,) if donate_first else ()
    if par.mode == "jit":
        return jax.jit(body, donate_argnums=donate)
    if par.mode == "pmap":
        return jax.pmap(body, axis_name=AXIS, donate_argnums=donate, devices=list(par.mesh.devices.flat))

    def mesh_fn(*args):
        in_specs = tuple(jax.tree.map(lambda _: P(), a) for a in args)
        # check_vma=False: the body averages gradients itself with lax.pmean, exactly as under pmap.
        # (With check_vma=True, shard_map tracks which values differ across devices, and the gradient
        # of replicated parameters comes back already *summed* over devices; pmean-ing that again would
        # train with a device-count-times larger step.)
        return jax.shard_map(body, mesh=par.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)(*args)

    return jax.jit(mesh_fn, donate_argnums=donate)


def to_host(tree: Any, par: Parallel, batch_axis: int | None = None) -> Any:
    """Device values on the host. For per-device outputs, concatenate the shards along batch_axis."""

    def get(x):
        if par.mode == "pmap" and batch_axis is not None:
            x = np.moveaxis(np.asarray(x), 0, batch_axis)  # [..., devices, b, ...]: merge the two axes
            return x.reshape(*x.shape[:batch_axis], -1, *x.shape[batch_axis + 2:])
        if par.mode == "pmap":
            return np.asarray(x[0])
        if not x.is_fully_addressable:  # several processes: each holds part of a sharded output
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


# --------------------------------------------------------------------------------------------
# Several processes must agree: on their settings, on when to stop. With one process these return
# at once; with several, each is one small collective, so every process must call it at the same
# point of the run.
# --------------------------------------------------------------------------------------------


def differ_across_processes(values: dict[str, Any]) -> list[str]:
    """The keys of `values` whose value is not the same on every process of the run.

    Each process hashes each value (an array's bytes and shape, anything else as JSON) and only the
    hashes travel, so values of any size compare in one gather of a few bytes.
    """
    if jax.process_count() == 1:
        return []
    from jax.experimental import multihost_utils

    def digest(value) -> np.ndarray:  # [8] uint8
        if isinstance(value, np.ndarray):
            data = np.ascontiguousarray(value).tobytes() + repr((value.shape, value.dtype.str)).encode()
        else:
            data = json.dumps(value, sort_keys=True).encode()
        return np.frombuffer(hashlib.sha256(data).digest()[:8], np.uint8)

    gathered = np.asarray(multihost_utils.process_allgather(np.stack([digest(v) for v in values.values()])))
    return [key for i, key in enumerate(values) if not (gathered[:, i] == gathered[0, i]).all()]  # [P, K, 8]


def largest_across_processes(value: int) -> int:
    """The largest of every process's `value`: what one process knows (a signal it got), all learn."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def barrier(name: str) -> None:
    """Wait until every process of the run gets here (e.g. after process 0 alone changed a shared folder)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
