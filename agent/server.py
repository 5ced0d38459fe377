"""Build and run the agent's gRPC server: the one wiring used by ``serve`` and by the tests."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cmdgate import __version__
from cmdgate.agent.audit import AuditLog, load_or_create_audit_key
from cmdgate.agent.config import AgentConfig
from cmdgate.agent.errors import ConfigError
from cmdgate.agent.service import AgentService, AgentState
from cmdgate.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger("cmdgate.agent")

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name
_SERVER_OPTIONS = [
    # requests are small: a command name and a few parameters
    ("grpc.max_receive_message_length", 64 * 1024),
    # room for one bearer token (capped at 8 KiB) and the usual headers
    ("grpc.max_metadata_size", 16 * 1024),
    ("grpc.so_reuseport", 0),
]


@dataclass
class RunningAgent:
    """A started agent: its bound port, and how to stop it."""

    server: aio.Server
    port: int
    service: AgentService
    health: health.aio.HealthServicer
    audit: AuditLog

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, let calls in flight finish for ``grace`` seconds, then close."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        # the grace is over: no command outlives the agent, and each run's end is recorded
        await self.service.drain()
        await self.audit.close()


def server_credentials(config: AgentConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for ``[server]``, requiring client certificates when client_ca is set."""
    server = config.server
    if server.insecure:
        return None
    assert server.tls_key_pem is not None and server.tls_cert_pem is not None
    return grpc.ssl_server_credentials(
        [(server.tls_key_pem, server.tls_cert_pem)],
        root_certificates=server.client_ca_pem,
        require_client_auth=server.client_ca_pem is not None,
    )


async def start_agent(config: AgentConfig) -> RunningAgent:
    """Open the audit log, bind the port and start serving; raise ``ConfigError`` if it cannot."""
    try:
        key = load_or_create_audit_key(config.server.state_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config.source}: server.state_dir: audit key: {e}") from None
    audit = AuditLog(config.audit, key)
    try:
        audit.open()
    except OSError as e:
        raise ConfigError(
            f"{config.source}: audit.path: cannot open {e.filename}: {e.strerror}"
        ) from None
    audit.start()
    try:
        await audit.write(
            "agent.started", {"version": __version__, "pid": os.getpid(), "key_id": audit.key_id}
        )
    except OSError as e:
        # a full disk need not keep the agent down: every run is refused until it has room
        log.error("audit log %s is not writable: %s; refusing runs until it is", audit.path, e)
    service = AgentService(AgentState.from_config(config), audit)
    server = aio.server(options=_SERVER_OPTIONS)
    agent_pb2_grpc.add_AgentServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    credentials = server_credentials(config)
    address = config.server.listen
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise ConfigError(
            f"{config.source}: server.listen: cannot listen on {address}: {e}"
        ) from None
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    mode = (
        "plaintext"
        if credentials is None
        else ("mTLS" if config.server.client_ca_pem is not None else "TLS")
    )
    log.info(
        "listening on %s port %d (%s), %d command template(s)",
        config.server.listen_host,
        port,
        mode,
        len(config.commands),
    )
    return RunningAgent(server, port, service, health_servicer, audit)
