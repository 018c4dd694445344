"""HTTPS transport to the key service: pycurl on the system libcurl, one reused handle per thread.

design.md section 3 decides the shape: pycurl must be the build linked to Debian's libcurl (the
PyPI wheel bundles its own libcurl and OpenSSL, which crashed pkcs11-tool); this module refuses to
import otherwise. Each thread gets one easy handle that keeps its connection alive between
requests (a fresh TLS handshake costs milliseconds, a reused connection tens of microseconds).
The handles share a CurlShare for DNS and TLS sessions, so a new thread's first connection
resumes a TLS session. Connections themselves are NOT shared: libcurl documents that sharing the
connection cache between concurrently running threads is unsupported (CURL_LOCK_DATA_CONNECT,
curl issues #4544, #13347), so each thread's handle keeps its own.

TLS is always verified: only the CA in AUTH is trusted (the system CA path is switched off),
the host name is checked, the client presents CERT/KEY, TLS 1.2 is the minimum.

Fork: a child must never use nor cleanly close handles inherited from its parent (closing sends a
TLS close_notify on the parent's connection). The child's handles and share are leaked on
purpose, never freed; a pid check on every request (and reset_after_fork()) gives the child fresh
ones.
"""

from __future__ import annotations

import os
import re
import threading
import weakref

import pycurl

from pkcs11ws import __version__
from pkcs11ws._lite import suppress
from pkcs11ws.config import Config
from pkcs11ws.errors import TransportError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:  # annotations only: typing costs ~2.5 ms and ~1.9 MB at start-up
    from collections.abc import Sequence
    from typing import Any, Final

PYCURL_FIX: Final = (
    "install pycurl built against the system libcurl: "
    "pip install --no-binary pycurl --force-reinstall pycurl "
    "(needs the Debian packages libcurl4-openssl-dev and libssl-dev)"
)
# The Debian OpenSSL flavour of libcurl; auditwheel-renamed copies look like libcurl-1a2b3c4d.so.4.
_SYSTEM_LIBCURL_RE: Final = re.compile(r"^libcurl\.so\.4(\.[0-9.]+)?$")
BASE_HEADERS: Final = ("Content-Type: application/json", "Accept: application/json", "Expect:")
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


def _mapped_files(maps: str) -> set[str]:
    files = set()
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            files.add(parts[5].removesuffix(" (deleted)"))
    return files


def check_system_libcurl(version: str, maps: str | None, package_dir: str) -> None:
    """Raise ImportError unless pycurl runs on the system libcurl (OpenSSL flavour).

    version is pycurl.version, maps the text of /proc/self/maps after pycurl was imported (None
    where /proc is missing), package_dir the directory holding the pycurl package.
    """
    if "libcurl/" not in version or "OpenSSL/" not in version:
        raise ImportError(f"pycurl reports {version!r}: not libcurl on OpenSSL; {PYCURL_FIX}")
    if maps is None:
        return
    libcurls = {p for p in _mapped_files(maps) if os.path.basename(p).startswith("libcurl")}
    if not libcurls:
        raise ImportError(f"pycurl is loaded but no shared libcurl is mapped; {PYCURL_FIX}")
    for path in sorted(libcurls):
        bundled = (
            not _SYSTEM_LIBCURL_RE.match(os.path.basename(path))
            or path.startswith(package_dir.rstrip("/") + "/")
            or ".libs/" in path
        )
        if bundled:
            raise ImportError(
                f"pycurl uses a bundled libcurl ({path}), not the system libcurl.so.4; {PYCURL_FIX}"
            )


def _check_pycurl() -> None:
    try:
        with open("/proc/self/maps") as f:
            maps: str | None = f.read()
    except OSError:
        maps = None
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(pycurl.__file__ or "")))
    check_system_libcurl(pycurl.version, maps, package_dir)


_check_pycurl()

# Per thread: inside libcurl (making a handle or performing). libcurl's first handle
# initialises OpenSSL, which loads OPENSSL_CONF; a config that loads pkcs11-provider early
# makes it call this module from inside that initialisation, on this thread. Such a nested
# request would wait for the initialisation it is part of (a deadlock): it fails at once.
_IN_CURL = threading.local()


