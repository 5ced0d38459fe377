"""Remote output is data, not terminal commands.

When the local stream is a terminal, every control character except newline
and tab is shown escaped (``\\x1b``, ``\\r``, ``\\x9b``...), so a remote command
cannot set the clipboard (OSC 52), clear the screen or overwrite lines
(kubectl CVE-2021-25743). Bytes that are not UTF-8 are shown escaped too.
When the stream is not a terminal, the bytes pass through exactly.
"""

from __future__ import annotations

import codecs
import re

# C0 (but \t and \n), DEL, and C1: 8-bit CSI (\x9b) drives some terminals too.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_OR_NEWLINE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _escape_char(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character but tab shown as ``\\xNN`` (newlines too)."""
    return _CONTROL_OR_NEWLINE.sub(_escape_char, text)


class TerminalEscaper:
    """Turns a byte stream into text safe for a terminal; feed chunks in order."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")

    def feed(self, data: bytes, final: bool = False) -> str:
        return _CONTROL.sub(_escape_char, self._decoder.decode(data, final))
