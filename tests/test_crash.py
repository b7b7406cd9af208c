"""Crash safety and clocks: kill -9, unwritable and poisoned caches, wall-clock jumps.

- ``python -m staple serve`` is killed with SIGKILL at random moments of its start (while it
  fetches and persists), again and again: the cache directory only ever holds files that
  validate (old or new, never torn; leftover ``.tmp-*`` files are never read as data), and the
  last restart, with the responder down, staples its first handshake for every cached
  certificate.
- A process writing through :class:`staple.FileStore` in a loop is SIGKILLed many times: every
  file on disk is always byte-for-byte one of the responses written, and validates.
- A cache directory that cannot be written (a path under a regular file; a read-only mount; a
  full tmpfs; chmod where not root): the server keeps serving from memory and logs why.
- Corrupt, truncated and foreign files in the cache are rejected (logged) and replaced.
- The wall clock jumping forward and back (``FakeClock.set``): no crash, and never a staple the
  server's own clock says is past its stop moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

import staple
from staple import RefreshPolicy
from staple.cli.serve import ServeConfig, Serving, serve
from staple.probe import probe
from staple.testing import FakeClock, Fault, Leaf, OcspResponder, TestPKI

pytestmark = [pytest.mark.slow, pytest.mark.real_clock]

HOST = "127.0.0.1"
HOUR = 3600.0
QUICK = RefreshPolicy(wait_timeout=5.0, fetch_timeout=5.0, connect_timeout=2.0)
KILLS_SERVE = int(os.environ.get("STAPLE_CRASH_KILLS", "14"))
KILLS_STORE = int(os.environ.get("STAPLE_CRASH_STORE_KILLS", "60"))

Registry = dict[str, tuple[x509.Certificate, x509.Certificate]]


def key_of(leaf: Leaf) -> str:
    return staple.ocsp.cert_id(leaf.cert, leaf.chain[1]).key


def check_cache(
    directory: Path, registry: Registry, *, now: datetime | None = None
) -> tuple[int, int]:
    """Every data file validates (at ``now``, default the real time); returns (data files,
    leftover temporary files)."""
    data = leftovers = 0
    if not directory.exists():
        return 0, 0
    now = now or datetime.now(UTC)
    for path in directory.iterdir():
        if path.name.startswith(".tmp-"):
            leftovers += 1  # a write cut short; FileStore never reads these (keys can't start
            continue  # with a dot)
        if path.name.endswith(staple.FileStore.CHAIN_SUFFIX):  # a certificate record
            assert path.name.removesuffix(staple.FileStore.CHAIN_SUFFIX) in registry, path
            continue
        assert path.suffix == staple.FileStore.SUFFIX, path
        cert, issuer = registry[path.stem]
        staple.ocsp.validate(path.read_bytes(), cert, issuer, now=now, margin=timedelta(0))
        data += 1
    return data, leftovers


def write_files(tmp_path: Path, leaf: Leaf, name: str) -> tuple[Path, Path]:
    chain, key = tmp_path / f"{name}.chain.pem", tmp_path / f"{name}.key.pem"
    leaf.write_chain(chain)
    leaf.write_key(key)
    return chain, key


# -- kill -9 of staple serve -----------------------------------------------------------------


async def spawn_serve(files: list[tuple[Path, Path]], cache: Path) -> asyncio.subprocess.Process:
    argv = [sys.executable, "-m", "staple", "serve", "--port", "0", "--cache-dir", str(cache)]
    for chain, key in files:
        argv += ["--cert", str(chain), "--key", str(key)]
    return await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


async def listening(proc: asyncio.subprocess.Process) -> int:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    match = re.fullmatch(rb"listening on https://127\.0\.0\.1:(\d+)\n", line)
    assert match, line
    return int(match.group(1))


async def first_write(cache: Path, proc: asyncio.subprocess.Process, *, deadline: float) -> None:
    """Return once a new entry appears in ``cache`` (or the process ended, or the deadline)."""
    loop = asyncio.get_running_loop()
    before = entries(cache)
    while loop.time() < deadline and proc.returncode is None:
        if entries(cache) - before:
            return
        await asyncio.sleep(0.001)


def entries(directory: Path) -> set[str]:
    """The responses (and their temporary files), not the certificate records written first."""
    try:
        return {name for name in os.listdir(directory) if not name.endswith(".pem")}
    except FileNotFoundError:
        return set()


async def kill_9(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.communicate()
    assert proc.returncode in (-signal.SIGKILL, 0), proc.returncode


async def test_kill_9_during_start_leaves_only_valid_files(
    pki: TestPKI, responder: OcspResponder, tmp_path: Path
) -> None:
    """Each round adds 8 certificates (cold: fetched and persisted at start) to the 8 of the
    round before (warm: read back and validated), and kills the server at a random moment of
    its start, weighted towards the fetch-and-persist phase just before it listens."""
    rng = random.Random(os.environ.get("STAPLE_CRASH_SEED", "staple"))
    cache = tmp_path / "cache"
    registry: Registry = {}
    leaves: list[tuple[Leaf, tuple[Path, Path]]] = []
    start_time = 0.0
    leftovers = 0
    for round_ in range(KILLS_SERVE + 1):
        for _ in range(8):
            n = len(leaves)
            leaf = pki.issue_leaf(f"c{n}.crash.test", ocsp_url=responder.url)
            registry[key_of(leaf)] = (leaf.cert, leaf.chain[1])
            leaves.append((leaf, write_files(tmp_path, leaf, f"c{n}")))
        loop = asyncio.get_running_loop()
        started = loop.time()
        proc = await spawn_serve([files for _, files in leaves[-16:]], cache)
        try:
            if round_ == 0:  # measure how long a start takes, then kill it anyway
                await listening(proc)
                start_time = loop.time() - started
            elif round_ == KILLS_SERVE:  # the last one dies while serving: all 16 persisted
                await listening(proc)
                await asyncio.sleep(rng.uniform(0, 0.2))
            elif round_ % 2:  # anywhere in the start
                await asyncio.sleep(rng.uniform(0.2, 1.1) * start_time)
            else:  # in the middle of the writes: as soon as files start to appear
                await first_write(cache, proc, deadline=loop.time() + 10 * start_time)
                await asyncio.sleep(rng.uniform(0, 0.01))
        finally:
            await kill_9(proc)
        _, leftovers = check_cache(cache, registry)  # cumulative: FileStore never sweeps them

    # Restart with the responder down: every certificate with a cached response staples its
    # very first handshake.
    responder.fault = Fault.DOWN
    before = responder.requests
    served = leaves[-16:]
    cached = [leaf for leaf, _ in served if (cache / f"{key_of(leaf)}.ocsp").exists()]
    assert len(cached) == 16
    proc = await spawn_serve([files for _, files in served], cache)
    try:
        port = await listening(proc)
        for leaf in cached:
            name = leaf.cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            result = await probe(HOST, port, servername=str(name))
            assert result.code == 0, result.lines()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            await kill_9(proc)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    data, _ = check_cache(cache, registry)
    assert data >= len(cached)
    # The down responder was asked only for what was not cached (at most once each, plus
    # aiohttp's one retry of a reset GET).
    assert responder.requests - before <= 2 * (len(served) - len(cached))
    print(f"serve: {KILLS_SERVE + 1} kills; {leftovers} temp files left by writes cut short")


# -- kill -9 of a FileStore writer -----------------------------------------------------------

ZYGOTE = textwrap.dedent(
    """
    import asyncio, os, sys
    from datetime import datetime, UTC
    from pathlib import Path
    from staple.store import FileStore

    directory, candidates = Path(sys.argv[1]), Path(sys.argv[2])
    responses = {}
    for path in sorted(candidates.iterdir()):
        key = path.name.rsplit("-", 1)[0]
        responses.setdefault(key, []).append(path.read_bytes())

    async def write(passes: int | None) -> None:
        store = FileStore(directory)
        i = 0
        while passes is None or i < passes:
            for key, options in responses.items():
                await store.put(key, options[i % len(options)], expires=datetime.now(UTC))
            i += 1

    def write_forever() -> None:
        asyncio.run(write(None))

    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "pass":  # one whole pass, not killed: the store still takes writes
            asyncio.run(write(1))
            print("passed", flush=True)
            continue
        if line.strip() != "fork":
            break
        pid = os.fork()
        if pid == 0:
            write_forever()
            os._exit(0)
        print(pid, flush=True)
        sys.stdin.readline()  # "reap"
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)


