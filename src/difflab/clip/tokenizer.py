"""The CLIP BPE tokenizer, built offline.

The original CLIP vocabulary (`bpe_simple_vocab_16e6.txt.gz`) ships inside the `open-clip-torch` wheel,
installed with `--no-deps` only for this file; `open_clip` itself is never imported (it needs torchvision).
The conversion to `vocab.json` + `merges.txt` follows the original CLIP recipe, so ids equal OpenAI's.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

from difflab.utils import DifflabError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77


def clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise DifflabError(
            f"the CLIP vocabulary {BPE_FILE} was not found: install it with `pip install --no-deps open-clip-torch`, "
            "or pass a tokenizer folder (vocab.json + merges.txt)"
        )
    path = Path(spec.origin).parent / BPE_FILE
    if not path.is_file():
        raise DifflabError(f"{path}: CLIP vocabulary file missing from the open-clip-torch install")
    return path


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in CLIP's order."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    # CLIP orders the vocabulary by the byte-sorted printable bytes first, then the remapped ones.
    return [chars[b] for b in keep] + [chars[b] for b in range(256) if b not in keep]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(clip_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = _bytes_to_unicode()
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def load_clip_tokenizer(path: str | os.PathLike | None = None):
    """A `CLIPTokenizer` from a local folder, or built from the shipped BPE file when `path` is None.

    transformers 5 ignores `vocab_file=`/`merges_file=` in the constructor, so we pass the dict and pairs.
    """
    from transformers import CLIPTokenizer

    if path is not None:
        path = Path(path)
        missing = [f for f in ("vocab.json", "merges.txt") if not (path / f).is_file()]
        if missing:
            raise DifflabError(f"{path}: tokenizer folder lacks {', '.join(missing)}")
        return CLIPTokenizer.from_pretrained(str(path), local_files_only=True, model_max_length=MAX_LENGTH)
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH, pad_token="<|endoftext|>")
