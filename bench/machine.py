"""The machine's CPU from /proc: the one sampler the quality benchmark and bench/ use.

``busy_ticks`` is the machine's busy CPU time (/proc/stat), ``processes`` every process's
CPU time, parent and RSS (/proc/<pid>/stat), ``TreeCPU`` what one process tree used
against the rest of the machine ("foreign" CPU), and ``LoadMonitor`` samples that for
the benchmark while it runs (a run taken under load is labelled contended). Times are in
clock ticks (``HZ`` a second).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

HZ = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def busy_ticks() -> int:
    """The machine's busy CPU ticks since boot: user, nice, system, irq, softirq and steal
    (all but idle and iowait; guest time is already inside user and nice)."""
    with open("/proc/stat") as fh:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, fh.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    ticks: int  # user + system CPU
    rss_bytes: int
    comm: str  # the kernel's name of the process (15 characters at most)


def processes() -> dict[int, ProcStat]:
    """pid -> ProcStat of every live process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: the fields start after the last ")".
        rest = raw[raw.rfind(")") + 2 :].split()
        out[int(name)] = ProcStat(
            ppid=int(rest[1]),
            ticks=int(rest[11]) + int(rest[12]),
            rss_bytes=int(rest[21]) * PAGE_BYTES,
            comm=raw[raw.find("(") + 1 : raw.rfind(")")],
        )
    return out


def cmdline(pid: int) -> list[str]:
    """The process's argv ([] once it has exited). A retitled process (setproctitle, as
    Ray's workers do) writes its title as one string: split on spaces."""
    try:
        with open(f"/proc/{pid}/cmdline") as fh:
            raw = fh.read()
    except OSError:
        return []
    argv = raw.removesuffix("\0").split("\0")
    if len(argv) == 1:
        argv = argv[0].split(" ")
    return [a for a in argv if a]


def tree_pids(table: dict[int, ProcStat], root: int) -> set[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for pid, p in table.items():
        children.setdefault(p.ppid, []).append(pid)
    tree, frontier = {root} & table.keys(), [root]
    while frontier:
        for kid in children.get(frontier.pop(), []):
            if kid not in tree:
                tree.add(kid)
                frontier.append(kid)
    return tree


class TreeCPU:
    """The CPU a process tree and the whole machine used since construction, polled.

    Each ``poll`` reads every process once. A process of the tree keeps its last reading
    after it exits; what it used after that reading counts as foreign, so the foreign
    share is an upper bound."""

    def __init__(self, root: int):
        self.root = root
        self.t0, self.busy0 = time.time(), busy_ticks()
        self.ticks_by_pid: dict[int, int] = {}

    def poll(self) -> dict[int, ProcStat]:
        """The tree's live processes now (and their CPU recorded)."""
        table = processes()
        tree = {pid: table[pid] for pid in tree_pids(table, self.root)}
        for pid, p in tree.items():
            self.ticks_by_pid[pid] = p.ticks
        return tree

    def own_ticks(self) -> int:
        return sum(self.ticks_by_pid.values())

    def foreign_share(self, wall_s: float | None = None) -> float:
        """CPU of everything outside the tree since construction, in cores, over the
        machine's cores: (machine busy - tree) / wall / cores."""
        wall = time.time() - self.t0 if wall_s is None else wall_s
        foreign = max(0, busy_ticks() - self.busy0 - self.own_ticks()) / HZ
        return foreign / max(wall, 1e-9) / (os.cpu_count() or 1)


class LoadMonitor:
    """Samples the machine while the benchmark runs: the 1-minute load average, and how
    much CPU went to processes *outside* this run's process tree ("foreign" CPU). A run
    whose foreign share is above ``contended_share`` of the cores is labelled contended:
    its timings are not benchmark figures (``TreeCPU``: the foreign share is an upper
    bound)."""

    def __init__(self, interval_s: float = 2.0, contended_share: float = 0.10):
        self.interval_s = interval_s
        self.contended_share = contended_share
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.ncpu = os.cpu_count() or 1

    def _run(self) -> None:
        tree = TreeCPU(os.getpid())
        tree.poll()
        prev_t, prev_busy, prev_ours = tree.t0, tree.busy0, tree.own_ticks()
        while not self._stop.wait(self.interval_s):
            tree.poll()
            now, busy, ours = time.time(), busy_ticks(), tree.own_ticks()
            wall = now - prev_t
            d_ours = (ours - prev_ours) / HZ
            foreign = max(0.0, (busy - prev_busy) / HZ - d_ours)
            self.samples.append(
                {
                    "t": now,
                    "load1": os.getloadavg()[0],
                    "ours_cores": d_ours / wall,
                    "foreign_cores": foreign / wall,
                }
            )
            prev_t, prev_busy, prev_ours = now, busy, ours

    def start(self) -> LoadMonitor:
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.summary()

    def summary(self) -> dict:
        s = self.samples
        if not s:
            return {"samples": 0, "contended": None}
        foreign = [x["foreign_cores"] for x in s]
        mean_foreign = sum(foreign) / len(s)
        return {
            "samples": len(s),
            "cpu_count": self.ncpu,
            "load1_mean": sum(x["load1"] for x in s) / len(s),
            "load1_max": max(x["load1"] for x in s),
            "ours_cores_mean": sum(x["ours_cores"] for x in s) / len(s),
            "foreign_cores_mean": mean_foreign,
            "foreign_cores_p90": sorted(foreign)[int(0.9 * (len(s) - 1))],
            "foreign_share": mean_foreign / self.ncpu,
            "contended": mean_foreign / self.ncpu > self.contended_share,
        }
