"""The Open Inference Protocol's (KServe V2) codec: JSON and binary tensors <-> arrays.

Pure functions of bytes and arrays, shared by the REST routes (service/v2.py)
and, for the checks and datatypes, by gRPC (service/grpc_server.py), so both
transports accept and refuse exactly the same tensors; unit-tested without a
server. The model has one input, `input`: [N, 784] or [N, 28, 28], FP32 in
[0, 1] (the network's own input, used as is) or UINT8 in 0..255 (scaled by
core.preprocess.to_vectors, exactly as /predict scales a 28×28 image). It has
two outputs, `probabilities` (FP32 [N, 10]) and `digit` (INT64 [N]).

Tensors travel as JSON `data` (flat or nested, row-major) or, with the binary
tensor data extension, as raw little-endian bytes after the JSON header whose
length the `Inference-Header-Content-Length` header gives. Errors are
`V2Error`s, answered `{"error": "<message>"}` over REST (the protocol has no
codes) and as a gRPC status over gRPC.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.modelstore import LoadedModel, parse_version
from core.preprocess import IMAGE_SIDE, N_INPUTS, to_vectors
from service.errors import ApiError

SERVER_NAME = "mnist-serving"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data", "model_repository")
PLATFORM = "numpy_mlp"
HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT_NAME = "input"
# Wire dtypes are little-endian whatever the host's byte order.
INPUT_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
OUTPUT_DTYPES = {"probabilities": ("FP32", np.dtype("<f4")), "digit": ("INT64", np.dtype("<i8"))}
INPUT_SHAPES = ((N_INPUTS,), (IMAGE_SIDE, IMAGE_SIDE))


class V2Error(ApiError):
    """A protocol error: HTTP status and the message for `{"error": ...}` (the protocol has no codes)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, "invalid_request", message)


@dataclass(frozen=True)
class InferRequest:
    """A validated inference request: network input rows and what to send back."""

    id: str | None
    parameters: dict[str, Any] | None
    x: np.ndarray  # (N, 784) float32 in [0, 1]
    outputs: tuple[tuple[str, bool], ...]  # (output name, as binary)


# --- parsing -----------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor bytes that follow it."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise V2Error(400, f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise V2Error(400, f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
    return body[:n], body[n:]


def _parameters(obj: dict, where: str) -> dict[str, Any] | None:
    params = obj.get("parameters")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise V2Error(400, f"{where} parameters must be a JSON object")
    for key, value in params.items():
        if not isinstance(value, str | int | float | bool):
            raise V2Error(400, f"{where} parameter {key!r} must be a string, number or boolean")
    return params


def _flag(params: dict[str, Any] | None, key: str, where: str) -> bool | None:
    if not params or key not in params:
        return None
    if not isinstance(params[key], bool):
        raise V2Error(400, f"{where} parameter {key!r} must be a boolean")
    return params[key]


def check_input(name: Any, datatype: Any, shape: Any) -> tuple[int, ...]:
    """The input's name, datatype and shape checked, whatever the transport (REST or gRPC): its shape."""
    if name != INPUT_NAME:
        raise V2Error(400, f"unexpected input {name!r}: the model's input is {INPUT_NAME!r}")
    if datatype not in INPUT_DTYPES:
        raise V2Error(400, f"input datatype must be FP32 or UINT8, got {datatype!r}")
    return check_shape(shape)


def check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise V2Error(400, "input shape must be a list of non-negative integers")
    if len(shape) < 2 or tuple(shape[1:]) not in INPUT_SHAPES:
        raise V2Error(400, f"input shape must be [N, 784] or [N, 28, 28], got {shape}")
    if shape[0] < 1:
        raise V2Error(400, "input batch size N must be at least 1")
    return tuple(shape)


