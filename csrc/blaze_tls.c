/* TLS: the SSL_CTX built from the ssl_* settings, and the TLS side of a
 * connection (handshake, reads, writes, close_notify).
 *
 * Strategy.  OpenSSL works on the connection's own non-blocking socket
 * (SSL_set_fd): no BIO pair, no extra copy.  blaze_conn.c keeps the state
 * machine (CONN_HANDSHAKE comes before CONN_HEAD); the functions here look
 * like the system calls they replace:
 *   tls_recv       like recv(2): n > 0, 0 at the end, -1 with errno
 *                  (EAGAIN: wait for the socket);
 *   tls_send       like writev(2) on an iovec: the bytes taken, -1 broken;
 *   tls_write_out  like evbuffer_write(3) on conn->out.
 * Partial writes are on, so SSL_write returns after each record, like a
 * short send(2).  After WANT_WRITE OpenSSL keeps an encrypted record and
 * must be called again with at least as many bytes, starting with the same
 * ones (ACCEPT_MOVING_WRITE_BUFFER: from any address).  Those bytes go to
 * conn->out, which only grows until they leave, and every write passes
 * min(queued, TLS_RECORD) bytes: never fewer than the record waiting.
 * Read-ahead is on: one read(2) takes what the socket has (a request's
 * record, pipelined ones) instead of a record header and then its body.
 * So OpenSSL may hold bytes the socket will not signal again: read_on
 * (blaze_conn.c) runs the read callback when tls_has_pending says so.
 *
 * SSL_CTX: each worker builds its own after fork (blaze_tls_new, called by
 * worker.py); the master builds and frees one at start-up and at every
 * reload, only to validate the settings, so a bad file is a start-up error
 * and a renewed certificate reaches the workers of the next reload.  The
 * session cache is per worker; the session ticket keys come from the master
 * (random per master process), so a ticket resumes on any worker, also
 * across reloads.
 */
#include "blaze.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

/* The most plaintext one SSL_write is given: one TLS record. */
#define TLS_RECORD 16384

struct blaze_tls {
    SSL_CTX *ctx;                             /* owned */
};

/* The reason of OpenSSL's last error, and an empty error queue after it. */
static const char *ssl_reason(void)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    ERR_clear_error();
    return r ? r : "unknown error";
}

/* Never prompt on a terminal: the password is ssl_password, or none. */
static int password_cb(char *buf, int size, int rwflag, void *userdata)
{
    const char *pw = userdata;
    (void)rwflag;
    if (pw == NULL || size <= 0)
        return -1;
    size_t n = strlen(pw);
    if (n > (size_t)size)
        return -1;
    memcpy(buf, pw, n);
    return (int)n;
}

/* ALPN: HTTP/1.1 is all we speak; a client offering only other protocols
 * goes on without ALPN (and gets HTTP/1.1 answers) rather than an alert. */
