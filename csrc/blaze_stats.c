/* The worker's shared-memory slot: what the master reads to know the
 * worker is alive and not stuck in one request (see arbiter.py).
 *
 * Each slot has one writer, this worker's loop thread; the master only
 * reads.  Stores are relaxed atomics: a reader may see a value one update
 * old, never a torn one.
 */
#include "blaze.h"

#include <string.h>
#include <time.h>

double stats_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void store_time(double *where, double value)
{
    __atomic_store(where, &value, __ATOMIC_RELAXED);
}

void stats_heartbeat(blaze_loop *loop)
{
    if (loop->lim.slot)
        store_time(&loop->lim.slot->heartbeat, stats_now());
}

/* The app starts running, or makes progress (sends bytes): restart its clock. */
void stats_busy(blaze_loop *loop)
{
    if (loop->lim.slot)
        store_time(&loop->lim.slot->busy_since, stats_now());
}

void stats_busy_at(blaze_loop *loop, double now)
{
    if (loop->lim.slot)
        store_time(&loop->lim.slot->busy_since, now);
}

void stats_idle(blaze_loop *loop)
{
    if (loop->lim.slot)
        store_time(&loop->lim.slot->busy_since, 0.0);
}

/* One writer per slot: a plain read and a relaxed store are enough. */
#define SLOT_ADD(slot, field, n) \
    __atomic_store_n(&(slot)->field, (slot)->field + (unsigned long long)(n), __ATOMIC_RELAXED)

/* Upper bounds of the latency buckets, seconds; the last bucket is +Inf. */
static const double latency_le[BLAZE_LATENCY_BUCKETS - 1] = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};

double stats_took(const blaze_conn *c)
{
    return c->t_start > 0 ? stats_now() - c->t_start : 0.0;
}

int stats_method_index(int http_method)
{
    switch (http_method) {
    case HTTP_GET: return 0;
    case HTTP_HEAD: return 1;
    case HTTP_POST: return 2;
    case HTTP_PUT: return 3;
    case HTTP_DELETE: return 4;
    case HTTP_PATCH: return 5;
    case HTTP_OPTIONS: return 6;
    default: return 7;
    }
}

/* A response is complete (queued for the kernel): count it. */
void stats_response(blaze_loop *loop, int method_index, int status, double took)
{
    loop->responses++;
    blaze_slot *s = loop->lim.slot;
    if (s == NULL)
        return;
    int cls = status / 100 - 1;
    if (cls < 0 || cls > 4)
        cls = 4;
    if (method_index < 0 || method_index >= BLAZE_METHODS)
        method_index = BLAZE_METHODS - 1;
    SLOT_ADD(s, by_method_status[method_index][cls], 1);
    int b = 0;
    while (b < BLAZE_LATENCY_BUCKETS - 1 && took > latency_le[b])
        b++;
    SLOT_ADD(s, latency[b], 1);
    double sum = s->latency_sum + took;
    store_time(&s->latency_sum, sum);
    /* requests last: a reader that sees it has the cells above too */
    __atomic_store_n(&s->requests, loop->responses, __ATOMIC_RELEASE);
}

void stats_parse_error(blaze_loop *loop)
{
    if (loop->lim.slot)
        SLOT_ADD(loop->lim.slot, parse_errors, 1);
}

void stats_tls_handshake_error(blaze_loop *loop)
{
    if (loop->lim.slot)
        SLOT_ADD(loop->lim.slot, tls_handshake_errors, 1);
}

void stats_in_flight(blaze_loop *loop, int delta)
{
    if (loop->lim.slot)
        __atomic_store_n(&loop->lim.slot->in_flight,
                         loop->lim.slot->in_flight + (unsigned long long)(long long)delta, __ATOMIC_RELAXED);
}

void stats_bytes(blaze_loop *loop, size_t in, size_t out)
{
    blaze_slot *s = loop->lim.slot;
    if (s == NULL)
        return;
    if (in)
        SLOT_ADD(s, bytes_in, in);
    if (out)
        SLOT_ADD(s, bytes_out, out);
}

void stats_connections(blaze_loop *loop)
{
    if (loop->lim.slot)
        __atomic_store_n(&loop->lim.slot->connections, (unsigned long long)loop->nconns,
                         __ATOMIC_RELAXED);
}

