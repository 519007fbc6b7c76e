"""Shared test set-up: offline models, a throw-away precision cache, and the fixtures every area's tests use (a
tiny random SD pipeline and CLIP folder built by the code the mini stack uses, varied test images, a reader of
difflab's HTML reports, the diffusers schedule oracle)."""

import base64
import io
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tests never reach a model hub: every model is built from a config with random weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Precision choices timed during the tests go to a throw-away cache, not the user's.
os.environ["DIFFLAB_CACHE"] = tempfile.mkdtemp(prefix="difflab-test-cache-")

DATA_URI = "data:image/png;base64,"


# ---- models ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_sd():
    """`tiny_sd(seed)`: the mini stack's SD v1 pipeline at test size (16x16 images, ~1 M parameters), random."""
    from difflab.minisd.models import MiniSDConfig, random_pipeline

    size = MiniSDConfig(
        image_size=16,
        text_width=32,
        text_layers=2,
        vision_width=32,
        vision_layers=1,
        projection_dim=32,
        vae_channels=(32, 64),
        vae_norm_groups=16,
        unet_channels=(32, 64),
        attention_head_dim=4,
    )
    return lambda seed=0: random_pipeline(size, seed)


@pytest.fixture(scope="session")
def save_tiny_clip():
    """`save_tiny_clip(path, with_tokenizer, with_processor, seed)`: a tiny random CLIP folder (transformers)."""
    return _save_tiny_clip


@pytest.fixture(scope="session")
def random_images():
    """`random_images(n, seed)`: images of varied sizes and aspect ratios."""
    return _random_images


def _save_tiny_clip(path: Path, with_tokenizer: bool = True, with_processor: bool = True, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from difflab.clip.tokenizer import load_clip_tokenizer

    layer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = CLIPConfig(
        text_config=dict(layer, vocab_size=49408),
        projection_dim=32,
        vision_config=dict(layer, image_size=32, patch_size=8),
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    if with_tokenizer:
        load_clip_tokenizer().save_pretrained(path)
    if with_processor:
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _random_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Images of varied sizes and aspect ratios: smooth colour blobs plus noise, so CLIP outputs differ."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        h, w = rng.integers(24, 80, size=2)
        base = rng.integers(0, 256, size=(1, 1, 3))
        noise = rng.normal(0, 40, size=(h, w, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return images


# ---- diffusers oracle --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def linear_spec():
    """The course's schedule in diffusers' terms: linear betas 1e-4..0.02 over 1000 steps."""
    return dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)


@pytest.fixture(scope="session")
def full_precision():
    """`full_precision(scheduler)`: a diffusers scheduler given difflab's float64 ᾱ."""
    return _full_precision


def _full_precision(scheduler):
    # diffusers keeps ᾱ in float32, and its step coefficients (1 − ᾱ_t/ᾱ_prev, ...) then lose ~1e-4 near
    # t = 0 to cancellation; ours are formed in float64. Give the oracle our float64 ᾱ (the schedules
    # themselves are compared elsewhere) so that both do exact arithmetic and any difference is a logic error.
    from difflab.schedule import NoiseSchedule

    scheduler.alphas_cumprod = NoiseSchedule.make().alphas_cumprod
    scheduler.final_alpha_cumprod = (
        torch.tensor(1.0, dtype=torch.float64)
        if scheduler.config.get("set_alpha_to_one")
        else scheduler.alphas_cumprod[0]
    )
    return scheduler


# ---- HTML reports ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def read_report():
    """`read_report(path)`: a report written by `difflab.report.HtmlReport`, read back section by section (a
    section starts at each <h2>), so tests check what a reader sees without a browser."""
    return _read_report


@pytest.fixture(scope="session")
def assert_images_fit_page():
    """`assert_images_fit_page(report)`: every image is scaled to the text column, keeping its aspect ratio."""
    return _assert_images_fit_page


@dataclass
class Figure:
    src: str
    caption: str = ""
    classes: str = ""

    def pixels(self) -> np.ndarray:
        assert self.src.startswith(DATA_URI), self.src[:40]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(self.src[len(DATA_URI) :]))).convert("RGB"))


@dataclass
class Section:
    heading: str
    figures: list[Figure] = field(default_factory=list)


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.css = ""
        self.sections = [Section("")]
        self.links: list[str] = []  # every src / href: a self-contained report has only data URIs
        self._inside: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[a] for a in ("src", "href") if a in attrs]
        if tag == "h2":
            self.sections.append(Section(""))
        if tag == "img":
            self.sections[-1].figures.append(Figure(attrs["src"], classes=attrs.get("class") or ""))
        if tag in ("style", "h2", "figcaption"):
            self._inside = tag

    def handle_endtag(self, tag):
        if tag == self._inside:
            self._inside = None

    def handle_data(self, data):
        if self._inside == "style":
            self.css += data
        elif self._inside == "h2":
            self.sections[-1].heading += data
        elif self._inside == "figcaption":
            self.sections[-1].figures[-1].caption += data


