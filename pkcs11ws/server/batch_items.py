"""The batch endpoint's item path (POST /crypto/v1/batch), mixed into app.App as BatchPath.

Each item is checked and answered as its single request would be (token, identity binding,
authorization, decoding, audit of a refusal); one item's refusal is its own answer and never
fails the others. Keyed crypto items the fast decoder took (fastjson.batch: runs of items that
differ only in their trailing values) on a store whose reads do not block run as plain calls
(_keyed_item: _keyed's checks in their order, no coroutine). In a run, once an item has passed
on a verdict the service caches (handlers_crypto._key: valid while the store's change mark
stays the same within this turn of the event loop, and until a time its session is known to
live to), the run's next items, which carry the same op, token, key, mechanism and other
values, are answered from that verdict: exactly what _key's cache would give each of them, so
the checks are decided once per run, not skipped; each item still checks the verdict's time,
and any item the verdict cannot answer takes the full path (and its refusal its audit line).
Other items go through App._operation. Offloaded work (RSA, big-curve ECDSA) runs after the
loop, all in one thread hand-off, each item still answered in its place.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from pkcs11ws import protocol
from pkcs11ws.protocol import ProtocolError as ApiError
from pkcs11ws.server import audit, fastjson
from pkcs11ws.server._hot import HmacState, mac_run, verify_run
from pkcs11ws.server.direct import ITEM_B64_END as _B64_END
from pkcs11ws.server.direct import ITEM_OK as _OK
from pkcs11ws.server.direct import ITEM_VERIFIED as _VERIFIED_PART
from pkcs11ws.server.direct import RUN_DATA as _DATA
from pkcs11ws.server.direct import RUN_DATA_AND_MAC as _DATA_AND_MAC
from pkcs11ws.server.handlers import expired
from pkcs11ws.server.handlers_crypto import B64_ANSWERS, IN_BATCH, Offloaded
from pkcs11ws.server.identity import Identity
from pkcs11ws.server.pipeline import Request, Response

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from pkcs11ws.server.handlers import Service
    from pkcs11ws.server.sealing import TokenClaims

# (place in the answer's parts, the work, the audit's seen, the item's request id)
_Offloads = list[tuple[int, Offloaded, list[Any], str | None]]


class BatchPath:
    """App's batch handler and item path (app.App mixes this in and provides these)."""

    batch_max_items: int
    service: Service
    _handlers: dict[str, Callable[[Request], Awaitable[Response]]]
    _operation: Callable[..., Awaitable[Response]]
    _opened: dict[str, TokenClaims]
    _token_claims: Callable[[Any, Identity], TokenClaims]

    async def _batch(self, req: Request) -> Response:
        """POST /crypto/v1/batch: each item as its own single request would go."""
        body = req.body
        items: list[Any] = body["items"]
        runs = bool(items) and type(items[0]) is tuple  # fastjson.batch's runs
        if protocol.REQUEST_ID_FIELD in body:  # the body's request id wins over the header's
            if runs:  # fastjson.batch took only a valid one
                audit.REQUEST_ID.set(body[protocol.REQUEST_ID_FIELD])
            else:
                _app._request_id(body)
        n = fastjson.count(items) if runs else len(items)
        if n > self.batch_max_items:
            raise ApiError(
                "BATCH_TOO_LARGE",
                f"a batch carries at most {self.batch_max_items} operations, not {n}",
            )
        ident = req.ident
        parts: list[bytes] = []
        rid = audit.REQUEST_ID.get()  # the batch's; an item may carry its own (_request_id)
        # Items whose work goes to the thread pool, run together in one hand-off after the
        # loop (handlers_crypto.Offloaded).
        offloaded: _Offloads = []
        # Items mostly share one token: one Authorization value for a run of them (its hash,
        # which authenticate's cache needs, is then computed once): the last token and value.
        auth: list[Any] = [None, None]
        # The keyed runs, on a store whose reads do not block, go through _keyed_run: the same
        # checks as _operation's, as plain calls. opened: the token last opened in this batch
        # and its claims.
        keyed = runs and not self.service._reads_block
        opened: list[Any] = [None, None]
        # IN_BATCH for the items through _operation (its keyed path raises their offloaded
        # work for the batch to run); _keyed_run's raise theirs anyway: not set for those.
        in_batch = None if keyed else IN_BATCH.set(True)
        for item in items:
            if audit.REQUEST_ID.get() is not rid:
                audit.REQUEST_ID.set(rid)
            if not runs:
                op, token, request = item["op"], item.get("token"), item["request"]
                parts.append(
                    await self._batch_item(op, token, request, False, ident, auth, offloaded, parts)
                )
            elif keyed and item[0] in _app._KEYED_OPS:
                self._keyed_run(item, ident, opened, offloaded, parts, rid)
            else:  # (random, or a store whose reads block: item by item)
                if in_batch is None:
                    in_batch = IN_BATCH.set(True)
                for i, (op, token, request) in enumerate(fastjson.items([item])):
                    if i and audit.REQUEST_ID.get() is not rid:
                        audit.REQUEST_ID.set(rid)
                    parts.append(
                        await self._batch_item(
                            op, token, request, True, ident, auth, offloaded, parts
                        )
                    )
        if in_batch is not None:
            IN_BATCH.reset(in_batch)  # (an exception escaping the loop ends the request task)
        if offloaded:
            await _run_offloaded(offloaded, parts)
        return Response(200, b'{"results":[' + b",".join(parts) + b"]}")

    async def _batch_item(
        self,
        op: str,
        token: str | None,
        request: Any,
        fast: bool,
        ident: Identity,
        auth: list[Any],
        offloaded: _Offloads,
        parts: list[bytes],
    ) -> bytes:
        """One item through _operation (fast: request is the fast decoder's decoded request,
        else the item's parsed JSON); its part of the answer (b"": offloaded, filled later)."""
        seen: list[Any] = [None, ident, _app._NO_PARAMS, None]
        code: str | None = None
        try:
            if op not in protocol.BATCHABLE:
                raise ApiError("BAD_REQUEST", f"{op!r} cannot be batched")
            ep = protocol.ENDPOINT_BY_OP[op]
            seen[0] = ep
            if token != auth[0]:
                auth[1] = _app._bearer(token)  # (may refuse the item: then asked again)
                auth[0] = token
            resp = await self._operation(
                ep,
                self._handlers[op],
                _app._NO_PARAMS,
                b"",
                ep.path,
                b"",
                request,
                auth[1],
                None,
                ident,
                seen,
                fast,
            )
        except Offloaded as work:
            offloaded.append((len(parts), work, seen, audit.REQUEST_ID.get()))
            return b""
        except Exception as exc:  # one item's failure is that item's answer
            code, resp = _app._item_failure(op, exc)
        if resp.status >= 300:
            _app._audit(seen, resp, code)
        return b'{"status":%d,"answer":%s}' % (resp.status, resp.body)

    def _keyed_run(
        self,
        run: fastjson.BatchRun,
        ident: Identity,
        opened: list[Any],
        offloaded: _Offloads,
        parts: list[bytes],
        rid: str | None,
    ) -> None:
        """A run of keyed items (fastjson.BatchRun): each one's part of the answer into parts.
        The first item, and any the run's verdict cannot answer, through _keyed_item."""
        op, token, request, names, values = run
        if values is None or names is None:
            parts.append(self._keyed_item(op, token, request, ident, opened, offloaded, parts))
            return
        # The verdict the run's items share, once an item passed on a cached one: the request
        # that item's work saw (its data replaced per item) and the op as a function of the
        # data alone. Never with a request id in the request (each item sets its own).
        verdict: Any = None
        seen_body: dict[str, Any] = {}
        direct: Any = None
        # An HMAC sign run: its prepared state, whose items mac_run answers in C, each as the
        # verdict's answer (handlers_crypto.B64_ANSWERS) inside its batch answer. An HMAC
        # verify run: the state whose full MAC each item's must equal (verify_run, in C; an
        # item it cannot answer, a wrong MAC, takes the full path: its refusal, its audit line).
        state: HmacState | None = None
        check: HmacState | None = None
        head = b""
        i, count = 0, len(values)
        while i < count:
            if verdict is not None:
                if state is not None:
                    i = mac_run(state, values, i, verdict.until, head, _B64_END, parts)
                    if i == count:
                        return
                elif check is not None:
                    i = verify_run(check, values, i, verdict.until, _VERIFIED_PART, parts)
                    if i == count:
                        return
                elif time.time() < verdict.until:
                    try:
                        if direct is not None:
                            out = direct(values[i])
                        else:
                            body = seen_body.copy()
                            fastjson.put(body, names, values[i])
                            out = verdict.work(verdict.mech, verdict.key, body)
                        parts.append(_OK + verdict.answer(out) + b"}")
                        i += 1
                        continue
                    except Exception:  # the full path below answers it (and audits a refusal)
                        pass
            if audit.REQUEST_ID.get() is not rid:
                audit.REQUEST_ID.set(rid)
            body = request.copy()
            if len(names) == 1:
                body[names[0]] = values[i]  # (fastjson.put inline: the common case)
            else:
                fastjson.put(body, names, values[i])
            i += 1
            got: list[Any] = [None]
            parts.append(self._keyed_item(op, token, body, ident, opened, offloaded, parts, got))
            v = got[0]
            if (
                verdict is None
                and v is not None
                and v.until
                and protocol.REQUEST_ID_FIELD not in request
            ):
                verdict, seen_body = v, body
                direct = v.direct if names == _DATA and op != "verify" else None
                if type(direct) is HmacState and op in B64_ANSWERS:
                    state, head = direct, _OK + B64_ANSWERS[op]
                elif type(v.direct) is HmacState and op == "verify" and names == _DATA_AND_MAC:
                    check = v.direct

    def _keyed_item(
        self,
        op: str,
        token: str | None,
        body: dict[str, Any],
        ident: Identity,
        opened: list[Any],
        offloaded: _Offloads,
        parts: list[bytes],
        got: list[Any] | None = None,
    ) -> bytes:
        """A batch item of a keyed crypto op (_KEYED_OPS) that fastjson decoded, on a store
        whose reads do not block: _keyed's checks in their order (item token, or token in the
        request), without a coroutine; its part of the answer (b"": offloaded). A token an
        earlier item of the batch opened is not opened again (the same str: fastjson gives one
        object per token value), but its expiry is checked again for this item. got: where to
        leave the verdict of an item that passed (handlers_crypto.checked)."""
        shown: dict[str, Any] | None = None  # the body as the audit line sees it (seen[3])
        code: str | None = None
        try:
            if token is None:
                if protocol.REQUEST_ID_FIELD in body:
                    _app._request_id(body)
                shown = body
                token = body.pop(protocol.TOKEN_FIELD, None)
            service = self.service
            if token is not None and token is opened[0]:
                # Service.authenticate's checks: these claims and this identity passed them
                # for an earlier item of this batch; only the expiry can have changed since.
                claims = opened[1]
                if claims.expires <= time.time():
                    raise expired()
            else:
                # The single requests' cache of claims by the token's str (a client's batches
                # carry the token its requests do), with its checks.
                claims = self._token_claims(token, ident)
                opened[0], opened[1] = token, claims
            if shown is None:
                if protocol.REQUEST_ID_FIELD in body:
                    _app._request_id(body)
                if protocol.TOKEN_FIELD in body:
                    raise _app._twice()
                shown = body
            v = service.checked(claims, body, op)
            part: bytes = _OK + v.answer(v.work(v.mech, v.key, body)) + b"}"
            if got is not None:
                got[0] = v
            return part
        except Offloaded as work:
            seen = [protocol.ENDPOINT_BY_OP[op], ident, _app._NO_PARAMS, shown]
            offloaded.append((len(parts), work, seen, audit.REQUEST_ID.get()))
            return b""
        except Exception as exc:  # one item's failure is that item's answer
            code, resp = _app._item_failure(op, exc)
        _app._audit([protocol.ENDPOINT_BY_OP[op], ident, _app._NO_PARAMS, shown], resp, code)
        return b'{"status":%d,"answer":%s}' % (resp.status, resp.body)


