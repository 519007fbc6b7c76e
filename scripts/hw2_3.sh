#!/usr/bin/env bash
# Generate 25 images per prompt of input.json with the learned concept tokens.
#   usage: bash scripts/hw2_3.sh <input.json> <out_dir> <sd_ckpt>
# <sd_ckpt>: the original sd-v1-4.ckpt (or a diffusers folder). The learned embeddings come from
# $DIFFLAB_EMBEDS (a .safetensors file or a folder of them), default assets/embeddings/ in this repository;
# docs/personalize.md shows how they are trained.
set -euo pipefail

if [ "$#" -ne 3 ]; then
    echo "usage: $0 <input.json> <out_dir> <sd_ckpt>" >&2
    exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$root/.venv/bin/difflab" ]; then
    difflab="$root/.venv/bin/difflab"
elif command -v difflab >/dev/null 2>&1; then
    difflab="difflab"
else
    echo "error: difflab is not installed (no $root/.venv/bin/difflab, no difflab on PATH); run: pip install -e $root" >&2
    exit 1
fi

embeds="${DIFFLAB_EMBEDS:-$root/assets/embeddings}"
files=()
if [ -d "$embeds" ]; then
    shopt -s nullglob
    files=("$embeds"/*.safetensors)
elif [ -f "$embeds" ]; then
    files=("$embeds")
fi
if [ "${#files[@]}" -eq 0 ]; then
    cat >&2 <<MSG
error: no learned embeddings found at $embeds
Train them first (one token per concept folder of textual_inversion/), e.g.:
  $difflab personalize train --sd $3 --concept "textual_inversion/0:<new1>:dog" --out runs/ti-0
  $difflab personalize train --sd $3 --concept "textual_inversion/1:<new2>:painting:style" --out runs/ti-1
  mkdir -p $root/assets/embeddings && cp runs/ti-0/embeds/new1.safetensors runs/ti-1/embeds/new2.safetensors $root/assets/embeddings/
or point DIFFLAB_EMBEDS at a learned_embeds.safetensors file or a folder of them.
MSG
    exit 1
fi

args=()
for f in "${files[@]}"; do
    args+=(--embeds "$f")
done
# The course contract: the script writes into the folder it is given, whatever is there.
exec "$difflab" personalize generate --prompts "$1" --sd "$3" "${args[@]}" --out "$2" --per-prompt 25 --overwrite
