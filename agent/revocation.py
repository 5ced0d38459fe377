"""Revoked tokens: a file of ``jti:<value>`` and ``sub:<value>`` lines, re-read when it changes.

A leaked token is refused from the moment its ``jti`` (or its whole ``sub``) is
written to the file: the agent looks at the file's modification on every call,
which costs one ``stat``, and re-reads it when it changed. It is checked after
the signature and never cached, so no verified token outlives its revocation.
A file that was configured but cannot be read refuses every token (fail closed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cmdgate.agent.errors import AuthenticationFailed

log = logging.getLogger("cmdgate.agent")


@dataclass(frozen=True)
class Revoked:
    jtis: frozenset[str]
    subs: frozenset[str]


def parse_revocations(text: str, source: str) -> Revoked:
    """The entries of a revocation file; raise ValueError naming the line that is wrong."""
    jtis: set[str] = set()
    subs: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, sep, value = line.partition(":")
        value = value.strip()
        if not sep or not value or kind.strip() not in ("jti", "sub"):
            raise ValueError(f"{source}:{number}: write 'jti:<value>' or 'sub:<value>'")
        (jtis if kind.strip() == "jti" else subs).add(value)
    return Revoked(frozenset(jtis), frozenset(subs))


class RevocationList:
    """The revoked ``jti`` and ``sub`` values of one file, kept current."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._revoked = Revoked(frozenset(), frozenset())
        self._error: str | None = None
        self.refresh()

    def refresh(self) -> None:
        """Re-read the file if it changed since the last look."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._fail(f"cannot read {self.path}: {e.strerror}")
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp and self._error is None:
            return
        try:
            self._revoked = parse_revocations(self.path.read_text(), str(self.path))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            self._fail(str(e))
            return
        self._stamp, self._error = stamp, None
        log.info(
            "revocations: %d jti, %d sub from %s",
            len(self._revoked.jtis),
            len(self._revoked.subs),
            self.path,
        )

    def _fail(self, reason: str) -> None:
        if self._error != reason:
            log.error("revocation list unusable, refusing every token: %s", reason)
        self._error = reason
        self._stamp = None

    def check(self, subject: str, jti: str | None) -> None:
        """Raise ``AuthenticationFailed`` if the token is revoked, or if that cannot be told."""
        self.refresh()
        if self._error is not None:
            raise AuthenticationFailed("REVOCATION_UNAVAILABLE", self._error)
        if jti is not None and jti in self._revoked.jtis:
            raise AuthenticationFailed("TOKEN_REVOKED", f"jti {jti[:64]!r} is revoked")
        if subject in self._revoked.subs:
            raise AuthenticationFailed("TOKEN_REVOKED", f"sub {subject[:64]!r} is revoked")
