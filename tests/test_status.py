"""``staple status``: what a store holds, each response re-validated as a server would.

Real handles write a real FileStore (or a real redis-server) on the real clock, as servers do;
then the command runs in-process. Each healthy case is paired with a broken one that must
change the exit code: a revoked certificate, a flipped byte, an expired response, a response
gone, a record for another key, a store without certificate records.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import staple
from staple import FileStore, MemoryStore, Store, cli, ocsp
from staple.cli.status import Verdict, inspect_store
from staple.redis_store import RedisStore
from staple.testing import FakeClock, Fault, Leaf, OcspResponder, TestPKI

from .redis_server import free_port

UNTIL = datetime.now(UTC) + timedelta(days=30)


@pytest.fixture
async def live() -> AsyncIterator[tuple[TestPKI, OcspResponder]]:
    """A PKI and responder on the real clock, as the command validates at the real now."""
    pki = TestPKI()
    async with OcspResponder(pki) as responder:
        yield pki, responder


async def serve_once(leaf: Leaf, store: Store, **kw: Any) -> staple.ServerOcspResponse:
    """What a server does with ``leaf``: open a handle on ``store`` (which records the chain
    and persists the first response), then close it."""
    async with await staple.open_server_ocsp_response(leaf.chain, store=store, **kw) as handle:
        assert handle.response is not None, handle.last_error
    return handle


async def status(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await cli.run(["status", *argv], out=out)
    return code, out.getvalue()


def key_of(leaf: Leaf) -> str:
    return ocsp.cert_id(leaf.cert, leaf.chain[1]).key


def blocks(text: str) -> dict[str, dict[str, str]]:
    """The human output as {key: {label: value}}."""
    found: dict[str, dict[str, str]] = {}
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(":", 1) for line in block.splitlines() if ": " in line)
        fields = {k.strip(): v.strip() for k, v in lines.items()}
        if "key" in fields:
            found[fields["key"]] = fields
    return found


# -- the command on a FileStore --------------------------------------------------------------


async def test_valid_responses_exit_0_with_each_certificate(live, tmp_path) -> None:
    pki, responder = live
    leaves = [pki.issue_leaf(f"s{i}.status.test", ocsp_url=responder.url) for i in range(2)]
    for leaf in leaves:
        await serve_once(leaf, FileStore(tmp_path))
    code, text = await status("--cache-dir", str(tmp_path))
    assert code == 0, text
    shown = blocks(text)
    assert set(shown) == {key_of(leaf) for leaf in leaves}
    for leaf in leaves:
        entry = shown[key_of(leaf)]
        assert entry["verdict"] == "valid"
        assert entry["status"] == "good"
        assert entry["serial"] == f"{leaf.cert.serial_number:#x}"
        assert entry["certificate"] == leaf.cert.subject.rfc4514_string()
        stop = datetime.fromisoformat(entry["stop stapling"])
        assert stop == datetime.fromisoformat(entry["expires"]) - ocsp.DEFAULT_MARGIN
    assert text.rstrip().endswith("2 keys: 2 valid")


async def test_a_revoked_certificate_exits_1_with_its_revocation_record(live, tmp_path) -> None:
    pki, responder = live
    good = pki.issue_leaf("good.status.test", ocsp_url=responder.url)
    revoked = pki.issue_leaf("revoked.status.test", ocsp_url=responder.url)
    responder.revoke(revoked)
    for leaf in (good, revoked):
        await serve_once(leaf, FileStore(tmp_path))
    assert (tmp_path / f"{key_of(revoked)}.revoked").exists()
    code, text = await status("--cache-dir", str(tmp_path))
    assert code == 1, text
    entry = blocks(text)[key_of(revoked)]
    assert entry["verdict"] == "revoked"
    assert entry["revocation reason"] == "keyCompromise"
    assert entry["revocation record"].startswith("revoked at ")
    assert blocks(text)[key_of(good)]["verdict"] == "valid"


async def test_a_flipped_byte_is_invalid_and_exits_4(live, tmp_path) -> None:
    pki, responder = live
    leaf = pki.issue_leaf("flip.status.test", ocsp_url=responder.url)
    await serve_once(leaf, FileStore(tmp_path))
    path = tmp_path / f"{key_of(leaf)}.ocsp"
    der = bytearray(path.read_bytes())
    der[-1] ^= 0x01  # the last byte of the signature
    path.write_bytes(bytes(der))
    code, text = await status("--cache-dir", str(tmp_path))
    assert code == 4, text
    entry = blocks(text)[key_of(leaf)]
    assert entry["verdict"] == "invalid"
    assert "signature does not verify" in entry["error"]
    assert entry["status"] == "good"  # what it says, shown though not believed


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.UNKNOWN, "responder does not know the certificate"),
        (Fault.WRONG_SIGNER, "is neither the issuer nor a certificate included"),
        (Fault.SIGNER_WITHOUT_EKU, "lacks id-kp-OCSPSigning"),
        (Fault.WRONG_CERT, "not about this certificate"),
        (Fault.FUTURE, "is in the future"),
        (Fault.TRY_LATER, "answered 'try_later'"),
    ],
)
async def test_responses_a_server_refuses_are_invalid(live, tmp_path, fault, reason) -> None:
    """Signed and well formed, or not, but nothing a server would staple."""
    pki, responder = live
    leaf = pki.issue_leaf("refused.status.test", ocsp_url=responder.url)
    await serve_once(leaf, FileStore(tmp_path))
    responder.fault = fault
    (tmp_path / f"{key_of(leaf)}.ocsp").write_bytes(responder.response_for(leaf))
    code, text = await status("--cache-dir", str(tmp_path))
    assert code == 4, text
    entry = blocks(text)[key_of(leaf)]
    assert entry["verdict"] == "invalid"
    assert reason in entry["error"]


async def test_an_expired_response_exits_4(tmp_path) -> None:
    """Servers that ran three days ago (a fake clock) left a store; now it is expired."""
    clock = FakeClock(datetime.now(UTC) - timedelta(days=3))
    pki = TestPKI(now=clock.now())
    async with OcspResponder(pki, clock=clock) as responder:
        leaf = pki.issue_leaf("old.status.test", ocsp_url=responder.url)
        await serve_once(leaf, FileStore(tmp_path), clock=clock)
    code, text = await status("--cache-dir", str(tmp_path))
    assert code == 4, text
    entry = blocks(text)[key_of(leaf)]
    assert entry["verdict"] == "expired"
    assert "less than 0:05:00 after now" in entry["error"]


async def test_a_response_within_the_margin_is_expired(live, tmp_path) -> None:
    """Valid for another four minutes is not valid past the five-minute margin."""
    pki, responder = live
    leaf = pki.issue_leaf("margin.status.test", ocsp_url=responder.url)
    await serve_once(leaf, FileStore(tmp_path))
    (held,) = await inspect_store(FileStore(tmp_path))
    assert held.verdict is Verdict.VALID and held.next_update is not None
    (late,) = await inspect_store(FileStore(tmp_path), now=held.next_update - timedelta(minutes=6))
    assert late.verdict is Verdict.VALID
    (later,) = await inspect_store(FileStore(tmp_path), now=held.next_update - timedelta(minutes=4))
    assert later.verdict is Verdict.EXPIRED
    assert later.exit_code == 4


async def test_a_certificate_without_its_response_exits_4(live, tmp_path) -> None:
    pki, responder = live
    leaf = pki.issue_leaf("gone.status.test", ocsp_url=responder.url)
    await serve_once(leaf, FileStore(tmp_path))
    assert (await status("--cache-dir", str(tmp_path)))[0] == 0
    (tmp_path / f"{key_of(leaf)}.ocsp").unlink()
    code, text = await status("--cache-dir", str(tmp_path))
    assert code == 4, text
    entry = blocks(text)[key_of(leaf)]
    assert entry["verdict"] == "missing"
    assert entry["error"] == "no response held"


async def test_a_good_after_a_recorded_revocation_is_revoked(live, tmp_path) -> None:
    """The server refuses a responder that un-revokes; status says so rather than 'valid'."""
    pki, responder = live
    leaf = pki.issue_leaf("unrevoked.status.test", ocsp_url=responder.url)
    responder.revoke(leaf)
    await serve_once(leaf, FileStore(tmp_path))
    responder.set_status(leaf, "good")
    (tmp_path / f"{key_of(leaf)}.ocsp").write_bytes(responder.response_for(leaf))
    code, text = await status("--cache-dir", str(tmp_path))
    assert code == 1, text
    entry = blocks(text)[key_of(leaf)]
    assert entry["verdict"] == "revoked"
    assert "revocation is permanent" in entry["error"]
    # Without the record the same good response is valid: the record made the difference.
    (tmp_path / f"{key_of(leaf)}.revoked").unlink()
    assert (await status("--cache-dir", str(tmp_path)))[0] == 0


async def test_a_forged_revocation_record_is_shown_unverified(live, tmp_path) -> None:
    pki, responder = live
    leaf = pki.issue_leaf("forged.status.test", ocsp_url=responder.url)
    await serve_once(leaf, FileStore(tmp_path))
    (tmp_path / f"{key_of(leaf)}.revoked").write_bytes(b"\x30\x03\x0a\x01\x00")
    code, text = await status("--cache-dir", str(tmp_path))
    assert code == 0, text  # a server ignores it too, and staples the good response
    assert blocks(text)[key_of(leaf)]["revocation record"].startswith("unverified (")


async def test_a_certificate_record_for_another_key_is_invalid(live, tmp_path) -> None:
    pki, responder = live
    a, b = (pki.issue_leaf(f"{n}.status.test", ocsp_url=responder.url) for n in "ab")
    for leaf in (a, b):
        await serve_once(leaf, FileStore(tmp_path))
    chain_a = tmp_path / f"{key_of(a)}.chain.pem"
    chain_a.write_bytes((tmp_path / f"{key_of(b)}.chain.pem").read_bytes())
    code, text = await status("--cache-dir", str(tmp_path))
    assert code == 4, text
    entry = blocks(text)[key_of(a)]
    assert entry["verdict"] == "invalid"
    assert f"is the certificate of {key_of(b)}" in entry["error"]
    chain_a.write_bytes(a.cert_pem)  # no issuer
    (held_a, _) = sorted(await inspect_store(FileStore(tmp_path)), key=lambda h: h.key != key_of(a))
    assert held_a.verdict is Verdict.INVALID and held_a.error is not None
    assert "holds no issuer" in held_a.error


async def test_responses_without_certificate_records_are_listed_unjudged(tmp_path) -> None:
    """An older store (responses only): each is listed with what it says, and only known
    certificates set the exit code, even when an unknown one's response is long expired."""
    clock = FakeClock(datetime.now(UTC) - timedelta(days=3))
    pki = TestPKI(now=clock.now())
    async with OcspResponder(pki, clock=clock) as responder:
        leaf = pki.issue_leaf("older.status.test", ocsp_url=responder.url)
        await serve_once(leaf, FileStore(tmp_path), clock=clock)
    (tmp_path / f"{key_of(leaf)}.chain.pem").unlink()
    code, text = await status("--cache-dir", str(tmp_path))
    assert code == 0, text
    entry = blocks(text)[key_of(leaf)]
    assert entry["verdict"] == "certificate unknown"
    assert entry["serial"] == f"{leaf.cert.serial_number:#x}"
    assert entry["status"] == "good"
    assert datetime.fromisoformat(entry["next update"]) < datetime.now(UTC)
    assert "certificate" not in entry  # no subject without the record
    assert "no certificate record" in entry["error"]


