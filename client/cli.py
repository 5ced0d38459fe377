"""``cmdgate``: run commands on one agent or many, list them, make keys and lab tokens.

Exit codes (one place maps outcomes to them: ``exit_code_for``):
the remote exit code; 124 timed out; 128+N killed by signal N; 77 not
authenticated or not permitted; 64 usage or invalid parameters; 255 the agent
cannot be reached or is unavailable; with several targets, 0 if all succeeded
and 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from pathlib import Path

    from cmdgate.client.api import Client, ClientError, Exited, RunEvent
    from cmdgate.shared.auditlog import AuditFilter

T = TypeVar("T")

EXIT_TIMED_OUT = 124
EXIT_SIGNAL_BASE = 128
EXIT_DENIED = 77  # EX_NOPERM
EXIT_USAGE = 64  # EX_USAGE
EXIT_UNREACHABLE = 255
EXIT_INTERRUPTED = 130
# the output could not be written (Python exits 120 in that case too)
EXIT_OUTPUT_FAILED = 120
# gRPC status name → exit code; any other status is EXIT_UNREACHABLE.
_STATUS_EXIT_CODES = {
    "UNAUTHENTICATED": EXIT_DENIED,
    "PERMISSION_DENIED": EXIT_DENIED,
    "INVALID_ARGUMENT": EXIT_USAGE,
}


class UsageError(Exception):
    """Bad command line or local input: exit 64."""


class OutputFailed(Exception):
    """The command's output could not be written here (a full disk...): exit 120."""


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, sized without ``shutil`` (whose import, with bz2 and lzma,
    costs every ``cmdgate run`` a few milliseconds)."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(2).columns
        except (ValueError, OSError):
            columns = 80
        super().__init__(prog, width=max(columns, 40) - 2)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"cmdgate: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=env("CMDGATE_TOKEN_FILE"),
        help="file holding the token, '-' for stdin (env CMDGATE_TOKEN_FILE; "
        "or CMDGATE_TOKEN holds the token itself)",
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        help="CA certificate that signed the agent's (env CMDGATE_CA; default: the system's roots)",
    )
    parser.add_argument(
        "--cert",
        metavar="FILE",
        help="client certificate for mTLS (env CMDGATE_CERT)",
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        help="client key for mTLS (env CMDGATE_KEY)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, for a loopback agent with insecure = true",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _build_parser() -> argparse.ArgumentParser:
    from cmdgate import __version__

    parser = _Parser(prog="cmdgate", description="Run approved commands on cmdgate agents.")
    parser.add_argument("--version", action="version", version=f"cmdgate {__version__}")
    sub = parser.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )
    run = sub.add_parser(
        "run",
        help="run a command on one or more agents",
        description="Run COMMAND on TARGET (host[:port], or several "
        "separated by commas) with NAME=VALUE parameters.",
    )
    run.add_argument("target", metavar="TARGET")
    run.add_argument("command", metavar="COMMAND")
    run.add_argument("params", metavar="NAME=VALUE", nargs="*")
    run.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="shorter than the template's timeout (never longer)",
    )
    run.add_argument(
        "--raw", action="store_true", help="on a terminal, print control characters unescaped"
    )
    _add_connection_options(run)
    listing = sub.add_parser("list", help="show what the token may run on TARGET")
    listing.add_argument("target", metavar="TARGET")
    _add_connection_options(listing)
    keygen = sub.add_parser("keygen", help="make a signing key and a jwks.json")
    keygen.add_argument("--out", required=True, metavar="DIR")
    keygen.add_argument("--alg", default="EdDSA", choices=["EdDSA", "ES256"])
    keygen.add_argument("--kid", help="key id (default: the key's RFC 7638 thumbprint)")
    token = sub.add_parser("token", help="lab token issuer")
    token_sub = token.add_subparsers(
        dest="token_action", required=True, metavar="ACTION", parser_class=_Parser
    )
    mint = token_sub.add_parser("mint", help="print a signed token with a random jti")
    mint.add_argument("--key", required=True, metavar="FILE", help="private key PEM")
    mint.add_argument("--kid", required=True)
    mint.add_argument("--iss", required=True, help="issuer, exactly as the agent expects it")
    mint.add_argument("--aud", required=True, help="audience")
    mint.add_argument("--sub", required=True, help="subject: who the token is for")
    mint.add_argument("--cmds", required=True, help="commands it may run: a,b,c")
    mint.add_argument("--ttl", default="15m", help="lifetime, e.g. 90s, 15m, 1h (default 15m)")
    mint.add_argument("--claim", default="cmds", help="name of the whitelist claim")
    mint.add_argument(
        "--audit", action="store_true", help="also let it read audit logs (AuditQuery)"
    )
    mint.add_argument(
        "--cnf-cert",
        metavar="FILE",
        help="bind the token to this client certificate (RFC 8705): useless without its key",
    )
    mint.add_argument(
        "--audit-claim", default="cmdgate_audit", help="name of the audit permission claim"
    )
    _add_audit_parser(sub)
    return parser


