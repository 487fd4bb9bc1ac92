/* Requests: the strict head scanner, http-parser callbacks, body decoding
 * and the CGI environ block handed to Python.
 *
 * Strategy.  Debian builds libhttp_parser with HTTP_PARSER_STRICT=0, which
 * lets bare LF, odd bytes in tokens and sloppy chunk framing through.  So
 * this file is strict on top of it:
 *   1. A line scanner finds the end of the head (CRLF CRLF) and rejects,
 *      line by line, what RFC 9112 says a server must reject: bare CR or
 *      LF, NUL and other controls, obs-fold, empty or non-token field
 *      names, whitespace before the colon, malformed request lines.  It
 *      also enforces the 414 and 431 limits before anything is buffered
 *      past them.
 *   2. http-parser then parses the validated head (method, target,
 *      version, keep-alive, Content-Length) into offsets in conn->buf.
 *      on_headers_complete returns 1, so the parser never sees a body.
 *   3. The body (Content-Length or chunked) is decoded here, strictly,
 *      into memory or, past body_buffer_size, into a temporary file.
 */
#include "blaze.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* RFC 9110 tchar */
const unsigned char blaze_tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1,
    ['+'] = 1, ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,
    ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1,
    ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1,
    ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
    ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
    ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1,
    ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
    ['y'] = 1, ['z'] = 1,
};

