"""The configuration: one TOML file read into frozen dataclasses.

sections.py declares every table once, schema.py is the reader that checks each declared key, and
rules.py holds load_config and the rules that span keys. Every problem is one line naming the file,
the key, what is wrong and the fix.
"""

from relayproxy.config.rules import load_config
from relayproxy.config.sections import (
    DEFAULT_PATH, AuthConfig, ClientCertificate, Config, LimitsConfig, ListenerConfig, LogConfig, MetricsConfig, OAuthConfig,
    ServerConfig, ServiceAccount, SpoolConfig, TLSConfig, UpstreamConfig, UserConfig,
)

__all__ = [
    "DEFAULT_PATH", "AuthConfig", "ClientCertificate", "Config", "LimitsConfig", "ListenerConfig", "LogConfig", "MetricsConfig",
    "OAuthConfig", "ServerConfig", "ServiceAccount", "SpoolConfig", "TLSConfig", "UpstreamConfig", "UserConfig", "load_config",
]
