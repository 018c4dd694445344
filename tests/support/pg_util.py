"""A real PostgreSQL server for the tests: Debian's postgresql 15 binaries, its own data folder in a
temporary directory, a free port on 127.0.0.1, trust authentication for local tests only.

PostgreSQL refuses to run as root: as root the server runs as the `postgres` user
(`runuser -u postgres --`) from a temporary directory that user owns (design.md section 7).
Stopped with `pg_ctl stop -m fast`. No mock anywhere: the tests talk to this server. Also used by
bench/store_cpu.py (so it imports nothing from the tests).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

PG_VERSIONS = ("15", "16", "17")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bindir() -> Path | None:
    for v in PG_VERSIONS:
        d = Path("/usr/lib/postgresql") / v / "bin"
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


class PgServer:
    """One PostgreSQL cluster. url(db) is a libpq URL; new_database() makes an empty database."""

    def __init__(self, standby_of: PgServer | None = None) -> None:
        """A new cluster; standby_of: a streaming-replication standby of that (running)
        primary instead, cloned with pg_basebackup (promote() makes it the primary)."""
        found = bindir()
        if found is None:
            raise RuntimeError("PostgreSQL server binaries not found: run `make setup`")
        self.bin = found
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="pkcs11ws-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.root.chmod(0o700)
        if standby_of is None:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-instructions",
                "--no-sync",
            )
        else:
            # -R: standby.signal and primary_conninfo; initdb's pg_hba lets local replication in.
            self._run(
                "pg_basebackup",
                "-h",
                "127.0.0.1",
                "-p",
                str(standby_of.port),
                "-U",
                "postgres",
                "-D",
                str(self.data),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            )
        self.start()

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        cmd = [str(self.bin / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{tool} failed ({res.returncode}): {res.stderr}{res.stdout}")
        return res.stdout

    def start(self) -> None:
        # fsync off: a test cluster need not survive a power cut (commits are still WAL-logged
        # and a clean or fast shutdown keeps them).
        opts = (
            f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def promote(self) -> None:
        """Make this standby the primary (what Patroni, repmgr or pg_auto_failover do)."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    def running(self) -> bool:
        cmd = [str(self.bin / "pg_ctl"), "-D", str(self.data), "status"]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, check=False).returncode == 0

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """An empty database; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')  # a generated name, not input
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if self.running():
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
