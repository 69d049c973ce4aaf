"""Stage a datastore under a temporary sibling name and publish it with one rename.

A reader sees either the old datastore, the new one, or nothing, never a half-written directory.
Replacing an existing datastore (`force`) moves the old one aside first (rename), renames the new
one in, then deletes the old one; `os.replace` cannot replace a non-empty directory directly.
"""

from __future__ import annotations

import contextlib
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
