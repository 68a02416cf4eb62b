"""Implicit TLS on the system's OpenSSL, through Python's C{ssl} module [4.1, 10].

The implicit-TLS listeners (POP3S, IMAPS, SMTPS) terminate TLS here instead of in
Twisted's C{TLSMemoryBIOProtocol} over pyOpenSSL:

- memory per idle session: an C{SSL} object of the system's OpenSSL 3.0 takes about
  9 KiB, one of OpenSSL 3.2+ (what the C{cryptography} wheels link) about 16 KiB
  (C{python -m bench.sslnew}); and C{ssl.SSLObject} with two C{MemoryBIO}s is smaller
  than pyOpenSSL's C{Connection};
- CPU: every read, write and handshake step is one call into C, where pyOpenSSL's
  cffi wrappers run several Python functions per call and Twisted's TLS transport cuts
  every write into 16 KiB records in Python.

The STARTTLS ports and the connections to the mail servers keep pyOpenSSL (Twisted's
C{startTLS}); both contexts are built from the same settings (L{mailgw.tls.ServerTLS}).

What C{ssl.SSLContext} does not expose -- the session id context, the CA names of the
CertificateRequest, the session-ticket key -- is set with
the C{libssl} functions that Python's C{_ssl} module links (exported, reached through
C{ctypes}). The C{SSL_CTX} pointer is the first field after the object header of an
C{ssl.SSLContext} (CPython's C{PySSLContext}); L{LibSSL.context_pointer} checks it
against the context's options and verify mode before anything uses it. When the
functions or the pointer cannot be found, L{LibSSL.load} says why and the listeners
fall back to pyOpenSSL.
"""

from __future__ import annotations

