"""The bundled demo app: what `blazewsgi config.ini.example` serves.

A small page with the server's version, this worker's pid, the number of
workers and a link to the metrics endpoint; ``/hello`` answers plain text
(the benchmark app), ``/echo`` echoes a POST body.
"""
import html
import os

from . import __version__

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>BlazeWSGI {version}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:42em;margin:3em auto;padding:0 1em}}
code{{background:#f3f3f3;padding:0 .3em}}</style></head>
<body><h1>BlazeWSGI {version} is serving</h1>
<p>This page comes from the bundled demo app, <code>blazewsgi.demo:application</code>.</p>
<ul>
<li>worker pid: <code>{pid}</code> of {workers} worker(s)</li>
<li>you asked for: <code>{method} {path}</code> over <code>{protocol}</code></li>
<li>metrics: {metrics}</li>
<li>plain text: <a href="/hello">/hello</a></li>
</ul>
<p>Point <code>wsgi_path</code> in your config.ini at your project's <code>wsgi.py</code> to serve it instead.</p>
</body></html>
"""


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/hello":
        body = b"Hello, World!"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/echo":
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(data)))])
        return [data]
    if path != "/":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"Not Found\n"]
    port = os.environ.get("BLAZEWSGI_METRICS_PORT", "0")
    metrics = (f'<a href="http://127.0.0.1:{port}/metrics">:{port}/metrics</a>' if port != "0"
               else "off (set <code>metrics_port</code>)")
    body = PAGE.format(
        version=__version__, pid=os.getpid(), workers=os.environ.get("BLAZEWSGI_WORKERS", "?"),
        method=html.escape(environ["REQUEST_METHOD"]), path=html.escape(path),
        protocol=html.escape(environ["SERVER_PROTOCOL"]), metrics=metrics,
    ).encode("utf-8")
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
