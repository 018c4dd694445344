/*
 * lifecycle.c: a C host for libpkcs11ws.so's life cycle and threads (tests/module/test_module_lifecycle.py).
 *
 * It dlopen()s the module RTLD_LOCAL, as pkcs11-tool or a JVM does. Modes:
 *
 *   reserved CONFIG  C_Initialize arguments a host may get wrong: pReserved pointing at nothing
 *            (1, a PROT_NONE page), at a string with no NUL before an unmapped page, at a string
 *            longer than the module reads; mutex callbacks given in part; a non-NULL pReserved
 *            to C_Finalize: each must answer CKR_ARGUMENTS_BAD (or CKR_CANT_LOCK), never crash.
 *            Readable strings keep working: a free-form string that is not `config=` (p11-kit's
 *            and pkcs11-provider's init strings) is ignored, "config=PATH" is read (a missing
 *            file fails, "config=CONFIG" works). Run it with $PKCS11WS_CONFIG set.
 *   race ROUNDS [sessions]  6 threads loop C_GetSlotList while the main thread does ROUNDS x
 *            (C_Finalize, C_Initialize). Every answer must be one a call may get during a
 *            shutdown (OK, NOT_INITIALIZED, DEVICE_ERROR, ...); the host must not crash or hang.
 *            With "sessions" (a live service), 3 of the threads open, use and close sessions
 *            instead, so the session table is freed under them.
 *   churn N  N short-lived threads, one at a time; each opens a session, signs a 64-byte
 *            message with CKM_SHA256_HMAC (compared with the expected MAC), closes the session
 *            and ends. Prints "rss <threads ended> <kB>" every 1,000 threads; fails unless the
 *            interpreter has as many thread states at the end as before the first thread.
 *   exits N  4 threads sign, then end only after the main thread's C_Finalize; then a forked
 *            child initialises, runs N churn threads and C_Finalizes. Thread states must not
 *            outlive their threads in either case. Then it initialises again, leaves 4 threads
 *            that used the module idle, and returns from main() without C_Finalize.
 *
 * Secrets come on stdin, never argv (race and reserved read nothing):
 *   TOKEN <label>
 *   PIN <passphrase>
 *   KEY <label of an HMAC key>
 *   MAC <expected HMAC-SHA256 of the message, hex>
 * The message is 64 bytes: byte j = j * 3 + 1.
 * Output: "ok <mode>" when the mode passed; "FAIL ..." and exit status 1 otherwise.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pkcs11ws_ck.h"

#define MSG_LEN 64
#define MAC_LEN 32
#define RACE_THREADS 6

static CK_FUNCTION_LIST *f;

/* _exit: other threads may be inside the module; exit() would run atexit cleanups under them. */
#define FAIL(...)                                                                               \
    do {                                                                                        \
        printf("FAIL " __VA_ARGS__);                                                            \
        printf(" (line %d)\n", __LINE__);                                                       \
        fflush(stdout);                                                                         \
        _exit(1);                                                                               \
    } while (0)

#define EXPECT(want, call)                                                                      \
    do {                                                                                        \
        CK_RV rv_ = (call);                                                                     \
        if (rv_ != (want))                                                                      \
            FAIL("%s = 0x%lx, expected 0x%lx", #call, (unsigned long)rv_,                       \
                 (unsigned long)(want));                                                        \
    } while (0)

#define CHECK(call) EXPECT(CKR_OK, call)

static CK_RV init_reserved(void *reserved)
{
    CK_C_INITIALIZE_ARGS a;
    memset(&a, 0, sizeof a);
    a.flags = CKF_OS_LOCKING_OK;
    a.pReserved = reserved;
    return f->C_Initialize(&a);
}

static CK_RV dummy_mutex(void *p)
{
    (void)p;
    return CKR_OK;
}

/* ---- reserved ---------------------------------------------------------------------------- */

