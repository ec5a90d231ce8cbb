"""Every knob of comfys3, read from ``COMFYS3_*`` environment variables.

Settings are split by who needs them: a command that never touches S3 (``validate``,
``workflows``, ``exec``) must work with no S3 variables set, so the S3 block is its own model
and is only loaded by the code paths that talk to a bucket.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from processor.errors import SettingsError

ENV_PREFIX = "COMFYS3_"
S3_ENV_PREFIX = "COMFYS3_S3_"
SQS_ENV_PREFIX = "COMFYS3_SQS_"
RUNPOD_API_KEY_VARIABLE = "RUNPOD_API_KEY"


def normalise_prefix(value: str) -> str:
    """``/a//b/`` -> ``a/b``: keys built from it never start with or double a slash."""
    return "/".join(part for part in value.strip().split("/") if part)


class S3Settings(BaseSettings):
    """Where jobs arrive and results land. All five connection variables are required."""

    # An empty variable (``COMFYS3_S3_REGION=`` from a compose file with the host var unset)
    # counts as missing, so it is named at start-up instead of failing later inside botocore.
    model_config = SettingsConfigDict(
        env_prefix=S3_ENV_PREFIX, extra="ignore", env_ignore_empty=True
    )

    region: str = Field(description="Region of the bucket, e.g. us-east-1.")
    access_key: SecretStr = Field(description="Access key id.")
    secret_key: SecretStr = Field(description="Secret access key.")
    bucket_name: str = Field(description="Bucket holding manifests and results.")
    endpoint_url: str = Field(description="S3 endpoint, e.g. https://s3.us-east-1.amazonaws.com.")
    input_dir: str = Field(default="input", description="Prefix where job manifests arrive.")
    output_dir: str = Field(default="output", description="Prefix where results are written.")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="path",
        description="Bucket addressing; path style suits most S3-compatible servers.",
    )
    retry_attempts: int = Field(
        default=5, ge=1, description="botocore standard-mode retry attempts per S3 call."
    )

    @field_validator("input_dir", "output_dir")
    @classmethod
    def _normalise(cls, value: str) -> str:
        normalised = normalise_prefix(value)
        if not normalised:
            raise ValueError("must name a prefix, not the bucket root")
        return normalised

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


def _names(value: object) -> object:
    """A comma-separated list in the environment, a list in code."""
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


def _empty_is_unset(value: object) -> object:
    """``COMFYS3_METRICS_PORT=`` (a compose file passing an unset variable) means off."""
    return None if isinstance(value, str) and not value.strip() else value


