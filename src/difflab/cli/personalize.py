"""`difflab personalize ...`: textual-inversion training, generation, composition and CLIP scoring."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Textual inversion on Stable Diffusion v1.x: train, generate, compose, score.", no_args_is_help=True)


@app.command("train")
def train_command(
    concept: List[str] = typer.Option(..., "--concept", help="DIR:TOKEN:INIT[:object|style], e.g. "
                                      "textual_inversion/0:<new1>:dog. Repeat for several tokens in one run."),
    sd: Path = typer.Option(..., "--sd", help="Stable Diffusion v1.x: sd-v1-4.ckpt/.safetensors or a diffusers folder."),
    out: Path = typer.Option(..., "--out", help="Output folder (embeddings, checkpoint, report)."),
    num_vectors: int = typer.Option(1, help="Vectors per new token (K > 1 adds TOKEN_1..TOKEN_{K-1})."),
    steps: int = typer.Option(3000, help="Optimizer steps."),
    resolution: int = typer.Option(512, help="Training image size (square)."),
    batch_size: int = typer.Option(1, help="Images per micro-batch (per process)."),
    grad_accum: int = typer.Option(4, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(5e-4, help="Base learning rate."),
    scale_lr: bool = typer.Option(True, help="Multiply lr by grad_accum x batch_size x processes."),
    ema_decay: float = typer.Option(0.0, help="EMA decay of the learned rows (0: off, e.g. 0.99)."),
    mixed_precision: str = typer.Option("no", help="CUDA autocast: no, fp16 or bf16."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Trade compute for memory."),
    save_every: int = typer.Option(500, help="Embedding snapshot every N steps (0: only at the end)."),
    checkpoint_every: int = typer.Option(500, help="Resumable checkpoint every N steps (0: only at the end)."),
    validate_every: int = typer.Option(0, help="Validation images every N steps (0: never)."),
    validation_prompt: List[str] = typer.Option([], help="Validation prompt (repeatable); default one per concept."),
    validation_steps: int = typer.Option(25, help="Sampling steps for validation images."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt when present."),
    seed: int = typer.Option(0, help="Random seed."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)."),
) -> None:
    """Learn new token embeddings for reference images (textual inversion)."""
    from difflab.personalize.textual_inversion import Concept, TextualInversionConfig, train_textual_inversion

    cfg = TextualInversionConfig(
        concepts=[Concept.parse(c) for c in concept], sd=str(sd), out=str(out), num_vectors=num_vectors, steps=steps,
        resolution=resolution, batch_size=batch_size, grad_accum=grad_accum, lr=lr, scale_lr=scale_lr,
        ema_decay=ema_decay, mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
        save_every=save_every, checkpoint_every=checkpoint_every, validate_every=validate_every,
        validation_prompts=list(validation_prompt), validation_steps=validation_steps, resume=resume, seed=seed,
        device=device)
    path = train_textual_inversion(cfg)
    typer.echo(f"embeddings: {path}")


from difflab.personalize.compose import compose_command  # noqa: E402
from difflab.personalize.generate import generate_command  # noqa: E402

app.command("generate")(generate_command)
app.command("compose")(compose_command)
from difflab.personalize.score import score_command  # noqa: E402

app.command("score")(score_command)
