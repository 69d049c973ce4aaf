"""Content fingerprints that tie a datastore to the model and tokenizer it was built with.

A chunk datastore stores token ids of the serving model's tokenizer, so a server must refuse a
datastore built with another tokenizer; a token (kNN-LM) datastore stores hidden states, so it also
needs the same weights. Both fingerprints are sha256 over file contents, never over paths or times.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

# Files that define a tokenizer's behaviour, hashed in this order when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def _hash_files(paths: list[Path], digest: "hashlib._Hash",
                canonical: Callable[[Path], bytes | None] = lambda path: None) -> None:
    """Name, NUL, then contents of each file; `canonical` may give a file's contents in a
    normalised form instead (None: hash the bytes as they are)."""
    for path in paths:
        digest.update(path.name.encode())
        digest.update(b"\0")
        normalised = canonical(path)
        if normalised is not None:
            digest.update(normalised)
            continue
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)


RUNTIME_CONFIG_KEYS = frozenset({"local_files_only", "is_local", "cache_dir", "token", "_commit_hash",
                                 "name_or_path", "trust_remote_code"})
"""Keys transformers writes into tokenizer_config.json from how it was loaded (e.g. HF_HUB_OFFLINE
sets local_files_only), not from what the tokenizer does; they must not change the fingerprint."""


def _canonical_tokenizer_config(path: Path) -> bytes | None:
    if path.name != "tokenizer_config.json":
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    behaviour = {key: value for key, value in config.items() if key not in RUNTIME_CONFIG_KEYS}
    return json.dumps(behaviour, sort_keys=True, separators=(",", ":")).encode()


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the tokenizer files of a model directory (prefixed 'tok-sha256:').

    tokenizer_config.json is hashed as canonical JSON without RUNTIME_CONFIG_KEYS, so the same
    tokenizer saved in two environments has one fingerprint."""
    model_dir = Path(model_dir)
    files = [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not files:
        raise FileNotFoundError(
            f"{model_dir} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); "
            "prepare the model with `retroserve model prepare`"
        )
    digest = hashlib.sha256()
    _hash_files(files, digest, canonical=_canonical_tokenizer_config)
    return "tok-sha256:" + digest.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the weight files and the tokenizer of a model directory (prefixed 'model-sha256:')."""
    model_dir = Path(model_dir)
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise FileNotFoundError(f"{model_dir} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    _hash_files(weights, digest)
    digest.update(tokenizer_fingerprint(model_dir).encode())
    return "model-sha256:" + digest.hexdigest()
