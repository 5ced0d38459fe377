"""The seven figures of issue 6, each measured against a live agent (and sshd where it applies).

Each function returns a ``Figure``: the formatted cells of its table row, the
target verdict, notes and the raw numbers. Every figure is a median over
repeated runs; where cmdgate and ssh are compared, their runs alternate
(A B A B) and the ratio is the median of the per-pair (or per-round) ratios,
so that drift on a noisy machine cancels out.
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from agents import (
    DENIED_COMMAND,
    STREAM_BYTES,
    BenchLab,
    RunningAgent,
    extra_config,
    launch_agent,
    script,
    wait_until_serving,
)
from grpc import aio
from openssh import SshEndpoint, start_master
from processes import Processes, free_ports, run_quietly, wait_exact

from cmdgate.client import Exited, Output
from cmdgate.shared.wire import AUTHORIZATION_KEY, BEARER_PREFIX
from cmdgate.v1 import agent_pb2, agent_pb2_grpc

MIB = 1 << 20
# Figure 7: the agent's RSS wobbles from one burst of 500 runs to the next (glibc arenas
# of gRPC's threads; about +-8 MiB on a 2-core machine) without trending up. Growth is
# the later half of the repeats against the earlier half, and counts past this much.
RSS_TOLERANCE_BYTES = 8 * MIB
RSS_TOLERANCE_FRACTION = 0.10


@dataclass(frozen=True)
class Scale:
    """How many repetitions each figure gets."""

    latency_rounds: int  # 1: rounds of interleaved pairs
    latency_pairs: int  # 1: pairs per round
    process_pairs: int  # 2: pairs of whole processes
    denial_rounds: int  # 3
    denial_seconds: float  # 3: length of one round
    stream_pairs: int  # 4
    sleep_repeats: int  # 5 and 7 (at least 3)
    fanout_pairs: int  # 6


QUICK = Scale(3, 100, 15, 3, 1.5, 2, 3, 6)
FULL = Scale(5, 400, 100, 5, 3.0, 5, 6, 30)


@dataclass
class Figure:
    """One row of the table, with its notes and raw numbers."""

    number: int
    title: str
    cmdgate: str
    ssh: str
    ratio: str
    target: str
    met: bool | None  # None: not judged (no ssh baseline, or report-only)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def _ratio(value: float) -> str:
    return f"{value:.2f}×"


def _timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(what)


def _process(argv: list[str], env: dict[str, str] | None = None) -> Callable[[], None]:
    """A function that runs ``argv`` once and raises unless it exits 0."""

    def run() -> None:
        if run_quietly(argv, env) != 0:
            # once more with its stderr, for a useful message (bounded by the timeout)
            again = subprocess.run(
                argv, env=env, capture_output=True, text=True, check=False, timeout=120
            )
            raise RuntimeError(
                f"{' '.join(argv)[:200]} failed; run again: exit {again.returncode}: "
                f"{again.stderr.strip()[-3000:]}"
            )

    return run


def _busy() -> float:
    """CPU-seconds the whole machine has spent busy since boot (all cores)."""
    times = psutil.cpu_times()
    return float(times.user + times.nice + times.system + times.irq + times.softirq)


def _cpu_of_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- 1: API latency


def api_latency(
    lab: BenchLab,
    agent: RunningAgent,
    ssh: SshEndpoint | None,
    processes: Processes,
    workdir: Path,
    scale: Scale,
) -> tuple[Figure, dict[str, list[float]]]:
    """Approved /bin/true through the Python API on one channel vs ssh via a ControlMaster."""
    samples: dict[str, list[float]] = {"cmdgate (Python API, one TLS channel)": []}
    rounds: list[dict[str, float]] = []
    with lab.client(agent.port) as client:

        def cmdgate_true() -> None:
            _check(client.run("true").ok, "cmdgate true did not exit 0")

        ssh_true: Callable[[], None] | None = None
        logins_before = 0
        if ssh is not None:
            start_master(ssh, processes, workdir / "controlmaster.log")
            ssh_true = _process(ssh.multiplexed("true"))
            samples["ssh (ControlMaster)"] = []
            for _ in range(10):
                ssh_true()
            logins_before = ssh.logins()
        for _ in range(50):
            cmdgate_true()
        for _ in range(scale.latency_rounds):
            a: list[float] = []
            b: list[float] = []
            for _ in range(scale.latency_pairs):
                a.append(_timed(cmdgate_true))
                if ssh_true is not None:
                    b.append(_timed(ssh_true))
            one = {"cmdgate_p50": median(a), "cmdgate_p99": percentile(a, 99)}
            if b:
                one |= {"ssh_p50": median(b), "ssh_p99": percentile(b, 99)}
                one["ratio_p50"] = one["cmdgate_p50"] / one["ssh_p50"]
                one["ratio_p99"] = one["cmdgate_p99"] / one["ssh_p99"]
            rounds.append(one)
            samples["cmdgate (Python API, one TLS channel)"] += a
            if b:
                samples["ssh (ControlMaster)"] += b
        if ssh is not None and ssh.logins() != logins_before:
            raise RuntimeError("ssh opened new connections: the ControlMaster was not used")

    def agg(key: str) -> float:
        return median([r[key] for r in rounds])

    figure = Figure(
        1,
        "approved `/bin/true`, Python API over one TLS channel, p50 / p99 round trip "
        "(ssh: through a ControlMaster)",
        f"{_ms(agg('cmdgate_p50'))} / {_ms(agg('cmdgate_p99'))}",
        "—",
        "—",
        "p50 ≤ 0.5 × ssh",
        None,
        raw={"rounds": rounds},
    )
    if ssh is not None:
        figure.ssh = f"{_ms(agg('ssh_p50'))} / {_ms(agg('ssh_p99'))}"
        figure.ratio = f"{_ratio(agg('ratio_p50'))} / {_ratio(agg('ratio_p99'))}"
        figure.met = agg("ratio_p50") <= 0.5
    figure.notes.append(
        f"{scale.latency_rounds} rounds of {scale.latency_pairs} interleaved pairs; "
        "each value is the median over rounds of that round's percentile."
    )
    return figure, samples


# ---------------------------------------------------------------- 2: whole process


def whole_process(
    lab: BenchLab, agent: RunningAgent, ssh: SshEndpoint | None, scale: Scale
) -> tuple[Figure, dict[str, list[float]]]:
    """``cmdgate run 127.0.0.1:PORT true`` as a process vs ``ssh host true`` on a new connection."""
    cmdgate_run = _process(
        [script("cmdgate"), "run", f"127.0.0.1:{agent.port}", "true"], lab.client_env
    )
    ssh_run = None if ssh is None else _process(ssh.fresh("true"))
    for _ in range(3):
        cmdgate_run()
        if ssh_run is not None:
            ssh_run()
    a: list[float] = []
    b: list[float] = []
    for _ in range(scale.process_pairs):
        a.append(_timed(cmdgate_run))
        if ssh_run is not None:
            b.append(_timed(ssh_run))
    samples = {"cmdgate run (whole process)": a}
    figure = Figure(
        2,
        "a whole process: `cmdgate run 127.0.0.1:PORT true` (ssh: `ssh host true`, new connection)",
        f"{_ms(median(a))}",
        "—",
        "—",
        "≤ 0.6 × ssh",
        None,
        raw={"cmdgate_s": a, "ssh_s": b},
    )
    if b:
        ratio = median([x / y for x, y in zip(a, b, strict=True)])
        samples["ssh host true (new connection)"] = b
        figure.ssh = _ms(median(b))
        figure.ratio = _ratio(ratio)
        figure.met = ratio <= 0.6
    figure.notes.append(
        f"{scale.process_pairs} interleaved pairs; medians, and the median of per-pair ratios. "
        f"cmdgate p90 {_ms(percentile(a, 90))}"
        + (f", ssh p90 {_ms(percentile(b, 90))}." if b else ".")
    )
    return figure, samples


# ---------------------------------------------------------------- 3: denials


def _aio_credentials(lab: BenchLab) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=lab.ca.read_bytes(),
        private_key=lab.key.read_bytes(),
        certificate_chain=lab.cert.read_bytes(),
    )


def _metadata(lab: BenchLab) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION_KEY, BEARER_PREFIX + lab.token),)


async def _denial_rounds(
    lab: BenchLab, port: int, clients: int, rounds: int, seconds: float
) -> list[tuple[int, int, float]]:
    """Per round: (denied, anything else, elapsed seconds)."""
    credentials = _aio_credentials(lab)
    metadata = _metadata(lab)
    # a local subchannel pool per channel: otherwise gRPC shares one connection among them
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)
        for _ in range(clients)
    ]
    request = agent_pb2.RunRequest(command=DENIED_COMMAND)
    try:
        stubs = [agent_pb2_grpc.AgentStub(channel) for channel in channels]

        async def one(stub: agent_pb2_grpc.AgentAsyncStub) -> bool:
            try:
                async for _ in stub.Run(request, metadata=metadata, timeout=30):
                    pass
            except aio.AioRpcError as e:
                return e.code() == grpc.StatusCode.PERMISSION_DENIED
            return False

        await asyncio.gather(*(one(stub) for stub in stubs))  # connect and warm up
        results = []
        loop = asyncio.get_running_loop()
        for _ in range(rounds):
            start = time.perf_counter()
            outcomes = await asyncio.gather(
                *(_calls_until(one, stub, loop.time() + seconds) for stub in stubs)
            )
            elapsed = time.perf_counter() - start
            results.append((sum(d for d, _ in outcomes), sum(o for _, o in outcomes), elapsed))
        return results
    finally:
        for channel in channels:
            await channel.close()


async def _calls_until(
    call: Callable[[agent_pb2_grpc.AgentAsyncStub], Awaitable[bool]],
    stub: agent_pb2_grpc.AgentAsyncStub,
    stop_at: float,
) -> tuple[int, int]:
    """One client: call after call until ``stop_at``; (denied, anything else)."""
    loop = asyncio.get_running_loop()
    denied = other = 0
    while loop.time() < stop_at:
        if await call(stub):
            denied += 1
        else:
            other += 1
    return denied, other


class _ChildWatcher:
    """Samples the agent's child processes in a thread; keeps the largest count seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.most = 0
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> _ChildWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            self.most = max(self.most, len(self._process.children(recursive=True)))


