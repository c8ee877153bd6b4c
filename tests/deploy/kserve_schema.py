"""The part of KServe's InferenceService (serving.kserve.io/v1beta1) that deploy/k8s/kserve uses.

Written for these tests from KServe's CRD: only the fields the manifest sets, each with the
type or values KServe accepts, and nothing else allowed where the CRD allows nothing else
(a misspelt `minReplica` fails, as it would be pruned by the API server). The containers
and volumes are a PodSpec's, checked by the Pod schema in test_k8s.py; here only what
KServe adds to them: the predictor container's name.
"""

from __future__ import annotations

from typing import Any

# Knative Serving accepts only these container port names (content negotiation).
KNATIVE_PORT_NAMES = frozenset({"", "http1", "h2c"})

_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}

INFERENCE_SERVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                # A DNS label: KServe derives Service and host names from it.
                "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "additionalProperties": False,
            "properties": {
                "predictor": {
                    "type": "object",
                    "additionalProperties": False,
                    # A custom predictor: containers, not a `model:` with a runtime.
                    "required": ["containers"],
                    "properties": {
                        "minReplicas": _INT32,
                        "maxReplicas": _INT32,
                        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
                        "scaleTarget": _INT32,
                        "timeout": {"type": "integer", "minimum": 1},
                        "containers": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "object", "required": ["name"]},
                            # The predictor is found by this name.
                            "contains": {
                                "type": "object",
                                "properties": {"name": {"const": "kserve-container"}},
                                "required": ["name"],
                            },
                        },
                        "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                    },
                },
            },
        },
    },
}
