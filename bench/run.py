"""Benchmark cmdgate next to OpenSSH on this machine (issue 6); write BENCHMARKS.md and a plot.

    .venv/bin/python bench/run.py [--quick] [--out DIR] [--only 1,3] [--json FILE]

Starts a private sshd and real cmdgate agents (mutual TLS) on free loopback
ports in a temporary folder, measures the seven figures, and stops
everything it started, also on error or Ctrl-C. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType

import figures
from agents import RunningAgent, make_lab, start_agent
from figures import FULL, QUICK, Figure
from openssh import INSTALL_HINT, SshEndpoint, SshUnavailable, ssh_version, start_sshd
from processes import Processes, free_port, tail
from report import Setting, cpu_pressure_total, git_revision, write_markdown, write_plot

REPO = Path(__file__).resolve().parent.parent
ALL_FIGURES = frozenset(range(1, 8))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description="cmdgate next to OpenSSH: the figures of issue 6."
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about 2 minutes)")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write BENCHMARKS.md and latency.png into DIR "
        "(default: BENCHMARKS.md at the repo root, bench/latency.png)",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="N,N",
        help="measure only these figures (7 needs 5 and is measured with it)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the raw numbers")
    parser.add_argument("--no-ssh", action="store_true", help="skip the OpenSSH columns")
    parser.add_argument(
        "--cprofile",
        type=Path,
        metavar="FILE",
        help="run the main agent under cProfile and write its profile to FILE when it stops",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="record the main agent with py-spy into FILE "
        "(.svg flame graph, .json speedscope, otherwise collapsed stacks)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (logs, audit, configs)"
    )
    return parser.parse_args(argv)


def _selected(only: str) -> frozenset[int]:
    if not only:
        return ALL_FIGURES
    chosen = frozenset(int(n) for n in only.split(",") if n.strip())
    if not chosen <= ALL_FIGURES:
        raise SystemExit(f"bench: --only takes figure numbers 1 to 7, not {only!r}")
    return chosen | ({5} if 7 in chosen else set())


def _say(message: str) -> None:
    print(f"bench [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # the same clean-up path as Ctrl-C
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    chosen = _selected(args.only)
    scale = QUICK if args.quick else FULL
    out_dir = args.out.resolve() if args.out else None
    markdown = (out_dir or REPO) / "BENCHMARKS.md"
    plot = (out_dir or REPO / "bench") / "latency.png"
    # also when started from a script, whose background jobs inherit SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    pressure_before = cpu_pressure_total()
    revision = git_revision(REPO)
    processes = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="cmdgate-bench-"))
    results: list[Figure] = []
    panels: list[tuple[str, dict[str, list[float]]]] = []
    ssh: SshEndpoint | None = None
    agent: RunningAgent | None = None
    skipped: str | None = "--no-ssh" if args.no_ssh else None
    try:
        if not args.no_ssh:
            try:
                ssh = start_sshd(workdir / "ssh", processes)
                _say(f"sshd up; ssh logs in as {ssh.user.name} ({ssh.user.how}: {ssh.user.shell})")
            except SshUnavailable as e:
                skipped = str(e)
                _say(f"skipping the ssh columns: {e}")
                _say(f"to include them: {INSTALL_HINT}")

        port = free_port()
        lab = make_lab(workdir / "lab", port)
        wrapper = (
            [sys.executable, "-m", "cProfile", "-o", str(args.cprofile.resolve())]
            if args.cprofile
            else []
        )
        agent = start_agent(lab, lab.config, port, processes, wrapper)
        _say(f"agent up on 127.0.0.1:{port} (pid {agent.process.pid}), lab in {lab.root}")
        if args.py_spy:
            _record_with_py_spy(args.py_spy.resolve(), agent.process.pid, processes, workdir)
        time.sleep(1.0)
        idle_rss = agent.rss_bytes()

        if 1 in chosen:
            _say("1: /bin/true round trips through the API (and ssh via a ControlMaster)")
            one, samples = figures.api_latency(lab, agent, ssh, processes, workdir, scale)
            results.append(one)
            panels.append(("1: approved /bin/true, one connection each", samples))
        if 2 in chosen:
            _say("2: whole processes: cmdgate run vs ssh on a new connection")
            two, samples = figures.whole_process(lab, agent, ssh, scale)
            results.append(two)
            panels.append(("2: a whole process per run", samples))
        if 3 in chosen:
            _say("3: denials per second from 16 clients")
            results.append(figures.denials(lab, agent, scale))
        if 4 in chosen:
            _say("4: streaming 1 GiB")
            results.append(figures.streaming(lab, agent, ssh, scale))
        if 5 in chosen:
            _say("5 and 7: 500 concurrent sleep 1, agent RSS")
            five, seven = figures.concurrent_sleeps(lab, agent, scale, idle_rss)
            results.append(five)
            if 7 in chosen:
                results.append(seven)
        if 6 in chosen:
            _say("6: one cmdgate run to 20 agents vs 1")
            results.append(figures.fanout(lab, agent, processes, scale))
        processes.stop_all()
    except KeyboardInterrupt:
        _say("interrupted; stopping what was started")
        return 130
    except Exception:
        if agent is not None and agent.process.poll() is not None:
            # the likeliest cause of a failed call: say so, with the agent's last words
            _say(f"the agent exited with {agent.process.returncode} during the run:")
            print(tail(agent.log), file=sys.stderr)
        raise
    finally:
        processes.stop_all()
        if args.keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results.sort(key=lambda f: f.number)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if panels:
        write_plot(plot, panels)
    setting = Setting(
        mode="quick" if args.quick else "full",
        revision=revision,
        ssh_version=ssh_version(),
        ssh_skipped_because=skipped,
        ssh_login=None if ssh is None else _describe_login(ssh),
        ssh_cipher=None if ssh is None else ssh.cipher,
        elapsed_seconds=time.monotonic() - started,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        cpu_pressure=_pressure_share(pressure_before, time.monotonic() - started),
    )
    write_markdown(markdown, results, setting, plot if panels else None, REPO)
    if args.json:
        args.json.write_text(json.dumps([asdict(f) for f in results], indent=2) + "\n")
    for figure in results:
        verdict = {None: "-", True: "met", False: "MISSED"}[figure.met]
        print(
            f"{figure.number}  {figure.cmdgate:>28}  {figure.ssh:>24}  {figure.ratio:>14}  "
            f"{figure.target}: {verdict}"
        )
    _say(
        f"wrote {markdown} and {plot if panels else 'no plot'} in "
        f"{(time.monotonic() - started) / 60:.1f} min"
    )
    return 0


def _pressure_share(before: float | None, elapsed: float) -> float | None:
    after = cpu_pressure_total()
    if before is None or after is None or elapsed <= 0:
        return None
    return 100 * (after - before) / elapsed


def _record_with_py_spy(output: Path, pid: int, processes: Processes, workdir: Path) -> None:
    """Sample the agent (the thread holding the GIL) until it is stopped."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    formats = {".svg": "flamegraph", ".json": "speedscope", ".txt": "raw"}
    argv = [spy, "record", "--pid", str(pid), "--rate", "200", "--threads", "--gil"]
    argv += ["--format", formats.get(output.suffix, "raw"), "--output", str(output)]
    # py-spy writes its profile when interrupted
    processes.start("py-spy", argv, workdir / "py-spy.log", stop_signal=signal.SIGINT)


def _describe_login(ssh: SshEndpoint) -> str:
    user = ssh.user
    if user.how == "native":
        return f"as `{user.name}`, whose login shell is `/bin/sh`"
    if user.how == "namespace":
        return (
            f"as `{user.name}` with login shell `/bin/sh` (sshd runs in a private mount "
            "namespace that sees a copy of /etc/passwd; nothing system-wide is changed)"
        )
    return f"as `{user.name}`, whose login shell `{user.shell}` could not be replaced by /bin/sh"


if __name__ == "__main__":
    sys.exit(main())