static void mode_reserved(const char *config)
{
    long page = sysconf(_SC_PAGESIZE);
    /* Two pages: the first readable, the second PROT_NONE. */
    char *m = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED || mprotect(m + page, page, PROT_NONE) != 0)
        FAIL("mmap");

    EXPECT(CKR_ARGUMENTS_BAD, init_reserved((void *)1));
    EXPECT(CKR_ARGUMENTS_BAD, init_reserved((void *)(uintptr_t)-4096));
    EXPECT(CKR_ARGUMENTS_BAD, init_reserved(m + page));
    /* "config=" then no NUL before the unmapped page: an unterminated string. */
    memset(m, 'x', page);
    memcpy(m + page - 16, "config=/nowhere/", 16);
    EXPECT(CKR_ARGUMENTS_BAD, init_reserved(m + page - 16));
    memcpy(m, "config=", 7);
    EXPECT(CKR_ARGUMENTS_BAD, init_reserved(m));
    /* A terminated string longer than the module reads (4,096 bytes with its NUL). */
    char *longer = malloc(5000);
    if (longer == NULL)
        FAIL("malloc");
    memset(longer, 'y', 4999);
    memcpy(longer, "config=", 7);
    longer[4999] = '\0';
    EXPECT(CKR_ARGUMENTS_BAD, init_reserved(longer));
    free(longer);

    /* Mutex callbacks: all or none. */
    CK_C_INITIALIZE_ARGS a;
    memset(&a, 0, sizeof a);
    a.CreateMutex = (CK_CREATEMUTEX)dummy_mutex;
    EXPECT(CKR_ARGUMENTS_BAD, f->C_Initialize(&a));
    a.DestroyMutex = dummy_mutex;
    a.LockMutex = dummy_mutex;
    EXPECT(CKR_ARGUMENTS_BAD, f->C_Initialize(&a));
    a.UnlockMutex = dummy_mutex;
    EXPECT(CKR_CANT_LOCK, f->C_Initialize(&a));
    /* None of the above initialised the module. */
    CK_INFO info;
    EXPECT(CKR_CRYPTOKI_NOT_INITIALIZED, f->C_GetInfo(&info));

    /* A free-form string that is not config= (p11-kit's x-init-reserved): accepted, ignored. */
    strcpy(m, "p11-kit: some free-form words");
    CHECK(init_reserved(m));
    EXPECT(CKR_ARGUMENTS_BAD, f->C_Finalize((void *)1));
    CHECK(f->C_GetInfo(&info));
    CHECK(f->C_Finalize(NULL));
    /* config=PATH is read (it wins over $PKCS11WS_CONFIG): a missing file fails. */
    strcpy(m, "config=/nonexistent/pkcs11webservices.cfg");
    EXPECT(CKR_GENERAL_ERROR, init_reserved(m));
    /* config=PATH at the very end of the readable page. */
    size_t n = strlen(config) + 8;
    char *s = m + page - n;
    snprintf(s, n, "config=%s", config);
    CHECK(init_reserved(s));
    CK_ULONG count = 0;
    CHECK(f->C_GetSlotList(CK_FALSE, NULL, &count));
    CHECK(f->C_Finalize(NULL));
    munmap(m, 2 * page);
}

/* ---- race -------------------------------------------------------------------------------- */

static volatile int race_stop;
static unsigned long race_calls[RACE_THREADS], race_ok[RACE_THREADS];
static CK_SLOT_ID race_slot; /* sessions mode: the slot the workers open sessions on */

/* An answer a session call may get while C_Finalize/C_Initialize run under it. */
static void race_check(const char *what, CK_RV rv)
{
    switch (rv) {
    case CKR_OK:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_OPERATION_NOT_INITIALIZED:
    case CKR_SLOT_ID_INVALID:
    case CKR_DEVICE_ERROR:
    case CKR_FUNCTION_FAILED:
        return;
    default:
        FAIL("%s during finalize = 0x%lx", what, (unsigned long)rv);
    }
}

/* Open a session, use it (table lookups, a search that asks the service), close it. */
static void race_session(void)
{
    CK_SESSION_HANDLE h;
    CK_SESSION_INFO info;
    CK_OBJECT_HANDLE found[4];
    CK_ULONG n = 0;
    CK_RV rv = f->C_OpenSession(race_slot, CKF_SERIAL_SESSION, NULL, NULL, &h);
    race_check("C_OpenSession", rv);
    if (rv != CKR_OK)
        return;
    race_check("C_GetSessionInfo", f->C_GetSessionInfo(h, &info));
    if ((rv = f->C_FindObjectsInit(h, NULL, 0)) == CKR_OK) {
        race_check("C_FindObjects", f->C_FindObjects(h, found, 4, &n));
        race_check("C_FindObjectsFinal", f->C_FindObjectsFinal(h));
    }
    race_check("C_FindObjectsInit", rv);
    race_check("C_CloseSession", f->C_CloseSession(h));
}

