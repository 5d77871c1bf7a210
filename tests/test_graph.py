"""Microsoft Graph as an upstream, through a running proxy, against the Graph stand-in.

A client sees 354 only once the proxy holds a token, the reply to its final dot is Graph's verdict
(202 as 250 with Graph's request id, each error as its Catalogue reply), and exactly the envelope's
recipients receive the message.
"""

from __future__ import annotations

import base64
import datetime
import email.policy
import random
import re
import smtplib
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from conftest import ProxyFactory
from graph_standin import (
    Answer, GraphStandIn, access_denied, drop, gateway_timeout, hang, invalid_recipients, request_too_large, send_as_denied,
    server_error, throttled, unavailable,
)
from harness import CLIENT_USER, PKI, login, write_config
from test_check import check

from relayproxy.smtp.reply import Catalogue, Reply
from relayproxy.upstream import graph as graph_upstream

ROUTE = f'[users.{CLIENT_USER}]\nupstream = "m365"\n'
MAILBOX = "alerts@example.org"


def graph_proxy(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, extra: str = "") -> int:
    return make_proxy(graph.upstream_toml(tmp_path, extra=extra), extra=ROUTE).port


def message(headers: str = f"From: Alerts <{MAILBOX}>\r\nTo: Alice <alice@example.net>", body: str = "disk 91% full") -> bytes:
    return f"{headers}\r\nSubject: alert\r\n\r\n{body}\r\n".encode()


def send(port: int, pki: PKI, recipients: list[str], data: bytes) -> tuple[int, bytes]:
    smtp = login(port, pki)
    try:
        assert smtp.mail(MAILBOX)[0] == 250
        for recipient in recipients:
            assert smtp.rcpt(recipient)[0] == 250
        return smtp.data(data)
    finally:
        smtp.close()


def status(reply: Reply) -> tuple[int, bytes]:
    wire = reply.to_bytes().decode()
    return reply.code, wire[4:].rstrip("\r\n").encode()


