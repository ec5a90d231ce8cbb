"""Completion webhooks: signed so that the real ``standardwebhooks`` package verifies them,
retried on 5xx and silence, and never sent where the URL policy forbids (SSRF), checked both on
the URL alone and on the addresses a name resolves to (resolved by a test resolver, no DNS)."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from standardwebhooks import Webhook

from processor.job.status import NotifyRecord
from processor.ops.fetch_guard import address_refusal, host_allowed, parse_allowlist
from processor.ops.webhooks import (
    Notifier,
    RetryPolicy,
    Signer,
    WebhookPolicy,
    display_url,
)
from processor.settings import WorkerSettings, webhook_key

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
KEY = webhook_key(SECRET)
BODY = json.dumps({"id": "job-1", "state": "succeeded", "outputs": []}).encode()


# -- a receiver ---------------------------------------------------------------------------


@dataclass
class Receiver:
    """A local webhook receiver: answers with ``answers`` in turn (then 200), or never."""

    port: int = 0
    answers: list[int] = field(default_factory=list)
    hang: bool = False
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    verified: list[Any] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        return f"http://{host}:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = dict(request.headers)
        self.requests.append((headers, body))
        self.arrived.set()
        self.verified.append(Webhook(SECRET).verify(body, headers))
        if self.hang:
            await asyncio.Event().wait()
        status = self.answers.pop(0) if self.answers else 200
        if 300 <= status < 400:
            raise web.HTTPFound(self.url(path="/elsewhere"))
        return web.Response(status=status, text="ok")

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), b"(redirect followed!)"))
        return web.Response(text="should never be reached")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/hook", state.handle)
    app.router.add_post("/elsewhere", state.elsewhere)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    try:
        yield state
    finally:
        await runner.cleanup()


def hosts(table: dict[str, list[str]]) -> Callable[[str, int], Any]:
    """A resolver from a table, like /etc/hosts: the tests never ask real DNS."""

    async def lookup(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"unknown host {host}")
        return table[host]

    return lookup


class Sleeps:
    """Records back-off delays instead of waiting them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


LOCAL = WebhookPolicy(allow=("receiver.test", "*.acme.test"), allow_http=True, allow_private=True)
FAST = RetryPolicy(attempts=5, timeout=2.0, base_delay=2.0, max_delay=30.0)


def sender(policy: WebhookPolicy = LOCAL, **options: Any) -> Notifier:
    """A Notifier that resolves from a test table and records back-off instead of sleeping."""
    options.setdefault("retry", FAST)
    options.setdefault("sleep", Sleeps())
    options.setdefault("lookup", hosts({"receiver.test": ["127.0.0.1"]}))
    return Notifier(policy, Signer(KEY), **options)


async def send(notifier: Notifier, url: str, message_id: str = "msg_1") -> NotifyRecord:
    """Submit one webhook and wait (bounded) for its record."""
    done: asyncio.Queue[NotifyRecord] = asyncio.Queue()
    notifier.submit(url, message_id, BODY, done.put)
    return await asyncio.wait_for(done.get(), 20)


# -- delivery -----------------------------------------------------------------------------


async def test_delivered_webhook_verifies_with_standardwebhooks(receiver: Receiver) -> None:
    async with sender() as notifier:
        record = await send(notifier, receiver.url("receiver.test"), "msg_abc")

    assert record.delivered_at is not None and record.attempts == 1
    assert record.last_error is None and record.message_id == "msg_abc"
    assert record.url == f"http://receiver.test:{receiver.port}/hook"
    ((headers, body),) = receiver.requests
    assert body == BODY
    assert receiver.verified == [json.loads(BODY)]  # the real package accepted the signature
    assert headers["webhook-id"] == "msg_abc"
    assert headers["Host"] == f"receiver.test:{receiver.port}"  # the name, pinned to its address
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("comfys3/")
    # A receiver with another secret refuses it: the signature really depends on the key.
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    with pytest.raises(Exception, match="signature"):
        Webhook(other).verify(body, headers)