def _add_audit_parser(sub: Any) -> None:
    audit = sub.add_parser("audit", help="verify, query and summarise audit logs")
    actions = audit.add_subparsers(
        dest="audit_action", required=True, metavar="ACTION", parser_class=_Parser
    )
    verify = actions.add_parser(
        "verify",
        help="check the hash chain, seq continuity and checkpoint signatures",
        description="Check audit log FILEs (rotated ones in any order) and name the first "
        "bad line. Exit 0 when all holds, 1 otherwise.",
    )
    verify.add_argument("files", metavar="FILE", nargs="+")
    verify.add_argument(
        "--pubkey",
        metavar="FILE",
        help="the agent's audit public key (audit-key.pub in its state folder); "
        "without it, checkpoint signatures are not checked",
    )
    verify.add_argument(
        "--now", metavar="TIME", help="judge the last checkpoint's age as of TIME (RFC 3339)"
    )
    verify.add_argument(
        "--partial",
        action="store_true",
        help="the FILEs are a part of the log: it need not start at seq 1 nor go on past "
        "its last rotation",
    )
    query = actions.add_parser(
        "query", help="show matching records from FILEs, or from agents with --target"
    )
    query.add_argument("files", metavar="FILE", nargs="*")
    for name, what in (("sub", "identity"), ("command", "command name"), ("run-id", "run id")):
        query.add_argument(f"--{name}", default="", help=f"only this {what}")
    query.add_argument("--decision", default="", choices=["", "allowed", "denied"])
    query.add_argument("--since", default="", help="RFC 3339 time, or 15m, 2h, 7d back from now")
    query.add_argument("--until", default="", help="RFC 3339 time, or a duration back from now")
    query.add_argument("--limit", type=int, default=0, help="at most this many, the newest")
    query.add_argument(
        "--target", default="", help="ask these agents (host[:port],...) over AuditQuery"
    )
    _add_connection_options(query)
    summary = actions.add_parser("summary", help="one row per identity (or per command)")
    summary.add_argument("files", metavar="FILE", nargs="+")
    summary.add_argument("--by", default="sub", choices=["sub", "command"])
    summary.add_argument("--json", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    # like any Unix tool: `cmdgate ... | head` ends quietly when head has read enough
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = _build_parser().parse_args(argv)
    try:
        if args.action == "run":
            return _run(args)
        if args.action == "list":
            return _list(args)
        if args.action == "keygen":
            return _keygen(args)
        if args.action == "audit":
            return _audit(args)
        return _mint(args)
    except UsageError as e:
        print(f"cmdgate: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OutputFailed as e:
        with contextlib.suppress(OSError):
            os.write(2, f"cmdgate: {e}\n".encode())
        return EXIT_OUTPUT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def console_main() -> NoReturn:
    """The ``cmdgate`` command: ``main()``, then exit at once.

    Python's own exit would also tear down gRPC's threads and every module (about a
    sixth of a whole ``cmdgate run``); output is flushed first, and nothing else the
    commands leave open needs closing.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError as e:
        with contextlib.suppress(OSError):
            os.write(2, f"cmdgate: cannot write the output: {e.strerror}\n".encode())
        code = code or EXIT_OUTPUT_FAILED
    os._exit(code)


def exit_code_for(outcome: Exited | ClientError) -> int:
    """The process exit code for one target's outcome."""
    from cmdgate.client.api import ClientError

    if isinstance(outcome, ClientError):
        return _STATUS_EXIT_CODES.get(outcome.code, EXIT_UNREACHABLE)
    if outcome.timed_out:
        return EXIT_TIMED_OUT
    if outcome.signal is not None:
        return EXIT_SIGNAL_BASE + outcome.signal
    assert outcome.exit_code is not None
    return outcome.exit_code


def _read_token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            path = args.token_file
            if path == "-":
                text = sys.stdin.read()
            else:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read token file {args.token_file}: {e}") from None
    else:
        text = os.environ.get("CMDGATE_TOKEN", "")
    token = text.strip()
    if not token:
        raise UsageError(
            "no token: give --token-file FILE, or set CMDGATE_TOKEN_FILE or CMDGATE_TOKEN"
        )
    return token


def _tls_files(args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """--ca, --cert and --key, or else CMDGATE_CA, CMDGATE_CERT and CMDGATE_KEY.

    With --insecure the environment is not consulted: a shell that sourced a lab's
    client.env can still talk to a plaintext loopback agent.
    """
    given = (args.ca, args.cert, args.key)
    if args.insecure:
        return given
    env = os.environ.get
    return (
        args.ca or env("CMDGATE_CA"),
        args.cert or env("CMDGATE_CERT"),
        args.key or env("CMDGATE_KEY"),
    )


def _client(args: argparse.Namespace, target: str, token: str) -> Client:
    from cmdgate.client.api import Client

    ca, cert, key = _tls_files(args)
    try:
        return Client(target, token=token, ca=ca, cert=cert, key=key, insecure=args.insecure)
    except (ValueError, OSError) as e:
        raise UsageError(f"{target}: {e}") from None


def _parse_params(pairs: Sequence[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"parameter {pair!r} is not NAME=VALUE")
        if name in params:
            raise UsageError(f"parameter {name!r} is given twice")
        params[name] = value
    return params


class _Printer:
    """Writes one target's events: exact bytes, escaped on a terminal, or JSON lines."""

    def __init__(
        self, host: str, as_json: bool, raw: bool, prefix: bool, lock: threading.Lock
    ) -> None:
        from cmdgate.client.terminal import TerminalEscaper

        self.host = host
        self.as_json = as_json
        self.prefix = prefix
        self.lock = lock
        self._escapers = {
            name: TerminalEscaper() if stream.isatty() and not raw else None
            for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr))
        }
        self._partial = {"stdout": b"", "stderr": b""}

    def event(self, event: RunEvent) -> None:
        from cmdgate.client.api import Output

        if self.as_json:
            self._json(event)
        elif isinstance(event, Output):
            self._output(event.stream, event.data)

    def finish(self) -> None:
        if self.as_json:
            return
        for stream, rest in self._partial.items():
            # a final flush also shows a multi-byte character the output cut in half
            self._write(stream, rest + b"\n" if rest else b"", final=True)
            self._partial[stream] = b""

    def _json(self, event: RunEvent) -> None:
        import base64

        from cmdgate.client.api import Exited, Output, Started

        record: dict[str, Any] = {"host": self.host}
        if isinstance(event, Started):
            record.update(event="started", **asdict(event))
        elif isinstance(event, Output):
            record.update(
                event="output", stream=event.stream, data=base64.b64encode(event.data).decode()
            )
        elif isinstance(event, Exited):
            record.update(event="exited", **asdict(event))
        self.json_line(record)

    def json_line(self, record: dict[str, Any]) -> None:
        import json

        with self.lock:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()

    def _output(self, stream: str, data: bytes) -> None:
        if not self.prefix:
            self._write(stream, data)
            return
        # several targets: whole lines only, each prefixed with its host
        data = self._partial[stream] + data
        head, newline, tail = data.rpartition(b"\n")
        self._partial[stream] = tail
        if newline:
            self._write(stream, head + b"\n")

    def _write(self, stream: str, data: bytes, final: bool = False) -> None:
        out = sys.stdout if stream == "stdout" else sys.stderr
        escaper = self._escapers[stream]
        with self.lock:
            if self.prefix:
                prefix = f"{self.host}: ".encode()
                data = b"".join(prefix + line for line in data.splitlines(keepends=True))
            try:
                if escaper is None:
                    if data:
                        out.buffer.write(data)
                        out.buffer.flush()
                elif text := escaper.feed(data, final):
                    out.write(text)
                    out.flush()
            except OSError as e:
                raise OutputFailed(f"cannot write the output to {stream}: {e.strerror}") from None


def _error_line(host: str, error: ClientError) -> None:
    from cmdgate.client.terminal import escape_controls

    # the agent's message is remote text too: keep it to one line, with no escapes
    line = f"cmdgate: {host}: {error.code}: {escape_controls(error.message)}"
    print(line, file=sys.stderr, flush=True)


def _run_one(
    client: Client, args: argparse.Namespace, params: dict[str, str], printer: _Printer
) -> Exited | ClientError:
    from cmdgate.client.api import ClientError, Exited

    try:
        for event in client.stream(args.command, params, timeout=args.timeout):
            printer.event(event)
            if isinstance(event, Exited):
                printer.finish()
                return event
        raise ClientError(printer.host, "INTERNAL", "the stream ended without an exit event")
    except ClientError as e:
        printer.finish()
        if args.json:
            printer.json_line(
                {"host": printer.host, "event": "error", "code": e.code, "message": e.message}
            )
        _error_line(printer.host, e)
        return e


def _describe(outcome: Exited) -> str:
    how = f"signal {outcome.signal}" if outcome.signal is not None else f"exit {outcome.exit_code}"
    notes = [
        n
        for n, on in (
            ("timed out", outcome.timed_out),
            ("output truncated", outcome.truncated),
            ("cancelled", outcome.cancelled),
        )
        if on
    ]
    return ", ".join([how, *notes]) + f" ({outcome.duration_ms / 1000:.2f}s)"


def _run(args: argparse.Namespace) -> int:
    from cmdgate.client.api import Exited

    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError("--timeout must be a positive number of seconds")
    params = _parse_params(args.params)
    targets = _target_list(args.target)
    token = _read_token(args)
    clients = [_client(args, target, token) for target in targets]
    lock = threading.Lock()
    several = len(targets) > 1
    printers = [_Printer(t, args.json, args.raw, several, lock) for t in targets]
    try:
        if not several:
            outcome = _run_one(clients[0], args, params, printers[0])
            if isinstance(outcome, Exited) and (
                outcome.timed_out or outcome.truncated or outcome.signal is not None
            ):
                print(f"cmdgate: {targets[0]}: {_describe(outcome)}", file=sys.stderr)
            return exit_code_for(outcome)
        outcomes = _each_target(
            len(targets), lambda i: _run_one(clients[i], args, params, printers[i])
        )
    finally:
        for client in clients:
            client.close()
    width = max(len(t) for t in targets)
    for target, result in zip(targets, outcomes, strict=True):
        summary = _describe(result) if isinstance(result, Exited) else result.code
        print(f"cmdgate: {target:<{width}}  {summary}", file=sys.stderr)
    ok = all(isinstance(o, Exited) and exit_code_for(o) == 0 for o in outcomes)
    return 0 if ok else 1


def _target_list(text: str) -> list[str]:
    """``a,b,c`` as a list of names, each once; UsageError for an empty or repeated name."""
    targets = [t.strip() for t in text.split(",")]
    if not all(targets):
        raise UsageError(f"empty name in target list {text!r}")
    if len(set(targets)) != len(targets):
        raise UsageError(f"a target is named twice in {text!r}")
    return targets


def _each_target(count: int, work: Callable[[int], T]) -> list[T]:
    """``work(i)`` for every target at once, in order. On Ctrl-C the caller's ``finally``
    closes the channels, which cancels every call (each agent kills its command): the
    threads are not waited for first."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=min(64, count))
    try:
        futures = [pool.submit(work, i) for i in range(count)]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _list(args: argparse.Namespace) -> int:
    import json

    from cmdgate.client.api import ClientError

    token = _read_token(args)
    client = _client(args, args.target, token)
    try:
        commands = client.list_commands()
    except ClientError as e:
        _error_line(args.target, e)
        return exit_code_for(e)
    finally:
        client.close()
    if args.json:
        print(
            json.dumps({"target": args.target, "commands": [asdict(c) for c in commands]}, indent=2)
        )
        return 0
    from cmdgate.client.terminal import escape_controls

    lines: list[str] = []
    if not commands:
        lines.append(f"{args.target}: this token may run nothing here")
    for command in commands:
        lines.append(f"{command.name}  {command.description}".rstrip())
        lines.append(
            f"    timeout {command.timeout_seconds:g}s, output up to "
            f"{command.max_output_bytes} bytes"
        )
        for p in command.params:
            rule = {
                "string": f"matching {p.pattern!r}",
                "enum": f"one of {', '.join(p.values)}",
                "int": f"from {p.min} to {p.max}",
                "path": f"under {', '.join(p.under)}",
            }.get(p.type, "")
            need = (
                "required"
                if p.required
                else (f"default {p.default!r}" if p.default is not None else "optional")
            )
            lines.append(f"    {p.name}={p.type.upper()}  {rule}; {need}")
    # what the agent says is remote text: it must not drive the terminal
    print("\n".join(escape_controls(line) for line in lines))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cmdgate.shared.keys import KeyFileError, keygen

    try:
        key_path, jwks_path, kid = keygen(Path(args.out), args.alg, args.kid)
    except (KeyFileError, ValueError, OSError) as e:
        print(f"cmdgate: keygen: {e}", file=sys.stderr)
        return 1
    print(f"private key  {key_path}  (keep it secret)")
    print(f"public JWKS  {jwks_path}  (give it to the agents: [auth] jwks_file)")
    print(f"kid          {kid}")
    return 0


def _mint(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cmdgate.shared.keys import KeyFileError, load_private_key, mint_token, parse_duration

    commands = [c.strip() for c in args.cmds.split(",")]
    if not all(commands):
        raise UsageError(f"--cmds {args.cmds!r} has an empty name")
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        key = load_private_key(Path(args.key))
    except KeyFileError as e:
        print(f"cmdgate: token mint: {e}", file=sys.stderr)
        return 1
    extra: dict[str, Any] = {args.audit_claim: True} if args.audit else {}
    if args.cnf_cert:
        from cmdgate.shared.keys import certificate_thumbprint

        try:
            extra["cnf"] = {"x5t#S256": certificate_thumbprint(Path(args.cnf_cert).read_bytes())}
        except (OSError, ValueError) as e:
            raise UsageError(f"--cnf-cert {args.cnf_cert}: {e}") from None
    token = mint_token(
        key,
        kid=args.kid,
        issuer=args.iss,
        audience=args.aud,
        subject=args.sub,
        commands=commands,
        ttl_seconds=ttl,
        commands_claim=args.claim,
        extra_claims=extra,
    )
    print(token)
    return 0


def _audit(args: argparse.Namespace) -> int:
    if args.audit_action == "verify":
        return _audit_verify(args)
    if args.audit_action == "summary":
        return _audit_summary(args)
    return _audit_query(args)


def _existing_files(names: Sequence[str]) -> list[Path]:
    from pathlib import Path

    paths = [Path(n) for n in names]
    for path in paths:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    return paths


def _audit_verify(args: argparse.Namespace) -> int:
    import datetime
    from pathlib import Path

    from cmdgate.client.audit import verify_logs
    from cmdgate.client.terminal import escape_controls
    from cmdgate.shared.auditlog import load_public_key, normalise_time

    paths = _existing_files(args.files)
    public_key = None
    if args.pubkey:
        try:
            public_key = load_public_key(Path(args.pubkey).read_bytes())
        except (OSError, ValueError) as e:
            raise UsageError(f"--pubkey {args.pubkey}: {e}") from None
    now = None
    if args.now:
        try:
            now = datetime.datetime.fromisoformat(normalise_time(args.now).replace("Z", "+00:00"))
        except ValueError as e:
            raise UsageError(str(e)) from None
    report = verify_logs(paths, public_key, now, partial=args.partial)
    # the messages quote the log, which is what is being checked: untrusted text
    for note in report.notes:
        print(f"cmdgate: note: {escape_controls(note)}", file=sys.stderr)
    if not report.ok:
        print(f"cmdgate: audit verify: {escape_controls(report.problem or '')}", file=sys.stderr)
        return 1
    signed = (
        "checkpoint signatures verified"
        if report.signatures_checked
        else "checkpoint signatures NOT checked (give --pubkey)"
    )
    print(
        f"OK: {report.files} file(s), {report.records} records "
        f"(seq {report.first_seq}..{report.last_seq}), {report.checkpoints} checkpoints, "
        f"{signed}; {report.unsigned_tail} record(s) after the last checkpoint"
    )
    return 0


def _audit_filter(args: argparse.Namespace) -> AuditFilter:
    from cmdgate.shared.auditlog import AuditFilter

    a = args
    try:
        return AuditFilter.parse(a.sub, a.command, a.decision, a.since, a.until, a.run_id)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _audit_query(args: argparse.Namespace) -> int:
    import json

    from cmdgate.client.audit import TABLE_COLUMNS, format_table, table_row

    if args.limit < 0:
        raise UsageError("--limit must not be negative")
    if bool(args.files) == bool(args.target):
        raise UsageError("give audit log FILEs, or --target to ask agents, not both")
    wanted = _audit_filter(args)
    if args.target:
        hosts_records, status = _remote_audit(args, wanted)
    else:
        from cmdgate.client.audit import chain_order
        from cmdgate.shared.auditlog import read_records

        records = wanted.newest(read_records(chain_order(_existing_files(args.files))), args.limit)
        hosts_records, status = [(None, r) for r in records], 0
    if args.json:
        for host, record in hosts_records:
            print(json.dumps(record if host is None else {"host": host, **record}))
    elif hosts_records or status == 0:
        several = bool(args.target)
        header = (("host",) if several else ()) + TABLE_COLUMNS
        rows = [table_row(r, host if several else None) for host, r in hosts_records]
        print(format_table(header, rows))
    return status


def _remote_audit(
    args: argparse.Namespace, wanted: AuditFilter
) -> tuple[list[tuple[str | None, dict[str, Any]]], int]:
    """Ask every target at once, merge the records by time; a failed host makes the exit 1."""
    from cmdgate.client.api import ClientError

    targets = _target_list(args.target)
    token = _read_token(args)
    clients = [_client(args, target, token) for target in targets]

    def ask(i: int) -> list[dict[str, Any]] | ClientError:
        try:
            return list(clients[i].audit_query(wanted, limit=args.limit))
        except ClientError as e:
            _error_line(targets[i], e)
            return e

    try:
        answers = _each_target(len(targets), ask)
    finally:
        for client in clients:
            client.close()
    merged: list[tuple[str | None, dict[str, Any]]] = []
    for target, answer in zip(targets, answers, strict=True):
        if not isinstance(answer, ClientError):
            merged.extend((target, record) for record in answer)
    merged.sort(key=lambda pair: str(pair[1].get("ts", "")))
    failures = [a for a in answers if isinstance(a, ClientError)]
    if len(targets) == 1 and failures:
        return merged, exit_code_for(failures[0])
    return merged, 1 if failures else 0


def _audit_summary(args: argparse.Namespace) -> int:
    import json

    from cmdgate.client.audit import chain_order, format_table, summarise
    from cmdgate.shared.auditlog import read_records

    rows = summarise(read_records(chain_order(_existing_files(args.files))), by=args.by)
    other = "commands" if args.by == "sub" else "identities"
    if args.json:
        for key, row in sorted(rows.items()):
            print(
                json.dumps(
                    {
                        args.by: key,
                        "allowed": row.allowed,
                        "denied": row.denied,
                        "failures": row.failures,
                        other: sorted(row.others),
                        "first_seen": row.first_seen,
                        "last_seen": row.last_seen,
                    }
                )
            )
        return 0
    header = (args.by, "allowed", "denied", "failures", other, "first seen", "last seen")
    table = [
        [
            key,
            str(r.allowed),
            str(r.denied),
            str(r.failures),
            str(len(r.others)),
            r.first_seen[:19],
            r.last_seen[:19],
        ]
        for key, r in sorted(rows.items())
    ]
    print(format_table(header, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
