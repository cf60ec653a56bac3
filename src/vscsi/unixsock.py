"""A listening unix socket for a server that QEMU, systemd or an operator connects to:
mode 0600 from the start, a stale socket file (nobody listening) replaced, a live one or
a non-socket refused with one clear line. A leaf module: it imports nothing of vscsi."""

from __future__ import annotations

import os
import socket
import stat


def listen_unix(path: str, backlog: int = 1) -> socket.socket:
    """Listen on ``path`` with mode 0600; OSError with a one-line message (a socket in
    use, a file that is not a socket, a path we cannot bind)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: its server is gone
        except OSError as exc:
            raise OSError(f"cannot probe existing socket {path}: {exc.strerror}") from None
        else:
            raise OSError(f"socket {path} is in use (another server is listening)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the file with the umask: make it 0600 from the start, so there is
    # no window in which others could connect.
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock
