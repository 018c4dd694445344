/*
 * curlbench.c: the transport floor. Sends the very HTTP request the module sends for C_Sign
 * (body read from a file the driver wrote with the protocol encoder; the activation token from
 * an environment variable, never argv) straight through libcurl, N threads, one easy handle
 * per thread kept alive, the module's TLS settings (client certificate, only the given CA,
 * host name checked, TLS 1.2 minimum), a CURLSH sharing DNS and TLS sessions as the module's
 * transport does. Same fixed-time loop, markers and JSON result line as p11bench, plus the
 * number of new connections (CURLINFO_NUM_CONNECTS) made inside the measured window.
 *
 * Built by bench/build.py with the system cc against the system libcurl.
 */
#define _GNU_SOURCE
#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "benchcommon.h"

#define MAX_THREADS 256
#define MAX_ERRORS 50

static struct {
    const char *url, *body_file, *token_env, *cert, *key, *ca, *user_agent, *expect;
    int threads, count, sync;
    double seconds, warmup;
} opt = {.token_env = "BENCH_TOKEN", .user_agent = "libpkcs11ws/0.1.0",
         .expect = "\"signature\"", .threads = 1, .seconds = 2.0, .warmup = 0.5};

static char *body;
static long body_len;
static struct curl_slist *headers;
static CURLSH *share;
static pthread_mutex_t share_locks[CURL_LOCK_DATA_LAST];
static atomic_int phase;
static pthread_barrier_t ready;

typedef struct {
    pthread_t tid;
    int id;
    hist_t hist;
    uint64_t ops, errors, connects_window, connects_total;
    long first_status;
    int first_code;
    char resp[65536];
    size_t resp_len;
} worker_t;

static void lock_cb(CURL *h, curl_lock_data data, curl_lock_access access, void *user)
{
    (void)h, (void)access, (void)user;
    pthread_mutex_lock(&share_locks[data]);
}

static void unlock_cb(CURL *h, curl_lock_data data, void *user)
{
    (void)h, (void)user;
    pthread_mutex_unlock(&share_locks[data]);
}

static size_t on_data(char *ptr, size_t size, size_t n, void *user)
{
    worker_t *w = user;
    size_t len = size * n;
    if (w->resp_len + len < sizeof w->resp - 1) {
        memcpy(w->resp + w->resp_len, ptr, len);
        w->resp_len += len;
    }
    return len;
}

static CURL *new_handle(worker_t *w)
{
    CURL *c = curl_easy_init();
    if (!c) return NULL;
    curl_easy_setopt(c, CURLOPT_SHARE, share);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(c, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(c, CURLOPT_USERAGENT, opt.user_agent);
    curl_easy_setopt(c, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(c, CURLOPT_CAINFO, opt.ca);
    curl_easy_setopt(c, CURLOPT_CAPATH, NULL);
    curl_easy_setopt(c, CURLOPT_SSLCERT, opt.cert);
    curl_easy_setopt(c, CURLOPT_SSLKEY, opt.key);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 10L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 30L);
    curl_easy_setopt(c, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPIDLE, 30L);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPINTVL, 10L);
    curl_easy_setopt(c, CURLOPT_URL, opt.url);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, body_len);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, w);
    return c;
}

/* One request; returns 0 on a 200 answer that contains the expected text. */
static int one(worker_t *w, CURL *c, long *connects)
{
    w->resp_len = 0;
    CURLcode rc = curl_easy_perform(c);
    long status = 0;
    *connects = 0;
    curl_easy_getinfo(c, CURLINFO_NUM_CONNECTS, connects);
    if (rc != CURLE_OK) {
        if (!w->errors) w->first_code = (int)rc;
        return -1;
    }
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    w->resp[w->resp_len] = 0;
    if (status != 200 || (opt.expect && *opt.expect && !strstr(w->resp, opt.expect))) {
        if (!w->errors) w->first_status = status;
        return -1;
    }
    return 0;
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    CURL *c = new_handle(w);
    long connects = 0;
    /* The first request connects (outside the window), as the module's first call does. */
    if (!c || one(w, c, &connects) != 0) w->errors++;
    w->connects_total += (uint64_t)connects;
    pthread_barrier_wait(&ready);
    if (w->errors) {
        if (c) curl_easy_cleanup(c);
        return NULL;
    }
    int mine = opt.count ? opt.count / opt.threads + (w->id < opt.count % opt.threads) : 0;
    for (int i = 0; opt.count ? i < mine
                              : atomic_load_explicit(&phase, memory_order_relaxed) != 2; i++) {
        uint64_t t0 = now_ns();
        int bad = one(w, c, &connects);
        uint64_t t1 = now_ns();
        w->connects_total += (uint64_t)connects;
        int in_window = opt.count || atomic_load_explicit(&phase, memory_order_relaxed) == 1;
        if (in_window) w->connects_window += (uint64_t)connects;
        if (bad) {
            if (++w->errors >= MAX_ERRORS) break;
            continue;
        }
        if (in_window) {
            hist_add(&w->hist, t1 - t0);
            w->ops++;
        }
    }
    curl_easy_cleanup(c);
    return NULL;
}