def test_filestore_survives_sigkill_mid_write(pki: TestPKI, tmp_path: Path) -> None:
    """A forked writer (so each round costs no interpreter start) puts responses for three
    certificates in a loop and is SIGKILLed after a random few milliseconds."""
    rng = random.Random(os.environ.get("STAPLE_CRASH_SEED", "staple"))
    clock = FakeClock()
    responder = OcspResponder(pki, clock=clock)
    candidates = tmp_path / "candidates"
    candidates.mkdir()
    registry: Registry = {}
    allowed: dict[str, set[bytes]] = {}
    for i in range(3):
        leaf = pki.issue_leaf(f"s{i}.crash.test")
        key = key_of(leaf)
        registry[key] = (leaf.cert, leaf.chain[1])
        allowed[key] = set()
        for j in range(4):  # four valid responses of different ages per certificate
            clock.set(datetime.now(UTC) - timedelta(minutes=10 * j))
            der = responder.response_for(leaf)
            allowed[key].add(der)
            (candidates / f"{key}-{j}").write_bytes(der)
    directory = tmp_path / "store"
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, str(directory), str(candidates)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert zygote.stdin is not None and zygote.stdout is not None
    try:
        assert zygote.stdout.readline().strip() == "ready"
        for _ in range(KILLS_STORE):
            zygote.stdin.write("fork\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.002, 0.03))  # a few ms: many puts happen meanwhile
            os.kill(pid, signal.SIGKILL)
            zygote.stdin.write("reap\n")
            zygote.stdin.flush()
            assert zygote.stdout.readline().strip() == "reaped"
            for key, options in allowed.items():
                path = directory / f"{key}.ocsp"
                if path.exists():
                    assert path.read_bytes() in options  # old or new, never torn
            check_cache(directory, registry)
        # How many certificates a killed writer reached is up to the scheduler; after all the
        # kills, one whole pass must still write every certificate.
        zygote.stdin.write("pass\n")
        zygote.stdin.flush()
        assert zygote.stdout.readline().strip() == "passed"
        zygote.stdin.write("exit\n")
        zygote.stdin.flush()
        assert zygote.wait(10) == 0
    finally:
        if zygote.poll() is None:
            zygote.kill()
            zygote.wait()
        zygote.stdin.close()
        zygote.stdout.close()
    data, left = check_cache(directory, registry)
    assert data == 3
    print(f"FileStore: {KILLS_STORE} kills, {left} leftover temp files (never read as data)")


# -- caches that are unwritable or poisoned --------------------------------------------------


def _run(*argv: str) -> bool:
    return subprocess.run(argv, capture_output=True).returncode == 0


@contextlib.contextmanager
def unwritable_dir(method: str, tmp_path: Path) -> Iterator[Path]:
    """A cache directory (maybe not yet existing) in which no file can be created."""
    if method == "under_a_file":
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("x")
        yield blocker / "cache"
    elif method == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root ignores permissions: chmod cannot make a directory unwritable")
        cache = tmp_path / "cache"
        cache.mkdir()
        cache.chmod(0o500)
        try:
            yield cache
        finally:
            cache.chmod(0o700)
    elif method == "read_only_mount":
        cache = tmp_path / "cache"
        cache.mkdir()
        if not _run("mount", "--bind", str(cache), str(cache)):
            pytest.skip("cannot bind-mount here (not root, or no mount namespace rights)")
        try:
            if not _run("mount", "-o", "remount,ro,bind", str(cache)):
                pytest.skip("cannot remount read-only")
            yield cache
        finally:
            _run("umount", str(cache))
    else:
        assert method == "full_tmpfs"
        cache = tmp_path / "cache"
        cache.mkdir()
        if not _run("mount", "-t", "tmpfs", "-o", "size=16k,mode=0755", "tmpfs", str(cache)):
            pytest.skip("cannot mount a tmpfs here")
        try:
            with contextlib.suppress(OSError), open(cache / "filler", "wb") as f:
                while True:
                    f.write(bytes(4096))
                    f.flush()
            yield cache
        finally:
            _run("umount", str(cache))


@contextlib.asynccontextmanager
async def serving(config: ServeConfig, out: io.StringIO | None = None) -> AsyncIterator[Serving]:
    out = out if out is not None else io.StringIO()
    ready: asyncio.Future[Serving] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, out=out, ready=ready, stop=stop))
    try:
        yield await asyncio.wait_for(ready, 30)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


