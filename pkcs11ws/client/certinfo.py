"""When the client certificate (CERT) stops being valid, read without importing cryptography.

C_Initialize warns when CERT has expired or expires within EXPIRY_WARNING_DAYS (issue 10): the
service would refuse it. Importing cryptography.x509 costs ~200 ms at start-up on the reference
machine (it pulls in typing and the whole x509 stack), so this reads the one field it needs,
the validity period of the first PEM certificate, with a minimal DER walk (X.509: Certificate ->
TBSCertificate -> [version], serialNumber, signature, issuer, validity). tests check it against
cryptography's reading of real certificates.
"""

from __future__ import annotations

import binascii

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from typing import Final

EXPIRY_WARNING_DAYS: Final = 30
_BEGIN: Final = b"-----BEGIN CERTIFICATE-----"
_END: Final = b"-----END CERTIFICATE-----"


class _Bad(Exception):
    pass


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at pos."""
    if pos + 2 > len(der):
        raise _Bad
    tag, first = der[pos], der[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(der):
            raise _Bad
        length = int.from_bytes(der[pos : pos + n], "big")
        pos += n
    if pos + length > len(der):
        raise _Bad
    return tag, pos, pos + length


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _time(der: bytes, tag: int, start: int, end: int) -> int:
    text = der[start:end].decode("ascii")
    if tag == 0x17 and len(text) == 13 and text.endswith("Z"):  # UTCTime YYMMDDHHMMSSZ
        yy = int(text[:2])
        year, rest = (1900 + yy if yy >= 50 else 2000 + yy), text[2:]
    elif tag == 0x18 and len(text) == 15 and text.endswith("Z"):  # GeneralizedTime
        year, rest = int(text[:4]), text[4:]
    else:
        raise _Bad
    if not rest[:-1].isdigit():
        raise _Bad
    mo, d, h, mi, s = (int(rest[i : i + 2]) for i in range(0, 10, 2))
    return _days_from_civil(year, mo, d) * 86400 + h * 3600 + mi * 60 + s


def validity(pem: bytes) -> tuple[int, int] | None:
    """(notBefore, notAfter) of the first PEM certificate in pem, in Unix seconds; None when
    pem holds no certificate this reader understands."""
    begin = pem.find(_BEGIN)
    end = pem.find(_END, begin)
    if begin < 0 or end < 0:
        return None
    try:
        der = binascii.a2b_base64(b"".join(pem[begin + len(_BEGIN) : end].split()))
        tag, pos, _ = _tlv(der, 0)  # Certificate
        if tag != 0x30:
            raise _Bad
        tag, pos, _ = _tlv(der, pos)  # TBSCertificate
        if tag != 0x30:
            raise _Bad
        tag, _, after = _tlv(der, pos)
        if tag == 0xA0:  # [0] version
            pos = after
        for expected in (0x02, 0x30, 0x30):  # serialNumber, signature, issuer
            tag, _, pos = _tlv(der, pos)
            if tag != expected:
                raise _Bad
        tag, pos, _ = _tlv(der, pos)  # validity
        if tag != 0x30:
            raise _Bad
        tag, start, stop = _tlv(der, pos)
        not_before = _time(der, tag, start, stop)
        tag, start, stop = _tlv(der, stop)
        return not_before, _time(der, tag, start, stop)
    except (_Bad, ValueError, binascii.Error):
        return None


def _date(t: int) -> str:
    # Civil date from days (the inverse of _days_from_civil), so no datetime import either.
    z = t // 86400 + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    y = yoe + era * 400 + (m <= 2)
    s = t % 86400
    return f"{y:04d}-{m:02d}-{d:02d} {s // 3600:02d}:{s // 60 % 60:02d} UTC"


def expiry_warning(path: str, now: float) -> str | None:
    """The warning C_Initialize logs about the certificate in path, or None when it is valid
    for more than EXPIRY_WARNING_DAYS days (or cannot be read: libcurl will say why)."""
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError:
        return None
    period = validity(pem)
    if period is None:
        return None
    not_before, not_after = period
    if now >= not_after:
        return (f"CERT {path} expired on {_date(not_after)}: the key service will refuse "
                "this client certificate; issue a new one")  # fmt: skip
    if now < not_before:
        return (f"CERT {path} is not valid before {_date(not_before)}: check this machine's "
                "clock; the key service will refuse it until then")  # fmt: skip
    days = int((not_after - now) // 86400)
    if days < EXPIRY_WARNING_DAYS:
        return (f"CERT {path} expires on {_date(not_after)} (in {days} days): the key "
                "service will refuse it from then on; issue a new one")  # fmt: skip
    return None
