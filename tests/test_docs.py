"""The README and the guides as a reader meets them, never drifting from the code: every Python example runs (on
a tiny digits model where it names `runs/demo/model`), one that cannot is marked with its reason and still parses,
every `difflab ...` command line names a command and options that exist, and every image and link the README names
exists."""

import re
import shlex
from pathlib import Path

import pytest
import torch
import typer.main

from difflab.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: (\S[^>]*?) -->\s*$")


def blocks(language: str) -> list[tuple[str, str, str | None]]:
    """(where, code, reason it is not run) of every fenced block in `language`."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group(1) != language:
                continue
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            reason = NOT_RUN.search(before)
            line = text[: m.start()].count("\n") + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", m.group(2), reason.group(1) if reason else None))
    return found


PYTHON = blocks("python")


@pytest.fixture
def reader_folder(tmp_path, monkeypatch):
    """A working folder where `runs/demo/model` is a tiny trained-shape digits model, as after `make demo`."""
    from difflab.digits.model import ScheduleConfig, save_model
    from difflab.nets.digits_unet import DigitsUNet, DigitsUNetConfig

    torch.manual_seed(0)
    save_model(tmp_path / "runs/demo/model", DigitsUNet(DigitsUNetConfig(channels=(8, 16, 16), emb_dim=32)),
               ScheduleConfig(prediction="v_prediction"))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("where, code, reason", PYTHON, ids=[w for w, _, _ in PYTHON])
def test_python_examples_run(where, code, reason, reader_folder):
    compiled = compile(code, where, "exec")  # every block parses, run or not
    if reason is None:
        exec(compiled, {"__name__": "__docs__"})


def test_every_example_not_run_says_why():
    assert len(PYTHON) >= 10 and any(reason is None for _, _, reason in PYTHON)
    assert all(len(reason) > 10 for _, _, reason in PYTHON if reason is not None)


def command_lines() -> list[tuple[str, str]]:
    """(where, line) of every `difflab ...` invocation: in shell blocks (continuations joined) and in inline code."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group(1) not in ("bash", "sh", "console", ""):
                continue
            for line in m.group(2).replace("\\\n", " ").splitlines():
                line = re.sub(r"^.*?-m difflab\.cli ", "difflab ", line.strip())
                if line.startswith("difflab "):
                    found.append((str(page.relative_to(ROOT)), line))
        for m in re.finditer(r"`(difflab [^`]+)`", FENCE.sub("", text)):
            found.append((str(page.relative_to(ROOT)), m.group(1)))
    return found


def check_command(line: str) -> None:
    command = typer.main.get_command(app)  # typer's own click: groups are known by their `commands`
    words = [w for w in shlex.split(line, comments=True)[1:] if w not in ("...", "…")]
    for word in words:
        if hasattr(command, "commands") and not word.startswith("-"):
            assert word in command.commands, f"no command {word!r} in {line!r}"
            command = command.commands[word]
        elif word.startswith("--"):
            options = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
            assert word.split("=")[0] in options, f"{command.name} has no option {word} ({line!r})"


COMMANDS = command_lines()


@pytest.mark.parametrize("where, line", COMMANDS, ids=[f"{w}:{line[:60]}" for w, line in COMMANDS])
def test_command_lines_name_commands_and_options_that_exist(where, line):
    check_command(line)


def test_the_command_check_fails_on_a_renamed_option():
    assert len(COMMANDS) >= 30
    with pytest.raises(AssertionError, match="no option --noise-folder"):
        check_command("difflab ddim sample --noise-folder noise --ckpt UNet.pt --out out")
    with pytest.raises(AssertionError, match="no command 'sampel'"):
        check_command("difflab digits sampel --ckpt m")


def test_the_readme_is_short_and_everything_it_names_exists():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)", text)
    assert "docs/difflab.png" in targets
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]
    assert not missing, missing


def quoted_default(text: str, option: str) -> str:
    match = re.search(rf"`{re.escape(option)}` \(([^)]+)\)", text)
    assert match, f"{option} default not quoted"
    return match.group(1)


def test_judge_defaults_in_the_docs_are_the_code_defaults():
    from difflab.digits.classifier import ClassifierConfig
    from difflab.digits.classifier import ClassifierTrainConfig as JudgeConfig

    text = (ROOT / "docs" / "digits_data.md").read_text()
    assert quoted_default(text, "--epochs") == str(JudgeConfig.epochs)
    assert quoted_default(text, "--width") == str(ClassifierConfig.width)
    assert quoted_default(text, "--augment/--no-augment") == ("on" if JudgeConfig.augment else "off")


def test_the_guide_states_the_demo_work():
    from difflab.digits.classifier import ClassifierTrainConfig as JudgeConfig
    from difflab.digits.train import TrainConfig

    text = (ROOT / "docs" / "getting-started.md").read_text()
    assert f"{TrainConfig.steps:,} diffusion training steps of batch {TrainConfig.batch_size}" in text
    assert f"{JudgeConfig.epochs} epochs for each judge" in text
