"""Tests for minimobile.data: loading through TFDS (offline, from small real-format files) and the
on-device index pipeline (each example once per epoch, shards that reassemble, whole test split)."""

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from minimobile import data, parallel
from minimobile.errors import UserError
import cifar_files  # tests/cifar_files.py; pytest puts tests/ on sys.path

# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 40, 12


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory):
    """A data dir prepared once per session by the real cifar100 builder, from fake CIFAR files."""
    return cifar_files.make_prepared_cifar_dir(tmp_path_factory.mktemp("c100"), "cifar100", N_TRAIN, N_TEST)


@pytest.fixture
def offline(monkeypatch):
    """No host answers, as on a machine without network (and without waiting for timeouts)."""

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)


def assert_same_examples(split: data.Split, written: cifar_files.FakeSplit, key: str):
    """`split` holds exactly the images and labels written, each once, in the files' order.

    TFDS shuffles the examples when it prepares a dataset; the order the files have is the one the
    report's "first 2,000 test images" mean, and the one every TFDS version agrees on.
    """
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    assert split.images.shape == written.images.shape
    where = {img.tobytes(): i for i, img in enumerate(written.images)}  # random images: all distinct
    order = [where[img.tobytes()] for img in split.images]
    assert order == list(range(len(written.images)))
    np.testing.assert_array_equal(split.labels, written.labels[key])


def test_real_cifar100_builder_reads_back_exactly_what_was_written(cifar100_dir):
    ds = data.load_dataset("cifar100", cifar100_dir)
    assert_same_examples(ds.train, cifar_files.fake_split("cifar100", N_TRAIN, seed=0), "label")
    assert_same_examples(ds.test, cifar_files.fake_split("cifar100", N_TEST, seed=1), "label")
    # Class names come from the data, not from a list in our code.
    assert ds.num_classes == 100 and ds.class_names == tuple(cifar_files.class_names("label", 100))
    # Mean and std: of the train images only, per channel, against plain numpy.
    pixels = ds.train.images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(ds.mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(ds.std, pixels.std(0), rtol=1e-9)


def test_reading_in_chunks_smaller_than_the_split_loses_and_repeats_nothing(cifar100_dir, monkeypatch):
    monkeypatch.setattr(data, "_READ_CHUNK", 13)  # the 40 train images: 3 chunks of 13, then one of 1
    ds = data.load_dataset("cifar100", cifar100_dir)
    assert_same_examples(ds.train, cifar_files.fake_split("cifar100", N_TRAIN, seed=0), "label")
    assert_same_examples(ds.test, cifar_files.fake_split("cifar100", N_TEST, seed=1), "label")


def test_coarse_labels_give_cifar100s_20_superclasses(cifar100_dir):
    ds = data.load_dataset("cifar100", cifar100_dir, label_key="coarse_label")
    assert_same_examples(ds.train, cifar_files.fake_split("cifar100", N_TRAIN, seed=0), "coarse_label")
    assert ds.num_classes == 20 and ds.class_names[0] == "coarse_label_000"


def test_a_data_dir_starting_with_a_tilde_is_in_the_home_folder(cifar100_dir, monkeypatch):
    # `--data-dir=~/data`: no shell expands a "~" after "=", and TFDS would take it as a folder named "~".
    monkeypatch.setenv("HOME", str(pathlib.Path(cifar100_dir).parent))
    ds = data.load_dataset("cifar100", "~/" + pathlib.Path(cifar100_dir).name)
    assert len(ds.train.labels) == N_TRAIN and len(ds.test.labels) == N_TEST


def test_cifar10_with_its_five_training_files(tmp_path):
    data_dir = cifar_files.make_prepared_cifar_dir(tmp_path, "cifar10", n_train=23, n_test=7, seed=5)
    ds = data.load_dataset("cifar10", data_dir, download=False)
    assert_same_examples(ds.train, cifar_files.fake_split("cifar10", 23, seed=5), "label")
    assert_same_examples(ds.test, cifar_files.fake_split("cifar10", 7, seed=6), "label")
    assert ds.num_classes == 10


def test_a_data_dir_prepared_as_tfrecord_by_older_tfds_still_reads(tmp_path):
    # Data dirs prepared by older TFDS versions are tfrecord; they are read through TensorFlow instead.
    data_dir = cifar_files.make_prepared_cifar_dir(tmp_path, "cifar100", 9, 4, file_format="tfrecord")
    ds = data.load_dataset("cifar100", data_dir)
    assert_same_examples(ds.train, cifar_files.fake_split("cifar100", 9, seed=0), "label")


def test_prepared_data_is_read_without_tensorflow(cifar100_dir):
    # In a fresh interpreter, because this one has imported TensorFlow for the other tests.
    code = ("import sys; from minimobile import data; "
            f"ds = data.load_dataset('cifar100', {cifar100_dir!r}, download=False); "
            "assert len(ds.train.labels) == %d; "
            "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'" % N_TRAIN)
    root = pathlib.Path(__file__).parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]


