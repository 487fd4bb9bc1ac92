"""Every setting, declared once: name, type, default, validator, help.

The INI reader, the command line (cli.py), ``config.ini.example`` and the
README's reference all come from SETTINGS; nothing else lists keys.
Values are validated once, here, and a problem becomes one ConfigError
line naming the file, the key and what is wrong (exit code 2).

Paths in a config file are relative to the file's directory; paths given
on the command line are relative to the working directory.
"""
import configparser
import os
import re

SECTION = "server"


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator."""


# ---- value parsers: str -> value, raise ValueError("what is wrong") ----

def _int(lo=None, hi=None):
    def parse(s):
        try:
            v = int(s.strip(), 10)
        except ValueError:
            raise ValueError(f"{s!r} is not a whole number") from None
        if lo is not None and v < lo:
            raise ValueError(f"{v} is below the minimum {lo}")
        if hi is not None and v > hi:
            raise ValueError(f"{v} is above the maximum {hi}")
        return v
    parse.kind = "integer"
    return parse


def _float(lo=0.0):
    def parse(s):
        try:
            v = float(s.strip())
        except ValueError:
            raise ValueError(f"{s!r} is not a number") from None
        if v != v or v < lo or v == float("inf"):
            raise ValueError(f"{s.strip()} must be a finite number >= {lo}")
        return v
    parse.kind = "seconds" 
    return parse


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def _size(lo=0):
    def parse(s):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", s)
        if not m:
            raise ValueError(f"{s!r} is not a size (like 1048576, 512K, 100M, 1G)")
        v = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
        if v < lo:
            raise ValueError(f"{v} is below the minimum {lo}")
        return v
    parse.kind = "size"
    return parse


def _bool(s):
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{s!r} is not true or false")


_bool.kind = "boolean"


def _str(s):
    return s.strip()


_str.kind = "string"


def _octal(s):
    try:
        v = int(s.strip(), 8)
    except ValueError:
        raise ValueError(f"{s!r} is not an octal file mode like 0660") from None
    if not 0 <= v <= 0o777:
        raise ValueError(f"{s.strip()} is not a file mode between 0000 and 0777")
    return v


_octal.kind = "octal mode"


def _list(s):
    items = [x.strip() for x in s.split(",")]
    if not s.strip() or any(not x for x in items):
        raise ValueError(f"{s!r} must be a comma-separated list without empty items")
    return items


_list.kind = "list"


def _networks(s):
    """forwarded_allow_ips: '*' or addresses and networks (10.0.0.0/8, fd00::/8)."""
    import ipaddress
    items = _list(s)
    if items == ["*"]:
        return items
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network (like 10.0.0.0/8), "
                             "and '*' must stand alone") from None
    return items


_networks.kind = "list"


def _choice(*choices):
    def parse(s):
        v = s.strip().lower()
        if v not in choices:
            raise ValueError(f"{s.strip()!r} is not one of {', '.join(choices)}")
        return v
    parse.kind = "choice"
    return parse


def _socket_list(s):
    from .sockets import parse_address  # one parser for addresses: sockets.py
    items = _list(s)
    for item in items:
        parse_address(item)
    return items


_socket_list.kind = "list"


class Setting:
    """One setting.  (A plain class: dataclasses would pull inspect & co. into every worker.)"""
    __slots__ = ("name", "parse", "default", "help", "cli", "example", "is_path", "metavar")

    def __init__(self, name, parse, default, help, cli=(), example=None, is_path=False,
                 metavar=None):
        self.name = name          # the INI key
        self.parse = parse        # str -> value, raises ValueError("what is wrong")
        self.default = default
        self.help = help
        self.cli = cli            # command-line flags
        self.example = example    # the value config.ini.example shows (default: the default)
        self.is_path = is_path    # resolved against the config file's directory
        self.metavar = metavar


def _default_tmp_dir():
    """What tempfile.gettempdir() would pick, without importing tempfile."""
    for d in (os.environ.get("TMPDIR"), os.environ.get("TEMP"), os.environ.get("TMP"), "/tmp", "/var/tmp"):
        if d and os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return d
    return os.getcwd()


def _fmt_default(st):
    if st.default is None:
        return ""
    if isinstance(st.default, bool):
        return "true" if st.default else "false"
    if isinstance(st.default, list):
        return ",".join(st.default)
    if st.parse is _octal:
        return "%04o" % st.default
    return str(st.default)


SETTINGS = [
    # --- the concept document's keys ---
    Setting("sockets", _socket_list, ["127.0.0.1:8000"],
            "Comma-separated listening sockets: Unix socket paths (/run/app.sock, unix:rel.sock) "
            "and TCP host:port or [v6]:port.", cli=("--bind", "-b"), metavar="ADDR"),
    Setting("wsgi_path", _str, None,
            "The WSGI application: a path to a wsgi.py file (its project root goes on sys.path, "
            "so Django's settings import) or module:callable. Required.",
            cli=("--app",), example="blazewsgi.demo:application", metavar="APP"),
    Setting("min_workers", _int(1, 512), 1, "Worker processes started (and the floor for scaling).",
            cli=("--workers", "-w"), example="2", metavar="N"),
    Setting("max_workers", _int(1, 512), None,
            "Ceiling for worker scaling; empty means equal to min_workers.",
            cli=("--max-workers",), example="4", metavar="N"),
    Setting("ssl", _bool, False,
            "Serve HTTPS with OpenSSL on every TCP socket (needs ssl_certfile and ssl_keyfile); "
            "Unix sockets too with ssl_unix."),
    Setting("metrics_port", _int(0, 65535), 0,
            "Port of the master's Prometheus endpoint (/metrics, /, and /healthz) on metrics_bind; "
            "0 turns it off.", cli=("--metrics-port",)),
    Setting("rate_limit", _int(0, 1000000000), 0,
            "Most requests one client may make per minute, counted across all workers (GCRA: a burst "
            "of up to this many, then one every 60/rate_limit s); over it: 429 with Retry-After. "
            "0 turns it off."),
    Setting("scale_threshold_high", _float(0.0), 1000.0,
            "Requests/second (server-wide, over scale_window) above which a worker is added, "
            "one at a time, up to max_workers."),
    Setting("scale_threshold_low", _float(0.0), 200.0,
            "Requests/second below which a worker is retired gracefully, one at a time, down to "
            "min_workers (must be below scale_threshold_high: the gap is the hysteresis)."),
    Setting("scale_window", _float(0.5), 3.0,
            "Seconds the request rate is averaged over; also the least time between two steps up."),
    Setting("scale_down_delay", _float(0.5), 5.0,
            "Least seconds since the previous scaling step before a worker is removed."),
    Setting("log_dir", _str, None,
            "Directory for daily log files YYYY-MM-DD.log; empty logs to stderr.",
            cli=("--log-dir",), is_path=True, example="", metavar="DIR"),
    # --- sockets and processes ---
    Setting("socket_mode", _octal, 0o660,
            "File mode of Unix sockets (nginx's user must be able to connect: use 0666 or a shared group)."),
    Setting("backlog", _int(1, 65535), 2048, "Listen queue length of each socket."),
    Setting("graceful_timeout", _float(0.0), 30.0,
            "Seconds a graceful stop (SIGTERM) waits for in-flight requests.", cli=("--graceful-timeout",)),
    Setting("timeout", _float(0.0), 30.0,
            "Seconds a request may run in the app without sending anything before its worker counts as "
            "stuck: its Python stack is dumped to the log, it is killed and replaced. 0 turns it off.",
            cli=("--timeout", "-t")),
    Setting("max_requests", _int(0), 0,
            "Recycle a worker gracefully after this many requests (its last response says "
            "Connection: close); 0 never.", cli=("--max-requests",)),
    Setting("max_requests_jitter", _int(0), 0,
            "Up to this many extra requests, drawn per worker, so workers don't all recycle at once."),
    Setting("threads", _int(1, 1024), 1,
            "App threads per worker. 1: the app runs on the event loop's thread (fastest for views "
            "that compute); N > 1: the loop hands complete requests to N threads (for views that wait "
            "on a database or an API), at most 2N at a time per worker.",
            cli=("--threads",)),
    Setting("pid_file", _str, None, "Write the master's pid to this file.", cli=("--pid",),
            is_path=True, metavar="FILE", example=""),
    # --- HTTP limits ---
    Setting("max_connections", _int(1, 1000000), 1000,
            "Open connections per worker; beyond it the worker stops accepting until one closes."),
    Setting("head_buffer_size", _size(1024), 16384,
            "Per-connection read buffer: the largest request head (request line + headers), else 431."),
    Setting("limit_request_line", _int(64), 8190, "Longest request line in bytes, else 414."),
    Setting("limit_request_fields", _int(1, 1000), 100, "Most header lines in a request, else 431."),
    Setting("limit_request_field_size", _int(64), 8190, "Longest header line in bytes, else 431."),
    Setting("max_body_size", _size(0), 100 * 1024 ** 2,
            "Largest request body (e.g. 100M); larger ones get 413 before the app runs."),
    Setting("body_buffer_size", _size(0), 1024 ** 2,
            "Request bodies larger than this spill from memory to a temporary file."),
    Setting("tmp_dir", _str, None, "Directory for spilled request bodies (default: the system temp dir).",
            is_path=True, example=""),
    Setting("header_timeout", _float(0.1), 10.0,
            "Seconds a client has to send a whole request head (slowloris guard)."),
    Setting("keepalive_timeout", _float(0.1), 5.0, "Seconds an idle keep-alive connection is kept open.",
            cli=("--keepalive",)),
    Setting("io_timeout", _float(0.1), 30.0,
            "Seconds without progress while receiving a body or sending a response "
            "(a body over 64 KiB is read in large steps: one that stalls is closed "
            "io_timeout to twice it after its last byte)."),
    # --- logging ---
    Setting("log_level", _choice("debug", "info", "warning", "error"), "info", "Server log level.",
            cli=("--log-level",)),
    Setting("access_log", _bool, True,
            "Write a line per request (batched by each worker; to log_dir's daily file, else stderr)."),
    # --- proxies ---
    Setting("metrics_bind", _str, "127.0.0.1", "Address the metrics endpoint binds to."),
    Setting("forwarded_allow_ips", _networks, ["127.0.0.1", "::1"],
            "Proxies (addresses or networks like 10.0.0.0/8; * for any) whose X-Forwarded-For / "
            "X-Real-IP names the client for REMOTE_ADDR, the access log and rate_limit "
            "(Unix socket peers are always trusted)."),
    # --- TLS (README "HTTPS") ---
    Setting("ssl_certfile", _str, None,
            "PEM certificate chain: the server's certificate first, then its intermediates. "
            "A SIGHUP reload loads it anew (renewed certificates).", is_path=True, example=""),
    Setting("ssl_keyfile", _str, None, "PEM private key of the certificate (may be encrypted: ssl_password).",
            is_path=True, example=""),
    Setting("ssl_password", _str, None, "Password of an encrypted ssl_keyfile.", example=""),
    Setting("ssl_ca_certs", _str, None,
            "PEM CA bundle for client certificates (mutual TLS): clients are asked for a certificate "
            "signed by one of them; its subject is in the environ as SSL_CLIENT_S_DN.",
            is_path=True, example=""),
    Setting("ssl_verify_client", _bool, False,
            "Require a client certificate signed by ssl_ca_certs (without it the handshake fails)."),
    Setting("ssl_ciphers", _str, None,
            "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's); empty: OpenSSL's default.",
            example=""),
    Setting("ssl_min_version", _choice("tlsv1.2", "tlsv1.3"), "tlsv1.2", "Oldest TLS version accepted."),
    Setting("ssl_unix", _bool, False,
            "With ssl = true, Unix sockets speak TLS too; by default they stay plain HTTP "
            "(for an nginx on the same host that terminates TLS)."),
]

BY_NAME = {s.name: s for s in SETTINGS}


class Config:
    """Validated settings; read them as attributes (cfg.min_workers)."""

    def __init__(self, values, source="<defaults>", base_dir=None):
        self._values = values
        self.source = source
        self.base_dir = base_dir or os.getcwd()

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def non_default(self, name):
        return self._values[name] != BY_NAME[name].default

    @classmethod
    def load(cls, path=None, overrides=None):
        """Read path's [server] section (if any), apply command-line overrides, validate."""
        values = {s.name: s.default for s in SETTINGS}
        source = "<command line>"
        base_dir = os.getcwd()
        if path is not None:
            source = path
            base_dir = os.path.dirname(os.path.abspath(path))
            parser = configparser.ConfigParser(interpolation=None, delimiters=("=",),
                                               comment_prefixes=("#", ";"), inline_comment_prefixes=None)
            try:
                with open(path, encoding="utf-8") as f:
                    parser.read_file(f)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no such config file") from None
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: cannot read: {e}") from None
            except configparser.Error as e:
                raise ConfigError(f"{path}: not a valid INI file: {str(e).splitlines()[0]}") from None
            if not parser.has_section(SECTION):
                raise ConfigError(f"{path}: no [{SECTION}] section")
            extra = [s for s in parser.sections() if s != SECTION]
            if extra:
                raise ConfigError(f"{path}: unknown section [{extra[0]}] (settings go in [{SECTION}])")
            for key, raw in parser.items(SECTION):
                values[key] = _parse_one(path, key, raw, base_dir)
        for key, raw in (overrides or {}).items():
            values[key] = _parse_one("command line", key, raw, os.getcwd())
        cfg = cls(values, source, base_dir)
        _check_together(cfg)
        return cfg


