"""Zero-shot throughput: difflab's classifier vs transformers' zero-shot-image-classification pipeline.

Model: random-init CLIP with the real ViT-B/32 architecture (no weights are downloaded); 64 PNG files on disk,
20 classes, prompt "A photo of {}.". Both sides read the same files and return probabilities for every class.
The pipeline re-encodes all class prompts for every image; difflab encodes them once (and caches them on disk),
batches images through a DataLoader and runs under inference_mode.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_time, write_results  # noqa: E402

N_IMAGES, N_CLASSES, BATCH = 64, 20, 32
CLASSES = [
    "apple",
    "bear",
    "bicycle",
    "bottle",
    "bridge",
    "butterfly",
    "castle",
    "cloud",
    "crab",
    "dolphin",
    "elephant",
    "forest",
    "house",
    "lamp",
    "lion",
    "maple tree",
    "motorcycle",
    "mountain",
    "rocket",
    "sea",
]


def vit_b32(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from difflab.clip.model import default_processor
    from difflab.clip.tokenizer import load_clip_tokenizer

    config = CLIPConfig(
        vision_config=dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            patch_size=32,
            image_size=224,
        ),
        text_config=dict(
            hidden_size=512,
            num_hidden_layers=12,
            num_attention_heads=8,
            intermediate_size=2048,
            vocab_size=49408,
            max_position_embeddings=77,
        ),
        projection_dim=512,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    load_clip_tokenizer().save_pretrained(path)
    default_processor(224).save_pretrained(path)
    return path


def make_images(folder: Path) -> list[Path]:
    """Photo-sized images (varied aspect) so preprocessing costs what it costs on real data."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(N_IMAGES):
        h, w = rng.integers(240, 480, size=2)
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 256, size=(1, 1, 3))
        noise = rng.normal(0, 30, size=(h, w, 3))
        files.append(folder / f"{i % N_CLASSES}_{i}.png")
        Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).save(files[-1])
    return files


def main() -> None:
    from transformers import pipeline

    from difflab.clip.data import LabeledImages
    from difflab.clip.evaluate import ZeroShotConfig, classify_files
    from difflab.clip.model import folder_fingerprint, load_clip
    from difflab.clip.preprocess import ClipTransform
    from difflab.clip.zeroshot import ZeroShotClassifier, cached_class_embeddings
    from difflab.precision import Precision

    template = "A photo of {}."
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = vit_b32(tmp / "vit-b32")
        files = make_images(tmp / "images")
        clip = load_clip(model_dir, None)
        data = LabeledImages(files, [0] * len(files), CLASSES)
        cfg = ZeroShotConfig(images=tmp / "images", model=model_dir, out=tmp, batch_size=BATCH, num_workers=2)

        def ours(cpu_bf16: bool = False, cache: Path = tmp / "cache"):
            embeds, _ = cached_class_embeddings(
                clip.model, clip.tokenizer, CLASSES, [template], clip.device, folder_fingerprint(model_dir), cache
            )
            clf = ZeroShotClassifier(
                clip.model,
                CLASSES,
                embeds,
                ClipTransform.from_processor(clip.processor),
                clip.device,
                Precision("bf16" if cpu_bf16 else "fp32"),
            )
            return classify_files(clf, data, cfg)[1]

        pipe = pipeline(
            "zero-shot-image-classification",
            model=clip.model,
            tokenizer=clip.tokenizer,
            image_processor=clip.processor,
            device=clip.device,
        )

        def theirs():
            outs = pipe([str(f) for f in files], candidate_labels=CLASSES, hypothesis_template=template)
            return torch.tensor([[next(o["score"] for o in out if o["label"] == c) for c in CLASSES] for out in outs])

        results = {}

        def timed(name, fn, repeats):
            # Keeps the last output so predictions are compared on exactly the timed runs.
            results[name] = None

            def run():
                results[name] = fn()

            return best_time(run, repeats=repeats, warmup=0)

        t_cold = timed("cold", lambda: ours(cache=tmp / "cold-cache"), 1)  # text features computed and written
        t_ours = timed("fp32", ours, 2)
        t_bf16 = timed("bf16", lambda: ours(cpu_bf16=True), 2)  # first of the two runs warms bf16 kernels up
        pipe(str(files[0]), candidate_labels=CLASSES, hypothesis_template=template)  # warm-up
        t_pipe = timed("pipeline", theirs, 1)

        p_ours, p_bf16, p_pipe = results["fp32"], results["bf16"], results["pipeline"]
        same_fp32 = (p_ours.argmax(1) == p_pipe.argmax(1)).float().mean().item()
        same_bf16 = (p_bf16.argmax(1) == p_pipe.argmax(1)).float().mean().item()
        max_diff = (p_ours - p_pipe).abs().max().item()

    ips = lambda t: N_IMAGES / t  # noqa: E731
    rows = [
        ["transformers pipeline", round(t_pipe, 3), round(ips(t_pipe), 2), 1.0, 1.0],
        [
            "difflab, fp32, text features cached",
            round(t_ours, 3),
            round(ips(t_ours), 2),
            round(t_pipe / t_ours, 2),
            same_fp32,
        ],
        [
            "difflab, fp32, first run (text features computed)",
            round(t_cold, 3),
            round(ips(t_cold), 2),
            round(t_pipe / t_cold, 2),
            same_fp32,
        ],
        [
            "difflab, bf16 autocast (CPU), cached",
            round(t_bf16, 3),
            round(ips(t_bf16), 2),
            round(t_pipe / t_bf16, 2),
            same_bf16,
        ],
    ]
    notes = (
        f"{N_IMAGES} PNG images (240-480 px) read from disk, {N_CLASSES} classes, prompt {template!r}, "
        f"random-init ViT-B/32 architecture; difflab batch {BATCH}, 2 DataLoader workers. "
        f"'top-1 agreement' = fraction of images whose top-1 class equals the pipeline's; "
        f"max |p_difflab(fp32) - p_pipeline| = {max_diff:.2e}. "
        f"1-minute load average at the end: {os.getloadavg()[0]:.1f} (other processes share the CPU when > threads)."
    )
    write_results(
        "clip",
        ["method", "seconds", "images/s", "speed-up", "top-1 agreement"],
        rows,
        notes,
        extra={"max_abs_prob_diff_fp32": max_diff, "load_average_1min": os.getloadavg()[0]},
    )


if __name__ == "__main__":
    main()
