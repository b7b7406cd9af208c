"""The network shell: ask a responder over HTTP (aiohttp), return bytes and caching headers.

It decides nothing about the response's validity - that is :func:`staple.ocsp.validate`'s job
- but it is strict about HTTP, because a responder that answers with an HTML error page, an
endless body or a redirect to ``file:`` is failing, and the error should say so plainly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7

from .chain import ca_issuers_urls
from .errors import ChainError, FetchError
from .ocsp import get_url
from .proxy import Proxy, ProxySettings

__all__ = ["Fetched", "fetch_issuer", "fetch_issuer_of", "fetch_response"]

OCSP_REQUEST_TYPE = "application/ocsp-request"
OCSP_RESPONSE_TYPE = "application/ocsp-response"
_CACHE_HEADERS = ("Cache-Control", "Expires", "Date", "Age", "Last-Modified", "ETag")
_MAX_REDIRECTS = 3
_CHUNK = 16 * 1024


@dataclass(frozen=True, slots=True)
class Fetched:
    """What a responder returned: the body and the headers that say how long it is fresh."""

    der: bytes
    url: str
    method: str
    headers: Mapping[str, str]


def _timeout(total: float, connect: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total, sock_connect=connect, connect=connect)


async def _read_capped(resp: aiohttp.ClientResponse, max_size: int, what: str) -> bytes:
    """Read at most ``max_size`` bytes of (decoded) body; more is an error, found early.

    The body is read in chunks, so a small gzip bomb is refused after ``max_size`` inflated
    bytes rather than after inflating all of it.
    """
    length = resp.content_length
    if length is not None and length > max_size:
        raise FetchError(f"{what}: body of {length} bytes exceeds the {max_size}-byte cap")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > max_size:
            raise FetchError(f"{what}: body exceeds the {max_size}-byte cap")
    return bytes(body)


# A responder that can't handle the GET form answers one of these; retry the same URL by POST
# (openssl ocsp, for one, only decodes GET requests at its root path).
_GET_REFUSED = frozenset({400, 404, 405, 414, 501})


class _Options(TypedDict):
    url: str
    timeout: float
    connect_timeout: float
    max_size: int
    proxy: Proxy | None


class _HttpStatus(FetchError):
    def __init__(self, reason: str, status: int) -> None:
        self.status = status
        super().__init__(reason)


async def fetch_response(
    session: aiohttp.ClientSession,
    url: str,
    request_der: bytes,
    *,
    timeout: float,
    connect_timeout: float,
    max_size: int,
    subject: str | None = None,
    proxy: Proxy | None = None,
) -> Fetched:
    """One attempt against one responder URL: GET when the request is small (RFC 5019:
    cacheable), POST otherwise or when the responder refuses the GET form. Raises
    :class:`FetchError` for anything but a 200 with an ``application/ocsp-response`` body
    within ``max_size``; ``timeout`` bounds the whole attempt. Through ``proxy`` when given:
    its errors name the proxy (never its credentials)."""
    get = get_url(url, request_der)
    via = f" via proxy {proxy.name}" if proxy is not None else ""
    what = f"{'GET' if get is not None else 'POST'} {url}{via}"
    options = _Options(
        url=url, timeout=timeout, connect_timeout=connect_timeout, max_size=max_size, proxy=proxy
    )
    try:
        async with asyncio.timeout(timeout):
            if get is not None:
                try:
                    return await _exchange(session, "GET", get, None, what, **options)
                except _HttpStatus as exc:
                    if exc.status not in _GET_REFUSED:
                        raise
                    what = f"POST {url}{via} (after GET: HTTP {exc.status})"
            return await _exchange(session, "POST", url, request_der, what, **options)
    except FetchError as exc:
        raise FetchError(exc.reason, subject=subject) from None
    except TimeoutError:
        raise FetchError(f"{what}: timed out after {timeout:g} s", subject=subject) from None
    except aiohttp.TooManyRedirects:
        raise FetchError(f"{what}: too many redirects", subject=subject) from None
    except (aiohttp.NonHttpUrlRedirectClientError, aiohttp.InvalidUrlRedirectClientError) as e:
        raise FetchError(
            f"{what}: refused redirect to a non-HTTP or invalid URL {str(e)!r}", subject=subject
        ) from None
    except aiohttp.ClientProxyConnectionError as exc:
        raise FetchError(
            f"{what}: cannot connect to the proxy ({_scrub(exc, proxy)})", subject=subject
        ) from None
    except aiohttp.ClientHttpProxyError as exc:
        raise FetchError(
            f"{what}: the proxy refused (HTTP {exc.status} {exc.message})", subject=subject
        ) from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise FetchError(f"{what}: {_scrub(exc, proxy)}", subject=subject) from None


def _scrub(exc: BaseException, proxy: Proxy | None) -> str:
    """An exception's text without the proxy's credentials, should a library quote them."""
    detail = str(exc) or type(exc).__name__
    if proxy is not None:
        for secret in (proxy.url.password, proxy.url.raw_password):
            if secret:
                detail = detail.replace(secret, "***")
    return detail


async def _exchange(
    session: aiohttp.ClientSession,
    method: str,
    target: str,
    body: bytes | None,
    what: str,
    *,
    url: str,
    timeout: float,
    connect_timeout: float,
    max_size: int,
    proxy: Proxy | None,
) -> Fetched:
    headers = {"Accept": OCSP_RESPONSE_TYPE, "Accept-Encoding": "identity"}
    if body is not None:
        headers["Content-Type"] = OCSP_REQUEST_TYPE
    async with session.request(
        method,
        target,
        data=body,
        headers=headers,
        timeout=_timeout(timeout, connect_timeout),
        max_redirects=_MAX_REDIRECTS,
        proxy=proxy.url if proxy is not None else None,
    ) as resp:
        if resp.status != 200:
            raise _HttpStatus(
                f"{what}: HTTP {resp.status} {resp.reason or ''}".rstrip(), resp.status
            )
        ctype = resp.content_type
        if ctype != OCSP_RESPONSE_TYPE:
            raise FetchError(f"{what}: content type {ctype!r}, expected {OCSP_RESPONSE_TYPE!r}")
        der = await _read_capped(resp, max_size, what)
        cache = {h: resp.headers[h] for h in _CACHE_HEADERS if h in resp.headers}
    if not der:
        raise FetchError(f"{what}: empty body")
    return Fetched(der=der, url=url, method=method, headers=cache)


async def fetch_issuer_of(
    session: aiohttp.ClientSession,
    leaf: x509.Certificate,
    *,
    timeout: float = 15.0,
    max_size: int = 64 * 1024,
    subject: str | None = None,
    proxies: ProxySettings | None = None,
) -> x509.Certificate:
    """The issuer of ``leaf``, from the first of its AIA caIssuers URLs that serves one.
    Raises :class:`ChainError` naming each URL's failure (or that there is none)."""
    urls = ca_issuers_urls(leaf)
    if not urls:
        raise ChainError(
            "the chain holds only the leaf and it names no caIssuers URL: pass [leaf, issuer]",
            subject=subject,
        )
    errors = []
    for url in urls:
        proxy = proxies.for_url(url) if proxies is not None else None
        try:
            return await fetch_issuer(
                session, url, timeout=timeout, max_size=max_size, subject=subject, proxy=proxy
            )
        except ChainError as exc:
            errors.append(exc.reason)
    raise ChainError("could not fetch the issuer: " + "; ".join(errors), subject=subject)


