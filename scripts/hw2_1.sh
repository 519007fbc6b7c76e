#!/usr/bin/env bash
# HW2 problem 1: write 50 images per digit per domain to <out_dir>/{mnistm,svhn}/{d}_{NNN}.png.
# The checkpoint folder comes from $DIFFLAB_DIGITS_CKPT, else runs/demo/model (written by `make demo`).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 <out_dir>" >&2
  exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
ckpt="${DIFFLAB_DIGITS_CKPT:-$repo/runs/demo/model}"
if [ ! -f "$ckpt/model.safetensors" ]; then
  echo "error: no digits checkpoint at $ckpt (run 'make demo' or set DIFFLAB_DIGITS_CKPT)" >&2
  exit 1
fi
difflab="$repo/.venv/bin/difflab"
[ -x "$difflab" ] || difflab=difflab
# The course contract: the script writes into the folder it is given, whatever is there.
exec "$difflab" digits sample --ckpt "$ckpt" --out "$1" --per-digit 50 --seed "${DIFFLAB_SEED:-0}" --no-figures --overwrite
