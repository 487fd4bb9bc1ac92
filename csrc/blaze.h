/* Internal C API shared by the csrc/ files: structs, enums, prototypes.
 *
 * Error convention (one for the whole core): a function returns
 * BLAZE_OK (0) or BLAZE_ERR (-1); setup functions also write a one-line
 * reason into a caller's err buffer so Python can show the operator why.
 * Cleanup runs once, at a `goto fail` label, in reverse order.
 *
 * Ownership: libevent objects and descriptors belong to the struct that
 * created them and are released only by its *_free function
 * (conn_free for a connection, blaze_loop_free for the loop).
 */
#ifndef BLAZE_H
#define BLAZE_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <netinet/in.h>
#include <event2/event.h>
#include <event2/buffer.h>
#include <http_parser.h>
#include <openssl/ssl.h>

#include "blaze_cdef.h"

#define BLAZE_OK 0
#define BLAZE_ERR (-1)
#define BLAZE_MAX_LISTENERS 64
#define BLAZE_VERSION "0.1.0"
/* Output above this many queued bytes pauses streaming and pipelining. */
#define BLAZE_OUT_HIGH (256 * 1024)
/* The read buffer is head_buffer_size plus this, so a body always has room to arrive. */
#define BLAZE_BODY_SLACK 4096
/* Bodies up to this size are copied behind the response head and sent together. */
#define BLAZE_COALESCE 8192
/* Responses up to this size are held ("corked") until the loop's pass over
 * its ready connections ends, then written one after another: the client
 * is woken once per pass, not once per response (blaze_conn.c, cork). */
#define BLAZE_CORK_MAX 16384
/* ... but none is held longer than about this (seconds): a slow app's pass
 * is long.  While requests take longer than this on average, none is held. */
#define BLAZE_CORK_SECONDS 0.001
/* A connection's corked output up to this size waits in c->cork, a flat
 * buffer written with one send(2); more goes through c->out (an evbuffer,
 * whose chains are allocated and freed per response). */
#define BLAZE_CORK_FLAT 1024
/* A response body at least this big (threads = 1, plain TCP, keep-alive)
 * is held until the pass ends by reference (conn_lend_last): the pass's
 * Python runs before its big copies into the kernel, not after each one,
 * whose cache misses cost more than the copy.  At most BLAZE_LEND_MAX bytes
 * wait so; more flushes what waits first. */
#define BLAZE_LEND_MIN (64 * 1024)
#define BLAZE_LEND_MAX (8 * 1024 * 1024)
/* A body read straight into its buffer wakes the loop once this much of it
 * waits in the socket (SO_RCVLOWAT; see body_lowat in blaze_conn.c), when
 * at least the minimum is still owed.  The kernel sizes the receive
 * buffer to hold the mark. */
#define BLAZE_LOWAT_MIN (64 * 1024)
#define BLAZE_LOWAT_MAX (1024 * 1024)
#define BLAZE_BUF_SIZE(lim) ((size_t)(lim)->head_buffer_size + BLAZE_BODY_SLACK)
/* A client certificate's subject longer than this is cut (it goes into every environ). */
#define TLS_DN_MAX 2048
/* Room for either half of an environ block (keys, values) of any request
 * the limits let in: the head twice (PATH_INFO and QUERY_STRING repeat the
 * target), "HTTP_" and two NULs per header, the fixed names, the DN. */
#define BLAZE_ENV_HALF(lim) \
    (2 * BLAZE_BUF_SIZE(lim) + 7 * (size_t)(lim)->limit_request_fields + 512 + TLS_DN_MAX)

/* Calls into Python (defined by CFFI from build_ffi.py). */
int blaze_py_request(blaze_conn *c, int keyset, size_t values_len, int listener,
                     const blaze_request *req, int delta, int conn_slot, unsigned long long conn_id);
int blaze_py_resume(blaze_conn *c, unsigned long long conn_id);
void blaze_py_abort(unsigned long long conn_id);

/* The outcome of one I/O step; conn_step's switch acts on it. */
typedef enum { IO_AGAIN, IO_DONE, IO_CLOSE } blaze_io;

