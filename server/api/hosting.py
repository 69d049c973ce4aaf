"""What the generation server (app.py) and the shard server (retriever_app.py) host alike: the
gRPC server with health and reflection, the bound port, the metrics port, the serving status."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def grpc_server(interceptors: list, max_message_bytes: int, *extra_options) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes),
                 ("grpc.keepalive_time_ms", 60_000),
                 *extra_options],
    )


def add_health_and_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> HealthServicer:
    """grpcio's health service (every service NOT_SERVING until set) and reflection for
    `service_names`, health and reflection itself."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    return health


async def set_serving(health: HealthServicer, service_name: str, serving: bool) -> None:
    """The overall status ("") and the service's, which probes and load balancers ask for."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await health.set("", status)
    await health.set(service_name, status)


def start_metrics(metrics, address: str) -> tuple[tuple, int]:
    """Serve `metrics` (a server.observability.metrics registry owner) over HTTP at `address`:
    ((server, thread) to stop, bound port); OSError naming the flag when the port is taken."""
    from server.observability.metrics import start_metrics_server

    try:
        http, thread, port = start_metrics_server(address, registry=metrics.exposed_registry)
    except OSError as error:
        metrics.close()
        raise OSError(f"cannot listen for metrics on {address} ({error.strerror}); is another server "
                      "running? choose another --metrics-address") from error
    return (http, thread), port


def stop_metrics(metrics, metrics_server: tuple) -> None:
    from server.observability.metrics import stop_metrics_server

    stop_metrics_server(*metrics_server)
    metrics.close()


def bind(server: grpc.aio.Server, address: str, credentials=None) -> tuple[str, int]:
    """Listen on `address` (plaintext, or TLS with `credentials`): (host, bound port); OSError
    naming the flag when the address cannot be bound."""
    from server.observability.metrics import split_address

    host, port = split_address(address)
    listen = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        bound = (server.add_insecure_port(listen) if credentials is None
                 else server.add_secure_port(listen, credentials))
    except RuntimeError as error:
        raise OSError(f"cannot listen for gRPC on {address} ({error}); is another server running? "
                      "choose another --address") from error
    return host, bound