static int hexval(unsigned char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* ---- http-parser callbacks: record offsets into conn->buf ---- */

static int on_url(http_parser *p, const char *at, size_t len)
{
    blaze_conn *c = p->data;
    if (c->url.len == 0)
        c->url.off = (uint32_t)(at - c->buf);
    c->url.len = (uint32_t)(at + len - (c->buf + c->url.off));
    return 0;
}

/* After a value, the next field callback starts a new header. */
static int on_header_field(http_parser *p, const char *at, size_t len)
{
    blaze_conn *c = p->data;
    if (c->nhdrs == 0 || c->hdr_in_value) {
        if (c->nhdrs >= c->loop->lim.limit_request_fields)
            return 1;   /* the scanner counted lines; cannot happen */
        blaze_header *h = &c->hdrs[c->nhdrs++];
        h->name.off = (uint32_t)(at - c->buf);
        h->name.len = 0;
        h->value.off = 0;
        h->value.len = 0;
        c->hdr_in_value = 0;
    }
    blaze_header *h = &c->hdrs[c->nhdrs - 1];
    h->name.len = (uint32_t)(at + len - (c->buf + h->name.off));
    return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len)
{
    blaze_conn *c = p->data;
    if (c->nhdrs == 0)
        return 1;
    blaze_header *h = &c->hdrs[c->nhdrs - 1];
    if (!c->hdr_in_value) {
        h->value.off = (uint32_t)(at - c->buf);
        c->hdr_in_value = 1;
    }
    h->value.len = (uint32_t)(at + len - (c->buf + h->value.off));
    return 0;
}

static int on_headers_complete(http_parser *p)
{
    (void)p;
    return 1;   /* skip the body: blaze_http.c decodes it */
}

void http_settings_init(http_parser_settings *s)
{
    memset(s, 0, sizeof(*s));
    s->on_url = on_url;
    s->on_header_field = on_header_field;
    s->on_header_value = on_header_value;
    s->on_headers_complete = on_headers_complete;
}

/* Forget the request just served; keep whatever follows it in buf. */
void http_request_reset(blaze_conn *c)
{
    c->scan = c->line = c->start;
    c->nlines = 0;
    c->head_end = 0;
    c->url.off = c->url.len = 0;
    c->nhdrs = 0;
    c->hdr_in_value = 0;
    c->keepalive = 0;
    c->is_head = 0;
    c->http10 = 0;
    c->expect_continue = 0;
    c->fwd = 0;
    c->body_kind = BODY_NONE;
    c->body_left = 0;
    c->chunk_state = 0;
    c->chunk_left = 0;
    c->chunk_line = 0;
    c->trailer_bytes = 0;
    c->body_len = 0;
    c->body_total = 0;
    c->body_held = 0;
    if (c->body_fd >= 0) {
        close(c->body_fd);
        c->body_fd = -1;
    }
    if (c->body_cap > BLAZE_BODY_KEEP) {   /* don't keep a big body buffer per idle connection */
        free(c->body);
        c->body = NULL;
        c->body_cap = 0;
    }
    c->t_start = 0;
    c->method_index = BLAZE_METHODS - 1;
    c->resp_status = 0;
    c->resp_started = 0;
    c->resp_chunked = 0;
    c->resp_nobody = 0;
    c->resp_close = 0;
    c->resp_left = -1;
}

/* ---- step 1: the line scanner ---- */

#define FAIL(code, text) do { *status = (code); *why = (text); return IO_CLOSE; } while (0)

static blaze_io check_request_line(const unsigned char *s, size_t n, int *status, const char **why)
{
    size_t i = 0;
    while (i < n && blaze_tchar[s[i]])
        i++;
    if (i == 0 || i >= n || s[i] != ' ')
        FAIL(400, "malformed request line (method)");
    size_t t = ++i;
    while (i < n && s[i] > 0x20 && s[i] < 0x7f)
        i++;
    if (i == t || i >= n || s[i] != ' ')
        FAIL(400, "malformed request line (request target)");
    i++;
    if (n - i != 8 || memcmp(s + i, "HTTP/", 5) != 0 ||
        s[i + 5] < '0' || s[i + 5] > '9' || s[i + 6] != '.' || s[i + 7] < '0' || s[i + 7] > '9')
        FAIL(400, "malformed request line (HTTP version)");
    if (s[i + 5] != '1')
        FAIL(505, "only HTTP/1.0 and HTTP/1.1 are supported");
    return IO_DONE;
}

/* Also turns HTAB in the optional whitespace around the value into SP:
 * OWS is not part of the value, and http-parser rejects "5\t" as a
 * Content-Length while RFC 9112 allows it. */
static blaze_io check_field_line(unsigned char *s, size_t n, int *status, const char **why)
{
    if (s[0] == ' ' || s[0] == '\t')
        FAIL(400, "obsolete line folding in a header");
    size_t i = 0;
    while (i < n && blaze_tchar[s[i]])
        i++;
    if (i == n || s[i] != ':') {
        if (i < n && (s[i] == ' ' || s[i] == '\t'))
            FAIL(400, "whitespace between header name and colon");
        FAIL(400, i == n ? "header line without a colon" : "invalid character in header name");
    }
    if (i == 0)
        FAIL(400, "empty header name");
    size_t v = ++i;
    for (; i < n; i++)
        if (!blaze_field_char(s[i]))
            FAIL(400, "invalid character in header value");
    for (i = v; i < n && (s[i] == ' ' || s[i] == '\t'); i++)
        s[i] = ' ';
    for (i = n; i > v && (s[i - 1] == ' ' || s[i - 1] == '\t'); i--)
        s[i - 1] = ' ';
    return IO_DONE;
}

static blaze_io scan_head(blaze_conn *c, int *status, const char **why)
{
    const blaze_limits *lim = &c->loop->lim;
    size_t cap = (size_t)lim->head_buffer_size;
    for (;;) {
        char *nl = memchr(c->buf + c->scan, '\n', c->len - c->scan);
        if (nl == NULL) {
            size_t open = c->len - c->line;
            if (c->nlines == 0 && open > (size_t)lim->limit_request_line + 1)
                FAIL(414, "request line too long");
            if (c->nlines > 0 && open > (size_t)lim->limit_request_field_size + 1)
                FAIL(431, "header line too large");
            if (c->len - c->start >= cap)
                FAIL(431, "request header section too large");
            c->scan = c->len;
            return IO_AGAIN;
        }
        size_t end = (size_t)(nl - c->buf);          /* the LF */
        if (end == c->line || c->buf[end - 1] != '\r')
            FAIL(400, "bare LF in request head");
        unsigned char *s = (unsigned char *)c->buf + c->line;
        size_t n = end - 1 - c->line;                  /* without CRLF */
        if (memchr(s, '\r', n) != NULL)
            FAIL(400, "bare CR in request head");
        if (n == 0) {
            if (c->nlines == 0) {                      /* RFC 9112 2.2: ignore leading CRLF */
                /* drop it from the buffer too, so it never eats head space */
                size_t keep = c->len - (end + 1);
                memmove(c->buf + c->start, c->buf + end + 1, keep);
                c->len = c->start + keep;
                c->line = c->scan = c->start;
                continue;
            }
            c->head_end = end + 1;
            c->scan = end + 1;
            if (c->head_end - c->start > cap)
                FAIL(431, "request header section too large");
            return IO_DONE;
        }
        if (c->nlines == 0) {
            if (n > (size_t)lim->limit_request_line)
                FAIL(414, "request line too long");
            if (check_request_line(s, n, status, why) != IO_DONE)
                return IO_CLOSE;
        } else {
            if (n > (size_t)lim->limit_request_field_size)
                FAIL(431, "header line too large");
            if (c->nlines > lim->limit_request_fields)
                FAIL(431, "too many header lines");
            if (check_field_line(s, n, status, why) != IO_DONE)
                return IO_CLOSE;
        }
        c->nlines++;
        c->line = c->scan = end + 1;
    }
}

/* ---- step 2: parse the validated head and check its semantics ---- */

static int name_is(const blaze_conn *c, const blaze_header *h, const char *name, size_t n)
{
    return h->name.len == n && strncasecmp(c->buf + h->name.off, name, n) == 0;
}

static void trim_value(const blaze_conn *c, blaze_header *h)
{
    while (h->value.len > 0) {
        char ch = c->buf[h->value.off + h->value.len - 1];
        if (ch != ' ' && ch != '\t')
            break;
        h->value.len--;
    }
}

/* RFC 9112 3.2: Host = uri-host [ ":" port ]; an empty value is allowed.
 * uri-host's bytes (RFC 3986: unreserved, sub-delims, pct-encoded, the IP
 * literal's brackets) and the port's ":". */
static const unsigned char host_char[256] = {
    ['0' ... '9'] = 1, ['A' ... 'Z'] = 1, ['a' ... 'z'] = 1,
    ['-'] = 1, ['.'] = 1, ['_'] = 1, ['~'] = 1, ['!'] = 1, ['$'] = 1, ['&'] = 1, ['\''] = 1,
    ['('] = 1, [')'] = 1, ['*'] = 1, ['+'] = 1, [','] = 1, [';'] = 1, ['='] = 1, [':'] = 1,
    ['%'] = 1, ['['] = 1, [']'] = 1,
};

static int valid_host(const char *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!host_char[(unsigned char)v[i]])
            return 0;
    return 1;
}

