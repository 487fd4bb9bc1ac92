"""The master: owns the sockets, forks workers, reaps and replaces them.

Signal handlers only enqueue (gunicorn's pattern): the main loop wakes on
signal.set_wakeup_fd's pipe and dispatches to handle_<signal>.
  TERM        graceful stop: workers finish in-flight requests
              (bounded by graceful_timeout), then exit 0.
  INT, QUIT   fast stop.
  HUP         zero-downtime reload: re-read the config file, start a new
              generation of workers that import the app anew, and stop the
              old ones gracefully once the new ones are ready.  The sockets
              stay open in the master throughout; a config or import error
              leaves the old workers serving.
  USR2        upgrade: re-exec a new master that inherits the sockets; once
              its workers are ready it stops this one (gracefully).
  TTIN, TTOU  one worker more / fewer, within [min_workers, max_workers].
  USR1        reopen log files.
  CHLD        reap; a worker that died is replaced at once (with backoff
              if workers keep dying).

Workers report readiness by writing their pid to a pipe.  A worker that
exits with WORKER_BOOT_ERROR before any worker was ever ready means the
app cannot be imported: the master stops with exit code 3 instead of
forking forever.
"""
import collections
import errno
import fcntl
import logging
import mmap
import os
import random
import select
import signal
import socket
import sys
import time
import traceback

from . import logs, worker
from ._blaze import ffi

log = logging.getLogger("blazewsgi.error")

EXIT_APP_IMPORT = 3
HANDLED = ("TERM", "INT", "QUIT", "HUP", "TTIN", "TTOU", "USR1", "USR2", "CHLD")
MAX_SLOTS = 2 * 512 + 8           # workers of two generations at most max_workers (<= 512) each
INHERIT_ENV = "BLAZEWSGI_INHERIT_FDS"     # USR2: sockets handed to the new master
PREDECESSOR_ENV = "BLAZEWSGI_PREDECESSOR"  # USR2: the old master, stopped once we are ready


class Worker:
    __slots__ = ("pid", "age", "ready", "retiring", "slot", "max_requests", "hung", "gen")

    def __init__(self, pid, age, slot, max_requests, gen):
        self.gen = gen                    # the reload generation it belongs to
        self.pid = pid
        self.age = age
        self.ready = False
        self.retiring = False
        self.slot = slot                  # index into the shared blaze_slot array
        self.max_requests = max_requests  # 0: never recycled
        self.hung = False


def _describe(code):
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _owns_pid_file(path, pid):
    try:
        with open(path) as f:
            return f.read().strip() == str(pid)
    except OSError:
        return False


def _nonblocking_pipe():
    r, w = os.pipe2(os.O_CLOEXEC)
    for fd in (r, w):
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return r, w


def notify(msg):
    """sd_notify(3): tell systemd about READY / RELOADING / STOPPING (no-op without NOTIFY_SOCKET)."""
    path = NOTIFY_SOCKET
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(msg.encode(), path)
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", NOTIFY_SOCKET, e)


# Read once and removed from the environment, so workers and the app don't see it.
NOTIFY_SOCKET = os.environ.pop("NOTIFY_SOCKET", None)


