"""The ``staple`` command, in-process (``run``) and once as a real subprocess."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from staple import cli
from staple.testing import Fault, OcspResponder, TestPKI

pytestmark = pytest.mark.real_clock


@pytest.fixture
def chain_path(pki: TestPKI, responder: OcspResponder, tmp_path: Path) -> Any:
    leaf = pki.issue_leaf("cli.test", ocsp_url=responder.url)
    path = tmp_path / "chain.pem"
    leaf.write_chain(path)
    return leaf, path


async def check(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await cli.run(["check", *argv, "--timeout", "5"], out=out)
    return code, out.getvalue()


async def test_good(chain_path) -> None:
    _, path = chain_path
    code, text = await check(str(path))
    assert code == 0
    assert "status:" in text and "good" in text
    assert "next refresh:" in text and "signer:" in text and "(issuer)" in text


async def test_good_json(chain_path) -> None:
    leaf, path = chain_path
    code, text = await check(str(path), "--json")
    info = json.loads(text)
    assert code == 0
    assert info["status"] == "good"
    assert str(leaf.cert.serial_number.to_bytes(20).hex().lstrip("0")) in info["certificate"]
    assert info["next_update"] > info["this_update"]


async def test_revoked(chain_path, responder) -> None:
    leaf, path = chain_path
    responder.revoke(leaf)
    code, text = await check(str(path))
    assert code == 1
    assert "revoked" in text and "revocation time" in text


async def test_unknown(chain_path, responder) -> None:
    leaf, path = chain_path
    responder.set_status(leaf, "unknown")
    code, text = await check(str(path))
    assert code == 3
    assert "does not know the certificate" in text


async def test_no_valid_response(chain_path, responder) -> None:
    _, path = chain_path
    responder.fault = Fault.WRONG_SIGNER
    code, text = await check(str(path), "--json")
    assert code == 4
    assert "neither the issuer" in json.loads(text)["error"]


async def test_separate_issuer_and_responder_override(pki, responder, tmp_path) -> None:
    leaf = pki.issue_leaf("override.test")  # no AIA at all
    (tmp_path / "leaf.pem").write_bytes(leaf.cert_pem)
    (tmp_path / "issuer.pem").write_bytes(pki.intermediate.cert_pem)
    code, _ = await check(str(tmp_path / "leaf.pem"))
    assert code == 2  # no responder, no issuer: a usage problem
    code, text = await check(
        str(tmp_path / "leaf.pem"),
        "--issuer",
        str(tmp_path / "issuer.pem"),
        "--responder",
        responder.url,
    )
    assert code == 0, text


async def test_usage_errors(tmp_path) -> None:
    assert await cli.run([], out=io.StringIO()) == 2
    code, _ = await check(str(tmp_path / "missing.pem"))
    assert code == 2


@pytest.mark.slow  # a real process
async def test_subprocess(chain_path) -> None:
    """The installed entry point, as a user runs it (the responder runs on this loop)."""
    _, path = chain_path
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "staple",
        "check",
        str(path),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    assert json.loads(stdout)["status"] == "good"


async def test_demo_check() -> None:
    """``staple demo --check``: serve on a free port, prove the staple with real clients."""
    out = io.StringIO()
    assert await cli.run(["demo", "--check"], out=out) == 0
    text = out.getvalue()
    assert "listening on https://127.0.0.1:" in text
    assert "openssl s_client -connect 127.0.0.1:" in text and "-status" in text
    assert "curl --cert-status --cacert " in text
    assert "check probe: ok - verified good staple" in text
    assert "demo checks: passed" in text
    if os.environ.get("CI") == "true":  # CI has every client: nothing may be skipped there
        assert "SKIPPED" not in text and "demo checks: passed (4 of 4)" in text
