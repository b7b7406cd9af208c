"""staple's refresher against OpenSSL's own OCSP responder, on a PKI made by the openssl CLI.

Nothing here comes from cryptography or :mod:`staple.testing`: ``openssl ca`` issues the
certificates and keeps ``index.txt``, ``openssl ocsp -index`` answers over HTTP (see
``tests/openssl_ca.py`` for its traps). Every case goes through the public API, and each
accepted case is paired with one staple must refuse although OpenSSL signs it happily.

Skipped when ``openssl`` is missing, unless ``CI=true`` (then it fails).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509

import staple
from staple import CertStatus, EventKind, RefreshPolicy
from staple.chain import ChainInput
from tests.openssl_ca import Issued, OcspResponder, OpensslCA

pytestmark = pytest.mark.external

POLICY = RefreshPolicy(wait_timeout=5.0, fetch_timeout=5.0, connect_timeout=2.0)
"""Production defaults, but a hung responder fails a test in seconds, not 15."""


class Recorder:
    """An ``on_update`` callback that keeps every event."""

    def __init__(self) -> None:
        self.events: list[staple.Event] = []

    def __call__(self, event: staple.Event) -> None:
        self.events.append(event)

    def kinds(self) -> list[EventKind]:
        return [e.kind for e in self.events]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> OpensslCA:
    """One OpenSSL PKI for the module; tests that change index.txt issue their own leaf."""
    return OpensslCA(tmp_path_factory.mktemp("openssl-ca"))


@pytest.fixture(scope="module")
def good_leaf(ca: OpensslCA) -> Issued:
    return ca.issue_leaf("good.interop.test")


@pytest.fixture(scope="module")
def intermediate(ca: OpensslCA) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.intermediate_pem.read_bytes())


async def open_handle(
    chain: ChainInput,
    recorder: Recorder | None = None,
    *,
    policy: RefreshPolicy = POLICY,
    responder_urls: list[str] | None = None,
) -> staple.ServerOcspResponse:
    return await staple.open_server_ocsp_response(
        chain, wait=True, on_update=recorder, policy=policy, responder_urls=responder_urls
    )


def _now() -> datetime:
    return datetime.now(UTC)


# -- good: delegated responder and issuer-signed, by name and by key --------------------------

SignerMode = Literal["delegated", "issuer"]


@pytest.mark.parametrize(
    ("signer", "key_id", "no_certs"),
    [
        pytest.param("delegated", False, False, id="delegated-byName"),
        pytest.param("delegated", True, False, id="delegated-byKey"),
        pytest.param("issuer", False, False, id="issuer-byName"),
        pytest.param("issuer", True, False, id="issuer-byKey"),
        pytest.param("issuer", False, True, id="issuer-no-certs"),
    ],
)
async def test_good(
    ca: OpensslCA,
    good_leaf: Issued,
    intermediate: x509.Certificate,
    signer: SignerMode,
    key_id: bool,
    no_certs: bool,
) -> None:
    recorder = Recorder()
    async with OcspResponder(ca, signer=signer, key_id=key_id, no_certs=no_certs) as responder:
        before = _now().replace(microsecond=0)
        async with await open_handle(good_leaf.chain, recorder) as handle:
            ctx = handle.get_context()
            assert ctx is not None, handle.last_error
            try:
                assert handle.last_error is None
                assert ctx.cert_status is CertStatus.GOOD
                assert ctx.response.revocation_time is None
                assert ctx.response.delegated is (signer == "delegated")
                expected_signer = ca.signer.cert if signer == "delegated" else intermediate
                assert ctx.response.signer == expected_signer
                # -nmin 60: a one-hour window starting now (OpenSSL stamps whole seconds).
                assert before <= ctx.this_update <= _now()
                assert ctx.next_update - ctx.this_update == timedelta(minutes=responder.nmin)
                assert before <= ctx.produced_at <= _now()
                assert ctx.response.expires == ctx.next_update  # signer outlives the response
                # What staple hands the handshake is what the sans-I/O core accepts ...
                verified = staple.ocsp.validate(
                    ctx.encoded, good_leaf.cert, intermediate, now=_now()
                )
                assert verified.der == ctx.encoded
                assert verified.cert_status is CertStatus.GOOD
                # ... and what OpenSSL's own client verifier accepts, chained to the root.
                assert f"{good_leaf.cert_path}: good" in ca.verify_response(ctx.encoded, good_leaf)
            finally:
                ctx.free()
            assert handle.live_references == 0
        assert recorder.kinds() == [EventKind.FETCHED, EventKind.CLOSED]
        assert recorder.events[0].response is not None
        assert recorder.events[0].source == ca.url
        requests = await responder.wait_for_requests(1)
        assert len(requests) == 1
        assert requests[0].startswith("GET /")  # RFC 5019 GET: the request is 92 base64 chars


# -- what OpenSSL signs but RFC 6960 does not authorise -------------------------------------


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        pytest.param("no-eku", "lacks id-kp-OCSPSigning", id="signer-without-OCSPSigning"),
        pytest.param("by-root", "was not issued by the issuer", id="signer-from-the-root"),
        pytest.param(
            "no-certs", "neither the issuer nor a certificate included", id="signer-cert-left-out"
        ),
    ],
)
async def test_unauthorized_signer_is_refused(
    ca: OpensslCA, good_leaf: Issued, case: str, reason: str
) -> None:
    if case == "no-eku":
        responder = OcspResponder(ca, signer=ca.issue_signer("Not A Responder", ocsp_signing=False))
    elif case == "by-root":
        responder = OcspResponder(ca, signer=ca.issue_signer("Root's Responder", by_root=True))
    else:  # a proper delegated responder whose certificate the response doesn't carry
        responder = OcspResponder(ca, no_certs=True)
    recorder = Recorder()
    async with responder, await open_handle(good_leaf.chain, recorder) as handle:
        assert handle.get_context() is None
        assert isinstance(handle.last_error, staple.UnauthorizedSignerError)
        assert reason in handle.last_error.reason
        assert recorder.kinds() == [EventKind.FAILED]
        assert isinstance(recorder.events[0].error, staple.UnauthorizedSignerError)
        with pytest.raises(staple.UnauthorizedSignerError, match=reason):
            await handle.refresh()
        assert handle.get_context() is None
        assert handle.live_references == 0
        # It answered both times: OpenSSL signs with whatever -rsigner it is given.
        assert len(await responder.wait_for_requests(2)) == 2


# -- revoked and unknown ----------------------------------------------------------------------


async def test_revoked_after_good(ca: OpensslCA) -> None:
    leaf = ca.issue_leaf("revoked.interop.test")
    recorder = Recorder()
    async with OcspResponder(ca) as responder, await open_handle(leaf.chain, recorder) as handle:
        good = handle.get_context()
        assert good is not None, handle.last_error
        assert good.cert_status is CertStatus.GOOD

        ca.revoke(leaf, reason="keyCompromise")
        status, _, revoked_at, *_ = ca.index_entry(leaf)
        assert status == "R"
        # openssl ocsp re-reads index.txt only after its next request: make a throwaway one.
        await responder.sync_index()
        await handle.refresh()

        revoked = handle.get_context()
        assert revoked is not None, handle.last_error
        try:
            assert revoked.cert_status is CertStatus.REVOKED
            assert revoked.revocation_time == datetime.strptime(
                revoked_at.split(",")[0], "%y%m%d%H%M%SZ"
            ).replace(tzinfo=UTC)
            assert revoked.response.revocation_reason is x509.ReasonFlags.key_compromise
            assert handle.last_error is None  # the default policy staples the truth
            assert f"{leaf.cert_path}: revoked" in ca.verify_response(revoked.encoded, leaf)
            # The good context handed out earlier stays intact until freed.
            assert good.cert_status is CertStatus.GOOD
            assert handle.live_contexts == 2
            assert handle.live_references == 2
        finally:
            revoked.free()
            good.free()
        assert handle.live_contexts == 1
        assert handle.live_references == 0
        assert recorder.kinds() == [EventKind.FETCHED, EventKind.REVOKED]
        assert recorder.events[1].response is not None
        assert recorder.events[1].response.cert_status is CertStatus.REVOKED
        # sync_index's POST sits between staple's two GETs.
        methods = [r.split()[0] for r in await responder.wait_for_requests(3)]
        assert methods == ["GET", "POST", "GET"]


async def test_revoked_withheld_by_policy(ca: OpensslCA) -> None:
    leaf = ca.issue_leaf("withheld.interop.test")
    ca.revoke(leaf, reason="superseded")
    recorder = Recorder()
    policy = RefreshPolicy(wait_timeout=5.0, fetch_timeout=5.0, staple_revoked=False)
    async with (
        OcspResponder(ca, signer="issuer"),
        await open_handle(leaf.chain, recorder, policy=policy) as handle,
    ):
        assert handle.get_context() is None
        assert isinstance(handle.last_error, staple.CertificateRevokedError)
        assert handle.response is not None
        assert handle.response.cert_status is CertStatus.REVOKED
        assert handle.response.revocation_reason is x509.ReasonFlags.superseded
        assert recorder.kinds() == [EventKind.REVOKED]


async def test_unknown_is_never_stapled(ca: OpensslCA) -> None:
    leaf = ca.issue_leaf("unrecorded.interop.test", record=False)  # not in index.txt
    recorder = Recorder()
    async with OcspResponder(ca) as responder, await open_handle(leaf.chain, recorder) as handle:
        assert handle.get_context() is None
        assert isinstance(handle.last_error, staple.UnknownStatusError)
        assert recorder.kinds() == [EventKind.UNKNOWN]
        assert isinstance(recorder.events[0].error, staple.UnknownStatusError)
        with pytest.raises(staple.UnknownStatusError):
            await handle.refresh()
        assert recorder.kinds() == [EventKind.UNKNOWN, EventKind.UNKNOWN]
        assert handle.get_context() is None
        assert handle.response is None
        assert len(await responder.wait_for_requests(2)) == 2


# -- response validity ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("margin", "accepted"),
    [
        pytest.param(timedelta(minutes=5), False, id="default-margin-refuses"),
        pytest.param(timedelta(seconds=10), True, id="small-margin-accepts"),
    ],
)
async def test_one_minute_responses(
    ca: OpensslCA, good_leaf: Issued, margin: timedelta, accepted: bool
) -> None:
    """``-nmin 1`` responses expire within staple's default 5-minute stapling margin."""
    policy = RefreshPolicy(wait_timeout=5.0, fetch_timeout=5.0, margin=margin)
    async with (
        OcspResponder(ca, nmin=1),
        await open_handle(good_leaf.chain, policy=policy) as handle,
    ):
        ctx = handle.get_context()
        if accepted:
            assert ctx is not None, handle.last_error
            assert ctx.next_update - ctx.this_update == timedelta(minutes=1)
            ctx.free()
        else:
            assert ctx is None
            assert isinstance(handle.last_error, staple.ExpiredResponseError)


