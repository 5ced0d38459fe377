"""The sd_notify protocol, by hand: one datagram to $NOTIFY_SOCKET, no libsystemd.

``READY=1`` once the port listens, ``RELOADING=1`` with ``MONOTONIC_USEC`` and
``READY=1`` again around a reload, ``STOPPING=1`` on stop, and ``WATCHDOG=1``
from the event loop, so that a wedged loop misses its beat and gets restarted.
Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("cmdgate.agent")


class Notifier:
    """Sends state changes to the service manager, if there is one."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # an abstract socket is written with a leading '@'
        self.address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        self.watchdog_seconds = (
            int(watchdog_usec) / 1e6
            if watchdog_usec.isdigit() and watchdog_pid in ("", str(os.getpid()))
            else 0.0
        )

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # never block the event loop on a service manager that does not read
                sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except BlockingIOError:
            log.debug("sd_notify: %s is full, message dropped", self.address.lstrip("\0"))
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), e)

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    async def watchdog(self) -> None:
        """Beat at half the watchdog interval, from the event loop itself."""
        if not self.watchdog_seconds:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_seconds / 2)