async def _run_offloaded(offloaded: _Offloads, parts: list[bytes]) -> None:
    """A batch's offloaded items, all in one thread hand-off; each still gets its own answer
    (or error, with its audit line) as its single request would."""

    def run_all() -> list[tuple[bool, Any]]:
        done: list[tuple[bool, Any]] = []
        for _, work, _, _ in offloaded:
            try:
                done.append((True, work.run()))
            except Exception as exc:  # handed back: answered per item below
                done.append((False, exc))
        return done

    for (i, work, seen, rid), (ok, out) in zip(
        offloaded, await asyncio.to_thread(run_all), strict=True
    ):
        if audit.REQUEST_ID.get() is not rid:
            audit.REQUEST_ID.set(rid)  # the item's own, for its audit line
        code: str | None = None
        if ok:
            resp = work.answer(out)
        elif isinstance(out, ApiError):
            code = out.code
            resp = _app._error(code, out.message)
        else:
            _app.error_log.error("internal error on a batched %s", seen[0].op, exc_info=out)
            code = "INTERNAL"
            resp = _app._error(code, "internal error (logged by the service)")
        if resp.status >= 300:
            _app._audit(seen, resp, code)
        parts[i] = b'{"status":%d,"answer":%s}' % (resp.status, resp.body)


# app.py's helpers (the token's bearer form, refusals, audit lines), shared with the single
# request's path; imported last: app.py imports this module to define App.
from pkcs11ws.server import app as _app  # noqa: E402