/* chunked must be the final (here: the only) transfer coding. */
static int te_status(const char *v, size_t n)
{
    if (n == 7 && strncasecmp(v, "chunked", 7) == 0)
        return 0;
    size_t i = n;
    while (i > 0 && (v[i - 1] == ' ' || v[i - 1] == '\t'))
        i--;
    if (i >= 7 && strncasecmp(v + i - 7, "chunked", 7) == 0 &&
        (i == 7 || v[i - 8] == ',' || v[i - 8] == ' ' || v[i - 8] == '\t'))
        return 501;   /* another coding before chunked: not implemented */
    return 400;       /* chunked not final: the length cannot be determined */
}

blaze_io http_read_head(blaze_conn *c, int *status, const char **why)
{
    blaze_io r = scan_head(c, status, why);
    if (r != IO_DONE)
        return r;

    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    size_t n = c->head_end - c->start;
    size_t got = http_parser_execute(&c->parser, &c->loop->settings, c->buf + c->start, n);
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (e != HPE_OK || got != n) {
        if (e == HPE_INVALID_METHOD)
            FAIL(501, "method not implemented");
        if (e == HPE_INVALID_CONTENT_LENGTH)
            FAIL(400, "invalid Content-Length");
        if (e == HPE_UNEXPECTED_CONTENT_LENGTH)
            FAIL(400, "conflicting Content-Length / Transfer-Encoding");
        *status = 400;
        *why = http_errno_description(e);
        return IO_CLOSE;
    }

    int n_cl = 0, n_te = 0, n_host = 0, expect = 0, te = -1;
    uint64_t cl = 0;
    for (int i = 0; i < c->nhdrs; i++) {
        blaze_header *h = &c->hdrs[i];
        trim_value(c, h);
        const char *v = c->buf + h->value.off;
        switch (h->name.len) {
        case 4:
            if (name_is(c, h, "host", 4)) {
                n_host++;
                if (!valid_host(v, h->value.len))
                    FAIL(400, "invalid Host header");
            }
            break;
        case 6:
            if (name_is(c, h, "expect", 6)) {
                if (h->value.len == 12 && strncasecmp(v, "100-continue", 12) == 0)
                    expect = 1;
                else
                    expect = -1;
            }
            break;
        case 14:
            if (name_is(c, h, "content-length", 14)) {
                n_cl++;
                if (h->value.len == 0 || h->value.len > 18)
                    FAIL(400, "invalid Content-Length");
                cl = 0;
                for (uint32_t k = 0; k < h->value.len; k++) {
                    if (v[k] < '0' || v[k] > '9')
                        FAIL(400, "invalid Content-Length");
                    cl = cl * 10 + (uint64_t)(v[k] - '0');
                }
            }
            break;
        case 17:
            if (name_is(c, h, "transfer-encoding", 17)) {
                n_te++;
                te = te_status(v, h->value.len);
            }
            break;
        default:
            break;
        }
    }
    if (n_cl > 1)
        FAIL(400, "several Content-Length headers");
    if (n_te > 1)
        FAIL(400, "several Transfer-Encoding headers");
    if (n_cl && n_te)
        FAIL(400, "Content-Length together with Transfer-Encoding");
    if (n_host > 1)
        FAIL(400, "several Host headers");

    c->http10 = c->parser.http_minor == 0;
    if (c->http10 && n_te)
        FAIL(400, "Transfer-Encoding in an HTTP/1.0 request");
    if (!c->http10 && n_host == 0)
        FAIL(400, "HTTP/1.1 request without Host");
    if (n_te && te != 0)
        FAIL(te, te == 501 ? "unsupported transfer coding" : "chunked is not the final transfer coding");
    /* RFC 9110 10.1.1: an HTTP/1.0 server ignores Expect. */
    if (expect < 0 && !c->http10)
        FAIL(417, "unsupported Expect");
    if (c->http10)
        expect = 0;
    if (c->url.len == 1 && c->buf[c->url.off] == '*' && c->parser.method != HTTP_OPTIONS)
        FAIL(400, "asterisk-form is only for OPTIONS");

    c->is_head = c->parser.method == HTTP_HEAD;
    c->method_index = stats_method_index((int)c->parser.method);
    c->keepalive = http_should_keep_alive(&c->parser) ? 1 : 0;
    if (n_te) {
        c->body_kind = BODY_CHUNKED;
    } else if (cl > 0) {
        if (cl > (uint64_t)c->loop->lim.max_body_size)
            FAIL(413, "request body larger than max_body_size");
        c->body_kind = BODY_LENGTH;
        c->body_left = cl;
    }
    c->expect_continue = expect ? 1 : 0;
    return IO_DONE;
}

