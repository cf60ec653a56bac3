"""Guest memory regions and guest-physical address translation (see guest.py), and
scatter-gather lists over views of that memory (sgl.py)."""

from vscsi.memory.guest import Allocator, GuestMemory, GuestMemoryError, Region

__all__ = ["Allocator", "GuestMemory", "GuestMemoryError", "Region"]
