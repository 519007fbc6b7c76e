"""Learned token embeddings: the file formats, and adding them to a pipeline's tokenizer + text encoder.

Saved format (diffusers): `{token: (num_vectors, dim) tensor}` in safetensors. A file holding one token loads with
`pipe.load_textual_inversion(path)`; a token with K > 1 vectors is expanded into `token, token_1, ..., token_{K-1}`
exactly as diffusers does, and a prompt mentioning `token` is widened to all K tokens (`expand_prompt`).

Read formats: that one (several tokens per file allowed), a bare tensor, `{token: tensor}` .bin/.pt files, and the
original textual-inversion / A1111 `.pt` (`string_to_param` + `string_to_token`, optional `name`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from difflab.io import atomic_write, read_tensors
from difflab.utils import DifflabError


def vector_tokens(token: str, num_vectors: int) -> list[str]:
    """The tokenizer entries of a token with `num_vectors` vectors, named as diffusers names them."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, token_vectors: dict[str, int]) -> str:
    """Replace each multi-vector token in `prompt` by all its vector tokens ("<t>" -> "<t> <t>_1 <t>_2")."""
    for token, n in token_vectors.items():
        if n > 1:
            prompt = re.sub(re.escape(token) + r"(?!_\d)", " ".join(vector_tokens(token, n)), prompt)
    return prompt


def read_embeddings(path: str | os.PathLike, token: str | None = None) -> dict[str, torch.Tensor]:
    """`{token: (num_vectors, dim)}` from any supported file; `token` renames a file that holds exactly one."""
    path = Path(path)
    # The original textual-inversion code saves `string_to_param` as an nn.ParameterDict.
    data = read_tensors(path, "embedding", allowed=[torch.nn.ParameterDict])
    if isinstance(data, torch.Tensor):
        found = {token or f"<{path.stem}>": data}
    elif isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        if len(params) != 1:
            raise DifflabError(
                f"{path}: textual-inversion file holds {len(params)} placeholders; only one is supported"
            )
        placeholder, tensor = next(iter(params.items()))
        # The original repo keys by its placeholder string ("*"); A1111 files also store a readable name.
        name = data.get("name") if isinstance(data.get("name"), str) else None
        found = {token or name or (placeholder if placeholder != "*" else f"<{path.stem}>"): tensor}
    elif isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        found = dict(data)
        if token is not None:
            if len(found) != 1:
                raise DifflabError(f"{path}: holds {len(found)} tokens, cannot rename them all to {token!r}")
            found = {token: next(iter(found.values()))}
    else:
        raise DifflabError(
            f"{path}: unknown embedding format (expected {{token: tensor}}, a tensor, "
            "or a textual-inversion file with string_to_param)"
        )
    out = {}
    for name, t in found.items():
        t = t.detach().float()
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[0] < 1:
            raise DifflabError(
                f"{path}: embedding for {name!r} has shape {tuple(t.shape)}, expected (dim,) or (n, dim)"
            )
        out[name] = t
    return out


def add_tokens(tokenizer, text_encoder, embeddings: dict[str, torch.Tensor]) -> list[list[int]]:
    """Add each token's vector tokens to the tokenizer, grow the embedding matrix and write the vectors.

    Returns the new token ids per token. Raises if a token already exists or the width does not match.
    """
    dim = text_encoder.get_input_embeddings().weight.shape[1]
    vocab = tokenizer.get_vocab()
    for token, vecs in embeddings.items():
        if vecs.shape[1] != dim:
            raise DifflabError(f"embedding {token!r} has width {vecs.shape[1]}, the text encoder expects {dim}")
        clash = [t for t in vector_tokens(token, len(vecs)) if t in vocab]
        if clash:
            raise DifflabError(f"token {clash[0]!r} is already in the tokenizer vocabulary; choose another name")
    ids = []
    for token, vecs in embeddings.items():
        names = vector_tokens(token, len(vecs))
        if tokenizer.add_tokens(names) != len(names):
            raise DifflabError(f"token {token!r} could not be added to the tokenizer")
        ids.append(tokenizer.convert_tokens_to_ids(names))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token_ids, vecs in zip(ids, embeddings.values()):
            weight[token_ids] = vecs.to(weight.device, weight.dtype)
    return ids


def load_embeddings(pipe, paths, tokens: list[str | None] | None = None) -> list[str]:
    """Add the embeddings in `paths` (one path or a list) to `pipe`; returns the tokens to write in prompts."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    tokens = tokens or [None] * len(paths)
    if len(tokens) != len(paths):
        raise DifflabError(f"got {len(tokens)} token names for {len(paths)} embedding files")
    merged: dict[str, torch.Tensor] = {}
    for path, token in zip(paths, tokens):
        for name, vecs in read_embeddings(path, token).items():
            if name in merged:
                raise DifflabError(f"{path}: token {name!r} is defined twice")
            merged[name] = vecs
    add_tokens(pipe.tokenizer, pipe.text_encoder, merged)
    return list(merged)


def save_embeddings(path: str | os.PathLike, embeddings: dict[str, torch.Tensor]) -> Path:
    """Write `{token: (num_vectors, dim)}` as safetensors (diffusers' `learned_embeds.safetensors` layout),
    atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous().reshape(-1, v.shape[-1]) for k, v in embeddings.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp))
