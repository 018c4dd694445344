/*
 * bootstrap.c: libpkcs11ws.so, the file hosts dlopen() (and the install tree's
 * lib/libpkcs11webservices.so, a plain copy of it).
 *
 * It does not link libpython and holds no absolute path: it finds the Python runtime at run time
 * from its own location, loads that runtime's libpython, then dlopen()s the real loader
 * (libpkcs11ws-python.so, loader.c, which links libpython by its soname only) from the package
 * and takes the core's CK_FUNCTION_LIST_3_0 from it. The rules (README "How the module finds
 * Python"):
 *
 *  1. The package. The module's real directory D (dladdr + realpath). If D is
 *     <site>/pkcs11ws/_native, the package is in <site> (a wheel or an editable install). Else, if
 *     D/../runtime/lib/pythonX.Y/site-packages/pkcs11ws/_native exists, that is it (the install
 *     tree made by `python -m pkcs11ws install` and the client tarball: PREFIX/lib holds the
 *     module, PREFIX/runtime is a venv).
 *  2. The interpreter. When <site> is <env>/lib/pythonX.Y/site-packages, <env>/bin/pythonX.Y (a
 *     venv or a Python prefix). For a package in a source tree (an editable install), the
 *     interpreter an in-place build wrote into pkcs11ws/_native/dev-interpreter (never shipped).
 *  3. libpython X.Y. Already in the process (a Python host): that one. Else, from the
 *     interpreter's home: `home` in <env>/pyvenv.cfg, or the real path of its bin/ directory;
 *     <home>/../lib/ then <home>/../lib/<multiarch>/; last, the soname through the system's
 *     library path (Debian's libpython3.11 in /usr/lib/x86_64-linux-gnu).
 *  4. Version. X.Y is the version this module was built for: a host already running another
 *     Python minor version is refused (CKR_GENERAL_ERROR and one line on stderr), and only a
 *     libpythonX.Y is ever loaded.
 *
 * Every failure says what it looked for, once, on stderr, and each C_* call then returns
 * CKR_GENERAL_ERROR. After start-up an exported C_* costs one indirect call; hosts that use
 * C_GetFunctionList/C_GetInterface call the core directly.
 */
#define _GNU_SOURCE /* dladdr, RTLD_DEFAULT */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pkcs11ws_ck.h"
#include "runtime.h"

#if !defined(P11WS_PY_MAJOR) || !defined(P11WS_PY_MINOR) || !defined(P11WS_PY_SONAME)
#error "P11WS_PY_MAJOR, P11WS_PY_MINOR and P11WS_PY_SONAME must be defined by the build"
#endif
#ifndef P11WS_MULTIARCH
#define P11WS_MULTIARCH ""
#endif
#define P11WS_DEV_INTERPRETER "pkcs11ws/_native/dev-interpreter"

#define P11WS_EXPORT __attribute__((visibility("default")))
#define P11WS_STR2(x) #x
#define P11WS_STR(x) P11WS_STR2(x)
#define P11WS_PYVER P11WS_STR(P11WS_PY_MAJOR) "." P11WS_STR(P11WS_PY_MINOR)
#define P11WS_LOADER "libpkcs11ws-python.so"
#define P11WS_RUNTIME_SITE "runtime/lib/python" P11WS_PYVER "/site-packages"


static CK_FUNCTION_LIST_3_0 *p11ws_list;
static pthread_mutex_t p11ws_boot_lock = PTHREAD_MUTEX_INITIALIZER;
static int p11ws_boot_failed;

static void p11ws_say(const char *msg, const char *detail)
{
    fprintf(stderr, "libpkcs11ws: %s%s%s\n", msg, detail ? ": " : "", detail ? detail : "");
    fflush(stderr);
}

static int p11ws_is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int p11ws_is_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Strip the last n components of path (in place); -1 when it has fewer. */
static int p11ws_up(char *path, int n)
{
    while (n-- > 0) {
        char *slash = strrchr(path, '/');
        if (slash == NULL || slash == path)
            return -1;
        *slash = '\0';
    }
    return 0;
}

static int p11ws_ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Rule 1: the directory holding the pkcs11ws package. */
static int p11ws_find_package(char *parent, size_t n)
{
    Dl_info info;
    char dir[PATH_MAX], probe[PATH_MAX + 64];
    if (!dladdr((void *)&p11ws_find_package, &info) || info.dli_fname == NULL ||
        realpath(info.dli_fname, dir) == NULL || p11ws_up(dir, 1) < 0) {
        p11ws_say("cannot find the pkcs11ws package", "the module's own path is unknown");
        return -1;
    }
    if (p11ws_ends_with(dir, "/pkcs11ws/_native")) {
        snprintf(probe, sizeof probe, "%s", dir);
        if (p11ws_up(probe, 2) == 0 && strlen(probe) < n) {
            strcpy(parent, probe);
            return 0;
        }
    }
    snprintf(probe, sizeof probe, "%s/../" P11WS_RUNTIME_SITE "/pkcs11ws/_native", dir);
    if (p11ws_is_dir(probe) && realpath(probe, parent) != NULL && strlen(parent) < n &&
        p11ws_up(parent, 2) == 0)
        return 0;
    snprintf(probe, sizeof probe, "neither %s/pkcs11ws/_native nor %s/../" P11WS_RUNTIME_SITE
             "/pkcs11ws/_native exists", dir, dir);
    p11ws_say("cannot find the pkcs11ws package next to the module", probe);
    return -1;
}