/* The named states of a connection (see blaze_conn.c for transitions). */
typedef enum {
    CONN_HANDSHAKE, /* TLS: the handshake runs (under the header timer) */
    CONN_HEAD,    /* waiting for or reading a request head */
    CONN_BODY,    /* reading a request body */
    CONN_APP,     /* inside blaze_py_request / blaze_py_resume */
    CONN_STREAM,  /* app iterator suspended until the output drains */
    CONN_PARKED,  /* threads > 1: request complete, waiting for room in the thread pool;
                   * reading, as in THREAD, only watches for EOF */
    CONN_THREAD,  /* threads > 1: queued for or held by an app thread (blaze_pool.c);
                   * reading only watches for EOF, writing is off */
    CONN_DRAIN,   /* response queued; next request waits for the output to drain */
    CONN_LINGER,  /* error answered, write side shut: discard input until EOF */
    CONN_DEAD     /* closed during a Python call; freed when the call returns */
} blaze_conn_state;

typedef enum { TIMER_NONE, TIMER_HEADER, TIMER_KEEPALIVE, TIMER_IO, TIMER_LINGER } blaze_timer;
typedef enum { BODY_NONE, BODY_LENGTH, BODY_CHUNKED } blaze_body_kind;

typedef struct { uint32_t off, len; } blaze_span;          /* offsets into conn->buf */
typedef struct { blaze_span name, value; } blaze_header;

#define BLAZE_KEYSETS BLAZE_KEYSETS_PY         /* a power of two */
typedef struct {
    uint64_t hash;
    size_t len;
    char *keys;                               /* owned: a copy of a keys block */
    unsigned gen;                             /* changes whenever the slot is learned anew */
} blaze_keyset;

/* The head ("status\0name\0value...") an app gave for the head framed
 * last, so that the same again (an app answers with a few heads over and
 * over) is not split, validated and framed anew: buf[0:fixed_len] still
 * holds its status line and headers, and the fields below what checking
 * them found. */
#define BLAZE_HEAD_KEY_MAX 1024
typedef struct {
    size_t fixed_len;                         /* of the framed status line and headers */
    int remembered;                           /* key holds the head (it fit) */
    size_t len, slen;                         /* of the head, of its status */
    int nhdrs;
    unsigned have_server : 1, have_date : 1, conn_close : 1;
    long long cl;                             /* the app's Content-Length, or -1 */
    char key[BLAZE_HEAD_KEY_MAX];
} blaze_head_memo;

/* A framed response head waiting to go out with the first body bytes: the
 * loop's (threads = 1, and error answers), or one per app thread. */
typedef struct {
    char *buf;                                /* owned by the loop or the pool */
    size_t cap, len;
    blaze_conn *conn;                         /* whose head it is (borrowed), or NULL */
    blaze_head_memo memo;
} blaze_head;

typedef struct blaze_pool blaze_pool;

/* A FIFO of connections linked through c->queue_next: the loop's parked
 * requests, the pool's jobs and its done list, and (threads = 1 only) the
 * loop's corked connections.  A connection is in at most one (PARKED and
 * THREAD exclude each other; corking needs threads = 1).  Functions in blaze_conn.c. */
typedef struct {
    blaze_conn *head, *tail;                  /* borrowed */
} blaze_queue;

typedef struct {
    blaze_loop *loop;                         /* borrowed */
    int fd;                                   /* the master's socket: not closed here */
    int index;
    int tls;                                  /* connections speak TLS (loop->lim.tls) */
    struct event *ev;                         /* owned */
} blaze_listener;

typedef struct {
    int enabled;
    char *dir;                                /* owned: log_dir, or NULL for stderr */
    int fd;                                   /* owned (with dir): the open day's file */
    char fd_day[11];                          /* YYYY-MM-DD of fd */
    char buf_day[11];                         /* YYYY-MM-DD of the lines in buf */
    char *buf;                                /* owned: lines not written yet */
    size_t len, cap;
    time_t stamp_sec;
    char stamp[24];                           /* "[YYYY-MM-DD HH:MM:SS]" of stamp_sec */
} blaze_accesslog;

