#!/usr/bin/env python3
"""The Postfix peer: Postfix 3.7's smtpd with Cyrus SASL AUTH, relaying every message to a relayhost.

A private instance, set up as a user would set up a SASL relay, in a directory of its own (``postfix -c DIR``):
its own main.cf and master.cf, queue and data directories, a Cyrus sasldb made with ``saslpasswd2``
holding the benchmark user, and a maillog file. It listens on 127.0.0.1:PORT only (an unprivileged
port; no port 25, no chroot, no pickup from the system's maildrop) and relays through
``relayhost = [127.0.0.1]:UPSTREAM`` with no TLS and no AUTH upstream (as relayproxy's bench config).
Everything else is Postfix's default, including ``in_flow_delay = 1s`` and the smtp client's
connection cache, so the figures are those of a stock relay.

bench/run.py uses :func:`write_instance`, :func:`start_command` and :func:`stop`. Needs root (the master
starts as root and its services drop to the ``postfix`` user) and Debian's postfix, sasl2-bin and
libsasl2-modules (bench/setup installs them). On its own, for a manual look:

  python bench/peer_postfix.py --dir /tmp/pf --port 2527 --upstream-port 2526   # then Ctrl-C
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
REALM = "bench.example"


def missing() -> str | None:
    """Why the Postfix peer cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "not root (the Postfix master must start as root)"
    if not Path(POSTFIX).exists():
        return "Debian's postfix is not installed"
    if not saslpasswd2():
        return "saslpasswd2 (Debian's sasl2-bin) is not installed"
    if not any(Path("/usr/lib").glob("*/sasl2/libplain.so*")):
        return "the Cyrus SASL PLAIN mechanism (Debian's libsasl2-modules) is not installed"
    return None


def saslpasswd2() -> str | None:
    return shutil.which("saslpasswd2") or ("/usr/sbin/saslpasswd2" if Path("/usr/sbin/saslpasswd2").exists() else None)


def version() -> str:
    try:
        out = subprocess.run(["/usr/sbin/postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_instance(directory: Path, port: int, upstream_port: int, user: str, password: str) -> Path:
    """Write a complete instance under ``directory`` (created; must not hold anything else) and return
    its configuration directory (the argument of ``postfix -c``)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # the services run as the postfix user and must reach the sasldb and maillog
    conf, queue, data = directory / "etc", directory / "queue", directory / "data"
    # Debian's Postfix reads Cyrus's smtpd.conf from $config_directory/sasl.
    sasl = conf / "sasl"
    for d in (conf, sasl, queue, data):
        d.mkdir(exist_ok=True)
    shutil.chown(data, "postfix", "postfix")
    sasldb = sasl / "sasldb2"
    (conf / "main.cf").write_text(textwrap.dedent(f"""\
        # Private benchmark instance (bench/peer_postfix.py): a SASL relay to one relayhost.
        compatibility_level = 3.6
        config_directory = {conf}
        queue_directory = {queue}
        data_directory = {data}
        mail_owner = postfix
        setgid_group = postdrop
        maillog_file = {directory / "maillog"}
        maillog_file_prefixes = {directory}
        inet_interfaces = 127.0.0.1
        inet_protocols = ipv4
        myhostname = postfix-peer.{REALM}
        mydomain = {REALM}
        mydestination =
        mynetworks = 127.0.0.1/32
        relay_domains =
        local_recipient_maps =
        alias_maps =
        alias_database =
        biff = no
        relayhost = [127.0.0.1]:{upstream_port}
        smtp_tls_security_level = none
        smtpd_tls_security_level = none
        smtpd_sasl_auth_enable = yes
        smtpd_sasl_type = cyrus
        smtpd_sasl_path = smtpd
        cyrus_sasl_config_path = {sasl}
        smtpd_sasl_local_domain = {REALM}
        smtpd_sasl_security_options = noanonymous
        # Only authenticated clients may relay (the loopback client is not trusted by address).
        smtpd_relay_restrictions = permit_sasl_authenticated, reject
        message_size_limit = {300 * 1024 * 1024}
        """))
    # No chroot (the private directories are not laid out for one), no pickup/postdrop path.
    (conf / "master.cf").write_text(textwrap.dedent(f"""\
        # service type  private unpriv  chroot  wakeup  maxproc command
        127.0.0.1:{port} inet n - n - - smtpd
        cleanup   unix  n       -       n       -       0       cleanup
        qmgr      unix  n       -       n       300     1       qmgr
        rewrite   unix  -       -       n       -       -       trivial-rewrite
        bounce    unix  -       -       n       -       0       bounce
        defer     unix  -       -       n       -       0       bounce
        trace     unix  -       -       n       -       0       bounce
        verify    unix  -       -       n       -       1       verify
        flush     unix  n       -       n       1000?   0       flush
        proxymap  unix  -       -       n       -       -       proxymap
        smtp      unix  -       -       n       -       -       smtp
        relay     unix  -       -       n       -       -       smtp
        showq     unix  n       -       n       -       -       showq
        error     unix  -       -       n       -       -       error
        retry     unix  -       -       n       -       -       error
        discard   unix  -       -       n       -       -       discard
        anvil     unix  -       -       n       -       1       anvil
        scache    unix  -       -       n       -       1       scache
        postlog   unix-dgram n  -       n       -       1       postlogd
        """))
    (sasl / "smtpd.conf").write_text(
        f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\nsasldb_path: {sasldb}\n")
    tool = saslpasswd2()
    if tool is None:
        raise RuntimeError("saslpasswd2 is not installed")
    subprocess.run([tool, "-f", str(sasldb), "-p", "-c", "-u", REALM, user], input=password.encode(),
                   check=True, capture_output=True, timeout=30)
    shutil.chown(sasldb, "root", "postfix")
    sasldb.chmod(0o640)
    # Queue subdirectories with Postfix's own owners and modes (the same as `postfix start` would check).
    subprocess.run([POSTFIX, "-c", str(conf), "set-permissions"], check=True, capture_output=True, timeout=60)
    return conf


def start_command(conf: Path) -> list[str]:
    """The master in the foreground (``postfix start-fg``): the process to start and to watch."""
    return [POSTFIX, "-c", str(conf), "start-fg"]


def stop(conf: Path) -> None:
    subprocess.run([POSTFIX, "-c", str(conf), "stop"], capture_output=True, timeout=60)


def queued(conf: Path) -> int:
    """Messages still in the instance's queue (not yet relayed)."""
    queue = conf.parent / "queue"
    return sum(1 for sub in ("maildrop", "incoming", "active", "deferred", "hold")
               for p in (queue / sub).rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description="A private Postfix SASL relay instance, in the foreground.")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--user", default="bench")
    ap.add_argument("--password", default="bench-password")
    args = ap.parse_args()
    why = missing()
    if why:
        print(f"peer_postfix: cannot run: {why}", file=sys.stderr)
        return 1
    conf = write_instance(args.dir, args.port, args.upstream_port, args.user, args.password)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    proc = subprocess.Popen(start_command(conf))
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(conf)
        proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
