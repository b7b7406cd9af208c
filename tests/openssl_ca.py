"""An independent PKI and OCSP responder for interop tests, made with the ``openssl`` CLI only.

:mod:`staple.testing` builds its PKI and signs its OCSP responses with cryptography, the library
staple validates with, so agreement there proves little. Here every key, certificate, CA
database and response comes from ``openssl`` subprocesses instead::

    ca = OpensslCA(tmp_path)                   # root -> intermediate, delegated OCSP signer
    leaf = ca.issue_leaf("good.test")          # AIA: OCSP;URI:http://127.0.0.1:<ca.port>
    async with OcspResponder(ca) as responder:  # openssl ocsp -index ... -port <ca.port>
        handle = await staple.open_server_ocsp_response(leaf.chain, wait=True)
        ca.revoke(leaf)
        await responder.sync_index()           # see the trap below
        await handle.refresh()

What the PKI holds: a root CA; an intermediate signed by the root (the issuer of everything
else); leaves whose AIA names the responder; a delegated responder certificate with
``extendedKeyUsage = OCSPSigning`` issued by the intermediate. ``openssl ca`` with a minimal
config issues from the intermediate and keeps ``index.txt``; ``issue_leaf(record=False)``
issues with ``openssl x509 -req`` instead, so the responder answers ``unknown`` for it.

Traps of ``openssl ocsp`` (checked against OpenSSL 3.0.19):

- ``-port`` takes a number only (``Can't parse "127.0.0.1:N" as a number``) and the responder
  binds every interface (``[::]``, dual stack). The port is chosen first (bind port 0 on
  127.0.0.1, read, close) because the leaves must name it before the responder runs.
- A connection that opens and closes without a request hangs it for good (OpenSSL issue
  31129), so nothing here probes the port: :meth:`OcspResponder.start` waits for the
  ``ACCEPT [::]:PORT PID=N`` line it prints (and flushes) on stdout once it listens.
- It re-reads ``index.txt`` only at the top of its accept loop, i.e. after it served the
  *next* request, and only if the file's mtime, ctime (whole seconds), inode or device
  changed: a revocation is answered one request late. ``openssl ca -revoke`` replaces the file
  by rename (a new inode), and :meth:`OcspResponder.sync_index` sends one throwaway request
  (with the ``openssl ocsp`` client) so the request after it sees the change.
- A GET is decoded from the whole path: with a responder URL that has a path
  (``http://host:port/ocsp``) only POST works; GET gets ``400 Bad Request``.
- ``-timeout`` is no cure for the hang: on expiry it shuts down the listening socket itself.
- Each request is logged on stderr as ``ocsp: Received request, 1st line: GET /... HTTP/1.1``;
  :attr:`OcspResponder.requests` collects those lines (how tests tell GET from POST).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from cryptography import x509

from .external import require

__all__ = [
    "Issued",
    "OcspResponder",
    "OpensslCA",
    "OpensslError",
    "free_port",
    "require_openssl",
]

_CURVE = "P-256"  # EC keys: generated in milliseconds, unlike RSA


class OpensslError(RuntimeError):
    """An ``openssl`` command failed; the message carries its command line and stderr."""


def require_openssl() -> str:
    """The ``openssl`` executable's path (see :func:`tests.external.require`)."""
    return require("openssl")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bound to port 0, read, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate made by :class:`OpensslCA`: its files, serial and issuer chain."""

    name: str
    cert_path: Path
    key_path: Path
    serial: int
    issuer_chain: tuple[Path, ...] = field(default=())
    """PEM files of the issuing CA certificates, nearest first (not including the root)."""

    @property
    def pem(self) -> bytes:
        return self.cert_path.read_bytes()

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.pem)

    @property
    def chain(self) -> list[x509.Certificate]:
        """``[certificate, issuer, ...]`` as cryptography certificates (leaf first)."""
        return [self.cert] + [
            x509.load_pem_x509_certificate(p.read_bytes()) for p in self.issuer_chain
        ]

    @property
    def chain_pem(self) -> bytes:
        return self.pem + b"".join(p.read_bytes() for p in self.issuer_chain)


_CA_CONFIG = """\
# openssl ca configuration for the intermediate CA (written by tests/openssl_ca.py)
[ca]
default_ca = intermediate

