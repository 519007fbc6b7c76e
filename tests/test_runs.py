"""The run-folder policy (difflab.io.runs): foreign folders refused, --overwrite deleting only a run's own
files, --resume needing a checkpoint, staging, the lock between two real processes, odd output paths."""

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from difflab.io import open_run, refuse_existing_file
from difflab.io.runs import MARKER, OLD_LOCK
from difflab.utils import DifflabError


def write_run(path, command="digits sample", files=("a.png",)):
    with open_run(path, command) as run:
        for name in files:
            (run.dir / name).write_text(name)


def test_a_folder_with_foreign_files_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    for options in ({}, {"overwrite": True}, {"resume": True, "checkpoint": "state.pt"}):
        with pytest.raises(DifflabError, match="holds files difflab did not write here \\(config.json\\)"):
            with open_run(tmp_path, "digits train", **options):
                pass
    assert (tmp_path / "config.json").read_text() == '{"_class_name": "AutoencoderKL"}'
    assert not (tmp_path / MARKER).exists()


def test_another_commands_run_is_refused_and_its_own_is_replaced_only_when_asked(tmp_path):
    write_run(tmp_path / "run", files=("a.png", "b.png"))
    with pytest.raises(DifflabError, match="holds a run of `difflab digits sample`, not `difflab ddim sample`"):
        with open_run(tmp_path / "run", "ddim sample", overwrite=True):
            pass
    with pytest.raises(
        DifflabError, match=r"holds earlier results of `difflab digits sample` \(a.png, b.png\); .*--overwrite"
    ):
        with open_run(tmp_path / "run", "digits sample"):
            pass
    (tmp_path / "run" / "notes.txt").write_text("the user's own")  # added later: not the run's
    with open_run(tmp_path / "run", "digits sample", overwrite=True) as run:
        assert sorted(p.name for p in run.dir.iterdir() if p.name != MARKER) == ["notes.txt"]
        (run.dir / "c.png").write_text("c")
    assert json.loads((tmp_path / "run" / MARKER).read_text())["files"] == ["c.png"]


def test_resume_needs_a_checkpoint_of_the_same_command(tmp_path):
    with pytest.raises(DifflabError, match="nothing to resume from"):
        with open_run(tmp_path / "new", "digits train", resume=True, checkpoint="train_state.pt"):
            pass
    write_run(tmp_path / "run", "digits train", files=("config.json",))
    with pytest.raises(DifflabError, match="nothing to resume from \\(no train_state.pt"):
        with open_run(tmp_path / "run", "digits train", resume=True, checkpoint="train_state.pt"):
            pass
    with pytest.raises(DifflabError, match="choose one"):
        with open_run(tmp_path / "run", "digits train", resume=True, overwrite=True, checkpoint="x"):
            pass


