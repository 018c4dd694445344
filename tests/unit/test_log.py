"""pkcs11ws.log: WSOP line format per level, DEBUG9 thread id, filtering, destinations."""

from __future__ import annotations

import os
import re
import syslog
import threading
import time
from pathlib import Path

import pytest

from pkcs11ws import log as logmod
from pkcs11ws.log import Logger
from tests.support.configs import make_cfg

LINE_RE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] (\d+) (?:(\d+) )?"
    r"(FATAL|ERROR|WARNING|DEBUG1|DEBUG3|DEBUG9) (\d+) libpkcs11ws: (.*)$"
)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def emit_all(lg: Logger) -> None:
    lg.fatal("m1", session=11)
    lg.error("m2")
    lg.warning("m3", session=3)
    lg.debug1("m4")
    lg.debug3("m5", 5)
    lg.debug9("m6", session=0)


def test_prefix_format_for_every_level(tmp_path: Path) -> None:
    lg = Logger()
    lg.configure(make_cfg(tmp_path, loglevel=6))
    before = time.time()
    emit_all(lg)
    got = lines(tmp_path / "p11.log")
    assert len(got) == 6
    expected = [
        ("FATAL", "11", "m1"),
        ("ERROR", "0", "m2"),
        ("WARNING", "3", "m3"),
        ("DEBUG1", "0", "m4"),
        ("DEBUG3", "5", "m5"),
        ("DEBUG9", "0", "m6"),
    ]
    for line, (level, session, msg) in zip(got, expected, strict=True):
        m = LINE_RE.match(line)
        assert m, line
        ts, pid, tid, lvl, sess, text = m.groups()
        stamp = time.mktime(time.strptime(ts, "%Y-%m-%d %H:%M:%S"))
        assert before - 2 <= stamp <= time.time() + 1
        assert int(pid) == os.getpid()
        assert (lvl, sess, text) == (level, session, msg)
        # Only DEBUG9 lines carry the thread id, right after the pid.
        if level == "DEBUG9":
            assert tid is not None and int(tid) == threading.get_native_id()
        else:
            assert tid is None
    lg.close()


def test_exact_line_shape(tmp_path: Path) -> None:
    lg = Logger()
    lg.configure(make_cfg(tmp_path, loglevel=6))
    lg.warning("hello world", 7)
    lg.debug9("deep", 9)
    w, d = lines(tmp_path / "p11.log")
    assert w.endswith(f"] {os.getpid()} WARNING 7 libpkcs11ws: hello world")
    assert d.endswith(f"] {os.getpid()} {threading.get_native_id()} DEBUG9 9 libpkcs11ws: deep")
    lg.close()


@pytest.mark.parametrize("level", range(7))
def test_level_filtering(tmp_path: Path, level: int) -> None:
    lg = Logger()
    lg.configure(make_cfg(tmp_path, loglevel=level))
    emit_all(lg)
    got = [LINE_RE.match(line).group(4) for line in lines(tmp_path / "p11.log")]  # type: ignore[union-attr]
    assert got == list(logmod.LEVEL_NAMES[1 : level + 1])
    for lv in range(1, 7):
        assert lg.enabled(lv) == (lv <= level)
    lg.close()


def test_default_level_is_debug1_and_off_until_configured(tmp_path: Path) -> None:
    lg = Logger()
    assert not lg.enabled(1)
    lg.fatal("nowhere")
    assert not (tmp_path / "p11.log").exists()
    lg.configure(make_cfg(tmp_path))  # LOGLEVEL default 4 in Config defaults
    assert lg.enabled(4) and not lg.enabled(5)
    lg.close()
    assert not lg.enabled(1)
    lg.fatal("after close")
    assert lines(tmp_path / "p11.log") == []


def test_stdout_destination(tmp_path: Path, capfd) -> None:
    lg = Logger()
    lg.configure(make_cfg(tmp_path, logstdout=True, loglevel=3))
    lg.warning("to both")
    lg.debug1("filtered")
    out = capfd.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].endswith("WARNING 0 libpkcs11ws: to both")
    assert lines(tmp_path / "p11.log") == out
    lg.configure(make_cfg(tmp_path, logstdout=False, loglevel=3))
    lg.warning("file only")
    assert capfd.readouterr().out == ""
    lg.close()


