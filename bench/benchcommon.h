/* What the benchmark hosts (p11bench.c, curlbench.c) share: the log-linear latency histogram,
 * the monotonic clock, and the marker lines the harness synchronises on. Header-only: each host
 * is one translation unit built by bench/build.py. */
#ifndef PKCS11WS_BENCH_COMMON_H
#define PKCS11WS_BENCH_COMMON_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>

/* ---- log-linear latency histogram (about 1.6 % resolution) ---- */

#define SUB_BITS 6
#define SUB (1u << SUB_BITS)
#define NBUCKETS ((64 - SUB_BITS + 1) * SUB)

typedef struct {
    uint64_t count[NBUCKETS];
    uint64_t n, sum_ns, max_ns;
} hist_t;

static unsigned bucket_of(uint64_t v)
{
    if (v < SUB) return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - SUB_BITS;
    return (shift + 1) * SUB + (unsigned)((v >> shift) & (SUB - 1));
}

/* Midpoint of a bucket, in ns. */
static double bucket_mid(unsigned b)
{
    if (b < SUB) return b;
    unsigned shift = b / SUB - 1;
    uint64_t lo = ((uint64_t)(SUB + b % SUB)) << shift;
    return (double)lo + (double)(1ull << shift) / 2.0;
}

static void hist_add(hist_t *h, uint64_t ns)
{
    h->count[bucket_of(ns)]++;
    h->n++;
    h->sum_ns += ns;
    if (ns > h->max_ns) h->max_ns = ns;
}

static void hist_merge(hist_t *into, const hist_t *from)
{
    for (unsigned i = 0; i < NBUCKETS; i++) into->count[i] += from->count[i];
    into->n += from->n;
    into->sum_ns += from->sum_ns;
    if (from->max_ns > into->max_ns) into->max_ns = from->max_ns;
}

static double hist_pct(const hist_t *h, double pct)
{
    if (!h->n) return 0.0;
    uint64_t want = (uint64_t)((double)h->n * pct / 100.0);
    if (want >= h->n) want = h->n - 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < NBUCKETS; i++) {
        seen += h->count[i];
        if (seen > want) return bucket_mid(i);
    }
    return (double)h->max_ns;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static double tv_s(struct timeval tv)
{
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

/* Print a marker line; with --sync, wait until the driver answers a line on stdin (so that it
 * samples the server at exactly this point, before the run moves on). */
static void marker(const char *what, int sync)
{
    printf("#%s\n", what);
    fflush(stdout);
    if (sync) {
        int c;
        while ((c = getchar()) != EOF && c != '\n') {
        }
    }
}

#endif
