"""load_config: every load-time fault is a ConfigError naming the file, the key path and why."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cmdgate.agent.config import load_config
from cmdgate.agent.errors import ConfigError, InvalidParameters
from cmdgate.agent.templates import ParamType
from cmdgate.shared.keys import keygen

ISSUER = "https://issuer.example"
AUDIENCE = "host-a"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

Doc = dict[str, Any]


# --- a tiny TOML writer, so each test states its config as data -----------------------------


def toml_key(key: str) -> str:
    # JSON's string escapes are a subset of TOML basic strings' (ASCII-only output)
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def toml_text(doc: Mapping[str, Any]) -> str:
    """The TOML text of ``doc``: scalars first, then one ``[a.b]`` header per nested table."""
    lines: list[str] = []

    def emit(path: tuple[str, ...], table: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
        if path and (scalars or not tables):
            lines.append("[" + ".".join(toml_key(p) for p in path) + "]")
        lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in scalars.items())
        for key, sub in tables.items():
            emit((*path, key), sub)

    emit((), doc)
    return "\n".join(lines) + "\n"


# --- a site: real keys, a real executable, a config that loads -------------------------------


@dataclass(frozen=True)
class Site:
    root: Path
    jwks: Path
    kid: str
    tool: str


def make_tool(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "tool"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    return str(tool)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    _, jwks, kid = keygen(tmp_path / "keys", "EdDSA", kid="ed-1")
    return Site(tmp_path, jwks, kid, make_tool(tmp_path / "bin"))


def base_doc(site: Site) -> Doc:
    return {
        "server": {"insecure": True},
        "auth": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(site.jwks)},
        "audit": {"path": "audit.jsonl"},
        "commands": {"uptime": {"argv": [site.tool]}},
    }


def with_command(
    site: Site, argv: Sequence[str], params: Mapping[str, Any] | None = None, name: str = "show"
) -> Doc:
    """The base config plus one command ``name`` with ``argv`` and ``params``."""
    doc = base_doc(site)
    command: Doc = {"argv": list(argv)}
    if params is not None:
        command["params"] = dict(params)
    doc["commands"][name] = command
    return doc


def write_config(folder: Path, doc: Mapping[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "agent.toml"
    path.write_text(toml_text(doc))
    return path


def assert_config_error(folder: Path, doc: Mapping[str, Any], key_path: str, reason: str) -> None:
    """Loading ``doc`` fails with ``<file>: <key_path>: ...<reason>...``."""
    config = write_config(folder, doc)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert message.startswith(f"{config}: {key_path}: "), message
    assert reason in message, message


# --- the happy path -------------------------------------------------------------------------


def test_a_minimal_config_loads_with_secure_defaults(site: Site) -> None:
    doc = with_command(
        site,
        [site.tool, "--", "{n}"],
        {"n": {"type": "int", "min": 0, "max": 9, "required": False}},
    )
    config = load_config(write_config(site.root, doc))
    assert config.server.insecure is True
    assert (config.server.listen_host, config.server.listen_port) == ("127.0.0.1", 7443)
    assert config.auth.issuer == ISSUER
    assert config.auth.audience == AUDIENCE
    assert config.auth.algorithms == frozenset({"EdDSA", "ES256"})
    assert list(config.auth.keys) == [site.kid]
    assert config.auth.keys[site.kid].algorithm == "EdDSA"
    assert 0 <= config.auth.leeway_seconds <= 60
    assert sorted(config.commands) == ["show", "uptime"]
    show = config.commands["show"]
    assert show.executable == site.tool
    assert show.params["n"].type is ParamType.INT
    assert show.render({"n": "3"}).argv == (site.tool, "--", "3")


def test_a_missing_config_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: cannot read")):
        load_config(missing)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[server\n")
    with pytest.raises(ConfigError, match=re.escape(f"{config}: not valid TOML")):
        load_config(config)


# --- unknown keys, at every level ------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "typo", "key_path"),
    [
        pytest.param((), "comands", "comands", id="top-level"),
        pytest.param(("server",), "insecure_plaintext", "server.insecure_plaintext", id="server"),
        pytest.param(("auth",), "algorithm", "auth.algorithm", id="auth"),
        pytest.param(("audit",), "file", "audit.file", id="audit"),
        pytest.param(("commands", "show"), "args", "commands.show.args", id="command"),
        pytest.param(
            ("commands", "show", "params", "p"), "regex", "commands.show.params.p.regex", id="param"
        ),
    ],
)
def test_an_unknown_key_is_an_error(
    site: Site, where: tuple[str, ...], typo: str, key_path: str
) -> None:
    doc = with_command(site, [site.tool, "{p}"], {"p": {"type": "string", "pattern": "[a-z]+"}})
    table: Doc = doc
    for key in where:
        table = table[key]
    table[typo] = "x"
    assert_config_error(site.root, doc, key_path, "unknown key")


def test_a_key_of_another_param_type_is_unknown(site: Site) -> None:
    # 'values' belongs to enum; on a string param it is a typo, not a silent no-op
    doc = with_command(
        site, [site.tool, "{p}"], {"p": {"type": "string", "pattern": "[a-z]+", "values": ["a"]}}
    )
    assert_config_error(site.root, doc, "commands.show.params.p.values", "unknown key")


# --- argv and placeholders ------------------------------------------------------------------


def test_a_placeholder_without_a_param_is_an_error(site: Site) -> None:
    doc = with_command(site, [site.tool, "--lines={n}"])
    assert_config_error(site.root, doc, "commands.show.argv", "placeholder {n} has no entry")


def test_a_param_no_placeholder_uses_is_an_error(site: Site) -> None:
    doc = with_command(site, [site.tool, "--all"], {"unused": {"type": "enum", "values": ["a"]}})
    assert_config_error(
        site.root, doc, "commands.show.params.unused", "no placeholder in argv uses this parameter"
    )


@pytest.mark.parametrize("program", ["bin/tool", "./bin/tool", "tool", "sh"])
def test_a_relative_argv0_is_an_error_even_if_it_exists_in_the_cwd(
    site: Site, monkeypatch: pytest.MonkeyPatch, program: str
) -> None:
    monkeypatch.chdir(site.root)
    make_tool(site.root)  # ./tool exists too, so only the rule can refuse it
    doc = with_command(site, [program])
    assert_config_error(site.root, doc, "commands.show.argv", "must be an absolute path")


def test_a_missing_argv_is_an_error(site: Site) -> None:
    doc = base_doc(site)
    doc["commands"]["show"] = {"description": "no argv at all"}
    assert_config_error(site.root, doc, "commands.show.argv", "is required")


def test_an_empty_argv_is_an_error(site: Site) -> None:
    doc = with_command(site, [])
    assert_config_error(site.root, doc, "commands.show.argv", "must not be empty")


@pytest.mark.parametrize("program", ["{prog}", "/usr/bin/{prog}", "{{prog}}"])
def test_a_placeholder_in_argv0_is_an_error(site: Site, program: str) -> None:
    doc = with_command(site, [program, "{prog}"], {"prog": {"type": "enum", "values": ["/bin/ls"]}})
    assert_config_error(site.root, doc, "commands.show.argv", "argv[0] must be a fixed path")


def test_argv0_must_be_an_existing_executable_file(site: Site) -> None:
    plain = site.root / "plain"
    plain.write_text("not executable\n")
    plain.chmod(0o644)
    for program in (str(site.root / "missing"), str(plain), str(site.root)):
        doc = with_command(site, [program])
        assert_config_error(site.root, doc, "commands.show.argv", "is not an existing executable")


@pytest.mark.parametrize("argument", ["}", "a}b", "{", "{n", "{}", "{1n}", "{n-x}", "{ n }"])
def test_a_stray_brace_in_an_argument_is_an_error(site: Site, argument: str) -> None:
    doc = with_command(site, [site.tool, argument])
    assert_config_error(site.root, doc, "commands.show.argv", repr(argument))


# --- command names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["-x", "a b", "a" * 65, ".hidden", "_x", "a/b", "uptime\n", "ｕｐｔｉｍｅ", "up;time"],
    ids=[
        "dash",
        "space",
        "65-chars",
        "dot",
        "underscore",
        "slash",
        "newline",
        "fullwidth",
        "semicolon",
    ],
)
def test_a_bad_command_name_is_an_error(site: Site, name: str) -> None:
    doc = with_command(site, [site.tool], name=name)
    assert_config_error(site.root, doc, f"commands.{name}", "command name must match")


@pytest.mark.parametrize("name", ["a" * 64, "disk-usage", "v1.2_x", "9lives"])
def test_good_command_names_load(site: Site, name: str) -> None:
    config = load_config(write_config(site.root, with_command(site, [site.tool], name=name)))
    assert name in config.commands


# --- params ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "key", "reason"),
    [
        pytest.param(
            {"type": "string", "pattern": "[a-"},
            "pattern",
            "bad regular expression",
            id="bad-regex",
        ),
        pytest.param({"type": "string"}, "pattern", "is required", id="string-without-pattern"),
        pytest.param(
            {"type": "string", "pattern": "[a-z]+", "required": True, "default": "abc"},
            "required",
            "cannot be true when a default is given",
            id="required-with-default",
        ),
        pytest.param(
            {"type": "int", "max": 5},
            "min",
            "negative values need allow_leading_dash",
            id="int-without-min",
        ),
        pytest.param(
            {"type": "int", "min": -1, "max": 5},
            "min",
            "negative values need allow_leading_dash",
            id="int-negative-min",
        ),
        pytest.param(
            {"type": "int", "min": 5, "max": 1},
            "min",
            "must not be greater than max",
            id="int-min-over-max",
        ),
        pytest.param(
            {"type": "string", "pattern": "[a-z]+", "default": "ABC"},
            "default",
            "is not a valid value",
            id="default-fails-pattern",
        ),
        pytest.param(
            {"type": "int", "min": 0, "max": 10, "default": "11"},
            "default",
            "is not a valid value",
            id="default-over-max",
        ),
        pytest.param(
            {"type": "int", "min": 0, "default": "１２"},
            "default",
            "is not a valid value",
            id="default-fullwidth-digits",
        ),
        pytest.param(
            {"type": "enum", "values": ["a", "b"], "default": "c"},
            "default",
            "is not a valid value",
            id="default-not-in-enum",
        ),
        pytest.param(
            {"type": "string", "pattern": ".*", "default": "-rf"},
            "default",
            "is not a valid value",
            id="default-leading-dash",
        ),
        pytest.param(
            {"type": "enum", "values": []}, "values", "must not be empty", id="enum-empty"
        ),
        pytest.param(
            {"type": "path", "under": ["srv"]},
            "under",
            "must be an absolute, normalised path",
            id="path-relative-root",
        ),
        pytest.param({"type": "float"}, "type", "is not one of", id="unknown-type"),
        pytest.param(
            {"type": "string", "pattern": "x", "max_length": 0},
            "max_length",
            "must be at least 1",
            id="max-length-zero",
        ),
    ],
)
def test_a_bad_param_is_an_error(site: Site, param: Doc, key: str, reason: str) -> None:
    doc = with_command(site, [site.tool, "--", "{p}"], {"p": param})
    assert_config_error(site.root, doc, f"commands.show.params.p.{key}", reason)


def test_an_int_param_without_min_loads_when_leading_dash_is_allowed(site: Site) -> None:
    doc = with_command(
        site, [site.tool, "--", "{n}"], {"n": {"type": "int", "allow_leading_dash": True}}
    )
    spec = load_config(write_config(site.root, doc)).commands["show"].params["n"]
    assert spec.min is None
    assert spec.validate("-3") == "-3"


# --- server ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen",
    [
        "0.0.0.0:7443",
        "192.0.2.10:7443",
        "[::]:7443",
        "host.example:7443",
        "127.0.0.1.nip.io:7443",
        "localhost.localdomain:7443",
    ],
)
def test_insecure_is_refused_on_a_non_loopback_address(site: Site, listen: str) -> None:
    doc = base_doc(site)
    doc["server"]["listen"] = listen
    assert_config_error(site.root, doc, "server.insecure", "plaintext is refused on non-loopback")


@pytest.mark.parametrize(
    ("listen", "host"),
    [
        ("127.0.0.1:17443", "127.0.0.1"),
        ("127.1.2.3:7443", "127.1.2.3"),
        ("[::1]:7443", "::1"),
        ("localhost:7443", "localhost"),
    ],
)
def test_insecure_on_loopback_loads(site: Site, listen: str, host: str) -> None:
    doc = base_doc(site)
    doc["server"]["listen"] = listen
    server = load_config(write_config(site.root, doc)).server
    assert server.insecure is True
    assert server.listen_host == host
    assert server.tls_cert_pem is None


def test_without_insecure_tls_is_required(site: Site) -> None:
    doc = base_doc(site)
    doc["server"] = {}
    assert_config_error(site.root, doc, "server.tls_cert", "is required unless insecure = true")


# --- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithms", "refused"),
    [
        (["none"], "none"),
        (["EdDSA", "none"], "none"),
        (["HS256"], "HS256"),
        (["EdDSA", "HS256"], "HS256"),
        (["eddsa"], "eddsa"),
    ],
)
def test_symmetric_and_none_algorithms_are_refused(
    site: Site, algorithms: list[str], refused: str
) -> None:
    doc = base_doc(site)
    doc["auth"]["algorithms"] = algorithms
    assert_config_error(site.root, doc, "auth.algorithms", f"{refused!r} is not allowed")


@pytest.mark.parametrize(
    ("leeway", "reason"),
    [
        (61, "must be at most 60"),
        (-1, "must be at least 0"),
        (True, "must be an integer"),
        (1.5, "must be an integer"),
    ],
)
def test_a_bad_leeway_is_refused(site: Site, leeway: object, reason: str) -> None:
    doc = base_doc(site)
    doc["auth"]["leeway_seconds"] = leeway
    assert_config_error(site.root, doc, "auth.leeway_seconds", reason)


def test_a_leeway_of_60_is_the_most_allowed(site: Site) -> None:
    doc = base_doc(site)
    doc["auth"]["leeway_seconds"] = 60
    assert load_config(write_config(site.root, doc)).auth.leeway_seconds == 60


def test_a_missing_jwks_file_is_an_error(site: Site) -> None:
    doc = base_doc(site)
    doc["auth"]["jwks_file"] = str(site.root / "missing.json")
    assert_config_error(site.root, doc, "auth.jwks_file", "cannot read")


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        pytest.param({"keys": []}, "has no signing key", id="empty"),
        pytest.param({}, "has no 'keys' list", id="no-keys-list"),
        pytest.param([], "has no 'keys' list", id="not-an-object"),
        # keys PyJWT will not take: an error naming the key, not a traceback
        pytest.param(
            {"keys": [{"kid": "k", "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "x": "!!"}]},
            "kid 'k'",
            id="bad-coordinates",
        ),
        pytest.param(
            {"keys": [{"kid": "k", "kty": "EC", "crv": "Ed25519", "alg": "EdDSA", "x": "AA"}]},
            "kid 'k'",
            id="wrong-kty-for-alg",
        ),
        pytest.param(
            {"keys": [{"kid": "k", "kty": "OKP", "crv": "Ed25519", "alg": ["EdDSA"]}]},
            "an 'alg' (a string)",
            id="alg-not-a-string",
        ),
    ],
)
def test_a_jwks_with_no_usable_key_is_an_error(site: Site, document: object, reason: str) -> None:
    jwks = site.root / "other.json"
    jwks.write_text(json.dumps(document))
    doc = base_doc(site)
    doc["auth"]["jwks_file"] = str(jwks)
    assert_config_error(site.root, doc, "auth.jwks_file", reason)


def test_a_jwks_whose_keys_are_all_for_other_algorithms_is_an_error(site: Site) -> None:
    # the site key is EdDSA: with only ES256 allowed, no key can be used
    doc = base_doc(site)
    doc["auth"]["algorithms"] = ["ES256"]
    assert_config_error(site.root, doc, "auth.jwks_file", "has no signing key")


def test_a_jwks_whose_keys_are_all_for_encryption_is_an_error(site: Site) -> None:
    document = json.loads(site.jwks.read_text())
    for key in document["keys"]:
        key["use"] = "enc"
    jwks = site.root / "enc.json"
    jwks.write_text(json.dumps(document))
    doc = base_doc(site)
    doc["auth"]["jwks_file"] = str(jwks)
    assert_config_error(site.root, doc, "auth.jwks_file", "has no signing key")


def test_not_json_jwks_is_an_error(site: Site) -> None:
    jwks = site.root / "broken.json"
    jwks.write_text("{not json")
    doc = base_doc(site)
    doc["auth"]["jwks_file"] = str(jwks)
    assert_config_error(site.root, doc, "auth.jwks_file", "is not JSON")


# --- relative paths -------------------------------------------------------------------------


@pytest.mark.parametrize("load_by", ["absolute", "relative"])
def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_by: str
) -> None:
    etc = tmp_path / "etc"
    _, _, kid = keygen(etc / "keys", "EdDSA", kid="etc-key")
    (etc / "tls").mkdir()
    (etc / "tls" / "cert.pem").write_bytes(b"etc cert")
    (etc / "tls" / "key.pem").write_bytes(b"etc key")
    # decoys at the same relative paths under the cwd: a cwd-relative lookup would load these
    cwd = tmp_path / "cwd"
    keygen(cwd / "keys", "EdDSA", kid="cwd-key")
    (cwd / "tls").mkdir()
    (cwd / "tls" / "cert.pem").write_bytes(b"cwd cert")
    (cwd / "tls" / "key.pem").write_bytes(b"cwd key")
    doc: Doc = {
        "server": {"tls_cert": "tls/cert.pem", "tls_key": "tls/key.pem"},
        "auth": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "keys/jwks.json"},
        "audit": {"path": "log/audit.jsonl"},
        "commands": {"uptime": {"argv": [make_tool(tmp_path / "bin")]}},
    }
    config_path = write_config(etc, doc)
    monkeypatch.chdir(cwd)
    relative = Path("..") / "etc" / "agent.toml"
    config = load_config(config_path if load_by == "absolute" else relative)
    assert list(config.auth.keys) == [kid]
    assert config.server.tls_cert_pem == b"etc cert"
    assert config.server.tls_key_pem == b"etc key"
    assert config.audit.path == etc.resolve() / "log" / "audit.jsonl"
    assert config.audit.path.is_absolute()


def test_an_optional_value_right_after_its_flag_is_refused(site: Site) -> None:
    # left out, {lines} would vanish and "-n" would take "--" as its value
    doc = with_command(
        site,
        [site.tool, "-n", "{lines}", "--"],
        {"lines": {"type": "int", "min": 1, "required": False}},
    )
    assert_config_error(site.root, doc, "commands.show.argv", "follows the flag '-n'")


def test_an_optional_value_joined_to_its_flag_loads(site: Site) -> None:
    doc = with_command(
        site,
        [site.tool, "--lines={lines}"],
        {"lines": {"type": "int", "min": 1, "required": False}},
    )
    template = load_config(write_config(site.root, doc)).commands["show"]
    assert template.render({}).argv == (site.tool,)
    assert template.render({"lines": "5"}).argv == (site.tool, "--lines=5")


def test_an_int_default_may_be_a_toml_integer(site: Site) -> None:
    doc = with_command(site, [site.tool, "{n}"], {"n": {"type": "int", "min": 0, "default": 20}})
    template = load_config(write_config(site.root, doc)).commands["show"]
    assert template.render({}).argv == (site.tool, "20")


def test_patterns_are_ascii(site: Site) -> None:
    doc = with_command(site, [site.tool, "{n}"], {"n": {"type": "string", "pattern": r"\d+"}})
    spec = load_config(write_config(site.root, doc)).commands["show"].params["n"]
    assert spec.validate("12") == "12"
    with pytest.raises(InvalidParameters):
        spec.validate("１２")


def test_a_revocation_file_must_be_readable_and_well_formed(site: Site) -> None:
    bad = site.root / "revoked.txt"
    bad.write_text("jti:ok\nalice\n")
    doc = base_doc(site)
    doc["auth"]["revoked_file"] = str(bad)
    assert_config_error(site.root, doc, "auth.revoked_file", f"{bad}:2: write 'jti:<value>'")
    doc["auth"]["revoked_file"] = str(site.root / "missing.txt")
    assert_config_error(site.root, doc, "auth.revoked_file", "No such file")
