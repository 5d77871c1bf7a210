#!/usr/bin/env python3
"""The aiosmtpd peer: aiosmtpd's stock ``Proxy`` handler behind AUTH PLAIN/LOGIN, as one process.

AUTH is checked against the same htpasswd-style bcrypt users file relayproxy uses. aiosmtpd's
authenticator is synchronous, so a bcrypt check (about 0.3 s at cost 12) blocks its event loop; as a
sensible deployment would, and as relayproxy's ``[auth] cache_seconds`` does, a verified (user,
password) pair is remembered for ``--cache-seconds`` (default 300, relayproxy's default) as an HMAC
digest under a key made at start-up (never the password itself), so only a user's first login, or
one with a new password, pays for bcrypt. ``--cache-seconds 0`` checks bcrypt on every AUTH. The
Proxy handler forwards each message with a new blocking smtplib connection to the upstream, as
shipped. Plaintext AUTH is allowed (loopback benchmark).

Usage: python bench/peer_aiosmtpd.py --port 2527 --upstream-port 2526 --users USERS_FILE
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import bcrypt
from aiosmtpd.handlers import Proxy
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def load_users(path: Path) -> dict[bytes, bytes]:
    users = {}
    for raw in path.read_bytes().splitlines():
        line = raw.strip()
        if line and not line.startswith(b"#"):
            name, _, hashed = line.partition(b":")
            users[name] = hashed
    return users


class CachedAuthenticator:
    """aiosmtpd authenticator: bcrypt against the users file, then a verified pair is remembered."""

    def __init__(self, users: dict[bytes, bytes], cache_seconds: float) -> None:
        self.users, self.cache_seconds = users, cache_seconds
        self.key = secrets.token_bytes(32)
        self.verified: dict[bytes, float] = {}  # HMAC(user NUL password) -> expiry (monotonic)

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        digest = hmac.digest(self.key, data.login + b"\0" + data.password, "sha256")
        now = time.monotonic()
        if self.verified.get(digest, 0.0) > now:
            return AuthResult(success=True, handled=False)
        hashed = self.users.get(data.login)
        ok = hashed is not None and bcrypt.checkpw(data.password[:72], hashed)
        if ok and self.cache_seconds > 0:
            if len(self.verified) > 10_000:
                self.verified.clear()
            self.verified[digest] = now + self.cache_seconds
        return AuthResult(success=ok, handled=False)


def main() -> None:
    ap = argparse.ArgumentParser(description="aiosmtpd Proxy handler with AUTH, for the benchmark.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream-host", default="127.0.0.1")
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--users", type=Path, required=True)
    ap.add_argument("--data-size-limit", type=int, default=1 << 30)
    ap.add_argument("--cache-seconds", type=float, default=300.0,
                    help="remember a verified user and password this long (default 300; 0: bcrypt on every AUTH)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    users = load_users(args.users)

    authenticator = CachedAuthenticator(users, args.cache_seconds)
    handler = Proxy(args.upstream_host, args.upstream_port)

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname="aiosmtpd-peer",
            authenticator=authenticator,
            auth_required=True,
            auth_require_tls=False,
            decode_data=False,
            data_size_limit=args.data_size_limit,
        )

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(factory, args.host, args.port, backlog=4096, reuse_address=True))
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
