"""``staple status --cache-dir DIR | --store URL [--json]``: what a store holds, re-validated.

Like HAProxy's ``show ssl ocsp-response``, for a :class:`~staple.FileStore` directory or a
fleet's :class:`~staple.RedisStore`: one entry per key the store lists (:meth:`Store.keys`),
each response validated as a server would validate it before stapling (signature, signer
authorisation, CertID, times, with the default :class:`~staple.RefreshPolicy` margin and skew,
at the real now), against the certificate and issuer that a handle recorded when it opened
(:meth:`Store.put_certificate`), and against the key's revocation record, which a server holds
as evidence that a later ``good`` must be refused.

A response with no certificate record (a store written before records existed, or by a custom
store) is listed as "certificate unknown" with what it says, unverified; it sets no exit code.

Exit codes: 0 every response of a recorded certificate is valid past the margin (or the store
lists none), 1 one is revoked, 2 usage (a bad store URL, a missing directory, a store that
cannot be read), 4 one is expired, invalid or missing.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from cryptography import x509
from cryptography.x509 import ocsp as x509_ocsp

from .. import ocsp
from ..errors import ExpiredResponseError, OcspError, RevocationReversedError
from ..policy import RefreshPolicy, revocation_record, stop_stapling_at
from ..store import FileStore, Store
from ..store_choice import default_cache_dir, store_from_url
from .options import store_url_problem

if TYPE_CHECKING:
    from ..redis_store import RedisStore

__all__ = ["Held", "RevocationRecord", "Verdict", "add_arguments", "assess", "inspect_store", "run"]

EXIT_GOOD, EXIT_REVOKED, EXIT_USAGE, EXIT_INVALID = 0, 1, 2, 4

HELP = "show what a store holds, each response re-validated"
DESCRIPTION = (
    "List the OCSP responses, revocations and certificates a cache directory or a Redis store "
    "holds, each response validated as a server would before stapling it. Exit 0 all valid, "
    "1 one revoked, 2 usage, 4 one expired, invalid or missing."
)
EPILOG = None


class Verdict(enum.Enum):
    """What a server would make of one key's response."""

    VALID = "valid"
    """It staples: status good, valid past the margin."""
    REVOKED = "revoked"
    """It staples a revocation, or refuses a ``good`` after the revocation it recorded."""
    EXPIRED = "expired"
    """Expired, or with less than the margin left: it no longer staples."""
    INVALID = "invalid"
    """It refuses it (signature, signer, CertID, times, status unknown), or the certificate
    record itself is unusable."""
    MISSING = "missing"
    """A recorded certificate with no response held."""
    UNVERIFIED = "certificate unknown"
    """No certificate record: what the response says, read without its issuer."""

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES[self]


