/* One connection: its states, buffers, keep-alive, timeouts, new/free.
 *
 * Transitions (conn_step is the one place that moves between them, and
 * handshake the one place that leaves HANDSHAKE):
 *   HANDSHAKE --TLS handshake done--> HEAD  (TLS listeners only)
 *   HANDSHAKE --failed, or the header timer fired--> closed, counted
 *   HEAD  --head complete, no body-->  APP (blaze_py_request)
 *   HEAD  --head complete, body----->  BODY --body complete--> APP
 *   APP   --DONE-->   DRAIN --output drained--> HEAD (keep-alive) | closed
 *   APP   --STREAM--> STREAM --output drained--> APP (blaze_py_resume)
 *   any   --bad request--> LINGER (error answered, write side shut) --> closed
 *   APP   --socket broke inside Python--> DEAD --call returns--> freed
 * With threads > 1 (the app runs in an app thread; blaze_pool.c):
 *   HEAD/BODY --complete, pool full--> PARKED --room--> THREAD
 *   HEAD/BODY --complete--> THREAD --the thread hands it back--> as after APP
 *   STREAM --output drained--> THREAD (resumed by a thread)
 *   THREAD --client closed--> freed if still queued; else marked gone,
 *             freed when the thread hands it back
 * Reading is on in HEAD, BODY and LINGER; in PARKED and THREAD it stays on
 * only to see the client leave, and goes off at its next request's first
 * byte: a client cannot pile up requests while its responses wait
 * (backpressure), and pipelined requests are answered in order.
 *
 * Timers: HEADER is a deadline for a whole head (slowloris) -- on a TLS
 * connection for the handshake and the first head together --, LINGER a
 * deadline for the discard phase; KEEPALIVE and IO restart on progress.
 *
 * TLS: one branch on c->ssl where bytes meet the socket (on_read,
 * conn_send, conn_write_out, shut_write); blaze_tls.c does the rest.
 */
#include "blaze.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static void on_read(evutil_socket_t fd, short what, void *arg);
static void on_write(evutil_socket_t fd, short what, void *arg);
static void on_timer(evutil_socket_t fd, short what, void *arg);
static void conn_step(blaze_conn *c);
static void request_left(blaze_conn *c);

static void timer_set(blaze_conn *c, blaze_timer kind)
{
    if (kind == c->timer && (kind == TIMER_HEADER || kind == TIMER_LINGER))
        return;     /* deadlines are not pushed back by progress */
    c->timer = kind;
    const struct timeval *tv;
    switch (kind) {
    case TIMER_HEADER: tv = c->loop->tv_header; break;
    case TIMER_KEEPALIVE: tv = c->loop->tv_keepalive; break;
    case TIMER_IO: tv = c->loop->tv_io; break;
    case TIMER_LINGER: tv = c->loop->tv_linger; break;
    case TIMER_NONE:
    default:
        event_del(c->ev_timer);
        return;
    }
    event_add(c->ev_timer, tv);
}

static void read_on(blaze_conn *c)
{
    if (!c->reading && event_add(c->ev_read, NULL) == 0)
        c->reading = 1;
    /* OpenSSL may already hold the bytes (read ahead, or a record larger
     * than the room left in buf): the socket will not say so, so run the
     * read callback now.  Not in the handshake, which has used all it can:
     * a half record there would bring us back here at once, in a loop. */
    if (c->ssl && c->reading && c->state != CONN_HANDSHAKE && tls_has_pending(c))
        event_active(c->ev_read, EV_READ, 0);
}

static void read_off(blaze_conn *c)
{
    if (c->reading) {
        event_del(c->ev_read);
        c->reading = 0;
    }
}

void conn_want_write(blaze_conn *c)
{
    if (c->in_thread)
        return;       /* an app thread: the loop starts writing when it gets c back */
    if (!c->writing && event_add(c->ev_write, NULL) == 0)
        c->writing = 1;
}

static void write_off(blaze_conn *c)
{
    if (c->writing) {
        event_del(c->ev_write);
        c->writing = 0;
    }
}

/* Half-close after the last response: TLS says close_notify first. */
static void shut_write(blaze_conn *c)
{
    if (c->ssl)
        tls_shutdown(c);
    shutdown(c->fd, SHUT_WR);
}

