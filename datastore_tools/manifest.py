"""Assemble manifest.json: identity, parameters, counts and a sha256 per file (written last)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from artefacts.digest import sha256_file
from retriever.format import MANIFEST, SCHEMA_VERSION


def file_entries(datastore_dir: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} for every file of the datastore except the manifest."""
    datastore_dir = Path(datastore_dir)
    entries = {}
    for path in sorted(p for p in datastore_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(datastore_dir).as_posix()
        if relative == MANIFEST:
            continue
        entries[relative] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def make_manifest(
    *,
    name: str,
    tokenizer: dict,
    model: dict | None,
    embedder: dict,
    chunk_tokens: int,
    index_info: dict,
    counts: dict,
    build: dict,
    extra: dict | None = None,
) -> dict:
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "mode": "chunk",
        "name": name,
        "created_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "tokenizer": tokenizer,
        "model": model,
        "embedder": embedder,
        "chunk_tokens": chunk_tokens,
        "dims": index_info["dims"],
        "pca": index_info["pca"],
        "index": index_info["index"],
        "counts": counts,
        "build": build,
    }
    manifest.update(extra or {})
    return manifest


def write_manifest(datastore_dir: Path, manifest: dict) -> dict:
    """Fill `files` with checksums of what is on disk now, write manifest.json atomically, return it."""
    manifest = dict(manifest, files=file_entries(datastore_dir))
    path = Path(datastore_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return manifest
