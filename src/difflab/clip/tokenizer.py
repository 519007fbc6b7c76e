"""The CLIP BPE tokenizer, offline.

The original CLIP vocabulary ships inside difflab as `vocab.json` + `merges.txt` (`configs/sd-v1/tokenizer/`, the
files of Stable Diffusion v1's tokenizer, MIT-licensed by OpenAI), so installing the package is enough: its ids
equal OpenAI's ("a photo of a cat" is 49406, 320, 1125, 539, 320, 2368, 49407).
"""

from __future__ import annotations

import os
from pathlib import Path

from difflab.configs import SD_V1_CONFIG
from difflab.utils import DifflabError

MAX_LENGTH = 77
SHIPPED = SD_V1_CONFIG / "tokenizer"


def load_clip_tokenizer(path: str | os.PathLike | None = None):
    """A `CLIPTokenizer` from a local folder (vocab.json + merges.txt), or the shipped CLIP vocabulary when `path`
    is None."""
    from transformers import CLIPTokenizer

    path = Path(path) if path is not None else SHIPPED
    missing = [f for f in ("vocab.json", "merges.txt") if not (path / f).is_file()]
    if missing:
        raise DifflabError(f"{path}: tokenizer folder lacks {', '.join(missing)}")
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True, model_max_length=MAX_LENGTH)
