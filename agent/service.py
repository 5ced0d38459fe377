"""The gRPC service: the double gate in order, then the run, with an audit record for each.

1. authentication (``tokens``) → UNAUTHENTICATED;
2. authorisation (``decision``) → PERMISSION_DENIED;
3. parameters (``templates``) → INVALID_ARGUMENT;
4. the audit record is made durable, and only then the process is spawned.

Every failure ends the call before anything is spawned. The client learns
the category; the reason code and the detail go to the audit record.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from grpc import aio

from cmdgate.agent.audit import AuditLog
from cmdgate.agent.cgroups import RunCgroups
from cmdgate.agent.config import AgentConfig
from cmdgate.agent.decision import decide, permitted_commands
from cmdgate.agent.errors import (
    AgentStopping,
    AuditUnavailable,
    AuthenticationFailed,
    CallDenied,
    CancelledBeforeStart,
    InvalidParameters,
    NotPermitted,
    RateLimited,
    ReplayGuardUnavailable,
    SpawnFailed,
)
from cmdgate.agent.jwks import RemoteKeys
from cmdgate.agent.metrics import Metrics
from cmdgate.agent.replay import ReplayGuard
from cmdgate.agent.revocation import RevocationList
from cmdgate.agent.runner import ProcessRun, RunOutcome, StreamName
from cmdgate.agent.subreaper import OrphanSweeper
from cmdgate.agent.templates import (
    CommandTemplate,
    ParamSpec,
    ParamType,
    RenderedArgv,
)
from cmdgate.agent.tokens import (
    IssuerRouter,
    TokenVerifier,
    VerifiedClaims,
    bearer_token,
    token_fingerprint,
)
from cmdgate.shared.auditlog import AuditFilter, log_files, read_records
from cmdgate.shared.keys import certificate_sha256, thumbprint
from cmdgate.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger("cmdgate.agent")

_STREAMS = {StreamName.STDOUT: agent_pb2.STREAM_STDOUT, StreamName.STDERR: agent_pb2.STREAM_STDERR}
_PARAM_TYPES = {
    ParamType.STRING: agent_pb2.PARAM_TYPE_STRING,
    ParamType.ENUM: agent_pb2.PARAM_TYPE_ENUM,
    ParamType.INT: agent_pb2.PARAM_TYPE_INT,
    ParamType.PATH: agent_pb2.PARAM_TYPE_PATH,
}
MAX_REQUEST_ID_LENGTH = 128
# Bounds on what a request can put into an audit record.
MAX_RECORDED_LENGTH = 512
MAX_RECORDED_PARAMS = 32
MAX_AUDIT_QUERY_RECORDS = 10_000
# How long a stop waits for killed runs to be reaped and recorded.
KILL_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class AgentState:
    """What a call is decided with: swapped whole on reload, captured once per call."""

    config: AgentConfig
    verifier: IssuerRouter
    revocations: RevocationList | None = None
    # what ListCommands says of each template, built once per config, not per call
    command_infos: Mapping[str, agent_pb2.CommandInfo] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(
        cls, config: AgentConfig, remotes: Mapping[str, RemoteKeys] | None = None
    ) -> AgentState:
        revoked = config.auth.revoked_file
        issuers = config.issuers
        verifiers = {
            auth.issuer: TokenVerifier(auth, remote=(remotes or {}).get(auth.issuer))
            for auth in issuers
        }
        return cls(
            config,
            IssuerRouter(verifiers),
            RevocationList(revoked) if revoked is not None else None,
            {name: _command_info(t) for name, t in config.commands.items()},
        )


class AgentService(agent_pb2_grpc.AgentServicer):
    """Implements ``cmdgate.v1.Agent``."""

    def __init__(
        self,
        state: AgentState,
        audit: AuditLog,
        cgroups: RunCgroups | None = None,
        metrics: Metrics | None = None,
        sweeper: OrphanSweeper | None = None,
    ) -> None:
        self.state = state
        self.audit = audit
        self.cgroups = cgroups
        self.metrics = metrics
        self.sweeper = sweeper
        # single-use tokens: kept across reloads, made on first need
        self.replay_guard: ReplayGuard | None = None
        self._replay_loading = asyncio.Lock()
        self._runs: set[ProcessRun] = set()
        # set while no run is admitted (spawned or about to be): what a stop waits for
        self._no_runs = asyncio.Event()
        self._no_runs.set()
        self._endings: set[asyncio.Future[None]] = set()
        # runs admitted and not yet ended, per identity: the limits count these
        self._in_flight: collections.Counter[str] = collections.Counter()
        self.draining = False

    async def Run(
        self, request: agent_pb2.RunRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.RunEvent]:
        state = self.state
        record = _base_record(context, request.command, request.request_id)
        record["run_id"] = uuid.uuid4().hex
        known = state.config.commands.get(request.command)
        # secret parameter values never reach the log, whichever gate refuses the call
        params = known.redact(request.params) if known else dict(request.params)
        record["params"] = _capped_params(params)
        try:
            if self.draining:
                raise AgentStopping()
            claims = await self._authenticate_fetching(state, context, record)
            await self._take_token(state, claims)
            decision = decide(
                claims.claims,
                request.command,
                state.config.commands,
                claims.policy.commands_claim,
            )
            if decision.denial is not None:
                raise decision.denial
            template = decision.template
            assert template is not None
            record["template_sha256"] = template.sha256
            rendered = template.render(request.params)
            timeout = _effective_timeout(request.timeout_seconds, template)
            self._admit(state, claims.subject)
        except CallDenied as denial:
            await self._record_denial("run.denied", record, denial)
            # ends the stream with that status, without abort()'s exception (a fifth of
            # the cost of a denial under a flood)
            context.set_code(denial.status)
            context.set_details(denial.client_message)
            return
        record["argv"] = list(rendered.audit_argv)
        try:
            await self._write_allowed(context, "run.started", record)
            try:
                if self.draining:
                    # admitted before the stop began, recorded after: refused all the same
                    raise AgentStopping()
                run = self._new_run(template, rendered.argv, timeout, record["run_id"])
                await run.start()
            except CallDenied as failure:
                await self._write_finished(record, None, failure)
                log.error("run %s: %s", record["run_id"], failure.detail)
                await context.abort(failure.status, failure.client_message)
        except asyncio.CancelledError:
            # the started record may be on disk: end it, even though nothing ran
            ending = asyncio.ensure_future(
                self._write_finished(
                    record, None, CancelledBeforeStart("the client left before the spawn")
                )
            )
            self._endings.add(ending)
            ending.add_done_callback(self._endings.discard)
            self._release(claims.subject)
            raise
        except BaseException:
            self._release(claims.subject)
            raise
        log.debug(
            "run %s: %r started %s pid %d", record["run_id"], record["sub"], template.name, run.pid
        )
        self._runs.add(run)
        if self.metrics:
            self.metrics.in_flight.inc()
        completed = False
        try:
            yield agent_pb2.RunEvent(
                started=agent_pb2.Started(
                    run_id=record["run_id"],
                    timeout_seconds=timeout,
                    max_output_bytes=template.max_output_bytes,
                )
            )
            async for stream, data in run.output():
                yield agent_pb2.RunEvent(
                    output=agent_pb2.Output(stream=_STREAMS[stream], data=data)
                )
            completed = True
        finally:
            # shielded: a second cancellation (the agent stopping) must not skip the kill
            # or the record; stop() waits for these
            ending = asyncio.ensure_future(self._end_run(run, record, completed))
            self._endings.add(ending)
            ending.add_done_callback(self._endings.discard)
            await asyncio.shield(ending)
        assert run.outcome is not None
        yield agent_pb2.RunEvent(exited=_exited_event(run.outcome))

    async def _end_run(self, run: ProcessRun, record: dict[str, Any], completed: bool) -> None:
        try:
            if not completed:
                await run.cancel()
            await self._write_finished(record, run.outcome, None)
        finally:
            self._runs.discard(run)
            if self.metrics:
                self.metrics.in_flight.dec()
            self._release(record["sub"])

    def _new_run(
        self, template: CommandTemplate, argv: RenderedArgv, timeout: float, run_id: str
    ) -> ProcessRun:
        cgroup = None
        if self.cgroups is not None:
            try:
                cgroup = self.cgroups.create(run_id)
            except OSError as e:
                # contained or not at all
                raise SpawnFailed(f"cannot create the run's cgroup: {e.strerror}") from None
        return ProcessRun(
            argv,
            template.child_env(),
            template.cwd,
            timeout,
            template.max_output_bytes,
            run_as=template.run_as,
            cgroup=cgroup,
            limits=template.limits,
            sweeper=self.sweeper,
        )

    def _admit(self, state: AgentState, subject: str) -> None:
        """Count a run in, or refuse it at once: past either limit nothing waits in a queue."""
        server = state.config.server
        total = sum(self._in_flight.values())
        if total >= server.max_concurrent_runs:
            raise RateLimited(
                f"{total} runs in flight, max_concurrent_runs is {server.max_concurrent_runs}"
            )
        if self._in_flight[subject] >= server.max_runs_per_identity:
            raise RateLimited(
                f"{self._in_flight[subject]} runs in flight for this identity, "
                f"max_runs_per_identity is {server.max_runs_per_identity}"
            )
        self._in_flight[subject] += 1
        self._no_runs.clear()

    def _release(self, subject: str) -> None:
        self._in_flight[subject] -= 1
        if self._in_flight[subject] <= 0:
            del self._in_flight[subject]
        if not self._in_flight:
            self._no_runs.set()

    async def drain(self, grace: float) -> None:
        """Let runs in flight finish for ``grace`` seconds, then kill what still runs, and
        wait until every run has ended and been recorded."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._no_runs.wait()
        for run in list(self._runs):
            if not run.reaped:
                run.kill_now()
        try:
            async with asyncio.timeout(KILL_WAIT_SECONDS):
                await self._no_runs.wait()
                await asyncio.gather(*self._endings, return_exceptions=True)
        except TimeoutError:
            log.error("%d run(s) did not end after being killed", len(self._runs))

    async def ListCommands(
        self, request: agent_pb2.ListCommandsRequest, context: aio.ServicerContext[Any, Any]
    ) -> agent_pb2.ListCommandsResponse:
        state = self.state
        record = _base_record(context, "", "")
        try:
            claims = await self._authenticate_fetching(state, context, record)
            await self._take_token(state, claims)
            templates = permitted_commands(
                claims.claims, state.config.commands, claims.policy.commands_claim
            )
        except CallDenied as denial:
            await self._deny(context, "list", record, denial)
        record["commands"] = [t.name for t in templates]
        await self._write_allowed(context, "list", record)
        infos = state.command_infos
        return agent_pb2.ListCommandsResponse(commands=[infos[t.name] for t in templates])

    async def AuditQuery(
        self, request: agent_pb2.AuditQueryRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.AuditRecord]:
        state = self.state
        record = _base_record(context, "", "")
        query = {
            "sub": request.sub,
            "command": request.command,
            "decision": request.decision,
            "since": request.since,
            "until": request.until,
            "run_id": request.run_id,
            "limit": request.limit,
        }
        # capped like a run's parameters: a caller without a token can send these too
        record["query"] = {k: _capped(str(v), 256) for k, v in query.items() if v}
        try:
            claims = await self._authenticate_fetching(state, context, record)
            await self._take_token(state, claims)
            claim = claims.policy.audit_claim
            # reading everyone's history is a permission of its own, not implied by running
            if claims.claims.get(claim) is not True:
                raise NotPermitted(
                    "AUDIT_NOT_PERMITTED",
                    f"claim {claim!r} is not true",
                    "not permitted to read the audit log",
                )
            wanted = _audit_filter(request)
        except CallDenied as denial:
            await self._deny(context, "audit.query", record, denial)
        await self._write_allowed(context, "audit.query", record)
        limit = min(request.limit or MAX_AUDIT_QUERY_RECORDS, MAX_AUDIT_QUERY_RECORDS)
        loop = asyncio.get_running_loop()
        lines = await loop.run_in_executor(None, _query_log, self.audit.path, wanted, limit)
        for line in lines:
            yield agent_pb2.AuditRecord(json=line)

    async def _authenticate_fetching(
        self, state: AgentState, context: aio.ServicerContext[Any, Any], record: dict[str, Any]
    ) -> VerifiedClaims:
        """Authenticate; for an unknown kid from a remote key set, fetch it once and retry."""
        try:
            return self._authenticate(state, context, record)
        except AuthenticationFailed as e:
            if e.reason != "TOKEN_KID_UNKNOWN":
                raise
            token = bearer_token(context.invocation_metadata())
            remote = state.verifier.for_token(token).remote
            if remote is None:
                raise
            if not await remote.refresh_for_unknown_kid():
                raise
            return self._authenticate(state, context, record)

    def _authenticate(
        self, state: AgentState, context: aio.ServicerContext[Any, Any], record: dict[str, Any]
    ) -> VerifiedClaims:
        token = bearer_token(context.invocation_metadata())
        # a token that fails verification is never trusted: only its hash is recorded
        record["token_sha256"] = token_fingerprint(token)
        claims = state.verifier.verify(token)
        del record["token_sha256"]
        record.update(sub=claims.subject, iss=claims.issuer, jti=claims.jti)
        if state.revocations is not None:
            # after the (cached) signature check, never cached itself
            state.revocations.check(claims.subject, claims.jti)
        # per connection, never cached: a stolen token without its key is refused
        _check_binding(claims, record.get("peer_cert_sha256"), state.config.auth.require_cnf)
        for optional in ("azp", "client_id"):
            if isinstance(claims.claims.get(optional), str):
                record[optional] = claims.claims[optional]
        return claims

    async def _take_token(self, state: AgentState, claims: VerifiedClaims) -> None:
        """With ``replay = "reject"``: the token's jti is used up by this call, durably."""
        auth = state.config.auth
        if auth.replay != "reject":
            return
        guard = self.replay_guard or await self._load_replay_guard(state)
        until = claims.expires_at + auth.leeway_seconds
        guard.take(claims.jti, until)  # at once: a concurrent call with it is refused now
        assert claims.jti is not None  # take() refuses a token without one
        try:
            await asyncio.get_running_loop().run_in_executor(None, guard.persist, claims.jti, until)
        except OSError as e:
            guard.release(claims.jti)
            raise ReplayGuardUnavailable(f"{guard.path}: {e.strerror}") from None

    async def _load_replay_guard(self, state: AgentState) -> ReplayGuard:
        """The one guard, loaded by the first call that needs it: calls that arrive
        meanwhile wait for it, rather than each loading a guard of its own (two guards
        would each let the same jti through once)."""
        async with self._replay_loading:
            if self.replay_guard is None:
                path = state.config.server.state_dir / "seen-jti.jsonl"
                try:
                    self.replay_guard = await asyncio.get_running_loop().run_in_executor(
                        None, ReplayGuard, path
                    )
                except OSError as e:
                    raise ReplayGuardUnavailable(f"{path}: {e.strerror}") from None
            return self.replay_guard

    async def _write_allowed(
        self, context: aio.ServicerContext[Any, Any], event: str, record: dict[str, Any]
    ) -> None:
        fields = {"decision": "allowed", "reason": "OK", "grpc_code": "OK", **record}
        try:
            await self.audit.write(event, fields)
        except OSError as e:
            # fail closed: what the audit cannot record does not happen
            log.error("refusing %s from %s: %s", event, record["sub"], e)
            await context.abort(AuditUnavailable.status, AuditUnavailable.default_message)

    async def _deny(
        self,
        context: aio.ServicerContext[Any, Any],
        event: str,
        record: dict[str, Any],
        denial: CallDenied,
    ) -> NoReturn:
        await self._record_denial(event, record, denial)
        await context.abort(denial.status, denial.client_message)

    async def _record_denial(self, event: str, record: dict[str, Any], denial: CallDenied) -> None:
        fields = {
            "decision": "denied",
            "reason": denial.reason,
            "grpc_code": denial.status.name,
            "detail": denial.detail,
            **record,
        }
        if self.metrics:
            self.metrics.denials.labels(reason=denial.reason).inc()
        try:
            await self.audit.write(event, fields)
        except OSError as e:
            log.error("audit of a denial failed (%s): %s", denial.reason, e)
        # the audit record is the record of truth; a log line per denial would cost
        # more than the denial itself under a flood
        log.debug(
            "denied %r %s %r from %s: %s",
            record["sub"],
            event,
            record["command"][:64],
            record["peer"],
            denial,
        )

    async def _write_finished(
        self, record: dict[str, Any], outcome: RunOutcome | None, failure: CallDenied | None
    ) -> None:
        finished: dict[str, Any] = {
            "decision": "allowed",
            "reason": failure.reason if failure else "OK",
            "grpc_code": failure.status.name if failure else "OK",
            **record,
        }
        if outcome is not None:
            finished.update(dataclasses.asdict(outcome))
        if self.metrics:
            self.metrics.run_ended(record["command"], outcome)
        try:
            await self.audit.write("run.finished", finished)
        except OSError as e:
            log.error("audit of run %s's end failed: %s", record["run_id"], e)


