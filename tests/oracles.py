"""NumPy references that several tests compare the package with: written once, here, by hand."""

import numpy as np


def normalised(images, mean, std) -> np.ndarray:
    """(x - mean) / std per channel: [N, H, W, 3] uint8 -> float32, as the train statistics say."""
    return ((images.astype(np.float32) - np.float32(mean)) / np.float32(std)).astype(np.float32)


def log_softmax(logits) -> np.ndarray:
    """log p over the last axis, in float64: [..., K] -> [..., K]."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
