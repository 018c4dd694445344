/*
 * loader.c: libpkcs11ws-python.so, the half of the PKCS#11 module that links libpython.
 *
 * Hosts dlopen() libpkcs11ws.so (bootstrap.c), which exports the C_* functions (one-line
 * trampolines generated into trampolines.h), finds the Python runtime, loads its libpython and
 * then this file, and calls p11ws_loader_boot() once, which: refuses to run inside a host whose Python is another minor version, re-opens
 * libpython RTLD_GLOBAL (hosts load modules RTLD_LOCAL, and the extension modules we import need
 * libpython's symbols), boots an isolated CPython (or attaches to the host's), imports the Cython
 * core pkcs11ws._native.core and takes its CK_FUNCTION_LIST_3_0 through a `cdef api` capsule.
 * From then on every C_* call goes straight into the core; the loader adds no hop. It also owns
 * the fork handlers that keep the interpreter consistent across fork() (design.md section 2).
 * Python is never finalised: the host may be Python itself, and threads may still be inside.
 *
 * It holds no path: bootstrap.c passes the runtime it found (runtime.h): the interpreter (whose
 * environment, e.g. a venv's site-packages, the booted Python uses), the directory holding the
 * pkcs11ws package, and that interpreter's site-packages (appended to a host interpreter's
 * sys.path so the provider's dependencies import inside, say, the system python3 running PyKCS11).
 * It links libpython by soname with no RPATH: bootstrap.c has loaded the right one already.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <limits.h>
#include <stdint.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pkcs11ws_ck.h"
#include "pyglue.h"
#include "core_api.h"
#include "runtime.h"

#define P11WS_EXPORT __attribute__((visibility("default")))

static CK_FUNCTION_LIST_3_0 *p11ws_list;
static pthread_mutex_t p11ws_boot_lock = PTHREAD_MUTEX_INITIALIZER;
static int p11ws_boot_failed;
static __thread int p11ws_in_boot; /* this thread is inside p11ws_boot() */
static const struct p11ws_runtime *p11ws_rt; /* bootstrap.c's, static there */

static void p11ws_say(const char *msg, const char *detail)
{
    fprintf(stderr, "libpkcs11ws: %s%s%s\n", msg, detail ? ": " : "", detail ? detail : "");
    fflush(stderr);
}

/* ---- fork handlers ---------------------------------------------------------------------- */

static int p11ws_fork_stepped_aside;
static PyGILState_STATE p11ws_fork_gil;

static void p11ws_fork_prepare(void)
{
    if (p11ws_list == NULL)
        return;
    if (PyGILState_Check()) {
        /* The forking thread holds the GIL: Python's own os.fork() is running and does
         * PyOS_BeforeFork/AfterFork itself; taking the GIL again would deadlock. */
        p11ws_fork_stepped_aside = 1;
    } else {
        p11ws_fork_stepped_aside = 0;
        p11ws_adopt_thread();
        p11ws_fork_gil = PyGILState_Ensure();
        PyOS_BeforeFork();
    }
    p11ws_core_fork(0);
}

static void p11ws_fork_parent(void)
{
    if (p11ws_list == NULL)
        return;
    p11ws_core_fork(1);
    if (!p11ws_fork_stepped_aside) {
        PyOS_AfterFork_Parent();
        PyGILState_Release(p11ws_fork_gil);
    }
}

static void p11ws_fork_child(void)
{
    if (p11ws_list == NULL)
        return;
    p11ws_core_fork(2);
    if (!p11ws_fork_stepped_aside) {
        /* Runs the os.register_at_fork(after_in_child=...) hooks, which drop the inherited
         * curl handles without closing them (pkcs11ws.client.transport.reset_after_fork). */
        PyOS_AfterFork_Child();
        PyGILState_Release(p11ws_fork_gil);
    }
}

/* ---- start-up ---------------------------------------------------------------------------- */

static int p11ws_version_ok(void)
{
    char want[16];
    const char *have = Py_GetVersion();
    snprintf(want, sizeof want, "%d.%d.", PY_MAJOR_VERSION, PY_MINOR_VERSION);
    if (strncmp(have, want, strlen(want)) == 0)
        return 1;
    char msg[160];
    snprintf(msg, sizeof msg, "built for Python %d.%d but the host process runs Python %.*s",
             PY_MAJOR_VERSION, PY_MINOR_VERSION, (int)strcspn(have, " "), have);
    p11ws_say("refusing to load", msg);
    return 0;
}

