"""The worker's numbers (Prometheus) and its health, for the ops server to expose.

:class:`Metrics` owns its registry, so tests (and two workers in one process) never share
counters. Its methods are named after the events the worker sees, so the call sites read as
what happened ("a job finished"), not as metric plumbing.

Label values that come from outside (workflow names, error types) go through a guard that
admits a bounded number of distinct values, then files the rest under "other": a bucket full of
manifests naming a thousand made-up workflows must not become a thousand time series.

:class:`Health` answers two questions. Ready (``/healthz``): would a job sent now run? ComfyUI
answers, storage worked recently, and the worker is not stopping. Live (``/livez``): is the
process worth keeping? It is while its event loop serves the probe and nothing fatal was
reported; a worker that cannot reach storage is unready, not dead, so an orchestrator does not
restart it into the same outage.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from processor.ops.version import package_version

PHASES = ("claim", "stage", "queue", "wait", "execute", "publish", "total")
# Seconds: a cached 50 ms queue call up to a 30-minute run.
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, math.inf)
MAX_LABEL_VALUES = 50
OTHER = "other"


class LabelGuard:
    """Admits at most ``limit`` distinct values (plus ``known`` ones); the rest become "other"."""

    def __init__(self, known: Iterable[str] = (), limit: int = MAX_LABEL_VALUES) -> None:
        self.known = set(known)
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        text = "none" if value is None else "".join(c for c in str(value) if c.isprintable())
        text = text[:64] or "none"
        if text in self.known or text in self.seen:
            return text
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(text)
        return text


class Metrics:
    """Every number the worker exposes. Create one per worker; scrape ``registry``."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._started = clock()
        self._last_success: float | None = None
        self._workflow = LabelGuard()
        self._error = LabelGuard()
        self._operation = LabelGuard()
        self._phase = LabelGuard(PHASES, limit=10)
        self._ready: Gauge | None = None
        r = self.registry

        self.jobs = Counter(
            "comfys3_jobs",
            "Jobs that reached a final state, by state (succeeded, failed, cancelled, skipped) "
            "and workflow.",
            ["state", "workflow"],
            registry=r,
        )
        self.job_phase_seconds = Histogram(
            "comfys3_job_phase_seconds",
            "Seconds a job attempt spent per phase (claim, stage, queue, wait, execute, "
            "publish, total).",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.comfyui_execution_seconds = Histogram(
            "comfys3_comfyui_execution_seconds",
            "Seconds ComfyUI spent executing a prompt (from its own events), by workflow.",
            ["workflow"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "comfys3_attempts",
            "Job attempts by outcome (succeeded, retry, failed) and error type (none on "
            "success); retries are outcome=retry.",
            ["outcome", "error_type"],
            registry=r,
        )
        self.claims_lost = Counter(
            "comfys3_claims_lost",
            "Claims this worker lost while running (its lease was taken over); the attempt's "
            "results were dropped, not published.",
            registry=r,
        )
        self.claims_taken_over = Counter(
            "comfys3_claims_taken_over",
            "Stale claims of other workers this worker took over.",
            registry=r,
        )
        self.storage_errors = Counter(
            "comfys3_storage_errors",
            "Storage operations that failed, by operation (get, put, list, move, delete ...).",
            ["operation"],
            registry=r,
        )
        self.lane_prompts = Gauge(
            "comfys3_lane_prompts",
            "Prompts this worker has in ComfyUI's queue (running and waiting), by ComfyUI "
            "(comfyui, or gpu<n> with --gpus).",
            ["comfyui"],
            registry=r,
        )
        self.comfyui_prompts = Counter(
            "comfys3_comfyui_prompts",
            "Prompts a ComfyUI of this worker finished executing, by ComfyUI.",
            ["comfyui"],
            registry=r,
        )
        self.manifests_pending = Gauge(
            "comfys3_manifests_pending",
            "Manifests waiting in the intake prefix at the last look.",
            registry=r,
        )
        self.seconds_since_last_success = Gauge(
            "comfys3_seconds_since_last_success",
            "Seconds since a job last succeeded on this worker (since start, before the first).",
            registry=r,
        )
        self.seconds_since_last_success.set_function(self._since_last_success)
        self.webhooks = Counter(
            "comfys3_webhooks",
            "Webhook messages by result (delivered, failed, refused, dropped, abandoned).",
            ["result"],
            registry=r,
        )
        self.warmup_seconds = Gauge(
            "comfys3_warmup_seconds",
            "Seconds the warm-up job took (0 before it ran or when none is set).",
            registry=r,
        )
        self.warmup_succeeded = Gauge(
            "comfys3_warmup_succeeded",
            "1 when the warm-up job succeeded, 0 when it failed or has not run.",
            registry=r,
        )
        self.build = Info("comfys3_build", "The comfys3 worker's version.", registry=r)
        self.build.info({"version": package_version(), "python": platform.python_version()})

    # -- events the worker reports ----------------------------------------------------------

    def job_finished(self, state: str, workflow: str | None) -> None:
        """A job reached a final state (succeeded, failed, cancelled or skipped)."""
        self.jobs.labels(state=str(state), workflow=self._workflow(workflow)).inc()
        if str(state) == "succeeded":
            self._last_success = self._clock()

    def job_phases(self, timings: Mapping[str, float]) -> None:
        """One attempt's timings (the status's ``timings``): each phase into its histogram."""
        for phase, seconds in timings.items():
            if isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0:
                self.job_phase_seconds.labels(phase=self._phase(phase)).observe(seconds)

    def comfyui_executed(self, seconds: float, workflow: str | None) -> None:
        if math.isfinite(seconds) and seconds >= 0:
            self.comfyui_execution_seconds.labels(workflow=self._workflow(workflow)).observe(
                seconds
            )

    def attempt_finished(self, outcome: str, error_type: str | None = None) -> None:
        """One attempt ended: succeeded, retry (given back to try again) or failed."""
        self.attempts.labels(outcome=str(outcome), error_type=self._error(error_type)).inc()

    def claim_lost(self) -> None:
        self.claims_lost.inc()

    def claim_taken_over(self) -> None:
        self.claims_taken_over.inc()

    def storage_error(self, operation: str) -> None:
        self.storage_errors.labels(operation=self._operation(operation)).inc()

    def prompt_queued(self, comfyui: str = "comfyui") -> None:
        self.lane_prompts.labels(comfyui=comfyui).inc()

    def prompt_done(self, comfyui: str = "comfyui", executed: bool = True) -> None:
        self.lane_prompts.labels(comfyui=comfyui).dec()
        if executed:
            self.comfyui_prompts.labels(comfyui=comfyui).inc()

    def set_manifests_pending(self, count: int) -> None:
        self.manifests_pending.set(count)

    def webhook_result(self, result: str) -> None:
        self.webhooks.labels(result=str(result)).inc()

    def warmup_finished(self, seconds: float, succeeded: bool) -> None:
        self.warmup_seconds.set(seconds)
        self.warmup_succeeded.set(1 if succeeded else 0)

    def watch_health(self, health: Health) -> None:
        """Expose ``comfys3_ready`` (1/0), read from ``health`` at each scrape."""
        if self._ready is None:
            self._ready = Gauge(
                "comfys3_ready",
                "1 when the worker is ready to run jobs (see /healthz), else 0.",
                registry=self.registry,
            )
        self._ready.set_function(lambda: 1.0 if health.readiness().ready else 0.0)

    def _since_last_success(self) -> float:
        since = self._started if self._last_success is None else self._last_success
        return max(0.0, self._clock() - since)


# ---------------------------------------------------------------------------------------------
# Health


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


@dataclass(frozen=True)
class Readiness:
    ready: bool
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """The failing checks in one line, for a person reading a probe's answer."""
        failing = [f"{name}: {check.detail}" for name, check in self.checks.items() if not check.ok]
        return "; ".join(failing) if failing else "ready"

    def to_json(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "reason": self.reason,
            "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in self.checks.items()},
        }


ComfyCheck = Callable[[], bool]


# Past this many seconds between this machine's clock and the store's, the worker says so.
CLOCK_WARN_SECONDS = 10.0


def describe_clock_offset(offset: float) -> str:
    """For a person: how far this machine's clock is from the store's, and that it is fine."""
    if abs(offset) < CLOCK_WARN_SECONDS:
        return f"within {CLOCK_WARN_SECONDS:g} s of the store's clock ({-offset:+.0f} s)"
    way = "ahead of" if offset < 0 else "behind"
    return (
        f"this machine's clock is {abs(offset):.0f} s {way} the store's: leases do not depend "
        "on it, but times in statuses and logs are off by as much (fix NTP on this machine)"
    )


class Health:
    """Ready when ComfyUI answers, storage succeeded within ``storage_window`` seconds, and the
    worker is not stopping; live unless something fatal was reported."""

    def __init__(
        self,
        *,
        comfy_ok: ComfyCheck | None = None,
        storage_window: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.comfy_ok = comfy_ok
        self.storage_window = storage_window
        self._clock = clock
        self._storage_ok_at: float | None = None
        self._storage_error: str | None = None
        self._stopping: str | None = None
        self._fatal: str | None = None
        self._clock_offset: Callable[[], float | None] | None = None
        self._comfies: dict[str, ComfyCheck] = {}

    def set_clock_offset(self, offset: Callable[[], float | None]) -> None:
        """Where to read how far the store's clock is from this machine's (shown, never
        failing: leases do not depend on any clock)."""
        self._clock_offset = offset

    def set_comfy_check(self, comfy_ok: ComfyCheck | None, name: str = "comfyui") -> None:
        """Called once a ComfyUI is up (``lambda: client.connected``); None while it is not.
        With several (one per GPU), each is named; ready while any of them answers, and the
        detail names each."""
        if comfy_ok is None:
            self._comfies.pop(name, None)
        else:
            self._comfies[name] = comfy_ok
        self.comfy_ok = self._any_comfy if self._comfies else None

    def storage_ok(self) -> None:
        self._storage_ok_at = self._clock()

    def storage_failed(self, error: str | None = None) -> None:
        self._storage_error = (error or "storage operation failed")[:300]

    def stopping(self, reason: str = "the worker is stopping") -> None:
        self._stopping = reason

    def fatal(self, reason: str) -> None:
        """The process cannot recover (ComfyUI gave up restarting): /livez turns 503."""
        self._fatal = reason[:300]

    def readiness(self) -> Readiness:
        checks = {"comfyui": self._comfy(), "storage": self._storage()}
        clock = self._clock_check()
        if clock is not None:
            checks["clock"] = clock
        if self._stopping is not None:
            checks["worker"] = Check(False, self._stopping)
        if self._fatal is not None:
            checks["worker"] = Check(False, self._fatal)
        return Readiness(all(check.ok for check in checks.values()), checks)

    def liveness(self) -> Check:
        if self._fatal is not None:
            return Check(False, self._fatal)
        return Check(True, "the event loop answers")

    def _clock_check(self) -> Check | None:
        offset = self._clock_offset() if self._clock_offset is not None else None
        if offset is None:
            return None
        return Check(True, describe_clock_offset(offset))

    def _any_comfy(self) -> bool:
        return any(self._answers(check) for check in self._comfies.values())

    @staticmethod
    def _answers(check: ComfyCheck) -> bool:
        try:
            return bool(check())
        except Exception:
            return False

    def _comfy(self) -> Check:
        if self.comfy_ok is None:
            return Check(False, "ComfyUI is not started yet")
        try:
            up = bool(self.comfy_ok())
        except Exception as error:
            return Check(False, f"checking ComfyUI failed: {type(error).__name__}: {error}")
        if len(self._comfies) > 1:
            each = {name: self._answers(check) for name, check in self._comfies.items()}
            detail = ", ".join(
                f"{name} {'connected' if ok else 'does not answer'}" for name, ok in each.items()
            )
            return Check(up, f"{sum(each.values())} of {len(each)} answer: {detail}")
        return Check(True, "connected") if up else Check(False, "ComfyUI does not answer")

    def _storage(self) -> Check:
        if self._storage_ok_at is None:
            detail = "storage not reached yet"
            if self._storage_error:
                detail += f" (last error: {self._storage_error})"
            return Check(False, detail)
        age = self._clock() - self._storage_ok_at
        if age <= self.storage_window:
            return Check(True, f"last success {age:.0f} s ago")
        detail = f"no storage operation succeeded in {age:.0f} s (limit {self.storage_window:g} s)"
        if self._storage_error:
            detail += f"; last error: {self._storage_error}"
        return Check(False, detail)