async def test_retried_after_500_then_delivered(receiver: Receiver) -> None:
    receiver.answers = [500]
    sleeps = Sleeps()
    async with sender(sleep=sleeps) as notifier:
        record = await send(notifier, receiver.url("receiver.test"))

    assert record.attempts == 2 and record.delivered_at is not None
    assert record.last_error == "HTTP 500 Internal Server Error"  # why it took two
    assert len(receiver.requests) == 2 and len(receiver.verified) == 2
    assert receiver.requests[0][0]["webhook-id"] == receiver.requests[1][0]["webhook-id"]
    assert len(sleeps.delays) == 1 and 1.0 <= sleeps.delays[0] <= 2.0  # 2 s, jittered down


async def test_gives_up_after_the_bound_with_growing_delays(receiver: Receiver) -> None:
    receiver.answers = [503] * 10
    sleeps = Sleeps()
    async with sender(sleep=sleeps) as notifier:
        record = await send(notifier, receiver.url("receiver.test"))

    assert record.delivered_at is None and record.attempts == 5
    assert record.last_error == "HTTP 503 Service Unavailable"
    assert len(receiver.requests) == 5
    bounds = [(1, 2), (2, 4), (4, 8), (8, 16)]
    assert len(sleeps.delays) == 4
    for delay, (low, high) in zip(sleeps.delays, bounds, strict=True):
        assert low <= delay <= high


async def test_429_is_retried_after_the_time_it_asks(receiver: Receiver) -> None:
    async def busy(request: web.Request) -> web.Response:
        receiver.requests.append((dict(request.headers), await request.read()))
        if len(receiver.requests) == 1:
            return web.Response(status=429, headers={"Retry-After": "7"})
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/busy", busy)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    sleeps = Sleeps()
    try:
        async with sender(sleep=sleeps) as notifier:
            record = await send(notifier, f"http://receiver.test:{port}/busy")
    finally:
        await runner.cleanup()
    assert record.attempts == 2 and record.delivered_at is not None
    assert sleeps.delays == [7.0]


async def test_a_4xx_is_not_retried(receiver: Receiver) -> None:
    receiver.answers = [404]
    async with sender() as notifier:
        record = await send(notifier, receiver.url("receiver.test"))
    assert record.attempts == 1 and record.delivered_at is None
    assert record.last_error == "HTTP 404 Not Found; not retried (the receiver refused it)"


# -- refusals -----------------------------------------------------------------------------


async def test_a_url_off_the_allowlist_is_refused(receiver: Receiver) -> None:
    url = f"http://evil.example.net:{receiver.port}/hook"
    policy = WebhookPolicy(allow=("receiver.test",), allow_http=True, allow_private=True)
    assert policy.refusal(url) == (
        "host 'evil.example.net' is not allowed (COMFYS3_WEBHOOK_ALLOW: receiver.test)"
    )
    lookup = hosts({"evil.example.net": ["127.0.0.1"]})
    async with sender(policy, lookup=lookup) as notifier:
        record = await send(notifier, url)
    assert record.attempts == 0 and record.delivered_at is None
    assert record.last_error == f"refused: {policy.refusal(url)}"
    assert receiver.requests == []


async def test_an_http_url_is_refused_unless_allowed(receiver: Receiver) -> None:
    policy = WebhookPolicy(allow=("receiver.test",), allow_private=True)
    url = receiver.url("receiver.test")
    assert policy.refusal(url) == (
        "must use https (http is refused unless COMFYS3_WEBHOOK_ALLOW_HTTP=true)"
    )
    async with sender(policy) as notifier:
        record = await send(notifier, url)
    assert record.attempts == 0
    assert record.last_error == f"refused: {policy.refusal(url)}"
    assert receiver.requests == []


async def test_a_redirect_is_not_followed(receiver: Receiver) -> None:
    receiver.answers = [302]
    async with sender() as notifier:
        record = await send(notifier, receiver.url("receiver.test"))
    assert record.attempts == 1 and record.delivered_at is None
    assert record.last_error is not None
    assert record.last_error.startswith("HTTP 302 Found: a redirect to http://127.0.0.1:")
    assert "redirects are not followed" in record.last_error
    assert len(receiver.requests) == 1  # /elsewhere was never asked


