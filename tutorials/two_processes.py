"""One of the two processes of tutorial 4: `python two_processes.py PORT PROCESS_ID`.

Each process owns 2 CPU devices; after `jax.distributed.initialize` the two processes see one set of
4 devices and can run collectives (psum, pmean) across all of them, over loopback (127.0.0.1 only).
On a cluster the processes would be on different machines and the coordinator address would be
process 0's hostname; nothing else in this file would change.
"""

import os
import sys

# Before jax is imported: this process gets 2 CPU devices (tutorial 4 explains the flag).
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from minimobile import parallel  # noqa: E402

port, process_id = int(sys.argv[1]), int(sys.argv[2])
# Process 0 runs the coordinator at this address; both connect to it. This must come before anything
# asks JAX about its devices. On CPU, collectives between processes go through the gloo library,
# which `initialize_distributed` selects; a peer that never shows up fails it after 60 s, not never.
parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id, timeout_s=60)
print(f"process {process_id}: {jax.local_device_count()} local devices, {jax.device_count()} in all: "
      f"{[d.id for d in jax.devices()]}", flush=True)

mesh = Mesh(np.array(jax.devices()), ("batch",))  # one axis over all 4 devices of both processes

# 1. A psum: every device contributes its position on the mesh, every device receives the total.
ids = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P("batch")), np.arange(2 * process_id, 2 * process_id + 2, dtype=np.float32))  # [4] global
total = jax.jit(jax.shard_map(lambda x: lax.psum(x, "batch"), mesh=mesh, in_specs=P("batch"), out_specs=P()))(ids)
print(f"process {process_id}: psum of the device positions 0+1+2+3 = {float(total[0]):.0f}", flush=True)

# 2. What synchronised BatchNorm does: the mean and variance of a channel over a *global* batch that
# no single process holds. Each process has 8 of the 16 values (the same seeded data on both, so each
# can also compute the answer alone, to check).
rng = np.random.default_rng(0)
everything = rng.normal(3.0, 2.0, size=16).astype(np.float32)       # the global batch, [16]
mine = everything[8 * process_id:8 * process_id + 8]                # this process's half, [8]
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("batch")), mine)


def moments(x):                                   # x: [4] on each device, its quarter of the batch
    # As layers.BatchNorm does it: each device's E[x] and E[x^2], averaged over the devices in one
    # collective (equal shares, so the mean of the device means is the global mean), then
    # var = E[x^2] - E[x]^2.
    mean, mean_sq = lax.pmean(jnp.stack([jnp.mean(x), jnp.mean(x * x)]), "batch")
    return mean, mean_sq - mean * mean


mean, var = jax.jit(jax.shard_map(moments, mesh=mesh, in_specs=P("batch"), out_specs=P()))(x)
print(f"process {process_id}: global mean {float(mean):.4f} var {float(var):.4f}  "
      f"(NumPy on all 16 values: {everything.mean():.4f} {everything.var():.4f}; "
      f"on this process's 8 alone: {mine.mean():.4f} {mine.var():.4f})", flush=True)
jax.distributed.shutdown()
