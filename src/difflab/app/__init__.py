"""`difflab app`: a local gradio page over every job, on the embedded defaults or the user's models
(`pip install 'difflab[app]'`). `models` finds and loads what it works on, `handlers` computes each view,
`ui` lays out the page."""

import importlib.util
import os

from difflab.utils import DifflabError

# Set before gradio is imported: nothing leaves the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def require_gradio() -> None:
    if importlib.util.find_spec("gradio") is None:
        raise DifflabError("the app needs gradio: pip install 'difflab[app]' (or run `make app`)")
