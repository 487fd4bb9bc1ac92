"""A real Django project behind a real nginx, over two Unix sockets.

The project is created with django-admin at test time, served by BlazeWSGI
from its wsgi.py *file* (the server puts the project root on sys.path), and
nginx proxies to both sockets through one upstream.  Everything runs once
per module: Django project, server (2 workers) and nginx.
"""
import http.client
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import Server, free_port, start_nginx, stop_nginx

DJANGO_ADMIN = os.path.join(os.path.dirname(sys.executable), "django-admin")
MiB = 1024 * 1024

VIEWS = '''
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt


def hello(request):
    return HttpResponse("Hello")


@csrf_exempt
def upload(request):
    if request.method != "POST":
        return HttpResponse(status=405)
    return HttpResponse(str(len(request.body)), content_type="text/plain")
'''

URLS = '''
from django.urls import path

from . import views

urlpatterns = [
    path("hello/", views.hello),
    path("upload/", views.upload),
]
'''

NGINX_CONF = '''
user root;
worker_processes 1;
error_log {tmp}/nginx-error.log info;
events {{ worker_connections 128; }}
http {{
    log_format up '$request $status $upstream_addr';
    access_log {tmp}/nginx-access.log up;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 10m;
    default_type application/octet-stream;

    upstream blaze {{
        server unix:{sock_a};
        server unix:{sock_b};
        keepalive 4;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        location / {{
            proxy_pass http://blaze;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_next_upstream off;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("django"))
    project = os.path.join(tmp, "project")
    os.mkdir(project)
    out = subprocess.run([DJANGO_ADMIN, "startproject", "mysite", project], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    pkg = os.path.join(project, "mysite")
    settings_py = os.path.join(pkg, "settings.py")
    with open(settings_py) as f:
        settings = f.read()
    settings, n1 = re.subn(r"^DEBUG = True$", "DEBUG = False", settings, flags=re.M)
    settings, n2 = re.subn(r"^ALLOWED_HOSTS = \[\]$", "ALLOWED_HOSTS = ['*']", settings, flags=re.M)
    assert n1 == 1 and n2 == 1, "unexpected settings.py layout"
    with open(settings_py, "w") as f:
        f.write(settings)
    with open(os.path.join(pkg, "views.py"), "w") as f:
        f.write(VIEWS)
    with open(os.path.join(pkg, "urls.py"), "w") as f:
        f.write(URLS)

    sockdir = tempfile.mkdtemp(prefix="bzd-", dir="/tmp")     # short paths for AF_UNIX
    sock_a = os.path.join(sockdir, "a.sock")
    sock_b = os.path.join(sockdir, "b.sock")
    srvdir = os.path.join(tmp, "server")
    os.mkdir(srvdir)
    # the project root is NOT on PYTHONPATH: the server must find it from wsgi_path
    server = Server(srvdir, os.path.join(pkg, "wsgi.py"), workers=2, bind=[sock_a, sock_b],
                    extra={"socket_mode": "0666"})
    nginx = None
    try:
        server.start()
        port = free_port()
        ngx = os.path.join(tmp, "nginx")
        os.mkdir(ngx)
        nginx = start_nginx(ngx, NGINX_CONF.format(tmp=ngx, sock_a=sock_a, sock_b=sock_b, port=port), port)
        yield {"server": server, "port": port, "sock_a": sock_a, "sock_b": sock_b, "project": project,
               "nginx_dir": ngx}
    finally:
        if nginx is not None:
            stop_nginx(nginx)
        try:
            server.stop()
        except AssertionError:
            pass
        if server.proc is not None and server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
        shutil.rmtree(sockdir, ignore_errors=True)


def curl(*args):
    """curl; returns (status, headers dict lower-cased, body bytes)."""
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "-D", "-", "-o", "-", *args], capture_output=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    raw = out.stdout
    # -D - writes the head(s) first; a 100 Continue head may precede the final one
    while True:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status != 100:
            break
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, raw


def test_get_view_through_nginx_with_curl(stack):
    status, headers, body = curl(f"http://127.0.0.1:{stack['port']}/hello/")
    assert status == 200
    assert body == b"Hello"
    assert headers["content-type"].startswith("text/html")
    assert headers["x-upstream"] in (f"unix:{stack['sock_a']}", f"unix:{stack['sock_b']}")


def test_get_view_through_nginx_with_http_client_keepalive(stack):
    c = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=20)
    try:
        for _ in range(5):
            c.request("GET", "/hello/")
            r = c.getresponse()
            assert r.status == 200
            assert r.read() == b"Hello"
    finally:
        c.close()


def test_post_1mib_through_nginx(stack, tmp_path):
    data = os.urandom(MiB)
    body_file = tmp_path / "body.bin"
    body_file.write_bytes(data)
    status, _, body = curl("-X", "POST", "-H", "Content-Type: application/octet-stream",
                           "--data-binary", f"@{body_file}", f"http://127.0.0.1:{stack['port']}/upload/")
    assert status == 200
    assert body == str(MiB).encode()
    c = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=20)
    try:
        c.request("POST", "/upload/", body=data, headers={"Content-Type": "application/octet-stream"})
        r = c.getresponse()
        assert r.status == 200
        assert r.read() == str(MiB).encode()
        # chunked request body: nginx buffers it and sends Content-Length upstream
        c.request("POST", "/upload/", body=iter([data[:300000], data[300000:]]),
                  headers={"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked"},
                  encode_chunked=True)
        r = c.getresponse()
        assert r.status == 200
        assert r.read() == str(MiB).encode()
    finally:
        c.close()


def test_django_404_page(stack):
    status, headers, body = curl(f"http://127.0.0.1:{stack['port']}/no/such/page/")
    assert status == 404
    assert b"Not Found" in body
    assert b"The requested resource was not found on this server." in body
    assert "x-upstream" in headers
    c = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=20)
    try:
        c.request("GET", "/missing")
        r = c.getresponse()
        assert r.status == 404
        assert b"Not Found" in r.read()
    finally:
        c.close()


def test_csrf_still_protects_other_views(stack):
    # the GET-only view with DEBUG=False: POST is not csrf_exempt -> Django's 403
    status, _, body = curl("-X", "POST", "--data", "x=1", f"http://127.0.0.1:{stack['port']}/hello/")
    assert status == 403
    assert b"CSRF" in body or b"Forbidden" in body


def test_both_sockets_answer_directly(stack):
    for path in (stack["sock_a"], stack["sock_b"]):
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
        status, _, body = curl("--unix-socket", path, "http://localhost/hello/")
        assert status == 200 and body == b"Hello"
        status, _, body = curl("--unix-socket", path, "-X", "POST", "--data-binary", "abc",
                               "http://localhost/upload/")
        assert status == 200 and body == b"3"


def test_nginx_uses_both_sockets(stack):
    seen = set()
    for _ in range(8):      # nginx round-robins its upstream servers
        status, headers, body = curl(f"http://127.0.0.1:{stack['port']}/hello/")
        assert status == 200 and body == b"Hello"
        seen.add(headers["x-upstream"])
    assert seen == {f"unix:{stack['sock_a']}", f"unix:{stack['sock_b']}"}
    with open(os.path.join(stack["nginx_dir"], "nginx-error.log")) as f:
        errors = [line for line in f if "[error]" in line or "[crit]" in line or "[alert]" in line]
    assert errors == [], errors


def test_server_log_has_no_errors(stack):
    out = stack["server"].output()
    assert "Traceback" not in out, out
    assert "[ERROR]" not in out, out
    assert out.count(" ready") == 2, out