@pytest.mark.parametrize("request_hash", ["sha256", "sha384", "sha512"])
async def test_certid_hash_echoed(ca: OpensslCA, good_leaf: Issued, request_hash: str) -> None:
    """openssl ocsp answers with the CertID hash the request used."""
    policy = RefreshPolicy(wait_timeout=5.0, fetch_timeout=5.0, hash_algorithm=request_hash)
    async with OcspResponder(ca), await open_handle(good_leaf.chain, policy=policy) as handle:
        ctx = handle.get_context()
        assert ctx is not None, handle.last_error
        with ctx:
            assert ctx.response.cert_id.hash_algorithm == request_hash
            assert ctx.cert_status is CertStatus.GOOD


@pytest.mark.parametrize(
    ("request_hash", "rcid"),
    [
        pytest.param("sha256", "sha1", id="asked-sha256-answered-sha1"),
        pytest.param("sha1", "sha384", id="asked-sha1-answered-sha384"),
    ],
)
async def test_certid_hash_chosen_by_responder(
    ca: OpensslCA, good_leaf: Issued, request_hash: str, rcid: str
) -> None:
    """``-rcid`` makes the responder pick the CertID hash. OpenSSL 3.0 then builds the CertID
    from the issuer alone, with serial 0 (openssl/openssl#31070, fix pending in #31081): a
    response about another certificate, which staple must refuse. Once fixed, it must accept."""
    policy = RefreshPolicy(wait_timeout=5.0, fetch_timeout=5.0, hash_algorithm=request_hash)
    async with (
        OcspResponder(ca, extra_args=["-rcid", rcid]),
        await open_handle(good_leaf.chain, policy=policy) as handle,
    ):
        ctx = handle.get_context()
        if ctx is None:  # the OpenSSL bug
            assert isinstance(handle.last_error, staple.CertIdMismatchError)
            assert f"serial 0x0 ({rcid})" in handle.last_error.reason
        else:
            with ctx:
                assert ctx.response.cert_id.hash_algorithm == rcid
                assert ctx.cert_status is CertStatus.GOOD


