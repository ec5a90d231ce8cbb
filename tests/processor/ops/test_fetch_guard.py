"""The one guard for every fetch from outside: its URL and address rules, redirects (each hop
checked, credentials kept to their host), size caps and timeouts, against a local server."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.errors import FetchError, FetchRefused, SettingsError
from processor.ops.fetch_guard import (
    Fetcher,
    FetchPolicy,
    UrlRules,
    address_refusal,
    fetch_policy,
)
from processor.ops.parts import webhook_policy
from processor.settings import WorkerSettings
from tests.file_server import FileServer, file_server, lookup_to_loopback

OPEN = UrlRules(allow_http=True, allow_private=True)


@pytest.fixture
def server() -> Iterator[FileServer]:
    with file_server() as running:
        yield running


def fetcher(policy: FetchPolicy, *names: str) -> Fetcher:
    return Fetcher(policy, lookup=lookup_to_loopback(*names))


# --- the URL rules, before any connection ------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "policy", "reason"),
    [
        ("http://example.com/m.safetensors", FetchPolicy(), "COMFYS3_FETCH_ALLOW_HTTP=true"),
        ("ftp://example.com/x", FetchPolicy(), "must be an https:// URL"),
        ("https://user:pw@example.com/x", FetchPolicy(), "user name or password"),
        ("https://127.0.0.1/x", FetchPolicy(), "COMFYS3_FETCH_ALLOW_PRIVATE=true"),
        ("https://10.0.0.7/x", FetchPolicy(), "private address"),
        ("https://169.254.169.254/latest", FetchPolicy(rules=OPEN), "link-local"),
        ("https://2130706433/x", FetchPolicy(), "numeric address"),
        ("https://evil.example/x", FetchPolicy(allow_hosts=("*.hf.co",)), "not allowed"),
        ("https://exa mple.com/x", FetchPolicy(), "spaces or control characters"),
    ],
)
def test_urls_the_policy_refuses_say_why(url: str, policy: FetchPolicy, reason: str) -> None:
    refusal = policy.refusal(url)
    assert refusal is not None and reason in refusal


def test_urls_the_policy_allows() -> None:
    assert FetchPolicy().refusal("https://huggingface.co/org/repo/resolve/main/x") is None
    assert FetchPolicy(allow_hosts=("*.hf.co",)).refusal("https://cdn.hf.co/x") is None
    assert FetchPolicy(rules=OPEN).refusal("http://127.0.0.1:8000/x") is None


def test_settings_build_the_policy_and_name_a_bad_allowlist() -> None:
    policy = fetch_policy(
        WorkerSettings(fetch_allow_http=True, fetch_allow_hosts="models.example, *.hf.co")
    )
    assert policy.rules.allow_http and not policy.rules.allow_private
    assert policy.allow_hosts == ("models.example", "*.hf.co")
    with pytest.raises(SettingsError, match="COMFYS3_FETCH_ALLOW_HOSTS"):
        fetch_policy(WorkerSettings(fetch_allow_hosts="http://x/"))


def test_webhooks_share_the_policy_and_keep_their_own_opt_ins() -> None:
    """COMFYS3_FETCH_ALLOW_* open webhooks too; COMFYS3_WEBHOOK_ALLOW_* still work alone; a
    manifest's notify.url must also pass COMFYS3_FETCH_ALLOW_HOSTS."""
    url = "http://127.0.0.1:9/hook"
    base = {"webhook_allow": "*"}
    closed = webhook_policy(WorkerSettings(**base))
    assert closed.refusal(url) is not None
    by_fetch = webhook_policy(
        WorkerSettings(**base, fetch_allow_http=True, fetch_allow_private=True)
    )
    assert by_fetch.refusal(url) is None
    by_alias = webhook_policy(
        WorkerSettings(**base, webhook_allow_http=True, webhook_allow_private=True)
    )
    assert by_alias.refusal(url) is None
    fenced = webhook_policy(WorkerSettings(**base, fetch_allow_hosts="hooks.example"))
    refusal = fenced.refusal("https://other.example/hook")
    assert refusal is not None and "COMFYS3_FETCH_ALLOW_HOSTS" in refusal
    assert fenced.refusal("https://hooks.example/hook") is None


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    address=st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        st.sampled_from(["169.254.169.254", "fe80::1", "::ffff:169.254.169.254", "10.0.0.1"]),
    ),
    allow_private=st.booleans(),
)
def test_address_rules_over_any_address(address: str, allow_private: bool) -> None:
    """Whatever the address: link-local, multicast and unspecified never pass; with private
    addresses off, only global ones pass; the URL rule (a literal) says the same as the
    resolver's rule (what a name resolved to)."""
    ip = ipaddress.ip_address(address)
    inner = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    reason = address_refusal(address, allow_private=allow_private)
    effective = inner or ip
    if effective.is_link_local or effective.is_multicast or effective.is_unspecified:
        assert reason is not None
    if reason is None and not allow_private:
        assert effective.is_global
    host = f"[{address}]" if ":" in address else address
    rules = UrlRules(allow_http=True, allow_private=allow_private)
    assert (FetchPolicy(rules=rules).refusal(f"http://{host}/x") is None) is (reason is None)


# --- fetching ----------------------------------------------------------------------------------


