"""The shortest path through the server: GET, keep-alive, a body, JSON environ."""
import http.client
import json

from conftest import request


def test_get_and_keepalive(server):
    with server.connect() as s:
        for i in range(3):
            status, headers, body = request(s, f"GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert status == 200
            assert body == f"GET /p{i}".encode()
            assert headers["server"] == "BlazeWSGI"
            assert "date" in headers


def test_environ_with_http_client(server):
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    c.request("POST", "/json?a=1&b=%20", body=b"xyz", headers={"Content-Type": "text/x", "X-Thing": "v"})
    r = c.getresponse()
    env = json.loads(r.read())
    assert r.status == 200
    assert env["REQUEST_METHOD"] == "POST"
    assert env["QUERY_STRING"] == "a=1&b=%20"
    assert env["CONTENT_TYPE"] == "text/x"
    assert env["CONTENT_LENGTH"] == "3"
    assert env["HTTP_X_THING"] == "v"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["wsgi.url_scheme"] == "http"
