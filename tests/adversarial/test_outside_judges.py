"""Outside judges: sslyze scans the proxy's STARTTLS and implicit-TLS listeners.

sslyze pins cryptography below the version relayproxy uses, so it lives in its own venv: set
RELAYPROXY_SSLYZE to its executable, or put a venv called ``sslyze-venv`` next to the test venv
(``python3 -m venv /tmp/sslyze-venv && /tmp/sslyze-venv/bin/pip install sslyze`` for /tmp/venv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import Proxy

SCANS = [
    "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3", "--certinfo", "--heartbleed",
    "--openssl_ccs", "--robot", "--reneg", "--compression", "--fallback", "--elliptic_curves", "--early_data", "--ems",
]
AEAD_ENDINGS = ("_GCM_SHA256", "_GCM_SHA384", "_CHACHA20_POLY1305_SHA256")
OLD_PROTOCOLS = ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites")


def find_sslyze() -> str | None:
    candidates = [
        os.environ.get("RELAYPROXY_SSLYZE"),
        shutil.which("sslyze"),
        str(Path(sys.executable).parent / "sslyze"),
        str(Path(sys.prefix).parent / "sslyze-venv" / "bin" / "sslyze"),
        str(Path(sys.prefix).parent / ".venv-sslyze" / "bin" / "sslyze"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def scan(sslyze: str, port: int, out: Path, starttls: bool) -> subprocess.Popen[bytes]:
    # Mozilla-profile compliance is reported, not judged: trustme certificates can never comply.
    args = [sslyze, "--quiet", "--mozilla_config=disable", f"--json_out={out}", *SCANS]
    if starttls:
        args += ["--starttls", "smtp"]
    return subprocess.Popen([*args, f"localhost:{port}{{127.0.0.1}}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    scans = result["server_scan_results"][0]["scan_result"]
    summary: dict[str, Any] = {}
    for key, value in scans.items():
        if value is None or value.get("status") != "COMPLETED":
            summary[key] = value and value.get("status")
            continue
        r = value["result"]
        if key.endswith("_cipher_suites"):
            summary[key] = [s["cipher_suite"]["name"] for s in r["accepted_cipher_suites"]]
        elif key == "heartbleed":
            summary[key] = r["is_vulnerable_to_heartbleed"]
        elif key == "openssl_ccs_injection":
            summary[key] = r["is_vulnerable_to_ccs_injection"]
        elif key == "robot":
            summary[key] = r["robot_result"]
        elif key == "tls_compression":
            summary[key] = r["supports_compression"]
        elif key == "tls_fallback_scsv":
            summary[key] = r["supports_fallback_scsv"]
        elif key == "session_renegotiation":
            summary[key] = {
                "client_initiated": r["is_vulnerable_to_client_renegotiation_dos"],
                "secure": r["supports_secure_renegotiation"],
            }
        elif key == "elliptic_curves":
            summary[key] = [c["name"] for c in r.get("supported_curves") or []]
        elif key == "tls_extended_master_secret":
            summary[key] = r["supports_ems_extension"]
        elif key == "tls_1_3_early_data":
            summary[key] = r["supports_early_data"]
        elif key == "certificate_info":
            leaf = r["certificate_deployments"][0]["received_certificate_chain"][0]
            summary[key] = {
                "san": leaf.get("subject_alternative_name"),
                "key": (leaf.get("public_key") or {}).get("algorithm"),
                "signature": (leaf.get("signature_hash_algorithm") or {}).get("name"),
            }
    return summary


def test_sslyze_judges_both_tls_listeners(upstream_proxy: Proxy, tmp_path: Path) -> None:
    """Attack: protocol and cipher downgrade and known TLS flaws (SSLv2/3, TLS 1.0/1.1, CBC suites, Heartbleed,
    CCS, ROBOT, CRIME, renegotiation)."""
    sslyze = find_sslyze()
    # .ci/run installs sslyze into .venv-sslyze and points RELAYPROXY_SSLYZE at it.
    assert sslyze is not None, "sslyze not installed; see this module's docstring"
    jobs = {
        "starttls": (upstream_proxy.port, True),
        "implicit": (upstream_proxy.tls_port, False),
    }
    running = {name: scan(sslyze, port, tmp_path / f"{name}.json", starttls) for name, (port, starttls) in jobs.items()}
    report = {}
    for name, proc in running.items():
        output, _ = proc.communicate(timeout=110)
        assert proc.returncode == 0, output.decode(errors="replace")
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["server_scan_results"][0]["scan_status"] == "COMPLETED", result["server_scan_results"][0]
        report[name] = summarize(result)
    print("\nsslyze:", json.dumps(report, indent=1))
    for name, summary in report.items():
        for protocol in OLD_PROTOCOLS:
            assert summary[protocol] == [], f"{name}: {protocol} accepted: {summary[protocol]}"
        assert summary["tls_1_3_cipher_suites"], f"{name}: no TLS 1.3"
        # TLS 1.2: forward-secret ECDHE with AES-GCM or ChaCha20-Poly1305 only (tap.SERVER_TLS12_CIPHERS).
        assert summary["tls_1_2_cipher_suites"], f"{name}: no TLS 1.2"
        weak = [s for s in summary["tls_1_2_cipher_suites"] if not s.startswith("TLS_ECDHE_") or not s.endswith(AEAD_ENDINGS)]
        assert weak == [], f"{name}: TLS 1.2 suites without ECDHE or AEAD accepted: {weak}"
        assert summary["heartbleed"] is False
        assert summary["openssl_ccs_injection"] is False
        assert summary["tls_compression"] is False
        assert summary["robot"] == "NOT_VULNERABLE_RSA_NOT_SUPPORTED"
        assert summary["session_renegotiation"]["client_initiated"] is False