_EXIT_CODES = {
    Verdict.VALID: EXIT_GOOD,
    Verdict.REVOKED: EXIT_REVOKED,
    Verdict.EXPIRED: EXIT_INVALID,
    Verdict.INVALID: EXIT_INVALID,
    Verdict.MISSING: EXIT_INVALID,
    Verdict.UNVERIFIED: EXIT_GOOD,  # nothing to check it against: reported, never judged
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RevocationRecord:
    """A key's revocation record (:meth:`Store.get_revocation`) and whether it verifies."""

    verified: bool
    revocation_time: datetime | None = None
    reason: str | None = None
    produced_at: datetime | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "revocation_time": _iso(self.revocation_time),
            "reason": self.reason,
            "produced_at": _iso(self.produced_at),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Held:
    """What a store holds under one key, and the verdict on its response. Times and status
    come from the validated response, or, when it failed or cannot be checked, from what the
    response says (unverified)."""

    key: str
    verdict: Verdict
    serial: int | None = None
    subject: str | None = None
    """The certificate's subject (RFC 4514); ``None`` without a certificate record."""
    issuer: str | None = None
    status: str | None = None
    """What the response says: ``good``, ``revoked`` or ``unknown``."""
    this_update: datetime | None = None
    next_update: datetime | None = None
    produced_at: datetime | None = None
    expires: datetime | None = None
    """min(nextUpdate, a delegated signer's notAfter); for verified responses only."""
    stop_stapling_at: datetime | None = None
    """``expires`` less the margin: when a server stops stapling it."""
    revocation_time: datetime | None = None
    revocation_reason: str | None = None
    revocation_record: RevocationRecord | None = None
    error: str | None = None

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code

    def as_dict(self) -> dict[str, Any]:
        record = self.revocation_record
        return {
            "key": self.key,
            "serial": f"{self.serial:#x}" if self.serial is not None else None,
            "subject": self.subject,
            "issuer": self.issuer,
            "verdict": self.verdict.value,
            "status": self.status,
            "this_update": _iso(self.this_update),
            "next_update": _iso(self.next_update),
            "produced_at": _iso(self.produced_at),
            "expires": _iso(self.expires),
            "stop_stapling_at": _iso(self.stop_stapling_at),
            "revocation_time": _iso(self.revocation_time),
            "revocation_reason": self.revocation_reason,
            "revocation_record": record.as_dict() if record is not None else None,
            "error": self.error,
        }


# -- the verdict: a pure function of the stored bytes, the policy and now --------------------


def assess(
    key: str,
    *,
    chain: bytes | None,
    response: bytes | None,
    revocation: bytes | None,
    now: datetime,
    policy: RefreshPolicy,
) -> Held:
    """Judge what a store holds under ``key``: the recorded ``chain`` (PEM, leaf then issuer),
    the ``response`` and the ``revocation`` record (DER), at ``now``. Pure; never raises for
    bad bytes, which are what it is there to report."""
    if chain is None:
        return _unverified(key, response, revocation)
    try:
        leaf, issuer, cert_id = _recorded_pair(key, chain)
    except (OcspError, ValueError) as exc:
        return _with_read_fields(
            Held(key=key, verdict=Verdict.INVALID, error=f"certificate record: {_reason(exc)}"),
            key,
            response,
        )
    who = ocsp.describe(leaf)
    record, recorded = _check_record(leaf, issuer, cert_id, revocation, policy, who)
    base = Held(
        key=key,
        verdict=Verdict.MISSING,
        serial=leaf.serial_number,
        subject=leaf.subject.rfc4514_string(),
        issuer=issuer.subject.rfc4514_string(),
        revocation_record=record,
        error="no response held",
    )
    if response is None:
        return base
    try:
        verified = ocsp.validate(
            response,
            leaf,
            issuer,
            now=now,
            skew=policy.skew,
            margin=policy.margin,
            current=recorded,
            expected=cert_id,
            subject=who,
            issuer_checked=True,
        )
    except (OcspError, ValueError) as exc:
        if isinstance(exc, RevocationReversedError):
            verdict = Verdict.REVOKED  # the server keeps the revocation and refuses the 'good'
        elif isinstance(exc, ExpiredResponseError):
            verdict = Verdict.EXPIRED
        else:
            verdict = Verdict.INVALID
        return _with_read_fields(_replace(base, verdict=verdict, error=_reason(exc)), key, response)
    revoked = verified.cert_status is ocsp.CertStatus.REVOKED
    return _replace(
        base,
        verdict=Verdict.REVOKED if revoked else Verdict.VALID,
        status=verified.cert_status.name.lower(),
        this_update=verified.this_update,
        next_update=verified.next_update,
        produced_at=verified.produced_at,
        expires=verified.expires,
        stop_stapling_at=stop_stapling_at(verified, policy),
        revocation_time=verified.revocation_time,
        revocation_reason=_reason_name(verified.revocation_reason),
        error=None,
    )


def _recorded_pair(
    key: str, chain: bytes
) -> tuple[x509.Certificate, x509.Certificate, ocsp.CertId]:
    """The leaf and issuer of a certificate record, checked: the issuer issued the leaf, and
    the pair's CertID (under the key's hash algorithm) is the key. Raises ValueError or
    :class:`~staple.IssuerMismatchError`."""
    certs = x509.load_pem_x509_certificates(chain)
    if len(certs) < 2:
        raise ValueError("holds no issuer")
    leaf, issuer = certs[0], certs[1]
    ocsp.check_issued_by(leaf, issuer)
    cert_id = ocsp.cert_id(leaf, issuer, algorithm=key.split("-", 1)[0])
    if cert_id.key != key:
        raise ValueError(f"is the certificate of {cert_id.key}, not of this key")
    return leaf, issuer, cert_id


def _check_record(
    leaf: x509.Certificate,
    issuer: x509.Certificate,
    cert_id: ocsp.CertId,
    der: bytes | None,
    policy: RefreshPolicy,
    who: str,
) -> tuple[RevocationRecord | None, ocsp.VerifiedResponse | None]:
    """The revocation record as shown, and as the server would hold it (if it verifies)."""
    if der is None:
        return None, None
    try:
        verified = revocation_record(der, leaf, issuer, policy, expected=cert_id, subject=who)
    except (OcspError, ValueError) as exc:
        return RevocationRecord(verified=False, error=_reason(exc)), None
    shown = RevocationRecord(
        verified=True,
        revocation_time=verified.revocation_time,
        reason=_reason_name(verified.revocation_reason),
        produced_at=verified.produced_at,
    )
    return shown, verified


def _unverified(key: str, response: bytes | None, revocation: bytes | None) -> Held:
    """A key with no certificate record: what its bytes say, checked against nothing."""
    record = None
    if revocation is not None:
        fields = _read(key, revocation)
        record = RevocationRecord(
            verified=False,
            revocation_time=fields.get("revocation_time"),
            reason=fields.get("revocation_reason"),
            produced_at=fields.get("produced_at"),
            error=fields.get("error", "no certificate record: not verified"),
        )
    held = Held(
        key=key,
        verdict=Verdict.UNVERIFIED,
        serial=_serial_of(key),
        revocation_record=record,
        error="no certificate record: not verified" if response is not None else "no response",
    )
    return _with_read_fields(held, key, response)


def _with_read_fields(held: Held, key: str, response: bytes | None) -> Held:
    """``held`` with the status and times the response says (unverified), where it has none."""
    if response is None:
        return held
    fields = _read(key, response)
    error = fields.pop("error", None)
    if error is not None and held.verdict is Verdict.UNVERIFIED:
        fields["error"] = error
    if held.serial is not None:
        fields.pop("serial", None)
    return _replace(held, **fields)


def _read(key: str, der: bytes) -> dict[str, Any]:
    """What a response says, without checking anything: its SingleResponse for the key's
    serial (else the first), as :class:`Held` fields; ``error`` if it cannot be read."""
    try:
        resp = x509_ocsp.load_der_ocsp_response(der)
        if resp.response_status is not x509_ocsp.OCSPResponseStatus.SUCCESSFUL:
            return {"error": f"responder status {resp.response_status.name.lower()}"}
        singles = list(resp.responses)
        serial = _serial_of(key)
        single = next((s for s in singles if s.serial_number == serial), singles[0])
        status = single.certificate_status
        revoked = status is ocsp.CertStatus.REVOKED
        return {
            "serial": single.serial_number,
            "status": status.name.lower(),
            "this_update": single.this_update_utc,
            "next_update": single.next_update_utc,
            "produced_at": resp.produced_at_utc,
            "revocation_time": single.revocation_time_utc if revoked else None,
            "revocation_reason": _reason_name(single.revocation_reason) if revoked else None,
        }
    except (ValueError, IndexError, TypeError) as exc:
        return {"error": f"unreadable response ({exc})"}


def _serial_of(key: str) -> int | None:
    """The serial number a CertID key ends with (:attr:`staple.ocsp.CertId.key`)."""
    try:
        return int(key.rsplit("-", 1)[1], 16)
    except (IndexError, ValueError):
        return None


def _replace(held: Held, **changes: Any) -> Held:
    values = {name: getattr(held, name) for name in Held.__dataclass_fields__}
    values.update(changes)
    return Held(**values)


def _reason_name(reason: x509.ReasonFlags | None) -> str | None:
    return reason.value if reason is not None else None


def _reason(exc: Exception) -> str:
    if isinstance(exc, OcspError):
        return exc.reason  # without the subject, which the entry shows already
    return str(exc) or type(exc).__name__


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


# -- reading the store -------------------------------------------------------------------------


async def inspect_store(
    store: Store, *, now: datetime | None = None, policy: RefreshPolicy | None = None
) -> list[Held]:
    """Every key ``store`` lists, judged by :func:`assess` at ``now`` (default: the real
    now) under ``policy`` (default: :class:`RefreshPolicy`'s margin and skew). Raises
    ``OSError`` when the store cannot be read."""
    now = now if now is not None else datetime.now(UTC)
    policy = policy if policy is not None else RefreshPolicy()
    held = []
    for key in await store.keys():
        chain = await store.get_certificate(key)
        response = await store.get(key)
        revocation = await store.get_revocation(key)
        held.append(
            assess(
                key, chain=chain, response=response, revocation=revocation, now=now, policy=policy
            )
        )
    return held


def exit_code(held: Sequence[Held]) -> int:
    """The worst entry's exit code: 4 beats 1 beats 0."""
    return max((h.exit_code for h in held), default=EXIT_GOOD)


# -- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=Path,
        default=default_cache_dir(),
        help="the FileStore directory to read (%(default)s)",
    )
    where.add_argument(
        "--store", metavar="URL", help="the Redis store to read (redis://HOST:PORT/DB)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per key")


