"""CIFAR on the device: load each split once, then shuffle, batch and shard it with jitted index math.

CIFAR-100 is 60,000 images of 32x32x3 bytes, about 180 MB: it fits in any accelerator's memory many
times over. So instead of a host-side input pipeline that ships every batch to the device, we put the
whole split there once, and each training step just gathers its batch by index. The host sends nothing
per step, so the input pipeline can never be what the GPU waits for.

    ds = load_dataset("cifar100")                        # host numpy arrays, prepared by TFDS once
    images = jax.device_put(ds.train.images)             # [N, 32, 32, 3] uint8, once
    labels = jax.device_put(ds.train.labels)             # [N] int32, once
    perm = epoch_permutation(epoch_key, len(ds.train.labels))          # [N], once per epoch
    idx = train_batch_indices(perm, step_in_epoch, batch_size)        # [B], inside the jitted step
    batch = gather_batch(images, labels, idx)            # {"image": [B, 32, 32, 3], "label": [B]}

`steps.train_step_on_device_data` is where these meet the train step, in one screen: select, augment,
normalise, step.

Getting the data is TFDS's job: the first run downloads and prepares it under `data_dir`
(`~/tensorflow_datasets` by default); later runs only read it. We prepare in the `array_record` format
because it can be read with TFDS's data sources, which do not import TensorFlow at all.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
import socket
import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np

from minimobile.errors import UserError

DATASETS = ("cifar10", "cifar100")
FILE_FORMAT = "array_record"  # random access, readable without TensorFlow (tfrecord is not)
_READ_CHUNK = 5000  # records decoded per read: bulk reads are faster, and memory stays bounded
_CONNECT_TIMEOUT_S = 5.0  # how long we wait to learn whether the download host answers


@dataclasses.dataclass(frozen=True)
class Split:
    """One split held in host memory."""

    images: np.ndarray  # [N, H, W, 3] uint8
    labels: np.ndarray  # [N] int32


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Both splits plus what the model and the normalisation need to know about them."""

    name: str
    train: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]  # per-channel mean of the train images, 0..255 scale
    std: tuple[float, float, float]  # per-channel std of the train images, 0..255 scale


# ----------------------------------------------------------------------------------------------------
# Loading: TFDS prepares once, we read into numpy.
# ----------------------------------------------------------------------------------------------------


def load_dataset(name: str, data_dir: str | None = None, *, label_key: str = "label",
                 download: bool = True) -> Dataset:
    """Reads both splits of `name` into host memory, downloading and preparing them first if needed.

    `label_key` picks the labels: for cifar100, "label" (100 fine classes) or "coarse_label" (20).
    Sizes, class names and split lengths all come from the dataset's own info, so a data dir holding
    a split of any size works. With `download=False` nothing is downloaded, which is also how to use
    `tfds.testing.mock_data` (it fakes the reading, so there is nothing to prepare).
    """
    builder = _builder(name, data_dir, label_key, download)
    train, test = (_read(builder, name, split, label_key) for split in ("train", "test"))
    if len(train.labels) == 0:
        raise UserError(f"The train split of {name} in {builder.data_dir} is empty; "
                        "delete that folder and run again to prepare it afresh.")
    mean, std = _channel_mean_std(train.images)
    names = tuple(builder.info.features[label_key].names)
    return Dataset(name, train, test, len(names), names, mean, std)


def load_split(name: str, data_dir: str | None = None, split: str = "test", *, label_key: str = "label",
               download: bool = True) -> Split:
    """One split of `name`, as `load_dataset` reads it: for evaluating, which needs no train images."""
    return _read(_builder(name, data_dir, label_key, download), name, split, label_key)


