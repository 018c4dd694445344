/*
 * p11bench.c: a PKCS#11 benchmark host for any module (ours, SoftHSM2, p11-kit-client, ...).
 *
 * It dlopen()s the module RTLD_LOCAL as real hosts do, calls C_Initialize with
 * CKF_OS_LOCKING_OK, logs in with a PIN taken from an environment variable (never argv), finds
 * or creates the keys and data objects it needs (labels "p11bench-*"), then runs N threads,
 * each with its own session, doing one operation in a loop for a fixed time (or a fixed count).
 * Every operation is timed into a per-thread log-linear histogram; process CPU comes from
 * getrusage(). Output: "#measure-start" / "#measure-stop" marker lines (so a driver can sample
 * server CPU at the same moments) and one JSON result line, all on stdout.
 *
 * --churn K: thread churn (issue 16). Each worker's OS thread ends after K operations and a
 * new thread takes its place (opening its own session), as hosts with elastic thread pools do;
 * ops/s then includes the cost of the new threads, and the driver counts the new connections.
 *
 * rsasign / ecsign / gcm4k (issue 14): CKM_RSA_PKCS over a SHA-256 DigestInfo with an RSA-2048
 * key, CKM_ECDSA over a 32-byte hash with a P-256 key, CKM_AES_GCM encryption of 4 KiB; the key
 * pairs are generated on the token (C_GenerateKeyPair) when not found by label.
 *
 * Other modes: --setup (create keys/objects and exit), --init-token (C_InitToken on the first
 * slot whose token is not initialised, then C_InitPIN; SO PIN and PIN from the environment).
 *
 * Built by bench/build.py with the system cc against include/pkcs11ws_ck.h.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "benchcommon.h"
#include "pkcs11ws_ck.h"

#define LABEL_HMAC "p11bench-hmac"
#define LABEL_AES "p11bench-aes"
#define LABEL_RSA "p11bench-rsa"
#define LABEL_EC "p11bench-ec"
#define APP_TAG "p11bench"
#define MAX_THREADS 256
#define MAX_ERRORS 50

/* ---- options and shared state ------------------------------------------------------------ */

enum op { OP_NOOP, OP_SESSINFO, OP_SIGN64, OP_SIGN4K, OP_VERIFY64, OP_ENCRYPT4K, OP_DECRYPT4K,
          OP_FIND, OP_RSASIGN, OP_ECSIGN, OP_GCM4K };
static const char *const OP_NAMES[] = {"noop", "sessinfo", "sign64", "sign4k", "verify64",
                                       "encrypt4k", "decrypt4k", "find", "rsasign", "ecsign",
                                       "gcm4k", NULL};

static struct {
    const char *module, *token, *pin_env, *so_pin_env;
    enum op op;
    int threads, count, objects, null_query, setup, init_token, sync, churn;
    double seconds, warmup;
} opt = {.token = "bench", .pin_env = "P11BENCH_PIN", .so_pin_env = "P11BENCH_SO_PIN",
         .op = OP_SIGN64, .threads = 1, .objects = 100, .seconds = 2.0, .warmup = 0.5};

static CK_FUNCTION_LIST *F;
static CK_SLOT_ID slot;
static CK_OBJECT_HANDLE hmac_key, aes_key, rsa_key, ec_key;
static atomic_int phase; /* 0 warm-up, 1 measuring, 2 stop */
static pthread_barrier_t ready;

typedef struct {
    pthread_t tid;
    int id;
    CK_SESSION_HANDLE s;
    hist_t hist;
    uint64_t ops, errors;
    CK_RV first_error;
    const char *error_where;
    unsigned long found;
    unsigned char data[4096], sig[512], ct[4096 + 16], out[4096 + 16];
    CK_ULONG ct_len;
} worker_t;

static void die(const char *what, CK_RV rv)
{
    fprintf(stderr, "p11bench: %s failed: CKR 0x%lx\n", what, (unsigned long)rv);
    exit(1);
}

