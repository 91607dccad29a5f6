"""The layer contracts (pyproject.toml, [tool.importlinter]) hold, and catch a violation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture()
def tree_copy(tmp_path: Path) -> Path:
    for name in ("recap", "producer", "workers"):
        shutil.copytree(
            REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "_bundled")
        )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is in the test extra")
def test_the_layers_are_kept(tree_copy):
    result = lint_imports(tree_copy)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is in the test extra")
@pytest.mark.parametrize(
    ("module", "violation", "contract"),
    [
        ("producer/jobs.py", "import workers.daemon", "never import each other"),
        ("recap/store.py", "import producer.jobs", "The core knows no caller"),
        ("workers/daemon.py", "import recap.cli", "Nothing below the command line"),
        ("recap/dispatch.py", "import torch", "never import torch"),
    ],
)
def test_a_violation_even_inside_a_function_breaks_the_check(tree_copy, module, violation, contract):
    path = tree_copy / module
    if not path.exists():  # a module that became a package
        path = path.with_suffix("") / "__init__.py"
    path.write_text(path.read_text() + f"\n\ndef _sneaky():\n    {violation}\n")
    result = lint_imports(tree_copy)
    assert result.returncode != 0
    assert contract in " ".join(result.stdout.split()), result.stdout
