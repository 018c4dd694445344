"""HTTPS transport to the key service(s): pycurl on the system libcurl, a pool of kept-alive
easy handles per server, failover between the servers HOST lists.

design.md section 3 decides the shape: pycurl must be the build linked to Debian's libcurl (the
PyPI wheel bundles its own libcurl and OpenSSL, which crashed pkcs11-tool); this module refuses to
import otherwise. A fresh TLS handshake costs milliseconds, a reused connection tens of
microseconds, so connections are kept alive and reused.

Handles outlive threads (issue 16): each server has a pool of idle easy handles; a request takes
the most recently used idle handle of its server (its connection is the warmest), performs, and
puts it back. A new or short-lived host thread thus reuses a connected handle instead of paying
a handshake, and the number of connections per server follows the number of requests in flight,
not the number of threads ever seen. The handles share a CurlShare for DNS and TLS sessions.
Connections themselves are never shared between handles: libcurl documents that sharing the
connection cache between concurrently running threads is unsupported (CURL_LOCK_DATA_CONNECT,
curl issues #4544, #13347); a handle is used by one thread at a time.

Several servers (issue 12): one request tries the servers in turn, healthy ones first, starting
at a rotating position (this spreads the load); a connection error, a timeout or a 5xx answer
puts that server in a cool-down of COOLDOWN seconds (it is tried last until then, and the next
request after that probes it) and the request goes on to the next server at once. Every request
of the protocol is safe to send again to another replica: creates and destroys carry an
Idempotency-Key the service keeps in the shared store, the other writes set absolute values, and
the rest only read (see api.py). The caller's retry policy (MAXRETRIES, RETRYDELAY) applies when
every server failed.

Deadline (issue 10): request() takes the call's deadline; each attempt's libcurl timeout is cut
to the time left (shared between the servers still to try), so no call outlives TIMEOUT.

TLS is always verified: only the CA in AUTH is trusted (the system CA path is switched off),
the host name is checked, the client presents CERT/KEY, TLS 1.2 is the minimum.

Fork: a child must never use nor cleanly close handles inherited from its parent (closing sends a
TLS close_notify on the parent's connection). The child's handles and share are leaked on
purpose, never freed; a pid check on every request (against the pid an at-fork hook renews) and
reset_after_fork() give the child fresh pools.

C_Finalize during calls: close() (and abort(), which it starts with) makes every transfer in
progress fail at once: it shuts down the sockets the handles have open, connects in progress
included (libcurl tells us each socket it opens and closes, through CURLOPT_SOCKOPTFUNCTION /
CURLOPT_CLOSESOCKETFUNCTION, so nothing runs per request). It wakes calls sleeping between
retries, waits a bounded time for the requests in progress to end, and closes the idle handles;
a handle still in use is closed by its own thread when its request ends, never under it. Calls
cut short, and requests after close(), raise Finalizing (CKR_CRYPTOKI_NOT_INITIALIZED).
"""

from __future__ import annotations

import _thread  # not threading (start-up: pkcs11ws/_lite.py)
import sys
import time

import pycurl

from pkcs11ws import _os as os  # not os itself: start-up cost (pkcs11ws/_os.py)
from pkcs11ws._lite import Flag, WeakSet, suppress
from pkcs11ws._native.core import (
    Handle,
    ServerFields,
    SocketFields,
    TransportFields,
    set_process,
)
from pkcs11ws.client._curl_boot import pycurl_fix
from pkcs11ws.config import Config, server_label
from pkcs11ws.errors import Finalizing, InstallationError
from pkcs11ws.log import LOG, WARNING, Logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:  # annotations only: importing typing costs start-up time and memory
    from collections.abc import Iterable, Sequence
    from typing import Any, Final

