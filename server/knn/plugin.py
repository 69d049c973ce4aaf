"""vLLM general plugin: register the kNN-LM model class (server/knn/model.py) by name.

vLLM runs every `vllm.general_plugins` entry point in each of its processes (the front end that
validates the architecture, and the spawned engine process that builds the model), so this is
the supported way to make an out-of-tree class selectable with
`hf_overrides={"architectures": [KNN_ARCHITECTURE]}`. The entry point is declared in
pyproject.toml; a checkout that has not been (re)installed since lacks it, and
`ensure_registered_via_entry_point` says so before vLLM fails with a less helpful message.
The class is registered by "module:Class" string so that importing this plugin stays cheap and
does not import torch or vLLM's model code in processes that never build the model.
"""

from __future__ import annotations

ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "retroserve_knn"
ENTRY_POINT_VALUE = "server.knn.plugin:register"
from server.knn.settings import KNN_ARCHITECTURE


def register() -> None:
    """Idempotent (vLLM may call plugins several times per process)."""
    from vllm import ModelRegistry

    if KNN_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(KNN_ARCHITECTURE, "server.knn.model:KnnLlamaForCausalLM")


def entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == ENTRY_POINT_NAME and ep.value == ENTRY_POINT_VALUE
               for ep in entry_points(group=ENTRY_POINT_GROUP))


def ensure_registered_via_entry_point() -> None:
    """Raise with the fix when vLLM's engine process would not find the kNN model class."""
    if not entry_point_installed():
        raise RuntimeError(
            f"token mode needs the `{ENTRY_POINT_GROUP}` entry point `{ENTRY_POINT_NAME} = {ENTRY_POINT_VALUE}` "
            "(pyproject.toml), which this environment does not have: reinstall retroserve "
            "(`pip install -e .` / `make serve` does) so vLLM's engine process can load the kNN-LM model class"
        )