static void *race_worker(void *arg)
{
    int t = (int)(intptr_t)arg;
    while (!__atomic_load_n(&race_stop, __ATOMIC_ACQUIRE)) {
        if (race_slot && t % 2 == 0) {
            race_session();
            race_calls[t]++;
            continue;
        }
        CK_ULONG n = 0;
        CK_RV rv = f->C_GetSlotList(CK_FALSE, NULL, &n);
        race_calls[t]++;
        switch (rv) {
        case CKR_OK:
            race_ok[t]++;
            break;
        case CKR_CRYPTOKI_NOT_INITIALIZED:
        case CKR_DEVICE_ERROR:
        case CKR_FUNCTION_FAILED:
            break;
        default:
            FAIL("C_GetSlotList during finalize = 0x%lx", (unsigned long)rv);
        }
    }
    return NULL;
}

static void mode_race(int rounds, int sessions)
{
    pthread_t th[RACE_THREADS];
    struct timespec t0, t1;
    CHECK(f->C_Initialize(NULL));
    if (sessions) {
        /* The shared test service may hold many softcards: ask for the count first. */
        CK_ULONG n = 0;
        CHECK(f->C_GetSlotList(CK_TRUE, NULL, &n));
        CK_SLOT_ID *slots = calloc(n + 1, sizeof *slots);
        if (slots == NULL)
            FAIL("calloc");
        CHECK(f->C_GetSlotList(CK_TRUE, slots, &n));
        if (n == 0)
            FAIL("sessions: the service has no softcard");
        race_slot = slots[0];
        free(slots);
    }
    for (int t = 0; t < RACE_THREADS; t++)
        if (pthread_create(&th[t], NULL, race_worker, (void *)(intptr_t)t) != 0)
            FAIL("pthread_create");
    double worst = 0;
    for (int r = 0; r < rounds; r++) {
        /* Let the workers get into their calls (and retries). */
        usleep(2000);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        CHECK(f->C_Finalize(NULL));
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
        if (s > worst)
            worst = s;
        CK_ULONG n = 0;
        /* Between C_Finalize and C_Initialize every call is refused. */
        EXPECT(CKR_CRYPTOKI_NOT_INITIALIZED, f->C_GetSlotList(CK_FALSE, NULL, &n));
        CHECK(f->C_Initialize(NULL));
    }
    __atomic_store_n(&race_stop, 1, __ATOMIC_RELEASE);
    for (int t = 0; t < RACE_THREADS; t++)
        pthread_join(th[t], NULL);
    CHECK(f->C_Finalize(NULL));
    unsigned long calls = 0, ok = 0;
    for (int t = 0; t < RACE_THREADS; t++) {
        calls += race_calls[t];
        ok += race_ok[t];
    }
    printf("race rounds %d calls %lu ok %lu slowest_finalize_ms %.1f\n", rounds, calls, ok,
           worst * 1e3);
}

/* ---- churn ------------------------------------------------------------------------------- */

static char token[33], pin[512], keylabel[512];
static unsigned char want_mac[MAC_LEN];
static CK_SLOT_ID slot;
static CK_OBJECT_HANDLE key;

static void read_input(void)
{
    char line[512];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (strncmp(line, "TOKEN ", 6) == 0) {
            memset(token, ' ', 32);
            memcpy(token, line + 6, strnlen(line + 6, 32));
        } else if (strncmp(line, "PIN ", 4) == 0) {
            snprintf(pin, sizeof pin, "%s", line + 4);
        } else if (strncmp(line, "KEY ", 4) == 0) {
            snprintf(keylabel, sizeof keylabel, "%s", line + 4);
        } else if (strncmp(line, "MAC ", 4) == 0) {
            for (int i = 0; i < MAC_LEN; i++) {
                unsigned v;
                if (sscanf(line + 4 + 2 * i, "%2x", &v) != 1)
                    FAIL("bad MAC line");
                want_mac[i] = (unsigned char)v;
            }
        }
    }
    if (!token[0] || !pin[0] || !keylabel[0])
        FAIL("TOKEN, PIN, KEY and MAC lines are required");
}