#define CK(call) do { CK_RV rv_ = (call); if (rv_ != CKR_OK) die(#call, rv_); } while (0)

static const char *pin_from_env(const char *var)
{
    const char *pin = getenv(var);
    if (!pin || !*pin) {
        fprintf(stderr, "p11bench: set the PIN in the environment variable %s\n", var);
        exit(2);
    }
    return pin;
}

/* ---- slots, login, objects ----------------------------------------------------------------- */

static int label_is(const CK_UTF8CHAR label[32], const char *want)
{
    size_t n = strlen(want);
    if (n > 32 || memcmp(label, want, n) != 0) return 0;
    for (size_t i = n; i < 32; i++)
        if (label[i] != ' ') return 0;
    return 1;
}

static void pad_label(CK_UTF8CHAR out[32], const char *label)
{
    size_t n = strlen(label);
    memset(out, ' ', 32);
    memcpy(out, label, n > 32 ? 32 : n);
}

static int find_slot(int want_initialised, CK_SLOT_ID *found)
{
    /* Ask for the count first: a service may present more softcards than any fixed buffer. */
    CK_ULONG n = 0;
    CK(F->C_GetSlotList(CK_TRUE, NULL, &n));
    CK_SLOT_ID *slots = calloc(n ? n : 1, sizeof *slots);
    if (!slots) die("allocating the slot list", CKR_HOST_MEMORY);
    CK(F->C_GetSlotList(CK_TRUE, slots, &n));
    int hit = 0;
    for (CK_ULONG i = 0; i < n && !hit; i++) {
        CK_TOKEN_INFO ti;
        if (F->C_GetTokenInfo(slots[i], &ti) != CKR_OK) continue;
        int initialised = (ti.flags & CKF_TOKEN_INITIALIZED) != 0;
        if (want_initialised ? (initialised && label_is(ti.label, opt.token)) : !initialised) {
            *found = slots[i];
            hit = 1;
        }
    }
    free(slots);
    return hit;
}

static CK_OBJECT_HANDLE find_one(CK_SESSION_HANDLE s, CK_OBJECT_CLASS cls, const char *label)
{
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, (void *)label, strlen(label)}};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    CK_ULONG n = 0;
    CK(F->C_FindObjectsInit(s, t, 2));
    CK(F->C_FindObjects(s, &h, 1, &n));
    CK(F->C_FindObjectsFinal(s));
    return n ? h : CK_INVALID_HANDLE;
}

static CK_OBJECT_HANDLE hmac_key_get(CK_SESSION_HANDLE s)
{
    CK_OBJECT_HANDLE h = find_one(s, CKO_SECRET_KEY, LABEL_HMAC);
    if (h != CK_INVALID_HANDLE) return h;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
    CK_ULONG len = 32;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_KEY_TYPE, &kt, sizeof kt},
                        {CKA_VALUE_LEN, &len, sizeof len}, {CKA_TOKEN, &yes, 1},
                        {CKA_PRIVATE, &yes, 1}, {CKA_SENSITIVE, &yes, 1}, {CKA_SIGN, &yes, 1},
                        {CKA_VERIFY, &yes, 1}, {CKA_LABEL, LABEL_HMAC, strlen(LABEL_HMAC)}};
    CK_MECHANISM gen = {CKM_GENERIC_SECRET_KEY_GEN, NULL, 0};
    CK(F->C_GenerateKey(s, &gen, t, sizeof t / sizeof t[0], &h));
    return h;
}

static CK_OBJECT_HANDLE aes_key_get(CK_SESSION_HANDLE s)
{
    CK_OBJECT_HANDLE h = find_one(s, CKO_SECRET_KEY, LABEL_AES);
    if (h != CK_INVALID_HANDLE) return h;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ULONG len = 32;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_KEY_TYPE, &kt, sizeof kt},
                        {CKA_VALUE_LEN, &len, sizeof len}, {CKA_TOKEN, &yes, 1},
                        {CKA_PRIVATE, &yes, 1}, {CKA_SENSITIVE, &yes, 1},
                        {CKA_ENCRYPT, &yes, 1}, {CKA_DECRYPT, &yes, 1},
                        {CKA_LABEL, LABEL_AES, strlen(LABEL_AES)}};
    CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0};
    CK(F->C_GenerateKey(s, &gen, t, sizeof t / sizeof t[0], &h));
    return h;
}