def _builder(name: str, data_dir: str | None, label_key: str, download: bool):
    """TFDS's builder of `name` in `data_dir`, prepared (downloaded first if allowed and needed)."""
    import tensorflow_datasets as tfds  # slow to import; only loading needs it

    if name not in DATASETS:
        raise UserError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    # TFDS takes "~" literally, and no shell expands the one in `--data-dir=~/...`.
    data_dir = None if data_dir is None else str(pathlib.Path(data_dir).expanduser())
    _check_is_tfds_dir(data_dir, name)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # the builder reads dataset_info.json of a prepared copy, if there is one
        raise _corrupt(name, pathlib.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser() / name, e) from e
    if download and not _is_prepared(builder):
        _download_and_prepare(builder)
    features = builder.info.features
    if label_key not in features or not hasattr(features[label_key], "names"):
        labels = [k for k in features if hasattr(features[k], "names")]
        raise UserError(f"{name} has no label key {label_key!r}; choose one of {', '.join(labels)}.")
    return builder


def _read(builder, name: str, split: str, label_key: str) -> Split:
    """`_read_split`, with whatever goes wrong said in one sentence."""
    try:
        return _read_split(builder, split, label_key)
    except Exception as e:
        if _is_prepared(builder) or pathlib.Path(builder.data_dir).is_dir():  # there, but broken or partial
            raise _corrupt(name, builder.data_dir, e) from e
        raise UserError(f"{name} is not prepared in {builder.data_dir_root}; run once with downloads "
                        "allowed, or pass --data-dir pointing to a prepared copy.") from e


def _is_prepared(builder) -> bool:
    # Looking first spares the user TFDS's warning about a missing dataset_info.json in a missing folder.
    return pathlib.Path(builder.data_dir).is_dir() and builder.is_prepared()


def _check_is_tfds_dir(data_dir: str | None, name: str) -> None:
    """Refuses a data dir (its "~" expanded by `_builder`) that holds something other than TFDS datasets,
    before TFDS writes into it."""
    if data_dir is None:
        return  # TFDS's own default, which it manages
    path = pathlib.Path(data_dir)
    if not path.exists():
        return  # a new folder: the first run prepares the dataset there
    # A TFDS dir holds `<dataset>/<version>/dataset_info.json` (or `<dataset>/<config>/<version>/...`)
    # and a `downloads/` folder; an empty folder is fine too.
    looks_like_tfds = path.is_dir() and (
        not any(path.iterdir()) or (path / name).is_dir() or (path / "downloads").is_dir()
        or any(path.glob("*/*/dataset_info.json")) or any(path.glob("*/*/*/dataset_info.json")))
    if not looks_like_tfds:
        raise UserError(f"{path} is not a TFDS data dir (one holding {name}/<version>/dataset_info.json); "
                        "pass the folder above it, or a new or empty folder to download into.")


def _corrupt(name: str, where, error: Exception) -> UserError:
    """The one error for a prepared copy that cannot be read, whatever TFDS or the reader raised."""
    return UserError(f"The prepared {name} in {where} is corrupt or incomplete ({_reason(error)}); "
                     "delete that folder and run again to prepare it afresh.")


