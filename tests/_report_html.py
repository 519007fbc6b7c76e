"""Reads back a report written by `difflab.report.HtmlReport`: its stylesheet, and its images section by section
(a section starts at each <h2>), so tests can check what a reader sees without a browser."""

import base64
import io
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

DATA_URI = "data:image/png;base64,"


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


def read_report(path: Path) -> Report:
    parser = _Parser()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    return Report(parser.css, parser.sections, parser.links)


def assert_images_fit_page(report: Report) -> None:
    """Every image is scaled down to the text column rather than overflowing it, keeping its aspect ratio."""
    rule = report.css_rule("img")
    for declaration in ("max-width:100%", "height:auto", "box-sizing:border-box"):
        assert declaration in rule, rule
    assert all(link.startswith(DATA_URI) for link in report.links)