@pytest.mark.parametrize("method", ["under_a_file", "chmod", "read_only_mount", "full_tmpfs"])
async def test_unwritable_cache_serves_from_memory_and_says_so(
    pki: TestPKI,
    responder: OcspResponder,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    method: str,
) -> None:
    leaf = pki.issue_leaf("ro.crash.test", ocsp_url=responder.url)
    files = write_files(tmp_path, leaf, "ro")
    with unwritable_dir(method, tmp_path) as cache:
        config = ServeConfig(certs=[files], host=HOST, port=0, cache_dir=cache, policy=QUICK)
        out = io.StringIO()
        async with serving(config, out) as serving_:
            result = await probe(HOST, serving_.port, servername="ro.crash.test")
            assert result.code == 0, result.lines()
            await serving_.handles[0].refresh()  # and a refresh does not break it either
            result = await probe(HOST, serving_.port, servername="ro.crash.test")
            assert result.code == 0, result.lines()
        assert "stapling good" in out.getvalue()
        if cache.is_dir():
            assert not list(cache.glob("*.ocsp"))
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "staple" and r.levelno == logging.WARNING
    ]
    persisted = [line for line in lines if "could not persist the response" in line]
    assert len(persisted) == 2, lines  # the first fetch and the refresh
    assert all("serving from memory" in line and "ro.crash.test" in line for line in persisted)


