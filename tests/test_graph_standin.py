"""The Graph stand-in (tests/graph_standin.py), driven over real HTTPS with treq.

Each test is plain synchronous code; requests run on the harness's reactor thread.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import treq
from graph_standin import (
    CLIENT_SECRET,
    GRAPH_SCOPE,
    JWT_BEARER,
    MAILBOX,
    SEND_AS_DENIED_MESSAGE,
    Answer,
    ClientCertificate,
    GraphStandIn,
    access_denied,
    drop,
    gateway_timeout,
    hang,
    invalid_recipients,
    make_client_certificate,
    message_too_large,
    request_too_large,
    send_as_denied,
    server_error,
    sign_client_assertion,
    slow,
    throttled,
    token_error,
    unauthorized,
    unavailable,
    unb64url,
)
from harness import reactor
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.threads import blockingCallFromThread
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

CHUNK = 10 * 320 * 1024


@dataclass
class Got:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """An HTTPS client that trusts the stand-in's CA."""

    def __init__(self, graph: GraphStandIn) -> None:
        self.graph = graph
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(graph.ca_file.read_bytes())])
        self.client = HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust)))

    def request(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes | None = None, timeout: float = 20
    ) -> Got:
        def go() -> Any:
            fields: dict[bytes | str, bytes | str] = {k: v for k, v in (headers or {}).items()}
            d = self.client.request(method, url, headers=fields, data=body, timeout=timeout)

            def read(response: Any) -> Any:
                fields = {k.decode().lower(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()}
                return treq.content(response).addCallback(lambda content: Got(response.code, fields, content))

            return d.addCallback(read)

        return blockingCallFromThread(reactor, go)

    def token_request(self, form: dict[str, str], headers: dict[str, str] | None = None) -> Got:
        return self.request(
            "POST",
            self.graph.token_url,
            headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
            body=urlencode(form).encode(),
        )

    def token(self) -> str:
        got = self.token_request(secret_form(self.graph))
        assert got.status == 200, got.body
        return str(got.json()["access_token"])

    def graph_call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 20,
    ) -> Got:
        fields = {"Authorization": f"Bearer {token or self.token()}", **(headers or {})}
        if content_type:
            fields["Content-Type"] = content_type
        return self.request(method, self.graph.base_url + path, headers=fields, body=body, timeout=timeout)

    def send_mime(self, mime: bytes, **kwargs: Any) -> Got:
        return self.graph_call("POST", f"/users/{MAILBOX}/sendMail", base64.encodebytes(mime), "text/plain", **kwargs)


@pytest.fixture
def api(graph: GraphStandIn) -> Api:
    return Api(graph)


def secret_form(graph: GraphStandIn, **changes: str) -> dict[str, str]:
    form = {
        "client_id": graph.client_id,
        "scope": GRAPH_SCOPE,
        "client_secret": CLIENT_SECRET,
        "grant_type": "client_credentials",
    }
    form.update(changes)
    return {k: v for k, v in form.items() if v != ""}


def assertion_form(graph: GraphStandIn, assertion: str, **changes: str) -> dict[str, str]:
    form = secret_form(graph, client_secret="", client_assertion_type=JWT_BEARER, client_assertion=assertion)
    form.update(changes)
    return form