def _parse_one(where, key, raw, base_dir):
    st = BY_NAME.get(key)
    if st is None:
        near = [n for n in BY_NAME if n.replace("_", "") == key.replace("_", "").replace("-", "")]
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"{where}: [{SECTION}] {key}: unknown setting{hint}")
    if raw.strip() == "" and st.default is None:
        return None
    try:
        value = st.parse(raw)
    except ValueError as e:
        raise ConfigError(f"{where}: [{SECTION}] {key}: {e}") from None
    if st.is_path and value:
        value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
    return value


def _check_together(cfg):
    where = cfg.source
    v = cfg._values
    if v["max_workers"] is None:
        v["max_workers"] = v["min_workers"]
    if v["min_workers"] > v["max_workers"]:
        raise ConfigError(f"{where}: [{SECTION}] min_workers: {v['min_workers']} is greater than "
                          f"max_workers {v['max_workers']}")
    if v["scale_threshold_low"] >= v["scale_threshold_high"]:
        raise ConfigError(f"{where}: [{SECTION}] scale_threshold_low: must be below scale_threshold_high")
    if not v["wsgi_path"]:
        raise ConfigError(f"{where}: [{SECTION}] wsgi_path: missing (the WSGI app to serve; "
                          "or use --app module:callable)")
    app = v["wsgi_path"]
    if _looks_like_file(app):
        path = app.rsplit(":", 1)[0] if re.search(r"\.py:[A-Za-z_]\w*$", app) else app
        full = os.path.normpath(os.path.join(cfg.base_dir, os.path.expanduser(path)))
        if not os.path.isfile(full):
            raise ConfigError(f"{where}: [{SECTION}] wsgi_path: {full}: no such file")
        v["wsgi_path"] = full + app[len(path):]
    elif not re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?", app):
        raise ConfigError(f"{where}: [{SECTION}] wsgi_path: {app!r} is neither a .py file nor module:callable")
    if v["head_buffer_size"] < v["limit_request_line"] + 512:
        raise ConfigError(f"{where}: [{SECTION}] head_buffer_size: must be at least limit_request_line + 512")
    if v["log_dir"]:
        d = v["log_dir"]
        if not os.path.isdir(d):
            raise ConfigError(f"{where}: [{SECTION}] log_dir: {d}: no such directory")
        if not os.access(d, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}: [{SECTION}] log_dir: {d}: not writable")
    if v["pid_file"]:
        d = os.path.dirname(v["pid_file"]) or "."
        if not os.path.isdir(d):
            raise ConfigError(f"{where}: [{SECTION}] pid_file: {d}: no such directory")
        if not os.access(d, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}: [{SECTION}] pid_file: {d}: not writable")
    tmp = v["tmp_dir"] or _default_tmp_dir()
    if not os.path.isdir(tmp) or not os.access(tmp, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: [{SECTION}] tmp_dir: {tmp}: not a writable directory")
    v["tmp_dir"] = tmp
    _check_tls(where, cfg)


def _check_tls(where, cfg):
    v = cfg._values
    if v["ssl"]:
        for key in ("ssl_certfile", "ssl_keyfile"):
            if not v[key]:
                raise ConfigError(f"{where}: [{SECTION}] {key}: missing (ssl = true needs "
                                  "ssl_certfile and ssl_keyfile)")
    for key in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs"):
        path = v[key]
        if not path:
            continue
        if not os.path.exists(path):
            raise ConfigError(f"{where}: [{SECTION}] {key}: {path}: no such file")
        if not os.path.isfile(path):
            raise ConfigError(f"{where}: [{SECTION}] {key}: {path}: not a regular file")
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"{where}: [{SECTION}] {key}: {path}: cannot read: {e.strerror}") from None
    if v["ssl_verify_client"] and not v["ssl_ca_certs"]:
        raise ConfigError(f"{where}: [{SECTION}] ssl_verify_client: needs ssl_ca_certs "
                          "(the CAs client certificates are checked against)")
    if v["ssl"]:
        from . import tls     # the C core builds (and here drops) an SSL_CTX: OpenSSL's own verdict
        why = tls.check(cfg)
        if why:
            raise ConfigError(f"{where}: [{SECTION}] {why}")


