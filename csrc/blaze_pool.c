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
 * (taken) or done (blaze_queue, under the lock).  The loop frees a
 * connection only when it is in none of them: a client that leaves while
 * queued is unlinked (pool_cancel) and the app never runs; one that leaves
 * while a thread has it is marked gone, its output fails in the thread,
 * Python closes the app's iterable, and it comes back through done.
 *
 * The loop is woken through an eventfd, written once per burst: by the
 * thread that finds the done list had not been signalled yet.
 *
 * Waking threads.  An idle thread sleeps on its own semaphore, on a stack
 * (the last to go idle is the first woken: its cache is warm), and a job
 * is handed to it directly, so a woken thread never queues on the pool's
 * lock.  Python runs one thread at a time (the GIL), so a second awake
 * thread helps only while the first waits (a database, a sleep); while the
 * first computes, it only adds GIL hand-offs and context switches.  So a
 * queued job gets an idle thread woken for it when no thread is awake, or
 * when jobs are slow (a moving average of their time) and the app threads
 * leave the GIL room: their CPU time over the last 10 ms, from
 * CLOCK_THREAD_CPUTIME_ID, is under 3/4 of a core.  A view that computes
 * (Django on a local database) then runs on one or two threads, a view that
 * waits (10 ms of sleep) gets a thread per request.  A job never strands:
 * the loop's check (pool_check, every millisecond while jobs wait) wakes a
 * thread for a job that has waited that long.
 */
#include "blaze.h"

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

/* Jobs averaging less than this just wait for the awake thread. */
#define POOL_SLOW_NS 200000ULL
/* Above this share of a core, the app threads' CPU leaves no room in the GIL. */
#define POOL_GIL_FULL 0.75
/* The window over which that share is measured. */
#define POOL_WINDOW_NS 10000000ULL
/* A queued job waits at most about this long for a busy thread. */
#define POOL_STALL_NS 1000000ULL

typedef struct {
    sem_t wake;                               /* posted when job is set, or at stop */
    blaze_conn *job;                          /* handed over by pool_submit / pool_check */
    blaze_head head;                          /* this thread's response head buffer */
    uint64_t cpu;                             /* its CPU time when it last handed a job back */
} pool_thread;

struct blaze_pool {
    pthread_mutex_t mu;
    blaze_queue todo;                         /* queued jobs */
    blaze_queue done;                         /* handed back, for the loop */
    int *idle;                                /* owned: stack of idle thread indexes */
    int nidle;
    int running;                              /* jobs a thread has (taken, or handed over) */
    uint64_t avg_ns;                          /* moving average of a job's time in a thread */
    uint64_t win_start, win_cpu;              /* the app threads' CPU time in this window */
    int gil_full;                             /* ... was over POOL_GIL_FULL in the last one */
    int notified;                             /* wake_fd written since the loop last took done */
    int stop;                                 /* the loop is gone: threads return 0 */
    int wake_fd;                              /* owned: eventfd the loop watches */
    int nthreads;
    pool_thread *threads;                     /* owned: one per app thread */
};

int pool_new(blaze_loop *loop, int nthreads, char *err, size_t errlen)
{
    blaze_pool *p = calloc(1, sizeof(*p));
    if (p == NULL || (p->threads = calloc((size_t)nthreads, sizeof(pool_thread))) == NULL ||
        (p->idle = calloc((size_t)nthreads, sizeof(int))) == NULL) {
        if (p)
            free(p->threads);
        free(p);
        snprintf(err, errlen, "out of memory");
        return BLAZE_ERR;
    }
    p->nthreads = nthreads;
    p->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->wake_fd < 0) {
        snprintf(err, errlen, "cannot create the thread pool's eventfd: %s", strerror(errno));
        free(p->idle);
        free(p->threads);
        free(p);
        return BLAZE_ERR;
    }
    for (int i = 0; i < nthreads; i++)
        sem_init(&p->threads[i].wake, 0, 0);
    pthread_mutex_init(&p->mu, NULL);
    loop->pool = p;
    return BLAZE_OK;
}

int pool_wake_fd(const blaze_loop *loop)
{
    return loop->pool->wake_fd;
}

/* Jobs average POOL_SLOW_NS or more (app threads write avg_ns under the lock). */
static int jobs_slow(const blaze_pool *p)
{
    return __atomic_load_n(&p->avg_ns, __ATOMIC_RELAXED) >= POOL_SLOW_NS;
}

int pool_jobs_slow(const blaze_loop *loop)
{
    return jobs_slow(loop->pool);
}

