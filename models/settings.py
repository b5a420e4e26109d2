"""Environment knobs, all prefixed SWITCHYARD_. Read once at import."""

import os
from pathlib import Path

# Log level of the project's own loggers in every process (router, replicas, scripts).
LOG_LEVEL = os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO")

# Where converted checkpoints are kept (models/checkpoints.py: a GGUF file becomes a safetensors
# directory there on first use).
CACHE_DIR = Path(os.environ.get("SWITCHYARD_CACHE", Path.home() / ".cache" / "switchyard"))
