"""The package stands on its own: the wheel, installed into a fresh environment outside the source tree, loads the
CLIP tokenizer and unpacks the shipped miniature stack with nothing else installed beside torch and difflab's
dependencies."""

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import sys, difflab
    from difflab.clip.tokenizer import load_clip_tokenizer
    from difflab.minisd.prebuilt import unpack
    assert sys.argv[1] in difflab.__file__, difflab.__file__  # the wheel's copy, not the source tree's
    assert load_clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    stack = unpack(sys.argv[2])
    assert (stack / "sd" / "model_index.json").is_file() and (stack / "clip" / "config.json").is_file()
    print("ok", difflab.__version__)
    """
)


def test_the_wheel_runs_outside_the_source_tree(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    tmp_path / "dist", ROOT], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("difflab-*.whl")
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())  # fmt: skip
    # torch and the other dependencies come from this environment as plain paths, so its editable difflab does not.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, wheel],
                   check=True, capture_output=True)  # fmt: skip
    done = subprocess.run([python, "-c", CHECK, str(site), str(tmp_path / "stack")], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok ")
