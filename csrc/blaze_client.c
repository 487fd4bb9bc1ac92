/* Who the client is: the TCP peer, or, when the peer is a trusted proxy,
 * the address that proxy forwards.  One answer feeds REMOTE_ADDR, the
 * access log and the rate limiter.
 *
 * Trusted peers: Unix socket peers (a local proxy such as nginx) and TCP
 * peers in forwarded_allow_ips.  From a trusted peer, X-Forwarded-For is
 * read from the right (the entry the nearest proxy appended) leftwards,
 * passing over entries that are trusted proxies themselves: the first
 * untrusted address is the client (nginx's real_ip_recursive).  An entry
 * that is not an IP address ends the walk at the last good one, so a
 * client cannot smuggle a name past its proxy.  Without X-Forwarded-For,
 * X-Real-IP (one address) is used.  From an untrusted peer both headers
 * change nothing: the peer is the client.
 */
#include "blaze.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

static const unsigned char v4_mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

int client_is_v4(const unsigned char ip[16])
{
    return memcmp(ip, v4_mapped, 12) == 0;
}

static int is_trusted(const blaze_limits *lim, const unsigned char ip[16])
{
    if (lim->trust_all)
        return 1;
    for (int i = 0; i < lim->ntrusted; i++) {
        const blaze_net *n = &lim->trusted[i];
        int bytes = n->prefix / 8, bits = n->prefix % 8;
        if (memcmp(n->addr, ip, (size_t)bytes) != 0)
            continue;
        if (bits == 0)
            return 1;
        unsigned char mask = (unsigned char)(0xff << (8 - bits));
        if ((n->addr[bytes] & mask) == (ip[bytes] & mask))
            return 1;
    }
    return 0;
}

/* The text form: IPv4 (also when mapped into IPv6) as a.b.c.d. */
static void ip_text(const unsigned char ip[16], char *out, size_t len)
{
    if (client_is_v4(ip))
        inet_ntop(AF_INET, ip + 12, out, (socklen_t)len);
    else
        inet_ntop(AF_INET6, ip, out, (socklen_t)len);
}

