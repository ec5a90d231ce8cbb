"""``GET /workflows`` and ``GET /workflows/{name}``: the templates and their fields, as
``comfys3 workflows`` shows them, and each payload's JSON Schema."""

from __future__ import annotations

from processor import Workflow, WorkflowRegistry
from triggers.api.models import ApiError, WorkflowDetail, WorkflowField, WorkflowSummary
from triggers.cli.offline import workflow_fields


def summaries(registry: WorkflowRegistry) -> list[WorkflowSummary]:
    return [_summary(registry.workflows[name]) for name in registry.names()]


def detail(registry: WorkflowRegistry, name: str) -> WorkflowDetail:
    if name not in registry.workflows:
        raise ApiError(404, registry.unknown_message(name))
    workflow = registry.workflows[name]
    return WorkflowDetail(**_summary(workflow).model_dump(), payload_schema=workflow.json_schema())


def _summary(workflow: Workflow) -> WorkflowSummary:
    fields = [
        WorkflowField(
            name=row.name,
            type=row.kind,
            required=row.required,
            default=row.default,
            description=row.description,
        )
        for row in workflow_fields(workflow)
    ]
    return WorkflowSummary(name=workflow.name, description=workflow.description, fields=fields)