/* Rule 2: the interpreter, and its environment's site-packages. */
static int p11ws_find_python(const char *parent, char *exe, size_t n, char *site, size_t sn)
{
    char env[PATH_MAX];
    if (p11ws_ends_with(parent, "/lib/python" P11WS_PYVER "/site-packages") &&
        strlen(parent) < sizeof env) {
        strcpy(env, parent);
        (void)p11ws_up(env, 3);
        if ((size_t)snprintf(exe, n, "%s/bin/python" P11WS_PYVER, env) < n && p11ws_is_file(exe)) {
            snprintf(site, sn, "%s", parent);
            return 0;
        }
        char msg[PATH_MAX + 96];
        snprintf(msg, sizeof msg, "%s/bin/python" P11WS_PYVER " does not exist", env);
        p11ws_say("cannot find the Python " P11WS_PYVER " runtime", msg);
        return -1;
    }
    char dev[PATH_MAX + 64];
    snprintf(dev, sizeof dev, "%s/" P11WS_DEV_INTERPRETER, parent);
    FILE *f = fopen(dev, "re");
    if (f != NULL) {
        /* An in-place build: its interpreter's venv has lib/pythonX.Y/site-packages. */
        int got = fgets(exe, (int)n, f) != NULL;
        fclose(f);
        exe[strcspn(exe, "\r\n")] = '\0';
        if (got && exe[0] == '/' && p11ws_is_file(exe)) {
            char env2[PATH_MAX];
            snprintf(env2, sizeof env2, "%s", exe);
            if (p11ws_up(env2, 2) == 0)
                snprintf(site, sn, "%s/lib/python" P11WS_PYVER "/site-packages", env2);
            else
                site[0] = '\0';
            return 0;
        }
    }
    char msg[PATH_MAX + 96];
    snprintf(msg, sizeof msg, "the package in %s is not in a lib/python" P11WS_PYVER
             "/site-packages folder, and %s names no interpreter", parent, dev);
    p11ws_say("cannot find the Python " P11WS_PYVER " runtime", msg);
    return -1;
}

/* The value of `KEY = VALUE` in ENV/pyvenv.cfg into out; 0 when found. */
static int p11ws_venv_value(const char *env, const char *key, char *out, size_t n)
{
    char path[PATH_MAX + 16], line[PATH_MAX + 32];
    size_t klen = strlen(key);
    snprintf(path, sizeof path, "%s/pyvenv.cfg", env);
    FILE *f = fopen(path, "re");
    int rc = -1;
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof line, f) != NULL) {
        char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (strncmp(p, key, klen) != 0)
            continue;
        p += klen;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p++ != '=')
            continue;
        while (*p == ' ' || *p == '\t')
            p++;
        p[strcspn(p, "\r\n")] = '\0';
        size_t len = strlen(p);
        while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t'))
            p[--len] = '\0';
        if (len > 0 && len < n) {
            strcpy(out, p);
            rc = 0;
        }
        break;
    }
    fclose(f);
    return rc;
}

/* `home = DIR` of ENV/pyvenv.cfg into out; 0 when found. */
static int p11ws_venv_home(const char *env, char *out, size_t n)
{
    return p11ws_venv_value(env, "home", out, n);
}

/* 1 when the venv of the interpreter exe also sees the base Python's site-packages
 * (`include-system-site-packages = true`): the loader then runs site.main() to add them. */
static int p11ws_system_site(const char *exe)
{
    char env[PATH_MAX], value[16];
    snprintf(env, sizeof env, "%s", exe);
    return p11ws_up(env, 2) == 0 &&
           p11ws_venv_value(env, "include-system-site-packages", value, sizeof value) == 0 &&
           strcasecmp(value, "true") == 0;
}

/* Rule 3: make libpythonX.Y part of the process, visible to the extensions (RTLD_GLOBAL).
 * RTLD_LAZY: a libpython built without -fno-semantic-interposition (pyenv's default) calls its
 * own API through ~1400 PLT slots, and binding them all up front cost ~0.9 M instructions of
 * pkcs11-tool -L; what it imports is libc's and libm's, so nothing can be missing later. */
