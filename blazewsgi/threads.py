"""The per-worker thread pool (threads > 1), for apps that wait on I/O.

The C loop keeps accepting, reading, parsing and writing on its own thread
and never takes the GIL for a threaded request: it queues the complete
request in C (csrc/blaze_pool.c).  Each app thread makes one call into C
per request, blaze_pool_next, which cffi runs without the GIL: it hands
back the connection the thread has just served and waits for the next.
The thread then runs the same code as threads = 1 (wsgi._serve, or
wsgi.blaze_py_resume for a stream whose output drained); what that code
frames lands in the connection's buffer, and the loop writes it.

    loop: parse -> C queue -> thread: blaze_pool_next -> wsgi._serve -> app
    loop: write <- C done list <- thread: blaze_pool_next(done=conn, rc)

A streamed body comes back to the loop after about HIGH_WATER bytes (rc
STREAM); once they are written the loop queues the connection again and
a thread goes on with the iterator, so no thread waits on a slow client.

Backpressure is C's: at most two requests per thread are in the pool
(one running, one queued); further complete requests are parked unread,
first come first served (csrc/blaze_loop.c).  A client that leaves
while its request is queued is dropped without calling the app; one that
leaves while a thread has it makes the response's writes fail, and the
app's iterable is closed as with threads = 1.
"""
import logging
import threading

from . import wsgi
from ._blaze import ffi, lib

log = logging.getLogger("blazewsgi.error")

_RESUME = lib.BLAZE_JOB_RESUME


def _work(loop, index):
    lib.blaze_pool_thread_init()         # SCHED_BATCH, 1 us timer slack (csrc/blaze_pool.c)
    job = ffi.new("blaze_job *")
    req = ffi.addressof(job[0], "req")
    serve, resume, take, reply = wsgi._serve, wsgi.blaze_py_resume, lib.blaze_pool_next, lib.blaze_pool_reply
    conn, rc = ffi.NULL, 0
    while True:
        got = take(loop, index, conn, rc, job)
        while got > 0:
            conn = job.conn
            try:
                out = resume(conn, req.conn_id) if job.kind == _RESUME else serve(conn, req)
            except BaseException as exc:  # SystemExit & co. from the app: log, answer 500
                log.error("Error handling request (%s in an app thread)", type(exc).__name__, exc_info=exc)
                out = wsgi.ERROR
            if type(out) is int:
                rc = out
                break                     # handed back with take()
            # A one-item response: framed, handed back and the next job taken
            # in one call into C, so one GIL release instead of two.
            r, head, hl, nh, body = out
            got = reply(loop, index, conn, head, hl, nh, body, len(body), job)
            if got < 0:                   # refused (invalid headers, or the client left)
                rc = wsgi._fail_refused(r)          # in this thread: blaze_resp_error is ours
                break
            wsgi._finish(r)
        else:
            return                        # the loop is gone


def start(loop, nthreads):
    """Start the app threads for this worker's loop (after blaze_loop_new)."""
    threads = [threading.Thread(target=_work, args=(loop, i), name=f"blazewsgi-app-{i}", daemon=True)
               for i in range(nthreads)]
    for t in threads:
        t.start()
    return threads