class ComfyUISettings(BaseSettings):
    """The ComfyUI the worker runs jobs on: one it starts, or one it attaches to."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}COMFYUI_", extra="ignore")

    url: str | None = Field(
        default=None, description="Attach to this running ComfyUI instead of starting one."
    )
    path: Path | None = Field(default=None, description="ComfyUI checkout to start (its main.py).")
    python: str = Field(default="python3", description="Python that runs ComfyUI.")
    args: str = Field(default="", description="Extra ComfyUI arguments, e.g. --cpu.")
    env: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="More environment variables a started ComfyUI may see (comma-separated; "
        "NAME* for a prefix). It gets PATH, HOME, CUDA/HF/torch variables and these, never "
        "the worker's credentials.",
    )
    port: int = Field(default=8188, description="Port for a ComfyUI the worker starts.")
    startup_timeout: float = Field(
        default=300.0, gt=0, description="Seconds to wait for ComfyUI to answer."
    )
    connect_grace: float = Field(
        default=20.0,
        ge=0,
        description="Seconds an attached ComfyUI (COMFYS3_COMFYUI_URL) may refuse connections "
        "at start, while it boots, before the worker gives up.",
    )
    max_restarts: int = Field(
        default=5, ge=0, description="Restarts of a local ComfyUI that keeps dying, then give up."
    )
    log_file: Path | None = Field(
        default=None,
        description="Log of a local ComfyUI (default: comfys3-comfyui-<port>.log in the temp dir).",
    )
    reconnect_timeout: float = Field(
        default=60.0, gt=0, description="Seconds an attached ComfyUI may be unreachable mid-job."
    )
    input_dir: Path | None = Field(
        default=None, description="Input folder of an attached ComfyUI, so jobs clean up after."
    )
    output_dir: Path | None = Field(
        default=None, description="Output folder of an attached ComfyUI, so jobs clean up after."
    )
    temp_dir: Path | None = Field(
        default=None, description="Temp folder of an attached ComfyUI, so jobs clean up after."
    )

    _split_env = field_validator("env", mode="before")(_names)


class JobLimits(BaseSettings):
    """What one job may be and do: its manifest, its inputs, its time, its attempts."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    workflows_dir: Path | None = Field(
        default=None, description="Extra folder of workflow templates, loaded after workflows/."
    )
    allow_raw_workflows: bool = Field(
        default=False, description="Accept manifests that carry a raw ComfyUI graph."
    )
    max_manifest_bytes: int = Field(
        default=1_048_576, ge=1024, description="Manifests larger than this are refused."
    )
    job_timeout: float = Field(
        default=1800.0, gt=0, description="Seconds one prompt may run before it is interrupted."
    )
    max_input_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1, description="Input files larger than this are refused."
    )
    max_input_pixels: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="Input images with more pixels than this are refused (decompression bombs).",
    )
    max_attempts: int = Field(default=3, ge=1, description="Attempts before a job fails for good.")
    retry_delay: float = Field(
        default=2.0,
        ge=0,
        description="Seconds before this worker retries a job it gave back; doubles per attempt.",
    )


class LaneSettings(BaseSettings):
    """How the worker claims work and keeps ComfyUI's queue fed."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    lease_seconds: float = Field(
        default=120.0, gt=0, description="A claim not renewed for this long is taken over."
    )
    check_conditional_writes: bool = Field(
        default=True,
        description="At start, check that storage honours the conditional writes claims need.",
    )
    lane_depth_max: int = Field(
        default=8,
        ge=2,
        description="Most prompts kept in ComfyUI's queue; the worker goes this deep only for "
        "prompts much shorter than preparing one.",
    )
    cancel_check_interval: float = Field(
        default=2.0,
        ge=0,
        description="While jobs run, seconds between listings of the cancel requests "
        "(input/_cancel/); 0: only checked when a job is claimed.",
    )
    capability_wait: float = Field(
        default=300.0,
        ge=0,
        description="Seconds a manifest that needs node types or models this worker lacks is "
        "left for another worker (counted from its upload); then it fails, naming them.",
    )


class TriggerSettings(BaseSettings):
    """How work is noticed and how the worker stops."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    poll_min_interval: float = Field(
        default=0.5, gt=0, description="Poll interval right after finding work (seconds)."
    )
    poll_max_interval: float = Field(
        default=5.0, gt=0, description="Poll interval ceiling when idle (seconds)."
    )
    events_fallback_interval: float = Field(
        default=180.0,
        gt=0,
        description="With --events sqs, seconds between the full listings that catch lost events.",
    )
    shutdown_grace: float = Field(
        default=25.0,
        ge=0,
        description="On SIGTERM, seconds to let running jobs finish before giving them back.",
    )


