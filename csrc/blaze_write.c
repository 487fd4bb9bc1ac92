/* Responses: status line, headers, framing (Content-Length, chunked or
 * close-delimited), the Date header, and sendfile for file bodies.
 *
 * A framed head waits in loop->head (an app thread's: its own buffer in
 * the pool) until the first body bytes (or the end of the response), so
 * head and body leave in one writev: PEP 3333 also says headers must not
 * go out before the first non-empty chunk.
 */
#include "blaze.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

char blaze_date_header[64];

void write_update_date(void)
{
    static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    snprintf(blaze_date_header, sizeof(blaze_date_header),
             "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
             days[tm.tm_wday % 7], tm.tm_mday, months[tm.tm_mon % 12], tm.tm_year + 1900,
             tm.tm_hour, tm.tm_min, tm.tm_sec);
}

const char *write_reason(int status)
{
    switch (status) {
    case 400: return "Bad Request";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 417: return "Expectation Failed";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Error";
    }
}

long long write_pending(blaze_conn *c)
{
    return (long long)c->cork_len + (c->out ? (long long)evbuffer_get_length(c->out) : 0);
}

static int name_eq(const char *a, size_t n, const char *lit, size_t ln)
{
    return n == ln && strncasecmp(a, lit, n) == 0;
}

/* Does a Connection header value carry the "close" token? */
static int has_close_token(const char *v, size_t n)
{
    for (size_t i = 0; i + 5 <= n; i++) {
        if (strncasecmp(v + i, "close", 5) == 0 &&
            (i == 0 || v[i - 1] == ',' || v[i - 1] == ' ' || v[i - 1] == '\t') &&
            (i + 5 == n || v[i + 5] == ',' || v[i + 5] == ' ' || v[i + 5] == '\t'))
            return 1;
    }
    return 0;
}

#define PUT(p, s, n) do { memcpy((p), (s), (n)); (p) += (n); } while (0)
#define PUT_LIT(p, s) PUT(p, s, sizeof(s) - 1)
/* Each thread's reason for its last refusal (blaze_resp_error). */
static __thread char resp_err[256];

const char *blaze_resp_error(void)
{
    return resp_err;
}

#define BAD(...) do { snprintf(resp_err, sizeof(resp_err), __VA_ARGS__); return BLAZE_ERR; } while (0)

/* Where c's head is framed: its app thread's buffer, or the loop's. */
static blaze_head *head_of(blaze_conn *c)
{
    return c->in_thread ? c->thread_head : &c->loop->head;
}

/* Validate a head (its status is the first slen bytes, then a NUL and the
 * header block) and frame it (status line, then the app's headers less the
 * hop-by-hop ones) at the start of hd->buf, which has room; hd->memo then
 * describes it. */
