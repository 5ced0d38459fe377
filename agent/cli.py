"""``cmdgate-agent``: serve, check-config, init."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from cmdgate import __version__
from cmdgate.agent.config import AgentConfig, load_config
from cmdgate.agent.errors import ConfigError
from cmdgate.agent.templates import Limits

log = logging.getLogger("cmdgate.agent")

EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h
EXIT_USAGE = 64


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmdgate-agent",
        description="The cmdgate agent: runs allowlisted command templates for callers "
        "whose token permits them.",
    )
    parser.add_argument("--version", action="version", version=f"cmdgate-agent {__version__}")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = sub.add_parser("serve", help="run the agent")
    serve.add_argument("--config", required=True, metavar="FILE", help="agent.toml")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    check = sub.add_parser(
        "check-config", help="validate a config file and print the effective allowlist"
    )
    check.add_argument("--config", required=True, metavar="FILE")
    init = sub.add_parser(
        "init",
        help="write a working lab set-up (CA, certificates, keys, "
        "agent.toml, a demo token) into DIR",
    )
    init.add_argument("dir", metavar="DIR")
    init.add_argument(
        "--listen",
        default="127.0.0.1:7443",
        help="the agent's listen address in the written config (default: %(default)s)",
    )
    for action, what in (
        ("install", "install and start the systemd service"),
        ("uninstall", "stop and remove the service; keep config and audit"),
    ):
        installer = sub.add_parser(action, help=what)
        installer.add_argument(
            "--root",
            default="/",
            metavar="DIR",
            help="install below DIR instead of / (for images and tests)",
        )
        installer.add_argument(
            "--dry-run", action="store_true", help="say what would be done, change nothing"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.action != "serve":
        # `check-config | head` ends quietly; the agent itself must never die of a pipe
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        if args.action == "serve":
            logging.basicConfig(
                level=args.log_level.upper(),
                stream=sys.stderr,
                format="%(asctime)s cmdgate-agent %(levelname)s %(message)s",
            )
            return _serve(load_config(args.config))
        if args.action == "check-config":
            return _check_config(load_config(args.config))
        if args.action in ("install", "uninstall"):
            from pathlib import Path

            from cmdgate.agent import install

            run = install.install if args.action == "install" else install.uninstall
            return run(Path(args.root), dry_run=args.dry_run)
        return _init(args.dir, args.listen)
    except ConfigError as e:
        print(f"cmdgate-agent: {e}", file=sys.stderr)
        return EXIT_CONFIG


def _serve(config: AgentConfig) -> int:
    from cmdgate.agent.sdnotify import Notifier
    from cmdgate.agent.server import start_agent

    notifier = Notifier()

    async def serve() -> None:
        agent = await start_agent(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task[None]] = set()
        one_at_a_time = asyncio.Lock()

        async def reload() -> None:
            async with one_at_a_time:  # a later SIGHUP's config must win, not a slower one
                notifier.reloading()
                try:
                    await agent.reload(config.source)
                finally:
                    notifier.ready()

        def on_sighup() -> None:
            if stop.is_set():
                return  # stopping: the audit log is closing, nothing to reload into
            # re-read the config and keys; reopen the audit file (logrotate)
            log.info("SIGHUP: reloading %s", config.source)
            task = asyncio.create_task(reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        # ready only now: a SIGHUP the moment systemd hears READY must find its handler
        notifier.ready(f"listening on port {agent.port}")
        watchdog = asyncio.create_task(notifier.watchdog())
        await stop.wait()
        notifier.stopping()
        grace = agent.service.state.config.server.drain_grace_seconds
        log.info("stopping: runs in flight get %gs to finish", grace)
        async with one_at_a_time:  # a reload under way finishes first, not into a stopped agent
            await agent.stop()
        watchdog.cancel()
        log.info("stopped")

    asyncio.run(serve())
    return 0


def _check_config(config: AgentConfig) -> int:
    server = config.server
    mode = (
        "plaintext (loopback only)"
        if server.insecure
        else ("TLS, client certificates required" if server.client_ca_pem else "TLS")
    )
    print(f"{config.source}: OK")
    print(f"listen   {server.listen} ({mode})")
    for issuer in config.issuers:
        print(f"issuer   {issuer.issuer}")
        print(f"audience {issuer.audience}")
        if issuer.jwks_url or issuer.discovery:
            source = issuer.jwks_url or f"{issuer.issuer} (discovery)"
            print(f"keys     fetched from {source} every {issuer.jwks_ttl_seconds:g}s")
        else:
            print(f"keys     {', '.join(f'{k.kid} ({k.algorithm})' for k in issuer.keys.values())}")
    auth = config.auth  # the agent-wide settings
    print(
        f"tokens   typ {sorted(auth.token_types) or 'not checked'}, "
        f"claims {list(auth.required_claims)}, replay {auth.replay}, "
        f"bound to the client certificate {'always' if auth.require_cnf else 'when cnf'}"
        f"{', revocations ' + str(auth.revoked_file) if auth.revoked_file else ''}"
    )
    print(
        f"limits   {server.max_concurrent_runs} runs, {server.max_runs_per_identity} per "
        f"identity, drain {server.drain_grace_seconds:g}s, process control "
        f"{server.process_control}"
    )
    print(
        f"audit    {config.audit.path} (checkpoint every "
        f"{config.audit.checkpoint_every_records} records or "
        f"{config.audit.checkpoint_every_seconds:g}s)"
    )
    print(f"commands ({len(config.commands)}):")
    for name in sorted(config.commands):
        template = config.commands[name]
        argv = " ".join([template.executable, *(str(arg) for arg in template.args)])
        print(f"  {name}: {argv}")
        print(
            f"      timeout {template.timeout_seconds:g}s, "
            f"output <= {template.max_output_bytes} bytes"
        )
        if template.run_as is not None:
            print(f"      runs as {template.run_as.user} (uid {template.run_as.uid})")
        if template.limits != Limits():
            print(f"      limits {template.limits}")
        for spec in template.params.values():
            print(
                f"      {spec.name}: {spec.type.value}"
                f"{'' if spec.required else ' (optional)'}"
                f"{' (secret)' if spec.secret else ''}"
                f"{f', default {spec.default!r}' if spec.default is not None else ''}"
            )
    return 0


def _init(directory: str, listen: str) -> int:
    from pathlib import Path

    from cmdgate.agent.lab import LabError, write_lab

    try:
        paths = write_lab(Path(directory), listen=listen)
    except (LabError, ValueError) as e:
        print(f"cmdgate-agent: init: {e}", file=sys.stderr)
        return 1
    print(f"wrote a lab set-up in {paths.root}:")
    for label, path in [
        ("config", paths.config),
        ("CA", paths.ca_cert),
        ("client cert", paths.client_cert),
        ("client key", paths.client_key),
        ("signing key", paths.signing_key),
        ("JWKS", paths.jwks),
        ("demo token", paths.token),
        ("client env", paths.client_env),
    ]:
        print(f"  {label:12} {path}")
    print("next:")
    print(f"  cmdgate-agent serve --config {paths.config}")
    print(f"  . {paths.client_env} && cmdgate list {listen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
