"""The one guard for every connection a manifest makes the worker open: webhooks, model URLs
and input URLs.

A manifest is written by whoever can put an object in the bucket, so a URL in it is untrusted:
it could name the cloud metadata service (169.254.169.254), a database on the worker's network,
or a host that answers with a redirect to either. Every such fetch passes the same rules:

- **scheme**: ``https`` only, unless the operator opts in to ``http``;
- **address**: loopback and private ranges are refused unless the operator opts in (a model
  server on the same network is a real case); link-local (where metadata services answer),
  unspecified, multicast and reserved addresses are refused always. Addresses are checked on
  what the host *resolves to*, by the resolver aiohttp connects through (:class:`GuardedResolver`),
  so a name that resolves to a public address for a first check and to 169.254.169.254 a second
  later (DNS rebinding) never reaches the metadata service;
- **redirects** are followed by hand (:meth:`Fetcher.open`), each new URL passing the same
  rules as the first (an https URL may not redirect to http unless http is allowed), a
  credential header never following a redirect to another host, and at most
  :data:`MAX_REDIRECTS` of them;
- **host allowlist** (optional): only these hosts may be named by a manifest;
- **timeouts and size caps**: a connection that stalls for ``timeout`` seconds fails, and a
  body larger than the caller's cap is refused from its Content-Length or cut off as it grows.

:class:`FetchPolicy` holds the rules; :class:`Fetcher` is an HTTP client that cannot break
them. Webhooks (:mod:`processor.ops.webhooks`) use the address rules and the resolver from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from processor.aio import ClosedOnExit
from processor.errors import Comfys3Error, FetchError, FetchRefused, SettingsError
from processor.settings import FetchSettings, WorkerSettings

MAX_URL_LENGTH = 2048
MAX_REDIRECTS = 5
CHUNK = 1024 * 1024
MAX_NOTE = 200

# ---------------------------------------------------------------------------------------------
# Addresses


class AddressRefused(Comfys3Error, OSError):
    """An address the policy forbids; an OSError so aiohttp passes it through its resolver."""


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# 100.64/10 (carrier-grade NAT) is neither "private" nor "global" to Python; treat it as private.
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def address_refusal(address: str, *, allow_private: bool, hint: str = "") -> str | None:
    """Why the worker must not connect to ``address`` (an IP literal), or None.

    Loopback and private ranges are refused unless ``allow_private``. Link-local (169.254/16,
    fe80::/10, where cloud metadata services answer), unspecified, multicast and reserved
    addresses are refused always: nothing a manifest should reach lives there, and opening
    private ranges for an internal server must not open the metadata service with them.
    ``hint`` names the opt-in in the message (" (set X=true to allow ...)").
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = address_refusal(str(inner), allow_private=allow_private, hint=hint)
            return f"{address} stands for {inner}: {reason}" if reason else None
    if ip.is_unspecified:
        return f"{address} is the unspecified address"
    if ip.is_link_local:
        return f"{address} is link-local (where cloud metadata services answer); never allowed"
    if ip.is_multicast:
        return f"{address} is a multicast address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return f"{address} is a (deprecated) site-local address"
    if ip.is_loopback:  # before "reserved": ::1 lies in the reserved ::/8
        return None if allow_private else f"{address} is a loopback address{hint}"
    if ip.is_reserved:
        return f"{address} is in a reserved range"
    if allow_private:
        return None
    if ip.is_private or (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED):
        return f"{address} is a private address{hint}"
    if not ip.is_global:
        return f"{address} is not a public address{hint}"
    return None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Hosts

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def _normal_host(host: str) -> str:
    """A host as compared: lower case, IDNA (punycode), no trailing dot."""
    raw = URL.build(scheme="https", host=host.strip()).raw_host or ""
    return raw.lower().rstrip(".")


def host_problem(host: str) -> str | None:
    """Why ``host`` (lower case, no trailing dot) is not a usable host name, or None."""
    if is_ip_literal(host):
        return None
    if len(host) > 253 or not _HOSTNAME.match(host):
        return f"{host!r} is not a valid host name"
    last = host.rsplit(".", 1)[-1]
    if last.isdigit() or re.fullmatch(r"0x[0-9a-f]*", last):
        # 2130706433, 127.1, 0x7f.1: numeric forms that resolvers map onto an address.
        return f"{host!r} looks like a numeric address but is not a canonical IP address"
    return None


