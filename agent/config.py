"""Load the agent's TOML configuration once, into frozen typed objects.

Every fault is a ``ConfigError`` that names the file, the key path and the
reason, e.g. ``agent.toml: commands.backup.params.path.under: must be absolute``.
Request handling never touches TOML, files or keys: all of it is done here.
"""

from __future__ import annotations

import grp
import itertools
import json
import math
import os
import pwd
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import jwt
from jwt.exceptions import PyJWTError

from cmdgate.agent.errors import ConfigError, InvalidParameters
from cmdgate.agent.revocation import parse_revocations
from cmdgate.agent.templates import (
    COMMAND_NAME_PATTERN,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_TIMEOUT_SECONDS,
    PARAM_NAME_PATTERN,
    ArgTemplate,
    CommandTemplate,
    Limits,
    Literal,
    ParamSpec,
    ParamType,
    Placeholder,
    RunAs,
    parse_arg_template,
    template_digest,
)
from cmdgate.shared.wire import DEFAULT_PORT, is_loopback, parse_target

# Asymmetric only: with HS*, anyone holding the verification key can mint tokens.
SUPPORTED_ALGORITHMS = frozenset(
    {"EdDSA", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
MAX_LEEWAY_SECONDS = 60
MAX_TIMEOUT_SECONDS = 24 * 3600
_KEY_ALGORITHM_BY_CURVE = {"Ed25519": "EdDSA", "P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_MISSING: Any = object()
CAP_SETGID = 6
CAP_SETUID = 7


@dataclass(frozen=True)
class ServerConfig:
    listen_host: str
    listen_port: int
    insecure: bool
    tls_cert_pem: bytes | None
    tls_key_pem: bytes | None
    # When set, clients must present a certificate signed by it (mTLS).
    client_ca_pem: bytes | None
    # The agent's own files: its audit signing key.
    state_dir: Path
    # On SIGTERM, how long runs in flight may go on before they are killed.
    drain_grace_seconds: float = 10.0
    # Past either, a run is refused at once with RESOURCE_EXHAUSTED: no queue.
    max_concurrent_runs: int = 256
    max_runs_per_identity: int = 32
    # HTTP/2 keepalive pings, so a long, silent command keeps its connection.
    keepalive_seconds: float = 60.0
    # "auto": a cgroup per run where one is writable, else the subreaper; or insist on one.
    process_control: str = "auto"

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


@dataclass(frozen=True)
class VerificationKey:
    """A public key from the JWKS file, bound to the one algorithm it verifies."""

    kid: str
    algorithm: str
    key: jwt.PyJWK


@dataclass(frozen=True)
class AuthConfig:
    issuer: str
    audience: str
    algorithms: frozenset[str]
    keys: Mapping[str, VerificationKey]
    commands_claim: str
    leeway_seconds: int
    max_token_lifetime_seconds: int
    # Reading the audit log over the API needs this claim to be true in the token.
    audit_claim: str
    # Revoked jti and sub values, one "jti:<value>" or "sub:<value>" per line.
    revoked_file: Path | None = None
    # RFC 8705: every token must be bound to the client certificate of its connection.
    require_cnf: bool = False
    # RFC 9068: the header typ a token must carry (lower case, "application/" dropped);
    # empty: typ is not checked.
    token_types: frozenset[str] = frozenset({"at+jwt"})
    # Claims a token must carry, besides the ones every check needs anyway.
    required_claims: tuple[str, ...] = ("iss", "sub", "aud", "exp", "iat", "jti")
    # "reject": each jti is accepted once per agent until its exp (single-use tokens).
    replay: str = "allow"
    # Keys from an identity provider instead of jwks_file: a JWKS URL, or the jwks_uri
    # of <issuer>/.well-known/openid-configuration. Cached for the TTL; an unknown kid
    # fetches again, at most once per min_refresh.
    jwks_url: str | None = None
    discovery: bool = False
    jwks_ttl_seconds: float = 300.0
    jwks_min_refresh_seconds: float = 30.0


@dataclass(frozen=True)
class AuditConfig:
    path: Path
    # Rotate the file once it would grow past this many bytes; 0 never rotates.
    max_bytes: int
    # A signed checkpoint every so many records, and at least every so many seconds.
    checkpoint_every_records: int
    checkpoint_every_seconds: float
    # Also write each record as a JSON line to stdout, for journald and log shippers.
    log_records: bool


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool
    listen_host: str
    listen_port: int


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs, checked and parsed; safe to share across requests."""

    source: Path
    server: ServerConfig
    audit: AuditConfig
    commands: Mapping[str, CommandTemplate]
    metrics: MetricsConfig
    # Every trusted issuer (one or more), each with its own keys, audience, algorithms and
    # claim name. One unless [[auth.issuers]] lists several.
    issuers: tuple[AuthConfig, ...]

    @property
    def auth(self) -> AuthConfig:
        """The first issuer's, which carries the agent-wide [auth] settings too."""
        return self.issuers[0]


class _Table:
    """A TOML table being read: tracks its key path and refuses keys nobody asked for."""

    def __init__(self, file: Path, path: str, data: Mapping[str, Any]) -> None:
        self.file = file
        self.path = path
        self.data = data
        self.seen: set[str] = set()

    def fail(self, key: str | None, reason: str) -> NoReturn:
        where = ".".join(p for p in (self.path, key) if p)
        raise ConfigError(f"{self.file}: {where or '(top level)'}: {reason}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.fail(key, "is required")
            return default
        value = self.data[key]
        # bool is an int in Python; a TOML true is never a number here
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
            self.fail(key, f"must be {_kind_name(kind)}, not {type(value).__name__}")
        return value

    def string(self, key: str, default: Any = _MISSING) -> Any:
        return self.get(key, str, default)

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self.get(key, bool, default))

    def integer(
        self, key: str, default: Any = _MISSING, low: int | None = None, high: int | None = None
    ) -> Any:
        value = self.get(key, int, default)
        if key in self.data:
            if low is not None and value < low:
                self.fail(key, f"must be at least {low}")
            if high is not None and value > high:
                self.fail(key, f"must be at most {high}")
        return value

    def string_list(self, key: str, default: Any = _MISSING, non_empty: bool = True) -> Any:
        value = self.get(key, list, default)
        if value is default:
            return value
        if not all(isinstance(v, str) for v in value):
            self.fail(key, "must be a list of strings")
        if non_empty and not value:
            self.fail(key, "must not be empty")
        return tuple(value)

    def table(self, key: str, default: Any = _MISSING) -> _Table:
        value = self.get(key, dict, {} if default is _MISSING else default)
        if key not in self.data and default is _MISSING:
            self.fail(key, "is required")
        return _Table(self.file, f"{self.path}.{key}" if self.path else key, value)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            self.fail(unknown[0], "unknown key")


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        bool: "true or false",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in _kinds(kind))


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read, check and parse the agent's config file; raise ``ConfigError`` on any fault."""
    file = Path(path)
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{file}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: not UTF-8: {e}") from None
    base = file.resolve().parent
    top = _Table(file, "", data)
    server = _load_server(top.table("server"), base)
    issuers = _load_issuers(top.table("auth"), base)
    if issuers[0].require_cnf and server.client_ca_pem is None:
        # a binding to the client certificate needs one on every connection
        top.fail("auth.require_cnf", "needs server.client_ca (mutual TLS)")
    audit = _load_audit(top.table("audit", default={}), base)
    commands = _load_commands(top.table("commands", default={}))
    metrics = _load_metrics(top.table("metrics", default={}))
    top.finish()
    return AgentConfig(file, server, audit, commands, metrics, issuers)


def _load_metrics(table: _Table) -> MetricsConfig:
    enabled = table.boolean("enabled", False)
    listen = table.string("listen", "127.0.0.1:9464")
    try:
        target = parse_target(listen, default_port=9464, any_port=True)
    except ValueError as e:
        table.fail("listen", str(e))
    table.finish()
    return MetricsConfig(enabled, target.host, target.port)


def _resolve(base: Path, value: str) -> Path:
    return (base / value) if not os.path.isabs(value) else Path(value)


def _read_file(table: _Table, key: str, base: Path) -> bytes | None:
    value = table.string(key, None)
    if value is None:
        return None
    path = _resolve(base, value)
    try:
        return path.read_bytes()
    except OSError as e:
        table.fail(key, f"cannot read {path}: {e.strerror}")


def _load_server(table: _Table, base: Path) -> ServerConfig:
    listen = table.string("listen", f"127.0.0.1:{DEFAULT_PORT}")
    try:
        target = parse_target(listen, any_port=True)
    except ValueError as e:
        table.fail("listen", str(e))
    insecure = table.boolean("insecure", False)
    # plaintext carries bearer tokens in the clear: loopback only
    if insecure and not is_loopback(target.host):
        table.fail("insecure", f"plaintext is refused on non-loopback address {target.host}")
    cert = _read_file(table, "tls_cert", base)
    key = _read_file(table, "tls_key", base)
    client_ca = _read_file(table, "client_ca", base)
    if insecure and (cert or key or client_ca):
        table.fail("insecure", "cannot be combined with tls_cert, tls_key or client_ca")
    if not insecure and (cert is None or key is None):
        table.fail("tls_cert" if cert is None else "tls_key", "is required unless insecure = true")
    state_dir = _resolve(base, table.string("state_dir", "state"))
    drain = _seconds(table, "drain_grace_seconds", 10.0, low=0.0, high=3600.0)
    max_runs = table.integer("max_concurrent_runs", 256, low=1, high=100_000)
    per_identity = table.integer("max_runs_per_identity", 32, low=1, high=100_000)
    keepalive = _seconds(table, "keepalive_seconds", 60.0, low=1.0, high=7200.0)
    process_control = table.string("process_control", "auto")
    if process_control not in ("auto", "cgroup", "subreaper"):
        table.fail("process_control", "must be auto, cgroup or subreaper")
    table.finish()
    return ServerConfig(
        target.host,
        target.port,
        insecure,
        cert,
        key,
        client_ca,
        state_dir,
        drain,
        max_runs,
        per_identity,
        keepalive,
        process_control,
    )


def _seconds(table: _Table, key: str, default: float, low: float, high: float) -> float:
    value = float(table.get(key, (int, float), default))
    if not (math.isfinite(value) and low <= value <= high):
        table.fail(key, f"must be between {low:g} and {high:g} seconds")
    return value


# What stays the agent's own when several issuers are trusted.
_AGENT_WIDE_AUTH_KEYS = frozenset(
    {
        "leeway_seconds",
        "max_token_lifetime_seconds",
        "audit_claim",
        "revoked_file",
        "require_cnf",
        "replay",
    }
)


def _load_issuers(table: _Table, base: Path) -> tuple[AuthConfig, ...]:
    """``[auth]`` for one issuer, or ``[[auth.issuers]]`` for several (humans from one
    provider, bots from another): each entry its own issuer, audience, keys, algorithms,
    claim name and token rules, under the agent-wide settings of ``[auth]``."""
    entries = table.data.get("issuers")
    if entries is None:
        return (_load_auth(table, base),)
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) for e in entries)
    ):
        table.fail("issuers", "must be one or more [[auth.issuers]] tables")
    wide = {k: v for k, v in table.data.items() if k != "issuers"}
    for key in sorted(set(wide) - _AGENT_WIDE_AUTH_KEYS):
        table.fail(key, "goes in each [[auth.issuers]] entry when there are several")
    loaded: list[AuthConfig] = []
    for i, entry in enumerate(entries):
        for key in sorted(set(entry) & _AGENT_WIDE_AUTH_KEYS):
            table.fail(f"issuers[{i}].{key}", "is agent-wide: set it in [auth]")
        loaded.append(_load_auth(_Table(table.file, f"auth.issuers[{i}]", {**wide, **entry}), base))
    seen: set[str] = set()
    for i, auth in enumerate(loaded):
        if auth.issuer in seen:
            table.fail(f"issuers[{i}].issuer", f"{auth.issuer!r} is listed twice")
        seen.add(auth.issuer)
    return tuple(loaded)


