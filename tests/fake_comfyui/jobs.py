"""Today's job API (`/api/jobs...`), which ComfyUI 0.3.64 does not have.

The answers follow ComfyUI's server.py and comfy_execution/jobs.py as DELTA.md §2 describes:
a job is read from the queue (`pending`, `in_progress`) or from /history (`completed`,
`failed`, and `cancelled` when its messages hold `execution_interrupted`); keys whose value is
null are left out; bad query values get a 400 whose `error` is a plain string; cancel always
answers 200 `{"cancelled": bool}`. A cancelled running job is interrupted (its history then
reads `cancelled`); a cancelled pending job is dropped and never reaches /history.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from aiohttp import web

from .engine import Engine, QueueItem

STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
FINISHED = {"completed", "failed", "cancelled"}
PREVIEWABLE = {"images", "video", "audio", "3d", "text"}
THREE_D = (".obj", ".fbx", ".gltf", ".glb", ".usdz")
TEXT_FILES = (".txt", ".md", ".json")
TEXT_PREVIEW_MAX = 1024


def is_canonical_uuid(value: Any) -> bool:
    """The only prompt/job id today's ComfyUI accepts from a client: lowercase, hyphenated."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _without_nulls(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _metadata(extra_data: dict[str, Any]) -> tuple[Any, Any]:
    """create_time, and the workflow id the frontend stores in extra_pnginfo."""
    pnginfo = extra_data.get("extra_pnginfo") or {}
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    workflow_id = workflow.get("id") if isinstance(workflow, dict) else None
    return extra_data.get("create_time"), workflow_id


def queued_job(item: QueueItem, status: str, detail: bool = False) -> dict[str, Any]:
    create_time, workflow_id = _metadata(item.extra_data)
    job = _without_nulls(
        {
            "id": item.prompt_id,
            "status": status,
            "priority": item.number,
            "create_time": create_time,
            "outputs_count": 0,
            "previewable_outputs_count": 0,
            "workflow_id": workflow_id,
        }
    )
    if detail:
        job["workflow"] = {"prompt": item.prompt, "extra_data": item.extra_data}
    return job


def _as_item(media_type: str, item: Any) -> dict[str, Any] | None:
    """An output entry as the job API counts it: dicts as they are, 3-D file names as files."""
    if isinstance(item, dict):
        return item
    if isinstance(item, str) and item.lower().endswith(THREE_D):
        return {"filename": item, "type": "output", "subfolder": "", "mediaType": "3d"}
    return None


def _previewable(media_type: str, item: dict[str, Any]) -> bool:
    if media_type in PREVIEWABLE:
        return True
    fmt = str(item.get("format", ""))
    if fmt.startswith(("video/", "audio/")):
        return True
    return str(item.get("filename", "")).lower().endswith(THREE_D + TEXT_FILES)


def _textual(media_type: str, item: dict[str, Any]) -> bool:
    return media_type == "text" or str(item.get("filename", "")).lower().endswith(TEXT_FILES)


