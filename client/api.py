"""The Python API: ``Client`` runs commands on one agent and lists what a token may run.

One ``Client`` holds one channel and is safe to share across threads. Denials
raise typed exceptions; a command's non-zero exit is a result, not an error
(unless ``check=True``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

import grpc

from cmdgate.shared.wire import AUTHORIZATION_KEY, BEARER_PREFIX, is_loopback, parse_target
from cmdgate.v1 import agent_pb2, agent_pb2_grpc

if TYPE_CHECKING:
    # only audit_query needs it; importing it (and cryptography) slows every `cmdgate run`
    from cmdgate.shared.auditlog import AuditFilter

# The agent's timeout kills the command; the call's own deadline only needs to
# outlast it by enough to carry the final event back.
_DEADLINE_SLACK_SECONDS = 30.0
_LIST_DEADLINE_SECONDS = 30.0
# The longest timeout a template may have.
MAX_TIMEOUT_SECONDS = 24 * 3600

StreamLabel = Literal["stdout", "stderr"]
_STREAM_LABELS: dict[int, StreamLabel] = {
    agent_pb2.STREAM_STDOUT: "stdout",
    agent_pb2.STREAM_STDERR: "stderr",
}
_PARAM_TYPES = {
    agent_pb2.PARAM_TYPE_STRING: "string",
    agent_pb2.PARAM_TYPE_ENUM: "enum",
    agent_pb2.PARAM_TYPE_INT: "int",
    agent_pb2.PARAM_TYPE_PATH: "path",
}


class ClientError(Exception):
    """Root of the client's errors: the call to ``target`` ended with gRPC status ``code``."""

    def __init__(self, target: str, code: str, message: str) -> None:
        super().__init__(f"{target}: {code}: {message}")
        self.target = target
        self.code = code
        self.message = message


class NotAuthenticated(ClientError):
    """The agent did not accept the token (its audit log says why)."""


class NotPermitted(ClientError):
    """The token's whitelist or the host's allowlist does not include the command."""


class InvalidParameters(ClientError):
    """A parameter is unknown, missing or invalid; the message names it and the rule."""


class AgentUnavailable(ClientError):
    """The agent cannot be reached, or it refused to work (e.g. its audit log is unavailable)."""


class CommandFailed(ClientError):
    """Raised by ``run(check=True)`` when the command did not exit 0; carries the result."""

    def __init__(self, result: RunResult) -> None:
        super().__init__(result.target, "OK", f"{result.command}: {result.describe()}")
        self.result = result


_ERRORS: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.UNAUTHENTICATED: NotAuthenticated,
    grpc.StatusCode.PERMISSION_DENIED: NotPermitted,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidParameters,
    grpc.StatusCode.UNAVAILABLE: AgentUnavailable,
}


@dataclass(frozen=True)
class Started:
    run_id: str
    timeout_seconds: float
    max_output_bytes: int


@dataclass(frozen=True)
class Output:
    stream: StreamLabel
    data: bytes


@dataclass(frozen=True)
class Exited:
    exit_code: int | None
    signal: int | None
    timed_out: bool
    cancelled: bool
    truncated: bool
    duration_ms: int
    stdout_bytes: int
    stderr_bytes: int


RunEvent = Started | Output | Exited


@dataclass(frozen=True)
class RunResult:
    """A finished run. ``stdout`` and ``stderr`` are the exact bytes, kept apart."""

    target: str
    command: str
    run_id: str
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    cancelled: bool
    truncated: bool
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.truncated or self.cancelled)

    def describe(self) -> str:
        """A few words on how it ended: ``exit 0``, ``timed out (signal 15)``..."""
        how = f"exit {self.exit_code}" if self.signal is None else f"signal {self.signal}"
        if self.timed_out:
            return f"timed out ({how})"
        if self.truncated:
            return f"output truncated ({how})"
        if self.cancelled:
            return f"cancelled ({how})"
        return how


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: str
    required: bool
    default: str | None
    max_length: int
    allow_leading_dash: bool
    pattern: str | None = None
    values: tuple[str, ...] = ()
    min: int | None = None
    max: int | None = None
    under: tuple[str, ...] = ()


