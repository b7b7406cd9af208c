"""External programs the interop tests drive (openssl, curl, gnutls-cli, redis-server, tinyproxy,
nginx, haproxy).

On a developer's machine a missing program skips the test with the reason; under ``CI=true``
it fails it, because CI installs them all (``make test`` runs ``.ci/sysdeps``) and a silently
skipped interop test would prove nothing.
"""

from __future__ import annotations

import os
import shutil

import pytest

# program -> Debian package, where they differ
_PACKAGES = {"gnutls-cli": "gnutls-bin", "nginx": "nginx-light"}


def require(program: str) -> str:
    """The path of ``program``; skips (fails under ``CI=true``) when it is not installed."""
    path = shutil.which(program)
    if path is None:
        reason = f"{program} is not installed (apt-get install {_PACKAGES.get(program, program)})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires the interop tests to run")
        pytest.skip(reason)
    return path
