"""The KEDA objects' fields as KEDA documents them (keda.sh docs 2.16: ScaledObject spec, the `redis` and
`prometheus` scalers, TriggerAuthentication). kubernetes-validate has no schema for CRDs, so these stand in:
a misspelt field fails here instead of being ignored by the cluster."""

from __future__ import annotations

from typing import Any

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}  # KEDA metadata values are strings


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}

# Trigger metadata keys each scaler documents; values are strings.
TRIGGER_METADATA = {
    "redis": _closed(
        {key: {"type": "string"} for key in (
            "address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv", "usernameFromEnv",
            "passwordFromEnv", "listName", "listLength", "activationListLength", "keyName", "keyValue",
            "activationValue", "enableTLS", "unsafeSsl", "databaseIndex")},  # fmt: skip
        required=("listName",),
    ),
    "prometheus": _closed(
        {key: {"type": "string"} for key in (
            "serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
            "ignoreNullValues", "queryParameters", "unsafeSsl", "authModes")},  # fmt: skip
        required=("serverAddress", "query", "threshold"),
    ),
}

_TRIGGER = _closed(
    {
        "type": {"enum": sorted(TRIGGER_METADATA)},
        "name": {"type": "string", "pattern": "^[a-z0-9-]+$"},
        "metadata": _STRING_MAP,
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
        "authenticationRef": _closed({"name": {"type": "string"}, "kind": {"type": "string"}}, ("name",)),
    },
    required=("type", "metadata"),
)

SCALED_OBJECT = _closed(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": _closed(
            {
                "scaleTargetRef": _closed(
                    {key: {"type": "string"} for key in ("apiVersion", "kind", "name", "envSourceContainerName")},
                    ("name",),
                ),
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": _closed(
                    {"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"}},
                    ("failureThreshold", "replicas"),
                ),
                "advanced": _closed(
                    {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": _closed(
                            {"name": {"type": "string"}, "behavior": {"type": "object"}}
                        ),
                        "scalingModifiers": {"type": "object"},
                    }
                ),
                "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
            },
            required=("scaleTargetRef", "triggers"),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)

TRIGGER_AUTHENTICATION = _closed(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _METADATA,
        "spec": _closed(
            {
                "secretTargetRef": {
                    "type": "array",
                    "items": _closed(
                        {key: {"type": "string"} for key in ("parameter", "name", "key")}, ("parameter", "name", "key")
                    ),
                },
                "env": {"type": "array"},
                "configMapTargetRef": {"type": "array"},
                "podIdentity": {"type": "object"},
                "hashiCorpVault": {"type": "object"},
            }
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)

SCHEMAS = {"ScaledObject": SCALED_OBJECT, "TriggerAuthentication": TRIGGER_AUTHENTICATION}