async def test_a_body_is_fetched_within_its_cap(server: FileServer) -> None:
    url = server.add("a.png", b"x" * 1000)
    async with fetcher(FetchPolicy(rules=OPEN)) as fetch:
        assert await fetch.read(url, max_bytes=1000) == b"x" * 1000
        with pytest.raises(FetchRefused, match="the limit is 999") as declared:
            await fetch.read(url, max_bytes=999)
        assert declared.value.details["limit"] == 999
        with pytest.raises(FetchRefused, match="larger than the limit"):
            await fetch.read(url + "?chunked=1", max_bytes=999)  # no length: cut as it grows


async def test_loopback_http_needs_both_opt_ins(server: FileServer) -> None:
    url = server.add("a.png", b"x")
    for rules, opt_in in [
        (UrlRules(allow_private=True), "COMFYS3_FETCH_ALLOW_HTTP"),
        (UrlRules(allow_http=True), "COMFYS3_FETCH_ALLOW_PRIVATE"),
    ]:
        async with Fetcher(FetchPolicy(rules=rules)) as fetch:
            with pytest.raises(FetchRefused, match=opt_in):
                await fetch.read(url, max_bytes=10)
    assert server.requests["a.png"] == 0  # refused before any connection


async def test_a_name_that_resolves_to_a_forbidden_address_is_refused(server: FileServer) -> None:
    async with fetcher(FetchPolicy(rules=UrlRules(allow_http=True)), "good.test") as fetch:
        with pytest.raises(FetchRefused, match=r"resolves to a forbidden address.*loopback"):
            await fetch.read(f"http://good.test:{server.url.rsplit(':', 1)[1]}/x", max_bytes=9)
    async with fetcher(FetchPolicy(rules=OPEN)) as fetch:
        with pytest.raises(FetchRefused, match="link-local"):
            await fetch.read("http://meta.test/latest/meta-data/", max_bytes=9)


async def test_errors_that_may_pass_and_errors_that_will_not(server: FileServer) -> None:
    async with fetcher(FetchPolicy(rules=OPEN, timeout=0.5)) as fetch:
        with pytest.raises(FetchRefused, match="HTTP 404") as missing:
            await fetch.read(server.url + "/files/nothing", max_bytes=9)
        assert missing.value.details["status"] == 404
        with pytest.raises(FetchError, match="HTTP 503") as down:
            await fetch.read(server.url + "/status/503", max_bytes=9)
        assert not isinstance(down.value, FetchRefused)
        url = server.add("slow.bin", b"y" * 100)
        with pytest.raises(FetchError, match=r"stalled for 0\.5 s after 50 bytes"):
            await fetch.read(url + "?stall=3", max_bytes=1000)
        with pytest.raises(FetchError, match="could not connect"):
            await fetch.read("http://127.0.0.1:9/closed", max_bytes=9)


async def test_credentials_stay_with_their_host_across_redirects(server: FileServer) -> None:
    port = server.url.rsplit(":", 1)[1]
    same = f"{server.url}/redirect?to=/echo-auth"
    other = f"{server.url}/redirect?to=http://cdn.test:{port}/echo-auth"
    token = {"authorization": "Bearer secret"}
    async with fetcher(FetchPolicy(rules=OPEN), "cdn.test") as fetch:
        assert await fetch.read(same, max_bytes=100, headers=token) == b"Bearer secret"
        assert await fetch.read(other, max_bytes=100, headers=token) == b"none"


async def test_a_redirect_loop_ends(server: FileServer) -> None:
    loop = f"{server.url}/redirect"
    async with fetcher(FetchPolicy(rules=OPEN)) as fetch:
        with pytest.raises(FetchRefused, match="more than 5 redirects"):
            await fetch.read(loop, max_bytes=9)
    assert server.requests["redirect"] == 6


# Hops of a redirect chain: a host name (resolved by the test's resolver), or "ftp:" for a hop
# to another scheme. meta.test resolves to 169.254.169.254: the guard must refuse it before
# anything connects (private addresses are allowed here so that the test server, on loopback,
# can be reached; nothing in the chain resolves to a private address other than loopback).
HOPS = ["good.test", "other.test", "meta.test", "ftp:"]


@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(hops=st.lists(st.sampled_from(HOPS), min_size=1, max_size=4), only_good=st.booleans())
async def test_every_redirect_hop_passes_the_policy(
    server: FileServer, hops: list[str], only_good: bool
) -> None:
    """A chain of redirects through hops the policy may or may not allow: the fetch succeeds
    exactly when every hop is allowed (its scheme, the allowlist, and the address its name
    resolves to), and a refused hop is never connected to."""
    port = server.url.rsplit(":", 1)[1]
    server.add("end.bin", b"end")

    def hop_url(hop: str, rest: str) -> str:
        if hop == "ftp:":
            return f"ftp://good.test:{port}{rest}"
        return f"http://{hop}:{port}{rest}"

    url = hop_url(hops[-1], "/files/end.bin")
    for hop in reversed(hops[:-1]):
        url = hop_url(hop, f"/redirect?to={url}")
    policy = FetchPolicy(
        rules=UrlRules(allow_http=True, allow_private=True),
        allow_hosts=("good.test",) if only_good else (),
    )
    allowed = all(hop in ("good.test", "other.test") for hop in hops) and (
        not only_good or all(hop == "good.test" for hop in hops)
    )
    before = server.requests["end.bin"]
    async with fetcher(policy, "good.test", "other.test") as fetch:
        if allowed:
            assert await fetch.read(url, max_bytes=10) == b"end"
            assert server.requests["end.bin"] == before + 1
        else:
            with pytest.raises(FetchRefused):
                await fetch.read(url, max_bytes=10)
            assert server.requests["end.bin"] == before
