/* The loop of one worker: event base, listeners, signals, timers, run/stop.
 *
 * Signals in a worker belong to this loop: the Python code of a worker
 * runs only inside request callbacks, so a Python signal handler would
 * not run while the loop waits.  Our handler only sets a flag and writes
 * a byte to a self-pipe the loop watches (as libevent's own does); the
 * flag also lets a response framed *while* the app runs -- after SIGTERM
 * arrived but before the loop saw it -- already say Connection: close.
 *   SIGTERM          graceful stop: stop accepting, close idle connections,
 *                    finish in-flight requests, bounded by graceful_timeout.
 *   SIGHUP           retire (the master replaces this worker): the same, but
 *                    idle keep-alive connections are not cut (stop_graceful).
 *   SIGINT, SIGQUIT  fast stop: leave the loop now.
 * A one-second tick refreshes the Date header and notices a dead master.
 */
#include "blaze.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

/* Accept more only when there is room: not stopping, under max_connections.
 * (With threads > 1 a full pool does not stop accepting: a connection left
 * in the listen queue would wait behind every request that keeps coming on
 * connections already accepted, for as long as the load lasts.  New ones
 * queue in line instead, and accept balancing steers them to less loaded
 * workers.) */
static int may_accept(const blaze_loop *loop)
{
    return !loop->stopping && loop->nconns < loop->lim.max_connections;
}

static void listen_events(blaze_loop *loop, int on)
{
    if (loop->accepting == on)
        return;
    for (int i = 0; i < loop->nlisteners; i++) {
        if (on)
            event_add(loop->listeners[i].ev, NULL);
        else
            event_del(loop->listeners[i].ev);
    }
    loop->accepting = on;
}

/* The slot says whether we take connections; a 1 ms deference to a less
 * loaded worker (on_accept) leaves it set: we are back in a moment. */
static void set_accepting(blaze_loop *loop, int on)
{
    listen_events(loop, on);
    if (loop->lim.slot)
        __atomic_store_n(&loop->lim.slot->accepting, (unsigned long long)on, __ATOMIC_RELAXED);
}

/* Does another live worker, accepting too, hold fewer connections than we do
 * (by more than one)?  Then a new connection is better left to it: on a small
 * machine a worker that is not scheduled during a burst of connects (wrk's
 * 64, a proxy's pool) would otherwise get none of them, and keep-alive keeps
 * the imbalance for good.  nginx balances with its accept_disabled the same
 * way.  The slots are other workers' (read only, relaxed).  *held and
 * *workers: the connections of every accepting worker, ours included, and
 * how many they are (for fair_share). */
static int others_less_loaded(const blaze_loop *loop, unsigned long long *held, int *workers)
{
    const blaze_slot *mine = loop->lim.slot;
    *held = (unsigned long long)loop->nconns;
    *workers = 1;
    if (mine == NULL || loop->lim.slots == NULL || loop->nconns < 2)
        return 0;
    double now = stats_now();
    int less = 0;
    for (int i = 0; i < loop->lim.nslots; i++) {
        const blaze_slot *s = &loop->lim.slots[i];
        if (s == mine || __atomic_load_n(&s->pid, __ATOMIC_RELAXED) == 0 ||
            !__atomic_load_n(&s->accepting, __ATOMIC_RELAXED))
            continue;
        double beat;
        __atomic_load(&s->heartbeat, &beat, __ATOMIC_RELAXED);
        if (now - beat > 3.0)
            continue;         /* stuck or gone: not a candidate */
        unsigned long long n = __atomic_load_n(&s->connections, __ATOMIC_RELAXED);
        *held += n;
        (*workers)++;
        if (n + 1 < (unsigned long long)loop->nconns)
            less = 1;
    }
    return less;
}

/* Connections waiting in the kernel to be accepted on a TCP listener (its
 * accept queue, TCP_INFO's tcpi_unacked for a listening socket); 0 when
 * unknown (a Unix socket). */