static int p11ws_start_python(void)
{
    PyStatus status;
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    /* The host (a JVM, a C program) owns the signals. */
    config.install_signal_handlers = 0;
    /* No site: sys.path gets exactly what the module needs (p11ws_import_core). */
    config.site_import = 0;
    status = PyConfig_SetBytesString(&config, &config.program_name, p11ws_rt->executable);
    if (!PyStatus_Exception(status))
        status = PyConfig_SetBytesString(&config, &config.executable, p11ws_rt->executable);
    if (!PyStatus_Exception(status))
        status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        p11ws_say("cannot start Python", status.err_msg);
        return -1;
    }
    /* Keep the main thread state (this thread stays known to Python) but drop the GIL. */
    (void)PyEval_SaveThread();
    return 0;
}

/* Append a directory to sys.path unless it is there (with the GIL). */
static int p11ws_path_append(PyObject *path, const char *entry)
{
    if (entry[0] == '\0')
        return 0;
    PyObject *dir = PyUnicode_DecodeFSDefault(entry);
    int rc = dir == NULL ? -1 : PySequence_Contains(path, dir);
    if (rc == 0)
        rc = PyList_Append(path, dir);
    Py_XDECREF(dir);
    return rc < 0 ? -1 : 0;
}

/* With the GIL, in an interpreter booted without site, for a venv that includes the base
 * Python's site-packages: site.main() as Py_Initialize would run it (the venv's prefix, both
 * site-packages, .pth files, sitecustomize), except for the .pth of an editable install of
 * pkcs11ws itself (pkcs11ws is sys.path[0]) and setuptools' distutils-precedence.pth (it imports
 * _distutils_hack, a shim for code importing distutils, which the module never does). */
static const char p11ws_site_main[] =
    "import site\n"
    "def _p11ws_addpackage(sitedir, name, known_paths, _orig=site.addpackage):\n"
    "    if name.startswith('__editable__.pkcs11ws-') or name == 'distutils-precedence.pth':\n"
    "        return known_paths\n"
    "    return _orig(sitedir, name, known_paths)\n"
    "site.addpackage = _p11ws_addpackage\n"
    "try:\n"
    "    site.main()\n"
    "finally:\n"
    "    site.addpackage = _p11ws_addpackage.__defaults__[0]\n";

static int p11ws_run_site(void)
{
    PyObject *globals = PyDict_New();
    PyObject *r = NULL;
    if (globals != NULL && PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) == 0)
        r = PyRun_String(p11ws_site_main, Py_file_input, globals, globals);
    Py_XDECREF(globals);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* With the GIL, in the interpreter we booted, once the core is imported: gc.freeze() moves what
 * the start-up made (modules, classes, tables: alive as long as the process) out of every later
 * collection, then the collector, off since the boot, runs again. Off during the imports, it
 * saved the collections that walked all that again and again and found next to nothing (~3 M
 * instructions of pkcs11-tool -L). */
static void p11ws_gc_after_boot(int imported)
{
    if (imported) {
        PyObject *gc = PyImport_ImportModule("gc");
        PyObject *r = gc != NULL ? PyObject_CallMethod(gc, "freeze", NULL) : NULL;
        Py_XDECREF(r);
        Py_XDECREF(gc);
        PyErr_Clear(); /* a collector that still walks these objects is only slower */
    }
    PyGC_Enable();
}

/* With the GIL: make pkcs11ws importable and import the core. In the interpreter we booted,
 * sys.path is the package's parent, the standard library, then the runtime's site-packages,
 * where pkcs11ws's dependencies are: what a host's interpreter gets appended. site.main() would
 * add nothing else the module imports, in the layouts bootstrap.c accepts (a venv or a Python
 * prefix, a wheel or an editable install, whose .pth only makes pkcs11ws importable: it is,
 * first), and costs ~3 M instructions of pkcs11-tool -L; it runs only when the venv includes
 * the base Python's site-packages. So .pth files and sitecustomize do not run inside a host. */
static int p11ws_import_core(const char *parent, int booted)
{
    PyObject *path = PySys_GetObject("path"); /* borrowed */
    int rc = -1;
    if (path == NULL || !PyList_Check(path))
        goto out;
    if (booted) {
        (void)PyGC_Disable(); /* until p11ws_gc_after_boot() */
        PyObject *dir = PyUnicode_DecodeFSDefault(parent);
        rc = dir == NULL ? -1 : PyList_Insert(path, 0, dir);
        Py_XDECREF(dir);
        if (rc == 0)
            rc = p11ws_rt->system_site ? p11ws_run_site() : p11ws_path_append(path, p11ws_rt->site);
        if (rc < 0)
            goto out;
    } else if (p11ws_path_append(path, parent) < 0 || p11ws_path_append(path, p11ws_rt->site) < 0) {
        /* Attached to a host interpreter: its own modules come first. */
        goto out;
    }
    rc = import_pkcs11ws___native__core();
out:
    if (booted)
        p11ws_gc_after_boot(rc == 0);
    if (rc < 0) {
        p11ws_say("cannot import pkcs11ws._native.core", NULL);
        if (PyErr_Occurred())
            PyErr_Print();
    }
    return rc;
}

