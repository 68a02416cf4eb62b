"""TLS session-ticket keys shared by every process of the gateway, rotated on a
schedule [4.1, 10].

OpenSSL encrypts the session tickets it issues (TLS 1.2 tickets and TLS 1.3 resumption
PSKs alike) with the ticket key of the C{SSL_CTX}: 16 bytes of key name, 32 of HMAC key,
32 of AES key, random per context. With one random key per context a client that
reconnects to another worker process, or to the same process after a reload (a new
context), cannot resume and does a full handshake. The gateway therefore gives every
context the same key: the process that serves by itself, or the supervisor of the
workers, makes a random key, hands it to every worker over their channel and makes a new
one every L{ROTATE_SECONDS} (forward secrecy of the tickets: a stolen key opens only the
tickets of one period). OpenSSL keeps one key per context, so a ticket issued before a
rotation no longer resumes after it: that client does one full handshake and gets a new
ticket.

How the key is set: C{SSL_CTX_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, 80, key)}.
Neither pyOpenSSL nor the C{cryptography} bindings it uses expose that call, and
C{cryptography}'s wheels link OpenSSL statically into C{_rust.abi3.so}, where
C{SSL_CTX_ctrl} is a local (not exported) function. L{TicketKeyControl.locate} finds it
by name in that file's ELF symbol table and calls it through C{ctypes}; every key set is
read back (C{SSL_CTRL_GET_TLSEXT_TICKET_KEYS}) and compared. When the function cannot be
found (a stripped or differently built library, not ELF), nothing is called: tickets
still work, per context, as before, and the gateway says once in its log why they are
not shared. The implicit-TLS listeners' contexts are C{ssl.SSLContext}s of the system's
OpenSSL (L{mailgw.systls}), whose C{libssl} exports C{SSL_CTX_ctrl}
(L{TicketKeyControl.locate_system}); they get the same key.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import ssl
import struct
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailgw.systls import LibSSL, SystemTLSError

#: the size of an OpenSSL ticket key: name (16), HMAC key (32), AES key (32)
TICKET_KEY_BYTES = 80
#: how often the owner of the key makes a new one (seconds)
ROTATE_SECONDS = 3600.0

_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59

_ELF_MAGIC = b"\x7fELF"
_SHT_SYMTAB = 2
_STT_FUNC = 2
_SECTION = struct.Struct("<IIQQQQIIQQ")
_SYMBOL = struct.Struct("<IBBHQQ")

_CtrlFunction = Callable[[int, int, int, object], int]


class TicketKeyError(Exception):
    """A ticket key could not be set on a context."""


def new_ticket_key() -> bytes:
    """A random ticket key."""
    return os.urandom(TICKET_KEY_BYTES)


def _local_functions(path: Path, names: set[bytes]) -> dict[bytes, int]:
    """The addresses (relative to the load base) of the functions C{names} in the
    C{.symtab} of the 64-bit little-endian ELF file C{path}."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != _ELF_MAGIC or data[4] != 2 or data[5] != 1:
            raise TicketKeyError(f"{path}: not a 64-bit little-endian ELF file")
        (section_offset,) = struct.unpack_from("<Q", data, 0x28)
        entry_size, count = struct.unpack_from("<HH", data, 0x3A)
        sections = [_SECTION.unpack_from(data, section_offset + i * entry_size) for i in range(count)]
        found: dict[bytes, int] = {}
        for _, kind, _, _, offset, size, link, _, _, _ in sections:
            if kind != _SHT_SYMTAB or link >= len(sections):
                continue
            strings_offset, strings_size = sections[link][4], sections[link][5]
            strings = data[strings_offset : strings_offset + strings_size]
            wanted: dict[int, bytes] = {}
            for name in names:
                at = strings.find(b"\0" + name + b"\0")
                if at >= 0:
                    wanted[at + 1] = name
            for name_at, info, _, _, value, _ in _SYMBOL.iter_unpack(data[offset : offset + size]):
                if name_at in wanted and info & 0xF == _STT_FUNC and value:
                    found[wanted[name_at]] = value
        return found


def _pyopenssl_pointer(context: SSL.Context) -> int:
    return int(_ffi.cast("uintptr_t", context._context))


