"""nginx's auth_http responder, in a process of its own (its CPU is measured apart).

::

    python -m bench.authhttp --port PORT --pop3 PORT --imap PORT [--users FILE]

Every login goes to Dovecot's plain POP3 or IMAP port.  The bench accounts
(:data:`bench.common.USER`, :data:`bench.common.INSPECTED_USER`) are accepted with their
plain password; the accounts of ``--users`` (a JSON object name -> bcrypt hash) are
checked with bcrypt the first time a password is seen and then from a cache keyed by an
HMAC of the password under a random per-process key (as mailgw's authentication cache
[5.6]), so the cost-12 scenario compares like with like.  Anything else is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.server
import json
import os
import secrets
import threading
import urllib.parse
from typing import Any

import bcrypt

from bench.common import HOST, INSPECTED_USER, PASSWORD, USER


def serve(port: int, ports: dict[str, int], hashes: dict[str, str]) -> None:
    key = secrets.token_bytes(32)
    cache: dict[str, bytes] = {}
    lock = threading.Lock()

    def valid(user: str, password: str) -> bool:
        if user in (USER, INSPECTED_USER):
            return hmac.compare_digest(password, PASSWORD)
        stored = hashes.get(user)
        if stored is None:
            return False
        digest = hmac.new(key, password.encode(), hashlib.sha256).digest()
        with lock:
            if hmac.compare_digest(cache.get(user, b""), digest):
                return True
        if bcrypt.checkpw(password.encode(), stored.encode()):
            with lock:
                cache[user] = digest
            return True
        with lock:
            cache.pop(user, None)
        return False

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            protocol = self.headers.get("Auth-Protocol", "pop3")
            user = urllib.parse.unquote(self.headers.get("Auth-User", ""))
            password = urllib.parse.unquote(self.headers.get("Auth-Pass", ""))
            self.send_response(200)
            if valid(user, password):
                self.send_header("Auth-Status", "OK")
                self.send_header("Auth-Server", HOST)
                self.send_header("Auth-Port", str(ports.get(protocol, ports["pop3"])))
            else:
                self.send_header("Auth-Status", "Invalid login or password")
                self.send_header("Auth-Wait", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        # socketserver's default listen backlog is 5: nginx's bursts of auth requests
        # overflowed it and waited for SYN retransmits (1 s).
        request_queue_size = 1024

    server = Server((HOST, port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pop3", type=int, required=True)
    parser.add_argument("--imap", type=int, required=True)
    parser.add_argument("--users")
    options = parser.parse_args(argv)
    hashes: dict[str, str] = {}
    if options.users and os.path.exists(options.users):
        with open(options.users) as handle:
            hashes = json.load(handle)
    serve(options.port, {"pop3": options.pop3, "imap": options.imap}, hashes)


if __name__ == "__main__":
    main()