@pytest.mark.parametrize(
    ("address", "allow_private", "reason"),
    [
        ("127.0.0.1", False, "127.0.0.1 is a loopback address"),
        ("169.254.169.254", False, "169.254.169.254 is link-local"),
        ("169.254.169.254", True, "169.254.169.254 is link-local"),  # even when private is on
        ("10.1.2.3", False, "10.1.2.3 is a private address"),
        ("::1", False, "::1 is a loopback address"),
        (
            "::ffff:127.0.0.1",
            False,
            "::ffff:127.0.0.1 stands for 127.0.0.1: 127.0.0.1 is a loopback",
        ),
    ],
)
async def test_a_name_resolving_to_a_forbidden_address_is_refused(
    receiver: Receiver, address: str, allow_private: bool, reason: str
) -> None:
    """The receiver listens on 127.0.0.1, so a connection would have worked: only the address
    check stops it."""
    policy = WebhookPolicy(allow=("*.acme.test",), allow_http=True, allow_private=allow_private)
    url = receiver.url("hooks.acme.test")
    assert policy.refusal(url) is None  # the URL alone is fine: only its addresses are not
    lookup = hosts({"hooks.acme.test": [address]})
    async with sender(policy, lookup=lookup) as notifier:
        record = await send(notifier, url)
    assert record.attempts == 1 and record.delivered_at is None
    assert record.last_error is not None
    assert record.last_error.startswith(
        "refused: hooks.acme.test resolves to a forbidden address: "
    )
    assert reason in record.last_error
    assert receiver.requests == []


async def test_one_forbidden_address_among_good_ones_refuses_the_name(receiver: Receiver) -> None:
    policy = WebhookPolicy(allow=("*.acme.test",), allow_http=True)
    lookup = hosts({"mixed.acme.test": ["93.184.215.14", "127.0.0.1"]})
    async with sender(policy, lookup=lookup) as notifier:
        record = await send(notifier, receiver.url("mixed.acme.test"))
    assert record.last_error is not None and "127.0.0.1 is a loopback" in record.last_error
    assert receiver.requests == []


async def test_literal_addresses_are_checked_without_a_resolver(receiver: Receiver) -> None:
    policy = WebhookPolicy(allow=("*",), allow_http=True)
    async with sender(policy, lookup=hosts({})) as notifier:
        loopback = await send(notifier, receiver.url("127.0.0.1"))
        metadata = await send(notifier, "http://[::ffff:169.254.169.254]/latest/meta-data")
    assert loopback.last_error is not None and "loopback" in loopback.last_error
    assert metadata.last_error is not None and "link-local" in metadata.last_error
    assert loopback.attempts == metadata.attempts == 0
    assert receiver.requests == []


async def test_a_name_that_does_not_resolve_is_retried_then_fails() -> None:
    async with sender(lookup=hosts({})) as notifier:
        record = await send(notifier, "https://nowhere.acme.test/hook")
    assert record.attempts == 5
    assert (
        record.last_error == "could not resolve nowhere.acme.test: unknown host nowhere.acme.test"
    )


# -- never blocking -----------------------------------------------------------------------


async def test_a_receiver_that_never_answers_does_not_block_submit(receiver: Receiver) -> None:
    receiver.hang = True
    retry = RetryPolicy(attempts=2, timeout=0.5, base_delay=0.01)
    done: asyncio.Queue[NotifyRecord] = asyncio.Queue()
    async with sender(retry=retry) as notifier:
        assert not inspect.iscoroutinefunction(notifier.submit)  # it cannot wait for I/O
        notifier.submit(receiver.url("receiver.test"), "msg_slow", BODY, done.put)
        # submit returned before the request was even made: nothing reached the receiver yet.
        assert receiver.requests == [] and notifier.pending == 1
        record = await asyncio.wait_for(done.get(), 10)  # bounded: 2 x 0.5 s and a back-off
    assert record.attempts == 2 and record.delivered_at is None
    assert record.last_error == "no answer within 0.5 s"
    assert len(receiver.requests) == 2


