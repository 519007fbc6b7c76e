"""`difflab personalize ...`: textual-inversion training, generation, composition and CLIP scoring.

Defaults come from the config dataclasses; each command parses its options, checks what it can before the slow
model load, and calls the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from difflab.cli.options import App, Device, Overwrite, Seed, checked, precision_option
from difflab.demos.personalize import PersonalizeDemoConfig as DemoConfig
from difflab.parallel import Processes
from difflab.personalize.compose import ComposeConfig
from difflab.personalize.generate import SCHEDULERS, GenerateConfig
from difflab.personalize.grading import TOP_K
from difflab.personalize.sd import TOLERANCE
from difflab.personalize.textual_inversion import TextualInversionConfig as TIConfig
from difflab.report.tracking import REPORT_TO_HELP
from difflab.utils import DifflabError, pick_device

app = App(help="Textual inversion on Stable Diffusion v1.x: train, generate, compose, score.", no_args_is_help=True)
TIPrecision = precision_option("fp32 on every device, untimed: no lower precision is checked for this job")
DemoPrecision = precision_option(
    "per stage, as in minisd build, clip zeroshot and generate; fp32 for textual inversion"
)
SDPrecision = precision_option(checked("a UNet noise prediction", TOLERANCE, "fp32 or bf16 weights"))

SD_HELP = "Stable Diffusion v1.x: a diffusers folder or a single-file .ckpt/.safetensors."
EMBEDS_HELP = "Learned embedding file(s) adding the concept tokens; repeat for several."
SCHEDULER_HELP = f"Sampler: {' or '.join(SCHEDULERS)} (the model's noise schedule is kept)."
SIZE_HELP = "Image {} in pixels, a multiple of 8 (default: the model's native size)."


Concept = Annotated[
    List[str],
    typer.Option(
        "--concept",
        help=(
            "DIR:TOKEN:INIT[:object|style], e.g. textual_inversion/0:<new1>:dog. Repeat for several tokens in one run."
        ),
    ),
]
Sd = Annotated[Path, typer.Option("--sd", help=SD_HELP)]
Out = Annotated[Path, typer.Option("--out", help="Output folder (embeddings, checkpoint, report).")]
NumVectors = Annotated[
    int, typer.Option(min=1, max=75, help="Vectors per new token (K > 1 adds TOKEN_1..TOKEN_{K-1}).")
]
Steps = Annotated[int, typer.Option(min=1, help="Optimizer steps.")]
Resolution = Annotated[int, typer.Option(min=8, max=4096, help="Training image size (square, a multiple of 8).")]
CenterCrop = Annotated[
    bool,
    typer.Option(
        "--center-crop/--no-center-crop",
        help=(
            "Crop each image to its centre square before resizing (default: squash the whole image, as diffusers does)."
        ),
    ),
]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per micro-batch (per process).")]
GradAccum = Annotated[int, typer.Option(min=1, help="Micro-batches per optimizer step.")]
Lr = Annotated[float, typer.Option(min=1e-08, max=1.0, help="Base learning rate.")]
ScaleLr = Annotated[bool, typer.Option(help="Multiply lr by grad_accum x batch_size x processes.")]
EmaDecay = Annotated[
    float, typer.Option(min=0.0, max=0.99999, help="EMA decay of the learned rows (0: off, e.g. 0.99).")
]
GradientCheckpointing = Annotated[bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.")]
SaveEvery = Annotated[int, typer.Option(min=0, help="Embedding snapshot every N steps (0: only at the end).")]
CheckpointEvery = Annotated[int, typer.Option(min=0, help="Resumable checkpoint every N steps (0: only at the end).")]
ValidateEvery = Annotated[
    int,
    typer.Option(
        min=0, help="Validation images every N steps (0: never; a tracked run logs the last step's either way)."
    ),
]
ReportTo = Annotated[str, typer.Option("--report-to", help=REPORT_TO_HELP + ".")]
ValidationPrompt = Annotated[List[str], typer.Option(help="Validation prompt (repeatable); default one per concept.")]
ValidationSteps = Annotated[int, typer.Option(min=1, max=1000, help="Sampling steps for validation images.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in OUT from its checkpoint.pt.")]
Prompts = Annotated[
    Path, typer.Option("--prompts", help="input.json with the concepts and their prompts (course schema).")
]
Embeds = Annotated[List[Path], typer.Option("--embeds", help=EMBEDS_HELP)]
GenerateOut = Annotated[
    Path, typer.Option("--out", help="Output folder; images go to <out>/<key>/<idx>/source{key}_prompt{idx}_{n}.png.")
]
PerPrompt = Annotated[int, typer.Option("--per-prompt", min=1, max=10000, help="Images written per prompt.")]
Scheduler = Annotated[str, typer.Option("--scheduler", help=SCHEDULER_HELP)]
GenerateSteps = Annotated[int, typer.Option("--steps", min=1, max=1000, help="Denoising steps.")]
Guidance = Annotated[float, typer.Option("--guidance", min=0.0, max=100.0, help="Classifier-free guidance scale.")]
GenerateBatchSize = Annotated[
    int, typer.Option("--batch-size", min=1, max=1024, help="Images denoised together in one batch.")
]
Height = Annotated[Optional[int], typer.Option("--height", min=8, max=4096, help=SIZE_HELP.format("height"))]
Width = Annotated[Optional[int], typer.Option("--width", min=8, max=4096, help=SIZE_HELP.format("width"))]
Keys = Annotated[
    Optional[str], typer.Option("--keys", help="Comma-separated concept keys to generate (default: all), e.g. 0,1.")
]
NegativePrompt = Annotated[str, typer.Option("--negative-prompt", help="Negative prompt for classifier-free guidance.")]
Only = Annotated[
    Optional[str], typer.Option("--only", help="Regenerate one image KEY/IDX/N (its file is rewritten in place).")
]
GenerateResume = Annotated[
    bool, typer.Option("--resume", help="Keep the images already in --out and make only the missing ones.")
]
BestOf = Annotated[
    Optional[int],
    typer.Option(
        "--best-of",
        min=1,
        max=10000,
        help=("Draw this many candidates per prompt and keep the best --per-prompt by CLIP score."),
    ),
]
Clip = Annotated[
    Optional[Path], typer.Option("--clip", help="CLIP model folder (transformers format) for --best-of scoring.")
]
Refs = Annotated[
    Optional[Path],
    typer.Option("--refs", help="Reference image root with one <key>/ folder per concept, for --best-of."),
]
Prompt = Annotated[
    str,
    typer.Option("--prompt", help='The plain multi-concept prompt, e.g. "a <new1> in a city in a style of <new2>".'),
]
Concepts = Annotated[
    List[str],
    typer.Option(
        "--concepts",
        help=(
            "WORDS=PROMPT, repeatable: the concept's class word in the layout prompt (e.g. dog), and the prompt for "
            "its region (e.g. a photo of a <new1> dog)."
        ),
    ),
]
Boxes = Annotated[
    List[str],
    typer.Option(
        "--box",
        help=(
            "WORDS=LEFT,TOP,RIGHT,BOTTOM, repeatable: place that concept in this box (fractions of the image); "
            "every concept, with --layout boxes."
        ),
    ),
]
ComposeOut = Annotated[
    Path, typer.Option("--out", help="Output folder for naive/composed images, mask figures and report.html.")
]
Background = Annotated[
    Optional[str],
    typer.Option("--background", help="Prompt for the area outside every concept region (default: --prompt)."),
]
NumImages = Annotated[
    int, typer.Option("--num-images", min=1, max=10000, help="Images to compose (scores are averaged over them).")
]
ComposeSteps = Annotated[int, typer.Option("--steps", min=1, max=1000, help="Denoising steps.")]
ComposeGuidance = Annotated[
    float,
    typer.Option("--guidance", min=0.0, max=100.0, help="Classifier-free guidance scale, applied per region prompt."),
]
ComposeHeight = Annotated[
    Optional[int],
    typer.Option(
        "--height",
        min=64,
        max=4096,
        help="Image height in pixels, a multiple of 64 (default: the model's native size).",
    ),
]
ComposeWidth = Annotated[
    Optional[int],
    typer.Option(
        "--width", min=64, max=4096, help="Image width in pixels, a multiple of 64 (default: the model's native size)."
    ),
]
Layout = Annotated[
    str,
    typer.Option(
        "--layout",
        help="Where each concept goes: auto (the finder that measured best; clip needs --clip), attention or clip "
        "(found in a layout image of the class words, stage 1), or boxes (--box for every concept).",
    ),
]
LayoutPrompt = Annotated[
    Optional[str],
    typer.Option(
        "--layout-prompt",
        help="Stage 1's prompt, holding every concept's class word (default: 'a WORD next to a WORD ...').",
    ),
]
Layouts = Annotated[
    Optional[int],
    typer.Option(
        "--layouts",
        min=1,
        max=64,
        help="Stage-1 images tried; the finder keeps the one it reads most surely (default: 4 for the CLIP finder, "
        "1 for the attention finder, which has no sureness to choose by).",
    ),
]
LayoutSteps = Annotated[
    int,
    typer.Option("--layout-steps", min=0, max=999, help="Stage 2 starts from stage 1's latents after this many steps."),
]
Smooth = Annotated[
    float,
    typer.Option(
        "--smooth", min=0.0, max=100.0, help="Gaussian sigma (latent pixels) applied to the attention maps; 0: none."
    ),
]
ComposeNegativePrompt = Annotated[
    str, typer.Option("--negative-prompt", help="Negative prompt shared by all region prompts.")
]
CaptureFraction = Annotated[
    float,
    typer.Option(
        "--capture-fraction",
        min=0.01,
        max=1.0,
        help="The attention finder averages this first fraction of stage 1's steps.",
    ),
]
ComposeClip = Annotated[
    Optional[Path],
    typer.Option("--clip", help="CLIP model folder: finds regions for --layout clip / auto, and scores with --refs."),
]
ComposeRefs = Annotated[
    List[str], typer.Option("--refs", help="WORDS=DIR, repeatable: reference images of a concept for CLIP scoring.")
]


@app.command("train")
def train_command(
    concept: Concept = ...,
    sd: Sd = ...,
    out: Out = ...,
    num_vectors: NumVectors = TIConfig.num_vectors,
    steps: Steps = TIConfig.steps,
    resolution: Resolution = TIConfig.resolution,
    center_crop: CenterCrop = TIConfig.center_crop,
    batch_size: BatchSize = TIConfig.batch_size,
    grad_accum: GradAccum = TIConfig.grad_accum,
    lr: Lr = TIConfig.lr,
    scale_lr: ScaleLr = TIConfig.scale_lr,
    ema_decay: EmaDecay = TIConfig.ema_decay,
    gradient_checkpointing: GradientCheckpointing = TIConfig.gradient_checkpointing,
    save_every: SaveEvery = TIConfig.save_every,
    checkpoint_every: CheckpointEvery = TIConfig.checkpoint_every,
    validate_every: ValidateEvery = TIConfig.validate_every,
    report_to: ReportTo = TIConfig.report_to,
    validation_prompt: ValidationPrompt = [],
    validation_steps: ValidationSteps = TIConfig.validation_steps,
    resume: Resume = TIConfig.resume,
    overwrite: Overwrite = TIConfig.overwrite,
    seed: Seed = TIConfig.seed,
    precision: TIPrecision = TIConfig.precision,
    device: Device = TIConfig.device,
) -> None:
    """Learn new token embeddings for reference images (textual inversion)."""
    from difflab.personalize.textual_inversion import Concept, train_textual_inversion

    cfg = TIConfig(
        concepts=[Concept.parse(c) for c in concept],
        sd=str(sd),
        out=str(out),
        num_vectors=num_vectors,
        steps=steps,
        resolution=resolution,
        center_crop=center_crop,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        scale_lr=scale_lr,
        ema_decay=ema_decay,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        save_every=save_every,
        checkpoint_every=checkpoint_every,
        validate_every=validate_every,
        report_to=report_to,
        validation_prompts=list(validation_prompt),
        validation_steps=validation_steps,
        resume=resume,
        overwrite=overwrite,
        seed=seed,
        device=device,
    )
    path = train_textual_inversion(cfg)
    typer.echo(f"embeddings: {path}")


def only_job(spec: dict, only: str):
    """`--only KEY/IDX/N` -> (the prompt job, N)."""
    from difflab.personalize.generate import prompt_jobs

    parts = only.split("/")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise DifflabError(f"--only {only!r}: expected KEY/IDX/N, e.g. 0/1/7")
    key, idx, n = parts[0], int(parts[1]), int(parts[2])
    jobs = [j for j in prompt_jobs(spec, [key]) if j.idx == idx]
    if not jobs:
        raise DifflabError(f"--only {only}: concept {key} has no prompt {idx}")
    return jobs[0], n


def clip_scorer(clip: Optional[Path], device: Optional[str]):
    if clip is None:
        return None
    from difflab.clip.score import ClipScorer

    return ClipScorer.from_pretrained(clip, device)


@app.command("generate")
def generate_command(
    prompts: Prompts = ...,
    sd: Sd = ...,
    embeds: Embeds = [],
    out: GenerateOut = ...,
    per_prompt: PerPrompt = GenerateConfig.per_prompt,
    scheduler: Scheduler = GenerateConfig.scheduler,
    steps: GenerateSteps = GenerateConfig.steps,
    guidance: Guidance = GenerateConfig.guidance,
    seed: Seed = GenerateConfig.seed,
    batch_size: GenerateBatchSize = GenerateConfig.batch_size,
    height: Height = GenerateConfig.height,
    width: Width = GenerateConfig.width,
    keys: Keys = None,
    negative_prompt: NegativePrompt = GenerateConfig.negative_prompt,
    only: Only = None,
    resume: GenerateResume = False,
    overwrite: Overwrite = False,
    best_of: BestOf = None,
    clip: Clip = None,
    refs: Refs = None,
    precision: SDPrecision = "auto",
    device: Device = None,
) -> None:
    """Generate the course output layout for every prompt of input.json with learned concept tokens.

    `accelerate launch -m difflab.cli personalize generate ...` splits the images between processes; they write
    the same files as one process."""
    from difflab.personalize.generate import generate, prompt_jobs, regenerate_one
    from difflab.personalize.prompts import load_input_json
    from difflab.personalize.sd import load_pipeline

    spec = load_input_json(prompts)
    cfg = GenerateConfig(
        per_prompt=per_prompt,
        scheduler=scheduler,
        steps=steps,
        guidance=guidance,
        seed=seed,
        batch_size=batch_size,
        height=height,
        width=width,
        negative_prompt=negative_prompt,
    )
    cfg.check()
    key_list = [k.strip() for k in keys.split(",") if k.strip()] if keys else None
    prompt_jobs(spec, key_list)  # unknown keys fail here, before the (slow) model load
    if only is not None:
        if best_of is not None:
            raise DifflabError("--only regenerates one image of the plain layout; it cannot be combined with --best-of")
        job, n = only_job(spec, only)
        typer.echo(f"wrote {regenerate_one(load_pipeline(sd, embeds, device, precision), job, n, cfg, out)}")
        return
    with Processes.launched(pick_device(device)) as processes:
        device = str(processes.device)
        scorer = clip_scorer(clip, device) if best_of is not None else None
        generate(
            load_pipeline(sd, embeds, device, precision, processes),
            spec,
            out,
            cfg,
            keys=key_list,
            resume=resume,
            overwrite=overwrite,
            best_of=best_of,
            scorer=scorer,
            refs=refs,
            processes=processes,
        )
        if processes.is_main:
            typer.echo(f"wrote {out / 'report.html'}")


def parse_pairs(values: List[str], option: str) -> list[tuple[str, str]]:
    """`WORDS=VALUE` strings -> (WORDS, VALUE) pairs."""
    pairs = []
    for value in values:
        words, sep, rest = value.partition("=")
        if not sep or not words.strip() or not rest.strip():
            raise DifflabError(f'{option} {value!r}: expected WORDS=VALUE, e.g. "<new1>=a photo of a <new1> dog"')
        pairs.append((words.strip(), rest.strip()))
    return pairs


def parse_box(words: str, value: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in value.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise DifflabError(f"--box {words}={value}: expected four numbers LEFT,TOP,RIGHT,BOTTOM, e.g. 0,0,0.5,1")
    return box


def parse_regions(concepts: List[str], boxes: List[str]):
    """`--concepts WORDS=PROMPT` and `--box WORDS=L,T,R,B` -> the regions to compose."""
    from difflab.personalize.compose import Region, check_boxes

    placed = {words: parse_box(words, value) for words, value in parse_pairs(boxes, "--box")}
    regions = [Region(w, p, placed.pop(w, None)) for w, p in parse_pairs(concepts, "--concepts")]
    if placed:
        raise DifflabError(f"--box {', '.join(placed)}: not the WORDS of any --concepts")
    check_boxes(regions)
    return regions


@app.command("compose")
def compose_command(
    prompt: Prompt = ...,
    concepts: Concepts = ...,
    boxes: Boxes = [],
    sd: Sd = ...,
    embeds: Embeds = [],
    out: ComposeOut = ...,
    background: Background = None,
    seed: Seed = ComposeConfig.seed,
    num_images: NumImages = ComposeConfig.num_images,
    steps: ComposeSteps = ComposeConfig.steps,
    guidance: ComposeGuidance = ComposeConfig.guidance,
    scheduler: Scheduler = ComposeConfig.scheduler,
    height: ComposeHeight = ComposeConfig.height,
    width: ComposeWidth = ComposeConfig.width,
    layout: Layout = ComposeConfig.layout,
    layout_prompt: LayoutPrompt = None,
    layout_steps: LayoutSteps = ComposeConfig.layout_steps,
    layouts: Layouts = ComposeConfig.layouts,
    smooth: Smooth = ComposeConfig.smooth,
    negative_prompt: ComposeNegativePrompt = ComposeConfig.negative_prompt,
    capture_fraction: CaptureFraction = ComposeConfig.capture_fraction,
    clip: ComposeClip = None,
    refs: ComposeRefs = [],
    overwrite: Overwrite = False,
    precision: SDPrecision = "auto",
    device: Device = None,
) -> None:
    """Compose several learned concepts in one image by region-wise denoising, next to the naive prompt: the regions
    are boxes, or found in a layout image of the concepts' class words (two stages, as OMG)."""
    from difflab.personalize.compose import compose_images
    from difflab.personalize.sd import load_pipeline

    regions = parse_regions(concepts, boxes)
    ref_pairs = parse_pairs(refs, "--refs")
    if ref_pairs and clip is None:
        raise DifflabError("--refs needs --clip: a CLIP model folder scores the images against them")
    cfg = ComposeConfig(
        steps=steps,
        guidance=guidance,
        seed=seed,
        scheduler=scheduler,
        height=height,
        width=width,
        negative_prompt=negative_prompt,
        layout=layout,
        layout_steps=layout_steps,
        layouts=layouts,
        smooth=smooth,
        capture_fraction=capture_fraction,
        num_images=num_images,
    )
    cfg.check()
    scorer = clip_scorer(clip, device)
    compose_images(
        load_pipeline(sd, embeds, device, precision),
        prompt,
        regions,
        cfg,
        out,
        background=background,
        scorer=scorer,
        refs=ref_pairs,
        overwrite=overwrite,
        layout_prompt=layout_prompt,
    )
    typer.echo(f"wrote {out / 'report.html'}")