blaze_conn *conn_new(blaze_loop *loop, int fd, int listener, const struct sockaddr *sa, int salen)
{
    const blaze_limits *lim = &loop->lim;
    blaze_conn *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->loop = loop;
    c->fd = -1;
    c->body_fd = -1;
    c->listener = listener;
    c->buf = malloc(BLAZE_BUF_SIZE(lim));
    c->hdrs = malloc(sizeof(blaze_header) * (size_t)lim->limit_request_fields);
    c->ev_read = event_new(loop->base, fd, EV_READ | EV_PERSIST, on_read, c);
    c->ev_write = event_new(loop->base, fd, EV_WRITE | EV_PERSIST, on_write, c);
    c->ev_timer = evtimer_new(loop->base, on_timer, c);
    if (!c->buf || !c->hdrs || !c->ev_read || !c->ev_write || !c->ev_timer)
        goto fail;

    client_peer(c, sa, salen);    /* TCP_NODELAY comes from the listener (blaze_loop_listen) */
    c->fd = fd;
    c->id = ++loop->next_id;
    c->state = CONN_HEAD;
    if (loop->listeners[listener].tls) {
        if (tls_conn_init(c, loop->lim.tls) != BLAZE_OK) {
            c->fd = -1;              /* the caller closes fd */
            goto fail;
        }
        c->state = CONN_HANDSHAKE;
    }
    http_request_reset(c);
    timer_set(c, TIMER_HEADER);
    loop_conn_opened(loop, c);
    return c;         /* reading starts with conn_start */
fail:
    if (c->ssl) SSL_free(c->ssl);
    if (c->ev_read) event_free(c->ev_read);
    if (c->ev_write) event_free(c->ev_write);
    if (c->ev_timer) event_free(c->ev_timer);
    free(c->hdrs);
    free(c->buf);
    free(c);
    return NULL;
}

static void job_end(blaze_conn *c)
{
    if (c->job) {
        c->job = 0;
        c->loop->jobs--;
        loop_unpark_later(c->loop);
    }
}

void queue_push(blaze_queue *q, blaze_conn *c)
{
    c->queue_next = NULL;
    if (q->tail)
        q->tail->queue_next = c;
    else
        q->head = c;
    q->tail = c;
}

blaze_conn *queue_pop(blaze_queue *q)
{
    blaze_conn *c = q->head;
    if (c == NULL)
        return NULL;
    q->head = c->queue_next;
    if (q->head == NULL)
        q->tail = NULL;
    c->queue_next = NULL;
    return c;
}

int queue_remove(blaze_queue *q, blaze_conn *c)
{
    blaze_conn **p = &q->head, *prev = NULL;
    while (*p && *p != c) {
        prev = *p;
        p = &(*p)->queue_next;
    }
    if (*p == NULL)
        return 0;
    *p = c->queue_next;
    if (q->tail == c)
        q->tail = prev;
    c->queue_next = NULL;
    return 1;
}

void conn_free(blaze_conn *c)
{
    blaze_loop *loop = c->loop;
    free(c->env);
    c->env = NULL;
    free(c->memo);
    request_left(c);
    if (c->py_stream) {
        c->py_stream = 0;
        blaze_py_abort(c->id);      /* Python closes the app's iterable */
    }
    if (c->state == CONN_PARKED)
        queue_remove(&loop->parked, c);
    if (c->corked)
        queue_remove(&loop->corked, c);   /* its output dies with it, as any unsent output */
    job_end(c);
    if (loop->head.conn == c)
        loop->head.conn = NULL;
    event_free(c->ev_read);
    event_free(c->ev_write);
    event_free(c->ev_timer);
    tls_conn_free(c);             /* before the descriptor: close_notify goes out on it */
    if (c->out)
        evbuffer_free(c->out);
    if (c->body_fd >= 0)
        close(c->body_fd);
    if (c->fd >= 0)
        close(c->fd);
    free(c->body);
    free(c->hdrs);
    free(c->buf);
    loop_conn_closed(loop, c);
    free(c);
}

/* The socket failed.  Never free here: a Python call may hold c.  The
 * zero-delay timer frees it from the loop (or after_python does first). */
void conn_broken(blaze_conn *c)
{
    if (c->in_thread) {
        c->thread_broken = 1;     /* no events from a thread: the loop acts on its return */
        return;
    }
    if (c->state == CONN_DEAD)
        return;
    c->state = CONN_DEAD;
    read_off(c);
    write_off(c);
    event_del(c->ev_timer);
    c->timer = TIMER_NONE;
    event_active(c->ev_timer, EV_TIMEOUT, 0);
}

/* SIGTERM stop: a connection between requests (or still in its TLS
 * handshake) is closed now; one whose next request OpenSSL already holds is not. */
void conn_close_if_idle(blaze_conn *c)
{
    int idle = c->state == CONN_HEAD && c->len == c->start && write_pending(c) == 0 &&
               !(c->ssl && tls_has_pending(c));
    if (idle || c->state == CONN_HANDSHAKE)
        conn_free(c);
}

int conn_dead(const blaze_conn *c)
{
    return c->state == CONN_DEAD ||
           (c->in_thread && (c->thread_broken || __atomic_load_n(&c->gone, __ATOMIC_RELAXED)));
}

/* c joins the connections whose output waits for the pass's end.  What
 * waits already goes first if it has waited long enough, or if `flush`. */
static void cork_join(blaze_conn *c, int flush)
{
    blaze_loop *loop = c->loop;
    if (flush || (loop->corked.head != NULL && c->t_start - loop->cork_since > BLAZE_CORK_SECONDS))
        conn_flush_corked(loop);
    if (loop->corked.head == NULL)
        loop->cork_since = c->t_start;
    c->corked = 1;
    queue_push(&loop->corked, c);
}

