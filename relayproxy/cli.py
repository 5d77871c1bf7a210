"""The ``relayproxy`` command: one subcommand per task."""

from __future__ import annotations

import argparse
import getpass
import sys
import tomllib
from pathlib import Path
from typing import Any

from relayproxy.config import DEFAULT_PATH, Config, load_config
from relayproxy.usersfile import (
    DEFAULT_ROUNDS,
    UsersFileError,
    check_password,
    hash_password,
    read_users_file,
    user_name_problem,
    write_users_file,
)
from relayproxy.errors import ConfigError


class CommandError(Exception):
    """A subcommand cannot do its job; the message tells the user why (exit status 2)."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except CommandError as e:
        print(f"relayproxy: {e}", file=sys.stderr)
        return 2
    return status


def build_parser() -> argparse.ArgumentParser:
    # prog is fixed so that "python -m relayproxy" shows the same name.
    parser = argparse.ArgumentParser(
        prog="relayproxy", description="An authenticating SMTP relay proxy."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # Each subcommand sets func(args) -> exit status.
    _add_passwd(sub)
    _add_oauth(sub)
    _add_demo(sub)
    _add_explain(sub)
    _add_check(sub)
    _add_queue(sub)
    return parser


def _add_queue(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = sub.add_parser(
        "queue",
        help="list, show, retry or delete spooled messages (also while the proxy runs)",
        description=(
            "The spool of users with delivery = \"spool\" or \"relay-then-spool\", read from [spool] "
            "directory. list: the messages waiting (with --failed: those given up on, in failed/); show ID: "
            "a message's envelope, delivery state and header; retry ID: try it again at once (a failed one "
            "goes back to the queue), which the running proxy notices within [spool] scan_interval; "
            "delete ID: remove it undelivered, telling nobody. A message being delivered right now is left "
            "alone: exit status 1, as for an unknown ID; 2 for a bad configuration."
        ),
    )
    queue.add_argument("--config", type=Path, default=DEFAULT_PATH, help="the configuration file (default: %(default)s)")
    actions = queue.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the messages waiting, oldest first")
    listing.add_argument("--failed", action="store_true", help="list failed/ instead: the messages given up on")
    parsers = [listing]
    for name, what in (("show", "one message's envelope, state and header"), ("retry", "try a message again at once"),
                       ("delete", "remove a message undelivered")):
        action = actions.add_parser(name, help=what)
        action.add_argument("id", help="the message's ID, as list shows it and the 250 reply named it")
        parsers.append(action)
    for action in parsers:
        # After the action too (relayproxy queue list --config PATH); SUPPRESS keeps one given before it.
        action.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="the configuration file")
    queue.set_defaults(func=_queue)


def _queue(args: argparse.Namespace) -> int:
    from relayproxy import queue
    from relayproxy.spool.store import Spool

    config = _loaded(args.config)
    if config is None:
        return 2
    assert config.spool.directory is not None
    spool = Spool(config.spool.directory)
    if not spool.queue.is_dir():
        raise CommandError(f"{spool.directory} holds no spool (no queue/ folder): no user's delivery has used it yet")
    if args.action == "list":
        return queue.list_messages(spool, print, failed=args.failed)
    command = {"show": queue.show, "retry": queue.retry, "delete": queue.delete}[args.action]
    return command(spool, args.id, print)


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser(
        "check",
        help="validate the configuration, then test every upstream with the central credentials (sends no mail)",
        description=(
            "Validate the configuration and the users file, then connect to every upstream: EHLO, "
            "TLS (prints the version and the certificate's subject and expiry), AUTH with the "
            "central credentials, QUIT; for a Graph upstream, an access token, whose roles must hold Mail.Send "
            "(the mailbox and the token's expiry are shown). One line per upstream, with a hint under each failure. "
            "Exit status 0 when all upstreams work, 1 when any fails, 2 for a bad configuration. "
            "With --offline only the configuration and the users file are checked, connecting nowhere "
            "(for CI and configuration management): exit status 0 or 2."
        ),
    )
    check.add_argument("--config", type=Path, default=DEFAULT_PATH, help="the configuration file (default: %(default)s)")
    check.add_argument("--offline", action="store_true", help="check the files only: no upstream, Redis or token endpoint is contacted")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from relayproxy.check import check_users, summary

    config = _loaded(args.config)
    if config is None:
        return 2
    check_users(config, print)
    if args.offline:
        print(summary(config))
        return 0
    # Only now: an offline check needs no reactor.
    from twisted.internet import task

    from relayproxy.check import check_upstreams

    failed: list[int] = []

    async def run(reactor: Any) -> None:
        failed.append(await check_upstreams(config, reactor, lambda line: print(line, flush=True)))

    try:
        task.react(run)
    except SystemExit:
        pass
    return 1 if not failed or failed[0] else 0


def _loaded(path: Path) -> Config | None:
    """The configuration, or None once each problem is printed (the caller exits with status 2)."""
    try:
        return load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(f"relayproxy: {problem}", file=sys.stderr)
        return None


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the proxy in front of a local stand-in smarthost or Microsoft Graph (127.0.0.1 only)",
        description=(
            "Start a stand-in smarthost (STARTTLS and AUTH required) and relayproxy in front of it, "
            "print a demo login and a command that sends a test message, and show every message the "
            "smarthost receives. With --graph the stand-in is Microsoft Graph instead: an identity-platform "
            "token endpoint and sendMail over HTTPS, so the proxy signs in as an app (client credentials), "
            "sends each message with Graph's sendMail and answers with Graph's request id; every message "
            "Graph \"sent\" is shown. Certificates come from a throwaway CA, and the proxy verifies them. "
            "Needs the demo extra: pip install 'relayproxy[demo]'."
        ),
    )
    demo.add_argument("--dir", type=Path, help="where to write the config, certificates and received mail (default: a new temporary directory)")
    demo.add_argument("--port", type=int, default=2587, help="the proxy's STARTTLS port (default: %(default)s)")
    demo.add_argument("--plain-port", type=int, default=2525, help="the proxy's loopback plaintext port (default: %(default)s)")
    demo.add_argument("--smarthost-port", type=int, default=2465, help="the stand-in smarthost's port (default: %(default)s)")
    demo.add_argument(
        "--graph", action="store_true",
        help='put the proxy in front of a stand-in for Microsoft Graph (an upstream with kind = "graph") instead of the smarthost',
    )
    demo.add_argument("--graph-port", type=int, default=2443, help="the stand-in Graph's HTTPS port, with --graph (default: %(default)s)")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from relayproxy.demo import run_demo

    return run_demo(args.dir, args.port, args.plain_port, args.smarthost_port, graph=args.graph, graph_port=args.graph_port)


def _add_oauth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    oauth = sub.add_parser(
        "oauth",
        help="sign in an xoauth2 upstream once and store its refresh token",
        description=(
            "Sign in [upstream.NAME] with the OAuth device authorization grant: print a URL and a code "
            "to enter there in any browser, wait for the sign-in, and store the refresh token in the "
            "upstream's refresh_token_file. Exit status 0 once stored, 1 if the sign-in was declined, "
            "expired or failed, 2 for a configuration problem."
        ),
    )
    oauth.add_argument("name", metavar="NAME", help="the upstream, as in [upstream.NAME]")
    oauth.add_argument(
        "--config", type=Path, default=DEFAULT_PATH, help="the configuration (default: %(default)s)"
    )
    oauth.set_defaults(func=_oauth)


def _oauth(args: argparse.Namespace) -> int:
    # Imported here so that the other subcommands do not pay for Twisted's web client.
    from twisted.internet import task

    from relayproxy.oauth import DevicePrompt, TokenError, device_flow

    name: str = args.name
    try:
        # The refresh token file may not exist yet: creating it is what this command is for.
        config = load_config(args.config, for_oauth_setup=True)
    except ConfigError as e:
        for problem in e.problems:
            print(f"relayproxy: {problem}", file=sys.stderr)
        return 2
    upstream = config.upstreams.get(name)
    where = f"{config.path}: upstream.{name}"
    if upstream is None:
        raise CommandError(
            f"{config.path}: there is no [upstream.{name}]; name one of: {', '.join(config.upstreams)}"
        )
    if upstream.oauth is None:
        raise CommandError(
            f'{where}.auth: "password" needs no sign-in; set auth = "xoauth2" with token_url, '
            "client_id, refresh_token_file and device_authorization_url"
        )
    if upstream.oauth.grant != "refresh_token":
        # A Graph upstream has grant "client_credentials" too, without the key in the file.
        raise CommandError(
            f'{where}.grant: "{upstream.oauth.grant}" needs no sign-in, relayproxy authenticates as the '
            'application (client secret, certificate or service account key); use grant = "refresh_token" '
            "to sign in as a user"
        )
    if upstream.oauth.device_authorization_url is None:
        raise CommandError(
            f"{where}.device_authorization_url: missing; set the provider's device authorization "
            'endpoint, such as "https://login.microsoftonline.com/TENANT/oauth2/v2.0/devicecode"'
        )

    def show(prompt: DevicePrompt) -> None:
        print(f"To sign in upstream {name} as {upstream.username}, open {prompt.verification_uri}")
        print(f"and enter the code {prompt.user_code} within {prompt.expires_in / 60:.0f} minutes.")
        if prompt.verification_uri_complete:
            print(f"(Or open {prompt.verification_uri_complete}, which has the code filled in.)")
        print("Waiting for the sign-in...", flush=True)

    # What sign_in ended with: None once stored, else the reason; nothing if interrupted.
    outcome: list[str | None] = []

    async def sign_in(reactor: Any) -> None:
        try:
            await device_flow(reactor, upstream, show)
        except TokenError as e:
            outcome.append(e.detail)
        else:
            outcome.append(None)

    try:
        task.react(sign_in)
    except SystemExit:
        # react always ends by exiting; how the sign-in went is in outcome.
        pass
    if not outcome:
        print("relayproxy: the sign-in did not finish; nothing was stored", file=sys.stderr)
        return 1
    if outcome[0] is not None:
        print(f"relayproxy: {outcome[0]}", file=sys.stderr)
        return 1
    print(f"Signed in: stored the refresh token in {upstream.oauth.refresh_token_file}")
    return 0


def _add_passwd(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    passwd = sub.add_parser(
        "passwd",
        help="manage the users file",
        description="Add, change, delete, list and check the users who may log in.",
    )
    where = passwd.add_mutually_exclusive_group()
    where.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_PATH,
        help="take the users file from [auth] users_file of this configuration (default: %(default)s)",
    )
    where.add_argument("--users-file", type=Path, help="the users file itself")
    actions = passwd.add_subparsers(dest="action", required=True)

    add = actions.add_parser("add", help="add a user or change a password")
    add.add_argument("name")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password as one line from stdin"
    )
    add.add_argument(
        "--rounds",
        type=int,
        choices=range(4, 32),
        metavar="4..31",
        default=DEFAULT_ROUNDS,
        help="bcrypt cost (default: %(default)s)",
    )
    add.set_defaults(func=_passwd_add)

    delete = actions.add_parser("delete", help="delete a user")
    delete.add_argument("name")
    delete.set_defaults(func=_passwd_delete)

    list_ = actions.add_parser("list", help="list the user names")
    list_.set_defaults(func=_passwd_list)

    check = actions.add_parser(
        "check", help="check a password: exit status 0 if it matches, 1 if not"
    )
    check.add_argument("name")
    check.add_argument(
        "--password-stdin", action="store_true", help="read the password as one line from stdin"
    )
    check.set_defaults(func=_passwd_check)


def _users_file(args: argparse.Namespace) -> Path:
    if args.users_file is not None:
        path: Path = args.users_file
        return path
    config: Path = args.config
    # Only [auth] users_file is read, not the whole configuration checked, so
    # users can be created before the rest is set up.
    try:
        with config.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise CommandError(
            f"cannot read {config}: {e.strerror}; pass --config PATH or --users-file PATH"
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise CommandError(f"{config}: not valid TOML: {e}") from e
    auth = data.get("auth")
    users_file = auth.get("users_file") if isinstance(auth, dict) else None
    if not isinstance(users_file, str) or not users_file:
        raise CommandError(
            f"{config}: auth.users_file is not set; set it, or pass --users-file PATH"
        )
    return config.parent / users_file


def _read(path: Path, *, missing_ok: bool = False) -> dict[str, bytes]:
    try:
        return read_users_file(path)
    except FileNotFoundError as e:
        if missing_ok:
            return {}
        raise CommandError(f"{path} does not exist; create it with: relayproxy passwd add NAME") from e
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from e
    except UsersFileError as e:
        raise CommandError(f"{e}\n(correct the file by hand first)") from e


def _write(path: Path, users: dict[str, bytes]) -> None:
    try:
        write_users_file(path, users)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}") from e


def _name(args: argparse.Namespace) -> str:
    name: str = args.name
    problem = user_name_problem(name)
    if problem:
        raise CommandError(problem)
    return name


def _password(args: argparse.Namespace, *, confirm: bool) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        try:
            password = getpass.getpass(f"Password for {args.name}: ")
            if confirm and getpass.getpass("Again: ") != password:
                raise CommandError("the passwords differ")
        except EOFError as e:
            raise CommandError("no password given") from e
    if not password:
        raise CommandError("the password is empty")
    return password


def _passwd_add(args: argparse.Namespace) -> int:
    name = _name(args)
    path = _users_file(args)
    users = _read(path, missing_ok=True)
    password = _password(args, confirm=True)
    done = "changed the password of" if name in users else "added"
    try:
        users[name] = hash_password(password, args.rounds)
    except ValueError as e:
        raise CommandError(str(e)) from e
    _write(path, users)
    print(f"{done} user {name} in {path}")
    return 0


def _passwd_delete(args: argparse.Namespace) -> int:
    name = _name(args)
    path = _users_file(args)
    users = _read(path)
    if users.pop(name, None) is None:
        raise CommandError(f"there is no user {name} in {path}")
    _write(path, users)
    print(f"deleted user {name} from {path}")
    return 0


def _passwd_list(args: argparse.Namespace) -> int:
    for name in sorted(_read(_users_file(args))):
        print(name)
    return 0


def _passwd_check(args: argparse.Namespace) -> int:
    name = _name(args)
    path = _users_file(args)
    hashed = _read(path).get(name)
    if hashed is None:
        raise CommandError(f"there is no user {name} in {path}")
    if check_password(_password(args, confirm=False), hashed):
        print(f"the password of {name} matches")
        return 0
    print(f"the password of {name} does not match", file=sys.stderr)
    return 1


def _add_explain(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    explain = sub.add_parser(
        "explain",
        help="what an SMTP reply means and what to do about it",
        description=(
            "Explain an SMTP reply that relayproxy composes or relays: what it means, when it is "
            "seen and what to do. Exit status 1 for a code without an entry."
        ),
        epilog="examples: relayproxy explain 535 5.7.8; relayproxy explain 354; "
        "relayproxy explain 535 --host smtp.gmail.com; relayproxy explain '553 5.7.1 Sender address not owned'",
    )
    explain.add_argument("code", nargs="?", help="the basic reply code (e.g. 535), or a whole reply line")
    explain.add_argument("enhanced", nargs="?", help="the enhanced status code (e.g. 5.7.8)")
    explain.add_argument(
        "--command",
        metavar="CMD",
        help="the command it answered: greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, end-of-data, any",
    )
    explain.add_argument(
        "--host", metavar="UPSTREAM_HOST", help="the upstream's host name, for provider notes (e.g. smtp.gmail.com)"
    )
    explain.add_argument("--json", action="store_true", help="print a JSON object (with --list: an array)")
    explain.add_argument("--list", action="store_true", help="list every entry of the catalogue")
    explain.add_argument("--language", default="en", help="language of the texts (default: %(default)s)")
    explain.set_defaults(func=_explain)


def _explain(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import re
    import textwrap

    from relayproxy import explain as catalogue

    def fail(message: str) -> int:
        print(f"relayproxy explain: {message}", file=sys.stderr)
        return 1

    try:
        labels = catalogue.labels(args.language)
        if args.list:
            listing = catalogue.entries(args.language)
            if args.json:
                print(json.dumps([dataclasses.asdict(e) for e in listing], indent=2))
            else:
                for e in listing:
                    key = " ".join(str(k) for k in (e.code, e.enhanced, e.command) if k is not None)
                    print(f"{key}: {e.meaning}")
            return 0
        if args.code is None:
            return fail("give a reply code (e.g. relayproxy explain 535 5.7.8), or --list")
        # Also accepts a pasted reply line: "535-5.7.8 Username and Password not accepted".
        m = re.match(r"^\s*(\d{3})(?:[ -]+(\d\.\d{1,3}\.\d{1,3}))?(?:[ -].*)?$", args.code)
        if m is None or not 200 <= int(m.group(1)) <= 599:
            return fail(f"{args.code!r} is not an SMTP reply code (three digits, 200 to 599)")
        code = int(m.group(1))
        enhanced = args.enhanced or m.group(2)
        command = catalogue.normalize_command(args.command)
        found = catalogue.explain(code, enhanced, command, args.host, args.language)
    except ValueError as e:
        return fail(str(e))
    if found is None:
        known = sorted({e.code for e in catalogue.entries(args.language)})
        return fail(f"no explanation for reply code {code}; known codes: {', '.join(map(str, known))}")
    if args.json:
        print(json.dumps(dataclasses.asdict(found), indent=2))
        return 0

    names = labels.get("commands", {})
    header = " ".join(str(k) for k in (found.code, found.enhanced) if k)
    if found.command:
        header += " " + str(labels["answers"]).format(command=names.get(found.command, found.command))
    print(header)
    asked = " ".join(str(k) for k in (code, enhanced) if k)
    if enhanced and found.enhanced != enhanced:
        # Entries without a command apply to any command, so only a missing enhanced code is news.
        print(str(labels["fallback"]).format(requested=asked, code=code))
    width = 100
    sections = [(labels["meaning"], found.meaning), (labels["when"], found.when), (labels["fix"], found.fix)]
    if found.provider_note:
        sections.append((f"{labels['provider']} ({found.provider})", found.provider_note))
    for label, body in sections:
        print(textwrap.fill(f"{label}: {body}", width=width, subsequent_indent="  "))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
