/* The worker's shared-memory slot: what the master reads to know the
 * worker is alive and not stuck in one request (see arbiter.py).
 *
 * Each slot has one writer, this worker's loop thread; the master only
 * reads.  Stores are relaxed atomics: a reader may see a value one update
 * old, never a torn one.
 */
#include "blaze.h"

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
