"""Serve a WSGI app with bjoern, optionally pre-forked.

bjoern has no command line and no worker model of its own: with --workers 1 it
runs in this process; with N > 1 the socket is bound once and N forked children
each run bjoern's event loop on it (the parent only waits). SIGTERM to the
process group stops everything (bjoern installs no SIGTERM handler).

usage: python bjoern_serve.py --app module:callable --bind HOST:PORT [--workers N]
"""

import argparse
import importlib
import os
import sys

import bjoern


def load_app(spec):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "application")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--app", required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    sys.path.insert(0, os.getcwd())
    app = load_app(args.app)

    if args.workers == 1:
        bjoern.run(app, host, int(port))
        return

    bjoern.listen(app, host, int(port))
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            bjoern.run()
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
