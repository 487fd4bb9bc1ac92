/* threads > 1: the queue between the C loop and the app threads.
 *
 * The loop never takes the GIL for a threaded request.  It parses the
 * request, copies the environ block into the connection (c->env) and
 * queues the connection here; an app thread, waiting in blaze_pool_next
 * (called from Python, which cffi runs without the GIL), takes it, calls
 * the app and frames the response into the connection's output buffer --
 * never writing the socket or touching an event -- then hands it back
 * through the done list with the same rc blaze_py_request returns with
 * threads = 1, and the loop writes it:
 *
 *   loop: dispatch --pool_submit--> todo --blaze_pool_next--> thread: app
 *   loop: on_wake: conn_job_ready <-- done <--blaze_pool_next-- thread: rc
 *
 * A streamed body comes back as STREAM after about BLAZE_OUT_HIGH bytes;
 * once the loop has written them it queues the connection again as a
 * RESUME job, so memory stays bounded and a slow client holds no thread.
 *
 * Ownership: a connection in the pool is in exactly one of todo, a thread
 * (taken) or done; pool_next links it, under the lock.  The loop frees a
 * connection only when it is in none of them: a client that leaves while
 * queued is unlinked (pool_cancel) and the app never runs; one that leaves
 * while a thread has it is marked gone, its output fails in the thread,
 * Python closes the app's iterable, and it comes back through done.
 *
 * The loop is woken through an eventfd, written once per burst: by the
 * thread that finds the done list had not been signalled yet.
 *
 * Waking threads.  Python runs one thread at a time (the GIL), so for
 * views that don't wait, a second awake thread only adds GIL hand-offs and
 * context switches: one thread going from job to job without sleeping is
 * fastest.  For views that wait (a database, a sleep), every job needs a
 * thread of its own.  The pool tells them apart by how long jobs take (a
 * moving average): a job gets an idle thread woken for it if jobs are slow,
 * or if no thread is awake to take it.  A fast-looking job that then waits
 * cannot strand the queue: the loop's check (pool_check, every millisecond
 * while jobs wait) wakes a thread for a job that has waited that long.
 */
#include "blaze.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* Jobs averaging more than this are "slow": each gets a thread at once. */
#define POOL_SLOW_NS 200000ULL
/* A queued job waits at most about this long for a busy thread. */
#define POOL_STALL_NS 1000000ULL

struct blaze_pool {
    pthread_mutex_t mu;
    pthread_cond_t work;                      /* idle threads wait here */
    blaze_conn *todo, *todo_tail;             /* queued jobs (borrowed, via pool_next) */
    blaze_conn *done, *done_tail;             /* handed back, for the loop */
    int idle;                                 /* threads waiting on work */
    int signalled;                            /* wake-ups sent, not yet taken */
    int running;                              /* jobs a thread has taken */
    uint64_t avg_ns;                          /* moving average of a job's time in a thread */
    int notified;                             /* wake_fd written since the loop last took done */
    int stop;                                 /* the loop is gone: threads return 0 */
    int wake_fd;                              /* owned: eventfd the loop watches */
    int nthreads;
    blaze_head *heads;                        /* owned: one head buffer per thread */
};

int pool_new(blaze_loop *loop, int nthreads, char *err, size_t errlen)
{
    blaze_pool *p = calloc(1, sizeof(*p));
    if (p == NULL || (p->heads = calloc((size_t)nthreads, sizeof(blaze_head))) == NULL) {
        free(p);
        snprintf(err, errlen, "out of memory");
        return BLAZE_ERR;
    }
    p->nthreads = nthreads;
    p->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->wake_fd < 0) {
        snprintf(err, errlen, "cannot create the thread pool's eventfd: %s", strerror(errno));
        free(p->heads);
        free(p);
        return BLAZE_ERR;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    loop->pool = p;
    return BLAZE_OK;
}

int pool_wake_fd(const blaze_loop *loop)
{
    return loop->pool->wake_fd;
}

/* The loop is gone.  Waiting threads are told to end.  A thread still in
 * the app (a graceful timeout ran out) keeps the pool and its connection:
 * both are left to the process's exit, which follows at once, since
 * freeing them would pull memory from under that thread. */