PYCURL_FIX: Final = "install pycurl built against the system libcurl; " + pycurl_fix()
# The Debian OpenSSL flavour of libcurl; auditwheel-renamed copies look like libcurl-1a2b3c4d.so.4.
# Every request's headers. libcurl 7.88 formats each header byte on its own (about 100
# instructions a byte, a large part of the client's cost per request): "Accept:" drops the
# Accept header (the service answers JSON whatever it says; without this libcurl sends
# "Accept: */*"), "Expect:" keeps libcurl from waiting for a 100 answer on bodies > 1 MiB.
BASE_HEADERS: Final = ("Content-Type: application/json", "Accept:", "Expect:")
# Failures that no retry can cure: bad options, local certificate problems, an untrusted peer.
# CURLE_RECURSIVE_API_CALL (pycurl has no name for it): a request from inside a request.
E_RECURSIVE: Final = 93
NOT_RETRYABLE: Final = frozenset(
    {
        E_RECURSIVE,
        pycurl.E_UNSUPPORTED_PROTOCOL,
        pycurl.E_FAILED_INIT,
        pycurl.E_URL_MALFORMAT,
        pycurl.E_NOT_BUILT_IN,
        pycurl.E_OUT_OF_MEMORY,
        pycurl.E_BAD_FUNCTION_ARGUMENT,
        pycurl.E_UNKNOWN_OPTION,
        pycurl.E_SSL_CERTPROBLEM,
        pycurl.E_SSL_CIPHER,
        pycurl.E_PEER_FAILED_VERIFICATION,
        pycurl.E_SSL_CACERT_BADFILE,
        pycurl.E_SSL_ENGINE_NOTFOUND,
        pycurl.E_SSL_ENGINE_SETFAILED,
        pycurl.E_SSL_ENGINE_INITFAILED,
    }
)
# Failures that on a reused connection mean the service closed it while it sat idle.
DEAD_CONNECTION: Final = frozenset({pycurl.E_SEND_ERROR, pycurl.E_RECV_ERROR, pycurl.E_GOT_NOTHING})
# How the key service refuses a client certificate (expired, from another CA): it drops the
# connection without a TLS alert. TLS 1.3 (what the service speaks) lets the client finish its
# side of the handshake first, so libcurl sees a completed handshake (CURLINFO_APPCONNECT_TIME
# > 0) on a new connection, then no answer at all (52 empty reply, or 56 on a reset). A load
# balancer resetting connections to a dead backend, or a service killed before its handshake,
# fails before the handshake completes and stays an outage. A server that does send an alert
# naming the certificate is recognised by the alert.
REJECTION: Final = frozenset({pycurl.E_GOT_NOTHING, pycurl.E_RECV_ERROR})
_ALERT_CODES: Final = frozenset({pycurl.E_SSL_CONNECT_ERROR, pycurl.E_RECV_ERROR})
_CERT_ALERTS: Final = (
    "bad certificate",
    "certificate expired",
    "unknown ca",
    "certificate required",
    "certificate revoked",
    "certificate unknown",
    "unsupported certificate",
    "access denied",
)
# Options and infos of every request, looked up once.
_POSTFIELDS: Final = pycurl.POSTFIELDS
_RESPONSE_CODE: Final = pycurl.RESPONSE_CODE
_NUM_CONNECTS: Final = pycurl.NUM_CONNECTS
COOLDOWN: Final = 5.0  # seconds a failed server is skipped (tried last) before it is probed
MAX_IDLE: Final = 64  # idle handles kept per server; more are closed when they come back


def _mapped_files(maps: str) -> set[str]:
    files = set()
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            files.add(parts[5].removesuffix(" (deleted)"))
    return files


def _system_libcurl_name(name: str) -> bool:
    """libcurl.so.4 or libcurl.so.4.N[.N...]: the system library's names (a bundled copy's
    differ: libcurl-HASH.so.4, libcurl-gnutls.so.4)."""
    version = name.removeprefix("libcurl.so.4")
    return name.startswith("libcurl.so.4") and (
        version == "" or (len(version) > 1 and version[0] == "." and set(version) <= _VERSION_CHARS)
    )


_VERSION_CHARS: Final = frozenset("0123456789.")


