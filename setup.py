"""Build glue: the Cython core (pkcs11ws/_native/core) and the two halves of the PKCS#11 module.

The module is not a Python extension: it is what hosts dlopen(). It is built after the
extensions and lands next to them in pkcs11ws/_native/, in two files (design.md section 2):
  libpkcs11ws.so         bootstrap.c: exports only C_*, links no libpython and holds no path;
                         at first use it finds the Python runtime from its own location (rules in
                         bootstrap.c and the README) and loads that runtime's libpython
  libpkcs11ws-python.so  loader.c: boots or attaches to Python and imports the core; links
                         libpython by soname, without an RPATH (it includes core_api.h, which
                         cythonize writes)
Both use hidden visibility plus a version script and are linked -z nodelete. Only an in-place
(editable) build, never shipped, records the interpreter that built it, in a file beside them.
"""

from __future__ import annotations

import os
import sys
import sysconfig

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

NATIVE = os.path.join("pkcs11ws", "_native")
BOOT_NAME = "libpkcs11ws.so"
LOADER_NAME = "libpkcs11ws-python.so"
HEADERS = [
    os.path.join("include", n) for n in ("pkcs11ws_ck.h", "pkcs11ws_const.h", "pkcs11ws_funcs.h")
]
BOOT_DEPENDS = [os.path.join(NATIVE, n) for n in ("bootstrap.c", "trampolines.h", "runtime.h")]
LOADER_DEPENDS = [
    os.path.join(NATIVE, n) for n in ("loader.c", "pyglue.h", "core_api.h", "runtime.h")
]
BOOT_MAP = "{ global: C_*; local: *; };\n"
LOADER_MAP = "{ global: p11ws_loader_boot; local: *; };\n"
CFLAGS = ["-fvisibility=hidden", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fPIC"]


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# conf/ holds the one example configuration; wheels carry it as package data (the install
# command and `make dist` copy it from there).
EXAMPLE_CONFIG = os.path.join("conf", "example_pkcs11webservices.cfg")
DATA_DIR = os.path.join("pkcs11ws", "_data")


class BuildPyWithData(build_py):
    """build_py, plus conf/example_pkcs11webservices.cfg as pkcs11ws/_data/ package data."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            target = os.path.join(self.build_lib, DATA_DIR)
            self.mkpath(target)
            self.copy_file(EXAMPLE_CONFIG, target)


class BuildExtWithLoader(build_ext):
    """build_ext, then the module's two shared objects into the same package directory."""

    def run(self) -> None:
        super().run()
        self.build_module()

    def build_extensions(self) -> None:
        # Some interpreters (pyenv's) put -Wl,-rpath,<their lib dir> into LDSHARED: keep every
        # shipped object free of build-machine paths.
        # Debug sections name the build folder and header paths: shipped objects go without.
        self.compiler.linker_so = [
            a for a in self.compiler.linker_so if not a.startswith(("-Wl,-rpath", "-Wl,-R"))
        ] + ["-Wl,--strip-debug"]
        super().build_extensions()

    def native_path(self, name: str) -> str:
        core = self.get_ext_fullpath("pkcs11ws._native.core")
        return os.path.join(os.path.dirname(core), name)

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), self.native_path(BOOT_NAME), self.native_path(LOADER_NAME)]

    def _stale(self, out: str, depends: list[str]) -> bool:
        newest = max(os.path.getmtime(p) for p in [*depends, *HEADERS, __file__])
        return self.force or not os.path.exists(out) or os.path.getmtime(out) < newest

    def _link(
        self,
        name: str,
        sources: list[str],
        version_map: str,
        macros: list[tuple[str, str]],
        include_dirs: list[str],
        libraries: list[str],
        library_dirs: list[str],
    ) -> None:
        os.makedirs(self.build_temp, exist_ok=True)
        script = os.path.join(self.build_temp, name + ".map")
        with open(script, "w") as f:
            f.write(version_map)
        cc = self.compiler
        objects = cc.compile(
            sources,
            output_dir=self.build_temp,
            macros=macros,
            include_dirs=["include", NATIVE, *include_dirs],
            extra_postargs=CFLAGS,
        )
        cc.link_shared_object(
            objects,
            self.native_path(name),
            libraries=libraries,
            library_dirs=library_dirs,
            extra_postargs=[
                f"-Wl,--version-script={script}",
                "-Wl,-z,nodelete",
                "-Wl,--no-undefined",
            ],
        )

    def build_module(self) -> None:
        if self.inplace:
            # An editable install: the package stays in the source tree, where no rule finds
            # the interpreter; bootstrap.c reads it from this file (git-ignored, never shipped).
            with open(os.path.join(NATIVE, "dev-interpreter"), "w") as f:
                f.write(sys.executable + "\n")
        soname = sysconfig.get_config_var("INSTSONAME") or ""
        ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
        if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not ldlib.startswith("lib"):
            raise SystemExit("libpkcs11ws.so needs a Python built with --enable-shared")
        if self._stale(self.native_path(LOADER_NAME), LOADER_DEPENDS):
            # libpython by soname at link time only: no RPATH/RUNPATH (bootstrap.c loads it).
            self._link(
                LOADER_NAME,
                [os.path.join(NATIVE, "loader.c")],
                LOADER_MAP,
                [],
                [sysconfig.get_paths()["include"]],
                [ldlib[3:].split(".so")[0], "dl", "pthread"],
                [sysconfig.get_config_var("LIBDIR")],
            )
        if self._stale(self.native_path(BOOT_NAME), BOOT_DEPENDS):
            macros = [
                ("P11WS_PY_MAJOR", str(sys.version_info.major)),
                ("P11WS_PY_MINOR", str(sys.version_info.minor)),
                ("P11WS_PY_SONAME", _c_string(soname)),
                ("P11WS_MULTIARCH", _c_string(sysconfig.get_config_var("MULTIARCH") or "")),
            ]
            self._link(
                BOOT_NAME,
                [os.path.join(NATIVE, "bootstrap.c")],
                BOOT_MAP,
                macros,
                [],
                ["dl", "pthread"],
                [],
            )


extensions = [
    Extension(
        "pkcs11ws._native.core",
        [os.path.join(NATIVE, "core.pyx")],
        include_dirs=["include", NATIVE],
        depends=[
            os.path.join(NATIVE, n)
            for n in (
                "tables.pxi",
                "objects.pxi",
                "fastpath.pxi",
                "crypto.pxi",
                "multipart.pxi",
                "funcs.pxi",
                "ck.pxd",
                "ck_gen.pxd",
                "tables.pxd",
                "digest.pxi",
                "params.pxi",
                "wake.pxi",
                "mech_gen.pxd",
                "pyglue.h",
                "probe.h",
            )
        ],
    ),
    # The key service's SQLite change mark (sqlmark.pyx): no library linked, see there.
    Extension("pkcs11ws._native.sqlmark", [os.path.join(NATIVE, "sqlmark.pyx")]),
    # The key service's compiled hot-path helpers (HMAC pad states, base64): libcrypto's SHA-2
    # block functions, which OpenSSL 3 marks deprecated but keeps (the EVP layer costs an
    # allocation and a provider fetch per hash, the thing this avoids).
    Extension(
        "pkcs11ws.server._hot",
        [os.path.join("pkcs11ws", "server", "_hot.pyx")],
        libraries=["crypto"],
        define_macros=[("OPENSSL_SUPPRESS_DEPRECATED", "1")],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False},
    ),
    cmdclass={"build_ext": BuildExtWithLoader, "build_py": BuildPyWithData},
)