def mime(
    *,
    sender: str = MAILBOX,
    to: str = "bob@example.net",
    cc: str | None = "carol@example.net",
    bcc: str | None = "dave@example.net",
    body: str = "The new cafeteria is open.\n",
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    if bcc:
        msg["Bcc"] = bcc
    msg["Subject"] = "Meet for lunch?"
    msg.set_content(body)
    return msg.as_bytes(policy=SMTP)


def assert_graph_error(got: Got, status: int, code: str) -> dict[str, Any]:
    """Graph's error shape, with the request's ids in the body and the headers."""
    assert got.status == status, got.body
    assert got.headers["content-type"].startswith("application/json")
    error = got.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    inner = error["innerError"]
    assert set(inner) == {"date", "request-id", "client-request-id"}
    assert inner["request-id"] == got.headers["request-id"]
    assert inner["client-request-id"] == got.headers["client-request-id"]
    return dict(error)


# -- the token endpoint ---------------------------------------------------------------------------


def test_token_with_secret(graph: GraphStandIn, api: Api) -> None:
    got = api.token_request(secret_form(graph))
    assert got.status == 200
    assert got.headers["content-type"].startswith("application/json")
    assert got.headers["cache-control"].startswith("no-store")
    answer = got.json()
    assert answer["token_type"] == "Bearer"
    assert answer["expires_in"] == 3599
    assert "." not in answer["access_token"], "opaque"
    assert graph.tokens[answer["access_token"]].credential == "secret"
    assert graph.token_requests() == [secret_form(graph)]


def test_token_with_basic_authentication(graph: GraphStandIn, api: Api) -> None:
    basic = base64.b64encode(f"{graph.client_id}:{CLIENT_SECRET}".encode()).decode()
    got = api.token_request(secret_form(graph, client_id="", client_secret=""), {"Authorization": f"Basic {basic}"})
    assert got.status == 200, got.body


def test_wrong_secret(graph: GraphStandIn, api: Api) -> None:
    got = api.token_request(secret_form(graph, client_secret="not-it"))
    assert got.status == 401
    error = got.json()
    assert error["error"] == "invalid_client"
    assert error["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")
    assert "\r\nTrace ID: " + error["trace_id"] in error["error_description"]
    assert error["error_codes"] == [7000215]
    assert {"timestamp", "trace_id", "correlation_id"} <= set(error)
    assert graph.tokens == {}


@pytest.mark.parametrize(
    ("changes", "status", "error", "aadsts"),
    [
        ({"scope": "https://outlook.office365.com/.default"}, 400, "invalid_scope", 70011),
        ({"client_id": "someone-else"}, 400, "unauthorized_client", 700016),
        ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
        ({"grant_type": ""}, 400, "invalid_request", 900144),
        ({"client_secret": ""}, 401, "invalid_client", 7000218),
    ],
)
def test_token_request_refused(graph: GraphStandIn, api: Api, changes: dict[str, str], status: int, error: str, aadsts: int) -> None:
    got = api.token_request(secret_form(graph, **changes))
    assert got.status == status
    assert got.json()["error"] == error
    assert got.json()["error_codes"] == [aadsts]


def test_unknown_tenant(graph: GraphStandIn, api: Api) -> None:
    url = graph.token_url.replace(graph.tenant, "other-tenant")
    got = api.request(
        "POST", url, headers={"Content-Type": "application/x-www-form-urlencoded"}, body=urlencode(secret_form(graph)).encode()
    )
    assert got.status == 400 and got.json()["error_codes"] == [90002]


def test_secret_in_the_query_string_is_not_read(graph: GraphStandIn, api: Api) -> None:
    form = secret_form(graph, client_secret="")
    url = graph.token_url + "?" + urlencode({"client_secret": CLIENT_SECRET})
    got = api.request("POST", url, headers={"Content-Type": "application/x-www-form-urlencoded"}, body=urlencode(form).encode())
    assert got.status == 401 and got.json()["error_codes"] == [7000218]


@pytest.fixture
def app_cert(graph: GraphStandIn, tmp_path: Path) -> ClientCertificate:
    return graph.make_certificate(tmp_path)


@pytest.mark.parametrize("alg", ["PS256", "RS256"])
@pytest.mark.parametrize("thumbprint", ["x5t#S256", "x5t", "both"])
def test_token_with_client_assertion(graph: GraphStandIn, api: Api, app_cert: ClientCertificate, alg: str, thumbprint: Any) -> None:
    assertion = sign_client_assertion(app_cert, client_id=graph.client_id, audience=graph.token_url, alg=alg, thumbprint=thumbprint)
    got = api.token_request(assertion_form(graph, assertion))
    assert got.status == 200, got.body
    token = got.json()["access_token"]
    assert graph.tokens[token].credential == "certificate"
    [seen] = graph.client_assertions
    assert seen["header"]["alg"] == alg
    assert seen["claims"]["aud"] == graph.token_url
    # The certificate files are what a Graph upstream is configured with.
    assert app_cert.certificate_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert app_cert.key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_thumbprints_are_base64url_digests_of_the_der(app_cert: ClientCertificate) -> None:
    import hashlib

    from cryptography.hazmat.primitives.serialization import Encoding

    der = app_cert.certificate.public_bytes(Encoding.DER)
    assert unb64url(app_cert.x5t) == hashlib.sha1(der).digest()
    assert unb64url(app_cert.x5t_s256) == hashlib.sha256(der).digest()


@pytest.mark.parametrize(
    ("claims", "header", "aadsts"),
    [
        ({"aud": "https://login.microsoftonline.com/other/oauth2/v2.0/token"}, {}, 50012),
        ({"iss": "someone-else"}, {}, 700021),
        ({"sub": "someone-else"}, {}, 700021),
        ({"exp": -3600, "nbf": -4000}, {}, 700024),
        ({"nbf": 3600, "exp": 4000}, {}, 700024),
        ({"jti": None}, {}, 50027),
        ({"nbf": None}, {}, 50027),
        ({}, {"alg": "HS256"}, 50027),
        ({}, {"x5t#S256": None}, 700027),
        ({}, {"x5t#S256": "bm90LXRoZS1yaWdodC10aHVtYnByaW50"}, 700027),
    ],
    ids=["aud", "iss", "sub", "expired", "not-yet-valid", "no-jti", "no-nbf", "alg", "no-thumbprint", "unknown-thumbprint"],
)
def test_client_assertion_refused(
    graph: GraphStandIn, api: Api, app_cert: ClientCertificate, claims: dict[str, Any], header: dict[str, Any], aadsts: int
) -> None:
    # nbf and exp are given as seconds from now.
    now = int(time.time())
    claims = {k: now + v if k in ("nbf", "exp") and v is not None else v for k, v in claims.items()}
    got = api.token_request(assertion_form(graph, graph.client_assertion(app_cert, claims=claims, header=header)))
    assert got.status == 401, got.body
    assert got.json()["error"] == "invalid_client"
    assert got.json()["error_codes"] == [aadsts]
    assert graph.tokens == {}


def test_client_assertion_signed_by_another_key(graph: GraphStandIn, api: Api, app_cert: ClientCertificate, tmp_path: Path) -> None:
    other = make_client_certificate(tmp_path, "other")
    got = api.token_request(assertion_form(graph, graph.client_assertion(app_cert, key=other.private_key)))
    assert got.status == 401
    assert got.json()["error_description"].startswith("AADSTS700027: Client assertion failed signature validation.")
    # Another certificate, not registered with the app.
    got = api.token_request(assertion_form(graph, graph.client_assertion(other)))
    assert got.status == 401
    assert "is not registered on application" in got.json()["error_description"]


def test_expired_certificate(graph: GraphStandIn, api: Api, tmp_path: Path) -> None:
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    old = graph.make_certificate(tmp_path, "old", not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
    got = api.token_request(assertion_form(graph, graph.client_assertion(old)))
    assert got.status == 401 and "The key used is expired" in got.json()["error_description"]


def test_client_assertion_is_not_taken_twice(graph: GraphStandIn, api: Api, app_cert: ClientCertificate) -> None:
    assertion = graph.client_assertion(app_cert)
    assert api.token_request(assertion_form(graph, assertion)).status == 200
    again = api.token_request(assertion_form(graph, assertion))
    assert again.status == 401 and "already used" in again.json()["error_description"]


def test_client_assertion_type_must_be_jwt_bearer(graph: GraphStandIn, api: Api, app_cert: ClientCertificate) -> None:
    got = api.token_request(assertion_form(graph, graph.client_assertion(app_cert), client_assertion_type="jwt"))
    assert got.status == 400 and got.json()["error"] == "invalid_request"


def test_jwt_access_tokens_carry_the_roles(graph: GraphStandIn, api: Api) -> None:
    graph.jwt_tokens = True
    graph.roles = ["Mail.Send"]
    token = api.token()
    claims = json.loads(unb64url(token.split(".")[1]))
    assert claims["roles"] == ["Mail.Send"]
    assert claims["aud"] == "https://graph.microsoft.com"
    assert claims["appid"] == graph.client_id and claims["tid"] == graph.tenant
    assert claims["exp"] - claims["iat"] == graph.expires_in
    assert api.send_mime(mime(), token=token).status == 202


@pytest.mark.parametrize(
    ("answer", "status", "error"),
    [
        (server_error(), 500, "InternalServerError"),
        (token_error(400, "invalid_request", 90014, "A required field is missing."), 400, "invalid_request"),
    ],
)
def test_token_endpoint_scripted(graph: GraphStandIn, api: Api, answer: Answer, status: int, error: str) -> None:
    graph.script("token", answer)
    got = api.token_request(secret_form(graph))
    assert got.status == status
    assert got.json()["error"] == error
    assert got.json()["error_description"].startswith("AADSTS")
    assert api.token_request(secret_form(graph)).status == 200, "the queue is used up"


def test_token_endpoint_hangs_and_drops(graph: GraphStandIn, api: Api) -> None:
    graph.script("token", hang(), drop())
    with pytest.raises(Exception) as hung:
        api.request("POST", graph.token_url, body=b"", timeout=0.5)
    assert "Cancelled" in repr(hung.value) or "Timeout" in repr(hung.value)
    with pytest.raises(Exception) as dropped:
        api.token_request(secret_form(graph))
    assert "ResponseNeverReceived" in repr(dropped.value) or "ConnectionLost" in repr(dropped.value)
    assert [s.outcome for s in graph.requests_to("token")] == ["hung", "dropped"]
    assert graph.tokens == {}


# -- sendMail ------------------------------------------------------------------------------------


def test_send_mail_mime(graph: GraphStandIn, api: Api) -> None:
    message = mime()
    got = api.send_mime(message, headers={"client-request-id": "c0ffee00-0000-0000-0000-000000000001"})
    assert got.status == 202
    assert got.body == b""
    assert len(got.headers["request-id"]) == 36
    assert got.headers["client-request-id"] == "c0ffee00-0000-0000-0000-000000000001"
    [delivery] = graph.deliveries
    assert delivery.via == "sendMail" and delivery.mailbox == MAILBOX
    assert delivery.raw == message
    assert delivery.request_id == got.headers["request-id"]
    assert (delivery.to, delivery.cc, delivery.bcc) == (["bob@example.net"], ["carol@example.net"], ["dave@example.net"])
    assert graph.recipients() == [["bob@example.net", "carol@example.net", "dave@example.net"]]
    assert delivery.visible is not None and "Bcc" not in delivery.visible
    [parsed] = graph.messages()
    assert parsed["Subject"] == "Meet for lunch?"
    assert parsed.get_content() == "The new cafeteria is open.\r\n"


def test_recipients_once_each(graph: GraphStandIn, api: Api) -> None:
    got = api.send_mime(mime(to="Bob <bob@example.net>, carol@example.net", cc="BOB@example.net", bcc=None))
    assert got.status == 202
    assert graph.recipients() == [["bob@example.net", "carol@example.net"]]


def test_send_mail_json(graph: GraphStandIn, api: Api) -> None:
    body = {
        "message": {
            "subject": "Meet for lunch?",
            "body": {"contentType": "Text", "content": "The new cafeteria is open."},
            "toRecipients": [{"emailAddress": {"address": "frannis@example.net"}}],
            "bccRecipients": [{"emailAddress": {"address": "danas@example.net"}}],
        },
        "saveToSentItems": False,
    }
    got = api.graph_call("POST", f"/users/{MAILBOX}/sendMail", json.dumps(body).encode(), "application/json")
    assert got.status == 202 and got.body == b""
    [delivery] = graph.deliveries
    assert delivery.via == "sendMail-json" and delivery.json == body["message"]
    assert delivery.recipients == ["frannis@example.net", "danas@example.net"]
    assert delivery.save_to_sent is False
    assert graph.messages() == []


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "Access token is empty."),
        ("made-up", "Access token validation failure. Invalid audience."),
    ],
)
def test_bearer_token_checked(graph: GraphStandIn, api: Api, token: str, message: str) -> None:
    headers = {"Content-Type": "text/plain"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    got = api.request("POST", f"{graph.base_url}/users/{MAILBOX}/sendMail", headers=headers, body=base64.b64encode(mime()))
    error = assert_graph_error(got, 401, "InvalidAuthenticationToken")
    assert error["message"] == message
    assert got.headers["www-authenticate"].startswith("Bearer ")
    assert graph.deliveries == []


def test_revoked_and_expired_tokens(graph: GraphStandIn, api: Api) -> None:
    token = api.token()
    graph.revoke_tokens()
    assert_graph_error(api.send_mime(mime(), token=token), 401, "InvalidAuthenticationToken")
    fresh = api.token()
    graph.expire_tokens()
    error = assert_graph_error(api.send_mime(mime(), token=fresh), 401, "InvalidAuthenticationToken")
    assert error["message"] == "Lifetime validation failed, the token is expired."
    assert api.send_mime(mime()).status == 202


def test_invalid_base64(graph: GraphStandIn, api: Api) -> None:
    got = api.graph_call("POST", f"/users/{MAILBOX}/sendMail", b"this is not base64!", "text/plain")
    error = assert_graph_error(got, 400, "ErrorMimeContentInvalidBase64String")
    assert error["message"] == "Invalid base64 string for MIME content."


def test_request_over_4_mb(graph: GraphStandIn, api: Api) -> None:
    big = mime(body="x" * 76 + "\n")
    big = big.replace(b"x" * 76, (b"y" * 76 + b"\r\n") * 40_000)  # 3.1 MB of body, 4.1 MB as base64
    got = api.send_mime(big)
    error = assert_graph_error(got, 413, "RequestEntityTooLarge")
    assert error["message"] == "The maximum request length supported is 4MB."
    assert graph.deliveries == []


def test_tenant_message_size_limit(graph: GraphStandIn, api: Api) -> None:
    graph.max_message_bytes = 1000
    assert_graph_error(api.send_mime(mime(body="z" * 2000)), 413, "ErrorMessageSizeExceeded")


def test_send_as_another_address(graph: GraphStandIn, api: Api) -> None:
    got = api.send_mime(mime(sender="ceo@example.org"))
    error = assert_graph_error(got, 403, "ErrorSendAsDenied")
    assert error["message"] == SEND_AS_DENIED_MESSAGE
    graph.send_as[MAILBOX] = {"ceo@example.org"}
    assert api.send_mime(mime(sender="ceo@example.org")).status == 202


@pytest.mark.parametrize(("to", "cc", "bcc"), [("", None, None), ("not an address", None, None)])
def test_bad_recipients(graph: GraphStandIn, api: Api, to: str, cc: str | None, bcc: str | None) -> None:
    assert_graph_error(api.send_mime(mime(to=to, cc=cc, bcc=bcc)), 400, "ErrorInvalidRecipients")


def test_mailbox_me_and_roles(graph: GraphStandIn, api: Api) -> None:
    body = base64.b64encode(mime())
    assert_graph_error(api.graph_call("POST", "/users/nobody@example.org/sendMail", body, "text/plain"), 404, "ErrorInvalidUser")
    assert_graph_error(api.graph_call("POST", "/me/sendMail", body, "text/plain"), 400, "BadRequest")
    # The mailbox is matched without regard to case, and may come percent-encoded.
    assert api.graph_call("POST", "/users/ALERTS%40example.org/sendMail", body, "text/plain").status == 202
    graph.roles = ["Mail.ReadWrite"]
    error = assert_graph_error(api.send_mime(mime()), 403, "ErrorAccessDenied")
    assert error["message"] == "Access is denied. Check credentials and try again."


# -- scripted failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "status", "code", "retry_after"),
    [
        (throttled(7), 429, "ApplicationThrottled", "7"),
        (unavailable(30), 503, "ServiceUnavailable", "30"),
        (gateway_timeout(), 504, "GatewayTimeout", None),
        (access_denied(), 403, "ErrorAccessDenied", None),
        (send_as_denied(), 403, "ErrorSendAsDenied", None),
        (invalid_recipients(), 400, "ErrorInvalidRecipients", None),
        (message_too_large(), 413, "ErrorMessageSizeExceeded", None),
        (request_too_large(), 413, "RequestEntityTooLarge", None),
        (server_error(), 500, "InternalServerError", None),
        (unauthorized(), 401, "InvalidAuthenticationToken", None),
    ],
)
def test_scripted_failures(graph: GraphStandIn, api: Api, answer: Answer, status: int, code: str, retry_after: str | None) -> None:
    graph.script("sendMail", answer)
    got = api.send_mime(mime(), headers={"client-request-id": "0000aaaa-0000-0000-0000-000000000002"})
    error = assert_graph_error(got, status, code)
    assert error["innerError"]["client-request-id"] == "0000aaaa-0000-0000-0000-000000000002"
    assert got.headers.get("retry-after") == retry_after
    if code == "ErrorAccessDenied":
        assert error["message"] == "Access is denied. Check credentials and try again."
    assert graph.deliveries == []
    assert graph.requests_to("sendMail")[-1].outcome == "scripted"
    # One answer per request: the next one is served normally.
    assert api.send_mime(mime()).status == 202
    assert len(graph.deliveries) == 1


