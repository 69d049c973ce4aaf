"""Stage a datastore under a temporary sibling name and publish it with one rename.

A reader sees either the old datastore, the new one, or nothing, never a half-written directory.
Replacing an existing datastore (`force`) moves the old one aside first (rename), renames the new
one in, then deletes the old one; `os.replace` cannot replace a non-empty directory directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from datastore_tools.errors import DatastoreToolError

log = logging.getLogger(__name__)


def check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise DatastoreToolError(f"{output} already exists; choose another output or pass --force to replace it")


def publish(stage: Path, output: Path, force: bool) -> None:
    """Rename the complete `stage` directory onto `output`."""
    check_output(output, force)
    old = None
    if output.exists():
        old = output.with_name(f"{output.name}.old-{secrets.token_hex(4)}")
        os.replace(output, old)
    os.replace(stage, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(output: Path, force: bool) -> Iterator[Path]:
    """A fresh `<output>.partial-<random>` directory, published on success and removed on failure."""
    output = Path(output)
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = output.with_name(f"{output.name}.partial-{secrets.token_hex(4)}")
    stage.mkdir()
    try:
        yield stage
        publish(stage, output, force)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def work_dir_for(output: Path) -> Path:
    """Where a build of `output` keeps its resumable work (shards, key.json) until it publishes."""
    return output.with_name(output.name + ".building")


def prepare_work_dir(work: Path, key: str) -> Path:
    """`work/shards` holding only shards made under `key`: a build resumes from the shards of an
    interrupted build with the same inputs and arguments (the key) and discards any others."""
    key_file = work / "key.json"
    if work.exists():
        previous = None
        try:
            previous = json.loads(key_file.read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            pass  # missing, or cut short by a kill: the shards cannot be trusted to match
        if previous != key:
            log.warning("discarding %s: it belongs to a build with other inputs or arguments", work)
            shutil.rmtree(work)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: a kill leaves the old key.json or the new one, never a cut-short
    # file (which would be read as "another build" and discard finished shards, or worse).
    partial = key_file.with_suffix(".json.tmp")
    partial.write_text(json.dumps({"key": key}))
    os.replace(partial, key_file)
    return work / "shards"
