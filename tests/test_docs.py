"""Docs must not drift from the code: defaults quoted in the docs are read back and compared."""

import re
from pathlib import Path

from difflab.digits.classifier import ClassifierConfig
from difflab.digits.classifier import ClassifierTrainConfig as JudgeConfig
from difflab.digits.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def quoted_default(text: str, option: str) -> str:
    match = re.search(rf"`{re.escape(option)}` \(([^)]+)\)", text)
    assert match, f"{option} default not quoted"
    return match.group(1)


def test_judge_defaults_in_the_docs_are_the_code_defaults():
    text = (ROOT / "docs" / "digits_data.md").read_text()
    assert quoted_default(text, "--epochs") == str(JudgeConfig.epochs)
    assert quoted_default(text, "--width") == str(ClassifierConfig.width)
    assert quoted_default(text, "--augment/--no-augment") == ("on" if JudgeConfig.augment else "off")


def test_readme_states_the_demo_work():
    text = (ROOT / "README.md").read_text()
    assert f"{TrainConfig.steps:,} diffusion training steps of batch {TrainConfig.batch_size}" in text
    assert f"{JudgeConfig.epochs} epochs for each judge" in text