static int p11ws_boot_locked(void)
{
    const char *parent = p11ws_rt->pkg_parent;
    Dl_info info;
    int booted = 0;

    if (!p11ws_version_ok())
        return -1;
    /* Hosts dlopen modules RTLD_LOCAL: promote libpython so extensions resolve its symbols. */
    if (dladdr((void *)&Py_IsInitialized, &info) && info.dli_fname)
        (void)dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD | RTLD_GLOBAL);

    if (!Py_IsInitialized()) {
        if (p11ws_start_python() < 0)
            return -1;
        booted = 1;
    }
    p11ws_adopt_thread();
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = p11ws_import_core(parent, booted);
    CK_FUNCTION_LIST_3_0 *list = rc == 0 ? p11ws_core_function_list() : NULL;
    PyGILState_Release(g);
    if (list == NULL)
        return -1;
    if (pthread_atfork(p11ws_fork_prepare, p11ws_fork_parent, p11ws_fork_child) != 0) {
        p11ws_say("cannot install fork handlers", NULL);
        return -1;
    }
    __atomic_store_n(&p11ws_list, list, __ATOMIC_RELEASE);
    return 0;
}

/* OpenSSL's configuration, loaded before any lock of ours is taken (OPENSSL_init_crypto with
 * OPENSSL_INIT_LOAD_CONFIG, 0x40 in OpenSSL 3's stable ABI; the library by soname, as libcurl
 * and Python's _ssl and _hashlib link it; nothing when it is not installed). The boot loads it
 * anyway (those imports do), but under the boot lock, and then the core's C_Initialize runs
 * under its state lock: a thread B already inside OpenSSL's configuration (it runs once per
 * process; a second thread waits for the first) whose pkcs11-provider, loaded early, calls this
 * module, would wait for that lock while we waited for B's configuration to end, for ever.
 * Loaded here first, B's configuration ends (its call boots the module and initialises it) and
 * then ours goes on; a configuration that calls back on this thread meets p11ws_in_boot. */
static void p11ws_load_openssl_config(void)
{
    void *h = dlopen("libcrypto.so.3", RTLD_LAZY | RTLD_LOCAL);
    if (h == NULL)
        return;
    int (*init)(uint64_t, const void *) = (int (*)(uint64_t, const void *))dlsym(
        h, "OPENSSL_init_crypto");
    if (init != NULL)
        (void)init(0x40 /* OPENSSL_INIT_LOAD_CONFIG */, NULL);
}

static int p11ws_boot(void)
{
    int rc;
    /* Called again by the thread that is booting, from inside the boot: something the boot runs
     * (OpenSSL's configuration below, an import such as hashlib or ssl, a venv's sitecustomize)
     * loaded OpenSSL's configuration, which loads pkcs11-provider early, which loads this
     * module. Waiting for the lock would wait for ourselves for ever: that inner call fails
     * instead, and the boot goes on. */
    if (p11ws_in_boot) {
        p11ws_say("called from inside its own start-up (OpenSSL loading a PKCS#11 provider that "
                  "uses this module?): that call fails", NULL);
        return -1;
    }
    p11ws_in_boot = 1;
    /* A caller that holds the GIL (a Python host) must not sleep on the boot lock with it, nor
     * on OpenSSL's configuration: the thread that is booting may need the GIL to finish. */
    int held = Py_IsInitialized() && PyGILState_Check();
    PyThreadState *saved = held ? PyEval_SaveThread() : NULL;
    p11ws_load_openssl_config();
    pthread_mutex_lock(&p11ws_boot_lock);
    if (saved != NULL)
        PyEval_RestoreThread(saved);
    if (p11ws_list != NULL)
        rc = 0;
    else if (p11ws_boot_failed)
        rc = -1;
    else {
        rc = p11ws_boot_locked();
        p11ws_boot_failed = rc != 0;
    }
    pthread_mutex_unlock(&p11ws_boot_lock);
    p11ws_in_boot = 0;
    return rc;
}

P11WS_EXPORT CK_FUNCTION_LIST_3_0 *p11ws_loader_boot(const struct p11ws_runtime *rt)
{
    if (rt == NULL || rt->abi != P11WS_RUNTIME_ABI) {
        p11ws_say("libpkcs11ws.so and libpkcs11ws-python.so come from different builds", NULL);
        return NULL;
    }
    if (__atomic_load_n(&p11ws_list, __ATOMIC_ACQUIRE) == NULL) {
        p11ws_rt = rt;
        if (p11ws_boot() != 0)
            return NULL;
    }
    return p11ws_list;
}
