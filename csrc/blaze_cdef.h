/* The Python-visible surface of the C core, and nothing else.
 *
 * build_ffi.py feeds this file to ffi.cdef(), so it must stay free of
 * preprocessor directives; the C files include it too, so every struct
 * here has exactly one definition.  The calls from C into Python
 * (extern "Python+C") are declared in build_ffi.py and blaze.h.
 */

typedef struct blaze_loop blaze_loop;
typedef struct blaze_conn blaze_conn;

/* One worker's slot in the shared-memory region the master maps before
 * forking.  Single writer (that worker's C loop), lock-free; the master
 * reads it without asking the worker.  Times are CLOCK_MONOTONIC seconds,
 * the clock of Python's time.monotonic(). */
typedef struct {
    long long pid;
    double heartbeat;             /* refreshed every loop tick (1 s) */
    double busy_since;            /* app running and not sending since then; 0: not in the app */
    unsigned long long requests;  /* responses completed */
    unsigned long long connections; /* open now */
    unsigned long long in_flight; /* requests handed to the app and not finished */
    unsigned long long bytes_in;  /* received on client connections */
    unsigned long long bytes_out; /* sent on client connections */
    unsigned long long parse_errors; /* requests the HTTP layer answered with an error */
    unsigned long long rate_limited;
    unsigned long long tls_handshake_errors; /* TLS handshakes that failed or stalled */
    unsigned long long by_method_status[8][5]; /* [GET HEAD POST PUT DELETE PATCH OPTIONS OTHER][1xx..5xx] */
    unsigned long long latency[15]; /* per bucket, not cumulative: le 0.5ms .. 10s, then +Inf */
    double latency_sum;           /* seconds */
    unsigned long long accepting; /* 1: the loop takes new connections now (for balancing) */
} blaze_slot;

enum { BLAZE_METHODS = 8, BLAZE_LATENCY_BUCKETS = 15 };

/* A trusted network for forwarded_allow_ips: IPv4 is stored as
 * ::ffff:a.b.c.d, so an IPv4 /24 has prefix 96 + 24. */
typedef struct {
    unsigned char addr[16];
    int prefix;                   /* leading bits of addr that must match */
} blaze_net;

/* The per-client rate-limit table, shared by every worker (the master maps
 * it before forking; see blaze_stats.c).  GCRA: an entry holds a client's
 * theoretical arrival time.  Fixed size, set-associative: a client hashes
 * to one set of BLAZE_RATE_WAYS entries; a full set forgets the entry
 * whose TAT is oldest (the client closest to being under its limit). */
typedef struct {
    unsigned long long key;       /* keyed hash of the client address; 0: free */
    unsigned long long tat;       /* theoretical arrival time: CLOCK_MONOTONIC nanoseconds */
} blaze_rate_entry;

enum { BLAZE_RATE_SETS = 8192, BLAZE_RATE_WAYS = 8 };

typedef struct {
    unsigned long long seed;      /* hash key, random per master */
    blaze_rate_entry entries[65536]; /* BLAZE_RATE_SETS * BLAZE_RATE_WAYS */
} blaze_rate_table;
/* TLS (csrc/blaze_tls.c): the settings an SSL_CTX is built from.  The
 * strings are read by blaze_tls_new, not kept. */
typedef struct blaze_tls blaze_tls;     /* opaque: one SSL_CTX */
typedef struct {
    const char *certfile;         /* PEM certificate chain */
    const char *keyfile;          /* PEM private key */
    const char *password;         /* of an encrypted keyfile, or NULL */
    const char *ca_certs;         /* CAs of client certificates (mutual TLS), or NULL */
    int verify_client;            /* a client certificate is required */
    const char *ciphers;          /* TLS 1.2 cipher list, or NULL: OpenSSL's default */
    int min_version;              /* 12: TLS 1.2, 13: TLS 1.3 */
    const unsigned char *ticket_keys; /* BLAZE_TLS_TICKET_KEYS bytes shared by the workers, or NULL */
} blaze_tls_config;

enum { BLAZE_TLS_TICKET_KEYS = 80 };

/* NULL on failure, with the setting and the file named in err. */
blaze_tls *blaze_tls_new(const blaze_tls_config *cfg, char *err, size_t errlen);
void blaze_tls_free(blaze_tls *tls);