/* Corking (threads = 1).  A pass of the loop serves every ready
 * connection in turn.  Writing each response the moment it is made wakes
 * the client once per response; when the app is slow (Django) the client
 * has gone back to sleep in between, and that wake-up (an inter-processor
 * interrupt, costly in a VM) cost our worker more than the write itself:
 * 15 us of kernel time per request.  So the end of a small response on a
 * kept-alive connection (blaze_resp_simple, blaze_resp_last: c->cork_ok)
 * is copied to c->cork (or c->out, see BLAZE_CORK_FLAT) and the connection
 * put in loop->corked;
 * conn_flush_corked writes them one after another when the pass ends
 * (blaze_loop_run), or sooner once the first has waited BLAZE_CORK_SECONDS,
 * or before the app is called while requests average longer than that
 * (conn_flush_before_app): a held answer then waits for one fast request
 * at most, or for a slow one that follows fast ones (as in bjoern, whose
 * writes wait for the next pass).
 * Only a complete response is held: a streamed block goes out at once
 * (PEP 3333: never held while the app makes the next).  Meanwhile the
 * connection goes on as if its output were written: to its next request,
 * read and answered behind it, in order.  1: corked. */
/* May c's output wait for the pass's end (cork, conn_lend_last)?  threads
 * = 1, plain TCP, kept alive: not when a close follows, which waits on it. */
static int may_hold(const blaze_conn *c)
{
    return c->loop->lim.threads <= 1 && !c->ssl && c->keepalive && !c->resp_close && !c->closing;
}

static int cork(blaze_conn *c, const struct iovec *iov, int n, size_t total)
{
    if (!c->cork_ok || !may_hold(c))
        return 0;             /* a close follows: written now, as the close waits on it */
    long long pending = write_pending(c);
    if ((pending > 0 && !c->corked) || (size_t)pending + total > BLAZE_CORK_MAX)
        return 0;             /* output already waiting on the socket, or too big to copy */
    if ((size_t)pending == c->cork_len && c->cork_len + total <= sizeof(c->cork)) {
        for (int i = 0; i < n; i++) {     /* nothing in c->out: the flat buffer keeps the order */
            memcpy(c->cork + c->cork_len, iov[i].iov_base, iov[i].iov_len);
            c->cork_len += iov[i].iov_len;
        }
    } else {
        if (c->out == NULL && (c->out = evbuffer_new()) == NULL)
            return 0;
        size_t before = evbuffer_get_length(c->out);
        for (int i = 0; i < n; i++)
            if (evbuffer_add(c->out, iov[i].iov_base, iov[i].iov_len) != 0)
                return evbuffer_get_length(c->out) == before ? 0 : -1;   /* -1: out of memory, half queued */
    }
    if (!c->corked)
        cork_join(c, 0);
    return 1;
}

int conn_lend_last(blaze_conn *c, const struct iovec *iov, int n)
{
    blaze_loop *loop = c->loop;
    if (n != 2 || iov[1].iov_len < BLAZE_LEND_MIN)
        return 0;
    size_t total = iov[0].iov_len + iov[1].iov_len;
    if (!may_hold(c) || c->corked || write_pending(c) > 0 || total > BLAZE_LEND_MAX || conn_dead(c))
        return 0;
    if (c->out == NULL && (c->out = evbuffer_new()) == NULL)
        return 0;
    if (evbuffer_add(c->out, iov[0].iov_base, iov[0].iov_len) != 0)
        return 0;
    if (evbuffer_add_reference(c->out, iov[1].iov_base, iov[1].iov_len, NULL, NULL) != 0) {
        evbuffer_drain(c->out, iov[0].iov_len);
        return 0;
    }
    /* Too much lent already: what waits goes first (memory held stays bounded). */
    cork_join(c, loop->lent + total > BLAZE_LEND_MAX);
    c->lent = 1;
    loop->lent += total;
    return 1;
}

/* What a lent body's connection could not write at the flush becomes its
 * own copy: Python lets the body go once the flush is over. */
static int unlend(blaze_conn *c)
{
    c->lent = 0;
    size_t left = c->out ? evbuffer_get_length(c->out) : 0;
    if (left == 0)
        return BLAZE_OK;
    struct evbuffer *own = evbuffer_new();
    struct evbuffer_iovec v;
    int ok = own != NULL && evbuffer_reserve_space(own, (ev_ssize_t)left, &v, 1) >= 1 &&
             v.iov_len >= left && evbuffer_copyout(c->out, v.iov_base, left) == (ev_ssize_t)left;
    if (ok) {
        v.iov_len = left;
        evbuffer_commit_space(own, &v, 1);
    } else if (own != NULL) {
        evbuffer_free(own);
        own = NULL;
    }
    evbuffer_free(c->out);        /* drops the reference (with what was left, on failure) */
    c->out = own;
    return ok ? BLAZE_OK : BLAZE_ERR;
}

/* Write what corked connections hold.  Never calls Python (it may run
 * inside a Python call, from cork): what waited for the output to drain
 * (a close, lingering) is left to on_write.  No connection refers to a
 * lent body afterwards (flushes moves). */
