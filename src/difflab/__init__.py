"""difflab: train, sample, evaluate and personalize diffusion models."""

__version__ = "0.2.0"


def __getattr__(name: str):
    # The pipeline is imported on first use, so `import difflab` stays light (as diffusers' lazy imports).
    if name == "DigitsPipeline":
        from difflab.digits.pipeline import DigitsPipeline

        return DigitsPipeline
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")