[intermediate]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
certificate = $dir/intermediate.pem
private_key = $dir/intermediate.key
default_md = sha256
default_days = 30
policy = policy_any
unique_subject = no
copy_extensions = none
email_in_dn = no
preserve = no

[policy_any]
commonName = supplied

[req]
distinguished_name = req_dn
prompt = no

[req_dn]
CN = unused

[root_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[intermediate_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[leaf_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
authorityInfoAccess = OCSP;URI:{ocsp_url}

[ocsp_signer_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = OCSPSigning
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[plain_signer_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class OpensslCA:
    """A root and an intermediate CA in ``directory``, managed by the ``openssl`` CLI.

    ``port`` is the responder port the leaves' AIA names (a free one by default); the
    intermediate's ``openssl ca`` database is ``index.txt``, which :class:`OcspResponder`
    serves. :attr:`signer` is a delegated OCSP responder certificate (OCSPSigning EKU).
    """

    def __init__(self, directory: Path, *, port: int | None = None) -> None:
        self.openssl = require_openssl()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.index = self.dir / "index.txt"
        self.config = self.dir / "ca.cnf"
        self.root_pem = self.dir / "root.pem"
        self.root_key = self.dir / "root.key"
        self.intermediate_pem = self.dir / "intermediate.pem"
        self.intermediate_key = self.dir / "intermediate.key"
        self._names: set[str] = set()
        self._next_unrecorded = 0x7E000000  # serials issued outside index.txt

        (self.dir / "newcerts").mkdir(exist_ok=True)
        self.index.write_text("")
        (self.dir / "serial").write_text("1000\n")
        self.config.write_text(_CA_CONFIG.format(dir=self.dir, ocsp_url=self.url))

        self._run(
            "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{_CURVE}",
            "-noenc", "-keyout", self.root_key, "-out", self.root_pem,
            "-subj", "/O=staple interop/CN=OpenSSL Test Root", "-days", "3650",
            "-config", self.config, "-extensions", "root_ext",
        )  # fmt: skip
        csr = self._new_key_and_csr(
            "intermediate", "/O=staple interop/CN=OpenSSL Test Intermediate"
        )
        self._run(
            "x509", "-req", "-in", csr, "-CA", self.root_pem, "-CAkey", self.root_key,
            "-set_serial", "2", "-days", "365", "-sha256",
            "-extfile", self.config, "-extensions", "intermediate_ext",
            "-out", self.intermediate_pem,
        )  # fmt: skip
        self.signer = self.issue_signer("OCSP Responder")

    # -- running openssl ---------------------------------------------------------------------

    def _run(self, *args: str | Path) -> str:
        cmd = [self.openssl, *map(str, args)]
        proc = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise OpensslError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}")
        return proc.stdout

    def _claim(self, name: str) -> str:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        if stem in self._names or stem in ("root", "intermediate"):
            raise ValueError(f"a certificate named {name!r} was already issued")
        self._names.add(stem)
        return stem

    def _new_key_and_csr(self, stem: str, subject: str) -> Path:
        csr = self.dir / f"{stem}.csr"
        self._run(
            "req", "-new", "-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{_CURVE}", "-noenc",
            "-keyout", self.dir / f"{stem}.key", "-subj", subject, "-config", self.config,
            "-out", csr,
        )  # fmt: skip
        return csr

    def _serial_of(self, pem: Path) -> int:
        out = self._run("x509", "-in", pem, "-noout", "-serial").strip()  # serial=1000
        return int(out.partition("=")[2], 16)

    def _issue(self, name: str, extensions: str, *, record: bool, by_root: bool = False) -> Issued:
        stem = self._claim(name)
        csr = self._new_key_and_csr(stem, f"/O=staple interop/CN={name}")
        cert = self.dir / f"{stem}.pem"
        chain: tuple[Path, ...]
        if by_root:
            ca_pem, ca_key, chain = self.root_pem, self.root_key, ()
        else:
            ca_pem, ca_key = self.intermediate_pem, self.intermediate_key
            chain = (self.intermediate_pem,)
        if record:  # openssl ca: the serial comes from ./serial and the cert lands in index.txt
            assert not by_root, "only the intermediate keeps an index"
            self._run(
                "ca", "-batch", "-notext", "-config", self.config, "-extensions", extensions,
                "-in", csr, "-out", cert,
            )  # fmt: skip
        else:
            self._next_unrecorded += 1
            self._run(
                "x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key,
                "-set_serial", str(self._next_unrecorded), "-days", "30", "-sha256",
                "-extfile", self.config, "-extensions", extensions, "-out", cert,
            )  # fmt: skip
        return Issued(
            name=name,
            cert_path=cert,
            key_path=self.dir / f"{stem}.key",
            serial=self._serial_of(cert),
            issuer_chain=chain,
        )

    # -- issuing and revoking ------------------------------------------------------------------

    def issue_leaf(self, name: str, *, record: bool = True) -> Issued:
        """A TLS server certificate from the intermediate whose AIA names :attr:`url`.

        ``record=False`` issues it outside ``openssl ca`` with a serial index.txt lacks, so the
        responder answers ``unknown`` for it."""
        return self._issue(name, "leaf_ext", record=record)

    def issue_signer(
        self, name: str, *, ocsp_signing: bool = True, by_root: bool = False
    ) -> Issued:
        """A responder certificate for ``OcspResponder(signer=...)``: from the intermediate
        with the OCSPSigning EKU (a proper delegated responder) by default; without it
        (``ocsp_signing=False``: EKU serverAuth), or from the root (``by_root=True``), it is one
        ``openssl ocsp`` happily signs with but RFC 6960 §4.2.2.2 does not authorise."""
        ext = "ocsp_signer_ext" if ocsp_signing else "plain_signer_ext"
        return self._issue(name, ext, record=not by_root, by_root=by_root)

    def revoke(self, issued: Issued, *, reason: str = "keyCompromise") -> None:
        """Mark ``issued`` revoked in index.txt (``openssl ca -revoke``). A running responder
        sees it one request late: call :meth:`OcspResponder.sync_index` next."""
        self._run("ca", "-config", self.config, "-revoke", issued.cert_path, "-crl_reason", reason)

    def index_entry(self, issued: Issued) -> list[str]:
        """The index.txt line of ``issued``, split at tabs: status (V/R), expiry, revocation
        ``time[,reason]``, serial (hex), file name, subject."""
        for line in self.index.read_text().splitlines():
            fields = line.split("\t")
            if int(fields[3], 16) == issued.serial:
                return fields
        raise KeyError(f"serial {issued.serial:#x} is not in {self.index}")

    def verify_response(self, der: bytes, issued: Issued) -> str:
        """Check a DER response with OpenSSL's own OCSP client verifier, trusting the root;
        returns its status report (``<cert>: good`` ...). Raises :class:`OpensslError` when
        OpenSSL rejects it."""
        respin = self.dir / f"check-{issued.serial:x}.der"
        respin.write_bytes(der)
        try:
            report = self._run(
                "ocsp", "-respin", respin, "-issuer", self.intermediate_pem,
                "-cert", issued.cert_path, "-CAfile", self.root_pem,
                "-verify_other", self.intermediate_pem,
            )  # fmt: skip
        finally:
            respin.unlink()
        return report


class OcspResponder:
    """``openssl ocsp`` serving ``ca``'s index.txt on ``ca.port``: start, then close.

    ``signer`` is the responder certificate: ``"delegated"`` (:attr:`OpensslCA.signer`, the
    default), ``"issuer"`` (the intermediate signs its own responses), or any :class:`Issued`
    (see :meth:`OpensslCA.issue_signer`). ``key_id`` names the responder by key hash instead
    of by name (``-resp_key_id``); ``no_certs`` leaves the signer certificate out of responses
    (``-resp_no_certs``); ``nmin`` is a response's validity (nextUpdate - thisUpdate) in
    minutes; ``extra_args`` go to ``openssl ocsp`` as they are.

    One responder per port at a time: stop one before starting the next on ``ca.port``.
    """

    def __init__(
        self,
        ca: OpensslCA,
        *,
        signer: Issued | Literal["delegated", "issuer"] = "delegated",
        nmin: int = 60,
        key_id: bool = False,
        no_certs: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.ca = ca
        if signer == "delegated":
            signer = ca.signer
        if signer == "issuer":
            self.signer_pem, self.signer_key = ca.intermediate_pem, ca.intermediate_key
        elif isinstance(signer, Issued):
            self.signer_pem, self.signer_key = signer.cert_path, signer.key_path
        else:
            raise ValueError(f"signer must be 'delegated', 'issuer' or an Issued, not {signer!r}")
        self.nmin = nmin
        self.args: list[str] = [
            "ocsp", "-index", str(ca.index), "-port", str(ca.port),
            "-rsigner", str(self.signer_pem), "-rkey", str(self.signer_key),
            "-CA", str(ca.intermediate_pem), "-nmin", str(nmin), "-ignore_err",
        ]  # fmt: skip
        if key_id:
            self.args.append("-resp_key_id")
        if no_certs:
            self.args.append("-resp_no_certs")
        self.args += extra_args
        self.log: list[str] = []
        """Every line the responder printed (stdout and stderr), in arrival order."""
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        return self.ca.url

    @property
    def requests(self) -> list[str]:
        """The first line of every request received, e.g. ``GET /MEMw... HTTP/1.1``."""
        marker = "Received request, 1st line: "
        return [line.partition(marker)[2] for line in self.log if marker in line]

    async def start(self, *, timeout: float = 10.0) -> None:
        """Spawn the responder and return once it listens (its ``ACCEPT`` line), never
        connecting to find out. Raises :class:`OpensslError` if it exits or stays silent."""
        if self._proc is not None:
            raise RuntimeError("responder already started")
        self._proc = await asyncio.create_subprocess_exec(
            self.ca.openssl,
            *self.args,
            cwd=self.ca.dir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self._proc.stdout), name="openssl ocsp stdout"),
            asyncio.create_task(self._read(self._proc.stderr), name="openssl ocsp stderr"),
        ]
        try:
            async with asyncio.timeout(timeout):
                await self._wait_for(lambda: any(s.startswith("ACCEPT ") for s in self.log))
        except (EOFError, TimeoutError) as exc:
            await self.close()
            what = "exited" if isinstance(exc, EOFError) else f"did not listen in {timeout:g} s"
            detail = "\n".join(self.log) or "(no output)"
            raise OpensslError(f"openssl ocsp {what}:\n{detail}") from None
        except BaseException:
            await self.close()
            raise

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            async with self._changed:
                self.log.append(line.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:  # EOF: wake waiters so they notice an exit
            self._changed.notify_all()

    def _exited(self) -> bool:
        return all(t.done() for t in self._readers)

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            while not predicate():
                if self._exited():
                    raise EOFError("openssl ocsp exited")
                await self._changed.wait()

    async def wait_for_requests(self, count: int, *, timeout: float = 5.0) -> list[str]:
        """Wait until at least ``count`` requests were logged; returns their first lines.
        Raises :class:`TimeoutError`, or :class:`EOFError` if the responder exited."""
        async with asyncio.timeout(timeout):
            await self._wait_for(lambda: len(self.requests) >= count)
        return self.requests

    async def sync_index(self, *, timeout: float = 10.0) -> None:
        """Make the responder pick up index.txt changes before the next request.

        It reloads the index only after serving a request, so this sends a throwaway one
        (``openssl ocsp`` as client, about the intermediate's serial 1, answered ``unknown``);
        the next request is accepted after the reload."""
        seen = len(self.requests)
        proc = await asyncio.create_subprocess_exec(
            self.ca.openssl, "ocsp", "-issuer", str(self.ca.intermediate_pem), "-serial", "1",
            "-url", self.url, "-no_nonce", "-noverify", "-timeout", str(int(timeout)),
            cwd=self.ca.dir, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            async with asyncio.timeout(timeout):
                out, _ = await proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise OpensslError(f"throwaway OCSP request failed:\n{out.decode(errors='replace')}")
        await self.wait_for_requests(seen + 1, timeout=timeout)

    async def close(self) -> None:
        """Stop the responder (SIGTERM, then SIGKILL after 5 s) and reap it. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        # A responder that closed its pipes has exited: signalling it would make Popen reap it
        # behind asyncio's child watcher ("Unknown child process pid").
        if proc.returncode is None and not self._exited():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        try:
            async with asyncio.timeout(5.0):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._readers:
            await asyncio.wait(self._readers)  # pipes reach EOF once the process is gone

    async def __aenter__(self) -> OcspResponder:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