def nested() -> bool:
    """True inside a request of this thread (a call nested in libcurl's start-up)."""
    return bool(getattr(_IN_CURL, "active", False))


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
    """One attempt got no HTTP answer. reused: it failed on a kept-alive connection."""

    def __init__(self, code: int, message: str, reused: bool) -> None:
        super().__init__(f"curl error {code}: {message}")
        self.code = code
        self.message = message
        self.reused = reused

    @property
    def retryable(self) -> bool:
        return self.code not in NOT_RETRYABLE

    @property
    def dead_connection(self) -> bool:
        return self.reused and self.code in DEAD_CONNECTION


def _new_share() -> Any:
    share = pycurl.CurlShare()
    # pycurl installs its own lock callbacks, so the share is safe across threads.
    share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_DNS)
    share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_SSL_SESSION)
    return share


class _Conn:
    """One thread's easy handle and what it remembers between requests."""

    __slots__ = ("__weakref__", "chunks", "curl", "headers", "method", "path", "pid", "used")

    def __init__(self, cfg: Config, share: Any, pid: int) -> None:
        self.pid = pid
        self.chunks: list[bytes] = []
        self.headers: Sequence[str] | None = None
        self.method = "GET"
        self.path = ""  # the path in the handle's URL (setting CURLOPT_URL costs libcurl a parse)
        self.used = False
        c = pycurl.Curl()
        self.curl: Any = c
        c.setopt(pycurl.SHARE, share)
        c.setopt(pycurl.NOSIGNAL, 1)  # never touch the host's signal handlers
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTPS)
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.NOPROXY, "*")  # always a direct connection to HOST
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        c.setopt(pycurl.USERAGENT, f"libpkcs11ws/{__version__}")
        c.setopt(pycurl.SSLVERSION, pycurl.SSLVERSION_TLSv1_2)
        c.setopt(pycurl.SSL_VERIFYPEER, 1)
        c.setopt(pycurl.SSL_VERIFYHOST, 2)
        c.setopt(pycurl.CAINFO, cfg.auth)
        c.setopt(pycurl.CAPATH, None)  # Debian builds in /etc/ssl/certs: trust AUTH only
        c.setopt(pycurl.SSLCERT, cfg.cert)
        c.setopt(pycurl.SSLKEY, cfg.key)
        c.setopt(pycurl.CONNECTTIMEOUT, cfg.connecttimeout)
        c.setopt(pycurl.TIMEOUT, cfg.timeout)
        c.setopt(pycurl.TCP_NODELAY, 1)
        c.setopt(pycurl.TCP_KEEPALIVE, 1)
        c.setopt(pycurl.TCP_KEEPIDLE, 30)
        c.setopt(pycurl.TCP_KEEPINTVL, 10)
        c.setopt(pycurl.WRITEFUNCTION, self.chunks.append)
        c.setopt(pycurl.HTTPGET, 1)

    def close(self) -> None:
        """Free the handle (and its connection): only in the process that made it."""
        c, self.curl = self.curl, None
        if c is None:
            return
        if os.getpid() != self.pid:
            _leak(c)
            return
        try:
            c.close()
        except pycurl.error:
            # perform() is running in another thread (C_Finalize during a call): let it be.
            _leak(c)

    def __del__(self) -> None:
        with suppress(Exception):
            self.close()


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


