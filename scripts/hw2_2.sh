#!/usr/bin/env bash
# HW2 part 2: DDIM (η = 0, 50 steps) on the face UNet for every noise file.
# Usage: bash scripts/hw2_2.sh <noise_dir> <out_dir> <UNet.pt>
set -euo pipefail
if [ "$#" -ne 3 ]; then
    echo "usage: $0 <noise_dir> <out_dir> <UNet.pt>" >&2
    exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
difflab="$repo/.venv/bin/difflab"
[ -x "$difflab" ] || difflab=difflab
# The course contract: the script writes into the folder it is given, whatever is there, and its images are
# compared with a ground truth computed in fp32.
exec "$difflab" ddim sample --noise-dir "$1" --out "$2" --ckpt "$3" --eta 0 --steps 50 --precision fp32 --overwrite