struct blaze_loop {
    struct event_base *base;                  /* owned */
    blaze_limits lim;                         /* copy; lim.tmp_dir owned */
    blaze_listener listeners[BLAZE_MAX_LISTENERS];
    int nlisteners;
    struct event *accept_pause;               /* owned: re-enables accepting after EMFILE */
    int accepting;                            /* listeners enabled */
    int accept_deferred;                      /* the last accept was left to a less loaded worker */
    uint64_t rate_period, rate_tolerance;     /* GCRA constants of lim.rate_limit, ns (stats_rate_init) */
    struct event *sig_event, *tick, *grace;   /* owned */
    const struct timeval *tv_header, *tv_keepalive, *tv_io, *tv_linger; /* common timeouts */
    blaze_conn *conns;                        /* live connections (owned, via conn_free) */
    int nconns;
    int stopping;                             /* graceful stop requested */
    int exit_code;
    unsigned long long next_id;
    http_parser_settings settings;
    char *scratch;                            /* owned: the environ block, BLAZE_ENV_HALF
                                               * keys then as much values, never moved:
                                               * Python reads the values in place
                                               * (blaze_loop_values) */
    blaze_head head;                          /* the loop thread's pending head */
    blaze_keyset keysets[BLAZE_KEYSETS];      /* key sets Python has seen, by slot */
    unsigned keygen;                          /* last blaze_keyset.gen handed out */
    unsigned long long responses;             /* completed, for max_requests and the slot */
    /* threads > 1: requests held by the thread pool, and those waiting for room. */
    int jobs;
    blaze_queue parked;                       /* complete requests waiting for room in the pool */
    blaze_pool *pool;                         /* owned (blaze_pool.c) */
    struct event *wake_ev, *unpark_ev;        /* owned */
    struct event *pool_watch;                 /* owned: pool_check while jobs wait */
    blaze_queue corked;                       /* threads = 1: output held until the pass ends */
    double cork_since;                        /* t_start of the request corked first */
    size_t lent;                              /* bytes of Python's bodies in corked output */
    unsigned long long flushes;               /* conn_flush_corked calls: Python keeps a lent
                                               * body until this moves (blaze_loop_flushes) */
    double app_avg;                           /* moving average of a request's time, seconds */
    blaze_accesslog alog;
};

struct blaze_conn {
    blaze_loop *loop;                         /* borrowed */
    blaze_conn *prev, *next;                  /* in loop->conns */
    int fd;                                   /* owned: closed by conn_free */
    int listener;
    int is_unix;
    blaze_conn_state state;
    unsigned long long id;
    struct event *ev_read, *ev_write, *ev_timer; /* owned */
    blaze_timer timer;
    unsigned reading : 1;                     /* ev_read is added */
    unsigned writing : 1;                     /* ev_write is added */
    unsigned closing : 1;                     /* close once the output drains */
    unsigned py_stream : 1;                   /* Python holds state for us (a STREAM) */
    unsigned job : 1;                         /* threads > 1: counted in loop->jobs */
    unsigned corked : 1;                      /* in loop->corked: c->out goes out when the pass ends */
    unsigned lent : 1;                        /* c->out refers to a body Python keeps (conn_lend_last) */
    blaze_conn *queue_next;                   /* in a blaze_queue (parked, or the pool's) */
    double t_job;                             /* CONN_THREAD since (the hung-request clock) */
    /* threads > 1, while CONN_THREAD (blaze_pool.c).  An app thread that has
     * taken c (taken = 1) owns the response fields and c->out; the loop owns
     * everything else and frees c only once the thread has handed it back. */
    int job_kind;                             /* BLAZE_JOB_REQUEST or BLAZE_JOB_RESUME */
    int job_rc;                               /* what the thread's Python call returned */
    blaze_request job_req;                    /* the request, pointing into env and c's buffers */
    char *env;                                /* owned: the environ block the thread reads
                                               * (http_build_environ writes it here, not in
                                               * the loop's scratch, which the next request reuses) */
    size_t env_cap;
    blaze_head *thread_head;                  /* the taking thread's head buffer (the pool's) */
    size_t thread_out;                        /* bytes the thread wrote itself (counted by the loop) */
    unsigned in_thread : 1;                   /* handed to the pool: no events, no stats from writes */
    unsigned taken : 1;                       /* an app thread has it (under the pool's lock) */
    unsigned thread_broken : 1;               /* the socket failed in the thread: freed on return */
    int gone;                                 /* the client left while taken (atomic) */
    uint64_t t_taken;                         /* CLOCK_MONOTONIC ns it was taken by a thread (queued: t_job) */
    unsigned long long served;                /* responses completed on this connection */
    /* kept alive: the last request's values block and its key set, against
     * which the next request's is compared (env_delta). */
    char *memo;                               /* owned */
    size_t memo_len, memo_cap;
    int memo_slot;                            /* the key set's slot ... */
    unsigned memo_gen;                        /* ... and generation */
    unsigned memo_ok : 1;                     /* memo holds what Python remembers (wsgi._memo) */
    unsigned memo_off : 1;                    /* given up: its requests keep changing */
    unsigned char memo_changed;               /* requests in a row not repeating the last */
    struct evbuffer *out;                     /* owned, created on the first short write */
    size_t cork_len;                          /* corked bytes in cork: written before out's */
    char cork[BLAZE_CORK_FLAT];

