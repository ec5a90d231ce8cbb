"""KEDA's ``keda.sh/v1alpha1`` ScaledObject and TriggerAuthentication, as a strict JSON Schema.

kubernetes-validate knows the built-in kinds only, and no package registry reachable here ships
KEDA's CRDs (the PyPI models need Python 3.14, the npm ones are compiled validators for Node
22), so this module states the part of the KEDA 2.20 CRDs that comfys3's overlays may use:
field names, types, required fields and enums as the CRDs' openAPIV3Schema declares them, plus
the one CEL rule of the ScaledObject CRD (minReplicaCount <= maxReplicaCount). It is stricter
than the API server in one way: a field it does not list is an error, so a misspelt field
(which the server would drop or refuse) fails here; a field the overlays start using must be
added here first, from the CRD.

Trigger metadata is a string-to-string map in the CRD; what each scaler accepts is in
:data:`SCALERS`, taken from the scalers' metadata declarations in KEDA 2.20 (the ``keda:"name=
..."`` tags of pkg/scalers/aws_sqs_queue_scaler.go and prometheus_scaler.go).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

API_VERSION = "keda.sh/v1alpha1"


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object with exactly these properties (none other allowed)."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = list(required)
    return schema


_STRING = {"type": "string"}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_BOOL = {"type": "boolean"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The object metadata a manifest sets; the API server fills in the rest.
_METADATA = _object(
    {
        "name": _STRING,
        "namespace": _STRING,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    required=("name",),
)

_HPA_SCALING_RULES = _object(
    {
        "stabilizationWindowSeconds": _INT32,
        "selectPolicy": {"type": "string", "enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": _object(
                {
                    "type": {"type": "string", "enum": ["Pods", "Percent"]},
                    "value": _INT32,
                    "periodSeconds": _INT32,
                },
                required=("type", "value", "periodSeconds"),
            ),
        },
    }
)

SCALED_OBJECT: dict[str, Any] = _object(
    {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": _object(
            {
                "scaleTargetRef": _object(
                    {
                        "apiVersion": _STRING,
                        "kind": _STRING,
                        "name": _STRING,
                        "envSourceContainerName": _STRING,
                    },
                    required=("name",),
                ),
                "pollingInterval": _INT32,
                "cooldownPeriod": _INT32,
                "initialCooldownPeriod": _INT32,
                "idleReplicaCount": _INT32,
                "minReplicaCount": _INT32,
                "maxReplicaCount": _INT32,
                "fallback": _object(
                    {
                        "failureThreshold": {**_INT32, "minimum": 0},
                        "replicas": {**_INT32, "minimum": 0},
                        "behavior": {
                            "type": "string",
                            "enum": [
                                "static",
                                "currentReplicas",
                                "currentReplicasIfHigher",
                                "currentReplicasIfLower",
                                "scalingModifiers",
                            ],
                        },
                    },
                    required=("failureThreshold", "replicas"),
                ),
                "advanced": _object(
                    {
                        "restoreToOriginalReplicaCount": _BOOL,
                        "horizontalPodAutoscalerConfig": _object(
                            {
                                "name": _STRING,
                                "behavior": _object(
                                    {"scaleUp": _HPA_SCALING_RULES, "scaleDown": _HPA_SCALING_RULES}
                                ),
                            }
                        ),
                        "scalingModifiers": _object(
                            {
                                "formula": _STRING,
                                "target": _STRING,
                                "activationTarget": _STRING,
                                "metricType": {
                                    "type": "string",
                                    "enum": ["AverageValue", "Value"],
                                },
                            }
                        ),
                    }
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _object(
                        {
                            "type": {"type": "string", "minLength": 1},
                            "name": _STRING,
                            "metadata": _STRING_MAP,
                            "metricType": {
                                "type": "string",
                                "enum": ["AverageValue", "Value", "Utilization"],
                            },
                            "useCachedMetrics": _BOOL,
                            "authenticationRef": _object(
                                {
                                    "name": _STRING,
                                    "kind": {
                                        "type": "string",
                                        "enum": [
                                            "TriggerAuthentication",
                                            "ClusterTriggerAuthentication",
                                        ],
                                    },
                                },
                                required=("name",),
                            ),
                        },
                        required=("type", "metadata"),
                    ),
                },
            },
            required=("scaleTargetRef", "triggers"),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)

_NAMED_KEY = _object(
    {"parameter": _STRING, "name": _STRING, "key": _STRING},
    required=("parameter", "name", "key"),
)

TRIGGER_AUTHENTICATION: dict[str, Any] = _object(
    {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _METADATA,
        "spec": _object(
            {
                "secretTargetRef": {"type": "array", "items": _NAMED_KEY},
                "configMapTargetRef": {"type": "array", "items": _NAMED_KEY},
                "env": {
                    "type": "array",
                    "items": _object(
                        {"parameter": _STRING, "name": _STRING, "containerName": _STRING},
                        required=("parameter", "name"),
                    ),
                },
                "podIdentity": _object(
                    {
                        "provider": {
                            "type": "string",
                            "enum": ["azure-workload", "gcp", "aws", "aws-eks", "none"],
                        },
                        "roleArn": _STRING,
                        "identityId": _STRING,
                        "identityOwner": {"type": "string", "enum": ["keda", "workload"]},
                        "identityTenantId": _STRING,
                        "identityAuthorityHost": _STRING,
                        "externalID": _STRING,
                    },
                    required=("provider",),
                ),
            }
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)

SCHEMAS = {"ScaledObject": SCALED_OBJECT, "TriggerAuthentication": TRIGGER_AUTHENTICATION}


@dataclass(frozen=True)
class Parameter:
    """One trigger parameter: where KEDA may read it from, and whether it must be given."""

    name: str
    required: bool = False
    from_env: bool = False  # may be given as <name>FromEnv: a variable of the scale target
    from_auth: bool = False  # may come from the TriggerAuthentication instead


# The scalers the overlays use. KEDA reads a required parameter from the trigger's metadata,
# from <name>FromEnv when allowed, or from the trigger authentication when allowed.
SCALERS: dict[str, tuple[Parameter, ...]] = {
    "aws-sqs-queue": (
        Parameter("queueURL", required=True, from_env=True),
        Parameter("queueLength"),
        Parameter("activationQueueLength"),
        Parameter("awsRegion", required=True, from_auth=True),
        Parameter("awsEndpoint"),
        Parameter("scaleOnInFlight"),
        Parameter("scaleOnDelayed"),
        Parameter("identityOwner"),
    ),
    "prometheus": (
        Parameter("serverAddress", required=True),
        Parameter("query", required=True),
        Parameter("queryParameters"),
        Parameter("threshold", required=True),
        Parameter("activationThreshold"),
        Parameter("namespace"),
        Parameter("customHeaders"),
        Parameter("ignoreNullValues"),
        Parameter("unsafeSsl"),
        Parameter("awsRegion", from_auth=True),
        Parameter("timeout"),
        Parameter("identityOwner"),
    ),
}

# Credentials the AWS scalers take from a trigger authentication (pkg/scalers/aws).
AWS_AUTH_PARAMETERS = frozenset(
    {"awsAccessKeyID", "awsSecretAccessKey", "awsSessionToken", "awsRoleArn", "awsRegion"}
)
NUMBER_PARAMETERS = frozenset(
    {"queueLength", "activationQueueLength", "threshold", "activationThreshold"}
)
BOOLEAN_PARAMETERS = frozenset({"scaleOnInFlight", "scaleOnDelayed", "ignoreNullValues"})


class KedaObjectError(ValueError):
    """A KEDA object that the API server or KEDA's operator would refuse."""