def _load_auth(table: _Table, base: Path) -> AuthConfig:
    issuer = table.string("issuer")
    audience = table.string("audience")
    if not issuer or not audience:
        table.fail("issuer" if not issuer else "audience", "must not be empty")
    algorithms = table.string_list("algorithms", ("EdDSA", "ES256"))
    for alg in algorithms:
        if alg not in SUPPORTED_ALGORITHMS:
            table.fail(
                "algorithms",
                f"{alg!r} is not allowed; use asymmetric algorithms only: "
                f"{', '.join(sorted(SUPPORTED_ALGORITHMS))}",
            )
    claim = table.string("commands_claim", "cmds")
    if not claim:
        table.fail("commands_claim", "must not be empty")
    leeway = table.integer("leeway_seconds", 30, low=0, high=MAX_LEEWAY_SECONDS)
    lifetime = table.integer("max_token_lifetime_seconds", 3600, low=1)
    audit_claim = table.string("audit_claim", "cmdgate_audit")
    if not audit_claim or audit_claim == claim:
        table.fail("audit_claim", "must be a claim of its own, not empty nor commands_claim")
    jwks_value = table.string("jwks_file", None)
    jwks_url = table.string("jwks_url", None)
    discovery = table.boolean("discovery", False)
    if [jwks_value is not None, jwks_url is not None, discovery].count(True) != 1:
        table.fail("jwks_file", "give exactly one of jwks_file, jwks_url and discovery = true")
    for key, url in (("jwks_url", jwks_url), ("issuer", issuer if discovery else None)):
        if url is not None and not fetchable_url(url):
            table.fail(key, f"{url!r}: keys are fetched over https only (http on loopback)")
    keys: Mapping[str, VerificationKey] = MappingProxyType({})
    if jwks_value is not None:
        keys = _load_jwks(table, _resolve(base, jwks_value), frozenset(algorithms))
    jwks_ttl = _seconds(table, "jwks_ttl_seconds", 300.0, low=1.0, high=86400.0)
    jwks_min_refresh = _seconds(table, "jwks_min_refresh_seconds", 30.0, low=0.1, high=3600.0)
    require_cnf = table.boolean("require_cnf", False)
    types = table.string_list("token_types", ("at+jwt", "application/at+jwt"), non_empty=False)
    token_types = frozenset(normalise_token_type(t) for t in types)
    replay = table.string("replay", "allow")
    if replay not in ("allow", "reject"):
        table.fail("replay", "must be allow or reject")
    required_claims = table.string_list(
        "required_claims", ("iss", "sub", "aud", "exp", "iat", "jti"), non_empty=False
    )
    revoked_value = table.string("revoked_file", None)
    revoked = None if revoked_value is None else _resolve(base, revoked_value)
    if revoked is not None:
        try:
            parse_revocations(revoked.read_text(), str(revoked))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            table.fail("revoked_file", str(e))
    table.finish()
    return AuthConfig(
        issuer,
        audience,
        frozenset(algorithms),
        keys,
        claim,
        leeway,
        lifetime,
        audit_claim,
        revoked,
        require_cnf,
        token_types,
        required_claims,
        replay,
        jwks_url,
        discovery,
        jwks_ttl,
        jwks_min_refresh,
    )


