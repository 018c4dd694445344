/*
 * threads_fork.c: a C host for libpkcs11ws.so (tests/module/test_module_threads_fork.py).
 *
 * It dlopen()s the module RTLD_LOCAL, as pkcs11-tool or a JVM does, and checks every result
 * against values the Python test computed with the `cryptography` package from the same keys:
 *
 *   threads  8 threads, each with its own session, sign (CKM_SHA256_HMAC) and encrypt
 *            (CKM_AES_CBC) concurrently; every MAC and ciphertext is compared.
 *   fork     the parent is initialised and a thread of it is busy inside the module; 20
 *            children are forked at once, each must find the module uninitialised, call
 *            C_Initialize, log in, sign and encrypt (compared) and C_Finalize; all 20 must exit 0
 *            before a deadline (a child stuck in a deadlock is killed and reported).
 *   reinit   C_Finalize, then C_Initialize again in the same process, log in, sign, encrypt.
 *   bench N  single-thread C_Sign latency (HMAC-SHA256, 64-byte message), N calls: prints the
 *            median and the 90th percentile in microseconds (a measurement, not a check).
 *
 * Usage: threads_fork MODULE TOKEN-LABEL MODE...   (the configuration comes from
 * $PKCS11WS_CONFIG). Secrets come on stdin, never argv:
 *   PIN <passphrase>
 *   AES <key hex> <iv hex>
 *   HMAC <key hex>
 *   EXP <thread> <iteration> <mac hex> <ciphertext hex>     (one line per message)
 * The message of (thread t, iteration i) is 64 bytes: byte j = (t * 31 + i * 7 + j) & 0xff.
 * Output: one "ok <mode>" line per passed mode; "FAIL ..." and exit status 1 otherwise.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pkcs11ws_ck.h"

#define NTHREADS 8
#define ITERS 16
#define NCHILDREN 20
#define MSG_LEN 64
#define MAC_LEN 32
#define CHILD_DEADLINE_S 60

static CK_FUNCTION_LIST *f;
static char label[32];
static char pin[512];
static unsigned char aes_key[32], iv[16], hmac_key[64];
static size_t aes_len, hmac_len;
static unsigned char exp_mac[NTHREADS][ITERS][MAC_LEN];
static unsigned char exp_ct[NTHREADS][ITERS][MSG_LEN];
static char have_exp[NTHREADS][ITERS];
static CK_SLOT_ID slot;
static volatile int busy_stop;
static int busy_rounds;

/* _exit: other threads may be inside the module; exit() would run atexit cleanups (OpenSSL's)
 * under them. */
#define FAIL(...)                                                                               \
    do {                                                                                        \
        printf("FAIL " __VA_ARGS__);                                                            \
        printf(" (line %d, pid %d)\n", __LINE__, (int)getpid());                                \
        fflush(stdout);                                                                         \
        _exit(1);                                                                               \
    } while (0)

#define CHECK(call)                                                                             \
    do {                                                                                        \
        CK_RV rv_ = (call);                                                                     \
        if (rv_ != CKR_OK)                                                                      \
            FAIL("%s = 0x%lx", #call, (unsigned long)rv_);                                      \
    } while (0)

static size_t unhex(const char *s, unsigned char *out, size_t max)
{
    size_t n = 0;
    while (s[0] && s[1] && s[0] != ' ' && s[0] != '\n') {
        unsigned v;
        if (n == max || sscanf(s, "%2x", &v) != 1)
            FAIL("bad hex input");
        out[n++] = (unsigned char)v;
        s += 2;
    }
    return n;
}

static const char *field(const char *s, int skip)
{
    for (int i = 0; i < skip; i++) {
        s = strchr(s, ' ');
        if (s == NULL)
            FAIL("short input line");
        s++;
    }
    return s;
}

static void read_input(void)
{
    char line[512];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (strncmp(line, "PIN ", 4) == 0) {
            snprintf(pin, sizeof pin, "%s", line + 4);
        } else if (strncmp(line, "AES ", 4) == 0) {
            aes_len = unhex(field(line, 1), aes_key, sizeof aes_key);
            if (unhex(field(line, 2), iv, sizeof iv) != 16)
                FAIL("IV must be 16 bytes");
        } else if (strncmp(line, "HMAC ", 5) == 0) {
            hmac_len = unhex(field(line, 1), hmac_key, sizeof hmac_key);
        } else if (strncmp(line, "EXP ", 4) == 0) {
            int t, i;
            if (sscanf(line + 4, "%d %d", &t, &i) != 2 || t < 0 || t >= NTHREADS || i < 0 ||
                i >= ITERS)
                FAIL("bad EXP line");
            if (unhex(field(line, 3), exp_mac[t][i], MAC_LEN) != MAC_LEN ||
                unhex(field(line, 4), exp_ct[t][i], MSG_LEN) != MSG_LEN)
                FAIL("bad EXP values");
            have_exp[t][i] = 1;
        }
    }
    if (!pin[0] || !aes_len || !hmac_len)
        FAIL("PIN, AES and HMAC lines are required");
    for (int t = 0; t < NTHREADS; t++)
        for (int i = 0; i < ITERS; i++)
            if (!have_exp[t][i])
                FAIL("missing EXP %d %d", t, i);
}

