"""The request ids of the module's requests (issue 9): every request carries one, the client
logs it at DEBUG3 and the service writes it in its audit trail, so one operation can be followed
across both logs. A random prefix per process (renewed in a forked child) and a counter.

Most requests carry theirs as the X-Request-Id header. A single crypto request and a batch
carry it as their body's first field instead (protocol.REQUEST_ID_FIELD): libcurl formats
every header byte through its own printf, and a header that changes per request makes pycurl
rebuild the handle's whole header list (together about 10k instructions per C_Sign,
bench/results/profile-issue15.md).
"""

from __future__ import annotations

import sys

from pkcs11ws import _os as os  # not os itself: start-up cost (pkcs11ws/_os.py)
from pkcs11ws import protocol
from pkcs11ws._native.core import RequestIdFields

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Final

_SKIP: Final = len(protocol.REQUEST_ID_HEADER) + 2
_FIELD: Final = b'{"' + protocol.REQUEST_ID_FIELD.encode("ascii") + b'":"'


class RequestIds(RequestIdFields):
    """header() makes an X-Request-Id line; a body's id is `field`, next(count), then '",'
    before the rest of the JSON object (written inline by KeyServiceClient._single,
    wire.batch_body and the core's lone request; `field` and `count` are the core's
    RequestIdFields: pkcs11ws/_native/fastpath.pxi)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        prefix = os.urandom(5).hex() + "-"
        self.prefix = f"{protocol.REQUEST_ID_HEADER}: {prefix}"
        self.field = _FIELD + prefix.encode("ascii")
        # 1, 2, 3...: next() on a range iterator is one atomic C call like itertools.count's,
        # without importing itertools (~0.5 M instructions of every start-up).
        self.count = iter(range(1, sys.maxsize))

    def header(self) -> str:
        """A new request id as an X-Request-Id header line."""
        return self.prefix + str(next(self.count))


def request_id(headers: Sequence[str], data: bytes | None) -> str:
    """The request id a request carries, in its last header or its body (for the log)."""
    if headers and headers[-1].startswith(protocol.REQUEST_ID_HEADER):
        return headers[-1][_SKIP:]
    if data is not None and data.startswith(_FIELD):
        end = data.find(b'"', len(_FIELD))
        return data[len(_FIELD) : end].decode("ascii", "replace")
    return "-"