/* Per-client rate limiting: GCRA over the table shared by all workers
 * (blaze_rate_table in blaze_cdef.h).
 *
 * A client may make rate_limit requests in a burst, then one every
 * T = 60 s / rate_limit: its entry keeps a theoretical arrival time (TAT),
 * and a request is let through when TAT - (rate_limit - 1) T <= now.  No
 * window edges, one 64-bit compare-and-swap per request, no locks: any
 * worker may update any entry.
 *
 * The table is fixed (BLAZE_RATE_SETS sets of BLAZE_RATE_WAYS entries).  A
 * client hashes (keyed with a per-master random seed, so addresses cannot
 * be chosen to collide) to one set; a new client takes a free entry, or
 * else the entry whose TAT is oldest: that client is the one closest to
 * being back under its limit, and one whose TAT has passed has nothing
 * left to remember.  Two workers claiming entries in the same full set at
 * the same instant may, rarely, lose one count: the limiter errs towards
 * letting a request through, never towards refusing one twice.
 */
static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static blaze_rate_entry *rate_entry(blaze_rate_table *t, uint64_t key)
{
    blaze_rate_entry *set = &t->entries[(key >> 16) % BLAZE_RATE_SETS * BLAZE_RATE_WAYS];
    for (int attempt = 0; attempt < 4; attempt++) {
        for (int w = 0; w < BLAZE_RATE_WAYS; w++)
            if (__atomic_load_n(&set[w].key, __ATOMIC_ACQUIRE) == key)
                return &set[w];
        int victim = 0;
        unsigned long long vkey = 0, oldest = ~0ULL;
        for (int w = 0; w < BLAZE_RATE_WAYS; w++) {
            unsigned long long k = __atomic_load_n(&set[w].key, __ATOMIC_ACQUIRE);
            if (k == 0) {
                victim = w;
                vkey = 0;
                break;
            }
            unsigned long long tat = __atomic_load_n(&set[w].tat, __ATOMIC_ACQUIRE);
            if (tat < oldest) {
                oldest = tat;
                victim = w;
                vkey = k;
            }
        }
        blaze_rate_entry *e = &set[victim];
        if (__atomic_compare_exchange_n(&e->key, &vkey, key, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            if (vkey != 0)      /* forget the evicted client, unless it moved meanwhile */
                __atomic_compare_exchange_n(&e->tat, &oldest, 0ULL, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE);
            return e;
        }
        /* another worker changed the set: look again */
    }
    return NULL;
}

/* GCRA's two constants for rate_limit: the emission interval T = 60 s / limit
 * and the burst tolerance (limit - 1) T, in nanoseconds.  Once per loop. */
void stats_rate_init(blaze_loop *loop)
{
    long long limit = loop->lim.rate_limit;
    if (limit <= 0)
        return;
    loop->rate_period = 60000000000ULL / (uint64_t)limit;
    if (loop->rate_period == 0)
        loop->rate_period = 1;
    loop->rate_tolerance = loop->rate_period * (uint64_t)(limit - 1);
}

int stats_rate_take(blaze_loop *loop, const unsigned char ip[16], double *retry_after)
{
    blaze_rate_table *t = loop->lim.rate_table;
    if (t == NULL || loop->lim.rate_limit <= 0)
        return BLAZE_OK;
    /* An IPv6 client is its /64: one host is usually given a whole /64, and
     * must not get a fresh budget for each address in it. */
    uint64_t a, b = 0;
    memcpy(&a, ip, 8);
    if (client_is_v4(ip))
        memcpy(&b, ip + 8, 8);
    uint64_t key = mix64(mix64(a ^ t->seed) ^ b ^ (t->seed >> 17 | t->seed << 47));
    if (key == 0)
        key = 1;
    blaze_rate_entry *e = rate_entry(t, key);
    if (e == NULL)
        return BLAZE_OK;      /* the set is contended right now: let the request through */
    uint64_t period = loop->rate_period, tolerance = loop->rate_tolerance;
    uint64_t now = now_ns();
    unsigned long long tat = __atomic_load_n(&e->tat, __ATOMIC_ACQUIRE);
    for (;;) {
        uint64_t from = tat > now ? tat : now;
        if (from - now > tolerance) {
            *retry_after = (double)(from - tolerance - now) * 1e-9;
            if (loop->lim.slot)
                SLOT_ADD(loop->lim.slot, rate_limited, 1);
            return BLAZE_ERR;
        }
        if (__atomic_compare_exchange_n(&e->tat, &tat, from + period, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return BLAZE_OK;
    }
}
