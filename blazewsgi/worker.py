"""A worker process, after fork: load the app, hand the loop its sockets, run.

Signals in a worker belong to the C loop (see csrc/blaze_loop.c): SIGTERM
is a graceful stop, SIGINT/SIGQUIT a fast one.  Python's handlers inherited
from the master are reset here, before the app is imported.

Exit codes: 0 normal stop, 1 setup failure, WORKER_BOOT_ERROR when the
application cannot be imported (the master then stops instead of forking
forever).
"""
import faulthandler
import logging
import os
import signal
import sys
import traceback

from . import loader, logs, threads, tls, wsgi
from ._blaze import ffi, lib

WORKER_BOOT_ERROR = 3
# The master sends this to a stuck worker: faulthandler dumps every thread's
# Python stack to the log, from inside the signal handler, even while the
# app's code is running.
DUMP_SIGNAL = signal.SIGUSR2
MASTER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
                  signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2)

log = logging.getLogger("blazewsgi.error")


def _trusted(cfg):
    """forwarded_allow_ips as blaze_net entries (IPv4 as ::ffff:a.b.c.d/96+n)."""
    import ipaddress
    if cfg.forwarded_allow_ips == ["*"]:
        return ffi.NULL, 0, 1
    nets = [ipaddress.ip_network(x, strict=False) for x in cfg.forwarded_allow_ips]
    arr = ffi.new("blaze_net[]", len(nets))
    for i, n in enumerate(nets):
        if n.version == 4:
            addr = bytes(10) + b"\xff\xff" + n.network_address.packed
            prefix = 96 + n.prefixlen
        else:
            addr, prefix = n.network_address.packed, n.prefixlen
        arr[i].addr = addr
        arr[i].prefix = prefix
    return arr, len(nets), 0


def _limits(cfg, master_pid, slot, max_requests, rate_table=ffi.NULL, tls_ctx=ffi.NULL):
    tmp = ffi.new("char[]", cfg.tmp_dir.encode())
    trusted, ntrusted, trust_all = _trusted(cfg)
    log_dir = ffi.new("char[]", cfg.log_dir.encode()) if cfg.log_dir else ffi.NULL
    lim = ffi.new("blaze_limits *", {
        "max_connections": cfg.max_connections,
        "head_buffer_size": cfg.head_buffer_size,
        "limit_request_line": cfg.limit_request_line,
        "limit_request_fields": cfg.limit_request_fields,
        "limit_request_field_size": cfg.limit_request_field_size,
        "header_timeout": cfg.header_timeout,
        "keepalive_timeout": cfg.keepalive_timeout,
        "io_timeout": cfg.io_timeout,
        "graceful_timeout": cfg.graceful_timeout,
        "max_body_size": cfg.max_body_size,
        "body_buffer_size": cfg.body_buffer_size,
        "tmp_dir": tmp,
        "parent_pid": master_pid,
        "max_requests": max_requests,
        "slot": slot,
        "access_log": 1 if cfg.access_log else 0,
        "log_dir": log_dir,
        "clock_offset": logs.clock_offset(),
        "rate_limit": cfg.rate_limit if rate_table != ffi.NULL else 0,
        "rate_table": rate_table,
        "trusted": trusted,
        "ntrusted": ntrusted,
        "trust_all": trust_all,
        "tls": tls_ctx,
        "log_debug": 1 if cfg.log_level == "debug" else 0,
    })
    # the strings and the array must outlive blaze_loop_new (it copies them)
    return lim, (tmp, log_dir, trusted)


def _log_fd():
    """The descriptor the server log goes to (the daily file or stderr)."""
    from .logs import DailyFileHandler
    for h in logging.getLogger("blazewsgi").handlers:
        if isinstance(h, DailyFileHandler):
            return h.fileno()
    return sys.stderr.fileno()


def run(cfg, listeners, ready_fd, master_pid, slot=ffi.NULL, max_requests=0, rate_table=ffi.NULL,
        all_slots=(ffi.NULL, 0)):
    """Serve until stopped; returns the process exit code."""
    signal.set_wakeup_fd(-1)
    for sig in MASTER_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # Until the C loop installs its handlers: SIGHUP (retire) and SIGUSR1 (reopen logs)
    # are only sent to ready workers.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    faulthandler.register(DUMP_SIGNAL, file=_log_fd(), all_threads=True)
    try:
        app = loader.load_app(cfg.wsgi_path)
    except BaseException:
        if cfg.log_dir:      # the log goes to a file: show the operator the traceback too
            sys.stderr.write(f"blazewsgi: cannot import the application {cfg.wsgi_path!r}:\n")
            sys.stderr.write(traceback.format_exc())
        log.error("Cannot import the application %r:\n%s", cfg.wsgi_path, traceback.format_exc().rstrip())
        return WORKER_BOOT_ERROR
    use_tls = [tls.uses_tls(cfg, lst.kind) for lst in listeners]
    wsgi.setup(app, listeners, multiprocess=cfg.max_workers > 1, threads=cfg.threads,
                         tls=use_tls)
    # Our own SSL_CTX, built after fork from the files as they are now (a
    # reload's workers load a renewed certificate).  It outlives the loop.
    tls_ctx = ffi.NULL
    if any(use_tls):
        tls_ctx, why = tls.new_context(cfg)
        if tls_ctx == ffi.NULL:
            log.error("Cannot set up TLS: %s", why)
            return 1
    lim, tmp = _limits(cfg, master_pid, slot, max_requests, rate_table, tls_ctx)
    lim.threads = cfg.threads
    lim.slots, lim.nslots = all_slots       # read by the loop to balance accepts across workers
    err = ffi.new("char[256]")
    loop = lib.blaze_loop_new(lim, err, 256)
    try:
        if loop == ffi.NULL:
            log.error("Cannot start the event loop: %s", ffi.string(err).decode())
            return 1
        for lst, on in zip(listeners, use_tls):
            if lib.blaze_loop_listen(loop, lst.fileno(), 1 if on else 0, err, 256) < 0:
                log.error("Cannot listen on %s: %s", lst.name, ffi.string(err).decode())
                return 1
        wsgi.use_loop(loop)
        if cfg.threads > 1:
            threads.start(loop, cfg.threads)
        os.write(ready_fd, b"%d\n" % os.getpid())
        return lib.blaze_loop_run(loop)
    finally:
        lib.blaze_loop_free(loop)
        if tls_ctx != ffi.NULL:
            lib.blaze_tls_free(tls_ctx)