async def test_corrupt_truncated_and_foreign_files_are_ignored_and_replaced(
    pki: TestPKI, responder: OcspResponder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="staple")
    cache = tmp_path / "cache"
    cache.mkdir()
    leaves = [pki.issue_leaf(f"p{i}.crash.test", ocsp_url=responder.url) for i in range(4)]
    other = pki.issue_leaf("other.crash.test", ocsp_url=responder.url)
    registry: Registry = {key_of(leaf): (leaf.cert, leaf.chain[1]) for leaf in leaves}
    good = responder.response_for(leaves[2])
    poison = {
        leaves[0]: b"\x00corrupt" * 10,
        leaves[1]: responder.response_for(other),  # valid, signed, about another certificate
        leaves[2]: good[: len(good) - 7],  # truncated
        leaves[3]: b"",  # empty
    }
    for leaf, content in poison.items():
        (cache / f"{key_of(leaf)}.ocsp").write_bytes(content)
    (cache / ".tmp-leftover.ocsp").write_bytes(good)  # a leftover of a killed write: not data
    (cache / "notes.txt").write_text("not ours")  # not a store file: left alone
    files = [write_files(tmp_path, leaf, f"p{i}") for i, leaf in enumerate(leaves)]
    config = ServeConfig(certs=files, host=HOST, port=0, cache_dir=cache, policy=QUICK)
    out = io.StringIO()
    async with serving(config, out) as serving_:
        for i in range(4):
            result = await probe(HOST, serving_.port, servername=f"p{i}.crash.test")
            assert result.code == 0, result.lines()
    assert out.getvalue().count("stapling good") == 4
    (cache / "notes.txt").unlink()
    data, leftovers = check_cache(cache, registry)  # every poisoned file now validates
    assert (data, leftovers) == (4, 1)
    rejected = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected:")]
    assert len(rejected) == 4
    for leaf in leaves:
        assert any(staple.ocsp.describe(leaf.cert) in line for line in rejected)
    assert any("not about this certificate" in line for line in rejected)


SHA1_OID = bytes.fromhex("06052b0e03021a")  # 1.3.14.3.2.26: the CertID hash


def with_unsupported_certid_hash(der: bytes) -> bytes:
    """A signed response whose CertID hash OID cryptography does not know (dsaWithSHA1)."""
    i = der.index(SHA1_OID)
    return der[: i + 6] + b"\x1b" + der[i + 7 :]


def with_bit_string_in_responder_name(der: bytes) -> bytes:
    """A response whose responder name has its O attribute tagged BIT STRING."""
    i = der.index(b"\x06\x03U\x04\n\x0c")  # 2.5.4.10 (O), UTF8String
    return der[: i + 5] + b"\x03" + der[i + 6 :]


