"""CPU time from /proc: the whole machine's, and each live process's (benchmarks share the machine)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy, from /proc/stat (0 where it is unreadable)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    busy = sum(f[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """One live process: its parent, its session and the CPU seconds it has used (user + system)."""

    ppid: int
    sid: int
    cpu_s: float


def process_stats() -> dict[int, ProcStat]:
    """Every live process by pid, from /proc/<pid>/stat (processes that exit meanwhile are skipped)."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        out[int(name)] = ProcStat(int(fields[1]), int(fields[3]), (int(fields[11]) + int(fields[12])) / hz)
    return out