static void message(int t, int i, unsigned char *msg)
{
    for (int j = 0; j < MSG_LEN; j++)
        msg[j] = (unsigned char)((t * 31 + i * 7 + j) & 0xff);
}

static void find_slot(void)
{
    CK_ULONG n = 0;
    CHECK(f->C_GetSlotList(CK_TRUE, NULL, &n));
    CK_SLOT_ID *slots = calloc(n + 1, sizeof(CK_SLOT_ID));
    if (slots == NULL)
        FAIL("calloc");
    CHECK(f->C_GetSlotList(CK_TRUE, slots, &n));
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO ti;
        CHECK(f->C_GetTokenInfo(slots[i], &ti));
        if (memcmp(ti.label, label, 32) == 0) {
            slot = slots[i];
            free(slots);
            return;
        }
    }
    FAIL("token not found");
}

/* A new R/W session; log in unless the token already is (login belongs to the token). */
static CK_SESSION_HANDLE session(void)
{
    CK_SESSION_HANDLE h;
    CHECK(f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &h));
    CK_RV rv = f->C_Login(h, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN)
        FAIL("C_Login = 0x%lx", (unsigned long)rv);
    return h;
}

static CK_OBJECT_HANDLE find_key(CK_SESSION_HANDLE h, const char *suffix)
{
    char name[64];
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_OBJECT_HANDLE key = 0;
    CK_ULONG n = 0;
    snprintf(name, sizeof name, "tf-%s", suffix);
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, name, strlen(name)}};
    CHECK(f->C_FindObjectsInit(h, t, 2));
    CHECK(f->C_FindObjects(h, &key, 1, &n));
    CHECK(f->C_FindObjectsFinal(h));
    if (n != 1)
        FAIL("key %s not found", name);
    return key;
}

static void import_keys(CK_SESSION_HANDLE h)
{
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE aes = CKK_AES, mac = CKK_SHA256_HMAC;
    CK_BBOOL yes = CK_TRUE;
    CK_OBJECT_HANDLE k;
    CK_ATTRIBUTE ta[] = {{CKA_CLASS, &cls, sizeof cls},   {CKA_KEY_TYPE, &aes, sizeof aes},
                         {CKA_TOKEN, &yes, 1},            {CKA_PRIVATE, &yes, 1},
                         {CKA_ENCRYPT, &yes, 1},          {CKA_DECRYPT, &yes, 1},
                         {CKA_LABEL, "tf-aes", 6},        {CKA_VALUE, aes_key, aes_len}};
    CK_ATTRIBUTE th[] = {{CKA_CLASS, &cls, sizeof cls},   {CKA_KEY_TYPE, &mac, sizeof mac},
                         {CKA_TOKEN, &yes, 1},            {CKA_PRIVATE, &yes, 1},
                         {CKA_SIGN, &yes, 1},             {CKA_VERIFY, &yes, 1},
                         {CKA_LABEL, "tf-hmac", 7},       {CKA_VALUE, hmac_key, hmac_len}};
    CHECK(f->C_CreateObject(h, ta, sizeof ta / sizeof ta[0], &k));
    CHECK(f->C_CreateObject(h, th, sizeof th / sizeof th[0], &k));
}

