"""Command line -> Config -> sockets -> Arbiter.

    blazewsgi config.ini
    blazewsgi --app myproject.wsgi:application --bind 127.0.0.1:8000 --workers 2

Flags come from the settings' declarations (config.py); a flag overrides
the same key of the config file.  Exit codes: 0 stopped cleanly, 1
runtime failure (a socket that cannot be bound), 2 configuration error,
3 the application cannot be imported.
"""
import argparse
import os
import sys

from . import __version__, logs
from .config import SETTINGS, Config, ConfigError


def build_parser():
    p = argparse.ArgumentParser(
        prog="blazewsgi",
        description="BlazeWSGI: a pre-fork WSGI server with a C hot path.",
        epilog="Every setting can go in the [server] section of CONFIG; see config.ini.example.",
    )
    p.add_argument("config", nargs="?", help="INI file with a [server] section")
    p.add_argument("--version", action="version", version=f"BlazeWSGI {__version__}")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    for st in SETTINGS:
        if not st.cli:
            continue
        kwargs = {"dest": st.name, "metavar": st.metavar or st.name.upper(), "help": st.help}
        if st.name == "sockets":
            kwargs["action"] = "append"
        p.add_argument(*st.cli, **kwargs)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    overrides = {}
    for st in SETTINGS:
        value = getattr(args, st.name, None)
        if value is None:
            continue
        overrides[st.name] = ",".join(value) if isinstance(value, list) else str(value)
    if "min_workers" in overrides and "max_workers" not in overrides:
        overrides["max_workers"] = overrides["min_workers"]   # --workers N: N workers, as gunicorn
    if args.config is None and "wsgi_path" not in overrides:
        print("blazewsgi: error: give a config file (blazewsgi config.ini) or --app MODULE:CALLABLE",
              file=sys.stderr)
        return 2
    try:
        cfg = Config.load(args.config, overrides)
    except ConfigError as e:
        print(f"blazewsgi: error: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"blazewsgi: {cfg.source}: configuration OK")
        return 0
    log = logs.setup(cfg.log_level, cfg.log_dir)

    from .arbiter import INHERIT_ENV, Arbiter
    from .sockets import SocketError, bind_all, from_fds

    try:
        inherited, owned = _inherited_fds(INHERIT_ENV)
        if inherited:
            listeners = from_fds(inherited, owned)
            log.info("Using %d inherited socket(s); the sockets setting is not re-bound", len(listeners))
        else:
            listeners = bind_all(cfg.sockets, cfg.socket_mode, cfg.backlog, cfg.base_dir)
    except (SocketError, ValueError, OSError) as e:
        log.error("%s", e)
        print(f"blazewsgi: error: {e}", file=sys.stderr) if cfg.log_dir else None
        return 1
    return Arbiter(cfg, listeners, reload_config=lambda: Config.load(args.config, overrides)).run()


def _inherited_fds(inherit_env):
    """Listening descriptors handed to us, and whether we own them: by systemd
    socket activation (LISTEN_FDS/LISTEN_PID, fds from 3; systemd owns them) or by
    our predecessor on USR2 (ours now).  The variables are removed so workers and
    the app don't see them."""
    fds, owned = [], True
    n = os.environ.pop("LISTEN_FDS", None)
    pid = os.environ.pop("LISTEN_PID", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if n and pid == str(os.getpid()):
        fds, owned = list(range(3, 3 + int(n))), False     # systemd's sockets
    handed = os.environ.pop(inherit_env, None)
    if handed:
        fds, owned = [int(x) for x in handed.split(",") if x], True
    return fds, owned


if __name__ == "__main__":
    sys.exit(main())