/* ---- step 3: the body ---- */

static int spill_open(blaze_conn *c)
{
    int fd = open(c->loop->lim.tmp_dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/blazewsgi-body-XXXXXX", c->loop->lim.tmp_dir);
        fd = mkostemp(path, O_CLOEXEC);
        if (fd < 0)
            return BLAZE_ERR;
        unlink(path);
    }
    c->body_fd = fd;
    return BLAZE_OK;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return BLAZE_ERR;
        }
        p += w;
        n -= (size_t)w;
    }
    return BLAZE_OK;
}

/* Room for need bytes of body in memory (need <= body_buffer_size). */
static int body_reserve(blaze_conn *c, size_t need)
{
    if (need <= c->body_cap)
        return BLAZE_OK;
    size_t cap = c->body_cap ? c->body_cap : 4096;
    while (cap < need)
        cap *= 2;
    /* A Content-Length says how big the body will be: one allocation, not a
     * chain of copies (malloc maps a buffer this big lazily: pages are only
     * touched as bytes arrive). */
    if (c->body_kind == BODY_LENGTH && c->body_len + c->body_left > cap)
        cap = (size_t)(c->body_len + c->body_left);
    if (cap > (size_t)c->loop->lim.body_buffer_size)
        cap = (size_t)c->loop->lim.body_buffer_size;
    char *b = realloc(c->body, cap);
    if (b == NULL)
        return BLAZE_ERR;
    c->body = b;
    c->body_cap = cap;
    return BLAZE_OK;
}

static int body_append(blaze_conn *c, const char *p, size_t n)
{
    c->body_total += n;
    if (c->body_fd >= 0)
        return write_all(c->body_fd, p, n);
    size_t need = c->body_len + n;
    if (need > (size_t)c->loop->lim.body_buffer_size) {
        if (spill_open(c) != BLAZE_OK || write_all(c->body_fd, c->body, c->body_len) != BLAZE_OK)
            return BLAZE_ERR;
        c->body_len = 0;
        return write_all(c->body_fd, p, n);
    }
    if (body_reserve(c, need) != BLAZE_OK)
        return BLAZE_ERR;
    memcpy(c->body + c->body_len, p, n);
    c->body_len = need;
    return BLAZE_OK;
}

/* Body bytes waiting in buf after the head (body_held), not yet counted. */
static size_t body_held(const blaze_conn *c)
{
    return c->body_held ? c->len - c->scan : 0;
}

uint64_t http_body_awaited(const blaze_conn *c)
{
    size_t held = body_held(c);
    if (c->body_kind != BODY_LENGTH || c->scan + held != c->len || c->body_fd >= 0 ||
        held >= c->body_left)
        return 0;
    if (c->body_len + c->body_left > (uint64_t)c->loop->lim.body_buffer_size)
        return 0;             /* it spills: read through buf, see body_append */
    return c->body_left - held;
}

char *http_body_direct(blaze_conn *c, size_t *room)
{
    uint64_t left = http_body_awaited(c);
    if (left == 0 || body_reserve(c, c->body_len + (size_t)c->body_left) != BLAZE_OK)
        return NULL;          /* body_append spills, or fails with a 500, as before */
    size_t held = body_held(c);
    if (held > 0) {
        memcpy(c->body + c->body_len, c->buf + c->scan, held);
        c->body_len += held;
        c->body_total += held;
        c->body_left -= held;
        c->len = c->scan = c->head_end;
    }
    c->body_held = 0;
    *room = (size_t)left;
    return c->body + c->body_len;
}

void http_body_direct_took(blaze_conn *c, size_t n)
{
    c->body_total += n;
    c->body_len += n;
    c->body_left -= n;
}

char *blaze_body_take(blaze_conn *c)
{
    if (c->body_fd >= 0 || c->body == NULL || c->body_cap <= BLAZE_BODY_KEEP)
        return NULL;
    char *p = c->body;        /* its bytes are the request's body_len (body_total) */
    c->body = NULL;
    c->body_cap = 0;
    c->body_len = 0;
    return p;
}

void blaze_body_free(char *p)
{
    free(p);
}

/* The body-reading states; 0 is reused before the body starts. */
enum {
    CH_SIZE_START = 0, CH_SIZE, CH_BWS, CH_EXT, CH_SIZE_LF, CH_DATA, CH_DATA_CR, CH_DATA_LF,
    CH_TRAILER_START, CH_TRAILER_NAME, CH_TRAILER_VALUE, CH_TRAILER_LF, CH_END_LF, CH_DONE
};