@app.command("score")
def score_command(
    prompts: Path = typer.Option(..., "--prompts", help="input.json with prompt_4_clip_eval and baseline per concept."),
    refs: Path = typer.Option(..., "--refs", help="Folder of reference images: <refs>/<key>/*.jpg|png."),
    gen: Path = typer.Option(..., "--gen", help="Folder of generated images: <gen>/<key>/<prompt_idx>/*.png."),
    clip: Path = typer.Option(
        ..., "--clip", help="Local CLIP folder in transformers format (the course uses ViT-B/32)."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output folder for image_scores.csv, prompt_scores.csv/.json, report.html."
    ),
    top_k: int = typer.Option(
        TOP_K, "--top-k", min=1, max=10_000, help="Images per prompt kept by image + 2.5 x text and averaged."
    ),
    overwrite: Overwrite = False,
    device: Device = None,
):
    """Grade generated images with CLIP image/text scores against each prompt's baseline (PASS/FAIL)."""
    from rich.console import Console
    from rich.table import Table

    from difflab.personalize.score import run_score

    results = run_score(prompts, refs, gen, clip, out, device=device, top_k=top_k, overwrite=overwrite)
    table = Table(title="CLIP grading")
    for col in ("concept", "prompt", "eval prompt", "image", "text", "baseline", "result"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.key,
            str(r.prompt_idx),
            r.eval_prompt,
            f"{r.image_score:.2f}",
            f"{r.text_score:.2f}",
            f"{r.baseline_image:g} / {r.baseline_text:g}",
            "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]",
        )
    Console().print(table)
    n_pass = sum(r.passed for r in results)
    typer.echo(f"{n_pass}/{len(results)} prompts pass; report: {Path(out) / 'report.html'}")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/personalize-demo"), "--out", help="Output folder (report.html, metrics.json)."),
    stack: Optional[Path] = typer.Option(
        None,
        "--stack",
        help="A mini-SD stack (difflab minisd build); default <out>/minisd, unpacked from the stack difflab ships.",
    ),
    from_scratch: bool = typer.Option(
        False, "--from-scratch", help="Build <out>/minisd with `difflab minisd build`'s defaults instead of unpacking."
    ),
    ti_steps: int = typer.Option(DemoConfig.ti_steps, "--ti-steps", min=1, help="Textual-inversion steps."),
    ti_captions: bool = typer.Option(
        DemoConfig.ti_captions,
        "--ti-captions/--ti-templates",
        help="Train each token on its reference images' own captions (naming the digit), or on the style templates.",
    ),
    seed: Seed = DemoConfig.seed,
    device: Device = None,
    precision: DemoPrecision = DemoConfig.precision,
    overwrite: Overwrite = False,
):
    """CLIP zero-shot, textual inversion, generation, best-of-N scoring and composition on the miniature SD + CLIP
    stack, each effect measured by the digits judges; one HTML report."""
    from difflab.demos.personalize import run_demo

    cfg = DemoConfig(
        out=str(out),
        stack=str(stack) if stack else None,
        from_scratch=from_scratch,
        ti_steps=ti_steps,
        ti_captions=ti_captions,
        seed=seed,
        device=device,
        precision=precision,
        overwrite=overwrite,
    )
    run_demo(cfg)
    typer.echo(f"report: {out / 'report.html'}")
