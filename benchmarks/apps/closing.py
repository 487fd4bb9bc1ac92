"""Does the server call the response's close() (PEP 3333)?  Each answer to
/ is an iterable whose close() counts; /closed tells the count so far (one
worker: test_conformance.py)."""

closed = 0


class Body:
    def __iter__(self):
        yield b"ok"

    def close(self):
        global closed
        closed += 1


def application(environ, start_response):
    if environ["PATH_INFO"] == "/closed":
        body = str(closed).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return Body()
