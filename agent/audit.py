"""The audit log: one hash-chained JSON line per decision, durable before it matters.

Records are appended with group commit: callers that wait for durability at
the same time share one write and one fsync. Each record is chained to the
one before (``seq``, ``prev``, ``hash``; see ``cmdgate.shared.auditlog``), and
every N records or T seconds, idle or not, a checkpoint signed with the
agent's own Ed25519 key is added, so that edits, deletions and a cut tail show.

A failed write fails every waiter, so the caller refuses to run anything
(fail closed). The chain state is only advanced once a batch is on disk, and
a partial write is cut off again, so the next write, once the disk has room,
continues the chain as if nothing had happened: no restart needed.

The file rotates by size, ending with a final checkpoint, and is reopened
on ``reopen()`` (SIGHUP) so that logrotate can move it away. Both happen
between batches, so no record is lost or written twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cmdgate.agent.config import AuditConfig
from cmdgate.shared.auditlog import (
    CHECKPOINT_EVENT,
    GENESIS,
    first_record,
    key_id,
    last_record,
    log_files,
    record_hash,
    sign_checkpoint,
)

log = logging.getLogger("cmdgate.agent.audit")

AUDIT_KEY_NAME = "audit-key.pem"
# How far back to look for the end of the last whole line.
TORN_SEARCH_BYTES = 1024 * 1024
AUDIT_PUBLIC_KEY_NAME = "audit-key.pub"


def utc_timestamp() -> str:
    """RFC 3339 UTC with microseconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_record(record: dict[str, Any]) -> bytes:
    """One line of JSON. ensure_ascii escapes every control character and newline,
    so no field can forge a line."""
    line = json.dumps(record, ensure_ascii=True, separators=(",", ":"))
    return line.encode() + b"\n"


