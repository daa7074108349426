"""Off-site targets for the tests, each a real daemon on 127.0.0.1: rsync --daemon and sshd
(with throwaway keys), started and stopped by fixtures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support.dicom_server import free_port, wait_for_port


class RsyncDaemon:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.module = self.root / "module"
        self.port = 0
        self.process: subprocess.Popen | None = None

    def start(self) -> "RsyncDaemon":
        self.module.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.root / "rsyncd.conf"
        conf.write_text(f"use chroot = no\nuid = root\ngid = root\n[offsite]\npath = {self.module}\n"
                        "read only = no\n")
        log = self.root / "rsyncd.log"
        self.process = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={self.port}",
                                         "--address=127.0.0.1", f"--log-file={log}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.process)
        return self

    @property
    def url(self) -> str:
        return f"rsync://127.0.0.1:{self.port}/offsite/site-a"

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        subprocess.run(["pkill", "-9", "-f", "--", f"--port={self.port}"], check=False)


class SshServer:
    """sshd on a free loopback port, accepting one throwaway key for root."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.client_key = self.root / "id_ed25519"
        self.known_hosts = self.root / "known_hosts"

    def start(self) -> "SshServer":
        self.root.mkdir(parents=True, exist_ok=True)
        host_key = self.root / "host_ed25519"
        for key in (host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        authorized = self.root / "authorized_keys"
        authorized.write_text(self.client_key.with_suffix(".pub").read_text())
        os.chmod(authorized, 0o600)
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_key.with_suffix('.pub').read_text()}")
        config = self.root / "sshd_config"
        config.write_text(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
                          f"AuthorizedKeysFile {authorized}\nPasswordAuthentication no\nPermitRootLogin "
                          "prohibit-password\nStrictModes no\nUsePAM no\nPidFile none\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        log = self.root / "sshd.log"
        self.process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                        stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process)
        return self

    def target(self, path: Path) -> str:
        return f"root@127.0.0.1:{path}"

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
