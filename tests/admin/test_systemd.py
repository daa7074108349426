"""The shipped systemd units are valid for systemd itself (systemd-analyze verify)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, add_tier, run_cli, sudo_env


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


def test_install_systemd_writes_the_units_for_this_home_and_user(home, tmp_path):
    add_tier(home, "archive", f"kind: filesystem\npath: {tmp_path / 'archive-disk'}\n")
    dest = tmp_path / "units"
    result = run_cli("install-systemd", "--user", "root", "--dest", str(dest), home=home)
    written = sorted(p.name for p in dest.iterdir())
    assert written == sorted(p.name for p in (REPO / "systemd").iterdir() if p.suffix in (".service", ".timer"))
    assert "systemctl enable --now appliance.service" in result.stdout
    service = (dest / "appliance.service").read_text()
    assert f"Environment=APPLIANCE_HOME={home}" in service and "User=root" in service
    assert f"ReadWritePaths={home} -{tmp_path / 'archive-disk'}" in service
    assert "ProtectSystem=strict" in service and "NoNewPrivileges=yes" in service and "Restart=on-failure" in service
    assert "/srv/pacs-vault" not in "".join(p.read_text() for p in dest.iterdir())
    for timer in dest.glob("*.timer"):
        text = timer.read_text()
        assert "Persistent=true" in text and "RandomizedDelaySec=" in text
    analyze = shutil.which("systemd-analyze")
    units = [str(p) for p in sorted(dest.iterdir())]
    check = subprocess.run([analyze, "verify", *units], capture_output=True, text=True)
    assert check.returncode == 0 and not check.stderr.strip(), check.stderr
    refused = run_cli("install-systemd", "--user", "root", "--dest", str(tmp_path / "x"), home=home, check=False,
                      env=sudo_env("nobody"))
    assert refused.returncode == 77 and not (tmp_path / "x").exists()
