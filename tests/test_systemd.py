"""The shipped systemd units are valid for systemd itself (systemd-analyze verify)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.parametrize("unit", sorted(p.name for p in (REPO / "systemd").glob("*.service")))
def test_units_verify(unit, tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "make test installs Debian's systemd package"
    appliance = Path(sys.executable).parent / "appliance"
    for path in (REPO / "systemd").iterdir():
        text = path.read_text().replace("/opt/pacs-vault/.venv/bin/appliance", str(appliance))
        (tmp_path / path.name).write_text(text.replace("User=pacs-vault", "User=root")
                                          .replace("Group=pacs-vault", "Group=root"))
    units = [str(tmp_path / unit)]
    timer = tmp_path / unit.replace(".service", ".timer")
    if timer.exists():
        units.append(str(timer))
    result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