async def test_json_is_a_list_of_objects_with_the_fields(live, tmp_path) -> None:
    pki, responder = live
    good = pki.issue_leaf("json.status.test", ocsp_url=responder.url)
    revoked = pki.issue_leaf("json-revoked.status.test", ocsp_url=responder.url)
    responder.revoke(revoked)
    for leaf in (good, revoked):
        await serve_once(leaf, FileStore(tmp_path))
    code, text = await status("--cache-dir", str(tmp_path), "--json")
    assert code == 1
    listed = {entry["key"]: entry for entry in json.loads(text)}
    assert set(listed) == {key_of(good), key_of(revoked)}
    entry = listed[key_of(good)]
    assert entry["verdict"] == "valid" and entry["status"] == "good"
    assert entry["serial"] == f"{good.cert.serial_number:#x}"
    assert entry["subject"] == good.cert.subject.rfc4514_string()
    for field in ("this_update", "next_update", "produced_at", "expires", "stop_stapling_at"):
        assert datetime.fromisoformat(entry[field]).tzinfo is not None, field
    assert entry["revocation_record"] is None and entry["error"] is None
    record = listed[key_of(revoked)]["revocation_record"]
    assert record["verified"] is True and record["reason"] == "keyCompromise"
    assert listed[key_of(revoked)]["verdict"] == "revoked"


