"""What the benchmark ran on: CPU, Python, both OpenSSLs, the packages that matter."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import ssl
import subprocess
import sys
from importlib import metadata
from typing import Any

from OpenSSL import SSL


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def nginx_binary() -> str | None:
    """Debian installs nginx in /usr/sbin, which is not on every PATH."""
    found = shutil.which("nginx")
    if found is None and os.path.exists("/usr/sbin/nginx"):
        found = "/usr/sbin/nginx"
    return found


def nginx_version() -> str | None:
    nginx = nginx_binary()
    if nginx is None:
        return None
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ") or None


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "openssl_pyopenssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "openssl_stdlib": ssl.OPENSSL_VERSION,
        "pyopenssl": _version("pyOpenSSL"),
        "cryptography": _version("cryptography"),
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "nginx": nginx_version(),
    }


def command() -> str:
    return shlex.join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]])
