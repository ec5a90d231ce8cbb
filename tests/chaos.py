"""A chaos run: `comfys3 run` worker processes share a backlog on SeaweedFS while the bucket is
stopped and started again, a worker is SIGKILLed (and started again), and a worker's own
ComfyUI is killed under it, with poison manifests and claims mixed into the work.

tests/processor/worker/test_chaos.py runs a short one and asserts the invariants; bench/chaos.py
runs a long one
and prints the figures. Nothing here asserts a time. What is counted, and from where:

- executions: every fake ComfyUI appends a line to its own ``exec_log`` when a prompt starts
  and when it ends; the save prefix in the prompt (``comfys3/<job id>/<run id>/<node>``) names
  the job. These files outlive a killed ComfyUI, whose ``/fake/stats`` die with it.
- claims, wasted claims, ComfyUI restarts: the workers' JSON logs (``--log-format json``):
  ``claimed <key>`` for every claim won, ``<key> is gone (finished by another worker)`` for a
  claim won on a manifest that another worker had already finished and retired.
- S3 requests: SeaweedFS's own Prometheus counters (``SeaweedFS_s3_request_total`` for the
  bucket, by type and code; HEAD counts as GET), read every second and just before the
  server is stopped; a restarted server starts them from zero,
  which the sampler accounts for. Requests sent while the server is down reach nothing and
  are not counted. The run's own requests (set-up excluded, the final checks included) are
  counted on its client and taken off.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from processor.settings import S3Settings
from tests.s3_servers import WeedMini, free_port, s3_settings_for
from tests.workers import ROOT, FakeComfyProcess, comfys3, keys, s3_client, s3_env

FAKE_DIR = ROOT / "tests" / "fake_comfyui"
GONE = " is gone (finished by another worker)"
MAX_ATTEMPTS = 3


# -- poisons --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Poison:
    """A manifest or claim (or both) made to hurt, and what must become of it.

    ``expect``: a final state and error type (``failed:invalid_manifest``), ``succeeded`` (a
    valid manifest behind a poisoned claim), ``no_status`` (nothing can be recorded for it,
    the manifest only leaves the intake), ``set_aside`` (never claimed: moved to ``_failed/``
    under a safe name) or ``claim_removed`` (a claim with no manifest).
    """

    kind: str
    name: str  # the manifest's file stem
    manifest: bytes | None
    claim: bytes | None
    expect: str

    @property
    def status_id(self) -> str | None:
        return None if self.expect in ("no_status", "set_aside", "claim_removed") else self.name


SOLID = b'{"workflow": "solid", "payload": {"color": 255}}'


def poisons(image_key: str) -> dict[str, Poison]:
    deep = b'{"workflow": "solid", "payload": {"color": ' + b"[" * 2000 + b"]" * 2000 + b"}}"
    big = b'{"workflow": "solid", "payload": {"width": ' + b"7" * 5000 + b"}}"
    surrogate = b'{"workflow": "solid", "batch": [{"color": 1}, {"color": "\\ud800"}]}'
    empty_png = json.dumps({"workflow": "scale", "payload": {"image": image_key}}).encode()
    ghost = {"name": "x", "holder": "ghost", "attempt": 1, "tries": 1, "state": "held"}
    found = [
        Poison("json_2000_deep", "job0050-deep", deep, None, "failed:invalid_manifest"),
        Poison("int_5000_digits", "job0110-bigint", big, None, "failed:invalid_manifest"),
        Poison("dotdot_name", ".", SOLID, None, "no_status"),
        Poison("control_char_name", "job0170-bell\x07", SOLID, None, "set_aside"),
        Poison("claim_attempt_1e400", "job0230-claim-attempt", SOLID, b'{"attempt": 1e400}',
               "succeeded"),
        Poison("claim_expires_1e400", "job0290-claim-expiry", SOLID,
               json.dumps(ghost).encode()[:-1] + b', "expires_at": 1e400}', "succeeded"),
        Poison("claim_expires_1e15", "job0310-claim-future", SOLID,
               json.dumps({**ghost, "expires_at": 1e15}).encode(), "succeeded"),
        Poison("claim_without_manifest", "job0330-orphan", None,
               json.dumps({**ghost, "expires_at": 1.0}).encode(), "claim_removed"),
        Poison("batch_lone_surrogate", "job0350-surrogate", surrogate, None,
               "failed:invalid_manifest"),
        Poison("input_png_0_bytes", "job0370-empty-png", empty_png, None, "failed:input_invalid"),
    ]  # fmt: skip
    return {poison.kind: poison for poison in found}


# -- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosPlan:
    """What to run and when to break what; the ``*_at`` values are fractions of the jobs
    executed, so the chaos lands mid-run on a fast machine and a slow one alike."""

    workers: int = 4
    manifests: int = 400
    exec_delay: float = 0.3
    lease_seconds: float = 120.0  # the worker's default
    retry_delay: float = 2.0  # the worker's default
    s3_outage: float = 30.0
    outage_at: float = 0.35
    kill_worker_at: float = 0.2
    # When worker w0's own ComfyUI is killed; empty: every worker attaches to a fake process.
    comfy_kills_at: tuple[float, ...] = (0.1, 0.6)
    poison_kinds: tuple[str, ...] = tuple(poisons("").keys())
    s3_retry_attempts: int = 5  # botocore's tries per S3 call (COMFYS3_S3_RETRY_ATTEMPTS)
    timeout: float = 900.0

    @property
    def killed_worker(self) -> int:
        return self.workers - 1  # never w0, whose ComfyUI is killed instead


# -- counting -------------------------------------------------------------------------------


_SAMPLE = re.compile(r"^SeaweedFS_s3_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


class RequestSampler:
    """SeaweedFS's request counters for one bucket, read every second, across restarts."""

    def __init__(self, url: Callable[[], str], bucket: str, interval: float = 1.0) -> None:
        self._url = url
        self._bucket = bucket
        self._interval = interval
        self._last: dict[str, float] = {}
        self.total: collections.Counter[str] = collections.Counter()  # "PUT 200" -> n
        self.samples: list[tuple[float, collections.Counter[str]]] = []  # cumulative
        self._stop = threading.Event()
        self._lock = threading.Lock()  # sampled from its thread and, before a stop, the run's
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        """Take the last sample (once) and stop sampling."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        try:
            with urllib.request.urlopen(self._url(), timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return  # the server is down: nothing reaches it, nothing to count
        now: dict[str, float] = {}
        for match in _SAMPLE.finditer(text):
            labels = dict(_LABEL.findall(match["labels"]))
            if labels.get("bucket") == self._bucket:
                now[f"{labels.get('type')} {labels.get('code')}"] = float(match["value"])
        with self._lock:
            restarted = any(value < self._last.get(name, 0) for name, value in now.items())
            for name, value in now.items():
                before = 0.0 if restarted else self._last.get(name, 0.0)
                self.total[name] += int(value - before)
            self._last = now
            self.samples.append((time.time(), collections.Counter(self.total)))


class OwnRequests:
    """The run's own S3 requests, by time, so they can be taken off the server's counts."""

    def __init__(self, client: Any) -> None:
        self.times: list[float] = []
        self.counting = False
        client.meta.events.register("before-send.s3", self._sent)

    def _sent(self, **_: Any) -> None:
        if self.counting:
            self.times.append(time.time())


@dataclass
class Execution:
    fake: str
    prompt_id: str
    job_id: str
    started: float
    ended: float | None = None
    success: bool = False


class ExecLogs:
    """The fakes' exec_log files, read incrementally: which prompt ran for which job, where."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self._offsets: dict[str, int] = {}
        self.runs: dict[tuple[str, str], Execution] = {}
        self.done_jobs: set[str] = set()

    def add(self, fake: str, path: Path) -> None:
        self.files[fake] = path
        self._offsets[fake] = 0

    def read(self) -> None:
        for fake, path in self.files.items():
            if not path.exists():
                continue
            with path.open("rb") as handle:
                handle.seek(self._offsets[fake])
                data = handle.read()
            complete = data[: data.rfind(b"\n") + 1]
            self._offsets[fake] += len(complete)
            for line in complete.splitlines():
                self._line(fake, json.loads(line))

    def _line(self, fake: str, event: dict[str, Any]) -> None:
        key = (fake, event["prompt_id"])
        if event["event"] == "start":
            prefixes = event.get("prefixes") or ["?/?"]
            job_id = prefixes[0].split("/")[1] if prefixes[0].count("/") >= 2 else "?"
            self.runs[key] = Execution(fake, event["prompt_id"], job_id, event["t"])
        elif key in self.runs:
            run = self.runs[key]
            run.ended, run.success = event["t"], bool(event.get("success"))
            if run.success:
                self.done_jobs.add(run.job_id)

    def completed(self) -> dict[str, list[Execution]]:
        by_job: dict[str, list[Execution]] = collections.defaultdict(list)
        for run in self.runs.values():
            if run.success:
                by_job[run.job_id].append(run)
        return by_job

    def cut_short(self) -> list[Execution]:
        """Prompts that started and never ended: their ComfyUI was killed under them."""
        return [run for run in self.runs.values() if run.ended is None]


