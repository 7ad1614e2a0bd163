"""Small CIFAR-format binary files, and a TFDS data dir prepared from them by the real builder.

The real `cifar10` / `cifar100` TFDS builders download an archive from the dataset's host, which tests
(and CI) cannot reach. So we write a few dozen images in the exact binary format of that archive, pack
them the way the real archive is packed, and put it in the data dir's manual download folder, where a
user without network would put the real one. Everything after that, TFDS's checksum check and
extraction, the builder's parsing, PNG encoding and `array_record` writing, and our reading code, is
the real thing; only the checksum TFDS expects is ours (see `registered_archive`).

    data_dir = make_prepared_cifar_dir(tmp_path, "cifar100", n_train=40, n_test=12)
    ds = minimobile.data.load_dataset("cifar100", data_dir)    # reads exactly fake_split(...)
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import tarfile
import tempfile
from unittest import mock

import numpy as np

# How each archive is laid out once extracted (see tensorflow_datasets/image_classification/cifar.py).
# `labels` lists the label keys in the order their bytes appear in a record; `names` the files that hold
# each key's class names, one per line; the pixels follow, 3072 bytes in [3, 32, 32] (CHW) order.
_LAYOUT = {
    "cifar10": dict(
        prefix="cifar-10-batches-bin",
        train_files=[f"data_batch_{i}.bin" for i in range(1, 6)],
        test_files=["test_batch.bin"],
        labels={"label": ("batches.meta.txt", 10)},
    ),
    "cifar100": dict(
        prefix="cifar-100-binary",
        train_files=["train.bin"],
        test_files=["test.bin"],
        labels={"coarse_label": ("coarse_label_names.txt", 20), "label": ("fine_label_names.txt", 100)},
    ),
}


@dataclasses.dataclass(frozen=True)
class FakeSplit:
    """What we wrote for one split, to compare with what `load_dataset` reads back."""

    images: np.ndarray  # [N, 32, 32, 3] uint8
    labels: dict[str, np.ndarray]  # label key -> [N] int64


def fake_split(name: str, n: int, seed: int) -> FakeSplit:
    """Deterministic random images and labels: the same (name, n, seed) always gives the same split."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = {key: rng.integers(0, k, size=n) for key, (_, k) in _LAYOUT[name]["labels"].items()}
    return FakeSplit(images, labels)


def class_names(key: str, k: int) -> list[str]:
    """Made-up class names, so a test can tell names read from the data from names typed in code."""
    return [f"{key}_{i:03d}" for i in range(k)]


def _records(split: FakeSplit, name: str) -> bytes:
    """One CIFAR binary file: per image, its label bytes then its pixels in CHW order."""
    chw = split.images.transpose(0, 3, 1, 2).reshape(len(split.images), -1)  # [N, 3072]
    labels = [split.labels[key].astype(np.uint8)[:, None] for key in _LAYOUT[name]["labels"]]
    return np.concatenate(labels + [chw], axis=1).tobytes()


def write_cifar_binaries(root: pathlib.Path, name: str, n_train: int, n_test: int, seed: int = 0) -> pathlib.Path:
    """Writes an extracted CIFAR archive under `root`; returns `root` (what `download_and_extract` would)."""
    layout = _LAYOUT[name]
    folder = pathlib.Path(root) / layout["prefix"]
    folder.mkdir(parents=True, exist_ok=True)
    for key, (filename, k) in layout["labels"].items():
        (folder / filename).write_text("\n".join(class_names(key, k)) + "\n")
    for files, split in ((layout["train_files"], fake_split(name, n_train, seed)),
                         (layout["test_files"], fake_split(name, n_test, seed + 1))):
        # CIFAR-10 spreads its training set over five files; the builder reads them in order.
        chunks = np.array_split(np.arange(len(split.images)), len(files))
        for filename, idx in zip(files, chunks):
            part = FakeSplit(split.images[idx], {k: v[idx] for k, v in split.labels.items()})
            (folder / filename).write_bytes(_records(part, name))
    return pathlib.Path(root)


def write_cifar_archive(path: pathlib.Path, name: str, n_train: int, n_test: int, seed: int = 0) -> pathlib.Path:
    """Packs the files of `write_cifar_binaries` into a .tar.gz at `path`, laid out like the real one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_cifar_binaries(pathlib.Path(tmp), name, n_train, n_test, seed)
        with tarfile.open(path, "w:gz") as tar:
            tar.add(folder / _LAYOUT[name]["prefix"], arcname=_LAYOUT[name]["prefix"])
    return path


@contextlib.contextmanager
def registered_archive(name: str, archive: pathlib.Path):
    """Makes TFDS expect `archive` (its size and SHA-256) instead of the real archive, for `name`.

    TFDS checks every archive against the checksums it ships; ours cannot match the real one. So we
    register our archive's checksum in their place, as TFDS's own `--register_checksums` does for a
    dataset's authors. Nothing else is replaced: TFDS finds the archive in the manual folder, checks
    it, extracts it and runs the real builder on it.
    """
    import tensorflow_datasets as tfds

    builder_cls = tfds.builder_cls(name)
    (url, _), = builder_cls.url_infos.items()
    info = tfds.core.download.checksums.compute_url_info(archive)
    with mock.patch.object(builder_cls, "url_infos", {url: info}):
        yield


def make_prepared_cifar_dir(tmp_path, name: str = "cifar100", n_train: int = 40, n_test: int = 12,
                            seed: int = 0, file_format: str | None = None) -> str:
    """Prepares `name` in a new TFDS data dir under `tmp_path`, from a small fake archive; returns the dir.

    The train split is `fake_split(name, n_train, seed)` and the test split
    `fake_split(name, n_test, seed + 1)`. The archive goes where a user puts one by hand
    (`<data_dir>/downloads/manual/`), and `minimobile.data.load_dataset` prepares it just as it would
    the real one, without any network. `file_format="tfrecord"` instead prepares with TFDS directly in
    that format, like data dirs that older TFDS versions made.
    """
    import tensorflow_datasets as tfds

    from minimobile import data

    data_dir = pathlib.Path(tmp_path) / f"{name}-tfds"
    manual_dir = data_dir / "downloads" / "manual"
    filename = next(iter(tfds.builder_cls(name).url_infos.values())).filename  # e.g. cifar-100-binary.tar.gz
    archive = write_cifar_archive(manual_dir / filename, name, n_train, n_test, seed)
    with registered_archive(name, archive):
        if file_format is None:
            data.load_dataset(name, str(data_dir))
        else:
            tfds.builder(name, data_dir=str(data_dir)).download_and_prepare(file_format=file_format)
    return str(data_dir)
