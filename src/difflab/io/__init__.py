"""Every file difflab reads or writes goes through here: one safe reader per kind (checkpoints, JSON, text,
images, tables) that turns any failure into `<path>: <what is wrong>`, and atomic writers."""

from difflab.io.cards import set_card_metrics, write_model_card
from difflab.io.checkpoints import (
    check_state_dict,
    loader_error,
    read_safetensors,
    read_state_dict,
    read_tensors,
    read_torch,
    state_dict_mismatch,
)
from difflab.io.files import (
    IMAGE_SUFFIXES,
    METADATA,
    atomic_write,
    image_files,
    load_json,
    load_rgb,
    read_metadata,
    read_text,
    save_json,
    save_png,
    save_pngs,
    write_csv,
    write_metadata,
)
from difflab.io.runs import check_writable, open_run, refuse_existing_file

__all__ = [
    "set_card_metrics",
    "write_model_card",
    "IMAGE_SUFFIXES",
    "METADATA",
    "atomic_write",
    "check_state_dict",
    "check_writable",
    "image_files",
    "load_json",
    "loader_error",
    "load_rgb",
    "open_run",
    "read_metadata",
    "read_safetensors",
    "read_state_dict",
    "read_tensors",
    "read_text",
    "read_torch",
    "refuse_existing_file",
    "save_json",
    "save_png",
    "save_pngs",
    "state_dict_mismatch",
    "write_csv",
    "write_metadata",
]