static int frame_fixed(blaze_head *hd, const char *head, size_t head_len, size_t slen, int nhdrs)
{
    const char *status = head, *hdrs = head + slen + 1;
    size_t hlen = head_len - slen - 1;
    blaze_head_memo *m = &hd->memo;
    m->remembered = 0;               /* buf is overwritten from here on */
    if (nhdrs == 0 && hlen != 0)
        BAD("malformed header list");
    if (slen < 3 || status[0] < '1' || status[0] > '5' || status[1] < '0' || status[1] > '9' ||
        status[2] < '0' || status[2] > '9' || (slen > 3 && status[3] != ' '))
        BAD("invalid status line %.40s (want \"200 OK\")", status);
    for (size_t i = 4; i < slen; i++)
        if (!blaze_field_char((unsigned char)status[i]))
            BAD("invalid character in status line");

    char *p = hd->buf;
    PUT_LIT(p, "HTTP/1.1 ");
    PUT(p, status, slen);
    if (slen == 3)
        *p++ = ' ';      /* RFC 9112 4: the SP before an empty reason is required */
    PUT_LIT(p, "\r\n");

    int have_server = 0, have_date = 0, conn_close = 0;
    long long cl = -1;
    const char *h = hdrs, *end = hdrs + hlen;
    for (int i = 0; i < nhdrs; i++) {
        const char *name = h;
        const char *z = memchr(h, '\0', (size_t)(end - h));
        if (z == NULL)
            BAD("malformed header list");
        size_t nl = (size_t)(z - name);
        const char *val = z + 1;
        z = memchr(val, '\0', (size_t)(end - val));
        if ((i == nhdrs - 1) != (z == NULL))
            BAD("malformed header list (each header must be a (name, value) pair)");
        size_t vl = z ? (size_t)(z - val) : (size_t)(end - val);
        h = z ? z + 1 : end;
        if (nl == 0)
            BAD("empty header name");
        for (size_t k = 0; k < nl; k++)
            if (!blaze_tchar[(unsigned char)name[k]])
                BAD("invalid header name %.*s", (int)(nl > 60 ? 60 : nl), name);
        for (size_t k = 0; k < vl; k++)
            if (!blaze_field_char((unsigned char)val[k]))
                BAD("invalid character in the value of header %.*s", (int)(nl > 60 ? 60 : nl), name);
        int drop = 0;
        switch (nl) {
        case 2: drop = name_eq(name, nl, "te", 2); break;
        case 4: have_date |= name_eq(name, nl, "date", 4); break;
        case 6: have_server |= name_eq(name, nl, "server", 6); break;
        case 7: drop = name_eq(name, nl, "upgrade", 7) || name_eq(name, nl, "trailer", 7); break;
        case 10:
            if (name_eq(name, nl, "connection", 10)) {
                conn_close |= has_close_token(val, vl);
                drop = 1;
            } else {
                drop = name_eq(name, nl, "keep-alive", 10);
            }
            break;
        case 14:
            if (name_eq(name, nl, "content-length", 14)) {
                if (cl >= 0)
                    BAD("several Content-Length headers");
                if (vl == 0 || vl > 18)
                    BAD("invalid Content-Length %.*s", (int)(vl > 20 ? 20 : vl), val);
                cl = 0;
                for (size_t k = 0; k < vl; k++) {
                    if (val[k] < '0' || val[k] > '9')
                        BAD("invalid Content-Length %.*s", (int)(vl > 20 ? 20 : vl), val);
                    cl = cl * 10 + (val[k] - '0');
                }
            }
            break;
        case 16: drop = name_eq(name, nl, "proxy-connection", 16); break;
        case 17: drop = name_eq(name, nl, "transfer-encoding", 17); break;
        default: break;
        }
        if (drop)
            continue;   /* hop-by-hop headers are the server's to send */
        PUT(p, name, nl);
        PUT_LIT(p, ": ");
        PUT(p, val, vl);
        PUT_LIT(p, "\r\n");
    }
    if (h != end)
        BAD("malformed header list (more fields than headers)");
    m->have_server = have_server != 0;
    m->have_date = have_date != 0;
    m->conn_close = conn_close != 0;
    m->cl = cl;
    m->fixed_len = (size_t)(p - hd->buf);
    m->slen = slen;                           /* frame_head reads it, remembered or not */
    if (head_len <= sizeof(m->key)) {         /* a longer head is framed anew each time */
        memcpy(m->key, head, head_len);
        m->len = head_len;
        m->nhdrs = nhdrs;
        m->remembered = 1;
    }
    return BLAZE_OK;
}

/* Validate and frame a head -- "status\0name\0value\0...", the status
 * line then nhdrs (name, value) pairs -- into head_of(c).  The head framed
 * last is compared whole first (hd->memo); only a new one is split. */