def test_a_message_through_graph(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    code, text = send(port, pki, ["alice@example.net", "bob@example.net"], message())
    [delivery] = graph.deliveries
    assert (code, text) == (250, f"2.0.0 Ok: queued as {delivery.request_id}".encode())
    assert delivery.via == "sendMail" and delivery.mailbox == MAILBOX
    # bob was in the envelope, not in the header: he receives it as Bcc.
    assert delivery.recipients == ["alice@example.net", "bob@example.net"]
    assert delivery.bcc == ["bob@example.net"]
    assert delivery.message is not None and delivery.message["Subject"] == "alert"
    assert delivery.raw is not None and delivery.raw.endswith(b"disk 91% full\r\n")


def test_a_header_recipient_the_client_did_not_rcpt_receives_nothing(
    make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI
) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    headers = f"From: {MAILBOX}\r\nTo: alice@example.net, mallory@example.net\r\nCc: eve@example.net"
    assert send(port, pki, ["alice@example.net"], message(headers))[0] == 250
    [delivery] = graph.deliveries
    assert delivery.recipients == ["alice@example.net"]
    assert delivery.raw is not None and b"mallory" not in delivery.raw and b"eve@" not in delivery.raw


def test_dot_stuffed_lines_arrive_as_written(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    assert send(port, pki, ["alice@example.net"], message(body=".\r\n..two dots\r\n.one"))[0] == 250
    [delivery] = graph.deliveries
    assert delivery.raw is not None and delivery.raw.endswith(b"\r\n.\r\n..two dots\r\n.one\r\n")


def test_a_large_message_is_held_on_disk_and_arrives_whole(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    body = "\r\n".join(f"{i:08d} " + "x" * 70 for i in range(25_000))
    assert send(port, pki, ["alice@example.net"], message(body=body))[0] == 250
    [delivery] = graph.deliveries
    assert delivery.raw is not None and delivery.raw.endswith(body.encode() + b"\r\n")


@pytest.mark.parametrize(
    "answer,expected",
    [
        (throttled(12), Catalogue.graph_throttled("m365", 12)),
        (unavailable(30), Catalogue.graph_unavailable("m365", 503, 30)),
        (gateway_timeout(), Catalogue.graph_unavailable("m365", 504, None)),
        (send_as_denied(), Catalogue.graph_send_as_denied("m365")),
        (access_denied(), Catalogue.graph_access_denied("m365")),
        (invalid_recipients(), Catalogue.GRAPH_INVALID_RECIPIENTS),
        (request_too_large(), Catalogue.MESSAGE_TOO_BIG),
    ],
    ids=["429", "503", "504", "send-as", "access", "recipients", "413"],
)
def test_graph_errors_are_precise_replies(
    make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI, answer: object, expected: Reply, log_lines: list[str]
) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    graph.script("sendMail", answer)  # type: ignore[arg-type]
    assert send(port, pki, ["alice@example.net"], message()) == status(expected)
    assert graph.deliveries == []
    [line] = [line for line in log_lines if line.startswith("message ")]
    assert 'outcome="refused by upstream"' in line


def test_no_354_without_a_token(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    graph.client_secret = "not-the-secret-the-proxy-has"
    smtp = login(port, pki)
    assert smtp.mail(MAILBOX)[0] == 250
    assert smtp.rcpt("alice@example.net")[0] == 250
    code, text = smtp.docmd("DATA")
    smtp.close()
    assert (code, text) == status(Catalogue.upstream_token_failed("m365"))


def test_a_revoked_token_is_replaced_once(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    assert send(port, pki, ["alice@example.net"], message())[0] == 250
    graph.revoke_tokens()
    assert send(port, pki, ["alice@example.net"], message())[0] == 250
    assert len(graph.deliveries) == 2 and len(graph.token_requests()) == 2


def test_graph_that_never_answers_gives_a_4xx(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path, extra="data_timeout = 1")
    graph.script("sendMail", hang())
    code, text = send(port, pki, ["alice@example.net"], message())
    assert code == 451 and re.match(rb"4\.4\.\d ", text)


def test_a_message_over_graphs_request_limit(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    body = "\r\n".join("y" * 76 for _ in range(45_000))
    assert send(port, pki, ["alice@example.net"], message(body=body)) == status(Catalogue.graph_too_big("m365"))
    assert graph.deliveries == []


def test_smtplib_sendmail_sees_graphs_verdict(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    graph.script("sendMail", throttled(5))
    smtp = login(port, pki)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.sendmail(MAILBOX, ["alice@example.net"], message())
    assert refused.value.smtp_code == 451


def graph_config(graph: GraphStandIn, tmp_path: Path, pki: PKI) -> Path:
    return write_config(tmp_path, pki, graph.upstream_toml(tmp_path, name="default"))[0]


def graph_check(config: Path) -> tuple[int, list[str]]:
    """``relayproxy check`` of the Graph upstream "default": its exit status and the lines about it."""
    result = check(config)
    lines = result.stdout.splitlines()
    about = [line for line in lines if "upstream default" in line]
    if about and about[0].startswith("FAIL"):
        about += [line for line in lines[lines.index(about[0]) + 1 :] if line.startswith("     hint: ")][:1]
    assert result.stderr == "", result.stderr
    return result.returncode, about


def expiry_of(line: str) -> float:
    match = re.search(r"expires (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) \(in (\d+) min\)", line)
    assert match, line
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S%z").timestamp()


def test_check_reads_mail_send_from_the_tokens_roles(graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    graph.jwt_tokens = True
    status, [line] = graph_check(graph_config(graph, tmp_path, pki))
    assert status == 0, line
    prefix = f"ok   upstream default graph {graph.base_url} as {MAILBOX}: access token from {graph.token_url}, "
    assert line.startswith(prefix + "roles: Mail.Send, Mail.ReadWrite, expires "), line
    assert line.endswith(" (in 60 min); no mail sent")
    # The token's own exp claim, which the stand-in sets expires_in after issuing it.
    assert abs(expiry_of(line) - (time.time() + graph.expires_in)) < 30
    assert [seen.route for seen in graph.requests] == ["token"]
    assert graph.deliveries == []


def test_check_says_what_mail_send_alone_cannot_send(graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    graph.jwt_tokens = True
    graph.roles = ["Mail.Send"]
    status, [line] = graph_check(graph_config(graph, tmp_path, pki))
    assert status == 0, line
    assert ", roles: Mail.Send, expires " in line
    assert line.endswith("; no mail sent; without Mail.ReadWrite, a message over about 3 MB (sent as a draft) is refused")


def test_check_fails_save_to_sent_false_without_mail_read_write(graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    graph.jwt_tokens = True
    graph.roles = ["Mail.Send"]
    config = write_config(tmp_path, pki, graph.upstream_toml(tmp_path, name="default", extra="save_to_sent = false"))[0]
    status, [line, hint] = graph_check(config)
    assert status == 1
    assert line.startswith(f"FAIL upstream default graph {graph.base_url} as {MAILBOX}: ")
    assert "lacks Mail.ReadWrite, which save_to_sent = false needs for every message; roles: Mail.Send; expires " in line
    assert hint.startswith("     hint: grant the app the application permission Mail.ReadWrite") and "save_to_sent" in hint


@pytest.mark.parametrize(
    "roles,held",
    [(["Mail.ReadWrite", "User.Read.All"], "its roles are Mail.ReadWrite, User.Read.All"), ([], "it carries no roles (no application permission)")],
    ids=["other-roles", "no-roles"],
)
def test_check_fails_a_token_without_mail_send(graph: GraphStandIn, tmp_path: Path, pki: PKI, roles: list[str], held: str) -> None:
    graph.jwt_tokens = True
    graph.roles = roles
    status, [line, hint] = graph_check(graph_config(graph, tmp_path, pki))
    assert status == 1
    assert line.startswith(
        f"FAIL upstream default graph {graph.base_url} as {MAILBOX}: the access token from {graph.token_url} "
        f"lacks Mail.Send: {held}; expires "
    ), line
    assert hint.startswith("     hint: grant the app the application permission Mail.Send with admin consent: Entra admin center, ")
    assert "application access policy" in hint and "Test-ServicePrincipalAuthorization" in hint
    assert graph.requests_to("sendMail") == []


def test_check_says_an_opaque_tokens_roles_cannot_be_read(graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    status, [line] = graph_check(graph_config(graph, tmp_path, pki))
    assert status == 0, line
    assert line.startswith(f"ok   upstream default graph {graph.base_url} as {MAILBOX}: access token from {graph.token_url}, expires ")
    # No exp claim to read: the lifetime the token endpoint gave (expires_in), counted from the request.
    assert abs(expiry_of(line) - (time.time() + graph.expires_in)) < 30
    assert line.endswith(
        "; its roles cannot be read (the token is not a JWT), so only a message shows whether the app may send (Mail.Send)"
    )


def test_check_names_a_wrong_client_secret_with_its_fix(graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    config = graph_config(graph, tmp_path, pki)
    graph.client_secret = "changed-in-the-portal"
    status, [line, hint] = graph_check(config)
    assert status == 1
    assert line.startswith(f"FAIL upstream default graph {graph.base_url} as {MAILBOX}: upstream default: {graph.token_url}: refused (HTTP 401): ")
    assert "AADSTS7000215" in line and "changed-in-the-portal" not in line and "graph-client-secret" not in line
    assert hint.startswith("     hint: the client secret is wrong: copy the secret's Value (not its Secret ID)")


def test_check_says_when_the_token_endpoint_does_not_answer(graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    config = graph_config(graph, tmp_path, pki)
    base_url, token_url = graph.base_url, graph.token_url
    graph.stop()
    status, [line, hint] = graph_check(config)
    graph.start()  # for the fixture's stop
    assert status == 1
    assert line.startswith(f"FAIL upstream default graph {base_url} as {MAILBOX}: upstream default: {token_url}: request failed: "), line
    assert "Connection refused" in line
    assert hint == (
        "     hint: the token endpoint could not be reached or did not answer: check token_url, "
        "this host's route to it, and ca_file if one is set"
    )


def pdf_like(size: int, seed: int) -> bytes:
    """Incompressible bytes that start like a PDF."""
    return (b"%PDF-1.7\n" + random.Random(seed).randbytes(size))[:size]


def with_attachments(text: str, *files: tuple[str, bytes]) -> bytes:
    mail = EmailMessage(policy=email.policy.SMTP)
    mail["From"] = f"Alerts <{MAILBOX}>"
    mail["To"] = "Alice <alice@example.net>, mallory@example.net"
    mail["Subject"] = "the reports"
    mail.set_content(text)
    for name, data in files:
        mail.add_attachment(data, maintype="application", subtype="pdf", filename=name)
    return mail.as_bytes()


def test_a_large_message_goes_as_a_draft_with_its_attachments_apart(
    make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI
) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    # 8 MB and 1.5 MB of base64: the first through an upload session, the second in one POST.
    report, summary = pdf_like(6_250_000, 1), pdf_like(1_100_000, 2)
    data = with_attachments("Reports attached.\r\n", ("report.pdf", report), ("summary.pdf", summary))
    assert 10_000_000 < len(data) < 10_500_000
    code, text = send(port, pki, ["alice@example.net", "bob@example.net"], data)
    [delivery] = graph.deliveries
    assert (code, text) == (250, f"2.0.0 Ok: queued as {delivery.request_id}".encode())
    assert delivery.via == "draft" and delivery.mailbox == MAILBOX
    assert [(a.name, a.content_type, a.via, a.data == original) for a, original in zip(delivery.attachments, (report, summary))] == [
        ("report.pdf", "application/pdf", "upload", True),
        ("summary.pdf", "application/pdf", "post", True),
    ]
    assert len(delivery.attachments) == 2
    # Exactly the envelope's recipients: mallory was only in the header, bob only in the envelope.
    assert delivery.recipients == ["alice@example.net", "bob@example.net"] and delivery.bcc == ["bob@example.net"]
    assert delivery.message is not None and delivery.message["Subject"] == "the reports"
    assert delivery.message.get_body(("plain",)).get_content().rstrip() == "Reports attached."  # type: ignore[union-attr]
    [created] = graph.requests_to("createDraft")
    assert len(created.body) < 4 * 1024 * 1024 and b"mallory" not in base64.b64decode(created.body)
    uploads = graph.requests_to("upload")
    assert all("authorization" not in seen.headers for seen in uploads)
    assert all(len(seen.body) % (320 * 1024) == 0 and len(seen.body) <= 4 * 1024 * 1024 for seen in uploads[:-1])
    assert graph.drafts == {} and graph.deleted_drafts == []


def largest_spool_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each read of a spooled message (the proxy runs in this process)."""
    reads: list[int] = []
    read_at = graph_upstream._Spool.read_at

    async def recorded(self: graph_upstream._Spool, offset: int, length: int) -> bytes:
        data = await read_at(self, offset, length)
        reads.append(len(data))
        return data

    monkeypatch.setattr(graph_upstream._Spool, "read_at", recorded)
    return reads


def test_memory_does_not_grow_with_the_attachment(
    make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = largest_spool_reads(monkeypatch)
    port = graph_proxy(make_proxy, graph, tmp_path)
    largest = []
    for size in (4_000_000, 20_000_000):
        reads.clear()
        attachment = pdf_like(size, size)
        assert send(port, pki, ["alice@example.net"], with_attachments("Attached.\r\n", ("big.pdf", attachment)))[0] == 250
        assert graph.deliveries[-1].attachments[0].data == attachment
        largest.append(max(reads))
        # The message read in bounded chunks, never whole; each request within Graph's limit.
        assert sum(reads) > size and max(reads) <= graph_upstream._MAX_HEADER + graph_upstream._CHUNK
    assert largest[0] == largest[1]
    assert max(len(seen.body) for seen in graph.requests) <= 4 * 1024 * 1024


def test_a_failed_upload_deletes_the_draft(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    graph.script("upload", Answer("pass"), drop())
    code, text = send(port, pki, ["alice@example.net"], with_attachments("Attached.\r\n", ("big.pdf", pdf_like(8_000_000, 3))))
    assert code == 451 and re.match(rb"4\.4\.\d ", text)
    [created] = graph.requests_to("createDraft")
    assert graph.deliveries == [] and graph.drafts == {} and len(graph.deleted_drafts) == 1
    assert [seen.route for seen in graph.requests if seen.route != "token"][-1] == "deleteDraft"
    assert created.status == 201


def test_graphs_refusal_of_an_upload_session_is_its_reply(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    graph.script("createUploadSession", throttled(9))
    data = with_attachments("Attached.\r\n", ("big.pdf", pdf_like(5_000_000, 4)))
    assert send(port, pki, ["alice@example.net"], data) == status(Catalogue.graph_throttled("m365", 9))
    assert graph.deliveries == [] and graph.drafts == {} and len(graph.deleted_drafts) == 1


def test_a_huge_text_body_beside_an_attachment_is_552(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    text = "\r\n".join(f"{i:08d} " + "z" * 70 for i in range(60_000)) + "\r\n"
    data = with_attachments(text, ("small.pdf", pdf_like(10_000, 5)))
    assert send(port, pki, ["alice@example.net"], data) == status(Catalogue.graph_body_too_big("m365"))
    assert [seen.route for seen in graph.requests if seen.route != "token"] == []


# -- certificate sign-in ---------------------------------------------------------------------


def test_a_message_through_graph_with_certificate_sign_in(
    make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI, log_lines: list[str]
) -> None:
    # The app has no secret at all: only the certificate can sign it in.
    graph.client_secret = None
    certificate = graph.make_certificate(tmp_path)
    port = make_proxy(graph.upstream_toml(tmp_path, certificate=certificate), extra=ROUTE).port
    code, text = send(port, pki, ["alice@example.net"], message())
    [delivery] = graph.deliveries
    assert (code, text) == (250, f"2.0.0 Ok: queued as {delivery.request_id}".encode())
    [token] = graph.tokens.values()
    assert token.credential == "certificate"
    # The stand-in verified the assertion against the registered certificate: its header as sent.
    [assertion] = graph.client_assertions
    assert assertion["header"]["alg"] == "PS256" and assertion["header"]["x5t#S256"] == certificate.x5t_s256
    assert assertion["claims"]["aud"] == graph.token_url
    [form] = graph.token_requests()
    for line in log_lines:
        assert form["client_assertion"] not in line and token.value not in line


def test_an_unregistered_certificate_gives_454_at_data(
    make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI, log_lines: list[str]
) -> None:
    certificate = graph.make_certificate(tmp_path)
    toml = graph.upstream_toml(tmp_path, certificate=certificate)
    # Removed from the app registration after the proxy was configured with it.
    graph.certificates.remove(certificate.certificate)
    port = make_proxy(toml, extra=ROUTE).port
    smtp = login(port, pki)
    assert smtp.mail(MAILBOX)[0] == 250
    assert smtp.rcpt("alice@example.net")[0] == 250
    code, text = smtp.docmd("DATA")
    smtp.close()
    assert (code, text) == status(Catalogue.upstream_token_failed("m365"))
    assert code == 454 and text.startswith(b"4.7.0 ")
    assert graph.deliveries == [] and graph.tokens == {}
    [failure] = [line for line in log_lines if "upstream failure" in line]
    assert "invalid_client: AADSTS700027: The certificate with identifier used to sign the client assertion is not registered" in failure
    assert f"lists the certificate in {certificate.certificate_file}" in failure
    [form] = graph.token_requests()
    assert all(form["client_assertion"] not in line for line in log_lines)


# -- save_to_sent -----------------------------------------------------------------------------

SENT_ROUTES = ["createDraft", "updateMessage", "send"]


def graph_routes(graph: GraphStandIn) -> list[str]:
    return [seen.route for seen in graph.requests if seen.route != "token"]


def test_save_to_sent_by_default_goes_by_send_mail(make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path)
    assert send(port, pki, ["alice@example.net"], message())[0] == 250
    [delivery] = graph.deliveries
    assert delivery.via == "sendMail" and delivery.save_to_sent is True
    assert graph_routes(graph) == ["sendMail"]


def test_save_to_sent_false_sends_a_draft_deleted_after_submission(
    make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI
) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path, extra="save_to_sent = false")
    code, text = send(port, pki, ["alice@example.net", "bob@example.net"], message())
    [delivery] = graph.deliveries
    assert (code, text) == (250, f"2.0.0 Ok: queued as {delivery.request_id}".encode())
    assert delivery.via == "draft" and delivery.save_to_sent is False
    # The envelope still decides who receives it, and the text arrives as written.
    assert delivery.recipients == ["alice@example.net", "bob@example.net"] and delivery.bcc == ["bob@example.net"]
    # The draft is the whole message, as sendMail would have had it (the stand-in re-serialises what it sends).
    [created] = graph.requests_to("createDraft")
    assert base64.b64decode(created.body).endswith(b"\r\n\r\ndisk 91% full\r\n")
    assert graph_routes(graph) == SENT_ROUTES
    [patch] = graph.requests_to("updateMessage")
    assert patch.method == "PATCH" and patch.headers["content-type"] == "application/json"
    assert patch.json() == {"singleValueExtendedProperties": [{"id": "Boolean 0x0E01000B", "value": "true"}]}
    assert patch.status == 200
    assert graph.drafts == {} and graph.deleted_drafts == []


def test_save_to_sent_false_marks_a_large_draft_before_its_uploads(
    make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI
) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path, extra="save_to_sent = false")
    report = pdf_like(5_000_000, 6)
    assert send(port, pki, ["alice@example.net"], with_attachments("Attached.\r\n", ("report.pdf", report)))[0] == 250
    [delivery] = graph.deliveries
    assert delivery.save_to_sent is False and delivery.attachments[0].data == report
    routes = graph_routes(graph)
    assert routes[:3] == ["createDraft", "updateMessage", "createUploadSession"] and routes[-1] == "send"


@pytest.mark.parametrize("answer", [server_error(), access_denied(), drop()], ids=["500", "403", "dropped"])
def test_a_failed_patch_deletes_the_draft_and_sends_nothing(
    make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI, answer: Answer
) -> None:
    port = graph_proxy(make_proxy, graph, tmp_path, extra="save_to_sent = false")
    graph.script("updateMessage", answer)
    code, text = send(port, pki, ["alice@example.net"], message())
    assert 400 <= code < 600, (code, text)
    if answer.action == "drop":
        assert code == 451 and re.match(rb"4\.4\.\d ", text)
    elif answer.status == 403:
        assert (code, text) == status(Catalogue.graph_drafts_denied("m365"))
    assert graph.deliveries == [] and graph.drafts == {} and len(graph.deleted_drafts) == 1
    assert graph_routes(graph) == ["createDraft", "updateMessage", "deleteDraft"]


def test_save_to_sent_false_without_mail_read_write_is_refused(
    make_proxy: ProxyFactory, graph: GraphStandIn, tmp_path: Path, pki: PKI
) -> None:
    graph.roles = ["Mail.Send"]
    port = graph_proxy(make_proxy, graph, tmp_path, extra="save_to_sent = false")
    assert send(port, pki, ["alice@example.net"], message()) == status(Catalogue.graph_drafts_denied("m365"))
    assert graph.deliveries == [] and graph_routes(graph) == ["createDraft"]
