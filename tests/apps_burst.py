"""App for tests/test_balance.py's burst test.

  /gate?s=X&mark=F  writes F as soon as the request reaches the app, then sleeps X seconds
  /order            the REMOTE_PORTs of the requests served so far, in order, one per line
  anything else     is recorded (its REMOTE_PORT) and answered "ok"
"""
import os
import time
from urllib.parse import parse_qs

_served = []


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/gate":
        q = parse_qs(environ["QUERY_STRING"])
        mark = q["mark"][0]
        with open(mark + ".tmp", "w") as f:
            f.write("in")
        os.replace(mark + ".tmp", mark)
        time.sleep(float(q["s"][0]))
        body = b"gate"
    elif path == "/order":
        body = "\n".join(_served).encode()
    else:
        _served.append(environ["REMOTE_PORT"])
        body = b"ok"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