static unsigned long long accept_queue(int fd)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0 || len < sizeof(ti))
        return 0;
    return ti.tcpi_unacked;
}

/* Accepts per readiness event, while no other worker holds fewer
 * connections (others_less_loaded, asked before each).  Every worker polls
 * the same listening socket, and each new connection's first request is
 * served at once (conn_start), so one accept a pass made a burst of N
 * connects (wrk's 64, a proxy's pool after a reload) wait N passes, each
 * longer than the last: with a Django view of 0.5 ms the 64th waited ~1 s.
 * Asking before each accept keeps the burst shared when the other workers
 * are awake; a worker alone takes it in one pass. */
#define BLAZE_ACCEPT_BATCH 64

/* Listening resumes in usec (on_accept_pause_over). */
static void pause_accepts(blaze_loop *loop, long usec)
{
    struct timeval tv = {0, usec};
    event_add(loop->accept_pause, &tv);
}

/* 1: the next connection is left to a less loaded worker for 1 ms (the
 * slot still says we accept: we are back in a moment); then taken here.
 * Not while we hold less than our fair share of what every accepting
 * worker holds plus what waits in the kernel: a burst bigger than the lead
 * would otherwise go in steps of two connections, each a turn of the other
 * worker's loop.  With 2 workers of 128 app threads each (a 10 ms view, wrk
 * -c256) those turns came every few ms while the app threads took the
 * CPU, and the 256 connects waited up to 150 ms in the accept queue:
 * wrk's p99.9 was 119 ms, 20 ms once the burst was taken in shares. */
static int defer_accept(blaze_loop *loop, int fd)
{
    unsigned long long held;
    int workers;
    if (loop->accept_deferred || !others_less_loaded(loop, &held, &workers)) {
        loop->accept_deferred = 0;
        return 0;
    }
    unsigned long long fair_share = (held + accept_queue(fd) + (unsigned long long)workers - 1) /
                                    (unsigned long long)workers;
    if ((unsigned long long)loop->nconns < fair_share)
        return 0;
    loop->accept_deferred = 1;
    listen_events(loop, 0);
    pause_accepts(loop, 1000);
    return 1;
}

static void on_accept(evutil_socket_t fd, short what, void *arg)
{
    blaze_listener *l = arg;
    blaze_loop *loop = l->loop;
    (void)what;
    for (int i = 0; i < BLAZE_ACCEPT_BATCH && loop->accepting && !defer_accept(loop, fd); i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int cfd = accept4(fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED)
                return;
            /* Out of descriptors or memory: stop accepting for a moment rather
             * than spin on a socket that stays readable. */
            fprintf(stderr, "blazewsgi: accept failed: %s; pausing accepts for 100 ms\n", strerror(errno));
            set_accepting(loop, 0);
            pause_accepts(loop, 100000);
            return;
        }
        blaze_conn *c = conn_new(loop, cfd, l->index, (struct sockaddr *)&ss, (int)sl);
        if (c == NULL)
            close(cfd);      /* out of memory: refuse this one, keep serving */
        else
            conn_start(c);   /* may reach max_connections or a stop: accepting is off then */
    }
}

static void on_accept_pause_over(evutil_socket_t fd, short what, void *arg)
{
    blaze_loop *loop = arg;
    (void)fd;
    (void)what;
    if (may_accept(loop))
        set_accepting(loop, 1);
}

void loop_conn_opened(blaze_loop *loop, blaze_conn *c)
{
    c->next = loop->conns;
    c->prev = NULL;
    if (loop->conns)
        loop->conns->prev = c;
    loop->conns = c;
    loop->nconns++;
    stats_connections(loop);
    if (loop->nconns >= loop->lim.max_connections)
        set_accepting(loop, 0);
}

void loop_conn_closed(blaze_loop *loop, blaze_conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        loop->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    loop->nconns--;
    stats_connections(loop);
    if (may_accept(loop))
        set_accepting(loop, 1);
    loop_maybe_exit(loop);
}

