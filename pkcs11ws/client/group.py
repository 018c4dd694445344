"""Group commit of the read-only crypto calls (issue 15): the client's names for it.

The rules (the queue, the slots, the lane, who sends) live in one place, the core's C
(pkcs11ws/_native/group.pxi): at 8 threads most calls queue and wait, and the Python that each
queued call ran after its wake-up was the largest part of the module's own client CPU left
(bench/results/profile-issue15-client-cpu.md). GroupCommit is the core's Group, Call its
Queued; a Python host that uses the client directly imports the core extension for them (it
needs no C host: the core's PKCS#11 side stays unused).

The network part (the single request, the batch request, the decoding of its answers) is the
client's (api.py); the group only decides who sends what and hands answers back.
"""

from __future__ import annotations

from pkcs11ws._native.core import GROUP_MAX_BYTES as MAX_BYTES
from pkcs11ws._native.core import Group as GroupCommit
from pkcs11ws._native.core import Queued as Call

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from typing import Any, Protocol

    class Sender(Protocol):
        """What sends a group's requests: the client (api.py)."""

        def _single(self, op: str, token: str | None, data: bytes, /) -> tuple[int, Any]: ...

        def _send_batch(self, calls: list[Call], /) -> None: ...


__all__ = ["MAX_BYTES", "Call", "GroupCommit"]
