/*
 * pyglue.h: how a host thread gets into Python, shared by the loader and the Cython core.
 *
 * A plain PyGILState_Ensure/Release pair on a thread Python has never seen creates and destroys
 * a thread state on every call (5-7 us, and the per-thread curl handle dies with it: a new TLS
 * handshake per request). So the first time a foreign thread needs Python it is adopted: one
 * PyGILState_Ensure that is never released keeps its thread state alive for the thread's life
 * (gilstate counter stays at 1), and later Ensure/Release pairs only move the GIL. Threads Python
 * already knows (its own, or a caller such as PyKCS11 that holds the GIL) are left alone.
 * Adopted thread states are not released at thread exit: doing so from a TLS destructor was
 * seen to abort the process (design.md section 2).
 */
#ifndef PKCS11WS_PYGLUE_H
#define PKCS11WS_PYGLUE_H

#include <Python.h>
#include <pthread.h>

static __thread int p11ws_thread_adopted;

static inline void p11ws_adopt_thread(void)
{
    if (__builtin_expect(p11ws_thread_adopted, 1))
        return;
    p11ws_thread_adopted = 1;
    if (PyGILState_GetThisThreadState() != NULL)
        return;
    (void)PyGILState_Ensure();
    (void)PyEval_SaveThread();
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