def test_hang_and_drop(graph: GraphStandIn, api: Api) -> None:
    token = api.token()
    graph.script("sendMail", hang(), drop())
    with pytest.raises(Exception) as hung:
        api.send_mime(mime(), token=token, timeout=0.5)
    assert "Cancelled" in repr(hung.value) or "Timeout" in repr(hung.value)
    with pytest.raises(Exception) as dropped:
        api.send_mime(mime(), token=token)
    assert "ResponseNeverReceived" in repr(dropped.value) or "ConnectionLost" in repr(dropped.value)
    assert [s.outcome for s in graph.requests_to("sendMail")] == ["hung", "dropped"]
    assert graph.deliveries == []


def test_a_refused_token_leaves_the_script_alone(graph: GraphStandIn, api: Api) -> None:
    graph.script("sendMail", throttled(3))
    assert_graph_error(api.send_mime(mime(), token="made-up"), 401, "InvalidAuthenticationToken")
    assert_graph_error(api.send_mime(mime()), 429, "ApplicationThrottled")


def test_slow_answer(graph: GraphStandIn, api: Api) -> None:
    token = api.token()
    graph.script("sendMail", slow(0.4))
    started = time.monotonic()
    assert api.send_mime(mime(), token=token).status == 202
    assert time.monotonic() - started >= 0.4