static blaze_io read_chunked(blaze_conn *c, int *status, const char **why)
{
    const blaze_limits *lim = &c->loop->lim;
    while (c->scan < c->len) {
        unsigned char ch = (unsigned char)c->buf[c->scan];
        if (c->chunk_state == CH_DATA) {
            size_t avail = c->len - c->scan;
            size_t take = avail < c->chunk_left ? avail : (size_t)c->chunk_left;
            if (body_append(c, c->buf + c->scan, take) != BLAZE_OK)
                FAIL(500, "cannot store the request body");
            c->scan += take;
            c->chunk_left -= take;
            if (c->chunk_left == 0)
                c->chunk_state = CH_DATA_CR;
            continue;
        }
        c->scan++;
        if (++c->chunk_line > (size_t)lim->limit_request_field_size)
            FAIL(400, "chunk line too long");
        int hv = hexval(ch);
        switch (c->chunk_state) {
        case CH_SIZE_START:
            if (hv < 0)
                FAIL(400, "invalid chunk size");
            c->chunk_left = (uint64_t)hv;
            c->chunk_state = CH_SIZE;
            break;
        case CH_SIZE:
            if (hv >= 0) {
                if (c->chunk_left > ((uint64_t)1 << 59))
                    FAIL(413, "chunk size too large");
                c->chunk_left = c->chunk_left * 16 + (uint64_t)hv;
            } else if (ch == ';') {
                c->chunk_state = CH_EXT;
            } else if (ch == ' ' || ch == '\t') {
                c->chunk_state = CH_BWS;
            } else if (ch == '\r') {
                c->chunk_state = CH_SIZE_LF;
            } else {
                FAIL(400, "invalid chunk size");
            }
            break;
        case CH_BWS:   /* whitespace after the size is allowed only before ';' */
            if (ch == ';')
                c->chunk_state = CH_EXT;
            else if (ch != ' ' && ch != '\t')
                FAIL(400, "invalid chunk size line");
            break;
        case CH_EXT:
            if (ch == '\r')
                c->chunk_state = CH_SIZE_LF;
            else if (!blaze_field_char(ch))
                FAIL(400, "invalid character in chunk extension");
            break;
        case CH_SIZE_LF:
            if (ch != '\n')
                FAIL(400, "bare CR in chunk size line");
            c->chunk_line = 0;
            if (c->chunk_left == 0) {
                c->chunk_state = CH_TRAILER_START;
            } else {
                if (c->body_total + c->chunk_left > (uint64_t)lim->max_body_size)
                    FAIL(413, "request body larger than max_body_size");
                c->chunk_state = CH_DATA;
            }
            break;
        case CH_DATA_CR:
            if (ch != '\r')
                FAIL(400, "chunk data not followed by CRLF");
            c->chunk_state = CH_DATA_LF;
            break;
        case CH_DATA_LF:
            if (ch != '\n')
                FAIL(400, "chunk data not followed by CRLF");
            c->chunk_line = 0;
            c->chunk_state = CH_SIZE_START;
            break;
        case CH_TRAILER_START:
            if (ch == '\r') {
                c->chunk_state = CH_END_LF;
            } else if (blaze_tchar[ch]) {
                c->chunk_state = CH_TRAILER_NAME;
            } else {
                FAIL(400, "invalid trailer field");
            }
            break;
        case CH_TRAILER_NAME:
            if (ch == ':')
                c->chunk_state = CH_TRAILER_VALUE;
            else if (!blaze_tchar[ch])
                FAIL(400, "invalid trailer field name");
            break;
        case CH_TRAILER_VALUE:
            if (ch == '\r')
                c->chunk_state = CH_TRAILER_LF;
            else if (!blaze_field_char(ch))
                FAIL(400, "invalid character in trailer field");
            break;
        case CH_TRAILER_LF:
            if (ch != '\n')
                FAIL(400, "bare CR in trailer field");
            c->trailer_bytes += c->chunk_line;
            if (c->trailer_bytes > (size_t)lim->head_buffer_size)
                FAIL(431, "trailer section too large");
            c->chunk_line = 0;
            c->chunk_state = CH_TRAILER_START;
            break;
        case CH_END_LF:
            if (ch != '\n')
                FAIL(400, "bare CR after the last chunk");
            c->chunk_state = CH_DONE;
            return IO_DONE;
        default:
            FAIL(500, "chunk decoder state");
        }
    }
    return IO_AGAIN;
}

