"""Shared test set-up.

Every test run sees 8 CPU devices, so the multi-device code paths are exercised on any laptop
(as flax's own CI does). XLA reads this flag once, when jax is first imported, hence here, first.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TFDS imports TensorFlow; keep its start-up chatter out
os.environ.setdefault("TFDS_DISABLE_TQDM", "1")

import pytest  # noqa: E402



@pytest.fixture(scope="session")
def cifar_sample():
    """1,000 real CIFAR-100 images (10 per class), shipped with the package: images [N, 32, 32, 3] uint8."""
    from minimobile.assets import load_cifar100_sample

    return load_cifar100_sample()