def parse_allowlist(text: str) -> tuple[str, ...]:
    """``hooks.example.com, *.acme.io`` -> normalised patterns; ValueError names a bad one.

    ``name`` matches that host only; ``*.domain`` matches any host under domain (not domain
    itself); ``*`` alone matches every host (addresses are still checked when connecting).
    """
    patterns: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item == "*":
            patterns.append(item)
            continue
        wildcard = item.startswith("*.")
        name = item[2:] if wildcard else item
        try:
            normal = _normal_host(name)
        except (ValueError, UnicodeError):
            normal = ""
        if not normal or "*" in normal or host_problem(normal) is not None:
            raise ValueError(
                f"{item!r} is not a host pattern; use a host name (hooks.example.com) "
                "or *. and a domain (*.acme.io)"
            )
        patterns.append(f"*.{normal}" if wildcard else normal)
    return tuple(patterns)


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# The URL rules


@dataclass(frozen=True)
class UrlRules:
    """What any URL the worker opens must look like, before DNS: scheme, host, no credentials,
    a literal address that the address rules allow. ``http_opt_in`` and ``private_opt_in``
    name the settings that relax them, for the messages."""

    allow_http: bool = False
    allow_private: bool = False
    http_opt_in: str = "COMFYS3_FETCH_ALLOW_HTTP=true"
    private_opt_in: str = "COMFYS3_FETCH_ALLOW_PRIVATE=true"

    @property
    def private_hint(self) -> str:
        return f" (set {self.private_opt_in} to allow loopback and private addresses)"

    def problem(self, url: object) -> str | None:
        """Why ``url`` breaks the shape rules (scheme, host, credentials, port), or None. A
        literal address is checked separately (:meth:`address_problem`), after any host
        allowlist, so a host that is not allowed is told so first."""
        if not isinstance(url, str):
            return f"must be a URL string, not {type(url).__name__}"
        if len(url) > MAX_URL_LENGTH:
            return f"is {len(url)} characters; the limit is {MAX_URL_LENGTH}"
        if any(ord(c) < 0x21 or c == "\x7f" for c in url):
            return "contains spaces or control characters"
        parsed = URL(url)
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parsed.scheme not in schemes:
            if parsed.scheme == "http":
                return f"must use https (http is refused unless {self.http_opt_in})"
            return "must be an https:// URL" + (" or http:// URL" if self.allow_http else "")
        if parsed.raw_host is None or not parsed.raw_host.strip("."):
            return "has no host"
        if parsed.raw_user is not None or parsed.raw_password is not None:
            return "must not carry a user name or password"
        if not parsed.port:
            return "has no valid port"
        return host_problem(self.host(url))

    def address_problem(self, host: str) -> str | None:
        """Why a host that is an IP literal may not be reached (None for a name: its
        addresses are checked when it resolves)."""
        if not is_ip_literal(host):
            return None
        return address_refusal(host, allow_private=self.allow_private, hint=self.private_hint)

    @staticmethod
    def host(url: str) -> str:
        return (URL(url).raw_host or "").lower().rstrip(".")


@dataclass(frozen=True)
class FetchPolicy:
    """Where model and input URLs may point, and how long a fetch may stall.

    ``allow_hosts`` empty means any public host; otherwise only hosts matching a pattern
    (``huggingface.co``, ``*.hf.co``). A redirect's target must match too: an allowlist that a
    redirect could leave would allow nothing.
    """

    rules: UrlRules = UrlRules()
    allow_hosts: tuple[str, ...] = ()
    timeout: float = 30.0

    @property
    def allow_private(self) -> bool:
        return self.rules.allow_private

    def refusal(self, url: object) -> str | None:
        """Why ``url`` may not be fetched, for a person, or None. No DNS: it runs when a
        manifest is checked. Never raises, whatever ``url`` is."""
        try:
            problem = self.rules.problem(url)
            if problem is not None:
                return problem
            assert isinstance(url, str)
            host = UrlRules.host(url)
            if self.allow_hosts and not host_allowed(host, self.allow_hosts):
                return (
                    f"host {host!r} is not allowed (COMFYS3_FETCH_ALLOW_HOSTS: "
                    f"{', '.join(self.allow_hosts)})"
                )
            return self.rules.address_problem(host)
        except Exception as error:  # a parser surprise is a refusal, never a crash
            return f"not a usable URL ({type(error).__name__})"


def fetch_policy(settings: WorkerSettings | FetchSettings) -> FetchPolicy:
    """The policy from COMFYS3_FETCH_*; SettingsError names a bad allowlist entry."""
    fetch = settings.fetch if isinstance(settings, WorkerSettings) else settings
    try:
        hosts = parse_allowlist(fetch.allow_hosts)
    except ValueError as error:
        raise SettingsError(f"COMFYS3_FETCH_ALLOW_HOSTS: {error}") from None
    return FetchPolicy(
        rules=UrlRules(allow_http=fetch.allow_http, allow_private=fetch.allow_private),
        allow_hosts=hosts,
        timeout=fetch.timeout,
    )