def _looks_like_file(app):
    return "/" in app or app.endswith(".py") or bool(re.search(r"\.py:[A-Za-z_]\w*$", app))


def example_ini():
    """The text of config.ini.example, generated from SETTINGS."""
    out = ["# BlazeWSGI configuration: every setting, with its default (or an example value,",
           "# then the default is named).  Serves the bundled demo app on 127.0.0.1:8000.",
           "# Generated from blazewsgi/config.py (python -m blazewsgi.config > config.ini.example).",
           "# Paths are relative to this file's directory.", "", f"[{SECTION}]"]
    for st in SETTINGS:
        out.append("")
        text = st.help
        line = "# "
        for word in text.split():
            if len(line) + len(word) > 78:
                out.append(line.rstrip())
                line = "# "
            line += word + " "
        out.append(line.rstrip())
        value = st.example if st.example is not None else _fmt_default(st)
        if value != _fmt_default(st):
            out.append(f"# Default: {_fmt_default(st) or '(none)'}")
        if st.cli:
            out.append(f"# Command line: {' / '.join(st.cli)}")
        out.append(f"{st.name} = {value}")
    return "\n".join(out) + "\n"


def markdown_reference():
    """The README's configuration table, generated from SETTINGS."""
    rows = ["| key | default | command line | meaning |", "|---|---|---|---|"]
    for st in SETTINGS:
        default = _fmt_default(st) or "(none)"
        text = st.help
        rows.append(f"| `{st.name}` | `{default}` | {' '.join(f'`{c}`' for c in st.cli)} | "
                    f"{text.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys
    sys.stdout.write(markdown_reference() if "--markdown" in sys.argv else example_ini())
