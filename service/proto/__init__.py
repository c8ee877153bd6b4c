"""The Open Inference Protocol's gRPC service definition and its generated Python stubs.

The stubs (`open_inference_grpc_pb2*.py`) are generated from the committed
`.proto` by `make proto` (`python -m service.proto.generate`), never edited by
hand; tests/service/test_grpc_stubs.py regenerates them and fails when they differ.

They register the `inference.*` messages in protobuf's default descriptor pool,
as tritonclient.grpc's own stubs do under the same names, so the two cannot be
imported into one process: the server imports these only in gunicorn workers,
and clients (tritonclient included) run in other processes.
"""
