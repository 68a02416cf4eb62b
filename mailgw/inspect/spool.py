"""Where an inspected message waits for its verdict [4.9]: memory, then a private file.

A L{Spool} keeps the first L{MEMORY_LIMIT} octets in memory; beyond that everything
(what was in memory too) goes to a file of its own in the spool folder, created
C{0600} (C{mkstemp}) in a folder that is C{0700}, and removed by L{Spool.close}.  A
gateway that crashed leaves files behind: L{clean_spool_folder} removes them at the
next start.  Reading back (L{Spool.chunks}) gives the octets in pieces of at most
C{chunk_size}, so that a replay can follow the reader's flow control.

The file operations are plain local-disk calls on the reactor thread, one chunk at a
time (as Twisted's own C{FileSender} does): the page cache takes them without waiting
for the disk.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["MEMORY_LIMIT", "PREFIX", "Spool", "clean_spool_folder", "prepare_spool_folder"]

#: octets of a message kept in memory before it goes to a file
MEMORY_LIMIT = 256 * 1024
#: the names of spool files begin with it (what L{clean_spool_folder} removes)
PREFIX = "message-"


def prepare_spool_folder(folder: Path) -> int:
    """Make C{folder} (mode 0700) if needed and remove what a crash left in it;
    returns how many files were removed."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return clean_spool_folder(folder)


def clean_spool_folder(folder: Path) -> int:
    """Remove the spool files in C{folder} (left by a gateway that did not stop);
    returns how many.  Only at start, before any session spools."""
    removed = 0
    for entry in folder.glob(PREFIX + "*"):
        try:
            entry.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


class Spool:
    """
    One message's octets (see the module docstring).

    @ivar size: octets written.
    @ivar path: the file, once the message went beyond the memory limit.
    """

    __slots__ = ("_file", "_folder", "_limit", "_memory", "closed", "path", "size")

    def __init__(self, folder: Path, memory_limit: int = MEMORY_LIMIT) -> None:
        self._folder = folder
        self._limit = memory_limit
        self._memory = bytearray()
        self._file: BinaryIO | None = None
        self.path: Path | None = None
        self.size = 0
        self.closed = False

    @property
    def in_memory(self) -> int:
        """Octets held in memory (at most the memory limit)."""
        return len(self._memory)

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ValueError("write to a closed spool")
        if not data:
            return
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        if len(self._memory) + len(data) <= self._limit:
            self._memory += data
            return
        fd, name = tempfile.mkstemp(prefix=PREFIX, dir=self._folder)
        self.path = Path(name)
        self._file = os.fdopen(fd, "w+b")
        self._file.write(self._memory)
        self._file.write(data)
        self._memory = bytearray()

    def chunks(self, chunk_size: int = 65536) -> Iterator[bytes]:
        """The octets written, from the start, in pieces of at most C{chunk_size}
        (read lazily: one piece per C{next})."""
        if self._file is None:
            memory = bytes(self._memory)
            for start in range(0, len(memory), chunk_size):
                yield memory[start : start + chunk_size]
            return
        self._file.flush()
        position = 0
        while not self.closed:
            self._file.seek(position)
            piece = self._file.read(chunk_size)
            if not piece:
                return
            position += len(piece)
            yield piece

    def close(self) -> None:
        """Forget the octets and remove the file (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._memory = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
