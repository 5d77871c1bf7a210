#!/usr/bin/env python3
"""Run every benchmark scenario through relayproxy, directly against the sink, and through the peers.

`make bench` runs this (see bench/README.md). Prints the tables and writes them to
bench/results/latest.md. Missed targets are reported, never turned into a failing exit status.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import pstats
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import statistics
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import distant_client  # noqa: E402
import loadgen  # noqa: E402
import peer_postfix  # noqa: E402
from distant_client import DistantConfig  # noqa: E402
from loadgen import LoadConfig, Result  # noqa: E402

from relayproxy.credentials import hash_password, write_users_file  # noqa: E402

USER, PASSWORD = "bench", "bench-password"
KiB, MiB = 1024, 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# From /work/shared/reference/performance-notes.md (2-core VM, loopback, 10 KiB messages, medians;
# not measured by this harness).
REFERENCE: dict[str, dict[str, Any]] = {
    "emailrelay": {"label": "E-MailRelay 2.6 (reference figure, not measured here)", "rate": 353.0, "ratio": "0.21",
                   "added_p50": "~42", "cpu": "1.2", "rss_100mib": "7 (100 MiB message)"},
    "postfix": {"label": "Postfix 3.7 + SASL, relayhost (reference figure)", "rate": 414.0, "ratio": "0.24",
                "added_p50": "~2", "cpu": "3.3 (all processes)", "rss_100mib": "-"},
    "aiosmtpd": {"label": "aiosmtpd 1.4.6 Proxy + AUTH (reference figure)", "rate": "360-426", "ratio": "0.21-0.25",
                 "added_p50": "~23", "cpu": "1.7-2.3", "rss_100mib": "~600 (100 MiB message)"},
}
EMAILRELAY_REFERENCE_RATE = 353.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# -- processes ----------------------------------------------------------------------------------


class Server:
    """A process under test (or the sink): its port, CPU time and memory from /proc."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None,
                 log: Path | None = None, cwd: Path | None = None) -> None:
        self.name, self.argv, self.port, self.log = name, argv, port, log
        out = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while not listening(port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {self.proc.returncode} at start-up{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not listen on {port} within 60 s{self.log_tail()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu(self) -> float:
        """utime + stime of the process, in seconds."""
        try:
            text = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = text.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def mem(self) -> dict[str, float]:
        """VmRSS and VmHWM in MiB."""
        out: dict[str, float] = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
        except OSError:
            pass
        return out

    def log_tail(self, lines: int = 15) -> str:
        if not self.log or not self.log.exists():
            return ""
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n    " + "\n    ".join(tail) if tail else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PostfixServer(Server):
    """The Postfix peer (bench/peer_postfix.py): the master in the foreground and every process it runs."""

    def __init__(self, directory: Path, port: int, upstream_port: int) -> None:
        self.conf = peer_postfix.write_instance(directory, port, upstream_port, USER, PASSWORD)
        super().__init__("postfix", peer_postfix.start_command(self.conf), port, log=directory / "stdout.log")

    def processes(self) -> list[list[str]]:
        """/proc/PID/stat fields (after the command name) of the started process and all its descendants
        (the master runs in a session of its own, so the tree is followed by parent id)."""
        stats: dict[int, list[str]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                stats[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, ValueError):
                continue
        children: dict[int, list[int]] = {}
        for pid, fields in stats.items():
            children.setdefault(int(fields[1]), []).append(pid)
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            if pid in stats:
                out.append(stats[pid])
            todo += children.get(pid, [])
        return out

    def cpu(self) -> float:
        """utime + stime of every Postfix process (smtpd, cleanup, qmgr, smtp, ...), with the children
        each has already reaped (a Postfix service process exits after max_idle or max_use)."""
        return sum(int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]) for f in self.processes()) / CLK_TCK

    def mem(self) -> dict[str, float]:
        return {}  # a dozen processes sharing most pages: no one figure compares with a single process

    def queued(self) -> int:
        return peer_postfix.queued(self.conf)

    def maillog_problems(self) -> list[str]:
        log = self.conf.parent / "maillog"
        if not log.exists():
            return []
        return [line for line in log.read_text(errors="replace").splitlines()
                if any(word in line for word in (" fatal: ", " panic: ", " error: ", " warning: "))]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            peer_postfix.stop(self.conf)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                super().stop(sig)


@dataclass
class Env:
    quick: bool
    tmp: Path
    python: str
    twistd: str
    sink: Server
    sink_kind: str
    users_file: Path  # bcrypt cost 12
    users_file_cheap: Path  # bcrypt cost 4 (supplementary hold run only)
    aiosmtpd: bool
    emailrelay: str | None
    postfix: str | None = None  # why the Postfix peer cannot run here, or None when it can
    postfix_version: str = "3.7"
    rtt_ms: float = 20.0
    problems: list[str] = field(default_factory=list)
    cleanup: list[Path] = field(default_factory=list)  # directories to remove at the end, besides tmp
    loadavg_start: str = ""
    load_watch: LoadWatch | None = None
    counter: int = 0
    profile: Path | None = None
    bcrypt_cost: int = 12


def start_sink(tmp: Path, kind: str) -> tuple[Server, str]:
    port = free_port()
    smtp_sink = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None)
    if kind in ("auto", "smtp-sink") and smtp_sink:
        argv = [smtp_sink, "-c", "-m", "5000"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += [f"127.0.0.1:{port}", "1000"]
        return Server("smtp-sink", argv, port), "Postfix smtp-sink (`" + " ".join(argv) + "`)"
    if kind == "smtp-sink":
        raise SystemExit("bench: smtp-sink is not installed (Debian: apt-get install postfix, or run bench/setup)")
    argv = [sys.executable, str(BENCH / "sink.py"), "--port", str(port)]
    why = "--sink asyncio" if kind == "asyncio" else "smtp-sink not installed"
    return Server("asyncio-sink", argv, port, log=tmp / "sink.log"), f"bench/sink.py (asyncio; {why})"


def proxy_config(env: Env, port: int, users_file: Path, upstream_port: int | None = None, extra: str = "") -> Path:
    env.counter += 1
    directory = env.tmp / f"proxy{env.counter}"
    directory.mkdir()
    path = directory / "relayproxy.toml"
    path.write_text(textwrap.dedent(f"""\
        [server]
        hostname = "relay.bench"
        max_message_size = {300 * MiB}

        [[listener]]
        endpoint = "tcp:{port}:interface=127.0.0.1"
        tls = "none"

        [auth]
        users_file = "{users_file}"

        [upstream.default]
        host = "127.0.0.1"
        port = {upstream_port or env.sink.port}
        tls = "none"

        [limits]
        max_connections = 5000
        max_connections_per_ip = 5000
        # The hold scenario has 2,000 sessions waiting for bcrypt at once: not the default 200.
        max_unauthenticated = 4999
        """) + extra)
    return path


def start_proxy(env: Env, users_file: Path | None = None, profile: Path | None = None,
                upstream_port: int | None = None, extra: str = "") -> Server:
    port = free_port()
    config = proxy_config(env, port, users_file or env.users_file, upstream_port, extra)
    environ = dict(os.environ)
    environ["PYTHONPATH"] = str(REPO)  # the checkout's code and plugin, not an installed copy
    argv = [env.twistd, "-n", "--pidfile="]
    if profile is not None:
        argv += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
    argv += ["--logfile", str(config.parent / "twistd.log"), "relayproxy", "--config", str(config)]
    return Server("relayproxy", argv, port, env=environ, log=config.parent / "stdout.log", cwd=config.parent)


def start_aiosmtpd(env: Env, users_file: Path | None = None) -> Server:
    port = free_port()
    env.counter += 1
    argv = [env.python, str(BENCH / "peer_aiosmtpd.py"), "--port", str(port), "--upstream-port", str(env.sink.port),
            "--users", str(users_file or env.users_file)]
    return Server("aiosmtpd", argv, port, log=env.tmp / f"aiosmtpd{env.counter}.log")


def start_postfix(env: Env) -> PostfixServer:
    """A fresh Postfix instance, in a directory of its own outside env.tmp (which only root may enter:
    Postfix's services run as the postfix user and read the sasldb and write the maillog there)."""
    directory = Path(tempfile.mkdtemp(prefix="relayproxy-bench-postfix-"))
    env.cleanup.append(directory)
    return PostfixServer(directory, free_port(), env.sink.port)


def twistd_log_problems(server: Server) -> list[str]:
    """Tracebacks and error lines in a proxy's twistd log."""
    log = server.log.parent / "twistd.log" if server.log else None
    if not log or not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    bad = [line for line in lines if "#error]" in line or "#critical]" in line or "Traceback" in line]
    return bad


# -- measurements -------------------------------------------------------------------------------


@dataclass
class Row:
    target: str  # relayproxy | direct | aiosmtpd | reference rows
    label: str
    result: Result | None = None
    cpu_s: float | None = None
    rss_start: float | None = None  # MiB after start-up and warm-up
    rss_peak: float | None = None  # VmHWM, MiB
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def rate(self) -> float | None:
        return self.result.rate if self.result else None

    def cpu_per_1000(self) -> float | None:
        if self.cpu_s is None or not self.result or not self.result.ok:
            return None
        return self.cpu_s / self.result.ok * 1000

    def generator_cpu_per_1000(self) -> float | None:
        """The load generator's own utime+stime (its worker processes) per 1,000 accepted messages."""
        if not self.result or self.result.cpu_s is None or not self.result.ok:
            return None
        return self.result.cpu_s / self.result.ok * 1000


def warm_up(port: int) -> str | None:
    """One message end to end; returns an error description if it failed."""
    res = loadgen.run_inline(LoadConfig(port=port, mode="send", sessions=1, per_conn=1, size=1024, duration=None,
                                        messages=1, processes=1, user=USER, password=PASSWORD, timeout=60))
    if res.ok != 1:
        return "; ".join(res.error_samples[:3]) or "no message accepted"
    return None


POSTFIX_DRAIN_S = 60.0  # the longest to wait, after a run, for the Postfix peer's queue to reach the sink


def target_label(env: Env, target: str) -> str:
    return {"relayproxy": "relayproxy", "direct": "direct to sink", "spooled": 'relayproxy, delivery = "spool"',
            "aiosmtpd": "aiosmtpd Proxy + AUTH (measured)",
            "postfix": f"Postfix {env.postfix_version} + Cyrus SASL, relayhost (measured)"}[target]


def measure(env: Env, scenario: str, target: str, cfg: LoadConfig, users_file: Path | None = None,
            on_held: Callable[[Server | None, int, int], dict[str, Any]] | None = None) -> Row:
    server: Server | None = None
    row = Row(target, target_label(env, target))
    try:
        if target == "relayproxy":
            server = start_proxy(env, users_file, profile=env.profile)
        elif target == "spooled":
            env.counter += 1
            spool_dir = env.tmp / f"spool{env.counter}"
            server = start_proxy(env, users_file, extra=(
                f'\n[users.{USER}]\ndelivery = "spool"\n\n[spool]\ndirectory = "{spool_dir}"\nscan_interval = 1\n'))
        elif target == "aiosmtpd":
            server = start_aiosmtpd(env, users_file)
        elif target == "postfix":
            server = start_postfix(env)
        port = server.port if server else env.sink.port
        error = warm_up(port)
        if error:
            env.problems.append(f"{scenario} / {target}: warm-up message failed: {error}")
        if isinstance(server, PostfixServer):
            drain(server)
        cpu0 = server.cpu() if server else None
        if server:
            row.rss_start = server.mem().get("VmRSS")
        cfg.port = port
        held: dict[str, Any] = {}

        def held_cb(connected: int, authenticated: int) -> None:
            if on_held:
                held.update(on_held(server, connected, authenticated))

        print(f"  {scenario:<14} {target:<10} ...", end="", flush=True)
        row.result = loadgen.run(cfg, on_held=held_cb)
        row.extra.update(held)
        if isinstance(server, PostfixServer) and cfg.mode == "send":
            # Postfix's 250 means "queued": its CPU counts once the queue has reached the sink.
            row.extra["drain_s"], row.extra["left_in_queue"] = drain(server)
        if server:
            row.cpu_s = server.cpu() - (cpu0 or 0.0)
            row.rss_peak = server.mem().get("VmHWM")
        if target == "spooled" and server:
            # The 250s came once each message was on disk; delivery from the spool ran alongside
            # and goes on: how long until the queue is empty, and at what rate it went.
            waiting = len(list((spool_dir / "queue").glob("*.env")))
            row.extra["waiting_at_end"], row.extra["drain_s"] = waiting, spool_drain(spool_dir)
            row.extra["spool_left"] = len(list((spool_dir / "queue").glob("*.env")))
            if row.extra["spool_left"]:
                env.problems.append(f"{scenario} / spooled: {row.extra['spool_left']} messages still spooled {SPOOL_DRAIN_S:.0f} s after the run")
            row.extra["cpu_with_drain_s"] = server.cpu() - (cpu0 or 0.0)
            if not server.alive():
                env.problems.append(f"{scenario} / {target}: the process exited with status {server.proc.returncode}{server.log_tail()}")
        r = row.result
        cut = f", {r.cut_off} sessions cut off at the end" if r.cut_off else ""
        queue = f"; queue drained in {row.extra['drain_s']:.1f} s" if "drain_s" in row.extra else ""
        print(f" {r.ok} ok, {r.rate:.1f}/s, {r.errors} errors, {r.elapsed:.1f} s{cut}{queue}")
        if r.errors:
            samples = sorted(set(r.error_samples))[:3]
            env.problems.append(f"{scenario} / {target}: {r.errors} errors, e.g. " + " | ".join(samples))
        if row.extra.get("left_in_queue"):
            env.problems.append(f"{scenario} / {target}: {row.extra['left_in_queue']} messages still in Postfix's queue "
                                f"{POSTFIX_DRAIN_S:.0f} s after the run")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        env.problems.append(f"{scenario} / {target}: {e}")
        row.note = "failed to start"
        print(f"  {scenario:<14} {target:<10} failed: {e}")
    finally:
        if server:
            server.stop()
            server_problems(env, f"{scenario} / {target}", server)
    return row


SPOOL_DRAIN_S = 120.0  # the longest to wait, after a run, for the spool to deliver what it holds


def spool_drain(directory: Path) -> float:
    """Seconds until the spool's queue/ is empty (at most SPOOL_DRAIN_S)."""
    t0 = time.monotonic()
    while any((directory / "queue").glob("*.env")) and time.monotonic() - t0 < SPOOL_DRAIN_S:
        time.sleep(0.05)
    return time.monotonic() - t0


def drain(server: PostfixServer) -> tuple[float, int]:
    """Wait until the Postfix peer's queue is empty (at most POSTFIX_DRAIN_S); seconds waited, messages left."""
    t0 = time.monotonic()
    left = server.queued()
    while left and time.monotonic() - t0 < POSTFIX_DRAIN_S:
        time.sleep(0.05)
        left = server.queued()
    return time.monotonic() - t0, left


def server_problems(env: Env, where: str, server: Server) -> None:
    """Error lines in a stopped server's log (relayproxy's twistd log, Postfix's maillog)."""
    if server.name == "relayproxy":
        bad = twistd_log_problems(server)
    elif isinstance(server, PostfixServer):
        bad = server.maillog_problems()
    else:
        return
    if bad:
        env.problems.append(f"{where}: {len(bad)} error lines in the log, e.g. {bad[0][:300]}")


def peers_for(env: Env, scenario: str) -> list[str]:
    """The peers measured in a scenario besides relayproxy and direct."""
    peers = []
    if env.aiosmtpd and scenario != "hold":
        peers.append("aiosmtpd")
    # Postfix in the rate scenarios: a process per connection and a disk queue make the memory
    # scenarios (one big message, 2,000 held sessions) a different question.
    if env.postfix is None and scenario in ("s20x1", "s20x10", "s1", "s20x1m", "auth"):
        peers.append("postfix")
    return peers


def targets_for(env: Env, scenario: str) -> list[str]:
    return ["relayproxy", "direct"] + peers_for(env, scenario)


# -- scenarios ----------------------------------------------------------------------------------


@dataclass
class Scenario:
    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kind: str = "throughput"  # throughput | big | hold | auth

    def row(self, target: str) -> Row | None:
        return next((r for r in self.rows if r.target == target and r.result is not None), None)


def durations(env: Env) -> float:
    return 2.5 if env.quick else 6.0


def rounds(env: Env) -> int:
    """Rate scenarios run relayproxy and direct in alternating rounds and show the round whose ratio is
    the median: a shared VM's speed drifts by 20-40 % over minutes, and the two measurements of one
    round, taken one after the other, share most of that drift."""
    return 1 if env.quick else 3


def rated(env: Env, sc: Scenario, unit: str, config: Callable[[], LoadConfig]) -> None:
    """Measure every target of a rate scenario; relayproxy and direct in alternating rounds."""
    pairs = [(measure(env, sc.key, "relayproxy", config()), measure(env, sc.key, "direct", config())) for _ in range(rounds(env))]
    proxy, direct = median_pair(pairs)
    sc.rows += [proxy, direct]
    for peer in peers_for(env, sc.key):
        sc.rows.append(measure(env, sc.key, peer, config()))
    if len(pairs) > 1:
        sc.notes.append(f"Rounds (relayproxy / direct {unit}): " + "; ".join(
            f"{fmt(p.rate)} / {fmt(d.rate)} = {fmt(round_ratio(p, d), 2)}x" for p, d in pairs
        ) + ". The rows above are the round with the median ratio.")


def round_ratio(proxy: Row, direct: Row) -> float | None:
    return proxy.rate / direct.rate if proxy.rate is not None and direct.rate else None


def median_pair(pairs: list[tuple[Row, Row]]) -> tuple[Row, Row]:
    done = sorted((pair for pair in pairs if round_ratio(*pair) is not None), key=lambda pair: round_ratio(*pair) or 0.0)
    return done[len(done) // 2] if done else pairs[0]


def grace(env: Env) -> float:
    """How long work in flight at the end of a timed run may still finish (and count)."""
    return 0.5 if env.quick else 5.0


def throughput(env: Env, key: str, title: str, sessions: int, per_conn: int, size: int, duration: float) -> Scenario:
    sc = Scenario(key, title)
    rated(env, sc, "msg/s", lambda: LoadConfig(
        port=0, mode="send", sessions=sessions, per_conn=per_conn, size=size, duration=duration,
        processes=2 if sessions >= 10 else 1, user=USER, password=PASSWORD, grace=grace(env),
    ))
    return sc


def spool_intake(env: Env) -> Scenario:
    """Messages/s into the spool (three fsyncs before each 250) against relaying them, in the same rounds."""
    sc = Scenario("spool", 'Spool: 20 sessions x 10 KiB, 10 per connection, delivery = "spool" against relaying', kind="spool")

    def config() -> LoadConfig:
        return LoadConfig(port=0, mode="send", sessions=20, per_conn=10, size=10 * KiB, duration=durations(env),
                          processes=2, user=USER, password=PASSWORD, grace=grace(env))

    pairs = [(measure(env, sc.key, "spooled", config()), measure(env, sc.key, "relayproxy", config())) for _ in range(rounds(env))]
    spooled, relayed = median_pair(pairs)
    sc.rows += [spooled, relayed]
    filesystem = subprocess.run(["df", "-T", str(env.tmp)], capture_output=True, text=True).stdout.splitlines()[-1:]
    sc.notes.append(
        "The spool's 250 comes after three fsyncs (the message file, its envelope file, the directory); the spool "
        "delivers to the sink alongside. Filesystem of the spool: `" + (" ".join(filesystem[0].split()) if filesystem else "?") + "`."
    )
    if len(pairs) > 1:
        sc.notes.append("Rounds (spooled / relayed msg/s): " + "; ".join(
            f"{fmt(p.rate)} / {fmt(d.rate)} = {fmt(round_ratio(p, d), 2)}x" for p, d in pairs
        ) + ". The rows above are the round with the median ratio.")
    return sc


def spool_table(sc: Scenario) -> list[str]:
    spooled, relayed = sc.row("spooled"), sc.row("relayproxy")
    out = [
        "| target | msg/s | ratio to relaying | p50 ms | p99 ms | CPU s / 1,000 msg (load only) | waiting at the end | "
        "drained in s | delivered from the spool msg/s (whole run) | CPU s / 1,000 msg with delivery | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in (spooled, relayed):
        if row is None or row.result is None:
            continue
        r = row.result
        ratio = f"{r.rate / relayed.result.rate:.2f}x" if relayed and relayed.result and relayed.result.rate else "-"
        extra = row.extra
        if row.target == "spooled":
            total_s = r.elapsed + extra.get("drain_s", 0.0)
            drained = f"{fmt(extra.get('drain_s'))}" + (f" ({extra['spool_left']} left)" if extra.get("spool_left") else "")
            delivered = fmt(r.ok / total_s if total_s else None)
            with_drain = fmt(extra["cpu_with_drain_s"] / r.ok * 1000 if r.ok and "cpu_with_drain_s" in extra else None, 2)
            waiting = f"{extra.get('waiting_at_end', 0):,}"
        else:
            drained = delivered = with_drain = waiting = "-"
        out.append(f"| {row.label} | {fmt(r.rate)} | {ratio} | {ms(r.percentile(50))} | {ms(r.percentile(99))} | "
                   f"{fmt(row.cpu_per_1000(), 2)} | {waiting} | {drained} | {delivered} | {with_drain} | {r.errors} |")
    return out


def big_message(env: Env) -> Scenario:
    big = 20 * MiB if env.quick else 200 * MiB
    sc = Scenario("big", f"One {big // MiB} MiB message vs one 1 MiB message (1 session; peak RSS)", kind="big")
    for target in targets_for(env, "big"):
        server: Server | None = None
        row = Row(target, target_label(env, target))
        try:
            if target == "relayproxy":
                server = start_proxy(env)
            elif target == "aiosmtpd":
                server = start_aiosmtpd(env)
            port = server.port if server else env.sink.port
            error = warm_up(port)
            if error:
                env.problems.append(f"big / {target}: warm-up message failed: {error}")
            one = LoadConfig(port=port, mode="send", sessions=1, per_conn=1, size=1 * MiB, duration=None,
                             messages=1, processes=1, user=USER, password=PASSWORD)
            r1 = loadgen.run(one)
            hwm1 = server.mem().get("VmHWM") if server else None
            cpu0 = server.cpu() if server else None
            print(f"  {'big':<14} {target:<10} ...", end="", flush=True)
            cfg = LoadConfig(port=port, mode="send", sessions=1, per_conn=1, size=big, duration=None, messages=1,
                             processes=1, user=USER, password=PASSWORD)
            row.result = loadgen.run(cfg)
            if server:
                row.cpu_s = server.cpu() - (cpu0 or 0.0)
                row.rss_peak = server.mem().get("VmHWM")
                row.extra["hwm_1mib"] = hwm1
                if not server.alive():
                    env.problems.append(f"big / {target}: the process exited with status {server.proc.returncode}{server.log_tail()}")
            row.extra["elapsed_1mib"] = r1.elapsed
            r = row.result
            print(f" {r.ok} ok in {r.elapsed:.1f} s ({big / MiB / r.elapsed if r.elapsed else 0:.0f} MiB/s), {r.errors} errors")
            for res, what in ((r1, "1 MiB"), (r, f"{big // MiB} MiB")):
                if res.errors or res.ok != 1:
                    env.problems.append(f"big / {target}: the {what} message failed: " + " | ".join(res.error_samples[:3]))
        except RuntimeError as e:
            env.problems.append(f"big / {target}: {e}")
            print(f"  big {target} failed: {e}")
        finally:
            if server:
                server.stop()
                server_problems(env, f"big / {target}", server)
        sc.rows.append(row)
    return sc


def hold(env: Env) -> Scenario:
    n = 300 if env.quick else 2000
    timeout = 5.0 if env.quick else 45.0
    sc = Scenario("hold", f"{n} concurrent sessions held open (connect + EHLO + AUTH, then hold; proxy RSS)", kind="hold")

    def on_held(server: Server | None, connected: int, authenticated: int) -> dict[str, Any]:
        info: dict[str, Any] = {"connected": connected, "authenticated": authenticated}
        if server:
            info.update(server.mem())
        return info

    runs = [("relayproxy", env.users_file, f"relayproxy, bcrypt cost {env.bcrypt_cost}", timeout)]
    runs.append(("relayproxy", env.users_file_cheap, "relayproxy, bcrypt cost 4 (supplementary)", timeout))
    if env.aiosmtpd and not env.quick:
        runs.append(("aiosmtpd", env.users_file_cheap, "aiosmtpd Proxy + AUTH, bcrypt cost 4 (supplementary)", timeout))
    for target, users, label, t in runs:
        cfg = LoadConfig(port=0, mode="hold", sessions=n, processes=2, user=USER, password=PASSWORD, hold_timeout=t)
        row = measure(env, "hold", target, cfg, users_file=users, on_held=on_held)
        row.label = label
        row.extra["sessions"] = n
        sc.rows.append(row)
    sc.notes.append(
        f"Each run waits at most {timeout:.0f} s for all {n} sessions to authenticate (connections are opened 50 at a "
        "time), then reads VmRSS with every session still open. One warm-up message before each run has already "
        "authenticated the user once (so an AUTH cache in the proxy, if any, is primed, as for a client that sends "
        "all day). Without a cache, bcrypt cost 12 takes about 0.3 s of CPU per AUTH here, so the production-cost "
        f"run may not authenticate every session in time; the cost-4 run shows the memory of {n} authenticated sessions."
    )
    return sc


def auth_rate(env: Env) -> Scenario:
    sc = Scenario("auth", "Repeated AUTH of one user: connect + EHLO + AUTH PLAIN + QUIT, 20 at a time", kind="auth")
    rated(env, sc, "AUTH/s", lambda: LoadConfig(
        port=0, mode="auth", sessions=20, processes=2, duration=durations(env), user=USER, password=PASSWORD, grace=grace(env),
    ))
    return sc


DISTANT_RECIPIENTS = (1, 10, 50)
GREETING_RTTS = 2.0  # bench/distant_sink.py's default: the TCP handshake's round trip, then the greeting's


def floor_rtts(pipelining: bool, recipients: int, connect: bool, through_proxy: bool) -> float:
    """Round trips to the distant sink that the client's own protocol needs for one message: the least
    any relay could take. Through the proxy a connecting client still needs only the message's: the
    proxy is local, and its pooled upstream session is already open and greeted."""
    message = 2.0 if pipelining else 3.0 + recipients  # (MAIL+RCPTs+DATA), dot | MAIL, RCPT x N, DATA, dot
    if connect and not through_proxy:
        message += GREETING_RTTS + 2  # connect + greeting, EHLO, AUTH
    return message


def distant(env: Env) -> Scenario:
    """Sequential messages on one session to a sink one RTT away: pipelining and not, 1/10/50 recipients,
    straight to the sink and through relayproxy, on an open session and connecting per message."""
    rtt = env.rtt_ms / 1000
    sc = Scenario("distant", f"Distant upstream: every reply one round trip ({env.rtt_ms:g} ms) after its command",
                  kind="distant")
    sink_port = free_port()
    sink: Server | None = None
    proxy: Server | None = None
    messages, max_seconds, least = (8, 2.0, 3) if env.quick else (40, 8.0, 10)
    try:
        sink = Server("distant-sink", [env.python, str(BENCH / "distant_sink.py"), "--port", str(sink_port),
                                       "--rtt-ms", str(env.rtt_ms), "--greeting-rtts", str(GREETING_RTTS)],
                      sink_port, log=env.tmp / "distant-sink.log")
        try:
            proxy = start_proxy(env, upstream_port=sink_port)
            error = warm_up(proxy.port)
            if error:
                env.problems.append(f"distant / relayproxy: warm-up message failed: {error}")
        except RuntimeError as e:  # the direct rows are still worth having
            env.problems.append(f"distant / relayproxy: {e}")
            print(f"  distant        relayproxy failed: {e}")
        for pipelining in (True, False):
            for n in DISTANT_RECIPIENTS:
                for target, connect in (("direct", False), ("direct", True), ("relayproxy", False), ("relayproxy", True)):
                    if target == "relayproxy" and proxy is None:
                        continue
                    port = proxy.port if proxy and target == "relayproxy" else sink_port
                    cfg = DistantConfig(port=port, pipelining=pipelining, recipients=n, connect_per_message=connect,
                                        messages=messages, max_seconds=max_seconds, min_messages=least,
                                        user=USER, password=PASSWORD)
                    client = "pipelining" if pipelining else "not pipelining"
                    session = "connect + EHLO + AUTH per message" if connect else "open session"
                    print(f"  {'distant':<14} {target:<10} {client}, {n} rcpt, {session} ...", end="", flush=True)
                    cpu0 = proxy.cpu() if proxy and target == "relayproxy" else None
                    result = distant_client.run(cfg)
                    row = Row(target, target_label(env, target), result=result)
                    if proxy and cpu0 is not None:
                        row.cpu_s = proxy.cpu() - cpu0
                    row.extra.update(pipelining=pipelining, recipients=n, connect=connect, client=client, session=session,
                                     floor=floor_rtts(pipelining, n, connect, target == "relayproxy"))
                    sc.rows.append(row)
                    p50 = result.percentile(50)
                    print(f" {result.ok} msgs, p50 {ms(p50)} ms = {fmt(p50 / rtt if p50 else None, 2)} RTT, {result.errors} errors")
                    if result.errors:
                        env.problems.append(f"distant / {target} ({client}, {n} rcpt, {session}): " + " | ".join(result.error_samples[:3]))
        if proxy and not proxy.alive():
            env.problems.append(f"distant / relayproxy: the process exited with status {proxy.proc.returncode}{proxy.log_tail()}")
    except RuntimeError as e:
        env.problems.append(f"distant: {e}")
        print(f"  distant failed: {e}")
    finally:
        if proxy:
            proxy.stop()
            server_problems(env, "distant / relayproxy", proxy)
        if sink:
            if not sink.alive():
                env.problems.append(f"distant: the distant sink exited with status {sink.proc.returncode}{sink.log_tail()}")
            sink.stop()
    sc.notes.append(
        f"bench/distant_sink.py holds every reply back by the RTT ({env.rtt_ms:g} ms), from the moment its command "
        f"arrived (a pipelined group's replies each RTT after their own command, in order); its greeting leaves "
        f"{GREETING_RTTS:g} RTT after the connection was accepted (handshake + greeting). Latency per message: MAIL "
        "sent to the final 250 on an open session; connect started to the final 250 when connecting per message. "
        f"Each row: up to {messages} sequential messages of 10 KiB (at least {least}, then stopping after "
        f"{max_seconds:g} s), after one untimed message; one relayproxy process (upstream = the distant sink, "
        "`tls = \"none\"`, its default pool) serves every relayproxy row. \"floor\" = the round trips the client's "
        "own dialogue needs with the distant sink (through the proxy, the message's only: the proxy is local and "
        "its pooled upstream session is already open); proxy CPU = relayproxy's utime+stime per message in that row."
    )
    return sc


# -- report -------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def rate_table(sc: Scenario, unit: str, p50_label: str, ratio_digits: int, reference: bool = False) -> list[str]:
    """Rows of rate, ratio to the direct row, latency, CPU and memory: messages or AUTHs."""
    direct = sc.row("direct")
    out = [
        f"| target | {unit}/s | ratio to direct | {p50_label} | p99 ms | CPU s / 1,000 {unit} | generator CPU s / 1,000 {unit} "
        f"| CPU / generator CPU | peak RSS MiB | {unit}s | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sc.rows:
        r = row.result
        if r is None:
            out.append(f"| {row.label} | {row.note or 'not run'} | | | | | | | | | |")
            continue
        if row.target == "direct":
            ratio = "1.00x"
        elif direct and direct.result and direct.result.rate:
            ratio = f"{r.rate / direct.result.rate:.{ratio_digits}f}x"
        else:
            ratio = "-"
        cpu, gen = row.cpu_per_1000(), row.generator_cpu_per_1000()
        out.append(
            f"| {row.label} | {fmt(r.rate)} | {ratio} | {ms(r.percentile(50))} | {ms(r.percentile(99))} | "
            f"{fmt(cpu, 2)} | {fmt(gen, 2)} | {fmt(cpu / gen if cpu is not None and gen else None, 2)} | "
            f"{fmt(row.rss_peak)} | {r.ok:,} | {r.errors} |"
        )
    if reference:
        measured = {row.target for row in sc.rows if row.result is not None}
        for key, ref in REFERENCE.items():
            if key in measured:
                continue  # measured in this run: the figure from elsewhere is not needed
            rate = ref["rate"] if isinstance(ref["rate"], str) else fmt(ref["rate"], 0)
            out.append(f"| {ref['label']} | {rate} | {ref['ratio']} | (+{ref['added_p50']} 1 session) | - | {ref['cpu']} | - | - | - | - | - |")
    return out


def cpu_table(scenarios: dict[str, Scenario]) -> list[str]:
    """The no-regression figure: proxy CPU per message against the load generator's own, same round."""
    out = [
        "| scenario | relayproxy CPU ms / msg | generator CPU ms / msg (through relayproxy) | relayproxy / generator "
        "| generator CPU ms / msg (direct) | relayproxy / generator (direct) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in ("s20x1", "s20x10", "s1", "s20x1m"):
        sc = scenarios.get(key)
        if sc is None:
            continue
        p, d = sc.row("relayproxy"), sc.row("direct")
        cpu = p.cpu_per_1000() if p else None
        gen = p.generator_cpu_per_1000() if p else None
        gen_d = d.generator_cpu_per_1000() if d else None
        out.append(f"| {sc.title} | {fmt(cpu, 3)} | {fmt(gen, 3)} | {fmt(cpu / gen if cpu is not None and gen else None, 2)} | "
                   f"{fmt(gen_d, 3)} | {fmt(cpu / gen_d if cpu is not None and gen_d else None, 2)} |")
    return out


def distant_table(sc: Scenario, rtt_ms: float) -> list[str]:
    out = [
        "| client | recipients | target | session | msgs | p50 ms | p99 ms | p50 RTT | floor RTT | p50 - floor ms "
        "| p50 - direct p50 ms | proxy CPU ms / msg | errors |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    direct_p50 = {(row.extra["pipelining"], row.extra["recipients"], row.extra["connect"]): row.result.percentile(50)
                  for row in sc.rows if row.target == "direct" and row.result is not None}
    for row in sc.rows:
        r, x = row.result, row.extra
        if r is None:
            continue
        p50 = r.percentile(50)
        above = (p50 * 1000 - x["floor"] * rtt_ms) if p50 is not None else None
        base = direct_p50.get((x["pipelining"], x["recipients"], x["connect"]))
        versus = "-" if row.target == "direct" or p50 is None or base is None else f"{(p50 - base) * 1000:+.2f}"
        # The proxy's CPU over the row covers its untimed first message too.
        cpu = row.cpu_s * 1000 / (r.ok + 1) if row.cpu_s is not None else None
        out.append(
            f"| {x['client']} | {x['recipients']} | {row.label} | {x['session']} | {r.ok} | {ms(p50)} | {ms(r.percentile(99))} | "
            f"{fmt(p50 * 1000 / rtt_ms if p50 is not None else None, 2)} | {x['floor']:g} | {fmt(above, 2)} | "
            f"{versus} | {fmt(cpu, 2)} | {r.errors} |"
        )
    return out


def big_table(sc: Scenario) -> list[str]:
    out = [
        "| target | 1 MiB msg: peak RSS MiB | big msg: peak RSS MiB | RSS growth MiB | big msg: seconds | MiB/s | CPU s for the big message | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sc.rows:
        r = row.result
        if r is None:
            out.append(f"| {row.label} | failed | | | | | | |")
            continue
        hwm1 = row.extra.get("hwm_1mib")
        growth = row.rss_peak - hwm1 if row.rss_peak is not None and hwm1 is not None else None
        mibs = (sc_big_size(sc) / MiB / r.elapsed) if r.elapsed else None
        out.append(f"| {row.label} | {fmt(hwm1)} | {fmt(row.rss_peak)} | {fmt(growth)} | {fmt(r.elapsed, 2)} | {fmt(mibs, 0)} | {fmt(row.cpu_s, 2)} | {r.errors} |")
    out.append(f"| {REFERENCE['emailrelay']['label']} | - | {REFERENCE['emailrelay']['rss_100mib']} | - | - | - | - | - |")
    out.append(f"| {REFERENCE['aiosmtpd']['label']} | - | {REFERENCE['aiosmtpd']['rss_100mib']} | - | - | - | - | - |")
    return out


def sc_big_size(sc: Scenario) -> int:
    return int(sc.title.split()[1]) * MiB


def hold_table(sc: Scenario) -> list[str]:
    out = [
        "| target | sessions connected | authenticated | RSS while held MiB | RSS after start MiB | peak RSS MiB | AUTH p50 ms | AUTH p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sc.rows:
        r = row.result
        if r is None:
            out.append(f"| {row.label} | {row.note or 'not run'} | | | | | | | |")
            continue
        out.append(
            f"| {row.label} | {row.extra.get('connected', '-')} | {row.extra.get('authenticated', '-')} | "
            f"{fmt(row.extra.get('VmRSS'))} | {fmt(row.rss_start)} | {fmt(row.rss_peak)} | "
            f"{ms(r.percentile(50, 'auth_latencies'))} | {ms(r.percentile(99, 'auth_latencies'))} | {r.errors} |"
        )
    return out


@dataclass
class Target:
    what: str
    goal: str
    measured: str
    met: bool | None
    margin: str


def verdict(measured: float | None, goal: float, higher_is_better: bool, unit: str = "", digits: int = 2) -> tuple[bool | None, str]:
    if measured is None:
        return None, "not measured"
    if higher_is_better:
        met = measured >= goal
        diff = measured - goal
    else:
        met = measured <= goal
        diff = goal - measured
    pct = abs(diff) / goal * 100 if goal else float("inf")
    if met:
        return True, f"by {abs(diff):,.{digits}f}{unit} ({pct:.0f} % headroom)"
    factor = (goal / measured if higher_is_better else measured / goal) if measured else float("inf")
    return False, f"by {abs(diff):,.{digits}f}{unit} ({pct:.0f} %; {factor:,.1f}x off)"


def evaluate(scenarios: dict[str, Scenario], env: Env) -> list[Target]:
    targets: list[Target] = []

    def ratio(key: str) -> float | None:
        sc = scenarios.get(key)
        if not sc:
            return None
        p, d = sc.row("relayproxy"), sc.row("direct")
        if not p or not d or not d.result or not d.result.rate:
            return None
        return p.result.rate / d.result.rate  # type: ignore[union-attr]

    for key in ("s20x1", "s20x10"):
        sc = scenarios.get(key)
        if sc is None:
            continue
        r = ratio(key)
        met, margin = verdict(r, 0.6, True)
        targets.append(Target(f"20 sessions x 10 KiB with AUTH, {sc.title.split(', ')[1]}: relayproxy / direct", ">= 0.6x",
                              "-" if r is None else f"{r:.2f}x", met, margin))
    emailrelay_measured = False
    for key in ("s20x1", "s20x10"):
        sc = scenarios.get(key)
        if sc is None:
            continue
        p = sc.row("relayproxy")
        er = sc.row("emailrelay")
        base = er.result.rate if er and er.result else EMAILRELAY_REFERENCE_RATE
        emailrelay_measured = er is not None
        x = p.result.rate / base if p and p.result else None
        met, margin = verdict(x, 2.5, True)
        targets.append(Target(
            f"20 sessions x 10 KiB, {sc.title.split(', ')[1]}: relayproxy / E-MailRelay "
            f"({'measured' if emailrelay_measured else 'reference 353 msg/s'})", ">= 2.5x",
            "-" if x is None else f"{x:.2f}x ({p.result.rate:,.0f} msg/s)" if p and p.result else "-", met, margin))
    sc = scenarios.get("s1")
    if sc:
        p, d = sc.row("relayproxy"), sc.row("direct")
        added = None
        if p and d and p.result and d.result and p.result.latencies and d.result.latencies:
            added = (p.result.percentile(50) - d.result.percentile(50)) * 1000  # type: ignore[operator]
        met, margin = verdict(added, 1.0, False, " ms")
        targets.append(Target("1 session x 10 KiB: p50 added per message (proxy p50 - direct p50)", "<= 1 ms",
                              "-" if added is None else f"{added:.2f} ms", met, margin))
    sc = scenarios.get("s20x1m")
    if sc:
        r = ratio("s20x1m")
        met, margin = verdict(r, 0.8, True)
        targets.append(Target(f"20 sessions x 1 MiB, {sc.title.split(', ')[1]}: relayproxy / direct", ">= 0.8x",
                              "-" if r is None else f"{r:.2f}x", met, margin))
    sc = scenarios.get("big")
    if sc:
        p = sc.row("relayproxy")
        growth = None
        if p and p.rss_peak is not None and p.extra.get("hwm_1mib") is not None and p.result and p.result.ok:
            growth = p.rss_peak - p.extra["hwm_1mib"]
        size = sc_big_size(sc) // MiB
        met, margin = verdict(growth, 16.0, False, " MiB", 1)
        goal = "< 16 MiB" + ("" if size == 200 else f" (for 200 MiB; this run used {size} MiB)")
        targets.append(Target(f"one {size} MiB message: peak RSS growth over a 1 MiB message", goal,
                              "-" if growth is None else f"{growth:.1f} MiB", met, margin))
    sc = scenarios.get("hold")
    if sc:
        n = sc.rows[0].extra.get("sessions", 2000) if sc.rows else 2000
        chosen = None
        for row in sc.rows:
            if row.target == "relayproxy" and row.result and row.extra.get("authenticated") == n:
                chosen = row
                break
        rss = chosen.extra.get("VmRSS") if chosen else None
        peak = chosen.rss_peak if chosen else None
        value = max(x for x in (rss, peak) if x is not None) if chosen and (rss or peak) else None
        met, margin = verdict(value, 200.0, False, " MiB", 1)
        how = f" ({chosen.label}; peak RSS)" if chosen else " (no run authenticated every session)"
        targets.append(Target(f"{n} concurrent authenticated sessions: proxy RSS{how}", "< 200 MiB" + ("" if n == 2000 else " (for 2,000)"),
                              "-" if value is None else f"{value:.1f} MiB", met, margin))
        first = sc.rows[0] if sc.rows else None
        if first and first.result and first.extra.get("authenticated", 0) < n:
            targets.append(Target(f"{n} sessions authenticate within the hold time ({first.label})", f"{n} of {n}",
                                  f"{first.extra.get('authenticated')} of {n}", False,
                                  f"{n - first.extra.get('authenticated', 0)} still waiting for their AUTH reply"))
    sc = scenarios.get("auth")
    if sc:
        p = sc.row("relayproxy")
        rate = p.result.rate if p and p.result else None
        met, margin = verdict(rate, 2000.0, True, " AUTH/s", 0)
        targets.append(Target("repeated AUTH of one user, 20 concurrent connections", ">= 2,000 AUTH/s",
                              "-" if rate is None else f"{rate:,.1f} AUTH/s", met, margin))
    sc = scenarios.get("distant")
    if sc:
        targets += distant_targets(sc, env.rtt_ms)
    return targets


def distant_targets(sc: Scenario, rtt_ms: float) -> list[Target]:
    def p50_ms(target: str, pipelining: bool, n: int, connect: bool) -> float | None:
        for row in sc.rows:
            x = row.extra
            if (row.target, x.get("pipelining"), x.get("recipients"), x.get("connect")) == (target, pipelining, n, connect):
                p50 = row.result.percentile(50) if row.result else None
                return None if p50 is None else p50 * 1000
        return None

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms ({value / rtt_ms:.2f} RTT)"

    targets: list[Target] = []
    for pipelining in (True, False):
        client = "pipelining" if pipelining else "non-pipelining"
        for n in DISTANT_RECIPIENTS:
            rtts = 2 if pipelining else 3 + n
            goal = rtts * rtt_ms + 3
            value = p50_ms("relayproxy", pipelining, n, False)
            direct = p50_ms("direct", pipelining, n, False)
            met, margin = verdict(value, goal, False, " ms", 1)
            formula = "2 RTT + 3 ms" if pipelining else f"(3 + {n}) RTT + 3 ms"
            # The same client straight to the sink, for scale: the harness's own timing is in both.
            beside = f"{shown(value)}; straight to the sink {shown(direct)}" if direct is not None else shown(value)
            targets.append(Target(f"distant upstream ({rtt_ms:g} ms RTT), {client} client, {n} recipient{'s' if n > 1 else ''}: "
                                  "relayproxy p50 per message (open session)", f"<= {formula} = {goal:g} ms", beside, met, margin))
    for pipelining in (True, False):
        client = "pipelining" if pipelining else "non-pipelining"
        for n in DISTANT_RECIPIENTS:
            direct = p50_ms("direct", pipelining, n, True)
            value = p50_ms("relayproxy", pipelining, n, True)
            met, margin = verdict(value, direct, False, " ms", 1) if direct is not None else (None, "not measured")
            targets.append(Target(f"distant upstream, {client} client connecting once per message, {n} recipient{'s' if n > 1 else ''}: "
                                  "p50 through relayproxy vs straight to the sink", f"< direct {shown(direct)}", shown(value), met, margin))
    return targets


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages: anything else busy on the machine shows here."""
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


class LoadWatch:
    """Samples the 1-minute load average every few seconds during the run, in a daemon thread. The
    benchmark itself keeps up to about 4 processes runnable (proxy, 2 generator workers, sink); much
    more than that means other work (a test suite, say) was sharing the cores."""

    def __init__(self, every: float = 5.0) -> None:
        self.samples: list[float] = []
        self.every = every
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                self.samples.append(float(Path("/proc/loadavg").read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(self.every)

    def summary(self) -> str:
        if not self.samples:
            return "not sampled"
        return (f"1-minute load average sampled every {self.every:g} s: median {statistics.median(self.samples):.2f}, "
                f"max {max(self.samples):.2f}")


def machine() -> list[str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    return [f"nproc {os.cpu_count()}", f"CPU {model}", f"memory {mem}", f"kernel {platform.release()}",
            f"Python {platform.python_version()}"]


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "relayproxy"], capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" (relayproxy/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def report(env: Env, scenarios: dict[str, Scenario], targets: list[Target], started: float, argv: list[str]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# relayproxy benchmark{' (quick run: short scenarios, figures are rough)' if env.quick else ''}",
        "",
        f"{now}; git {git_rev()}; took {time.monotonic() - started:.0f} s.",
        "",
        "- Machine: " + ", ".join(machine()) + ".",
        f"- Load average (1 / 5 / 15 min) at the start: {env.loadavg_start}; at the end: {loadavg()}; "
        f"{env.load_watch.summary() if env.load_watch else ''} (the benchmark alone keeps about 4 processes busy "
        "in the rate scenarios, 1 in the distant one; other work on the machine shares its cores with it).",
        f"- Sink: {env.sink_kind}.",
        "- Load generator: bench/loadgen.py (asyncio streams, AUTH PLAIN on every connection, no pipelining; "
        "2 processes for 20+ sessions). Latency per message = MAIL sent to final 250. Distant scenario: "
        "bench/distant_client.py (one session, pipelining or not) against bench/distant_sink.py.",
        "- Proxy: `twistd -n --pidfile= relayproxy --config CONFIG` from this checkout (PYTHONPATH), loopback plaintext "
        "listener, upstream 127.0.0.1 `tls = \"none\"`, one user with bcrypt cost "
        f"{env.bcrypt_cost}{'' if env.bcrypt_cost == 12 else ' (NOT the production cost 12)'}, [limits] max_connections and "
        "max_connections_per_ip 5000, max_unauthenticated 4999; a fresh process per round, so peak RSS (VmHWM) and CPU (utime+stime) are per round.",
        f"- Peers: aiosmtpd Proxy handler with AUTH (bench/peer_aiosmtpd.py, bcrypt users file, a verified login "
        f"remembered for 300 s): {'measured' if env.aiosmtpd else 'not measured'}; "
        + (f"Postfix {env.postfix_version} smtpd with Cyrus SASL (sasldb) relaying to the sink via relayhost "
           "(bench/peer_postfix.py, a private instance on 127.0.0.1): measured in the rate scenarios; "
           if env.postfix is None else f"Postfix + SASL: not measured ({env.postfix}), reference figure shown; ")
        + "E-MailRelay: "
        f"{'installed at ' + env.emailrelay + ' but not driven by this harness' if env.emailrelay else 'not installed'} "
        "(reference figures from the performance notes, measured elsewhere, are labelled as such).",
        f"- Command: `{' '.join(argv)}`",
        "",
        "## Targets (report only; a missed target does not fail the command)",
        "",
        "| target | goal | measured | verdict |",
        "|---|---|---|---|",
    ]
    for t in targets:
        v = "n/a" if t.met is None else ("met" if t.met else "**missed**")
        lines.append(f"| {t.what} | {t.goal} | {t.measured} | {v} {t.margin} |")
    if any(key in scenarios for key in ("s20x1", "s20x10", "s1", "s20x1m")):
        lines += ["", "## CPU per message: relayproxy and the load generator (the no-regression figure)", ""]
        lines += cpu_table(scenarios)
        lines += ["", "relayproxy CPU = the proxy process's utime+stime during the round shown below; generator CPU = "
                  "utime+stime of bench/loadgen.py's worker processes (from their own os.times()) in the same round, "
                  "per accepted message. The ratio cancels most of a shared VM's speed drift between runs."]
    for sc in scenarios.values():
        lines += ["", f"## {sc.title}", ""]
        if sc.kind == "throughput":
            lines += rate_table(sc, "msg", "p50 ms", 2, reference=sc.key in ("s20x1", "s20x10", "s1"))
        elif sc.kind == "big":
            lines += big_table(sc)
        elif sc.kind == "hold":
            lines += hold_table(sc)
        elif sc.kind == "auth":
            lines += rate_table(sc, "AUTH", "p50 ms (connect to AUTH reply)", 3)
        elif sc.kind == "distant":
            lines += distant_table(sc, env.rtt_ms)
        elif sc.kind == "spool":
            lines += spool_table(sc)
        for note in sc.notes:
            lines += ["", note]
    lines += ["", "## Problems", ""]
    lines += [f"- {p}" for p in env.problems] or ["- none"]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------


SCENARIOS = ["s20x1", "s20x10", "s1", "s20x1m", "big", "hold", "auth", "distant", "spool"]


def raise_nofile() -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 65536))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass
    return f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"


def main() -> int:
    ap = argparse.ArgumentParser(description="relayproxy benchmark: every scenario through the proxy, direct, and peers.")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
                    help="a ~1 minute smoke run (also BENCH_QUICK=1)")
    ap.add_argument("--only", default="", help=f"comma-separated scenarios: {','.join(SCENARIOS)}")
    ap.add_argument("--sink", choices=["auto", "smtp-sink", "asyncio"], default="auto")
    ap.add_argument("--no-peers", action="store_true", help="skip the aiosmtpd and Postfix peers")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="the distant scenario's round trip (default 20 ms)")
    ap.add_argument("--bcrypt-cost", type=int, default=12,
                    help="cost of the benchmark user's bcrypt hash (default 12, as in production; lower only to diagnose)")
    ap.add_argument("--output", type=Path, default=BENCH / "results" / "latest.md")
    ap.add_argument("--profile", type=Path, default=None,
                    help="profile the proxy with cProfile (twistd --profiler) in the s20x10 scenario; write the top functions here")
    args = ap.parse_args()
    started = time.monotonic()
    load_at_start = loadavg()
    nofile = raise_nofile()
    only = [s for s in args.only.split(",") if s] or SCENARIOS
    if args.profile:
        only = args.only.split(",") if args.only else ["s20x10"]
    bad = [s for s in only if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenarios {bad}; choose from {SCENARIOS}")

    twistd = str(Path(sys.executable).parent / "twistd")
    if not Path(twistd).exists():
        twistd = shutil.which("twistd") or "twistd"
    try:
        import aiosmtpd  # noqa: F401
        have_aiosmtpd = not args.no_peers and not args.profile
    except ImportError:
        have_aiosmtpd = False
    tmp = Path(tempfile.mkdtemp(prefix="relayproxy-bench-"))
    print(f"bench: work directory {tmp}; open files limit {nofile}")
    print(f"bench: hashing the benchmark user's password (bcrypt cost {args.bcrypt_cost}; production: 12)")
    users = tmp / "users"
    write_users_file(users, {USER: hash_password(PASSWORD, rounds=args.bcrypt_cost)})
    users_cheap = tmp / "users-cost4"
    write_users_file(users_cheap, {USER: hash_password(PASSWORD, rounds=4)})
    sink, sink_kind = start_sink(tmp, args.sink)
    env = Env(quick=args.quick, tmp=tmp, python=sys.executable, twistd=twistd, sink=sink, sink_kind=sink_kind,
              users_file=users, users_file_cheap=users_cheap, aiosmtpd=have_aiosmtpd, emailrelay=shutil.which("emailrelay"),
              bcrypt_cost=args.bcrypt_cost, rtt_ms=args.rtt_ms,
              postfix="--no-peers" if args.no_peers or args.profile else peer_postfix.missing(),
              postfix_version=peer_postfix.version(), loadavg_start=load_at_start, load_watch=LoadWatch())
    if args.profile:
        env.profile = tmp / "proxy.prof"
    print(f"bench: sink {sink_kind}")
    print(f"bench: Postfix peer {'available (Postfix ' + env.postfix_version + ')' if env.postfix is None else 'not used: ' + env.postfix}")
    print(f"bench: aiosmtpd peer {'available' if have_aiosmtpd else 'not used'}; "
          f"E-MailRelay {'found at ' + env.emailrelay + ' (not driven by this harness)' if env.emailrelay else 'not installed'}")
    d = durations(env)
    scenarios: dict[str, Scenario] = {}
    try:
        for key in only:
            if key == "s20x1":
                scenarios[key] = throughput(env, key, "20 sessions x 10 KiB, 1 message per connection", 20, 1, 10 * KiB, d)
            elif key == "s20x10":
                scenarios[key] = throughput(env, key, "20 sessions x 10 KiB, 10 messages per connection", 20, 10, 10 * KiB, d)
            elif key == "s1":
                sc = throughput(env, key, "1 session x 10 KiB, 1000 messages per connection (added latency)", 1, 1000, 10 * KiB, d)
                scenarios[key] = sc
            elif key == "s20x1m":
                scenarios[key] = throughput(env, key, "20 sessions x 1 MiB, 10 messages per connection", 20, 10, 1 * MiB, d)
            elif key == "big":
                scenarios[key] = big_message(env)
            elif key == "hold":
                scenarios[key] = hold(env)
            elif key == "auth":
                scenarios[key] = auth_rate(env)
            elif key == "distant":
                scenarios[key] = distant(env)
            elif key == "spool":
                scenarios[key] = spool_intake(env)
            if not sink.alive():
                env.problems.append(f"the sink exited with status {sink.proc.returncode} during {key}")
                break
    finally:
        sink.stop()
    targets = evaluate(scenarios, env)
    argv = ["make", "bench"] + (["BENCH_QUICK=1"] if env.quick else []) if os.environ.get("BENCH_FROM_MAKE") else [sys.argv[0], *sys.argv[1:]]
    text = report(env, scenarios, targets, started, argv)
    if args.profile and env.profile and env.profile.exists():
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        import io
        buf = io.StringIO()
        stats = pstats.Stats(str(env.profile), stream=buf)
        stats.strip_dirs()
        buf.write(f"cProfile of relayproxy (twistd --profiler=cprofile) during: {', '.join(only)}\n\n== by own time ==\n")
        stats.sort_stats("tottime").print_stats(40)
        buf.write("\n== by cumulative time ==\n")
        stats.sort_stats("cumulative").print_stats(40)
        args.profile.write_text(buf.getvalue() + "\n\n" + text)
        print(f"bench: profile written to {args.profile}")
    elif args.profile:
        print("bench: no profile was written (did the proxy stop cleanly?)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if not args.profile:
        args.output.write_text(text)
    print()
    print(text)
    if not args.profile:
        print(f"bench: written to {args.output}")
    shutil.rmtree(tmp, ignore_errors=True)
    for directory in env.cleanup:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
