"""Test session set-up shared by every folder."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Ray workers inherit this, so replicas can import test-only engines from tests/.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
