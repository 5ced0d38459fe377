"""Templates: placeholder parsing, each parameter type's rules, and rendering to argv."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmdgate.agent.errors import InvalidParameters
from cmdgate.agent.templates import (
    DEFAULT_MAX_LENGTH,
    ArgTemplate,
    CommandTemplate,
    Literal,
    ParamSpec,
    ParamType,
    Placeholder,
    parse_arg_template,
)

# --- building specs and templates directly --------------------------------------------------


def string_param(
    name: str = "p",
    pattern: str = "[a-z]+",
    *,
    allow_dash: bool = False,
    max_length: int = DEFAULT_MAX_LENGTH,
    required: bool = True,
    default: str | None = None,
) -> ParamSpec:
    return ParamSpec(
        name=name,
        type=ParamType.STRING,
        required=required,
        default=default,
        max_length=max_length,
        allow_leading_dash=allow_dash,
        pattern=re.compile(pattern),
    )


def enum_param(
    name: str = "p",
    values: Sequence[str] = ("start", "stop"),
    *,
    allow_dash: bool = False,
    required: bool = True,
    default: str | None = None,
) -> ParamSpec:
    return ParamSpec(
        name=name,
        type=ParamType.ENUM,
        required=required,
        default=default,
        max_length=DEFAULT_MAX_LENGTH,
        allow_leading_dash=allow_dash,
        values=tuple(values),
    )


def int_param(
    name: str = "n",
    low: int | None = 0,
    high: int | None = None,
    *,
    allow_dash: bool = False,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> ParamSpec:
    return ParamSpec(
        name=name,
        type=ParamType.INT,
        required=True,
        default=None,
        max_length=max_length,
        allow_leading_dash=allow_dash,
        min=low,
        max=high,
    )


def path_param(under: Sequence[Path | str], name: str = "path") -> ParamSpec:
    # load_config resolves the roots; do the same here
    return ParamSpec(
        name=name,
        type=ParamType.PATH,
        required=True,
        default=None,
        max_length=4096,
        allow_leading_dash=False,
        under=tuple(os.path.realpath(r) for r in under),
    )


def template(argv: Sequence[str], *params: ParamSpec) -> CommandTemplate:
    return CommandTemplate(
        name="t",
        description="",
        executable=argv[0],
        args=tuple(parse_arg_template(a) for a in argv[1:]),
        params=MappingProxyType({p.name: p for p in params}),
        env=MappingProxyType({}),
        cwd="/",
        timeout_seconds=10.0,
        max_output_bytes=1024,
    )


def assert_invalid(spec: ParamSpec, value: str, rule: str) -> None:
    """``value`` is refused with PARAM_INVALID, by the rule whose text contains ``rule``."""
    with pytest.raises(InvalidParameters) as info:
        spec.validate(value)
    assert info.value.reason == "PARAM_INVALID"
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(spec.name) in info.value.detail
    assert rule in info.value.detail, info.value.detail


# --- placeholder parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("plain", (Literal("plain"),)),
        ("{n}", (Placeholder("n"),)),
        ("--lines={n}", (Literal("--lines="), Placeholder("n"))),
        ("{a}:{b}", (Placeholder("a"), Literal(":"), Placeholder("b"))),
        ("{{n}}", (Literal("{n}"),)),
        ("{{{n}}}", (Literal("{"), Placeholder("n"), Literal("}"))),
        ("--fmt={{}}", (Literal("--fmt={}"),)),
        ("{_x9}", (Placeholder("_x9"),)),
        ("", ()),
    ],
)
def test_parse_arg_template(text: str, parts: tuple[Literal | Placeholder, ...]) -> None:
    assert parse_arg_template(text) == ArgTemplate(parts)


@pytest.mark.parametrize(
    "text",
    [
        "}",
        "a}b",
        "{",
        "--lines={n",
        "{}",
        "{1n}",
        "{n-x}",
        "{ n }",
        "{n}}",
        "{{n}",
        "}}}",
        "{a{b}",
        "{ｎ}",
    ],
)
def test_stray_braces_and_bad_names_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_arg_template(text)


def test_a_placeholder_inside_an_argument_renders_as_one_element() -> None:
    tail = template(["/usr/bin/tail", "--lines={n}", "--", "/var/log/syslog"], int_param("n"))
    assert tail.render({"n": "20"}).argv == ("/usr/bin/tail", "--lines=20", "--", "/var/log/syslog")


def test_literal_braces_render_as_braces() -> None:
    find = template(
        ["/usr/bin/find", "/srv", "-name", "{name}", "-printf", "{{%p}}\\n"],
        string_param("name", "[a-z.]+"),
    )
    assert find.render({"name": "x.log"}).argv == (
        "/usr/bin/find",
        "/srv",
        "-name",
        "x.log",
        "-printf",
        "{%p}\\n",
    )


# --- string ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["abc\n", "abc;touch x", "abc def", "ABC", "abcD", "Dabc", "", "abc\u2028", "ａｂｃ"]
)
def test_string_pattern_must_match_the_whole_value(value: str) -> None:
    with pytest.raises(InvalidParameters) as info:
        string_param(pattern="[a-z]+").validate(value)
    assert info.value.reason == "PARAM_INVALID"


def test_string_pattern_is_a_full_match_not_a_prefix_match() -> None:
    # re.match('a|b', 'ab') matches 'a'; only a full match refuses it
    assert_invalid(string_param(pattern="a|b"), "ab", "does not match pattern")
    assert_invalid(string_param(pattern="[a-z]+"), "abc;touch x", "does not match pattern")
    assert string_param(pattern="a|b").validate("b") == "b"


def test_string_value_is_returned_verbatim() -> None:
    assert string_param(pattern=r"[\w .]+").validate("my file.txt") == "my file.txt"


def test_max_length_counts_characters() -> None:
    spec = string_param(pattern=".*", max_length=5)
    assert spec.validate("abcde") == "abcde"
    assert_invalid(spec, "abcdef", "longer than max_length 5")


# --- enum -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["Start", "START", "start ", " start", "star", "startstop", "ｓｔａｒｔ", "start\u200b", ""],
)
def test_enum_is_an_exact_match(value: str) -> None:
    assert_invalid(enum_param(values=("start", "stop")), value, "must be one of")


def test_enum_accepts_its_values() -> None:
    assert enum_param(values=("start", "stop")).validate("stop") == "stop"


# --- int ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["１２", "1_000", " 12", "12 ", "+5", "0x10", "1.0", "1e3", "٣", "²", "", "1 2", "12\u200b"],
)
def test_int_is_ascii_digits_only(value: str) -> None:
    assert_invalid(int_param(), value, "must be ASCII digits")


@pytest.mark.parametrize(("value", "argv_value"), [("0", "0"), ("12", "12"), ("007", "7")])
def test_int_is_rendered_as_its_canonical_form(value: str, argv_value: str) -> None:
    assert int_param().validate(value) == argv_value


def test_int_min_and_max_are_inclusive() -> None:
    spec = int_param(low=1, high=10)
    assert spec.validate("1") == "1"
    assert spec.validate("10") == "10"
    assert_invalid(spec, "0", "must be >= 1")
    assert_invalid(spec, "11", "must be <= 10")
    assert_invalid(spec, "99999999999999999999999", "must be <= 10")


def test_a_negative_int_needs_allow_leading_dash() -> None:
    assert_invalid(int_param(low=-5, high=5), "-1", "starts with '-'")
    allowed = int_param(low=-5, high=5, allow_dash=True)
    assert allowed.validate("-5") == "-5"
    assert allowed.validate("-0") == "0"
    assert_invalid(allowed, "-6", "must be >= -5")
    assert_invalid(allowed, "--5", "must be ASCII digits")


def test_an_int_with_more_digits_than_int_accepts_is_invalid_not_a_crash() -> None:
    # config allows max_length up to 65536, so such a value can reach validate()
    assert_invalid(int_param(low=0, high=10, max_length=65536), "1" * 5000, "too many digits")


# digits of several scripts, signs, separators and spaces: what int() would take, and more
_INTISH = st.text(alphabet="0123456789-+_ ١٢３٤\u0660\u06f1\u0966", max_size=12)


@given(_INTISH)
def test_any_accepted_int_is_ascii_digits(value: str) -> None:
    spec = int_param(low=None, allow_dash=True)
    plain = re.fullmatch(r"-?[0-9]+", value, re.ASCII) is not None
    if plain:
        # every plain ASCII number is accepted, as its canonical decimal
        assert spec.validate(value) == str(int(value))
    else:
        with pytest.raises(InvalidParameters):
            spec.validate(value)


# --- path -----------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``root/`` with a file, a symlink inside, and symlinks that escape to ``outside/``."""
    root = tmp_path / "root"
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "app.log").write_text("inside\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("outside\n")
    (tmp_path / "root-evil").mkdir()
    (tmp_path / "root-evil" / "x").write_text("sibling\n")
    (root / "escape").symlink_to(outside)
    (root / "escape-file").symlink_to(outside / "secret")
    (root / "current.log").symlink_to(root / "logs" / "app.log")
    return Path(os.path.realpath(tmp_path))


def test_a_path_inside_its_root_is_accepted(tree: Path) -> None:
    spec = path_param([tree / "root"])
    value = str(tree / "root" / "logs" / "app.log")
    assert spec.validate(value) == value
    assert spec.validate(str(tree / "root")) == str(tree / "root")


def test_a_symlink_inside_the_root_renders_as_its_target(tree: Path) -> None:
    spec = path_param([tree / "root"])
    assert spec.validate(str(tree / "root" / "current.log")) == str(tree / "root/logs/app.log")


@pytest.mark.parametrize("inside", ["escape/secret", "escape-file", "escape"])
def test_a_symlink_out_of_the_root_is_rejected(tree: Path, inside: str) -> None:
    value = str(tree / "root" / inside)
    assert_invalid(path_param([tree / "root"]), value, "must stay under")


def test_a_sibling_sharing_the_roots_prefix_is_rejected(tree: Path) -> None:
    assert_invalid(path_param([tree / "root"]), str(tree / "root-evil" / "x"), "must stay under")


@pytest.mark.parametrize(
    "suffix",
    [
        "/../outside/secret",
        "/logs/../logs/app.log",
        "/./logs/app.log",
        "//logs/app.log",
        "/logs/",
        "/logs/.",
    ],
)
def test_a_path_must_be_normalised(tree: Path, suffix: str) -> None:
    assert_invalid(path_param([tree / "root"]), f"{tree / 'root'}{suffix}", "must be normalised")


def test_a_path_with_a_leading_double_slash_is_rejected(tree: Path) -> None:
    assert_invalid(path_param([tree / "root"]), f"/{tree / 'root'}/logs", "must be normalised")


@pytest.mark.parametrize("value", ["logs/app.log", "./logs", "~/x", "", "-rf"])
def test_a_path_must_be_absolute(tree: Path, value: str) -> None:
    with pytest.raises(InvalidParameters) as info:
        path_param([tree / "root"]).validate(value)
    assert info.value.reason == "PARAM_INVALID"


def test_a_path_outside_every_root_is_rejected(tree: Path) -> None:
    spec = path_param([tree / "root" / "logs", tree / "outside"])
    assert spec.validate(str(tree / "outside" / "secret")) == str(tree / "outside" / "secret")
    assert_invalid(spec, "/etc/passwd", "must stay under")
    assert_invalid(spec, "/", "must stay under")


# --- rules shared by every type -------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [string_param(pattern=".*"), enum_param(values=("-rf", "x")), string_param(pattern="-.*")],
    ids=["string", "enum", "pattern-allows-dash"],
)
def test_a_leading_dash_is_refused_unless_allowed(spec: ParamSpec) -> None:
    assert_invalid(spec, "-rf", "starts with '-'")


