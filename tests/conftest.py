"""Test session set-up shared by every folder: it runs before any test module is imported."""

import os

from deployments import serve_env
from tests.support import ROOT, RAY

# Ray workers inherit this, so replicas can import test-only engines from tests/.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
serve_env.apply()  # before anything imports ray.serve, as `make serve` runs it


def pytest_sessionfinish(session, exitstatus):
    RAY.release()