/* A key pair for the issue 14 benchmarks: RSA-2048 (e = 65537) or EC P-256, found by the
 * private key's label, generated on the token when missing (the same templates for every
 * module, so SoftHSM2 and ours hold the same kind of key). */
static CK_OBJECT_HANDLE key_pair_get(CK_SESSION_HANDLE s, int rsa)
{
    const char *label = rsa ? LABEL_RSA : LABEL_EC;
    CK_OBJECT_HANDLE h = find_one(s, CKO_PRIVATE_KEY, label);
    if (h != CK_INVALID_HANDLE) return h;
    static const unsigned char p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01,
                                         0x07};
    static const unsigned char e65537[] = {0x01, 0x00, 0x01};
    CK_ULONG bits = 2048;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE pub[] = {{CKA_TOKEN, &yes, 1}, {CKA_VERIFY, &yes, 1},
                          {CKA_LABEL, (void *)label, strlen(label)},
                          {CKA_EC_PARAMS, (void *)p256, sizeof p256},
                          {CKA_MODULUS_BITS, &bits, sizeof bits},
                          {CKA_PUBLIC_EXPONENT, (void *)e65537, sizeof e65537}};
    if (rsa) pub[3] = pub[5]; /* RSA: bits and exponent; EC: the curve */
    CK_ULONG npub = rsa ? 5 : 4;
    CK_ATTRIBUTE priv[] = {{CKA_TOKEN, &yes, 1}, {CKA_PRIVATE, &yes, 1},
                           {CKA_SENSITIVE, &yes, 1}, {CKA_EXTRACTABLE, &no, 1},
                           {CKA_SIGN, &yes, 1}, {CKA_LABEL, (void *)label, strlen(label)}};
    CK_MECHANISM gen = {rsa ? CKM_RSA_PKCS_KEY_PAIR_GEN : CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_OBJECT_HANDLE pub_h;
    CK(F->C_GenerateKeyPair(s, &gen, pub, npub, priv, sizeof priv / sizeof priv[0], &pub_h,
                            &h));
    return h;
}

static CK_ATTRIBUTE find_template[2];
static CK_OBJECT_CLASS data_class = CKO_DATA;

static unsigned long count_data_objects(CK_SESSION_HANDLE s)
{
    CK_OBJECT_HANDLE hs[64];
    CK_ULONG n = 0;
    unsigned long total = 0;
    CK(F->C_FindObjectsInit(s, find_template, 2));
    do {
        CK(F->C_FindObjects(s, hs, 64, &n));
        total += n;
    } while (n);
    CK(F->C_FindObjectsFinal(s));
    return total;
}

static void data_objects_ensure(CK_SESSION_HANDLE s)
{
    unsigned long have = count_data_objects(s);
    CK_BBOOL yes = CK_TRUE;
    unsigned char value[32];
    for (unsigned long i = have; i < (unsigned long)opt.objects; i++) {
        char label[48];
        int len = snprintf(label, sizeof label, "p11bench-obj-%lu", i);
        memset(value, (int)i, sizeof value);
        CK_ATTRIBUTE t[] = {{CKA_CLASS, &data_class, sizeof data_class}, {CKA_TOKEN, &yes, 1},
                            {CKA_PRIVATE, &yes, 1}, {CKA_LABEL, label, (CK_ULONG)len},
                            {CKA_APPLICATION, APP_TAG, strlen(APP_TAG)},
                            {CKA_VALUE, value, sizeof value}};
        CK_OBJECT_HANDLE h;
        CK(F->C_CreateObject(s, t, sizeof t / sizeof t[0], &h));
    }
}

/* ---- the operations ----------------------------------------------------------------------- */