def test_a_leading_dash_is_accepted_when_allowed() -> None:
    assert string_param(pattern=".*", allow_dash=True).validate("--verbose") == "--verbose"


@pytest.mark.parametrize(
    "value",
    ["a\x00b", "\x00", "a\x1b[2J", "a\rb", "\t", "a\x7f", "a\x85", "x\x9b31m"],
    ids=["nul", "only-nul", "escape", "cr", "tab", "del", "nel", "csi"],
)
def test_nul_and_control_characters_are_refused(value: str) -> None:
    assert_invalid(string_param(pattern="(?s).*", allow_dash=True), value, "control character")


# --- render ---------------------------------------------------------------------------------

METACHARACTERS = [
    "a b",
    "$(touch /tmp/pwned)",
    "`id`",
    "; rm -rf /",
    "a && b",
    "| cat /etc/passwd",
    "> /etc/passwd",
    "'\"",
    "*",
    "~root",
    "${IFS}",
    "\\",
    "a\u00a0b",
    "x=1 y=2",
]


@pytest.mark.parametrize("value", METACHARACTERS)
def test_a_value_with_spaces_or_shell_metacharacters_is_one_argv_element(value: str) -> None:
    echo = template(["/bin/echo", "--", "{msg}"], string_param("msg", ".*"))
    assert echo.render({"msg": value}).argv == ("/bin/echo", "--", value)


