"""Which HTTP proxy a responder request goes through: a pure function of the URL and settings.

Many servers reach the internet only through a forward proxy. staple reads the same
environment variables as curl and Python's ``urllib``, unless told otherwise:

- ``http_proxy`` for ``http://`` responders (and ``HTTP_PROXY``, except when ``REQUEST_METHOD``
  is set: in a CGI environment that variable comes from the client's ``Proxy:`` header,
  the "httpoxy" hole), ``https_proxy``/``HTTPS_PROXY`` for ``https://`` ones, and
  ``all_proxy``/``ALL_PROXY`` for either when the specific one is unset; lower case wins;
- ``no_proxy``/``NO_PROXY``: comma-separated host names, domains (``example.com`` and
  ``.example.com`` both cover ``example.com`` and its subdomains), IP addresses or CIDR
  networks that are reached directly; ``*`` turns the proxy off for all. Ports are ignored.

A proxy URL may carry credentials (``http://user:secret@proxy:3128``): they go to the proxy
and nowhere else. :attr:`Proxy.name` (what errors, logs and events show) never includes them.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from yarl import URL

__all__ = ["Proxy", "ProxyOption", "ProxySettings"]

ProxyOption = str | Literal[False] | None
"""What ``proxy=`` accepts: a proxy URL for every request, ``False`` for none, or ``None`` to
follow the environment (the default)."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """One proxy: the URL to connect through (with credentials) and its printable name."""

    url: URL = field(repr=False)

    @property
    def name(self) -> str:
        """The proxy without credentials: what errors and logs may show."""
        return str(self.url.with_user(None).with_password(None))

    def __str__(self) -> str:
        return self.name


def _parse(value: str, source: str) -> Proxy:
    text = value.strip()
    if "://" not in text:  # curl and urllib take "host:port" as an HTTP proxy
        text = "http://" + text
    url = URL(text)
    if url.scheme != "http" or not url.host:
        shown = str(url.with_user(None).with_password(None)) if url.host else "?"
        raise ValueError(
            f"{source}: proxy {shown!r} is not an http:// proxy URL "
            "(staple talks to HTTP forward proxies)"
        )
    return Proxy(url)


def _host_part(entry: str) -> str:
    """A no_proxy entry as a bare host, domain or network: no leading dot, no port."""
    entry = entry.strip().lower().lstrip(".")
    if entry.startswith("[") and "]" in entry:  # [::1]:8080
        return entry[1 : entry.index("]")]
    if entry.count(":") == 1:  # host:port; a bare IPv6 address has more colons
        entry = entry.split(":", 1)[0]
    return entry


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The proxies to use for ``http``/``https`` responders and the hosts to reach directly."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def resolve(
        cls, option: ProxyOption = None, *, environ: Mapping[str, str] | None = None
    ) -> ProxySettings:
        """Settings for ``proxy=option``: that proxy for every request, none (``False``), or
        the environment's (``None``; ``environ`` defaults to ``os.environ``).

        Raises ValueError for a proxy URL that is not ``http://host[:port]``.
        """
        if option is False:
            return cls()
        if isinstance(option, str):
            proxy = _parse(option, "proxy=")
            return cls(http=proxy, https=proxy)
        env = os.environ if environ is None else environ
        return cls.from_environment(env)

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> ProxySettings:
        def first(*names: str) -> tuple[str, str] | None:
            for name in names:
                value = env.get(name, "").strip()
                if value:
                    return name, value
            return None

        http_names = ["http_proxy"] if "REQUEST_METHOD" in env else ["http_proxy", "HTTP_PROXY"]
        all_names = ["all_proxy", "ALL_PROXY"]
        found = {
            "http": first(*http_names, *all_names),
            "https": first("https_proxy", "HTTPS_PROXY", *all_names),
        }
        proxies = {
            scheme: _parse(value, name) if hit else None
            for scheme, hit in found.items()
            for name, value in [hit or ("", "")]
        }
        skip = first("no_proxy", "NO_PROXY")
        entries = tuple(_host_part(e) for e in (skip[1] if skip else "").split(","))
        return cls(
            http=proxies["http"], https=proxies["https"], no_proxy=tuple(e for e in entries if e)
        )

    def for_url(self, url: str | URL) -> Proxy | None:
        """The proxy to reach ``url`` through, or ``None`` to connect directly."""
        target = URL(url) if isinstance(url, str) else url
        proxy = self.https if target.scheme == "https" else self.http
        if proxy is None or not target.host:
            return None
        return None if self._bypassed(target.host.lower().rstrip(".")) else proxy

    def _bypassed(self, host: str) -> bool:
        if not self.no_proxy:
            return False
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
                host.strip("[]")
            )
        except ValueError:
            address = None
        for entry in self.no_proxy:
            if entry == "*":
                return True
            if address is not None:
                try:
                    if address in ipaddress.ip_network(entry, strict=False):
                        return True
                except ValueError:
                    pass
                continue
            if host == entry or host.endswith("." + entry):
                return True
        return False