static unsigned char iv[16] = {0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
/* DER prefix of a SHA-256 DigestInfo (RFC 8017 9.2 note 1): CKM_RSA_PKCS signs prefix||hash. */
static const unsigned char SHA256_INFO[19] = {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86,
                                              0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
                                              0x00, 0x04, 0x20};

/* RSA-2048 PKCS#1 v1.5 over a SHA-256 DigestInfo, or ECDSA P-256 over a 32-byte hash: the
 * worker's data stands in for the hash (no module hashes it, so all do the same work). */
static CK_RV do_asym_sign(worker_t *w, int rsa)
{
    CK_MECHANISM m = {rsa ? CKM_RSA_PKCS : CKM_ECDSA, NULL, 0};
    unsigned char in[sizeof SHA256_INFO + 32];
    CK_ULONG in_len = 32;
    if (rsa) {
        memcpy(in, SHA256_INFO, sizeof SHA256_INFO);
        memcpy(in + sizeof SHA256_INFO, w->data, 32);
        in_len = sizeof in;
    } else {
        memcpy(in, w->data, 32);
    }
    CK_RV rv = F->C_SignInit(w->s, &m, rsa ? rsa_key : ec_key);
    if (rv != CKR_OK) return rv;
    CK_ULONG sig_len = sizeof w->sig;
    rv = F->C_Sign(w->s, in, in_len, w->sig, &sig_len);
    if (rv == CKR_OK && sig_len != (rsa ? 256u : 64u)) return CKR_GENERAL_ERROR;
    return rv;
}

static CK_RV do_sign(worker_t *w, CK_ULONG len)
{
    CK_MECHANISM m = {CKM_SHA256_HMAC, NULL, 0};
    CK_RV rv = F->C_SignInit(w->s, &m, hmac_key);
    if (rv != CKR_OK) return rv;
    CK_ULONG sig_len = sizeof w->sig;
    if (opt.null_query) {
        rv = F->C_Sign(w->s, w->data, len, NULL, &sig_len);
        if (rv != CKR_OK) return rv;
    }
    rv = F->C_Sign(w->s, w->data, len, w->sig, &sig_len);
    if (rv == CKR_OK && sig_len != 32) return CKR_GENERAL_ERROR;
    return rv;
}

static CK_RV do_op(worker_t *w)
{
    CK_RV rv;
    switch (opt.op) {
    case OP_NOOP:
        return CKR_OK;
    case OP_SESSINFO: {
        CK_SESSION_INFO si;
        return F->C_GetSessionInfo(w->s, &si);
    }
    case OP_SIGN64:
        return do_sign(w, 64);
    case OP_SIGN4K:
        return do_sign(w, 4096);
    case OP_VERIFY64: {
        CK_MECHANISM m = {CKM_SHA256_HMAC, NULL, 0};
        rv = F->C_VerifyInit(w->s, &m, hmac_key);
        if (rv != CKR_OK) return rv;
        return F->C_Verify(w->s, w->data, 64, w->sig, 32);
    }
    case OP_ENCRYPT4K: {
        CK_MECHANISM m = {CKM_AES_CBC, iv, sizeof iv};
        CK_ULONG out = sizeof w->out;
        rv = F->C_EncryptInit(w->s, &m, aes_key);
        if (rv != CKR_OK) return rv;
        rv = F->C_Encrypt(w->s, w->data, 4096, w->out, &out);
        if (rv == CKR_OK && out != 4096) return CKR_GENERAL_ERROR;
        return rv;
    }
    case OP_DECRYPT4K: {
        CK_MECHANISM m = {CKM_AES_CBC_PAD, iv, sizeof iv};
        CK_ULONG out = sizeof w->out;
        rv = F->C_DecryptInit(w->s, &m, aes_key);
        if (rv != CKR_OK) return rv;
        rv = F->C_Decrypt(w->s, w->ct, w->ct_len, w->out, &out);
        if (rv == CKR_OK && out != 4096) return CKR_GENERAL_ERROR;
        return rv;
    }
    case OP_RSASIGN:
        return do_asym_sign(w, 1);
    case OP_ECSIGN:
        return do_asym_sign(w, 0);
    case OP_GCM4K: {
        /* AES-256-GCM, 12-byte IV, 128-bit tag, no AAD; a fixed IV is fine for a benchmark. */
        CK_GCM_PARAMS gp = {iv, 12, 96, NULL, 0, 128};
        CK_MECHANISM m = {CKM_AES_GCM, &gp, sizeof gp};
        CK_ULONG out = sizeof w->out;
        rv = F->C_EncryptInit(w->s, &m, aes_key);
        if (rv != CKR_OK) return rv;
        rv = F->C_Encrypt(w->s, w->data, 4096, w->out, &out);
        if (rv == CKR_OK && out != 4096 + 16) return CKR_GENERAL_ERROR;
        return rv;
    }
    case OP_FIND: {
        CK_OBJECT_HANDLE hs[32];
        CK_ULONG n = 0;
        unsigned long total = 0;
        rv = F->C_FindObjectsInit(w->s, find_template, 2);
        if (rv != CKR_OK) return rv;
        do {
            rv = F->C_FindObjects(w->s, hs, 32, &n);
            if (rv != CKR_OK) {
                F->C_FindObjectsFinal(w->s);
                return rv;
            }
            total += n;
        } while (n);
        rv = F->C_FindObjectsFinal(w->s);
        w->found = total;
        if (rv == CKR_OK && total < (unsigned long)opt.objects) return CKR_GENERAL_ERROR;
        return rv;
    }
    }
    return CKR_FUNCTION_NOT_SUPPORTED;
}

/* Per-thread inputs that need the module: a valid MAC to verify, a ciphertext to decrypt. */
static CK_RV prepare(worker_t *w)
{
    for (size_t i = 0; i < sizeof w->data; i++) w->data[i] = (unsigned char)(i * 31 + w->id);
    if (opt.op == OP_VERIFY64) {
        int saved = opt.null_query;
        opt.null_query = 0;
        CK_RV rv = do_sign(w, 64);
        opt.null_query = saved;
        return rv;
    }
    if (opt.op == OP_DECRYPT4K) {
        CK_MECHANISM m = {CKM_AES_CBC_PAD, iv, sizeof iv};
        w->ct_len = sizeof w->ct;
        CK_RV rv = F->C_EncryptInit(w->s, &m, aes_key);
        if (rv != CKR_OK) return rv;
        return F->C_Encrypt(w->s, w->data, 4096, w->ct, &w->ct_len);
    }
    return CKR_OK;
}

static void record_error(worker_t *w, CK_RV rv, const char *where)
{
    if (!w->errors++) {
        w->first_error = rv;
        w->error_where = where;
    }
}

/* One short-lived thread of a --churn worker: its own session, up to opt.churn operations. */
static void *churn_thread(void *arg)
{
    worker_t *w = arg;
    CK_RV rv = F->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &w->s);
    if (rv != CKR_OK) {
        record_error(w, rv, "C_OpenSession");
        return NULL;
    }
    if ((rv = prepare(w)) != CKR_OK) record_error(w, rv, "prepare");
    for (int i = 0; i < opt.churn && !w->errors; i++) {
        if (atomic_load_explicit(&phase, memory_order_relaxed) == 2) break;
        uint64_t t0 = now_ns();
        rv = do_op(w);
        uint64_t t1 = now_ns();
        if (rv != CKR_OK) {
            record_error(w, rv, OP_NAMES[opt.op]);
            break;
        }
        if (atomic_load_explicit(&phase, memory_order_relaxed) == 1) {
            hist_add(&w->hist, t1 - t0);
            w->ops++;
        }
    }
    F->C_CloseSession(w->s);
    return NULL;
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    if (opt.churn) {
        pthread_barrier_wait(&ready);
        while (!w->errors && atomic_load_explicit(&phase, memory_order_relaxed) != 2) {
            pthread_t t;
            if (pthread_create(&t, NULL, churn_thread, w) != 0) {
                record_error(w, CKR_HOST_MEMORY, "pthread_create");
                break;
            }
            pthread_join(t, NULL);
        }
        return NULL;
    }
    CK_RV rv = F->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &w->s);
    if (rv != CKR_OK) record_error(w, rv, "C_OpenSession");
    else if ((rv = prepare(w)) != CKR_OK) record_error(w, rv, "prepare");
    pthread_barrier_wait(&ready);
    if (w->errors) return NULL;
    if (opt.count) {
        int mine = opt.count / opt.threads + (w->id < opt.count % opt.threads);
        for (int i = 0; i < mine; i++) {
            uint64_t t0 = now_ns();
            rv = do_op(w);
            uint64_t t1 = now_ns();
            if (rv != CKR_OK) {
                record_error(w, rv, OP_NAMES[opt.op]);
                if (w->errors >= MAX_ERRORS) break;
                continue;
            }
            hist_add(&w->hist, t1 - t0);
            w->ops++;
        }
    } else {
        while (atomic_load_explicit(&phase, memory_order_relaxed) != 2) {
            uint64_t t0 = now_ns();
            rv = do_op(w);
            uint64_t t1 = now_ns();
            if (rv != CKR_OK) {
                record_error(w, rv, OP_NAMES[opt.op]);
                if (w->errors >= MAX_ERRORS) break;
                continue;
            }
            /* Count what completes inside the measured window. */
            if (atomic_load_explicit(&phase, memory_order_relaxed) == 1) {
                hist_add(&w->hist, t1 - t0);
                w->ops++;
            }
        }
    }
    F->C_CloseSession(w->s);
    return NULL;
}