@dataclass(frozen=True)
class CommandInfo:
    name: str
    description: str
    timeout_seconds: float
    max_output_bytes: int
    params: tuple[ParamInfo, ...] = field(default=())


def _read_pem(value: str | os.PathLike[str] | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


class Client:
    """A connection to one agent at ``target`` (``host[:port]``, default port 7443).

    ``token`` is the bearer JWT. ``ca`` verifies the agent's certificate
    (default: the system's roots); ``cert`` and ``key`` present a client
    certificate for mTLS. Each may be a path or PEM bytes. ``insecure`` uses
    plaintext, which is refused for anything but a loopback target.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str,
        ca: str | os.PathLike[str] | bytes | None = None,
        cert: str | os.PathLike[str] | bytes | None = None,
        key: str | os.PathLike[str] | bytes | None = None,
        insecure: bool = False,
        keepalive_seconds: float = 60.0,
    ) -> None:
        parsed = parse_target(target)
        self.target = str(parsed)
        token = token.strip()
        if not token or any(c.isspace() for c in token) or not token.isascii():
            raise ValueError("token must be one line of ASCII with no spaces")
        self._metadata = ((AUTHORIZATION_KEY, BEARER_PREFIX + token),)
        if (cert is None) != (key is None):
            raise ValueError("cert and key go together")
        # a command may be silent for an hour: keep pinging so nothing drops the connection
        options = [
            ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if insecure:
            # plaintext would hand the bearer token to anyone on the path
            if not is_loopback(parsed.host):
                raise ValueError(f"insecure (plaintext) is refused for non-loopback {parsed.host}")
            if ca is not None or cert is not None:
                raise ValueError("insecure cannot be combined with ca, cert or key")
            self._channel = grpc.insecure_channel(self.target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(ca),
                private_key=_read_pem(key),
                certificate_chain=_read_pem(cert),
            )
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        self._stub = agent_pb2_grpc.AgentStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(
        self,
        command: str,
        params: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
        request_id: str = "",
    ) -> Generator[RunEvent, None, None]:
        """Yield the run's events as they arrive: ``Started``, ``Output``..., ``Exited``.

        Closing the iterator early cancels the call, and the agent kills the command.
        """
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError("timeout must be a positive number of seconds")
        request = agent_pb2.RunRequest(
            command=command,
            params=dict(params or {}),
            timeout_seconds=timeout or 0.0,
            request_id=request_id,
        )
        # the agent lowers a timeout to the template's; the deadline need not be longer
        deadline = (
            None if timeout is None else min(timeout, MAX_TIMEOUT_SECONDS) + _DEADLINE_SLACK_SECONDS
        )
        call = self._stub.Run(request, metadata=self._metadata, timeout=deadline)
        try:
            for event in call:
                yield self._convert(event)
        except grpc.RpcError as e:
            raise self._error(e) from None
        finally:
            call.cancel()

    def run(
        self,
        command: str,
        params: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
        request_id: str = "",
        check: bool = False,
    ) -> RunResult:
        """Run ``command`` and wait for it; with ``check``, raise ``CommandFailed`` unless ok."""
        chunks: dict[StreamLabel, list[bytes]] = {"stdout": [], "stderr": []}
        started: Started | None = None
        exited: Exited | None = None
        for event in self.stream(command, params, timeout=timeout, request_id=request_id):
            if isinstance(event, Output):
                chunks[event.stream].append(event.data)
            elif isinstance(event, Started):
                started = event
            else:
                exited = event
        if started is None or exited is None:
            raise ClientError(self.target, "INTERNAL", "the agent ended the stream early")
        result = RunResult(
            target=self.target,
            command=command,
            run_id=started.run_id,
            exit_code=exited.exit_code,
            signal=exited.signal,
            stdout=b"".join(chunks["stdout"]),
            stderr=b"".join(chunks["stderr"]),
            timed_out=exited.timed_out,
            cancelled=exited.cancelled,
            truncated=exited.truncated,
            duration=exited.duration_ms / 1000,
        )
        if check and not result.ok:
            raise CommandFailed(result)
        return result

    def audit_query(
        self, wanted: AuditFilter | None = None, *, limit: int = 0
    ) -> Iterator[dict[str, Any]]:
        """The agent's own audit records matching ``wanted``, oldest first (the newest
        ``limit``). Needs a token whose audit claim is true."""
        import json

        from cmdgate.shared.auditlog import AuditFilter

        wanted = wanted or AuditFilter()
        request = agent_pb2.AuditQueryRequest(
            sub=wanted.sub,
            command=wanted.command,
            decision=wanted.decision,
            since=wanted.since,
            until=wanted.until,
            run_id=wanted.run_id,
            limit=limit,
        )
        call = self._stub.AuditQuery(
            request, metadata=self._metadata, timeout=_LIST_DEADLINE_SECONDS
        )
        try:
            for record in call:
                yield json.loads(record.json)
        except grpc.RpcError as e:
            raise self._error(e) from None
        finally:
            call.cancel()

    def list_commands(self) -> list[CommandInfo]:
        """The commands this token may run on this agent, with their parameters."""
        try:
            response = self._stub.ListCommands(
                agent_pb2.ListCommandsRequest(),
                metadata=self._metadata,
                timeout=_LIST_DEADLINE_SECONDS,
            )
        except grpc.RpcError as e:
            raise self._error(e) from None
        return [_command_info(c) for c in response.commands]

    def _error(self, error: grpc.RpcError) -> ClientError:
        # every RpcError raised by a call is also a grpc.Call; the stubs cannot say so
        call = cast(grpc.Call, error)
        code = call.code()
        cls = _ERRORS.get(code, ClientError)
        return cls(self.target, code.name, call.details() or "")

    def _convert(self, event: agent_pb2.RunEvent) -> RunEvent:
        kind = event.WhichOneof("event")
        if kind == "output":
            label = _STREAM_LABELS.get(event.output.stream)
            if label is None:
                raise ClientError(
                    self.target, "INTERNAL", f"unknown stream {event.output.stream} from the agent"
                )
            return Output(label, event.output.data)
        if kind == "started":
            s = event.started
            return Started(s.run_id, s.timeout_seconds, s.max_output_bytes)
        if kind == "exited":
            x = event.exited
            return Exited(
                exit_code=x.exit_code if x.WhichOneof("status") == "exit_code" else None,
                signal=x.signal if x.WhichOneof("status") == "signal" else None,
                timed_out=x.timed_out,
                cancelled=x.cancelled,
                truncated=x.truncated,
                duration_ms=x.duration_ms,
                stdout_bytes=x.stdout_bytes,
                stderr_bytes=x.stderr_bytes,
            )
        raise ClientError(self.target, "INTERNAL", f"unknown event {kind!r} from the agent")


def _command_info(info: agent_pb2.CommandInfo) -> CommandInfo:
    params = tuple(
        ParamInfo(
            name=p.name,
            type=_PARAM_TYPES.get(p.type, "unknown"),
            required=p.required,
            default=p.default if p.HasField("default") else None,
            max_length=p.max_length,
            allow_leading_dash=p.allow_leading_dash,
            pattern=p.pattern or None,
            values=tuple(p.values),
            min=p.min if p.HasField("min") else None,
            max=p.max if p.HasField("max") else None,
            under=tuple(p.under),
        )
        for p in info.params
    )
    return CommandInfo(
        info.name, info.description, info.timeout_seconds, info.max_output_bytes, params
    )
