"""Gate 2, the pure decision: exact names, a typed claim, and the host's allowlist."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import grpc
import pytest

from cmdgate.agent.decision import decide, permitted_commands
from cmdgate.agent.errors import NotPermitted
from cmdgate.agent.templates import CommandTemplate

CLAIM = "cmds"


def command(name: str) -> CommandTemplate:
    return CommandTemplate(
        name=name,
        description=f"the {name} command",
        executable=f"/usr/bin/{name}",
        args=(),
        params=MappingProxyType({}),
        env=MappingProxyType({}),
        cwd="/",
        timeout_seconds=10.0,
        max_output_bytes=1024,
    )


ALLOWLIST: Mapping[str, CommandTemplate] = MappingProxyType(
    {name: command(name) for name in ("uptime", "df", "free")}
)


def denial(
    claims: Mapping[str, Any], name: str, allowlist: Mapping[str, CommandTemplate] = ALLOWLIST
) -> NotPermitted:
    decision = decide(claims, name, allowlist, CLAIM)
    assert not decision.allowed
    assert decision.template is None
    assert decision.denial is not None
    return decision.denial


def test_an_exact_name_in_both_token_and_allowlist_is_allowed() -> None:
    decision = decide({CLAIM: ["df", "uptime"]}, "uptime", ALLOWLIST, CLAIM)
    assert decision.allowed
    assert decision.template is ALLOWLIST["uptime"]
    assert decision.denial is None


@pytest.mark.parametrize(
    "requested",
    [
        "Uptime",
        "UPTIME",
        "ｕｐｔｉｍｅ",
        "u\u0440time",
        "uptime\u200b",
        "\u200buptime",
        "upti",
        "uptime ",
        " uptime",
        "uptime\x00",
        "uptime df",
        "up",
        "u*",
        "",
        "uptime\n",
        "upt\u0131me",
        "uptime\u0301",
    ],
    ids=[
        "capital",
        "upper",
        "fullwidth",
        "cyrillic-er",
        "zero-width-space-after",
        "zero-width-space-before",
        "prefix",
        "trailing-space",
        "leading-space",
        "nul",
        "two-names",
        "substring",
        "glob",
        "empty",
        "newline",
        "dotless-i",
        "combining-accent",
    ],
)
def test_a_name_not_exactly_in_the_token_is_denied(requested: str) -> None:
    # the allowlist holds the lookalike too, so only the token gate can refuse it
    allowlist = {**ALLOWLIST, requested: command("lookalike")}
    reason = denial({CLAIM: ["uptime"]}, requested, allowlist).reason
    assert reason == "COMMAND_NOT_IN_TOKEN"


@pytest.mark.parametrize("granted", ["Uptime", "ｕｐｔｉｍｅ", "u\u0440time", "uptime\u200b"])
def test_a_lookalike_in_the_token_does_not_grant_the_real_name(granted: str) -> None:
    assert denial({CLAIM: [granted]}, "uptime").reason == "COMMAND_NOT_IN_TOKEN"


def test_an_empty_claim_list_denies_everything() -> None:
    assert denial({CLAIM: []}, "uptime").reason == "COMMAND_NOT_IN_TOKEN"


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({CLAIM: "uptime df"}, id="string-substring-trap"),
        pytest.param({CLAIM: "uptime"}, id="string-equal"),
        pytest.param({CLAIM: {"uptime": True}}, id="dict"),
        pytest.param({CLAIM: None}, id="null"),
        pytest.param({}, id="missing"),
        pytest.param({"Cmds": ["uptime"], "cmds ": ["uptime"]}, id="claim-name-lookalike"),
        pytest.param({CLAIM: ["uptime", 1]}, id="list-with-int"),
        pytest.param({CLAIM: ["uptime", None]}, id="list-with-null"),
        pytest.param({CLAIM: [["uptime"]]}, id="nested-list"),
        pytest.param({CLAIM: ("uptime",)}, id="tuple"),
        pytest.param({CLAIM: True}, id="bool"),
    ],
)
def test_a_claim_that_is_not_a_list_of_strings_is_invalid(claims: dict[str, Any]) -> None:
    denied = denial(claims, "uptime")
    assert denied.reason == "COMMANDS_CLAIM_INVALID"
    with pytest.raises(NotPermitted) as info:
        permitted_commands(claims, ALLOWLIST, CLAIM)
    assert info.value.reason == "COMMANDS_CLAIM_INVALID"


@pytest.mark.parametrize("requested", ["up", "df", "uptime df"])
def test_a_string_claim_is_never_a_substring_test(requested: str) -> None:
    assert denial({CLAIM: "uptime df"}, requested).reason == "COMMANDS_CLAIM_INVALID"


def test_a_name_in_the_token_but_not_the_allowlist_is_denied() -> None:
    assert denial({CLAIM: ["uptime", "reboot"]}, "reboot").reason == "COMMAND_NOT_IN_ALLOWLIST"


def test_the_configured_claim_name_is_the_one_read() -> None:
    claims = {CLAIM: ["df"], "other": ["uptime"]}
    assert decide(claims, "uptime", ALLOWLIST, "other").allowed
    assert denial(claims, "uptime").reason == "COMMAND_NOT_IN_TOKEN"


def test_every_denial_looks_the_same_to_the_client() -> None:
    denials = [
        denial({CLAIM: ["uptime"]}, "df"),
        denial({CLAIM: "df"}, "df"),
        denial({CLAIM: ["df"]}, "df", MappingProxyType({})),
    ]
    assert {d.reason for d in denials} == {
        "COMMAND_NOT_IN_TOKEN",
        "COMMANDS_CLAIM_INVALID",
        "COMMAND_NOT_IN_ALLOWLIST",
    }
    for d in denials:
        assert d.status == grpc.StatusCode.PERMISSION_DENIED
        assert d.client_message == "command 'df' is not permitted"


def test_decide_does_not_change_its_inputs() -> None:
    claims = {CLAIM: ["uptime"]}
    allowlist = dict(ALLOWLIST)
    decide(claims, "uptime", allowlist, CLAIM)
    decide(claims, "reboot", allowlist, CLAIM)
    assert claims == {CLAIM: ["uptime"]}
    assert allowlist == dict(ALLOWLIST)


def test_permitted_commands_is_the_sorted_intersection() -> None:
    claims = {CLAIM: ["uptime", "reboot", "df", "Uptime", "df"]}
    permitted = permitted_commands(claims, ALLOWLIST, CLAIM)
    assert [t.name for t in permitted] == ["df", "uptime"]
    assert permitted == [ALLOWLIST["df"], ALLOWLIST["uptime"]]


def test_permitted_commands_of_an_empty_claim_is_empty() -> None:
    assert permitted_commands({CLAIM: []}, ALLOWLIST, CLAIM) == []
