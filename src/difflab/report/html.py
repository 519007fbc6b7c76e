"""Self-contained HTML reports: images are embedded as base64, so one file can be mailed or opened anywhere."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from difflab.io import atomic_write

# Images never overflow the text column: wider ones are scaled down to it (border included), keeping their aspect
# ratio. Nearest-neighbour scaling (class px) only for pixel grids: browsers use it when scaling down as well, which
# would alias the text of a shrunk matplotlib figure.
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.4em;vertical-align:top;text-align:center}
figcaption{font-size:.85em;color:#444;max-width:320px}
img{max-width:100%;height:auto;box-sizing:border-box;border:1px solid #ddd}img.px{image-rendering:pixelated}
pre{background:#f7f7f7;padding:.7em;overflow-x:auto;font-size:.85em}
.pass{color:#0a7d2c;font-weight:bold}.fail{color:#b00020;font-weight:bold}
table.kv{display:inline-table;vertical-align:top;margin-right:1.5em}caption{font-weight:bold;text-align:left}
.gallery{display:flex;flex-wrap:wrap;gap:.3em;align-items:flex-start;margin:.3em 0}
.gallery figure{margin:0}.gallery figcaption{font-size:.8em}
"""


def _png_data_uri(image: str | os.PathLike | np.ndarray | Image.Image) -> str:
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
    else:
        im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _cell(v: object) -> str:
    if isinstance(v, bool):
        return f'<span class="{"pass" if v else "fail"}">{mark(v)}</span>'
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return html.escape(", ".join(map(str, v)))
    return html.escape(str(v))


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class HtmlReport:
    """Build a report section by section, then `save(path)`."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str, level: int = 2) -> "HtmlReport":
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def text(self, text: str) -> "HtmlReport":
        self.parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def pre(self, text: str) -> "HtmlReport":
        self.parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> "HtmlReport":
        """Floats in four decimals, booleans as a green ✓ or a red ✗."""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")
        return self

    def settings(self, title: str, values: dict) -> "HtmlReport":
        """A small two-column table of a configuration (nested keys joined with dots); consecutive ones sit side
        by side."""
        shown = {k: f"{v:g}" if isinstance(v, float) else v for k, v in _flat(values).items()}
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_cell(v)}</td></tr>" for k, v in shown.items())
        self.parts.append(f'<table class="kv"><caption>{html.escape(title)}</caption>{rows}</table>')
        return self

    def gallery(self, images: Sequence, captions: Sequence[str], width: int) -> "HtmlReport":
        """A wrapping row of small images, each `width` px wide, pixel-sharp, with its caption."""
        figures = "".join(
            f'<figure><img src="{_png_data_uri(im)}" width="{width}" class="px" alt="{html.escape(c)}">'
            f"<figcaption>{html.escape(c)}</figcaption></figure>"
            for im, c in zip(images, captions)
        )
        self.parts.append(f'<div class="gallery">{figures}</div>')
        return self

    def image(self, image, caption: str = "", width: int | None = None, pixelated: bool | None = None) -> "HtmlReport":
        """`pixelated` keeps pixels sharp when the browser scales the image; by default only for an explicit
        `width` (small images blown up), since figures and photos look better smoothed."""
        if pixelated is None:
            pixelated = bool(width)
        w = f' width="{width}"' if width else ""
        px = ' class="px"' if pixelated else ""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        uri = _png_data_uri(image)
        self.parts.append(f'<figure><img src="{uri}"{w}{px} alt="{html.escape(caption)}">{cap}</figure>')
        return self

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n"
        )

    def save(self, path: str | os.PathLike) -> Path:
        text = self.render()
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