/* Limits and timeouts of one worker's loop; copied by blaze_loop_new. */
typedef struct {
    int max_connections;          /* open connections before accepting pauses */
    int head_buffer_size;         /* per-connection read buffer: the largest request head */
    int limit_request_line;       /* bytes in the request line, else 414 */
    int limit_request_fields;     /* header lines, else 431 */
    int limit_request_field_size; /* bytes in one header line, else 431 */
    double header_timeout;        /* seconds to receive a whole request head */
    double keepalive_timeout;     /* seconds an idle keep-alive connection is kept */
    double io_timeout;            /* seconds of no progress while reading a body or writing */
    double graceful_timeout;      /* seconds a graceful stop waits for in-flight requests */
    long long max_body_size;      /* larger request bodies get 413 */
    long long body_buffer_size;   /* larger request bodies spill to a temporary file */
    const char *tmp_dir;          /* where spilled bodies go (copied) */
    int parent_pid;               /* the master: the loop stops gracefully when it is gone */
    long long max_requests;       /* stop gracefully after this many responses; 0: never */
    blaze_slot *slot;             /* this worker's shared-memory slot, or NULL */
    blaze_slot *slots;            /* every worker's slot (read only: accept balancing), or NULL */
    int nslots;
    int access_log;               /* write access lines */
    const char *log_dir;          /* daily files there (copied), or NULL: stderr */
    long long clock_offset;       /* seconds added to the log's clock (tests of midnight) */
    long long rate_limit;         /* requests per client per minute; 0: off */
    blaze_rate_table *rate_table; /* shared by the workers (with rate_limit), or NULL */
    const blaze_net *trusted;     /* forwarded_allow_ips (copied) */
    int ntrusted;
    int trust_all;                /* forwarded_allow_ips = * */
    int threads;                  /* app threads (>1: requests go to the thread pool) */
    blaze_tls *tls;               /* for listeners added with tls = 1 (borrowed: freed after the loop), or NULL */
    int log_debug;                /* log_level is debug: the loop logs failed TLS handshakes */
} blaze_limits;

/* One parsed request, valid for the duration of blaze_py_request only
 * (with threads > 1: until the thread hands the connection back). */
typedef struct {
    const char *keys;             /* "KEY\0KEY\0...": the CGI names of this request */
    size_t keys_len;
    const char *values;           /* "VALUE\0VALUE\0...": their values, latin-1, same order */
    size_t values_len;
    int keyset;                   /* >= 0: slot of a key set Python knows; else -(slot+1): learn keys */
    unsigned keygen;              /* the slot's generation: with threads, a slot learned by
                                   * another thread may not be in Python yet (learn it then) */
    int listener;                 /* index returned by blaze_loop_listen */
    const char *body;             /* the body in memory (body_fd == -1) */
    size_t body_len;              /* body length, in memory or in the file */
    int body_fd;                  /* -1, or a temporary file holding the body; C closes it */
    unsigned long long conn_id;   /* stable id of the connection, for streaming state */
    int delta;                    /* BLAZE_ENV_* or n >= 0 (see below) */
    int conn_slot;                /* the connection's descriptor: where Python remembers its environ */
} blaze_request;

/* blaze_request.delta.  Python remembers the environ of a kept-alive
 * connection's last request (wsgi._memo); the next request with the same
 * key names sends only the values that changed since. */
enum {
    BLAZE_ENV_WHOLE = -1,         /* values holds every value; nothing to remember */
    BLAZE_ENV_REMEMBER = -2       /* values holds every value; remember the environ */
    /* n >= 0: values holds the n changed values: first their n indices in
     * the key set (one byte each), then the values, NUL-separated; the
     * rest are the remembered environ's */
};

/* Slots of the key-set table shared by C and Python (BLAZE_KEYSETS in blaze.h). */
enum { BLAZE_KEYSETS_PY = 256 };

/* What blaze_py_request / blaze_py_resume return to C. */
enum {
    BLAZE_PY_DONE = 0,            /* the response is complete (blaze_resp_finish was called) */
    BLAZE_PY_STREAM = 1,          /* more body to come: call blaze_py_resume when output drains */
    BLAZE_PY_ERROR = -1           /* the app failed: 500 if nothing was sent, else close */
};

/* threads > 1: what an app thread gets from blaze_pool_next. */
enum { BLAZE_JOB_REQUEST = 0, BLAZE_JOB_RESUME = 1 };
typedef struct {
    blaze_conn *conn;
    int kind;                     /* REQUEST: call the app; RESUME: blaze_py_resume's work */
    blaze_request req;            /* REQUEST: as blaze_py_request gets it */
} blaze_job;
/* An app thread's one call into C (cffi releases the GIL around it): hand
 * back `done` (NULL: none) with rc, as blaze_py_request would return it,
 * then wait for the next job.  `thread` is the thread's index (0..threads-1).
 * Returns 1 with *job filled, or 0 when the loop is gone: the thread ends. */