def test_the_graph_queue_serves_any_graph_route(graph: GraphStandIn, api: Api) -> None:
    graph.script("graph", throttled(1))
    got = api.graph_call("POST", f"/users/{MAILBOX}/messages", base64.b64encode(mime()), "text/plain")
    assert_graph_error(got, 429, "ApplicationThrottled")
    assert api.token_request(secret_form(graph)).status == 200, "not the token endpoint's"
    assert api.send_mime(mime()).status == 202


def test_every_request_is_recorded(graph: GraphStandIn, api: Api) -> None:
    token = api.token()
    api.send_mime(mime(), token=token)
    assert [(s.method, s.route, s.status) for s in graph.requests] == [("POST", "token", 200), ("POST", "sendMail", 202)]
    assert graph.requests[1].headers["authorization"] == f"Bearer {token}"
    assert base64.b64decode(graph.requests[1].body) == mime()


# -- the large-message path ------------------------------------------------------------------------


def create_draft(api: Api, token: str, message: bytes) -> str:
    got = api.graph_call("POST", f"/users/{MAILBOX}/messages", base64.b64encode(message), "text/plain", token=token)
    assert got.status == 201, got.body
    resource = got.json()
    assert resource["isDraft"] is True
    return str(resource["id"])


def create_session(api: Api, token: str, draft: str, size: int, name: str = "big.bin") -> dict[str, Any]:
    item = {"AttachmentItem": {"attachmentType": "file", "name": name, "size": size, "contentType": "application/zip"}}
    got = api.graph_call(
        "POST", f"/users/{MAILBOX}/messages/{draft}/attachments/createUploadSession", json.dumps(item).encode(), "application/json", token=token
    )
    assert got.status == 201, got.body
    return dict(got.json())


