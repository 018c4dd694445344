"""The module's log, in the WSOP format (user guide 3.2.3), to file, stdout and syslog.

Levels: 0 None, 1 Fatal, 2 Error, 3 Warning, 4 Debug1, 5 Debug3, 6 Debug9; a message at level L is
written when L <= LOGLEVEL. Each line starts with

    [yyyy-mm-dd hh:mm:ss] <pid> <LEVEL> <session handle> <library>: message

where <library> is the name of the file the host loaded the module as, without ".so"
(libpkcs11webservices when loaded as libpkcs11webservices.so, the WSOP name; libpkcs11ws by
default and outside a host), and at DEBUG9 the thread ID follows the PID. The session handle
is the one the calling thread works for (SESSION, set by the core before it reaches
the provider; 0 outside a session). The log is off until configure() is called, and the level
check is one comparison, so callers on the hot path pay nearly nothing when it is off.

Lines are written with one os.write() each: appends from several processes do not interleave, and
nothing is buffered that a fork() could duplicate. There is deliberately no helper that formats a
request or response body: PINs, passphrases, key material and plaintext are never logged.
"""

from __future__ import annotations

import _thread  # not threading (start-up: pkcs11ws/_lite.py)
import time

from pkcs11ws import _os as os  # not os itself: start-up cost (pkcs11ws/_os.py)
from pkcs11ws._lite import WeakSet, suppress
from pkcs11ws.config import Config, log_settings

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:  # annotations only: typing stays off the start-up path (test_startup_imports)
    from typing import Any, Final

NONE, FATAL, ERROR, WARNING, DEBUG1, DEBUG3, DEBUG9 = range(7)
LEVEL_NAMES: Final = ("NONE", "FATAL", "ERROR", "WARNING", "DEBUG1", "DEBUG3", "DEBUG9")
LIBRARY_NAME: Final = "libpkcs11ws"
# syslog's priority per level (LOG_DEBUG, LOG_CRIT, LOG_ERR, LOG_WARNING, then LOG_DEBUG),
# filled in when syslog is first opened: the syslog extension is imported only then (loading
# it cost every process that loads the module ~0.3 ms of start-up).
_SYSLOG_PRIORITY: list[int] = []
# Paths we already complained about on stderr (warn once per process and path).
_warned_paths: set[str] = set()
# Every Logger, so the fork hook can renew their locks.
_loggers: WeakSet[Logger] = WeakSet()
# The PKCS#11 session each thread is working for (its `session`; the core sets it directly
# before it calls the provider, set_session() is the same for Python callers).
SESSION = _thread._local()


def set_session(handle: int) -> None:
    """Name the session the calling thread works for (0: none); its log lines carry it."""
    SESSION.session = handle


def _one_line(msg: str) -> str:
    # A message never spans lines: a newline inside could forge a log entry.
    if "\n" in msg or "\r" in msg:
        return msg.replace("\r", "\\r").replace("\n", "\\n")
    return msg


class Logger:
    """Thread-safe writer of WSOP-format log lines; LOG is the module's one instance."""

    def __init__(self) -> None:
        # A plain attribute, not a property: the per-operation path reads it.
        self.level = NONE
        self._fd = -1
        self._path = ""
        self._stdout = False
        self._syslog = False
        self._lock = _thread.allocate_lock()
        _loggers.add(self)

    # -- configuration --------------------------------------------------------------------

    def configure(self, cfg: Config) -> None:
        """Apply LOGLEVEL, LOGFILEPATH, LOGSTDOUT and LOGSYS (called by C_Initialize)."""
        self.apply(cfg.loglevel, cfg.logfilepath, cfg.logstdout, cfg.logsys)

    def apply(self, level: int, path: str, stdout: bool, use_syslog: bool) -> None:
        """The four log settings, however they were obtained."""
        with self._lock:
            self.level = NONE
            if self._fd >= 0 and (path != self._path or level == NONE):
                self._close_fd()
            if level > NONE and self._fd < 0:
                self._open(path)
            self._stdout = stdout
            want_syslog = use_syslog and level > NONE
            if want_syslog and not self._syslog:
                import syslog

                if not _SYSLOG_PRIORITY:
                    debug = syslog.LOG_DEBUG
                    _SYSLOG_PRIORITY[:] = (debug, syslog.LOG_CRIT, syslog.LOG_ERR,
                                           syslog.LOG_WARNING, debug, debug, debug)  # fmt: skip
                syslog.openlog(_library_name(), syslog.LOG_PID, syslog.LOG_USER)
            elif self._syslog and not want_syslog:
                import syslog

                syslog.closelog()
            self._syslog = want_syslog
            self.level = level

    def _open(self, path: str) -> None:
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._path = path
        except OSError as e:
            self._fd = -1
            self._path = ""
            if path not in _warned_paths:
                _warned_paths.add(path)
                with suppress(OSError):
                    os.write(
                        2,
                        f"{_library_name()}: WARNING: cannot open log file {path}: {e.strerror}; "
                        "logging to it is disabled\n".encode(errors="replace"),
                    )

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with suppress(OSError):
                os.close(self._fd)
        self._fd = -1
        self._path = ""

    def close(self) -> None:
        """Stop logging and release the file and syslog (C_Finalize)."""
        with self._lock:
            self.level = NONE
            self._close_fd()
            if self._syslog:
                import syslog

                syslog.closelog()
            self._syslog = False
            self._stdout = False

    def _after_fork_child(self) -> None:
        # Another thread may have held the lock at fork(); the child has only this thread.
        self._lock = _thread.allocate_lock()

    # -- writing --------------------------------------------------------------------------

    def enabled(self, level: int) -> bool:
        return level <= self.level

    def log(self, level: int, msg: str, session: int = 0) -> None:
        if level > self.level or level <= NONE:
            return
        if not session:
            session = getattr(SESSION, "session", 0)
        now = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        name = LEVEL_NAMES[level]
        lib = _library_name()
        if level == DEBUG9:
            head = f"{os.getpid()} {_thread.get_native_id()} {name} {session} {lib}"
        else:
            head = f"{os.getpid()} {name} {session} {lib}"
        body = f"{head}: {_one_line(msg)}"
        data = f"[{now}] {body}\n".encode(errors="replace")
        with self._lock:
            if self._fd >= 0:
                with suppress(OSError):
                    os.write(self._fd, data)
            if self._stdout:
                with suppress(OSError):
                    os.write(1, data)
            if self._syslog:
                import syslog  # imported by configure(): a dict lookup here

                # syslog stamps its own time; it gets the rest of the line unchanged.
                syslog.syslog(_SYSLOG_PRIORITY[level], body)

    def fatal(self, msg: str, session: int = 0) -> None:
        if self.level >= FATAL:
            self.log(FATAL, msg, session)

    def error(self, msg: str, session: int = 0) -> None:
        if self.level >= ERROR:
            self.log(ERROR, msg, session)

    def warning(self, msg: str, session: int = 0) -> None:
        if self.level >= WARNING:
            self.log(WARNING, msg, session)

    def debug1(self, msg: str, session: int = 0) -> None:
        if self.level >= DEBUG1:
            self.log(DEBUG1, msg, session)

    def debug3(self, msg: str, session: int = 0) -> None:
        if self.level >= DEBUG3:
            self.log(DEBUG3, msg, session)

    def debug9(self, msg: str, session: int = 0) -> None:
        if self.level >= DEBUG9:
            self.log(DEBUG9, msg, session)