def load_or_create_audit_key(state_dir: Path) -> ed25519.Ed25519PrivateKey:
    """The agent's audit signing key, made on first start, readable by the agent alone.

    The public half is written beside it for ``cmdgate audit verify --pubkey``.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = state_dir / AUDIT_KEY_NAME
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        log.info("created the audit signing key %s", key_path)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{key_path} is not an Ed25519 private key")
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_path = state_dir / AUDIT_PUBLIC_KEY_NAME
    if not public_path.exists() or public_path.read_bytes() != public_pem:
        tmp = public_path.with_name(public_path.name + ".tmp")
        tmp.write_bytes(public_pem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, public_path)
    return key


@dataclass
class _ChainHead:
    seq: int
    hash: str


class _Pending:
    """One record waiting for the next batch; ``fields is None`` asks for a checkpoint."""

    __slots__ = ("fields", "future", "reason")

    def __init__(
        self, fields: dict[str, Any] | None, future: asyncio.Future[None], reason: str = ""
    ) -> None:
        self.fields = fields
        self.future = future
        self.reason = reason


class AuditLog:
    """Appends chained records to ``config.path``; ``await write(...)`` returns once on disk."""

    def __init__(
        self, config: AuditConfig, key: ed25519.Ed25519PrivateKey, head_file: Path | None = None
    ) -> None:
        self.config = config
        self.path = config.path
        self._key = key
        # where the chain stood at the last checkpoint, kept apart from the log itself, so
        # that log files deleted while the agent was down show as a gap, not as nothing
        self.head_file = head_file
        self.missing: tuple[int, int] | None = None
        # set when a crash's incomplete last line was set aside at open
        self.torn: dict[str, Any] | None = None
        self.key_id = key_id(key.public_key())
        self._fd: int | None = None
        self._size = 0
        self._head = _ChainHead(0, GENESIS)
        self._since_checkpoint = 0
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._reopen_requested = False
        self._closed = False
        # its own thread: every call waits for its record, never behind an audit query's
        # scan of the whole log, a cgroup's removal or a key fetch in the shared pool
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cmdgate-audit")

    def open(self) -> None:
        """Find where the chain stands (across rotated files) and open the file for appending.

        Raises OSError if the file cannot be opened.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        newest = max(
            (r for r in (last_record(p) for p in log_files(self.path)) if r is not None),
            key=lambda r: r.get("seq", 0) if isinstance(r.get("seq"), int) else 0,
            default=None,
        )
        if newest is not None and isinstance(newest.get("seq"), int):
            self._head = _ChainHead(newest["seq"], str(newest.get("hash", GENESIS)))
        known = self._read_head_file()
        if known is not None and known > self._head.seq:
            self.missing = (self._head.seq + 1, known)
            log.error(
                "audit log %s ends at seq %d, but a checkpoint at seq %d was written: "
                "records are missing",
                self.path,
                self._head.seq,
                known,
            )
        self._open_file()

    def _read_head_file(self) -> int | None:
        if self.head_file is None:
            return None
        try:
            seq = json.loads(self.head_file.read_text()).get("seq")
        except (OSError, ValueError, AttributeError):
            return None
        return seq if isinstance(seq, int) else None

    def _write_head_file(self) -> None:
        if self.head_file is None:
            return
        tmp = self.head_file.with_name(self.head_file.name + ".tmp")
        tmp.write_text(json.dumps({"seq": self._head.seq, "hash": self._head.hash}))
        os.replace(tmp, self.head_file)

    def _open_file(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        size = os.fstat(fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(max(0, size - TORN_SEARCH_BYTES))
                tail = f.read()
            if not tail.endswith(b"\n"):
                size = self._set_aside_torn_tail(fd, size, tail)
        self._fd, self._size = fd, size

    def _set_aside_torn_tail(self, fd: int, size: int, tail: bytes) -> int:
        """A crash cut the last line short. That record was never on disk whole, so no
        caller was told of it: move the fragment to a file beside the log, cut the log
        back to its last whole line, and say so in the chain. Returns the new size."""
        keep = size - len(tail) + tail.rfind(b"\n") + 1
        fragment = tail[tail.rfind(b"\n") + 1 :]
        # a hidden name: no glob for the log (audit.jsonl*) picks it up as a log file
        aside = self.path.with_name(f".{self.path.name}.torn-{int(time.time())}")
        side = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(side, fragment)
            os.fsync(side)
        finally:
            os.close(side)
        os.ftruncate(fd, keep)
        os.fsync(fd)
        self.torn = {
            "torn_file": aside.name,
            "torn_bytes": len(fragment),
            "torn_sha256": hashlib.sha256(fragment).hexdigest(),
        }
        log.warning(
            "%s: an incomplete last line (%d bytes) moved to %s", self.path, len(fragment), aside
        )
        return keep

    def start(self) -> None:
        """Begin the periodic checkpoints; a checkpoint is written even when idle."""
        self._ticker = asyncio.create_task(self._tick())

    def reopen(self) -> None:
        """Reopen the file before the next write (SIGHUP, after logrotate moved it)."""
        self._reopen_requested = True
        self._kick()

    async def write(self, event: str, fields: dict[str, Any]) -> None:
        """Append an ``event`` record and wait until it is fsync'ed; raise OSError if it is not."""
        record = {"ts": utc_timestamp(), "event": event, **fields}
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(record, future))
        self._kick()
        await asyncio.shield(future)

    async def checkpoint(self, reason: str) -> None:
        """Append a signed checkpoint and wait until it is on disk."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(None, future, reason))
        self._kick()
        await asyncio.shield(future)

    async def close(self) -> None:
        """Write a final checkpoint, then close the file."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._fd is not None:
            try:
                await self.checkpoint("shutdown")
            except OSError as e:
                log.error("final audit checkpoint failed: %s", e)
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        self._closed = True
        self._writer.shutdown(wait=False)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_pending())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_every_seconds)
            # a failure is logged by the flusher; the next tick tries again
            with contextlib.suppress(OSError):
                await self.checkpoint("interval")

    async def _flush_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                head = self._head_copy()
                lines, since = self._chain_batch(batch, head)
                if self._needs_rotation(sum(map(len, lines))):
                    await self._rotate_now(loop)
                    head = self._head_copy()
                    lines, since = self._chain_batch(batch, head)
                if self._closed:  # (its thread is gone too)
                    raise OSError(errno.EBADF, "the audit log is closed")
                await loop.run_in_executor(self._writer, self._write_batch, b"".join(lines))
            except Exception as e:  # every waiter must hear, whatever broke
                if not isinstance(e, OSError):
                    log.exception("audit writer failed")
                reason = e.strerror if isinstance(e, OSError) else repr(e)
                log.error("audit write to %s failed: %s", self.path, reason)
                error = OSError(getattr(e, "errno", None), f"audit log {self.path}: {reason}")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self._head, self._since_checkpoint = head, since
            for item in batch:
                if not item.future.done():
                    item.future.set_result(None)
            if any(b'"event":"checkpoint"' in line for line in lines):
                with contextlib.suppress(OSError):
                    self._write_head_file()
            if self.config.log_records:
                self._log_records(lines)

    def _head_copy(self) -> _ChainHead:
        return _ChainHead(self._head.seq, self._head.hash)

    async def _rotate_now(self, loop: asyncio.AbstractEventLoop) -> None:
        """End the file with a signed final checkpoint, then start a new one. Once that
        checkpoint is on disk the chain has moved on, whether or not the rename worked."""
        head = self._head_copy()
        final = self._chain(head, self._checkpoint_fields("rotate", final=True))
        try:
            await loop.run_in_executor(self._writer, self._write_batch, final)
        except OSError as e:
            log.error(
                "audit log %s: the rotation checkpoint failed, not rotating: %s",
                self.path,
                e.strerror,
            )
            return
        self._head, self._since_checkpoint = head, 0
        with contextlib.suppress(OSError):
            self._write_head_file()
        if self.config.log_records:
            self._log_records([final])
        try:
            await loop.run_in_executor(self._writer, self._rotate)
        except OSError as e:
            # the records are safe either way: keep appending to the file we have
            log.error("audit log rotation of %s failed, continuing in it: %s", self.path, e)

    def _chain_batch(self, batch: list[_Pending], head: _ChainHead) -> tuple[list[bytes], int]:
        """The batch's lines chained after ``head`` (which advances), with the checkpoints
        that fall due; and how many records then follow the last checkpoint."""
        since = self._since_checkpoint
        lines: list[bytes] = []
        for item in batch:
            if item.fields is None:
                lines.append(
                    self._chain(
                        head, self._checkpoint_fields(item.reason, final=item.reason == "shutdown")
                    )
                )
                since = 0
                continue
            lines.append(self._chain(head, item.fields))
            since += 1
            if since >= self.config.checkpoint_every_records:
                lines.append(self._chain(head, self._checkpoint_fields("records")))
                since = 0
        return lines, since

    def _chain(self, head: _ChainHead, fields: dict[str, Any]) -> bytes:
        """Give ``fields`` the next seq and the link to ``head``; advance ``head``."""
        head.seq += 1
        record = {**fields, "seq": head.seq, "prev": head.hash}
        if record.get("event") == CHECKPOINT_EVENT:
            record["sig"] = sign_checkpoint(self._key, record)
        record["hash"] = record_hash(record)
        head.hash = record["hash"]
        return encode_record(record)

    def _checkpoint_fields(self, reason: str, final: bool = False) -> dict[str, Any]:
        return {
            "ts": utc_timestamp(),
            "event": CHECKPOINT_EVENT,
            "reason": reason,
            "final": final,
            "key_id": self.key_id,
            "every_records": self.config.checkpoint_every_records,
            "every_seconds": self.config.checkpoint_every_seconds,
        }

    def _needs_rotation(self, incoming: int) -> bool:
        limit = self.config.max_bytes
        return limit > 0 and self._size > 0 and self._size + incoming > limit

    def _write_batch(self, data: bytes) -> None:
        """Write ``data`` and fsync (reopening the file first if asked or needed)."""
        if self._closed:
            raise OSError(errno.EBADF, "the audit log is closed")
        if self._reopen_requested or self._fd is None:
            self._reopen_requested = False
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._open_file()
        self._append(data)

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        # the file as it is now, not as we last left it: logrotate's copytruncate shrinks it
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            # cut off a partial batch, so the file holds whole lines of a valid chain
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise
        self._size = start + len(data)

    def _rotate(self) -> None:
        if self._fd is None:
            return
        first = first_record(self.path)
        first_seq = first["seq"] if first and isinstance(first.get("seq"), int) else 0
        # named by the first seq it holds, so that the names sort in chain order
        rotated = self.path.with_name(f"{self.path.name}.{first_seq:012d}")
        os.rename(self.path, rotated)
        os.close(self._fd)
        self._fd = None
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._open_file()
        log.info("audit log rotated to %s", rotated)

    def _log_records(self, lines: Iterable[bytes]) -> None:
        # journald and log shippers carry these; the file stays the record of truth
        try:
            out = sys.stdout.buffer
            for line in lines:
                out.write(line)
            out.flush()
        except (OSError, ValueError) as e:
            # the file is the record of truth; a broken stdout must not stop the writer
            log.warning("could not copy audit records to stdout: %s", e)