void loop_maybe_exit(blaze_loop *loop)
{
    if (loop->stopping && loop->nconns == 0)
        event_base_loopexit(loop->base, NULL);
}

int buf_reserve(char **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return BLAZE_OK;
    size_t n = *cap ? *cap : 1024;
    while (n < need)
        n *= 2;
    char *p = realloc(*buf, n);
    if (p == NULL)
        return BLAZE_ERR;
    *buf = p;
    *cap = n;
    return BLAZE_OK;
}

int loop_last_response(const blaze_loop *loop)
{
    return loop->lim.max_requests > 0 &&
           loop->responses + 1 >= (unsigned long long)loop->lim.max_requests;
}

static void stop_graceful(blaze_loop *loop, int close_idle);

void loop_stop_graceful(blaze_loop *loop)
{
    stop_graceful(loop, 0);
}

/* Stop accepting; finish what is in flight.  close_idle (SIGTERM: the
 * server is going away) closes connections between requests now; a retiring
 * worker (SIGHUP from the master on reload or scale-down, max_requests)
 * keeps them until their next response (which says close) or their
 * keep-alive timeout, so a client sending right now is not reset. */
static void stop_graceful(blaze_loop *loop, int close_idle)
{
    if (close_idle) {
        conn_flush_corked(loop);   /* a connection is idle once its answer is out */
        /* conn_close_if_idle may free the connection: fetch next first. */
        for (blaze_conn *c = loop->conns, *next; c; c = next) {
            next = c->next;
            conn_close_if_idle(c);
        }
    }
    if (loop->stopping) {
        loop_maybe_exit(loop);
        return;
    }
    loop->stopping = 1;
    set_accepting(loop, 0);
    struct timeval tv;
    tv.tv_sec = (time_t)loop->lim.graceful_timeout;
    tv.tv_usec = (suseconds_t)((loop->lim.graceful_timeout - (double)tv.tv_sec) * 1e6);
    evtimer_add(loop->grace, &tv);
    loop_maybe_exit(loop);
}

static volatile sig_atomic_t term_pending, quit_pending, retire_pending, reopen_pending;
static int signal_pipe[2] = {-1, -1};

static void signal_handler(int sig)
{
    int saved = errno;
    if (sig == SIGTERM)
        term_pending = 1;
    else if (sig == SIGHUP)
        retire_pending = 1;
    else if (sig == SIGUSR1)
        reopen_pending = 1;
    else
        quit_pending = 1;
    char b = 1;
    if (write(signal_pipe[1], &b, 1) < 0) {
        /* the pipe is full: a wakeup is already pending */
    }
    errno = saved;
}

int loop_stopping(const blaze_loop *loop)
{
    return loop->stopping || term_pending || retire_pending;
}

static void on_signal(evutil_socket_t fd, short what, void *arg)
{
    blaze_loop *loop = arg;
    char buf[64];
    (void)what;
    while (read(fd, buf, sizeof(buf)) > 0)
        ;
    if (reopen_pending) {
        reopen_pending = 0;
        log_reopen(loop);
    }
    if (quit_pending) {
        loop->exit_code = 0;
        event_base_loopbreak(loop->base);
    } else if (term_pending) {
        stop_graceful(loop, 1);
    } else if (retire_pending) {
        stop_graceful(loop, 0);
    }
}

static int install_signals(blaze_loop *loop)
{
    if (signal_pipe[0] < 0 && pipe2(signal_pipe, O_NONBLOCK | O_CLOEXEC) != 0)
        return BLAZE_ERR;
    loop->sig_event = event_new(loop->base, signal_pipe[0], EV_READ | EV_PERSIST, on_signal, loop);
    if (loop->sig_event == NULL || event_add(loop->sig_event, NULL) != 0)
        return BLAZE_ERR;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = signal_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGTERM, &sa, NULL) || sigaction(SIGINT, &sa, NULL) || sigaction(SIGQUIT, &sa, NULL) ||
        sigaction(SIGHUP, &sa, NULL) || sigaction(SIGUSR1, &sa, NULL))
        return BLAZE_ERR;
    return BLAZE_OK;
}