/* ---- modes -------------------------------------------------------------------------------- */

static void init_token(void)
{
    const char *so_pin = pin_from_env(opt.so_pin_env), *pin = pin_from_env(opt.pin_env);
    CK_SLOT_ID free_slot;
    if (find_slot(1, &free_slot)) {
        printf("{\"tool\":\"p11bench\",\"mode\":\"init-token\",\"existing\":true}\n");
        return;
    }
    if (!find_slot(0, &free_slot)) {
        fprintf(stderr, "p11bench: no slot with an uninitialised token\n");
        exit(1);
    }
    CK_UTF8CHAR label[32];
    pad_label(label, opt.token);
    CK(F->C_InitToken(free_slot, (CK_UTF8CHAR_PTR)so_pin, strlen(so_pin), label));
    /* SoftHSM moves the token to a new slot number after initialisation: look it up again. */
    if (!find_slot(1, &slot)) die("finding the new token", CKR_TOKEN_NOT_PRESENT);
    CK_SESSION_HANDLE s;
    CK(F->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s));
    CK(F->C_Login(s, CKU_SO, (CK_UTF8CHAR_PTR)so_pin, strlen(so_pin)));
    CK(F->C_InitPIN(s, (CK_UTF8CHAR_PTR)pin, strlen(pin)));
    CK(F->C_Logout(s));
    CK(F->C_CloseSession(s));
    printf("{\"tool\":\"p11bench\",\"mode\":\"init-token\",\"existing\":false}\n");
}