class TicketKeyControl:
    """Sets the ticket key of pyOpenSSL contexts (see the module's docstring), or, with
    the C{pointer} of L{mailgw.systls.LibSSL}, of C{ssl.SSLContext}s."""

    def __init__(self, ctrl: _CtrlFunction, pointer: Callable[[Any], int] = _pyopenssl_pointer) -> None:
        self._ctrl = ctrl
        self._pointer = pointer

    @staticmethod
    @functools.cache
    def locate_system() -> TicketKeyControl | str:
        """The control for the system's OpenSSL (Python's C{ssl}), or why there is none."""
        library = LibSSL.load()
        if isinstance(library, str):
            return library
        control = TicketKeyControl(library.ctrl, library.context_pointer)
        try:
            control.set(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), new_ticket_key())  # proves it works
        except (TicketKeyError, SystemTLSError) as e:
            return f"cannot set ticket keys on the system's OpenSSL: {e}"
        return control

    @staticmethod
    @functools.cache
    def locate() -> TicketKeyControl | str:
        """The control for the OpenSSL that pyOpenSSL uses, or why there is none.
        (Cached: the answer is a fact of the loaded library.)"""
        try:
            import cryptography.hazmat.bindings._rust as rust

            path = Path(rust.__file__ or "")
            addresses = _local_functions(path, {b"SSL_CTX_ctrl", b"PyInit__rust"})
            if set(addresses) != {b"SSL_CTX_ctrl", b"PyInit__rust"}:
                return f"{path.name} has no symbol table with SSL_CTX_ctrl (stripped?)"
            # Where the library is loaded: an exported function's address minus its
            # offset in the file (dlopen of a loaded library returns it again).
            library = ctypes.CDLL(str(path))
            exported = ctypes.cast(library.PyInit__rust, ctypes.c_void_p).value
            if exported is None:
                return f"{path.name}: PyInit__rust has no address"
            base = exported - addresses[b"PyInit__rust"]
            prototype = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
            ctrl = prototype(base + addresses[b"SSL_CTX_ctrl"])
            control = TicketKeyControl(ctrl)
            control.set(SSL.Context(SSL.TLS_SERVER_METHOD), new_ticket_key())  # proves it works
        except (OSError, ValueError, AttributeError, ImportError, TicketKeyError, struct.error) as e:
            return f"cannot reach SSL_CTX_ctrl: {e}"
        return control

    def set(self, context: SSL.Context | ssl.SSLContext, key: bytes) -> None:
        """Make C{key} the ticket key of C{context}; checked by reading it back."""
        if len(key) != TICKET_KEY_BYTES:
            raise TicketKeyError(f"a ticket key has {TICKET_KEY_BYTES} bytes, not {len(key)}")
        pointer = self._pointer(context)
        if self._ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEY_BYTES, key) != 1:
            raise TicketKeyError("OpenSSL refused the ticket key")
        back = ctypes.create_string_buffer(TICKET_KEY_BYTES)
        if self._ctrl(pointer, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, TICKET_KEY_BYTES, back) != 1 or back.raw != key:
            raise TicketKeyError("the ticket key read back is not the one set")


class TicketKeys:
    """This process's ticket key and the server contexts that use it.

    @param key: the key to start with (a worker: its supervisor's); None: a random one.
    @param control: how keys are set on pyOpenSSL contexts (default:
        L{TicketKeyControl.locate}); a string says why they cannot be, and then every
        context keeps its own random key.
    @param system_control: the same for C{ssl.SSLContext}s (default:
        L{TicketKeyControl.locate_system}).
    """

    log = Logger()

    def __init__(
        self,
        key: bytes | None = None,
        control: TicketKeyControl | str | None = None,
        system_control: TicketKeyControl | str | None = None,
    ) -> None:
        self.key = key if key is not None else new_ticket_key()
        self.control: TicketKeyControl | str = control if control is not None else TicketKeyControl.locate()
        self.system_control: TicketKeyControl | str = (
            system_control if system_control is not None else TicketKeyControl.locate_system()
        )
        self._contexts: weakref.WeakSet[SSL.Context | ssl.SSLContext] = weakref.WeakSet()
        self._warned = False

    @property
    def shared(self) -> bool:
        """Whether contexts get this key (tickets resume across workers and reloads)."""
        return isinstance(self.control, TicketKeyControl) and isinstance(self.system_control, TicketKeyControl)

    def use(self, context: SSL.Context | ssl.SSLContext) -> None:
        """C{context} encrypts and accepts tickets with the key, now and after changes."""
        self._contexts.add(context)
        self._apply(context)

    def set(self, key: bytes) -> None:
        """A new key (a rotation) for every context in use."""
        self.key = key
        for context in list(self._contexts):
            self._apply(context)

    def _apply(self, context: SSL.Context | ssl.SSLContext) -> None:
        control = self.system_control if isinstance(context, ssl.SSLContext) else self.control
        if isinstance(control, str):
            if not self._warned:
                self._warned = True
                self.log.warn(
                    "TLS session tickets are not shared between workers or across reloads: {reason}",
                    reason=control,
                )
            return
        try:
            control.set(context, self.key)
        except TicketKeyError as e:
            self.log.error("Cannot set the TLS session-ticket key: {reason}", reason=str(e))


class TicketKeyRotation(Service):
    """The owner of the key (the process that serves alone, or the supervisor): a new
    random key every C{every} seconds, handed to each subscriber (the process's own
    L{TicketKeys}, the workers)."""

    log = Logger()
    name = "ticket-keys"

    def __init__(self, clock: IReactorTime, key: bytes, every: float = ROTATE_SECONDS) -> None:
        self.key = key
        self.every = every
        self.rotations = 0
        self._subscribers: list[Callable[[bytes], None]] = []
        self._loop = LoopingCall(self.rotate)
        self._loop.clock = clock

    def subscribe(self, receiver: Callable[[bytes], None]) -> None:
        self._subscribers.append(receiver)

    def rotate(self) -> None:
        self.key = new_ticket_key()
        self.rotations += 1
        for receiver in self._subscribers:
            receiver(self.key)
        self.log.info("TLS session-ticket key rotated (rotation {rotations})", rotations=self.rotations)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.every, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