def denials(lab: BenchLab, agent: RunningAgent, scale: Scale, clients: int = 16) -> Figure:
    """Denials per second from 16 concurrent clients, and how many processes that spawned."""
    before = agent.audit_events()
    cpu_before = agent.cpu_seconds()
    client_cpu_before = _cpu_of_self()
    with _ChildWatcher(agent.process.pid) as watcher:
        results = asyncio.run(
            _denial_rounds(lab, agent.port, clients, scale.denial_rounds, scale.denial_seconds)
        )
    agent_cpu = agent.cpu_seconds() - cpu_before
    client_cpu = _cpu_of_self() - client_cpu_before
    after = agent.audit_events()
    started = after.get("run.started", 0) - before.get("run.started", 0)
    audited = after.get("run.denied", 0) - before.get("run.denied", 0)
    denied = sum(r[0] for r in results)
    other = sum(r[1] for r in results)
    rates = [r[0] / r[2] for r in results]
    rate = median(rates)
    total_calls = denied + other + clients  # the warm-up calls were denials too
    figure = Figure(
        3,
        f"denials per second (valid token, command not permitted), {clients} concurrent "
        "clients on their own TLS connections; processes spawned meanwhile",
        f"{rate:,.0f}/s; {started} spawned",
        "—",
        "—",
        "≥ 3,000/s and 0 spawned",
        rate >= 3000 and started == 0 and watcher.most == 0 and other == 0,
        raw={
            "rounds": [{"denied": d, "other": o, "seconds": s} for d, o, s in results],
            "run_started_delta": started,
            "run_denied_delta": audited,
            "children_seen": watcher.most,
            "agent_cpu_s": agent_cpu,
            "client_cpu_s": client_cpu,
        },
    )
    figure.notes.append(
        f"{scale.denial_rounds} rounds of {scale.denial_seconds:g} s; per round "
        + ", ".join(f"{r:,.0f}/s" for r in rates)
        + f". Audit: {audited:,} `run.denied` records for {total_calls:,} calls, "
        f"{started} `run.started`; most agent children seen at once: {watcher.most}."
    )
    figure.notes.append(
        f"Agent CPU per denial: {agent_cpu / total_calls * 1e6:,.0f} µs "
        f"(so one agent core could do about {total_calls / agent_cpu:,.0f}/s); "
        f"the benchmark client used {client_cpu / total_calls * 1e6:,.0f} µs per call "
        "on the same cores."
        if agent_cpu > 0
        else "Agent CPU time not measurable."
    )
    if other:
        figure.notes.append(f"{other} calls ended some other way than PERMISSION_DENIED.")
    return figure


