"""1,000 real CIFAR-100 images (10 per class) shipped with the package, for figures and smoke tests.

See README.md beside this file for their provenance. They are a sample, not a benchmark.
"""

from __future__ import annotations

import pathlib

import numpy as np

ASSETS = pathlib.Path(__file__).parent


def load_cifar100_sample() -> dict[str, np.ndarray | list[str]]:
    """{'image': [1000, 32, 32, 3] uint8, 'label': [1000] fine label, 'coarse_label': [1000], 'label_names': 100 names}."""
    with np.load(ASSETS / "cifar100_sample.npz") as f:
        sample = {k: f[k] for k in f.files}
    sample["label_names"] = (ASSETS / "fine_label_names.txt").read_text().split()
    sample["coarse_label_names"] = (ASSETS / "coarse_label_names.txt").read_text().split()
    return sample