void conn_flush_corked(blaze_loop *loop)
{
    blaze_conn *c;
    while ((c = queue_pop(&loop->corked)) != NULL) {
        c->corked = 0;
        int n = conn_write_out(c);
        if (c->lent && unlend(c) != BLAZE_OK)
            n = -1;               /* out of memory: the rest of the response is lost */
        if (n < 0) {
            conn_broken(c);
            continue;
        }
        if (n > 0)
            stats_bytes(loop, 0, (size_t)n);
        if (write_pending(c) == 0) {
            if (c->state == CONN_LINGER)
                shut_write(c);
            else if (c->state == CONN_DRAIN)
                conn_want_write(c);   /* on_write steps it (it waited to close) */
            continue;
        }
        /* The client reads slowly: as without corking, the next request
         * waits for this output (unless it has begun to arrive). */
        if (c->state == CONN_HEAD && c->len == c->start) {
            c->state = CONN_DRAIN;
            read_off(c);
        }
        conn_want_write(c);
        if (c->timer != TIMER_LINGER)
            timer_set(c, TIMER_IO);
    }
    loop->lent = 0;
    loop->flushes++;
}

static void conn_flush_before_app(blaze_loop *loop)
{
    if (loop->corked.head != NULL && loop->app_avg > BLAZE_CORK_SECONDS)
        conn_flush_corked(loop);
}

/* Plain socket: send(2) for one piece, sendmsg(2) for more; EINTR
 * retried.  flags: 0 or MSG_MORE. */
static ssize_t sock_send(int fd, const struct iovec *iov, int n, int flags)
{
    ssize_t w;
    if (n == 1) {
        do
            w = send(fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL | flags);
        while (w < 0 && errno == EINTR);
        return w;
    }
    struct msghdr mh = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n};
    do
        w = sendmsg(fd, &mh, MSG_NOSIGNAL | flags);
    while (w < 0 && errno == EINTR);
    return w;
}

/* conn_send, conn_send_last: last says these are the response's final bytes. */
static int send_or_queue(blaze_conn *c, const struct iovec *iov, int n, int last)
{
    if (conn_dead(c))
        return BLAZE_ERR;
    size_t total = 0, done = 0;
    for (int i = 0; i < n; i++)
        total += iov[i].iov_len;
    if (total == 0)
        return BLAZE_OK;
    int corked = cork(c, iov, n, total);
    if (corked != 0) {
        if (corked < 0)
            conn_broken(c);   /* out of memory with part of it queued */
        return corked > 0 ? BLAZE_OK : BLAZE_ERR;
    }
    /* An app thread only fills c->out; the loop writes it. */
    if (write_pending(c) == 0 && !c->in_thread) {
        ssize_t w;
        /* The final bytes of a response that ends the connection: the FIN
         * rides in their segment (MSG_MORE holds them for the shutdown
         * right after), one packet less for both ends. */
        int fin = last && c->resp_close && !c->ssl;
        if (c->ssl) {
            w = tls_send(c, iov, n);
            if (w < 0)
                errno = EPIPE;
        } else {
            w = sock_send(c->fd, iov, n, fin ? MSG_MORE : 0);
        }
        if (fin && w == (ssize_t)total)
            (void)shutdown(c->fd, SHUT_WR);  /* if it fails, the close that follows sends all */
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                conn_broken(c);
                return BLAZE_ERR;
            }
            w = 0;
        }
        done = (size_t)w;
        stats_bytes(c->loop, 0, done);
        if (done == total)
            return BLAZE_OK;
    }
    if (c->out == NULL && (c->out = evbuffer_new()) == NULL) {
        conn_broken(c);
        return BLAZE_ERR;
    }
    for (int i = 0; i < n; i++) {
        size_t len = iov[i].iov_len;
        const char *base = iov[i].iov_base;
        if (done >= len) {
            done -= len;
            continue;
        }
        if (evbuffer_add(c->out, base + done, len - done) != 0) {
            conn_broken(c);
            return BLAZE_ERR;
        }
        done = 0;
    }
    if (c->in_thread)
        return BLAZE_OK;
    conn_want_write(c);
    if (c->timer != TIMER_LINGER)
        timer_set(c, TIMER_IO);
    return BLAZE_OK;
}

int conn_send(blaze_conn *c, const struct iovec *iov, int n)
{
    return send_or_queue(c, iov, n, 0);
}

int conn_send_last(blaze_conn *c, const struct iovec *iov, int n)
{
    return send_or_queue(c, iov, n, 1);
}

/* Answer an HTTP error and close: the connection lingers, discarding what
 * the client still sends, so it reads the answer instead of a reset. */
