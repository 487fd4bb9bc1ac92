"""A one-item list of a fresh big bytes per request, not wrapped in
wsgiref.validate (whose iterator wrapper would leave the one-item path):
/big?kb=N&i=I answers pattern_chunk(I, N KiB) with its Content-Length."""
from urllib.parse import parse_qs

from apps_wsgi import pattern_chunk


def app(environ, start_response):
    q = parse_qs(environ.get("QUERY_STRING", ""))
    kb, i = int(q.get("kb", ["1024"])[0]), int(q.get("i", ["0"])[0])
    body = pattern_chunk(i, kb * 1024)   # a new object each time: a freed one's memory is reused
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
    return [body]