static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
{
    static const unsigned char ours[] = "\x08http/1.1";
    unsigned char *sel = NULL;
    (void)ssl;
    (void)arg;
    if (SSL_select_next_proto(&sel, outlen, ours, sizeof(ours) - 1, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); goto fail; } while (0)

blaze_tls *blaze_tls_new(const blaze_tls_config *cfg, char *err, size_t errlen)
{
    static const unsigned char sid_ctx[] = "blazewsgi";
    blaze_tls *tls = calloc(1, sizeof(*tls));
    STACK_OF(X509_NAME) *cas = NULL;
    ERR_clear_error();
    if (tls == NULL)
        FAIL("out of memory");
    if (cfg->certfile == NULL || cfg->keyfile == NULL)
        FAIL("ssl_certfile: ssl = true needs a certificate and its key");
    tls->ctx = SSL_CTX_new(TLS_server_method());
    if (tls->ctx == NULL)
        FAIL("cannot create an SSL_CTX (%s)", ssl_reason());
    SSL_CTX *ctx = tls->ctx;
    int min = cfg->min_version == 13 ? TLS1_3_VERSION : TLS1_2_VERSION;
    if (!SSL_CTX_set_min_proto_version(ctx, min))
        FAIL("ssl_min_version: not supported by this OpenSSL (%s)", ssl_reason());
    /* No renegotiation: a write never has to wait for the socket to be readable. */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                             SSL_OP_NO_COMPRESSION | SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                          SSL_MODE_RELEASE_BUFFERS);
    if (cfg->ciphers && cfg->ciphers[0] && !SSL_CTX_set_cipher_list(ctx, cfg->ciphers))
        FAIL("ssl_ciphers: '%s' selects no cipher (%s)", cfg->ciphers, ssl_reason());
    if (!SSL_CTX_use_certificate_chain_file(ctx, cfg->certfile))
        FAIL("ssl_certfile: %s: cannot load a PEM certificate chain (%s)", cfg->certfile, ssl_reason());
    SSL_CTX_set_default_passwd_cb(ctx, password_cb);
    SSL_CTX_set_default_passwd_cb_userdata(ctx, (void *)cfg->password);
    int key_ok = SSL_CTX_use_PrivateKey_file(ctx, cfg->keyfile, SSL_FILETYPE_PEM);
    SSL_CTX_set_default_passwd_cb_userdata(ctx, NULL);   /* the caller's string: not kept */
    if (!key_ok) {
        unsigned long e = ERR_peek_last_error();
        if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH) {
            ERR_clear_error();
            FAIL("ssl_keyfile: %s does not match the certificate in %s", cfg->keyfile, cfg->certfile);
        }
        FAIL("ssl_keyfile: %s: cannot load a PEM private key (%s%s)", cfg->keyfile, ssl_reason(),
             cfg->password ? "; is ssl_password right?" : "; if it is encrypted, set ssl_password");
    }
    if (!SSL_CTX_check_private_key(ctx)) {
        ERR_clear_error();
        FAIL("ssl_keyfile: %s does not match the certificate in %s", cfg->keyfile, cfg->certfile);
    }
    if (cfg->ca_certs && cfg->ca_certs[0]) {
        if (!SSL_CTX_load_verify_locations(ctx, cfg->ca_certs, NULL))
            FAIL("ssl_ca_certs: %s: cannot load PEM CA certificates (%s)", cfg->ca_certs, ssl_reason());
        cas = SSL_load_client_CA_file(cfg->ca_certs);
        if (cas == NULL)
            FAIL("ssl_ca_certs: %s: no CA certificate in it (%s)", cfg->ca_certs, ssl_reason());
        SSL_CTX_set_client_CA_list(ctx, cas);            /* takes cas */
        cas = NULL;
        /* With ssl_ca_certs a client certificate is asked for and checked;
         * ssl_verify_client makes it required. */
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (cfg->verify_client ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
                           NULL);
    } else if (cfg->verify_client) {
        FAIL("ssl_verify_client: needs ssl_ca_certs (the CAs client certificates are checked against)");
    }
    /* Resumption: a server-side session cache, and tickets. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
    if (!SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1))
        FAIL("cannot set the session id context (%s)", ssl_reason());
    if (cfg->ticket_keys &&
        SSL_CTX_set_tlsext_ticket_keys(ctx, (void *)cfg->ticket_keys, BLAZE_TLS_TICKET_KEYS) != 1)
        FAIL("cannot set the session ticket keys (%s)", ssl_reason());
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
    SSL_CTX_set_read_ahead(ctx, 1);      /* one read(2) per request, not two */
    return tls;
fail:
    if (cas)
        sk_X509_NAME_pop_free(cas, X509_NAME_free);
    blaze_tls_free(tls);
    return NULL;
}

void blaze_tls_free(blaze_tls *tls)
{
    if (tls == NULL)
        return;
    SSL_CTX_free(tls->ctx);
    free(tls);
}

/* ---- one connection ---- */

