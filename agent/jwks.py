"""Signing keys fetched from the identity provider a fleet already runs (OIDC, JWKS).

The key set is fetched at start and then every ``jwks_ttl_seconds`` by a task of
its own, on a worker thread: a request for a known ``kid`` never waits for the
network. A token with an unknown ``kid`` may make the agent fetch at once (a key
rotated in at the provider is then accepted on first use), but at most once per
``jwks_min_refresh_seconds``, so random kids cannot make it fetch per request.
A failed fetch keeps the last good key set; a key removed at the provider stops
being accepted at the next fetch. Only https is fetched (http on loopback), with
connect and read timeouts, and nothing a token names is ever fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.request
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from cmdgate.agent.config import AuthConfig, VerificationKey, fetchable_url, parse_jwks

log = logging.getLogger("cmdgate.agent")

FETCH_TIMEOUT_SECONDS = 5.0
MAX_DOCUMENT_BYTES = 1024 * 1024


class _SameRulesRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to where the configured URL itself could point: an https
    origin redirecting to plain http would let anyone on the path supply the keys."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not fetchable_url(newurl):
            raise ValueError(f"{req.full_url}: redirected to {newurl[:200]}, which is not https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameRulesRedirects())


def _fetch_json(url: str) -> Any:
    """GET ``url`` and parse JSON (blocking: run it on a worker thread)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    with _OPENER.open(request, timeout=FETCH_TIMEOUT_SECONDS) as response:
        body = response.read(MAX_DOCUMENT_BYTES + 1)
    if len(body) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"{url}: over {MAX_DOCUMENT_BYTES} bytes")
    return json.loads(body)


class RemoteKeys:
    """The current key set of one issuer, kept fresh in the background."""

    def __init__(self, auth: AuthConfig) -> None:
        self.auth = auth
        self.keys: Mapping[str, VerificationKey] = MappingProxyType({})
        self.version = 0  # changes with every new key set, so caches know to forget
        self._last_unknown_kid_fetch = float("-inf")
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def refresh(self) -> bool:
        """Fetch the key set now; keep the last good one on failure. True if it worked."""
        async with self._lock:
            self.fetches += 1
            try:
                keys = await asyncio.get_running_loop().run_in_executor(None, self._fetch)
            except (OSError, ValueError, RecursionError) as e:  # (JSON nested too deep)
                log.error(
                    "fetching the keys of %s failed, keeping %d known key(s): %s",
                    self.auth.issuer,
                    len(self.keys),
                    e,
                )
                return False
            if set(keys) != set(self.keys):
                log.info("keys of %s: %s", self.auth.issuer, ", ".join(sorted(keys)))
            self.keys = keys
            self.version += 1
            return True

    async def refresh_for_unknown_kid(self) -> bool:
        """Fetch again for an unknown kid, unless that was done too recently. True if
        a new key set is in."""
        now = time.monotonic()
        if now - self._last_unknown_kid_fetch < self.auth.jwks_min_refresh_seconds:
            return False
        self._last_unknown_kid_fetch = now
        return await self.refresh()

    def _fetch(self) -> Mapping[str, VerificationKey]:
        url = self.auth.jwks_url
        if self.auth.discovery:
            metadata = _fetch_json(
                self.auth.issuer.rstrip("/") + "/.well-known/openid-configuration"
            )
            url = metadata.get("jwks_uri") if isinstance(metadata, dict) else None
            if not isinstance(url, str) or not fetchable_url(url):
                raise ValueError(f"discovery gave no usable jwks_uri: {str(url)[:200]!r}")
            if metadata.get("issuer") != self.auth.issuer:
                raise ValueError(f"discovery names issuer {metadata.get('issuer')!r}")
        assert url is not None
        return parse_jwks(_fetch_json(url), self.auth.algorithms, url)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.auth.jwks_ttl_seconds)
            with contextlib.suppress(Exception):
                await self.refresh()