static void usage(void)
{
    fprintf(stderr,
            "usage: p11bench --module PATH [--token LABEL] [--pin-env VAR] [--op OP]\n"
            "                [--threads N] [--seconds S] [--warmup S] [--count N]\n"
            "                [--null-query] [--objects N] [--churn K] [--sync]\n"
            "                [--setup | --init-token]\n"
            "ops: noop sessinfo sign64 sign4k verify64 encrypt4k decrypt4k find\n"
            "     rsasign ecsign gcm4k (issue 14: RSA-2048 PKCS#1 v1.5, ECDSA P-256, AES-GCM 4 KiB)\n");
    exit(2);
}

static void parse(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define TAKE(name) (strcmp(a, name) == 0 && v && (i++, 1))
        if (TAKE("--module")) opt.module = v;
        else if (TAKE("--token")) opt.token = v;
        else if (TAKE("--pin-env")) opt.pin_env = v;
        else if (TAKE("--so-pin-env")) opt.so_pin_env = v;
        else if (TAKE("--threads")) opt.threads = atoi(v);
        else if (TAKE("--seconds")) opt.seconds = atof(v);
        else if (TAKE("--warmup")) opt.warmup = atof(v);
        else if (TAKE("--count")) opt.count = atoi(v);
        else if (TAKE("--objects")) opt.objects = atoi(v);
        else if (TAKE("--churn")) opt.churn = atoi(v);
        else if (TAKE("--op")) {
            int k = 0;
            while (OP_NAMES[k] && strcmp(OP_NAMES[k], v) != 0) k++;
            if (!OP_NAMES[k]) usage();
            opt.op = (enum op)k;
        } else if (strcmp(a, "--null-query") == 0) opt.null_query = 1;
        else if (strcmp(a, "--setup") == 0) opt.setup = 1;
        else if (strcmp(a, "--sync") == 0) opt.sync = 1;
        else if (strcmp(a, "--init-token") == 0) opt.init_token = 1;
        else usage();
#undef TAKE
    }
    if (!opt.module || opt.threads < 1 || opt.threads > MAX_THREADS || opt.seconds <= 0 ||
        opt.churn < 0 || (opt.churn && opt.count))
        usage();
}