def tensor_from_json(data: Any, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """JSON tensor data, flat or nested in its natural shape, as an array of `shape`.

    Numbers only: strings and nulls are errors. JSON booleans become 1 and 0, a
    coercion the protocol allows ("the server can decide to coerce each element").
    """
    if not isinstance(data, list):
        raise V2Error(400, "input data must be a JSON array")
    if len(data) not in (shape[0], math.prod(shape)):  # nested by rows, or flat
        raise V2Error(400, f"input data has {len(data)} items, shape {list(shape)} needs {shape[0]} rows")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise V2Error(400, "input data must be a rectangular array of numbers") from None
    if arr.dtype.kind not in ("biu" if datatype == "UINT8" else "biuf"):
        kind = "integers" if datatype == "UINT8" else "numbers"
        raise V2Error(400, f"{datatype} input data must contain only {kind}")
    if arr.ndim > 1 and arr.shape != shape:
        raise V2Error(400, f"input data has shape {list(arr.shape)}, the tensor's shape is {list(shape)}")
    check_count(arr.size, shape)
    if datatype == "UINT8":
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise V2Error(400, "UINT8 input values must be in 0..255")
        return arr.astype(np.uint8).reshape(shape)
    return arr.astype(np.float32).reshape(shape)


def tensor_from_bytes(raw: bytes, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw little-endian row-major bytes as an array of `shape` (the binary extension)."""
    dtype = INPUT_DTYPES[datatype]
    need = math.prod(shape) * dtype.itemsize
    if len(raw) != need:
        raise V2Error(400, f"binary input has {len(raw)} bytes, {datatype} {list(shape)} needs {need}")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(shape)


def to_network_input(arr: np.ndarray, datatype: str) -> np.ndarray:
    """(N, 784) float32 rows in [0, 1], the rows core.network.probabilities takes.

    UINT8 goes through the one preprocessing function, so it matches /predict
    bit for bit; FP32 is already the network's input and is only checked.
    """
    if datatype == "UINT8":
        return to_vectors(arr.reshape(-1, N_INPUTS))
    x = np.ascontiguousarray(arr.reshape(-1, N_INPUTS), dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise V2Error(400, "FP32 input contains NaN or infinity")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise V2Error(400, "FP32 input values must be in [0, 1] (send UINT8 for 0..255 pixels)")
    return x


def check_batch(shape: tuple[int, ...], max_batch: int) -> None:
    """The declared batch size N within MAX_BATCH (413 beyond), checked from the shape before
    any value is read into an array, whatever the transport."""
    if shape[0] > max_batch:
        raise V2Error(413, f"batch of {shape[0]} exceeds the maximum of {max_batch}")


def check_count(count: int, shape: tuple[int, ...]) -> None:
    """As many values as the shape needs (400 otherwise), counted before they become an array."""
    if count != math.prod(shape):
        raise V2Error(400, f"input data has {count} values, shape {list(shape)} needs {math.prod(shape)}")


def check_output(name: Any, chosen: list[str]) -> str:
    """A requested output's name, known and not already in `chosen`."""
    if name not in OUTPUT_DTYPES:
        raise V2Error(400, f"unknown output {name!r}: the outputs are {sorted(OUTPUT_DTYPES)}")
    if name in chosen:
        raise V2Error(400, f"output {name!r} requested twice")
    return name


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object, or the protocol's 400."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: deep nesting
        raise V2Error(400, f"malformed JSON request: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict):
        raise V2Error(400, "the request must be a JSON object")
    return doc


def parse_infer_request(body: bytes, header_length: str | None, max_batch: int) -> InferRequest:
    """Validate an inference request body (JSON header plus optional binary tensors)."""
    header, raw = split_body(body, header_length)
    doc = json_object(header)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2Error(400, "id must be a string")
    params = _parameters(doc, "request")

    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise V2Error(400, "inputs must be a list of tensor objects")
    if len(inputs) != 1:
        raise V2Error(400, f"the model takes 1 input ({INPUT_NAME!r}), got {len(inputs)}")
    tensor = inputs[0]
    datatype = tensor.get("datatype")
    shape = check_input(tensor.get("name"), datatype, tensor.get("shape"))
    check_batch(shape, max_batch)
    tensor_params = _parameters(tensor, "input")
    if tensor_params and "binary_data_size" in tensor_params:
        size = tensor_params["binary_data_size"]
        if type(size) is not int or size < 0:
            raise V2Error(400, "binary_data_size must be a non-negative integer")
        if "data" in tensor:
            raise V2Error(400, "an input has either JSON data or binary_data_size, not both")
        if size > len(raw):
            raise V2Error(400, f"binary_data_size {size} exceeds the {len(raw)} bytes after the JSON header")
        arr = tensor_from_bytes(raw[:size], datatype, shape)
        raw = raw[size:]
    elif "data" in tensor:
        arr = tensor_from_json(tensor["data"], datatype, shape)
    else:
        raise V2Error(400, "input has neither data nor binary_data_size")
    if raw:
        raise V2Error(400, f"{len(raw)} bytes after the JSON header belong to no input")
    x = to_network_input(arr, datatype)

    default_binary = bool(_flag(params, "binary_data_output", "request"))
    requested = doc.get("outputs")
    if requested is None:
        outputs = tuple((name, default_binary) for name in OUTPUT_DTYPES)
    else:
        if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
            raise V2Error(400, "outputs must be a list of objects")
        chosen: list[tuple[str, bool]] = []
        for out in requested:
            name = check_output(out.get("name"), [n for n, _ in chosen])
            binary = _flag(_parameters(out, "output"), "binary_data", "output")
            chosen.append((name, default_binary if binary is None else binary))
        outputs = tuple(chosen)
    return InferRequest(request_id, params, x, outputs)


# --- encoding ----------------------------------------------------------------


def output_tensors(digits: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """The two outputs by name, in their protocol datatypes, from a forward pass's digits and
    probabilities."""
    return {"probabilities": probs.astype(np.float32, copy=False), "digit": digits.astype(np.int64)}


def encode_response(
    model: LoadedModel, req: InferRequest, results: dict[str, np.ndarray], response_id: str | None
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    outputs, blobs = [], []
    for name, binary in req.outputs:
        datatype, dtype = OUTPUT_DTYPES[name]
        arr = results[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            blob = np.ascontiguousarray(arr, dtype=dtype).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = arr.ravel().tolist()
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if response_id is not None:
        doc["id"] = response_id
    if req.parameters is not None:
        doc["parameters"] = req.parameters
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent with tritonclient's request_compression_algorithm (gzip or deflate).

    Decompression stops at `limit` bytes, the same cap as an uncompressed body,
    so a small compressed bomb cannot expand in memory.
    """
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(415, f"Content-Encoding {encoding!r} is not supported: use gzip, deflate or none")
    d = zlib.decompressobj(wbits=zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise V2Error(400, f"the body is not valid {encoding} data: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise V2Error(413, f"the decompressed body exceeds {limit} bytes")
    if not d.eof:
        raise V2Error(400, f"the {encoding} body is truncated")
    return out


def model_metadata(name: str, versions: list[int]) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, N_INPUTS]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "digit", "datatype": "INT64", "shape": [-1]},
        ],
    }


def version_number(version: str | None) -> int | None:
    """A version from a URL or a gRPC field (None or "": unpinned), or the protocol's 400."""
    if not version:
        return None
    try:
        return parse_version(version)
    except ValueError as e:
        raise V2Error(400, str(e)) from None


def repository_index(statuses: list[dict[str, Any]], ready_only: bool = False) -> list[dict[str, Any]]:
    """One entry per model version: the protocol's READY/UNAVAILABLE, why, and its labels."""
    index = []
    for status in statuses:
        for entry in status["versions"]:
            state = entry["state"]
            labels = {"serving": ["stable"], "canary": ["canary"]}.get(state, [])
            ready = state != "rejected"
            if ready_only and not ready:
                continue
            reason = entry.get("reason") or ""
            if state == "held":
                reason = f"held: {reason}"
            index.append(
                {
                    "name": status["name"],
                    "version": str(entry["version"]),
                    "state": "READY" if ready else "UNAVAILABLE",
                    "reason": reason,
                    "labels": labels,
                }
            )
    return index
