"""``mailgw-pop3test``: test POP3 authentication against a mail server the way the pop3
AAA checker does it [2], [5.1].

::

    mailgw-pop3test HOST[:PORT] USER [--tls none|starttls|implicit] [--strip-domain]
                    [--ca PEM] [--no-verify] [--timeout SECONDS]

The password is read without echo from the terminal (one line from stdin when stdin is
not a terminal).  The dialogue is printed, every line sent (``C:``) and received
(``S:``), with the PASS argument and AUTH payloads masked, followed by a verdict.  When
a full address (``user@domain``) is rejected, the login is retried with the domain
stripped, and the verdict says which form the server accepts (``strip_domain``).

Exit status: 0 when a form of the user name works, 1 when none does or the server is
unavailable, 2 on usage errors.

It uses the checker's own login client (L{POP3UpstreamLogin} through a L{Connector}),
so STLS, implicit TLS and certificate verification behave exactly as in the gateway.
"""

from __future__ import annotations

import argparse
import enum
import getpass
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime

from mailgw.auth.pop3 import logout, pop3_username
from mailgw.tls import TLSConfigError
from mailgw.tlsdiag import explain, verify_detail
from mailgw.upstream import Connector, UpstreamLoginRejected, UpstreamTarget, UpstreamUnavailable
from mailgw.upstream.pop3 import POP3UpstreamLogin
from mailgw.wire.lines import LineBuffer, TooLong

__all__ = ["Transcript", "main", "mask_command", "parse_hostport", "run"]

OK = 0
FAILED = 1
USAGE = 2

MASK = "********"
_DEFAULT_PORTS = {"none": 110, "starttls": 110, "implicit": 995}


class UsageError(Exception):
    """A bad command-line argument (exit status 2)."""


def parse_hostport(text: str) -> tuple[str, int | None]:
    """C{host}, C{host:port}, C{[v6]}, C{[v6]:port} or a bare IPv6 literal."""
    text = text.strip()
    if not text:
        raise UsageError("empty host")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host:
            raise UsageError(f"invalid host {text!r}")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise UsageError(f"invalid host {text!r}")
        return host, _port(rest[1:])
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not host:
            raise UsageError(f"invalid host {text!r}")
        return host, _port(port)
    return text, None  # a name, an IPv4 literal or a bare IPv6 literal


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError(f"port must be 1..65535, got {text!r}")
    return int(text)


def mask_command(line: str, in_auth: bool = False) -> str:
    """A client line as printed: the PASS argument, AUTH's initial response and the
    SASL lines that follow an AUTH are masked."""
    keyword, space, rest = line.partition(" ")
    if in_auth:
        return MASK
    if keyword.upper() in ("PASS", "APOP") and space:
        return f"{keyword} {MASK}"
    if keyword.upper() == "AUTH" and space:
        mechanism, more, _ = rest.partition(" ")
        return f"{keyword} {mechanism} {MASK}" if more else f"{keyword} {mechanism}"
    return line


class Transcript:
    """Prints the dialogue to C{out}: C{C: } lines sent, C{S: } lines received,
    C{-- } notes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._in_auth = False
        self._pending = b""

    def sent(self, data: bytes) -> None:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            self._print("C: " + mask_command(line, self._in_auth))
            if line.split(" ", 1)[0].upper() == "AUTH":
                self._in_auth = True

    def received(self, line: bytes) -> None:
        if line.startswith((b"+OK", b"-ERR")):
            self._in_auth = False
        self._print("S: " + line.decode("utf-8", "replace"))

    def note(self, text: str) -> None:
        self._print("-- " + text)

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


class _EchoTransport:
    """A transport wrapper printing every write to the transcript (masked)."""

    def __init__(self, transport: Any, transcript: Transcript) -> None:
        self._transport = transport
        self._transcript = transcript

    def write(self, data: bytes) -> None:
        self._transcript.sent(data)
        self._transport.write(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _TranscribedLogin(POP3UpstreamLogin):
    """The checker's POP3 login client, printing the dialogue."""

    def __init__(
        self,
        target: UpstreamTarget,
        tls_options: IOpenSSLClientConnectionCreator | None,
        transcript: Transcript,
    ) -> None:
        super().__init__(target, tls_options)
        self.transcript = transcript

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport = _EchoTransport(self.transport, self.transcript)  # type: ignore[assignment]

    def line_received(self, line: bytes) -> None:
        self.transcript.received(line)
        super().line_received(line)

    def start_tls(self) -> None:
        verified = "verifying" if self.target.verify_certificate else "NOT verifying"
        self.transcript.note(f"switching to TLS ({verified} the server certificate)")
        super().start_tls()


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    UNAVAILABLE = "unavailable"


