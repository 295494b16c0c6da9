"""Triton's shared-memory extension: a client on the same host writes a frame into memory it
shares with the server and sends only the region's name, offset and size; the server reads
the frame from there (one memory copy, no network bytes) and can write outputs back.

Vocabulary (Triton's):

- a *key* names a POSIX shared-memory object (``shm_open``: ``/dev/shm/<key>`` on Linux), as
  ``tritonclient.utils.shared_memory.create_shared_memory_region`` makes it;
- a *region* is a registered window of one: (name, key, offset, byte_size);
- a *reference* is a tensor's ``shared_memory_region`` / ``_byte_size`` / ``_offset``
  parameters: a window of a region.

The rules, since a client names memory on the server's host (docs/security.md): off unless
``--allow-shared-memory``; only clients on this host register (loopback or a Unix socket); a
key is one name (no path, no ``..``), begins with ``--shared-memory-key-prefix`` when that is
set, and names a regular file (never followed through a link); regions are server-wide, as
Triton's, at most ``--max-shared-memory-regions``; a name is registered once; every window
lies inside its region and its region inside the object.

An unregistered region is only dropped from the table: a request already holding it keeps
its mapping, which closes when the last holder lets go (CPython frees it then). The object's
size is checked again before every copy, so one a client shrinks fails that request only,
with INVALID_ARGUMENT, instead of a SIGBUS (a shrink between the check and the copy is a
window of microseconds the check cannot close).

CUDA shared memory is not offered: registering a CUDA region answers UNAVAILABLE.
"""

from __future__ import annotations

import ipaddress
import mmap
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AlreadyExistsError, BadInputError, NotFoundError, OverloadedError, UnavailableError

SHM_DIR = Path("/dev/shm")
_KEY = re.compile(r"/?([A-Za-z0-9_.\-]{1,255})")
PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
OFF = "shared memory is off on this server (start it with --allow-shared-memory)"
NO_CUDA = ("CUDA shared memory is not offered by this server; write the frame to system shared "
           "memory (tritonclient.utils.shared_memory) instead")


def is_local(client: str) -> bool:
    """Whether a client (``inference.client_of``) is on this host: loopback or a Unix socket."""
    if client.startswith("unix:"):
        return True
    try:
        return ipaddress.ip_address(client).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Reference:
    """A tensor's window of a region: ``byte_size`` bytes from ``offset`` within it."""

    region: str
    byte_size: int
    offset: int = 0

    @classmethod
    def of(cls, parameters: Mapping[str, Any], what: str) -> Reference | None:
        """From a tensor's parameters (None when it names no region); BadInputError if a
        parameter is missing or not a size."""
        if "shared_memory_region" not in parameters:
            stray = [p for p in PARAMETERS if p in parameters]
            if stray:
                raise BadInputError(f"{what} has {stray} but no 'shared_memory_region'")
            return None
        region = parameters["shared_memory_region"]
        if not isinstance(region, str) or not region:
            raise BadInputError(f"{what}: 'shared_memory_region' must be a region's name")
        if "shared_memory_byte_size" not in parameters:
            raise BadInputError(f"{what} names region {region!r} without 'shared_memory_byte_size'")
        sizes = [parameters.get("shared_memory_byte_size"), parameters.get("shared_memory_offset", 0)]
        if not all(type(v) is int and v >= 0 for v in sizes):  # bool is not a size
            raise BadInputError(f"{what}: shared_memory_byte_size and shared_memory_offset must be "
                                f"whole numbers >= 0, got {sizes}")
        return cls(region, *sizes)


