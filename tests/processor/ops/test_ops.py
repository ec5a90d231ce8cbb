"""Metrics, health and the ops server: what Prometheus and a probe see, over real HTTP."""

from __future__ import annotations

import base64
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from processor.errors import SettingsError
from processor.job.runner import JobOutcome, Verdict
from processor.job.status import ErrorInfo, JobState, JobStatus
from processor.ops.metrics import Health, LabelGuard, Metrics
from processor.ops.parts import build_ops
from processor.ops.server import OpsServer
from processor.settings import WorkerSettings
from tests.paths import DOCS

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text -> {(sample name, sorted labels): value}."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str, str]:
    async with http.get(url, **kwargs) as response:
        return response.status, response.headers["Content-Type"], await response.text()


async def test_scrape_shows_counters_moving(http: aiohttp.ClientSession) -> None:
    metrics, health = Metrics(), Health()
    async with OpsServer(metrics, health, port=0) as server:
        status, content_type, before = await get(http, f"{server.url}/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        key = ("comfys3_jobs_total", (("state", "succeeded"), ("workflow", "txt2img")))
        assert key not in samples(before)

        metrics.job_finished("succeeded", "txt2img")
        metrics.job_finished("succeeded", "txt2img")
        metrics.job_phases({"stage": 0.2, "execute": 3.5, "total": 4.0})
        metrics.attempt_finished("retry", "timeout")
        metrics.storage_error("put")
        metrics.claim_taken_over()
        metrics.prompt_queued()
        metrics.prompt_queued()
        metrics.prompt_done()
        metrics.webhook_result("delivered")

        _, _, after = await get(http, f"{server.url}/metrics")
    found = samples(after)
    assert found[key] == 2.0
    assert found[("comfys3_job_phase_seconds_count", (("phase", "execute"),))] == 1.0
    assert found[("comfys3_job_phase_seconds_sum", (("phase", "execute"),))] == 3.5
    assert found[("comfys3_job_phase_seconds_bucket", (("le", "5.0"), ("phase", "execute")))] == 1
    assert found[("comfys3_job_phase_seconds_bucket", (("le", "2.5"), ("phase", "execute")))] == 0
    assert found[("comfys3_attempts_total", (("error_type", "timeout"), ("outcome", "retry")))] == 1
    assert found[("comfys3_storage_errors_total", (("operation", "put"),))] == 1
    assert found[("comfys3_claims_taken_over_total", ())] == 1
    assert found[("comfys3_claims_lost_total", ())] == 0
    assert found[("comfys3_lane_prompts", (("comfyui", "comfyui"),))] == 1  # one per ComfyUI
    assert found[("comfys3_comfyui_prompts_total", (("comfyui", "comfyui"),))] == 1
    assert found[("comfys3_webhooks_total", (("result", "delivered"),))] == 1
    info = [k for k in found if k[0] == "comfys3_build_info"]
    assert len(info) == 1 and dict(info[0][1])["version"] == "0.1.0"


async def test_openmetrics_is_served_to_who_asks_for_it(http: aiohttp.ClientSession) -> None:
    async with OpsServer(Metrics(), Health()) as server:
        accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
        status, content_type, text = await get(http, f"{server.url}/metrics", headers=accept)
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


def test_seconds_since_last_success_is_computed_at_scrape() -> None:
    clock = Clock()
    metrics = Metrics(clock=clock)
    gauge = ("comfys3_seconds_since_last_success", ())
    clock.now += 30
    assert samples(scrape(metrics))[gauge] == 30.0  # since start, before any success
    metrics.job_finished("failed", "txt2img")
    metrics.job_finished("succeeded", "txt2img")
    clock.now += 12
    assert samples(scrape(metrics))[gauge] == 12.0
    clock.now += 5
    assert samples(scrape(metrics))[gauge] == 17.0


def scrape(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_every_metrics_object_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.job_finished("failed", "solid")
    key = ("comfys3_jobs_total", (("state", "failed"), ("workflow", "solid")))
    assert samples(scrape(one))[key] == 1 and key not in samples(scrape(two))


def test_untrusted_label_values_are_bounded() -> None:
    metrics = Metrics()
    for n in range(80):
        metrics.job_finished("failed", f"made-up-{n}")
    metrics.job_finished("failed", "x" * 500 + "\n")
    workflows = {
        dict(labels)["workflow"]
        for name, labels in samples(scrape(metrics))
        if name == "comfys3_jobs_total"
    }
    assert len(workflows) == 51 and "other" in workflows
    guard = LabelGuard(known=["total"], limit=1)
    assert (guard("a"), guard("b"), guard("total"), guard(None)) == ("a", "other", "total", "other")


def test_outcomes_feed_the_metrics() -> None:
    ops = build_ops(WorkerSettings())
    ok = JobStatus(
        id="a", state=JobState.succeeded, workflow="txt2img", timings={"execute": 1.5, "total": 2}
    )
    retry = JobStatus(
        id="b",
        state=JobState.queued,
        workflow="txt2img",
        timings={"total": 0.5},
        error=ErrorInfo(type="comfyui_unavailable", message="down"),
    )
    ops.observe(JobOutcome(Verdict.succeeded, ok))
    ops.observe(JobOutcome(Verdict.retry, retry))
    ops.observe(JobOutcome(Verdict.skipped, ok))
    found = samples(scrape(ops.metrics))
    jobs = "comfys3_jobs_total"
    assert found[(jobs, (("state", "succeeded"), ("workflow", "txt2img")))] == 1
    assert found[(jobs, (("state", "skipped"), ("workflow", "txt2img")))] == 1
    assert (jobs, (("state", "queued"), ("workflow", "txt2img"))) not in found
    attempts = "comfys3_attempts_total"
    assert found[(attempts, (("error_type", "comfyui_unavailable"), ("outcome", "retry")))] == 1
    assert found[(attempts, (("error_type", "none"), ("outcome", "succeeded")))] == 1
    assert found[("comfys3_comfyui_execution_seconds_sum", (("workflow", "txt2img"),))] == 1.5
    assert found[("comfys3_job_phase_seconds_count", (("phase", "total"),))] == 2


# -- health -------------------------------------------------------------------------------


async def test_healthz_flips_with_its_inputs(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    comfy_up = {"value": True}
    health = Health(storage_window=60, clock=clock)
    metrics = Metrics()
    metrics.watch_health(health)
    async with OpsServer(metrics, health) as server:

        async def probe() -> tuple[int, Any]:
            async with http.get(f"{server.url}/healthz") as response:
                return response.status, await response.json()

        status, body = await probe()
        assert status == 503 and body["ready"] is False
        assert body["reason"] == (
            "comfyui: ComfyUI is not started yet; storage: storage not reached yet"
        )
        assert samples(scrape(metrics))[("comfys3_ready", ())] == 0

        health.set_comfy_check(lambda: comfy_up["value"])
        health.storage_ok()
        status, body = await probe()
        assert (status, body["ready"], body["reason"]) == (200, True, "ready")
        assert samples(scrape(metrics))[("comfys3_ready", ())] == 1

        comfy_up["value"] = False  # ComfyUI killed: the websocket is down
        status, body = await probe()
        assert status == 503 and body["reason"] == "comfyui: ComfyUI does not answer"
        comfy_up["value"] = True
        assert (await probe())[0] == 200

        health.storage_failed("S3 put of output/a/status.json failed: timeout")
        assert (await probe())[0] == 200  # one failure inside the window is not an outage
        clock.now += 61
        status, body = await probe()
        assert status == 503
        assert body["checks"]["storage"]["detail"] == (
            "no storage operation succeeded in 61 s (limit 60 s); "
            "last error: S3 put of output/a/status.json failed: timeout"
        )
        health.storage_ok()
        assert (await probe())[0] == 200

        health.stopping()
        status, body = await probe()
        assert status == 503 and body["reason"] == "worker: the worker is stopping"


def test_an_idle_events_worker_stays_ready_between_its_listings() -> None:
    """With --events sqs an idle worker lists storage only every fallback interval (180 s by
    default); health must not call it unready in between (it once did from 120 s on)."""
    settings = WorkerSettings(events_fallback_interval=180)
    assert build_ops(settings).health.storage_window == 120
    assert build_ops(settings, listing_interval=180).health.storage_window == 270


def test_healthz_says_how_far_the_clock_is_from_the_stores_and_stays_ready() -> None:
    health = Health(comfy_ok=lambda: True)
    health.storage_ok()
    assert "clock" not in health.readiness().checks  # no store clock known: nothing to say
    offset: list[float | None] = [None]
    health.set_clock_offset(lambda: offset[0])
    assert "clock" not in health.readiness().checks
    offset[0] = -90.4  # the store is 90 s behind: this machine's clock is ahead
    readiness = health.readiness()
    assert readiness.ready and readiness.checks["clock"].ok
    assert "clock is 90 s ahead of the store's" in readiness.checks["clock"].detail
    offset[0] = 2.0
    assert readiness.ready and "within 10 s" in health.readiness().checks["clock"].detail


async def test_a_comfy_check_that_raises_is_unready_not_a_crash() -> None:
    def broken() -> bool:
        raise RuntimeError("no client")

    health = Health(comfy_ok=broken)
    health.storage_ok()
    readiness = health.readiness()
    assert not readiness.ready
    assert readiness.reason == "comfyui: checking ComfyUI failed: RuntimeError: no client"


async def test_livez_answers_until_something_fatal(http: aiohttp.ClientSession) -> None:
    health = Health()
    async with OpsServer(Metrics(), health) as server:
        async with http.get(f"{server.url}/livez") as response:
            assert response.status == 200 and (await response.json())["live"] is True
        health.fatal("ComfyUI died 6 times and will not be restarted")
        async with http.get(f"{server.url}/livez") as response:
            assert response.status == 503
            assert (await response.json())["reason"].startswith("ComfyUI died 6 times")
        async with http.get(f"{server.url}/nothing") as response:
            assert response.status == 404


async def test_a_taken_port_is_a_readable_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:\d+ \(COMFYS3_METRICS"):
            async with OpsServer(Metrics(), Health(), port=port):
                pass


# -- building from settings ---------------------------------------------------------------


def test_webhooks_are_off_unless_configured() -> None:
    ops = build_ops(WorkerSettings())
    assert ops.notifier is None
    assert ops.webhook_refusal("https://hooks.example.com/") is not None


async def test_ops_built_from_settings() -> None:
    settings = WorkerSettings(
        webhook_url="https://hooks.example.com/comfys3",
        webhook_secret=SECRET,
        webhook_allow="*.acme.io",
        webhook_attempts=3,
        webhook_timeout=4,
    )
    ops = build_ops(settings)
    assert ops.notifier is not None
    assert ops.notifier.retry.attempts == 3 and ops.notifier.retry.timeout == 4
    assert ops.webhook_refusal("https://x.acme.io/hook") is None
    assert ops.webhook_refusal("https://acme.io/hook") is not None
    assert ops.policy.choose(None) == "https://hooks.example.com/comfys3"
    await ops.aclose(0.1)
    assert not ops.health.readiness().ready


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"webhook_url": "https://hooks.example.com/"},
            "COMFYS3_WEBHOOK_SECRET is required when COMFYS3_WEBHOOK_URL or",
        ),
        (
            {"webhook_url": "http://hooks.example.com/", "webhook_secret": SECRET},
            "COMFYS3_WEBHOOK_URL must use https",
        ),
        (
            {"webhook_allow": "hooks.example.com, https://bad", "webhook_secret": SECRET},
            "COMFYS3_WEBHOOK_ALLOW: 'https://bad' is not a host pattern",
        ),
    ],
)
def test_webhook_settings_are_checked_together(values: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        build_ops(WorkerSettings(**values))


def test_an_empty_port_variable_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYS3_METRICS_PORT", "")
    monkeypatch.setenv("COMFYS3_WARMUP", " ")
    settings = WorkerSettings()
    assert settings.metrics.port is None and settings.host.warmup is None
    assert settings.metrics.host == "127.0.0.1"
    monkeypatch.setenv("COMFYS3_METRICS_PORT", "9188")
    assert WorkerSettings().metrics.port == 9188


def test_every_metric_the_operations_page_names_exists() -> None:
    """docs/operations.md's table, scrape advice and alerts name only metrics a worker has."""

    doc = (DOCS / "operations.md").read_text()
    metrics = Metrics()
    metrics.watch_health(Health())
    exposed = set()
    for family in text_string_to_metric_families(scrape(metrics)):
        exposed |= {family.name, f"{family.name}_total", f"{family.name}_info"}
        exposed |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    named = set(re.findall(r"\bcomfys3_[a-z_]+", doc))
    assert named and named <= exposed, named - exposed
