"""What every section shares: the certificates, the alternation of variants, one handshake run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from . import _client, _pki
from ._stats import Row

T = TypeVar("T")

KEY_NAMES = {"ec": "ECDSA P-256", "rsa": "RSA-2048"}


@dataclass
class Bench:
    """Passed to every section: run length and a place for files."""

    quick: bool
    workdir: Path
    _materials: dict[str, _pki.Material] = field(default_factory=dict)

    def material(self, key_type: str) -> _pki.Material:
        if key_type not in self._materials:
            kt: Any = key_type
            self._materials[key_type] = _pki.make(kt, self.workdir / key_type)
        return self._materials[key_type]


@dataclass
class Section:
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Target(Protocol):
    """A server under test: where to connect and how much CPU it has used so far."""

    @property
    def port(self) -> int: ...

    def cpu(self) -> float: ...


@dataclass
class HandshakeRun:
    ok: int
    stapled: int
    errors: int
    elapsed: float
    cpu: float
    staple_len: int
    cipher: str

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    @property
    def cpu_us(self) -> float:
        """Server CPU per handshake (with its GET), µs."""
        return self.cpu / self.ok * 1e6 if self.ok else float("nan")

    @property
    def busy(self) -> float:
        """The server's CPU use over the run, in cores: ~1.0 means it was the bottleneck."""
        return self.cpu / self.elapsed if self.elapsed else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "handshakes": self.ok,
            "stapled": self.stapled,
            "errors": self.errors,
            "seconds": round(self.elapsed, 4),
            "server_cpu_s": round(self.cpu, 6),
            "per_s": round(self.rate, 1),
            "server_cpu_us_per_handshake": round(self.cpu_us, 1),
            "server_busy_cores": round(self.busy, 3),
            "staple_bytes": self.staple_len,
            "cipher": self.cipher,
        }


async def handshake_run(
    target: Target,
    *,
    seconds: float,
    procs: int,
    tls: str,
    path: str = "/",
    status: bool = True,
) -> HandshakeRun:
    cpu0 = target.cpu()
    result = await _client.handshakes(
        target.port, seconds=seconds, procs=procs, tls=tls, path=path, status=status
    )
    cpu = target.cpu() - cpu0
    return HandshakeRun(
        ok=result["ok"],
        stapled=result["stapled"],
        errors=result["errors"],
        elapsed=result["elapsed"],
        cpu=cpu,
        staple_len=result["staple_len"],
        cipher=result.get("cipher", ""),
    )


async def alternate(
    names: Sequence[str], run: Callable[[str], Awaitable[T]], rounds: int
) -> dict[str, list[T]]:
    """Run every variant once per round, A B C then C B A..., so drifts hit all alike."""
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else list(reversed(names)):
            results[name].append(await run(name))
    return results