async def fetch_issuer(
    session: aiohttp.ClientSession,
    url: str,
    *,
    timeout: float = 15.0,
    max_size: int = 64 * 1024,
    subject: str | None = None,
    proxy: Proxy | None = None,
) -> x509.Certificate:
    """Download the issuer named by a certificate's AIA caIssuers URL (DER, PEM or PKCS#7)."""
    if not url.lower().startswith(("http://", "https://")):
        raise ChainError(f"caIssuers URL {url!r} is not HTTP", subject=subject)
    what = f"GET {url}" + (f" via proxy {proxy.name}" if proxy is not None else "")
    try:
        async with session.get(
            url,
            timeout=_timeout(timeout, timeout),
            proxy=proxy.url if proxy is not None else None,
        ) as resp:
            if resp.status != 200:
                raise ChainError(f"{what}: HTTP {resp.status}", subject=subject)
            body = await _read_capped(resp, max_size, what)
    except FetchError as exc:
        raise ChainError(exc.reason, subject=subject) from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        detail = _scrub(exc, proxy) if str(exc) else type(exc).__name__
        raise ChainError(f"{what}: {detail}", subject=subject) from None
    for load in (_load_der, _load_pem, _load_p7):
        cert = load(body)
        if cert is not None:
            return cert
    raise ChainError(f"{what}: not a certificate (DER, PEM or PKCS#7)", subject=subject)


def _load_der(data: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        return None


def _load_pem(data: bytes) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        return None


def _load_p7(data: bytes) -> x509.Certificate | None:
    for loader in (pkcs7.load_der_pkcs7_certificates, pkcs7.load_pem_pkcs7_certificates):
        try:
            certs = loader(data)
        except ValueError:
            continue
        if certs:
            return certs[0]
    return None