# ---------------------------------------------------------------- 4: streaming


def _stream_cmdgate(lab: BenchLab, port: int) -> tuple[float, int]:
    """Seconds and bytes received for one 1 GiB stream on a new channel."""
    received = 0
    exited: Exited | None = None
    start = time.perf_counter()
    with lab.client(port) as client:
        for event in client.stream("zeros"):
            if isinstance(event, Output):
                received += len(event.data)
            elif isinstance(event, Exited):
                exited = event
    elapsed = time.perf_counter() - start
    _check(
        exited is not None and exited.exit_code == 0 and not exited.truncated,
        f"cmdgate zeros did not end well: {exited}",
    )
    return elapsed, received


def _stream_ssh(ssh: SshEndpoint) -> tuple[float, int]:
    argv = ssh.fresh("head", "-c", str(STREAM_BYTES), "/dev/zero")
    received = 0
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, bufsize=0)
    assert process.stdout is not None
    fd = process.stdout.fileno()
    try:
        while chunk := os.read(fd, MIB):
            received += len(chunk)
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        process.stdout.close()
    code = wait_exact(process, 600)
    elapsed = time.perf_counter() - start
    _check(code == 0, f"ssh head exited {code}")
    return elapsed, received


def streaming(lab: BenchLab, agent: RunningAgent, ssh: SshEndpoint | None, scale: Scale) -> Figure:
    """1 GiB of stdout, MB/s (10^6 bytes), each side on a new connection, output discarded."""
    a: list[float] = []
    b: list[float] = []
    agent_cpu: list[float] = []
    client_cpu: list[float] = []
    # CPU time of the whole machine per GiB: both sides, client and server together
    machine_a: list[float] = []
    machine_b: list[float] = []
    for _ in range(scale.stream_pairs):
        cpu_before, mine_before, busy_before = agent.cpu_seconds(), _cpu_of_self(), _busy()
        elapsed, received = _stream_cmdgate(lab, agent.port)
        machine_a.append(_busy() - busy_before)
        agent_cpu.append(agent.cpu_seconds() - cpu_before)
        client_cpu.append(_cpu_of_self() - mine_before)
        _check(received == STREAM_BYTES, f"cmdgate streamed {received} bytes")
        a.append(received / elapsed / 1e6)
        if ssh is not None:
            busy_before = _busy()
            elapsed, received = _stream_ssh(ssh)
            machine_b.append(_busy() - busy_before)
            _check(received == STREAM_BYTES, f"ssh streamed {received} bytes")
            b.append(received / elapsed / 1e6)
    figure = Figure(
        4,
        "streaming 1 GiB of stdout (`head -c 1073741824 /dev/zero`), MB/s "
        "(ssh: `ssh host head -c 1G /dev/zero`, new connection)",
        f"{median(a):,.0f} MB/s",
        "—",
        "—",
        "≥ 1.5 × ssh",
        None,
        raw={
            "cmdgate_mb_s": a,
            "ssh_mb_s": b,
            "agent_cpu_s": agent_cpu,
            "client_cpu_s": client_cpu,
            "machine_cpu_s": machine_a,
            "ssh_machine_cpu_s": machine_b,
        },
    )
    if b:
        ratio = median([x / y for x, y in zip(a, b, strict=True)])
        figure.ssh = f"{median(b):,.0f} MB/s"
        figure.ratio = _ratio(ratio)
        figure.met = ratio >= 1.5
    figure.notes.append(
        f"{scale.stream_pairs} interleaved pairs; bytes counted and discarded by the client. "
        f"Per GiB: agent CPU {median(agent_cpu):.2f} s, "
        f"benchmark client (Python API) CPU {median(client_cpu):.2f} s; "
        f"the whole machine {median(machine_a):.2f} CPU-s"
        + (f" (ssh: {median(machine_b):.2f} CPU-s)." if machine_b else ".")
    )
    return figure


