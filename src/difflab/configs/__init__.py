"""Model configurations difflab ships as data (no weights): the Stable Diffusion v1 layout, which both the
personalization jobs (loading a single-file checkpoint) and the miniature stack (its scheduler) read."""

from pathlib import Path

SD_V1_CONFIG = Path(__file__).resolve().parent / "sd-v1"
