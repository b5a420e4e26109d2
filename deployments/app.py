"""The application builder named by serve_config.yaml: `import_path: deployments.app:build_app`."""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.config import AppConfig
from deployments.dinov2 import ClassifierServer
from deployments.lm import LMServer
from deployments.router import Router
from deployments.trm import TRMServer
from models.settings import LOG_LEVEL

SERVERS = {"lm": LMServer, "trm": TRMServer, "classifier": ClassifierServer}


def build_app(args: dict[str, Any]) -> Application:
    """Validates `args` into AppConfig and binds one deployment per backend plus the router."""
    logging.getLogger().setLevel(LOG_LEVEL)
    cfg = AppConfig.model_validate(args)
    handles = {
        b.name: serve.deployment(SERVERS[b.kind], name=b.name, **b.deployment.options()).bind(b)
        for b in cfg.backends
    }
    return serve.deployment(Router, name="router", **cfg.router.deployment.options()).bind(cfg, handles)
