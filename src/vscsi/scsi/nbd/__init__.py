"""An NBD client for network block storage: protocol core (sans-IO), URIs, a blocking
connection with pipelining, and the block-device operations a backend needs.

Nothing here imports the rest of vscsi.scsi; backends/network.py builds NbdBackend on NbdDisk.
"""

from .connection import NbdCommandError, NbdConnection, NbdDisconnected
from .disk import NbdDisk
from .protocol import ClientProtocol, NbdOptionError, NbdProtocolError
from .uri import NbdUri, NbdUriError, parse_nbd_uri

__all__ = [
    "ClientProtocol",
    "NbdCommandError",
    "NbdConnection",
    "NbdDisconnected",
    "NbdDisk",
    "NbdOptionError",
    "NbdProtocolError",
    "NbdUri",
    "NbdUriError",
    "parse_nbd_uri",
]
