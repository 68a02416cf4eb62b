"""The ``mailgwctl`` commands that need no daemon: ``check-config``,
``hash-password`` and ``sample-config``."""

from __future__ import annotations

import argparse
import json
import os
from importlib import resources
from pathlib import Path

from mailgw.admin.ctl import FAILED, OK, PasswordReadError, Streams, read_secret
from mailgw.config import ConfigError, load_config

__all__ = [
    "HASH_SCHEMES",
    "SAMPLE_FILES",
    "check_config",
    "check_config_arguments",
    "hash_password_arguments",
    "hash_password_command",
    "sample_config",
    "sample_config_arguments",
]

#: the schemes of L{mailgw.auth.passwords.SCHEMES} (named here so that the parser can
#: be built without importing the hashing libraries; a test keeps the two equal)
HASH_SCHEMES = ("bcrypt", "argon2")

#: the files C{sample-config} writes (shipped in the package, from etc/), and their modes
SAMPLE_FILES = {"mailgw.toml": 0o644, "users.toml": 0o640, "mailgw.service": 0o644}


# --- check-config ---------------------------------------------------------------------


def check_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="the TOML configuration file")
    parser.add_argument(
        "--no-host-checks",
        action="store_true",
        help="only validate the file; do not check this machine (state_dir creatable and writable, files "
        "readable, admin socket folder safe, ports free and allowed) (default: check, as the current user)",
    )


def check_config(args: argparse.Namespace, streams: Streams) -> int:
    """Validate a configuration file, then what it needs of this machine; one line
    per problem, exit status 1 if any."""
    path: str = args.path
    try:
        config = load_config(path)
    except ConfigError as e:
        problems = e.problems
    else:
        problems = []
        if not args.no_host_checks:
            from mailgw.startup import host_problems

            problems = host_problems(config)
    if args.json:
        json.dump({"path": path, "valid": not problems, "problems": problems}, streams.stdout)
        streams.stdout.write("\n")
    elif problems:
        for problem in problems:
            streams.stdout.write(f"{problem}\n")
    else:
        streams.stdout.write(f"{path}: configuration is valid\n")
    return FAILED if problems else OK


# --- hash-password ----------------------------------------------------------------------


def hash_password_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scheme",
        choices=HASH_SCHEMES,
        default="bcrypt",
        help="hash scheme: bcrypt (cost 12) or argon2 (argon2id, for passwords over 72 bytes) (default: bcrypt)",
    )


def hash_password_command(args: argparse.Namespace, streams: Streams) -> int:
    """Read a password (twice, without echo, on a terminal) and print its hash."""
    from mailgw.auth.passwords import hash_password

    try:
        password = read_secret(streams, "Password: ", confirm=True)
    except PasswordReadError as e:
        streams.stderr.write(f"mailgwctl: {e}\n")
        return FAILED
    if not password:
        streams.stderr.write("mailgwctl: empty password refused\n")
        return FAILED
    try:
        hashed = hash_password(password, args.scheme)
    except ValueError as e:
        streams.stderr.write(f"mailgwctl: {e}\n")
        return FAILED
    if args.json:
        json.dump({"scheme": args.scheme, "hash": hashed}, streams.stdout)
        streams.stdout.write("\n")
    else:
        streams.stdout.write(f"{hashed}\n")
    return OK


# --- sample-config ----------------------------------------------------------------------


def sample_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="where to write them (created if missing)")
    parser.add_argument(
        "--force", action="store_true", help="overwrite files that exist (default: refuse, changing nothing)"
    )


def sample_config(args: argparse.Namespace, streams: Streams) -> int:
    """Write the sample configuration, users file and systemd unit into DIR."""
    directory = Path(args.directory)
    targets = {name: directory / name for name in SAMPLE_FILES}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not args.force:
        streams.stderr.write(
            f"mailgwctl: {', '.join(existing)} already exist(s); nothing written (--force overwrites)\n"
        )
        return FAILED
    sample = resources.files("mailgw").joinpath("sample")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, mode in SAMPLE_FILES.items():
            data = sample.joinpath(name).read_bytes()
            target = targets[name]
            descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            os.chmod(target, mode)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        streams.stderr.write(f"mailgwctl: cannot write the sample: {where}{e.strerror or e}\n")
        return FAILED
    config = targets["mailgw.toml"]
    if args.json:
        json.dump({"written": [str(path) for path in targets.values()]}, streams.stdout)
        streams.stdout.write("\n")
        return OK
    streams.stdout.write(
        f"wrote {', '.join(str(path) for path in targets.values())}\n"
        f"next: adapt {config} (state_dir, admin.socket, ports, mail servers) and the users, then\n"
        f"  mailgwctl check-config {config}\n"
        f"  twistd -n mailgw --config {config}\n"
        f"{targets['mailgw.service']} runs it under systemd from /etc/mailgw (see the comments at its top)\n"
    )
    return OK