static void usage(void)
{
    fprintf(stderr, "usage: curlbench --url URL --body-file F --cert C --key K --ca CA\n"
                    "                 [--token-env VAR] [--threads N] [--seconds S] [--warmup S]\n"
                    "                 [--count N] [--user-agent UA] [--expect TEXT] [--sync]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define TAKE(name) (strcmp(a, name) == 0 && v && (i++, 1))
        if (TAKE("--url")) opt.url = v;
        else if (TAKE("--body-file")) opt.body_file = v;
        else if (TAKE("--token-env")) opt.token_env = v;
        else if (TAKE("--cert")) opt.cert = v;
        else if (TAKE("--key")) opt.key = v;
        else if (TAKE("--ca")) opt.ca = v;
        else if (TAKE("--user-agent")) opt.user_agent = v;
        else if (TAKE("--expect")) opt.expect = v;
        else if (TAKE("--threads")) opt.threads = atoi(v);
        else if (TAKE("--seconds")) opt.seconds = atof(v);
        else if (TAKE("--warmup")) opt.warmup = atof(v);
        else if (TAKE("--count")) opt.count = atoi(v);
        else if (strcmp(a, "--sync") == 0) opt.sync = 1;
        else usage();
#undef TAKE
    }
    if (!opt.url || !opt.body_file || !opt.cert || !opt.key || !opt.ca || opt.threads < 1 ||
        opt.threads > MAX_THREADS)
        usage();
    FILE *f = fopen(opt.body_file, "rb");
    if (!f) {
        perror(opt.body_file);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    body_len = ftell(f);
    rewind(f);
    body = malloc((size_t)body_len + 1);
    if (!body || fread(body, 1, (size_t)body_len, f) != (size_t)body_len) {
        fprintf(stderr, "curlbench: cannot read %s\n", opt.body_file);
        return 1;
    }
    fclose(f);

    curl_global_init(CURL_GLOBAL_DEFAULT);
    headers = curl_slist_append(NULL, "Content-Type: application/json");
    headers = curl_slist_append(headers, "Accept: application/json");
    headers = curl_slist_append(headers, "Expect:");
    const char *token = getenv(opt.token_env);
    if (token && *token) {
        size_t n = strlen(token) + 32;
        char *h = malloc(n);
        snprintf(h, n, "Authorization: Bearer %s", token);
        headers = curl_slist_append(headers, h);
        free(h);
    }
    for (int i = 0; i < CURL_LOCK_DATA_LAST; i++) pthread_mutex_init(&share_locks[i], NULL);
    share = curl_share_init();
    curl_share_setopt(share, CURLSHOPT_LOCKFUNC, lock_cb);
    curl_share_setopt(share, CURLSHOPT_UNLOCKFUNC, unlock_cb);
    curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
    curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);

    static worker_t workers[MAX_THREADS];
    pthread_barrier_init(&ready, NULL, (unsigned)opt.threads + 1);
    for (int i = 0; i < opt.threads; i++) {
        workers[i].id = i;
        pthread_create(&workers[i].tid, NULL, worker_main, &workers[i]);
    }
    pthread_barrier_wait(&ready);
    struct rusage ru0, ru1;
    uint64_t t0, t1;
    if (!opt.count) sleep_s(opt.warmup);
    marker("measure-start", opt.sync);
    getrusage(RUSAGE_SELF, &ru0);
    t0 = now_ns();
    atomic_store(&phase, 1);
    if (opt.count) {
        for (int i = 0; i < opt.threads; i++) pthread_join(workers[i].tid, NULL);
    } else {
        sleep_s(opt.seconds);
        atomic_store(&phase, 2);
    }
    t1 = now_ns();
    getrusage(RUSAGE_SELF, &ru1);
    marker("measure-stop", opt.sync);
    if (!opt.count)
        for (int i = 0; i < opt.threads; i++) pthread_join(workers[i].tid, NULL);

    static hist_t all;
    uint64_t ops = 0, errors = 0, cw = 0, ct = 0;
    long first_status = 0;
    int first_code = 0;
    for (int i = 0; i < opt.threads; i++) {
        worker_t *w = &workers[i];
        hist_merge(&all, &w->hist);
        ops += w->ops;
        if (w->errors && !errors) {
            first_status = w->first_status;
            first_code = w->first_code;
        }
        errors += w->errors;
        cw += w->connects_window;
        ct += w->connects_total;
    }
    double secs = (double)(t1 - t0) / 1e9;
    double user = tv_s(ru1.ru_utime) - tv_s(ru0.ru_utime);
    double sys = tv_s(ru1.ru_stime) - tv_s(ru0.ru_stime);
    printf("{\"tool\":\"curlbench\",\"threads\":%d,\"seconds\":%.4f,\"ops\":%llu,"
           "\"errors\":%llu,\"first_status\":%ld,\"first_curl_code\":%d,\"ops_per_s\":%.1f,"
           "\"mean_us\":%.3f,\"p50_us\":%.3f,\"p90_us\":%.3f,\"p99_us\":%.3f,\"max_us\":%.3f,"
           "\"cpu_us_per_op\":%.3f,\"user_s\":%.4f,\"sys_s\":%.4f,\"connects_window\":%llu,"
           "\"connects_total\":%llu,\"vcsw\":%ld,\"ivcsw\":%ld,\"minflt\":%ld,\"libcurl\":\"%s\"}\n",
           opt.threads, secs, (unsigned long long)ops, (unsigned long long)errors, first_status,
           first_code, secs > 0 ? (double)ops / secs : 0.0,
           all.n ? (double)all.sum_ns / (double)all.n / 1e3 : 0.0, hist_pct(&all, 50) / 1e3,
           hist_pct(&all, 90) / 1e3, hist_pct(&all, 99) / 1e3, (double)all.max_ns / 1e3,
           ops ? (user + sys) * 1e6 / (double)ops : 0.0, user, sys, (unsigned long long)cw,
           (unsigned long long)ct, ru1.ru_nvcsw - ru0.ru_nvcsw, ru1.ru_nivcsw - ru0.ru_nivcsw,
           ru1.ru_minflt - ru0.ru_minflt, curl_version());
    fflush(stdout);
    curl_share_cleanup(share);
    curl_slist_free_all(headers);
    curl_global_cleanup();
    return errors && !ops ? 1 : 0;
}
