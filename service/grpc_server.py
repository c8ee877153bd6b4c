"""The Open Inference Protocol (KServe V2) over gRPC: `inference.GRPCInferenceService` and `grpc.health.v1`.

The REST routes' twin (service/v2.py), for clients that speak gRPC, such as
`tritonclient.grpc`: ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata and ModelInfer. One input, `input` (FP32 in [0, 1] or UINT8 in
0..255, [N, 784] or [N, 28, 28]) as `raw_input_contents` or typed `contents`
(`fp32_contents`, `uint_contents`); two outputs, `probabilities` (FP32
[N, 10]) and `digit` (INT64 [N]), always as `raw_output_contents`, as Triton
answers. Everything below the protocol is REST's: the codec's checks
(service/v2_codec.py) and the data plane (service/dataplane.py: model lookup,
forward pass, the worker's model manager, so hot reloads and version switches
apply alike, and the same Prometheus series).

Where it runs: each gunicorn worker starts one server in `post_worker_init`
(gunicorn.conf.py) on GRPC_PORT with SO_REUSEPORT, so the kernel spreads
connections over the workers as it does for the HTTP port, and each worker
answers with its own model manager. grpc is never imported in the gunicorn
master: its threads and sockets do not survive fork. On SIGTERM the worker
stops taking new RPCs at once (the listener closes, so a proxy retries
elsewhere) while in-flight ones get GRPC_GRACE_SECONDS, in parallel with the
HTTP drain; `worker_exit` waits for that before the process ends.

Errors carry gRPC status codes mapped from the HTTP status the same error has
over REST: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 413 RESOURCE_EXHAUSTED (batch
over MAX_BATCH; grpc itself answers so for messages over MAX_CONTENT_LENGTH and
for calls over GRPC_MAX_CONCURRENT_RPCS), 503 UNAVAILABLE (no model). A request
that does not decode as protobuf is INVALID_ARGUMENT too (grpc alone would say
INTERNAL), and an unexpected exception is logged and answered INTERNAL, never
UNKNOWN.

This module imports the generated stubs, which cannot share a process with
tritonclient.grpc's (service/proto/__init__.py): tests and clients talk to it
over the network, never in-process.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import numpy as np
from flask import Flask
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from core.settings import Settings
from service import v2_codec as codec
from service.dataplane import DataPlane
from service.errors import ApiError
from service.metrics import Metrics
from service.proto import open_inference_grpc_pb2 as pb2
from service.proto import open_inference_grpc_pb2_grpc as pb2_grpc

log = logging.getLogger(__name__)

SERVICE = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}
# Which typed `contents` field carries each input datatype (the protocol's choice).
CONTENTS_FIELD = {"FP32": "fp32_contents", "UINT8": "uint_contents"}


class _Undecodable:
    """What the lenient deserializer hands on for bytes that are not the request message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, ValueError, RuntimeError) as e:
            return _Undecodable(e)

    return deserialize


def status_code(http_status: int) -> grpc.StatusCode:
    """The gRPC status for an error's HTTP status (codec.V2Error, the model manager's ApiError)."""
    if http_status in STATUS_CODES:
        return STATUS_CODES[http_status]
    return grpc.StatusCode.INTERNAL if http_status >= 500 else grpc.StatusCode.INVALID_ARGUMENT


# --- ModelInfer's request, through the codec's checks -------------------------


