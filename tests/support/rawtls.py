"""A mutual-TLS client that sees the TLS record layer and the raw bytes of HTTP/1.1 answers
(tests/service/test_server_records.py's record counts, test_server_lean.py's byte-for-byte
comparisons): requests written by hand, answers split without an HTTP library's reading."""

from __future__ import annotations

import json
import socket
import ssl

from tests.support.service import Service


def post(path: str, doc: object, *extra: str) -> bytes:
    body = json.dumps(doc).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += "".join(f"{h}\r\n" for h in extra)
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, raw: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body
        self.raw = raw  # the answer's bytes as they came, head and body


def split(buf: bytes, heads_only: int = 0) -> tuple[list[Answer], bytes]:
    """Complete answers at the start of buf, and what follows them. The first heads_only
    answers have no body whatever their content-length says (answers to HEAD)."""
    out: list[Answer] = []
    while (end := buf.find(b"\r\n\r\n")) >= 0:
        lines = buf[:end].decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        status = int(lines[0].split()[1])
        size = 0 if len(out) < heads_only or status == 100 else int(headers["content-length"])
        if len(buf) < end + 4 + size:
            break
        out.append(Answer(status, headers, buf[end + 4 : end + 4 + size], buf[: end + 4 + size]))
        buf = buf[end + 4 + size :]
    return out, buf


class RecordClient:
    """A mutual-TLS client that sees the TLS record layer: the socket's bytes are cut into
    records and fed to the TLS object one by one, noting which carried application data."""

    def __init__(self, svc: Service, ctx: ssl.SSLContext | None = None) -> None:
        """ctx: a client's TLS context (Api.ctx: its certificate); default the service's."""
        if ctx is None:
            ctx = ssl.create_default_context(cafile=str(svc.ca))
            ctx.load_cert_chain(str(svc.cert), str(svc.key))
        self.sock = socket.create_connection(("127.0.0.1", svc.port), timeout=60)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.raw = b""
        self.plain = b""  # application data received and not yet taken
        self.records: list[int] = []  # plaintext bytes of each record that carried data
        self.eof = False
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                self.incoming.write(self._record())
        self._send_pending()

    def close(self) -> None:
        self.sock.close()

    def _send_pending(self) -> None:
        if pending := self.outgoing.read():
            self.sock.sendall(pending)

    def _record(self) -> bytes:
        """The next whole TLS record from the socket (b"" at EOF)."""
        while len(self.raw) < 5 or len(self.raw) < 5 + int.from_bytes(self.raw[3:5], "big"):
            chunk = self.sock.recv(65536)
            if not chunk:
                assert not self.raw, "the stream ends inside a TLS record"
                return b""
            self.raw += chunk
        size = 5 + int.from_bytes(self.raw[3:5], "big")
        record, self.raw = self.raw[:size], self.raw[size:]
        return record

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._send_pending()

    def _read_one(self) -> None:
        record = self._record()
        if not record:
            self.eof = True
            return
        self.incoming.write(record)
        data = b""
        try:
            while chunk := self.tls.read(65536):
                data += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify
            self.eof = True
        if data:
            self.records.append(len(data))
            self.plain += data

    def answers(self, count: int, heads_only: int = 0) -> list[Answer]:
        """The next count answers; self.records then holds the records they came in."""
        self.records = []
        while True:
            got, rest = split(self.plain, heads_only)
            if len(got) >= count:
                assert not rest, rest[:200]
                self.plain = b""
                return got
            assert not self.eof, f"EOF after {len(got)} of {count} answers"
            self._read_one()

    def ask(self, request: bytes) -> Answer:
        self.send(request)
        (answer,) = self.answers(1)
        return answer

    def closed(self) -> bool:
        """True when the service ends the connection with nothing more sent."""
        while not self.eof:
            self._read_one()
            if self.plain:
                return False
        return True
