"""comfys3's core, and its public face: what triggers (the CLI, RunPod, events, the report) use.

Triggers import only the names listed in ``__all__``, from ``processor`` itself; the rooms behind
it (``processor.comfy``, ``.storage``, ``.job``, ``.worker``, ``.ops``) may be rearranged
without a trigger noticing. ``tests/test_exported_members.py`` holds both rules: every name here
exists, and no trigger reaches past this file. Workflow templates import the definition API
from :mod:`processor.workflows`, whose path is part of what a user's own template relies on.
"""

from processor.aio import ClosedOnExit, unless_set
from processor.comfy.locate import Located, locate_comfyui
from processor.comfy.waiting import Waiting
from processor.errors import (
    ComfyError,
    Comfys3Error,
    InputInvalid,
    JsonLimitError,
    ManifestError,
    ObjectNotFound,
    PreconditionFailed,
    Problem,
    SettingsError,
    StoppedFirst,
    StoppedWhileStarting,
    StorageError,
    WorkflowLoadError,
)
from processor.job.cancel import CancelRequest, cancel_request, command_line_requester
from processor.job.input_refs import RULE, key_problems, missing_inputs
from processor.job.inputs import check_image
from processor.job.manifest import (
    Job,
    JobManifest,
    check_job_id,
    default_job_id,
    file_targets,
    load_jobs,
)
from processor.job.runner import JobOutcome, Verdict
from processor.job.status import JobState, JobStatus, OutputRecord, ProgressInfo
from processor.job.status_book import FINAL, STATUS_CONCURRENCY, JobRecord, StatusBook
from processor.job.submission import put_new_manifest
from processor.ops.parts import Ops, build_ops
from processor.ops.server import OpsServer
from processor.ops.version import package_version
from processor.ops.volume import VolumeLogHandler, worker_log_handler
from processor.safejson import load_json
from processor.settings import (
    DispatchSettings,
    S3Settings,
    SqsSettings,
    WorkerSettings,
    load_dispatch_settings,
    load_s3_settings,
    load_sqs_settings,
    load_worker_settings,
    parse_gpus,
)
from processor.storage.base import (
    ObjectInfo,
    Page,
    PutOptions,
    Storage,
    StoredObject,
    folder_prefix,
    validate_key,
)
from processor.storage.claims_check import PROBE_PREFIX
from processor.storage.embedded import DATA_DIR, EmbeddedS3Storage
from processor.storage.layout import (
    CANCEL,
    CLAIMS,
    DISPATCHED,
    DONE,
    FAILED,
    Layout,
    priority_name,
    split_priority,
)
from processor.storage.local import LocalStorage
from processor.storage.s3 import S3Storage
from processor.storage.s3_clients import s3_storage
from processor.template_scaffold import (
    FieldPlan,
    FixedValue,
    NodeCatalog,
    Plan,
    ScaffoldError,
    check_template_name,
    differences,
    parse_graph,
    plan_template,
    render_graph,
    render_module,
)
from processor.worker.assembly import (
    StoreChoice,
    choose_store,
    open_storage,
    open_worker,
    s3_layout,
    storage_from_env,
)
from processor.worker.loop import Counts, WaitForWork, Worker
from processor.workflows import (
    Bind,
    InputFile,
    Sampler,
    Scheduler,
    Workflow,
    WorkflowPayload,
    WorkflowRegistry,
    builtin_workflows_dir,
    load_workflow,
    random_seed,
)

__all__ = [
    "CANCEL",
    "CLAIMS",
    "DATA_DIR",
    "DISPATCHED",
    "DONE",
    "FAILED",
    "FINAL",
    "PROBE_PREFIX",
    "RULE",
    "STATUS_CONCURRENCY",
    "Bind",
    "CancelRequest",
    "ClosedOnExit",
    "ComfyError",
    "Comfys3Error",
    "Counts",
    "DispatchSettings",
    "EmbeddedS3Storage",
    "FieldPlan",
    "FixedValue",
    "InputFile",
    "InputInvalid",
    "Job",
    "JobManifest",
    "JobOutcome",
    "JobRecord",
    "JobState",
    "JobStatus",
    "JsonLimitError",
    "Layout",
    "LocalStorage",
    "Located",
    "ManifestError",
    "NodeCatalog",
    "ObjectInfo",
    "ObjectNotFound",
    "Ops",
    "OpsServer",
    "OutputRecord",
    "Page",
    "Plan",
    "PreconditionFailed",
    "Problem",
    "ProgressInfo",
    "PutOptions",
    "S3Settings",
    "S3Storage",
    "Sampler",
    "ScaffoldError",
    "Scheduler",
    "SettingsError",
    "SqsSettings",
    "StatusBook",
    "StoppedFirst",
    "StoppedWhileStarting",
    "Storage",
    "StorageError",
    "StoreChoice",
    "StoredObject",
    "Verdict",
    "VolumeLogHandler",
    "WaitForWork",
    "Waiting",
    "Worker",
    "WorkerSettings",
    "Workflow",
    "WorkflowLoadError",
    "WorkflowPayload",
    "WorkflowRegistry",
    "build_ops",
    "builtin_workflows_dir",
    "cancel_request",
    "check_image",
    "check_job_id",
    "check_template_name",
    "choose_store",
    "command_line_requester",
    "default_job_id",
    "differences",
    "file_targets",
    "folder_prefix",
    "key_problems",
    "load_dispatch_settings",
    "load_jobs",
    "load_json",
    "load_s3_settings",
    "load_sqs_settings",
    "load_worker_settings",
    "load_workflow",
    "locate_comfyui",
    "missing_inputs",
    "open_storage",
    "open_worker",
    "package_version",
    "parse_gpus",
    "parse_graph",
    "plan_template",
    "priority_name",
    "put_new_manifest",
    "random_seed",
    "render_graph",
    "render_module",
    "s3_layout",
    "s3_storage",
    "split_priority",
    "storage_from_env",
    "unless_set",
    "validate_key",
    "worker_log_handler",
]
