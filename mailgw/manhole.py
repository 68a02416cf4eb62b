"""The Manhole [8.2]: a Python shell inside the running daemon, over SSH on loopback.

Built as Twisted's C{manhole_tap} builds its SSH side (a C{TerminalRealm} running
C{ColoredManhole} behind a C{ConchFactory}), with what a daemon needs on top:

  - public-key logins only, against an authorized-keys file read at each login (a key
    removed from the file is refused at once; a file others may write is ignored,
    like OpenSSH's C{StrictModes});
  - the server's host key generated once (Ed25519, mode 0600) into the state folder;
  - the endpoint refused unless it is a loopback address;
  - besides the interactive shell, C{ssh -p PORT HOST 'EXPRESSION'} evaluates one
    expression (or statement) and prints its C{repr}: handy for scripts.

The namespace holds what the gateway passes in (its services, the session registry,
the configuration); each session gets its own copy, so names one administrator binds do
not leak into another's session.  The configuration's secrets are L{mailgw.config.Secret}
objects, whose C{repr} hides the value.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import redirect_stdout
from io import BytesIO, StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application.service import IService
from twisted.conch import manhole
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.error import ValidPublicKey
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.manhole_ssh import ConchFactory, TerminalSession, TerminalUser
from twisted.conch.ssh import keys
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import components
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.config import split_endpoint
from mailgw.metrics import AdminListener

log = Logger()

#: longest authorized-keys file read (it is read in the reactor thread at each login)
MAX_AUTHORIZED_KEYS_SIZE = 256 * 1024


class ManholeError(Exception):
    """The Manhole cannot start as configured (endpoint not on loopback, host key
    unusable)."""


# -- endpoint ------------------------------------------------------------------------------


def manhole_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """The TCP endpoint of an C{ssh:PORT:interface=ADDRESS} description.

    @raise ManholeError: the description is malformed, or its interface is missing or
        not a loopback address (the configuration checks this too; this is the last
        line of defence against a shell open to the network).
    """
    kind, *arguments = split_endpoint(description)
    if kind != "ssh" or not arguments:
        raise ManholeError(f"admin.manhole: expected ssh:PORT:interface=ADDRESS, got {description!r}")
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for argument in arguments:
        name, sep, value = argument.partition("=")
        if sep:
            keywords[name] = value
        else:
            positional.append(argument)
    unknown = set(keywords) - {"port", "interface", "backlog"}
    if unknown:
        raise ManholeError(f"admin.manhole: unknown parameter {sorted(unknown)[0]!r} in {description!r}")
    port_text = positional[0] if positional else keywords.get("port", "")
    if len(positional) > 1 or not (port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535):
        raise ManholeError(f"admin.manhole: bad port in {description!r}")
    interface = keywords.get("interface", "")
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ManholeError(
            f"admin.manhole: the Manhole listens on loopback only (interface=127.0.0.1 or interface=\\:\\:1), "
            f"got {description!r}"
        )
    backlog = int(keywords["backlog"]) if keywords.get("backlog", "").isdigit() else 50
    if address.version == 6:
        return TCP6ServerEndpoint(reactor, int(port_text), backlog=backlog, interface=str(address))
    return TCP4ServerEndpoint(reactor, int(port_text), backlog=backlog, interface=str(address))


# -- keys ----------------------------------------------------------------------------------


def ensure_host_key(path: Path) -> keys.Key:
    """The Manhole's SSH host key at C{path}, generated (Ed25519, mode 0600) on first use.

    @raise ManholeError: the file exists but is not a private key.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        data = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        log.info("Generated the Manhole's SSH host key {path}", path=str(path))
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warn(
            "Manhole host key {path} was readable by others (mode {mode:o}): now 0600",
            path=str(path),
            mode=mode,
        )
        path.chmod(0o600)
    try:
        host_key: keys.Key = keys.Key.fromString(path.read_bytes())
    except (keys.BadKeyError, ValueError) as e:
        raise ManholeError(f"Manhole host key {path}: not a usable private key ({e})") from None
    if not host_key.isPublic() and host_key.type() in ("Ed25519", "EC"):
        return host_key
    raise ManholeError(f"Manhole host key {path}: must be an Ed25519 or ECDSA private key")


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """The keys of an authorized-keys file, for any user name, read at each login."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def getAuthorizedKeys(self, avatarId: bytes) -> Iterator[keys.Key]:
        try:
            with open(self.path, "rb") as f:
                info = os.fstat(f.fileno())
                if info.st_mode & 0o022:
                    log.error(
                        "Manhole: ignoring {path}: writable by group or others (mode {mode:o})",
                        path=str(self.path),
                        mode=stat.S_IMODE(info.st_mode),
                    )
                    return iter(())
                data = f.read(MAX_AUTHORIZED_KEYS_SIZE + 1)
        except OSError as e:
            log.error("Manhole: cannot read {path}: {error}", path=str(self.path), error=str(e))
            return iter(())
        if len(data) > MAX_AUTHORIZED_KEYS_SIZE:
            log.error("Manhole: ignoring {path}: larger than {size} bytes", path=str(self.path),
                      size=MAX_AUTHORIZED_KEYS_SIZE)
            return iter(())
        return iter(list(readAuthorizedKeyFile(BytesIO(data))))


@implementer(ICredentialsChecker)
class LoggingKeyChecker:
    """Logs Manhole logins (user and key fingerprint) and refusals."""

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, checker: SSHPublicKeyChecker) -> None:
        self._checker = checker

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        try:
            fingerprint = keys.Key.fromString(credentials.blob).fingerprint(keys.FingerprintFormats.SHA256_BASE64)
        except keys.BadKeyError:
            fingerprint = "(unreadable key)"
        user = credentials.username.decode("utf-8", "replace")

        def accepted(avatar: bytes | tuple[()]) -> bytes | tuple[()]:
            log.info("Manhole login: {user} with key {fingerprint}", user=user, fingerprint=fingerprint)
            return avatar

        def refused(failure: Failure) -> Failure:
            if failure.check(UnauthorizedLogin) and not failure.check(ValidPublicKey):
                log.warn("Manhole login refused: {user} with key {fingerprint}", user=user, fingerprint=fingerprint)
            return failure

        d: defer.Deferred[bytes | tuple[()]] = self._checker.requestAvatarId(credentials)
        return d.addCallbacks(accepted, refused)


# -- sessions ------------------------------------------------------------------------------


def evaluate(source: str, namespace: dict[str, Any]) -> tuple[Any, str, bool]:
    """Run C{source} (an expression, else statements) in C{namespace}.

    @return: the expression's value (C{None} for statements), what it printed, and
        whether it succeeded (else the printed text ends with the traceback).
    """
    out = StringIO()
    try:
        with redirect_stdout(out):
            try:
                code = compile(source, "<manhole>", "eval")
            except SyntaxError:
                exec(compile(source, "<manhole>", "exec"), namespace)  # noqa: S102 - it is a Python shell
                return None, out.getvalue(), True
            return eval(code, namespace), out.getvalue(), True  # noqa: S307 - it is a Python shell
    except SystemExit as e:
        return None, out.getvalue(), e.code in (None, 0)
    except Exception:  # noqa: BLE001 - the administrator's code may raise anything; show it, keep the daemon
        return None, out.getvalue() + traceback.format_exc(), False


class _Interpreter(manhole.ManholeInterpreter):
    """C{exit()} (SystemExit) leaves the shell instead of reaching the reactor."""

    def push(self, line: bytes) -> bool:
        try:
            return bool(super().push(line))
        except SystemExit:
            self.resetBuffer()
            self.handler.terminal.loseConnection()
            return False


class _Shell(manhole.ColoredManhole):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.interpreter = _Interpreter(self, self.namespace)


@implementer(ISession)
class ManholeSession(TerminalSession):
    """A Manhole SSH session: the interactive shell (with or without a pty), or one
    command run with C{ssh HOST 'EXPRESSION'}."""

    width = 80
    height = 24

    def __init__(self, original: components.Componentized, namespace: Mapping[str, Any], reactor: Any) -> None:
        super().__init__(original)
        self.namespace = namespace
        self.reactor = reactor
        self._terminal: insults.ServerProtocol | None = None
        self._closed = False

    def openShell(self, proto: Any) -> None:
        terminal = insults.ServerProtocol(_Shell, dict(self.namespace))
        self._terminal = terminal
        _connect_shell(proto, terminal, IConchUser(self.original), self.width, self.height)

    def windowChanged(self, newWindowSize: tuple[int, int, int, int]) -> None:
        self.height, self.width = newWindowSize[:2]
        if self._terminal is not None and self._terminal.terminalProtocol is not None:
            self._terminal.terminalProtocol.terminalSize(self.width, self.height)

    def eofReceived(self) -> None:
        pass

    def closed(self) -> None:
        self._closed = True

    def execCommand(self, proto: Any, command: bytes) -> None:
        # After the request's answer is sent: the command may end the channel at once.
        self.reactor.callLater(0, self._run, proto, command)

    def _run(self, proto: Any, command: bytes) -> None:
        value, printed, ok = evaluate(command.decode("utf-8", "replace"), dict(self.namespace))
        proto.write(printed.encode("utf-8", "replace"))
        if isinstance(value, defer.Deferred):

            def done(result: object) -> None:
                if self._closed:
                    return
                if isinstance(result, Failure):
                    proto.write(result.getTraceback().encode("utf-8", "replace"))
                    _end(proto, False)
                else:
                    _end(proto, True, result)

            value.addBoth(done)
        else:
            _end(proto, ok, value)


def _connect_shell(proto: Any, terminal: insults.ServerProtocol, avatar: Any, width: int, height: int) -> None:
    """Join the SSH channel and the terminal, as C{TerminalSessionTransport} does,
    except that leaving the shell (Ctrl-D) reports exit status 0 to the client."""
    channel = proto.session
    proto.makeConnection(
        SimpleNamespace(write=terminal.dataReceived, loseConnection=lambda: avatar.conn.sendClose(channel))
    )
    terminal.makeConnection(
        SimpleNamespace(write=proto.write, loseConnection=lambda: _end(proto, True))
    )
    if terminal.terminalProtocol is not None:
        terminal.terminalProtocol.terminalSize(width, height)


def _end(proto: Any, ok: bool, value: object = None) -> None:
    if value is not None:
        proto.write((repr(value) + "\n").encode("utf-8", "replace"))
    reason = Failure(ProcessDone(0)) if ok else Failure(ProcessTerminated(exitCode=1))
    proto.processEnded(reason)


@implementer(IRealm)
class ManholeRealm:
    """Gives each login a L{ManholeSession} over its own copy of the namespace."""

    def __init__(self, namespace: Mapping[str, Any], reactor: Any) -> None:
        self.namespace = namespace
        self.reactor = reactor

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> tuple[Any, Any, Callable[[], None]]:
        if IConchUser not in interfaces:
            raise TypeError("the Manhole only gives SSH users")
        original = components.Componentized()
        user = TerminalUser(original, avatarId)
        original.setComponent(IConchUser, user)
        original.setComponent(ISession, ManholeSession(original, self.namespace, self.reactor))
        return IConchUser, user, lambda: None


def manhole_factory(
    authorized_keys: Path, namespace: Mapping[str, Any], reactor: Any, *, host_key: Path
) -> ConchFactory:
    """The SSH factory of the Manhole."""
    key = ensure_host_key(host_key)
    checker = LoggingKeyChecker(SSHPublicKeyChecker(AuthorizedKeysFile(authorized_keys)))
    factory = ConchFactory(Portal(ManholeRealm(namespace, reactor), [checker]))
    # Instance attributes: ConchFactory's class-level dicts are shared by every factory.
    # (Twisted annotates them as bytes, but they hold Key objects, as in manhole_tap.)
    factory.publicKeys = {key.sshType(): key.public()}  # type: ignore[dict-item]
    factory.privateKeys = {key.sshType(): key}  # type: ignore[dict-item]
    factory.noisy = False
    return factory


def manhole_service(
    endpoint: str, authorized_keys: Path, namespace: Mapping[str, Any], reactor: Any, *, host_key: Path
) -> IService:
    """The Manhole listening on C{endpoint} (C{ssh:PORT:interface=LOOPBACK}).

    @param authorized_keys: the keys allowed in (OpenSSH authorized_keys format).
    @param namespace: the names the shell starts with.
    @param host_key: where the server's host key is kept (generated if missing),
        normally in the state folder.
    @raise ManholeError: the endpoint is not on loopback or the host key is unusable.
    """
    return AdminListener(
        manhole_endpoint(reactor, endpoint),
        manhole_factory(authorized_keys, namespace, reactor, host_key=host_key),
        name="admin/manhole",
        description=f"manhole ({endpoint})",
    )
