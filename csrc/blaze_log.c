/* The access log: one line per response, formatted here into a per-worker
 * buffer and written in large appends -- when the buffer fills, on the
 * loop's one-second tick, and when the loop ends -- never a write per
 * request.  The buffer only ever holds lines of one local day, so a line
 * always lands in the file named after the date in its own timestamp:
 * log_dir/YYYY-MM-DD.log (O_APPEND: whole writes of whole lines never
 * interleave with another worker's), or stderr without log_dir.
 *
 *   [2025-04-25 10:00:00] Request: GET / from 127.0.0.1, Status: 200 OK, Latency: 1.234ms
 */
#include "blaze.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Buffer: 64 KiB of lines plus room for the longest one (a whole request
 * target, up to the head buffer, and a reason phrase). */
#define LOG_BUF_LINES (64 * 1024)
#define LOG_LINE_FIXED 512

int log_init(blaze_loop *loop, char *err, size_t errlen)
{
    blaze_accesslog *a = &loop->alog;
    a->fd = -1;
    a->enabled = loop->lim.access_log;
    /* log_debug writes to log_dir too, with or without access lines */
    if (loop->lim.log_dir && loop->lim.log_dir[0] && (a->dir = strdup(loop->lim.log_dir)) == NULL)
        goto oom;
    if (!a->enabled)
        return BLAZE_OK;
    a->cap = LOG_BUF_LINES + BLAZE_BUF_SIZE(&loop->lim) + sizeof(((blaze_conn *)0)->resp_reason) + LOG_LINE_FIXED;
    if ((a->buf = malloc(a->cap)) == NULL)
        goto oom;
    return BLAZE_OK;
oom:
    snprintf(err, errlen, "out of memory for the access log");
    return BLAZE_ERR;
}

/* "[YYYY-MM-DD HH:MM:SS]" of now, cached per second; day gets YYYY-MM-DD. */
static const char *stamp(blaze_accesslog *a, long long offset)
{
    time_t now = time(NULL) + (time_t)offset;
    if (now != a->stamp_sec || a->stamp[0] == '\0') {
        struct tm tm;
        localtime_r(&now, &tm);
        strftime(a->stamp, sizeof(a->stamp), "[%Y-%m-%d %H:%M:%S]", &tm);
        a->stamp_sec = now;
    }
    return a->stamp;
}

static int open_day(blaze_accesslog *a, const char *day)
{
    char path[4096];
    if (a->fd >= 0 && strcmp(a->fd_day, day) == 0)
        return a->fd;
    if (a->fd >= 0)
        close(a->fd);
    snprintf(path, sizeof(path), "%s/%s.log", a->dir, day);
    a->fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    memcpy(a->fd_day, day, sizeof(a->fd_day));
    if (a->fd < 0)
        fprintf(stderr, "blazewsgi: cannot open the access log %s: %s\n", path, strerror(errno));
    return a->fd;
}

void log_flush(blaze_loop *loop)
{
    blaze_accesslog *a = &loop->alog;
    if (!a->enabled || a->len == 0)
        return;
    int fd = a->dir ? open_day(a, a->buf_day) : STDERR_FILENO;
    size_t off = 0;
    while (fd >= 0 && off < a->len) {
        ssize_t w = write(fd, a->buf + off, a->len - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            break;          /* disk full or gone: these lines are lost, say so once per flush */
        }
        off += (size_t)w;
    }
    if (off < a->len)
        fprintf(stderr, "blazewsgi: lost %zu bytes of access log: %s\n", a->len - off, strerror(errno));
    a->len = 0;
}

void log_reopen(blaze_loop *loop)
{
    blaze_accesslog *a = &loop->alog;
    log_flush(loop);
    if (a->dir && a->fd >= 0) {
        close(a->fd);
        a->fd = -1;
    }
}

static char *put(char *p, const char *s, size_t n)
{
    memcpy(p, s, n);
    return p + n;
}

static char *put_uint(char *p, unsigned long long v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

void log_request(blaze_conn *c, int status, const char *reason, size_t reason_len, double took)
{
    blaze_loop *loop = c->loop;
    blaze_accesslog *a = &loop->alog;
    if (!a->enabled)
        return;
    const char *ts = stamp(a, loop->lim.clock_offset);
    if (a->len > 0 && memcmp(a->buf_day, ts + 1, 10) != 0)
        log_flush(loop);                /* midnight: yesterday's lines go to yesterday's file */
    const char *method = c->url.len ? http_method_str((enum http_method)c->parser.method) : "-";
    size_t tlen = c->url.len ? c->url.len : 1;
    const char *target = c->url.len ? c->buf + c->url.off : "-";
    if (a->len > LOG_BUF_LINES || a->len + tlen + reason_len + LOG_LINE_FIXED > a->cap)
        log_flush(loop);
    if (a->len == 0) {
        memcpy(a->buf_day, ts + 1, 10);
        a->buf_day[10] = '\0';
    }
    unsigned long long us = (unsigned long long)(took * 1e6);
    const char *client = client_addr(c);
    if (client == NULL)
        client = "local";
    /* Hand-formatted (snprintf of a double costs more than the rest of the line). */
    char *p = a->buf + a->len;
    p = put(p, ts, strlen(ts));
    p = put(p, " Request: ", 10);
    p = put(p, method, strlen(method));
    *p++ = ' ';
    p = put(p, target, tlen);
    p = put(p, " from ", 6);
    p = put(p, client, strlen(client));
    p = put(p, ", Status: ", 10);
    p = put_uint(p, (unsigned long long)status);
    if (reason_len) {
        *p++ = ' ';
        p = put(p, reason, reason_len);
    }
    p = put(p, ", Latency: ", 11);
    p = put_uint(p, us / 1000);
    *p++ = '.';
    *p++ = (char)('0' + (us / 100) % 10);
    *p++ = (char)('0' + (us / 10) % 10);
    *p++ = (char)('0' + us % 10);
    p = put(p, "ms\n", 3);
    a->len = (size_t)(p - a->buf);
}

/* Server-log lines from C are rare (failed TLS handshakes at debug): each is
 * formatted like logs.py's and written at once, after any buffered access
 * lines so the file stays in time order. */
void log_debug(blaze_loop *loop, const char *fmt, ...)
{
    if (!loop->lim.log_debug)
        return;
    blaze_accesslog *a = &loop->alog;
    char line[512];
    const char *ts = stamp(a, loop->lim.clock_offset);
    int n = snprintf(line, sizeof(line), "%s [%d] [DEBUG] ", ts, (int)getpid());
    if (n < 0 || (size_t)n >= sizeof(line))
        return;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        return;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof(line) - 2)
        len = sizeof(line) - 2;          /* cut: the message was longer than the line */
    line[len++] = '\n';
    log_flush(loop);
    char day[11];
    memcpy(day, ts + 1, 10);
    day[10] = '\0';
    int fd = a->dir ? open_day(a, day) : STDERR_FILENO;
    if (fd >= 0 && write(fd, line, len) < 0) {
        /* the log is gone: nothing better to tell */
    }
}

void log_free(blaze_loop *loop)
{
    blaze_accesslog *a = &loop->alog;
    log_flush(loop);
    if (a->dir && a->fd >= 0)
        close(a->fd);
    free(a->buf);
    free(a->dir);
}