#: the options of this command that fix a TLS failure
TLS_HINTS = {"ca": "set --ca", "tls": "try --tls starttls or none"}


async def explain_failure(reactor: Any, target: UpstreamTarget, reason: str) -> str:
    """C{reason} with a raw TLS error in words; for a certificate that does not
    verify, OpenSSL's reason found by a second handshake (in a thread)."""
    detail = None
    if "certificate verify failed" in reason and target.tls != "none":
        pool = getattr(reactor, "getThreadPool", None)
        if pool is not None:
            detail = await threads.deferToThreadPool(
                reactor,
                pool(),
                verify_detail,
                target.host,
                target.port,
                target.tls,
                ca=str(target.ca) if target.ca is not None else None,
                check_hostname=target.verify_certificate,
            )
    return explain(reason, TLS_HINTS, detail=detail)


async def attempt(
    connector: Connector,
    clock: IReactorTime,
    target: UpstreamTarget,
    user: str,
    password: str,
    transcript: Transcript,
) -> tuple[Outcome, str]:
    """One login with C{user}; the outcome and a reason."""
    mode = {"none": "plain text", "starttls": "STLS", "implicit": "implicit TLS"}[target.tls]
    transcript.note(f"connecting to {target.describe()} ({mode}) as {user!r}")

    def make(t: UpstreamTarget, tls: IOpenSSLClientConnectionCreator | None) -> _TranscribedLogin:
        return _TranscribedLogin(t, tls, transcript)

    try:
        protocol, _ = await connector.login(target, make, user, password)
    except UpstreamLoginRejected as e:
        transcript.note(f"login rejected: {e.reason}")
        return Outcome.REJECTED, e.reason
    except UpstreamUnavailable as e:
        reason = await explain_failure(clock, target, e.reason)
        transcript.note(f"server unavailable: {reason}")
        return Outcome.UNAVAILABLE, reason
    transcript.note("logged in")
    lines = LineBuffer(4096)

    def on_data(data: bytes) -> None:
        lines.append(data)
        while (line := lines.next_line()) is not None:
            if not isinstance(line, TooLong):
                transcript.received(line)

    await logout(protocol, clock, on_data=on_data)
    transcript.note("connection closed")
    return Outcome.ACCEPTED, ""


