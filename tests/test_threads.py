"""threads > 1: the per-worker thread pool (blazewsgi/threads.py, CONN_PARKED/CONN_THREAD in C).

Concurrency of waiting views on one worker, order on pipelined connections,
disconnects while a request waits or runs (the iterable is still closed),
backpressure (a bounded number of requests with Python; the rest wait
unread), reloads and stops that wait for requests in threads, the hung-request
timeout in a thread, streaming/write()/file_wrapper/errors through threads, a
real Django project querying SQLite from many threads, and the core HTTP and
WSGI suites run again with threads=8.
"""
import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from apps_threads import pattern
from conftest import ROOT, read_response, read_to_close, wait_until

APP = "apps_threads:app"


def make(server_factory, tmp_path, threads=8, workers=1, own_dir=None, **extra):
    events = os.path.join(tmp_path, f"events-{own_dir}.txt")
    srv = server_factory(APP, workers=workers, extra={"threads": threads, **extra},
                         env={"BLAZE_TEST_EVENTS": events}, own_dir=own_dir)
    srv.events = events
    return srv


def events(srv):
    try:
        with open(srv.events) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def get(srv, path, timeout=20, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def test_concurrent_waiting_requests_overlap_on_one_worker(server_factory, tmp_path):
    """64 requests to a view sleeping 200 ms, 64 threads, one worker: serially they would take
    12.8 s; in threads they overlap."""
    srv = make(server_factory, tmp_path, threads=64).start()
    (pid,) = srv.worker_pids()
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(64) as ex:
        results = list(ex.map(lambda i: get(srv, "/sleep?s=0.2"), range(64)))
    took = time.monotonic() - t0
    assert [r[0] for r in results] == [200] * 64
    names = {r[2] for r in results}
    assert len(names) > 16, f"64 waiting requests ran in only {len(names)} threads"
    assert all(n.startswith(b"blazewsgi-app-") for n in names), names
    assert took < 64 * 0.2 / 4, f"64 x 200 ms took {took:.1f} s on one worker with 64 threads"
    assert srv.worker_pids() == [pid]


def test_multithread_flag(server_factory, tmp_path):
    srv = make(server_factory, tmp_path, threads=4).start()
    env = json.loads(get(srv, "/env")[2])
    assert env["wsgi.multithread"] is True
    one = make(server_factory, tmp_path, threads=1, own_dir="one").start()
    assert json.loads(get(one, "/env")[2])["wsgi.multithread"] is False


def test_app_threads_do_not_preempt_the_loop(server_factory, tmp_path):
    """App threads run SCHED_BATCH (csrc/blaze_pool.c): woken, they wait for the loop to sleep."""
    srv = make(server_factory, tmp_path, threads=4).start()
    status, _, body = get(srv, "/sched")
    policy, name = body.decode().split()
    assert status == 200 and name.startswith("blazewsgi-app-")
    assert int(policy) == os.SCHED_BATCH


def test_a_fast_view_that_blocks_does_not_strand_the_queue(server_factory, tmp_path):
    """Fast views run on one awake thread; when one of them blocks, the request queued behind
    it gets another thread within about a millisecond (blaze_pool.c: pool_check), not when
    the blocked one returns."""
    srv = make(server_factory, tmp_path, threads=4).start()
    for _ in range(50):                  # the pool learns that jobs are fast
        assert get(srv, "/")[0] == 200
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        slow = ex.submit(get, srv, "/sleep?s=2")
        time.sleep(0.2)                  # the awake thread is now inside the 2 s call
        t0 = time.monotonic()
        status, _, body = get(srv, "/")
        took = time.monotonic() - t0
        assert slow.result()[0] == 200
    assert status == 200 and body == b"hello"
    assert took < 1.0, f"the second request waited {took:.2f} s behind the blocked one"


def test_pipelined_requests_keep_their_order(server_factory, tmp_path):
    """A slow request first, fast ones behind it on one connection: answers in request order."""
    srv = make(server_factory, tmp_path).start()
    with srv.connect() as s:
        s.sendall(b"GET /sleep?s=0.3 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /env?i=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /gen?n=3&kb=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        r1, r2, r3, r4 = (read_response(s) for _ in range(4))
    assert r1[0] == 200 and r1[2].startswith(b"blazewsgi-app-")
    assert json.loads(r2[2])["PATH_INFO"] == "/env"
    assert r3[2] == pattern(1024) * 3
    assert r4[2] == b"hello"


def test_disconnect_while_running_closes_the_iterable(server_factory, tmp_path):
    srv = make(server_factory, tmp_path, threads=2).start()
    release, mark = os.path.join(tmp_path, "release"), os.path.join(tmp_path, "started")
    s = srv.connect()
    s.sendall(f"GET /wait?f={release}&mark={mark} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    wait_until(lambda: os.path.exists(mark), 10, what="the request to reach the app")
    s.close()                                   # the client leaves while the app runs
    open(release, "w").close()                  # the app returns its iterable afterwards
    wait_until(lambda: "closed /wait" in events(srv), 10, what="close() of the abandoned iterable")
    assert get(srv, "/hello")[2] == b"hello"    # the worker is fine
    assert "Error" not in srv.output().split("Worker")[-1], srv.output()


def test_disconnect_while_waiting_for_a_thread_skips_the_app(server_factory, tmp_path):
    """threads=1: one request runs, one may wait with Python, a third waits parked in C.
    Clients of the waiting ones leave: their app calls never happen."""
    srv = make(server_factory, tmp_path, threads=1).start()
    assert json.loads(get(srv, "/env")[2])["wsgi.multithread"] is False   # threads=1 is the loop
    srv2 = make(server_factory, tmp_path, threads=2, own_dir="two").start()
    release, mark = os.path.join(tmp_path, "release2"), os.path.join(tmp_path, "started2")
    busy = []
    for i in range(2):                          # both threads busy
        s = srv2.connect()
        s.sendall(f"GET /wait?f={release}&mark={mark}{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        busy.append(s)
    for i in range(2):
        wait_until(lambda: os.path.exists(f"{mark}{i}"), 10, what="both threads to be busy")
    waiting = []
    for i in range(3):                          # 2 wait with Python, 1 parked in C
        s = srv2.connect()
        s.sendall(f"GET /env?waiting={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        waiting.append(s)
    time.sleep(0.3)                             # let them arrive (the assertion below is on the app)
    for s in waiting:
        s.close()
    time.sleep(0.3)
    open(release, "w").close()
    for s in busy:
        status, _, body = read_response(s)
        assert status == 200 and body == b"one,two"
        s.close()
    assert get(srv2, "/hello")[2] == b"hello"
    calls = [e for e in events(srv2) if e.startswith("called /env")]
    assert calls == [], f"the app ran for clients that had left: {calls}"


def test_parked_client_that_sends_its_next_request_gets_both_answers(server_factory, tmp_path):
    """threads=2, the pool full (2 running, 2 waiting with Python): on two keep-alive connections
    (reading on), a request waits in line.  One client sends its next request meanwhile (reading
    goes off then), the other leaves (seen while parked: its app call never happens).  Both
    answers come, in order."""
    srv = make(server_factory, tmp_path, threads=2).start()
    release, mark = os.path.join(tmp_path, "release"), os.path.join(tmp_path, "started")
    parked, leaving = srv.connect(), srv.connect()
    for s in (parked, leaving):                 # served once: their reads are on from now
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[2] == b"hello"
    busy = []
    for i in range(4):                          # 2 threads busy, 2 more jobs wait with Python
        s = srv.connect()
        s.sendall(f"GET /wait?f={release}&mark={mark}{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        busy.append(s)
        if i < 2:
            wait_until(lambda: os.path.exists(f"{mark}{i}"), 10, what="a thread to take the request")
    time.sleep(0.3)                             # pacing: the last two reach the pool before the next ones
    parked.sendall(b"GET /env?parked=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    leaving.sendall(b"GET /env?leaving=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)                             # pacing: both wait in line (asserted below, on the app)
    parked.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    leaving.close()
    time.sleep(0.3)
    open(release, "w").close()
    for s in busy:
        assert read_response(s)[0] == 200
        s.close()
    answers = [read_response(parked) for _ in range(2)]
    parked.close()
    assert [a[0] for a in answers] == [200, 200]
    assert json.loads(answers[0][2])["PATH_INFO"] == "/env" and answers[1][2] == b"hello"
    calls = [e for e in events(srv) if e.startswith("called /env")]
    assert len(calls) == 1, f"the app ran for a client that had left: {calls}"


def test_backpressure_bounds_requests_with_python(server_factory, tmp_path):
    """threads=2: at most 4 requests are with Python (in flight); the other 8 wait unread, and
    all 12 are answered."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with socket.socket() as hold:
        hold.bind(("127.0.0.1", 0))
        mport = hold.getsockname()[1]
    srv = make(server_factory, tmp_path, threads=2, metrics_port=mport).start()

    def in_flight():
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        for fam in text_string_to_metric_families(text):
            if fam.name == "blazewsgi_requests_in_flight":
                return fam.samples[0].value
    seen = []
    with concurrent.futures.ThreadPoolExecutor(12) as ex:
        futs = [ex.submit(get, srv, f"/sleep?s=0.4&i={i}") for i in range(12)]
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen.append(in_flight())
            time.sleep(0.05)
        results = [f.result() for f in futs]
    assert [r[0] for r in results] == [200] * 12
    assert max(seen) <= 4, f"in flight with Python: {seen}"
    assert max(seen) >= 2, f"the pool never filled: {seen}"


def test_a_new_client_is_served_while_the_pool_is_full(server_factory, tmp_path):
    """threads=2 (4 requests in the pool), 10 keep-alive clients asking without pause: requests
    always wait in line.  A client that connects now still gets its turn, behind the requests already
    waiting, instead of waiting unaccepted for as long as the others keep asking."""
    srv = make(server_factory, tmp_path, threads=2).start()
    stop = threading.Event()

    def hammer():
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
        n = 0
        while not stop.is_set():
            c.request("GET", "/sleep?s=0.05")
            r = c.getresponse()
            assert r.status == 200
            r.read()
            n += 1
        c.close()
        return n

    with concurrent.futures.ThreadPoolExecutor(10) as ex:
        futs = [ex.submit(hammer) for _ in range(10)]
        try:
            time.sleep(0.5)              # the pool is full and requests wait in line
            t0 = time.monotonic()
            status, _, _ = get(srv, "/sleep?s=0.05", timeout=5)
            took = time.monotonic() - t0
        finally:
            stop.set()
        counts = [f.result() for f in futs]
    assert status == 200
    assert min(counts) >= 3, counts
    # in line behind at most 10 others, 2 at a time: about 6 x 50 ms
    assert took < 1.5, f"a new client waited {took:.2f} s while the others kept the pool full"


def test_streaming_write_file_wrapper_and_errors(server_factory, tmp_path):
    srv = make(server_factory, tmp_path, threads=4).start()
    status, headers, body = get(srv, "/gen?n=160&kb=64")        # 10 MiB through the batches
    assert status == 200 and len(body) == 160 * 65536
    assert hashlib.sha256(body).digest() == hashlib.sha256(pattern(65536) * 160).digest()
    assert headers.get("Transfer-Encoding") == "chunked"
    wait_until(lambda: "closed /gen" in events(srv), 5, what="close() after a streamed response")
    status, _, body = get(srv, "/write?n=300")
    assert status == 200 and body == pattern(1024) * 300
    status, headers, body = get(srv, "/file?size=300000")
    assert status == 200 and body == pattern(300000) and headers["Content-Length"] == "300000"
    status, _, body = get(srv, "/raise")
    assert status == 500
    with srv.connect() as s:                                    # headers out, then the app fails
        s.sendall(b"GET /raise-after HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_to_close(s)
    assert data.startswith(b"HTTP/1.1 200 OK") and b"first" in data and b"never" not in data
    assert not data.endswith(b"0\r\n\r\n"), "a failed body must not end like a complete one"
    wait_until(lambda: "closed /raise-after" in events(srv), 5, what="close() after an error")
    out = srv.output()
    assert "the app fails before start_response" in out and "the app fails mid-body" in out, out
    big = os.urandom(3 * 1024 * 1024)
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    c.request("POST", "/echo", body=big)
    r = c.getresponse()
    assert r.status == 200 and r.read() == big
    c.close()


def test_streamed_block_is_sent_before_the_app_makes_the_next(server_factory, tmp_path):
    """PEP 3333: a yielded block is not held back while the app works on the next one."""
    srv = make(server_factory, tmp_path, threads=4).start()
    go = tmp_path / "go"
    with srv.connect() as s:
        s.settimeout(10)
        s.sendall(f"GET /tick?f={go} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"first" not in data:
            chunk = s.recv(65536)      # times out if "first" waits for "second"
            assert chunk, data
            data += chunk
        assert b"second" not in data
        go.write_text("go")
        while not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    assert b"second" in data


def test_reload_and_stop_wait_for_requests_in_threads(server_factory, tmp_path):
    srv = make(server_factory, tmp_path, threads=8, workers=2).start()
    old = srv.worker_pids()
    with concurrent.futures.ThreadPoolExecutor(10) as ex:
        futs = [ex.submit(get, srv, f"/sleep?s=1&i={i}") for i in range(10)]
        time.sleep(0.3)                            # the requests are in threads now
        srv.send(signal.SIGHUP)
        results = [f.result() for f in futs]
    assert [r[0] for r in results] == [200] * 10, results
    wait_until(lambda: not set(srv.worker_pids()) & set(old), 15, what="the old workers to leave")
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(get, srv, f"/sleep?s=1&j={i}") for i in range(6)]
        time.sleep(0.3)
        assert srv.stop() == 0
        results = [f.result() for f in futs]
    assert [r[0] for r in results] == [200] * 6, results


def test_hung_request_in_a_thread_is_dumped_and_replaced(server_factory, tmp_path):
    srv = make(server_factory, tmp_path, threads=4, timeout=1).start()
    (old,) = srv.worker_pids()
    with srv.connect(timeout=20) as s:
        s.sendall(b"GET /sleep?s=30 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100) == b""                  # the worker was killed under it
    new = wait_until(lambda: [p for p in srv.worker_pids() if p != old], 10, what="a new worker")
    assert get(srv, "/hello")[2] == b"hello"
    out = srv.output()
    assert re.search(rf"Worker {old} is stuck", out), out
    assert "Thread 0x" in out and out.count("File ") >= 2, "every thread's stack is dumped:\n" + out
    assert "in app" in out, out
    assert new


DJANGO_VIEWS = '''
import threading
from django.db import connection
from django.http import JsonResponse


_seen = {}      # thread name -> the DB-API connection objects it used (kept alive: ids stay unique)


def query(request):
    with connection.cursor() as c:
        c.execute("SELECT COUNT(*) FROM django_migrations")
        n = c.fetchone()[0]
    me = threading.current_thread().name
    _seen.setdefault(me, []).append(connection.connection)
    return JsonResponse({"migrations": n, "thread": me, "conn": id(connection.connection)})
'''
DJANGO_URLS = '''
from django.urls import path
from . import views
urlpatterns = [path("q", views.query)]
'''


def test_django_queries_sqlite_from_many_threads(server_factory, tmp_path):
    django_admin = os.path.join(os.path.dirname(sys.executable), "django-admin")
    project = os.path.join(tmp_path, "project")
    os.mkdir(project)
    subprocess.run([django_admin, "startproject", "mysite", project], check=True, capture_output=True)
    pkg = os.path.join(project, "mysite")
    with open(os.path.join(pkg, "settings.py")) as f:
        settings = f.read()
    settings = settings.replace("ALLOWED_HOSTS = []", "ALLOWED_HOSTS = ['*']")
    settings += "\nDATABASES['default']['CONN_MAX_AGE'] = 600\n"      # persistent, per thread
    with open(os.path.join(pkg, "settings.py"), "w") as f:
        f.write(settings)
    with open(os.path.join(pkg, "views.py"), "w") as f:
        f.write(DJANGO_VIEWS)
    with open(os.path.join(pkg, "urls.py"), "w") as f:
        f.write(DJANGO_URLS)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=project, check=True,
                   capture_output=True)
    srv = server_factory(os.path.join(pkg, "wsgi.py"), extra={"threads": 16}, own_dir="dj").start()
    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(lambda i: get(srv, "/q"), range(200)))
    assert [r[0] for r in results] == [200] * 200, [r for r in results if r[0] != 200][:2]
    data = [json.loads(r[2]) for r in results]
    assert len({d["migrations"] for d in data}) == 1 and data[0]["migrations"] > 5
    threads = {d["thread"] for d in data}
    assert len(threads) > 1, "the queries all ran in one thread"
    # as under gunicorn gthread: one connection per thread, kept across requests (CONN_MAX_AGE)
    conns = {}
    for d in data:
        conns.setdefault(d["thread"], set()).add(d["conn"])
    assert all(len(c) == 1 for c in conns.values()), f"a thread reconnected despite CONN_MAX_AGE: {conns}"
    assert len({c for s in conns.values() for c in s}) == len(threads), "threads shared a connection"
    assert "Error" not in srv.output(), srv.output()[-3000:]


CORE_SUITES = ["tests/test_wsgi.py", "tests/test_http11.py", "tests/test_requests_corpus.py",
               "tests/test_limits.py", "tests/test_tls.py", "tests/test_environ_memo.py"]


def test_core_suites_pass_with_threads():
    """The WSGI, HTTP/1.1, request-corpus, limits, TLS and remembered-environ
    suites again, every server with threads=8."""
    env = dict(os.environ, BLAZE_TEST_THREADS="8")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_SUITES],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-4000:]
    assert proc.returncode == 0, tail
    assert re.search(r"\d+ passed", tail) and "skipped" not in tail, tail
