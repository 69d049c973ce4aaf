"""Copies of test datastores in the states older builds left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def copy_without_bm25(source: Path, target: Path) -> Path:
    """`source` copied to `target` as `datastore build --no-bm25` (or a build before BM25) writes
    it: no bm25/ folder, no "sparse" manifest entry, checksums of the rest intact."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "bm25")
    manifest = json.loads((target / "manifest.json").read_text())
    del manifest["sparse"]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("bm25/")}
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target