void conn_send_error(blaze_conn *c, int status, const char *why)
{
    if (c->state == CONN_DEAD)
        return;
    if (c->resp_started || status == 0) {   /* nothing can be said any more */
        conn_broken(c);
        return;
    }
    const char *reason = write_reason(status);
    char body[256], head[512];
    int bl = snprintf(body, sizeof(body), "%d %s%s%s\n", status, reason,
                      why && status != 500 ? ": " : "", why && status != 500 ? why : "");
    if (bl < 0 || bl >= (int)sizeof(body))
        bl = (int)sizeof(body) - 1;
    int hl = snprintf(head, sizeof(head),
                      "HTTP/1.1 %d %s\r\nServer: BlazeWSGI\r\n%s"
                      "Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
                      "Connection: close\r\n\r\n",
                      status, reason, blaze_date_header, bl);
    if (hl < 0 || hl >= (int)sizeof(head))
        hl = (int)sizeof(head) - 1;
    struct iovec iov[2] = {{head, (size_t)hl}, {body, c->is_head ? 0 : (size_t)bl}};
    if (c->loop->head.conn == c)
        c->loop->head.conn = NULL;
    if (status != 500)
        stats_parse_error(c->loop);        /* the HTTP layer refused the request */
    double took = stats_took(c);
    log_request(c, status, reason, strlen(reason), took);
    stats_response(c->loop, c->method_index, status, took);
    request_left(c);
    if (conn_send(c, iov, 2) != BLAZE_OK)
        return;
    c->state = CONN_LINGER;
    c->closing = 1;
    read_on(c);
    timer_set(c, TIMER_LINGER);
    if (write_pending(c) == 0)
        shut_write(c);
}

/* The response is complete: drop the request's bytes, keep what follows. */
static void response_done(blaze_conn *c)
{
    /* logged first: the line quotes the request target from buf */
    double took = stats_took(c);
    log_request(c, c->resp_status, c->resp_reason, c->resp_reason_len, took);
    c->loop->app_avg += (took - c->loop->app_avg) / 8;
    size_t consumed = c->scan;
    if (c->len > consumed)
        memmove(c->buf, c->buf + consumed, c->len - consumed);
    c->len -= consumed;
    c->start = 0;
    if (c->resp_close || !c->keepalive)   /* frame_head said Connection: close */
        c->closing = 1;
    c->served++;
    stats_response(c->loop, c->method_index, c->resp_status, took);
    request_left(c);
    http_request_reset(c);
    c->state = CONN_DRAIN;
    if (c->loop->lim.max_requests > 0 &&
        c->loop->responses >= (unsigned long long)c->loop->lim.max_requests)
        loop_stop_graceful(c->loop);      /* recycled: the master starts a fresh worker */
}

/* Act on what Python returned. 0: keep stepping; -1: stop (c may be gone). */
static int after_python(blaze_conn *c, int rc)
{
    if (rc == BLAZE_PY_ERROR)
        c->memo_ok = 0;       /* Python may not have remembered this environ (env_delta) */
    /* Set first: if c is freed below, conn_free must tell Python to close
     * the iterable it keeps for a STREAM. */
    c->py_stream = rc == BLAZE_PY_STREAM;
    if (!c->py_stream)
        job_end(c);
    if (c->state == CONN_DEAD) {
        conn_free(c);
        return -1;
    }
    if (rc != BLAZE_PY_ERROR && write_flush_head(c) != BLAZE_OK)
        return -1;        /* broken: the zero-delay timer frees it */
    switch (rc) {
    case BLAZE_PY_STREAM:
        c->state = CONN_STREAM;
        read_off(c);
        conn_want_write(c);
        timer_set(c, TIMER_IO);
        return -1;
    case BLAZE_PY_DONE:
        response_done(c);
        return 0;
    default:
        if (c->loop->head.conn == c)
            c->loop->head.conn = NULL;
        if (c->resp_started)
            conn_broken(c);   /* headers went out: closing is all we can do */
        else
            conn_send_error(c, 500, NULL);
        return -1;
    }
}

/* rate_limit: the client is over its limit.  Answer 429 before reading a
 * body or calling the app; a request with a body is answered with
 * Connection: close and the unread body is discarded while lingering. */
static void refuse_rate_limited(blaze_conn *c, double retry_after)
{
    static const char body[] = "429 Too Many Requests: rate limit exceeded\n";
    char head[104];
    long long secs = (long long)retry_after;
    if ((double)secs < retry_after || secs < 1)
        secs++;           /* whole seconds, rounded up: never "come back" too early */
    int hl = snprintf(head, sizeof(head),
                      "429 Too Many Requests|Retry-After|%lld|Content-Type|text/plain; charset=utf-8", secs);
    if (hl < 0 || hl >= (int)sizeof(head))
        hl = (int)sizeof(head) - 1;
    for (int i = 0; i < hl; i++)
        if (head[i] == '|')
            head[i] = '\0';
    if (c->body_kind != BODY_NONE) {
        c->keepalive = 0;
        c->discard_input = 1;
    }
    if (blaze_resp_simple(c, head, (size_t)hl, 2, body, sizeof(body) - 1) != BLAZE_OK ||
        write_flush_head(c) != BLAZE_OK)
        return;           /* the socket broke: the zero-delay timer frees c */
    response_done(c);
}

/* threads > 1: give c to the app threads; meanwhile only watch for the
 * client leaving.  Writing is off: a thread may be filling c->out. */