def display_url(url: str) -> str:
    """A URL fit for a log line or a status: scheme, host and path; no credentials and no
    query (signed URLs and tokens live there)."""
    try:
        parsed = URL(url)
        if parsed.raw_host is None:
            return "(invalid URL)"
        return str(parsed.origin()) + (parsed.raw_path if parsed.raw_path not in ("", "/") else "")
    except (ValueError, TypeError):
        return "(invalid URL)"


# ---------------------------------------------------------------------------------------------
# Resolving, with every address checked

Lookup = Callable[[str, int], Awaitable[list[str]]]


async def system_lookup(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver (getaddrinfo)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver for outside fetches: a name resolves only if every address it has is
    allowed, and aiohttp connects to exactly the addresses checked here (no second lookup)."""

    def __init__(
        self, *, allow_private: bool, lookup: Lookup | None = None, hint: str = ""
    ) -> None:
        self.allow_private = allow_private
        self.lookup = lookup or system_lookup
        self.hint = hint

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await self.lookup(host, port)
        except OSError:
            raise
        except Exception as error:  # a resolver's odd failure is a failed lookup
            raise OSError(f"lookup of {host} failed: {error}") from None
        if not addresses:
            raise OSError(f"{host} has no address")
        for address in addresses:
            reason = address_refusal(address, allow_private=self.allow_private, hint=self.hint)
            if reason:
                raise AddressRefused(f"{host} resolves to a forbidden address: {reason}")
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        return None


def guarded_session(
    *,
    allow_private: bool,
    lookup: Lookup | None = None,
    limit: int = 8,
    hint: str = "",
    timeout: aiohttp.ClientTimeout | None = None,
) -> aiohttp.ClientSession:
    """An HTTP session that can only reach addresses the address rules allow.

    No proxies from the environment (a proxy would connect on our behalf, past every check),
    no cookies, no DNS cache outside the resolver's checks, no automatic decompression (a size
    cap counts the bytes that arrive).
    """
    resolver = GuardedResolver(allow_private=allow_private, lookup=lookup, hint=hint)
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=limit)
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        timeout=timeout or aiohttp.ClientTimeout(total=None),
    )


def unwrap_refusal(error: BaseException) -> AddressRefused | None:
    """The AddressRefused at the root of an aiohttp connection error, if that is what it was."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, AddressRefused):
            return current
        os_error = getattr(current, "os_error", None)
        if isinstance(os_error, AddressRefused):
            return os_error
        current = current.__cause__ or current.__context__
    return None


def clean_note(text: str) -> str:
    """A server's words (reason phrase, Location), printable and short, for a message."""
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text[:MAX_NOTE] + ("..." if len(text) > MAX_NOTE else "")