class Transport:
    """Sends one HTTP request and returns (status, body); raises CurlFailure without an answer.

    no_threads: the host forbade the library to start threads (C_Initialize with
    CKF_LIBRARY_CANT_CREATE_OS_THREADS). libcurl's resolver runs on a thread of its own, so the
    host name is then resolved here, in the calling thread, when a thread's handle is made, and
    handed to libcurl as CURLOPT_RESOLVE (an IP literal HOST needs no resolving at all).
    """

    def __init__(self, cfg: Config, no_threads: bool = False) -> None:
        host = cfg.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        self.base_url = f"https://{host}:{cfg.port}"
        self._cfg = cfg
        self._no_threads = no_threads
        self._closed = False
        self._start(os.getpid())

    def _start(self, pid: int) -> None:
        self._pid = pid
        self._share = _new_share()
        self._local = threading.local()
        self._conns: weakref.WeakSet[_Conn] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._requests = 0
        self._connects = 0
        self._failures = 0

    def _new_conn(self) -> _Conn:
        if self._closed:
            raise TransportError("the key service client was closed (C_Finalize)")
        entry = resolve_entry(self._cfg.host, self._cfg.port) if self._no_threads else None
        conn = _Conn(self._cfg, self._share, self._pid)
        if entry is not None:
            conn.curl.setopt(pycurl.RESOLVE, [entry])
        self._local.conn = conn
        with self._lock:
            self._conns.add(conn)
        return conn

    def request(
        self, method: str, path: str, body: bytes | None, headers: Sequence[str]
    ) -> tuple[int, bytes]:
        """One attempt. headers must include BASE_HEADERS; pass the same object to skip setopt."""
        if os.getpid() != self._pid:
            self.reset_after_fork()
        if getattr(_IN_CURL, "active", False):  # nested() inlined: this is the per-request path
            raise CurlFailure(E_RECURSIVE, "called from inside a request of this thread "
                              "(OpenSSL loading a PKCS#11 provider while libcurl starts?)",
                              False)  # fmt: skip
        # Making the first handle initialises OpenSSL too: the flag covers it (see _IN_CURL).
        _IN_CURL.active = True
        try:
            try:
                conn: _Conn = self._local.conn
            except AttributeError:
                conn = self._new_conn()
            c = conn.curl
            if c is None:
                conn = self._new_conn()
                c = conn.curl
            if path != conn.path:
                c.setopt(pycurl.URL, self.base_url + path)
                conn.path = path
            if method == "POST":
                if conn.method == "DELETE":
                    c.setopt(pycurl.CUSTOMREQUEST, None)
                c.setopt(pycurl.POSTFIELDS, body or b"")
            elif method != conn.method:
                c.setopt(pycurl.HTTPGET, 1)
                c.setopt(pycurl.CUSTOMREQUEST, "DELETE" if method == "DELETE" else None)
            conn.method = method
            if headers is not conn.headers:
                c.setopt(pycurl.HTTPHEADER, headers)
                conn.headers = headers
            chunks = conn.chunks
            try:
                c.perform()
            except pycurl.error as e:
                chunks.clear()
                code = e.args[0] if e.args else -1
                message = e.args[1] if len(e.args) > 1 else str(e)
                connects = c.getinfo(pycurl.NUM_CONNECTS)
                reused = conn.used and connects == 0
                conn.used = False  # the handle's connection is gone either way
                with self._lock:
                    self._requests += 1
                    self._connects += connects
                    self._failures += 1
                raise CurlFailure(code, message, reused) from None
            status: int = c.getinfo(pycurl.RESPONSE_CODE)
            connects = c.getinfo(pycurl.NUM_CONNECTS)
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            conn.used = True
            with self._lock:
                self._requests += 1
                self._connects += connects
            return status, data
        finally:
            _IN_CURL.active = False

    def stats(self) -> dict[str, int]:
        """Requests sent and new connections (TLS handshakes) made, since start or fork."""
        with self._lock:
            return {
                "requests": self._requests,
                "connects": self._connects,
                "failures": self._failures,
            }

    def reset_after_fork(self) -> None:
        """In a forked child: abandon (never free) the parent's handles and share, start anew."""
        for conn in list(self._conns):
            if conn.curl is not None:
                _leak(conn.curl)
                conn.curl = None
        _leak(self._share)
        self._start(os.getpid())

    def close(self) -> None:
        """Close every thread's handle and connection (C_Finalize); later requests fail."""
        if os.getpid() != self._pid:
            self.reset_after_fork()
        self._closed = True
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()
        self._local = threading.local()