def test_several_placeholders_in_one_argument_stay_one_element() -> None:
    ssh = template(
        ["/usr/bin/printf", "%s\\n", "{user}@{host}"],
        string_param("user", ".*"),
        string_param("host", ".*"),
    )
    assert ssh.render({"user": "a b", "host": "c;d"}).argv == (
        "/usr/bin/printf",
        "%s\\n",
        "a b@c;d",
    )


def test_an_optional_param_without_default_drops_its_element() -> None:
    ls = template(
        ["/bin/ls", "-l", "--sort={sort}", "--", "{dir}"],
        enum_param("sort", ("size", "time"), required=False),
        string_param("dir", "/[a-z/]+"),
    )
    assert ls.render({"dir": "/srv"}).argv == ("/bin/ls", "-l", "--", "/srv")
    assert ls.render({"dir": "/srv", "sort": "size"}).argv == (
        "/bin/ls",
        "-l",
        "--sort=size",
        "--",
        "/srv",
    )


def test_an_optional_param_with_a_default_uses_it() -> None:
    journal = template(
        ["/bin/journalctl", "--lines={n}"],
        ParamSpec("n", ParamType.INT, False, "10", DEFAULT_MAX_LENGTH, False, min=1, max=1000),
    )
    assert journal.render({}).argv == ("/bin/journalctl", "--lines=10")
    assert journal.render({"n": "5"}).argv == ("/bin/journalctl", "--lines=5")