    /* Read buffer: fixed size, holds a whole request head. */
    char *buf;                                /* owned */
    size_t len;                               /* bytes in buf */
    size_t start;                             /* first byte of the current request */
    size_t scan;                              /* head scanner position */
    size_t line;                              /* start of the line being scanned */
    int nlines;                               /* head lines seen so far */
    size_t head_end;                          /* end of the head (after CRLFCRLF) */

    /* The request being read, as offsets into buf. */
    http_parser parser;
    blaze_span url;
    blaze_header *hdrs;                       /* owned, limit_request_fields entries */
    int nhdrs;
    int hdr_in_value;                         /* the last callback was a header value */
    unsigned keepalive : 1;
    unsigned is_head : 1;
    unsigned http10 : 1;
    unsigned expect_continue : 1;             /* answer 100 Continue before reading the body */

    /* Request body. */
    blaze_body_kind body_kind;
    uint64_t body_left;                       /* BODY_LENGTH: bytes still to read */
    int chunk_state;                          /* BODY_CHUNKED: see blaze_http.c */
    uint64_t chunk_left;
    size_t chunk_line;                        /* bytes in the current chunk/trailer line */
    size_t trailer_bytes;
    char *body;                               /* owned: body in memory */
    size_t body_len, body_cap;
    int body_fd;                              /* owned: -1 or the spill file */
    uint64_t body_total;
    int lowat;                                /* SO_RCVLOWAT set for a big body, 0: the default (1) */
    unsigned body_held : 1;                   /* the body's first bytes wait in buf, after the head,
                                               * for the rest (see http_read_body) */

    /* Metrics of the request being served. */
    double t_start;                           /* head complete (CLOCK_MONOTONIC), 0: none */
    int method_index;                         /* stats_method_index, OTHER until parsed */
    int resp_status;                          /* status code being sent */
    char resp_reason[512];                    /* its reason phrase, for the access log */
    unsigned short resp_reason_len;
    unsigned in_flight : 1;                   /* counted in the slot's in_flight */

    /* Response. */
    unsigned resp_started : 1;                /* status line and headers are queued */
    unsigned resp_chunked : 1;
    unsigned resp_nobody : 1;                 /* HEAD, 1xx, 204, 304 */
    unsigned resp_close : 1;                  /* close once this response is written */
    long long resp_left;                      /* body bytes still owed (-1: not framed by length) */
    unsigned char cork_ok;                    /* conn_send is sending the end of a response (set
                                               * by the response's writer, an app thread too:
                                               * a byte of its own, no bitfield shared with the loop) */

    /* The peer (set once by conn_new) and the client of the current request
     * (blaze_client.c: the peer, or a forwarded address when the peer is trusted). */
    char remote_addr[64];                     /* peer text; "" for a Unix peer */
    char remote_port[8];
    unsigned char peer_ip[16];                /* IPv4 as ::ffff:a.b.c.d */
    unsigned peer_trusted : 1;                /* may tell us the client (forwarded_allow_ips, Unix) */
    unsigned fwd : 1;                         /* this request's client came from a header */
    unsigned discard_input : 1;               /* answered before its body: linger, then close */
    unsigned char fwd_ip[16];
    char fwd_addr[48];

