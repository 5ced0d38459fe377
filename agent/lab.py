"""Write a complete, working lab set-up: what ``cmdgate-agent init DIR`` does.

The lab has its own CA with a server and a client certificate (so mutual TLS
is on, as in production), an EdDSA signing key published in a JWKS file, an
``agent.toml`` with a few harmless templates, a demo token and a ``client.env``
to source. Nothing that already exists is ever overwritten.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cmdgate.agent.config import load_config
from cmdgate.agent.errors import ConfigError
from cmdgate.shared.keys import KeyFileError, keygen, load_private_key, mint_token, write_new_file
from cmdgate.shared.wire import parse_target

# The first line of every agent.toml that `cmdgate-agent init` writes.
LAB_HEADER = "# cmdgate agent configuration for a lab, written by `cmdgate-agent init`.\n"
LAB_ISSUER = "https://cmdgate.lab"
LAB_AUDIENCE = "cmdgate"
LAB_ALGORITHM = "EdDSA"
LAB_KID = "lab-1"
LAB_COMMANDS_CLAIM = "cmds"
LAB_LEEWAY_SECONDS = 30
LAB_MAX_TOKEN_LIFETIME_SECONDS = 3600
# In the demo token the host allows this command but the token does not,
# so the second gate can be shown refusing a call.
HOST_ONLY_COMMAND = "free"
CERT_VALIDITY = timedelta(days=365)
# Backdated so a client whose clock runs a little behind still accepts the certificates.
CLOCK_SKEW = timedelta(minutes=5)
# An X.509 CommonName holds at most 64 characters (RFC 5280 ub-common-name).
MAX_SUBJECT_LENGTH = 64

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_LAB_SAN_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

TomlValue = str | int | bool | tuple[str, ...]
# Creates one new file (never replacing one) and records it for clean-up on failure.
_WriteFile = Callable[[Path, bytes, int], None]


class LabError(Exception):
    """The lab cannot be written; the message names the path and the reason."""


@dataclass(frozen=True)
class LabPaths:
    """Absolute paths of everything in a lab folder."""

    root: Path
    config: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    signing_key: Path
    jwks: Path
    token: Path
    client_env: Path
    audit: Path

    @property
    def written(self) -> tuple[Path, ...]:
        """The files ``write_lab`` writes besides ``agent.toml``."""
        return (
            self.ca_cert,
            self.server_cert,
            self.server_key,
            self.client_cert,
            self.client_key,
            self.signing_key,
            self.jwks,
            self.token,
            self.client_env,
        )


@dataclass(frozen=True)
class _LabTemplate:
    """A template offered in the lab config, written only if its program is on this host."""

    name: str
    comment: str
    description: str
    argv: tuple[str, ...]
    timeout_seconds: int
    max_output_bytes: int
    params: Mapping[str, Mapping[str, TomlValue]] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        # the same test as config loading, which refuses a template whose argv[0] is missing
        executable = self.argv[0]
        return os.path.isfile(executable) and os.access(executable, os.X_OK)


LAB_TEMPLATES: tuple[_LabTemplate, ...] = (
    _LabTemplate(
        name="uptime",
        comment="How long the host has been up, and its load; takes no parameters.",
        description="Show uptime and load averages",
        argv=("/usr/bin/uptime",),
        timeout_seconds=5,
        max_output_bytes=4096,
    ),
    _LabTemplate(
        name="disk-usage",
        comment="Free space on one of a fixed set of mounts: an enum admits nothing else.",
        description="Show disk usage of a mount point",
        argv=("/usr/bin/df", "-h", "--", "{mount}"),
        timeout_seconds=10,
        max_output_bytes=65536,
        # S108: an allowlisted argument for df, not a temporary file we create
        params={"mount": {"type": "enum", "values": ("/", "/tmp"), "default": "/"}},  # noqa: S108
    ),
    _LabTemplate(
        name="free",
        comment="Memory use. Allowed by this host but left out of the demo token.",
        description="Show memory usage",
        argv=("/usr/bin/free", "-h"),
        timeout_seconds=5,
        max_output_bytes=4096,
    ),
    _LabTemplate(
        name="tail-log",
        comment="The last lines of a log; the path must resolve under /var/log.",
        description="Show the last lines of a file under /var/log",
        argv=("/usr/bin/tail", "-n", "{lines}", "--", "{file}"),
        timeout_seconds=10,
        max_output_bytes=262144,
        params={
            "lines": {"type": "int", "min": 1, "max": 1000, "default": "20"},
            "file": {"type": "path", "under": ("/var/log",)},
        },
    ),
    _LabTemplate(
        name="list-dir",
        comment="A long listing of a folder under /var/log.",
        description="List a folder under /var/log",
        argv=("/usr/bin/ls", "-la", "--", "{path}"),
        timeout_seconds=10,
        max_output_bytes=262144,
        params={"path": {"type": "path", "under": ("/var/log",)}},
    ),
    _LabTemplate(
        name="echo",
        comment="A harmless command for demos: the pattern admits plain text only.",
        description="Echo a short message back",
        argv=("/bin/echo", "{message}"),
        timeout_seconds=5,
        max_output_bytes=4096,
        params={"message": {"type": "string", "pattern": "[A-Za-z0-9 .,_-]{1,200}"}},
    ),
)


def _lab_paths(root: Path) -> LabPaths:
    """Where each file of a lab in ``root`` goes (absolute; nothing is created)."""
    root = root.resolve()
    return LabPaths(
        root=root,
        config=root / "agent.toml",
        ca_cert=root / "tls" / "ca.pem",
        server_cert=root / "tls" / "server.pem",
        server_key=root / "tls" / "server.key",
        client_cert=root / "tls" / "client.pem",
        client_key=root / "tls" / "client.key",
        signing_key=root / "keys" / f"{LAB_KID}.pem",
        jwks=root / "keys" / "jwks.json",
        token=root / "token",
        client_env=root / "client.env",
        audit=root / "audit.jsonl",
    )


def write_lab(
    root: Path,
    listen: str = "127.0.0.1:7443",
    subject: str = "lab-operator",
    token_ttl_seconds: int = 3600,
) -> LabPaths:
    """Write a lab into ``root`` and prove its config loads; raise ``LabError`` on any fault.

    Refuses if ``root/agent.toml`` or any other lab file already exists. On
    failure, the files this call created are removed again.
    """
    _check_arguments(listen, subject, token_ttl_seconds)
    paths = _lab_paths(root)
    _refuse_existing(paths)
    created: list[Path] = []
    try:
        _write_all(paths, listen, subject, token_ttl_seconds, created)
    except BaseException:
        for path in reversed(created):
            path.unlink(missing_ok=True)
        raise
    return paths


def _check_arguments(listen: str, subject: str, token_ttl_seconds: int) -> None:
    try:
        parse_target(listen)
    except ValueError as e:
        raise LabError(f"listen address: {e}") from None
    if not subject or len(subject) > MAX_SUBJECT_LENGTH or not subject.isprintable():
        raise LabError(
            f"subject {subject!r} must be 1 to {MAX_SUBJECT_LENGTH} printable characters"
        )
    # the agent refuses a token whose exp - iat is over the configured maximum
    if not 0 < token_ttl_seconds <= LAB_MAX_TOKEN_LIFETIME_SECONDS:
        raise LabError(
            f"token lifetime {token_ttl_seconds}s must be between 1 and "
            f"{LAB_MAX_TOKEN_LIFETIME_SECONDS} seconds"
        )


def _refuse_existing(paths: LabPaths) -> None:
    if paths.config.exists():
        raise LabError(f"{paths.config}: already exists; refusing to overwrite a lab")
    # checked up front so a half-written lab is never left behind next to old files
    for path in paths.written:
        if path.exists() or path.is_symlink():
            raise LabError(f"{path}: already exists; refusing to overwrite it")


def _write_all(
    paths: LabPaths, listen: str, subject: str, token_ttl_seconds: int, created: list[Path]
) -> None:
    try:
        for folder in (paths.root, paths.ca_cert.parent, paths.signing_key.parent):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(f"{e.filename}: cannot create folder: {e.strerror}") from None

    def write(path: Path, content: bytes, mode: int) -> None:
        try:
            write_new_file(path, content, mode)
        except KeyFileError as e:
            raise LabError(str(e)) from None
        except OSError as e:
            raise LabError(f"{path}: cannot write: {e.strerror}") from None
        created.append(path)

    _write_tls(paths, parse_target(listen).host, subject, write)

    try:
        signing_key, jwks, kid = keygen(paths.signing_key.parent, LAB_ALGORITHM, kid=LAB_KID)
    except (KeyFileError, ValueError) as e:
        raise LabError(f"{paths.signing_key.parent}: cannot make the signing key: {e}") from None
    except OSError as e:
        raise LabError(
            f"{paths.signing_key.parent}: cannot make the signing key: {e.strerror}"
        ) from None
    created.extend((signing_key, jwks))

    templates = [t for t in LAB_TEMPLATES if t.available]
    try:
        token = mint_token(
            load_private_key(signing_key),
            kid=kid,
            issuer=LAB_ISSUER,
            audience=LAB_AUDIENCE,
            subject=subject,
            commands=[t.name for t in templates if t.name != HOST_ONLY_COMMAND],
            ttl_seconds=token_ttl_seconds,
            commands_claim=LAB_COMMANDS_CLAIM,
        )
    except KeyFileError as e:
        raise LabError(f"cannot mint the demo token: {e}") from None
    write(paths.token, (token + "\n").encode(), 0o600)
    write(paths.client_env, _client_env(paths).encode(), 0o644)
    # written last, so an agent.toml is only ever there for a complete lab
    write(paths.config, _agent_toml(paths, listen, templates).encode(), 0o644)

    try:
        load_config(paths.config)
    except ConfigError as e:
        raise LabError(f"the lab config does not load: {e}") from e


def _write_tls(paths: LabPaths, listen_host: str, subject: str, write: _WriteFile) -> None:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cmdgate lab CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)

    server_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    extra = _listen_san(listen_host)
    if extra is not None:
        server_names.append(extra)
    _write_leaf(
        paths.server_cert,
        paths.server_key,
        "cmdgate lab agent",
        ExtendedKeyUsageOID.SERVER_AUTH,
        server_names,
        ca_cert,
        ca_key,
        now,
        write,
    )
    _write_leaf(
        paths.client_cert,
        paths.client_key,
        subject,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        [],
        ca_cert,
        ca_key,
        now,
        write,
    )


def _listen_san(host: str) -> x509.GeneralName | None:
    """A name for the listen host too, so clients can dial the address the agent serves on."""
    if host in _LAB_SAN_HOSTS:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            return x509.DNSName(host)
        except ValueError as e:
            raise LabError(f"listen host {host!r} cannot go in a certificate: {e}") from None
    # a wildcard bind address is no name a client can dial
    return None if address.is_unspecified else x509.IPAddress(address)


def _write_leaf(
    cert_path: Path,
    key_path: Path,
    common_name: str,
    usage: x509.ObjectIdentifier,
    alt_names: Sequence[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    write: _WriteFile,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(name, ca_cert.subject, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    write(key_path, _private_pem(key), 0o600)
    write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _client_env(paths: LabPaths) -> str:
    variables = {
        "CMDGATE_CA": paths.ca_cert,
        "CMDGATE_CERT": paths.client_cert,
        "CMDGATE_KEY": paths.client_key,
        "CMDGATE_TOKEN_FILE": paths.token,
    }
    lines = [f"# Point the cmdgate client at this lab: . {shlex.quote(str(paths.client_env))}"]
    lines += [f"export {name}={shlex.quote(str(path))}" for name, path in variables.items()]
    return "\n".join(lines) + "\n"


def _agent_toml(paths: LabPaths, listen: str, templates: Sequence[_LabTemplate]) -> str:
    def relative(path: Path) -> str:
        # relative paths resolve against this file's folder, so the lab can be moved whole
        return path.relative_to(paths.root).as_posix()

    lines = [
        LAB_HEADER.rstrip("\n"),
        "# Relative paths are resolved against the folder of this file.",
        "",
        "[server]",
        f"listen = {_toml_value(listen)}",
        f"tls_cert = {_toml_value(relative(paths.server_cert))}",
        f"tls_key = {_toml_value(relative(paths.server_key))}",
        "# Clients must present a certificate signed by this CA (mutual TLS).",
        f"client_ca = {_toml_value(relative(paths.ca_cert))}",
        "",
        "[auth]",
        f"issuer = {_toml_value(LAB_ISSUER)}",
        f"audience = {_toml_value(LAB_AUDIENCE)}",
        f"jwks_file = {_toml_value(relative(paths.jwks))}",
        f"algorithms = {_toml_value((LAB_ALGORITHM,))}",
        f"commands_claim = {_toml_value(LAB_COMMANDS_CLAIM)}",
        f"leeway_seconds = {_toml_value(LAB_LEEWAY_SECONDS)}",
        f"max_token_lifetime_seconds = {_toml_value(LAB_MAX_TOKEN_LIFETIME_SECONDS)}",
        "",
        "[audit]",
        f"path = {_toml_value(relative(paths.audit))}",
    ]
    for template in templates:
        table = f"commands.{_toml_key(template.name)}"
        lines += [
            "",
            f"# {template.comment}",
            f"[{table}]",
            f"description = {_toml_value(template.description)}",
            f"argv = {_toml_value(template.argv)}",
            f"timeout_seconds = {_toml_value(template.timeout_seconds)}",
            f"max_output_bytes = {_toml_value(template.max_output_bytes)}",
        ]
        for param, spec in template.params.items():
            lines += ["", f"[{table}.params.{_toml_key(param)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in spec.items()]
    return "\n".join(lines) + "\n"


def toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that DEL must be escaped too."""
    # ensure_ascii=False: JSON would write astral characters as surrogate pairs, which TOML refuses
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def _toml_value(value: TomlValue) -> str:
    # bool first: it is an int in Python
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    return "[" + ", ".join(toml_string(v) for v in value) + "]"