# ---------------------------------------------------------------- 5 and 7: concurrency, RSS


async def _sleep_wave(lab: BenchLab, port: int, count: int) -> tuple[float, list[int | None]]:
    channel = aio.secure_channel(f"127.0.0.1:{port}", _aio_credentials(lab))
    metadata = _metadata(lab)
    try:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = agent_pb2_grpc.AgentStub(channel)
        request = agent_pb2.RunRequest(command="sleep", params={"secs": "1"})

        async def one() -> int | None:
            code: int | None = None
            async for event in stub.Run(request, metadata=metadata, timeout=60):
                if event.WhichOneof("event") == "exited":
                    status = event.exited.WhichOneof("status")
                    code = event.exited.exit_code if status == "exit_code" else None
            return code

        start = time.perf_counter()
        codes = await asyncio.gather(*(one() for _ in range(count)))
        return time.perf_counter() - start, list(codes)
    finally:
        await channel.close()


def concurrent_sleeps(
    lab: BenchLab, agent: RunningAgent, scale: Scale, idle_rss: int, count: int = 500
) -> tuple[Figure, Figure]:
    """500 concurrent ``sleep 1`` runs, start to last exit; and the agent's RSS around them."""
    repeats = max(3, scale.sleep_repeats)
    before_rss = agent.rss_bytes()
    walls: list[float] = []
    rss_after: list[int] = []
    for _ in range(repeats):
        wall, codes = asyncio.run(_sleep_wave(lab, agent.port, count))
        bad = [c for c in codes if c != 0]
        _check(not bad, f"{len(bad)} of {count} sleep runs did not exit 0")
        walls.append(wall)
        time.sleep(1.0)  # let the agent settle (buffers freed, children reaped)
        rss_after.append(agent.rss_bytes())
    wall = median(walls)
    five = Figure(
        5,
        f"{count} concurrent `sleep 1` runs through the API (grpc.aio, one channel), "
        "start to the last exit",
        f"{wall:.2f} s",
        "—",
        "—",
        "≤ 1.5 s",
        wall <= 1.5,
        notes=[f"{repeats} repeats: " + ", ".join(f"{w:.2f} s" for w in walls) + "."],
        raw={"wall_s": walls},
    )
    half = len(rss_after) // 2
    earlier, later = statistics.mean(rss_after[:half]), statistics.mean(rss_after[-half:])
    growth = later - earlier
    allowed = max(RSS_TOLERANCE_BYTES, RSS_TOLERANCE_FRACTION * earlier)
    seven = Figure(
        7,
        f"agent RSS when idle, and after each repeat of item 5 ({repeats} repeats)",
        f"idle {idle_rss / MIB:.0f} MiB; after: "
        + ", ".join(f"{r / MIB:.0f}" for r in rss_after)
        + " MiB",
        "—",
        "—",
        "report; no growth over 3 repeats",
        growth <= allowed,
        notes=[
            f"Idle is right after start-up; {before_rss / MIB:.1f} MiB just before item 5 "
            f"(after items 1–4). Growth, mean of the last {half} repeats against the first "
            f"{half}: {growth / MIB:+.1f} MiB (counted as growth past {allowed / MIB:.1f} MiB; "
            f"spread between repeats {(max(rss_after) - min(rss_after)) / MIB:.1f} MiB)."
        ],
        raw={"idle_rss": idle_rss, "before_rss": before_rss, "rss_after": rss_after},
    )
    return five, seven