blaze_io http_read_body(blaze_conn *c, int *status, const char **why)
{
    blaze_io r;
    if (c->body_kind == BODY_LENGTH) {
        size_t avail = c->len - c->scan;
        if (c->body_total == 0 && !c->body_held && avail < c->body_left) {
            /* The head brought only the start of a body read straight into
             * its buffer (http_body_awaited): that start waits here, in buf,
             * and the buffer is made when the rest is in the socket
             * (http_body_direct).  So a connection waiting for its body
             * holds no buffer, and the one it gets is likely the last big
             * body's, still in the cache.  Once only: if no direct read
             * comes, the next step appends. */
            c->body_held = 1;
            if (http_body_awaited(c) > 0)
                return IO_AGAIN;
        }
        c->body_held = 0;
        size_t take = avail < c->body_left ? avail : (size_t)c->body_left;
        if (c->body_total == 0 && c->body_left > (uint64_t)c->loop->lim.body_buffer_size &&
            c->body_fd < 0 && spill_open(c) != BLAZE_OK)
            FAIL(500, "cannot create a temporary file for the request body");
        if (take > 0 && body_append(c, c->buf + c->scan, take) != BLAZE_OK)
            FAIL(500, "cannot store the request body");
        c->scan += take;
        c->body_left -= take;
        r = c->body_left == 0 ? IO_DONE : IO_AGAIN;
    } else {
        r = read_chunked(c, status, why);
        if (r == IO_CLOSE)
            return r;
    }
    if (r == IO_AGAIN) {
        /* Every byte after the head was consumed: reuse that space. */
        c->len = c->scan = c->head_end;
    }
    return r;
}

/* ---- the environ block ---- */

/* Keys and values go to two blocks: the keys of a request (which CGI
 * names, in which order) repeat from request to request, so the loop keeps
 * a small table of key sets and Python a tuple of interned names per
 * slot; only the values are decoded and split per request. */
typedef struct {
    char *k;     /* keys block: "KEY\0KEY\0..." */
    char *v;     /* values block, in the same order */
} envw;

static void env_put(envw *w, const char *key, size_t klen, const char *val, size_t vlen)
{
    memcpy(w->k, key, klen);
    w->k += klen;
    *w->k++ = '\0';
    memcpy(w->v, val, vlen);
    w->v += vlen;
    *w->v++ = '\0';
}

#define ENV_PUT_LIT(w, key, val, vlen) env_put((w), key, sizeof(key) - 1, (val), (vlen))

/* Percent-decode a path (PEP 3333: PATH_INFO is the decoded bytes, latin-1). */
static int put_path(envw *w, const char *s, size_t n)
{
    memcpy(w->k, "PATH_INFO", 10);
    w->k += 10;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '%' && i + 2 < n && hexval((unsigned char)s[i + 1]) >= 0 &&
            hexval((unsigned char)s[i + 2]) >= 0) {
            ch = (unsigned char)(hexval((unsigned char)s[i + 1]) * 16 + hexval((unsigned char)s[i + 2]));
            if (ch == 0)
                return BLAZE_ERR;
            i += 2;
        }
        *w->v++ = (char)ch;
    }
    *w->v++ = '\0';
    return BLAZE_OK;
}

/* The slot of this key set: >= 0 if Python already holds it, else
 * -(slot + 1) and Python learns it from req->keys. */
static int keyset_slot(blaze_loop *loop, const char *keys, size_t len)
{
    uint64_t h = 1469598103934665603ULL;          /* FNV-1a, over 8 bytes at a time */
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, keys + i, 8);
        h = (h ^ w) * 1099511628211ULL;
    }
    for (; i < len; i++)
        h = (h ^ (unsigned char)keys[i]) * 1099511628211ULL;
    int slot = (int)((h ^ (h >> 32)) & (BLAZE_KEYSETS - 1));
    blaze_keyset *ks = &loop->keysets[slot];
    if (ks->keys && ks->hash == h && ks->len == len && memcmp(ks->keys, keys, len) == 0)
        return slot;
    ks->gen = ++loop->keygen;
    free(ks->keys);
    ks->keys = malloc(len ? len : 1);
    ks->hash = h;
    ks->len = ks->keys ? len : 0;
    if (ks->keys)
        memcpy(ks->keys, keys, len);
    return -(slot + 1);
}

/* A values block bigger than this is sent whole every time, not remembered. */
#define MEMO_MAX 4096
/* Changed values a delta can name (their indices are one byte each). */
#define MEMO_FIELDS 255
/* A connection whose requests changed values (or names) this many times in
 * a row is sent whole from then on, without comparing: a delta saves work
 * only when little changes, and one value changing on every request (a
 * browser's path) cost ~1.6k instructions a request more than a whole block. */
#define MEMO_GIVE_UP 4

/* How much of the values block Python needs (req->delta, see
 * BLAZE_ENV_* in blaze_cdef.h).  A kept-alive connection's next request
 * usually repeats most values (Host, the client's address, User-Agent,
 * Accept-*, cookies), and Python copies the remembered environ instead of
 * decoding, splitting and storing them again.  Compared field by field with
 * c->memo, the last block of this connection; the block is then rewritten
 * in place (it has room: `cap`) to hold only what changed. */
