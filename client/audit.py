"""Reading audit logs: verify their integrity, query them, and summarise them per identity.

``verify_logs`` walks the records in chain order and stops at the first one
that breaks the chain, naming the file, the line and what is wrong: edited,
deleted, reordered, inserted, or truncated after the last checkpoint.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from cmdgate.shared.auditlog import (
    CHECKPOINT_EVENT,
    GENESIS,
    checkpoint_signature_valid,
    first_seq,
    key_id,
    parse_line,
    record_hash,
)

# How late a checkpoint may be, beyond twice its interval, before the tail counts as cut.
_CHECKPOINT_SLACK_SECONDS = 5.0


@dataclass
class VerifyReport:
    """What ``verify_logs`` found. ``problem`` is None when every check held."""

    files: int = 0
    records: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    signatures_checked: bool = False
    unsigned_tail: int = 0
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class _Line:
    path: Path
    number: int
    record: dict[str, Any] | None


def _lines(paths: Sequence[Path]) -> Iterator[_Line]:
    for path in paths:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                yield _Line(path, number, parse_line(raw))


def chain_order(paths: Iterable[Path]) -> list[Path]:
    """Files sorted by the seq of their first record, so logrotate's names need no thought
    (as the agent orders them)."""
    return sorted(paths, key=first_seq)


def _parse_ts(value: object) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def verify_logs(
    paths: Sequence[Path],
    public_key: ed25519.Ed25519PublicKey | None = None,
    now: datetime.datetime | None = None,
    partial: bool = False,
) -> VerifyReport:
    """Check the chain, seq continuity and checkpoint signatures across ``paths``.

    Unless ``partial``, the files must be the whole log: starting at seq 1 and not
    ending where a file was rotated away.
    """
    ordered = chain_order(paths)
    report = VerifyReport(files=len(ordered), signatures_checked=public_key is not None)
    expected_key = key_id(public_key) if public_key is not None else None
    prev_hash: str | None = None
    prev_seq: int | None = None
    prev_path: Path | None = None
    last_checkpoint: dict[str, Any] | None = None
    since_checkpoint = 0
    # one line at a time, with one of look-ahead: the log may be far larger than memory
    lines = _lines(ordered)
    line = next(lines, None)
    last_line: _Line | None = None

    def fail(line: _Line, what: str) -> VerifyReport:
        report.problem = f"{line.path}:{line.number}: {what}"
        return report

    while line is not None:
        following_line = next(lines, None)
        record = line.record
        if record is None:
            return fail(line, "edited: the line is not a JSON record")
        seq, stated = record.get("seq"), record.get("hash")
        if not isinstance(seq, int) or not isinstance(stated, str):
            return fail(line, "edited: the record has no seq or hash")
        if record_hash(record) != stated:
            return fail(line, f"seq {seq}: edited: the hash does not match the content")
        if prev_seq is None:
            report.first_seq = seq
            if seq == 1 and record.get("prev") != GENESIS:
                return fail(line, "seq 1: edited: the first record does not start the chain")
            if seq != 1:
                if not partial:
                    return fail(
                        line,
                        f"seq {seq}: deleted: the log starts at seq {seq}, so "
                        "earlier files are missing (give them, or --partial)",
                    )
                report.notes.append(f"the log starts at seq {seq}: earlier files not given")
        elif seq != prev_seq + 1:
            following = following_line.record if following_line is not None else None
            if seq <= prev_seq:
                return fail(
                    line,
                    f"seq {seq}: inserted or reordered: seq {seq} comes after seq {prev_seq}",
                )
            if following is not None and following.get("seq") == prev_seq + 1:
                return fail(line, f"seq {seq}: reordered: seq {prev_seq + 1} comes after it")
            where = "" if line.path == prev_path else f" between {prev_path} and {line.path}"
            return fail(
                line,
                f"seq {seq}: deleted: seq {prev_seq + 1} to {seq - 1} are missing{where}",
            )
        elif record.get("prev") != prev_hash:
            return fail(line, f"seq {seq}: inserted: it does not link to the record before it")
        if record.get("event") == "chain.gap":
            return fail(
                line,
                f"seq {seq}: deleted: the agent found seq "
                f"{record.get('first_missing')} to {record.get('last_missing')} "
                "missing when it started",
            )
        if record.get("event") == CHECKPOINT_EVENT:
            report.checkpoints += 1
            if public_key is not None:
                if record.get("key_id") != expected_key:
                    return fail(
                        line,
                        f"seq {seq}: checkpoint by another key "
                        f"({record.get('key_id')}, expected {expected_key})",
                    )
                if not checkpoint_signature_valid(public_key, record):
                    return fail(
                        line,
                        f"seq {seq}: edited: the checkpoint signature is invalid, "
                        "so records before it were rewritten",
                    )
            last_checkpoint, since_checkpoint = record, 0
        else:
            since_checkpoint += 1
        prev_seq, prev_hash, prev_path = seq, stated, line.path
        report.records += 1
        last_line, line = line, following_line
    report.last_seq = prev_seq
    report.unsigned_tail = since_checkpoint
    if last_checkpoint is None or last_line is None:
        return report
    if last_checkpoint.get("final") and since_checkpoint == 0:
        if last_checkpoint.get("reason") == "rotate":
            if not partial:
                report.problem = (
                    f"{last_line.path}:{last_line.number}: deleted: the log "
                    "ends where a file was rotated, so the files after it are "
                    "missing (give them, or --partial)"
                )
                return report
            report.notes.append("the log ends where a file was rotated: give the files after it")
        return report
    _check_fresh(report, last_line, last_checkpoint, since_checkpoint, now)
    return report


def _check_fresh(
    report: VerifyReport,
    last: _Line,
    checkpoint: Mapping[str, Any],
    since: int,
    now: datetime.datetime | None,
) -> None:
    """A live log gets a checkpoint every T seconds even when idle: an older one means a cut."""
    written = _parse_ts(checkpoint.get("ts"))
    interval = checkpoint.get("every_seconds")
    if written is None or not isinstance(interval, int | float):
        return
    now = now or datetime.datetime.now(datetime.UTC)
    age = (now - written).total_seconds()
    if age > 2 * interval + _CHECKPOINT_SLACK_SECONDS:
        report.problem = (
            f"{last.path}:{last.number}: truncated after the last checkpoint "
            f"(seq {checkpoint.get('seq')}, {checkpoint.get('ts')}): none for {age:.0f}s "
            f"although one is written every {interval:g}s, and {since} record(s) follow it "
            "(or the agent stopped without its final checkpoint)"
        )


# ---- query and summary ----------------------------------------------------------------------

TABLE_COLUMNS = ("ts", "sub", "event", "command", "decision", "reason", "exit", "run_id")


def _exit_text(record: Mapping[str, Any]) -> str:
    if record.get("event") != "run.finished":
        return ""
    if record.get("timed_out"):
        return "timeout"
    if record.get("signal") is not None:
        return f"sig {record['signal']}"
    code = record.get("exit_code")
    return "" if code is None else str(code)


def table_row(record: Mapping[str, Any], host: str | None = None) -> list[str]:
    row = [
        str(record.get("ts", ""))[:23],
        str(record.get("sub") or "-"),
        str(record.get("event", "")),
        str(record.get("command") or ""),
        str(record.get("decision", "")),
        str(record.get("reason", "")),
        _exit_text(record),
        str(record.get("run_id") or "")[:12],
    ]
    return [host, *row] if host is not None else row


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; control characters shown escaped."""
    from cmdgate.client.terminal import escape_controls

    cells = [[escape_controls(c) for c in row] for row in [list(header), *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


@dataclass
class SummaryRow:
    allowed: int = 0
    denied: int = 0
    failures: int = 0
    others: set[str] = field(default_factory=set)
    first_seen: str = ""
    last_seen: str = ""


def summarise(records: Iterable[Mapping[str, Any]], by: str = "sub") -> dict[str, SummaryRow]:
    """One row per identity (``by="sub"``) or per command (``by="command"``).

    Allowed counts runs that started, denied counts refused runs, failures
    counts runs that ended other than with exit 0; the set holds the distinct
    commands (or identities) seen.
    """
    other = "command" if by == "sub" else "sub"
    rows: dict[str, SummaryRow] = {}
    for record in records:
        event = record.get("event")
        if event not in ("run.started", "run.denied", "run.finished"):
            continue
        row = rows.setdefault(str(record.get(by) or "-"), SummaryRow())
        if event == "run.started":
            row.allowed += 1
        elif event == "run.denied":
            row.denied += 1
        elif not (record.get("exit_code") == 0 and _exit_text(record) == "0"):
            row.failures += 1
        if record.get(other):
            row.others.add(str(record[other]))
        ts = str(record.get("ts", ""))
        row.first_seen = min(row.first_seen or ts, ts)
        row.last_seen = max(row.last_seen, ts)
    return rows