async def test_a_full_queue_drops_with_a_record_instead_of_waiting(receiver: Receiver) -> None:
    receiver.hang = True
    records: list[NotifyRecord] = []

    async def keep(record: NotifyRecord) -> None:
        records.append(record)

    notifier = sender(concurrency=1, queue_size=1, retry=RetryPolicy(attempts=1, timeout=30))
    await notifier.start()
    url = receiver.url("receiver.test")
    notifier.submit(url, "msg_1", BODY, keep)  # taken by the one sender
    await asyncio.wait_for(receiver.arrived.wait(), 10)
    notifier.submit(url, "msg_2", BODY, keep)  # waits in the queue
    notifier.submit(url, "msg_3", BODY, keep)  # no room: dropped at once
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    (dropped,) = records
    assert dropped.attempts == 0 and dropped.last_error is not None
    assert dropped.last_error.startswith("not sent: 1 webhooks were already waiting")
    await notifier.aclose(timeout=0.2)
    assert len(records) == 3
    by_attempts = sorted(records, key=lambda r: r.attempts)
    assert by_attempts[1].last_error == "not delivered: the worker stopped"
    last = by_attempts[2].last_error
    assert last is not None and last.startswith("not delivered: the worker stopped after 1")
    assert notifier.stats.outcomes == {"dropped": 1, "abandoned": 2}


async def test_submit_after_close_is_recorded_not_raised(receiver: Receiver) -> None:
    notifier = sender()
    await notifier.start()
    await notifier.aclose()
    record = await send(notifier, receiver.url("receiver.test"))
    assert record.attempts == 0 and record.last_error is not None
    assert "not running" in record.last_error


async def test_a_failing_on_done_does_not_stop_the_sender(receiver: Receiver) -> None:
    async def broken(record: NotifyRecord) -> None:
        raise RuntimeError("status write failed")

    async with sender() as notifier:
        notifier.submit(receiver.url("receiver.test"), "msg_1", BODY, broken)
        record = await send(notifier, receiver.url("receiver.test"), "msg_2")
    assert record.delivered_at is not None and len(receiver.requests) == 2


# -- the URL policy -----------------------------------------------------------------------


def test_manifest_urls_need_an_allowlist() -> None:
    policy = WebhookPolicy(default_url="https://hooks.example.com/x")
    assert policy.refusal("https://hooks.example.com/x") == (
        "this worker takes no webhook URL from manifests (COMFYS3_WEBHOOK_ALLOW is empty); "
        "leave notify.url out to use the worker's default"
    )
    assert policy.refusal("https://hooks.example.com/x", from_manifest=False) is None
    assert policy.choose(None) == "https://hooks.example.com/x"
    assert policy.choose("https://a.example.com/") == "https://a.example.com/"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://hooks.example.com/x", None),
        ("https://HOOKS.example.com./x", None),
        ("https://a.b.acme.io/x", None),
        ("https://acme.io/x", "host 'acme.io' is not allowed"),
        ("https://hooks.example.com.evil.net/", "host 'hooks.example.com.evil.net' is not"),
        ("ftp://hooks.example.com/", "must be an https:// URL"),
        ("hooks.example.com/x", "must be an https:// URL"),
        ("https://user:pw@hooks.example.com/", "must not carry a user name or password"),
        ("https:///x", "has no host"),
        ("https://hooks.example.com:0/", "has no valid port"),
        ("https://hooks.example.com:99999/", "not a usable URL"),
        ("https://hooks example.com/", "contains spaces or control characters"),
        ("https://2130706433/", "looks like a numeric address"),
        ("https://127.1/", "looks like a numeric address"),
        ("https://10.0.0.1/", "10.0.0.1 is a private address"),
        ("https://[fe80::1]/", "fe80::1 is link-local"),
        ("https://" + "a" * 2100 + ".acme.io/", "the limit is 2048"),
        (42, "must be a URL string, not int"),
    ],
)
def test_manifest_url_policy(url: object, reason: str | None) -> None:
    policy = WebhookPolicy(allow=parse_allowlist("hooks.example.com, *.acme.io, 10.0.0.1, fe80::1"))
    refusal = policy.refusal(url)
    if reason is None:
        assert refusal is None
    else:
        assert refusal is not None and reason in refusal


def test_allowlist_patterns() -> None:
    assert parse_allowlist(" Hooks.Example.com , *.acme.io,,bücher.de ") == (
        "hooks.example.com",
        "*.acme.io",
        "xn--bcher-kva.de",
    )
    assert parse_allowlist("") == ()
    for bad in ("*acme.io", "a.*.io", "https://x.io", "x y", "*.", "a..b"):
        with pytest.raises(ValueError, match="is not a host pattern"):
            parse_allowlist(bad)
    assert host_allowed("a.acme.io", ["*.acme.io"])
    assert not host_allowed("acme.io", ["*.acme.io"])
    assert not host_allowed("evilacme.io", ["*.acme.io"])
    assert host_allowed("anything.example", ["*"])