def test_file_appends_and_reconfigure_moves_file(tmp_path: Path) -> None:
    path = tmp_path / "p11.log"
    path.write_text("existing line\n")
    lg = Logger()
    lg.configure(make_cfg(tmp_path))
    lg.error("one")
    other = tmp_path / "other.log"
    lg.configure(make_cfg(tmp_path, logfilepath=str(other)))
    lg.error("two")
    lg.close()
    assert lines(path)[0] == "existing line"
    assert [line.rsplit(": ", 1)[1] for line in lines(path)[1:]] == ["one"]
    assert [line.rsplit(": ", 1)[1] for line in lines(other)] == ["two"]


def test_unopenable_file_warns_once_on_stderr_and_goes_on(tmp_path: Path, capfd) -> None:
    bad = str(tmp_path / "no" / "such" / "dir" / "p11.log")
    lg = Logger()
    lg.configure(make_cfg(tmp_path, logfilepath=bad, logstdout=True))
    lg.error("still logged to stdout")
    lg.configure(make_cfg(tmp_path, logfilepath=bad, logstdout=True))
    cap = capfd.readouterr()
    assert cap.err.count(f"cannot open log file {bad}") == 1
    assert "still logged to stdout" in cap.out
    lg.close()


def test_messages_stay_on_one_line(tmp_path: Path) -> None:
    lg = Logger()
    lg.configure(make_cfg(tmp_path))
    lg.error("first\nFATAL forged\r\nline")
    got = lines(tmp_path / "p11.log")
    assert len(got) == 1 and got[0].endswith(r"first\nFATAL forged\r\nline")
    lg.close()


def test_threads_do_not_interleave(tmp_path: Path) -> None:
    lg = Logger()
    lg.configure(make_cfg(tmp_path, loglevel=6))

    def work(n: int) -> None:
        for i in range(200):
            lg.debug9(f"t{n} {i} " + "x" * 100)

    ts = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    got = lines(tmp_path / "p11.log")
    assert len(got) == 800
    tids = set()
    for line in got:
        m = LINE_RE.match(line)
        assert m and m.group(6).endswith("x" * 100), line
        tids.add(m.group(3))
    assert len(tids) == 4
    lg.close()


def test_syslog_destination(tmp_path: Path, monkeypatch) -> None:
    sent: list[tuple[int, str]] = []
    opened: list[tuple[object, ...]] = []
    monkeypatch.setattr(syslog, "syslog", lambda prio, msg: sent.append((prio, msg)))
    monkeypatch.setattr(syslog, "openlog", lambda *a: opened.append(a))
    monkeypatch.setattr(syslog, "closelog", lambda: opened.append(("closed",)))
    lg = Logger()
    lg.configure(make_cfg(tmp_path, logsys=True, loglevel=6))
    emit_all(lg)
    lg.close()
    assert opened[0][0] == "libpkcs11ws" and opened[-1] == ("closed",)
    prios = [p for p, _ in sent]
    s = syslog
    assert prios == [s.LOG_CRIT, s.LOG_ERR, s.LOG_WARNING, s.LOG_DEBUG, s.LOG_DEBUG, s.LOG_DEBUG]
    assert sent[0][1] == f"{os.getpid()} FATAL 11 libpkcs11ws: m1"


def test_module_singleton_and_close(tmp_path: Path) -> None:
    assert isinstance(logmod.LOG, Logger)
    logmod.LOG.configure(make_cfg(tmp_path))
    logmod.LOG.error("via singleton")
    logmod.close()
    assert not logmod.LOG.enabled(1)
    assert len(lines(tmp_path / "p11.log")) == 1


def test_disabled_level_is_cheap(tmp_path: Path) -> None:
    lg = Logger()
    lg.configure(make_cfg(tmp_path, loglevel=1))
    n = 100_000
    t0 = time.perf_counter()
    for _ in range(n):
        lg.debug9("x")
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 2e-6, per_call
    lg.close()
