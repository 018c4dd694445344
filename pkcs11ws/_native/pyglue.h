/*
 * pyglue.h: how a host thread gets into Python, shared by the loader and the Cython core.
 *
 * A plain PyGILState_Ensure/Release pair on a thread Python has never seen creates and destroys
 * a thread state on every call (a cost per call, and the per-thread curl handle dies with it: a
 * new TLS handshake per request). So the first time a foreign thread needs Python it is adopted: one
 * PyGILState_Ensure that is never released keeps its thread state alive for the thread's life
 * (gilstate counter stays at 1), and later Ensure/Release pairs only move the GIL. Threads Python
 * already knows (its own, or a caller such as PyKCS11 that holds the GIL) are left alone.
 *
 * When an adopted thread ends, a pthread key destructor frees its thread state (else a host that
 * churns threads grows by a thread state per ended thread, for ever). Not through PyGILState_Release: at
 * thread exit glibc has usually already cleared CPython's own TSS slot (the gilstate autoTSSkey,
 * created before our key, so visited first), so PyGILState_Release finds "no thread-state for
 * this thread" and aborts the process (the fatal error the first loader saw) and
 * PyGILState_Ensure would make a second thread state. The destructor instead takes the GIL with
 * the thread state it saved itself and does what CPython's own threads do when they end:
 * PyThreadState_Clear then PyThreadState_DeleteCurrent. docs/design.md, "Threads and the
 * loader", has the whole rule.
 */
#ifndef PKCS11WS_PYGLUE_H
#define PKCS11WS_PYGLUE_H

#include <Python.h>
#include <pthread.h>

static __thread int p11ws_thread_adopted;
static pthread_key_t p11ws_thread_key;
static pthread_once_t p11ws_thread_key_once = PTHREAD_ONCE_INIT;
static int p11ws_thread_key_ok;

/* The key's destructor: runs when an adopted thread ends, with its saved thread state. */
static void p11ws_release_thread(void *saved)
{
    PyThreadState *ts = (PyThreadState *)saved;
    /* The interpreter is gone, or a Python host is shutting it down: taking the GIL now could
     * make this thread exit inside the destructor (take_gil does that during finalization).
     * The process is ending anyway; the thread state stays. */
    if (!Py_IsInitialized() || _Py_IsFinalizing())
        return;
    PyEval_RestoreThread(ts);
    /* Frees the thread's threading.local values too (its curl handle, if it still owns one). */
    PyThreadState_Clear(ts);
    /* Deletes it and drops the GIL; also clears the autoTSSkey if it still points at it. */
    PyThreadState_DeleteCurrent();
}

static void p11ws_thread_key_create(void)
{
    p11ws_thread_key_ok = pthread_key_create(&p11ws_thread_key, p11ws_release_thread) == 0;
}

static inline void p11ws_adopt_thread(void)
{
    if (__builtin_expect(p11ws_thread_adopted, 1))
        return;
    p11ws_thread_adopted = 1;
    if (PyGILState_GetThisThreadState() != NULL)
        return; /* Python's own thread, or one adopted already: never ours to free */
    pthread_once(&p11ws_thread_key_once, p11ws_thread_key_create);
    (void)PyGILState_Ensure();
    PyThreadState *ts = PyEval_SaveThread();
    if (p11ws_thread_key_ok)
        (void)pthread_setspecific(p11ws_thread_key, ts);
}

/* Lock a mutex that a thread holding the GIL may wait for while the holder needs the GIL
 * (C_Initialize/C_Finalize): wait with the GIL released, only when the lock is contended. */
static inline void p11ws_lock_gil_aware(pthread_mutex_t *m)
{
    if (pthread_mutex_trylock(m) == 0)
        return;
    if (Py_IsInitialized() && PyGILState_Check()) {
        PyThreadState *ts = PyEval_SaveThread();
        pthread_mutex_lock(m);
        PyEval_RestoreThread(ts);
    } else {
        pthread_mutex_lock(m);
    }
}

static inline int p11ws_aload(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void p11ws_astore(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

#endif /* PKCS11WS_PYGLUE_H */