    /* TLS (blaze_tls.c); all NULL/0 on a plain connection. */
    SSL *ssl;                                 /* owned: freed by conn_free */
    char *tls_dn;                             /* owned: client certificate subject, or NULL */
    size_t tls_dn_len;
    unsigned tls_broken : 1;                  /* the session failed: no close_notify */
    unsigned tls_want_read : 1;               /* the last SSL_write waits for the socket to be readable */
};

/* blaze_loop.c */
void loop_conn_opened(blaze_loop *loop, blaze_conn *c);
void loop_conn_closed(blaze_loop *loop, blaze_conn *c);
void loop_maybe_exit(blaze_loop *loop);
/* Grow *buf (owned by the caller, *cap bytes) to at least need bytes. */
int buf_reserve(char **buf, size_t *cap, size_t need);
extern char blaze_date_header[64];

void loop_stop_graceful(blaze_loop *loop);
/* threads > 1: the pool has no room (2 requests per thread: running + queued). */
int loop_jobs_full(const blaze_loop *loop);
void loop_park(blaze_loop *loop, blaze_conn *c);

void loop_unpark_later(blaze_loop *loop);
/* A job was queued: make sure the loop looks for stalled jobs (pool_check). */
void loop_watch_pool(blaze_loop *loop);
/* A graceful stop began, or SIGTERM arrived and the loop has not seen it yet. */
int loop_stopping(const blaze_loop *loop);
/* max_requests: does the response being framed now end this worker's run? */
int loop_last_response(const blaze_loop *loop);

/* blaze_client.c */
void client_peer(blaze_conn *c, const struct sockaddr *sa, int salen);
/* Take the client from X-Forwarded-For / X-Real-IP when the peer is trusted. */
void client_resolve(blaze_conn *c);
/* The client's address as text, or NULL (a Unix peer with no forwarded address). */
const char *client_addr(const blaze_conn *c);
/* The client's address, 16 bytes, or NULL as above. */
const unsigned char *client_ip(const blaze_conn *c);
/* Is this 16-byte address an IPv4 one (::ffff:a.b.c.d)? */
int client_is_v4(const unsigned char ip[16]);
int client_copy_trusted(blaze_limits *lim, const blaze_limits *from);

