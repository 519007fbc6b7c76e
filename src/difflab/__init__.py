"""difflab: train, sample, evaluate and personalize diffusion models."""

__version__ = "0.1.0"