LOG: Final = Logger()
_loaded_as: list[str] = []


def _library_name() -> str:
    """The name the host loaded the module's file as (a symlink keeps its own name), found
    once, on the first line written: the loaded objects whose file is the built loader, or a
    copy of it (an install tree's lib/libpkcs11webservices.so)."""
    if _loaded_as:
        return _loaded_as[0]
    name = LIBRARY_NAME
    with suppress(Exception):  # best effort: the log must never fail for its header
        name = _find_loaded_name() or LIBRARY_NAME
    _loaded_as.append(name)
    return name


def _find_loaded_name() -> str | None:
    ours = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native", "libpkcs11ws.so")
    try:
        st = os.stat(ours)
    except OSError:
        return None
    target = (st.st_dev, st.st_ino)
    content: list[bytes] = []

    def same_file(path: str, s: os.stat_result) -> bool:
        if (s.st_dev, s.st_ino) == target:
            return True
        if s.st_size != st.st_size or not path.endswith(".so"):
            return False
        if not content:
            with open(ours, "rb") as f:
                content.append(f.read())
        with open(path, "rb") as f:
            return f.read() == content[0]

    for raw in _loaded_objects():
        path = os.fsdecode(raw)
        with suppress(OSError):
            if same_file(path, os.stat(path)):
                base = os.path.basename(path)
                return base[:-3] if base.endswith(".so") else base
    return None


def _loaded_objects() -> list[bytes]:
    """The loaded shared objects' names as they were loaded (dl_iterate_phdr: a symlink keeps
    its own name). Inside the module the core lists them (ctypes costs ~3 ms at start-up)."""
    import sys

    core = sys.modules.get("pkcs11ws._native.core")
    if core is not None:
        names: list[bytes] = core.loaded_objects()
        return names
    import ctypes  # a Python program using the log without the module

    class DlPhdrInfo(ctypes.Structure):
        _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p)]

    callback_t = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(DlPhdrInfo), ctypes.c_size_t, ctypes.c_void_p
    )
    found: list[bytes] = []

    def visit(info: Any, size: int, data: object) -> int:
        raw = info.contents.name
        if raw:
            found.append(raw)
        return 0

    libc = ctypes.CDLL(None)
    libc.dl_iterate_phdr(callback_t(visit), None)
    return found


def report_config_error(message: str, config_path: str | None) -> None:
    """Write why C_Initialize refused a configuration to the log that configuration names.

    The log settings come from the refused file and the environment as far as they are valid
    (defaults otherwise), so the reason also reaches the log file, stdout or syslog the
    administrator looks at, not only the host's stderr.
    """
    level, path, stdout, use_syslog = log_settings(config_path)
    if level < FATAL:
        return
    logger = Logger()
    try:
        logger.apply(level, path, stdout, use_syslog)
        # FATAL: the module cannot work at all, so even LOGLEVEL 1 says why.
        logger.fatal(message)
    finally:
        logger.close()


def close() -> None:
    """Close the module's log (C_Finalize)."""
    LOG.close()


def _after_fork_child() -> None:
    for logger in list(_loggers):
        logger._after_fork_child()


os.register_at_fork(after_in_child=_after_fork_child)
