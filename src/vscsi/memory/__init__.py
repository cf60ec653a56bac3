"""Guest memory regions and guest-physical address translation (see guest.py)."""

from vscsi.memory.guest import Allocator, GuestMemory, GuestMemoryError, Region

__all__ = ["Allocator", "GuestMemory", "GuestMemoryError", "Region"]