class HostSettings(BaseSettings):
    """Who this worker is, where it keeps what outlives it, and how it warms up."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    worker_id: str | None = Field(
        default=None, description="Name of this worker in claims and statuses (default: host-pid)."
    )
    volume_dir: Path | None = Field(
        default=None,
        description="Network volume for logs (logs/) and the Hugging Face cache (huggingface/); "
        "default: /runpod-volume when it exists.",
    )
    warmup: str | None = Field(
        default=None,
        description="Job run once before claiming any: a template (solid), "
        "template:payload JSON, or @manifest path.",
    )
    gpus: str | None = Field(
        default=None,
        description="Start one ComfyUI per GPU and feed them all: GPU ids (0,1,3) or all "
        "(counted with nvidia-smi -L). Needs COMFYS3_COMFYUI_PATH; each gets its own port "
        "(COMFYS3_COMFYUI_PORT + n), folders and log.",
    )

    _unset = field_validator("warmup", "gpus", mode="before")(_empty_is_unset)

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: str | None) -> str | None:
        if value is not None:
            parse_gpus(value)
        return value

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, value: str | None) -> str | None:
        if value is not None:
            parse_warmup(value)
        return value


class RunpodSettings(BaseSettings):
    """The RunPod serverless handler's own knobs."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    presign_seconds: int = Field(
        default=3600,
        ge=1,
        le=604_800,
        description="Lifetime of the presigned output URLs a RunPod answer carries (seconds).",
    )
    runpod_concurrency: int = Field(
        default=1, ge=1, description="RunPod jobs one serverless worker runs at once."
    )
    refresh_worker: bool = Field(
        default=False, description="Ask RunPod for a fresh worker after each job."
    )
    runpod_images: Literal["auto", "base64", "s3_url"] = Field(
        default="auto",
        description="How a worker-comfyui-shaped request gets its images back: base64 in the "
        "answer, or s3_url (presigned); auto does as worker-comfyui: s3_url when its "
        "BUCKET_ENDPOINT_URL is set, base64 otherwise.",
    )


class WebhookSettings(BaseSettings):
    """Completion webhooks: where finished jobs are announced, and which URLs may be named."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}WEBHOOK_", extra="ignore")

    url: str | None = Field(
        default=None,
        description="POST each finished job's status here, unless its manifest names a URL.",
    )
    secret: SecretStr | None = Field(
        default=None,
        description="Signing secret of webhooks (Standard Webhooks: whsec_ and base64).",
    )
    allow: str = Field(
        default="",
        description="Hosts a manifest's notify.url may name, e.g. hooks.example.com,*.acme.io "
        "(empty: manifests may not name one).",
    )
    allow_http: bool = Field(
        default=False, description="Allow http:// webhook URLs (default: https only)."
    )
    allow_private: bool = Field(
        default=False,
        description="Allow webhook hosts on loopback and private addresses (10/8, 192.168/16 ...).",
    )
    attempts: int = Field(
        default=5, ge=1, le=20, description="Delivery attempts per webhook, with back-off."
    )
    timeout: float = Field(
        default=10.0, gt=0, le=120, description="Seconds one webhook attempt may take."
    )

    _unset = field_validator("url", "secret", mode="before")(_empty_is_unset)

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            webhook_key(value.get_secret_value())  # refuse a malformed secret at start
        return value


class FetchSettings(BaseSettings):
    """The one guard for every fetch from outside: model URLs, input URLs and webhooks."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}FETCH_", extra="ignore")

    allow_http: bool = Field(
        default=False,
        description="Allow http:// URLs for models, inputs and webhooks (default: https only).",
    )
    allow_private: bool = Field(
        default=False,
        description="Allow loopback and private addresses (10/8, 192.168/16 ...) for models, "
        "inputs and webhooks; link-local never.",
    )
    allow_hosts: str = Field(
        default="",
        description="Hosts a manifest's URLs may name, e.g. huggingface.co,*.hf.co "
        "(empty: any public host).",
    )
    timeout: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Seconds a fetch may wait to connect or for the next bytes.",
    )


class ModelSettings(BaseSettings):
    """Models a manifest names by URL or Hugging Face path, fetched into a cache at run time."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}MODEL_", extra="ignore")

    cache: Path | None = Field(
        default=None,
        description="Folder of models fetched at run time, in ComfyUI's folder layout "
        "(default: model-cache/ on the network volume when there is one; else off).",
    )
    cache_max_gb: float = Field(
        default=100.0,
        gt=0,
        description="Size of the model cache (GB); least recently used models are evicted "
        "past it, and a larger model is refused.",
    )

    _unset = field_validator("cache", mode="before")(_empty_is_unset)


class MetricsSettings(BaseSettings):
    """The ops server: /metrics, /healthz and /livez."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}METRICS_", extra="ignore")

    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Serve /metrics, /healthz and /livez on this port (default: off).",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Address the metrics server listens on (0.0.0.0 to be scraped from outside).",
    )

    _unset = field_validator("port", mode="before")(_empty_is_unset)