static void to_thread(blaze_conn *c, int kind)
{
    c->state = CONN_THREAD;
    c->t_job = stats_now();
    write_off(c);
    timer_set(c, TIMER_NONE);
    read_on(c);
    pool_submit(c->loop, c, kind);
    loop_watch_pool(c->loop);
}

static int dispatch(blaze_conn *c)
{
    blaze_loop *loop = c->loop;
    int threaded = loop->lim.threads > 1;
    if (threaded && (loop_jobs_full(loop) || (loop->parked.head && c->state != CONN_PARKED))) {
        /* This client waits in line.  Reading stays on, as in THREAD, to see
         * it leave (on_read): two epoll_ctl calls a request fewer than
         * turning it off and on, which every request paid when 64 clients
         * shared 8 threads (2 x 8 jobs at a time, the rest parked). */
        loop_park(loop, c);
        timer_set(c, TIMER_NONE);
        return -1;
    }
    blaze_request req;
    int st = http_build_environ(c, &req);
    if (st != 0) {
        conn_send_error(c, st, st == 400 ? "invalid request target" : NULL);
        return -1;
    }
    c->state = CONN_APP;
    c->in_flight = 1;
    stats_in_flight(loop, 1);
    if (threaded) {
        /* the app runs in a thread: the loop's tick keeps the hung-request clock */
        c->job = 1;
        loop->jobs++;
        c->job_req = req;
        to_thread(c, BLAZE_JOB_REQUEST);
        return -1;
    }
    /* no body: the head just completed, t_start is still "now" */
    stats_busy_at(loop, c->body_kind == BODY_NONE ? c->t_start : stats_now());
    conn_flush_before_app(loop);
    int rc = blaze_py_request(c, req.keyset, req.values_len, req.listener, &req, req.delta,
                              req.conn_slot, req.conn_id);
    stats_idle(loop);
    return after_python(c, rc);
}

static void resume(blaze_conn *c)
{
    if (c->job) {
        to_thread(c, BLAZE_JOB_RESUME);   /* the iterator may block: a thread runs it */
        return;
    }
    c->state = CONN_APP;
    stats_busy(c->loop);
    conn_flush_before_app(c->loop);
    int rc = blaze_py_resume(c, c->id);
    stats_idle(c->loop);
    if (after_python(c, rc) == 0)
        conn_step(c);
}

void conn_job_ready(blaze_conn *c, int rc)
{
    int gone = __atomic_load_n(&c->gone, __ATOMIC_RELAXED);
    c->in_thread = 0;
    c->taken = 0;
    c->gone = 0;
    c->thread_head = NULL;
    c->state = CONN_APP;          /* reading stays as it was: the next state sets it */
    if (c->thread_out > 0) {
        stats_bytes(c->loop, 0, c->thread_out);
        c->thread_out = 0;
    }
    if (c->thread_broken || (gone && rc == BLAZE_PY_ERROR)) {
        c->thread_broken = 0;
        c->py_stream = rc == BLAZE_PY_STREAM;   /* on ERROR Python closed the iterable */
        conn_free(c);
        return;
    }
    if (write_pending(c) > 0) {   /* what the thread framed: out now if the socket takes it */
        int n = conn_write_out(c);
        if (n < 0) {
            conn_broken(c);
        } else {
            if (n > 0)
                stats_bytes(c->loop, 0, (size_t)n);
            if (write_pending(c) > 0) {
                conn_want_write(c);
                timer_set(c, TIMER_IO);
            }
        }
    }
    if (after_python(c, rc) == 0)
        conn_step(c);
}

/* For a connection whose input waits unread (PARKED, THREAD): 1 if the
 * client closed or reset it, 0 if bytes wait, -1 if nothing has arrived. */
static int peer_closed(blaze_conn *c)
{
    char byte;
    ssize_t n = recv(c->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0)
        return 0;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return -1;
    return 1;
}

void conn_unpark(blaze_conn *c)
{
    /* Its client may have left while it waited: then the app is not called.
     * With reading on, on_read has seen to that; with it off (bytes of its
     * next request came first), look now. */
    if (!c->reading && peer_closed(c) == 1) {
        conn_free(c);
        return;
    }
    if (dispatch(c) == 0)
        conn_step(c);
}

/* A big body is read in a few large steps, not in whatever pieces the
 * network delivers: SO_RCVLOWAT tells the kernel not to wake this loop
 * until `want` bytes wait.  It is never more than the body still owes, so
 * its last bytes wake the loop; a close or an error wakes it at once.
 * Plain TCP only (TLS reads records; a Unix socket's poll ignores the
 * mark).  0 puts the default (1) back, for the next head.  Progress the
 * mark hides is looked for when the io timer fires (on_timer). */
static void body_lowat(blaze_conn *c, uint64_t want)
{
    if (c->ssl || c->is_unix || want < BLAZE_LOWAT_MIN)
        want = 0;
    else if (want > BLAZE_LOWAT_MAX)
        want = BLAZE_LOWAT_MAX;
    if ((int)want == c->lowat)
        return;
    int v = want > 0 ? (int)want : 1;
    if (setsockopt(c->fd, SOL_SOCKET, SO_RCVLOWAT, &v, sizeof(v)) == 0)
        c->lowat = (int)want;  /* else: woken per piece, as without it */
}