class Arbiter:
    def __init__(self, cfg, listeners, reload_config=None):
        self.cfg = cfg
        self.listeners = listeners
        self.reload_config = reload_config      # () -> Config, raises ConfigError
        self.gen = 0                            # bumped by every reload
        self.reloading = False
        self.successor = None                   # USR2: pid of the new master
        self.handed_over = False                # the sockets now belong to the successor
        self.samples = collections.deque()      # (time, total requests) for the scaling rate
        self.last_scale = time.monotonic()
        self.workers = {}                 # pid -> Worker
        self.target = cfg.min_workers
        self.age = 0
        self.booted = False               # some worker has been ready once
        self.signals = collections.deque()
        self.deaths = collections.deque(maxlen=10)
        self.spawn_after = 0.0
        self.pid = os.getpid()
        # Shared memory the workers' C loops write (heartbeat, time in the app,
        # request count) and the master reads without asking them.  Twice
        # max_workers slots: a HUP runs old and new workers side by side.
        self.nslots = MAX_SLOTS
        self.slot_mem = mmap.mmap(-1, self.nslots * ffi.sizeof("blaze_slot"))
        self.slots = ffi.from_buffer("blaze_slot[]", self.slot_mem)
        # The per-client rate-limit table (csrc/blaze_stats.c), shared by every
        # worker of every generation: a reload does not forgive anyone.  Pages
        # are only touched (and resident) when rate_limit is on.
        self.rate_mem = mmap.mmap(-1, ffi.sizeof("blaze_rate_table"))
        self.rate_table = ffi.from_buffer("blaze_rate_table *", self.rate_mem)
        self.rate_table.seed = int.from_bytes(os.urandom(8), "little")
        from .metrics import Metrics
        self.metrics = Metrics(self)

    # ---- setup ----
    def _install_signals(self):
        self.wake_r, self.wake_w = _nonblocking_pipe()
        self.ready_r, self.ready_w = _nonblocking_pipe()
        os.set_inheritable(self.ready_w, True)
        signal.set_wakeup_fd(self.wake_w)
        for name in HANDLED:
            signal.signal(getattr(signal, "SIG" + name), self._enqueue)

    def _enqueue(self, signum, frame):
        self.signals.append(signum)       # nothing else: the loop does the work

    # ---- main loop ----
    def run(self):
        try:
            self._install_signals()
            if self.cfg.pid_file:
                with open(self.cfg.pid_file, "w") as f:
                    f.write(f"{self.pid}\n")
            os.environ["BLAZEWSGI_WORKERS"] = str(self.target)
            if self.cfg.metrics_port:
                os.environ["BLAZEWSGI_METRICS_PORT"] = str(self.cfg.metrics_port)
                try:
                    self.metrics.serve(self.cfg.metrics_bind, self.cfg.metrics_port)
                except OSError as e:
                    log.error("metrics_port: cannot listen on %s:%d: %s", self.cfg.metrics_bind,
                              self.cfg.metrics_port, e.strerror)
                    return 1
            for lst in self.listeners:
                log.info("Listening at %s", lst.name)
            log.info("Master %d starting %d worker(s) for %s", self.pid, self.target, self.cfg.wsgi_path)
            self.manage()
            while True:
                self._sleep(1.0)
                rc = self._dispatch_signals()
                if rc is not None:
                    return rc
                rc = self.manage()
                if rc is not None:
                    return rc
        finally:
            self.metrics.stop()
            self._cleanup()

    def _sleep(self, timeout):
        try:
            ready, _, _ = select.select([self.wake_r, self.ready_r], [], [], timeout)
        except InterruptedError:
            return
        if self.wake_r in ready:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        if self.ready_r in ready:
            self._read_ready()

    def _read_ready(self):
        try:
            data = os.read(self.ready_r, 4096)
        except BlockingIOError:
            return
        first = not self.booted
        for line in data.split():
            w = self.workers.get(int(line))
            if w is not None and not w.ready:
                w.ready = True
                self.booted = True
                log.info("Worker %d ready", w.pid)
        if first and self.booted:
            notify(f"READY=1\nMAINPID={self.pid}")
            self._stop_predecessor()
        self._retire_replaced()

    def _dispatch_signals(self):
        while self.signals:
            signum = self.signals.popleft()
            name = signal.Signals(signum).name[3:].lower()
            rc = getattr(self, "handle_" + name)()
            if rc is not None:
                return rc
        return None

    def manage(self):
        rc = self.reap()
        if rc is not None:
            return rc
        self.check_health()
        self.autoscale()
        self.spawn_missing()
        return None

    def autoscale(self):
        """The scaling rule (README "Dynamic scaling"): the server-wide request rate over
        scale_window seconds, from the workers' shared counters; one step at a time; up needs
        scale_window s since the last step, down scale_down_delay s.  Thresholds low < high
        give the hysteresis."""
        cfg = self.cfg
        now = time.monotonic()
        with self.metrics.lock:
            total = self.metrics.folded.requests + sum(self.slots[w.slot].requests
                                                       for w in self.workers.values())
        if self.samples and now - self.samples[-1][0] < 0.5:
            return
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= cfg.scale_window:
            self.samples.popleft()
        t0, n0 = self.samples[0]
        if now - t0 < cfg.scale_window * 0.9 or self.reloading or cfg.min_workers == cfg.max_workers:
            return
        rate = (total - n0) / (now - t0)
        since = now - self.last_scale
        if rate > cfg.scale_threshold_high and self.target < cfg.max_workers and since >= cfg.scale_window:
            self.target += 1
            self.last_scale = now
            self.metrics.scaling["up"] += 1
            log.info("Scaling up to %d workers: %.1f req/s over the last %.1f s > scale_threshold_high %g",
                     self.target, rate, now - t0, cfg.scale_threshold_high)
        elif rate < cfg.scale_threshold_low and self.target > cfg.min_workers and since >= cfg.scale_down_delay:
            self.target -= 1
            self.last_scale = now
            self.metrics.scaling["down"] += 1
            log.info("Scaling down to %d workers: %.1f req/s over the last %.1f s < scale_threshold_low %g",
                     self.target, rate, now - t0, cfg.scale_threshold_low)
            self._retire_extra()

    def check_health(self):
        """A worker stuck in one request past `timeout` (no bytes sent meanwhile), or whose
        loop stopped ticking, gets its Python stack dumped to the log, then is killed."""
        timeout = self.cfg.timeout
        if not timeout:
            return
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.hung or not w.ready:
                continue
            s = self.slots[w.slot]
            busy, beat = s.busy_since, s.heartbeat
            if busy and now - busy > timeout:
                why = f"in one request for {now - busy:.1f} s without sending (timeout {timeout:g} s)"
            elif not busy and beat and now - beat > max(timeout, 10.0):
                why = f"its loop has not ticked for {now - beat:.1f} s"
            else:
                continue
            log.error("Worker %d is stuck: %s; dumping its Python stack and replacing it", w.pid, why)
            w.hung = True
            w.retiring = True
            try:
                os.kill(w.pid, worker.DUMP_SIGNAL)    # faulthandler writes every thread's stack
                time.sleep(0.3)
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ---- signal handlers (run from the loop, never from the signal) ----
    def handle_chld(self):
        return None               # manage() reaps after every wakeup

    def handle_term(self):
        if self.successor is not None and _alive(self.successor):
            self.handed_over = True    # the new master owns the sockets and the pid file now
            log.info("SIGTERM: graceful stop; the sockets stay with the new master %d", self.successor)
        else:
            log.info("SIGTERM: graceful stop")
        notify("STOPPING=1")
        # Handed over: the service goes on, so workers retire (SIGHUP) and keep idle
        # keep-alive connections until their next response instead of cutting them.
        return self.stop(graceful=True, retire=self.handed_over)

    def handle_int(self):
        log.info("SIGINT: fast stop")
        return self.stop(graceful=False)

    def handle_quit(self):
        log.info("SIGQUIT: fast stop")
        return self.stop(graceful=False)

    def handle_hup(self):
        if self.reloading:
            log.info("SIGHUP: a reload is already under way")
            return None
        notify("RELOADING=1")
        if self.reload_config is not None:
            from .config import ConfigError
            try:
                new = self.reload_config()
            except ConfigError as e:
                self.metrics.reloads["failed"] += 1
                log.error("Reload aborted, the config has an error (old workers keep serving): %s", e)
                notify("READY=1")
                return None
            if new.sockets != self.cfg.sockets:
                log.warning("Reload: sockets changed in %s; a restart (or USR2) is needed to apply that",
                            new.source)
                new._values["sockets"] = self.cfg.sockets
            self.cfg = new
            self.target = max(new.min_workers, min(self.target, new.max_workers))
        self.gen += 1
        self.reloading = True
        log.info("Reloading: starting %d new worker(s); the old ones stop when the new ones are ready",
                 self.target)
        self.spawn_missing()
        return None

    def handle_usr2(self):
        if self.successor is not None:
            log.info("SIGUSR2: an upgrade is already under way (new master %d)", self.successor)
            return None
        fds = ",".join(str(lst.fileno()) for lst in self.listeners)
        env = dict(os.environ, **{INHERIT_ENV: fds, PREDECESSOR_ENV: str(self.pid)})
        if NOTIFY_SOCKET:
            env["NOTIFY_SOCKET"] = NOTIFY_SOCKET
        argv = [sys.executable, "-m", "blazewsgi"] + sys.argv[1:]
        pid = os.fork()
        if pid == 0:
            try:
                for lst in self.listeners:
                    os.set_inheritable(lst.fileno(), True)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(1)
        self.successor = pid
        log.info("SIGUSR2: new master %d starting with the same sockets; this one stops when it is ready", pid)
        return None

    def _stop_predecessor(self):
        pred = os.environ.pop(PREDECESSOR_ENV, None)
        if pred:
            log.info("Ready: stopping the old master %s", pred)
            try:
                os.kill(int(pred), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass

    def handle_ttin(self):
        if self.target < self.cfg.max_workers:
            self.target += 1
            log.info("SIGTTIN: %d worker(s)", self.target)
        else:
            log.info("SIGTTIN: already at max_workers (%d)", self.cfg.max_workers)
        return None

    def handle_ttou(self):
        if self.target > self.cfg.min_workers:
            self.target -= 1
            log.info("SIGTTOU: %d worker(s)", self.target)
            self._retire_extra()
        else:
            log.info("SIGTTOU: already at min_workers (%d)", self.cfg.min_workers)
        return None

    def handle_usr1(self):
        logs.reopen()
        for w in list(self.workers.values()):
            if not w.ready:
                continue                            # a booting worker opens its files when it starts
            try:
                os.kill(w.pid, signal.SIGUSR1)     # their C loops flush and reopen the access log
            except ProcessLookupError:
                pass
        log.info("SIGUSR1: log files reopened")
        return None

    # ---- workers ----
    def _current(self):
        return [w for w in self.workers.values() if w.gen == self.gen and not w.retiring]

    def spawn_missing(self):
        now = time.monotonic()
        while len(self._current()) < self.target and now >= self.spawn_after:
            self.spawn()

    def _free_slot(self):
        used = {w.slot for w in self.workers.values()}
        return next(i for i in range(self.nslots) if i not in used)

    def spawn(self):
        self.age += 1
        with self.metrics.lock:
            slot = self._free_slot()
            ffi.memmove(ffi.addressof(self.slots, slot), bytes(ffi.sizeof("blaze_slot")),
                        ffi.sizeof("blaze_slot"))
        max_requests = 0
        if self.cfg.max_requests:
            max_requests = self.cfg.max_requests + random.randint(0, self.cfg.max_requests_jitter)
        pid = os.fork()
        if pid:
            with self.metrics.lock:
                self.metrics.starts += 1
                self.slots[slot].pid = pid
                self.workers[pid] = Worker(pid, self.age, slot, max_requests, self.gen)
            return
        code = 1
        try:
            os.close(self.wake_r)
            os.close(self.ready_r)
            self.metrics.close_in_child()
            code = worker.run(self.cfg, self.listeners, self.ready_w, self.pid,
                              ffi.addressof(self.slots, slot), max_requests, self.rate_table,
                              # slots are taken lowest first: two generations of
                              # max_workers cover the live ones, and an accept scans no more
                              (self.slots, min(self.nslots, 2 * self.cfg.max_workers)))
        except BaseException:
            traceback.print_exc()
        finally:
            for h in logging.getLogger("blazewsgi").handlers:
                try:
                    h.flush()
                except Exception:
                    pass
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)

    def _retire(self, w):
        """Stop a worker gracefully while the server goes on: SIGHUP makes a ready worker's
        loop keep idle keep-alive connections until their next response (no reset races);
        a worker still booting just gets SIGTERM."""
        w.retiring = True
        try:
            os.kill(w.pid, signal.SIGHUP if w.ready else signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _retire_replaced(self):
        """After a HUP: once as many new workers are ready as needed, stop the old ones."""
        if not self.reloading:
            return
        if sum(1 for w in self._current() if w.ready) < self.target:
            return
        old = [w for w in self.workers.values() if w.gen < self.gen and not w.retiring]
        for w in old:
            self._retire(w)
        self.reloading = False
        self.metrics.reloads["ok"] += 1
        self.metrics.generation += 1
        log.info("Reload complete: %d new worker(s) serving, %d old one(s) stopping gracefully",
                 len(self._current()), len(old))
        notify("READY=1")

    def _reload_failed(self, why):
        """The new generation cannot start: the old one goes on serving."""
        log.error("Reload failed: %s; the old workers keep serving", why)
        self.metrics.reloads["failed"] += 1
        for w in list(self.workers.values()):
            if w.gen == self.gen and not w.retiring:
                self._retire(w)
        self.gen -= 1
        self.reloading = False
        notify("READY=1")

    def _retire_extra(self):
        extra = sorted(self._current(), key=lambda w: w.age, reverse=True)[: len(self._current()) - self.target]
        for w in extra:
            self._retire(w)

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            if pid == self.successor:
                log.error("The new master %d exited (%s); this one goes on serving", pid,
                          _describe(os.waitstatus_to_exitcode(status)))
                self.successor = None
                continue
            with self.metrics.lock:
                w = self.workers.pop(pid, None)
                if w is not None:
                    self.metrics.fold(self.slots[w.slot])
            if w is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if w.hung:
                self.metrics.worker_exit("hung")
                log.info("Worker %d (stuck) killed; a new one replaces it", pid)
                continue
            if code == 0 and not w.retiring and w.max_requests and \
                    self.slots[w.slot].requests >= w.max_requests:
                self.metrics.worker_exit("recycled")
                log.info("Worker %d recycled after %d requests (max_requests)", pid, self.slots[w.slot].requests)
                continue
            if w.retiring and code in (0, -signal.SIGTERM):
                self.metrics.worker_exit("retired")
                log.info("Worker %d stopped", pid)   # SIGTERM before its loop ran: still our stop
                continue
            self.metrics.worker_exit("crash")
            if self.reloading and w.gen == self.gen and not w.ready:
                self._reload_failed(f"a new worker {_describe(code)} while loading the application"
                                    if code != worker.WORKER_BOOT_ERROR else
                                    "the new application cannot be imported (traceback above)")
                continue
            if not w.ready and not self.booted:
                # No worker ever got ready: loading the app fails (an exception,
                # or a crash inside it).  Stop rather than fork forever.
                why = ("could not import it" if code == worker.WORKER_BOOT_ERROR else
                       f"died while loading it ({_describe(code)})")
                log.error("The application %r cannot be imported: worker %d %s; stopping",
                          self.cfg.wsgi_path, pid, why)
                self.stop(graceful=False)
                return EXIT_APP_IMPORT
            if code == worker.WORKER_BOOT_ERROR and not w.ready:
                log.error("Worker %d could not import the application; retrying with backoff", pid)
            else:
                log.warning("Worker %d %s", pid, _describe(code))
            self._note_death()

    def _note_death(self):
        now = time.monotonic()
        self.deaths.append(now)
        recent = [t for t in self.deaths if now - t < 10.0]
        if len(recent) >= 5:
            delay = min(2 ** (len(recent) - 4), 30)
            self.spawn_after = now + delay
            log.warning("Workers keep dying (%d in 10 s): next start in %d s", len(recent), delay)

    def stop(self, graceful, retire=False):
        sig = signal.SIGTERM if graceful else signal.SIGQUIT
        limit = self.cfg.graceful_timeout + 2.0 if graceful else 3.0   # then SIGKILL
        for w in list(self.workers.values()):
            try:
                os.kill(w.pid, signal.SIGHUP if retire and w.ready else sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + limit
        while self.workers and time.monotonic() < deadline:
            self._sleep(0.1)
            for signum in list(self.signals):
                if graceful and signum in (signal.SIGINT, signal.SIGQUIT):
                    log.info("Fast stop requested during graceful stop")
                    return self.stop(graceful=False)
            self.signals.clear()
            self._reap_quietly()
        for w in list(self.workers.values()):
            log.warning("Worker %d did not stop in time; killing it", w.pid)
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while self.workers:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self._forget(pid)
        log.info("Master %d stopped", self.pid)
        return 0

    def _forget(self, pid):
        """A worker that ended during a stop: keep its counts."""
        with self.metrics.lock:
            w = self.workers.pop(pid, None)
            if w is not None:
                self.metrics.fold(self.slots[w.slot])
                self.metrics.worker_exit("stopped")

    def _reap_quietly(self):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                return
            if pid == 0:
                return
            self._forget(pid)

    def _cleanup(self):
        for lst in self.listeners:
            lst.close(unlink=not self.handed_over)
        if self.cfg.pid_file and _owns_pid_file(self.cfg.pid_file, self.pid):
            try:
                os.unlink(self.cfg.pid_file)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("Cannot remove pid_file %s: %s", self.cfg.pid_file, e)