def parse_infer_request(request: pb2.ModelInferRequest, max_batch: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Network input rows (N, 784) and the output names asked for, or a codec.V2Error."""
    if len(request.inputs) != 1:
        raise codec.V2Error(400, f"the model takes 1 input ({codec.INPUT_NAME!r}), got {len(request.inputs)}")
    tensor = request.inputs[0]
    shape = codec.check_input(tensor.name, tensor.datatype, list(tensor.shape))
    codec.check_batch(shape, max_batch)
    raw = request.raw_input_contents
    typed = [f.name for f, _ in tensor.contents.ListFields()]
    if raw:
        if len(raw) != len(request.inputs):
            raise codec.V2Error(
                400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} input"
            )
        if typed:
            raise codec.V2Error(400, "an input has either raw_input_contents or contents, not both")
        arr = codec.tensor_from_bytes(raw[0], tensor.datatype, shape)
    else:
        field = CONTENTS_FIELD[tensor.datatype]
        if any(name != field for name in typed):
            raise codec.V2Error(400, f"{tensor.datatype} input contents must be in {field}, got {typed}")
        values = getattr(tensor.contents, field)
        codec.check_count(len(values), shape)  # before the values become a list
        # The JSON path's checks (numbers only, UINT8 range) apply to the typed values as is.
        arr = codec.tensor_from_json(list(values), tensor.datatype, shape)
    x = codec.to_network_input(arr, tensor.datatype)
    chosen: list[str] = []
    for out in request.outputs:
        chosen.append(codec.check_output(out.name, chosen))
    return x, tuple(chosen) or tuple(codec.OUTPUT_DTYPES)


def infer_response(model: Any, request_id: str, results: dict[str, np.ndarray], names: tuple[str, ...]):
    """The outputs as raw little-endian bytes, in the order asked for."""
    response = pb2.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request_id)
    for name in names:
        datatype, dtype = codec.OUTPUT_DTYPES[name]
        arr = results[name]
        response.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        response.raw_output_contents.append(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    return response


# --- the service -------------------------------------------------------------


def _rpc(method: Callable) -> Callable:
    """Status codes and request metrics around one RPC.

    `context.abort` is called outside the try block: it raises to end the call."""

    @functools.wraps(method)
    def handler(self: InferenceServicer, request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.perf_counter()
        status, message = 200, ""
        try:
            if isinstance(request, _Undecodable):
                raise codec.V2Error(
                    400, f"the request is not a valid {method.__name__} message: {request.error}"
                )
            return method(self, request, context)
        except ApiError as e:
            status, message = e.status, e.message
        except Exception:
            log.exception("gRPC %s failed", method.__name__)
            status, message = 500, "internal server error"
        finally:
            self.observe(method.__name__, status, time.perf_counter() - t0)
        context.abort(status_code(status), message)

    return handler


class InferenceServicer(pb2_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over one Flask app's data plane; its request metrics too."""

    def __init__(self, app: Flask) -> None:
        self.plane: DataPlane = app.extensions["dataplane"]
        self.metrics: Metrics | None = app.extensions.get("metrics")

    def observe(self, method: str, status: int, seconds: float) -> None:
        if self.metrics is None:
            return
        endpoint = f"/{SERVICE.full_name}/{method}"
        # The answering version is known only inside ModelInfer: it labels the predictions.
        self.metrics.requests.labels(endpoint, "POST", str(status), "", "").inc()
        self.metrics.latency.labels(endpoint, "", "").observe(seconds)

    @_rpc
    def ServerLive(self, request, context):
        return pb2.ServerLiveResponse(live=True)

    @_rpc
    def ServerReady(self, request, context):
        return pb2.ServerReadyResponse(ready=self.plane.ready())

    @_rpc
    def ModelReady(self, request, context):
        # As REST: an unknown model or version is NOT_FOUND, a known one without a loaded version "not ready".
        return pb2.ModelReadyResponse(ready=self.plane.v2_model_ready(request.name, request.version))

    @_rpc
    def ServerMetadata(self, request, context):
        return pb2.ServerMetadataResponse(
            name=codec.SERVER_NAME, version=codec.SERVER_VERSION, extensions=list(codec.EXTENSIONS)
        )

    @_rpc
    def ModelMetadata(self, request, context):
        model = self.plane.v2_model(request.name, request.version)
        meta = codec.model_metadata(model.name, self.plane.versions(model))
        response = pb2.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"]
        )
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(response, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return response

    @_rpc
    def ModelInfer(self, request, context):
        model = self.plane.v2_model(request.model_name, request.model_version)
        x, names = parse_infer_request(request, self.plane.max_batch)
        results = self.plane.infer(model, x)
        return infer_response(model, request.id, results, names)


def generic_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The generated service's methods, with a deserializer that lets the servicer answer
    INVALID_ARGUMENT for undecodable bytes (the generated registration hard-wires grpc's INTERNAL)."""
    table = {}
    for method in SERVICE.methods:
        request_type = getattr(pb2, method.input_type.name)
        response_type = getattr(pb2, method.output_type.name)
        table[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request_type.FromString),
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, table)


class GrpcServer:
    """A started grpc server plus its health service; `shutdown` is idempotent."""

    def __init__(self, app: Flask, settings: Settings) -> None:
        self.grace_seconds = settings.grpc_grace_seconds
        limit = int(app.config["MAX_CONTENT_LENGTH"])
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.grpc_threads, thread_name_prefix="grpc"),
            options=[
                ("grpc.so_reuseport", 1),  # every worker listens on the one port
                ("grpc.max_receive_message_length", limit),  # as MAX_CONTENT_LENGTH bounds a REST body
                ("grpc.max_send_message_length", limit),
            ],
            maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        )
        self.server.add_generic_rpc_handlers((generic_handler(InferenceServicer(app)),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        plane: DataPlane = app.extensions["dataplane"]
        self._set_health(plane.ready())
        plane.manager(None).add_listener(lambda event, **info: event == "loaded" and self._set_health(True))
        self.port = self.server.add_insecure_port(f"[::]:{settings.grpc_port}")
        self._stopped: threading.Event | None = None
        self._lock = threading.Lock()

    def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE.full_name):
            self.health.set(name, status)

    def start(self) -> GrpcServer:
        self.server.start()
        return self

    def shutdown(self) -> threading.Event:
        """Refuse new RPCs now; the event is set once in-flight ones end (at most the grace period)."""
        with self._lock:
            if self._stopped is None:
                self.health.enter_graceful_shutdown()
                self._stopped = self.server.stop(self.grace_seconds)
            return self._stopped


def attach(worker: Any, settings: Settings) -> GrpcServer:
    """Start a gunicorn worker's server and chain its shutdown to the worker's SIGTERM handler."""
    server = GrpcServer(worker.wsgi, settings).start()
    worker.grpc_server = server
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(sig: int, frame: Any) -> None:
        server.shutdown()  # does not block: the HTTP drain and the gRPC drain overlap
        if callable(previous):
            previous(sig, frame)

    signal.signal(signal.SIGTERM, on_term)
    log.info("gRPC listening on port %s", server.port)
    return server


def detach(worker: Any) -> None:
    """The worker is exiting: wait for in-flight RPCs, within the grace period."""
    server: GrpcServer | None = getattr(worker, "grpc_server", None)
    if server is not None:
        server.shutdown().wait(server.grace_seconds + 1)