async def run(
    reactor: Any,
    target: UpstreamTarget,
    user: str,
    password: str,
    *,
    strip_domain: bool = False,
    timeout: float = 10.0,
    out: TextIO = sys.stdout,
) -> int:
    """Test the login and print the dialogue and the verdict; returns the exit status."""
    transcript = Transcript(out)
    connector = Connector(reactor, connect_timeout=timeout, login_timeout=timeout)
    if target.tls == "none":
        transcript.note("WARNING: no TLS: the password crosses the network in clear")
    elif not target.verify_certificate:
        transcript.note("WARNING: the server certificate is not verified")
    stripped = pop3_username(user, True)
    first = stripped if strip_domain else user
    try:
        outcome, reason = await attempt(connector, reactor, target, first, password, transcript)
    except TLSConfigError as e:
        transcript.note(f"TLS configuration error: {e}")
        return USAGE

    def verdict(text: str) -> None:
        out.write(f"\nVERDICT: {text}\n")
        out.flush()

    if outcome is Outcome.ACCEPTED:
        if strip_domain and first != user:
            verdict(f"OK: the server accepts {first!r} (the domain stripped, as with strip_domain = true)")
        elif "@" in user:
            verdict(f"OK: the server accepts the full address {user!r} (strip_domain = false)")
        else:
            verdict(f"OK: the server accepts {user!r}")
        return OK
    if outcome is Outcome.UNAVAILABLE:
        verdict(f"FAILED: the server is unavailable ({reason}); the login could not be tested")
        return FAILED
    if first == stripped:
        verdict(f"FAILED: the server rejects {first!r} with this password")
        return FAILED
    transcript.note(f"the full address was rejected; retrying without the domain as {stripped!r}")
    outcome, reason = await attempt(connector, reactor, target, stripped, password, transcript)
    if outcome is Outcome.ACCEPTED:
        verdict(
            f"OK with the domain stripped: the server accepts {stripped!r}, not {user!r} "
            "(set strip_domain = true in the pop3 server group)"
        )
        return OK
    if outcome is Outcome.UNAVAILABLE:
        verdict(f"FAILED: the server rejects {user!r}, and was unavailable for {stripped!r} ({reason})")
        return FAILED
    verdict(f"FAILED: the server rejects both {user!r} and {stripped!r} with this password")
    return FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailgw-pop3test",
        description="Test POP3 authentication against a mail server the way mailgw's pop3 AAA checker does.",
    )
    parser.add_argument("server", metavar="HOST[:PORT]", help="the POP3 server (port: 110, 995 with implicit TLS)")
    parser.add_argument("user", metavar="USER", help="the user name to log in with")
    parser.add_argument(
        "--tls",
        choices=("none", "starttls", "implicit"),
        default="starttls",
        help="none, STLS (default) or TLS from the first byte",
    )
    parser.add_argument(
        "--strip-domain",
        action="store_true",
        help="send user@domain as user, as strip_domain = true does (default: as given, then retried without the"
        " domain if rejected)",
    )
    parser.add_argument("--ca", metavar="PEM", type=Path, help="CA certificates for the server (default: system store)")
    parser.add_argument(
        "--no-verify", action="store_true", help="do not verify the server certificate, INSECURE (default: verify)"
    )
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=10.0, help="per step (default: 10)")
    return parser


def read_password(stdin: TextIO, prompt: str, ask: Callable[[str], str] = getpass.getpass) -> str:
    """Without echo from the terminal; one line from C{stdin} when it is not one."""
    if stdin.isatty():
        return ask(prompt)
    line = stdin.readline()
    if not line:
        raise UsageError("no password on standard input")
    return line.removesuffix("\n").removesuffix("\r")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port = parse_hostport(args.server)
        if args.timeout <= 0:
            raise UsageError("--timeout must be positive")
        if args.ca is not None and not args.ca.is_file():
            raise UsageError(f"--ca: no such file: {args.ca}")
        if not args.user or any(c in args.user for c in "\r\n\0 "):
            raise UsageError("USER must be non-empty, without spaces or control characters")
        password = read_password(sys.stdin, f"Password for {args.user}: ")
        if not password:
            raise UsageError("empty password")
    except UsageError as e:
        parser.error(str(e))
    except (KeyboardInterrupt, EOFError):
        sys.stderr.write("\nmailgw-pop3test: interrupted\n")
        sys.exit(USAGE)
    target = UpstreamTarget(
        host,
        port if port is not None else _DEFAULT_PORTS[args.tls],
        args.tls,
        verify_certificate=not args.no_verify,
        ca=args.ca.absolute() if args.ca is not None else None,
    )

    async def go(reactor: Any) -> None:
        code = await run(reactor, target, args.user, password, strip_domain=args.strip_domain, timeout=args.timeout)
        raise SystemExit(code)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)))
    raise AssertionError("unreachable: react exits")


if __name__ == "__main__":
    main()
