#!/usr/bin/env python3
"""The aiosmtpd peer: aiosmtpd's stock ``Proxy`` handler behind AUTH PLAIN/LOGIN, as one process.

AUTH is checked against the same htpasswd-style bcrypt users file relayproxy uses (aiosmtpd's
authenticator is synchronous, so each check blocks its event loop, as it would for anyone who plugs
bcrypt into it). The Proxy handler forwards each message with a new blocking smtplib connection
to the upstream, as shipped. Plaintext AUTH is allowed (loopback benchmark).

Usage: python bench/peer_aiosmtpd.py --port 2527 --upstream-port 2526 --users USERS_FILE
"""

from __future__ import annotations

import argparse
import asyncio
import logging
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


def main() -> None:
    ap = argparse.ArgumentParser(description="aiosmtpd Proxy handler with AUTH, for the benchmark.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream-host", default="127.0.0.1")
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--users", type=Path, required=True)
    ap.add_argument("--data-size-limit", type=int, default=1 << 30)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    users = load_users(args.users)

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        hashed = users.get(data.login)
        ok = hashed is not None and bcrypt.checkpw(data.password[:72], hashed)
        return AuthResult(success=ok, handled=False)

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
