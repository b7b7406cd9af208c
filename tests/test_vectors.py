"""OpenSSL's own OCSP verification cases: staple must give OpenSSL's verdict on every one."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from staple import ocsp
from staple.errors import OcspError

VECTORS = Path(__file__).resolve().parent / "vectors" / "openssl-ocsp"  # see vectors/README.md


def _cases() -> list[dict[str, Any]]:
    return list(json.loads((VECTORS / "cases.json").read_text())["cases"])


def _cert(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((VECTORS / name).read_bytes())


# D3's certificates carry a non-positive serial, which cryptography warns about on load.
@pytest.mark.filterwarnings("ignore:Parsed a serial number")
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_openssl_verdict(case: dict[str, Any]) -> None:
    der = base64.b64decode((VECTORS / case["response"]).read_bytes())
    cert, issuer = _cert(case["cert"]), _cert(case["issuer"])
    now = datetime.fromisoformat(case["now"])
    if case["expect"] == "accept":
        verified = ocsp.validate(der, cert, issuer, now=now)
        assert verified.cert_status is ocsp.CertStatus.GOOD
        assert verified.der == der
        assert verified.delegated == case["name"].split("_")[-1].startswith("D")
    else:
        with pytest.raises(OcspError) as info:
            ocsp.validate(der, cert, issuer, now=now)
        assert "serial" in str(info.value)  # the message names the certificate


def test_all_cases_present() -> None:
    cases = _cases()
    assert len(cases) == 54
    assert {c["expect"] for c in cases} == {"accept", "reject"}
