"""Throwaway servers for the scale-out tests and the multi-replica load test: PostgreSQL from Debian's package
(``initdb`` + ``pg_ctl`` in a temporary folder, as the ``postgres`` user when run as root, which PostgreSQL refuses
to run as) and moto's S3-protocol server. Whoever starts one stops it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program (``initdb``, ``pg_ctl``) on PATH or in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    return next((str(b / name) for b in PG_BINS if (b / name).exists()), None)


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with trust authentication, in a fresh folder under the system
    temporary directory (pytest's own are private to root, where the ``postgres`` user cannot enter)."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="microverse-pg-"))
        self.data = self.root / "pgdata"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *cmd: str) -> None:
        result = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr or result.stdout}")

    def start(self) -> Postgres:
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not (initdb and pg_ctl):
            raise RuntimeError("PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)")
        if self._as:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        self._run(pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "pg.log"), "-w", "start")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def reset(self) -> None:
        """Drop every table (a fresh database for the next test)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")


class MotoS3:
    """moto's S3-protocol server (``moto_server``) on a free port, with one bucket."""

    def __init__(self, root: Path, bucket: str = "microverse"):
        self.port, self.bucket, self.log = free_port(), bucket, root / "moto.log"
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoS3:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        import httpx

        while True:
            try:
                httpx.get(self.endpoint, timeout=2)
                break
            except httpx.HTTPError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        httpx.put(f"{self.endpoint}/{self.bucket}", timeout=10).raise_for_status()
        return self

    @property
    def env(self) -> dict[str, str]:
        """What a client needs to reach it (botocore / s3fs read these)."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