static void on_grace_over(evutil_socket_t fd, short what, void *arg)
{
    blaze_loop *loop = arg;
    (void)fd;
    (void)what;
    fprintf(stderr, "blazewsgi: graceful timeout: closing %d connection(s)\n", loop->nconns);
    event_base_loopbreak(loop->base);
}

/* ---- threads > 1: the thread pool's side of the loop ----
 * Complete requests go to the app threads through blaze_pool.c; when a
 * thread hands one back it writes the eventfd, and the loop writes the
 * responses (on_wake).  At most two requests per thread are in the pool
 * (one running, one queued); a further complete request is parked, its
 * unread input stays in the socket, and parked requests go to the pool in
 * the order they completed (dispatch parks behind any already waiting). */
int loop_jobs_full(const blaze_loop *loop)
{
    return loop->jobs >= 2 * loop->lim.threads;
}

void loop_park(blaze_loop *loop, blaze_conn *c)
{
    c->state = CONN_PARKED;
    queue_push(&loop->parked, c);
}

/* Room in the pool: unpark from the loop (not from inside a finishing request). */
void loop_unpark_later(blaze_loop *loop)
{
    if (loop->parked.head && loop->unpark_ev)
        event_active(loop->unpark_ev, EV_TIMEOUT, 0);
}

static void on_unpark(evutil_socket_t fd, short what, void *arg)
{
    blaze_loop *loop = arg;
    (void)fd;
    (void)what;
    while (loop->parked.head && !loop_jobs_full(loop))
        conn_unpark(queue_pop(&loop->parked));
    if (may_accept(loop))
        set_accepting(loop, 1);
}

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
    blaze_loop *loop = arg;
    (void)fd;
    (void)what;
    blaze_queue done = pool_take_done(loop);
    blaze_conn *c;
    while ((c = queue_pop(&done)) != NULL)
        conn_job_ready(c, c->job_rc);
}

static void on_pool_watch(evutil_socket_t fd, short what, void *arg)
{
    blaze_loop *loop = arg;
    (void)fd;
    (void)what;
    if (pool_check(loop))
        loop_watch_pool(loop);
}

void loop_watch_pool(blaze_loop *loop)
{
    static const struct timeval ms = {0, 1000};
    if (!evtimer_pending(loop->pool_watch, NULL))
        evtimer_add(loop->pool_watch, &ms);
}

/* The hung-request clock with threads: the oldest request an app thread holds. */
static void stats_jobs(blaze_loop *loop)
{
    double oldest = 0;
    for (blaze_conn *c = loop->conns; c; c = c->next)
        if (c->state == CONN_THREAD && c->job && (oldest == 0 || c->t_job < oldest))
            oldest = c->t_job;
    if (oldest > 0)
        stats_busy_at(loop, oldest);
    else
        stats_idle(loop);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    blaze_loop *loop = arg;
    (void)fd;
    (void)what;
    write_update_date();
    stats_heartbeat(loop);
    if (loop->lim.threads > 1)
        stats_jobs(loop);
    log_flush(loop);
    if (loop->lim.parent_pid > 0 && getppid() != loop->lim.parent_pid)
        stop_graceful(loop, 1);  /* orphaned: the master is gone */
}

static const struct timeval *common_timeout(struct event_base *base, double seconds)
{
    struct timeval tv;
    tv.tv_sec = (time_t)seconds;
    tv.tv_usec = (suseconds_t)((seconds - (double)tv.tv_sec) * 1e6);
    return event_base_init_common_timeout(base, &tv);
}

