"""NBD URIs, as the NBD project's doc/uri.md defines them (the subset without TLS):

    nbd://HOST[:PORT][/EXPORT]            TCP, port 10809 by default; HOST may be [IPv6]
    nbd+unix:///[EXPORT]?socket=PATH      a Unix domain socket

EXPORT is the path without its leading "/", percent-decoded; empty means the server's
default export. Only text is parsed here: nothing connects.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_PORT = 10809


class NbdUriError(ValueError):
    """A URI that is not an NBD URI we can use; str() is one line."""


@dataclass(frozen=True)
class NbdUri:
    export: str
    host: str | None = None       # TCP
    port: int = DEFAULT_PORT
    socket: str | None = None     # Unix domain socket path

    def __str__(self) -> str:
        path = "/" + quote(self.export, safe="")
        if self.socket is not None:
            return f"nbd+unix://{path}?socket={quote(self.socket, safe='/')}"
        assert self.host is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"nbd://{host}{port}{path}"

    @property
    def address(self) -> str:
        """Where the server is, for messages."""
        if self.socket is not None:
            return self.socket
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_nbd_uri(text: str) -> NbdUri:
    """Parse an NBD URI; raises NbdUriError naming what is wrong."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise NbdUriError(f"bad NBD URI {text!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix", "nbds+vsock"):
        raise NbdUriError(f"NBD URI {text!r}: TLS ({scheme}://) is not supported")
    if scheme not in ("nbd", "nbd+unix"):
        raise NbdUriError(f"bad NBD URI {text!r}: expected nbd://HOST[:PORT]/EXPORT or "
                          f"nbd+unix:///EXPORT?socket=PATH")
    if parts.fragment:
        raise NbdUriError(f"NBD URI {text!r}: a fragment (#...) has no meaning here")
    try:
        export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path,
                         errors="strict")
    except UnicodeDecodeError:
        raise NbdUriError(f"NBD URI {text!r}: the export name is not UTF-8") from None
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query),
                         errors="strict")
    except (ValueError, UnicodeDecodeError) as e:
        raise NbdUriError(f"NBD URI {text!r}: bad query: {e}") from None
    if any(key.startswith("tls") for key in query):
        raise NbdUriError(f"NBD URI {text!r}: TLS parameters are not supported")
    if scheme == "nbd+unix":
        if parts.netloc:
            raise NbdUriError(f"NBD URI {text!r}: nbd+unix:// takes no host "
                              f"(write nbd+unix:///EXPORT?socket=PATH)")
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise NbdUriError(f"NBD URI {text!r}: needs exactly one ?socket=PATH")
        if "\0" in sockets[0]:
            raise NbdUriError(f"NBD URI {text!r}: socket path contains a NUL byte")
        return NbdUri(export, socket=sockets[0])
    if "socket" in query:
        raise NbdUriError(f"NBD URI {text!r}: ?socket= belongs to nbd+unix://")
    host = parts.hostname
    if not host:
        raise NbdUriError(f"NBD URI {text!r}: needs a host (nbd://HOST[:PORT]/EXPORT)")
    if parts.username is not None or parts.password is not None:
        raise NbdUriError(f"NBD URI {text!r}: user information is not supported")
    if port == 0:
        raise NbdUriError(f"NBD URI {text!r}: port 0")
    return NbdUri(export, host=host, port=DEFAULT_PORT if port is None else port)
