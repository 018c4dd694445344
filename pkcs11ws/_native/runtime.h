/*
 * runtime.h: what bootstrap.c (libpkcs11ws.so) hands the real loader (libpkcs11ws-python.so,
 * loader.c) once it has found the Python runtime. The loader holds no path of its own.
 */
#ifndef PKCS11WS_RUNTIME_H
#define PKCS11WS_RUNTIME_H

#include "pkcs11ws_ck.h"

#define P11WS_RUNTIME_ABI 2

struct p11ws_runtime {
    int abi;                /* P11WS_RUNTIME_ABI */
    const char *executable; /* the interpreter: sys.executable, and so its venv or prefix */
    const char *pkg_parent; /* the directory holding the pkcs11ws package */
    const char *site;       /* that interpreter's site-packages (appended to a host's sys.path) */
    int system_site;        /* its pyvenv.cfg has include-system-site-packages = true */
};

/* Exported by the loader: boots (or attaches to) Python once, serialised and remembered;
 * the core's function list, or NULL after a line on stderr saying why. */
typedef CK_FUNCTION_LIST_3_0 *(*p11ws_loader_boot_fn)(const struct p11ws_runtime *rt);

#endif /* PKCS11WS_RUNTIME_H */
