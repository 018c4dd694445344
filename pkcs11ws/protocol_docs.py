"""Renderings of pkcs11ws.protocol: the OpenAPI document the service serves and docs/protocol.md.

Both are generated from the one schema, so they cannot drift from the code;
`python -m pkcs11ws.protocol_docs > docs/protocol.md` regenerates the Markdown and
tests/unit/test_protocol.py checks the committed file is current.
"""

from __future__ import annotations

import sys
from typing import Any

from pkcs11ws import constants as C
from pkcs11ws import protocol as P


def _json_schema(kind: str) -> dict[str, Any]:
    if kind == "str":
        return {"type": "string"}
    if kind == "bytes":
        return {"type": "string", "format": "byte"}
    if kind == "int":
        return {"type": "integer", "minimum": 0}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "object":
        return {"type": "object"}
    if kind == "attrs":
        return {"$ref": "#/components/schemas/Attributes"}
    if kind.startswith("list:"):
        return {"type": "array", "items": {"$ref": f"#/components/schemas/{kind[5:]}"}}
    return {"$ref": f"#/components/schemas/{kind}"}


def _struct_schema(s: P.Struct) -> dict[str, Any]:
    props = {}
    for f in s.fields:
        sch = _json_schema(f.kind)
        if f.doc:
            sch = {**sch, "description": f.doc}
        if f.max_len and f.kind in ("str", "bytes"):
            sch = {**sch, "x-max-length": f.max_len}
        props[f.name] = sch
    out: dict[str, Any] = {
        "type": "object",
        "description": s.doc,
        "properties": props,
        "additionalProperties": False,
    }
    req = [f.name for f in s.fields if f.required]
    if req:
        out["required"] = req
    return out