/* The loop is gone: idle threads are told to end.  The pool is freed only
 * when every thread is idle; a thread still in the app (a graceful timeout
 * ran out) keeps it and its connection, and both are left to the process's
 * exit, which follows at once.  Threads that have not yet come back to
 * the pool once also keep it.  BLAZE_ERR: the pool was left (and the
 * loop, whose pool pointer those threads read, must be left too). */
int pool_free(blaze_loop *loop)
{
    blaze_pool *p = loop->pool;
    if (p == NULL)
        return BLAZE_OK;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    int all_idle = p->running == 0 && p->nidle == p->nthreads;
    int n = p->nidle;
    p->nidle = 0;
    for (int i = 0; i < n; i++) {
        p->threads[p->idle[i]].job = NULL;
        sem_post(&p->threads[p->idle[i]].wake);
    }
    pthread_mutex_unlock(&p->mu);
    loop->pool = NULL;
    if (!all_idle)
        return BLAZE_ERR;
    /* The threads were woken to end; they touch only their semaphore and
     * the lock on the way out.  Wait until they have left both. */
    for (int spins = 0; spins < 1000; spins++) {
        pthread_mutex_lock(&p->mu);
        int left = p->nthreads - p->nidle;   /* counted back in below by each leaving thread */
        pthread_mutex_unlock(&p->mu);
        if (left == 0)
            break;
        usleep(1000);
    }
    pthread_mutex_lock(&p->mu);
    int gone = p->nidle == p->nthreads;
    pthread_mutex_unlock(&p->mu);
    if (!gone)
        return BLAZE_ERR; /* a thread was descheduled on its way out: leave it all to the exit */
    for (int i = 0; i < p->nthreads; i++) {
        free(p->threads[i].head.buf);
        sem_destroy(&p->threads[i].wake);
    }
    free(p->threads);
    free(p->idle);
    close(p->wake_fd);
    pthread_mutex_destroy(&p->mu);
    free(p);
    return BLAZE_OK;
}

static uint64_t clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ns(void)
{
    return clock_ns(CLOCK_MONOTONIC);
}

/* Under the lock: c goes to thread i (c->taken from now on). */
static void hand_over(blaze_pool *p, int i, blaze_conn *c, uint64_t now)
{
    c->taken = 1;
    c->t_taken = now;
    c->thread_head = &p->threads[i].head;
    p->threads[i].job = c;
    p->running++;
}

/* Under the lock: pop an idle thread for c if c should have one now; the
 * caller posts its semaphore after unlocking.  -1: c waits in todo. */
static int pick_thread(blaze_pool *p, int stalled)
{
    if (p->nidle == 0)
        return -1;
    if (p->running > 0 && !stalled && (!jobs_slow(p) || p->gil_full))
        return -1;
    return p->idle[--p->nidle];
}

/* When c was queued: c->t_job (stats_now, the same clock), not a second clock read. */
static uint64_t queued_ns(const blaze_conn *c)
{
    return (uint64_t)(c->t_job * 1e9);
}

void pool_submit(blaze_loop *loop, blaze_conn *c, int kind)
{
    blaze_pool *p = loop->pool;
    c->job_kind = kind;
    c->in_thread = 1;
    c->taken = 0;
    pthread_mutex_lock(&p->mu);
    int i = p->todo.head == NULL ? pick_thread(p, 0) : -1;
    if (i >= 0)
        hand_over(p, i, c, queued_ns(c));
    else
        queue_push(&p->todo, c);
    pthread_mutex_unlock(&p->mu);
    if (i >= 0)
        sem_post(&p->threads[i].wake);
}

int pool_check(blaze_loop *loop)
{
    blaze_pool *p = loop->pool;
    uint64_t now = now_ns();
    int woken[64], n = 0, i;
    pthread_mutex_lock(&p->mu);
    /* Every job that has waited that long gets a thread (64 per check at most). */
    while (n < 64 && p->todo.head != NULL && now - queued_ns(p->todo.head) >= POOL_STALL_NS &&
           (i = pick_thread(p, 1)) >= 0) {
        hand_over(p, i, queue_pop(&p->todo), now);
        woken[n++] = i;
    }
    int waiting = p->todo.head != NULL;
    pthread_mutex_unlock(&p->mu);
    for (int k = 0; k < n; k++)
        sem_post(&p->threads[woken[k]].wake);
    return waiting;
}