def check_system_libcurl(version: str, files: Iterable[str] | None, package_dir: str) -> None:
    """Raise InstallationError unless pycurl runs on the system libcurl (OpenSSL flavour).

    version is pycurl.version, files the paths of the shared objects loaded after pycurl was
    imported (None when they cannot be known), package_dir the directory holding the pycurl
    package.
    """
    if "libcurl/" not in version or "OpenSSL/" not in version:
        raise InstallationError(f"pycurl reports {version!r}: not libcurl on OpenSSL; {PYCURL_FIX}")
    if files is None:
        return
    libcurls = {p for p in files if os.path.basename(p).startswith("libcurl")}
    if not libcurls:
        raise InstallationError(f"pycurl is loaded but no shared libcurl is mapped; {PYCURL_FIX}")
    for path in sorted(libcurls):
        bundled = (
            not _system_libcurl_name(os.path.basename(path))
            or path.startswith(package_dir.rstrip("/") + "/")
            or ".libs/" in path
        )
        if bundled:
            raise InstallationError(
                f"pycurl uses a bundled libcurl ({path}), not the system libcurl.so.4; {PYCURL_FIX}"
            )


def _loaded_files() -> Iterable[str] | None:
    """The loaded shared objects' paths. Inside the module the core lists them
    (dl_iterate_phdr, a few microseconds); a Python program without it reads /proc/self/maps
    (~0.3 ms with a few hundred mappings; None where /proc is missing)."""
    core = sys.modules.get("pkcs11ws._native.core")
    if core is not None:
        return [os.fsdecode(name) for name in core.loaded_objects()]
    try:
        with open("/proc/self/maps") as f:
            return _mapped_files(f.read())
    except OSError:
        return None


def _check_pycurl() -> None:
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(pycurl.__file__ or "")))
    check_system_libcurl(pycurl.version, _loaded_files(), package_dir)


_check_pycurl()

# The threads inside libcurl now (making a handle or performing), by threading.get_ident().
# libcurl's first handle initialises OpenSSL, which loads OPENSSL_CONF; a config that loads
# pkcs11-provider early makes it call this module from inside that initialisation, on this
# thread. Such a nested request would wait for the initialisation it is part of (a deadlock):
# it fails at once. A set, not a threading.local: the local's get and two sets cost about
# 1.5k instructions per request, the set's operations a fifth of that. (A forked child starts
# with it empty: only the forking thread lives on, and it is not inside a request.)
_IN_CURL: Final[set[int]] = set()
_get_ident = _thread.get_ident
os.register_at_fork(after_in_child=_IN_CURL.clear)

# This process's id, renewed in a forked child by the at-fork hook below: the per-request fork
# check reads it rather than calling os.getpid(), a system call on every request (glibc keeps
# no pid cache). The hooks run after os.fork() and, in a C host, after its fork() (the module's
# pthread_atfork child handler runs PyOS_AfterFork_Child: loader.c), as Python requires of any
# C code that forks and goes on running Python.
_PID = os.getpid()
set_process(_PID)  # the core's copy, which its request path compares (fastpath.pxi)


def _forked() -> None:
    global _PID
    _PID = os.getpid()
    set_process(_PID)


os.register_at_fork(after_in_child=_forked)


def nested() -> bool:
    """True inside a request of this thread (a call nested in libcurl's start-up)."""
    return _get_ident() in _IN_CURL


# Objects deliberately never freed (inherited by a forked child); see _leak().
_LEAKED: list[object] = []


def _leak(obj: object) -> None:
    """Keep obj alive for the life of the process, so no curl cleanup ever runs on it.

    The extra reference also survives interpreter shutdown, which clears module globals.
    """
    _LEAKED.append(obj)
    with suppress(Exception):
        import ctypes  # only here (fork, C_Finalize during a call): kept out of start-up

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