def _capped(text: str, limit: int = MAX_RECORDED_LENGTH) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


def _capped_params(params: dict[str, str]) -> dict[str, str]:
    """What any caller, even one without a valid token, can make the audit record hold:
    a bounded amount, so that nobody can fill the disk with denials."""
    names = sorted(params)
    shown = {_capped(k, 64): _capped(params[k]) for k in names[:MAX_RECORDED_PARAMS]}
    if len(names) > MAX_RECORDED_PARAMS:
        shown["..."] = f"(+{len(names) - MAX_RECORDED_PARAMS} more parameters)"
    return shown


def _base_record(
    context: aio.ServicerContext[Any, Any], command: str, request_id: str
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "run_id": None,
        "request_id": _capped(request_id, MAX_REQUEST_ID_LENGTH) or None,
        "sub": None,
        "iss": None,
        "jti": None,
        "peer": context.peer(),
        "command": _capped(command, 128),
    }
    cert = _peer_certificate_sha256(context)
    if cert is not None:
        record["peer_cert_sha256"] = cert
    return record


def _audit_filter(request: agent_pb2.AuditQueryRequest) -> AuditFilter:
    r = request
    try:
        return AuditFilter.parse(r.sub, r.command, r.decision, r.since, r.until, r.run_id)
    except ValueError as e:
        raise InvalidParameters("QUERY_INVALID", str(e)) from None