static void env_delta(blaze_conn *c, blaze_request *req, size_t cap)
{
    char *vals = (char *)req->values;
    size_t len = req->values_len;
    int slot = req->keyset >= 0 ? req->keyset : -req->keyset - 1;
    int same = c->memo_ok && c->memo_slot == slot && c->memo_gen == req->keygen;
    c->memo_ok = 0;                   /* until this block is in c->memo */
    req->delta = BLAZE_ENV_WHOLE;
    if (c->memo_off || !c->keepalive || len > MEMO_MAX ||
        buf_reserve(&c->memo, &c->memo_cap, len) != BLAZE_OK)
        return;
    unsigned char idx[MEMO_FIELDS];
    size_t off[MEMO_FIELDS], flen[MEMO_FIELDS];
    int n = 0;
    if (same) {
        const char *p = vals, *end = vals + len, *q = c->memo, *qend = c->memo + c->memo_len;
        for (int i = 0;; i++) {
            const char *pz = memchr(p, '\0', (size_t)(end - p));
            const char *qz = memchr(q, '\0', (size_t)(qend - q));
            size_t pl = (size_t)((pz ? pz : end) - p), ql = (size_t)((qz ? qz : qend) - q);
            if (pl != ql || memcmp(p, q, pl) != 0) {
                if (n == MEMO_FIELDS || i >= MEMO_FIELDS) {
                    same = 0;         /* too many to name: the whole block */
                    break;
                }
                idx[n] = (unsigned char)i;
                off[n] = (size_t)(p - vals);
                flen[n++] = pl;
            }
            if (pz == NULL || qz == NULL) {
                same = pz == NULL && qz == NULL;   /* the same key set has as many values */
                break;
            }
            p = pz + 1;
            q = qz + 1;
        }
    }
    if (same && n == 0) {             /* c->memo holds these very values already */
        c->memo_changed = 0;
        c->memo_ok = 1;
        req->values_len = 0;
        req->delta = 0;
        return;
    }
    if (++c->memo_changed >= MEMO_GIVE_UP) {
        c->memo_off = 1;              /* whole from now on; memo_ok stays 0 */
        free(c->memo);
        c->memo = NULL;
        c->memo_cap = 0;
        return;
    }
    memcpy(c->memo, vals, len);
    c->memo_len = len;
    c->memo_slot = slot;
    c->memo_gen = req->keygen;
    c->memo_ok = 1;
    if (!same || len + (size_t)n > cap) {
        req->delta = BLAZE_ENV_REMEMBER;
        return;
    }
    /* indices, then the changed values (read from the copy in c->memo) */
    char *w = vals;
    memcpy(w, idx, (size_t)n);
    w += n;
    for (int k = 0; k < n; k++) {
        if (k > 0)
            *w++ = '\0';
        memcpy(w, c->memo + off[k], flen[k]);
        w += flen[k];
    }
    req->values_len = (size_t)(w - vals);
    req->delta = n;
}

