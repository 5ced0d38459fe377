"""The audit log's integrity format, shared by the agent (which writes it) and
``cmdgate audit verify`` (which checks it).

Every record carries ``seq`` (1, 2, 3... across rotated files), ``prev`` (the
previous record's ``hash``; ``GENESIS`` for the first record ever) and
``hash``: SHA-256 over the record's canonical JSON without ``hash``. Every N
records or T seconds the agent adds a ``checkpoint`` record whose ``sig`` is
an Ed25519 signature, by the agent's own audit key, over the canonical JSON
of the checkpoint without ``hash`` and ``sig``. Since a checkpoint covers its
``prev``, it vouches for every record before it: whoever rewrites the chain
to hide an edit cannot sign the checkpoints that follow.
"""

from __future__ import annotations

import base64
import collections
import datetime
import glob
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

GENESIS = "0" * 64
CHECKPOINT_EVENT = "checkpoint"
# Keeps a checkpoint signature from meaning anything outside this format.
_SIGNATURE_CONTEXT = b"cmdgate-audit-checkpoint-v1\n"


def canonical(record: Mapping[str, Any], *without: str) -> bytes:
    """The record's canonical JSON: sorted keys, no spaces, ASCII only, minus ``without``."""
    body = {k: v for k, v in record.items() if k not in without}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON without its ``hash``, in hex."""
    return hashlib.sha256(canonical(record, "hash")).hexdigest()


def checkpoint_signing_input(record: Mapping[str, Any]) -> bytes:
    return _SIGNATURE_CONTEXT + canonical(record, "hash", "sig")


def sign_checkpoint(key: ed25519.Ed25519PrivateKey, record: Mapping[str, Any]) -> str:
    """The ``sig`` of a checkpoint record, base64url without padding."""
    signature = key.sign(checkpoint_signing_input(record))
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def checkpoint_signature_valid(
    public_key: ed25519.Ed25519PublicKey, record: Mapping[str, Any]
) -> bool:
    sig = record.get("sig")
    if not isinstance(sig, str):
        return False
    try:
        signature = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
        public_key.verify(signature, checkpoint_signing_input(record))
    except (ValueError, InvalidSignature):
        return False
    return True


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """A short, stable name for an audit key: the start of the SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(pem: bytes) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key from PEM; raise ValueError for anything else."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


# ---- reading log files ----------------------------------------------------------------------

# How far back from the end to look for the last line.
_TAIL_BYTES = 256 * 1024


def parse_line(line: bytes) -> dict[str, Any] | None:
    """The record on one line, or None if it is not a JSON object."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def first_record(path: Path) -> dict[str, Any] | None:
    """The first record of a log file, or None if it is empty, missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return parse_line(f.readline(_TAIL_BYTES))
    except OSError:
        return None


def last_record(path: Path) -> dict[str, Any] | None:
    """The last complete record of a log file, or None."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read(_TAIL_BYTES)
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        record = parse_line(line)
        if record is not None:
            return record
    return None


def log_files(path: Path) -> list[Path]:
    """The live log file and its rotated siblings (``NAME.*``), oldest first.

    They are ordered by the seq of their first record, so files renamed by the
    agent (``NAME.<first seq>``) and by logrotate (``NAME.1``, ``NAME.2``...) both
    come out in chain order. Compressed files are left out.
    """
    candidates = [
        p
        for p in path.parent.glob(glob.escape(path.name) + ".*")
        if p.is_file() and not p.name.endswith((".gz", ".xz", ".zst", ".bz2", ".tmp"))
    ]
    # regular files only: a device such as /dev/full reads forever
    if path.is_file():
        candidates.append(path)

    return sorted(candidates, key=lambda p: (first_seq(p), p == path))


def first_seq(path: Path) -> int:
    """The seq of a file's first record; a file without one sorts after every other."""
    record = first_record(path)
    seq = record.get("seq") if record else None
    return seq if isinstance(seq, int) else sys.maxsize


def read_records(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Every parseable record of ``paths``, in order (lines that are not JSON are skipped)."""
    for path in paths:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue  # rotated away (and compressed, or deleted) since it was listed
        with f:
            for line in f:
                record = parse_line(line)
                if record is not None:
                    yield record


@dataclass(frozen=True)
class AuditFilter:
    """Which records a query wants; every field left empty matches everything."""

    sub: str = ""
    command: str = ""
    decision: str = ""
    since: str = ""  # RFC 3339 UTC as the log writes it: ...T12:00:00.000000Z
    until: str = ""
    run_id: str = ""

    @classmethod
    def parse(
        cls, sub: str, command: str, decision: str, since: str, until: str, run_id: str
    ) -> AuditFilter:
        """A filter from what a person typed (times as ``normalise_time`` takes them);
        ValueError naming what is wrong."""
        if decision not in ("", "allowed", "denied"):
            raise ValueError("decision must be 'allowed' or 'denied'")
        since = normalise_time(since) if since else ""
        until = normalise_time(until) if until else ""
        return cls(sub, command, decision, since, until, run_id)

    def newest(self, records: Iterable[Mapping[str, Any]], limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` records that match (all of them for 0), oldest first; holds
        no more than ``limit`` at a time."""
        kept: collections.deque[dict[str, Any]] = collections.deque(maxlen=limit or None)
        kept.extend(dict(r) for r in records if self.matches(r))
        return list(kept)

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Checkpoints are the log's own, never a match."""
        if record.get("event") == CHECKPOINT_EVENT:
            return False
        ts = str(record.get("ts", ""))
        return (
            (not self.sub or record.get("sub") == self.sub)
            and (not self.command or record.get("command") == self.command)
            and (not self.decision or record.get("decision") == self.decision)
            and (not self.run_id or record.get("run_id") == self.run_id)
            and (not self.since or ts >= self.since)
            and (not self.until or ts < self.until)
        )


def normalise_time(text: str, now: datetime.datetime | None = None) -> str:
    """``2026-11-28T12:00:00Z``, ``2026-11-28``, or a duration back from now (``15m``, ``2h``,
    ``7d``), as the log's own timestamp format, for comparing as strings."""
    text = text.strip()
    now = now or datetime.datetime.now(datetime.UTC)
    match = re.fullmatch(r"([0-9]+)([smhd])", text)
    if match:
        seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        try:
            moment = now - datetime.timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"bad time {text!r}: further back than the calendar goes") from None
    else:
        try:
            moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"bad time {text!r}: use RFC 3339 (2026-11-28T12:00:00Z) "
                "or a duration back from now (15m, 2h, 7d)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
    try:
        moment = moment.astimezone(datetime.UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00
        raise ValueError(f"bad time {text!r}: outside the calendar in UTC") from None
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