static long rss_kb(void)
{
    FILE *s = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (s != NULL && fgets(line, sizeof line, s))
        if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
            break;
    if (s != NULL)
        fclose(s);
    return kb;
}

static void find_slot_and_key(CK_SESSION_HANDLE *login)
{
    CK_ULONG n = 0;
    CHECK(f->C_GetSlotList(CK_TRUE, NULL, &n));
    CK_SLOT_ID *slots = calloc(n + 1, sizeof *slots);
    if (slots == NULL)
        FAIL("calloc");
    CHECK(f->C_GetSlotList(CK_TRUE, slots, &n));
    for (CK_ULONG i = 0; i < n && !slot; i++) {
        CK_TOKEN_INFO ti;
        CHECK(f->C_GetTokenInfo(slots[i], &ti));
        if (memcmp(ti.label, token, 32) == 0)
            slot = slots[i];
    }
    free(slots);
    if (!slot)
        FAIL("token not found");
    CHECK(f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, login));
    CHECK(f->C_Login(*login, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)));
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, keylabel, strlen(keylabel)}};
    CHECK(f->C_FindObjectsInit(*login, t, 2));
    CHECK(f->C_FindObjects(*login, &key, 1, &n));
    CHECK(f->C_FindObjectsFinal(*login));
    if (n != 1)
        FAIL("key not found");
}

static void *churn_worker(void *arg)
{
    (void)arg;
    CK_SESSION_HANDLE h;
    unsigned char msg[MSG_LEN], mac[MAC_LEN];
    CK_ULONG len = sizeof mac;
    CK_MECHANISM m = {CKM_SHA256_HMAC, NULL, 0};
    for (int j = 0; j < MSG_LEN; j++)
        msg[j] = (unsigned char)(j * 3 + 1);
    CHECK(f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &h));
    CHECK(f->C_SignInit(h, &m, key));
    CHECK(f->C_Sign(h, msg, MSG_LEN, mac, &len));
    if (len != MAC_LEN || memcmp(mac, want_mac, MAC_LEN) != 0)
        FAIL("wrong MAC");
    CHECK(f->C_CloseSession(h));
    return NULL;
}

/* The interpreter's thread states, counted through libpython's public API (the module made
 * libpython global, so RTLD_DEFAULT finds it), with the GIL. A thread state that outlives its
 * thread stays on this list: the count is the exact leak check (LeakSanitizer cannot see such a
 * leak, the list keeps it reachable). */
static long count_thread_states(void)
{
    void *(*main_interp)(void) = (void *(*)(void))dlsym(RTLD_DEFAULT, "PyInterpreterState_Main");
    void *(*head)(void *) = (void *(*)(void *))dlsym(RTLD_DEFAULT, "PyInterpreterState_ThreadHead");
    void *(*next)(void *) = (void *(*)(void *))dlsym(RTLD_DEFAULT, "PyThreadState_Next");
    int (*ensure)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "PyGILState_Ensure");
    void (*release)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "PyGILState_Release");
    if (!main_interp || !head || !next || !ensure || !release)
        FAIL("libpython's thread state API not found");
    int g = ensure();
    long n = 0;
    for (void *ts = head(main_interp()); ts != NULL; ts = next(ts))
        n++;
    release(g);
    return n;
}

static void mode_churn(int count)
{
    CK_SESSION_HANDLE login;
    read_input();
    CHECK(f->C_Initialize(NULL));
    find_slot_and_key(&login);
    long before = count_thread_states();
    printf("rss 0 %ld\n", rss_kb());
    for (int i = 1; i <= count; i++) {
        pthread_t th;
        if (pthread_create(&th, NULL, churn_worker, NULL) != 0)
            FAIL("pthread_create");
        pthread_join(th, NULL);
        if (i % 1000 == 0 || i == count) {
            printf("rss %d %ld\n", i, rss_kb());
            fflush(stdout);
        }
    }
    long after = count_thread_states();
    printf("thread states before %ld after %ld\n", before, after);
    if (after != before)
        FAIL("%ld thread states of ended threads were not freed", after - before);
    CHECK(f->C_CloseSession(login));
    CHECK(f->C_Finalize(NULL));
}

