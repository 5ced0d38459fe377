"""Build and run the agent's gRPC server: the one wiring used by ``serve`` and by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cmdgate import __version__
from cmdgate.agent.audit import AuditLog, load_or_create_audit_key
from cmdgate.agent.cgroups import RunCgroups
from cmdgate.agent.config import AgentConfig, load_config
from cmdgate.agent.errors import ConfigError
from cmdgate.agent.jwks import RemoteKeys
from cmdgate.agent.metrics import Metrics
from cmdgate.agent.service import AgentService, AgentState
from cmdgate.agent.subreaper import OrphanSweeper, become_subreaper
from cmdgate.agent.templates import Limits
from cmdgate.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger("cmdgate.agent")

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name


def server_options(config: AgentConfig) -> list[tuple[str, int]]:
    keepalive_ms = int(config.server.keepalive_seconds * 1000)
    return [
        # requests are small: a command name and a few parameters
        ("grpc.max_receive_message_length", 64 * 1024),
        # room for one bearer token (capped at 8 KiB) and the usual headers
        ("grpc.max_metadata_size", 16 * 1024),
        ("grpc.so_reuseport", 0),
        # a command may be silent for an hour: ping so that no middlebox drops the
        # connection, and accept the client's pings at the same pace without a GOAWAY
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min(keepalive_ms, 10_000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


@dataclass
class RunningAgent:
    """A started agent: its bound port, and how to stop it."""

    server: aio.Server
    port: int
    service: AgentService
    health: health.aio.HealthServicer
    audit: AuditLog

    async def reload(self, path: Path) -> bool:
        """Read the config again and swap it in whole; keep the old one if the new one is bad.

        Runs in flight finish under the config they started with. The audit file is
        reopened too. Returns whether the new config is in force.
        """
        self.audit.reopen()
        loop = asyncio.get_running_loop()
        try:
            config = await loop.run_in_executor(None, load_config, path)
            _check_limits(config, self.service.cgroups)
        except Exception as e:  # a reload must never take the agent down, nor half-apply
            if not isinstance(e, ConfigError):
                log.exception("reload failed unexpectedly")
            log.error("reload refused, the old config stays: %s", e)
            with contextlib.suppress(OSError):
                await self.audit.write(
                    "config.reload_failed", {"reason": "CONFIG_INVALID", "detail": str(e)}
                )
            return False
        old = self.service.state.config
        for key in (
            "listen_host",
            "listen_port",
            "insecure",
            "tls_cert_pem",
            "tls_key_pem",
            "client_ca_pem",
            "state_dir",
            "keepalive_seconds",
        ):
            if getattr(old.server, key) != getattr(config.server, key):
                log.warning("reload: server.%s changes only with a restart", key)
        if old.audit != config.audit:
            log.warning("reload: [audit] changes only with a restart")
        old_remotes = self.service.state.verifier.remotes
        remotes = await _remote_keys(config, kept=old_remotes)
        self.service.state = AgentState.from_config(config, remotes)
        for remote in old_remotes:
            if remote not in remotes.values():
                remote.stop()
        with contextlib.suppress(OSError):
            await self.audit.write(
                "config.reloaded",
                {"reason": "OK", "commands": sorted(config.commands)},
            )
        log.info("reloaded %s: %d command template(s)", path, len(config.commands))
        return True

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new runs, let calls in flight finish for ``grace``
        seconds (by default ``drain_grace_seconds``), then kill what still runs."""
        if grace is None:
            grace = self.service.state.config.server.drain_grace_seconds
        # new runs are refused (UNAVAILABLE, audited) while the ones in flight finish
        self.service.draining = True
        await self.health.enter_graceful_shutdown()
        await self.service.drain(grace)
        # the grace is over: no command outlives the agent, and each run's end is recorded
        await self.server.stop(1.0)
        await self.service.drain(0)
        await self.audit.close()
        if self.service.cgroups:
            self.service.cgroups.close()
        if self.service.sweeper:
            self.service.sweeper.stop()
        for remote in self.service.state.verifier.remotes:
            remote.stop()
        if self.service.metrics:
            self.service.metrics.close()