def _reason(error: Exception) -> str:
    """An exception as a short phrase that fits inside our one-sentence messages."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:200]}"


def _download_and_prepare(builder) -> None:
    """Runs TFDS's download and prepare, failing within seconds (and leaving nothing) when it cannot."""
    import tensorflow_datasets as tfds

    root = pathlib.Path(builder.data_dir_root)
    manual_dir = root / "downloads" / "manual"  # TFDS's default, named here so our messages can say it
    # TFDS looks for each archive in `manual_dir` under the file name its checksums file records, and
    # only downloads what is not there. So we only need the network for the archives that are missing.
    archives = {url: info.filename for url, info in (builder.url_infos or {}).items()}
    missing = {url: f for url, f in archives.items() if not (manual_dir / f).exists()}
    files, urls = ", ".join(archives.values()), ", ".join(archives)
    how_to = f"put {files} (from {urls}) in {manual_dir}"
    # TFDS retries a failing connection 10 times with backoff (about 3.5 minutes); ask first, briefly.
    if any(not _reachable(url) for url in missing):
        raise UserError(f"{builder.name} is not prepared in {root} and cannot be downloaded from here: "
                        f"pass --data-dir pointing to a prepared copy, or {how_to}, and run again.")

    before = _listing(root)
    try:
        builder.download_and_prepare(
            file_format=FILE_FORMAT,
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    except BaseException as e:
        _remove_new(root, before)  # a half-written download or dataset would only confuse the next run
        if not isinstance(e, Exception):
            raise  # Ctrl-C: cleaned up, now let it stop the program
        if len(missing) < len(archives):  # TFDS used an archive from the manual folder
            raise UserError(f"Could not prepare {builder.name} from {files} in {manual_dir} ({_reason(e)}); "
                            f"replace it with a fresh copy from {urls} and run again.") from e
        raise UserError(f"Could not download and prepare {builder.name} in {root} ({_reason(e)}); "
                        f"run again, or {how_to}.") from e


def _reachable(url: str) -> bool:
    """Whether the host serving `url` (or the HTTPS proxy, if one is set) accepts a TCP connection."""
    target = urllib.parse.urlsplit(urllib.request.getproxies().get("https") or url)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=_CONNECT_TIMEOUT_S).close()
        return True
    except OSError:  # no DNS, no route, refused or timed out: all mean "not from here"
        return False


def _listing(root: pathlib.Path) -> set[pathlib.Path]:
    """`root` and what lies up to three levels below it: deep enough to see every folder a prepare starts."""
    if not root.exists():
        return set()
    return {root} | {p for pattern in ("*", "*/*", "*/*/*") for p in root.glob(pattern)}


def _remove_new(root: pathlib.Path, before: set[pathlib.Path]) -> None:
    """Deletes whatever appeared under `root` since `_listing(root)` returned `before`."""
    for path in sorted(_listing(root) - before):  # sorted: a parent comes before its children
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


class _DropMessage(logging.Filter):
    """Drops log records whose message starts with `start`."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def _read_split(builder, split: str, label_key: str) -> Split:
    """One split as numpy arrays, read without TensorFlow when the files allow it."""
    import tensorflow_datasets as tfds

    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        source = builder.as_data_source(split=split)  # random access; decodes PNGs with PIL, not TF
        # Records read in bulk: 6.7 s for CIFAR's 50,000 train images against 11.1 s one by one.
        chunks = (source.__getitems__(range(i, min(i + _READ_CHUNK, len(source))))
                  for i in range(0, len(source), _READ_CHUNK))
        examples = (example for chunk in chunks for example in chunk)
    else:  # tfrecord, e.g. a dir prepared by an older TFDS or by `tfds build`: needs TensorFlow
        examples = tfds.as_numpy(builder.as_dataset(split=split))
    images, labels, ids = [], [], []
    # TFDS warns on every run that OpenCV would decode faster: it would save seconds, once per run.
    advice = _DropMessage("OpenCV is not installed")
    logging.getLogger("absl").addFilter(advice)
    try:
        for example in examples:  # about 8 s for all of CIFAR, once per run
            images.append(example["image"])
            labels.append(example[label_key])
            ids.append(example.get("id", b""))
    finally:
        logging.getLogger("absl").removeFilter(advice)
    shape = builder.info.features["image"].shape
    images = np.stack(images) if images else np.zeros((0, *shape), np.uint8)  # [N, H, W, 3]
    labels = np.array(labels)
    # TFDS shuffles the examples when it prepares a dataset. CIFAR's ids ("test_00000", ...) number
    # them in the original files' order: put them back in it, so that "the first 2,000 test images"
    # (the report's evaluation) are the report's, whatever order this TFDS version wrote.
    in_file_order = np.argsort(np.array(ids), kind="stable")
    images, labels = images[in_file_order], labels[in_file_order]
    if split in builder.info.splits and len(labels) != builder.info.splits[split].num_examples:
        raise ValueError(f"read {len(labels)} {split} examples, expected "
                         f"{builder.info.splits[split].num_examples}")
    return Split(images.astype(np.uint8), labels.astype(np.int32))


def _channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std, from a 256-bin histogram per channel.

    Pixels are bytes, so counting each value's occurrences says everything; it also avoids turning
    50,000 images into a 1.2 GB float64 copy just to average them.
    """
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256)
        p = counts / counts.sum()
        mean = float(p @ values)
        means.append(mean)
        stds.append(float(np.sqrt(p @ (values - mean) ** 2)))
    return tuple(means), tuple(stds)


