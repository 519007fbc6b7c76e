"""What the app works on, found once and loaded on first use: the digits model and its judges from `make demo`,
the miniature SD + CLIP stack difflab ships (or the one the personalization demo unpacked), the embeddings and
reference images that demo trained on; any of them replaced by the user's own paths."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difflab.precision import Precision
from difflab.utils import DifflabError, pick_device

DIGITS_DEMO = Path("runs/demo")
PERSONALIZE_DEMO = Path("runs/personalize-demo")
CONCEPT_TOKENS = ("<new1>", "<new2>")  # the personalization demo's concept keys 0 and 1


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFLAB_CACHE", Path.home() / ".cache" / "difflab"))


@dataclass
class AppConfig:
    digits_model: Path | None = None  # default: runs/demo/model
    judges: Path | None = None  # default: the digits model's sibling classifiers/
    sd: Path | None = None  # default: the mini stack's sd/
    clip: Path | None = None  # default: the mini stack's clip/
    stack: Path | None = None  # default: runs/personalize-demo/minisd, else the shipped one unpacked to the cache
    embeds: list[Path] = field(default_factory=list)  # default: what the personalization demo trained
    references: Path | None = None  # <key>/ image folders; default: the personalization demo's
    device: str | None = None
    precision: Precision | str = "auto"  # the digits sampler's, as `digits sample --precision`

    def __post_init__(self) -> None:
        self.digits_model = self.digits_model or DIGITS_DEMO / "model"
        self.judges = self.judges or self.digits_model.parent / "classifiers"
        self.references = self.references or PERSONALIZE_DEMO / "references"
        if not self.embeds:
            self.embeds = sorted((PERSONALIZE_DEMO / "ti").glob("*.safetensors"))


class Models:
    """Loads each model once, on first use, under a lock: requests never see a half-loaded model."""

    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self._lock = threading.RLock()  # a loader may need another model
        self._loaded: dict = {}

    def _once(self, key, load):
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load()
            return self._loaded[key]

    def digits(self):
        """The digits model as a `DigitsPipeline`."""
        path = self.cfg.digits_model
        if not (path / "config.json").is_file():
            raise DifflabError(
                f"no digits model at {path}: run `make demo` (about 9 minutes on 2 cores) or start the app with "
                "--digits-model FOLDER (any `difflab digits train` output)"
            )
        from difflab.digits.pipeline import DigitsPipeline
        from difflab.digits.sample import SampleConfig

        config = SampleConfig(precision=Precision.parse(self.cfg.precision))
        return self._once("digits", lambda: DigitsPipeline.from_pretrained(path, config).to(self.device))

    def digits_config(self) -> dict:
        """The digits model's config.json, or {} when there is none (the app then shows how to make one)."""
        from difflab.io import load_json

        path = self.cfg.digits_model / "config.json"
        return load_json(path) if path.is_file() else {}

    def judges(self) -> dict | None:
        """The digits classifiers per domain, or None when there are none beside the model."""
        from difflab.digits.classifier import classifier_path, load_classifier
        from difflab.digits.data import DOMAINS

        folder = self.cfg.judges
        if not all(classifier_path(folder, d).is_file() for d in DOMAINS):
            return None
        return self._once("judges", lambda: {d: load_classifier(classifier_path(folder, d), "cpu") for d in DOMAINS})

    def eps(self, domain: int, digit: int, guidance: float):
        """The digits model as DDIM's ε-model for one condition (each kept: a few MB), in fp32: the tab compares
        images made from nearby noises, where a lower precision's rounding would add differences of its own."""
        from difflab.ddim.models import DigitsCondition, load_eps_model

        self.digits()  # the same message when there is no model
        condition = DigitsCondition(domain, digit, guidance)
        return self._once(
            ("eps", condition), lambda: load_eps_model(self.cfg.digits_model, self.device, "fp32", condition)
        )

    def stack(self) -> Path:
        """A mini-SD stack folder: the user's, the personalization demo's, or the shipped one unpacked once."""
        from difflab.minisd import prebuilt
        from difflab.minisd.build import done

        def find() -> Path:
            for stack in (self.cfg.stack, PERSONALIZE_DEMO / "minisd"):
                if stack is not None and all(done(stack, s) for s in ("sd", "clip")):
                    return stack
            if self.cfg.stack is not None:
                raise DifflabError(f"{self.cfg.stack}: not a complete mini-SD stack (sd/ and clip/)")
            unpacked = cache_dir() / "minisd"
            if not all(done(unpacked, s) for s in ("sd", "clip")):
                prebuilt.unpack(unpacked)
            return unpacked

        return self._once("stack", find)

    def clip(self):
        """CLIP (model, tokenizer, processor) for zero-shot classification and scores."""
        from difflab.clip.model import load_clip

        return self._once("clip", lambda: load_clip(self.cfg.clip or self.stack() / "clip", self.device))

    def scorer(self):
        from difflab.clip.score import ClipScorer

        clip = self.clip()
        return self._once("scorer", lambda: ClipScorer(clip.model, clip.tokenizer, clip.processor, self.device))

    def sd(self):
        """The SD pipeline with the learned embeddings loaded, in float32 (the app's images match the CLI's)."""
        from difflab.personalize.sd import load_pipeline

        def load():
            pipe = load_pipeline(self.cfg.sd or self.stack() / "sd", self.cfg.embeds, str(self.device), "fp32")
            pipe.set_progress_bar_config(disable=True)
            return pipe

        return self._once("sd", load)

    def reference_embeds(self, token: str) -> torch.Tensor | None:
        """CLIP embeddings of a token's reference images (the demo's concept folders), or None when unknown."""
        from difflab.io import image_files, load_rgb

        if token not in CONCEPT_TOKENS:
            return None
        folder = self.cfg.references / str(CONCEPT_TOKENS.index(token))
        if not folder.is_dir():
            return None
        scorer = self.scorer()
        return self._once(
            ("refs", token), lambda: scorer.image_embeds([load_rgb(p) for p in image_files(folder, "reference image")])
        )
