/*
 * openssl_threads.c: a host in which two threads meet in OpenSSL's configuration (which OpenSSL
 * loads once per process; a second thread asking for it waits for the first).
 *
 * Thread A dlopen()s the module (argv[1]) and calls C_GetFunctionList and C_Initialize. The
 * module's start-up (a copy of the package whose Python calls host_in_startup() through ctypes,
 * while the module holds its boot or state lock) starts thread B, which loads OpenSSL's
 * configuration (OPENSSL_CONF: pkcs11-provider, early, on shim_module.so, which tells the host
 * when it is called and hands over to the module), and waits until B is inside it, calling the
 * module. Then A's start-up goes on to load OpenSSL's configuration itself (import hashlib).
 * With HOST_B_STORE set (and pkcs11-provider's default, late, loading), B then reads that
 * OSSL_STORE URI: pkcs11-provider's first use, which loads and initialises the module.
 *
 * Before loader.c loaded OpenSSL's configuration ahead of its locks, this hung: B waited for the
 * module's lock inside the configuration, A waited for B's configuration holding that lock.
 * Prints one line per step; exit 0 once both threads are done.
 */
#include <dlfcn.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/store.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pkcs11ws_ck.h"

#define EXPORT __attribute__((visibility("default")))

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static pthread_t main_thread, thread_b;
static int b_started, b_done, shim_calls_a, shim_calls_b;

static void say(const char *line)
{
    printf("%s\n", line);
    fflush(stdout);
}

/* shim_module.so's C_GetFunctionList, from inside OpenSSL's configuration. */
EXPORT void host_shim_called(void)
{
    pthread_mutex_lock(&mu);
    if (pthread_equal(pthread_self(), main_thread))
        shim_calls_a++;
    else
        shim_calls_b++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

static void *run_b(void *arg)
{
    (void)arg;
    say("B: loading OpenSSL's configuration");
    int ok = OPENSSL_init_crypto(OPENSSL_INIT_LOAD_CONFIG, NULL);
    say(ok ? "B: OpenSSL configured" : "B: OpenSSL's configuration failed");
    /* With pkcs11-provider's default (late) loading, its first use loads the module. */
    const char *uri = getenv("HOST_B_STORE");
    if (uri != NULL) {
        OSSL_STORE_CTX *store = OSSL_STORE_open(uri, NULL, NULL, NULL, NULL);
        while (store != NULL && !OSSL_STORE_eof(store)) {
            OSSL_STORE_INFO *info = OSSL_STORE_load(store);
            if (info == NULL)
                break;
            OSSL_STORE_INFO_free(info);
        }
        if (store != NULL)
            OSSL_STORE_close(store);
        say("B: store read");
    }
    pthread_mutex_lock(&mu);
    b_done = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    return NULL;
}

/* From the module's Python start-up, in thread A (ctypes): start B and wait until B calls the
 * module (from inside OpenSSL's configuration, or its store), or is done (a configuration A
 * loaded already never calls it again), at most 30 s. 1 when B called the module. */
EXPORT int host_in_startup(void)
{
    pthread_mutex_lock(&mu);
    if (b_started) {
        pthread_mutex_unlock(&mu);
        return 0;
    }
    b_started = 1;
    say("A: inside the module's start-up: starting B");
    if (pthread_create(&thread_b, NULL, run_b, NULL) != 0) {
        pthread_mutex_unlock(&mu);
        say("A: pthread_create failed");
        return 0;
    }
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 30;
    int rc = 0;
    while (shim_calls_b == 0 && !b_done && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&cv, &mu, &until);
    int called = shim_calls_b > 0;
    pthread_mutex_unlock(&mu);
    say(called ? "A: B is calling the module" : "A: B did not call the module");
    return called;
}

int main(int argc, char **argv)
{
    char line[128];
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODULE\n", argv[0]);
        return 2;
    }
    main_thread = pthread_self();
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
    CK_FUNCTION_LIST_PTR list = NULL;
    CK_RV rv = get != NULL ? get(&list) : CKR_GENERAL_ERROR;
    snprintf(line, sizeof line, "A: C_GetFunctionList 0x%lx", (unsigned long)rv);
    say(line);
    if (rv == CKR_OK) {
        rv = list->C_Initialize(NULL);
        snprintf(line, sizeof line, "A: C_Initialize 0x%lx", (unsigned long)rv);
        say(line);
    }
    pthread_mutex_lock(&mu);
    int started = b_started;
    pthread_mutex_unlock(&mu);
    if (started)
        pthread_join(thread_b, NULL);
    snprintf(line, sizeof line, "shim called by A %d, by B %d", shim_calls_a, shim_calls_b);
    say(line);
    if (rv == CKR_OK)
        list->C_Finalize(NULL);
    say("done");
    return 0;
}
