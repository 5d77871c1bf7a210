"""twistd plugin: ``twistd -n relayproxy --config PATH``."""

from twisted.application.service import ServiceMaker

relayproxy = ServiceMaker(
    "relayproxy",
    "relayproxy.tap",
    "Authenticating SMTP relay proxy in front of one provider account",
    "relayproxy",
)
