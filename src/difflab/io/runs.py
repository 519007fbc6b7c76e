"""The one run-folder policy: which folder a command may write into, and what `--resume` / `--overwrite` do.

- A run folder carries a marker (MARKER) naming the difflab command that wrote it and the entries it wrote.
- A command writes only into a missing or empty folder, or one whose marker names the same command; a folder
  holding anything else (someone's model, another command's run) is refused before any work starts.
- `--overwrite` deletes only the entries the marker lists; `--resume` continues only where the command finds
  its checkpoint.
- Nothing is written before a claim is accepted, so a refused command leaves the folder byte for byte as it was.
- One run at a time: the live process holds `flock` on the folder itself (its directory file descriptor, no lock
  file), which refuses a second run; the refusal names the holding process, found in /proc/locks. The kernel drops
  the lock when a process dies, so a killed run's folder is simply taken over.
- A staged run writes into a hidden folder inside the run folder and moves its results in only once the job
  has succeeded: a failure half-way leaves earlier results whole. Training runs are not staged: their atomic,
  periodic checkpoints are what `--resume` continues from.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from difflab.utils import DifflabError

MARKER = ".difflab-run.json"
OLD_LOCK = ".difflab.lock"  # the lock file of difflab versions that locked a file, deleted when a run is accepted
STAGING = ".difflab-staging"


@dataclass
class RunFolder:
    """A folder one command writes. `dir` is where to write now: the folder itself, or its staging folder."""

    path: Path
    command: str
    dir: Path
    files: set[str] = field(default_factory=set)


def refuse_existing_file(path: str | os.PathLike, overwrite: bool, option: str = "--out") -> Path:
    """For commands that write one file: never a folder, and an existing file only with `--overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise DifflabError(f"{path}: {option} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise DifflabError(f"{path}: already exists; choose another {option} or pass --overwrite to replace it")
    check_writable(path.parent)
    return path


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and make sure files can be written there, before any work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".difflab-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except FileExistsError:
        raise DifflabError(f"{folder}: exists and is not a folder") from None
    except NotADirectoryError:
        raise DifflabError(f"{folder}: a part of this path is a file, not a folder") from None
    except OSError as e:
        raise DifflabError(f"{folder}: cannot write here ({e.strerror or e.__class__.__name__})") from None


def _results(path: Path) -> list[str]:
    """The entries of a run folder that are results: not hidden (the policy's own files, caches, a killed save's
    temporary files)."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


def _clear_leftovers(path: Path) -> None:
    """Temporary files of a killed atomic write and staging folders of a killed staged run."""
    for p in path.iterdir():
        if p.name.startswith(STAGING) or p.name == OLD_LOCK or (p.name.startswith(".") and p.name.endswith(".tmp")):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def read_marker(path: Path) -> dict | None:
    file = path / MARKER
    if not file.is_file():
        return None
    try:
        marker = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or not isinstance(marker.get("command"), str):
        raise DifflabError(f"{file}: not a readable difflab run marker; delete it if the folder is yours")
    return marker


def _write_marker(run: RunFolder) -> None:
    from difflab.io.files import save_json

    marker = {"command": run.command, "files": sorted(run.files)}
    with suppress(OSError, ValueError):
        if json.loads((run.path / MARKER).read_text(encoding="utf-8")) == marker:
            return  # unchanged: a resume refused after the claim leaves the marker as it was
    save_json(marker, run.path / MARKER)


@contextmanager
def _locked(path: Path, command: str) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise DifflabError(f"{path}: cannot open this folder ({e.strerror or e.__class__.__name__})") from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): runs are not kept apart there
            pass
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise DifflabError(
                f"{path}: in use by {_holder(path)}; wait for it to finish or choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _holder(path: Path) -> str:
    """The process holding the folder's flock, from /proc/locks (Linux), with the command its marker names."""
    try:
        marker = read_marker(path)
    except DifflabError:
        marker = None
    command = f"difflab {marker['command']}" if marker else "difflab"
    st = os.stat(path)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and inode in fields:
                return f"process {fields[fields.index(inode) - 1]} ({command})"
    return f"another process ({command})"


def _refuse(path: Path, marker: dict | None, found: list[str], command: str, can_resume: bool) -> None:
    shown = ", ".join(found[:3]) + (" ..." if len(found) > 3 else "")
    if marker is None:
        raise DifflabError(f"{path}: holds files difflab did not write here ({shown}); choose an empty or new folder")
    if marker["command"] != command:
        raise DifflabError(
            f"{path}: holds a run of `difflab {marker['command']}`, not `difflab {command}`; choose another folder"
        )
    ways = "pass --resume to continue them, " if can_resume else ""
    raise DifflabError(
        f"{path}: holds earlier results of `difflab {command}` ({shown}); choose another folder, {ways}"
        "or pass --overwrite to replace them"
    )


def _delete(path: Path, names: Iterable[str]) -> None:
    for name in names:
        p = path / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


@contextmanager
def open_run(
    path: str | os.PathLike,
    command: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint: str | None = None,
    staged: bool = False,
    keep: Iterable[str] = (),
    main: bool = True,
    check: Callable[[], object] | None = None,
) -> Iterator[RunFolder]:
    """Claim `path` for `command` (e.g. "digits train") and yield the RunFolder to write into.

    `checkpoint` names the file `--resume` continues from ("": whatever the earlier run left; None: the command
    cannot resume). With `staged`,
    results go to `run.dir` (a staging folder) and are moved in, replacing the earlier run's, only when the
    body succeeds. Entries named in `keep` (a stack the run reuses, say) are never listed, so never deleted by
    `--overwrite`. `check` runs with the folder locked, after its contents are accepted and before anything is
    written: a resume's check of its checkpoint, whose refusal then leaves the folder as it was. On processes other
    than the main one (`main=False`) nothing is checked or written here.
    """
    path = Path(path)
    if not main:
        yield RunFolder(path, command, path)
        return
    if resume and overwrite:
        raise DifflabError("--resume continues the run in the folder, --overwrite deletes it: choose one")
    if resume and checkpoint is None:
        raise DifflabError(f"`difflab {command}` cannot resume; choose another folder or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise DifflabError(f"{path}: is a file, not a folder; choose a folder for the results")
    created = not path.exists()
    if created:
        check_writable(path)
    try:
        with _locked(path, command):
            marker = read_marker(path)
            found = [name for name in _results(path) if name not in keep]
            if resume and (marker is None or marker["command"] != command or not (path / checkpoint).exists()):
                if found and (marker is None or marker["command"] != command):
                    _refuse(path, marker, found, command, True)
                raise DifflabError(f"{path}: nothing to resume from (no {checkpoint} of `difflab {command}` here)")
            if found and not resume and not (overwrite and marker is not None and marker["command"] == command):
                _refuse(path, marker, found, command, checkpoint is not None)
            if check is not None:
                check()
            # The claim is accepted: from here on the folder is the run's.
            check_writable(path)
            _clear_leftovers(path)
            earlier = set(marker["files"]) if marker else set()
            run = RunFolder(path, command, path, set(earlier) if resume else set())
            if overwrite and not staged:
                _delete(path, earlier & set(found))
            if marker is None or not staged:  # a staged run keeps the earlier marker until its results replace them
                _write_marker(run)
            if not staged:
                try:
                    yield run
                except BaseException:
                    run.files |= set(_results(path)) - (set(found) - earlier) - set(keep)
                    with suppress(Exception):  # on a full disk this fails too; the body's error is the one to tell
                        _write_marker(run)
                    raise
                run.files |= set(_results(path)) - (set(found) - earlier) - set(keep)
                _write_marker(run)
                return
            run.dir = path / f"{STAGING}-{os.getpid()}"
            run.dir.mkdir()
            try:
                yield run
                new = sorted(p.name for p in run.dir.iterdir())
                _delete(path, (earlier & set(found)) | set(new))
                for name in new:
                    os.replace(run.dir / name, path / name)
                run.files = set(new)
                _write_marker(run)
            finally:
                shutil.rmtree(run.dir, ignore_errors=True)
    except BaseException:
        if created and not _results(path):  # a run that failed before writing anything leaves no folder behind
            shutil.rmtree(path, ignore_errors=True)
        raise