class CurlFailure(Exception):
    """One attempt got no HTTP answer. reused: it failed on a kept-alive connection; connected:
    it opened a new TCP connection; server: host:port of the server it went to ("" unknown);
    handshaken: the TLS handshake completed on that new connection."""

    def __init__(
        self,
        code: int,
        message: str,
        reused: bool,
        connected: bool = False,
        server: str = "",
        handshaken: bool = False,
    ) -> None:
        super().__init__(f"curl error {code}: {message}")
        self.code = code
        self.message = message
        self.reused = reused
        self.connected = connected
        self.server = server
        self.handshaken = handshaken

    @property
    def retryable(self) -> bool:
        return self.code not in NOT_RETRYABLE

    @property
    def dead_connection(self) -> bool:
        return self.reused and self.code in DEAD_CONNECTION

    @property
    def rejected(self) -> bool:
        """Looks like the service refusing the client certificate (see REJECTION)."""
        if not self.connected or self.reused:
            return False
        if self.handshaken and self.code in REJECTION:
            return True
        m = self.message.lower()
        return self.code in _ALERT_CODES and "alert" in m and any(a in m for a in _CERT_ALERTS)


def _new_share() -> Any:
    share = pycurl.CurlShare()
    # pycurl installs its own lock callbacks, so the share is safe across threads.
    share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_DNS)
    share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_SSL_SESSION)
    return share


class _Sockets(SocketFields):
    """The sockets libcurl has open, per handle, so abort() can shut them down (its fields are
    the core's SocketFields: pkcs11ws/_native/fastpath.pxi).

    libcurl reports each socket it opens (SOCKOPTFUNCTION) and lets us close it
    (CLOSESOCKETFUNCTION): both run under the lock, so abort() never shuts down a descriptor
    number that was closed and reused by someone else in the meantime.
    """

    __slots__ = ()

    def __init__(self, lock: _thread.LockType) -> None:
        self.fds: set[int] = set()
        self.lock = lock
        self.count = 0  # sockets opened: a request that opened none reused its connection

    def opened(self, fd: int, purpose: int) -> int:
        with self.lock:
            self.fds.add(fd)
            self.count += 1
        return 0  # CURL_SOCKOPT_OK

    def close(self, fd: int) -> int:
        with self.lock:
            self.fds.discard(fd)
            try:
                os.close(fd)
            except OSError:
                return 1
        return 0


class _Conn(Handle):
    """An easy handle of one server's pool and what it remembers between requests (its fields
    are the core's Handle: pkcs11ws/_native/fastpath.pxi)."""

    __slots__ = ()

    def __init__(self, cfg: Config, share: Any, pid: int, server: _Server, socks: _Sockets) -> None:
        self.pid = pid
        self.busy = False  # a request runs on it: close() waits for it
        # Statistics, counted by the one thread the handle is busy with (no lock per request);
        # Transport.stats() adds them up, _retire() folds them in when the handle is closed.
        self.requests = 0
        self.connects = 0
        self.failures = 0
        self.server = server
        self.socks = socks
        self.chunks = []
        self.headers = None
        self.method = "GET"
        self.path = ""  # the path in the handle's URL (setting CURLOPT_URL costs libcurl a parse)
        self.used = False
        self.timeout_ms = cfg.timeout * 1000  # the handle's CURLOPT_TIMEOUT_MS now
        c = pycurl.Curl()
        self.curl = c
        # The handle's methods, looked up once (pycurl's attribute lookup is slow).
        self.setopt = c.setopt
        self.perform = c.perform
        self.getinfo = c.getinfo
        c.setopt(pycurl.SHARE, share)
        c.setopt(pycurl.NOSIGNAL, 1)  # never touch the host's signal handlers
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTPS)
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.NOPROXY, "*")  # always a direct connection to HOST
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        # No User-Agent header: nothing reads it, and libcurl formats its ~30 bytes on every
        # request (3.8k instructions per C_Sign). "" rather than leaving it unset: pycurl sets
        # a long default of its own.
        c.setopt(pycurl.USERAGENT, "")
        c.setopt(pycurl.SSLVERSION, pycurl.SSLVERSION_TLSv1_2)
        c.setopt(pycurl.SSL_VERIFYPEER, 1)
        c.setopt(pycurl.SSL_VERIFYHOST, 2)
        c.setopt(pycurl.CAINFO, cfg.auth)
        c.setopt(pycurl.CAPATH, None)  # Debian builds in /etc/ssl/certs: trust AUTH only
        c.setopt(pycurl.SSLCERT, cfg.cert)
        c.setopt(pycurl.SSLKEY, cfg.key)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, cfg.connecttimeout * 1000)
        c.setopt(pycurl.TIMEOUT_MS, self.timeout_ms)
        c.setopt(pycurl.TCP_NODELAY, 1)
        c.setopt(pycurl.TCP_KEEPALIVE, 1)
        c.setopt(pycurl.TCP_KEEPIDLE, 30)
        c.setopt(pycurl.TCP_KEEPINTVL, 10)
        c.setopt(pycurl.SOCKOPTFUNCTION, socks.opened)
        c.setopt(pycurl.CLOSESOCKETFUNCTION, socks.close)
        c.setopt(pycurl.WRITEFUNCTION, self.chunks.append)
        c.setopt(pycurl.HTTPGET, 1)

    def close(self) -> None:
        """Free the handle (and its connection): only in the process that made it, and only
        while no transfer runs on it."""
        c, self.curl = self.curl, None
        if c is None:
            return
        if os.getpid() != self.pid:
            _leak(c)
            return
        # The handle's socket is closed through _Sockets.close (never unset that callback:
        # pycurl 7.49 then crashes in curl_easy_cleanup).
        try:
            c.close()
        except pycurl.error:
            # perform() is running in another thread (C_Finalize during a call): let it be.
            _leak(c)

    def __del__(self) -> None:
        with suppress(Exception):
            self.close()