int pool_cancel(blaze_loop *loop, blaze_conn *c)
{
    blaze_pool *p = loop->pool;
    int removed = 0;
    pthread_mutex_lock(&p->mu);
    if (c->taken) {
        __atomic_store_n(&c->gone, 1, __ATOMIC_RELAXED);
    } else if (queue_remove(&p->todo, c)) {
        c->in_thread = 0;
        removed = 1;
    }
    pthread_mutex_unlock(&p->mu);
    return removed;
}

blaze_queue pool_take_done(blaze_loop *loop)
{
    blaze_pool *p = loop->pool;
    uint64_t count;
    while (read(p->wake_fd, &count, sizeof(count)) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&p->mu);
    blaze_queue list = p->done;
    p->done.head = p->done.tail = NULL;
    p->notified = 0;
    pthread_mutex_unlock(&p->mu);
    return list;
}

int blaze_pool_next(blaze_loop *loop, int thread, blaze_conn *done, int rc, blaze_job *job)
{
    blaze_pool *p = loop->pool;
    if (p == NULL || thread < 0 || thread >= p->nthreads)
        return 0;
    pool_thread *me = &p->threads[thread];
    uint64_t now = now_ns();
    /* The GIL's room matters only for slow jobs; the clock costs a system call. */
    int slow = jobs_slow(p);
    uint64_t cpu = slow ? clock_ns(CLOCK_THREAD_CPUTIME_ID) : 0;   /* stands still while it sleeps */
    int notify = 0;
    blaze_conn *c = NULL;
    pthread_mutex_lock(&p->mu);
    if (slow && me->cpu != 0)              /* what it used since its last call */
        p->win_cpu += cpu - me->cpu;
    me->cpu = cpu;
    if (now - p->win_start >= POOL_WINDOW_NS) {
        p->gil_full = (double)p->win_cpu > POOL_GIL_FULL * (double)(now - p->win_start);
        p->win_start = now;
        p->win_cpu = 0;
    }
    if (done != NULL) {
        uint64_t took = now - done->t_taken;
        __atomic_store_n(&p->avg_ns, p->avg_ns - p->avg_ns / 8 + took / 8, __ATOMIC_RELAXED);
        me->head.conn = NULL;             /* an unsent head (the app failed) dies with the job */
        done->job_rc = rc;
        queue_push(&p->done, done);
        p->running--;
        notify = !p->notified;
        p->notified = 1;
    }
    int stop = p->stop;
    if (stop) {
        p->nidle++;                       /* pool_free counts the threads that have left */
    } else if ((c = queue_pop(&p->todo)) != NULL) {
        hand_over(p, thread, c, now);
        me->job = NULL;
    } else {
        p->idle[p->nidle++] = thread;
    }
    pthread_mutex_unlock(&p->mu);
    if (notify) {
        uint64_t one = 1;
        while (write(p->wake_fd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
    }
    if (stop)
        return 0;
    if (c == NULL) {
        while (sem_wait(&me->wake) < 0 && errno == EINTR)
            ;
        c = me->job;                      /* set under the lock before the post; NULL: stop */
        me->job = NULL;
        if (c == NULL) {
            pthread_mutex_lock(&p->mu);
            p->nidle++;                   /* pool_free counts the threads that have left */
            pthread_mutex_unlock(&p->mu);
            return 0;
        }
    }
    job->conn = c;
    job->kind = c->job_kind;
    job->req = c->job_req;
    return 1;
}

int blaze_pool_reply(blaze_loop *loop, int thread, blaze_conn *done, const char *head,
                     size_t head_len, int nhdrs, const char *body, size_t body_len, blaze_job *job)
{
    if (blaze_resp_simple(done, head, head_len, nhdrs, body, body_len) != BLAZE_OK)
        return -1;
    return blaze_pool_next(loop, thread, done, BLAZE_PY_DONE, job);
}

/* An app thread is SCHED_BATCH: when its job arrives or its sleep ends it
 * does not preempt the loop on the spot; the loop, which every request
 * waits on, keeps its CPU until it sleeps (on 2 cores with 256 threads this
 * removed nearly all involuntary switches).  Same share of CPU, same nice.
 * Its timer slack is 1 us instead of 50: a view's time.sleep(0.01) or a
 * socket timeout ends when asked, not up to 50 us later.  Linux only. */
void blaze_pool_thread_init(void)
{
#ifdef SCHED_BATCH
    struct sched_param sp = {0};
    (void)sched_setscheduler(0, SCHED_BATCH, &sp);
#endif
#ifdef PR_SET_TIMERSLACK
    (void)prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);
#endif
}
