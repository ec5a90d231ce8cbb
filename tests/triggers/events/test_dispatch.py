"""The dispatcher against moto's S3 and a local stand-in of RunPod's API: one request per
manifest, never two while the first is pending, retries through 429 and 500, the Lambda
handler on a real-shaped S3 event, and the SQS-fed service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from processor.settings import DispatchSettings, S3Settings
from processor.storage.layout import Layout
from processor.storage.s3 import S3Storage
from tests.event_shapes import lambda_s3_event, lambda_sqs_event, s3_notification
from tests.runpod_standin import API_KEY, ENDPOINT, RunPodStandIn, runpod_standin
from tests.s3_servers import S3Server, s3_settings_for
from tests.sqs_queues import notifying_queue
from triggers.cli.main import main
from triggers.events import lambda_dispatch
from triggers.events.dispatch import Dispatcher, Marker, Verdict, serve
from triggers.events.runpod_api import RunPodApi, RunPodError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def runpod() -> Iterator[RunPodStandIn]:
    with runpod_standin() as standin:
        yield standin


@pytest.fixture
def s3(moto_server: S3Server) -> S3Settings:
    return s3_settings_for(moto_server)


def dispatch_settings(runpod: RunPodStandIn, **overrides: Any) -> DispatchSettings:
    values: dict[str, Any] = {
        "runpod_endpoint_id": ENDPOINT,
        "runpod_api_key": SecretStr(API_KEY),
        "runpod_api_url": runpod.url,
    }
    values.update(overrides)
    return DispatchSettings(**values)


def put(server: S3Server, s3: S3Settings, key: str, body: bytes = b'{"workflow": "solid"}') -> None:
    server.client().put_object(Bucket=s3.bucket_name, Key=key, Body=body)


def keys_under(server: S3Server, s3: S3Settings, prefix: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=s3.bucket_name, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


class Harness:
    def __init__(self, s3: S3Settings, runpod: RunPodStandIn, **knobs: Any) -> None:
        self.s3 = s3
        self.runpod = runpod
        self.knobs = knobs
        self.settings = dispatch_settings(runpod, **knobs.pop("settings", {}))

    @property
    def layout(self) -> Layout:
        return Layout(self.s3.input_dir, self.s3.output_dir)

    @contextlib.asynccontextmanager
    async def dispatcher(self, name: str = "d1", **knobs: Any) -> AsyncIterator[Dispatcher]:
        async with (
            S3Storage(self.s3) as storage,
            RunPodApi(
                base_url=self.runpod.url,
                endpoint_id=ENDPOINT,
                api_key=API_KEY,
                backoff=knobs.pop("backoff", 0.05),
            ) as api,
        ):
            yield Dispatcher(
                storage=storage,
                layout=self.layout,
                api=api,
                settings=self.settings,
                name=name,
                **{**self.knobs, **knobs},
            )


async def test_one_request_per_manifest_with_the_key_and_the_api_key(
    moto_server: S3Server, s3: S3Settings, runpod: RunPodStandIn
) -> None:
    for name in ("a", "b", "my job é"):
        put(moto_server, s3, f"input/{name}.json")
    put(moto_server, s3, "input/_claims/c.json")  # not a manifest
    harness = Harness(s3, runpod)
    async with harness.dispatcher() as dispatcher:
        first = await dispatcher.sweep(full=True)
        again = await dispatcher.sweep(full=True)
        events = [await dispatcher.dispatch("input/a.json") for _ in range(3)]
    assert sorted(r.verdict for r in first) == [Verdict.sent] * 3
    assert [r.verdict for r in again + events] == [Verdict.pending] * 6
    assert sorted(runpod.run_manifests()) == ["input/a.json", "input/b.json", "input/my job é.json"]
    assert {r.authorization for r in runpod.requests} == {f"Bearer {API_KEY}"}
    assert all(
        r.body == {"input": {"manifest": r.body["input"]["manifest"]}} for r in runpod.runs()
    )
    marker_data = (
        moto_server.client()
        .get_object(Bucket=s3.bucket_name, Key="input/_dispatched/a.json")["Body"]
        .read()
    )
    marker = Marker.decode(marker_data)
    assert marker is not None and marker.job_id in runpod.issued and marker.requests == 1
    # the markers' sub-prefix is invisible to a worker's listing, like _claims/
    assert not harness.layout.is_manifest("input/_dispatched/a.json")


async def test_two_dispatchers_racing_on_duplicated_events_send_once(
    moto_server: S3Server, s3: S3Settings, runpod: RunPodStandIn
) -> None:
    for n in range(4):
        put(moto_server, s3, f"input/race-{n}.json")
    harness = Harness(s3, runpod)
    async with harness.dispatcher("d1") as one, harness.dispatcher("d2") as two:
        results = await asyncio.gather(
            *(
                dispatcher.dispatch(f"input/race-{n}.json")
                for n in range(4)
                for dispatcher in (one, two, one, two)
            )
        )
    assert sorted(runpod.run_manifests()) == [f"input/race-{n}.json" for n in range(4)]
    assert sum(r.verdict is Verdict.sent for r in results) == 4
    assert {r.verdict for r in results} == {Verdict.sent, Verdict.pending}


async def test_429_and_500_are_retried_honouring_retry_after(
    moto_server: S3Server, s3: S3Settings, runpod: RunPodStandIn
) -> None:
    put(moto_server, s3, "input/busy.json")
    runpod.fail_next_runs(429, retry_after="1")
    runpod.fail_next_runs(500, 503)
    harness = Harness(s3, runpod)
    async with harness.dispatcher() as dispatcher:
        began = time.monotonic()
        result = await dispatcher.dispatch("input/busy.json")
        waited = time.monotonic() - began
    assert result.verdict is Verdict.sent and result.job_id == "job-1-e1"
    assert len(runpod.runs()) == 4  # 429, 500, 503, then accepted
    assert waited >= 0.9  # the 429's Retry-After: 1 was waited out


async def test_a_request_that_keeps_failing_frees_the_manifest_for_a_later_try(
    moto_server: S3Server, s3: S3Settings, runpod: RunPodStandIn
) -> None:
    put(moto_server, s3, "input/down.json")
    runpod.fail_next_runs(*[502] * 6)
    harness = Harness(s3, runpod)
    async with harness.dispatcher() as dispatcher:
        failed = await dispatcher.dispatch("input/down.json")
        assert failed.verdict is Verdict.failed and "after 6 tries: HTTP 502" in failed.detail
        assert keys_under(moto_server, s3, "input/_dispatched/") == []
        retried = await dispatcher.dispatch("input/down.json")
    assert retried.verdict is Verdict.sent
    assert len(runpod.runs()) == 7


async def test_a_refused_api_key_is_a_readable_error(
    moto_server: S3Server, s3: S3Settings, runpod: RunPodStandIn
) -> None:
    put(moto_server, s3, "input/x.json")
    async with (
        S3Storage(s3) as storage,
        RunPodApi(base_url=runpod.url, endpoint_id=ENDPOINT, api_key="wrong") as api,
    ):
        with pytest.raises(RunPodError, match="check RUNPOD_API_KEY"):
            await api.run({"manifest": "input/x.json"})
        dispatcher = Dispatcher(
            storage=storage,
            layout=Layout(),
            api=api,
            settings=dispatch_settings(runpod),
            name="d",
        )
        result = await dispatcher.dispatch("input/x.json")
    assert result.verdict is Verdict.failed and "HTTP 401" in result.detail
    assert len(runpod.runs()) == 2  # a refusal is not retried


async def test_gone_and_ignored_keys_send_nothing(s3: S3Settings, runpod: RunPodStandIn) -> None:
    harness = Harness(s3, runpod)
    async with harness.dispatcher() as dispatcher:
        assert (await dispatcher.dispatch("input/never.json")).verdict is Verdict.gone
        assert (await dispatcher.dispatch("input/_done/x.json")).verdict is Verdict.ignored
    assert runpod.runs() == []


async def test_stale_markers_are_sent_again_and_finished_ones_cleaned_up(
    moto_server: S3Server, s3: S3Settings, runpod: RunPodStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("ended", "running", "finished"):
        put(moto_server, s3, f"input/{name}.json")
    harness = Harness(s3, runpod, check_after=0.0, settings={"dispatch_max_requests": 2})
    async with harness.dispatcher() as dispatcher:
        sent = {r.key: r.job_id for r in await dispatcher.sweep(full=True)}
        assert len(sent) == 3
        runpod.statuses[sent["input/ended.json"] or ""] = "FAILED"  # e.g. given back for a retry
        runpod.statuses[sent["input/running.json"] or ""] = "IN_PROGRESS"
        # "finished" ran to its end: the worker moved the manifest to _done/
        client = moto_server.client()
        client.copy_object(
            Bucket=s3.bucket_name,
            Key="input/_done/finished.json",
            CopySource={"Bucket": s3.bucket_name, "Key": "input/finished.json"},
        )
        client.delete_object(Bucket=s3.bucket_name, Key="input/finished.json")
        second = {r.key: r for r in await dispatcher.sweep(full=True)}
        assert second["input/ended.json"].verdict is Verdict.sent
        assert second["input/running.json"].verdict is Verdict.pending
        assert "input/finished.json" not in second
        assert sorted(keys_under(moto_server, s3, "input/_dispatched/")) == [
            "input/_dispatched/ended.json",
            "input/_dispatched/running.json",
        ]
        # the second request for "ended" fails too: COMFYS3_DISPATCH_MAX_REQUESTS=2 is reached
        runpod.statuses[second["input/ended.json"].job_id or ""] = "FAILED"
        caplog.set_level(logging.ERROR, logger="comfys3.dispatch")
        third = [await dispatcher.dispatch("input/ended.json") for _ in range(3)]
        assert [r.verdict for r in third] == [Verdict.gave_up] * 3
        assert caplog.text.count("giving up on input/ended.json") == 1
        # a new upload of the same name starts afresh
        put(moto_server, s3, "input/ended.json", b'{"workflow": "solid", "payload": {}}')
        assert (await dispatcher.dispatch("input/ended.json")).verdict is Verdict.sent
    assert runpod.run_manifests().count("input/ended.json") == 3
    assert runpod.run_manifests().count("input/running.json") == 1


async def test_a_job_stuck_in_the_queue_past_the_ttl_is_cancelled_and_sent_again(
    moto_server: S3Server, s3: S3Settings, runpod: RunPodStandIn
) -> None:
    put(moto_server, s3, "input/stuck.json")
    clock = [1_000_000.0]
    harness = Harness(s3, runpod, clock=lambda: clock[0], settings={"dispatch_ttl": 600})
    async with harness.dispatcher() as dispatcher:
        first = await dispatcher.dispatch("input/stuck.json")
        clock[0] += 300
        assert (await dispatcher.dispatch("input/stuck.json")).verdict is Verdict.pending
        clock[0] += 400
        again = await dispatcher.dispatch("input/stuck.json")
    assert again.verdict is Verdict.sent and again.job_id != first.job_id
    assert runpod.statuses[first.job_id or ""] == "CANCELLED"


def test_the_lambda_handler_on_real_shaped_events(
    moto_server: S3Server,
    s3: S3Settings,
    runpod: RunPodStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable, value in {
        "COMFYS3_S3_REGION": s3.region,
        "COMFYS3_S3_ACCESS_KEY": s3.access_key.get_secret_value(),
        "COMFYS3_S3_SECRET_KEY": s3.secret_key.get_secret_value(),
        "COMFYS3_S3_BUCKET_NAME": s3.bucket_name,
        "COMFYS3_S3_ENDPOINT_URL": s3.endpoint_url,
        "COMFYS3_RUNPOD_ENDPOINT_ID": ENDPOINT,
        "RUNPOD_API_KEY": API_KEY,
        "COMFYS3_RUNPOD_API_URL": runpod.url,
    }.items():
        monkeypatch.setenv(variable, value)
    put(moto_server, s3, "input/my job é.json")
    put(moto_server, s3, "input/queued.json")
    put(moto_server, s3, "input/late.json")
    answer = lambda_dispatch.handler(
        lambda_s3_event(s3.bucket_name, "input/my job é.json", "input/_claims/x.json"), None
    )
    assert answer["sent"] == 1 and answer["jobs"][0]["manifest"] == "input/my job é.json"
    # the same event again (S3 delivers at least once): nothing more is sent
    again = lambda_dispatch.handler(lambda_s3_event(s3.bucket_name, "input/my job é.json"), None)
    assert again["sent"] == 0 and again["pending"] == 1
    # an SQS-fed function gets message bodies; a scheduled one sweeps the intake
    fed = lambda_dispatch.handler(
        lambda_sqs_event(s3_notification(s3.bucket_name, "input/queued.json"), "garbage"), None
    )
    assert fed["sent"] == 1
    swept = lambda_dispatch.handler(
        {"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}}, None
    )
    assert swept["sent"] == 1 and swept["jobs"][0]["manifest"] == "input/late.json"
    assert sorted(runpod.run_manifests()) == [
        "input/late.json",
        "input/my job é.json",
        "input/queued.json",
    ]
    runpod.fail_next_runs(*[500] * 6)
    put(moto_server, s3, "input/unlucky.json")
    with pytest.raises(lambda_dispatch.DispatchFailed, match=r"input/unlucky\.json"):
        lambda_dispatch.handler(lambda_s3_event(s3.bucket_name, "input/unlucky.json"), None)


async def test_the_service_sends_on_s3_events_once_each(
    moto_server: S3Server, s3: S3Settings, runpod: RunPodStandIn
) -> None:
    queue = notifying_queue(moto_server, s3)
    put(moto_server, s3, "input/before.json")  # there before the service: the first sweep
    harness = Harness(s3, runpod)
    stop = asyncio.Event()
    async with harness.dispatcher() as dispatcher:
        service = asyncio.create_task(
            serve(
                dispatcher,
                stop=stop,
                sqs=queue.sqs,
                s3=s3,
                layout=harness.layout,
                poll_interval=5,
                fallback_interval=600,
            )
        )
        await asyncio.to_thread(put, moto_server, s3, "input/arrived.json")
        await asyncio.to_thread(queue.send, s3_notification(s3.bucket_name, "input/arrived.json"))
        deadline = time.monotonic() + 20
        while sorted(runpod.run_manifests()) != ["input/arrived.json", "input/before.json"]:
            assert time.monotonic() < deadline, runpod.run_manifests()
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(queue.counts) != (0, 0):
            assert time.monotonic() < deadline, "the event messages were not deleted"
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(service, 10)
    assert len(runpod.runs()) == 2


def test_dispatch_once_from_the_command_line(
    moto_server: S3Server,
    s3: S3Settings,
    runpod: RunPodStandIn,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    monkeypatch.delenv("COMFYS3_RUNPOD_ENDPOINT_ID", raising=False)
    for variable, value in {
        "COMFYS3_S3_REGION": s3.region,
        "COMFYS3_S3_ACCESS_KEY": s3.access_key.get_secret_value(),
        "COMFYS3_S3_SECRET_KEY": s3.secret_key.get_secret_value(),
        "COMFYS3_S3_BUCKET_NAME": s3.bucket_name,
        "COMFYS3_S3_ENDPOINT_URL": s3.endpoint_url,
        "COMFYS3_RUNPOD_API_URL": runpod.url,
    }.items():
        monkeypatch.setenv(variable, value)
    assert main(["dispatch", "--once"]) == 2
    assert "RUNPOD_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    monkeypatch.setenv("COMFYS3_RUNPOD_ENDPOINT_ID", ENDPOINT)
    put(moto_server, s3, "input/cli.json")
    assert main(["dispatch", "--once"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sent"] == 1 and summary["jobs"][0]["manifest"] == "input/cli.json"