class _Server(ServerFields):
    """One key service of HOST's list: its idle handles and its health (`idle` and `url` are
    the core's ServerFields: pkcs11ws/_native/fastpath.pxi)."""

    __slots__ = ("failing", "host", "label", "port", "retry_at")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.label = server_label(host, port)
        self.url = f"https://{self.label}"
        self.idle = []  # list.append/pop are atomic: no lock on the request path
        self.failing = False
        self.retry_at = 0.0  # monotonic time until which it is tried last


def resolve_entry(host: str, port: int) -> str | None:
    """A CURLOPT_RESOLVE entry for host:port resolved in the calling thread, or None for an IP
    literal (which libcurl never resolves). Raises CurlFailure when the name does not resolve."""
    # Only hosts that forbid threads need this: imported here to keep them out of start-up.
    import ipaddress
    import socket

    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
        return None
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise CurlFailure(pycurl.E_COULDNT_RESOLVE_HOST, f"{bare}: {e}", False) from None
    addrs: list[str] = []
    for family, _, _, _, sockaddr in infos:
        addr = str(sockaddr[0])
        addr = f"[{addr}]" if family == socket.AF_INET6 else addr
        if addr not in addrs:
            addrs.append(addr)
    return f"{bare}:{port}:{','.join(addrs)}"


