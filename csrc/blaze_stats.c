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

void stats_idle(blaze_loop *loop)
{
    if (loop->lim.slot)
        store_time(&loop->lim.slot->busy_since, 0.0);
}

void stats_response_done(blaze_loop *loop)
{
    loop->responses++;
    if (loop->lim.slot)
        __atomic_store_n(&loop->lim.slot->requests, loop->responses, __ATOMIC_RELAXED);
}

void stats_connections(blaze_loop *loop)
{
    if (loop->lim.slot)
        __atomic_store_n(&loop->lim.slot->connections, (unsigned long long)loop->nconns,
                         __ATOMIC_RELAXED);
}