def _query_log(path: Path, wanted: AuditFilter, limit: int) -> list[str]:
    """The newest ``limit`` matching records of the log and its rotated files, oldest first."""
    return [
        json.dumps(record, ensure_ascii=True, separators=(",", ":"))
        for record in wanted.newest(read_records(log_files(path)), limit)
    ]


def _effective_timeout(requested: float, template: CommandTemplate) -> float:
    if not math.isfinite(requested) or requested < 0:
        raise InvalidParameters("TIMEOUT_INVALID", "timeout_seconds must be a positive number")
    # a client may shorten the template's timeout, never lengthen it
    return min(requested, template.timeout_seconds) if requested else template.timeout_seconds


def _check_binding(claims: VerifiedClaims, cert_sha256: str | None, required: bool) -> None:
    """RFC 8705: a token with ``cnf`` is good only on a connection that presents the very
    client certificate it names (``x5t#S256``), taken from the TLS layer, never from
    metadata. Without ``cnf`` it passes unless ``required``."""
    cnf = claims.claims.get("cnf")
    if cnf is None:
        if required:
            raise AuthenticationFailed("TOKEN_NOT_BOUND", "require_cnf is on and there is no cnf")
        return
    bound = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
    if not isinstance(bound, str):
        raise AuthenticationFailed("CNF_UNSUPPORTED", f"cnf {str(cnf)[:128]} has no x5t#S256")
    if cert_sha256 is None or cert_sha256 == "unparseable":
        raise AuthenticationFailed(
            "CNF_CERT_MISSING", "the token is bound; the connection presents no client certificate"
        )
    presented = thumbprint(bytes.fromhex(cert_sha256))
    if not hmac.compare_digest(presented, bound):
        raise AuthenticationFailed("CNF_MISMATCH", f"bound to {bound[:64]}, presented {presented}")