class Transport(TransportFields):
    """Sends one HTTP request and returns (status, body); raises CurlFailure without an answer.
    (The fields every request reads are the core's TransportFields: pkcs11ws/_native/fastpath.pxi.)

    no_threads: the host forbade the library to start threads (C_Initialize with
    CKF_LIBRARY_CANT_CREATE_OS_THREADS). libcurl's resolver runs on a thread of its own, so the
    host name is then resolved here, in the calling thread, when a handle is made, and handed
    to libcurl as CURLOPT_RESOLVE (an IP literal HOST needs no resolving at all).
    """

    def __init__(self, cfg: Config, no_threads: bool = False, log: Logger | None = None) -> None:
        self._cfg = cfg
        self._servers_cfg = cfg.servers
        self.base_url = ", ".join(f"https://{server_label(h, p)}" for h, p in self._servers_cfg)
        self._timeout = float(cfg.timeout)
        self._timeout_ms = cfg.timeout * 1000
        self._step_ms = max(1, self._timeout_ms // 64)  # request(): the handle's timeouts
        self._no_threads = no_threads
        self.log = log if log is not None else LOG
        self._closed = False
        self.aborted = False
        self._start(os.getpid())

    def _start(self, pid: int) -> None:
        self._pid = pid
        self._share = _new_share()
        self.servers = [_Server(h, p) for h, p in self._servers_cfg]
        self._conns: WeakSet[_Conn] = WeakSet()
        self._lock = _thread.allocate_lock()
        self._socks_lock = _thread.allocate_lock()
        self._wake = Flag()  # set by abort() and close(): ends retry waits
        if self.aborted or self._closed:
            self._wake.set()
        self._rotation = 0
        self._requests = 0  # of the handles closed since (_retire); the live ones count their own
        self._connects = 0
        self._failures = 0
        self._handles = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def _new_conn(self, server: _Server) -> _Conn:
        if self._closed:
            raise Finalizing()
        entry = resolve_entry(server.host, server.port) if self._no_threads else None
        conn = _Conn(self._cfg, self._share, self._pid, server, _Sockets(self._socks_lock))
        if entry is not None:
            conn.curl.setopt(pycurl.RESOLVE, [entry])
        with self._lock:
            self._conns.add(conn)
            self._handles += 1
        return conn

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: Sequence[str],
        deadline: float = 0.0,
        server: _Server | None = None,
        share: int = 1,
    ) -> tuple[int, bytes]:
        """One attempt (on each server, with several). headers must include BASE_HEADERS; pass
        the same object to skip setopt. deadline: time.monotonic() by which the call must end
        (0: TIMEOUT from now).

        server, share: one attempt on that server alone, the time left shared with `share`
        servers (this one included): what _round() asks for. The attempt is written here, not
        in a method of its own, so a request to a single server runs one Python frame (after
        each wait for an answer the interpreter runs cold: every frame costs several times its
        warm price, bench/results/profile-issue15-client-cpu.md Round 6b)."""
        if self._pid != _PID:
            self.reset_after_fork()
        me = _get_ident()
        if me in _IN_CURL:  # nested() inlined: this is the per-request path
            raise CurlFailure(
                E_RECURSIVE,
                "called from inside a request of this thread "
                "(OpenSSL loading a PKCS#11 provider while libcurl starts?)",
                False,
            )
        if self.aborted or self._closed:
            raise Finalizing()
        if server is None:
            servers = self.servers
            if len(servers) != 1:
                return self._round(method, path, body, headers, deadline)
            server = servers[0]
        # Making the first handle initialises OpenSSL too: the flag covers it (see _IN_CURL).
        _IN_CURL.add(me)
        try:
            idle = server.idle
            try:
                conn = idle.pop()
            except IndexError:
                conn = self._new_conn(server)
            # busy first, then the check: close() sets aborted first, then looks at busy (both
            # under the GIL), so either this request ends here or close() waits for it (and its
            # socket, once libcurl opens it, is shut down by abort() or ends with the deadline).
            conn.busy = True
            try:
                if self.aborted:
                    raise Finalizing()
                c = conn.curl
                if c is None:  # closed under us (C_Finalize): a fresh handle, which refuses then
                    conn = self._new_conn(server)
                    c = conn.curl
                timeout_ms = conn.timeout_ms
                # The handle's timeouts stay while within a step (TIMEOUT/64) below the time
                # left (a batch's deadline moves by the microsecond; a setopt pair per request)
                # and are set rounded down to a step: never past the deadline, at most a step early.
                if deadline or share > 1:
                    left = (deadline or time.monotonic() + self._timeout) - time.monotonic()
                    if left <= 0.001:
                        raise CurlFailure(
                            pycurl.E_OPERATION_TIMEDOUT,
                            f"the call's deadline (TIMEOUT {self._cfg.timeout}s) has passed",
                            False,
                            server=server.label,
                        )
                    exact = int(left * 1000 / share)
                    if not exact - self._step_ms <= timeout_ms <= exact:
                        timeout_ms = max(1, exact - exact % self._step_ms)
                elif not self._timeout_ms - self._step_ms <= timeout_ms <= self._timeout_ms:
                    timeout_ms = self._timeout_ms  # (the core's _request checks the same)
                if timeout_ms != conn.timeout_ms:
                    c.setopt(pycurl.TIMEOUT_MS, timeout_ms)
                    c.setopt(
                        pycurl.CONNECTTIMEOUT_MS, min(timeout_ms, self._cfg.connecttimeout * 1000)
                    )
                    conn.timeout_ms = timeout_ms
                if path != conn.path:
                    c.setopt(pycurl.URL, server.url + path)
                    conn.path = path
                if method == "POST":
                    if conn.method == "DELETE":
                        c.setopt(pycurl.CUSTOMREQUEST, None)
                    conn.setopt(_POSTFIELDS, body or b"")
                elif method != conn.method:
                    c.setopt(pycurl.HTTPGET, 1)
                    c.setopt(pycurl.CUSTOMREQUEST, "DELETE" if method == "DELETE" else None)
                conn.method = method
                if headers is not conn.headers:
                    c.setopt(pycurl.HTTPHEADER, headers)
                    conn.headers = headers
                chunks = conn.chunks
                socks = conn.socks
                opened = socks.count
                try:
                    conn.perform()
                except pycurl.error as e:
                    raise self._perform_failed(conn, c, e) from None
                status: int = conn.getinfo(_RESPONSE_CODE)
                if socks.count != opened:  # a new connection (only then worth asking libcurl)
                    conn.connects += conn.getinfo(_NUM_CONNECTS)
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                conn.used = True
                conn.requests += 1
                return status, data
            finally:
                # Back to the pool, unless the transport was closed (C_Finalize) or forked since.
                if self._closed or conn.pid != self._pid or len(idle) >= MAX_IDLE:
                    self._retire(conn)
                else:
                    idle.append(conn)
                conn.busy = False
        finally:
            _IN_CURL.discard(me)

    def _perform_failed(self, conn: _Conn, c: Any, e: pycurl.error) -> BaseException:
        """What request() (and the core's copy, fastpath.pxi _request) raises when perform() of
        conn's handle c (close() may have cleared conn.curl since) failed with e."""
        conn.chunks.clear()
        code = e.args[0] if e.args else -1
        message = e.args[1] if len(e.args) > 1 else str(e)
        connects = c.getinfo(pycurl.NUM_CONNECTS)
        reused = conn.used and connects == 0
        handshaken = connects > 0 and c.getinfo(pycurl.APPCONNECT_TIME) > 0
        conn.used = False  # the handle's connection is gone either way
        conn.requests += 1
        conn.connects += connects
        conn.failures += 1
        if self.aborted:
            return Finalizing()
        return CurlFailure(code, message, reused, connects > 0, conn.server.label, handshaken)

    def _order(self, now: float) -> list[_Server]:
        """This round's servers: the healthy ones from a rotating start, then those cooling
        down, the one whose cool-down ends first first."""
        healthy = [s for s in self.servers if s.retry_at <= now]
        cooling = sorted((s for s in self.servers if s.retry_at > now), key=_retry_at)
        if len(healthy) > 1:
            self._rotation = i = (self._rotation + 1) % len(healthy)  # races only skew the spread
            healthy = healthy[i:] + healthy[:i]
        return healthy + cooling

    def _round(
        self, method: str, path: str, body: bytes | None, headers: Sequence[str], deadline: float
    ) -> tuple[int, bytes]:
        """Try the servers in turn until one answers below 500; raise or return the last
        failure when none did."""
        now = time.monotonic()
        if not deadline:
            deadline = now + self._timeout
        order = self._order(now)
        last: tuple[int, bytes] | CurlFailure | None = None
        for i, server in enumerate(order):
            try:
                status, data = self.request(
                    method, path, body, headers, deadline, server, len(order) - i
                )
            except CurlFailure as failure:
                if not failure.retryable:
                    raise
                # A kept-alive connection the service closed while idle says nothing about it.
                if not failure.dead_connection:
                    self._failed(server, str(failure))
                last = failure
                continue
            if status >= 500:
                self._failed(server, f"HTTP {status}")
                last = (status, data)
                continue
            if server.failing:
                self._recovered(server)
            return status, data
        if isinstance(last, CurlFailure):
            raise last
        assert last is not None
        return last

    def _failed(self, server: _Server, why: str) -> None:
        server.retry_at = time.monotonic() + COOLDOWN
        if not server.failing:
            server.failing = True
            if self.log.enabled(WARNING):
                self.log.warning(
                    f"key service {server.label} failed ({why}): the other servers "
                    f"take its requests; probing it again in {COOLDOWN:g}s"
                )
            return

    def _recovered(self, server: _Server) -> None:
        server.failing = False
        server.retry_at = 0.0
        if self.log.enabled(WARNING):
            self.log.warning(f"key service {server.label} answers again")

    def pause(self, seconds: float) -> None:
        """Sleep between retries; close() or abort() cuts it short (then Finalizing)."""
        if self._wake.wait(seconds) or self.aborted or self._closed:
            raise Finalizing()

    def abort(self) -> None:
        """End every transfer in progress now, connects included (their calls raise
        Finalizing), wake the calls waiting to retry, and fail later requests at once. The first
        step of close(); callable alone, from any thread, more than once.

        Only the sockets of busy handles are shut down: an idle handle's connection carries no
        transfer, and a request that takes it from now on sees `aborted` before it performs
        (request() checks it after marking the handle busy). So a C_Finalize with no call in
        progress (pkcs11-tool -L) imports no socket module."""
        self.aborted = True
        self._wake.set()
        with self._lock:
            conns = [conn for conn in self._conns if conn.busy]
        if not conns:
            return
        import socket  # only with transfers in progress: kept out of start-up

        with self._socks_lock:
            for conn in conns:
                for fd in list(conn.socks.fds):
                    with suppress(OSError):
                        # A duplicate of the descriptor: shutdown() acts on the socket itself.
                        s = socket.socket(fileno=os.dup(fd))
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        finally:
                            s.close()

    def _retire(self, conn: _Conn) -> None:
        """Close a handle for good, keeping its statistics."""
        with self._lock:
            if conn in self._conns:
                self._conns.discard(conn)
                self._requests += conn.requests
                self._connects += conn.connects
                self._failures += conn.failures
        conn.close()

    def stats(self) -> dict[str, int]:
        """Requests sent and new connections (TLS handshakes) made, since start or fork."""
        with self._lock:
            conns = list(self._conns)
            out = {
                "requests": self._requests,
                "connects": self._connects,
                "failures": self._failures,
            }
        for conn in conns:
            out["requests"] += conn.requests
            out["connects"] += conn.connects
            out["failures"] += conn.failures
        return out

    def handles(self) -> int:
        """Easy handles made since start or fork (each idle one is reused before a new one)."""
        with self._lock:
            return self._handles

    def reset_after_fork(self) -> None:
        """In a forked child: abandon (never free) the parent's handles and share, start anew."""
        for conn in list(self._conns):
            if conn.curl is not None:
                _leak(conn.curl)
                conn.curl = None
        _leak(self._share)
        self._start(os.getpid())

    def close(self, wait: float = 10.0) -> None:
        """C_Finalize: abort() the requests in progress, wait (at most `wait` seconds) for them
        to end, close every idle handle and its connection; later requests raise Finalizing. A
        handle still in use after the wait is closed by its own thread when its request ends."""
        if os.getpid() != self._pid:
            self.reset_after_fork()
        self._closed = True
        self.abort()
        with self._lock:
            conns = list(self._conns)
        deadline = time.monotonic() + wait
        for conn in conns:
            while conn.busy and time.monotonic() < deadline:
                time.sleep(0.002)  # releases the GIL: the request can finish
        for server in self.servers:
            while server.idle:
                with suppress(IndexError):
                    self._retire(server.idle.pop())


def _retry_at(server: _Server) -> float:
    return server.retry_at
