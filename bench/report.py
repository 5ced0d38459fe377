"""BENCHMARKS.md and the latency plot: the figures, the machine, the versions, the date."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psutil
from figures import Figure

import cmdgate


@dataclass(frozen=True)
class Setting:
    """What the run was: mode, the ssh baseline (or why there is none), and its login shell."""

    mode: str
    revision: str  # the git revision measured, taken at the start of the run
    ssh_version: str | None
    ssh_skipped_because: str | None
    ssh_login: str | None
    ssh_cipher: str | None
    elapsed_seconds: float
    # 1-minute load averages before and after: a busy machine shows here
    load_before: float
    load_after: float
    # share of the run's time in which some runnable task waited for a CPU (PSI), if known
    cpu_pressure: float | None


def cpu_pressure_total() -> float | None:
    """Seconds in which some task waited for a CPU since boot (Linux PSI), or None."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(item.split("=", 1) for item in first.split()[1:])
    return int(fields["total"]) / 1e6 if "total" in fields else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision(repo: Path) -> str:
    """The short commit of ``repo``, and whether tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" with uncommitted changes" if dirty else "")


def _readme_link(report: Path, repo: Path) -> str:
    readme = repo / "bench" / "README.md"
    if report.parent.resolve().is_relative_to(repo):
        return f"[bench/README.md]({os.path.relpath(readme, report.parent)})"
    # a report written outside the repo should not point into this machine's folders
    return "`bench/README.md` in the cmdgate repository"


def _verdict(met: bool | None) -> str:
    if met is None:
        return "—"
    return "yes" if met else "**no**"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def write_markdown(
    path: Path,
    figures: Sequence[Figure],
    setting: Setting,
    plot: Path | None,
    repo: Path,
) -> None:
    """Write the report to ``path``; ``plot`` is linked relative to it."""
    memory = psutil.virtual_memory().total / (1 << 30)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks: cmdgate next to OpenSSH",
        "",
        f"Written by `bench/run.py` ({setting.mode} run, {setting.elapsed_seconds / 60:.1f} min) "
        f"on {now}. Client, agent and sshd share one machine and talk over loopback. "
        f"How to run it and what each figure means: {_readme_link(path, repo)}.",
        "",
        "| # | figure | cmdgate | ssh | ratio (cmdgate ÷ ssh) | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        cells = [str(f.number), f.title, f.cmdgate, f.ssh, f.ratio, f.target, _verdict(f.met)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "## Notes", ""]
    for f in figures:
        for note in f.notes:
            lines.append(f"- **{f.number}.** {note}")
    lines.append("")
    if setting.ssh_skipped_because:
        lines += [f"ssh columns skipped: {setting.ssh_skipped_because}", ""]
    else:
        lines += [
            f"The ssh baseline is a private sshd on a loopback port with throwaway ed25519 keys, "
            f"logging in {setting.ssh_login}; default algorithms "
            f"(server-to-client cipher negotiated: `{setting.ssh_cipher}`).",
            "",
        ]
    if plot is not None:
        relative = os.path.relpath(plot, path.parent)
        lines += [
            "## Latency distributions (items 1 and 2)",
            "",
            f"![latency CDFs]({relative})",
            "",
        ]
    lines += [
        "## Machine and versions",
        "",
        f"- CPU: {_cpu_model()}, {psutil.cpu_count(logical=True)} logical cores "
        f"({psutil.cpu_count(logical=False) or '?'} physical)",
        f"- memory: {memory:.1f} GiB",
        f"- load average (1 min) before the run {setting.load_before:.2f}, "
        f"after it {setting.load_after:.2f}"
        + (
            f"; CPU pressure during the run (PSI `some`, the benchmark itself included): "
            f"{setting.cpu_pressure:.0f} %"
            if setting.cpu_pressure is not None
            else ""
        ),
        f"- kernel: {platform.system()} {platform.release()}; cgroups: {_cgroup_layout()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- grpcio {grpc.__version__}",
        f"- OpenSSH: {setting.ssh_version or 'not installed'}",
        f"- cmdgate {cmdgate.__version__}, git {setting.revision}",
        f"- date: {now}",
        "",
    ]
    path.write_text("\n".join(lines))


def _cgroup_layout() -> str:
    """Whether runs' cgroups are v2 only, or their pids limit needs a join to cgroup v1."""
    v1_pids = v2 = False
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fstype, _, options = line.partition(" - ")[2].partition(" ")
            v2 = v2 or fstype == "cgroup2"
            v1_pids = v1_pids or (fstype == "cgroup" and "pids" in options.split()[-1].split(","))
    if v2 and v1_pids:
        return (
            "hybrid (the pids controller is on cgroup v1: each run's child joins a v1 cgroup "
            "before execve, which waits for an RCU grace period after an idle moment; see "
            "bench/README.md)"
        )
    return "cgroup v2" if v2 else "no cgroup v2"


def write_plot(path: Path, panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]]) -> None:
    """Latency CDFs side by side, one panel per (title, {label: seconds})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    def major(value: float, _: int) -> str:
        return f"{value:g}"

    def minor_labels(every: bool) -> FuncFormatter:
        # over several decades, 2 and 5 of each are enough; within one, label them all
        def label(value: float, _: int) -> str:
            mantissa = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
            return f"{value:g}" if every or round(mantissa) in (2, 5) else ""

        return FuncFormatter(label)

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        values = [s for seconds in series.values() for s in seconds if s > 0]
        narrow = bool(values) and max(values) / min(values) < 10
        for label, seconds in series.items():
            if not seconds:
                continue
            xs = sorted(s * 1000 for s in seconds)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(major))
        ax.xaxis.set_minor_formatter(minor_labels(narrow))
        ax.set_xlabel("round trip, ms (log scale)")
        ax.set_ylabel("fraction of runs ≤ x")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