/* Sign and encrypt message (t, i) on session h and compare both with the expected values. */
static void check_one(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE aes, CK_OBJECT_HANDLE mac, int t,
                      int i)
{
    unsigned char msg[MSG_LEN], out[MSG_LEN + 16];
    CK_MECHANISM hm = {CKM_SHA256_HMAC, NULL, 0};
    CK_MECHANISM cm = {CKM_AES_CBC, iv, sizeof iv};
    CK_ULONG n;
    message(t, i, msg);
    CHECK(f->C_SignInit(h, &hm, mac));
    n = sizeof out;
    CHECK(f->C_Sign(h, msg, MSG_LEN, out, &n));
    if (n != MAC_LEN || memcmp(out, exp_mac[t][i], MAC_LEN) != 0)
        FAIL("MAC of message %d/%d differs", t, i);
    CHECK(f->C_EncryptInit(h, &cm, aes));
    n = sizeof out;
    CHECK(f->C_Encrypt(h, msg, MSG_LEN, out, &n));
    if (n != MSG_LEN || memcmp(out, exp_ct[t][i], MSG_LEN) != 0)
        FAIL("ciphertext of message %d/%d differs", t, i);
}

static void *worker(void *arg)
{
    int t = (int)(long)arg;
    CK_SESSION_HANDLE h = session();
    CK_OBJECT_HANDLE aes = find_key(h, "aes"), mac = find_key(h, "hmac");
    for (int i = 0; i < ITERS; i++)
        check_one(h, aes, mac, t, i);
    CHECK(f->C_CloseSession(h));
    return NULL;
}

static void *busy(void *arg)
{
    CK_SESSION_HANDLE h = session();
    CK_OBJECT_HANDLE aes = find_key(h, "aes"), mac = find_key(h, "hmac");
    (void)arg;
    for (int i = 0; !busy_stop; i = (i + 1) % ITERS, busy_rounds++)
        check_one(h, aes, mac, 0, i);
    CHECK(f->C_CloseSession(h));
    return NULL;
}

static void mode_threads(void)
{
    pthread_t th[NTHREADS];
    for (long t = 0; t < NTHREADS; t++)
        if (pthread_create(&th[t], NULL, worker, (void *)t) != 0)
            FAIL("pthread_create");
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(th[t], NULL);
    printf("ok threads %d x %d\n", NTHREADS, ITERS);
}

static int child_body(int c)
{
    CK_INFO info;
    alarm(CHILD_DEADLINE_S); /* a deadlocked child dies of SIGALRM and is reported */
    if (f->C_GetInfo(&info) != CKR_CRYPTOKI_NOT_INITIALIZED)
        FAIL("child %d: the module is initialised after fork", c);
    CHECK(f->C_Initialize(NULL));
    find_slot();
    CK_SESSION_HANDLE h = session();
    check_one(h, find_key(h, "aes"), find_key(h, "hmac"), c % NTHREADS, c % ITERS);
    CHECK(f->C_Finalize(NULL));
    return 0;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void mode_fork(CK_SESSION_HANDLE h)
{
    pthread_t b;
    pid_t kids[NCHILDREN];
    int done = 0, failed = 0;
    if (pthread_create(&b, NULL, busy, NULL) != 0)
        FAIL("pthread_create");
    while (busy_rounds < 2) /* the busy thread is really inside the module */
        usleep(1000);
    fflush(stdout);
    for (int c = 0; c < NCHILDREN; c++) {
        kids[c] = fork();
        if (kids[c] < 0)
            FAIL("fork: %s", strerror(errno));
        if (kids[c] == 0)
            _exit(child_body(c));
    }
    double deadline = now_s() + CHILD_DEADLINE_S + 5;
    while (done < NCHILDREN) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p < 0)
            FAIL("waitpid: %s", strerror(errno));
        if (p == 0) {
            if (now_s() > deadline)
                break;
            usleep(10000);
            continue;
        }
        for (int c = 0; c < NCHILDREN; c++) {
            if (kids[c] != p)
                continue;
            kids[c] = 0;
            done++;
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                failed++;
                printf("child %d: %s %d\n", c, WIFEXITED(st) ? "exit status" : "signal",
                       WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
            }
        }
    }
    for (int c = 0; c < NCHILDREN; c++) {
        if (kids[c] > 0) {
            kill(kids[c], SIGKILL);
            waitpid(kids[c], NULL, 0);
            printf("child %d: still running at the deadline (deadlock?)\n", c);
            failed++;
        }
    }
    busy_stop = 1;
    pthread_join(b, NULL);
    if (failed)
        FAIL("%d of %d children failed", failed, NCHILDREN);
    /* The parent's own session and connections survived the forks. */
    check_one(h, find_key(h, "aes"), find_key(h, "hmac"), 3, 5);
    printf("ok fork %d children, busy thread %d rounds\n", NCHILDREN, busy_rounds);
}

