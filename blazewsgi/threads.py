"""The per-worker thread pool (threads > 1), for apps that wait on I/O.

The C loop keeps accepting, reading, parsing and writing on its own thread;
it takes the GIL only for short calls.  A complete request becomes a _Job
(blaze_py_request returns QUEUED) that one of N app threads runs.  What the
app returns goes back to the loop thread, which sends it with the same code
as threads=1 (wsgi.py):

    loop: blaze_py_request -> submit ----> queue ----> thread: app(environ, ...)
    loop: blaze_py_done/resume (send) <--- ready <---- thread: first chunks, or all
          ...output drained: hand back --------------> thread: next chunks

A streamed body crosses in batches of about HIGH_WATER bytes: the thread
gathers a batch, hands it to the loop and waits until the loop has it on its
way, so memory per request stays bounded.  The loop is woken through an
eventfd, once per burst of ready jobs.

Ownership: a job is with the thread (THREAD) or with the loop (LOOP); the
owner changes only under the pool's lock.  When the client leaves
(blaze_py_abort, from the loop), whoever owns the job at that moment closes
the app's iterable, as PEP 3333 asks, and a job not started yet is dropped
without calling the app.

Backpressure is C's: it hands Python at most two requests per thread (one
running, one waiting); further complete requests are parked unread and the
worker stops accepting (csrc/blaze_loop.c).
"""
import collections
import logging
import os
import queue
import threading

from . import wsgi
from ._blaze import ffi, lib

log = logging.getLogger("blazewsgi.error")

# What the app returned, as the loop sends it.
CHUNKS, SIMPLE, GENERAL = 0, 1, 2
# Iterators over data that already exists (Django's HttpResponse iterates its
# list): taken whole, one hand-off to the loop instead of one per chunk.
_MATERIALIZED = (type(iter([])), type(iter(())))


def _check(chunk):
    if type(chunk) is not bytes:
        wsgi._not_bytes(chunk)
    return chunk


class _Gone(Exception):
    """The client left; args[0]: the thread must close the app's iterable."""


class _Job:
    """One request in the pool.  Fields below `lock` are shared with the loop
    and change only under the pool's lock."""
    __slots__ = ("conn", "conn_id", "environ", "r", "kind", "committed",
                 # shared:
                 "chunks", "size", "ended", "error", "gone", "loop_waiting", "go")

    def __init__(self, conn, conn_id, environ, r):
        self.conn = conn
        self.conn_id = conn_id
        self.environ = environ
        self.r = r
        self.kind = CHUNKS
        self.committed = False            # a body chunk exists: the headers are final
        self.chunks = []                  # produced, not yet taken by the loop
        self.size = 0
        self.ended = False                # the thread is done with the app (or error is set)
        self.error = None
        self.gone = False
        self.loop_waiting = True          # C waits in CONN_THREAD for this job to be ready
        self.go = None                    # the thread's Event while output backs up


class _ThreadResponse(wsgi._Response):
    """start_response and write() as an app thread sees them."""
    __slots__ = ("job", "pool")

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None and self.job.committed:
            try:
                raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        return super().start_response(status, headers, exc_info)

    def write(self, data):
        if type(data) is not bytes:
            raise TypeError(f"write() takes bytes, not {type(data).__name__}")
        if data:
            self.pool.produce(self.job, data)