@pytest.mark.parametrize(
    "poison",
    [
        pytest.param(with_unsupported_certid_hash, id="unsupported_certid_hash"),
        pytest.param(
            with_bit_string_in_responder_name,
            id="name_bit_string",
        ),
    ],
)
async def test_cache_file_cryptography_cannot_represent_is_rejected_not_fatal(
    pki: TestPKI, responder: OcspResponder, tmp_path: Path, poison: Callable[[bytes], bytes]
) -> None:
    """A cached response cryptography cannot fully parse (an unknown CertID hash once raised
    UnsupportedAlgorithm out of validate() and made open_server_ocsp_response - and staple
    serve - fail): rejected, then fetched."""
    leaf = pki.issue_leaf("oid.crash.test", ocsp_url=responder.url)
    store = staple.FileStore(tmp_path / "cache")
    store.directory.mkdir()
    path = store.path_for(key_of(leaf))
    path.write_bytes(poison(responder.response_for(leaf)))
    events: list[staple.Event] = []
    async with await staple.open_server_ocsp_response(
        leaf.chain, store=store, policy=QUICK, on_update=events.append
    ) as handle:
        ctx = handle.get_context()
        assert ctx is not None
        ctx.free()
    assert [e.kind for e in events][:2] == [staple.EventKind.REJECTED, staple.EventKind.FETCHED]


class SharedStore(staple.MemoryStore):
    """A store that tells watchers about every put, like Redis pub/sub for a fleet."""

    def __init__(self) -> None:
        super().__init__()
        self.watchers: dict[str, list[Callable[[], None]]] = {}

    async def put(self, key: str, der: bytes, *, expires: datetime) -> None:
        await super().put(key, der, expires=expires)
        for callback in list(self.watchers.get(key, [])):
            callback()

    def watch(self, key: str, callback: Callable[[], None]) -> Callable[[], None]:
        self.watchers.setdefault(key, []).append(callback)
        return lambda: self.watchers[key].remove(callback)


async def test_poisoned_shared_store_entry_does_not_kill_the_refresher(
    pki: TestPKI, responder: OcspResponder
) -> None:
    """One poisoned entry in a shared store once killed the refresher of every fleet member
    it notified (an exception out of an unguarded _load_from_store)."""
    clock = FakeClock()
    leaf = pki.issue_leaf("fleet.crash.test", ocsp_url=responder.url)
    store = SharedStore()
    rejected = asyncio.Event()

    def on_update(event: staple.Event) -> None:
        if event.kind is staple.EventKind.REJECTED:
            rejected.set()

    async with await staple.open_server_ocsp_response(
        leaf.chain, store=store, policy=QUICK, clock=clock, on_update=on_update
    ) as handle:
        await settle(clock)
        poison = with_unsupported_certid_hash(responder.response_for(leaf))
        await store.put(handle.cert_id.key, poison, expires=datetime.now(UTC))  # "a peer"
        async with asyncio.timeout(10):
            await rejected.wait()  # the refresher woke for the notice and refused the entry
            await clock.wait_for_sleepers(1)  # ... and went back to sleep, alive
        assert handle._task is not None and not handle._task.done()
        ctx = handle.get_context()
        assert ctx is not None
        ctx.free()


# -- the wall clock jumping ------------------------------------------------------------------

POLICY = RefreshPolicy(jitter=0.0, wait_timeout=5.0, fetch_timeout=5.0)
BIG_SKEW = timedelta(days=365)  # validate expiry and signature, not thisUpdate's future


async def settle(clock: FakeClock) -> None:
    async with asyncio.timeout(10):
        await clock.wait_for_sleepers(1)


def assert_not_expired(ctx: staple.OcspResponseContext, leaf: Leaf, now: datetime) -> None:
    assert now.timestamp() < ctx._stop_at
    assert now < ctx.expires - POLICY.margin
    staple.ocsp.validate(
        ctx.encoded, leaf.cert, leaf.chain[1], now=now, margin=POLICY.margin, skew=BIG_SKEW
    )


# (server clock − true time) in hours, held for three 10-minute steps each
JUMPS = [0, 0.5, -2, 6, -1, 13, 0, -3, 20, 2, -12, 0, 30, 0]


