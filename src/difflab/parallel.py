"""Fixed work split between the processes of `accelerate launch` (or `torchrun`): each process takes its share of
a list the main process would walk alone, so N processes write what one writes, byte for byte.

Without a launcher (WORLD_SIZE unset or 1) this is one process and accelerate is never imported. Every launched
command ends by destroying its process group (`with Processes.launched(...)`, `end_training`) while the interpreter
is whole.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

from difflab.utils import DifflabError

T = TypeVar("T")


@dataclass
class Processes:
    index: int = 0
    count: int = 1
    device: torch.device = torch.device("cpu")  # this process's device: its own GPU when launched on several
    state: Any = None  # accelerate's PartialState when launched

    @classmethod
    def launched(cls, device: torch.device) -> Processes:
        """The processes started with this one, working on `device`: one, unless a launcher set WORLD_SIZE."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(device=device)
        from accelerate import PartialState

        state = PartialState(cpu=device.type == "cpu")
        return cls(state.process_index, state.num_processes, state.device if device.type == "cuda" else device, state)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        if self.state is None:
            return
        if exc[0] is None:
            self.wait()
        self.state.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's items: every `count`-th, starting at its index, so the shares interleave evenly."""
        return list(items[self.index :: self.count])

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def agree(self, what: str, value: Any) -> None:
        """Refuse, on every process, when the processes were given different `value`s (say, output folders)."""
        values = self.gather([value])
        if any(v != values[0] for v in values):
            shown = "; ".join(f"process {i}: {v}" for i, v in enumerate(values))
            raise DifflabError(
                f"the {self.count} processes disagree on {what} ({shown}); launch them with the same options"
            )

    def gather(self, items: list[T]) -> list[T]:
        """Every process's `items`, concatenated in process order, on every process."""
        if self.count == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def from_main(self, value: T) -> T:
        """The main process's `value` on every process (a choice made once, such as a timed precision)."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]


def end_training(accelerator, holders: list[Any]) -> list[Any]:
    """Finish an accelerate run's trackers and destroy its process group once every process is here. `holders`, the
    objects `prepare` wrapped, come back unwrapped: a wrapped model keeps the group alive, and a group left for the
    interpreter's exit to tear down can abort the process (SIGABRT) after the work is done. Called in a `finally`
    while an exception is on its way out, it does not wait: a process that failed alone would wait forever."""
    if sys.exc_info()[0] is None:
        accelerator.wait_for_everyone()
    bare = [accelerator.unwrap_model(h) if isinstance(h, torch.nn.Module) else h for h in holders]
    accelerator.free_memory()
    accelerator.end_training()
    return bare