int blaze_pool_next(blaze_loop *loop, int thread, blaze_conn *done, int rc, blaze_job *job);
/* Called once by each app thread before its first blaze_pool_next: how the
 * thread is scheduled (see blaze_pool.c).  Failures are ignored. */
void blaze_pool_thread_init(void);
/* blaze_resp_simple for `done`, then blaze_pool_next(done, DONE): a one-item
 * response and the next job in one crossing.  -1 (blaze_resp_error says
 * why): the response was refused and `done` is still the thread's. */
int blaze_pool_reply(blaze_loop *loop, int thread, blaze_conn *done, const char *head,
                     size_t head_len, int nhdrs, const char *body, size_t body_len, blaze_job *job);

/* A body buffer up to this size stays with its connection for the next
 * request; a bigger one is freed after its request, or handed to Python
 * (blaze_body_take) for wsgi.input to read in place. */
enum { BLAZE_BODY_KEEP = 65536 };
/* During blaze_py_request (an app thread's: until it hands the connection
 * back): the buffer holding a body bigger than BLAZE_BODY_KEEP bytes
 * (req.body; C would free it after the request), now the caller's, to free
 * with blaze_body_free.  NULL: the body is small or in a file, and stays C's. */
char *blaze_body_take(blaze_conn *c);
void blaze_body_free(char *p);

/* Loop: one per worker process. Errors come back as text in err. */
blaze_loop *blaze_loop_new(const blaze_limits *limits, char *err, size_t errlen);
/* tls: connections accepted on fd speak TLS (needs limits.tls). */
int blaze_loop_listen(blaze_loop *loop, int fd, int tls, char *err, size_t errlen);
int blaze_loop_run(blaze_loop *loop);
/* threads = 1: where blaze_py_request's values_len bytes of values lie, at
 * every request (never moved while the loop lives), and their room. */
const char *blaze_loop_values(blaze_loop *loop);
size_t blaze_loop_values_cap(blaze_loop *loop);
/* The loop's count of flushes of held output (never moved while the loop lives). */
const unsigned long long *blaze_loop_flushes(blaze_loop *loop);
void blaze_loop_free(blaze_loop *loop);

/* Response, called from Python during blaze_py_request / blaze_py_resume.
 * blaze_resp_start validates and frames the head, the status line and the
 * headers in one string, "status\0name\0value\0name\0value" with nhdrs
 * (name, value) pairs (one string: fewer arguments per call); body_len is the
 * total body size when the server knows it (-1 otherwise).  Returns 0, or
 * -1 (nothing has been sent then) with the reason in blaze_resp_error. */
int blaze_resp_start(blaze_conn *c, const char *head, size_t head_len, int nhdrs, long long body_len);
/* Why this thread's last blaze_resp_start, blaze_resp_simple or
 * blaze_pool_reply refused (a thread's own buffer: no pointer to pass on
 * every response). */
const char *blaze_resp_error(void);
/* Queue body bytes; returns the bytes still waiting for the socket, or -1
 * when the client is gone. */
long long blaze_resp_write(blaze_conn *c, const char *data, size_t len);
/* Queue len bytes of fd from offset, sent with sendfile; takes fd. */
long long blaze_resp_file(blaze_conn *c, int fd, long long offset, long long len);
/* Block (bounded by io_timeout) until at most `below` bytes wait; -1 if the client is gone. */
long long blaze_resp_flush(blaze_conn *c, long long below);
/* End of the response body. */
int blaze_resp_finish(blaze_conn *c);
/* The last body bytes and the end of the response (blaze_resp_write, then
 * blaze_resp_finish): 0, or -1 when the client is gone. */
int blaze_resp_last(blaze_conn *c, const char *data, size_t len);
/* start + one body + finish in a single write: the common case.  0, -1 as
 * blaze_resp_start; 1 (threads = 1 only): done, but a big body is sent from
 * where it lies when the loop's pass ends: keep it alive and unchanged until
 * *blaze_loop_flushes(loop) moves. */
int blaze_resp_simple(blaze_conn *c, const char *head, size_t head_len, int nhdrs,
                      const char *body, size_t body_len);
