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
(one running, one queued); further complete requests are parked unread
and the worker stops accepting (csrc/blaze_loop.c).  A client that leaves
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
    job = ffi.new("blaze_job *")
    req = ffi.addressof(job[0], "req")
    serve, resume, take = wsgi._serve, wsgi.blaze_py_resume, lib.blaze_pool_next
    done, rc = ffi.NULL, 0
    while take(loop, index, done, rc, job):
        done = conn = job.conn
        try:
            if job.kind == _RESUME:
                rc = resume(conn, req.conn_id)
            else:
                rc = serve(conn, req)
        except BaseException as exc:      # SystemExit & co. from the app: log, answer 500
            log.error("Error handling request (%s in an app thread)", type(exc).__name__, exc_info=exc)
            rc = wsgi.ERROR


def start(loop, nthreads):
    """Start the app threads for this worker's loop (after blaze_loop_new)."""
    threads = [threading.Thread(target=_work, args=(loop, i), name=f"blazewsgi-app-{i}", daemon=True)
               for i in range(nthreads)]
    for t in threads:
        t.start()
    return threads