def connection_note(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return f"could not resolve {error.host}: {clean_note(str(error.os_error))}"
    if isinstance(error, aiohttp.ClientConnectorError):
        reason = error.strerror or str(error.os_error)
        return f"could not connect to {error.host}:{error.port}: {clean_note(reason)}"
    return f"connection failed: {clean_note(str(error) or type(error).__name__)}"


# ---------------------------------------------------------------------------------------------
# Fetching

_REDIRECTS = (301, 302, 303, 307, 308)
_RETRYABLE_STATUS = (408, 425, 429)
_CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization")

Progress = Callable[[int, int | None], None]  # (bytes so far, total if known)


@dataclass(frozen=True)
class Answer:
    """A response whose body is about to be read: where it came from after redirects, its
    declared length, and its headers."""

    url: str
    length: int | None
    headers: Mapping[str, str]


class Fetcher(ClosedOnExit):
    """An HTTP client for untrusted URLs that cannot break its :class:`FetchPolicy`.

    ``async with Fetcher(policy) as fetcher`` opens it (the session is made lazily, on the
    first fetch, inside the running loop). :meth:`read` returns a small body; :meth:`stream`
    yields a large one chunk by chunk, for a file. Failures raise :class:`FetchRefused` (the
    policy refused the URL or an address, or the answer can never be used: 404, too large, a
    redirect loop) or :class:`FetchError` (a failure that may pass: a refused connection, a
    timeout, HTTP 5xx or 429).
    """

    def __init__(self, policy: FetchPolicy, *, lookup: Lookup | None = None) -> None:
        self.policy = policy
        self.lookup = lookup
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        return self

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = guarded_session(
                allow_private=self.policy.allow_private,
                lookup=self.lookup,
                hint=self.policy.rules.private_hint,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self.policy.timeout,
                    sock_read=self.policy.timeout,
                ),
            )
        return self._session

    async def read(
        self, url: str, *, max_bytes: int, headers: Mapping[str, str] | None = None
    ) -> bytes:
        """The whole body of ``url``, at most ``max_bytes``."""
        parts: list[bytes] = []
        async with self.open(url, max_bytes=max_bytes, headers=headers) as (_, chunks):
            async for chunk in chunks:
                parts.append(chunk)
        return b"".join(parts)

    @contextlib.asynccontextmanager
    async def open(
        self,
        url: str,
        *,
        max_bytes: int,
        headers: Mapping[str, str] | None = None,
        progress: Progress | None = None,
    ) -> AsyncIterator[tuple[Answer, AsyncIterator[bytes]]]:
        """``async with fetcher.open(url, max_bytes=n) as (answer, chunks)``: follow redirects
        under the policy, then stream the body; more than ``max_bytes`` fails, whatever the
        server declared."""
        shown = display_url(url)
        try:
            response, final = await self._follow(url, dict(headers or {}))
        except (FetchError, asyncio.CancelledError):
            raise
        except TimeoutError:
            raise FetchError(f"{shown}: no answer within {self.policy.timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as error:
            refused = unwrap_refusal(error)
            if refused is not None:
                raise FetchRefused(f"{shown}: refused: {refused}") from None
            raise FetchError(f"{shown}: {connection_note(error)}") from None
        async with response:
            length = response.content_length
            if length is not None and length > max_bytes:
                raise FetchRefused(
                    f"{shown} is {length:,} bytes; the limit is {max_bytes:,}",
                    {"bytes": length, "limit": max_bytes},
                )
            answer = Answer(final, length, response.headers)
            yield answer, self._body(response, shown, max_bytes, length, progress)

    async def _body(
        self,
        response: aiohttp.ClientResponse,
        shown: str,
        max_bytes: int,
        length: int | None,
        progress: Progress | None,
    ) -> AsyncIterator[bytes]:
        received = 0
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise FetchRefused(
                        f"{shown} is larger than the limit of {max_bytes:,} bytes",
                        {"limit": max_bytes},
                    )
                if progress is not None:
                    progress(received, length)
                yield chunk
        except (FetchError, asyncio.CancelledError):
            raise
        except TimeoutError:
            raise FetchError(
                f"{shown}: the download stalled for {self.policy.timeout:g} s after "
                f"{received:,} bytes"
            ) from None
        except (aiohttp.ClientError, OSError) as error:
            raise FetchError(
                f"{shown}: the connection broke after {received:,} bytes: "
                f"{clean_note(str(error) or type(error).__name__)}"
            ) from None
        if length is not None and received != length:
            raise FetchError(f"{shown}: the server sent {received:,} of {length:,} bytes")

    async def _follow(
        self, url: str, headers: dict[str, str]
    ) -> tuple[aiohttp.ClientResponse, str]:
        """GET ``url``, following redirects by hand so each hop passes the policy; returns the
        final 2xx response (open: the caller reads and closes it) and its URL."""
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            refusal = self.policy.refusal(current)
            if refusal is not None:
                where = "" if current == url else f" (redirected to {display_url(current)})"
                raise FetchRefused(f"{display_url(url)}{where}: {refusal}")
            response = await self._http().get(
                current, headers=headers, allow_redirects=False, raise_for_status=False
            )
            status = response.status
            if 200 <= status < 300:
                return response, current
            reason = clean_note(response.reason or "")
            location = response.headers.get("location", "")
            response.release()
            answer = f"HTTP {status}{' ' + reason if reason else ''}"
            shown = display_url(current)
            if status in _REDIRECTS and location:
                target = str(URL(current).join(URL(location)))
                if UrlRules.host(target) != UrlRules.host(current):
                    # A signed CDN URL carries its own credentials; ours stay with the host
                    # they were meant for.
                    headers = {
                        k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS
                    }
                current = target
                continue
            if status in _RETRYABLE_STATUS or status >= 500:
                raise FetchError(f"{shown}: {answer}", {"status": status})
            raise FetchRefused(f"{shown}: {answer}", {"status": status})
        raise FetchRefused(f"{display_url(url)}: more than {MAX_REDIRECTS} redirects")


def refusal_status(error: Comfys3Error) -> Any:
    """The HTTP status an error carries (``details["status"]``), if any: 404 means missing."""
    return error.details.get("status")
