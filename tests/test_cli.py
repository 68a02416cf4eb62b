"""Tests for :mod:`mailgw.admin.cli`, the offline ``mailgwctl`` commands (SPEC [2])."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import replace
from io import StringIO
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailgw.admin.cli import COMMANDS, Command, Streams, main
from mailgw.auth.passwords import verify_password
from mailgw.config import ConfigError, load_config
from mailgw.startup import host_problems
from tests.servers import tomlwriter
from tests.servers.base import free_ports

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "etc" / "mailgw.toml"


class TerminalInput(StringIO):
    """Standard input that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


class ScriptedGetpass:
    """A getpass that answers from a list and records the prompts."""

    def __init__(self, *answers: str | BaseException) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class Run:
    """One in-process run of mailgwctl with captured output."""

    def __init__(self, argv: list[str], stdin: StringIO | None = None, getpass: ScriptedGetpass | None = None) -> None:
        self.stdout = StringIO()
        self.stderr = StringIO()
        self.status = main(
            argv,
            stdin=stdin or StringIO(""),
            stdout=self.stdout,
            stderr=self.stderr,
            getpass=getpass if getpass is not None else ScriptedGetpass(),
        )

    @property
    def out(self) -> str:
        return self.stdout.getvalue()

    @property
    def err(self) -> str:
        return self.stderr.getvalue()


