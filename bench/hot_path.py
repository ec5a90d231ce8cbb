"""The hot path of short jobs: what one job costs comfys3, S3 and ComfyUI, beside ComfyUI alone.

Issue 24's "measure first". For each workload it runs, in one process and one run, against the
same ComfyUI:

1. **ComfyUI alone**: the same graphs comfys3 would queue, all POSTed straight to ComfyUI.
2. **comfys3**: one `comfys3 run --once` worker process, driven as a user drives it: manifests
   uploaded with boto3, COMFYS3_* settings in its environment, S3 = SeaweedFS (`weed mini`),
   its S3 endpoint and ComfyUI URL pointed at counting proxies (bench/counting_proxy.py).
3. **worker-comfyui** (optional, `--peer-driver`): the peer's handler run job after job by a
   driver script kept outside this repository, its ComfyUI host pointed at a counting proxy.

`--bare` adds rows 2 and 3 again without the proxies: forwarding costs the bench process CPU on
the same cores (on 2 cores, 10-30% of a short job's throughput), so read jobs/s from those rows
and the counts from the proxied ones. `--rounds R` splits each client's jobs into R rounds whose
order turns by one each round, and merges them: other processes' load on a shared machine then
falls on every client alike (each round starts its worker afresh; `steady` CPU leaves that out).

Workloads (`--workloads A B`): A = weight-free 512 px (`solid` template: EmptyImage ->
ImageInvert -> SaveImage), B = 64 px 1-step txt2img (`txt2img` template) on `--ckpt`. The graphs
for rows 1 and 3 are the ones `comfys3 validate --print-graph` fills from the same payloads (a
batch manifest, so every job differs by its save prefix and, in B, its seed, and ComfyUI's cache
cannot answer a prompt from the previous one). Each workload starts with two warm-up prompts.

Figures per row (per job unless said):
- jobs/s: prompts over ComfyUI's own span, first `execution_start` to last `execution_success`
  (/history timestamps); e2e: from the first `execution_start` to the client having finished
  (the worker process exited, the peer's last answer built).
- x alone: jobs/s over the `ComfyUI alone` row's. lane busy: the exec times' sum over ComfyUI's
  span, the share of the time a prompt was executing (the lane's utilisation).
- exec ms p50/p95: each prompt's `execution_success - execution_start`, from /history.
- worker CPU ms/job: user+sys of the client process (`os.wait4` rusage, so all of its threads);
  `steady` counts only what it spent after it POSTed its first prompt (start-up left out).
- ComfyUI CPU ms/prompt, SeaweedFS CPU ms/job: from /proc/<pid>/stat over the row, when the
  bench can see the process (the fake; a real ComfyUI found by its listening port).
- S3 requests by operation, ComfyUI requests by route, websocket messages by direction and type,
  body bytes up and down: counted by the proxies; `before 1st prompt` says how many of them came
  before the worker's first POST /prompt (start-up and the first job's preparation).

Run it (from the repository root, in the project's venv; SeaweedFS comes with '.[test]'):

    python bench/hot_path.py --comfyui fake                       # quick, no real ComfyUI
    python bench/hot_path.py --comfyui-url http://127.0.0.1:8188 \
        --ckpt rand-sd15.safetensors [--jobs 100] [--workloads A B] [--rounds 2] [--bare] \
        [--peer-driver /work/rig/worker_comfyui_driver.py \
         --peer-python /work/rig/venv-peer/bin/python]
    python bench/hot_path.py ... --json results.json               # every figure, machine-readable
    HOT_PATH_PROFILE=/tmp/worker.prof python bench/hot_path.py ... # the worker under cProfile

A real ComfyUI needs the checkpoint in its models/checkpoints (B only); the worker-comfyui
handler does not run against the fake (it needs `GET /` to answer 200; the row says so). With
`--keep DIR`, DIR holds the worker logs and every proxied request (trace-*.jsonl). The peer
driver gets `--comfy-host HOST:PORT --graphs FILE --out FILE --log FILE` and writes
{"jobs", "ok", "errors", "started_at", "ended_at"}. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from counting_proxy import CountingProxy, Counts, comfy_route, s3_operation
from rig_servers import (
    ROOT,
    S3,
    Comfy,
    cpu_seconds,
    die_with_parent,
    fake_comfyui,
    pid_listening_on,
    weed_mini,
)

NO_FOLDERS = False  # --no-folders
WORKER_TIMEOUT_PER_JOB = 30.0  # seconds; a row is abandoned (and said so) past jobs * this


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    payload: Callable[[int], dict[str, Any]]  # job number -> template payload
    workflow: str
    fake_exec_delay: float  # seconds per prompt on the fake, near what a real CPU ComfyUI takes


def workloads(ckpt: str) -> dict[str, Workload]:
    return {
        "A": Workload("A", "weight-free 512 px", lambda n: {"width": 512, "height": 512},
                      "solid", 0.007),
        "B": Workload("B", "64 px 1-step txt2img",
                      lambda n: {"seed": n, "steps": 1, "width": 64, "height": 64,
                                 "ckpt_name": ckpt, "prompt": "a red fox in the snow"},
                      "txt2img", 0.19),
    }  # fmt: skip


@dataclass
class Row:
    client: str
    workload: str
    jobs: int
    ok: int
    prompt_ids: list[str]
    client_end: float | None = None  # time.time() when the client was done
    worker_cpu_s: float | None = None
    worker_cpu_steady_s: float | None = None
    comfy_cpu_s: float | None = None
    s3_cpu_s: float | None = None
    s3: Counts | None = None
    comfy: Counts | None = None
    history: dict[str, dict[str, float]] = field(default_factory=dict)
    s3_kinds: collections.Counter[str] | None = None
    note: str = ""

    spans: list[float] = field(default_factory=list)  # ComfyUI's span of each round, s
    e2es: list[float] = field(default_factory=list)  # first exec start to client done, s
    load: list[float] = field(default_factory=list)  # the machine's 1-min load at each end

    def close(self) -> Row:
        """Note this round's spans, from its /history times and when the client was done."""
        starts = [h["start"] / 1000 for h in self.history.values()]
        ends = [h["end"] / 1000 for h in self.history.values()]
        if len(ends) > 1:
            self.spans.append(max(ends) - min(starts))
        if self.client_end is not None and starts:
            self.e2es.append(self.client_end - min(starts))
        self.load.append(os.getloadavg()[0])
        return self

    def figures(self) -> dict[str, Any]:
        execs = sorted(h["end"] - h["start"] for h in self.history.values())
        out: dict[str, Any] = {"client": self.client, "workload": self.workload,
                               "jobs": self.jobs, "ok": self.ok,
                               "prompts_in_history": len(self.history),
                               "rounds": len(self.load),
                               "load_1min": [round(x, 1) for x in self.load]}  # fmt: skip
        if self.note:
            out["note"] = self.note
        if self.spans:
            out["jobs_per_s"] = round(len(self.history) / sum(self.spans), 2)
            # The lane's utilisation: the share of ComfyUI's span in which a prompt executed.
            out["lane_busy"] = round(sum(execs) / 1000 / sum(self.spans), 3)
        if self.e2es and sum(self.e2es) > 0:
            out["jobs_per_s_e2e"] = round(self.ok / sum(self.e2es), 2)
        if execs:
            out["exec_ms_p50"] = round(statistics.median(execs), 1)
            out["exec_ms_p95"] = round(
                execs[min(len(execs) - 1, round(0.95 * (len(execs) - 1)))], 1
            )
        per = max(self.jobs, 1)
        for key, value in (("worker_cpu_ms_per_job", self.worker_cpu_s),
                           ("worker_cpu_ms_per_job_steady", self.worker_cpu_steady_s),
                           ("comfyui_cpu_ms_per_prompt", self.comfy_cpu_s),
                           ("seaweedfs_cpu_ms_per_job", self.s3_cpu_s)):  # fmt: skip
            if value is not None:
                out[key] = round(value * 1000 / per, 2)
        if self.s3 is not None:
            out["s3_requests_per_job"] = round(self.s3.total_requests() / per, 2)
            out["s3_by_operation_per_job"] = _per(self.s3.requests, per)
            out["s3_statuses"] = dict(sorted(self.s3.statuses.items()))
            if self.s3_kinds is not None:
                out["s3_by_operation_and_key_per_job"] = _per(self.s3_kinds, per)
            out["s3_requests_before_first_prompt"] = dict(self.s3.requests_before_first_prompt)
            out["s3_bytes_per_job"] = {"up": self.s3.bytes_up // per,
                                       "down": self.s3.bytes_down // per}  # fmt: skip
        if self.comfy is not None:
            out["comfyui_requests_per_job"] = round(self.comfy.total_requests() / per, 2)
            out["comfyui_by_route_per_job"] = _per(self.comfy.requests, per)
            out["comfyui_statuses"] = dict(sorted(self.comfy.statuses.items()))
            out["comfyui_requests_before_first_prompt"] = dict(
                self.comfy.requests_before_first_prompt
            )
            out["ws_messages_per_job"] = round(sum(self.comfy.ws_messages.values()) / per, 2)
            out["ws_by_type_per_job"] = _per(self.comfy.ws_messages, per)
            out["comfyui_bytes_per_job"] = {"up": self.comfy.bytes_up // per,
                                            "down": self.comfy.bytes_down // per}  # fmt: skip
        return out


def _per(counter: Any, per: int) -> dict[str, float]:
    return {k: round(v / per, 2) for k, v in sorted(counter.items(), key=lambda kv: -kv[1])}


def merge(rounds: list[Row]) -> Row:
    """One row from the same client's rounds: counts and times added, histories joined."""
    first = rounds[0]
    row = Row(first.client, first.workload, 0, 0, [])
    notes = []
    for part in rounds:
        row.jobs += part.jobs
        row.ok += part.ok
        row.prompt_ids += part.prompt_ids
        row.history.update(part.history)
        row.spans += part.spans
        row.e2es += part.e2es
        row.load += part.load
        for name in ("worker_cpu_s", "worker_cpu_steady_s", "comfy_cpu_s", "s3_cpu_s"):
            value = getattr(part, name)
            if value is not None:
                setattr(row, name, (getattr(row, name) or 0.0) + value)
        for name in ("s3", "comfy"):
            counts = getattr(part, name)
            if counts is not None:
                setattr(row, name, add_counts(getattr(row, name), counts))
        if part.s3_kinds is not None:
            row.s3_kinds = (row.s3_kinds or collections.Counter()) + part.s3_kinds
        if part.note:
            notes.append(part.note)
    row.note = " | ".join(notes)
    return row


def add_counts(total: Counts | None, more: Counts) -> Counts:
    if total is None:
        total = Counts()
    total.requests += more.requests
    total.statuses += more.statuses
    total.ws_messages += more.ws_messages
    total.requests_before_first_prompt += more.requests_before_first_prompt
    total.bytes_up += more.bytes_up
    total.bytes_down += more.bytes_down
    total.prompt_ids += more.prompt_ids
    total.deleted_keys += more.deleted_keys
    return total


# -- ComfyUI, straight ------------------------------------------------------------------------


def http_json(url: str, body: Any = None, timeout: float = 60) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def history_times(url: str, prompt_ids: list[str]) -> dict[str, dict[str, float]]:
    """execution_start / execution_success of each prompt (ms), from ComfyUI's /history."""
    found: dict[str, dict[str, float]] = {}
    for prompt_id in prompt_ids:
        entry = http_json(f"{url}/history/{prompt_id}").get(prompt_id)
        if not entry:
            continue
        stamps = {name: data.get("timestamp") for name, data in entry["status"]["messages"]}
        if stamps.get("execution_start") and stamps.get("execution_success"):
            found[prompt_id] = {"start": stamps["execution_start"],
                                "end": stamps["execution_success"]}  # fmt: skip
    return found


def wait_for_prompts(url: str, prompt_ids: list[str], timeout: float) -> None:
    """Until ComfyUI's queue is empty and the last prompt is in /history (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_json(f"{url}/history/{prompt_ids[-1]}"):
            queue = http_json(f"{url}/queue")
            if not queue["queue_running"] and not queue["queue_pending"]:
                return
        time.sleep(0.25)
    raise SystemExit(f"ComfyUI did not finish {len(prompt_ids)} prompts in {timeout:.0f} s")


def queue_alone(comfy: Comfy, graphs: list[dict[str, Any]], label: str) -> Row:
    ids = [str(uuid.uuid4()) for _ in graphs]
    cpu0 = cpu_seconds(comfy.pid)
    for prompt_id, graph in zip(ids, graphs, strict=True):
        http_json(f"{comfy.url}/prompt", {"prompt": graph, "prompt_id": prompt_id,
                                          "client_id": "hot-path-alone"})  # fmt: skip
    wait_for_prompts(comfy.url, ids, timeout=len(graphs) * WORKER_TIMEOUT_PER_JOB)
    end = time.time()
    cpu1 = cpu_seconds(comfy.pid)
    row = Row("ComfyUI alone (all queued)", label, len(graphs), len(graphs), ids, client_end=end)
    row.comfy_cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    row.history = history_times(comfy.url, ids)
    return row.close()


# -- graphs, from comfys3's own CLI -----------------------------------------------------------


def comfys3_command() -> list[str]:
    profile = os.environ.get("HOT_PATH_PROFILE")  # a file: the worker runs under cProfile
    if profile:
        return [sys.executable, "-m", "cProfile", "-o", profile, "-m", "triggers.cli"]
    script = Path(sys.executable).parent / "comfys3"
    return [str(script)] if script.exists() else [sys.executable, "-m", "triggers.cli"]


def filled_graphs(workload: Workload, name: str, numbers: range, folder: Path) -> list[Any]:
    """The graphs a worker would queue for these jobs, as `comfys3 validate --print-graph`
    fills them from one batch manifest (so no bench code re-implements the templates)."""
    manifest = folder / f"{name}.json"
    batch = [workload.payload(n) for n in numbers]
    manifest.write_text(json.dumps({"workflow": workload.workflow, "batch": batch}))
    done = subprocess.run([*comfys3_command(), "validate", str(manifest), "--print-graph"],
                          capture_output=True, text=True, cwd=folder, timeout=120)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"comfys3 validate failed:\n{done.stdout}\n{done.stderr}")
    printed = json.loads(done.stdout)  # a batch: {job id: graph}, in the batch's order
    graphs = list(printed.values()) if len(batch) > 1 else [printed]
    if len(graphs) != len(batch):
        raise SystemExit(f"comfys3 validate printed {len(graphs)} graphs for {len(batch)} jobs")
    return graphs


# -- child processes, with their own CPU ------------------------------------------------------


def wait_child(process: subprocess.Popen[bytes], timeout: float) -> tuple[int, float, bool]:
    """(exit status, user+sys CPU seconds of the child, timed out) via os.wait4, polled so the
    wait is bounded; a child past its time gets SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage.ru_utime + usage.ru_stime, timed_out
        if time.monotonic() > deadline and not timed_out:
            timed_out = True
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
        elif time.monotonic() > deadline:
            process.kill()
        time.sleep(0.02)


def worker_env(s3: S3, s3_url: str, comfy_url: str, folders: Path | None = None) -> dict[str, str]:
    """The worker's environment: none of the bench's COMFYS3_* but the S3 client, so
    ``COMFYS3_S3_CLIENT=obstore python bench/hot_path.py ...`` measures the other client.
    ``folders``: ComfyUI's base folder (input/, output/, temp/ in it) when the worker may use
    it directly, as a worker beside its ComfyUI does."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("COMFYS3_") or k == "COMFYS3_S3_CLIENT"
    }
    if folders is not None:
        for kind in ("input", "output", "temp"):
            env[f"COMFYS3_COMFYUI_{kind.upper()}_DIR"] = str(folders / kind)
    env.update({
        "COMFYS3_S3_REGION": s3.region, "COMFYS3_S3_ACCESS_KEY": s3.access_key,
        "COMFYS3_S3_SECRET_KEY": s3.secret_key, "COMFYS3_S3_BUCKET_NAME": s3.bucket,
        "COMFYS3_S3_ENDPOINT_URL": s3_url, "COMFYS3_COMFYUI_URL": comfy_url,
        "COMFYS3_WORKER_ID": "hot-path-bench",
    })  # fmt: skip
    return env


def run_comfys3(
    s3: S3,
    comfy: Comfy,
    workload: Workload,
    numbers: range,
    folder: Path,
    prefix: str,
    counted: bool = True,
    before: Path | None = None,
    s3_client: str | None = None,
) -> Row:
    """One `comfys3 run --once` worker draining ``numbers`` jobs; ``counted``: through the
    counting proxies (else straight to S3 and ComfyUI, for throughput without the proxies)."""
    client = s3.client()
    for n in numbers:
        body = {"id": f"{prefix}-{n:05d}", "workflow": workload.workflow,
                "payload": workload.payload(n)}  # fmt: skip
        client.put_object(Bucket=s3.bucket, Key=f"input/{prefix}-{n:05d}.json",
                          Body=json.dumps(body).encode())  # fmt: skip
    holder: dict[str, Any] = {}

    def at_first_prompt() -> None:
        holder["cpu_at_first_prompt"] = cpu_seconds(holder.get("pid"))

    jobs = len(numbers)
    name = "comfys3, one worker" if counted else "comfys3, one worker, no proxies"
    command = comfys3_command()
    if before is not None:  # another checkout's worker: the same bench, code before a change
        name = name.replace("comfys3", f"comfys3 before ({before.name})")
        command = [str(before / ".venv" / "bin" / "comfys3")]
    if s3_client is not None:
        name = name.replace("comfys3", f"comfys3 on {s3_client}")
    log_path = (
        folder / f"worker-{workload.name}{'' if counted else '-bare'}{'-before' if before else ''}"
        f"{'-' + s3_client if s3_client else ''}.log"
    )
    with contextlib.ExitStack() as stack:
        s3_proxy = comfy_proxy = None
        if counted:
            s3_proxy = stack.enter_context(CountingProxy(s3.endpoint_url, s3_operation))
            comfy_proxy = stack.enter_context(
                CountingProxy(comfy.url, comfy_route, at_first_prompt, peer=s3_proxy)
            )
        log = stack.enter_context(log_path.open("wb"))
        comfy_cpu0, s3_cpu0 = cpu_seconds(comfy.pid), cpu_seconds(s3.pid)
        folders = comfy.output_dir.parent if comfy.output_dir and not NO_FOLDERS else None
        env = worker_env(s3, s3_proxy.url if s3_proxy else s3.endpoint_url,
                         comfy_proxy.url if comfy_proxy else comfy.url, folders)  # fmt: skip
        if s3_client is not None:
            env["COMFYS3_S3_CLIENT"] = s3_client
        process = subprocess.Popen(
            [*command, "run", "--once"], env=env, cwd=folder,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        holder["pid"] = process.pid
        code, cpu, timed_out = wait_child(process, jobs * WORKER_TIMEOUT_PER_JOB + 60)
        end = time.time()
        comfy_cpu1, s3_cpu1 = cpu_seconds(comfy.pid), cpu_seconds(s3.pid)
    row = Row(name, workload.name, jobs, 0, [], client_end=end, worker_cpu_s=cpu)
    if holder.get("cpu_at_first_prompt") is not None:
        row.worker_cpu_steady_s = cpu - holder["cpu_at_first_prompt"]
    row.comfy_cpu_s = _diff(comfy_cpu0, comfy_cpu1)
    row.s3_cpu_s = _diff(s3_cpu0, s3_cpu1)
    row.ok = succeeded(client, s3.bucket, prefix, numbers)
    if code != 0 or timed_out or row.ok != jobs:
        tail = log_path.read_text(errors="replace")[-1500:]
        row.note = f"worker exit {code}{' (timed out)' if timed_out else ''}; log tail: {tail}"
    if s3_proxy is not None and comfy_proxy is not None:
        row.s3, row.comfy = s3_proxy.counts, comfy_proxy.counts
        row.s3_kinds = s3_by_key_kind(s3_proxy.counts, s3.bucket)
        row.history = history_times(comfy.url, comfy_proxy.counts.prompt_ids)
        trace = folder / f"trace-comfys3-{workload.name}.jsonl"
        write_trace(trace, s3_proxy.counts, "s3")
        write_trace(trace, comfy_proxy.counts, "comfyui")
    else:
        row.history = history_by_save_prefix(comfy.url, f"comfys3/{prefix}-", jobs)
    return row.close()


def history_by_save_prefix(url: str, prefix: str, jobs: int) -> dict[str, dict[str, float]]:
    """Exec times of the last prompts whose save prefix starts with ``prefix`` (comfys3 names
    outputs comfys3/<job id>/...), for rows whose prompt ids no proxy saw."""
    ids = []
    for prompt_id, entry in http_json(f"{url}/history?max_items={jobs + 50}").items():
        graph = entry.get("prompt", [None, None, {}])[2]
        prefixes = [node.get("inputs", {}).get("filename_prefix") for node in graph.values()]
        if any(isinstance(p, str) and p.startswith(prefix) for p in prefixes):
            ids.append(prompt_id)
    return history_times(url, ids)


def write_trace(path: Path, counts: Counts, server: str) -> None:
    with path.open("a") as out:
        for at, label, path_qs, status in counts.trace:
            out.write(json.dumps([round(at, 4), server, label, path_qs, status]) + "\n")


def s3_by_key_kind(counts: Counts, bucket: str) -> collections.Counter[str]:
    """S3 requests by operation and the kind of key they touch (claims, manifests, statuses,
    outputs...), which says what each request is for."""
    kinds: collections.Counter[str] = collections.Counter()
    deleted = [
        (0.0, "(key in a DeleteObjects)", f"/{bucket}/{key}", 200) for key in counts.deleted_keys
    ]
    for _, label, path_qs, _ in counts.trace + deleted:
        path, _, query = path_qs.partition("?")
        if label == "DeleteObjects":
            kinds["DeleteObjects (call)"] += 1
            continue
        key = urllib.parse.unquote(path).removeprefix(f"/{bucket}").lstrip("/")
        if not key:
            prefix = urllib.parse.parse_qs(query).get("prefix", [""])[0]
            kinds[f"{label} {'prefix=' + prefix if prefix else '(bucket)'}"] += 1
            continue
        parts = key.split("/")
        if parts[-1] == "status.json":
            parts[1:-1] = ["*"]
        elif len(parts) > 2:
            parts[-2 if parts[0] == "output" else -1] = "*"
            if parts[0] == "output":
                parts[-1] = "<output file>"
        else:
            parts[-1] = "*"
        kinds[f"{label} {'/'.join(parts)}"] += 1
    return kinds


def succeeded(client: Any, bucket: str, prefix: str, numbers: range) -> int:
    ok = 0
    for n in numbers:
        with contextlib.suppress(Exception):
            body = client.get_object(Bucket=bucket, Key=f"output/{prefix}-{n:05d}/status.json")
            ok += json.loads(body["Body"].read()).get("state") == "succeeded"
    return ok


def _diff(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def run_peer(
    comfy: Comfy,
    graphs: list[Any],
    label: str,
    folder: Path,
    args: argparse.Namespace,
    save_prefix: str,
    counted: bool = True,
) -> Row:
    """worker-comfyui's handler, job after job, through a driver outside this repository."""
    name = "worker-comfyui 5.8.5, base64 out" + ("" if counted else ", no proxy")
    try:
        urllib.request.urlopen(f"{comfy.url}/", timeout=10).read()
    except OSError as error:
        row = Row(name, label, len(graphs), 0, [])
        row.note = f"not run: its handler waits for GET / to answer 200; this ComfyUI: {error}"
        return row.close()
    tag = f"{label}{'' if counted else '-bare'}"
    graphs_file, out_file = folder / f"peer-{tag}.json", folder / f"peer-{tag}-out.json"
    graphs_file.write_text(json.dumps(graphs))
    holder: dict[str, Any] = {}

    def at_first_prompt() -> None:
        holder["cpu_at_first_prompt"] = cpu_seconds(holder.get("pid"))

    with contextlib.ExitStack() as stack:
        proxy = None
        if counted:
            proxy = stack.enter_context(CountingProxy(comfy.url, comfy_route, at_first_prompt))
        comfy_cpu0 = cpu_seconds(comfy.pid)
        host = urllib.parse.urlsplit(proxy.url if proxy else comfy.url).netloc
        process = subprocess.Popen(
            [args.peer_python, args.peer_driver, "--comfy-host", host, "--graphs",
             str(graphs_file), "--out", str(out_file), "--log", str(folder / f"peer-{tag}.log")],
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )  # fmt: skip
        holder["pid"] = process.pid
        code, cpu, timed_out = wait_child(process, len(graphs) * WORKER_TIMEOUT_PER_JOB + 60)
        comfy_cpu1 = cpu_seconds(comfy.pid)
    result = json.loads(out_file.read_text()) if out_file.exists() else {}
    row = Row(name, label, len(graphs), int(result.get("ok", 0)), [],
              client_end=result.get("ended_at"), worker_cpu_s=cpu)  # fmt: skip
    if holder.get("cpu_at_first_prompt") is not None:
        row.worker_cpu_steady_s = cpu - holder["cpu_at_first_prompt"]
    row.comfy_cpu_s = _diff(comfy_cpu0, comfy_cpu1)
    if code != 0 or timed_out or row.ok != len(graphs):
        row.note = f"driver exit {code}; errors: {result.get('errors')}"
    if proxy is not None:
        row.comfy = proxy.counts
        row.history = history_times(comfy.url, proxy.counts.prompt_ids)
        write_trace(folder / f"trace-peer-{label}.jsonl", proxy.counts, "comfyui")
    else:
        row.history = history_by_save_prefix(comfy.url, save_prefix, len(graphs))
    return row.close()


# -- the run ----------------------------------------------------------------------------------


@contextlib.contextmanager
def comfyui_for(args: argparse.Namespace, workload: Workload, base: Path) -> Iterator[Comfy]:
    if args.comfyui_url:
        url = args.comfyui_url.rstrip("/")
        port = urllib.parse.urlsplit(url).port or 80
        output = args.comfyui_dir / "output" if args.comfyui_dir else None
        yield Comfy(url, args.comfyui_pid or pid_listening_on(port), output)
        return
    with fake_comfyui(base / f"fake-{workload.name}", exec_delay=workload.fake_exec_delay,
                      installed_checkpoints=args.ckpt) as fake:  # fmt: skip
        yield fake


def run_workload(args: argparse.Namespace, workload: Workload, s3: S3, base: Path) -> list[Row]:
    """Every client on this workload, in ``args.rounds`` rounds of jobs/rounds jobs each, the
    order turned by one each round, so a change in the machine's load (other processes on a
    shared box) falls on every client alike; each client's rounds are merged into one row."""
    per_round = args.jobs // args.rounds
    say = lambda text: print(f"[{workload.name}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    clients = ["alone", "comfys3"] + (["comfys3-bare"] if args.bare else [])
    if args.obstore:
        clients += ["comfys3-obstore"]
    if args.before:
        clients += ["before"] + (["before-bare"] if args.bare else [])
    if args.peer_driver:
        clients += ["peer"] + (["peer-bare"] if args.bare else [])
    found: dict[str, list[Row]] = {client: [] for client in clients}
    with comfyui_for(args, workload, base) as comfy:
        stamp = uuid.uuid4().hex[:6]  # seeds and prefixes new in every run: no cache hits
        offset = int(stamp, 16) % 1000 * 1_000_000
        warm = filled_graphs(workload, f"warm{stamp}", range(offset + 999_000, offset + 999_002),
                             base)  # fmt: skip
        say("warm-up")
        queue_alone(comfy, warm, workload.name)
        for r in range(args.rounds):
            turn = r % len(clients)
            for client in clients[turn:] + clients[:turn]:
                say(f"round {r + 1}/{args.rounds}: {client}, {per_round} jobs")
                start = offset + clients.index(client) * 100_000 + r * per_round
                numbers = range(start, start + per_round)
                tag = f"{stamp}r{r}"
                if client == "alone":
                    graphs = filled_graphs(workload, f"alone{tag}", numbers, base)
                    row = queue_alone(comfy, graphs, workload.name)
                elif client.startswith(("comfys3", "before")):
                    bare = client.endswith("bare")
                    before = client.startswith("before")
                    other = "obstore" if client.endswith("obstore") else None
                    prefix = (f"{workload.name}{tag}{'b' if bare else ''}{'o' if before else ''}"
                              f"{'x' if other else ''}")  # fmt: skip
                    row = run_comfys3(s3, comfy, workload, numbers, base, prefix, not bare,
                                      args.before if before else None, other)  # fmt: skip
                else:
                    bare = client.endswith("bare")
                    name = f"peer{'b' if bare else ''}{tag}"
                    graphs = filled_graphs(workload, name, numbers, base)
                    row = run_peer(comfy, graphs, workload.name, base, args,
                                   f"comfys3/{name}-", not bare)  # fmt: skip
                found[client].append(row)
    return [merge(rows) for rows in found.values()]


def _top(per_job: dict[str, float], limit: int = 6) -> str:
    items = [f"{k} {v:g}" for k, v in list(per_job.items())[:limit]]
    more = len(per_job) - limit
    return ", ".join(items) + (f", +{more} more" if more > 0 else "")


def table(figures: list[dict[str, Any]], titles: dict[str, str]) -> str:
    lines = []
    for name in dict.fromkeys(f["workload"] for f in figures):
        lines += [f"\n### {name}: {titles[name]}\n",
                  "| client | jobs/s | x alone | lane busy | jobs/s e2e | exec ms p50 (p95) "
                  "| worker CPU ms/job "
                  "(steady) | ComfyUI CPU ms/prompt | S3 req/job | ComfyUI req/job | ws msg/job "
                  "| bytes/job S3 up/down | bytes/job ComfyUI up/down | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        detail = []
        alone = next(
            (f.get("jobs_per_s") for f in figures
             if f["workload"] == name and f["client"].startswith("ComfyUI alone")),
            None,
        )  # fmt: skip
        for f in (f for f in figures if f["workload"] == name):
            cpu = f.get("worker_cpu_ms_per_job")
            cpu_text = (
                "" if cpu is None else f"{cpu:g} ({f.get('worker_cpu_ms_per_job_steady', '-')})"
            )
            s3b, cb = f.get("s3_bytes_per_job"), f.get("comfyui_bytes_per_job")
            s3_bytes = f"{s3b['up']}/{s3b['down']}" if s3b else "-"
            comfy_bytes = f"{cb['up']}/{cb['down']}" if cb else "-"
            rate = f.get("jobs_per_s")
            ratio = f"{rate / alone:.2f}" if rate and alone else "-"
            lines.append(
                f"| {f['client']} | {f.get('jobs_per_s', '-')} | {ratio} "
                f"| {f.get('lane_busy', '-')} | {f.get('jobs_per_s_e2e', '-')} "
                f"| {f.get('exec_ms_p50', '-')} ({f.get('exec_ms_p95', '-')}) | {cpu_text or '-'} "
                f"| {f.get('comfyui_cpu_ms_per_prompt', '-')} "
                f"| {f.get('s3_requests_per_job', '-')} "
                f"| {f.get('comfyui_requests_per_job', '-')} | {f.get('ws_messages_per_job', '-')} "
                f"| {s3_bytes} | {comfy_bytes} | {f['ok']}/{f['jobs']} |"
            )
            if "s3_by_operation_per_job" in f:
                detail.append(f"- {f['client']}, S3 by operation: "
                              f"{_top(f['s3_by_operation_per_job'], 10)}; before the first "
                              f"prompt: {f['s3_requests_before_first_prompt']}; SeaweedFS CPU "
                              f"{f.get('seaweedfs_cpu_ms_per_job', '-')} ms/job")  # fmt: skip
            if "s3_by_operation_and_key_per_job" in f:
                detail.append(f"- {f['client']}, S3 by operation and key: "
                              f"{_top(f['s3_by_operation_and_key_per_job'], 20)}")  # fmt: skip
            if "comfyui_by_route_per_job" in f:
                detail.append(f"- {f['client']}, ComfyUI by route: "
                              f"{_top(f['comfyui_by_route_per_job'], 10)}; before the first "
                              f"prompt: {f['comfyui_requests_before_first_prompt']}")  # fmt: skip
                detail.append(f"- {f['client']}, websocket: {_top(f['ws_by_type_per_job'], 12)}")
            if f.get("note"):
                detail.append(f"- {f['client']}: NOTE {f['note']}")
        lines += ["", *detail]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--comfyui", choices=["fake"], help="start the test fake per workload")
    where.add_argument("--comfyui-url", help="a running ComfyUI, e.g. http://127.0.0.1:8188")
    parser.add_argument("--comfyui-pid", type=int, help="its pid, if not found by its port")
    parser.add_argument(
        "--comfyui-dir",
        type=Path,
        help="its base folder (input/, output/, temp/ in it: /work/rig/run/PORT for the rig), "
        "given to the worker as COMFYS3_COMFYUI_*_DIR as for a ComfyUI on the same machine",
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="another comfys3 checkout with its .venv (e.g. main): its worker gets rows of its "
        "own in the same run, for figures before and after a change",
    )
    parser.add_argument(
        "--obstore",
        action="store_true",
        help="a row more: the worker on COMFYS3_S3_CLIENT=obstore (needs comfys3[obstore])",
    )
    parser.add_argument(
        "--no-folders",
        action="store_true",
        help="never tell the worker ComfyUI's folders (everything through its HTTP server)",
    )
    parser.add_argument("--jobs", type=int, default=100, help="jobs a row (default 100)")
    parser.add_argument("--workloads", nargs="+", choices=["A", "B"], default=["A", "B"])
    parser.add_argument("--ckpt", default="rand-sd15.safetensors", help="checkpoint for B")
    parser.add_argument("--peer-driver", help="worker-comfyui driver script (see the docstring)")
    parser.add_argument("--peer-python", default=sys.executable, help="Python for the driver")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds a client")
    parser.add_argument(
        "--bare",
        action="store_true",
        help="also run comfys3 without the counting proxies (throughput only)",
    )
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--keep", type=Path, help="keep logs and graphs in this folder")
    args = parser.parse_args()
    global NO_FOLDERS
    NO_FOLDERS = args.no_folders
    if args.rounds < 1 or args.jobs // args.rounds < 2:
        parser.error("--jobs / --rounds must be at least 2 jobs a round")
    if args.peer_driver and not Path(args.peer_driver).is_file():
        parser.error(f"--peer-driver {args.peer_driver}: no such file")
    if not (shutil.which("comfys3") or comfys3_command()):
        parser.error("comfys3 is not installed in this environment (pip install -e '.[test]')")
    chosen = workloads(args.ckpt)
    figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="comfys3-hot-path-") as folder:
        base = args.keep or Path(folder)
        base.mkdir(parents=True, exist_ok=True)
        with weed_mini(base / "weed") as s3:
            for name in args.workloads:
                for row in run_workload(args, chosen[name], s3, base):
                    figures.append(row.figures())
                    print(json.dumps(figures[-1]), flush=True)
    titles = {name: w.title for name, w in chosen.items()}
    where_text = args.comfyui_url or "the fake ComfyUI"
    print(f"\n## hot path: {args.jobs} jobs a row, ComfyUI at {where_text}, S3 = SeaweedFS")
    print(table(figures, titles))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