int tls_conn_init(blaze_conn *c, blaze_tls *tls)
{
    c->ssl = SSL_new(tls->ctx);
    if (c->ssl == NULL || !SSL_set_fd(c->ssl, c->fd)) {
        ERR_clear_error();
        return BLAZE_ERR;
    }
    SSL_set_accept_state(c->ssl);
    return BLAZE_OK;
}

void tls_conn_free(blaze_conn *c)
{
    if (c->ssl == NULL)
        return;
    tls_shutdown(c);
    SSL_free(c->ssl);
    c->ssl = NULL;
    free(c->tls_dn);
    c->tls_dn = NULL;
}

/* close_notify, once, if the session is sound; never waits for the peer's. */
void tls_shutdown(blaze_conn *c)
{
    if (c->tls_broken || !SSL_is_init_finished(c->ssl) || (SSL_get_shutdown(c->ssl) & SSL_SENT_SHUTDOWN))
        return;
    if (SSL_shutdown(c->ssl) < 0)
        ERR_clear_error();
}

/* The session failed: no close_notify, and a clean error queue for the next connection. */
static void tls_fail(blaze_conn *c)
{
    c->tls_broken = 1;
    ERR_clear_error();
}

/* Bytes OpenSSL holds: decrypted, or records read ahead from the socket
 * (possibly half a one: a read then just finds nothing and waits for the
 * socket, so callers must not loop on this without reading). */
int tls_has_pending(const blaze_conn *c)
{
    return SSL_has_pending(c->ssl);
}

/* The client certificate's subject (RFC 2253, as nginx's $ssl_client_s_dn), for the environ. */
static void note_client_dn(blaze_conn *c)
{
    X509 *peer = SSL_get0_peer_certificate(c->ssl);
    if (peer == NULL || SSL_get_verify_result(c->ssl) != X509_V_OK)
        return;
    BIO *mem = BIO_new(BIO_s_mem());
    if (mem == NULL)
        goto done;
    /* ESC_MSB (in RFC2253): non-ASCII bytes come out as \XX, so the value is ASCII. */
    if (X509_NAME_print_ex(mem, X509_get_subject_name(peer), 0, XN_FLAG_RFC2253) < 0)
        goto done;
    char *data;
    long n = BIO_get_mem_data(mem, &data);
    if (n <= 0)
        goto done;
    if (n > TLS_DN_MAX)
        n = TLS_DN_MAX;
    c->tls_dn = malloc((size_t)n + 1);
    if (c->tls_dn == NULL)
        goto done;
    memcpy(c->tls_dn, data, (size_t)n);
    c->tls_dn[n] = '\0';
    /* A NUL inside would cut the environ block: such a subject is not exposed. */
    if (strlen(c->tls_dn) != (size_t)n) {
        free(c->tls_dn);
        c->tls_dn = NULL;
        n = 0;
    }
    c->tls_dn_len = (size_t)n;
done:
    BIO_free(mem);
    ERR_clear_error();
}

/* A handshake that failed or stalled: counted and logged at debug.  A
 * connection closed before sending a byte (a port probe) is neither. */
void tls_handshake_failed(blaze_conn *c, const char *why)
{
    BIO *rbio = SSL_get_rbio(c->ssl);
    if (why == NULL && (rbio == NULL || BIO_number_read(rbio) == 0))
        return;
    stats_tls_handshake_error(c->loop);
    log_debug(c->loop, "TLS handshake with %s failed: %s", c->is_unix ? "local" : c->remote_addr,
              why ? why : "connection closed");
}

blaze_io tls_handshake(blaze_conn *c, int *want_write)
{
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        note_client_dn(c);
        return IO_DONE;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        *want_write = e == SSL_ERROR_WANT_WRITE;
        return IO_AGAIN;
    }
    char why[160];
    if (e == SSL_ERROR_SSL)
        snprintf(why, sizeof(why), "%s", ssl_reason());
    else if (e == SSL_ERROR_SYSCALL && errno != 0)
        snprintf(why, sizeof(why), "%s", strerror(errno));
    else
        why[0] = '\0';
    tls_fail(c);
    tls_handshake_failed(c, why[0] ? why : NULL);
    return IO_CLOSE;
}

