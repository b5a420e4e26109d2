"""Test session set-up shared by every folder: a private model cache, so tests build their own
tiny seeded models and never touch the user's."""

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SWITCHYARD_CACHE", tempfile.mkdtemp(prefix="switchyard-test-cache-"))
# Ray workers inherit this, so replicas can import test-only engines from tests/.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