import ctypes
import functools
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import (
    IConsumer,
    IHandshakeListener,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

#: what one C{SSLObject.read} asks for: one TLS record holds at most 16 KiB
_READ_SIZE = 16384

_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


class SystemTLSError(Exception):
    """The system's OpenSSL cannot be set up as the gateway needs."""


class LibSSL:
    """The few C{libssl} calls that C{ssl.SSLContext} lacks, on the library of Python's
    C{_ssl} module (see the module's docstring)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        def function(name: str, restype: Any, *argtypes: Any) -> Any:
            f = getattr(library, name)
            f.restype, f.argtypes = restype, list(argtypes)
            return f

        vp = ctypes.c_void_p
        self.ctrl = function("SSL_CTX_ctrl", ctypes.c_long, vp, ctypes.c_int, ctypes.c_long, vp)
        self._get_options = function("SSL_CTX_get_options", ctypes.c_uint64, vp)
        self._get_verify_mode = function("SSL_CTX_get_verify_mode", ctypes.c_int, vp)
        self._set_sid_ctx = function("SSL_CTX_set_session_id_context", ctypes.c_int, vp, ctypes.c_char_p, ctypes.c_uint)
        self._load_client_ca_file = function("SSL_load_client_CA_file", vp, ctypes.c_char_p)
        self._set_client_ca_list = function("SSL_CTX_set_client_CA_list", None, vp, vp)

    @staticmethod
    @functools.cache
    def load() -> LibSSL | str:
        """The calls, or why they cannot be made (cached: a fact of the process)."""
        try:
            import _ssl

            library = LibSSL(ctypes.CDLL(_ssl.__file__))
            library.context_pointer(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        except (OSError, AttributeError, ImportError, SystemTLSError) as e:
            return f"the system's libssl cannot be reached: {e}"
        return library

    def context_pointer(self, context: ssl.SSLContext) -> int:
        """The C{SSL_CTX *} of C{context}, checked."""
        pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        if (
            not pointer
            or self._get_options(pointer) != int(context.options)
            or self._get_verify_mode(pointer) != _VERIFY_MODES[context.verify_mode]
        ):
            raise SystemTLSError("the SSL_CTX of an ssl.SSLContext is not where CPython 3.11 keeps it")
        return pointer

    def set_session_id_context(self, context: ssl.SSLContext, sid_ctx: bytes) -> None:
        if self._set_sid_ctx(self.context_pointer(context), sid_ctx, len(sid_ctx)) != 1:
            raise SystemTLSError("OpenSSL refused the session id context")

    def set_client_ca_names(self, context: ssl.SSLContext, path: Path) -> None:
        """Send the subject names of the certificates in C{path} in the
        CertificateRequest (what pyOpenSSL's C{add_client_ca} does)."""
        names = self._load_client_ca_file(os.fsencode(path))
        if not names:
            raise SystemTLSError(f"{path}: no certificate names for the CertificateRequest")
        self._set_client_ca_list(self.context_pointer(context), names)  # takes ownership


def _no_passphrase() -> bytes:
    raise SystemTLSError("encrypted private keys are not supported")


def server_context(
    cert_path: Path,
    key_path: Path,
    *,
    minimum_version: ssl.TLSVersion,
    verify_mode: ssl.VerifyMode,
    client_ca: Path | None,
    ciphers: str,
    session_id_context: bytes,
) -> ssl.SSLContext:
    """A server context of the system's OpenSSL with the settings of the pyOpenSSL one
    (L{mailgw.tls.ServerTLS} has checked the files already).

    @raise SystemTLSError: the library cannot be reached or refuses a setting.
    """
    library = LibSSL.load()
    if isinstance(library, str):
        raise SystemTLSError(library)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum_version
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        context.set_ciphers(ciphers)
        context.load_cert_chain(cert_path, key_path, password=_no_passphrase)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
    except ssl.SSLError as e:
        raise SystemTLSError(f"the system's OpenSSL refused the TLS files: {error_text(e)}") from e
    context.verify_mode = verify_mode
    if client_ca is not None:
        library.set_client_ca_names(context, client_ca)
    library.set_session_id_context(context, session_id_context)
    return context


def error_text(error: ssl.SSLError) -> str:
    """OpenSSL's reason in the words pyOpenSSL's errors use ("wrong version number")."""
    reason = getattr(error, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    if isinstance(error, ssl.SSLEOFError):
        return "unexpected eof while reading"
    return str(error)


#: the connection's states: the close alert is sent in _CLOSING, the peer's awaited
_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = 0, 1, 2, 3


@implementer(IProtocol, ITransport, IPushProducer, IConsumer)
class SystemTLSProtocol:
    """A server-side TLS connection over a TCP transport: the transport of the protocol
    it wraps (what C{TLSMemoryBIOProtocol} is, for the subset the proxies use).

    - Writes before the handshake is done are held and sent after it; the wrapped
      protocol's C{handshakeCompleted} (L{IHandshakeListener}) is called when it is.
    - A failed handshake sends OpenSSL's alert, closes, and the wrapped protocol's
      C{connectionLost} gets the C{ssl.SSLError}; so does one whose peer goes away
      mid-handshake (C{SSLEOFError}).
    - C{loseConnection} sends the close alert, then reads (and discards) what the peer
      still sends until its close alert or its end, and then closes the TCP connection
      once what is buffered is written: a client still uploading reads the last answer
      instead of a reset (as with Twisted's TLS). A peer that never answers is the
      caller's to abort (L{mailgw.proxy.relay.close_transport}). C{abortConnection}
      closes at once. Nothing more is written after either, nor handed on.
    - One send per burst: what is written while the peer's data is handled (the
      handshake's records, the held greeting, the answers to pipelined commands) goes
      to the TCP transport once, at the end; a write at any other time (a relayed
      answer) at once.
    - Flow control: a producer registered here is registered with the TCP transport
      (TLS adds no buffer of its own: every write is encrypted at once);
      C{pauseProducing} stops reading and stops handing on what was already decrypted.
    """

    __slots__ = (
        "_context",
        "_delivering",
        "_failure",
        "_held",
        "_holding",
        "_in",
        "_out",
        "_paused",
        "_state",
        "_tls",
        "transport",
        "wrapped",
    )

    def __init__(self, context: ssl.SSLContext, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.transport: Any = None
        self._context = context
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls: ssl.SSLObject | None = None
        self._state = _HANDSHAKE
        self._held: list[bytes] | None = []
        self._paused = False
        self._delivering = False
        self._holding = False
        self._failure: Failure | None = None

    # -- IProtocol (from the TCP connection) ---------------------------------------------

    def logPrefix(self) -> str:
        log_prefix = getattr(self.wrapped, "logPrefix", None)
        return f"{log_prefix() if log_prefix else self.wrapped.__class__.__name__} (TLS)"

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._tls = self._context.wrap_bio(self._in, self._out, server_side=True)
        self.wrapped.makeConnection(self)

    def connectionMade(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        if self._state >= _CLOSING:
            if self._state == _CLOSING:
                self._in.write(data)
                self._await_close_alert()
            return
        self._in.write(data)
        self._batched(self._received)

    def _batched(self, step: Callable[[], None]) -> None:
        """Run C{step}: what it makes written (handshake records, the held greeting,
        tickets, answers, a key update's answer) goes out in one send, at the end."""
        outer, self._holding = self._holding, True
        try:
            step()
        finally:
            self._holding = outer
        if not outer and self._state != _CLOSED:
            self._flush()

    def _received(self) -> None:
        if self._state == _HANDSHAKE:
            tls = self._tls
            assert tls is not None
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                return
            except ssl.SSLError as e:
                self._fail(e)
                return
            self._state = _OPEN
            held, self._held = self._held, None
            if held:
                tls.write(b"".join(held))
            if IHandshakeListener.providedBy(self.wrapped):
                self.wrapped.handshakeCompleted()
        self._deliver()

    def connectionLost(self, reason: Failure) -> None:
        if self._state == _HANDSHAKE and self._failure is None and self._tls is not None:
            # The peer went away mid-handshake: what OpenSSL makes of that.
            self._in.write_eof()
            try:
                self._tls.do_handshake()
            except ssl.SSLError as e:
                self._failure = Failure(e)
        self._state = _CLOSED
        self._tls = None
        self.wrapped.connectionLost(self._failure or reason)

    def _deliver(self) -> None:
        """Hand on what is decrypted, until there is nothing more or reading pauses."""
        if self._delivering:
            return
        self._delivering = True
        try:
            while not self._paused and self._state == _OPEN:
                tls = self._tls
                assert tls is not None
                try:
                    data = tls.read(_READ_SIZE)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    self.loseConnection()  # the peer's close alert: answer it and close
                    break
                except ssl.SSLError as e:
                    self._fail(e)
                    break
                if not data:
                    self.loseConnection()
                    break
                self.wrapped.dataReceived(data)
        finally:
            self._delivering = False

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.transport.write(data)

    def _fail(self, error: ssl.SSLError) -> None:
        self._failure = Failure(error)
        self._flush()  # OpenSSL's alert
        self._state = _CLOSED
        self.transport.loseConnection()

    # -- ITransport (to the wrapped protocol) --------------------------------------------

    def write(self, data: bytes) -> None:
        if self._state == _OPEN:
            if data:
                assert self._tls is not None
                try:
                    self._tls.write(data)
                except ssl.SSLError as e:
                    self._fail(e)
                    return
                if not self._holding:
                    self._flush()  # else once, at the end of the batch (L{_batched})
        elif self._state == _HANDSHAKE and self._held is not None:
            self._held.append(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self._state == _OPEN:
            assert self._tls is not None
            self._state = _CLOSING
            try:
                self._tls.unwrap()
            except ssl.SSLWantReadError:
                self._flush()  # the alert is out; the peer's is awaited
                self._await_close_alert()
                return
            except ssl.SSLError:
                pass
            self._flush()
        elif self._state != _HANDSHAKE:
            return
        self._state = _CLOSED
        self.transport.loseConnection()

    def _await_close_alert(self) -> None:
        """After our close alert: discard the peer's data; close at its alert."""
        tls = self._tls
        assert tls is not None
        try:
            while tls.read(_READ_SIZE):
                pass
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError:
            pass  # SSLZeroReturnError (its alert) or a broken record: closed either way
        self._state = _CLOSED
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self._state = _CLOSED
        self.transport.abortConnection()

    @property
    def disconnecting(self) -> bool:
        return self._state >= _CLOSING

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def getHandle(self) -> ssl.SSLObject | None:
        """The connection's C{ssl.SSLObject} (None once closed)."""
        return self._tls

    # -- IConsumer / IPushProducer -------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self.transport.resumeProducing()
        if self._state == _OPEN:
            self._batched(self._deliver)

    def stopProducing(self) -> None:
        self.loseConnection()


class SystemTLSFactory(Factory):
    """Wraps a factory's connections in L{SystemTLSProtocol}, on whatever context
    C{context()} returns when the connection is made (a reload changes it)."""

    noisy = False

    def __init__(self, context: Callable[[], ssl.SSLContext], wrapped: Factory) -> None:
        self._context = context
        self.wrappedFactory = wrapped

    def startFactory(self) -> None:
        self.wrappedFactory.doStart()

    def stopFactory(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        return f"{self.wrappedFactory.logPrefix()} (TLS)"

    def buildProtocol(self, addr: Any) -> SystemTLSProtocol | None:  # type: ignore[override]
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        return SystemTLSProtocol(self._context(), protocol)