async def test_an_empty_directory_lists_nothing_and_exits_0(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / ".tmp-abc.ocsp").write_bytes(b"a write cut short")
    code, text = await status("--cache-dir", str(tmp_path))
    assert code == 0
    assert "lists nothing" in text
    code, text = await status("--cache-dir", str(tmp_path), "--json")
    assert (code, json.loads(text)) == (0, [])


async def test_usage_errors_exit_2(tmp_path, capsys) -> None:
    code, _ = await status("--cache-dir", str(tmp_path / "nowhere"))
    assert code == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    code, _ = await status("--cache-dir", str(tmp_path / "file"))
    assert code == 2
    assert "is not a directory" in capsys.readouterr().err
    code, _ = await status("--store", "http://127.0.0.1:6379/0")
    assert code == 2
    assert "expected redis://HOST:PORT/DB" in capsys.readouterr().err
    code, _ = await status("--store", "redis://127.0.0.1:1/0", "--cache-dir", str(tmp_path))
    assert code == 2  # one store or the other
    code, _ = await status("--store", f"redis://127.0.0.1:{free_port()}/0")
    assert code == 2  # nothing listens there: a listing never fails open
    assert "cannot read RedisStore(" in capsys.readouterr().err


# -- the store API behind it -----------------------------------------------------------------


