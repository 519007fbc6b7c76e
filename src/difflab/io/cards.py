"""Model cards: the `README.md` of every model folder difflab writes, in the Hugging Face format (YAML metadata
read by `huggingface_hub.ModelCard`, then prose), so a folder explains itself wherever it is copied or uploaded."""

from __future__ import annotations

import os
from pathlib import Path

CARD = "README.md"
DATASET = "difflab embedded digits (MNIST-M- and SVHN-style, generated offline)"


def write_model_card(
    folder: str | os.PathLike,
    title: str,
    summary: str,
    made: dict[str, object],
    usage: str,
    tags: list[str],
    pipeline_tag: str | None = None,
    base_model: str | None = None,
    image: str | None = None,
) -> Path:
    """Write `<folder>/README.md`: metadata (library, license, tags, pipeline tag, base model), a summary, how the
    model was made (`made`: command, seed, steps, TFLOP, machine, time, ...), an image in the folder, how to load it.
    Metrics are added by `set_card_metrics` once the model is evaluated."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="difflab",
        license="mit",
        tags=["difflab", *tags],
        pipeline_tag=pipeline_tag,
        base_model=base_model,
        model_name=title,
    )
    lines = [f"# {title}", "", summary, "", "## How it was made", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in made.items()]
    if image:
        lines += ["", f"![{title}]({image})"]
    lines += ["", "## How to load it", "", "```python", usage.strip(), "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = Path(folder) / CARD
    card.save(path)
    return path


def set_card_metrics(folder: str | os.PathLike, task: str, metrics: dict[str, float], dataset: str = DATASET) -> None:
    """Put `metrics` into the card's `model-index` (replacing earlier ones); a folder without a card is left as it
    is, a card whose metadata does not parse is rewritten around its text, and the user is told."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    path = Path(folder) / CARD
    if not path.is_file():
        return
    try:
        card = ModelCard.load(path)
    except Exception as e:  # broken YAML or model-index: huggingface_hub raises several kinds
        text = path.read_text(encoding="utf-8", errors="replace")
        body = text.split("---", 2)[2] if text.startswith("---") and text.count("---") >= 2 else text
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{path}: not a readable model card ({reason}); rewritten with fresh metadata, its text kept", flush=True)
        data = ModelCardData(library_name="difflab", license="mit", tags=["difflab"], model_name=Path(folder).name)
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    card.data.eval_results = [
        EvalResult(task_type=task, dataset_type="difflab-digits", dataset_name=dataset, metric_type=k, metric_value=v)
        for k, v in metrics.items()
    ]
    card.save(path)