/* Request bodies (up to body_buffer_size, 1 MiB by default) are allocated
 * and freed per request.  With glibc's defaults a freed body at the top of
 * the heap is trimmed (brk) as soon as the free space there passes twice
 * the largest freed mapping, and the next body faults its pages in again:
 * 1 MiB POSTs spent ~30% of the worker's time in page faults.  A worker
 * keeps up to BLAZE_TRIM_KEEP of freed heap for reuse instead; blocks under
 * BLAZE_MMAP_MIN come from the heap (fixed, not glibc's moving threshold).
 * mallopt refusing only costs that speed. */
#define BLAZE_TRIM_KEEP (64 << 20)
#define BLAZE_MMAP_MIN (4 << 20)

static void keep_freed_memory(void)
{
    if (mallopt(M_MMAP_THRESHOLD, BLAZE_MMAP_MIN) != 1 || mallopt(M_TRIM_THRESHOLD, BLAZE_TRIM_KEEP) != 1)
        fprintf(stderr, "blazewsgi: mallopt refused; freed memory goes back to the system\n");
}

blaze_loop *blaze_loop_new(const blaze_limits *limits, char *err, size_t errlen)
{
    keep_freed_memory();
    blaze_loop *loop = calloc(1, sizeof(*loop));
    if (loop == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    loop->lim = *limits;
    loop->lim.tmp_dir = NULL;
    loop->lim.log_dir = limits->log_dir;     /* copied by log_init */
    loop->lim.trusted = NULL;
    loop->alog.fd = -1;
    signal(SIGPIPE, SIG_IGN);   /* a vanished client is an EPIPE, not a dead worker */
    if (limits->head_buffer_size < 256 || limits->limit_request_fields < 1 ||
        limits->max_connections < 1) {
        snprintf(err, errlen, "invalid limits (head_buffer_size >= 256, fields >= 1, connections >= 1)");
        goto fail;
    }
    if (client_copy_trusted(&loop->lim, limits) != BLAZE_OK) {
        snprintf(err, errlen, "invalid forwarded_allow_ips (a prefix beyond 0..128, or out of memory)");
        goto fail;
    }
    if (limits->rate_limit < 0 || (limits->rate_limit > 0 && limits->rate_table == NULL)) {
        snprintf(err, errlen, "rate_limit needs the shared rate table");
        goto fail;
    }
    stats_rate_init(loop);
    loop->lim.tmp_dir = strdup(limits->tmp_dir ? limits->tmp_dir : "/tmp");
    loop->base = event_base_new();
    if (loop->lim.tmp_dir == NULL || loop->base == NULL) {
        snprintf(err, errlen, "cannot create the event base");
        goto fail;
    }
    loop->tv_header = common_timeout(loop->base, limits->header_timeout);
    loop->tv_keepalive = common_timeout(loop->base, limits->keepalive_timeout);
    loop->tv_io = common_timeout(loop->base, limits->io_timeout);
    loop->tv_linger = common_timeout(loop->base, 2.0);
    loop->tick = event_new(loop->base, -1, EV_PERSIST, on_tick, loop);
    loop->grace = evtimer_new(loop->base, on_grace_over, loop);
    loop->accept_pause = evtimer_new(loop->base, on_accept_pause_over, loop);
    if (!loop->tick || !loop->grace || !loop->accept_pause ||
        !loop->tv_header || !loop->tv_keepalive || !loop->tv_io || !loop->tv_linger) {
        snprintf(err, errlen, "cannot create loop events");
        goto fail;
    }
    if (limits->threads > 1) {
        if (pool_new(loop, limits->threads, err, errlen) != BLAZE_OK)
            goto fail;
        loop->wake_ev = event_new(loop->base, pool_wake_fd(loop), EV_READ | EV_PERSIST, on_wake, loop);
        loop->unpark_ev = evtimer_new(loop->base, on_unpark, loop);
        loop->pool_watch = evtimer_new(loop->base, on_pool_watch, loop);
        if (!loop->wake_ev || !loop->unpark_ev || !loop->pool_watch || event_add(loop->wake_ev, NULL) != 0) {
            snprintf(err, errlen, "cannot create the thread pool's events");
            goto fail;
        }
    }
    struct timeval one = {1, 0};
    if (install_signals(loop) != BLAZE_OK || event_add(loop->tick, &one)) {
        snprintf(err, errlen, "cannot register signal handlers");
        goto fail;
    }
    if ((loop->scratch = malloc(2 * BLAZE_ENV_HALF(&loop->lim))) == NULL) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if (log_init(loop, err, errlen) != BLAZE_OK)
        goto fail;
    loop->lim.log_dir = NULL;                 /* the caller's string: log_init copied it */
    http_settings_init(&loop->settings);
    /* http-parser's own cap (80 KiB by default) must not undercut ours. */
    http_parser_set_max_header_size((uint32_t)BLAZE_BUF_SIZE(limits));
    loop->accepting = 1;
    if (loop->lim.slot)
        __atomic_store_n(&loop->lim.slot->accepting, 1ULL, __ATOMIC_RELAXED);
    write_update_date();
    return loop;
fail:
    blaze_loop_free(loop);
    return NULL;
}

int blaze_loop_listen(blaze_loop *loop, int fd, int tls, char *err, size_t errlen)
{
    if (loop->nlisteners >= BLAZE_MAX_LISTENERS) {
        snprintf(err, errlen, "too many sockets (at most %d)", BLAZE_MAX_LISTENERS);
        return BLAZE_ERR;
    }
    if (tls && loop->lim.tls == NULL) {
        snprintf(err, errlen, "fd %d: TLS asked for, but the loop has no TLS context", fd);
        return BLAZE_ERR;
    }
    if (evutil_make_socket_nonblocking(fd) != 0) {   /* else accept() blocks the loop */
        snprintf(err, errlen, "cannot make fd %d non-blocking: %s", fd, strerror(errno));
        return BLAZE_ERR;
    }
    /* Responses go out whole: Nagle must not hold a tail.  Set once here:
     * Linux gives accepted sockets the listener's TCP_NODELAY, which spares
     * a system call per connection. */
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
        snprintf(err, errlen, "fd %d: getsockname: %s", fd, strerror(errno));
        return BLAZE_ERR;
    }
    static const struct { int opt; const char *name; } tcp_opts[] = {
        {TCP_NODELAY, "TCP_NODELAY"}, {TCP_DEFER_ACCEPT, "TCP_DEFER_ACCEPT"}};
    int one = 1, tcp = ss.ss_family == AF_INET || ss.ss_family == AF_INET6;
    for (size_t k = 0; tcp && k < sizeof(tcp_opts) / sizeof(tcp_opts[0]); k++)
        if (setsockopt(fd, IPPROTO_TCP, tcp_opts[k].opt, &one, sizeof(one)) != 0) {
            snprintf(err, errlen, "fd %d: cannot set %s: %s", fd, tcp_opts[k].name, strerror(errno));
            return BLAZE_ERR;
        }
    int i = loop->nlisteners;
    blaze_listener *l = &loop->listeners[i];
    l->loop = loop;
    l->fd = fd;
    l->index = i;
    l->tls = tls != 0;
    l->ev = event_new(loop->base, fd, EV_READ | EV_PERSIST, on_accept, l);
    if (l->ev == NULL || (loop->accepting && event_add(l->ev, NULL) != 0)) {
        snprintf(err, errlen, "cannot watch fd %d", fd);
        if (l->ev)
            event_free(l->ev);
        l->ev = NULL;
        return BLAZE_ERR;
    }
    loop->nlisteners++;
    return i;
}

