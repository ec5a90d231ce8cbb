"""ComfyUI's refusals made readable: a /prompt 400 body becomes one line per node to fix.

The error classes themselves are in :mod:`processor.errors`, with every other error; whether
one is retried is decided in :mod:`processor.job.retry_table`. The ``details`` kept here are
what the status document stores, so whoever reads the bucket sees the same facts the worker
saw (node ids, error types, the values ComfyUI expected) without access to the worker's logs.
"""

from __future__ import annotations

import re
from typing import Any

from processor.errors import ComfyValidationError

# 0.3.64 words a missing node type inside an `invalid_prompt` message; today's ComfyUI has
# `missing_node_type` with the class in extra_info (DELTA.md §5).
_OLD_MISSING = re.compile(r"Cannot execute because node (.+) does not exist\.?$")
_OLD_NO_CLASS = "Cannot execute because a node is missing the class_type property."
_NODE_ID = re.compile(r"^Node ID '#(.+)'$")
_NO_CLASS_HINT = "has no class_type: the graph is not in ComfyUI's API format, or is damaged"
_INSTALL_HINT = "install the custom node that provides it (docs/image.md), or fix the graph"

# Model files: a value of a combo input that looks like one is "not installed", not "not allowed".
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")


def as_dict(value: Any) -> dict[str, Any]:
    """JSON from ComfyUI, typed: anything that is not an object reads as an empty one."""
    return value if isinstance(value, dict) else {}


def validation_error(status: int, body: Any) -> ComfyValidationError:
    """Turn a /prompt 400 body into one error whose lines each name a node and what to fix."""
    if not isinstance(body, dict):
        text = str(body).strip() or f"HTTP {status}"
        return ComfyValidationError(
            f"ComfyUI rejected the prompt: {text}",
            [],
            {"kind": "validation_error", "status": status, "body": text},
        )
    error = as_dict(body.get("error"))
    node_errors = as_dict(body.get("node_errors"))
    lines: list[str] = []
    for node_id, entry in sorted(node_errors.items(), key=lambda kv: _node_sort_key(kv[0])):
        if not isinstance(entry, dict):
            continue
        class_type = entry.get("class_type") or "?"
        for item in entry.get("errors") or []:
            if isinstance(item, dict):
                lines.append(f"node {node_id} ({class_type}) {describe_node_error(item)}")
    headline = str(error.get("message") or "invalid prompt").strip().rstrip(".")
    details_text = str(error.get("details") or "").strip()
    special = _whole_prompt_error(error)
    if special is not None:
        headline = special
    elif details_text and not lines:
        headline = f"{headline} ({details_text})"
    return ComfyValidationError(
        f"ComfyUI rejected the prompt: {headline}",
        lines,
        {
            "kind": "validation_error",
            "status": status,
            "error": _without_tracebacks(error),
            "node_errors": _without_tracebacks(node_errors),
            "lines": lines,
        },
    )


def _whole_prompt_error(error: dict[str, Any]) -> str | None:
    """The refusals of the whole prompt worth their own sentence: a node type this ComfyUI
    does not have (in both versions' wording), a prompt id it refuses. None for the rest."""
    kind = str(error.get("type") or "")
    message = str(error.get("message") or "").strip()
    extra = as_dict(error.get("extra_info"))
    node_id = extra.get("node_id")
    if node_id is None:
        found = _NODE_ID.match(str(error.get("details") or "").strip())
        node_id = found.group(1) if found else None
    where = f"node {node_id}" if node_id is not None else "a node"
    class_type: Any = None
    if kind == "missing_node_type":
        class_type = extra.get("class_type")
        if class_type is None:
            return f"{where} {_NO_CLASS_HINT}"
    elif kind == "invalid_prompt" and message == _OLD_NO_CLASS:
        return f"{where} {_NO_CLASS_HINT}"
    elif kind == "invalid_prompt" and (found := _OLD_MISSING.match(message)) is not None:
        class_type = found.group(1)
    elif kind == "invalid_prompt_id":
        return (
            "ComfyUI refused the prompt id: it must be a canonical lowercase UUID "
            f"({str(error.get('details') or message).strip()})"
        )
    if class_type is None:
        return None
    title = extra.get("node_title")
    named = f" ({title!r})" if isinstance(title, str) and title and title != class_type else ""
    return (
        f"{where}{named} is of type {str(class_type)!r}, which this ComfyUI does not have: "
        f"{_INSTALL_HINT}"
    )


