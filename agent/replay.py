"""Single-use tokens: every ``jti`` is accepted once per agent, until its ``exp``.

The set of seen ``jti`` values lives in memory and in an append-only file in the
state folder, so it survives a restart; a ``jti`` is taken (in memory, at once,
so two concurrent calls cannot both have it) before its line is made durable,
and the call fails closed if that cannot be done. Entries past their ``exp``
are pruned: in memory whenever the set has doubled since the last pruning, and
from the file when the agent starts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from cmdgate.agent.errors import AuthenticationFailed

log = logging.getLogger("cmdgate.agent")
# Below this many entries the set is never pruned (it costs one pass over the set).
_PRUNE_MINIMUM = 1024


class ReplayGuard:
    """The ``jti`` values this agent has accepted, and until when they matter."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: dict[str, float] = {}
        self._load()
        self._prune_at = 2 * len(self._seen) + _PRUNE_MINIMUM

    def _load(self) -> None:
        now = time.time()
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
                jti, exp = str(entry["jti"]), float(entry["exp"])
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash: the others still count
            if exp >= now:
                self._seen[jti] = max(exp, self._seen.get(jti, 0.0))
        # rewrite with the live entries only, so the file does not grow for ever
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{id(self)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "w") as f:
                for jti, exp in self._seen.items():
                    f.write(json.dumps({"jti": jti, "exp": exp}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        log.info("replay guard: %d unexpired jti from %s", len(self._seen), self.path)

    def take(self, jti: str | None, exp: float, now: float | None = None) -> None:
        """Claim ``jti`` for this call, or raise ``AuthenticationFailed`` if it was used."""
        if jti is None:
            raise AuthenticationFailed("TOKEN_CLAIM_MISSING", "single-use tokens need a jti")
        now = time.time() if now is None else now
        seen_until = self._seen.get(jti)
        if seen_until is not None and seen_until >= now:
            raise AuthenticationFailed("TOKEN_REPLAYED", f"jti {jti[:64]!r} was used before")
        self._seen[jti] = exp
        if len(self._seen) >= self._prune_at:
            self._seen = {j: until for j, until in self._seen.items() if until >= now}
            self._prune_at = 2 * len(self._seen) + _PRUNE_MINIMUM

    def release(self, jti: str) -> None:
        """Forget a ``jti`` whose record could not be made durable."""
        self._seen.pop(jti, None)

    def persist(self, jti: str, exp: float) -> None:
        """Make the claim on ``jti`` durable (blocking: call it off the event loop)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (json.dumps({"jti": jti, "exp": exp}) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
