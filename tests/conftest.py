import os
import tempfile

# Tests never reach a model hub: every model is built from a config with random weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Precision choices timed during the tests go to a throw-away cache, not the user's.
os.environ["DIFFLAB_CACHE"] = tempfile.mkdtemp(prefix="difflab-test-cache-")
