"""Environment knobs, all prefixed SWITCHYARD_. Read once at import."""

import os

# Log level of the project's own loggers in every process (router, replicas, scripts).
LOG_LEVEL = os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO")
