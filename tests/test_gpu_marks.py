"""`pytest -m gpu` (what the device scripts run) selects every test written for a GPU.

The oracle is the test files' source, read with ast: a test function or method decorated with one of
conftest's requires_* skips (or test_gpu.py's needs_* aliases), by name or as an attribute, is a GPU test.
pytest's own collection with `-m gpu`, run in a subprocess, must list each of them; and a module's
`pytestmark` and a parameter's `marks=` must count too (a scratch test file below).
"""
import ast
import glob
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_DECORATORS = {"requires_cuda", "requires_kernels", "requires_ssd_kernels", "needs_cuda", "needs_kernels"}


def _name(node) -> str | None:
    if isinstance(node, ast.Call):
        node = node.func
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _decorated_gpu_tests() -> set[str]:
    """{"tests/file.py::test_name"} (methods: "tests/file.py::Class::test_name") carrying a GPU decorator."""
    found = set()
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py"))):
        tree = ast.parse(open(path, encoding="utf-8").read())
        scopes = [(f"tests/{os.path.basename(path)}", tree.body)]
        scopes += [(f"tests/{os.path.basename(path)}::{c.name}", c.body) for c in tree.body
                   if isinstance(c, ast.ClassDef)]
        for prefix, body in scopes:
            for node in body:
                if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")
                        and {_name(d) for d in node.decorator_list} & GPU_DECORATORS):
                    found.add(f"{prefix}::{node.name}")
    return found


def _collect_gpu(args, cwd, env=None):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                           "-m", "gpu", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode in (0, 5), proc.stdout[-2000:] + proc.stderr[-2000:]   # 5: nothing selected
    return {line.split("[")[0] for line in proc.stdout.splitlines() if "::" in line}, proc


def test_every_gpu_decorated_test_is_selected_by_the_gpu_mark():
    want = _decorated_gpu_tests()
    files = sorted({w.split("::")[0] for w in want})
    assert "tests/test_triton_scan.py" in files and "tests/test_gpu_mamba2.py" in files   # the oracle sees them
    selected, proc = _collect_gpu(files, REPO)
    missing = sorted(want - selected)
    assert not missing, f"not selected by -m gpu: {missing}\n{proc.stderr[-2000:]}"


def test_module_pytestmark_and_param_marks_count_as_gpu(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    (tmp_path / "test_module.py").write_text(textwrap.dedent("""
        from tests.conftest import requires_kernels

        pytestmark = requires_kernels

        def test_module_marked():
            pass
    """))
    (tmp_path / "test_param.py").write_text(textwrap.dedent("""
        import pytest
        from tests.conftest import requires_cuda

        @pytest.mark.parametrize("x", [pytest.param(1, marks=requires_cuda), 2])
        def test_param_marked(x):
            pass
    """))
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = _collect_gpu(["test_module.py", "test_param.py"], tmp_path, env)[1]
    listed = {line for line in proc.stdout.splitlines() if "::" in line}
    assert listed == {"test_module.py::test_module_marked", "test_param.py::test_param_marked[1]"}, proc.stdout