class ApiSettings(BaseSettings):
    """The HTTP jobs API (``comfys3 serve``, or beside ``comfys3 run`` when a port is set)."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}API_", extra="ignore")

    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Serve the jobs API on this port beside `comfys3 run` (default: off; "
        "`comfys3 serve` uses it too, else 8288).",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Address the jobs API listens on (0.0.0.0 to be reached from outside).",
    )
    token: SecretStr | None = Field(
        default=None,
        description="Bearer token every jobs API request must carry (Authorization: Bearer ...).",
    )
    allow_no_token: bool = Field(
        default=False,
        description="Serve the jobs API without a token; honoured only on a loopback address.",
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Largest request body the jobs API reads (a POST /jobs of many manifests).",
    )

    _unset = field_validator("port", "token", mode="before")(_empty_is_unset)


# The groups of WorkerSettings, by attribute: each reads its own variables, named by its prefix.
GROUPS: dict[str, type[BaseSettings]] = {
    "comfyui": ComfyUISettings,
    "jobs": JobLimits,
    "lane": LaneSettings,
    "triggers": TriggerSettings,
    "host": HostSettings,
    "runpod": RunpodSettings,
    "webhooks": WebhookSettings,
    "metrics": MetricsSettings,
    "fetch": FetchSettings,
    "models": ModelSettings,
    "api": ApiSettings,
}


def _prefix(group: type[BaseSettings]) -> str:
    return str(group.model_config.get("env_prefix", ENV_PREFIX))


def setting_names() -> dict[str, tuple[str, str]]:
    """``comfyui_url`` -> ("comfyui", "url"): each setting by its variable's name after COMFYS3_."""
    names: dict[str, tuple[str, str]] = {}
    for attribute, group in GROUPS.items():
        short = _prefix(group).removeprefix(ENV_PREFIX).lower()
        for name in group.model_fields:
            names[f"{short}{name}"] = (attribute, name)
    return names


class WorkerSettings(BaseModel):
    """Every knob of a worker, grouped by concern and read once; passed down whole, so a
    setting can never reach one trigger and not another.

    Built from the environment by ``WorkerSettings()`` (each group reads its own
    ``COMFYS3_*`` variables). In code, a group can be given whole (``comfyui=...``) or single
    settings by their variable's name after ``COMFYS3_`` (``comfyui_url=...``,
    ``lease_seconds=...``); those override the environment.
    """

    model_config = ConfigDict(frozen=True)

    comfyui: ComfyUISettings = Field(default_factory=ComfyUISettings)
    jobs: JobLimits = Field(default_factory=JobLimits)
    lane: LaneSettings = Field(default_factory=LaneSettings)
    triggers: TriggerSettings = Field(default_factory=TriggerSettings)
    host: HostSettings = Field(default_factory=HostSettings)
    runpod: RunpodSettings = Field(default_factory=RunpodSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)

    @model_validator(mode="before")
    @classmethod
    def _route_setting_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        flat = setting_names()
        routed: dict[str, dict[str, Any]] = {}
        rest: dict[str, Any] = {}
        for key, value in data.items():
            if key in flat:
                attribute, name = flat[key]
                routed.setdefault(attribute, {})[name] = value
            else:
                rest[key] = value
        for attribute, values in routed.items():
            if attribute in rest:
                raise ValueError(f"give {attribute} whole or by single settings, not both")
            rest[attribute] = GROUPS[attribute](**values)
        return rest

    def replace(self, **flat: Any) -> WorkerSettings:
        """A copy with some settings changed, named as in the constructor (``comfyui_url``)."""
        names = setting_names()
        groups: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            if key not in names:
                raise TypeError(f"no setting {key!r}")
            attribute, name = names[key]
            groups.setdefault(attribute, {})[name] = value
        update = {
            attribute: getattr(self, attribute).model_copy(update=values)
            for attribute, values in groups.items()
        }
        return self.model_copy(update=update)