async def run(args: argparse.Namespace, out: TextIO) -> int:
    problem = store_url_problem(args.store)
    if problem is not None:
        return _usage(problem)
    redis: RedisStore | None = None
    store: Store
    if args.store is not None:
        store = redis = store_from_url(args.store)
    else:
        problem = _directory_problem(args.cache_dir)
        if problem is not None:
            return _usage(problem)
        store = FileStore(args.cache_dir)
    try:
        held = await inspect_store(store)
        if redis is not None and not redis.available:  # its reads failed open mid-way
            raise ConnectionError(f"{redis!r}: Redis stopped answering")
    except OSError as exc:
        return _usage(f"cannot read {store!r}: {exc}")
    finally:
        await store.close()
    if args.json:
        print(json.dumps([h.as_dict() for h in held], indent=2), file=out)
    else:
        _print(held, store, out)
    return exit_code(held)


def _directory_problem(directory: Path) -> str | None:
    """Why ``--cache-dir`` names no store to read (a FileStore makes its directory on its
    first write, so a missing one means a typo or a server that never ran), or ``None``."""
    if os.path.isdir(directory):
        return None
    what = "is not a directory" if os.path.exists(directory) else "does not exist"
    return f"--cache-dir {directory} {what}: no store to read there"


def _usage(reason: str) -> int:
    print(f"staple status: {reason}", file=sys.stderr)
    return EXIT_USAGE


