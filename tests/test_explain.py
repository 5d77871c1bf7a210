"""``relayproxy.explain``: the reply catalogue, provider notes, log hints and ``relayproxy explain``."""

from __future__ import annotations

import json
import re

import pytest
from catalogue import composed_replies

from relayproxy import explain as ex
from relayproxy.cli import main
from relayproxy.smtp.reply import Catalogue, Reply, parse_reply


@pytest.mark.parametrize(("name", "reply"), composed_replies(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_composed_reply_has_an_entry(name: str, reply: Reply) -> None:
    found = ex.explain(reply.code, reply.enhanced)
    assert found is not None, f"Catalogue.{name} ({reply}) has no entry in explain_en.json"
    assert found.code == reply.code
    assert found.enhanced == reply.enhanced, (
        f"Catalogue.{name} ({reply}): no entry for {reply.code} {reply.enhanced}, only a less specific one"
    )


REQUIRED_CODES = (221, 235, 250, 334, 354, 421, 450, 451, 452, 454, 500, 501, 502, 503, 504,
                  530, 534, 535, 538, 550, 552, 553, 554)


@pytest.mark.parametrize("code", REQUIRED_CODES)
def test_required_codes(code: int) -> None:
    found = ex.explain(code)
    assert found is not None and found.code == code and found.enhanced is None and found.command is None


def test_every_code_has_a_general_entry() -> None:
    for code in {e.code for e in ex.entries()}:
        found = ex.explain(code)
        assert found is not None and found.enhanced is None and found.command is None, code


def test_entries_are_complete_and_hints_short() -> None:
    all_entries = ex.entries()
    assert len(all_entries) > 80
    for e in all_entries:
        assert e.meaning and e.when and e.fix and e.hint
        assert e.provider_note is None
        assert len(e.hint) <= 130, (e.code, e.enhanced, e.command, len(e.hint))
        assert e.hint.isascii() and e.hint.isprintable()


def test_well_known_meanings() -> None:
    data = ex.explain(354)
    assert data is not None and "single dot" in data.meaning
    auth = ex.explain(535, "5.7.8")
    assert auth is not None and "credentials or the SASL mechanism were refused" in auth.meaning


def test_specificity() -> None:
    # code+enhanced+command > code+enhanced > code+command > code.
    most = ex.explain(454, "4.7.0", "AUTH")
    assert most is not None and (most.enhanced, most.command) == ("4.7.0", "AUTH")
    assert "throttled" in most.hint.lower() or "repeated failures" in most.hint
    upstream = ex.explain(454, "4.7.0", "MAIL")
    assert upstream is not None and upstream.command == "MAIL" and "upstream" in upstream.meaning.lower()
    enhanced_only = ex.explain(454, "4.7.0", "RCPT")
    assert enhanced_only is not None and (enhanced_only.enhanced, enhanced_only.command) == ("4.7.0", None)
    by_command = ex.explain(250, None, "end-of-data")
    assert by_command is not None and (by_command.enhanced, by_command.command) == (None, "end-of-data")
    unknown_enhanced = ex.explain(535, "5.7.99")
    assert unknown_enhanced is not None and (unknown_enhanced.enhanced, unknown_enhanced.command) == (None, None)
    assert ex.explain(250, "2.0.0", "end-of-data") != ex.explain(250, "2.0.0")
    # Command spellings.
    assert ex.explain(421, "4.4.2", "data") == ex.explain(421, "4.4.2", "DATA")
    assert ex.explain(250, None, ".") == ex.explain(250, None, "end-of-data")
    assert ex.explain(250, None, "helo") == ex.explain(250, None, "EHLO")
    assert ex.explain(250, None, "any") == ex.explain(250)


def test_unknown_and_invalid() -> None:
    assert ex.explain(299) is None
    assert ex.explain(599, "5.0.0") is None
    with pytest.raises(ValueError):
        ex.explain(535, "five")
    with pytest.raises(ValueError):
        ex.explain(535, None, "EXPN-ALL")
    with pytest.raises(ValueError):
        ex.explain(535, language="xx")
    with pytest.raises(ValueError):
        ex.explain(535, language="../etc")


def test_languages() -> None:
    assert "en" in ex.languages()


@pytest.mark.parametrize(
    ("host", "provider", "words"),
    [
        ("smtp.gmail.com", "Gmail", ("app password", "2-Step Verification", "XOAUTH2")),
        ("smtp-relay.gmail.com", "Gmail", ("app password",)),
        ("aspmx.l.google.com", "Gmail", ("XOAUTH2",)),
        ("SMTP.Office365.com.", "Microsoft 365", ("per mailbox", "XOAUTH2", "Basic")),
        ("smtp-mail.outlook.com", "Microsoft 365", ("SMTP AUTH",)),
        ("email-smtp.eu-west-1.amazonaws.com", "Amazon SES", ("IAM access keys", "region")),
    ],
)
def test_provider_notes_for_auth(host: str, provider: str, words: tuple[str, ...]) -> None:
    found = ex.explain(535, "5.7.8", "AUTH", upstream_host=host)
    assert found is not None and found.provider_note is not None
    assert found.provider is not None and provider in found.provider
    for word in words:
        assert word.lower() in found.provider_note.lower()
    assert ex.provider_name(host) == found.provider


def test_ses_sandbox_and_other_notes() -> None:
    ses = ex.explain(554, None, "MAIL", upstream_host="email-smtp.us-east-1.amazonaws.com")
    assert ses is not None and ses.provider_note is not None and "sandbox" in ses.provider_note
    gmail_from = ex.explain(553, None, "MAIL", upstream_host="smtp.gmail.com")
    assert gmail_from is not None and gmail_from.provider_note is not None and "Send mail as" in gmail_from.provider_note


def test_no_provider_note_elsewhere() -> None:
    for host in (None, "mail.example.org", "gmail.com.evil.example", "192.0.2.1"):
        found = ex.explain(535, "5.7.8", upstream_host=host)
        assert found is not None and found.provider_note is None and found.provider is None
    # A provider note only where the provider has one.
    data = ex.explain(354, upstream_host="smtp.gmail.com")
    assert data is not None and data.provider_note is None


def test_hint_upstream_535_blames_the_proxy_credentials() -> None:
    line = ex.hint(535, "5.7.8", side="upstream", command="AUTH", upstream_name="gmail", upstream_host="smtp.gmail.com")
    assert "gmail" in line
    assert "proxy" in line or "relay" in line
    assert "not the client" in line
    assert "app password" in line.lower() and "2-Step Verification" in line and "XOAUTH2" in line
    assert len(line) <= 170 and not line.endswith("...")
    # Without a provider, without an enhanced code, with a relayed-style LOGIN failure.
    plain = ex.hint(535, None, side="upstream", command="AUTH", upstream_name="smarthost", upstream_host="mail.example.org")
    assert "smarthost" in plain and "relay credentials" in plain and "Gmail" not in plain
    assert "[upstream.smarthost]" in plain and "not the client" in plain
    m365 = ex.hint(535, "5.7.139", side="upstream", command="AUTH", upstream_name="m365", upstream_host="smtp.office365.com")
    assert "XOAUTH2" in m365 and "m365" in m365
    ses = ex.hint(535, None, side="upstream", command="AUTH", upstream_name="ses", upstream_host="email-smtp.eu-west-1.amazonaws.com")
    assert "IAM" in ses


def test_hint_client_535_is_about_the_client() -> None:
    line = ex.hint(535, "5.7.8", side="client", command="AUTH", upstream_host="smtp.gmail.com")
    assert "relayproxy passwd check" in line and "Gmail" not in line


def test_hint_data_timeout() -> None:
    for code, enhanced in ((421, "4.4.2"), (354, None)):
        line = ex.hint(code, enhanced, side="client", command="DATA", situation="data-timeout")
        assert "354" in line and "final '.' line" in line and "never sent" in line
        assert len(line) <= 160
    # The code alone says the same.
    assert "never sent the final" in ex.hint(421, "4.4.2", side="client", command="DATA")


def test_hint_553_names_sender_and_allowed_senders() -> None:
    line = ex.hint(553, "5.7.1", side="client", command="MAIL", sender="root@host.example",
                   allowed_senders=["scanner@example.org", "@printers.example.org"], user="printer")
    assert "<root@host.example>" in line
    assert "scanner@example.org, @printers.example.org" in line
    assert "printer" in line and "[users.printer]" in line
    many = ex.hint(553, "5.7.1", side="client", command="MAIL", sender="x@y.example",
                   allowed_senders=[f"a{i}@example.org" for i in range(10)])
    assert "a0@example.org" in many and "+7 more" in many and len(many) <= 160
    # From an upstream it is the provider refusing the account's sender.
    upstream = ex.hint(553, None, side="upstream", command="MAIL", sender="x@example.org",
                       upstream_name="gmail", upstream_host="smtp.gmail.com")
    assert "gmail" in upstream and "<x@example.org>" in upstream and "Send-mail-as" in upstream


def test_hint_553_5_6_7_is_about_smtputf8_not_the_senders_owner() -> None:
    # A UTF-8 address without SMTPUTF8: the client is told to use it, with no allowed_senders list.
    line = ex.hint(553, "5.6.7", side="client", command="MAIL", sender="j\u00f6rg@example.org",
                   allowed_senders=["scanner@example.org"], user="printer")
    assert "SMTPUTF8" in line and "allowed_senders" not in line and "CRLF" not in line
    assert "SMTPUTF8" in ex.hint(553, "5.6.7", side="client", command="RCPT")
    # Refused for the upstream's want of it: the log names the upstream.
    upstream = ex.hint(553, "5.6.7", side="client", command="MAIL", situation="upstream-no-smtputf8", upstream_name="smarthost")
    assert upstream.startswith("upstream smarthost does not support international addresses (no SMTPUTF8)")


def test_hint_other_contexts() -> None:
    assert "max_connections_per_ip" in ex.hint(421, "4.7.0", side="client", command="greeting")
    line = ex.hint(451, "4.4.1", side="client", command="MAIL", upstream_name="smarthost")
    assert "unreachable" in line
    assert "wants AUTH or TLS" in ex.hint(530, "5.7.0", side="upstream", command="MAIL", upstream_name="u")
    assert "sending limit" in ex.hint(550, "5.4.5", side="upstream", command="end-of-data", upstream_host="smtp.gmail.com")
    # Unknown code: the code class; bad input never raises.
    assert "temporary" in ex.hint(499, None, side="upstream", command="RCPT")
    assert ex.hint(535, "garbage", side="upstream", command="nonsense", upstream_name="u")
    assert ex.hint(250, None, side="client", command="end-of-data", language="xx")


def test_hints_stay_short() -> None:
    longest = 0
    for e in ex.entries():
        for side in ("client", "upstream"):
            for host in (None, "smtp.gmail.com", "smtp.office365.com", "email-smtp.us-east-1.amazonaws.com"):
                line = ex.hint(e.code, e.enhanced, side=side, command=e.command or "any",
                               upstream_name="default", upstream_host=host, sender="someone@example.org",
                               allowed_senders=["a@example.org"], user="printer")
                assert "\n" not in line and line.isascii() and line.isprintable()
                assert not line.endswith("..."), line
                longest = max(longest, len(line))
    assert longest <= 170


def test_codes_of() -> None:
    assert ex.codes_of(Catalogue.AUTH_INVALID) == (535, "5.7.8")
    assert ex.codes_of(parse_reply(b"535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 more\r\n")) == (535, "5.7.8")
    assert ex.codes_of(parse_reply(b"354 Go ahead\r\n")) == (354, None)
    assert ex.codes_of(parse_reply(b"250 5.0.0 odd\r\n")) == (250, None)


# -- the command ------------------------------------------------------------------------------


def test_cli_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "535", "5.7.8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("535 5.7.8\n")
    assert "Meaning: Authentication credentials invalid" in out
    assert "When it is seen:" in out and "What to do:" in out
    assert "Provider note" not in out

    assert main(["explain", "354"]) == 0
    assert "single dot" in capsys.readouterr().out

    assert main(["explain", "454", "4.7.0", "--command", "AUTH"]) == 0
    assert capsys.readouterr().out.startswith("454 4.7.0 in answer to AUTH\n")


def test_cli_provider_note(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "535", "5.7.8", "--host", "smtp.gmail.com"]) == 0
    out = capsys.readouterr().out
    assert "Provider note (Gmail / Google Workspace):" in out and "app password" in out.lower()


def test_cli_pasted_reply_and_fallback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "535-5.7.8 Username and Password not accepted"]) == 0
    assert capsys.readouterr().out.startswith("535 5.7.8\n")
    assert main(["explain", "535", "5.7.99"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("535\n") and "no entry for 535 5.7.99" in out


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "535", "5.7.8", "--host", "email-smtp.eu-west-1.amazonaws.com", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["code"] == 535 and data["enhanced"] == "5.7.8"
    assert {"meaning", "when", "fix", "provider_note", "command", "hint"} <= set(data)
    assert "IAM" in data["provider_note"] and data["provider"] == "Amazon SES"

    assert main(["explain", "--list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert len(listing) == len(ex.entries()) and all("code" in e for e in listing)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["299"], "no explanation for reply code 299"),
        (["abc"], "'abc' is not an SMTP reply code"),
        (["999"], "is not an SMTP reply code"),
        (["535", "5.x.8"], "invalid enhanced status code"),
        (["535", "--command", "EXPN"], "unknown command"),
        ([], "give a reply code"),
    ],
)
def test_cli_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", *argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and captured.err.startswith("relayproxy explain: ")


def test_cli_json_unknown_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "299", "--json"]) == 1
    assert capsys.readouterr().out == ""


def test_readme_example_matches() -> None:
    """The README shows the output of ``relayproxy explain 535 5.7.8``; keep it current."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    m = re.search(r"```\n\$ relayproxy explain 535 5\.7\.8\n(.*?)```", readme, re.S)
    assert m is not None, "README section 'What a reply means' lost its example"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["explain", "535", "5.7.8"]) == 0
    assert m.group(1) == out.getvalue()