def test_an_unknown_param_is_refused() -> None:
    echo = template(["/bin/echo", "{msg}"], string_param("msg"))
    with pytest.raises(InvalidParameters) as info:
        echo.render({"msg": "hi", "extra": "x"})
    assert info.value.reason == "PARAM_UNKNOWN"
    assert "extra" in info.value.detail


def test_a_missing_required_param_is_refused() -> None:
    echo = template(["/bin/echo", "{msg}"], string_param("msg"))
    with pytest.raises(InvalidParameters) as info:
        echo.render({})
    assert info.value.reason == "PARAM_MISSING"
    assert "'msg'" in info.value.detail


def test_an_invalid_value_is_refused_when_rendering() -> None:
    echo = template(["/bin/echo", "{msg}"], string_param("msg"))
    with pytest.raises(InvalidParameters) as info:
        echo.render({"msg": "-n"})
    assert info.value.reason == "PARAM_INVALID"


def test_a_path_renders_resolved(tree: Path) -> None:
    cat = template(["/bin/cat", "--", "{path}"], path_param([tree / "root"]))
    argv = cat.render({"path": str(tree / "root" / "current.log")}).argv
    assert argv == ("/bin/cat", "--", str(tree / "root" / "logs" / "app.log"))


# --- properties -----------------------------------------------------------------------------

# Everything that is not a control character; `.` matches all of it.
printable_text = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=64)
control_character = st.characters(categories=["Cc"])


@given(a=printable_text, b=printable_text)
def test_each_value_renders_verbatim_as_its_own_element(a: str, b: str) -> None:
    echo = template(
        ["/bin/echo", "{a}", "--", "{b}", "{{a}}"],
        string_param("a", ".*", allow_dash=True),
        string_param("b", ".*", allow_dash=True),
    )
    argv = echo.render({"a": a, "b": b}).argv
    assert len(argv) == 1 + len(echo.args)
    assert argv == ("/bin/echo", a, "--", b, "{a}")


@given(before=st.text(max_size=32), control=control_character, after=st.text(max_size=32))
def test_validate_never_accepts_a_control_character(before: str, control: str, after: str) -> None:
    value = before + control + after
    specs = [
        string_param(pattern="(?s).*", allow_dash=True, max_length=65536),
        enum_param(values=(value,), allow_dash=True),
        path_param(["/"]),
    ]
    for spec in specs:
        assert_invalid(
            spec, value if spec.type is not ParamType.PATH else "/" + value, "control character"
        )