static void conn_step(blaze_conn *c)
{
    static const char continue_100[] = "HTTP/1.1 100 Continue\r\n\r\n";
    for (;;) {
        int status = 0;
        const char *why = NULL;
        blaze_io r;
        switch (c->state) {
        case CONN_HEAD:
            if (c->len == c->start) {              /* between requests */
                c->len = c->start = 0;
                http_request_reset(c);
                timer_set(c, c->served ? TIMER_KEEPALIVE : TIMER_HEADER);
                read_on(c);
                return;
            }
            r = http_read_head(c, &status, &why);
            if (r == IO_AGAIN) {
                timer_set(c, TIMER_HEADER);
                read_on(c);
                return;
            }
            if (r == IO_CLOSE) {
                conn_send_error(c, status, why);
                return;
            }
            c->t_start = stats_now();
            client_resolve(c);
            if (c->loop->lim.rate_limit > 0) {
                const unsigned char *ip = client_ip(c);
                double retry;
                if (ip != NULL && stats_rate_take(c->loop, ip, &retry) != BLAZE_OK) {
                    refuse_rate_limited(c, retry);
                    break;        /* DRAIN (or DEAD): the switch goes on from there */
                }
            }
            if (c->body_kind == BODY_NONE) {
                if (dispatch(c) != 0)
                    return;
                break;
            }
            c->state = CONN_BODY;
            if (c->expect_continue && c->scan == c->len) {
                struct iovec iov = {(void *)continue_100, sizeof(continue_100) - 1};
                if (conn_send(c, &iov, 1) != BLAZE_OK)
                    return;
            }
            timer_set(c, TIMER_IO);
            break;
        case CONN_BODY:
            r = http_read_body(c, &status, &why);
            if (r == IO_AGAIN) {
                body_lowat(c, http_body_awaited(c));
                timer_set(c, TIMER_IO);
                read_on(c);
                return;
            }
            if (c->lowat)
                body_lowat(c, 0);
            if (r == IO_CLOSE) {
                conn_send_error(c, status, why);
                return;
            }
            if (dispatch(c) != 0)
                return;
            break;
        case CONN_DRAIN:
            /* Output waits: the next request waits for it, unless it is
             * corked output (written when the pass ends) and no close waits. */
            if (write_pending(c) > 0 && (c->closing || !c->corked)) {
                read_off(c);
                conn_want_write(c);                /* on_write steps again when drained */
                return;
            }
            if (c->closing) {
                if (c->len > 0 || c->discard_input) {  /* unread input: linger, don't reset */
                    c->state = CONN_LINGER;
                    shut_write(c);
                    read_on(c);
                    timer_set(c, TIMER_LINGER);
                } else {
                    conn_free(c);
                }
                return;
            }
            c->state = CONN_HEAD;
            break;
        case CONN_HANDSHAKE:
        case CONN_APP:
        case CONN_STREAM:
        case CONN_PARKED:
        case CONN_THREAD:
        case CONN_LINGER:
        case CONN_DEAD:
        default:
            return;
        }
    }
}

/* The request no longer counts as in flight (answered, failed or dropped). */
static void request_left(blaze_conn *c)
{
    if (c->in_flight) {
        c->in_flight = 0;
        stats_in_flight(c->loop, -1);
    }
}

/* The TLS handshake made progress (or failed): the one way out of HANDSHAKE. */
static void handshake(blaze_conn *c)
{
    int want_write = 0;
    switch (tls_handshake(c, &want_write)) {
    case IO_DONE:
        write_off(c);
        c->state = CONN_HEAD;
        conn_step(c);              /* reads on; a request already decrypted runs at once */
        return;
    case IO_AGAIN:
        if (want_write) {
            conn_want_write(c);
        } else {
            write_off(c);
            read_on(c);
        }
        return;
    case IO_CLOSE:
    default:
        conn_free(c);              /* tls_handshake counted and logged it */
        return;
    }
}

/* Read what the socket holds behind buf's bytes and step on it.  0:
 * nothing there yet; 1: c read and stepped, or freed (the client left). */