def _attrs_schema() -> dict[str, Any]:
    kinds = {
        P.BOOL: {"type": "boolean"},
        P.ULONG: {"type": "integer", "minimum": 0},
        P.BYTES: {"type": "string", "format": "byte"},
        P.ULONGS: {"type": "array", "items": {"type": "integer", "minimum": 0}},
    }
    return {
        "type": "object",
        "description": "PKCS#11 attributes by name; CK_BBOOL as boolean, CK_ULONG as integer, "
        "byte arrays (labels, ids, values, dates) as base64.",
        "properties": {a.name: kinds[a.kind] for a in P.ATTRIBUTES},
        "additionalProperties": False,
    }


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.0 document of the service."""
    schemas: dict[str, Any] = {n: _struct_schema(s) for n, s in P.STRUCTS.items()}
    schemas["Attributes"] = _attrs_schema()
    paths: dict[str, Any] = {}
    for ep in P.ENDPOINTS:
        params: list[dict[str, Any]] = [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in ep.pattern.groupindex
        ]
        params += [
            {"name": q, "in": "query", "required": False, "schema": {"type": "boolean"}}
            for q in ep.query
        ]
        if ep.idempotent:
            params.append(
                {
                    "name": P.IDEMPOTENCY_HEADER,
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string", "pattern": P.IDEMPOTENCY_RE.pattern},
                }
            )
        errs = sorted({*ep.errors, *P.COMMON_ERRORS} - {"NOT_FOUND", "METHOD_NOT_ALLOWED"})
        responses: dict[str, Any] = {
            "200": {
                "description": "OK",
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{ep.response}"}}
                },
            },
        }
        for status in sorted({P.ERRORS[e].http for e in errs}):
            codes = [e for e in errs if P.ERRORS[e].http == status]
            responses[str(status)] = {
                "description": "Error: " + ", ".join(codes),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        op: dict[str, Any] = {
            "operationId": ep.op,
            "summary": ep.doc,
            "responses": responses,
            "x-access": ep.access,
        }
        if params:
            op["parameters"] = params
        if ep.request != "Empty" or ep.method == "POST":
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{ep.request}"}}
                },
            }
        if ep.auth:
            op["security"] = [{"activation": []}]
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "pkcs11ws key service", "version": P.VERSION},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"activation": {"type": "http", "scheme": "bearer"}},
        },
    }


def markdown() -> str:
    """docs/protocol.md."""
    out = [
        "# pkcs11ws key service protocol",
        "",
        "<!-- Generated by `python -m pkcs11ws.protocol_docs`; edit pkcs11ws/protocol.py. -->",
        "",
        f"Protocol version {P.VERSION}. JSON over HTTPS with mutual TLS (TLS 1.2 or newer; the "
        "client presents a certificate signed by the service's CA). Binary fields are standard "
        "base64 (strict: no whitespace, correct padding). Unknown fields are rejected. The "
        f"service serves this as OpenAPI at `{P.OPENAPI_PATH}`.",
        "",
        "- Activation: `POST /km/v1/softcards/{card}/activate` returns a sealed token; send it as "
        f"`{P.TOKEN_HEADER}: Bearer TOKEN` on every call marked *auth*, or, in the crypto requests "
        f"(encrypt, decrypt, sign, verify and their batch items), as the body's `{P.TOKEN_FIELD}` "
        "field: one place per request, never both (BAD_REQUEST). Any worker process can "
        "open it; `deactivate` revokes it.",
        f"- Idempotency: calls marked *idem* need an `{P.IDEMPOTENCY_HEADER}` header "
        f"(`{P.IDEMPOTENCY_RE.pattern}`). Repeating a key with the same request returns the "
        "first answer and changes nothing; the same key with another request is "
        "`IDEMPOTENCY_CONFLICT`.",
        '- Errors: every failure answers `{"code": ..., "message": ...}` with the HTTP status '
        "below; the module returns the CKR listed. 5xx and network failures are retried by "
        "the module (MAXRETRIES, RETRYDELAY); 4xx never are.",
        "",
        f"- Request ids: the module sends `{P.REQUEST_ID_HEADER}` "
        f"(`{P.REQUEST_ID_RE.pattern}`) with every request (a single crypto request carries "
        f"it as the body's `{P.REQUEST_ID_FIELD}` field instead); the service writes it in its "
        "audit trail, so one operation can be followed across the module's log and the "
        "service's.",
        "",
        "## Identities and roles",
        "",
        "Every client certificate maps to a named identity in the service's clients file, with a "
        "role: `admin` manages every softcard; `app` sees, activates and uses only the softcards "
        "it created (it is their owner) or was granted by their owner, and deletes only those "
        "it owns. Other softcards do not exist for it. A certificate "
        "of the CA that the clients file does not list (or that was revoked) gets "
        "`CLIENT_NOT_AUTHORIZED` on every request. An activation token works only over "
        "connections of the identity that obtained it. Deleting a softcard needs its owner or "
        "an admin, not the passphrase (the passphrase guards the keys' secrecy; an admin must "
        "be able to remove a softcard whose passphrase is lost). A grant lets another identity "
        "see the softcard and activate it with the passphrase; it never lets it delete the "
        "softcard or grant further. The `who` column below refers to:",
        "",
        *(f"- `{name}`: {text}." for name, text in P.ACCESS.items()),
        "",
        "## Endpoints",
        "",
        "| method | path | request | response | flags | who | what |",
        "|---|---|---|---|---|---|---|",
    ]
    for ep in P.ENDPOINTS:
        flags = " ".join(f for f, on in (("auth", ep.auth), ("idem", ep.idempotent)) if on)
        q = "?" + "&".join(f"{n}=true" for n in ep.query) if ep.query else ""
        out.append(
            f"| {ep.method} | `{ep.path}{q}` | {ep.request} | {ep.response} | {flags} | "
            f"{ep.access} | {ep.doc} Errors: {', '.join(ep.errors) or '-'}. |"
        )
    out += ["", "## Structures", ""]
    for s in P.STRUCTS.values():
        out.append(f"### {s.name}")
        out.append("")
        out.append(s.doc)
        out.append("")
        if s.fields:
            out += ["| field | type | required | notes |", "|---|---|---|---|"]
            for f in s.fields:
                kind = "base64" if f.kind == "bytes" else f.kind
                out.append(f"| `{f.name}` | {kind} | {'yes' if f.required else 'no'} | {f.doc} |")
            out.append("")
    out += [
        "## Attributes",
        "",
        "Objects carry PKCS#11 attributes by name. CK_BBOOL travels as a JSON boolean, CK_ULONG "
        "as an integer, a CK_ULONG array (CKA_ALLOWED_MECHANISMS) as a list of integers, byte "
        "arrays (labels, ids, values, dates) as base64, so every value "
        "round-trips byte for byte.",
        "",
        "| attribute | code | JSON type |",
        "|---|---|---|",
    ]
    kinds = {P.BOOL: "boolean", P.ULONG: "integer", P.BYTES: "base64", P.ULONGS: "list of integers"}
    out += [f"| `{a.name}` | 0x{a.code:08X} | {kinds[a.kind]} |" for a in P.ATTRIBUTES]
    out += ["", "## Error codes", "", "| code | HTTP | CKR | meaning |", "|---|---|---|---|"]
    out += [
        f"| `{e.code}` | {e.http} | `{C.ckr_name(e.ckr)}` | {e.doc} |" for e in P.ERRORS.values()
    ]
    out += [
        "",
        "A response whose body is not a JSON error maps by its HTTP status: 401/403 -> "
        "`CKR_USER_NOT_LOGGED_IN`, 404 -> `CKR_OBJECT_HANDLE_INVALID`, 413 -> "
        "`CKR_DATA_LEN_RANGE`, other 4xx -> `CKR_ARGUMENTS_BAD`, 5xx (after retries) -> "
        "`CKR_DEVICE_ERROR`.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
