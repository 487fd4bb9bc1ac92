"""Prometheus metrics and /healthz, served by the master.

The workers' C loops count into their shared-memory slots (blaze_slot,
csrc/blaze_stats.c); the master sums the slots of live workers with what
it folded in from workers that are gone, so counters never go backwards.
Master-side events (worker starts and exits, scaling, reloads) are kept
here.  prometheus-client renders them through a custom collector; a small
threaded HTTP server in the master answers /metrics, / and /healthz.
"""
import logging
import threading
import time

from . import __version__
from ._blaze import lib

log = logging.getLogger("blazewsgi.error")

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER")
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
LATENCY_LE = ("0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
              "1.0", "2.5", "5.0", "10.0", "+Inf")
EXIT_CAUSES = ("crash", "hung", "recycled", "retired", "stopped")
assert len(METHODS) == lib.BLAZE_METHODS and len(LATENCY_LE) == lib.BLAZE_LATENCY_BUCKETS


class Totals:
    """Worker counters as plain numbers: one slot's, or a sum."""
    __slots__ = ("requests", "bytes_in", "bytes_out", "parse_errors", "rate_limited", "tls_handshake_errors",
                 "cells", "latency", "latency_sum")

    def __init__(self):
        self.requests = self.bytes_in = self.bytes_out = self.parse_errors = self.rate_limited = 0
        self.tls_handshake_errors = 0
        self.cells = [[0] * len(CLASSES) for _ in METHODS]
        self.latency = [0] * len(LATENCY_LE)
        self.latency_sum = 0.0

    def add_slot(self, s):
        self.requests += s.requests
        self.bytes_in += s.bytes_in
        self.bytes_out += s.bytes_out
        self.parse_errors += s.parse_errors
        self.rate_limited += s.rate_limited
        self.tls_handshake_errors += s.tls_handshake_errors
        for m in range(len(METHODS)):
            row, src = self.cells[m], s.by_method_status[m]
            for k in range(len(CLASSES)):
                row[k] += src[k]
        for b in range(len(LATENCY_LE)):
            self.latency[b] += s.latency[b]
        self.latency_sum += s.latency_sum

    def add(self, other):
        for name in ("requests", "bytes_in", "bytes_out", "parse_errors", "rate_limited", "tls_handshake_errors",
                     "latency_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for m in range(len(METHODS)):
            for k in range(len(CLASSES)):
                self.cells[m][k] += other.cells[m][k]
        for b in range(len(LATENCY_LE)):
            self.latency[b] += other.latency[b]


class Metrics:
    """What the master knows, and the collector that renders it."""

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.folded = Totals()             # workers that are gone
        self.starts = 0
        self.exits = dict.fromkeys(EXIT_CAUSES, 0)
        self.scaling = {"up": 0, "down": 0}
        self.reloads = {"ok": 0, "failed": 0}
        self.generation = 0
        self.server = None
        # The HTTP thread sums slots while the main loop reaps and spawns: a
        # dead worker's counts move from its slot to `folded`, and a slot is
        # zeroed for a new worker, under this lock, so a scrape never sees a
        # worker twice or not at all.
        self.lock = threading.Lock()

    # ---- events, called by the arbiter ----
    def fold(self, slot):
        self.folded.add_slot(slot)

    def worker_exit(self, cause):
        self.exits[cause] += 1

    # ---- the collector ----
    def _live(self):
        a = self.arbiter
        with self.lock:
            workers = list(a.workers.values())
            total = Totals()
            total.add(self.folded)
            conns = in_flight = 0
            for w in workers:
                s = a.slots[w.slot]
                total.add_slot(s)
                conns += s.connections
                in_flight += s.in_flight
        return workers, total, conns, in_flight

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        workers, t, conns, in_flight = self._live()
        c = CounterMetricFamily("blazewsgi_requests", "Responses completed, by method and status class",
                                labels=("method", "status"))
        for m, name in enumerate(METHODS):
            for k, cls in enumerate(CLASSES):
                if t.cells[m][k] or name in ("GET", "POST"):
                    c.add_metric((name, cls), t.cells[m][k])
        yield c
        buckets, acc = [], 0
        for le, n in zip(LATENCY_LE, t.latency):
            acc += n
            buckets.append((le, acc))
        yield HistogramMetricFamily("blazewsgi_request_duration_seconds",
                                    "Time from a complete request head to the response queued",
                                    buckets=buckets, sum_value=t.latency_sum)
        yield CounterMetricFamily("blazewsgi_request_bytes", "Bytes received on client connections",
                                  value=t.bytes_in)
        yield CounterMetricFamily("blazewsgi_response_bytes", "Bytes sent on client connections",
                                  value=t.bytes_out)
        yield CounterMetricFamily("blazewsgi_parse_errors", "Requests the HTTP layer answered with an error",
                                  value=t.parse_errors)
        yield CounterMetricFamily("blazewsgi_rate_limited", "Requests refused by rate limiting",
                                  value=t.rate_limited)
        yield CounterMetricFamily("blazewsgi_tls_handshake_errors",
                                  "TLS handshakes that failed or did not finish within header_timeout",
                                  value=t.tls_handshake_errors)
        yield GaugeMetricFamily("blazewsgi_connections_open", "Open client connections", value=conns)
        yield GaugeMetricFamily("blazewsgi_requests_in_flight", "Requests handed to the app, not finished",
                                value=in_flight)
        yield GaugeMetricFamily("blazewsgi_workers", "Worker processes alive", value=len(workers))
        yield CounterMetricFamily("blazewsgi_worker_starts", "Worker processes started", value=self.starts)
        e = CounterMetricFamily("blazewsgi_worker_exits", "Worker processes that ended, by cause",
                                labels=("cause",))
        for cause in EXIT_CAUSES:
            e.add_metric((cause,), self.exits[cause])
        yield e
        sc = CounterMetricFamily("blazewsgi_scaling_events", "Dynamic scaling steps", labels=("direction",))
        for d in ("up", "down"):
            sc.add_metric((d,), self.scaling[d])
        yield sc
        r = CounterMetricFamily("blazewsgi_reloads", "HUP reloads, by result", labels=("result",))
        for res in ("ok", "failed"):
            r.add_metric((res,), self.reloads[res])
        yield r
        yield GaugeMetricFamily("blazewsgi_config_generation", "Successful reloads since start",
                                value=self.generation)
        b = GaugeMetricFamily("blazewsgi_build_info", "BlazeWSGI build", labels=("version",))
        b.add_metric((__version__,), 1)
        yield b

    def healthy(self):
        """A ready worker whose loop ticked lately (or whose app call is young)."""
        a = self.arbiter
        now = time.monotonic()
        for w in list(a.workers.values()):
            if not w.ready or w.retiring:
                continue
            s = a.slots[w.slot]
            if now - s.heartbeat < 5.0 or (s.busy_since and now - s.busy_since < max(a.cfg.timeout, 5.0)):
                return True
        return False

    # ---- the HTTP endpoint ----
    def serve(self, bind, port):
        # Imported here: only a master with metrics_port pays for prometheus-client (and
        # its workers, forked from it, for the pages).
        from prometheus_client import CollectorRegistry, generate_latest
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        metrics = self

        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "BlazeWSGI-metrics"

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path in ("/metrics", "/"):
                    body, status, ctype = generate_latest(registry), 200, "text/plain; version=0.0.4; charset=utf-8"
                elif path == "/healthz":
                    ok = metrics.healthy()
                    body, status, ctype = (b"ok\n" if ok else b"no live worker\n"), (200 if ok else 503), "text/plain"
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((bind, port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True).start()
        log.info("Metrics at http://%s:%d/metrics", bind, port)

    def close_in_child(self):
        """After fork, in a worker: drop the master's metrics socket."""
        if self.server is not None:
            self.server.socket.close()

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