void pool_free(blaze_loop *loop)
{
    blaze_pool *p = loop->pool;
    if (p == NULL)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    int running = p->running;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    loop->pool = NULL;
    if (running > 0)
        return;
    /* Idle threads may still be on their way out of pthread_cond_wait. */
    for (int spins = 0; spins < 1000; spins++) {
        pthread_mutex_lock(&p->mu);
        int waiting = p->idle;
        pthread_mutex_unlock(&p->mu);
        if (waiting == 0)
            break;
        usleep(1000);
    }
    pthread_mutex_lock(&p->mu);
    int idle = p->idle;
    pthread_mutex_unlock(&p->mu);
    if (idle > 0)
        return;       /* a thread never woke (descheduled): leave it to the exit */
    for (int i = 0; i < p->nthreads; i++)
        free(p->heads[i].buf);
    free(p->heads);
    close(p->wake_fd);
    pthread_cond_destroy(&p->work);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Under the lock: wake an idle thread for the queued jobs if they need one. */
static int wake_one(blaze_pool *p, int stalled)
{
    int awake = p->running + p->signalled;
    if (p->idle <= p->signalled || (awake > 0 && p->avg_ns < POOL_SLOW_NS && !stalled))
        return 0;
    p->signalled++;
    pthread_cond_signal(&p->work);
    return 1;
}

void pool_submit(blaze_loop *loop, blaze_conn *c, int kind)
{
    blaze_pool *p = loop->pool;
    c->t_queued = now_ns();
    c->job_kind = kind;
    c->in_thread = 1;
    c->taken = 0;
    c->pool_next = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->todo_tail)
        p->todo_tail->pool_next = c;
    else
        p->todo = c;
    p->todo_tail = c;
    wake_one(p, 0);
    pthread_mutex_unlock(&p->mu);
}

int pool_check(blaze_loop *loop)
{
    blaze_pool *p = loop->pool;
    pthread_mutex_lock(&p->mu);
    int waiting = p->todo != NULL;
    if (waiting && now_ns() - p->todo->t_queued >= POOL_STALL_NS)
        wake_one(p, 1);
    pthread_mutex_unlock(&p->mu);
    return waiting;
}

int pool_cancel(blaze_loop *loop, blaze_conn *c)
{
    blaze_pool *p = loop->pool;
    int removed = 0;
    pthread_mutex_lock(&p->mu);
    if (c->taken) {
        __atomic_store_n(&c->gone, 1, __ATOMIC_RELAXED);
    } else {
        blaze_conn **q = &p->todo, *prev = NULL;
        while (*q && *q != c) {
            prev = *q;
            q = &(*q)->pool_next;
        }
        if (*q == c) {
            *q = c->pool_next;
            if (p->todo_tail == c)
                p->todo_tail = prev;
            c->pool_next = NULL;
            c->in_thread = 0;
            removed = 1;
        }
    }
    pthread_mutex_unlock(&p->mu);
    return removed;
}

blaze_conn *pool_take_done(blaze_loop *loop)
{
    blaze_pool *p = loop->pool;
    uint64_t count;
    while (read(p->wake_fd, &count, sizeof(count)) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&p->mu);
    blaze_conn *list = p->done;
    p->done = p->done_tail = NULL;
    p->notified = 0;
    pthread_mutex_unlock(&p->mu);
    return list;
}

int blaze_pool_next(blaze_loop *loop, int thread, blaze_conn *done, int rc, blaze_job *job)
{
    blaze_pool *p = loop->pool;
    if (p == NULL || thread < 0 || thread >= p->nthreads)
        return 0;
    uint64_t now = now_ns();
    pthread_mutex_lock(&p->mu);
    if (done != NULL) {
        uint64_t took = now - done->t_taken;
        p->avg_ns = p->avg_ns - p->avg_ns / 8 + took / 8;
        p->heads[thread].conn = NULL;     /* an unsent head (the app failed) dies with the job */
        done->job_rc = rc;
        done->pool_next = NULL;
        if (p->done_tail)
            p->done_tail->pool_next = done;
        else
            p->done = done;
        p->done_tail = done;
        p->running--;
        if (!p->notified) {
            p->notified = 1;
            pthread_mutex_unlock(&p->mu);
            uint64_t one = 1;
            while (write(p->wake_fd, &one, sizeof(one)) < 0 && errno == EINTR)
                ;
            pthread_mutex_lock(&p->mu);
        }
    }
    int waited = 0;
    while (p->todo == NULL && !p->stop) {
        p->idle++;
        pthread_cond_wait(&p->work, &p->mu);
        p->idle--;
        if (p->signalled > 0)
            p->signalled--;
        waited = 1;
    }
    if (p->todo == NULL) {            /* stopping */
        pthread_mutex_unlock(&p->mu);
        return 0;
    }
    blaze_conn *c = p->todo;
    p->todo = c->pool_next;
    if (p->todo == NULL)
        p->todo_tail = NULL;
    c->pool_next = NULL;
    c->taken = 1;
    c->t_taken = waited ? now_ns() : now;
    c->thread_head = &p->heads[thread];
    p->running++;
    pthread_mutex_unlock(&p->mu);
    job->conn = c;
    job->kind = c->job_kind;
    job->req = c->job_req;
    return 1;
}