@pytest.mark.parametrize(
    ("address", "private_ok", "refused_when_private_off"),
    [
        ("93.184.215.14", True, False),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True, False),
        ("127.0.0.1", True, True),
        ("10.0.0.1", True, True),
        ("172.16.5.4", True, True),
        ("192.168.1.1", True, True),
        ("100.64.0.1", True, True),
        ("fd00:ec2::254", True, True),
        ("::1", True, True),
        ("::ffff:10.0.0.1", True, True),
        ("64:ff9b::a9fe:a9fe", False, True),  # NAT64 of 169.254.169.254
        ("2002:a9fe:a9fe::1", False, True),  # 6to4 of 169.254.169.254
        ("169.254.169.254", False, True),
        ("fe80::1", False, True),
        ("0.0.0.0", False, True),
        ("::", False, True),
        ("224.0.0.1", False, True),
        ("ff02::1", False, True),
        ("240.0.0.1", False, True),
        ("255.255.255.255", False, True),
        ("not-an-ip", False, True),
    ],
)
def test_address_classes(address: str, private_ok: bool, refused_when_private_off: bool) -> None:
    assert (address_refusal(address, allow_private=False) is not None) is refused_when_private_off
    assert (address_refusal(address, allow_private=True) is None) is private_ok


@settings(max_examples=400, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    url=st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda scheme, rest: f"{scheme}{rest}",
            st.sampled_from(["https://", "http://", "HTTPS://", "ftp://", "file://", "", "//"]),
            st.text(max_size=100),
        ),
    ),
    allow_http=st.booleans(),
)
def test_url_policy_never_raises_and_refuses_other_schemes(url: str, allow_http: bool) -> None:
    policy = WebhookPolicy(allow=("*",), allow_http=allow_http)
    refusal = policy.refusal(url)
    assert refusal is None or (isinstance(refusal, str) and refusal)
    if refusal is None:
        schemes = ("https://", "http://") if allow_http else ("https://",)
        assert url.lower().startswith(schemes)
    assert isinstance(display_url(url), str)


@settings(max_examples=100, derandomize=True)
@given(
    body=st.text(max_size=300), message_id=st.from_regex(r"msg_[A-Za-z0-9]{1,30}", fullmatch=True)
)
def test_signatures_verify_with_the_reference_package(body: str, message_id: str) -> None:
    timestamp = int(time.time())
    data = body.encode()
    headers = Signer(KEY).headers(message_id, timestamp, data)
    Webhook(SECRET).verify(data, headers, json_parse=False)  # raises if it does not match


def test_status_documents_show_urls_without_secrets() -> None:
    assert display_url("https://u:p@h.example.com:8443/a/b?token=x#f") == (
        "https://h.example.com:8443/a/b"
    )
    assert display_url("https://hooks.slack.example/services/T0/B0/SECRET", origin_only=True) == (
        "https://hooks.slack.example"
    )
    assert display_url("not a url") == "(invalid URL)"


async def test_the_default_url_is_recorded_without_its_path(receiver: Receiver) -> None:
    default = receiver.url("receiver.test", "/hook?token=s3cret")
    policy = WebhookPolicy(allow_http=True, allow_private=True, default_url=default)
    async with sender(policy) as notifier:
        record = await send(notifier, default)
    assert record.delivered_at is not None
    assert record.url == f"http://receiver.test:{receiver.port}"


def test_a_malformed_secret_stops_the_worker_at_start() -> None:
    with pytest.raises(ValidationError, match="must start with whsec_"):
        WorkerSettings(webhook_secret="hunter2")
    with pytest.raises(ValidationError, match="not valid base64"):
        WorkerSettings(webhook_secret="whsec_***")
    with pytest.raises(ValidationError, match="decodes to 3 bytes"):
        WorkerSettings(webhook_secret="whsec_YWJj")
    settings_ = WorkerSettings(webhook_secret=SECRET)
    assert settings_.webhooks.secret is not None
    assert webhook_key(settings_.webhooks.secret.get_secret_value()) == b"k" * 32
    assert "kkkk" not in repr(settings_)