class Region:
    """A registered region: ``byte_size`` bytes at ``offset`` of the object ``key``, mapped."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int, directory: Path):
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        path = directory / _KEY.fullmatch(key).group(1)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"no shared memory object with key {key!r} on this host") from None
        except OSError as exc:  # a link (ELOOP), no permission, ...
            raise BadInputError(f"cannot open shared memory object {key!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BadInputError(f"shared memory object {key!r} is not a plain memory object")
            if offset + byte_size > info.st_size or byte_size == 0:
                raise BadInputError(f"region {name!r} ({byte_size} bytes at offset {offset}) does not "
                                    f"fit object {key!r} of {info.st_size} bytes")
            self._map = mmap.mmap(fd, offset + byte_size)  # keeps its own descriptor
        finally:
            os.close(fd)

    def _window(self, ref: Reference, what: str) -> int:
        """The object offset of a reference's window, after checking it fits the region and
        the object has not shrunk since."""
        if ref.offset + ref.byte_size > self.byte_size:
            raise BadInputError(f"{what}: {ref.byte_size} bytes at offset {ref.offset} do not fit "
                                f"region {self.name!r} of {self.byte_size} bytes")
        if self._map.size() < self.offset + self.byte_size:
            raise BadInputError(f"{what}: shared memory object {self.key!r} shrank below region "
                                f"{self.name!r}; register it again")
        return self.offset + ref.offset

    def read(self, ref: Reference, what: str) -> bytes:
        start = self._window(ref, what)
        return self._map[start : start + ref.byte_size]

    def write(self, ref: Reference, data: bytes, what: str) -> None:
        start = self._window(ref, what)
        if len(data) > ref.byte_size:
            raise BadInputError(f"{what} is {len(data)} bytes; shared_memory_byte_size {ref.byte_size} "
                                "cannot hold it")
        self._map[start : start + len(data)] = data

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class SharedMemory:
    """The server's registered system regions, and the rules for registering one."""

    def __init__(self, enabled: bool = False, max_regions: int = 64, key_prefix: str = "",
                 directory: Path = SHM_DIR):
        self.enabled, self.max_regions, self.key_prefix = enabled, max_regions, key_prefix
        self.directory = directory
        self.regions: dict[str, Region] = {}

    def _check_on(self) -> None:
        if not self.enabled:
            raise UnavailableError(OFF)

    def register(self, client: str, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_on()
        if not is_local(client):
            raise BadInputError(f"shared memory is for clients on the server's host; {client!r} is not")
        if not name:
            raise BadInputError("a shared memory region needs a name")
        if name in self.regions:
            raise AlreadyExistsError(f"shared memory region {name!r} is already registered; "
                                     "unregister it first")
        if not _KEY.fullmatch(key) or key.strip("/") in (".", ".."):
            raise BadInputError(f"shared memory key {key!r} must be one name of letters, digits, "
                                "'_', '.' or '-' (an optional leading '/'), not a path")
        if not key.lstrip("/").startswith(self.key_prefix):
            raise BadInputError(f"shared memory key {key!r} must begin with {self.key_prefix!r} "
                                "(--shared-memory-key-prefix)")
        if type(offset) is not int or type(byte_size) is not int or offset < 0 or byte_size < 0:
            raise BadInputError(f"offset and byte_size must be whole numbers >= 0, got {offset!r}, "
                                f"{byte_size!r}")
        if len(self.regions) >= self.max_regions:
            raise OverloadedError(f"{len(self.regions)} shared memory regions are registered (the "
                                  f"limit is {self.max_regions}); unregister one first")
        self.regions[name] = Region(name, key, offset, byte_size, self.directory)

    def unregister(self, name: str = "") -> None:
        """One region, or every one when name is ''; an unknown name is no error (Triton's)."""
        self._check_on()
        if name:
            self.regions.pop(name, None)
        else:
            self.regions.clear()

    def status(self, name: str = "") -> list[dict[str, Any]]:
        self._check_on()
        if not name:
            return [r.status() for _, r in sorted(self.regions.items())]
        return [self.region(name).status()]

    def region(self, name: str) -> Region:
        self._check_on()
        if name not in self.regions:
            raise NotFoundError(f"no shared memory region {name!r} is registered")
        return self.regions[name]

    def read(self, ref: Reference, what: str) -> bytes:
        """A copy of a reference's bytes, taken now: the request holds no mapping after."""
        return self.region(ref.region).read(ref, what)
