"""`datastore build` killed with SIGKILL at seeded random points (opt-in: RETROSERVE_SLOW=1).

Each run of the real CLI (a subprocess) is killed during start-up, after some embedding shards, or
as the staged datastore is being written, at a seeded random delay after its trigger. After every
kill the output path must hold nothing or a datastore that verifies; the next run of the same
command resumes. Once a datastore is published (a kill can land just after the rename), later runs
rebuild over it with `--force`, and a kill must leave the previous or the new one there, intact. A
final run completes; two `--force` rebuilds over it are then killed (mid-embedding, while staging).
RETROSERVE_BUILD_KILLS (default 4) sets how many kills come before the final run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datastore_tools.publish import work_dir_for
from datastore_tools.verify import verify_datastore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("RETROSERVE_BUILD_KILLS", "4"))
TRIGGERS = ("start-up", "shards", "staging")


def build_command(corpus_dir, tokenizer_dir, output, *extra) -> list[str]:
    return [sys.executable, "-m", "datastore_tools", "build", str(corpus_dir), "-o", str(output),
            "--model", str(tokenizer_dir), "--index", "Flat", "--shard-size", "4", "--batch-size", "4",
            "--no-progress", *extra]


def triggered(trigger: str, output: Path, shards_wanted: int) -> bool:
    work = work_dir_for(output)
    if trigger == "start-up":
        return True
    if trigger == "shards":
        return len(list((work / "shards").glob("shard-*.npy"))) >= shards_wanted if work.exists() else False
    return (work / "datastore").exists()


def run_and_kill(command, output: Path, trigger: str, delay_s: float, shards_wanted: int, log) -> str:
    """Start the build, SIGKILL it `delay_s` after `trigger`; what happened ("killed" or "finished")."""
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 170
        while not triggered(trigger, output, shards_wanted):
            if process.poll() is not None or time.monotonic() > deadline:
                return "finished" if process.returncode == 0 else f"exited {process.returncode}"
            time.sleep(0.005)
        time.sleep(delay_s)
        if process.poll() is not None:
            return "finished" if process.returncode == 0 else f"exited {process.returncode}"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        return "killed"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def assert_absent_or_sound(output: Path) -> None:
    if output.exists():
        assert verify_datastore(output) == [], f"a damaged datastore was published at {output}"


def test_a_build_killed_at_random_points_never_publishes_a_broken_datastore(corpus_dir, tokenizer_dir, tmp_path):
    rng = random.Random(7)
    output = tmp_path / "store"
    command = build_command(corpus_dir, tokenizer_dir, output)
    history = []
    with open(tmp_path / "build.log", "w") as log:
        for _ in range(KILLS):
            # Once a datastore is published, later runs rebuild over it with --force.
            force = output.exists()
            trigger = rng.choice(TRIGGERS)
            delay = rng.uniform(0, 8.0) if trigger == "start-up" else rng.uniform(0, 0.05)
            published = (output / "manifest.json").read_bytes() if force else None
            what = run_and_kill(command + (["--force"] if force else []), output, trigger, delay,
                                rng.randint(1, 4), log)
            state = ("absent" if not output.exists() else
                     "previous" if published and (output / "manifest.json").read_bytes() == published else "new")
            history.append((trigger + (" --force" if force else ""), round(delay, 3), what, state))
            assert what in ("killed", "finished"), (history, (tmp_path / "build.log").read_text()[-2000:])
            assert_absent_or_sound(output)
            if force:
                assert state != "absent", f"a --force rebuild killed at {trigger} lost the datastore: {history}"
        finished = subprocess.run(command + ["--force"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=170)
        assert finished.returncode == 0, (tmp_path / "build.log").read_text()[-2000:]
        assert verify_datastore(output) == []
        assert not work_dir_for(output).exists()

        # Rebuilds over the published datastore, killed mid-embedding and while staging.
        for trigger in ("shards", "staging"):
            published = (output / "manifest.json").read_bytes()
            what = run_and_kill(command + ["--force"], output, trigger, rng.uniform(0, 0.05), 1, log)
            state = ("absent" if not output.exists() else
                     "previous" if (output / "manifest.json").read_bytes() == published else "new")
            history.append((trigger + " --force", what, state))
            assert state != "absent", f"a --force rebuild killed at {trigger} lost the datastore: {history}"
            assert_absent_or_sound(output)
    print("kills:", history)