async def test_file_store_writes_a_certificate_record_only_when_missing_or_different(
    live, tmp_path
) -> None:
    pki, responder = live
    leaf, other = (pki.issue_leaf(f"{n}.status.test", ocsp_url=responder.url) for n in "xy")
    store = FileStore(tmp_path)
    await store.put_certificate("k", leaf.chain, until=UNTIL)
    path = tmp_path / "k.chain.pem"
    assert path.read_bytes() == leaf.chain_pem[: len(path.read_bytes())]
    assert await store.get_certificate("k") == path.read_bytes()
    inode = path.stat().st_ino
    await store.put_certificate("k", leaf.chain, until=UNTIL)
    assert path.stat().st_ino == inode  # the same bytes: not rewritten
    await store.put_certificate("k", other.chain, until=UNTIL)
    assert path.stat().st_ino != inode  # different: replaced (atomically, a new file)
    assert await store.get_certificate("k") == staple.store.chain_pem(other.chain)
    assert sorted(os.listdir(tmp_path)) == ["k.chain.pem"]


@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_keys_list_every_kind_of_record_once(live, tmp_path, kind) -> None:
    pki, responder = live
    leaf = pki.issue_leaf("keys.status.test", ocsp_url=responder.url)
    store: Store = MemoryStore() if kind == "memory" else FileStore(tmp_path / "store")
    assert await store.keys() == []  # FileStore: its directory does not exist yet
    await store.put("b", b"response", expires=UNTIL)
    await store.put_revocation("b", b"revoked", until=UNTIL)
    await store.put_revocation("c", b"revoked", until=UNTIL)
    await store.put_certificate("a", leaf.chain, until=UNTIL)
    await store.put_certificate("b", leaf.chain, until=UNTIL)
    assert await store.keys() == ["a", "b", "c"]
    assert await store.get_certificate("a") == staple.store.chain_pem(leaf.chain)
    assert await store.get_certificate("c") is None