def dropped_outputs(node_errors: Any) -> list[str]:
    """The outputs ComfyUI left out of a prompt it queued anyway (a 200 that carries
    ``node_errors``: the other outputs passed), one readable line per problem."""
    lines: list[str] = []
    entries = sorted(as_dict(node_errors).items(), key=lambda kv: _node_sort_key(kv[0]))
    for node_id, entry in entries:
        if not isinstance(entry, dict):
            continue
        class_type = entry.get("class_type") or "?"
        outputs = [str(o) for o in entry.get("dependent_outputs") or []]
        dropped = f" (output node {', '.join(outputs)} skipped)" if outputs else ""
        for item in entry.get("errors") or []:
            if isinstance(item, dict):
                lines.append(f"node {node_id} ({class_type}) {describe_node_error(item)}{dropped}")
    return lines


def describe_node_error(item: dict[str, Any]) -> str:
    """One node_errors entry as "input: what is wrong", worded per ComfyUI error type."""
    kind = str(item.get("type") or "")
    message = str(item.get("message") or kind or "invalid")
    details = str(item.get("details") or "")
    extra = as_dict(item.get("extra_info"))
    name = str(extra.get("input_name") or "")
    config = extra.get("input_config")
    options = as_dict(config[1]) if isinstance(config, list) and len(config) > 1 else {}
    received = extra.get("received_value")
    prefix = f"{name}: " if name else ""

    if kind == "value_not_in_list":
        allowed = config[0] if isinstance(config, list) and config else []
        allowed = [str(v) for v in allowed] if isinstance(allowed, list) else []
        if _looks_like_model(received, allowed):
            listing = ", ".join(allowed) if allowed else "(none)"
            # The shipped templates name their model fields after the node input
            # (txt2img's payload.ckpt_name fills ckpt_name), so the field to change is named.
            fix = f"choose one with payload.{name}, or " if name else ""
            return (
                f"{prefix}{received!r} is not installed; installed: {listing} "
                f"({fix}add the file to ComfyUI's models folder)"
            )
        listing = ", ".join(allowed) if allowed else "(none)"
        return f"{prefix}{received!r} is not one of: {listing}"
    if kind == "value_smaller_than_min" and "min" in options:
        return f"{prefix}{received!r} is below the minimum {options['min']}"
    if kind == "value_bigger_than_max" and "max" in options:
        return f"{prefix}{received!r} is above the maximum {options['max']}"
    if kind == "required_input_missing":
        return f"{prefix or (details + ': ' if details else '')}required input is missing"
    if kind == "invalid_input_type":
        wanted = config[0] if isinstance(config, list) and config else "the expected type"
        why = extra.get("exception_message")
        return f"{prefix}{received!r} is not a valid {wanted}" + (f" ({why})" if why else "")
    if kind == "return_type_mismatch":
        wanted = config[0] if isinstance(config, list) and config else "?"
        got = extra.get("received_type", "?")
        link = extra.get("linked_node")
        source = f" from node {link[0]}" if isinstance(link, list) and link else ""
        return f"{prefix}linked to an output of type {got}{source}, but needs {wanted}"
    if kind == "custom_validation_failed":
        text = details
        if name and text.startswith(f"{name} - "):
            text = text[len(name) + 3 :]
        return f"{prefix}{text or message}"
    if kind == "dependency_cycle":
        path = details or ", ".join(str(n) for n in extra.get("cycle_nodes") or [])
        return f"is in a loop of links ({path}): a node cannot depend on its own output"
    if kind == "invalid_dynamic_input":
        return f"{prefix}invalid dynamic input: {message.rstrip('.')}" + (
            f" ({details})" if details and details != name else ""
        )
    if kind in ("exception_during_validation", "exception_during_inner_validation"):
        exc_type = extra.get("exception_type")
        exc_msg = extra.get("exception_message") or details
        cause = f"{exc_type}: {exc_msg}" if exc_type else exc_msg
        return f"{prefix}{message.rstrip('.')} ({cause})"
    if details and details != name:
        return f"{prefix}{message.rstrip('.')}: {details}"
    return f"{prefix}{message}"


def _looks_like_model(received: Any, allowed: list[str]) -> bool:
    values = [str(received), *allowed]
    return any(v.lower().endswith(_MODEL_SUFFIXES) for v in values)


def _node_sort_key(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)


def _without_tracebacks(value: Any) -> Any:
    """Validation tracebacks point into ComfyUI's own code; they only bloat the status doc."""
    if isinstance(value, dict):
        return {k: _without_tracebacks(v) for k, v in value.items() if k != "traceback"}
    if isinstance(value, list):
        return [_without_tracebacks(v) for v in value]
    return value