int main(int argc, char **argv)
{
    parse(argc, argv);
    find_template[0] = (CK_ATTRIBUTE){CKA_CLASS, &data_class, sizeof data_class};
    find_template[1] = (CK_ATTRIBUTE){CKA_APPLICATION, APP_TAG, strlen(APP_TAG)};
    void *lib = dlopen(opt.module, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "p11bench: dlopen: %s\n", dlerror());
        return 1;
    }
    CK_C_GetFunctionList gfl = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    if (!gfl) {
        fprintf(stderr, "p11bench: no C_GetFunctionList in %s\n", opt.module);
        return 1;
    }
    CK(gfl(&F));
    CK_C_INITIALIZE_ARGS init = {NULL, NULL, NULL, NULL, CKF_OS_LOCKING_OK, NULL};
    CK(F->C_Initialize(&init));
    if (opt.init_token) {
        init_token();
        CK(F->C_Finalize(NULL));
        return 0;
    }
    const char *pin = pin_from_env(opt.pin_env);
    if (!find_slot(1, &slot)) {
        fprintf(stderr, "p11bench: no token labelled %s\n", opt.token);
        return 1;
    }
    CK_SESSION_HANDLE main_s;
    CK(F->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &main_s));
    CK_RV rv = F->C_Login(main_s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) die("C_Login", rv);
    int need_hmac = opt.setup || opt.op == OP_SIGN64 || opt.op == OP_SIGN4K ||
                    opt.op == OP_VERIFY64;
    int need_aes = opt.setup || opt.op == OP_ENCRYPT4K || opt.op == OP_DECRYPT4K ||
                   opt.op == OP_GCM4K;
    if (need_hmac) hmac_key = hmac_key_get(main_s);
    if (need_aes) aes_key = aes_key_get(main_s);
    if (opt.setup || opt.op == OP_RSASIGN) rsa_key = key_pair_get(main_s, 1);
    if (opt.setup || opt.op == OP_ECSIGN) ec_key = key_pair_get(main_s, 0);
    if (opt.setup || opt.op == OP_FIND) data_objects_ensure(main_s);
    if (opt.setup) {
        printf("{\"tool\":\"p11bench\",\"mode\":\"setup\",\"objects\":%lu}\n",
               count_data_objects(main_s));
        CK(F->C_Finalize(NULL));
        return 0;
    }

    static worker_t workers[MAX_THREADS];
    pthread_barrier_init(&ready, NULL, (unsigned)opt.threads + 1);
    for (int i = 0; i < opt.threads; i++) {
        workers[i].id = i;
        pthread_create(&workers[i].tid, NULL, worker_main, &workers[i]);
    }
    pthread_barrier_wait(&ready);
    struct rusage ru0, ru1;
    uint64_t t0, t1;
    if (opt.count) {
        marker("measure-start", opt.sync);
        getrusage(RUSAGE_SELF, &ru0);
        t0 = now_ns();
        atomic_store(&phase, 1);
        for (int i = 0; i < opt.threads; i++) pthread_join(workers[i].tid, NULL);
        t1 = now_ns();
        getrusage(RUSAGE_SELF, &ru1);
        marker("measure-stop", opt.sync);
    } else {
        sleep_s(opt.warmup);
        marker("measure-start", opt.sync);
        getrusage(RUSAGE_SELF, &ru0);
        t0 = now_ns();
        atomic_store(&phase, 1);
        sleep_s(opt.seconds);
        atomic_store(&phase, 2);
        t1 = now_ns();
        getrusage(RUSAGE_SELF, &ru1);
        marker("measure-stop", opt.sync);
        for (int i = 0; i < opt.threads; i++) pthread_join(workers[i].tid, NULL);
    }

    static hist_t all;
    uint64_t ops = 0, errors = 0;
    unsigned long found = 0;
    CK_RV first_error = CKR_OK;
    const char *where = "";
    for (int i = 0; i < opt.threads; i++) {
        hist_merge(&all, &workers[i].hist);
        ops += workers[i].ops;
        if (workers[i].errors && !errors) {
            first_error = workers[i].first_error;
            where = workers[i].error_where;
        }
        errors += workers[i].errors;
        if (workers[i].found > found) found = workers[i].found;
    }
    double secs = (double)(t1 - t0) / 1e9;
    double user = tv_s(ru1.ru_utime) - tv_s(ru0.ru_utime);
    double sys = tv_s(ru1.ru_stime) - tv_s(ru0.ru_stime);
    /* Context switches of all threads (a thread that blocks, on a lock or the GIL, switches). */
    double csw = (double)(ru1.ru_nvcsw - ru0.ru_nvcsw + ru1.ru_nivcsw - ru0.ru_nivcsw);
    printf("{\"tool\":\"p11bench\",\"op\":\"%s\",\"threads\":%d,\"churn\":%d,\"null_query\":%s,"
           "\"seconds\":%.4f,\"ops\":%llu,\"errors\":%llu,\"first_error\":\"0x%lx\","
           "\"error_where\":\"%s\",\"ops_per_s\":%.1f,\"mean_us\":%.3f,\"p50_us\":%.3f,"
           "\"p90_us\":%.3f,\"p99_us\":%.3f,\"max_us\":%.3f,\"cpu_us_per_op\":%.3f,"
           "\"user_s\":%.4f,\"sys_s\":%.4f,\"csw_per_op\":%.3f,\"vcsw\":%ld,\"ivcsw\":%ld,"
           "\"minflt\":%ld,\"found\":%lu}\n",
           OP_NAMES[opt.op], opt.threads, opt.churn, opt.null_query ? "true" : "false", secs,
           (unsigned long long)ops, (unsigned long long)errors, (unsigned long)first_error,
           where, secs > 0 ? (double)ops / secs : 0.0,
           all.n ? (double)all.sum_ns / (double)all.n / 1e3 : 0.0, hist_pct(&all, 50) / 1e3,
           hist_pct(&all, 90) / 1e3, hist_pct(&all, 99) / 1e3, (double)all.max_ns / 1e3,
           ops ? (user + sys) * 1e6 / (double)ops : 0.0, user, sys, ops ? csw / (double)ops : 0.0,
           ru1.ru_nvcsw - ru0.ru_nvcsw, ru1.ru_nivcsw - ru0.ru_nivcsw, ru1.ru_minflt - ru0.ru_minflt,
           found);
    fflush(stdout);
    F->C_CloseSession(main_s);
    F->C_Finalize(NULL);
    return errors && !ops ? 1 : 0;
}