def outputs_summary(outputs: dict[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
    """(outputs_count, previewable_outputs_count, preview_output).

    The preview is the first saved ("output") visual item, else any other visual item, else a
    text file, else raw text; raw text strings are shown but never counted.
    """
    count = previewable = 0
    saved = other = text_file = raw_text = None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for raw in items:
                item = _as_item(media_type, raw)
                if item is None:
                    if media_type == "text" and raw_text is None:
                        text = str(raw[0] if isinstance(raw, tuple) and raw else raw)
                        shown: dict[str, Any] = {"content": text[:TEXT_PREVIEW_MAX]}
                        if len(text) > TEXT_PREVIEW_MAX:
                            shown["truncated"] = True
                        raw_text = {**shown, "nodeId": node_id, "mediaType": media_type}
                    continue
                count += 1
                if not _previewable(media_type, item):
                    continue
                previewable += 1
                enriched = {**item, "nodeId": node_id}
                enriched.setdefault("mediaType", media_type)
                if _textual(media_type, item):
                    text_file = text_file or enriched
                elif item.get("type") == "output":
                    saved = saved or enriched
                else:
                    other = other or enriched
    return count, previewable, saved or other or text_file or raw_text


def _normalized_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            result[node_id] = node_outputs
            continue
        result[node_id] = {
            media_type: (
                [_as_item(media_type, i) or i for i in items if i is not None]
                if media_type != "animated" and isinstance(items, list)
                else items
            )
            for media_type, items in node_outputs.items()
        }
    return result


def finished_job(prompt_id: str, entry: dict[str, Any], detail: bool = False) -> dict[str, Any]:
    number, _, prompt, extra_data, _ = entry["prompt"]
    create_time, workflow_id = _metadata(extra_data)
    status_info = entry.get("status") or {}
    start = end = error = None
    interrupted = False
    for message in status_info.get("messages", []):
        event, data = message[0], message[1]
        if not isinstance(data, dict):
            continue
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            error = data if event == "execution_error" else error
            interrupted = interrupted or event == "execution_interrupted"
    if status_info.get("status_str") == "error":
        status = "cancelled" if interrupted else "failed"
    else:
        status = "completed"
    outputs = entry.get("outputs") or {}
    count, previewable, preview = outputs_summary(outputs)
    job = _without_nulls(
        {
            "id": prompt_id,
            "status": status,
            "priority": number,
            "create_time": create_time,
            "execution_start_time": start,
            "execution_end_time": end,
            "execution_error": error,
            "outputs_count": count,
            "previewable_outputs_count": previewable,
            "preview_output": preview,
            "workflow_id": workflow_id,
        }
    )
    if detail:
        job["outputs"] = _normalized_outputs(outputs)
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


def list_jobs(engine: Engine, query: Any) -> web.Response:
    """GET /api/jobs: filters, sort, pagination, and the exact 400 texts."""
    statuses: list[str] = list(STATUSES)
    if query.get("status"):
        statuses = [s.strip().lower() for s in query["status"].split(",") if s.strip()]
        invalid = [s for s in statuses if s not in STATUSES]
        if invalid:
            return _bad_request(
                f"Invalid status value(s): {', '.join(invalid)}. "
                f"Valid values: {', '.join(STATUSES)}"
            )
    sort_by = query.get("sort_by", "created_at").lower()
    if sort_by not in ("created_at", "execution_duration"):
        return _bad_request("sort_by must be 'created_at' or 'execution_duration'")
    sort_order = query.get("sort_order", "desc").lower()
    if sort_order not in ("asc", "desc"):
        return _bad_request("sort_order must be 'asc' or 'desc'")
    limit = None
    if "limit" in query:
        try:
            limit = int(query["limit"])
        except ValueError:
            return _bad_request("limit must be an integer")
        if limit <= 0:
            return _bad_request("limit must be a positive integer")
    offset = 0
    if "offset" in query:
        try:
            offset = max(int(query["offset"]), 0)
        except ValueError:
            return _bad_request("offset must be an integer")

    jobs: list[dict[str, Any]] = []
    if "in_progress" in statuses and engine.running is not None:
        jobs.append(queued_job(engine.running, "in_progress"))
    if "pending" in statuses:
        jobs += [queued_job(item, "pending") for item in engine.pending]
    if FINISHED & set(statuses):
        for prompt_id, entry in engine.history.items():
            job = finished_job(prompt_id, entry)
            if job["status"] in statuses:
                jobs.append(job)
    workflow_id = query.get("workflow_id")
    if workflow_id:
        jobs = [job for job in jobs if job.get("workflow_id") == workflow_id]

    def key(job: dict[str, Any]) -> Any:
        if sort_by == "execution_duration":
            start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
            return end - start if start and end else 0
        return job.get("create_time", 0)

    jobs.sort(key=key, reverse=sort_order == "desc")
    total = len(jobs)
    page = jobs[offset:]
    if limit is not None:
        page = page[:limit]
    return web.json_response(
        {
            "jobs": page,
            "pagination": {
                "offset": offset,
                "limit": limit,
                "total": total,
                "has_more": offset + len(page) < total,
            },
        }
    )


def get_job(engine: Engine, job_id: str) -> web.Response:
    """GET /api/jobs/{id}: a finished job from history, else the running or a pending one."""
    entry = engine.history.get(job_id)
    if entry is not None:
        return web.json_response(finished_job(job_id, entry, detail=True))
    if engine.running is not None and engine.running.prompt_id == job_id:
        return web.json_response(queued_job(engine.running, "in_progress", detail=True))
    for item in engine.pending:
        if item.prompt_id == job_id:
            return web.json_response(queued_job(item, "pending", detail=True))
    return web.json_response({"error": "Job not found"}, status=404)


def cancel(engine: Engine, job_id: str) -> bool:
    """Interrupt it if it runs, drop it if it waits; a finished or unknown id is a no-op."""
    if engine.running is not None and engine.running.prompt_id == job_id:
        return engine.interrupt(job_id)
    return engine.delete_pending(job_id)


async def cancel_many(engine: Engine, request: web.Request) -> web.Response:
    """POST /api/jobs/cancel {"job_ids": [...]}: every id must be a canonical UUID."""
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _bad_request("Request body must be valid JSON")
    job_ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(job_ids, list):
        return _bad_request("job_ids must be a list")
    invalid = [
        jid if isinstance(jid, str) else repr(jid) for jid in job_ids if not is_canonical_uuid(jid)
    ]
    if invalid:
        return web.json_response(
            {"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}, status=400
        )
    cancelled = False
    for jid in job_ids:
        cancelled = cancel(engine, jid) or cancelled
    return web.json_response({"cancelled": cancelled})