static int port_ok(const char *s, size_t n)     /* ":digits" */
{
    if (n < 2 || n > 6 || s[0] != ':')
        return 0;
    for (size_t i = 1; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

/* One address from a header: IPv4 or IPv6, bare or as a.b.c.d:port,
 * [v6] or [v6]:port, with optional whitespace around it. */
static int parse_ip(const char *s, size_t n, unsigned char out[16])
{
    while (n > 0 && (*s == ' ' || *s == '\t')) {
        s++;
        n--;
    }
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    char tmp[64];
    if (n == 0 || n >= sizeof(tmp))
        return BLAZE_ERR;
    if (s[0] == '[') {
        const char *close = memchr(s, ']', n);
        if (close == NULL)
            return BLAZE_ERR;
        size_t inner = (size_t)(close - s) - 1, rest = n - inner - 2;
        if (rest > 0 && !port_ok(close + 1, rest))
            return BLAZE_ERR;
        memcpy(tmp, s + 1, inner);
        tmp[inner] = '\0';
        return inet_pton(AF_INET6, tmp, out) == 1 ? BLAZE_OK : BLAZE_ERR;
    }
    memcpy(tmp, s, n);
    tmp[n] = '\0';
    if (inet_pton(AF_INET6, tmp, out) == 1)
        return BLAZE_OK;
    char *colon = memchr(tmp, ':', n);
    if (colon != NULL) {
        if (!port_ok(colon, n - (size_t)(colon - tmp)))
            return BLAZE_ERR;
        *colon = '\0';
    }
    memcpy(out, v4_mapped, 12);
    return inet_pton(AF_INET, tmp, out + 12) == 1 ? BLAZE_OK : BLAZE_ERR;
}

void client_peer(blaze_conn *c, const struct sockaddr *sa, int salen)
{
    if (sa->sa_family == AF_INET && salen >= (int)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        memcpy(c->peer_ip, v4_mapped, 12);
        memcpy(c->peer_ip + 12, &in->sin_addr, 4);
        inet_ntop(AF_INET, &in->sin_addr, c->remote_addr, sizeof(c->remote_addr));
        snprintf(c->remote_port, sizeof(c->remote_port), "%u", ntohs(in->sin_port));
        c->peer_trusted = (unsigned)is_trusted(&c->loop->lim, c->peer_ip);
    } else if (sa->sa_family == AF_INET6 && salen >= (int)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        memcpy(c->peer_ip, &in6->sin6_addr, 16);
        inet_ntop(AF_INET6, &in6->sin6_addr, c->remote_addr, sizeof(c->remote_addr));
        snprintf(c->remote_port, sizeof(c->remote_port), "%u", ntohs(in6->sin6_port));
        c->peer_trusted = (unsigned)is_trusted(&c->loop->lim, c->peer_ip);
    } else {
        c->is_unix = 1;
        c->peer_trusted = 1;
    }
}

static int name_is(const blaze_conn *c, const blaze_header *h, const char *lit, size_t n)
{
    return h->name.len == n && strncasecmp(c->buf + h->name.off, lit, n) == 0;
}

void client_resolve(blaze_conn *c)
{
    c->fwd = 0;
    if (!c->peer_trusted)
        return;
    const blaze_limits *lim = &c->loop->lim;
    unsigned char ip[16], entry[16];
    int found = 0, any_xff = 0;
    /* Repeated X-Forwarded-For headers are one list, in order: walk it from its end. */
    for (int i = c->nhdrs - 1; i >= 0; i--) {
        const blaze_header *h = &c->hdrs[i];
        if (!name_is(c, h, "x-forwarded-for", 15))
            continue;
        any_xff = 1;
        const char *v = c->buf + h->value.off;
        size_t end = h->value.len;
        for (;;) {
            size_t start = end;
            while (start > 0 && v[start - 1] != ',')
                start--;
            if (parse_ip(v + start, end - start, entry) != BLAZE_OK)
                goto done;
            memcpy(ip, entry, 16);
            found = 1;
            if (!is_trusted(lim, entry))
                goto done;
            if (start == 0)
                break;
            end = start - 1;
        }
    }
    if (!any_xff) {
        for (int i = 0; i < c->nhdrs; i++) {
            const blaze_header *h = &c->hdrs[i];
            if (name_is(c, h, "x-real-ip", 9)) {
                found = parse_ip(c->buf + h->value.off, h->value.len, ip) == BLAZE_OK;
                break;
            }
        }
    }
done:
    if (found) {
        c->fwd = 1;
        memcpy(c->fwd_ip, ip, 16);
        ip_text(ip, c->fwd_addr, sizeof(c->fwd_addr));
    }
}

const char *client_addr(const blaze_conn *c)
{
    return c->fwd ? c->fwd_addr : c->is_unix ? NULL : c->remote_addr;
}

const unsigned char *client_ip(const blaze_conn *c)
{
    return c->fwd ? c->fwd_ip : c->is_unix ? NULL : c->peer_ip;
}

/* blaze_loop_new: the loop keeps its own copy of forwarded_allow_ips. */
int client_copy_trusted(blaze_limits *lim, const blaze_limits *from)
{
    lim->trusted = NULL;
    lim->ntrusted = 0;
    if (from->ntrusted <= 0 || from->trusted == NULL)
        return BLAZE_OK;
    for (int i = 0; i < from->ntrusted; i++)
        if (from->trusted[i].prefix < 0 || from->trusted[i].prefix > 128)
            return BLAZE_ERR;
    blaze_net *t = malloc(sizeof(*t) * (size_t)from->ntrusted);
    if (t == NULL)
        return BLAZE_ERR;
    memcpy(t, from->trusted, sizeof(*t) * (size_t)from->ntrusted);
    lim->trusted = t;
    lim->ntrusted = from->ntrusted;
    return BLAZE_OK;
}
