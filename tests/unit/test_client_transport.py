"""pkcs11ws.client.transport: the import-time check that pycurl runs on the system libcurl."""

from __future__ import annotations

import os

import pycurl
import pytest

from pkcs11ws.client import transport

SITE = "/venv/lib/python3.11/site-packages"
SYSTEM_VERSION = "PycURL/7.49.0 libcurl/7.88.1 OpenSSL/3.0.19 zlib/1.2.13 nghttp2/1.52.0"
WHEEL_VERSION = "PycURL/7.45.3 libcurl/8.6.0 OpenSSL/3.0.11 zlib/1.3 brotli/1.1.0"


def maps_line(path: str) -> str:
    return f"7f95be180000-7f95be191000 r--p 00000000 fe:00 5595139                    {path}"


def test_this_process_passes_the_check() -> None:
    with open("/proc/self/maps") as f:
        files = transport._mapped_files(f.read())
    transport.check_system_libcurl(pycurl.version, files, SITE)
    libcurls = [p for p in files if "libcurl" in os.path.basename(p)]
    assert libcurls and all("site-packages" not in p for p in libcurls)


def test_loaded_objects_name_the_same_libcurl() -> None:
    # Inside the module the check reads the core's dl_iterate_phdr list, not /proc/self/maps:
    # the same library, under the name it was loaded by (the soname's symlink).
    from pkcs11ws._native import core

    files = transport._loaded_files()
    assert files is not None
    loaded = [p for p in files if os.path.basename(p).startswith("libcurl")]
    assert loaded and all(transport._system_libcurl_name(os.path.basename(p)) for p in loaded)
    with open("/proc/self/maps") as f:
        mapped = {os.path.realpath(p) for p in transport._mapped_files(f.read())}
    assert {os.path.realpath(p) for p in loaded} <= mapped
    assert [os.fsdecode(n) for n in core.loaded_objects()] == list(files)
    transport.check_system_libcurl(pycurl.version, files, SITE)


@pytest.mark.parametrize(
    ("name", "system"),
    [
        ("libcurl.so.4", True),
        ("libcurl.so.4.8.0", True),
        ("libcurl.so.4.", False),
        ("libcurl.so.4..", True),
        ("libcurl.so.4x", False),
        ("libcurl.so.4.8.0\n", False),
        ("libcurl.so.5", False),
        ("libcurl-gnutls.so.4", False),
        ("libcurl-d4d2c1e8.so.4.8.0", False),
    ],
)
def test_system_libcurl_names(name: str, system: bool) -> None:
    assert transport._system_libcurl_name(name) is system


def test_system_libcurl_accepted() -> None:
    maps = "\n".join(
        maps_line(p)
        for p in (
            "/usr/lib/x86_64-linux-gnu/libcurl.so.4.8.0",
            f"{SITE}/pycurl/_pycurl.cpython-311-x86_64-linux-gnu.so",
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
        )
    )
    transport.check_system_libcurl(SYSTEM_VERSION, transport._mapped_files(maps), SITE)


@pytest.mark.parametrize(
    "libcurl",
    [
        f"{SITE}/pycurl.libs/libcurl-d4d2c1e8.so.4.8.0",  # auditwheel layout
        f"{SITE}/pycurl/libcurl.so.4",  # copied into the package
        "/opt/other.libs/libcurl.so.4.8.0",
        "/usr/lib/x86_64-linux-gnu/libcurl-gnutls.so.4.8.0",  # not the OpenSSL flavour
    ],
)
def test_bundled_libcurl_refused_with_the_fix(libcurl: str) -> None:
    maps = maps_line("/usr/lib/x86_64-linux-gnu/libc.so.6") + "\n" + maps_line(libcurl)
    with pytest.raises(ImportError) as ei:
        transport.check_system_libcurl(WHEEL_VERSION, transport._mapped_files(maps), SITE)
    assert libcurl in str(ei.value)
    assert "-m pip install --force-reinstall --no-deps --no-binary pycurl pycurl" in str(ei.value)


def test_non_openssl_or_unknown_build_refused() -> None:
    with pytest.raises(ImportError, match="not libcurl on OpenSSL"):
        transport.check_system_libcurl("PycURL/7.45.2 libcurl/7.88.1 GnuTLS/3.7.9", [], SITE)


def test_no_mapped_libcurl_refused() -> None:
    maps = maps_line("/usr/lib/x86_64-linux-gnu/libc.so.6")
    with pytest.raises(ImportError, match="no shared libcurl is mapped"):
        transport.check_system_libcurl(SYSTEM_VERSION, transport._mapped_files(maps), SITE)


def test_without_proc_only_the_version_is_checked() -> None:
    transport.check_system_libcurl(SYSTEM_VERSION, None, SITE)


def test_deleted_suffix_and_anonymous_mappings_are_handled() -> None:
    maps = "\n".join(
        [
            "7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]",
            "7ffd3000-7ffd4000 rw-p 00000000 00:00 0",
            maps_line("/usr/lib/x86_64-linux-gnu/libcurl.so.4.8.0 (deleted)"),
        ]
    )
    assert transport._mapped_files(maps) == {"/usr/lib/x86_64-linux-gnu/libcurl.so.4.8.0"}
    transport.check_system_libcurl(SYSTEM_VERSION, transport._mapped_files(maps), SITE)


def test_wheel_layout_refused_before_import(tmp_path) -> None:
    # The PyPI wheel is recognised from its files (pycurl.libs beside the package), so its
    # libcurl and OpenSSL are never loaded into the host.
    from pkcs11ws.client import _curl_boot
    from pkcs11ws.errors import InstallationError

    (tmp_path / "pycurl").mkdir()
    _curl_boot.check_not_wheel(str(tmp_path / "pycurl"))
    (tmp_path / "pycurl.libs").mkdir()
    with pytest.raises(InstallationError) as ei:
        _curl_boot.check_not_wheel(str(tmp_path / "pycurl"))
    assert f"{tmp_path}/pycurl.libs" in ei.value.message
    assert "is the PyPI wheel" in ei.value.message
    assert "fix: " in ei.value.message and "--no-binary pycurl pycurl" in ei.value.message