def environment_variables() -> set[str]:
    """Every COMFYS3_* variable a worker reads (the README's settings table lists them)."""
    return {
        f"{_prefix(group)}{name}".upper()
        for group in GROUPS.values()
        for name in group.model_fields
    }


WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_KEY_BYTES = (24, 64)  # the Standard Webhooks specification's range for a secret


def webhook_key(secret: str) -> bytes:
    """``whsec_<base64>`` -> the HMAC key, as the Standard Webhooks libraries decode it.

    Checked when settings load, so a malformed secret stops the worker at start instead of
    signing every webhook with a key no receiver can reproduce.
    """
    value = secret.strip()
    if not value.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(
            f"must start with {WEBHOOK_SECRET_PREFIX} followed by base64, as in the Standard "
            'Webhooks specification; make one with: python3 -c "import base64, os; '
            "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
        )
    try:
        key = base64.b64decode(value[len(WEBHOOK_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"is not valid base64 after {WEBHOOK_SECRET_PREFIX}") from None
    low, high = WEBHOOK_KEY_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"decodes to {len(key)} bytes; use {low} to {high} random bytes")
    return key


def parse_gpus(value: str) -> list[str] | None:
    """``0,1,3`` -> the GPU ids; ``all`` -> None (to be counted on the machine). Only the
    syntax is checked here, when settings load."""
    text = value.strip()
    if text.lower() == "all":
        return None
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids or not all(re.fullmatch(r"\d{1,3}", gpu) for gpu in ids):
        raise ValueError(f"{value!r}: give GPU ids separated by commas (0,1) or all")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{value!r} names a GPU twice")
    return ids


@dataclass(frozen=True)
class WarmupSpec:
    """What ``COMFYS3_WARMUP`` names: a manifest file, or a template and its payload."""

    manifest_path: Path | None = None
    workflow: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"@{self.manifest_path}" if self.manifest_path else str(self.workflow)


_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def parse_warmup(value: str) -> WarmupSpec:
    """``solid`` | ``txt2img:{"steps": 1}`` | ``@/path/job.json`` -> a WarmupSpec.

    Only the syntax is checked here (when settings load); whether the template exists or the
    file can be read is found out when the warm-up runs, and reported there.
    """
    text = value.strip()
    if text.startswith("@"):
        path = text[1:].strip()
        if not path:
            raise ValueError("'@' must be followed by the path of a manifest file")
        return WarmupSpec(manifest_path=Path(path))
    name, colon, payload_text = text.partition(":")
    name = name.strip()
    if not _TEMPLATE_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a template name; give a template (solid), a template and its "
            'payload (txt2img:{"steps": 1}), or @ and a manifest file (@/jobs/warm.json)'
        )
    payload: Any = {}
    if colon:
        try:
            payload = json.loads(payload_text)
        except ValueError as error:
            raise ValueError(f"the payload after '{name}:' is not valid JSON: {error}") from None
        if not isinstance(payload, dict):
            raise ValueError(f"the payload after '{name}:' must be a JSON object")
    return WarmupSpec(workflow=name, payload=payload)


class SqsSettings(BaseSettings):
    """The SQS queue that S3 event notifications feed (``--events sqs``, ``comfys3 dispatch``).

    Only the queue is required: credentials come from the S3 settings, the endpoint from the
    queue URL (``https://sqs.<region>.amazonaws.com/<account>/<name>``) and the region from
    the S3 settings, each unless set here.
    """

    model_config = SettingsConfigDict(
        env_prefix=SQS_ENV_PREFIX, extra="ignore", env_ignore_empty=True
    )

    queue_url: str = Field(description="URL of the queue the bucket's event notifications feed.")
    endpoint_url: str | None = Field(
        default=None, description="SQS endpoint (default: the scheme and host of the queue URL)."
    )
    region: str | None = Field(
        default=None, description="Region of the queue (default: COMFYS3_S3_REGION)."
    )
    visibility_timeout: int = Field(
        default=60,
        ge=2,
        le=43_200,
        description="Seconds a received message stays hidden; renewed while its manifest runs.",
    )
    max_hold: float = Field(
        default=3600.0,
        gt=0,
        le=43_200,
        description="Seconds a message is kept hidden while its manifest runs, then let go.",
    )
    retry_attempts: int = Field(
        default=5, ge=1, description="botocore standard-mode retry attempts per SQS call."
    )

    @field_validator("queue_url", "endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")) or not urlsplit(value).netloc:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    def resolved_endpoint(self) -> str:
        if self.endpoint_url:
            return self.endpoint_url
        parts = urlsplit(self.queue_url)
        return f"{parts.scheme}://{parts.netloc}"


