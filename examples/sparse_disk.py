"""A sparse disk kept in a dict: only written blocks take memory (a vscsi plugin).

    vscsi serve --queues 1 --lun 0:0=python:examples/sparse_disk.py:SparseDisk,size=64M

Keys (strings, as every plugin key): size (bytes, K/M/G suffixes), chunk (bytes per dict
entry, default 4096). Unwritten and discarded chunks read as zeros.

The dict lives in one process: request-queue workers are forked processes, so give this
LUN one queue (--queues 1), or writes made through one queue are not seen by another.
"""

from __future__ import annotations

from vscsi.scsi import parse_size


class SparseDisk:
    def __init__(self, size: str, chunk: str = "4096") -> None:
        self.size = parse_size(size)
        self.chunk = parse_size(chunk)
        if self.chunk <= 0 or self.size % self.chunk:
            raise ValueError(f"size {self.size} is not a multiple of chunk {self.chunk}")
        self.chunks: dict[int, bytearray] = {}

    def _pieces(self, offset: int, length: int):
        """(chunk index, offset in chunk, length) covering [offset, offset+length)."""
        while length > 0:
            index, start = divmod(offset, self.chunk)
            n = min(length, self.chunk - start)
            yield index, start, n
            offset += n
            length -= n

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        pos = offset
        for buf in bufs:
            done = 0
            for index, start, n in self._pieces(pos, buf.nbytes):
                data = self.chunks.get(index)
                if data is None:
                    buf[done:done + n] = bytes(n)
                else:
                    buf[done:done + n] = data[start:start + n]
                done += n
            pos += buf.nbytes
        return pos - offset

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        pos = offset
        for buf in bufs:
            done = 0
            for index, start, n in self._pieces(pos, buf.nbytes):
                data = self.chunks.get(index)
                if data is None:
                    data = self.chunks[index] = bytearray(self.chunk)
                data[start:start + n] = buf[done:done + n]
                done += n
            pos += buf.nbytes
        return pos - offset

    def discard(self, offset: int, length: int) -> None:
        for index, start, n in self._pieces(offset, length):
            if n == self.chunk:
                self.chunks.pop(index, None)
            elif index in self.chunks:
                self.chunks[index][start:start + n] = bytes(n)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.discard(offset, length)