static int read_step(blaze_conn *c)
{
    size_t cap = BLAZE_BUF_SIZE(&c->loop->lim);
    size_t room = 0;
    char *to = c->state == CONN_BODY ? http_body_direct(c, &room) : NULL;
    int direct = to != NULL;
    if (!direct) {
        if (c->len >= cap) {  /* the scanner answers 431 before this; belt and braces */
            conn_send_error(c, 431, "request header section too large");
            return 1;
        }
        to = c->buf + c->len;
        room = cap - c->len;
    }
    ssize_t n = c->ssl ? tls_recv(c, to, room) : recv(c->fd, to, room, 0);
    if (n > 0) {
        stats_bytes(c->loop, (size_t)n, 0);
        if (direct)
            http_body_direct_took(c, (size_t)n);
        else
            c->len += (size_t)n;
        conn_step(c);
        return 1;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return 0;
    conn_free(c);             /* the client went away; nothing to answer */
    return 1;
}

static void on_read(evutil_socket_t fd, short what, void *arg)
{
    blaze_conn *c = arg;
    (void)what;
    size_t cap = BLAZE_BUF_SIZE(&c->loop->lim);
    if (c->state == CONN_HANDSHAKE) {
        handshake(c);
        return;
    }
    if (c->state == CONN_LINGER) {
        for (;;) {
            ssize_t n = c->ssl ? tls_recv(c, c->buf, cap) : recv(fd, c->buf, cap, 0);
            if (n > 0) {
                stats_bytes(c->loop, (size_t)n, 0);
                continue;
            }
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                return;
            conn_free(c);
            return;
        }
    }
    if (c->state == CONN_THREAD || c->state == CONN_PARKED) {
        /* The request waits for, or is with, the app threads: only a close
         * matters now.  Bytes of a pipelined request stay in the socket
         * until this one is done. */
        int closed = peer_closed(c);
        if (closed < 0)
            return;
        read_off(c);
        if (c->state == CONN_PARKED) {
            if (closed)
                conn_free(c);     /* the app is not called */
            return;               /* else conn_unpark looks again */
        }
        if (closed && pool_cancel(c->loop, c))
            conn_free(c);     /* still queued: the app is not called (a stream's iterable is closed) */
        /* else a thread has it, marked gone: its output fails, Python closes
         * the iterable, and the thread hands c back to be freed */
        return;
    }
    if (c->state != CONN_HEAD && c->state != CONN_BODY) {
        read_off(c);
        return;
    }
    read_step(c);
}

/* A new connection.  Its first request has usually arrived with it (a
 * client sends right after the handshake), so it is read at once, and the
 * read event is added only if nothing is there yet: a request answered
 * with a close in this pass costs no epoll_ctl at all.  TLS starts with
 * its handshake, on events. */
void conn_start(blaze_conn *c)
{
    if (c->state != CONN_HEAD || !read_step(c))
        read_on(c);
}

int conn_write_out(blaze_conn *c)
{
    if (c->ssl)
        return tls_write_out(c);      /* (TLS output is never corked) */
    int sent = 0;
    if (c->cork_len > 0) {            /* corked bytes go before any in c->out */
        struct iovec flat = {c->cork, c->cork_len};
        ssize_t w = sock_send(c->fd, &flat, 1, 0);
        if (w < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        c->cork_len -= (size_t)w;
        if (c->cork_len > 0) {        /* the socket is full: the rest waits, in front */
            memmove(c->cork, c->cork + w, c->cork_len);
            return (int)w;
        }
        sent = (int)w;
    }
    /* Nothing (more): say so.  evbuffer_write of an empty buffer is -1, which
     * made a corked connection whose output on_write had already written
     * (a too-big response behind it asked for the write) look broken. */
    if (c->out == NULL || evbuffer_get_length(c->out) == 0)
        return sent;
    int n = evbuffer_write(c->out, c->fd);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return sent;
    return n < 0 ? (sent > 0 ? sent : n) : sent + n;   /* an error after some bytes shows next time */
}

static void on_write(evutil_socket_t fd, short what, void *arg)
{
    blaze_conn *c = arg;
    (void)fd;
    (void)what;
    if (c->state == CONN_HANDSHAKE) {
        handshake(c);
        return;
    }
    if (write_pending(c) > 0) {
        int n = conn_write_out(c);
        if (n < 0) {
            conn_free(c);
            return;
        }
        if (n == 0)
            return;
        stats_bytes(c->loop, 0, (size_t)n);
        if (c->timer != TIMER_LINGER)
            timer_set(c, TIMER_IO);
        long long left = write_pending(c);
        if (c->state == CONN_STREAM && left < BLAZE_OUT_HIGH / 4 && !c->job) {
            resume(c);        /* keep the socket fed while the tail drains */
            return;
        }
        if (left > 0)
            return;
    }
    write_off(c);
    switch (c->state) {
    case CONN_STREAM:
        resume(c);
        break;
    case CONN_DRAIN:
        conn_step(c);
        break;
    case CONN_LINGER:
        shut_write(c);
        break;
    default:
        break;
    }
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    blaze_conn *c = arg;
    (void)fd;
    (void)what;
    /* Every timer ends the connection: a head too slow (slowloris), an idle
     * keep-alive, a stalled body or reader, the end of lingering, or a
     * connection already broken (conn_broken). */
    if (c->state == CONN_HANDSHAKE)
        tls_handshake_failed(c, "not finished within header_timeout");
    /* Body bytes below the low-water mark are progress the loop was not
     * woken for: read them, and the io timer starts again.  So a body that
     * stalls is closed io_timeout to twice it after its last byte. */
    if (c->state == CONN_BODY && c->lowat > 0) {
        body_lowat(c, 0);
        if (read_step(c))
            return;    /* read and stepped (the mark and the timer set again), or freed */
    }
    conn_free(c);
}
