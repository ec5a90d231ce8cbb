"""A fleet of workers in one process, against one real S3 server: what coordination costs.

Each worker is what :func:`processor.worker.assembly.open_worker` builds, with its own S3 client
(its own S3Storage), its own lane, and a zero-cost ComfyUI (:class:`tests.instant_comfy.
InstantComfy`), served the way ``comfys3 run`` serves it: the adaptive poll interval, or
:class:`triggers.events.sqs.SqsEvents` on a queue of S3 event notifications with the slow
fallback listing behind. The workers start idle; then manifests are uploaded (as fast as the
uploader can, or at ``rate`` a second), and the run ends when every manifest has a final status.
With ``preload`` the manifests are all up before the workers start (a fleet scaled up from
zero on a backlog, as KEDA does).

S3 is SeaweedFS (``weed mini``). It cannot send event notifications to SQS, so in events mode
the uploader sends, after each PUT, the message S3 would send (one record per message, the key
URL-encoded) to a queue on a moto server in a process of its own. The uploader is a process of
its own too (tests/fleet_upload.py), as a user's producer would be.

What is counted, and where (tests/processor/worker/test_fleet_accounting.py checks that it
adds up):

- claims: every call of a worker's ``ClaimStore.acquire`` is an attempt. It is **won** or
  **taken** (another worker holds the claim). A won claim then either runs the job (the
  stand-in ComfyUI counts executions by job id), finds the manifest **gone** (another worker
  finished it: the worker drops the claim), or finds the job already **skipped** (its status
  says this upload already ran). Wasted claims = taken + gone + skipped, so
  attempts = executions + wasted for one-job manifests. Each wasted claim is also counted by
  where the worker found the key (the intake's candidate source: ``listing``, ``hint``,
  ``due``, ``claims``, ``priority``), which says which part of the intake wastes them.
- S3 requests: every HTTP request each worker's client sends (a botocore ``before-send``
  hook: retries included), by operation and by key area (``input/``, ``input/_claims/``, ...),
  and SeaweedFS's own Prometheus counters for the bucket by type (HEAD counts as GET,
  DeleteObjects as DELETE). The server's count over the run equals the workers' plus the
  uploader's, which is counted the same way, but for requests a worker's background task sent
  as the fleet stopped (a cancel-watch LIST cut off when its task was cancelled): counted
  here, they may never have reached the server, so the server may count up to one fewer per
  worker, never more.
- SQS requests: the same hook on each worker's SQS client.
- pickup: from the moment a manifest's PUT returned to the moment a worker won its claim
  (both this process's clock); tail: from the last PUT to the last final status; jobs/s:
  manifests over the span from the first PUT to the last final status.

Nothing here asserts a time; figures are printed by bench/fleet.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import json
import os
import re
import resource
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from processor.job.runner import JobOutcome, Verdict
from processor.settings import S3Settings, SqsSettings, WorkerSettings
from processor.storage.claims import Lease, Taken
from processor.storage.s3 import S3Storage
from processor.worker.assembly import open_worker, s3_layout
from processor.worker.intake import Candidate
from processor.worker.loop import Worker
from tests.instant_comfy import InstantComfy
from tests.s3_servers import S3Server, WeedMini, free_port, s3_settings_for
from tests.workers import ROOT, keys, s3_client, s3_env
from triggers.events.sqs import SqsEvents
from triggers.poll import AdaptiveInterval

# SeaweedFS's request types, from botocore's operation names.
SERVER_TYPE = {
    "PutObject": "PUT",
    "GetObject": "GET",
    "HeadObject": "GET",
    "ListObjectsV2": "LIST",
    "CopyObject": "COPY",
    "DeleteObject": "DELETE",
    "DeleteObjects": "DELETE",
}
_SAMPLE = re.compile(r"^SeaweedFS_s3_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class FleetPlan:
    workers: int
    manifests: int
    mode: str = "poll"  # poll | events
    rate: float = 0.0  # manifests a second; 0: as fast as the uploader can
    job_seconds: float = 0.0  # each prompt's length on the stand-in ComfyUI
    duplicate_events: float = 0.0  # share of manifests announced twice (SQS delivers twice)
    ghost_events: int = 0  # events for keys that were never uploaded
    timeout: float = 1800.0  # the run gives up after this many seconds
    uploaders: int = 16  # concurrent PUTs
    names: str = "counter"  # counter: job0000042; hash: 3fa9c1-job0000042
    preload: bool = False  # upload everything before the workers start
    settings: dict[str, Any] = field(default_factory=dict)  # WorkerSettings overrides


# -- counting -------------------------------------------------------------------------------


class RequestTally:
    """HTTP requests botocore clients send, by operation and by the area of keys they touch.
    ``since_mark()``: the counts since :meth:`mark` (the run's window, start-up left out)."""

    def __init__(self, input_dir: str, output_dir: str) -> None:
        self.by_operation: collections.Counter[str] = collections.Counter()
        self.by_area: collections.Counter[str] = collections.Counter()
        self._input = input_dir
        self._output = output_dir
        self._marked: tuple[collections.Counter[str], collections.Counter[str]] = (
            collections.Counter(),
            collections.Counter(),
        )

    def mark(self) -> None:
        self._marked = (collections.Counter(self.by_operation), collections.Counter(self.by_area))

    def since_mark(self) -> RequestTally:
        window = RequestTally(self._input, self._output)
        window.by_operation = self.by_operation - self._marked[0]
        window.by_area = self.by_area - self._marked[1]
        return window

    def attach(self, client: Any, service: str = "s3") -> None:
        client.meta.events.register(f"before-send.{service}", self._sent)

    def _sent(self, request: Any, event_name: str = "", **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        self.by_operation[operation] += 1
        self.by_area[f"{self.area(request.url)} {SERVER_TYPE.get(operation, operation)}"] += 1

    def area(self, url: str) -> str:
        """``input/_claims/``, ``input/``, ``output/`` ...: the prefix S3 would rate-limit."""
        parts = urlsplit(url)
        path = unquote(parts.path).lstrip("/")
        key = path.split("/", 1)[1] if "/" in path else ""
        query = parse_qs(parts.query, keep_blank_values=True)
        if "prefix" in query:
            key = query["prefix"][0]
        elif "delete" in query:
            return "(DeleteObjects)"
        for prefix in (self._input, self._output):
            if key.startswith(prefix + "/"):
                rest = key[len(prefix) + 1 :]
                sub = rest.split("/", 1)[0] + "/" if rest.startswith("_") and "/" in rest else ""
                return f"{prefix}/{sub}"
        return key.split("/", 1)[0] + "/"

    def by_server_type(self) -> collections.Counter[str]:
        counted: collections.Counter[str] = collections.Counter()
        for operation, count in self.by_operation.items():
            counted[SERVER_TYPE.get(operation, operation)] += count
        return counted


def server_counts(metrics_url: str, bucket: str) -> collections.Counter[str]:
    """SeaweedFS's request counters for ``bucket``, by type, summed over response codes."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    counts: collections.Counter[str] = collections.Counter()
    for match in _SAMPLE.finditer(text):
        labels = dict(_LABEL.findall(match["labels"]))
        if labels.get("bucket") == bucket:
            counts[labels.get("type", "?")] += int(float(match["value"]))
    return counts


def settled_server_counts(
    metrics_url: str, bucket: str, *, pause: float = 0.3, bound: float = 15.0
) -> collections.Counter[str]:
    """The counters once two reads ``pause`` apart agree (within ``bound`` seconds): SeaweedFS
    counts a request after answering it, so on a busy machine the last answers a client got
    can be missing from a read made at once."""
    deadline = time.monotonic() + bound
    last = server_counts(metrics_url, bucket)
    while time.monotonic() < deadline:
        time.sleep(pause)
        now = server_counts(metrics_url, bucket)
        if now == last:
            return now
        last = now
    return last


@dataclass
class Ledger:
    """What became of every claim attempt and every manifest, across the fleet."""

    uploaded: dict[str, float] = field(default_factory=dict)  # key -> PUT returned (time.time)
    last_upload: float = 0.0
    first_upload: float = float("inf")
    attempts: int = 0
    won: int = 0
    taken: int = 0
    gone: int = 0
    skipped: int = 0
    retried: int = 0
    finals: int = 0  # final outcomes recorded (more than manifests: a job ended twice)
    claimed_at: dict[str, float] = field(default_factory=dict)  # first won claim per key
    final_at: dict[str, float] = field(default_factory=dict)
    gone_keys: set[str] = field(default_factory=set)
    wasted_by_source: collections.Counter[str] = field(default_factory=collections.Counter)
    wasted_at: list[float] = field(default_factory=list)  # when each wasted claim was decided
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0  # manifests: the run is over once each has a final outcome
    expected_gone: set[str] = field(default_factory=set)  # ghost keys: and each was dropped

    def uploaded_now(self, key: str, at: float) -> None:
        self.uploaded[key] = at
        self.first_upload = min(self.first_upload, at)
        self.last_upload = max(self.last_upload, at)

    def upload_span(self) -> float:
        return self.last_upload - self.first_upload

    def attempt(self, key: str, result: Lease | Taken) -> None:
        self.attempts += 1
        if isinstance(result, Taken):
            self.taken += 1
            self._wasted_now()
            return
        self.won += 1
        self.claimed_at.setdefault(key, time.time())

    def dropped(self, key: str) -> None:
        self.gone += 1
        self._wasted_now()
        self.gone_keys.add(key)
        self._check_done()

    def outcome(self, outcome: JobOutcome) -> None:
        key = outcome.status.manifest_key or ""
        if outcome.verdict is Verdict.skipped or outcome.leftover:
            self.skipped += 1
            self._wasted_now()
        elif outcome.verdict is Verdict.retry:
            self.retried += 1
        elif outcome.verdict in (Verdict.succeeded, Verdict.failed):
            self.finals += 1
            self.final_at.setdefault(key, time.time())
        self._check_done()

    def _wasted_now(self) -> None:
        self.wasted_by_source[_source.get()] += 1
        self.wasted_at.append(time.time())

    def wasted_by_tenth(self) -> list[int]:
        """Wasted claims in each tenth of the run (first PUT to last final status): whether
        they come as the work arrives, all along, or at the end, when few manifests are left
        for many workers."""
        end = max(self.final_at.values(), default=self.first_upload)
        span = max(end - self.first_upload, 1e-9)
        tenths = [0] * 10
        for at in self.wasted_at:
            tenths[min(9, max(0, int(10 * (at - self.first_upload) / span)))] += 1
        return tenths

    def _check_done(self) -> None:
        if len(self.final_at) >= self.expected and self.expected_gone <= self.gone_keys:
            self.done.set()

    @property
    def wasted(self) -> int:
        return self.taken + self.gone + self.skipped


# Where the claim attempt in progress found its key: set in each attempt's own task, so the
# claim, the drop and the jobs of that attempt (tasks it starts copy it) read their own.
_source: contextvars.ContextVar[str] = contextvars.ContextVar("source", default="request")


def tap(worker: Worker, ledger: Ledger) -> None:
    """Count what ``worker`` does with its claims and jobs (wrapping, not changing, it)."""
    acquire, drop_claim, run = worker.claims.acquire, worker.retirer.drop_claim, worker.runner.run
    attempt = worker._attempt
    layout = worker.layout

    async def sourced_attempt(candidate: Candidate, slot: Any) -> Any:
        _source.set(candidate.source)
        return await attempt(candidate, slot)

    async def counted_acquire(name: str) -> Lease | Taken:
        result = await acquire(name)
        ledger.attempt(layout.manifest_key(name), result)
        return result

    async def counted_drop(claim_key: str) -> None:
        await drop_claim(claim_key)
        ledger.dropped(layout.manifest_key(layout.manifest_name(claim_key)))

    async def counted_run(*args: Any, **kwargs: Any) -> JobOutcome:
        outcome = await run(*args, **kwargs)
        ledger.outcome(outcome)
        return outcome

    worker._attempt = sourced_attempt  # type: ignore[method-assign]
    worker.claims.acquire = counted_acquire  # type: ignore[method-assign]
    worker.retirer.drop_claim = counted_drop  # type: ignore[method-assign]
    worker.runner.run = counted_run  # type: ignore[method-assign]


# -- servers --------------------------------------------------------------------------------


@contextlib.contextmanager
def moto_sqs_process(base: Path) -> Iterator[S3Server]:
    """moto's server in a process of its own (its SQS long polls hold a thread each: hundreds
    of them must not share this process's GIL with the fleet)."""
    port = free_port()
    log = (base / "moto.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    server = S3Server("moto", f"http://127.0.0.1:{port}", "moto-access", "moto-secret")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{server.endpoint_url}/moto-api/", timeout=1).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def make_queue(server: S3Server) -> str:
    import boto3

    client = boto3.client(
        "sqs",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
    )
    return str(client.create_queue(QueueName=f"fleet-{uuid.uuid4().hex[:12]}")["QueueUrl"])


def weed_cpu_seconds(weed: WeedMini) -> float:
    """CPU seconds the SeaweedFS process has used (user + system), from /proc."""
    if weed.process is None:
        return 0.0
    try:
        fields = Path(f"/proc/{weed.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one run --------------------------------------------------------------------------------


@dataclass
class FleetReport:
    plan: FleetPlan
    ledger: Ledger
    executions: collections.Counter[str]
    worker_requests: RequestTally
    uploader_requests: RequestTally
    sqs_requests: RequestTally
    server_requests: collections.Counter[str]  # SeaweedFS, over the run
    wall: float
    cpu: float
    weed_cpu: float
    rss_before: float
    rss_workers: float
    rss_peak: float
    completed: bool
    bucket: dict[str, int] = field(default_factory=dict)  # objects left per area, after

    # -- figures --

    @property
    def manifests(self) -> int:
        return self.plan.manifests

    def span(self) -> float:
        ends = self.ledger.final_at.values()
        return max(ends) - self.ledger.first_upload if ends else float("nan")

    def pickups(self) -> list[float]:
        ledger = self.ledger
        return sorted(
            ledger.claimed_at[key] - ledger.uploaded[key]
            for key in ledger.uploaded
            if key in ledger.claimed_at
        )

    def figures(self) -> dict[str, Any]:
        ledger, jobs = self.ledger, max(1, self.manifests)
        pickups = self.pickups()
        tail = max(ledger.final_at.values(), default=float("nan")) - ledger.last_upload
        s3, sqs = self.worker_requests.since_mark(), self.sqs_requests.since_mark()
        s3_total = sum(s3.by_operation.values())
        sqs_total = sum(sqs.by_operation.values())
        return {
            "mode": self.plan.mode,
            "workers": self.plan.workers,
            "manifests": self.manifests,
            "job_seconds": self.plan.job_seconds,
            "rate": "preloaded" if self.plan.preload else self.plan.rate or "max",
            "completed": self.completed,
            "finished": len(ledger.final_at),
            "jobs_per_s": round(len(ledger.final_at) / self.span(), 1),
            "claim_attempts": ledger.attempts,
            "wasted_claims": ledger.wasted,
            "wasted_pct": round(100 * ledger.wasted / max(1, ledger.attempts), 1),
            "wasted_by_kind": {
                "taken": ledger.taken,
                "gone": ledger.gone,
                "skipped": ledger.skipped,
            },
            "wasted_by_source": dict(sorted(ledger.wasted_by_source.items())),
            "wasted_by_tenth": ledger.wasted_by_tenth(),
            "executions": sum(self.executions.values()),
            "s3_requests_per_job": round(s3_total / jobs, 2),
            "s3_per_job_by_type": _per_job(s3.by_server_type(), jobs),
            "s3_per_job_by_operation": _per_job(s3.by_operation, jobs),
            "s3_per_job_by_area": _per_job(s3.by_area, jobs),
            "sqs_requests_per_job": round(sqs_total / jobs, 2),
            "sqs_per_job_by_operation": _per_job(sqs.by_operation, jobs),
            "pickup_p50_s": round(_quantile(pickups, 0.5), 3),
            "pickup_p95_s": round(_quantile(pickups, 0.95), 3),
            "pickup_max_s": round(pickups[-1], 3) if pickups else None,
            "tail_s": round(tail, 2),
            "upload_s": round(ledger.upload_span(), 2),
            "wall_s": round(self.wall, 1),
            "cpu_ms_per_job": round(1000 * self.cpu / jobs, 1),
            "weed_cpu_ms_per_job": round(1000 * self.weed_cpu / jobs, 1),
            "rss_mb_per_worker": round((self.rss_workers - self.rss_before) / self.plan.workers, 2),
            "rss_peak_mb": round(self.rss_peak),
            "server_vs_counted": {
                "server": dict(sorted(self.server_requests.items())),
                "counted": dict(sorted(self.counted_requests().items())),
            },
            "checks": self.checks(),
        }

    def counted_requests(self) -> collections.Counter[str]:
        """The workers' and the uploader's S3 requests over the run, by SeaweedFS's types."""
        return self.worker_requests.by_server_type() + self.uploader_requests.by_server_type()

    def requests_match_server(self) -> bool:
        """Each type as SeaweedFS counted it, or up to one fewer per worker (see the module's
        docstring: a request cut off at the stop is counted here and maybe not there)."""
        counted, server = self.counted_requests(), self.server_requests
        return set(server) <= set(counted) and all(
            0 <= counted[kind] - server[kind] <= self.plan.workers for kind in counted
        )

    def checks(self) -> dict[str, bool]:
        """What must hold for the figures to mean anything."""
        ledger = self.ledger
        uploaded = set(ledger.uploaded)
        return {
            "every_manifest_final": set(ledger.final_at) == uploaded,
            "each_final_once": ledger.finals == len(uploaded),
            "each_job_ran_once": set(self.executions) == {_job(k) for k in uploaded}
            and set(self.executions.values()) <= {1},
            "attempts_add_up": ledger.attempts == sum(self.executions.values()) + ledger.wasted,
            "won_add_up": ledger.won
            == sum(self.executions.values()) + ledger.gone + ledger.skipped,
            "requests_match_server": self.requests_match_server(),
            "intake_empty": self.bucket.get("intake", -1) == 0,
            "claims_empty": self.bucket.get("claims", -1) == 0,
            "all_retired": self.bucket.get("done", -1) == len(uploaded),
        }


def _job(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(".json")


def _per_job(counts: collections.Counter[str], jobs: int) -> dict[str, float]:
    return {name: round(count / jobs, 3) for name, count in sorted(counts.items()) if count}


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class FleetRun:
    """One run of ``plan`` against SeaweedFS (``weed``) and, in events mode, moto's SQS."""

    def __init__(
        self,
        plan: FleetPlan,
        weed: WeedMini,
        server: S3Server,
        sqs_server: S3Server | None = None,
        say: Callable[[str], None] = lambda line: None,
    ) -> None:
        if plan.mode not in ("poll", "events"):
            raise ValueError(f"mode must be poll or events, not {plan.mode!r}")
        if plan.mode == "events" and sqs_server is None:
            raise ValueError("events mode needs an SQS server")
        if plan.mode == "poll" and (plan.ghost_events or plan.duplicate_events):
            raise ValueError("ghost and duplicate events need events mode")
        self.plan = plan
        self.weed = weed
        self.server = server
        self.sqs_server = sqs_server
        self.say = say
        self.s3: S3Settings = s3_settings_for(server)
        self.layout = s3_layout(self.s3)
        self.ledger = Ledger()
        self.worker_requests = RequestTally(self.layout.input_dir, self.layout.output_dir)
        self.uploader_requests = RequestTally(self.layout.input_dir, self.layout.output_dir)
        self.sqs_requests = RequestTally(self.layout.input_dir, self.layout.output_dir)
        self.comfys: list[InstantComfy] = []
        self.idle: list[asyncio.Event] = []  # set once each worker first waited for work
        self.sqs: SqsSettings | None = None

    async def run(self) -> FleetReport:
        plan = self.plan
        if self.sqs_server is not None and plan.mode == "events":
            url = await asyncio.to_thread(make_queue, self.sqs_server)
            self.sqs = SqsSettings(queue_url=url, endpoint_url=self.sqs_server.endpoint_url)
        ghosts = [self.layout.manifest_key(f"ghost{n:05d}") for n in range(plan.ghost_events)]
        self.ledger.expected = plan.manifests
        self.ledger.expected_gone = set(ghosts)
        rss_before = rss_mb()
        stop = asyncio.Event()
        metrics, bucket = self.weed.metrics_url, self.s3.bucket_name
        before = await asyncio.to_thread(server_counts, metrics, bucket)
        if plan.preload:
            await self._upload(ghosts)
        async with contextlib.AsyncExitStack() as stack:
            workers = [
                await stack.enter_async_context(self._worker(i)) for i in range(plan.workers)
            ]
            self.say(f"{plan.workers} workers open ({plan.mode})")
            rss_workers = rss_mb()

            async def serve() -> list[asyncio.Task[Any]]:
                return [
                    asyncio.create_task(
                        await stack.enter_async_context(self._serve(worker, stop)), name=f"w{i}"
                    )
                    for i, worker in enumerate(workers)
                ]

            if not plan.preload:  # the fleet waits, idle, for the work to come
                serving = await serve()
                # Every worker past its first (empty) sweep and waiting: a sweep still under
                # way when the manifests come would walk the whole upload as a poller does.
                await asyncio.wait_for(
                    asyncio.gather(*(event.wait() for event in self.idle)), plan.timeout
                )
                self.worker_requests.mark()
                self.sqs_requests.mark()
            cpu, weed_cpu = time.process_time(), weed_cpu_seconds(self.weed)
            started = time.monotonic()
            peak = [rss_workers]
            sampler = asyncio.create_task(self._sample_rss(peak, stop))
            if plan.preload:  # the work waits for the fleet (scaled up from zero on it)
                serving = await serve()
            else:
                await self._upload(ghosts)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ledger.done.wait(), plan.timeout)
            completed = self.ledger.done.is_set()
            stop.set()
            await asyncio.gather(*serving, return_exceptions=True)
            await sampler
            wall = time.monotonic() - started
            cpu = time.process_time() - cpu
        weed_cpu = weed_cpu_seconds(self.weed) - weed_cpu
        # Every client is closed: nothing is in flight, the server's count is final.
        after = await asyncio.to_thread(settled_server_counts, metrics, bucket)
        executions: collections.Counter[str] = collections.Counter()
        for comfy in self.comfys:
            executions.update(comfy.executions)
        return FleetReport(
            plan=plan,
            ledger=self.ledger,
            executions=executions,
            worker_requests=self.worker_requests,
            uploader_requests=self.uploader_requests,
            sqs_requests=self.sqs_requests,
            server_requests=after - before,
            wall=wall,
            cpu=cpu,
            weed_cpu=weed_cpu,
            rss_before=rss_before,
            rss_workers=rss_workers,
            rss_peak=peak[0],
            completed=completed,
            bucket=await asyncio.to_thread(self._bucket_after),
        )

    # -- parts --

    @contextlib.asynccontextmanager
    async def _worker(self, index: int) -> AsyncIterator[Worker]:
        # No start-up check of conditional writes: SeaweedFS honours them (tests say so), and
        # every request a worker sends is then counted from its first.
        settings = WorkerSettings(
            worker_id=f"w{index:03d}", check_conditional_writes=False, **self.plan.settings
        )
        comfy = InstantComfy(self.plan.job_seconds)
        self.comfys.append(comfy)
        storage = S3Storage(self.s3)
        async with open_worker(
            storage=storage, layout=self.layout, settings=settings, comfy=comfy
        ) as worker:
            self.worker_requests.attach(storage._client)  # the bench may look inside
            tap(worker, self.ledger)
            yield worker

    @contextlib.asynccontextmanager
    async def _serve(self, worker: Worker, stop: asyncio.Event) -> AsyncIterator[Any]:
        """The coroutine that serves ``worker`` as ``comfys3 run`` does, with what it needs
        (an SQS listener) open around it."""
        settings = worker.settings
        idle = asyncio.Event()
        self.idle.append(idle)

        def waiting(wait: Callable[[bool], Awaitable[None]]) -> Callable[[bool], Awaitable[None]]:
            """``wait``, noting the worker's first wait for work (its first sweep is over)."""

            async def wait_for_work(found_work: bool) -> None:
                if not found_work:
                    idle.set()
                await wait(found_work)

            return wait_for_work

        if self.sqs is None:
            interval = AdaptiveInterval(
                settings.triggers.poll_min_interval, settings.triggers.poll_max_interval, stop
            )
            yield worker.run(wait_for_work=waiting(interval.wait), stop=stop)
            return
        events = SqsEvents(
            sqs=self.sqs,
            s3=self.s3,
            layout=self.layout,
            stop=stop,
            on_key=lambda key, ack: worker.hint(key, on_outcome=ack),
            fallback_interval=settings.triggers.events_fallback_interval,
            max_in_flight=settings.lane.lane_depth_max,
            retry_visibility=max(1, round(settings.jobs.retry_delay)),
        )
        async with events:
            self.sqs_requests.attach(events._client, "sqs")
            yield worker.run(
                wait_for_work=waiting(events.wait_for_work), stop=stop, may_list=events.listing_due
            )

    async def _sample_rss(self, peak: list[float], stop: asyncio.Event) -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _upload(self, ghosts: list[str]) -> None:
        """Run the producer (tests/fleet_upload.py) in a process of its own and note when
        each PUT returned, and the requests it sent."""
        plan = self.plan
        spec = {
            "manifests": plan.manifests,
            "rate": plan.rate,
            "uploaders": plan.uploaders,
            "names": plan.names,
            "events": self.sqs is not None,
            "duplicate_events": plan.duplicate_events,
            "ghosts": [self.layout.manifest_name(key) for key in ghosts],
        }
        extra = {}
        if self.sqs is not None:
            extra = {"sqs_queue_url": self.sqs.queue_url, "sqs_endpoint_url": self.sqs.endpoint_url}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.fleet_upload", json.dumps(spec),
            cwd=ROOT, env=s3_env(self.s3, **extra), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the uploader failed ({process.returncode})")
        result = json.loads(out)
        for key, at in result["uploaded"]:
            self.ledger.uploaded_now(key, at)
        self.uploader_requests.by_operation.update(result["requests"])
        self.say(f"{len(result['uploaded'])} manifests up in {self.ledger.upload_span():.1f} s")

    def _bucket_after(self) -> dict[str, int]:
        client = s3_client(self.s3)
        inputs = self.layout.input_dir
        return {
            "intake": len(keys(client, self.s3, f"{inputs}/", delimiter="/")),
            "claims": len(keys(client, self.s3, f"{self.layout.claims_prefix}/")),
            "done": len(keys(client, self.s3, f"{inputs}/_done/")),
        }
