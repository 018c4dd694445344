"""Process plumbing for the benchmarks: free ports, CPU placement, stopping by PID, the CPU time
of a process tree (from /proc/PID/stat), and the client ports of TCP connections to a port (from
/proc/net/tcp*) to prove that a steady state makes no new connections; and the order in which
a repetition runs its variants.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

CLK_TCK = os.sysconf("SC_CLK_TCK")
_LISTEN = "0A"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Placement:
    """Which CPUs clients and servers run on (taskset -c); None: not pinned."""

    client: str | None
    server: str | None

    def describe(self) -> str:
        if self.client is None and self.server is None:
            return "not pinned"
        return f"clients on CPU {self.client}, servers on CPU {self.server} (taskset -c)"


UNPINNED = Placement(None, None)


def default_placement() -> Placement:
    """Clients on CPU 0 and every server process on CPU 1, when there are two CPUs and taskset."""
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return UNPINNED
    return Placement("0", "1")


def in_turn(variants: Sequence[T], rep: int) -> list[T]:
    """The variants in the order repetition rep runs them: forwards, then backwards (A B C,
    C B A, ...), so a steady drift of a shared machine favours none of them."""
    return list(variants) if rep % 2 == 0 else list(reversed(variants))


def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    if cpus is None:
        return list(cmd)
    return ["taskset", "-c", cpus, *cmd]


def stop_pid(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
    """SIGTERM the process we started (by its PID), wait, SIGKILL if it does not stop."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


def system_busy() -> float:
    """CPU seconds all CPUs spent busy (not idle, not iowait) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def tree_pids(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (utime + stime + reaped children's) of each process in root's tree."""
    out: dict[int, float] = {}
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # Fields 14-17 of stat (utime, stime, cutime, cstime), here indices 11-14.
            out[pid] = sum(int(x) for x in fields[11:15]) / CLK_TCK
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two tree_cpu() snapshots (processes born in between count)."""
    return sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in after.items())


def connection_ids(port: int) -> set[tuple[int, int, int]]:
    """One id per TCP socket of a connection to `port` on this host, in any state but LISTEN:
    (local port, remote port, inode). TIME_WAIT sockets (inode 0) are kept too, so a connection
    closed since the last look still shows; a new socket on a reused port has a new inode."""
    ids: set[tuple[int, int, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] == _LISTEN:
                continue
            local = int(parts[1].rsplit(":", 1)[1], 16)
            remote = int(parts[2].rsplit(":", 1)[1], 16)
            if port in (local, remote):
                ids.add((local, remote, int(parts[9])))
    return ids


def tcp_passive_opens() -> int | None:
    """The kernel's count of TCP connections accepted on this host (/proc/net/snmp
    PassiveOpens): exact, unlike socket sampling, for connections too short-lived to be seen
    (a connection closed with a reset leaves no TIME_WAIT), but it counts every server here."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Tcp:")]
    except OSError:
        return None
    if len(rows) < 2 or "PassiveOpens" not in rows[0]:
        return None
    return int(rows[1][rows[0].index("PassiveOpens")])


def new_connections(
    port: int, before: set[tuple[int, int, int]], seen: set[tuple[int, int, int]]
) -> int:
    """How many connections to `port` were opened between the snapshot `before` and the union
    of later snapshots `seen`, counted by client port: a live socket (inode != 0) that was not
    there before, or a TIME_WAIT one whose client port was not there before."""

    def client(local: int, remote: int) -> int:
        return remote if local == port else local

    old_ports = {client(lo, re) for lo, re, _ in before}
    fresh = set()
    for lo, re, inode in seen - before:
        if inode != 0 or client(lo, re) not in old_ports:
            fresh.add(client(lo, re))
    return len(fresh)


def wait_for(check: object, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    """Poll check() until true; fail early when proc exited."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready in {timeout:.0f} s")
        time.sleep(0.1)