class CheckConfigTests(SynchronousTestCase):
    """``mailgwctl check-config PATH``."""

    def test_sampleIsValid(self) -> None:
        """The sample is valid: exit 0 and one line saying so."""
        run = Run(["check-config", "--no-host-checks", str(SAMPLE)])
        self.assertEqual((run.status, run.out, run.err), (0, f"{SAMPLE}: configuration is valid\n", ""))

    def test_problems(self) -> None:
        """An invalid file: exit 1 and exactly ConfigError's problems, one per line, on stdout."""
        path = Path(self.mktemp())
        path.write_text(SAMPLE.read_text().replace("port = 110", "port = 99999", 1) + "\n[gateway2]\n")
        run = Run(["check-config", str(path)])
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        self.assertEqual(run.status, 1)
        self.assertEqual(run.out.splitlines(), raised.exception.problems)
        self.assertIn("pop3s.default_server.port: must be 1..65535, got 99999", run.out.splitlines())
        self.assertIn('gateway2: unknown key (did you mean "gateway"?)', run.out.splitlines())

    def test_builtInDefaultNamed(self) -> None:
        """A proxy left on the built-in LOCAL group when there is none: the message says
        that LOCAL is the built-in default, and what to do."""
        path = Path(self.mktemp())
        path.write_text('[tls]\ngenerate_self_signed = true\n'
                        '[pop3s]\nauthentication_server_group = "corp"\n[imap4s]\nenabled = false\n'
                        '[smtps]\nenabled = false\n[[aaa_server_group]]\nname = "corp"\nprotocol = "radius"\n'
                        'servers = [{ host = "10.0.0.1", secret = "s" }]\n[[interface]]\nname = "lan"\n'
                        'address = "127.0.0.1"\n[pop3s.default_server]\nhost = "127.0.0.1"\n')  # fmt: skip
        self.assertEqual(Run(["check-config", "--no-host-checks", str(path)]).status, 0)
        path.write_text(path.read_text().replace('enabled = false\n[smtps]', 'enabled = true\n[smtps]'))
        run = Run(["check-config", "--no-host-checks", str(path)])
        self.assertEqual(
            run.out.splitlines(),
            ["imap4s.authentication_server_group: no aaa_server_group named 'LOCAL' ('LOCAL' is the built-in"
             " default: define that group, or set authentication_server_group)"],
        )  # fmt: skip

    def test_missingFile(self) -> None:
        """A missing file is one problem line and exit 1."""
        path = self.mktemp()
        run = Run(["check-config", path])
        self.assertEqual((run.status, run.out), (1, f"{path}: cannot read: No such file or directory\n"))

    def test_json(self) -> None:
        """--json prints one JSON object with the verdict and the problems."""
        run = Run(["--json", "check-config", "--no-host-checks", str(SAMPLE)])
        self.assertEqual(json.loads(run.out), {"path": str(SAMPLE), "valid": True, "problems": []})
        path = Path(self.mktemp())
        path.write_text("[gateway]\nworkers = 257\n")
        run = Run(["--json", "check-config", str(path)])
        result = json.loads(run.out)
        self.assertEqual(run.status, 1)
        self.assertFalse(result["valid"])
        self.assertIn("gateway.workers: must be 0..256, got 257", result["problems"])

    def test_subprocess(self) -> None:
        """The real entry point, run as a program, validates the sample."""
        result = subprocess.run(
            [sys.executable, "-m", "mailgw.admin.cli", "check-config", "--no-host-checks", str(SAMPLE)],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        self.assertEqual((result.returncode, result.stdout), (0, f"{SAMPLE}: configuration is valid\n"))

    def test_subprocessInvalid(self) -> None:
        """Run as a program on an invalid file, it exits 1 with the problem lines."""
        path = Path(self.mktemp()).absolute()
        path.write_text("[gateway]\nbogus = 1\n")
        result = subprocess.run(
            [sys.executable, "-m", "mailgw.admin.cli", "check-config", str(path)],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("gateway.bogus: unknown key\n", result.stdout)


class HashPasswordTests(SynchronousTestCase):
    """``mailgwctl hash-password``."""

    def test_fromStdin(self) -> None:
        """Not on a terminal: one line from stdin, hashed with bcrypt, printed."""
        run = Run(["hash-password"], stdin=StringIO("s3cret pw\nignored\n"))
        self.assertEqual(run.status, 0)
        hashed = run.out.strip()
        self.assertTrue(hashed.startswith("$2b$12$"))
        self.assertTrue(verify_password(hashed, "s3cret pw"))
        self.assertEqual(run.out, hashed + "\n")

    def test_crlfLine(self) -> None:
        """A CR LF line ending is not part of the password."""
        run = Run(["hash-password"], stdin=StringIO("pw\r\n"))
        self.assertTrue(verify_password(run.out.strip(), "pw"))

    def test_noNewline(self) -> None:
        """The last line may lack its newline."""
        run = Run(["hash-password"], stdin=StringIO("pw"))
        self.assertTrue(verify_password(run.out.strip(), "pw"))

    def test_argon2(self) -> None:
        """--scheme argon2 gives an argon2id hash."""
        run = Run(["hash-password", "--scheme", "argon2"], stdin=StringIO("pw\n"))
        self.assertTrue(run.out.startswith("$argon2id$"))
        self.assertTrue(verify_password(run.out.strip(), "pw"))

    def test_json(self) -> None:
        """--json prints the scheme and the hash."""
        run = Run(["--json", "hash-password"], stdin=StringIO("pw\n"))
        result = json.loads(run.out)
        self.assertEqual(result["scheme"], "bcrypt")
        self.assertTrue(verify_password(result["hash"], "pw"))

    def test_emptyRefused(self) -> None:
        """An empty password (or no input) is refused with exit 1."""
        for stdin in ("\n", ""):
            run = Run(["hash-password"], stdin=StringIO(stdin))
            self.assertEqual((run.status, run.out, run.err), (1, "", "mailgwctl: empty password refused\n"))

    def test_tooLongForBcrypt(self) -> None:
        """A password bcrypt cannot take is refused with a hint."""
        run = Run(["hash-password"], stdin=StringIO("x" * 73 + "\n"))
        self.assertEqual(run.status, 1)
        self.assertIn("argon2", run.err)

    def test_terminalAsksTwice(self) -> None:
        """On a terminal the password is read twice without echo and must match."""
        getpass = ScriptedGetpass("tty-pw", "tty-pw")
        run = Run(["hash-password"], stdin=TerminalInput(""), getpass=getpass)
        self.assertEqual(run.status, 0)
        self.assertEqual(getpass.prompts, ["Password: ", "Password (again): "])
        self.assertTrue(verify_password(run.out.strip(), "tty-pw"))

    def test_terminalMismatch(self) -> None:
        """Two different answers: a message and exit 1, no hash."""
        run = Run(["hash-password"], stdin=TerminalInput(""), getpass=ScriptedGetpass("one", "two"))
        self.assertEqual((run.status, run.out, run.err), (1, "", "mailgwctl: the passwords do not match\n"))

    def test_terminalEndOfFile(self) -> None:
        """End of input at the prompt: exit 1."""
        run = Run(["hash-password"], stdin=TerminalInput(""), getpass=ScriptedGetpass(EOFError()))
        self.assertEqual((run.status, run.err), (1, "mailgwctl: no password read\n"))

    def test_interrupted(self) -> None:
        """Ctrl-C at the prompt: exit 130 without a traceback."""
        run = Run(["hash-password"], stdin=TerminalInput(""), getpass=ScriptedGetpass(KeyboardInterrupt()))
        self.assertEqual((run.status, run.err), (130, "mailgwctl: interrupted\n"))

    def test_passwordNeverPrinted(self) -> None:
        """The password itself appears in no output."""
        run = Run(["hash-password"], stdin=StringIO("Unique-Passw0rd\n"))
        self.assertNotIn("Unique-Passw0rd", run.out + run.err)


class ParserTests(SynchronousTestCase):
    """Global options, usage errors and the command table."""

    def test_usageError(self) -> None:
        """An unknown command: exit 2 and usage on stderr."""
        run = Run(["frobnicate"])
        self.assertEqual(run.status, 2)
        self.assertEqual(run.out, "")
        self.assertIn("usage: mailgwctl", run.err)
        self.assertIn("invalid choice: 'frobnicate'", run.err)

    def test_noCommand(self) -> None:
        """No command is a usage error."""
        self.assertEqual(Run([]).status, 2)

    def test_help(self) -> None:
        """--help lists the commands on stdout and exits 0."""
        run = Run(["--help"])
        self.assertEqual(run.status, 0)
        for name in COMMANDS:
            self.assertIn(name, run.out)
        self.assertIn("--socket", run.out)

    def test_commandTable(self) -> None:
        """Commands come from the table; a handler gets the parsed arguments and the streams."""
        seen: list[tuple[str, str, bool]] = []

        def add_arguments(parser: argparse.ArgumentParser) -> None:
            parser.add_argument("session")

        def handler(args: argparse.Namespace, streams: Streams) -> int:
            seen.append((args.session, args.socket, args.json))
            streams.stdout.write("killed\n")
            return 3

        commands = {**COMMANDS, "kill": Command(help="end a session", handler=handler, add_arguments=add_arguments)}
        stdout = StringIO()
        status = main(
            ["--socket", "/tmp/x.sock", "--json", "kill", "S1"],
            stdin=StringIO(),
            stdout=stdout,
            stderr=StringIO(),
            commands=commands,
        )
        self.assertEqual((status, stdout.getvalue(), seen), (3, "killed\n", [("S1", "/tmp/x.sock", True)]))

    def test_defaultSocket(self) -> None:
        """--socket defaults to the daemon's standard admin socket."""
        seen: list[str] = []

        def handler(args: argparse.Namespace, streams: Streams) -> int:
            seen.append(args.socket)
            return 0

        main(["status"], stdout=StringIO(), stderr=StringIO(), commands={"status": Command("status", handler)})
        self.assertEqual(seen, ["/run/mailgw/admin.sock"])


def local_config(testcase: SynchronousTestCase, **gateway: object) -> Path:
    """The sample configuration made to run here: its files, state folder and admin
    socket in fresh folders, its listeners on free ports."""
    directory = Path(testcase.mktemp()).absolute()
    directory.mkdir(parents=True)
    short = Path(tempfile.mkdtemp(prefix="mailgw-cli-", dir="/tmp"))
    testcase.addCleanup(shutil.rmtree, short, ignore_errors=True)
    data = tomllib.loads(SAMPLE.read_text())
    data["gateway"].update({"state_dir": str(directory / "state"), **gateway})
    data["admin"]["socket"] = str(short / "run" / "admin.sock")
    ports = iter(free_ports(3))
    for proxy in ("pop3s", "imap4s", "smtps"):
        data[proxy]["port"] = next(ports)
    shutil.copy(ROOT / "etc" / "users.toml", directory / "users.toml")
    path = directory / "mailgw.toml"
    path.write_text(tomlwriter.dumps(data))
    return path


class HostChecksTests(SynchronousTestCase):
    """``check-config`` also checks what the configuration needs of this machine
    [8.4], without starting anything."""

    def test_valid(self) -> None:
        """A configuration that can start here: valid, and nothing was created."""
        path = local_config(self)
        run = Run(["check-config", str(path)])
        self.assertEqual((run.status, run.out), (0, f"{path}: configuration is valid\n"), run.err)
        self.assertFalse((path.parent / "state").exists())
        self.assertFalse((path.parent / "tls").exists())

    def test_stateDirImpossible(self) -> None:
        """A state_dir that cannot be created (under /proc) is named, with the fix."""
        path = local_config(self, state_dir="/proc/mailgw-state")
        run = Run(["check-config", str(path)])
        self.assertEqual(run.status, 1)
        [line] = run.out.splitlines()
        self.assertTrue(line.startswith("gateway.state_dir: cannot create /proc/mailgw-state: "), line)
        self.assertIn("choose another state_dir", line)
        self.assertEqual(Run(["check-config", "--no-host-checks", str(path)]).status, 0)

    def test_stateDirIsAFile(self) -> None:
        """A state_dir that is a file is a problem."""
        path = local_config(self)
        (path.parent / "state").write_text("")
        run = Run(["check-config", str(path)])
        self.assertEqual(run.out.splitlines(), [f"gateway.state_dir: {path.parent / 'state'} exists and is not a"
                                                " folder (choose another state_dir)"])  # fmt: skip

    def test_portInUse(self) -> None:
        """A listening port another process holds is named with its key path."""
        path = local_config(self)
        port = tomllib.loads(path.read_text())["imap4s"]["port"]
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", port))
            blocker.listen()
            run = Run(["check-config", str(path)])
        self.assertEqual(run.status, 1)
        self.assertEqual(
            run.out.splitlines(),
            [f"imap4s.port: 127.0.0.1:{port} is already in use by another process"
             " (stop that process, or choose another port)"],
        )  # fmt: skip

    def test_privilegedPort(self) -> None:
        """Without the capability, a port below 1024 is named with the fix."""
        config = load_config(local_config(self))
        config = replace(config, pop3s=replace(config.pop3s, port=995))
        problems = host_problems(config, may_bind_privileged=False)
        self.assertEqual(len(problems), 1, problems)
        self.assertTrue(problems[0].startswith("pop3s.port: 127.0.0.1:995 is a privileged port and "), problems)
        self.assertIn("CAP_NET_BIND_SERVICE", problems[0])

    def test_unsafeSocketFolder(self) -> None:
        """An admin socket in a folder anyone may write to is refused."""
        path = local_config(self)
        folder = Path(tomllib.loads(path.read_text())["admin"]["socket"]).parent
        folder.mkdir()
        os.chmod(folder, 0o777)  # noqa: S103 - the unsafe folder under test
        run = Run(["check-config", str(path)])
        self.assertEqual(run.status, 1)
        [line] = run.out.splitlines()
        self.assertTrue(line.startswith("admin.socket: admin socket "), line)
        self.assertIn("writable by everyone", line)
        self.assertIn("/run/mailgw", line)


class SampleConfigTests(SynchronousTestCase):
    """``mailgwctl sample-config DIR`` writes the files the package carries."""

    def test_writes(self) -> None:
        """The sample configuration, users file and unit, as in etc/; the users file
        private to its group; then check-config accepts the configuration."""
        target = Path(self.mktemp())
        run = Run(["sample-config", str(target)])
        self.assertEqual(run.status, 0, run.err)
        for name in ("mailgw.toml", "users.toml", "mailgw.service"):
            self.assertEqual((target / name).read_bytes(), (ROOT / "etc" / name).read_bytes())
        self.assertEqual(stat.S_IMODE((target / "users.toml").stat().st_mode), 0o640)
        self.assertIn(f"mailgwctl check-config {target / 'mailgw.toml'}", run.out)
        self.assertEqual(Run(["check-config", "--no-host-checks", str(target / "mailgw.toml")]).status, 0)

    def test_refusesToOverwrite(self) -> None:
        """Existing files are kept (exit 1, named) unless --force."""
        target = Path(self.mktemp())
        target.mkdir()
        (target / "users.toml").write_text("mine")
        run = Run(["sample-config", str(target)])
        self.assertEqual(run.status, 1)
        self.assertIn(str(target / "users.toml"), run.err)
        self.assertEqual((target / "users.toml").read_text(), "mine")
        self.assertFalse((target / "mailgw.toml").exists())
        self.assertEqual(Run(["sample-config", "--force", str(target)]).status, 0)
        self.assertNotEqual((target / "users.toml").read_text(), "mine")
