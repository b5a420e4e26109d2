"""Environment knobs, all prefixed SWITCHYARD_. Read once at import."""

import os
from pathlib import Path

# Where the embedded default models are built (once per machine and build version).
CACHE_DIR = Path(os.environ.get("SWITCHYARD_CACHE", Path.home() / ".cache" / "switchyard")).expanduser()
# Log level of the project's own loggers in every process (router, replicas, scripts).
LOG_LEVEL = os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO")
