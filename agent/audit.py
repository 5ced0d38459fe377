"""The audit log: one JSON line per decision, made durable before it matters.

Records are appended to one file and fsync'ed with group commit: concurrent
callers that wait for durability share one fsync instead of queueing for one
each. A failed write or fsync fails every waiter, so the caller can refuse to
run anything (fail closed); the next write tries the disk again.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("cmdgate.agent.audit")


def utc_timestamp() -> str:
    """RFC 3339 UTC with microseconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_record(record: dict[str, Any]) -> bytes:
    """One line of JSON. ensure_ascii escapes every control character and newline,
    so no field can forge a line."""
    line = json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str)
    return line.encode() + b"\n"


class AuditLog:
    """Appends records to ``path``; ``await write(record)`` returns once it is on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def open(self) -> None:
        """Open (or create, 0600) the file for appending; raises OSError if it cannot."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    async def write(self, event: str, fields: dict[str, Any]) -> None:
        """Append an ``event`` record and wait until it is fsync'ed; raise OSError if it is not."""
        record = {"ts": utc_timestamp(), "event": event, **fields}
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((encode_record(record), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_pending())
        await asyncio.shield(future)

    async def _flush_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            data = b"".join(line for line, _ in batch)
            try:
                await loop.run_in_executor(None, self._write_and_sync, data)
            except OSError as e:
                log.error("audit write to %s failed: %s", self.path, e)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(OSError(e.errno, f"{self.path}: {e.strerror}"))
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    def _write_and_sync(self, data: bytes) -> None:
        if self._fd is None:
            self.open()
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    async def close(self) -> None:
        """Flush what is pending and close the file."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
