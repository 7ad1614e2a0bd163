"""minimobile: MobileNet-V1 in JAX/Flax, built from explicit depthwise and pointwise convolutions."""

__version__ = "0.1.0"