@dataclass
class Report:
    css: str
    sections: list[Section]
    links: list[str]

    def section(self, heading_start: str) -> Section:
        (found,) = [s for s in self.sections if s.heading.startswith(heading_start)]
        return found

    def css_rule(self, selector: str) -> str:
        """The declarations of `selector` (the whole rule, not a longer selector that starts the same)."""
        match = re.search(r"(?:^|[}\s])" + re.escape(selector) + r"\{([^}]*)\}", self.css)
        assert match, f"no CSS rule for {selector}"
        return match.group(1)


def _read_report(path: Path) -> Report:
    parser = _Parser()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    return Report(parser.css, parser.sections, parser.links)


def _assert_images_fit_page(report: Report) -> None:
    """Every image is scaled down to the text column rather than overflowing it, keeping its aspect ratio."""
    rule = report.css_rule("img")
    for declaration in ("max-width:100%", "height:auto", "box-sizing:border-box"):
        assert declaration in rule, rule
    assert all(link.startswith(DATA_URI) for link in report.links)


@pytest.fixture(scope="session")
def launch():
    """`launch(args, processes, script=None)`: `difflab ARGS` (or a script) in that many CPU processes through torch's
    launcher, as `accelerate launch` starts them, one thread each."""

    def run(args: list[str], processes: int, script: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        target = [str(script)] if script else ["-m", "difflab.cli"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *target, *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    return run


@pytest.fixture(scope="session")
def folder_state():
    """`folder_state(folder)`: every entry under a folder, hidden ones and the folder itself included, with its bytes
    (files), modification time and mode: what a refused command must leave exactly as it was."""

    def read(folder: Path) -> dict[str, tuple]:
        state = {".": ("folder", folder.stat().st_mtime_ns, folder.stat().st_mode)}
        for p in sorted(folder.rglob("*")):
            st = p.lstat()
            state[str(p.relative_to(folder))] = (
                p.read_bytes() if p.is_file() else "folder",
                st.st_mtime_ns,
                st.st_mode,
            )
        return state

    return read


@pytest.fixture(scope="session")
def folder_bytes():
    """`folder_bytes(folder)`: {relative path: bytes} of the results in a run folder, not the run policy's own
    hidden files (they name the process)."""

    def read(folder: Path) -> dict[str, bytes]:
        files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
        return {str(p.relative_to(folder)): p.read_bytes() for p in files if not p.name.startswith(".")}

    return read


@pytest.fixture(scope="session")
def tiny_judges():
    return _tiny_judges


def _tiny_judges(out: Path, data_root: Path | None = None, width: int = 4, cas_real: float = 0.9) -> Path:
    """Random judges in the current format: a judge per domain, the independent feature network, CAS references."""
    from difflab.digits.classifier import (
        CAS_EPOCHS,
        CAS_IMAGES,
        FEATURES_FILE,
        JUDGES_VERSION,
        ClassifierConfig,
        DigitClassifier,
        classifier_path,
        save_classifier,
    )
    from difflab.digits.data import DOMAINS

    torch.manual_seed(0)
    meta = {
        "judges_version": JUDGES_VERSION,
        "cas_real": {"images": CAS_IMAGES, "epochs": CAS_EPOCHS, "accuracy": cas_real},
    }
    if data_root is not None:
        meta["data_root"] = str(data_root)
    for d in DOMAINS:
        save_classifier(DigitClassifier(ClassifierConfig(d, width=width)), classifier_path(out, d), meta)
    save_classifier(
        DigitClassifier(ClassifierConfig("features", width=8, arch="gap")), classifier_path(out, FEATURES_FILE)
    )
    return out


@pytest.fixture(scope="session")
def tiny_app(tmp_path_factory, tiny_sd, save_tiny_clip, random_images):
    """`difflab app` served on a free port of 127.0.0.1 with tiny models: a digits model and its judges
    (`root/run/model`, `root/run/classifiers`), an SD with <new1> and <new2>, a CLIP, reference images. Has `url`
    and `root`."""
    pytest.importorskip("gradio", reason="the [app] extra is not installed")
    import socket
    from types import SimpleNamespace

    from difflab.app.models import AppConfig
    from difflab.app.ui import serve
    from difflab.digits.model import ScheduleConfig, save_model
    from difflab.io import save_png
    from difflab.nets.digits_unet import DigitsUNet, DigitsUNetConfig
    from difflab.personalize.embeddings import save_embeddings

    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    save_model(root / "run" / "model", DigitsUNet(DigitsUNetConfig(channels=(8, 16, 16), emb_dim=32)), ScheduleConfig())
    _tiny_judges(root / "run" / "classifiers", width=8)
    tiny_sd(seed=0).save_pretrained(root / "sd")
    embeds = [save_embeddings(root / f"new{i}.safetensors", {f"<new{i}>": torch.randn(1, 32)}) for i in (1, 2)]
    _save_tiny_clip(root / "clip")
    for key in ("0", "1"):
        for i, im in enumerate(_random_images(3, seed=int(key))):
            save_png(np.asarray(im.convert("RGB")), root / "refs" / key / f"{i}.png")
    cfg = AppConfig(
        root / "run" / "model", None, root / "sd", root / "clip", None, embeds, root / "refs", "cpu", "fp32"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, url = serve(cfg, port, block=False)
    yield SimpleNamespace(url=url, root=root)
    app.close()
