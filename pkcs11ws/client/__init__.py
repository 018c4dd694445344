"""The module's client side below the provider: the key service protocol client and its
pycurl transport. Importing it checks that pycurl runs on the system libcurl (design.md 3).
"""

from pkcs11ws.client import _curl_boot  # noqa: F401 -- first: pycurl without async_multi
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.client.transport import CurlFailure, Transport

__all__ = ["CurlFailure", "KeyServiceClient", "Transport"]