class Pool:
    def __init__(self, nthreads):
        self.nthreads = nthreads
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.jobs = {}                    # conn_id -> _Job (loop thread only)
        self.queue = queue.SimpleQueue()
        self.ready = collections.deque()  # jobs the loop should look at (under lock)
        self.lock = threading.Lock()
        self.notified = False             # the eventfd was written and the loop hasn't looked yet
        self.spare = []                   # finished responses, reused (loop thread only)
        self._local = threading.local()
        self.threads = [threading.Thread(target=self._work, name=f"blazewsgi-app-{i}", daemon=True)
                        for i in range(nthreads)]
        for t in self.threads:
            t.start()

    # ---- loop thread ----

    def submit(self, conn, req, environ):
        r = self.spare.pop() if self.spare else _ThreadResponse()
        r.conn = conn
        r.status = r.headers = None
        r.sent = False
        r.pool = self
        if "CONTENT_LENGTH" in environ:
            environ["wsgi.input"] = wsgi._body_input(r, req)   # a copy: C's buffer is not ours
        job = r.job = _Job(conn, req.conn_id, environ, r)
        self.jobs[req.conn_id] = job
        self.queue.put(job)
        return lib.BLAZE_PY_QUEUED

    def send_ready(self, conns, rcs, most):
        """blaze_py_done: send the output of up to `most` ready jobs; for each, its
        connection and what C does next (as from blaze_py_resume)."""
        with self.lock:
            self.notified = False
            batch = []
            while self.ready and len(batch) < most:
                job = self.ready.popleft()
                if not job.gone:
                    batch.append(job)
        for i, job in enumerate(batch):
            conns[i] = job.conn
            rcs[i] = self.resume(job.conn, job)
        return len(batch)

    def resume(self, conn, job):
        """Send what the thread produced; DONE, STREAM (wait for the socket), QUEUED
        (wait for the thread) or ERROR.  Also called by C when a STREAM drained."""
        r = job.r
        r.conn = conn
        try:
            while True:
                with self.lock:
                    chunks, job.chunks, job.size = job.chunks, [], 0
                    ended, error = job.ended, job.error
                if job.kind == SIMPLE:
                    rc = wsgi._send_simple(r, conn, r.result[0])
                    break
                if job.kind == GENERAL:        # file_wrapper: the loop's own code (sendfile)
                    rc = r.pump() if r.it is not None else wsgi._run_general(r, r.result)
                    break
                pending = 0
                for chunk in chunks:
                    if not r.sent:
                        r._start(-1)
                    pending = lib.blaze_resp_write(conn, chunk, len(chunk))
                    if pending < 0:
                        raise wsgi.ClientGone("client disconnected")
                if error is not None:
                    raise error
                if ended:
                    if not r.sent:
                        r._start(0)
                    if lib.blaze_resp_finish(conn) != 0:
                        raise wsgi.ClientGone("client disconnected")
                    rc = wsgi.DONE
                    break
                if pending > wsgi.HIGH_WATER:
                    return wsgi.STREAM     # C calls resume again once the socket drained
                with self.lock:
                    if job.chunks or job.ended:
                        continue           # more came while we sent
                    job.loop_waiting = True
                    go, job.go = job.go, None
                if go is not None:
                    go.set()               # the thread may produce again
                return lib.BLAZE_PY_QUEUED
        except Exception as exc:
            del self.jobs[job.conn_id]
            return wsgi._fail(r, exc)
        if rc == wsgi.STREAM:
            return rc
        del self.jobs[job.conn_id]
        r.close()
        r.job = None
        self.spare.append(r)
        return rc

    def abort(self, conn_id):
        """The client left.  The app's iterable is closed by the thread while it still
        iterates it, else here."""
        job = self.jobs.pop(conn_id, None)
        if job is None:
            return False
        with self.lock:
            job.gone = True
            mine = job.ended
            go, job.go = job.go, None
        if go is not None:
            go.set()
        if mine:
            job.r.close()
        return True

    # ---- app threads ----

    def _push(self, job):
        """Under the lock: queue the job for the loop if C waits for it; True: write the eventfd."""
        if not job.loop_waiting:
            return False
        job.loop_waiting = False
        self.ready.append(job)
        notify, self.notified = not self.notified, True
        return notify

    def produce(self, job, chunk):
        """A body chunk: the loop sends it now (PEP 3333: no block is held back);
        wait while HIGH_WATER bytes are still on their way."""
        job.committed = True
        go = None
        with self.lock:
            if job.gone:
                raise _Gone(True)
            job.chunks.append(chunk)
            job.size += len(chunk)
            notify = self._push(job)
            if job.size >= wsgi.HIGH_WATER:
                go = job.go = self._local.go
                go.clear()
        if notify:
            os.eventfd_write(self.wake_fd, 1)
        if go is not None:
            go.wait()
            if job.gone:
                raise _Gone(True)

    def _end(self, job, error=None):
        with self.lock:
            job.ended = True
            job.error = error
            if job.gone:
                return False
            notify = self._push(job)
        if notify:
            os.eventfd_write(self.wake_fd, 1)
        return True

    def _work(self):
        self._local.go = threading.Event()
        while True:
            job = self.queue.get()
            r = job.r
            if job.gone:
                r.close()                   # the client left while it waited: the app is not called
                continue
            error = None
            try:
                result = r.result = wsgi._app(job.environ, r.start)
                if not job.committed and type(result) is list and len(result) == 1 \
                        and type(result[0]) is bytes:
                    job.kind = SIMPLE
                elif not job.committed and type(result) is wsgi.FileWrapper:
                    job.kind = GENERAL      # sendfile from the loop
                else:
                    it = iter(result)
                    if type(it) in _MATERIALIZED and not job.committed:
                        data = b"".join(_check(c) for c in it)
                        if data:                # goes with the end: one hand-off
                            job.committed = True
                            with self.lock:
                                job.chunks.append(data)
                                job.size += len(data)
                        it = ()
                    for chunk in it:
                        if _check(chunk):
                            self.produce(job, chunk)
            except _Gone:
                r.close()
                continue
            except Exception as exc:
                error = exc
            except BaseException as exc:    # SystemExit & co. in a thread: log, answer 500
                error = RuntimeError(f"the application raised {type(exc).__name__}")
            if not self._end(job, error):
                r.close()                   # the client left before the loop took it