static void mode_reinit(void)
{
    CK_INFO info;
    CHECK(f->C_Finalize(NULL));
    if (f->C_GetInfo(&info) != CKR_CRYPTOKI_NOT_INITIALIZED)
        FAIL("still initialised after C_Finalize");
    CHECK(f->C_Initialize(NULL));
    find_slot();
    CK_SESSION_HANDLE h = session();
    check_one(h, find_key(h, "aes"), find_key(h, "hmac"), 7, ITERS - 1);
    printf("ok reinit\n");
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void mode_bench(CK_SESSION_HANDLE h, int n)
{
    unsigned char msg[MSG_LEN], out[MAC_LEN];
    CK_MECHANISM hm = {CKM_SHA256_HMAC, NULL, 0};
    CK_OBJECT_HANDLE mac = find_key(h, "hmac");
    double *lat = malloc(sizeof(double) * (size_t)n);
    if (lat == NULL || n < 1)
        FAIL("bench count");
    message(0, 0, msg);
    for (int i = 0; i < n + 50; i++) {
        CK_ULONG len = sizeof out;
        double t0 = now_s();
        CHECK(f->C_SignInit(h, &hm, mac));
        CHECK(f->C_Sign(h, msg, MSG_LEN, out, &len));
        if (i >= 50) /* the first calls warm up the connection */
            lat[i - 50] = (now_s() - t0) * 1e6;
    }
    if (memcmp(out, exp_mac[0][0], MAC_LEN) != 0)
        FAIL("bench MAC differs");
    qsort(lat, (size_t)n, sizeof(double), cmp_double);
    printf("ok bench %d C_SignInit+C_Sign: median %.1f us, p90 %.1f us\n", n, lat[n / 2],
           lat[(n * 9) / 10]);
    free(lat);
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODULE TOKEN-LABEL MODE...\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL)
        FAIL("dlopen: %s", dlerror());
    memset(label, ' ', sizeof label);
    memcpy(label, argv[2], strnlen(argv[2], sizeof label));
    read_input();
    CK_C_GetFunctionList gfl = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    if (gfl == NULL)
        FAIL("no C_GetFunctionList");
    CHECK(gfl(&f));
    CHECK(f->C_Initialize(NULL));
    find_slot();
    CK_SESSION_HANDLE h = session();
    import_keys(h);
    for (int a = 3; a < argc; a++) {
        if (strcmp(argv[a], "threads") == 0)
            mode_threads();
        else if (strcmp(argv[a], "fork") == 0)
            mode_fork(h);
        else if (strcmp(argv[a], "reinit") == 0)
            mode_reinit();
        else if (strcmp(argv[a], "bench") == 0 && a + 1 < argc)
            mode_bench(h, atoi(argv[++a]));
        else
            FAIL("unknown mode %s", argv[a]);
    }
    CK_RV rv = f->C_Finalize(NULL);
    if (rv != CKR_OK && rv != CKR_CRYPTOKI_NOT_INITIALIZED)
        FAIL("C_Finalize = 0x%lx", (unsigned long)rv);
    return 0;
}
