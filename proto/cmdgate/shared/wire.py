"""Constants of the wire contract and the parsing of a ``host[:port]`` target."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PORT = 7443
AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "
# One output chunk on the wire never exceeds this.
MAX_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Target:
    """One agent address: ``host`` without brackets, and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_target(text: str, default_port: int = DEFAULT_PORT, any_port: bool = False) -> Target:
    """Parse ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; raise ValueError if malformed.

    ``any_port`` admits port 0, which asks the kernel for a free port when listening.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty target")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in target {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected text after ']' in target {text!r}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"IPv6 target {text!r} must be written in brackets, e.g. [::1]:7443")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"target {text!r} has no host")
    if port_text == "":
        return Target(host, default_port)
    lowest = 0 if any_port else 1
    if not (port_text.isascii() and port_text.isdigit()) or not lowest <= int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in target {text!r}")
    return Target(host, int(port_text))


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and for loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    import ipaddress  # here: every `cmdgate run` imports this module, few call this

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