ssize_t tls_recv(blaze_conn *c, char *buf, size_t len)
{
    int n = SSL_read(c->ssl, buf, len > INT_MAX ? INT_MAX : (int)len);
    if (n > 0)
        return n;
    switch (SSL_get_error(c->ssl, n)) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:   /* not with renegotiation off; the next read retries */
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_ZERO_RETURN:  /* close_notify, or EOF (SSL_OP_IGNORE_UNEXPECTED_EOF) */
        return 0;
    case SSL_ERROR_SYSCALL:
        tls_fail(c);
        if (errno == 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            errno = ECONNRESET;
        return -1;
    default:                     /* garbage, a bad record, an alert */
        tls_fail(c);
        errno = EPROTO;
        return -1;
    }
}

/* One SSL_write of at most a record: bytes taken, 0 (the socket is full), -1 broken. */
static int tls_write(blaze_conn *c, const void *p, size_t len)
{
    if (len > TLS_RECORD)
        len = TLS_RECORD;
    int w = SSL_write(c->ssl, p, (int)len);
    if (w > 0) {
        c->tls_want_read = 0;
        return w;
    }
    switch (SSL_get_error(c->ssl, w)) {
    case SSL_ERROR_WANT_WRITE:
        c->tls_want_read = 0;
        return 0;
    case SSL_ERROR_WANT_READ:
        c->tls_want_read = 1;
        return 0;
    default:
        tls_fail(c);
        return -1;
    }
}

ssize_t tls_send(blaze_conn *c, const struct iovec *iov, int n)
{
    char gather[TLS_RECORD];
    size_t done = 0, off = 0;
    int i = 0;
    while (i < n) {
        if (off == iov[i].iov_len) {
            i++;
            off = 0;
            continue;
        }
        const char *p = (const char *)iov[i].iov_base + off;
        size_t len = iov[i].iov_len - off;
        if (len < TLS_RECORD && i + 1 < n) {
            /* Small pieces (a head, chunk framing) share one record. */
            size_t g = 0, o = off;
            for (int j = i; j < n && g < TLS_RECORD; j++, o = 0) {
                size_t take = iov[j].iov_len - o;
                if (take > TLS_RECORD - g)
                    take = TLS_RECORD - g;
                memcpy(gather + g, (const char *)iov[j].iov_base + o, take);
                g += take;
            }
            p = gather;
            len = g;
        }
        int w = tls_write(c, p, len);
        if (w < 0)
            return -1;
        if (w == 0)
            break;
        done += (size_t)w;
        for (size_t k = (size_t)w; k > 0;) {     /* step over what was taken */
            size_t rest = iov[i].iov_len - off;
            if (k < rest) {
                off += k;
                k = 0;
            } else {
                k -= rest;
                i++;
                off = 0;
            }
        }
    }
    return (ssize_t)done;
}

int tls_write_out(blaze_conn *c)
{
    struct evbuffer *out = c->out;
    int total = 0;
    size_t len;
    while ((len = evbuffer_get_length(out)) > 0) {
        size_t n = len < TLS_RECORD ? len : TLS_RECORD;
        struct evbuffer_iovec v;
        const unsigned char *p;
        if (evbuffer_peek(out, (ev_ssize_t)n, NULL, &v, 1) >= 1 && v.iov_len >= n)
            p = v.iov_base;
        else
            p = evbuffer_pullup(out, (ev_ssize_t)n);   /* small chunks: one record, one copy */
        if (p == NULL)
            return -1;
        int w = tls_write(c, p, n);
        if (w < 0)
            return -1;
        if (w == 0)
            break;
        evbuffer_drain(out, (size_t)w);
        total += w;
    }
    return total;
}