# ---------------------------------------------------------------- 6: fan-out


def fanout(
    lab: BenchLab, agent: RunningAgent, processes: Processes, scale: Scale, agents: int = 20
) -> Figure:
    """One ``cmdgate run`` to 20 agents on 20 ports vs the same run to 1 agent."""
    extra: list[RunningAgent] = []
    try:
        ports = free_ports(agents - 1)
        for port in ports:
            config = extra_config(lab, port)
            extra.append(launch_agent(lab, config, port, processes))
        for one in extra:
            wait_until_serving(lab, one)
        targets = ",".join(f"127.0.0.1:{p}" for p in [agent.port, *ports])
        cli = script("cmdgate")
        run_many = _process([cli, "run", targets, "true"], lab.client_env)
        run_single = _process([cli, "run", f"127.0.0.1:{agent.port}", "true"], lab.client_env)
        for _ in range(2):
            run_many()
            run_single()
        a: list[float] = []
        b: list[float] = []
        for _ in range(scale.fanout_pairs):
            a.append(_timed(run_many))
            b.append(_timed(run_single))
    finally:
        for one in extra:
            processes.stop(one.process)
    ratio = median([x / y for x, y in zip(a, b, strict=True)])
    return Figure(
        6,
        f"one `cmdgate run … true` to {agents} agents on {agents} ports, vs the same run to 1 "
        "agent (whole process each)",
        f"{_ms(median(a))} vs {_ms(median(b))}",
        "—",
        _ratio(ratio),
        "≤ 2 ×",
        ratio <= 2,
        notes=[f"{scale.fanout_pairs} interleaved pairs; the ratio is the median per pair."],
        raw={"many_s": a, "one_s": b},
    )