async def _remote_keys(
    config: AgentConfig, kept: Sequence[RemoteKeys] = ()
) -> dict[str, RemoteKeys]:
    """Keys from each identity provider that has them, fetched once now and kept fresh.

    On a reload, an issuer whose settings did not change keeps its key set as it is: a
    fetch failing at that moment (a reload at every log rotation) must not refuse all
    its tokens until the next one works. One whose settings changed starts afresh."""
    remotes: dict[str, RemoteKeys] = {}
    for auth in config.issuers:
        if auth.jwks_url is None and not auth.discovery:
            continue
        same = next((r for r in kept if r.auth == auth), None)
        if same is not None:
            remotes[auth.issuer] = same
            continue
        remote = RemoteKeys(auth)
        if not await remote.refresh():
            # fail closed: no key, no token; the background refresh keeps trying
            log.error(
                "starting without keys for %s: its tokens are refused until a fetch works",
                auth.issuer,
            )
        remote.start()
        remotes[auth.issuer] = remote
    return remotes


def _process_control(config: AgentConfig) -> tuple[RunCgroups | None, OrphanSweeper | None]:
    """A cgroup per run where possible (or required); else the agent as a subreaper."""
    mode = config.server.process_control
    cgroups = RunCgroups.probe() if mode != "subreaper" else None
    if cgroups is not None:
        return cgroups, None
    if mode == "cgroup":
        raise ConfigError(
            f"{config.source}: server.process_control: 'cgroup' is required but no writable "
            "cgroup v2 is available to the agent (under systemd: Delegate=yes)"
        )
    if not become_subreaper():
        log.warning("neither a cgroup nor a subreaper: escaped processes may outlive runs")
        return None, None
    log.info("no cgroup per run: the agent is a subreaper and sweeps escaped processes")
    sweeper = OrphanSweeper()
    sweeper.start()
    return None, sweeper


def _check_limits(config: AgentConfig, cgroups: RunCgroups | None) -> None:
    """A template whose limits this host cannot enforce is refused, not run unlimited."""
    for name, template in config.commands.items():
        missing = "cgroup v2" if cgroups is None else cgroups.supports(template.limits)
        if template.limits != Limits() and missing is not None:
            raise ConfigError(
                f"{config.source}: commands.{name}.limits: cannot be enforced here "
                f"({missing} is not available to the agent)"
            )


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
    # what can still refuse the start comes before ``agent.started`` is in the chain
    cgroups, sweeper = _process_control(config)
    _check_limits(config, cgroups)
    metrics = None
    if config.metrics.enabled:
        metrics = Metrics.create()
        try:
            metrics.serve(config.metrics.listen_host, config.metrics.listen_port)
        except OSError as e:
            raise ConfigError(f"{config.source}: metrics.listen: {e.strerror}") from None
    try:
        key = load_or_create_audit_key(config.server.state_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config.source}: server.state_dir: audit key: {e}") from None
    audit = AuditLog(config.audit, key, config.server.state_dir / "audit-head.json")
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
    if audit.torn is not None:
        with contextlib.suppress(OSError):
            await audit.write(
                "audit.torn_tail", {"reason": "INCOMPLETE_LINE_SET_ASIDE", **audit.torn}
            )
    if audit.missing is not None:
        # said in the chain itself, so that `cmdgate audit verify` names the gap
        first, last = audit.missing
        with contextlib.suppress(OSError):
            await audit.write(
                "chain.gap",
                {"reason": "RECORDS_MISSING", "first_missing": first, "last_missing": last},
            )
    remote = await _remote_keys(config)
    service = AgentService(AgentState.from_config(config, remote), audit, cgroups, metrics, sweeper)
    server = aio.server(options=server_options(config))
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