class DispatchSettings(BaseSettings):
    """Where ``comfys3 dispatch`` (and its Lambda twin) sends one RunPod request per manifest."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    runpod_endpoint_id: str = Field(description="RunPod serverless endpoint that runs the jobs.")
    runpod_api_key: SecretStr = Field(
        validation_alias=AliasChoices(RUNPOD_API_KEY_VARIABLE),
        description="RunPod API key (read from RUNPOD_API_KEY).",
    )
    runpod_api_url: str = Field(
        default="https://api.runpod.ai",
        description="RunPod API base URL; point it at a gateway or a local stand-in.",
    )
    dispatch_ttl: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds after which a dispatch RunPod cannot account for is sent again.",
    )
    dispatch_max_requests: int = Field(
        default=5,
        ge=1,
        description="RunPod requests for one manifest before the dispatcher gives up.",
    )

    @field_validator("runpod_endpoint_id")
    @classmethod
    def _endpoint_id(cls, value: str) -> str:
        value = value.strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
            raise ValueError("must be the endpoint id RunPod shows (letters, digits, - and _)")
        return value

    @field_validator("runpod_api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or not urlsplit(value).netloc:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


def _variable(prefix: str, location: object) -> str:
    """The environment variable a validation error is about (an alias is named as it is)."""
    name = str(location)
    return name if name.isupper() else f"{prefix}{name.upper()}"


def _missing_variables(error: ValidationError, prefix: str) -> list[str]:
    return [
        _variable(prefix, item["loc"][0])
        for item in error.errors()
        if item["type"] == "missing" and item["loc"]
    ]


def _explain(error: ValidationError, prefix: str, what: str) -> SettingsError:
    """One message for every problem, naming each variable, never echoing a value."""
    missing = _missing_variables(error, prefix)
    lines = []
    if missing:
        lines.append(f"{what}: missing environment variable(s): {', '.join(missing)}")
    for item in error.errors():
        if item["type"] == "missing":
            continue
        name = _variable(prefix, item["loc"][0]) if item["loc"] else prefix
        lines.append(f"{what}: {name}: {item['msg'].removeprefix('Value error, ')}")
    return SettingsError("\n".join(lines))


def load_s3_settings() -> S3Settings:
    try:
        return S3Settings()  # type: ignore[call-arg]
    except ValidationError as error:
        raise _explain(error, S3_ENV_PREFIX, "S3 settings") from None


def load_worker_settings() -> WorkerSettings:
    """Every group from the environment; one message names every wrong variable of all."""
    groups: dict[str, BaseSettings] = {}
    problems: list[str] = []
    for attribute, group in GROUPS.items():
        try:
            groups[attribute] = group()
        except ValidationError as error:
            problems.append(str(_explain(error, _prefix(group), "worker settings")))
    if problems:
        raise SettingsError("\n".join(problems))
    return WorkerSettings.model_validate(groups)


def load_sqs_settings() -> SqsSettings:
    """Only ``--events sqs`` and ``comfys3 dispatch`` call this, so nobody else needs a queue."""
    try:
        return SqsSettings()  # type: ignore[call-arg]
    except ValidationError as error:
        raise _explain(error, SQS_ENV_PREFIX, "SQS settings") from None


def load_dispatch_settings() -> DispatchSettings:
    try:
        return DispatchSettings()  # type: ignore[call-arg]
    except ValidationError as error:
        raise _explain(error, ENV_PREFIX, "dispatch settings") from None
