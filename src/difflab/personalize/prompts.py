"""Prompts: the course's `input.json` schema and the textual-inversion training templates."""

from __future__ import annotations

import math
import os
from numbers import Real

from difflab.io import load_json
from difflab.utils import DifflabError

# The caption templates of the textual-inversion paper / diffusers example; "{}" is the placeholder token.
OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def _str_list(where: str, value, field: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
        raise DifflabError(f"{where}: field {field!r} must be a non-empty list of strings")
    return value


def load_input_json(path: str | os.PathLike) -> dict[str, dict]:
    """Read and validate `input.json` (spec section 4); returns `{key: entry}` in key order "0", "1", ...

    Each entry has `src_image`, `token_name`, `prompt` (list), `prompt_4_clip_eval` (same length) and `baseline`
    (same length, `[image_score, text_score]` pairs).
    """
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise DifflabError(f'{path}: expected a JSON object with concept keys "0", "1", ...')
    for key, entry in data.items():
        where = f"{path}: concept {key!r}"
        if not key.isdigit():
            raise DifflabError(f'{where}: concept keys must be "0", "1", ...')
        if not isinstance(entry, dict):
            raise DifflabError(f"{where}: expected an object")
        for field in ("src_image", "token_name", "prompt", "prompt_4_clip_eval", "baseline"):
            if field not in entry:
                raise DifflabError(f"{where}: missing field {field!r}")
        for field in ("src_image", "token_name"):
            if not isinstance(entry[field], str) or not entry[field].strip():
                raise DifflabError(f"{where}: field {field!r} must be a non-empty string")
        prompts = _str_list(where, entry["prompt"], "prompt")
        clip_prompts = _str_list(where, entry["prompt_4_clip_eval"], "prompt_4_clip_eval")
        if len(clip_prompts) != len(prompts):
            raise DifflabError(
                f"{where}: 'prompt_4_clip_eval' has {len(clip_prompts)} entries, 'prompt' has {len(prompts)}"
            )
        baseline = entry["baseline"]
        if not isinstance(baseline, list) or len(baseline) != len(prompts):
            raise DifflabError(f"{where}: 'baseline' must be a list of {len(prompts)} [image, text] pairs")
        for pair in baseline:
            if not (isinstance(pair, list) and len(pair) == 2 and all(_finite_number(v) for v in pair)):
                raise DifflabError(f"{where}: 'baseline' entry {pair!r} is not an [image_score, text_score] pair")
    return dict(sorted(data.items(), key=lambda kv: int(kv[0])))


def _finite_number(value) -> bool:
    """A real, finite number: JSON's true/false are bools (ints to Python) and NaN would write invalid JSON."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
