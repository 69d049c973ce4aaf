"""Where retroserve keeps what it builds: one cache root, overridable by RETROSERVE_HOME.

Every default artefact path is derived here so the CLI, the server, tests and benchmarks agree.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct-gptq-4bit"
DEFAULT_DATASTORE_NAME = "pydoc-topics"


def cache_root() -> Path:
    """Root of everything retroserve builds (models, datastores); ~/.cache/retroserve by default."""
    return Path(os.environ.get("RETROSERVE_HOME", Path.home() / ".cache" / "retroserve"))


def models_dir() -> Path:
    return cache_root() / "models"


def datastores_dir() -> Path:
    return cache_root() / "datastores"


def default_model_dir() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME


def default_datastore_dir() -> Path:
    return datastores_dir() / DEFAULT_DATASTORE_NAME