# -- the processes --------------------------------------------------------------------------


class WorkerProcess:
    """One `comfys3 run --log-format json`, restartable; each incarnation logs to its own file."""

    def __init__(self, name: str, env: dict[str, str], folder: Path) -> None:
        self.name = name
        self.env = env
        self.folder = folder
        self.incarnations: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self) -> None:
        log = self.folder / f"{self.name}.{len(self.incarnations)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                comfys3("run", "--log-format", "json"),
                env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.incarnations.append((process, log))

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.incarnations[-1][0]

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for _, log in self.incarnations:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        records.append(json.loads(line))
        return records

    def ready(self) -> bool:
        """The current incarnation has said it is ready (storage checked, ComfyUI answering)."""
        log = self.incarnations[-1][1]
        return any(
            line.startswith("{") and f'"message": "worker {self.name} ready: ' in line
            for line in log.read_text(errors="replace").splitlines()
        )

    def comfyui_pids(self) -> list[int]:
        found = []
        for record in self.log_records():
            match = re.match(r"started ComfyUI pid (\d+) ", record.get("message", ""))
            if match:
                found.append(int(match[1]))
        return found


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def queue_empty(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/queue", timeout=5) as response:
            queue = json.loads(response.read())
    except OSError:
        return False
    return not queue["queue_running"] and not queue["queue_pending"]


# -- the run --------------------------------------------------------------------------------


@dataclass
class ChaosReport:
    """What a chaos run left behind, and the figures and verdicts drawn from it."""

    plan: ChaosPlan
    poison_list: list[Poison] = field(default_factory=list)
    expected_runs: list[str] = field(default_factory=list)  # job ids that must run to the end
    events: list[tuple[float, str]] = field(default_factory=list)
    wall_seconds: float = 0.0
    outage_seconds: float = 0.0  # from the stop to the first answer after the restart
    killed_worker_fake: str = ""
    worker_restarted_at: float = 0.0  # epoch seconds
    comfyui_kills: list[float] = field(default_factory=list)  # epoch seconds
    # What the bucket holds at the end
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)  # manifest names in _done/
    failed: set[str] = field(default_factory=set)  # manifest names in _failed/
    left_pending: list[str] = field(default_factory=list)
    left_claims: list[str] = field(default_factory=list)
    # What the workers and the fakes logged
    claims_by_name: collections.Counter[str] = field(default_factory=collections.Counter)
    gone_by_name: collections.Counter[str] = field(default_factory=collections.Counter)
    comfyui_starts: int = 0
    completed: dict[str, list[Execution]] = field(default_factory=dict)
    cut_short: list[Execution] = field(default_factory=list)
    tracebacks: int = 0
    alive_at_end: dict[str, bool] = field(default_factory=dict)
    exits: dict[str, list[int | None]] = field(default_factory=dict)
    # What SeaweedFS counted
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    own_requests: int = 0
    intervals: list[tuple[float, float, collections.Counter[str]]] = field(default_factory=list)

    @property
    def regular_ids(self) -> list[str]:
        return [f"job{n:04d}" for n in range(self.plan.manifests)]

    def failed_by_type(self) -> dict[str, int]:
        found = collections.Counter(
            (s.get("error") or {}).get("type", "?")
            for s in self.statuses.values()
            if s.get("state") == "failed"
        )
        return dict(found)

    def succeeded(self) -> int:
        return sum(1 for s in self.statuses.values() if s.get("state") == "succeeded")

    def lost(self) -> list[str]:
        """Jobs that should have succeeded but have no succeeded status, or whose manifest did
        not reach ``_done/``."""
        return [
            job_id
            for job_id in self.expected_runs
            if (self.statuses.get(job_id) or {}).get("state") != "succeeded"
            or job_id not in self.done
        ]

    def duplicates(self) -> dict[str, dict[str, int]]:
        """Jobs ComfyUI ran to the end more than once ({job id: runs}), by what explains it:

        - ``killed_worker``: one run was on the SIGKILLed worker's ComfyUI before the worker was
          started again (its queue was let run dry first): the dead worker's own prompts;
        - ``killed_comfyui``: one run on w0's ComfyUI ended in the 10 s before that ComfyUI was
          killed: its outputs died with it before the worker had fetched them;
        - ``unexplained``: anything else, which must not happen.
        """
        found: dict[str, dict[str, int]] = {
            "killed_worker": {},
            "killed_comfyui": {},
            "unexplained": {},
        }
        for job_id, runs in self.completed.items():
            if len(runs) < 2:
                continue
            if any(
                run.fake == self.killed_worker_fake and run.started < self.worker_restarted_at
                for run in runs
            ):
                found["killed_worker"][job_id] = len(runs)
            elif any(
                run.fake == "w0" and run.ended is not None and kill - 10 <= run.ended <= kill
                for run in runs
                for kill in self.comfyui_kills
            ):
                found["killed_comfyui"][job_id] = len(runs)
            else:
                found["unexplained"][job_id] = len(runs)
        return found

    def wasted(self) -> tuple[int, int]:
        """(claims won on manifests another worker had already finished, claims won)."""
        return sum(self.gone_by_name.values()), sum(self.claims_by_name.values())

    def poison_results(self) -> dict[str, dict[str, Any]]:
        """Per poison: claims won on it, of which ``gone`` found it already finished (another
        worker's claim had settled it), what became of it, and whether that is right."""
        results = {}
        for poison in self.poison_list:
            claims, gone = self.claims_by_name[poison.name], self.gone_by_name[poison.name]
            status = self.statuses.get(poison.status_id or "") or {}
            if poison.expect.startswith("failed:"):
                error = (status.get("error") or {}).get("type")
                outcome = f"{status.get('state')}:{error}"
                ok = outcome == poison.expect and poison.name in self.failed
            elif poison.expect == "succeeded":
                outcome = str(status.get("state"))
                ok = outcome == "succeeded" and poison.name in self.done
            elif poison.expect == "no_status":
                ok = poison.name in self.failed and not status
                outcome = "in _failed/, no status" if ok else "?"
            elif poison.expect == "set_aside":
                ok = quote(poison.name, safe="") in self.failed and claims == 0
                outcome = "set aside to _failed/, never claimed" if ok else "?"
            else:  # claim_removed
                ok = not any(_stem(key) == poison.name for key in self.left_claims)
                outcome = "claim removed" if ok else "claim left"
            results[poison.kind] = {
                "claims": claims,
                "gone": gone,
                "outcome": outcome,
                "ok": ok and claims - gone <= MAX_ATTEMPTS,
            }
        return results

    def unexpected_exits(self) -> list[str]:
        """Workers not running at the end (the killed one was started again)."""
        return [name for name, alive in self.alive_at_end.items() if not alive]

    def worker_requests(self) -> int:
        return sum(self.requests.values()) - self.own_requests

    def worst_second(self) -> int:
        """The most requests the workers made in one sampling interval (about a second); an
        interval longer than 1.5 s (the server was down, or a sample was late) is averaged."""
        worst = 0.0
        for _, seconds, delta in self.intervals:
            count = sum(delta.values())
            worst = max(worst, count / seconds if seconds > 1.5 else count)
        return round(worst)

    def figures(self) -> dict[str, Any]:
        duplicates = self.duplicates()
        wasted, won = self.wasted()
        poisons = self.poison_results()
        total = self.worker_requests()
        return {
            "workers": self.plan.workers,
            "manifests": self.plan.manifests,
            "poisons": len(self.poison_list),
            "settings": {
                "exec_delay_s": self.plan.exec_delay,
                "lease_seconds": self.plan.lease_seconds,
                "retry_delay_s": self.plan.retry_delay,
                "s3_outage_s": self.plan.s3_outage,
            },
            "wall_s": round(self.wall_seconds, 1),
            "s3_unavailable_s": round(self.outage_seconds, 1),
            "succeeded": self.succeeded(),
            "failed_by_error_type": self.failed_by_type(),
            "lost": len(self.lost()),
            "duplicate_executions": {
                why: sum(runs.values()) - len(runs) for why, runs in duplicates.items()
            },
            "duplicate_jobs_unexplained": duplicates["unexplained"],
            "prompts_cut_short_by_comfyui_kills": len(self.cut_short),
            "comfyui_restarts_seen": max(0, self.comfyui_starts - 1),
            "left_in_input": len(self.left_pending),
            "left_in_claims": len(self.left_claims),
            "poisons_detail": poisons,
            "poisons_all_ok": all(p["ok"] for p in poisons.values()),
            "claims_won": won,
            "wasted_claims": wasted,
            "wasted_claims_pct": round(100 * wasted / max(1, won), 2),
            "s3_requests": total,
            "s3_requests_per_job": round(total / max(1, self.plan.manifests), 2),
            "s3_requests_worst_second": self.worst_second(),
            "s3_requests_by_type_and_code": dict(sorted(self.requests.items())),
            "worker_exits_unexpected": self.unexpected_exits(),
            "worker_exit_codes": self.exits,
            "worker_tracebacks_logged": self.tracebacks,
        }