def _peer_certificate_sha256(context: aio.ServicerContext[Any, Any]) -> str | None:
    pem = next(iter(context.auth_context().get("x509_pem_cert", ())), None)
    if pem is None:
        return None
    try:
        return _certificate_sha256(pem)
    except ValueError:
        # TLS accepted it; the record names it as unparseable rather than failing the call
        return "unparseable"


@functools.lru_cache(maxsize=1024)
def _certificate_sha256(pem: bytes) -> str:
    """The hex SHA-256 of a client certificate, as the audit names it (parsed once)."""
    return certificate_sha256(pem).hex()


def _exited_event(outcome: RunOutcome) -> agent_pb2.Exited:
    exited = agent_pb2.Exited(
        timed_out=outcome.timed_out,
        cancelled=outcome.cancelled,
        truncated=outcome.truncated,
        duration_ms=outcome.duration_ms,
        stdout_bytes=outcome.stdout_bytes,
        stderr_bytes=outcome.stderr_bytes,
    )
    if outcome.signal is not None:
        exited.signal = outcome.signal
    else:
        assert outcome.exit_code is not None
        exited.exit_code = outcome.exit_code
    return exited


def _param_info(spec: ParamSpec) -> agent_pb2.ParamInfo:
    info = agent_pb2.ParamInfo(
        name=spec.name,
        type=_PARAM_TYPES[spec.type],
        required=spec.required,
        max_length=spec.max_length,
        allow_leading_dash=spec.allow_leading_dash,
        pattern=spec.pattern.pattern if spec.pattern is not None else "",
        values=spec.values,
        under=spec.under,
    )
    if spec.default is not None:
        info.default = spec.default
    if spec.min is not None:
        info.min = spec.min
    if spec.max is not None:
        info.max = spec.max
    return info


def _command_info(template: CommandTemplate) -> agent_pb2.CommandInfo:
    return agent_pb2.CommandInfo(
        name=template.name,
        description=template.description,
        params=[_param_info(p) for p in template.params.values()],
        timeout_seconds=template.timeout_seconds,
        max_output_bytes=template.max_output_bytes,
    )