/* Free every connection but those an app thread holds; returns how many those are. */
static int close_all(blaze_loop *loop)
{
    int held = 0;
    blaze_conn *c = loop->conns;
    while (c) {
        blaze_conn *next = c->next;
        if (c->in_thread && !pool_cancel(loop, c))
            held++;
        else
            conn_free(c);
        c = next;
    }
    return held;
}

const char *blaze_loop_values(blaze_loop *loop)
{
    return loop->scratch + BLAZE_ENV_HALF(&loop->lim);
}

size_t blaze_loop_values_cap(blaze_loop *loop)
{
    return BLAZE_ENV_HALF(&loop->lim);
}

const unsigned long long *blaze_loop_flushes(blaze_loop *loop)
{
    return &loop->flushes;
}

/* After a pass that answered requests, let whatever else waits for this CPU
 * run first.  A worker whose clients keep it busy never sleeps in the poll,
 * so the scheduler takes it off the CPU only at a tick (4 ms at Debian's
 * HZ=250).  With more busy processes than cores (two workers and a load
 * generator on two cores; gunicorn's advice of 2 x cores + 1 workers) the
 * clients of the worker left waiting saw that tick as latency (hello, 2
 * workers, wrk -c64 on 2 cores: p99 4.3 ms, 1.5-2.3 ms with the yield;
 * RESULTS.md).  When nothing else is runnable here the call returns at once.
 *
 * Not while the app threads' jobs are slow (they mostly wait: a database,
 * a sleep).  What is runnable then is chiefly those threads, back from
 * their wait for a moment of the GIL, and the loop that every one of their
 * requests goes through would queue behind them (10 ms view, 2 workers,
 * 256 connections: 22.0-22.4k -> 22.9-23.0k req/s).  Fast jobs keep the
 * yield: it is what lets the one awake app thread run (hello, threads = 8:
 * 117-120k req/s with it, 105k without). */