def fetchable_url(url: str) -> bool:
    """https, or http to a loopback address (tests, a local identity provider)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https" and parsed.hostname:
        return True
    return parsed.scheme == "http" and is_loopback(parsed.hostname or "")


def normalise_token_type(text: str) -> str:
    """A JOSE typ as RFC 7515 compares it: case-insensitive, "application/" optional."""
    lowered = text.strip().lower()
    return lowered.removeprefix("application/")


def _load_jwks(
    table: _Table, path: Path, algorithms: frozenset[str]
) -> Mapping[str, VerificationKey]:
    try:
        document = json.loads(path.read_bytes())
    except OSError as e:
        table.fail("jwks_file", f"cannot read {path}: {e.strerror}")
    except ValueError as e:
        table.fail("jwks_file", f"{path} is not JSON: {e}")
    try:
        return parse_jwks(document, algorithms, str(path))
    except ValueError as e:
        table.fail("jwks_file", str(e))


def parse_jwks(
    document: object, algorithms: frozenset[str], where: str
) -> Mapping[str, VerificationKey]:
    """The signing keys of a JWKS document, each bound to its one algorithm.

    Keys for other algorithms, or not for signing, are left out; a document with no
    usable key, a key without a kid, or a kid twice is a ValueError naming ``where``.
    """
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{where} has no 'keys' list")
    keys: dict[str, VerificationKey] = {}
    for i, entry in enumerate(entries):
        at = f"{where} key #{i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{at} is not an object")
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ValueError(f"{at} has no 'kid'")
        if kid in keys:
            raise ValueError(f"{at}: kid {kid!r} appears twice")
        if entry.get("use", "sig") != "sig":
            continue
        alg = entry.get("alg") or _KEY_ALGORITHM_BY_CURVE.get(str(entry.get("crv")))
        if not isinstance(alg, str):
            raise ValueError(f"{at} (kid {kid!r}) needs an 'alg' (a string)")
        if alg not in algorithms:
            # one algorithm per key: a key is only ever used with its own alg
            continue
        try:
            key = jwt.PyJWK(entry, algorithm=alg)
        except PyJWTError as e:  # PyJWKError, InvalidKeyError...: any key PyJWT will not take
            raise ValueError(f"{at} (kid {kid!r}): {e}") from None
        keys[kid] = VerificationKey(kid, alg, key)
    if not keys:
        raise ValueError(f"{where} has no signing key for algorithms {sorted(algorithms)}")
    return MappingProxyType(keys)


def _load_audit(table: _Table, base: Path) -> AuditConfig:
    path = _resolve(base, table.string("path", "audit.jsonl"))
    max_bytes = table.integer("max_bytes", 64 * 1024 * 1024, low=0)
    if 0 < max_bytes < 4096:
        table.fail("max_bytes", "must be 0 (never rotate) or at least 4096")
    every_records = table.integer("checkpoint_every_records", 1000, low=1)
    every_seconds = _seconds(table, "checkpoint_every_seconds", 60.0, low=0.05, high=86400.0)
    log_records = table.boolean("log_records", False)
    table.finish()
    return AuditConfig(path, max_bytes, every_records, every_seconds, log_records)


def _load_commands(table: _Table) -> Mapping[str, CommandTemplate]:
    commands: dict[str, CommandTemplate] = {}
    for name in table.data:
        if not COMMAND_NAME_PATTERN.fullmatch(name):
            table.fail(name, f"command name must match ^{COMMAND_NAME_PATTERN.pattern}$")
        commands[name] = _load_template(name, table.table(name))
    table.finish()
    return MappingProxyType(commands)


def _load_template(name: str, table: _Table) -> CommandTemplate:
    description = table.string("description", "")
    argv = table.string_list("argv")
    executable = argv[0]
    if "{" in executable or "}" in executable:
        table.fail("argv", "argv[0] must be a fixed path, not a placeholder")
    if not os.path.isabs(executable):
        table.fail("argv", f"argv[0] {executable!r} must be an absolute path (no PATH lookup)")
    if not os.path.isfile(executable) or not os.access(executable, os.X_OK):
        table.fail("argv", f"argv[0] {executable!r} is not an existing executable file")
    args: list[ArgTemplate] = []
    for element in argv[1:]:
        if "\0" in element:
            table.fail("argv", "an element contains NUL")
        try:
            args.append(parse_arg_template(element))
        except ValueError as e:
            table.fail("argv", str(e))
    params_table = table.table("params", default={})
    params = {p: _load_param(p, params_table.table(p)) for p in params_table.data}
    params_table.finish()
    _refuse_dangling_flags(table, args, params)
    used = {n for arg in args for n in arg.names}
    for placeholder in sorted(used - set(params)):
        table.fail("argv", f"placeholder {{{placeholder}}} has no entry in params")
    for unused in sorted(set(params) - used):
        params_table.fail(unused, "no placeholder in argv uses this parameter")
    env_table = table.table("env", default={})
    env = {k: env_table.string(k) for k in env_table.data}
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            env_table.fail(key, "environment names must be non-empty, without '=' or NUL")
    env_table.finish()
    cwd = table.string("cwd", "/")
    if not os.path.isabs(cwd) or not os.path.isdir(cwd):
        table.fail("cwd", f"{cwd!r} must be an absolute path to an existing folder")
    timeout = float(table.get("timeout_seconds", (int, float), DEFAULT_TIMEOUT_SECONDS))
    if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_SECONDS):
        table.fail("timeout_seconds", f"must be > 0 and at most {MAX_TIMEOUT_SECONDS}")
    max_output = table.integer("max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES, low=1)
    run_as = _load_run_as(table)
    limits = _load_limits(table.table("limits", default={}))
    table.finish()
    return CommandTemplate(
        name=name,
        description=description,
        executable=executable,
        args=tuple(args),
        params=MappingProxyType(params),
        env=MappingProxyType(env),
        cwd=cwd,
        timeout_seconds=timeout,
        max_output_bytes=max_output,
        sha256=template_digest(table.data),
        run_as=run_as,
        limits=limits,
    )


def _load_run_as(table: _Table) -> RunAs | None:
    user = table.string("user", None)
    group = table.string("group", None)
    if user is None and group is None:
        return None
    if user is None:
        table.fail("group", "needs a user as well")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        table.fail("user", f"no such user {user!r}")
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            table.fail("group", f"no such group {group!r}")
    if (entry.pw_uid, gid) != (os.geteuid(), os.getegid()) and not _can_switch_users():
        table.fail("user", "running as another user needs root, or CAP_SETUID and CAP_SETGID")
    groups = tuple(sorted(set(os.getgrouplist(user, gid))))
    return RunAs(user, entry.pw_uid, gid, groups, entry.pw_dir)


def _can_switch_users() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
                return bool(effective & (1 << CAP_SETGID) and effective & (1 << CAP_SETUID))
    except (OSError, ValueError):
        pass
    return False


_MEMORY_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _load_limits(table: _Table) -> Limits:
    pids = table.integer("pids", None, low=1, high=4_194_304)
    memory = table.get("memory", (int, str), None)
    if isinstance(memory, str):
        match = re.fullmatch(r"([0-9]{1,12})([KMG]?)", memory)
        if match is None:
            table.fail("memory", 'must be bytes, or a number with K, M or G, e.g. "256M"')
        memory = int(match.group(1)) * _MEMORY_UNITS[match.group(2)]
    if memory is not None and memory < 1024 * 1024:
        table.fail("memory", "must be at least 1M")
    cpu = table.integer("cpu", None, low=1, high=100_000)
    table.finish()
    return Limits(pids, memory, cpu)


def _refuse_dangling_flags(
    table: _Table, args: list[ArgTemplate], params: Mapping[str, ParamSpec]
) -> None:
    """An optional parameter left out drops its own element. Were it a flag's value
    (``-n``, ``{lines}``), the flag would stay and take the next element as its value."""
    for before, arg in itertools.pairwise(args):
        if len(arg.parts) != 1 or not isinstance(arg.parts[0], Placeholder) or before.names:
            continue
        name = arg.parts[0].name
        flag = "".join(p.text for p in before.parts if isinstance(p, Literal))
        spec = params.get(name)
        if spec is None or spec.required or spec.default is not None:
            continue
        if flag.startswith("-") and flag != "--":
            table.fail(
                "argv",
                f"optional {{{name}}} follows the flag {flag!r}: when it is left out the "
                f"flag would take the next element; write '{flag}={{{name}}}' or give "
                "a default",
            )


def _load_param(name: str, table: _Table) -> ParamSpec:
    if not PARAM_NAME_PATTERN.fullmatch(name):
        table.fail(None, f"parameter name must match ^{PARAM_NAME_PATTERN.pattern}$")
    type_name = table.string("type")
    try:
        param_type = ParamType(type_name)
    except ValueError:
        table.fail("type", f"{type_name!r} is not one of {[t.value for t in ParamType]}")
    raw_default = table.get("default", (str, int), None)
    if isinstance(raw_default, int) and param_type is not ParamType.INT:
        table.fail("default", "must be a string")
    default = None if raw_default is None else str(raw_default)
    required = table.boolean("required", default is None)
    if required and default is not None:
        table.fail("required", "cannot be true when a default is given")
    max_length = table.integer("max_length", DEFAULT_MAX_LENGTH, low=1, high=65536)
    allow_dash = table.boolean("allow_leading_dash", False)
    secret = table.boolean("secret", False)
    pattern = None
    values: tuple[str, ...] = ()
    low = high = None
    under: tuple[str, ...] = ()
    match param_type:
        case ParamType.STRING:
            source = table.string("pattern")
            try:
                # ASCII: \d and \w mean what template authors expect, not any script's digits
                pattern = re.compile(source, re.ASCII)
            except re.error as e:
                table.fail("pattern", f"bad regular expression: {e}")
        case ParamType.ENUM:
            values = table.string_list("values")
        case ParamType.INT:
            low = table.integer("min", None)
            high = table.integer("max", None)
            if low is not None and high is not None and low > high:
                table.fail("min", "must not be greater than max")
            if (low is None or low < 0) and not allow_dash:
                table.fail(
                    "min",
                    "negative values need allow_leading_dash = true; set min >= 0 or allow it",
                )
        case ParamType.PATH:
            roots = table.string_list("under")
            for root in roots:
                if not os.path.isabs(root) or os.path.normpath(root) != root:
                    table.fail("under", f"{root!r} must be an absolute, normalised path")
                if not os.path.isdir(root):
                    table.fail("under", f"{root!r} is not an existing folder")
            under = tuple(os.path.realpath(r) for r in roots)
    table.finish()
    spec = ParamSpec(
        name,
        param_type,
        required,
        default,
        max_length,
        allow_dash,
        pattern,
        values,
        low,
        high,
        under,
        secret,
    )
    if default is not None:
        try:
            spec.validate(default)
        except InvalidParameters as e:
            table.fail("default", f"is not a valid value: {e.detail}")
    return spec
