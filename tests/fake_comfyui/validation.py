"""Prompt validation with ComfyUI's answers: the same error types, messages and body shapes.

The quirks are deliberate because clients parse them: a broken link inside an upstream node is
reported on that node with the downstream input's name; an exception while validating an output
node itself becomes `exception_during_validation`; the top-level `details` lists only the output
nodes' own errors; values are converted in place (the history shows converted values).
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from .nodes import NODES, NodeContext, NodeDef, offered

Error = dict[str, Any]


@dataclass
class ValidationResult:
    ok: bool
    error: Error | None = None
    outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)


def _error(kind: str, message: str, details: str = "", **extra: Any) -> Error:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2


def types_match(received: Any, wanted: Any) -> bool:
    if received == wanted:
        return True
    if not isinstance(received, str) or not isinstance(wanted, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in wanted.split(",")}
    return "*" in got or "*" in want or bool(got & want)


class _Validator:
    def __init__(self, prompt: dict[str, Any], ctx: NodeContext) -> None:
        self.prompt = prompt
        self.ctx = ctx
        # node id -> (valid, errors); exceptions in a node's inputs may land on another node
        self.validated: dict[Any, tuple[bool, list[Error]]] = {}

    def node(self, node_id: Any) -> tuple[bool, list[Error]]:
        """Validate one node and, through its links, everything upstream. May raise like ComfyUI."""
        if node_id in self.validated:
            return self.validated[node_id]
        node = self.prompt[node_id]
        inputs = node["inputs"]
        definition = NODES[node["class_type"]]
        types = definition.input_types(self.ctx)
        errors: list[Error] = []
        valid = True
        for category in ("required", "optional"):
            for name, spec in types.get(category, {}).items():
                if name not in inputs:
                    if category == "required":
                        errors.append(
                            _error(
                                "required_input_missing",
                                "Required input is missing",
                                name,
                                input_name=name,
                            )
                        )
                    continue
                value = inputs[name]
                if isinstance(value, list):
                    ok = self._check_link(definition, name, spec, value, errors)
                    valid = valid and ok
                else:
                    self._check_value(definition, inputs, name, spec, value, errors)
        if definition.validate is not None:
            taken = {k: inputs[k] for k in definition.validate_inputs if k in inputs}
            verdict = definition.validate(self.ctx, taken)
            if verdict is not True:
                for name in taken:
                    details = name if verdict is False else f"{name} - {verdict}"
                    errors.append(
                        _error(
                            "custom_validation_failed",
                            "Custom validation failed for node",
                            details,
                            input_name=name,
                        )
                    )
        result = (not errors and valid, errors)
        self.validated[node_id] = result
        return result

    def _check_link(
        self, definition: NodeDef, name: str, spec: Any, value: list[Any], errors: list[Error]
    ) -> bool:
        config = [spec[0], spec[1]]
        if len(value) != 2:
            errors.append(
                _error(
                    "bad_linked_input",
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    name,
                    input_name=name,
                    input_config=config,
                    received_value=value,
                )
            )
            return True
        source_id = value[0]
        # Outside any try, as in ComfyUI: a missing source or a bad slot raises to the caller.
        source_class = self.prompt[source_id]["class_type"]
        received = NODES[source_class].return_types[value[1]]
        if not types_match(received, spec[0]):
            details = f"{name}, received_type({received}) mismatch input_type({spec[0]})"
            errors.append(
                _error(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    details,
                    input_name=name,
                    input_config=config,
                    received_type=received,
                    linked_node=value,
                )
            )
            return True
        try:
            upstream_ok, _ = self.node(source_id)
            return upstream_ok
        except Exception as exc:
            _, _, tb = sys.exc_info()
            self.validated[source_id] = (
                False,
                [
                    _error(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        str(exc),
                        input_name=name,
                        input_config=config,
                        exception_message=str(exc),
                        exception_type=_type_name(exc),
                        traceback=traceback.format_tb(tb),
                        linked_node=value,
                    )
                ],
            )
            return False

    def _check_value(
        self,
        definition: NodeDef,
        inputs: dict[str, Any],
        name: str,
        spec: Any,
        value: Any,
        errors: list[Error],
    ) -> None:
        kind, options = spec[0], spec[1]
        config = [kind, options]
        if isinstance(value, dict) and "__value__" in value:
            value = inputs[name] = value["__value__"]
        converters: dict[str, Any] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
        if isinstance(kind, str) and kind in converters:
            try:
                value = inputs[name] = converters[kind](value)
            except Exception as exc:
                errors.append(
                    _error(
                        "invalid_input_type",
                        f"Failed to convert an input value to a {kind} value",
                        f"{name}, {value}, {exc}",
                        input_name=name,
                        input_config=config,
                        received_value=value,
                        exception_message=str(exc),
                    )
                )
                return
        if name in definition.validate_inputs:
            return
        if "min" in options and value < options["min"]:
            errors.append(
                _error(
                    "value_smaller_than_min",
                    f"Value {value} smaller than min of {options['min']}",
                    name,
                    input_name=name,
                    input_config=config,
                    received_value=value,
                )
            )
            return
        if "max" in options and value > options["max"]:
            errors.append(
                _error(
                    "value_bigger_than_max",
                    f"Value {value} bigger than max of {options['max']}",
                    name,
                    input_name=name,
                    input_config=config,
                    received_value=value,
                )
            )
            return
        if isinstance(kind, list) and value not in kind:
            listing: str = str(kind)
            shown: Any = config
            if len(kind) > 20:  # ComfyUI does not echo long lists (model folders)
                listing, shown = f"(list of length {len(kind)})", None
            errors.append(
                _error(
                    "value_not_in_list",
                    "Value not in list",
                    f"{name}: '{value}' not in {listing}",
                    input_name=name,
                    input_config=shown,
                    received_value=value,
                )
            )


def _unknown_node_error(node_id: str, node: Any, current: bool) -> Error:
    """A node without class_type, or of a class nobody registered.

    0.3.64 calls both `invalid_prompt`; today's ComfyUI calls them `missing_node_type` and names
    the node by its title (``_meta.title``), so a client can tell which custom node is missing.
    """
    has_class = isinstance(node, dict) and "class_type" in node
    if not current:
        if not has_class:
            message = "Cannot execute because a node is missing the class_type property."
        else:
            message = f"Cannot execute because node {node['class_type']} does not exist."
        return _error("invalid_prompt", message, f"Node ID '#{node_id}'")
    meta = node.get("_meta") if isinstance(node, dict) else None
    title = meta.get("title") if isinstance(meta, dict) else None
    if not has_class:
        message = (
            f"Node '{title or f'ID #{node_id}'}' has no class_type. "
            "The workflow may be corrupted or a custom node is missing."
        )
        class_type = None
    else:
        class_type = node["class_type"]
        title = title if title is not None else class_type
        message = f"Node '{title}' not found. The custom node may not be installed."
    return _error(
        "missing_node_type",
        message,
        f"Node ID '#{node_id}'",
        node_id=node_id,
        class_type=class_type,
        node_title=title,
    )


def validate_prompt(
    prompt: dict[str, Any], ctx: NodeContext, current: bool = False
) -> ValidationResult:
    """Check a prompt as ComfyUI's POST /prompt does. `prompt` is converted in place.

    `current` picks today's error type for unknown nodes (see _unknown_node_error).
    """
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return ValidationResult(False, _unknown_node_error(node_id, node, current))
        definition = offered(ctx).get(node["class_type"])
        if definition is None:
            return ValidationResult(False, _unknown_node_error(node_id, node, current))
        if definition.output_node:
            outputs.append(node_id)
    if not outputs:
        return ValidationResult(False, _error("prompt_no_outputs", "Prompt has no outputs"))

    validator = _Validator(prompt, ctx)
    good: list[str] = []
    own_errors: list[Error] = []
    node_errors: dict[str, Any] = {}
    for output in outputs:
        try:
            valid, reasons = validator.node(output)
        except Exception as exc:
            _, _, tb = sys.exc_info()
            valid = False
            reasons = [
                _error(
                    "exception_during_validation",
                    "Exception when validating node",
                    str(exc),
                    exception_type=_type_name(exc),
                    traceback=traceback.format_tb(tb),
                )
            ]
            validator.validated[output] = (False, reasons)
        if valid:
            good.append(output)
            continue
        own_errors += reasons
        # Downstream nodes of a broken node are invalid without errors of their own: skip them.
        for node_id, (node_valid, node_reasons) in validator.validated.items():
            if node_valid or not node_reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {
                    "errors": node_reasons,
                    "dependent_outputs": [],
                    "class_type": prompt[node_id]["class_type"],
                },
            )
            entry["dependent_outputs"].append(output)

    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for e in own_errors)
        error = _error(
            "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
        )
        return ValidationResult(False, error, [], node_errors)
    return ValidationResult(True, None, good, node_errors)
