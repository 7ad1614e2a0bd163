"""Shared test set-up.

Every test run sees 8 CPU devices, so the multi-device code paths are exercised on any laptop
(as flax's own CI does). XLA reads this flag once, when jax is first imported, hence here, first.
The tests run on the CPU even where a GPU build of jax is installed: they check CPU behaviour (8
devices, the CPU's steps per call), and the GPU is `minimobile.gpu_check`'s to measure.
"""

import atexit
import os
import shutil
import tempfile

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TFDS imports TensorFlow; keep its start-up chatter out
os.environ.setdefault("TFDS_DISABLE_TQDM", "1")
# Many tests (and the subprocesses they start) compile the same tiny programs: a persistent
# compilation cache, fresh for each test session, compiles each of them once.
# Made by the first process (pytest-xdist's workers and the tests' subprocesses inherit it), and
# removed when that process ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="minimobile-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# TFDS makes an empty temporary folder, and leaves it, each time it meets a dataset not yet prepared
# (`DatasetInfo.initialize_from_bucket`): ~20 a run. Ours and our subprocesses' go to one folder,
# removed at the end.
if "MINIMOBILE_TEST_TMPDIR" not in os.environ:
    os.environ["MINIMOBILE_TEST_TMPDIR"] = os.environ["TMPDIR"] = tempfile.mkdtemp(prefix="minimobile-tests-")
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    atexit.register(shutil.rmtree, os.environ["MINIMOBILE_TEST_TMPDIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402



@pytest.fixture(scope="session")
def cifar_sample():
    """1,000 real CIFAR-100 images (10 per class), shipped with the package: images [N, 32, 32, 3] uint8."""
    from minimobile.assets import load_cifar100_sample

    return load_cifar100_sample()


@pytest.fixture(scope="session")
def cifar100_data_dir(tmp_path_factory):
    """A TFDS data dir prepared offline by the real cifar100 builder: 64 train and 20 test images."""
    import cifar_files

    return cifar_files.make_prepared_cifar_dir(tmp_path_factory.mktemp("tfds"), "cifar100", n_train=64, n_test=20)
