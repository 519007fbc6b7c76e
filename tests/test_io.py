"""The one safe reader: every kind of bad file gives one line naming the file and what is wrong, and no
pickled code ever runs."""

import os

import pytest
import torch

from difflab.io import load_json, read_state_dict, read_tensors, read_text, read_torch
from difflab.personalize.embeddings import read_embeddings
from difflab.utils import DifflabError


class Payload:
    """Pickles to a call that would create a marker file if the reader ever ran it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def bad_torch_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    raw = good.read_bytes()
    files = {
        "empty": b"",
        "text": b"hello",
        "garbage": b"not a checkpoint",
        "zip-junk": b"PK\x03\x04junk",
        "truncated": raw[: len(raw) // 2],
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        paths[name].write_bytes(data)
    return paths


EXPECTED = {
    "empty": "empty, truncated or corrupt",
    "text": "not a PyTorch file",
    "garbage": "not a PyTorch file",
    "zip-junk": "empty, truncated or corrupt",
    "truncated": "empty, truncated or corrupt",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_unreadable_torch_files_are_one_line_naming_the_file(tmp_path, kind):
    path = bad_torch_files(tmp_path)[kind]
    with pytest.raises(DifflabError) as info:
        read_torch(path, "training state")
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable training state: ") and EXPECTED[kind] in message
    assert "\n" not in message and "weights_only" not in message and "Errno" not in message


@pytest.mark.parametrize("skip_unknown_objects", [False, True])
def test_pickle_payload_never_runs(tmp_path, skip_unknown_objects):
    marker = tmp_path / "ran"
    path = tmp_path / "payload.pt"
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, path)
    with pytest.raises(
        DifflabError,
        match=r"payload.pt: not a readable checkpoint: it holds a pickled Python "
        r"object \(posix.mkdir\)",
    ):
        read_torch(path, skip_unknown_objects=skip_unknown_objects)
    assert not marker.exists()


class Callback:
    """Like a training framework's object saved beside the weights."""

    def __init__(self):
        self.state = {"best": 0.5}


def test_objects_beside_weights_can_be_skipped(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": Callback()}, path)
    with pytest.raises(DifflabError, match=r"it holds a pickled Python object \(test_io.Callback\)"):
        read_torch(path)
    state = read_torch(path, skip_unknown_objects=True)
    assert torch.equal(state["state_dict"]["w"], torch.ones(2)) and not hasattr(state["callbacks"], "state")


def test_missing_files_and_wrong_contents(tmp_path):
    with pytest.raises(DifflabError, match="nothing.pt: noise file not found"):
        read_torch(tmp_path / "nothing.pt", "noise")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(DifflabError, match="bad.safetensors: not a readable safetensors checkpoint"):
        read_tensors(tmp_path / "bad.safetensors")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(DifflabError, match="tensor.pt: expected a state dict"):
        read_state_dict(tmp_path / "tensor.pt")


def test_original_textual_inversion_format_loads(tmp_path):
    # Saved the way the original textual-inversion code saves it: the placeholder's vectors in a ParameterDict.
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, 8))})
    torch.save(
        {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params, "name": "<cat-toy>", "step": 3000},
        tmp_path / "learned.pt",
    )
    found = read_embeddings(tmp_path / "learned.pt")
    assert list(found) == ["<cat-toy>"] and torch.equal(found["<cat-toy>"], params["*"].detach())


def test_text_and_json_readers(tmp_path):
    with pytest.raises(DifflabError, match="templates.txt: templates file not found"):
        read_text(tmp_path / "templates.txt", "templates")
    with pytest.raises(DifflabError, match=r"folder: prompt file not found \(it is a folder\)"):
        read_text(tmp_path.joinpath("folder").mkdir() or tmp_path / "folder", "prompt")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DifflabError, match="binary.json: JSON file is not UTF-8 text"):
        load_json(tmp_path / "binary.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DifflabError, match="broken.json: not valid JSON"):
        load_json(tmp_path / "broken.json")


def test_a_full_disk_under_safetensors_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from difflab.digits.classifier import ClassifierConfig, DigitClassifier, save_classifier

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')  # fmt: skip

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DifflabError, match=r"no space left on .* \(writing mnistm.safetensors\)"):
        save_classifier(DigitClassifier(ClassifierConfig("mnistm", 8)), tmp_path / "mnistm.safetensors")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_an_error_under_a_progress_bar_starts_its_own_line_and_is_the_last(monkeypatch, capsys):
    from tqdm.auto import tqdm

    import difflab.cli as cli

    def command():
        bar = tqdm(total=10, desc="compose")
        bar.update(3)
        raise DifflabError("concept words 'zebra' do not occur in the prompt")

    monkeypatch.setattr(cli, "app", command)
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    lines = err.split("\n")
    assert "compose" in err and lines[-1] == ""  # the bar was drawn, and stderr ends with the error's newline
    assert lines[-2] == "error: concept words 'zebra' do not occur in the prompt"
