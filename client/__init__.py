"""The cmdgate client: a Python API and the ``cmdgate`` CLI.

from cmdgate.client import Client

with Client("db1:7443", token=token, ca="ca.pem") as client:
    result = client.run("disk-usage", {"mount": "/var"})
    print(result.exit_code, result.stdout.decode())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cmdgate.client.api import (
        AgentUnavailable,
        Client,
        ClientError,
        CommandFailed,
        CommandInfo,
        Exited,
        InvalidParameters,
        NotAuthenticated,
        NotPermitted,
        Output,
        ParamInfo,
        RunResult,
        Started,
    )

__all__ = [
    "AgentUnavailable",
    "Client",
    "ClientError",
    "CommandFailed",
    "CommandInfo",
    "Exited",
    "InvalidParameters",
    "NotAuthenticated",
    "NotPermitted",
    "Output",
    "ParamInfo",
    "RunResult",
    "Started",
]


def __getattr__(name: str) -> Any:
    # Lazy, so that `cmdgate keygen` and `--help` do not pay for importing gRPC.
    if name in __all__:
        return getattr(importlib.import_module("cmdgate.client.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
