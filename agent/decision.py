"""Gate 2, as a pure function: may these verified claims run this command here?

No I/O and no clock: the same inputs always give the same decision, so the
heart of the security model can be tested on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cmdgate.agent.errors import NotPermitted
from cmdgate.agent.templates import CommandTemplate


@dataclass(frozen=True)
class Decision:
    """Allowed: ``template`` is what may run. Denied: ``denial`` says why."""

    template: CommandTemplate | None
    denial: NotPermitted | None

    @property
    def allowed(self) -> bool:
        return self.template is not None


def token_commands(claims: Mapping[str, Any], claim_name: str) -> tuple[str, ...]:
    """The whitelist claim as a tuple of strings; anything but a JSON list of strings denies."""
    value = claims.get(claim_name)
    # fail closed: a string would make `in` a substring test ("up" in "uptime df")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NotPermitted(
            "COMMANDS_CLAIM_INVALID",
            f"claim {claim_name!r} is {type(value).__name__}, not a list of strings",
        )
    return tuple(value)


def decide(
    claims: Mapping[str, Any],
    command: str,
    allowlist: Mapping[str, CommandTemplate],
    claim_name: str,
) -> Decision:
    """Allow ``command`` only if it is exactly one of the token's names and a local template.

    Names are compared as they are, code point for code point: no case folding,
    no Unicode normalisation, no globbing. ``Uptime``, ``uptime\\u200b`` and a
    Cyrillic ``uрtime`` are all different from ``uptime``.
    """
    denied = f"command {command[:64]!r} is not permitted"
    try:
        names = token_commands(claims, claim_name)
    except NotPermitted as e:
        return Decision(None, NotPermitted(e.reason, e.detail, denied))
    if command not in names:  # membership of a tuple: whole-element equality
        return Decision(
            None,
            NotPermitted(
                "COMMAND_NOT_IN_TOKEN", f"{command[:64]!r} is not in claim {claim_name!r}", denied
            ),
        )
    template = allowlist.get(command)
    if template is None:
        return Decision(
            None,
            NotPermitted(
                "COMMAND_NOT_IN_ALLOWLIST",
                f"{command[:64]!r} is not a template on this host",
                denied,
            ),
        )
    return Decision(template, None)


def permitted_commands(
    claims: Mapping[str, Any],
    allowlist: Mapping[str, CommandTemplate],
    claim_name: str,
) -> list[CommandTemplate]:
    """The templates both gates allow, sorted by name; raises ``NotPermitted`` for a bad claim."""
    names = set(token_commands(claims, claim_name))
    return [allowlist[name] for name in sorted(allowlist) if name in names]
