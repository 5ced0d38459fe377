"""Command templates: a fixed argv with typed, validated parameters.

A template is parsed once at load time into a ``CommandTemplate``; a request's
parameters are then validated and rendered into a ``RenderedArgv`` in which
each placeholder became exactly one argv element, or part of one. Nothing here
ever goes near a shell.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import re
import stat
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field

from cmdgate.agent.errors import InvalidParameters

COMMAND_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PARAM_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
DEFAULT_MAX_LENGTH = 256
DEFAULT_TIMEOUT_SECONDS = 60.0
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
# The child's PATH when the template sets none; argv[0] is absolute anyway,
# this only serves programs that themselves run others.
DEFAULT_CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_CHILD_LANG = "C.UTF-8"
# ASCII digits only: int() alone accepts '１２', '1_000' and ' 12 '.
_INT_PATTERN = re.compile(r"-?[0-9]+", re.ASCII)


class ParamType(enum.Enum):
    STRING = "string"
    ENUM = "enum"
    INT = "int"
    PATH = "path"


@dataclass(frozen=True)
class ParamSpec:
    """One typed parameter of a template, as loaded and checked."""

    name: str
    type: ParamType
    required: bool
    default: str | None
    max_length: int
    allow_leading_dash: bool
    pattern: re.Pattern[str] | None = None
    values: tuple[str, ...] = ()
    min: int | None = None
    max: int | None = None
    under: tuple[str, ...] = ()
    # The value never reaches the audit log or any log: only its SHA-256 does.
    secret: bool = False

    def validate(self, value: str) -> str:
        """Return the value to put in argv, or raise ``InvalidParameters`` naming the rule."""
        if len(value) > self.max_length:
            raise self._invalid(f"longer than max_length {self.max_length}")
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise self._invalid("contains a NUL or control character")
        # reject a leading '-': option injection, e.g. tar --checkpoint-action=exec=...
        if value.startswith("-") and not self.allow_leading_dash:
            raise self._invalid("starts with '-' (allow_leading_dash is false)")
        match self.type:
            case ParamType.STRING:
                assert self.pattern is not None
                if self.pattern.fullmatch(value) is None:
                    raise self._invalid(f"does not match pattern {self.pattern.pattern!r}")
                return value
            case ParamType.ENUM:
                if value not in self.values:
                    raise self._invalid(f"must be one of {list(self.values)}")
                return value
            case ParamType.INT:
                return self._validate_int(value)
            case ParamType.PATH:
                return self._validate_path(value)

    def _validate_int(self, value: str) -> str:
        if _INT_PATTERN.fullmatch(value) is None:
            raise self._invalid("must be ASCII digits with an optional leading '-'")
        try:
            number = int(value)
        except ValueError:
            # more digits than int() converts (sys.get_int_max_str_digits)
            raise self._invalid("has too many digits") from None
        if self.min is not None and number < self.min:
            raise self._invalid(f"must be >= {self.min}")
        if self.max is not None and number > self.max:
            raise self._invalid(f"must be <= {self.max}")
        return str(number)

    def _validate_path(self, value: str) -> str:
        if not value.startswith("/"):
            raise self._invalid("must be an absolute path")
        # normpath keeps a leading '//' (POSIX allows it to mean something else)
        if os.path.normpath(value) != value or value.startswith("//"):
            raise self._invalid("must be normalised (no '.', '..', '//' or trailing '/')")
        resolved = os.path.realpath(value)
        for root in self.under:
            if resolved == root or resolved.startswith(root.rstrip("/") + "/"):
                self._refuse_swappable(resolved)
                return resolved
        raise self._invalid(f"must stay under {list(self.under)} after resolving symlinks")

    def _refuse_swappable(self, resolved: str) -> None:
        """Refuse a path that someone else could swap for a symlink.

        The check above holds at this moment only: whoever may rename entries in a
        folder on the way could swap a symlink in before the command opens the path
        (a time-of-check to time-of-use race). So every folder from / down to the
        path's own folder must be writable by root or the agent alone, or be sticky
        (like /tmp) with the entry below it owned by root or the agent.
        """
        child = resolved
        while child != "/":
            folder = os.path.dirname(child)
            try:
                st = os.lstat(folder)
            except OSError:
                raise self._invalid(f"folder {folder} cannot be examined") from None
            trusted = (0, os.geteuid())
            if st.st_mode & 0o022 or st.st_uid not in trusted:
                sticky = st.st_mode & stat.S_ISVTX and st.st_uid in trusted
                try:
                    protected = sticky and os.lstat(child).st_uid in trusted
                except OSError:
                    protected = False
                if not protected:
                    raise self._invalid(
                        f"{child} is in folder {folder}, which others may write, "
                        "so it could be swapped for a symlink"
                    )
            child = folder

    def _invalid(self, rule: str) -> InvalidParameters:
        return InvalidParameters("PARAM_INVALID", f"parameter {self.name!r}: {rule}")


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class Placeholder:
    name: str


ArgPart = Literal | Placeholder


@dataclass(frozen=True)
class ArgTemplate:
    """One argv element: literal text and placeholders, joined into one string."""

    parts: tuple[ArgPart, ...]

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        """The parameters it uses (worked out once: every render asks)."""
        return tuple(p.name for p in self.parts if isinstance(p, Placeholder))

    def __str__(self) -> str:
        """The element as written in the config file."""
        return "".join(
            p.text.replace("{", "{{").replace("}", "}}")
            if isinstance(p, Literal)
            else f"{{{p.name}}}"
            for p in self.parts
        )


def parse_arg_template(text: str) -> ArgTemplate:
    """Split ``--lines={n}`` into literal and placeholder parts; ``{{`` and ``}}`` are braces.

    Raises ValueError with the reason for a stray brace or a bad placeholder name.
    """
    parts: list[ArgPart] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in "{}" and text.startswith(c * 2, i):
            literal.append(c)
            i += 2
        elif c == "{":
            end = text.find("}", i)
            if end < 0:
                raise ValueError(f"unclosed '{{' in {text!r}")
            name = text[i + 1 : end]
            if not PARAM_NAME_PATTERN.fullmatch(name):
                raise ValueError(f"bad placeholder {{{name}}} in {text!r}")
            if literal:
                parts.append(Literal("".join(literal)))
                literal = []
            parts.append(Placeholder(name))
            i = end + 1
        elif c == "}":
            raise ValueError(f"single '}}' in {text!r} (write '}}}}' for a literal brace)")
        else:
            literal.append(c)
            i += 1
    if literal:
        parts.append(Literal("".join(literal)))
    return ArgTemplate(tuple(parts))


RenderedArgv = tuple[str, ...]


@dataclass(frozen=True)
class Limits:
    """A template's resource limits for its run's cgroup; None leaves one unlimited."""

    pids: int | None = None
    memory_bytes: int | None = None
    cpu_percent: int | None = None  # of one CPU: 50 is half a CPU, 200 is two


@dataclass(frozen=True)
class RunAs:
    """The user a template's command runs as, resolved at load time."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