async def test_wall_clock_jumps_never_serve_an_expired_staple(
    pki: TestPKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's wall clock jumps around true time (the responder keeps true time): at
    every step, whatever is stapled is valid by the server's own clock; nothing crashes."""
    true = FakeClock()
    server = FakeClock(true.time())
    events: list[staple.Event] = []
    async with OcspResponder(pki, clock=true) as responder:
        leaf = pki.issue_leaf("jump.crash.test", ocsp_url=responder.url)
        store = staple.FileStore(tmp_path / "cache")
        async with await staple.open_server_ocsp_response(
            leaf.chain, clock=server, policy=POLICY, store=store, on_update=events.append
        ) as handle:
            stapled = unstapled = 0
            for offset in JUMPS:
                for _ in range(3):
                    await settle(server)
                    true.advance(600)
                    server.set(true.time() + offset * HOUR)
                    await settle(server)
                    ctx = handle.get_context()
                    if ctx is None:
                        unstapled += 1
                        continue
                    stapled += 1
                    with ctx:
                        assert_not_expired(ctx, leaf, server.now())
                        if offset >= 0:  # a server clock ahead: truly valid as well
                            assert_not_expired(ctx, leaf, true.now())
            assert handle._task is not None and not handle._task.done()
            assert stapled > len(JUMPS) and unstapled > 0  # both happened
            # Every response the store holds is one that validated when it was written.
            registry = {key_of(leaf): (leaf.cert, leaf.chain[1])}
            data, _ = check_cache(tmp_path / "cache", registry, now=true.now())
            assert data == 1
    assert "unexpected error" not in caplog.text
    assert all(e.kind is not staple.EventKind.REJECTED for e in events)


async def test_stapling_resumes_soon_after_the_clock_comes_back(pki: TestPKI) -> None:
    """The server clock jumps 2 days ahead (the held response expires and every fetched one
    looks expired), then NTP puts it right: stapling must resume within a backoff step. (It
    once slept until the deadline computed under the wrong clock: ~2 days unstapled.)"""
    true = FakeClock()
    server = FakeClock(true.time())
    async with OcspResponder(pki, clock=true) as responder:
        leaf = pki.issue_leaf("back.crash.test", ocsp_url=responder.url)
        async with await staple.open_server_ocsp_response(
            leaf.chain, clock=server, policy=POLICY
        ) as handle:
            await settle(server)
            server.set(true.time() + 48 * HOUR)
            await settle(server)
            assert handle.get_context() is None
            server.set(true.time())  # corrected
            recovered_after = None
            for minutes in range(10, 4 * 60, 10):
                await settle(server)
                true.advance(600)
                server.set(true.time())
                await settle(server)
                ctx = handle.get_context()
                if ctx is not None:
                    ctx.free()
                    recovered_after = minutes
                    break
            limit = (POLICY.backoff_max + timedelta(minutes=10)).total_seconds() / 60
            assert recovered_after is not None and recovered_after <= limit


@pytest.mark.parametrize("jump_hours", [-6.0, 6.0])
async def test_a_clock_jump_does_not_crash_a_refresh_in_flight(
    pki: TestPKI, jump_hours: float
) -> None:
    """The clock jumps while a fetch is in flight: the attempt completes and validates against
    the time after the jump; the handle keeps running."""
    true = FakeClock()
    server = FakeClock(true.time())
    async with OcspResponder(pki, clock=true, slow_seconds=0.2) as responder:
        leaf = pki.issue_leaf("flight.crash.test", ocsp_url=responder.url)
        policy = replace(POLICY, fetch_timeout=5.0)
        async with await staple.open_server_ocsp_response(
            leaf.chain, clock=server, policy=policy
        ) as handle:
            held = handle.response
            assert held is not None
            await settle(server)
            true.advance(HOUR)
            server.set(true.time())
            responder.fault = Fault.SLOW
            refreshing = asyncio.create_task(handle.refresh())
            await responder.wait_for_requests(2)
            server.set(true.time() + jump_hours * HOUR)
            with contextlib.suppress(staple.OcspError):
                await refreshing
            ctx = handle.get_context()
            assert ctx is not None
            with ctx:
                assert_not_expired(ctx, leaf, server.now())
            assert handle._task is not None and not handle._task.done()
