"""`python -m difflab.cli ...` (how `accelerate launch` / `torchrun` start difflab)."""

from difflab.cli import main

main()
