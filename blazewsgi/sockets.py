"""Listening sockets: parse addresses, bind them in the master, clean up.

The master binds every socket once and keeps it open for its whole life;
workers inherit the descriptors across fork().  Unix socket files get
socket_mode; a stale file left by a dead server is replaced, but a path
a live server answers on is an error, never a steal.

TCP sockets use SO_REUSEADDR only so a restarted server can bind while old
connections sit in TIME_WAIT.  It is not a "clustering" feature (the
concept document says so; it is wrong): zero downtime comes from the
master keeping its sockets open while workers change.
"""
import errno
import os
import socket
import stat


class SocketError(Exception):
    """A socket that cannot be set up, phrased for the operator."""


def parse_address(addr):
    """'unix:/p', '/p', './p' -> ('unix', path); 'h:p', '[v6]:p' -> ('tcp', host, port)."""
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path:
            raise ValueError(f"{addr!r}: empty Unix socket path")
        return ("unix", path)
    if "/" in addr or addr.endswith(".sock"):
        return ("unix", addr)
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
        if not sep:
            raise ValueError(f"{addr!r}: IPv6 addresses are written [addr]:port")
    else:
        host, sep, port = addr.rpartition(":")
        if not sep:
            raise ValueError(f"{addr!r}: not host:port, [v6]:port or a Unix socket path")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{addr!r}: port must be a number from 0 to 65535")
    return ("tcp", host or "0.0.0.0", int(port))


class Listener:
    """One bound, listening socket owned by the master."""

    def __init__(self, sock, kind, name, server_name, server_port, path=None, owned=True):
        self.sock = sock
        self.kind = kind            # "unix" or "tcp"
        self.name = name            # as shown in logs: unix:/p or host:port
        self.server_name = server_name
        self.server_port = server_port
        self.path = path
        self.owned = owned          # False: systemd's socket file, never removed by us
        self._inode = os.stat(path).st_ino if path else None

    def fileno(self):
        return self.sock.fileno()

    def close(self, unlink=True):
        """Close; remove our socket file (only if it is still ours)."""
        self.sock.close()
        if unlink and self.owned and self.path:
            try:
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass


def _bind_unix(path, mode, backlog, base_dir):
    full = os.path.normpath(os.path.join(base_dir, path))
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketError(f"sockets: {full} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(full)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(full)     # stale: nobody accepts on it any more
        except OSError as e:
            raise SocketError(f"sockets: {full}: cannot tell whether it is in use: {e}") from None
        else:
            raise SocketError(f"sockets: {full} is in use by a live server")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o777 & ~mode)   # no window where the file has a looser mode
        try:
            sock.bind(full)
        finally:
            os.umask(old)
        os.chmod(full, mode)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise SocketError(f"sockets: cannot listen on {full}: {e.strerror}") from None
    sock.set_inheritable(True)
    return Listener(sock, "unix", f"unix:{full}", "localhost", "80", path=full)


def _bind_tcp(host, port, backlog):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SocketError(f"sockets: cannot resolve {host!r}: {e.strerror}") from None
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        why = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise SocketError(f"sockets: cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]:{bound_port}" if family == socket.AF_INET6 else f"{bound_host}:{bound_port}"
    return Listener(sock, "tcp", shown, host if host not in ("0.0.0.0", "::") else bound_host,
                    str(bound_port))


def bind_all(addresses, mode=0o660, backlog=2048, base_dir="."):
    """Bind every address; on any failure close what was bound and raise SocketError."""
    bound = []
    try:
        for addr in addresses:
            parsed = parse_address(addr)
            if parsed[0] == "unix":
                bound.append(_bind_unix(parsed[1], mode, backlog, base_dir))
            else:
                bound.append(_bind_tcp(parsed[1], parsed[2], backlog))
    except (SocketError, ValueError):
        for lst in bound:
            lst.close()
        raise
    return bound


def from_fds(fds, owned=True):
    """Listeners from inherited descriptors: the old master's on USR2 (owned: we remove
    the socket file at the end), or systemd's socket activation (not owned)."""
    out = []
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise SocketError(f"inherited socket fd {fd}: {e.strerror}") from None
        if sock.type != socket.SOCK_STREAM or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
            raise SocketError(f"inherited fd {fd} is not a listening stream socket")
        sock.set_inheritable(True)
        if sock.family == socket.AF_UNIX:
            path = sock.getsockname()
            path = path.decode() if isinstance(path, bytes) else path
            out.append(Listener(sock, "unix", f"unix:{path}", "localhost", "80", path=path or None,
                                owned=owned))
        else:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
            out.append(Listener(sock, "tcp", shown, host, str(port), owned=owned))
    return out