def schema_errors(obj: Mapping[str, Any]) -> list[str]:
    """Every way ``obj`` breaks its CRD schema (and the CRD's CEL rule), one line each."""
    kind = obj.get("kind")
    schema = SCHEMAS.get(str(kind))
    if schema is None:
        return [f"{kind}: not a KEDA kind this schema knows ({', '.join(SCHEMAS)})"]
    validator = jsonschema.Draft202012Validator(schema)
    errors = [
        f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in validator.iter_errors(obj)
    ]
    spec = obj.get("spec") or {}
    if kind == "ScaledObject" and isinstance(spec, Mapping):
        # The CRD's x-kubernetes-validations rule; maxReplicaCount defaults to 100.
        low, high = spec.get("minReplicaCount"), spec.get("maxReplicaCount", 100)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            errors.append("spec: minReplicaCount must be less than or equal to maxReplicaCount")
    return errors


def trigger_errors(
    trigger: Mapping[str, Any],
    *,
    target_env: Collection[str],
    auth_parameters: Collection[str] = (),
) -> Iterator[str]:
    """What KEDA's scaler would refuse in one trigger: an unknown parameter, a missing one, a
    ``...FromEnv`` naming no variable of the scale target, a number or flag it cannot parse."""
    kind = trigger.get("type")
    parameters = {p.name: p for p in SCALERS.get(str(kind), ())}
    if not parameters:
        yield f"trigger type {kind!r}: not a scaler this schema knows ({', '.join(SCALERS)})"
        return
    metadata: Mapping[str, str] = trigger.get("metadata") or {}
    given: set[str] = set()
    for key, value in metadata.items():
        name = key.removesuffix("FromEnv")
        parameter = parameters.get(name)
        if parameter is None:
            yield f"{kind}: unknown parameter {key!r}"
            continue
        if key != name:
            if not parameter.from_env:
                yield f"{kind}: {name} cannot be read from the environment ({key})"
            elif value not in target_env:
                yield f"{kind}: {key} names {value!r}, not a variable of the scale target"
        elif name in NUMBER_PARAMETERS and not _is_number(value):
            yield f"{kind}: {name} must be a number, not {value!r}"
        elif name in BOOLEAN_PARAMETERS and value not in ("true", "false"):
            yield f"{kind}: {name} must be true or false, not {value!r}"
        given.add(name)
    for parameter in parameters.values():
        from_auth = parameter.from_auth and parameter.name in auth_parameters
        if parameter.required and parameter.name not in given and not from_auth:
            yield f"{kind}: {parameter.name} is required"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