int http_build_environ(blaze_conn *c, blaze_request *req)
{
    blaze_loop *loop = c->loop;
    size_t head = c->head_end - c->start;
    /* Keys: at most the head plus "HTTP_" per header and the fixed names.
     * Values: at most the head plus the target twice (PATH_INFO, QUERY_STRING). */
    size_t need = 2 * head + 6 * (size_t)c->nhdrs + 512 + c->tls_dn_len;
    /* threads = 1: the loop's fixed block, whose values Python reads in place
     * (blaze_loop_values); else a block that goes with c to a thread */
    char **block = &loop->scratch;
    size_t half = BLAZE_ENV_HALF(&loop->lim);
    if (loop->lim.threads > 1) {
        block = &c->env;
        half = need;
        if (buf_reserve(block, &c->env_cap, 2 * half) != BLAZE_OK)
            return 500;
    }
    if (need > half)
        return 500;                   /* cannot be (the limits bound it): never write past */
    envw w = {*block, *block + half};
    /* The base environ in Python holds REQUEST_METHOD=GET,
     * SERVER_PROTOCOL=HTTP/1.1 and QUERY_STRING="": only other values are
     * sent, since every pair costs the worker a dict insertion. */
    if (c->parser.method != HTTP_GET) {
        const char *m = http_method_str((enum http_method)c->parser.method);
        ENV_PUT_LIT(&w, "REQUEST_METHOD", m, strlen(m));
    }
    if (c->http10)
        ENV_PUT_LIT(&w, "SERVER_PROTOCOL", "HTTP/1.0", 8);

    const char *u = c->buf + c->url.off;
    size_t ulen = c->url.len;
    const char *path = u, *query = "";
    size_t plen = ulen, qlen = 0;
    if (ulen > 0 && u[0] == '/') {
        const char *hash = memchr(u, '#', ulen);
        size_t end = hash ? (size_t)(hash - u) : ulen;
        const char *q = memchr(u, '?', end);
        plen = q ? (size_t)(q - u) : end;
        if (q) {
            query = q + 1;
            qlen = end - plen - 1;
        }
    } else if (ulen == 1 && u[0] == '*') {
        plen = 0;      /* OPTIONS *: no path (PEP 3333 wants "" or "/..."); RAW target is "*" */
    } else {
        struct http_parser_url pu;
        http_parser_url_init(&pu);
        /* absolute-form only: a scheme and a host, and a path (if any) from "/" */
        if (http_parser_parse_url(u, ulen, 0, &pu) != 0 ||
            !(pu.field_set & (1 << UF_SCHEMA)) || !(pu.field_set & (1 << UF_HOST)) ||
            ((pu.field_set & (1 << UF_PATH)) && u[pu.field_data[UF_PATH].off] != '/'))
            return 400;
        if (pu.field_set & (1 << UF_PATH)) {
            path = u + pu.field_data[UF_PATH].off;
            plen = pu.field_data[UF_PATH].len;
        } else {
            path = "/";
            plen = 1;
        }
        if (pu.field_set & (1 << UF_QUERY)) {
            query = u + pu.field_data[UF_QUERY].off;
            qlen = pu.field_data[UF_QUERY].len;
        }
    }
    if (put_path(&w, path, plen) != BLAZE_OK)
        return 400;
    if (qlen > 0)
        ENV_PUT_LIT(&w, "QUERY_STRING", query, qlen);

    const char *client = client_addr(c);      /* NULL: Python's base says "" */
    if (client != NULL) {
        ENV_PUT_LIT(&w, "REMOTE_ADDR", client, strlen(client));
        if (!c->fwd)    /* a forwarded client's port is not the peer's */
            ENV_PUT_LIT(&w, "REMOTE_PORT", c->remote_port, strlen(c->remote_port));
    }
    if (c->tls_dn)      /* HTTPS=on and wsgi.url_scheme are in the listener's base environ */
        ENV_PUT_LIT(&w, "SSL_CLIENT_S_DN", c->tls_dn, c->tls_dn_len);
    if (c->body_kind != BODY_NONE) {
        char num[24];
        int k = snprintf(num, sizeof(num), "%llu", (unsigned long long)c->body_total);
        ENV_PUT_LIT(&w, "CONTENT_LENGTH", num, (size_t)k);
    }

    /* Headers: merge repeats into the first (", "; "; " for Cookie), drop
     * names with '_' (so X_Forwarded_For cannot pose as X-Forwarded-For),
     * and the framing headers the server has consumed. */
    for (int i = 0; i < c->nhdrs; i++) {
        blaze_header *h = &c->hdrs[i];
        const char *name = c->buf + h->name.off;
        size_t nl = h->name.len;
        if (memchr(name, '_', nl) != NULL)
            continue;
        int seen = 0;
        for (int j = 0; j < i && !seen; j++)
            seen = c->hdrs[j].name.len == nl &&
                   strncasecmp(c->buf + c->hdrs[j].name.off, name, nl) == 0;
        if (seen)
            continue;
        if (nl == 14 && strncasecmp(name, "content-length", 14) == 0)
            continue;   /* CONTENT_LENGTH comes from the decoded body above */
        if (nl == 17 && strncasecmp(name, "transfer-encoding", 17) == 0)
            continue;   /* the body is decoded: wsgi.input is plain bytes */
        int is_ct = nl == 12 && strncasecmp(name, "content-type", 12) == 0;
        if (!is_ct) {
            memcpy(w.k, "HTTP_", 5);
            w.k += 5;
        }
        for (size_t k = 0; k < nl; k++) {
            char ch = name[k];
            if (ch >= 'a' && ch <= 'z')
                ch = (char)(ch - 'a' + 'A');
            else if (ch == '-')
                ch = '_';
            *w.k++ = ch;
        }
        *w.k++ = '\0';
        memcpy(w.v, c->buf + h->value.off, h->value.len);
        w.v += h->value.len;
        const char *sep = (nl == 6 && strncasecmp(name, "cookie", 6) == 0) ? "; " : ", ";
        for (int j = i + 1; j < c->nhdrs; j++) {
            blaze_header *o = &c->hdrs[j];
            if (o->name.len == nl && strncasecmp(c->buf + o->name.off, name, nl) == 0) {
                memcpy(w.v, sep, 2);
                w.v += 2;
                memcpy(w.v, c->buf + o->value.off, o->value.len);
                w.v += o->value.len;
            }
        }
        *w.v++ = '\0';
    }

    /* PATH_INFO is always there, so neither block is empty; drop the last NUL. */
    req->keys = *block;
    req->keys_len = (size_t)(w.k - *block) - 1;
    req->values = *block + half;
    req->values_len = (size_t)(w.v - req->values) - 1;
    req->keyset = keyset_slot(loop, req->keys, req->keys_len);
    req->keygen = loop->keysets[req->keyset >= 0 ? req->keyset : -req->keyset - 1].gen;
    req->listener = c->listener;
    req->body = c->body_fd >= 0 ? NULL : c->body;
    req->body_len = (size_t)c->body_total;
    req->body_fd = c->body_fd;
    req->conn_id = c->id;
    req->conn_slot = c->fd;
    if (c->body_fd >= 0 && lseek(c->body_fd, 0, SEEK_SET) < 0)
        return 500;
    /* Last: Python gets this request now (threads = 1), or the pool has it
     * and a thread will (a connection's requests go to Python in order). */
    env_delta(c, req, half);
    return 0;
}