# ----------------------------------------------------------------------------------------------------
# The on-device index pipeline: all of it is index arithmetic, so it jits and shards cleanly.
# ----------------------------------------------------------------------------------------------------


def epoch_permutation(key: jax.Array, num_examples: int) -> jax.Array:
    """A fresh order of the training set for one epoch: [N] int32, each index exactly once."""
    return jax.random.permutation(key, num_examples).astype(jnp.int32)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch, N // B: the last N % B examples of each epoch's order are dropped.

    On purpose: a smaller last batch would give BatchNorm noisier statistics and a new shape that
    forces a recompile. Since each epoch shuffles anew, a dropped example is dropped only for that
    epoch; the training loop reports how many (`dropped_per_epoch`).
    """
    if batch_size <= 0 or num_examples < batch_size:
        raise UserError(f"The batch size {batch_size} must be between 1 and the {num_examples} "
                        "training examples; choose a smaller batch size.")
    return num_examples // batch_size


def dropped_per_epoch(num_examples: int, batch_size: int) -> int:
    """How many examples each epoch leaves out: those after its last full batch (see steps_per_epoch)."""
    return num_examples - steps_per_epoch(num_examples, batch_size) * batch_size


def train_batch_indices(perm: jax.Array, step_in_epoch, batch_size: int) -> jax.Array:
    """Indices of batch number `step_in_epoch` of this epoch: [B] int32, a slice of `perm`.

    `dynamic_slice` (not `perm[s * B:(s + 1) * B]`) so `step_in_epoch` may be a traced value and the
    jitted step compiles once for every step. Keep `step_in_epoch < steps_per_epoch(N, B)`: a traced
    index cannot raise, and XLA clamps a slice that runs off the end instead.
    """
    return jax.lax.dynamic_slice_in_dim(perm, step_in_epoch * batch_size, batch_size)


def shard_slice(indices: jax.Array, num_shards: int, shard: int | jax.Array) -> jax.Array:
    """The contiguous [B / num_shards] block of a global batch that shard (device) number `shard` holds.

    Concatenating all shards in order gives back `indices`. `shard` may be traced, e.g.
    `lax.axis_index("batch")` inside `shard_map`; with several processes, a device's global shard
    number is its position among all devices, so each process gathers only its own part.
    """
    batch_size = indices.shape[0]
    if batch_size % num_shards:
        raise UserError(f"The batch size {batch_size} does not split evenly across {num_shards} "
                        f"devices; choose a multiple of {num_shards}.")
    per_shard = batch_size // num_shards
    return jax.lax.dynamic_slice_in_dim(indices, shard * per_shard, per_shard)


def eval_batches(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The test split in whole batches: indices [S, B] int32 and mask [S, B] bool, S = ceil(N / B).

    Every example appears exactly once with mask True. The last batch is padded with index 0 and
    mask False, so every batch has one shape (one compile) and metrics simply ignore the padding.
    """
    num_steps = -(-num_examples // batch_size)  # ceil division
    flat = np.arange(num_steps * batch_size)
    mask = flat < num_examples
    indices = np.where(mask, flat, 0).astype(np.int32)
    return indices.reshape(num_steps, batch_size), mask.reshape(num_steps, batch_size)


def gather_batch(images: jax.Array, labels: jax.Array, indices: jax.Array) -> dict[str, jax.Array]:
    """The examples at `indices`: {"image": [B, H, W, 3] uint8, "label": [B] int32}, on device."""
    return {"image": jnp.take(images, indices, axis=0), "label": jnp.take(labels, indices, axis=0)}