static void yield_after_pass(blaze_loop *loop, unsigned long long answered_before)
{
    if (loop->responses != answered_before && !(loop->pool != NULL && pool_jobs_slow(loop)))
        (void)sched_yield();   /* cannot fail on Linux */
}

int blaze_loop_run(blaze_loop *loop)
{
    write_update_date();
    stats_heartbeat(loop);
    if (term_pending || retire_pending)
        stop_graceful(loop, term_pending);
    if (quit_pending)
        return 0;
    /* One pass at a time: what the pass corked goes out when it ends (blaze_conn.c, cork). */
    for (;;) {
        unsigned long long answered = loop->responses;
        int rc = event_base_loop(loop->base, EVLOOP_ONCE);
        conn_flush_corked(loop);
        yield_after_pass(loop, answered);
        if (rc < 0) {
            log_flush(loop);
            return 1;
        }
        if (rc > 0 || event_base_got_exit(loop->base) || event_base_got_break(loop->base))
            break;
    }
    /* Fast stop or graceful timeout: whatever is left is closed now. */
    close_all(loop);
    log_flush(loop);
    return loop->exit_code;
}

void blaze_loop_free(blaze_loop *loop)
{
    if (loop == NULL)
        return;
    if (close_all(loop) > 0) {
        /* App threads still run requests (the graceful timeout ran out):
         * they use the loop and their connections until they return, so
         * all of it is left to the process's exit, which comes next. */
        pool_free(loop);      /* only tells the idle threads to end */
        return;
    }
    for (int i = 0; i < loop->nlisteners; i++)
        event_free(loop->listeners[i].ev);
    if (loop->accept_pause) event_free(loop->accept_pause);
    if (loop->sig_event) event_free(loop->sig_event);
    if (loop->tick) event_free(loop->tick);
    if (loop->grace) event_free(loop->grace);
    if (loop->wake_ev) event_free(loop->wake_ev);
    if (loop->unpark_ev) event_free(loop->unpark_ev);
    if (loop->pool_watch) event_free(loop->pool_watch);
    if (loop->base) event_base_free(loop->base);
    int left = pool_free(loop) != BLAZE_OK;   /* after wake_ev: its descriptor is the pool's */
    log_free(loop);
    for (int i = 0; i < BLAZE_KEYSETS; i++)
        free(loop->keysets[i].keys);
    free(loop->scratch);
    free(loop->head.buf);
    free((char *)loop->lim.tmp_dir);
    free((blaze_net *)loop->lim.trusted);
    if (!left)
        free(loop);       /* else a thread may still read loop->pool (now NULL) */
}