def test_tfds_mock_data_gives_uint8_images_and_labels_in_range_with_no_download():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_dataset("cifar10", download=False)  # mock_data fakes reading: nothing to download
    assert ds.train.images.shape == (6, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.num_classes == 10 and ds.test.labels.max() < 10


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(UserError, match="cifar10, cifar100"):
        data.load_dataset("imagenet")


def test_unknown_label_key_lists_the_choices(cifar100_dir):
    with pytest.raises(UserError, match="coarse_label"):
        data.load_dataset("cifar100", cifar100_dir, label_key="fine")


def test_a_folder_that_is_not_a_tfds_dir_is_refused(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"not a dataset")
    with pytest.raises(UserError, match="not a TFDS data dir"):
        data.load_dataset("cifar100", str(tmp_path))
    assert os.listdir(tmp_path) == ["holiday.jpg"]  # and nothing was written into it


def test_offline_ends_fast_with_how_to_get_the_data_and_writes_nothing(tmp_path, offline):
    data_dir = tmp_path / "tfds"
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        data.load_dataset("cifar100", str(data_dir))
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "cifar-100-binary.tar.gz" in message and str(data_dir / "downloads" / "manual") in message
    assert "\n" not in message
    assert not data_dir.exists()


def test_not_prepared_and_no_download(tmp_path):
    with pytest.raises(UserError, match="not prepared"):
        data.load_dataset("cifar10", str(tmp_path), download=False)


def test_archive_in_the_manual_folder_is_used_without_network(tmp_path, offline):
    # A damaged archive where the user was told to put it: TFDS picks it up (no network needed),
    # checks it, and we say what to do; only the user's own file is left.
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "cifar-10-binary.tar.gz").write_bytes(b"truncated download")
    with pytest.raises(UserError, match="replace it with a fresh copy from https://"):
        data.load_dataset("cifar10", str(tmp_path))
    leftovers = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert leftovers == ["downloads", "downloads/manual", "downloads/manual/cifar-10-binary.tar.gz"]


def test_a_download_that_breaks_off_leaves_nothing_behind(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def broken_download(self, url):
        raise ConnectionResetError(f"connection to {url} reset (test)")

    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: socket.socket())  # "reachable"
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", broken_download)
    data_dir = tmp_path / "new"
    with pytest.raises(UserError, match="Could not download and prepare cifar10.*ConnectionResetError"):
        data.load_dataset("cifar10", str(data_dir))
    assert not data_dir.exists()


def test_good_archive_in_the_manual_folder_prepares_offline(tmp_path, offline):
    manual = tmp_path / "downloads" / "manual"
    archive = cifar_files.write_cifar_archive(manual / "cifar-10-binary.tar.gz", "cifar10", 11, 3)
    with cifar_files.registered_archive("cifar10", archive):
        ds = data.load_dataset("cifar10", str(tmp_path))
    assert_same_examples(ds.train, cifar_files.fake_split("cifar10", 11, seed=0), "label")


def corrupt_copy(src: str, dst: pathlib.Path) -> pathlib.Path:
    """A copy of a prepared data dir; returns its cifar100/<version> folder to damage."""
    shutil.copytree(src, dst)
    (version_dir,) = (dst / "cifar100").iterdir()
    return version_dir


def test_truncated_records_are_reported_as_corrupt(cifar100_dir, tmp_path):
    version_dir = corrupt_copy(cifar100_dir, tmp_path / "copy")
    (shard,) = version_dir.glob("cifar100-train.*")
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(UserError, match="corrupt or incomplete.*delete that folder"):
        data.load_dataset("cifar100", str(tmp_path / "copy"))


@pytest.mark.parametrize("damage", ["half a file", "deleted"])
def test_damaged_dataset_info_is_reported_as_corrupt(cifar100_dir, tmp_path, damage):
    # Deleted: TFDS then takes the folder for one never prepared; the one thing to do is the same.
    version_dir = corrupt_copy(cifar100_dir, tmp_path / "copy")
    info = version_dir / "dataset_info.json"
    info.write_text("{ half a file") if damage == "half a file" else info.unlink()
    with pytest.raises(UserError, match="corrupt or incomplete.*delete that folder"):
        data.load_dataset("cifar100", str(tmp_path / "copy"), download=False)


# ----------------------------------------------------------------------------------------------------
# The on-device index pipeline
# ----------------------------------------------------------------------------------------------------


