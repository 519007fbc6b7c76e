"""Reading weights and training state without ever running pickled code.

`.safetensors` files go through safetensors; everything else through `torch.load(weights_only=True)`, which
only rebuilds tensors and plain containers. Any failure (missing, truncated, not a torch file, a pickled
object) becomes one `DifflabError` naming the file; the advice torch prints to load unsafely is never shown.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import torch

from difflab.utils import DifflabError


class Inert:
    """Stands in for objects pickled beside the weights (e.g. a training framework's callbacks) that a reader
    asked to skip: constructing it runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _why_unreadable(e: BaseException) -> str:
    text = str(e)
    culprit = re.search(r"GLOBAL ([\w.]+)", text)
    if culprit or "Unsupported class" in text:
        found = f" ({culprit.group(1)})" if culprit else ""
        return f"it holds a pickled Python object{found}; difflab reads only tensors and plain containers"
    if (
        isinstance(e, EOFError)
        or "central directory" in text
        or "zip archive" in text
        or (isinstance(e, OSError) and e.errno == 22)
    ):
        return "the file is empty, truncated or corrupt"
    if (
        "Unsupported operand" in text
        or isinstance(e, (KeyError, UnicodeDecodeError))
        or "load key" in text
        or "magic number" in text
        or "unpack requires" in text
    ):
        return "not a PyTorch file"
    first = text.strip().splitlines()[0] if text.strip() else e.__class__.__name__
    return first[:160].replace("weights_only", "the safe loader")


def loader_error(path: str | os.PathLike, what: str, e: BaseException) -> DifflabError:
    """A diffusers or transformers folder loader's failure in the safe reader's words: a pickled payload is named
    as such, and torch's advice to load with `weights_only=False` never reaches the user."""
    return DifflabError(f"{path}: could not load the {what}: {_why_unreadable(e)}")


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise DifflabError(f"{path}: is a folder, not a {what} file")
    if not path.is_file():
        raise DifflabError(f"{path}: {what} file not found")
    return path


def read_torch(
    path: str | os.PathLike, what: str = "checkpoint", allowed: Iterable = (), skip_unknown_objects: bool = False
):
    """`torch.load(weights_only=True)` on CPU. `allowed` lists extra classes the file may hold (e.g.
    `torch.nn.ParameterDict`); with `skip_unknown_objects`, any other pickled class becomes an `Inert`."""
    path = _existing_file(path, what)
    allowed = list(allowed)
    if skip_unknown_objects:
        try:
            unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip checkpoint: the plain reader below reports what is wrong
            unknown = []
        allowed += [(Inert, name) for name in unknown]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip, EOF and weights-only errors all mean "cannot read this file"
        raise DifflabError(f"{path}: not a readable {what}: {_why_unreadable(e)}") from None


def read_safetensors(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = _existing_file(path, what)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise DifflabError(f"{path}: not a readable safetensors {what} ({str(e).strip()[:160]})") from None


def read_tensors(path: str | os.PathLike, what: str = "checkpoint", **torch_options):
    """Whatever a `.safetensors` or torch file holds, by its suffix."""
    if Path(path).suffix.lower() == ".safetensors":
        return read_safetensors(path, what)
    return read_torch(path, what, **torch_options)


def read_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A non-empty mapping of names to tensors, from either format."""
    state = read_tensors(path, what)
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise DifflabError(
            f"{path}: expected a state dict (names -> tensors), got a {type(state).__name__}"
            + (" with other contents" if isinstance(state, dict) else "")
        )
    return state


def state_dict_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading strictly into `model`, one phrase per kind; empty when it fits."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in ours.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]

    def listing(kind: str, items: list[str]) -> str:
        shown = ", ".join(items[:6]) + (f", ... (+{len(items) - 6} more)" if len(items) > 6 else "")
        return f"{len(items)} {kind}: {shown}"

    return [
        listing(kind, items)
        for kind, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if items
    ]


def check_state_dict(model: torch.nn.Module, state: dict, source: str | os.PathLike) -> None:
    """Load strictly; a mismatch is one line naming `source` and what is missing, unexpected or mis-shaped."""
    problems = state_dict_mismatch(model, state)
    if problems:
        raise DifflabError(f"{source}: weights do not fit the model; " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