def _stem(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(".json")


class ChaosRun:
    """Sets up the bucket, the fakes and the workers, breaks things on schedule, waits for the
    backlog to drain, stops everything and fills a :class:`ChaosReport`."""

    def __init__(self, plan: ChaosPlan, base: Path, say: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.base = base
        self.say = say
        self.report = ChaosReport(plan)
        self.weed = WeedMini(base / "weed")
        self.execs = ExecLogs()
        self.workers: list[WorkerProcess] = []
        self.fakes: dict[int, FakeComfyProcess] = {}
        self.sampler: RequestSampler | None = None
        self.t0 = 0.0

    # -- set-up --

    def _event(self, what: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.report.events.append((elapsed, what))
        self.say(f"[{elapsed:6.1f}s] {what}")

    def _upload(self, s3: S3Settings, client: Any) -> None:
        bucket = s3.bucket_name
        image_key = "uploads/empty.png"
        client.put_object(Bucket=bucket, Key=image_key, Body=b"")
        chosen = [poisons(image_key)[kind] for kind in self.plan.poison_kinds]
        self.report.poison_list = chosen
        for poison in chosen:
            if poison.claim is not None:
                key = f"{s3.input_dir}/_claims/{poison.name}.json"
                client.put_object(Bucket=bucket, Key=key, Body=poison.claim)
        for n in range(self.plan.manifests):
            body = json.dumps({"workflow": "solid", "payload": {"color": n}}).encode()
            client.put_object(Bucket=bucket, Key=f"{s3.input_dir}/job{n:04d}.json", Body=body)
        for poison in chosen:
            if poison.manifest is not None:
                key = f"{s3.input_dir}/{poison.name}.json"
                client.put_object(Bucket=bucket, Key=key, Body=poison.manifest)
        self.report.expected_runs = [f"job{n:04d}" for n in range(self.plan.manifests)] + [
            p.name for p in chosen if p.expect == "succeeded"
        ]

    def _worker_env(self, index: int, s3: S3Settings) -> dict[str, str]:
        exec_log = self.base / f"exec-w{index}.jsonl"
        common = {
            "worker_id": f"w{index}",
            "lease_seconds": self.plan.lease_seconds,
            "retry_delay": self.plan.retry_delay,
            "max_attempts": MAX_ATTEMPTS,
            "poll_min_interval": 0.2,
            "poll_max_interval": 1.0,
            "shutdown_grace": 5,
            "s3_retry_attempts": self.plan.s3_retry_attempts,
        }
        owns = index == 0 and bool(self.plan.comfy_kills_at)
        self.execs.add(f"w{index}", exec_log)
        if not owns:
            fake = FakeComfyProcess(
                self.base / f"fake{index}", exec_delay=self.plan.exec_delay, exec_log=exec_log
            )
            self.fakes[index] = fake
            return s3_env(s3, comfyui_url=fake.url, **common)
        comfy = self.base / "owned-comfy"
        args = (
            f"--cpu --input-directory {comfy / 'in'} --output-directory {comfy / 'out'} "
            f"--temp-directory {comfy / 'tmp'}"
        )
        env = s3_env(
            s3,
            comfyui_path=FAKE_DIR,
            comfyui_python=sys.executable,
            comfyui_port=free_port(),
            comfyui_args=args,
            comfyui_env="FAKE_COMFYUI_*",
            comfyui_log_file=comfy / "comfyui.log",
            comfyui_startup_timeout=60,
            **common,
        )
        env["FAKE_COMFYUI_EXEC_DELAY"] = str(self.plan.exec_delay)
        env["FAKE_COMFYUI_EXEC_LOG"] = str(exec_log)
        return env

    # -- chaos --

    def _progress(self) -> float:
        self.execs.read()
        expected = set(self.report.expected_runs)
        return len(self.execs.done_jobs & expected) / max(1, len(expected))

    def _at(self, fraction: float) -> None:
        wait_for(lambda: self._progress() >= fraction, self.plan.timeout, f"{fraction:.0%} done")

    def _kill_comfyui(self) -> None:
        owner = self.workers[0]
        pids = owner.comfyui_pids()
        os.kill(pids[-1], signal.SIGKILL)
        self.report.comfyui_kills.append(time.time())
        self._event(f"SIGKILL w0's own ComfyUI (pid {pids[-1]})")
        wait_for(lambda: len(owner.comfyui_pids()) > len(pids), 120, "w0 to restart its ComfyUI")
        self._event(f"w0 started its ComfyUI again (pid {owner.comfyui_pids()[-1]})")

    def _kill_worker(self) -> None:
        index = self.plan.killed_worker
        worker = self.workers[index]
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(30)
        self.report.killed_worker_fake = f"w{index}"
        self._event(f"SIGKILL worker w{index}")
        fake = self.fakes.get(index)
        if fake is not None:  # its prompts run on; let them, so every repeat is accounted for
            wait_for(lambda: queue_empty(fake.url), 120, f"w{index}'s ComfyUI queue to drain")
            self._event(f"w{index}'s ComfyUI ran the dead worker's queue dry")
        self.report.worker_restarted_at = time.time()
        worker.start()
        wait_for(worker.ready, 120, f"w{index} to be ready again")
        self._event(f"started w{index} again; it is ready")

    def _outage(self) -> None:
        stopping = time.monotonic()
        if self.sampler is not None:
            self.sampler.sample()  # what it served up to now: its counters die with it
        self._event("stopping SeaweedFS (SIGTERM)")
        self.weed.stop()
        self._event(f"SeaweedFS stopped; starting it again in {self.plan.s3_outage:g} s")
        time.sleep(self.plan.s3_outage)
        self.weed.start()
        self.report.outage_seconds = time.monotonic() - stopping
        self._event("SeaweedFS answering again (same data, same ports)")

    def _chaos(self) -> None:
        steps: list[tuple[float, Callable[[], None]]] = [
            (self.plan.kill_worker_at, self._kill_worker),
            (self.plan.outage_at, self._outage),
        ]
        steps += [(at, self._kill_comfyui) for at in self.plan.comfy_kills_at]
        for at, action in sorted(steps, key=lambda step: step[0]):
            self._at(at)
            action()

    # -- the whole run --

    def run(self) -> ChaosReport:
        server = self.weed.start()
        s3 = s3_settings_for(server)
        client = s3_client(s3)
        own = OwnRequests(client)
        self._upload(s3, client)
        sampler = self.sampler = RequestSampler(lambda: self.weed.metrics_url, s3.bucket_name)
        try:
            for index in range(self.plan.workers):
                env = self._worker_env(index, s3)
                self.workers.append(WorkerProcess(f"w{index}", env, self.base))
            sampler.start()
            own.counting = True
            self.t0 = time.monotonic()
            for worker in self.workers:
                worker.start()
            self._event(f"started {self.plan.workers} workers")
            self._chaos()
            self._at(1.0)
            self._event("every job has run")
            claims = f"{s3.input_dir}/_claims/"
            wait_for(
                lambda: not self._pending(client, s3) and not keys(client, s3, claims),
                120,
                "the intake and the claims to empty",
                step=1.0,
            )
            self.report.wall_seconds = time.monotonic() - self.t0
            self._event("nothing pending, no claims")
            for worker in self.workers:
                self.report.alive_at_end[worker.name] = worker.process.poll() is None
            sampler.stop()
            own.counting = False
        finally:
            self._stop_all(sampler)
        try:
            self._collect(s3, client, own, sampler)
        finally:
            self.weed.stop()
        return self.report

    @staticmethod
    def _pending(client: Any, s3: S3Settings) -> list[str]:
        return keys(client, s3, f"{s3.input_dir}/", delimiter="/")

    def _stop_all(self, sampler: RequestSampler) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.process.wait(60)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            self.report.exits[worker.name] = [p.returncode for p, _ in worker.incarnations]
        for fake in self.fakes.values():
            fake.stop()
        sampler.stop()

    def _collect(
        self, s3: S3Settings, client: Any, own: OwnRequests, sampler: RequestSampler
    ) -> None:
        report = self.report
        report.requests = sampler.total
        report.own_requests = len(own.times)
        report.intervals = per_second(sampler.samples, own.times)
        self.execs.read()
        report.completed = self.execs.completed()
        report.cut_short = self.execs.cut_short()
        input_dir = s3.input_dir
        report.left_pending = self._pending(client, s3)
        report.left_claims = keys(client, s3, f"{input_dir}/_claims/")
        report.done = {_stem(k) for k in keys(client, s3, f"{input_dir}/_done/")}
        report.failed = {_stem(k) for k in keys(client, s3, f"{input_dir}/_failed/")}
        ids = report.regular_ids + [p.status_id for p in report.poison_list if p.status_id]
        for job_id in ids:
            try:
                body = client.get_object(
                    Bucket=s3.bucket_name, Key=f"{s3.output_dir}/{job_id}/status.json"
                )["Body"].read()
                report.statuses[job_id] = json.loads(body)
            except client.exceptions.NoSuchKey:
                pass
        for worker in self.workers:
            for record in worker.log_records():
                message = record.get("message", "")
                if message.startswith("claimed ") and record.get("manifest"):
                    report.claims_by_name[_stem(record["manifest"])] += 1
                elif message.endswith(GONE):
                    report.gone_by_name[_stem(message.removesuffix(GONE))] += 1
                if "exception" in record:
                    report.tracebacks += 1
            if worker.name == "w0":
                report.comfyui_starts = len(worker.comfyui_pids())


def per_second(
    samples: list[tuple[float, collections.Counter[str]]], own: list[float]
) -> list[tuple[float, float, collections.Counter[str]]]:
    """(start, seconds, requests by type and code) of each sampling interval, with the run's
    own requests in it as a negative ``own`` entry, so the sum is the workers' requests."""
    found = []
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        delta = collections.Counter({k: c1[k] - c0[k] for k in c1 if c1[k] - c0[k] > 0})
        mine = sum(1 for t in own if t0 < t <= t1)
        if mine:
            delta["own"] = -mine
        found.append((t0, t1 - t0, delta))
    return found


def verdicts(report: ChaosReport) -> dict[str, bool]:
    """The invariants a chaos run must keep, by name (the test asserts them, the bench prints
    them)."""
    plan = report.plan
    exits_ok = all(
        codes == ([-signal.SIGKILL, 0] if name == f"w{plan.killed_worker}" else [0])
        for name, codes in report.exits.items()
    )
    return {
        "nothing_lost": not report.lost(),
        "no_unexplained_duplicate_runs": not report.duplicates()["unexplained"],
        "every_poison_settled_within_its_attempts": all(
            result["ok"] for result in report.poison_results().values()
        ),
        "no_worker_exited_but_the_killed_one": not report.unexpected_exits() and exits_ok,
        "nothing_left_in_input_or_claims": not report.left_pending and not report.left_claims,
        "comfyui_restarted_after_each_kill": report.comfyui_starts
        == (1 + len(plan.comfy_kills_at) if plan.comfy_kills_at else 0),
    }