def test_each_example_at_most_once_per_epoch_and_all_but_the_remainder():
    n, b = 103, 8  # 12 full batches, 7 examples dropped this epoch (not the same 7 next epoch)
    steps = data.steps_per_epoch(n, b)
    assert steps == 12 and data.dropped_per_epoch(n, b) == 7  # the number the training loop reports
    perm = data.epoch_permutation(jax.random.key(0), n)
    batch_at = jax.jit(data.train_batch_indices, static_argnums=2)  # step is traced: one compile
    seen = np.concatenate([batch_at(perm, jnp.int32(s), b) for s in range(steps)])
    assert len(np.unique(seen)) == steps * b and seen.min() >= 0 and seen.max() < n
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))  # the order covers everything
    other = data.epoch_permutation(jax.random.key(1), n)
    assert not np.array_equal(perm, other)  # a new order each epoch...
    np.testing.assert_array_equal(perm, data.epoch_permutation(jax.random.key(0), n))  # ...reproducibly


def test_a_batch_larger_than_the_dataset_is_refused():
    with pytest.raises(UserError, match="smaller batch size"):
        data.steps_per_epoch(10, 16)


def test_a_batch_of_the_whole_split_is_one_step_per_epoch():
    assert (data.steps_per_epoch(16, 16), data.dropped_per_epoch(16, 16)) == (1, 0)
    assert (data.steps_per_epoch(17, 16), data.dropped_per_epoch(17, 16)) == (1, 1)


@pytest.mark.parametrize("n, b", [(100, 32), (96, 32), (5, 32), (1, 1), (0, 8)])
def test_eval_batches_cover_the_test_split_exactly_once(n, b):
    indices, mask = data.eval_batches(n, b)
    assert indices.shape == mask.shape == (-(-n // b), b) and indices.dtype == np.int32
    np.testing.assert_array_equal(np.sort(indices[mask]), np.arange(n))
    assert (indices[~mask] == 0).all()  # padding points at a real example, and is masked out


def test_shards_reassemble_the_batch():
    indices = jax.random.permutation(jax.random.key(3), 64)[:16]
    shard_at = jax.jit(data.shard_slice, static_argnums=1)  # the shard number may be traced
    for num_shards in (1, 2, 4, 8):
        parts = [shard_at(indices, num_shards, jnp.int32(s)) for s in range(num_shards)]
        np.testing.assert_array_equal(np.concatenate(parts), indices)


def test_a_batch_that_does_not_split_across_devices_is_refused():
    with pytest.raises(UserError, match="multiple of 8"):
        data.shard_slice(jnp.arange(12), 8, 0)
    # What the trainer says first, with the nearest multiple below (the smallest one, below 8).
    mesh = parallel.setup("mesh")
    with pytest.raises(UserError, match=r"--batch-size 12 does not split evenly across 8 devices; use a multiple "
                                        r"of 8, e\.g\. 8, or --parallel jit"):
        parallel.check_batch_size(12, mesh)
    with pytest.raises(UserError, match=r"e\.g\. 8,"):
        parallel.check_batch_size(3, mesh)
    parallel.check_batch_size(16, mesh)
    parallel.check_batch_size(3, parallel.setup("jit"))  # one device takes any batch


def test_pmap_and_mesh_give_each_of_the_8_devices_its_own_part_of_the_batch():
    # Without a device axis, each device would take the whole batch: the same numbers at 8 times the
    # work, which no equivalence test can see. The conftest makes 8 CPU devices.
    assert [(parallel.setup(m).axis_name, parallel.setup(m).num_shards) for m in ("jit", "pmap", "mesh")] == [
        (None, 1), ("batch", 8), ("batch", 8)]


def test_gather_batch_matches_numpy_indexing():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 20).astype(np.int32)
    idx = np.array([3, 3, 19, 0], np.int32)
    batch = jax.jit(data.gather_batch)(images, labels, idx)
    np.testing.assert_array_equal(batch["image"], images[idx])
    np.testing.assert_array_equal(batch["label"], labels[idx])


def test_sharded_gather_on_every_device_reassembles_the_global_batch():
    # As the training step does it: the split and the epoch's order are replicated, and each device
    # gathers only its own block of the batch, picked by its position on the mesh. Together the blocks
    # must be the unsharded batch. With the test conftest's 8 host devices this is a real 8-way split.
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    n_dev, batch_size = mesh.devices.size, 4 * mesh.devices.size
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (100, 2, 2, 3), dtype=np.uint8)
    labels = np.arange(100, dtype=np.int32)
    perm = data.epoch_permutation(jax.random.key(7), 100)

    def per_device(images, labels, perm, step):
        idx = data.train_batch_indices(perm, step, batch_size)
        return data.gather_batch(images, labels, data.shard_slice(idx, n_dev, jax.lax.axis_index("d")))

    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(), out_specs=P("d")))
    for step in range(data.steps_per_epoch(100, batch_size)):
        batch = sharded(images, labels, perm, jnp.int32(step))
        expected = np.asarray(data.train_batch_indices(perm, step, batch_size))
        np.testing.assert_array_equal(batch["label"], labels[expected])
        np.testing.assert_array_equal(batch["image"], images[expected])
