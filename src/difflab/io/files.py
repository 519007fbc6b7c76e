"""Plain files: atomic writers (a crash never leaves a half-written file under the real name) and safe readers
for JSON, text, CSV tables and images."""

from __future__ import annotations

import csv
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from difflab.utils import DifflabError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_full(e: BaseException) -> bool:
    """ENOSPC, or the way torch's zip writer ("unexpected pos", "file write failed") and safetensors' writer
    ("No space left on device (os error 28)") report it."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return "unexpected pos" in text or "file write failed" in text or "No space left" in text


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)` then rename onto `path`, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as e:  # any writer: OSError, torch's RuntimeError, safetensors' SafetensorError
        if disk_full(e):
            raise DifflabError(f"no space left on {path.parent} (writing {path.name}); free some space and run again")
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    return atomic_write(path, write)


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    return atomic_write(path, write)


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one (H,W,C) uint8 array as PNG, atomically."""
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def save_pngs(items: Sequence[tuple[Path, np.ndarray]], workers: int = 2, desc: str | None = None) -> None:
    """Write many (path, (H,W,C) uint8 array) pairs as PNG in threads (encoding and writing release the GIL).
    Not atomic one by one: callers write the index that lists the files (a CSV, a JSONL) last, atomically."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    def write(item: tuple[Path, np.ndarray]) -> None:
        try:
            Image.fromarray(item[1]).save(item[0], format="PNG")
        except OSError as e:
            if disk_full(e):
                raise DifflabError(f"no space left on {item[0].parent}; free some space and run again") from None
            raise

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(tqdm(pool.map(write, items), total=len(items), desc=desc, unit="img", leave=False, disable=desc is None))


def read_text(path: str | os.PathLike, what: str = "text") -> str:
    """A UTF-8 text file (a leading byte-order mark, as spreadsheet programs write, is dropped); missing, a folder,
    unreadable or binary is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"{path}: {what} file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DifflabError(f"{path}: {what} file is not UTF-8 text") from None
    except OSError as e:
        raise DifflabError(f"{path}: cannot read the {what} file ({e.strerror or e.__class__.__name__})") from None


def load_json(path: str | os.PathLike, what: str = "JSON") -> Any:
    path = Path(path)
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise DifflabError(f"{path}: not valid JSON ({e})") from None


def load_rgb(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image as RGB; a missing, corrupt or non-image file raises a one-line DifflabError."""
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DifflabError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    if size is not None and im.size != size:
        raise DifflabError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]}")
    return im


def image_files(folder: str | os.PathLike, what: str | None = "image") -> list[Path]:
    """Image files directly in `folder`, sorted by name. With `what` (e.g. "reference image"), a missing
    folder or one without images is a DifflabError naming it; with what=None an empty list is returned."""
    folder = Path(folder)
    if not folder.is_dir():
        if what is None:
            return []
        raise DifflabError(f"{folder}: {what} folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files and what is not None:
        raise DifflabError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this {what} folder")
    return files


METADATA = "metadata.jsonl"  # the captions of a Hugging Face `imagefolder`: {"file_name", "text", ...} per line


def write_metadata(rows: list[dict], root: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    return atomic_write(Path(root) / METADATA, write)


def read_metadata(root: str | os.PathLike) -> list[dict]:
    """The rows of `<root>/metadata.jsonl`; a line that does not parse or lacks a field is a one-line error."""
    path = Path(root) / METADATA
    rows = []
    for line_no, line in enumerate(read_text(path, "caption").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DifflabError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("file_name"), str)
            or not isinstance(row.get("text"), str)
        ):
            raise DifflabError(f"{path}: line {line_no} needs a string 'file_name' and a string 'text'")
        rows.append(row)
    if not rows:
        raise DifflabError(f"{path}: no captioned images listed")
    return rows
