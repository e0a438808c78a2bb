"""Throwaway service instances for tests that stop, restart or fill a service: each has its own data directory
and a free port, and is removed afterwards. The machine's own services are never touched."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    """A redis-server for one test, with a password; `persistent=False` keeps nothing on disk, so a restart loses
    every queued message (a broker set up without AOF)."""

    def __init__(self, root: Path, persistent: bool = True):
        self.root, self.port, self.persistent = root, free_port(), persistent
        self.password = "rd-" + uuid.uuid4().hex[:12]
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.proc = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self):
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
             *aof, "--save", "", "--dir", str(self.root)],
            stdout=open(self.root / "redis.log", "a"), stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # SIGTERM: redis flushes its append-only file and exits
            self.proc.wait(timeout=20)

    def restart(self, down_s: float = 2.0):
        self.stop()
        time.sleep(down_s)
        self.start()


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class OwnPostgres:
    """A PostgreSQL cluster for one test: initdb into a temporary directory, its own port and socket directory,
    trust authentication on loopback. Run as the `postgres` user when the tests run as root (initdb refuses root)."""

    def __init__(self):
        self.bin = pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="reco-pg-"))
        self.data, self.port = self.root / "data", free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    def _run(self, tool: str, *args: str, timeout: int = 120) -> None:
        cmd = [str(self.bin / tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)

    def url(self, db: str = "postgres", auth: str = "postgres") -> str:
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "pg.log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_db(self, name: str) -> None:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)


def require(what: str, found: bool) -> None:
    """Skip (with the reason) where a server binary is missing; in CI, where `.ci/run` installs them, fail."""
    import pytest

    if not found:
        if os.environ.get("CI"):
            raise RuntimeError(f"{what} is not installed: .ci/run installs it")
        pytest.skip(f"{what} not installed (the test starts a private instance of it)")


def private_postgres():
    """A started OwnPostgres, or a skip where PostgreSQL's server binaries are missing."""
    require("PostgreSQL server (initdb, pg_ctl)", pg_bin() is not None and (os.geteuid() != 0 or
                                                                         shutil.which("runuser") is not None))
    pg = OwnPostgres()
    pg.start()
    return pg


def private_redis(root: Path, persistent: bool = True) -> OwnRedis:
    require("redis-server", shutil.which("redis-server") is not None)
    r = OwnRedis(root, persistent=persistent)
    r.start()
    return r