/* ---- exits: threads that end after C_Finalize, and thread churn in a forked child -------- */

static pthread_barrier_t exits_signed, exits_finalized;

static void *exits_worker(void *arg)
{
    churn_worker(arg);
    pthread_barrier_wait(&exits_signed);
    /* Ends only after the main thread's C_Finalize. */
    pthread_barrier_wait(&exits_finalized);
    return NULL;
}

static void *idle_worker(void *arg)
{
    churn_worker(arg);
    pthread_barrier_wait(&exits_signed);
    for (;;)
        pause();
    return NULL;
}

static void mode_exits(int count)
{
    enum { LATE = 4 };
    CK_SESSION_HANDLE login;
    pthread_t th[LATE];
    read_input();
    CHECK(f->C_Initialize(NULL));
    find_slot_and_key(&login);
    long before = count_thread_states();
    pthread_barrier_init(&exits_signed, NULL, LATE + 1);
    pthread_barrier_init(&exits_finalized, NULL, LATE + 1);
    for (int t = 0; t < LATE; t++)
        if (pthread_create(&th[t], NULL, exits_worker, NULL) != 0)
            FAIL("pthread_create");
    pthread_barrier_wait(&exits_signed);
    CHECK(f->C_Finalize(NULL));
    pthread_barrier_wait(&exits_finalized);
    for (int t = 0; t < LATE; t++)
        pthread_join(th[t], NULL);
    long after = count_thread_states();
    if (after != before)
        FAIL("threads ending after C_Finalize: %ld thread states left", after - before);
    printf("after finalize: thread states before %ld after %ld\n", before, after);
    fflush(stdout);

    /* A forked child (the parent is not initialised now, so neither is the child): it
     * initialises, churns threads and must free their thread states too. */
    pid_t pid = fork();
    if (pid < 0)
        FAIL("fork");
    if (pid == 0) {
        slot = 0;
        CHECK(f->C_Initialize(NULL));
        find_slot_and_key(&login);
        long cb = count_thread_states();
        for (int i = 0; i < count; i++) {
            pthread_t t;
            if (pthread_create(&t, NULL, churn_worker, NULL) != 0)
                FAIL("pthread_create");
            pthread_join(t, NULL);
        }
        long ca = count_thread_states();
        if (ca != cb)
            FAIL("forked child: %ld thread states left", ca - cb);
        printf("child: %d threads, thread states before %ld after %ld\n", count, cb, ca);
        fflush(stdout);
        CHECK(f->C_Finalize(NULL));
        _exit(0);
    }
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        FAIL("forked child failed (status 0x%x)", status);

    /* A host that never calls C_Finalize: initialised, threads that used the module still
     * alive (idle), and main() returns; exit() must be clean (the caller checks the status). */
    slot = 0;
    CHECK(f->C_Initialize(NULL));
    find_slot_and_key(&login);
    for (int t = 0; t < LATE; t++)
        if (pthread_create(&th[t], NULL, idle_worker, NULL) != 0)
            FAIL("pthread_create");
    pthread_barrier_wait(&exits_signed);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        FAIL("usage: lifecycle MODULE MODE [ARG]");
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL)
        FAIL("dlopen: %s", dlerror());
    CK_C_GetFunctionList gfl = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    if (gfl == NULL)
        FAIL("no C_GetFunctionList");
    CHECK(gfl(&f));
    const char *mode = argv[2];
    const char *arg = argc > 3 ? argv[3] : "";
    if (strcmp(mode, "reserved") == 0)
        mode_reserved(arg);
    else if (strcmp(mode, "race") == 0)
        mode_race(atoi(arg), argc > 4 && strcmp(argv[4], "sessions") == 0);
    else if (strcmp(mode, "churn") == 0)
        mode_churn(atoi(arg));
    else if (strcmp(mode, "exits") == 0)
        mode_exits(atoi(arg));
    else
        FAIL("unknown mode %s", mode);
    printf("ok %s\n", mode);
    fflush(stdout);
    /* The module is never unloaded (-z nodelete); exit normally so ASan's checks run. */
    return 0;
}
