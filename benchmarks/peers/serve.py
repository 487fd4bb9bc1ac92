"""Serve a WSGI app with bjoern, fastwsgi or meinheld, optionally pre-forked.

None of them has a command line or a worker model of its own that matches
the others', so this gives them one:

* bjoern, meinheld: the socket is bound once here; with --workers 1 the loop
  runs in this process, with N > 1 N forked children each run the loop on the
  same socket and the parent only waits;
* fastwsgi: its own `run(workers=N)` (it forks and each child binds the port
  with SO_REUSEPORT).

SIGTERM to the process group stops everything (none of them handles it).

usage: python serve.py {bjoern,fastwsgi,meinheld} --app module:callable --bind HOST:PORT [--workers N]
"""

import argparse
import importlib
import os
import sys


def load_app(spec):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "application")


def prefork(workers, run):
    """Run `run` here (1 worker) or in N forked children of this process."""
    if workers == 1:
        run()
        return
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            run()
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


def serve_bjoern(app, host, port, workers):
    import bjoern

    bjoern.listen(app, host, port)
    prefork(workers, bjoern.run)


def serve_meinheld(app, host, port, workers):
    from meinheld import server

    server.listen((host, port))
    prefork(workers, lambda: server.run(app))


def serve_fastwsgi(app, host, port, workers):
    import fastwsgi

    fastwsgi.run(app, host, port, workers=workers)


SERVERS = {"bjoern": serve_bjoern, "fastwsgi": serve_fastwsgi, "meinheld": serve_meinheld}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("server", choices=sorted(SERVERS))
    parser.add_argument("--app", required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    sys.path.insert(0, os.getcwd())
    SERVERS[args.server](load_app(args.app), host, int(port), args.workers)


if __name__ == "__main__":
    main()