static int frame_head(blaze_conn *c, const char *head, size_t head_len, int nhdrs, long long body_len)
{
    blaze_loop *loop = c->loop;
    blaze_head *hd = head_of(c);
    if (conn_dead(c))
        BAD("client disconnected");
    if (c->resp_started)
        BAD("response already started");
    if (nhdrs < 0)
        BAD("malformed header list");
    size_t need = 16 + head_len + 4 * (size_t)nhdrs + 256 + BLAZE_COALESCE;
    if (need > hd->cap) {
        size_t cap = hd->cap ? hd->cap : 4096;
        while (cap < need)
            cap *= 2;
        char *h = realloc(hd->buf, cap);
        if (h == NULL)
            BAD("out of memory");
        hd->buf = h;
        hd->cap = cap;
    }
    blaze_head_memo *m = &hd->memo;
    if (!(m->remembered && head_len == m->len && nhdrs == m->nhdrs &&
          memcmp(m->key, head, head_len) == 0)) {
        const char *z = memchr(head, '\0', head_len);
        if (z == NULL)
            BAD("malformed head (no end to the status line)");
        if (frame_fixed(hd, head, head_len, (size_t)(z - head), nhdrs) != BLAZE_OK)
            return BLAZE_ERR;
    }
    const char *status = head;
    size_t slen = m->slen;            /* this head's: remembered, or just framed */
    /* three digits: frame_fixed checked them, now or for the same bytes */
    int code = (status[0] - '0') * 100 + (status[1] - '0') * 10 + (status[2] - '0');
    c->resp_status = code;
    size_t rl = slen > 4 ? slen - 4 : 0;
    if (rl > sizeof(c->resp_reason))
        rl = sizeof(c->resp_reason);
    memcpy(c->resp_reason, status + 4, rl);
    c->resp_reason_len = (unsigned short)rl;
    long long cl = m->cl;
    char *p = hd->buf + m->fixed_len;
    if (!m->have_server)
        PUT_LIT(p, "Server: BlazeWSGI\r\n");
    if (!m->have_date)
        PUT(p, blaze_date_header, strlen(blaze_date_header));

    int no_body_status = code < 200 || code == 204 || code == 304;
    c->resp_nobody = c->is_head || no_body_status;
    c->resp_chunked = 0;
    c->resp_left = -1;
    if (m->conn_close)
        c->resp_close = 1;
    if (no_body_status) {
        c->resp_left = 0;
    } else if (cl >= 0) {
        c->resp_left = cl;
    } else if (body_len >= 0) {
        p += sprintf(p, "Content-Length: %lld\r\n", body_len);
        c->resp_left = body_len;
    } else if (c->is_head) {
        c->resp_left = 0;
    } else if (!c->http10) {
        PUT_LIT(p, "Transfer-Encoding: chunked\r\n");
        c->resp_chunked = 1;
    } else {
        c->resp_close = 1;        /* HTTP/1.0 and no length: the close ends the body */
    }
    /* Stopping: the last response of a connection says close -- unless more
     * pipelined requests wait in the buffer (or, on TLS, in OpenSSL's); they
     * are answered first. */
    int stop_here = (loop_stopping(loop) || loop_last_response(loop)) && c->len <= c->scan &&
                    !(c->ssl && tls_has_pending(c));
    if (!c->keepalive || c->resp_close || stop_here) {
        c->resp_close = 1;
        if (!c->http10)
            PUT_LIT(p, "Connection: close\r\n");
    } else if (c->http10) {
        PUT_LIT(p, "Connection: keep-alive\r\n");
    }
    PUT_LIT(p, "\r\n");
    hd->len = (size_t)(p - hd->buf);
    hd->conn = c;
    c->resp_started = 1;
    return BLAZE_OK;
}

/* Put the pending head (if it is c's) first in iov; returns the count used. */
static int take_head(blaze_conn *c, struct iovec *iov)
{
    blaze_head *hd = head_of(c);
    if (hd->conn != c)
        return 0;
    hd->conn = NULL;
    iov->iov_base = hd->buf;
    iov->iov_len = hd->len;
    return 1;
}

int write_flush_head(blaze_conn *c)
{
    struct iovec iov;
    if (take_head(c, &iov) == 0)
        return BLAZE_OK;
    return conn_send(c, &iov, 1);
}

/* How much of len the framing allows; notes a short or long body. */
static size_t body_allow(blaze_conn *c, size_t len)
{
    if (c->resp_nobody)
        return 0;
    if (c->resp_left < 0)
        return len;
    if ((long long)len > c->resp_left)
        len = (size_t)c->resp_left;   /* more than its Content-Length: the rest is dropped */
    c->resp_left -= (long long)len;
    return len;
}

int blaze_resp_start(blaze_conn *c, const char *head, size_t head_len, int nhdrs, long long body_len)
{
    return frame_head(c, head, head_len, nhdrs, body_len);
}

long long blaze_resp_write(blaze_conn *c, const char *data, size_t len)
{
    if (conn_dead(c) || !c->resp_started)
        return -1;
    struct iovec iov[4];
    char sizeline[24];
    int n = take_head(c, iov);
    len = body_allow(c, len);
    if (len > 0) {
        if (c->resp_chunked) {
            int k = snprintf(sizeline, sizeof(sizeline), "%zx\r\n", len);
            iov[n].iov_base = sizeline;
            iov[n++].iov_len = (size_t)k;
        }
        iov[n].iov_base = (void *)data;
        iov[n++].iov_len = len;
        if (c->resp_chunked) {
            iov[n].iov_base = (void *)"\r\n";
            iov[n++].iov_len = 2;
        }
    }
    if (n > 0 && conn_send(c, iov, n) != BLAZE_OK)
        return -1;
    if (c->in_thread && write_pending(c) > 0) {
        /* PEP 3333: a block goes out now, not once the app has made the
         * next one.  While a thread has c, the socket's write side is its. */
        int w = conn_write_out(c);
        if (w < 0) {
            conn_broken(c);
            return -1;
        }
        c->thread_out += (size_t)w;
    }
    /* Sending is progress: a streaming app is not hung.  (With threads the
     * clock is per request, t_job, restarted when the batch is handed back.) */
    if (!c->job)
        stats_busy(c->loop);
    return write_pending(c);
}

