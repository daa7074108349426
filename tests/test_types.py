"""The typed packages type-check ([tool.mypy] in pyproject.toml lists them)."""

import subprocess
import sys

from conftest import REPO


def test_the_typed_packages_type_check():
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir",
                             str(REPO / ".mypy_cache")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