/* blaze_log.c */
int log_init(blaze_loop *loop, char *err, size_t errlen);
/* A server-log line at DEBUG (only with lim.log_debug), written now, to log_dir's day file or stderr. */
void log_debug(blaze_loop *loop, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void log_request(blaze_conn *c, int status, const char *reason, size_t reason_len, double took);
void log_flush(blaze_loop *loop);
void log_reopen(blaze_loop *loop);
void log_free(blaze_loop *loop);

/* blaze_stats.c */
double stats_now(void);
void stats_heartbeat(blaze_loop *loop);
void stats_busy(blaze_loop *loop);
void stats_busy_at(blaze_loop *loop, double now);
void stats_idle(blaze_loop *loop);
int stats_method_index(int http_method);
void stats_response(blaze_loop *loop, int method_index, int status, double took);
/* Seconds since c's head was complete (0 if it never was): one clock read per response. */
double stats_took(const blaze_conn *c);
void stats_parse_error(blaze_loop *loop);
void stats_tls_handshake_error(blaze_loop *loop);
void stats_in_flight(blaze_loop *loop, int delta);
void stats_bytes(blaze_loop *loop, size_t in, size_t out);
void stats_connections(blaze_loop *loop);
/* GCRA for one client: BLAZE_OK if the request may go on, else BLAZE_ERR
 * with the seconds until it may in *retry_after (and the refusal counted). */
int stats_rate_take(blaze_loop *loop, const unsigned char ip[16], double *retry_after);
void stats_rate_init(blaze_loop *loop);

/* blaze_conn.c */
blaze_conn *conn_new(blaze_loop *loop, int fd, int listener, const struct sockaddr *sa, int salen);
void conn_start(blaze_conn *c);
void conn_free(blaze_conn *c);
void conn_close_if_idle(blaze_conn *c);
void conn_request_done(blaze_conn *c);
int conn_send(blaze_conn *c, const struct iovec *iov, int n);
/* The same for a response's final bytes: if the response ends the
 * connection, its FIN goes in the same segment. */
int conn_send_last(blaze_conn *c, const struct iovec *iov, int n);
/* A response's head and its big body (iov[1]), held until the pass ends
 * with the body referred to, not copied: 1 when done so (Python keeps the
 * body alive until blaze_loop_flushes moves), 0 when the response does not
 * qualify (send it with conn_send_last). */
int conn_lend_last(blaze_conn *c, const struct iovec *iov, int n);
void conn_send_error(blaze_conn *c, int status, const char *why);
void conn_broken(blaze_conn *c);
void conn_want_write(blaze_conn *c);
void conn_flush_corked(blaze_loop *loop);
void queue_push(blaze_queue *q, blaze_conn *c);
blaze_conn *queue_pop(blaze_queue *q);              /* NULL when empty */
int queue_remove(blaze_queue *q, blaze_conn *c);    /* 1 if c was in q */
/* threads > 1: c's app thread handed it back with rc (as from blaze_py_request). */
void conn_job_ready(blaze_conn *c, int rc);
/* Has c's socket failed, or (in a thread) its client left? */
int conn_dead(const blaze_conn *c);
void conn_unpark(blaze_conn *c);
/* Write what c->out holds: bytes written (0: the socket is full), or -1: broken. */
int conn_write_out(blaze_conn *c);

/* blaze_pool.c: threads > 1, the queue between the loop and the app threads. */
int pool_new(blaze_loop *loop, int nthreads, char *err, size_t errlen);
int pool_free(blaze_loop *loop);
/* Hand c (CONN_THREAD) to the app threads: a new request or a resumed stream. */
void pool_submit(blaze_loop *loop, blaze_conn *c, int kind);
/* The client left: 1 if c was still queued (removed: free it now), 0 if a
 * thread has it (marked gone: it comes back through the done list). */
int pool_cancel(blaze_loop *loop, blaze_conn *c);
/* Detach the connections the threads handed back, in order. */
blaze_queue pool_take_done(blaze_loop *loop);
int pool_wake_fd(const blaze_loop *loop);
/* Wake a thread for a job queued too long behind busy ones; 1 while jobs wait. */
int pool_check(blaze_loop *loop);
/* 1: jobs average POOL_SLOW_NS or more (the app threads mostly wait). */
int pool_jobs_slow(const blaze_loop *loop);

/* blaze_http.c */
void http_settings_init(http_parser_settings *s);
void http_request_reset(blaze_conn *c);
/* Returns IO_AGAIN (need more bytes), IO_DONE (head or body complete), or
 * IO_CLOSE with *status set to the HTTP error to answer (0: just close). */
blaze_io http_read_head(blaze_conn *c, int *status, const char **why);
blaze_io http_read_body(blaze_conn *c, int *status, const char **why);
/* A body with a Content-Length, kept in memory: where the socket may put
 * the body's next bytes itself (one copy fewer, and reads as large as the
 * socket has) and how many; NULL: read into c->buf as usual.  The bytes
 * held in c->buf (body_held) go into the buffer first.
 * http_body_direct_took counts what came. */
char *http_body_direct(blaze_conn *c, size_t *room);
void http_body_direct_took(blaze_conn *c, size_t n);
/* The bytes such a direct read still waits for; 0: none, or not direct. */
uint64_t http_body_awaited(const blaze_conn *c);
int http_build_environ(blaze_conn *c, blaze_request *req);

extern const unsigned char blaze_tchar[256];
/* field-value bytes: HTAB, SP, VCHAR, obs-text */
static inline int blaze_field_char(unsigned char ch)
{
    return ch == '\t' || (ch >= 0x20 && ch != 0x7f);
}

/* blaze_tls.c: the TLS side of a connection (see the file's comment). */
int tls_conn_init(blaze_conn *c, blaze_tls *tls);
void tls_conn_free(blaze_conn *c);
void tls_shutdown(blaze_conn *c);
int tls_has_pending(const blaze_conn *c);
blaze_io tls_handshake(blaze_conn *c, int *want_write);
void tls_handshake_failed(blaze_conn *c, const char *why);
ssize_t tls_recv(blaze_conn *c, char *buf, size_t len);
ssize_t tls_send(blaze_conn *c, const struct iovec *iov, int n);
int tls_write_out(blaze_conn *c);

/* blaze_write.c */
void write_update_date(void);
long long write_pending(blaze_conn *c);
int write_flush_head(blaze_conn *c);
const char *write_reason(int status);

#endif