long long blaze_resp_file(blaze_conn *c, int fd, long long offset, long long len)
{
    if (conn_dead(c) || !c->resp_started || write_flush_head(c) != BLAZE_OK) {
        close(fd);
        return -1;
    }
    size_t allow = body_allow(c, len > 0 ? (size_t)len : 0);
    if (allow == 0) {
        close(fd);
        return write_pending(c);
    }
    if (c->out == NULL && (c->out = evbuffer_new()) == NULL) {
        close(fd);
        conn_broken(c);
        return -1;
    }
    if (c->resp_chunked && evbuffer_add_printf(c->out, "%zx\r\n", allow) < 0) {
        close(fd);
        conn_broken(c);
        return -1;
    }
    /* evbuffer_add_file takes fd and sends it with sendfile(2); a TLS
     * connection encrypts it from the file's mapping instead (blaze_tls.c). */
    if (evbuffer_add_file(c->out, fd, offset, (ev_off_t)allow) != 0) {
        conn_broken(c);
        return -1;
    }
    if (c->resp_chunked && evbuffer_add(c->out, "\r\n", 2) != 0) {
        conn_broken(c);
        return -1;
    }
    conn_want_write(c);
    return write_pending(c);
}

long long blaze_resp_flush(blaze_conn *c, long long below)
{
    int ms = (int)(c->loop->lim.io_timeout * 1000.0);
    while (!conn_dead(c) && write_pending(c) > below) {
        int n = conn_write_out(c);
        if (n > 0 && c->in_thread)
            c->thread_out += (size_t)n;   /* the slot's counters are the loop's to write */
        else if (n > 0)
            stats_bytes(c->loop, 0, (size_t)n);
        if (n < 0) {
            conn_broken(c);
            return -1;
        }
        if (write_pending(c) <= below)
            break;
        struct pollfd pfd = {c->fd, c->tls_want_read ? POLLIN : POLLOUT, 0};
        int r = poll(&pfd, 1, ms);
        if (r == 0 || (r < 0 && errno != EINTR)) {
            conn_broken(c);   /* the client stopped reading */
            return -1;
        }
    }
    return conn_dead(c) ? -1 : write_pending(c);
}

int blaze_resp_finish(blaze_conn *c)
{
    if (conn_dead(c) || !c->resp_started)
        return BLAZE_ERR;
    struct iovec iov[2];
    int n = take_head(c, iov);
    if (c->resp_chunked && !c->resp_nobody) {
        iov[n].iov_base = (void *)"0\r\n\r\n";
        iov[n++].iov_len = 5;
    }
    if (c->resp_left > 0 && !c->resp_nobody)
        c->resp_close = 1;   /* shorter than its Content-Length: only a close can tell */
    return n > 0 ? conn_send_last(c, iov, n) : BLAZE_OK;
}

int blaze_resp_last(blaze_conn *c, const char *data, size_t len)
{
    c->cork_ok = 1;           /* the response ends here: it may wait for the pass's end */
    int rc = blaze_resp_write(c, data, len) < 0 ? BLAZE_ERR : blaze_resp_finish(c);
    c->cork_ok = 0;
    return rc;
}

int blaze_resp_simple(blaze_conn *c, const char *head, size_t head_len, int nhdrs,
                      const char *body, size_t body_len)
{
    if (frame_head(c, head, head_len, nhdrs, (long long)body_len) != BLAZE_OK)
        return BLAZE_ERR;
    struct iovec iov[2];
    int n = take_head(c, iov);
    size_t len = body_allow(c, body_len);
    blaze_head *hd = head_of(c);
    if (n == 1 && len > 0 && len <= BLAZE_COALESCE && hd->len + len <= hd->cap) {
        /* A small body rides in the head's buffer: one send(2), not writev(2). */
        memcpy(hd->buf + hd->len, body, len);
        iov[0].iov_len += len;
    } else if (len > 0) {
        iov[n].iov_base = (void *)body;
        iov[n++].iov_len = len;
    }
    if (c->resp_left > 0 && !c->resp_nobody)
        c->resp_close = 1;
    if (conn_lend_last(c, iov, n))
        return 1;             /* the caller keeps body alive until the flush */
    c->cork_ok = 1;
    int rc = conn_send_last(c, iov, n);
    c->cork_ok = 0;
    if (rc != BLAZE_OK) {
        BAD("client disconnected");
    }
    return BLAZE_OK;
}
