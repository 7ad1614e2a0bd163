"""One of two processes in tests/test_train.py's multi-process test: `python distributed_worker.py PORT ID DIR`.

Each process has 2 CPU devices (XLA_FLAGS set by the test); together they form one 4-device mesh over
loopback. From each state of the 1-device reference run (DIR/reference.npz), both processes take the
same training step together; process 0 saves the losses and new states to DIR/result.npz.
"""

import pathlib
import sys

import jax
import numpy as np

from minimobile import parallel, train

port, process_id, folder = int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id, timeout_s=60)
assert jax.device_count() == 4 and jax.local_device_count() == 2

from test_train import GENTLE, sample_dataset, step_from  # noqa: E402  (after initialize, on purpose)

run = train.build_run(GENTLE.replace(parallel="mesh"), sample_dataset(), parallel.setup("mesh"))
template = jax.device_get(parallel.unreplicate(run.state, run.par))
reference = np.load(folder / "reference.npz")
leaves = [reference[f"arr_{i}"] for i in range(len(reference.files))]
per_state = len(jax.tree.leaves(template))
treedef = jax.tree.structure(template)
losses, results = [], {}
for k in range(len(leaves) // per_state - 1):
    loss, state = step_from(run, jax.tree.unflatten(treedef, leaves[k * per_state:(k + 1) * per_state]))
    losses.append(loss)
    for part in ("params", "batch_stats"):
        results.update({f"{part}_{k}_{i}": np.asarray(v) for i, v in enumerate(jax.tree.leaves(getattr(state, part)))})
    results[f"step_{k}"] = np.asarray(state.step)
if process_id == 0:
    np.savez(folder / "result.npz", losses=np.asarray(losses), **results)
jax.distributed.shutdown()
