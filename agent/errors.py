"""The agent's exception tree.

Every error that ends a call knows its gRPC status and a stable UPPER_SNAKE
reason code for the audit record. ``client_message`` is what the caller sees;
``detail`` goes only to the audit record and the log.
"""

from __future__ import annotations

import grpc


class AgentError(Exception):
    """Root of the agent's errors."""


class ConfigError(AgentError):
    """The configuration cannot be used. The message names the file, the key and the reason."""


class CallDenied(AgentError):
    """A call ended before anything was spawned."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_message = "internal error"

    def __init__(self, reason: str, detail: str, client_message: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.client_message = client_message or self.default_message


class AuthenticationFailed(CallDenied):
    """Gate 1. The client learns only the category; the reason goes to the audit."""

    status = grpc.StatusCode.UNAUTHENTICATED
    default_message = "authentication failed"


class NotPermitted(CallDenied):
    """Gate 2: the token's whitelist claim and the host's allowlist."""

    status = grpc.StatusCode.PERMISSION_DENIED
    default_message = "not permitted"


class InvalidParameters(CallDenied):
    """Gate 3: unknown, missing or invalid parameters; the message names parameter and rule."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    default_message = "invalid parameters"

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail, client_message=detail)


class FixedReasonDenial(CallDenied):
    """A denial that always has the same reason code, ``code``."""

    code = "INTERNAL"

    def __init__(self, detail: str) -> None:
        super().__init__(self.code, detail)


class AuditUnavailable(FixedReasonDenial):
    """The audit record could not be made durable, so nothing runs (fail closed)."""

    status = grpc.StatusCode.UNAVAILABLE
    default_message = "audit log unavailable; nothing was run"

    code = "AUDIT_UNAVAILABLE"


class ReplayGuardUnavailable(FixedReasonDenial):
    """Single-use tokens are on, and this use could not be made durable: refused."""

    status = grpc.StatusCode.UNAVAILABLE
    default_message = "cannot record the token's use; nothing was run"

    code = "REPLAY_GUARD_UNAVAILABLE"


class RateLimited(FixedReasonDenial):
    """Too many runs at once, on this agent or for this identity: refused at once, no queue."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_message = "too many runs in flight; try again later"

    code = "RATE_LIMITED"


class AgentStopping(FixedReasonDenial):
    """The agent is draining for a stop: new runs are refused."""

    status = grpc.StatusCode.UNAVAILABLE
    default_message = "the agent is stopping"

    code = "AGENT_STOPPING"

    def __init__(self, detail: str = "new runs are refused while the agent drains") -> None:
        super().__init__(detail)


class CancelledBeforeStart(FixedReasonDenial):
    """The caller left, or the agent began to stop, after the run was recorded as started
    but before its command was spawned."""

    status = grpc.StatusCode.CANCELLED
    default_message = "cancelled before the command started"

    code = "CANCELLED_BEFORE_START"


class SpawnFailed(FixedReasonDenial):
    """The template was valid at load time but the process could not be started."""

    status = grpc.StatusCode.INTERNAL
    default_message = "the command could not be started"

    code = "SPAWN_FAILED"