def test_a_staged_run_that_fails_leaves_the_earlier_results_whole(tmp_path):
    with open_run(tmp_path, "digits train-classifier", staged=True) as run:
        (run.dir / "mnistm.json").write_text("old")
        (run.dir / "svhn.json").write_text("old")
    with pytest.raises(RuntimeError, match="bad svhn data"):
        with open_run(tmp_path, "digits train-classifier", overwrite=True, staged=True) as run:
            (run.dir / "mnistm.json").write_text("new")
            raise RuntimeError("bad svhn data")
    assert [(tmp_path / f).read_text() for f in ("mnistm.json", "svhn.json")] == ["old", "old"]
    with open_run(tmp_path, "digits train-classifier", overwrite=True, staged=True) as run:
        (run.dir / "mnistm.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != MARKER) == ["mnistm.json"]


HOLD = textwrap.dedent(
    """
    import sys, time
    from difflab.io import open_run
    with open_run(sys.argv[1], "digits sample"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_a_second_run_into_the_same_folder_is_refused_and_a_killed_ones_folder_taken_over(tmp_path, folder_state):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = folder_state(tmp_path)
        with pytest.raises(DifflabError, match=f"in use by process {holder.pid} \\(difflab digits sample\\)"):
            with open_run(tmp_path, "digits sample", overwrite=True):
                pass
        assert folder_state(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    with open_run(tmp_path, "digits sample", overwrite=True) as run:
        (run.dir / "a.png").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "a.png"]  # no lock file: the folder is locked


@pytest.mark.parametrize(
    "earlier, command, options",
    [
        ("foreign", "digits train", {}),
        ("foreign", "digits train", {"overwrite": True}),
        ("foreign", "digits train", {"resume": True, "checkpoint": "train_state.pt"}),
        ("foreign", "ddim export-diffusers", {"staged": True}),
        ("digits sample", "ddim sample", {"overwrite": True, "staged": True}),
        ("digits train", "digits train", {"checkpoint": "train_state.pt"}),
        ("digits make-data", "digits make-data", {"staged": True}),
        ("digits train", "digits train", {"resume": True, "checkpoint": "missing.pt"}),
    ],
)
def test_a_refused_claim_leaves_the_folder_byte_for_byte_as_it_was(tmp_path, folder_state, earlier, command, options):
    folder = tmp_path / "run"
    if earlier == "foreign":
        folder.mkdir()
        (folder / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    else:
        write_run(folder, earlier, files=("a.png", "train_state.pt"))
        (folder / ".a.png.x1.tmp").write_bytes(b"left by a killed save")  # difflab's own leftovers stay too
        (folder / OLD_LOCK).write_text("process 1 (difflab 0.x)")
    before = folder_state(folder)
    with pytest.raises(DifflabError):
        with open_run(folder, command, **options):
            pass
    assert folder_state(folder) == before


def test_an_accepted_run_clears_leftovers_and_a_resume_keeps_an_unchanged_marker(tmp_path, folder_state):
    write_run(tmp_path, "digits train", files=("train_state.pt",))
    (tmp_path / OLD_LOCK).write_text("process 1 (difflab 0.x)")
    (tmp_path / ".train_state.pt.x1.tmp").write_bytes(b"left by a killed save")
    marker = (tmp_path / MARKER).stat().st_mtime_ns
    with pytest.raises(DifflabError, match="truncated"):  # the job refuses the checkpoint after the claim
        with open_run(tmp_path, "digits train", resume=True, checkpoint="train_state.pt"):
            raise DifflabError("train_state.pt: truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "train_state.pt"]
    assert (tmp_path / MARKER).stat().st_mtime_ns == marker


def test_odd_output_paths_are_one_line_errors_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DifflabError, match="afile: is a file, not a folder"):
        with open_run(afile, "ddim export-diffusers"):
            pass
    with pytest.raises(DifflabError, match="a part of this path is a file"):
        with open_run(afile / "sub", "ddim export-diffusers"):
            pass
    with pytest.raises(DifflabError, match="already exists; choose another --json or pass --overwrite"):
        refuse_existing_file(afile, overwrite=False, option="--json")
    refuse_existing_file(afile, overwrite=True)
    with pytest.raises(DifflabError, match="--out is a folder"):
        refuse_existing_file(tmp_path, overwrite=True)


def test_a_read_only_place_is_refused_before_any_work(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):  # root writes into a chmod 555 folder, so the file system says no
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "touch", read_only)
    with pytest.raises(DifflabError, match="out: cannot write here \\(Read-only file system\\)"):
        with open_run(tmp_path / "out", "digits train"):
            pass


def test_a_full_disk_names_the_file_that_filled_it_not_the_marker(tmp_path, monkeypatch):
    import difflab.io.runs as runs

    with open_run(tmp_path, "digits train") as run:
        (run.dir / "model.safetensors").write_text("first")

    def full(run):
        raise DifflabError(f"no space left on {run.path} (writing {MARKER}); free some space and run again")

    with pytest.raises(DifflabError, match=r"\(writing model.safetensors\)"):
        with open_run(tmp_path, "digits train", resume=True, checkpoint="model.safetensors"):
            monkeypatch.setattr(runs, "_write_marker", full)  # the disk fills during the run
            raise DifflabError(f"no space left on {tmp_path} (writing model.safetensors); free some space")