@dataclass(frozen=True)
class RenderedCommand:
    """The argv to run, and the same argv as the audit may show it (secrets hashed)."""

    argv: RenderedArgv
    audit_argv: RenderedArgv


def secret_digest(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class CommandTemplate:
    """A host-allowlisted command, frozen at load time."""

    name: str
    description: str
    executable: str
    args: tuple[ArgTemplate, ...]
    params: Mapping[str, ParamSpec]
    env: Mapping[str, str]
    cwd: str
    timeout_seconds: float
    max_output_bytes: int
    # SHA-256 of the template as loaded, so audit records name exactly what ran.
    sha256: str = field(default="")
    run_as: RunAs | None = None
    limits: Limits = field(default_factory=Limits)

    def render(self, request_params: Mapping[str, str]) -> RenderedCommand:
        """Validate ``request_params`` and build the argv, or raise ``InvalidParameters``.

        An optional parameter with no default that the request leaves out
        removes the argv elements that use it.
        """
        unknown = sorted(set(request_params) - set(self.params))
        if unknown:
            names = ", ".join(repr(name[:64]) for name in unknown[:8])
            raise InvalidParameters("PARAM_UNKNOWN", f"unknown parameter(s): {names}")
        values: dict[str, str] = {}
        for name, spec in self.params.items():
            if name in request_params:
                values[name] = spec.validate(request_params[name])
            elif spec.default is not None:
                values[name] = spec.validate(spec.default)
            elif spec.required:
                raise InvalidParameters("PARAM_MISSING", f"parameter {name!r} is required")
        return RenderedCommand(self._build(values), self._build(self.redact(values)))

    def _build(self, values: Mapping[str, str]) -> RenderedArgv:
        argv = [self.executable]
        for arg in self.args:
            if all(n in values for n in arg.names):
                argv.append(
                    "".join(p.text if isinstance(p, Literal) else values[p.name] for p in arg.parts)
                )
        return tuple(argv)

    def redact(self, request_params: Mapping[str, str]) -> dict[str, str]:
        """The request's parameters as the audit may show them: secret values hashed."""
        return {
            name: secret_digest(value)
            if name in self.params and self.params[name].secret
            else value
            for name, value in request_params.items()
        }

    def child_env(self) -> dict[str, str]:
        """The child's whole environment: a minimal PATH and LANG (and HOME and USER of
        ``run_as``), then the template's env."""
        env = {"PATH": DEFAULT_CHILD_PATH, "LANG": DEFAULT_CHILD_LANG}
        if self.run_as is not None:
            env.update(HOME=self.run_as.home, USER=self.run_as.user, LOGNAME=self.run_as.user)
        return {**env, **self.env}


def template_digest(raw: Mapping[str, object]) -> str:
    """SHA-256 over the template's canonical JSON as loaded from the file."""
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
