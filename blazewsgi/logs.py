"""Server logging: stderr, or daily files log_dir/YYYY-MM-DD.log.

Lines look like ``[2026-12-04 16:00:00] [1234] [INFO] message``.  Every
process appends to the same daily file with O_APPEND and one write per
record, so lines of different workers never interleave within a line.
SIGUSR1 (in the master) reopens the file, for tools that move it.
"""
import datetime
import logging
import os
import sys
import time

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


def clock_offset():
    """Seconds added to the logs' clock: BLAZEWSGI_CLOCK_OFFSET, for testing midnight."""
    try:
        return int(float(os.environ.get("BLAZEWSGI_CLOCK_OFFSET", "0")))
    except ValueError:
        return 0


def _today():
    return datetime.date.fromtimestamp(time.time() + clock_offset())


class DailyFileHandler(logging.Handler):
    """Append to log_dir/<local date>.log, switching files at midnight."""

    def __init__(self, log_dir, clock=_today):
        super().__init__()
        self.log_dir = log_dir
        self.clock = clock
        self._day = None
        self._fd = -1

    def _open(self, day):
        path = os.path.join(self.log_dir, f"{day.isoformat()}.log")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._day = fd, day

    def fileno(self):
        """Today's file descriptor (opened if needed): faulthandler writes here."""
        with self.lock:
            day = self.clock()
            if day != self._day:
                self._open(day)
            return self._fd

    def reopen(self):
        with self.lock:
            self._day = None

    def emit(self, record):
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")
            with self.lock:
                day = self.clock()
                if day != self._day:
                    self._open(day)
                os.write(self._fd, line)
        except Exception:
            self.handleError(record)

    def close(self):
        with self.lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        super().close()


def setup(level="info", log_dir=None):
    root = logging.getLogger("blazewsgi")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    handler = DailyFileHandler(log_dir) if log_dir else logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(FORMAT, DATEFMT)
    offset = clock_offset()
    if offset:
        formatter.converter = lambda t: time.localtime(t + offset)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    return root


def reopen():
    for h in logging.getLogger("blazewsgi").handlers:
        if isinstance(h, DailyFileHandler):
            h.reopen()