static int p11ws_load_libpython(const char *exe)
{
    char env[PATH_MAX], home[PATH_MAX], cand[PATH_MAX + 96];
    void *h = dlopen(P11WS_PY_SONAME, RTLD_LAZY | RTLD_NOLOAD | RTLD_GLOBAL);
    if (h != NULL)
        return 0;
    snprintf(env, sizeof env, "%s", exe);
    if (p11ws_up(env, 2) < 0 || p11ws_venv_home(env, home, sizeof home) < 0) {
        /* Not a venv: the interpreter's own bin/ directory, symlinks resolved. */
        if (realpath(exe, home) == NULL || p11ws_up(home, 1) < 0)
            home[0] = '\0';
    }
    if (home[0] != '\0') {
        const char *subdirs[] = {"lib", "lib/" P11WS_MULTIARCH};
        for (size_t i = 0; i < sizeof subdirs / sizeof subdirs[0]; i++) {
            if (i == 1 && P11WS_MULTIARCH[0] == '\0')
                continue;
            snprintf(cand, sizeof cand, "%s/../%s/" P11WS_PY_SONAME, home, subdirs[i]);
            if (p11ws_is_file(cand) && (h = dlopen(cand, RTLD_LAZY | RTLD_GLOBAL)) != NULL)
                return 0;
        }
    }
    h = dlopen(P11WS_PY_SONAME, RTLD_LAZY | RTLD_GLOBAL);
    if (h != NULL)
        return 0;
    char msg[PATH_MAX + 160];
    snprintf(msg, sizeof msg, "looked in %s/../lib and the system's library path (%s); install "
             "the runtime of %s (Debian: libpython" P11WS_PYVER ")",
             home[0] ? home : "(no home)", dlerror(), exe);
    p11ws_say("cannot load " P11WS_PY_SONAME, msg);
    return -1;
}

/* Rule 4: a Python already in the process must be X.Y. */
static int p11ws_host_python_ok(void)
{
    const char *(*get_version)(void) = (const char *(*)(void))dlsym(RTLD_DEFAULT, "Py_GetVersion");
    if (get_version == NULL)
        return 1;
    const char *have = get_version();
    if (strncmp(have, P11WS_PYVER ".", strlen(P11WS_PYVER ".")) == 0)
        return 1;
    char msg[160];
    snprintf(msg, sizeof msg, "built for Python " P11WS_PYVER " but the host process runs "
             "Python %.*s", (int)strcspn(have, " "), have);
    p11ws_say("refusing to load", msg);
    return 0;
}

/* Rules 1-4, once: the runtime found and the loader's entry point. Needs no GIL. */
static struct p11ws_runtime p11ws_rt;
static p11ws_loader_boot_fn p11ws_loader_boot;

static int p11ws_resolve(void)
{
    static char exe[PATH_MAX], parent[PATH_MAX], site[PATH_MAX];
    char loader[PATH_MAX + 64];
    if (!p11ws_host_python_ok() || p11ws_find_package(parent, sizeof parent) < 0 ||
        p11ws_find_python(parent, exe, sizeof exe, site, sizeof site) < 0 ||
        p11ws_load_libpython(exe) < 0)
        return -1;
    snprintf(loader, sizeof loader, "%s/pkcs11ws/_native/" P11WS_LOADER, parent);
    void *h = dlopen(loader, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        p11ws_say("cannot load the loader", dlerror());
        return -1;
    }
    p11ws_loader_boot = (p11ws_loader_boot_fn)dlsym(h, "p11ws_loader_boot");
    if (p11ws_loader_boot == NULL) {
        p11ws_say("cannot load the loader", "p11ws_loader_boot is missing");
        return -1;
    }
    p11ws_rt = (struct p11ws_runtime){P11WS_RUNTIME_ABI, exe, parent, site, p11ws_system_site(exe)};
    return 0;
}

static int p11ws_boot(void)
{
    int rc;
    pthread_mutex_lock(&p11ws_boot_lock);
    if (p11ws_loader_boot != NULL)
        rc = 0;
    else if (p11ws_boot_failed)
        rc = -1;
    else {
        rc = p11ws_resolve();
        p11ws_boot_failed = rc != 0;
    }
    pthread_mutex_unlock(&p11ws_boot_lock);
    if (rc != 0)
        return -1;
    /* Not under the lock: the loader's boot takes the GIL, which a Python host's thread may hold
     * while it waits here; the loader serialises (and remembers) its own boot. */
    CK_FUNCTION_LIST_3_0 *list = p11ws_loader_boot(&p11ws_rt);
    if (list == NULL)
        return -1; /* the loader said why */
    __atomic_store_n(&p11ws_list, list, __ATOMIC_RELEASE);
    return 0;
}

#define P11WS_ENTER()                                                                   \
    do {                                                                                \
        if (__builtin_expect(__atomic_load_n(&p11ws_list, __ATOMIC_ACQUIRE) == NULL, 0) \
            && p11ws_boot() != 0)                                                       \
            return CKR_GENERAL_ERROR;                                                   \
    } while (0)

#include "trampolines.h"