async def test_a_custom_store_lists_nothing_and_keeps_working(live) -> None:
    """The defaults: a store written before certificate records existed still serves."""

    class DictStore(Store):
        def __init__(self) -> None:
            self.data: dict[str, bytes] = {}

        async def get(self, key: str) -> bytes | None:
            return self.data.get(key)

        async def put(self, key: str, der: bytes, *, expires: datetime) -> None:
            self.data[key] = der

    pki, responder = live
    leaf = pki.issue_leaf("custom.status.test", ocsp_url=responder.url)
    store = DictStore()
    await serve_once(leaf, store)
    assert list(store.data) == [key_of(leaf)]  # the response only: no record kept
    assert await store.get_certificate(key_of(leaf)) is None
    assert await inspect_store(store) == []


# -- a fleet's Redis -------------------------------------------------------------------------


@pytest.mark.external
async def test_a_redis_store_is_listed_and_judged(live, redis_server) -> None:
    pki, responder = live
    good = pki.issue_leaf("fleet-good.status.test", ocsp_url=responder.url)
    revoked = pki.issue_leaf("fleet-revoked.status.test", ocsp_url=responder.url)
    responder.revoke(revoked)
    async with RedisStore(redis_server.url) as store:
        await serve_once(good, store)
        code, text = await status("--store", redis_server.url)
        assert code == 0, text
        assert blocks(text)[key_of(good)]["verdict"] == "valid"
        async with store.lock(key_of(good), ttl=30):  # a lock key is not a record
            await serve_once(revoked, store)
            code, text = await status("--store", redis_server.url, "--json")
    assert code == 1, text
    listed = {entry["key"]: entry for entry in json.loads(text)}
    assert set(listed) == {key_of(good), key_of(revoked)}
    assert listed[key_of(revoked)]["revocation_record"]["verified"] is True


@pytest.mark.external
async def test_redis_keys_stay_within_the_prefix_and_records_are_written_once(
    live, redis_server
) -> None:
    pki, responder = live
    leaf, other = (pki.issue_leaf(f"{n}.status.test", ocsp_url=responder.url) for n in "pq")
    async with (
        RedisStore(redis_server.url, prefix="a*[") as a,
        RedisStore(redis_server.url, prefix="a*[x:") as nested,
        RedisStore(redis_server.url, prefix="b:") as b,
    ):
        await a.put_certificate("k1", leaf.chain, until=UNTIL)
        await a.put_certificate("k1", other.chain, until=UNTIL)  # a CertID names one cert
        await a.put_revocation("k2", b"revoked", until=UNTIL)
        await a.put("k3", b"response", expires=UNTIL)
        await nested.put("k4", b"response", expires=UNTIL)
        await b.put("k5", b"response", expires=UNTIL)
        assert await a.keys() == ["k1", "k2", "k3"]
        assert await nested.keys() == ["k4"]
        assert await b.keys() == ["k5"]
        assert await a.get_certificate("k1") == staple.store.chain_pem(leaf.chain)
        assert await a.get_certificate("k2") is None


async def test_listing_an_unreachable_redis_raises_instead_of_failing_open() -> None:
    """get() fails open (None: fetch for yourself); keys() must not, or an unreachable Redis
    would read as an empty one."""
    async with RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0) as store:
        assert await store.get("k") is None
        with pytest.raises(ConnectionError, match="cannot list the keys"):
            await store.keys()