_LABELS = {
    "subject": "certificate",
    "stop_stapling_at": "stop stapling",
    "revocation_record": "revocation record",
}


def _print(held: Sequence[Held], store: Store, out: TextIO) -> None:
    """A block per key in ``staple check``'s ``key: value`` style, then a summary line."""
    for entry in held:
        fields = entry.as_dict()
        record = entry.revocation_record
        if record is not None:
            fields["revocation_record"] = _describe_record(record)
        width = max(len(_LABELS.get(k, k.replace("_", " "))) for k in fields) + 2
        for name, value in fields.items():
            if value is None:
                continue
            label = _LABELS.get(name, name.replace("_", " ")) + ":"
            print(f"{label:<{width}}{value}", file=out)
        print(file=out)
    if not held:
        print(f"{store!r} lists nothing", file=out)
        return
    counts: dict[Verdict, int] = {}
    for entry in held:
        counts[entry.verdict] = counts.get(entry.verdict, 0) + 1
    summary = ", ".join(f"{n} {v.value}" for v, n in counts.items())
    print(f"{len(held)} {'key' if len(held) == 1 else 'keys'}: {summary}", file=out)


def _describe_record(record: RevocationRecord) -> str:
    if not record.verified:
        return f"unverified ({record.error})"
    when = record.revocation_time.isoformat() if record.revocation_time else "?"
    return f"revoked at {when}, reason {record.reason or 'unspecified'}"