def put_range(api: Api, url: str, data: bytes, start: int, total: int, **headers: str) -> Got:
    fields = {
        "Content-Type": "application/octet-stream",
        "Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}",
        **headers,
    }
    return api.request("PUT", url, headers=fields, body=data)


def test_upload_session_flow(graph: GraphStandIn, api: Api) -> None:
    token = api.token()
    draft = create_draft(api, token, mime(bcc="dave@example.net"))
    assert list(graph.drafts) == [draft]

    small = {"@odata.type": "#microsoft.graph.fileAttachment", "name": "notes.txt", "contentType": "text/plain", "contentBytes": base64.b64encode(b"small one\n").decode()}
    got = api.graph_call("POST", f"/users/{MAILBOX}/messages/{draft}/attachments", json.dumps(small).encode(), "application/json", token=token)
    assert got.status == 201 and got.json()["size"] == 10

    data = bytes(range(256)) * (3_500_000 // 256) + b"tail"
    session = create_session(api, token, draft, len(data))
    assert session["nextExpectedRanges"] == ["0-"]
    assert session["expirationDateTime"].endswith("Z")
    url = session["uploadUrl"]
    assert urlsplit(url).netloc == urlsplit(graph.base_url).netloc and "authtoken=" in url

    first = put_range(api, url, data[:CHUNK], 0, len(data))
    assert first.status == 200, first.body
    assert first.json()["nextExpectedRanges"] == [str(CHUNK)]
    last = put_range(api, url, data[CHUNK:], CHUNK, len(data))
    assert last.status == 201 and last.body == b""
    assert "/Attachments('" in last.headers["location"]

    sent = api.graph_call("POST", f"/users/{MAILBOX}/messages/{draft}/send", b"", token=token)
    assert sent.status == 202 and sent.body == b"" and sent.headers["request-id"]
    assert graph.drafts == {}
    [delivery] = graph.deliveries
    assert delivery.via == "draft" and delivery.request_id == sent.headers["request-id"]
    assert delivery.recipients == ["bob@example.net", "carol@example.net", "dave@example.net"]
    assert [(a.name, a.via, a.data) for a in delivery.attachments] == [("notes.txt", "post", b"small one\n"), ("big.bin", "upload", data)]
    assert delivery.message is not None
    parts = {part.get_filename(): part.get_content() for part in delivery.message.iter_attachments()}
    assert parts["big.bin"] == data and parts["notes.txt"] == "small one\n"
    body = delivery.message.get_body(("plain",))
    assert body is not None and body.get_content() == "The new cafeteria is open.\r\n"


@pytest.fixture
def session_url(graph: GraphStandIn, api: Api) -> tuple[str, int]:
    graph.min_upload_session_bytes = 0
    token = api.token()
    draft = create_draft(api, token, mime())
    size = 2 * CHUNK_UNIT + 100
    return str(create_session(api, token, draft, size)["uploadUrl"]), size


CHUNK_UNIT = 320 * 1024


def test_ranges_in_order(api: Api, session_url: tuple[str, int]) -> None:
    url, size = session_url
    data = b"a" * size
    assert_graph_error(put_range(api, url, data[CHUNK_UNIT:], CHUNK_UNIT, size), 416, "invalidRange")
    assert put_range(api, url, data[:CHUNK_UNIT], 0, size).status == 200
    overlap = assert_graph_error(put_range(api, url, data[:CHUNK_UNIT], 0, size), 416, "invalidRange")
    assert overlap["message"] == "Uploaded fragment overlaps with existing data."
    assert_graph_error(put_range(api, url, data[CHUNK_UNIT:], CHUNK_UNIT, size + 1), 416, "invalidRange")
    assert put_range(api, url, data[CHUNK_UNIT:], CHUNK_UNIT, size).status == 201


def test_ranges_are_multiples_of_320_kib(api: Api, session_url: tuple[str, int]) -> None:
    url, size = session_url
    got = put_range(api, url, b"a" * 1000, 0, size)
    assert_graph_error(got, 400, "invalidRange")
    assert "multiple of 327680" in got.json()["error"]["message"]


def test_upload_url_is_pre_authenticated(graph: GraphStandIn, api: Api, session_url: tuple[str, int]) -> None:
    url, size = session_url
    chunk = b"a" * CHUNK_UNIT
    assert_graph_error(put_range(api, url, chunk, 0, size, Authorization=f"Bearer {api.token()}"), 401, "InvalidAuthenticationToken")
    forged = url.split("authtoken=")[0] + "authtoken=forged"
    assert_graph_error(put_range(api, forged, chunk, 0, size), 401, "InvalidAuthenticationToken")
    got = api.request("PUT", url, headers={"Content-Type": "text/plain", "Content-Range": f"bytes 0-{CHUNK_UNIT - 1}/{size}"}, body=chunk)
    assert_graph_error(got, 415, "UnsupportedMediaType")
    assert_graph_error(api.request("PUT", url, headers={"Content-Type": "application/octet-stream"}, body=chunk), 400, "invalidRange")


def test_cancel_upload_session(graph: GraphStandIn, api: Api, session_url: tuple[str, int]) -> None:
    url, size = session_url
    assert api.request("DELETE", url).status == 204
    assert_graph_error(put_range(api, url, b"a" * CHUNK_UNIT, 0, size), 404, "ErrorItemNotFound")
    assert graph.sessions == {}


def test_small_attachments_take_no_upload_session(graph: GraphStandIn, api: Api) -> None:
    token = api.token()
    draft = create_draft(api, token, mime())
    item = {"AttachmentItem": {"attachmentType": "file", "name": "tiny", "size": 1000}}
    got = api.graph_call(
        "POST", f"/users/{MAILBOX}/messages/{draft}/attachments/createUploadSession", json.dumps(item).encode(), "application/json", token=token
    )
    assert_graph_error(got, 400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")


def test_drafts_need_mail_readwrite_and_can_be_deleted(graph: GraphStandIn, api: Api) -> None:
    token = api.token()
    draft = create_draft(api, token, mime())
    assert api.graph_call("DELETE", f"/users/{MAILBOX}/messages/{draft}", token=token).status == 204
    assert graph.drafts == {} and graph.deleted_drafts == [draft]
    assert_graph_error(api.graph_call("POST", f"/users/{MAILBOX}/messages/{draft}/send", b"", token=token), 404, "ErrorItemNotFound")
    graph.roles = ["Mail.Send"]
    got = api.graph_call("POST", f"/users/{MAILBOX}/messages", base64.b64encode(mime()), "text/plain")
    assert_graph_error(got, 403, "ErrorAccessDenied")


def test_upstream_toml(graph: GraphStandIn, tmp_path: Path) -> None:
    import tomllib

    table = tomllib.loads(graph.upstream_toml(tmp_path))["upstream"]["m365"]
    assert table["kind"] == "graph" and table["username"] == MAILBOX
    assert table["token_url"] == graph.token_url and table["graph_url"] == graph.base_url
    assert Path(table["client_secret_file"]).read_text() == CLIENT_SECRET + "\n"
    cert = make_client_certificate(tmp_path)
    table = tomllib.loads(graph.upstream_toml(tmp_path, certificate=cert))["upstream"]["m365"]
    assert table["client_certificate_file"] == str(cert.certificate_file)
    assert cert.certificate in graph.certificates
