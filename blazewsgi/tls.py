"""The ssl_* settings handed to C (csrc/blaze_tls.c), where the SSL_CTX lives.

Python never touches a TLS byte: the master builds one SSL_CTX only to
validate the settings (at start-up and at every SIGHUP re-read), so a
missing file, a key that does not match its certificate or a cipher list
that selects nothing is a one-line configuration error (exit code 2).
Each worker builds its own SSL_CTX after fork from the same settings: the
workers of a reload load the renewed certificate.  The session ticket keys
are drawn once per master and inherited, so a ticket resumes on any worker.
"""
import os

from ._blaze import ffi, lib

# Drawn when the master imports this module (before any fork): shared by its workers.
TICKET_KEYS = os.urandom(lib.BLAZE_TLS_TICKET_KEYS)


def uses_tls(cfg, listener_kind):
    """ssl=true covers every TCP listener; Unix sockets only with ssl_unix."""
    return bool(cfg.ssl) and (listener_kind == "tcp" or bool(cfg.ssl_unix))


def _config(cfg):
    """A blaze_tls_config from cfg's ssl_* settings, and the C strings it points to
    (they must outlive the call)."""
    keep = []

    def cstr(v):
        if not v:
            return ffi.NULL
        s = ffi.new("char[]", v.encode())
        keep.append(s)
        return s

    keys = ffi.new("unsigned char[]", TICKET_KEYS)
    keep.append(keys)
    c = ffi.new("blaze_tls_config *", {
        "certfile": cstr(cfg.ssl_certfile),
        "keyfile": cstr(cfg.ssl_keyfile),
        "password": cstr(cfg.ssl_password),
        "ca_certs": cstr(cfg.ssl_ca_certs),
        "verify_client": 1 if cfg.ssl_verify_client else 0,
        "ciphers": cstr(cfg.ssl_ciphers),
        "min_version": 13 if cfg.ssl_min_version == "tlsv1.3" else 12,
        "ticket_keys": keys,
    })
    return c, keep


def new_context(cfg):
    """(blaze_tls *, None) or (NULL, "setting: file: what is wrong")."""
    c, keep = _config(cfg)
    err = ffi.new("char[512]")
    tls = lib.blaze_tls_new(c, err, 512)
    del keep
    if tls == ffi.NULL:
        return ffi.NULL, ffi.string(err).decode("utf-8", "replace")
    return tls, None


def check(cfg):
    """None if an SSL_CTX can be built from cfg's settings, else the reason."""
    tls, why = new_context(cfg)
    if tls != ffi.NULL:
        lib.blaze_tls_free(tls)
    return why
