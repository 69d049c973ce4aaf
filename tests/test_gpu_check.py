"""scripts/gpu_check.sh, the one-go check for a CUDA machine, is ready to run where no GPU is: bash
parses it, and every CUDA-only test it names exists and carries the gpu marker (so a renamed test
cannot silently drop out of the GPU check)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "gpu_check.sh"


def named_tests() -> list[str]:
    block = re.search(r"^CUDA_TESTS=\((.*?)^\)", SCRIPT.read_text(), re.S | re.M)
    assert block, "CUDA_TESTS=( ... ) not found in scripts/gpu_check.sh"
    return re.findall(r'"([^"]+)"', block.group(1))


def collect_gpu_marked(*test_ids: str) -> subprocess.CompletedProcess:
    """`pytest --collect-only -m gpu` on these ids, in a child process."""
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "gpu", *test_ids], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_the_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_cuda_test_it_names_exists_and_is_marked_gpu():
    tests = named_tests()
    assert len(tests) >= 5 and len(set(tests)) == len(tests), tests
    result = collect_gpu_marked(*tests)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    collected = {line.split("[")[0] for line in result.stdout.splitlines() if "::" in line}
    assert collected == set(tests), f"not collected with the gpu marker: {sorted(set(tests) - collected)}"


def test_a_misnamed_test_is_caught():
    """The check above can fail: pytest refuses a test id that does not exist."""
    result = collect_gpu_marked("tests/test_kernels.py::test_no_such_cuda_test")
    assert result.returncode != 0
