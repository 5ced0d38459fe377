"""Properties over generated input: no token, however built, crashes verification or passes
without the trusted key; no parameter value reaches argv unless it obeys its rules."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmdgate.agent.config import load_config
from cmdgate.agent.errors import AuthenticationFailed, InvalidParameters
from cmdgate.agent.tokens import TokenVerifier
from cmdgate.shared.keys import generate_signing_key, keygen

ISSUER = "https://issuer.example"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
claims = st.fixed_dictionaries(
    {},
    optional={
        "iss": st.sampled_from([ISSUER, ISSUER + "x", "", None]) | json_values,
        "aud": st.sampled_from(["host-a", ["host-a"], "host-b"]) | json_values,
        "sub": st.text(max_size=10) | json_values,
        "exp": st.integers(-(2**70), 2**70) | json_values,
        "iat": st.integers(-(2**70), 2**70) | json_values,
        "jti": st.text(max_size=10),
        "cmds": json_values,
    },
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["EdDSA", "ES256", "none", "HS256", "RS256", ""]) | json_values,
        "kid": st.sampled_from(["ed-1", "nope", "../x"]) | json_values,
        "typ": st.sampled_from(["at+jwt", "JWT"]) | json_values,
        "crit": json_values,
        "jku": st.just("http://127.0.0.1:1/jwks"),
    },
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> TokenVerifier:
    root = tmp_path_factory.mktemp("properties")
    _, jwks, _ = keygen(root / "keys", "EdDSA", kid="ed-1")
    config = root / "agent.toml"
    config.write_text(
        f'[server]\ninsecure = true\n[auth]\nissuer = "{ISSUER}"\naudience = "host-a"\n'
        f'jwks_file = "{jwks}"\n'
    )
    return TokenVerifier(load_config(config).auth)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, payload=claims, signature=st.binary(max_size=80))
def test_no_forged_token_passes_or_crashes(
    verifier: TokenVerifier, header: dict[str, Any], payload: dict[str, Any], signature: bytes
) -> None:
    # signed by a key the verifier does not trust, or not signed at all
    token = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    attacker = generate_signing_key("EdDSA")
    for candidate in (f"{token}.{b64(signature)}", f"{token}.{b64(attacker.sign(token.encode()))}"):  # type: ignore[call-arg]
        with pytest.raises(AuthenticationFailed):
            verifier.verify(candidate)


@given(text=st.text(max_size=200))
def test_arbitrary_text_is_never_a_token(verifier: TokenVerifier, text: str) -> None:
    with pytest.raises(AuthenticationFailed):
        verifier.verify(text)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root: Path = tmp_path_factory.mktemp("template")
    _, jwks, _ = keygen(root / "keys", "EdDSA", kid="ed-1")
    config = root / "agent.toml"
    config.write_text(
        f'[server]\ninsecure = true\n[auth]\nissuer = "{ISSUER}"\naudience = "a"\n'
        f'jwks_file = "{jwks}"\n'
        '[commands.show]\nargv = ["/bin/echo", "--", "{name}", "--lines={n}"]\n'
        '[commands.show.params.name]\ntype = "string"\npattern = "[a-z]{1,12}"\n'
        '[commands.show.params.n]\ntype = "int"\nmin = 1\nmax = 500\n'
    )
    return load_config(config).commands["show"]


# Values near the rules as well as arbitrary text: random text alone almost never makes
# a valid pair, and the accepting half of the property would go unchecked.
_NAMES = st.from_regex(r"[a-z]{1,12}", fullmatch=True) | st.text(max_size=30)
_COUNTS = st.integers(-5, 600).map(str) | st.from_regex(r"0*[0-9]{1,4}", fullmatch=True)
_COUNTS |= st.text(max_size=30)


def _valid(params: dict[str, str]) -> bool:
    """The template's rules, written again independently of templates.py."""
    return (
        set(params) == {"name", "n"}
        and re.fullmatch(r"[a-z]{1,12}", params["name"]) is not None
        and re.fullmatch(r"[0-9]+", params["n"]) is not None
        and 1 <= int(params["n"]) <= 500
    )


@given(
    params=st.fixed_dictionaries({"name": _NAMES, "n": _COUNTS})
    | st.dictionaries(st.sampled_from(["name", "n", "other"]), st.text(max_size=30), max_size=3)
)
def test_parameters_reach_argv_only_when_valid(template: Any, params: dict[str, str]) -> None:
    if not _valid(params):
        with pytest.raises(InvalidParameters):
            template.render(params)
        return
    # accepted: exactly the template's shape, each value whole, the int in canonical form
    argv = template.render(params).argv
    assert argv == ("/bin/echo", "--", params["name"], f"--lines={int(params['n'])}")


def test_the_valid_half_of_the_property_is_reached() -> None:
    """The strategy must produce valid parameters often enough for the check to matter."""
    found: list[bool] = []

    @settings(max_examples=300, database=None)
    @given(params=st.fixed_dictionaries({"name": _NAMES, "n": _COUNTS}))
    def sample(params: dict[str, str]) -> None:
        found.append(_valid(params))

    sample()
    assert sum(found) >= 10, f"{sum(found)} valid of {len(found)}"
