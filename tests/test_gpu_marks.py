"""`pytest -m gpu` (what the device scripts run) selects every test written for a GPU.

The oracle is the test files' source, read with ast: a test function decorated with one of conftest's
requires_* skips (or test_gpu.py's needs_* aliases) is a GPU test. pytest's own collection with `-m gpu`,
run in a subprocess, must list each of them.
"""
import ast
import glob
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_DECORATORS = {"requires_cuda", "requires_kernels", "requires_ssd_kernels", "needs_cuda", "needs_kernels"}


def _decorated_gpu_tests() -> set[str]:
    """{"tests/file.py::test_name"} for every test function carrying a GPU decorator."""
    found = set()
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py"))):
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                names = {d.id for d in node.decorator_list if isinstance(d, ast.Name)}
                if names & GPU_DECORATORS:
                    found.add(f"tests/{os.path.basename(path)}::{node.name}")
    return found


def test_every_gpu_decorated_test_is_selected_by_the_gpu_mark():
    want = _decorated_gpu_tests()
    files = sorted({w.split("::")[0] for w in want})
    assert "tests/test_triton_scan.py" in files and "tests/test_gpu_mamba2.py" in files   # the oracle sees them
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", *files],
                         cwd=REPO, capture_output=True, text=True, timeout=300).stdout
    selected = {line.split("[")[0] for line in out.splitlines() if "::" in line}
    missing = sorted(want - selected)
    assert not missing, f"not selected by -m gpu: {missing}"