# -- HTTP: GET and POST, chain inputs ---------------------------------------------------------


@pytest.fixture
def force_post(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make staple POST. It GETs whenever the base64 request fits in 255 bytes (RFC 5019),
    which a one-certificate request always does: 92 bytes with a SHA-1 CertID, 248 at most
    with SHA-512 and a 20-octet serial. Only the limit can be lowered."""
    monkeypatch.setattr(staple.ocsp, "GET_LIMIT", -1)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "", id="GET"),
        pytest.param("POST", "", id="POST"),
        # GET needs the responder at the root: openssl ocsp decodes the whole path as base64.
        pytest.param("POST", "/ocsp", id="POST-with-path"),
    ],
)
async def test_http_method(
    ca: OpensslCA, good_leaf: Issued, request: pytest.FixtureRequest, method: str, path: str
) -> None:
    if method == "POST":
        request.getfixturevalue("force_post")
    async with (
        OcspResponder(ca) as responder,
        await open_handle(good_leaf.chain, responder_urls=[ca.url + path]) as handle,
    ):
        ctx = handle.get_context()
        assert ctx is not None, handle.last_error
        ctx.free()
        (line,) = await responder.wait_for_requests(1)
        if method == "GET":
            assert line.startswith(f"GET {path}/MEMw")
        else:
            assert line == f"POST {path or '/'} HTTP/1.1"


async def test_get_refused_falls_back_to_post(ca: OpensslCA, good_leaf: Issued) -> None:
    """A responder URL with a path: openssl ocsp answers the GET form with HTTP 400, so staple
    retries the same URL by POST within the same attempt."""
    async with (
        OcspResponder(ca) as responder,
        await open_handle(good_leaf.chain, responder_urls=[ca.url + "/ocsp"]) as handle,
    ):
        ctx = handle.get_context()
        assert ctx is not None, handle.last_error
        ctx.free()
        get, post = await responder.wait_for_requests(2)
        assert get.startswith("GET /ocsp/MEMw")
        assert post == "POST /ocsp HTTP/1.1"


@pytest.mark.parametrize("form", ["certificates", "pem-bytes", "pem-path"])
async def test_chain_inputs(ca: OpensslCA, good_leaf: Issued, tmp_path: Path, form: str) -> None:
    chain: ChainInput
    if form == "certificates":
        chain = good_leaf.chain
    elif form == "pem-bytes":
        chain = good_leaf.chain_pem
    else:
        chain = tmp_path / "chain.pem"
        chain.write_bytes(good_leaf.chain_pem)
    async with OcspResponder(ca), await open_handle(chain) as handle:
        ctx = handle.get_context()
        assert ctx is not None, handle.last_error
        with ctx:
            assert ctx.cert_status is CertStatus.GOOD
        assert handle.live_references == 0


async def test_responders_come_and_go(ca: OpensslCA, good_leaf: Issued) -> None:
    """The held response outlives its responder; a restarted one serves the next refresh."""
    recorder = Recorder()
    async with OcspResponder(ca):
        handle = await open_handle(good_leaf.chain, recorder)
    try:
        with pytest.raises(staple.FetchError):
            await handle.refresh()
        ctx = handle.get_context()
        assert ctx is not None  # still stapling the last good response
        ctx.free()
        async with OcspResponder(ca, signer="issuer"):
            await handle.refresh()
        ctx = handle.get_context()
        assert ctx is not None
        assert not ctx.response.delegated
        ctx.free()
        assert recorder.kinds() == [EventKind.FETCHED, EventKind.FAILED, EventKind.FETCHED]
    finally:
        await handle.close()
