"""The machine's load during a run, from /proc (a run taken under load is rejected)."""

from __future__ import annotations

import os
import time


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime in clock ticks) for every live process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        out[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    return out


def _busy_ticks() -> int:
    with open("/proc/stat") as fh:
        parts = fh.readline().split()[1:]
    vals = [int(x) for x in parts]
    return sum(vals) - vals[3] - vals[4]  # all but idle and iowait


class LoadMonitor:
    """Samples the machine while the benchmark runs: the 1-minute load average, and how
    much CPU went to processes *outside* this run's process tree ("foreign" CPU). A run
    whose foreign share is above ``contended_share`` of the cores is labelled contended:
    its timings are not benchmark figures. Processes that exit between two samples lose
    their last partial interval (counted as foreign), so the foreign share is an upper
    bound."""

    def __init__(self, interval_s: float = 2.0, contended_share: float = 0.10):
        import threading

        self.interval_s = interval_s
        self.contended_share = contended_share
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.ncpu = os.cpu_count() or 1
        self.hz = os.sysconf("SC_CLK_TCK")

    def _ours(self, table: dict) -> dict[int, int]:
        root = os.getpid()
        mine, changed = {root}, True
        while changed:
            changed = False
            for pid, (ppid, _) in table.items():
                if ppid in mine and pid not in mine:
                    mine.add(pid)
                    changed = True
        return {pid: table[pid][1] for pid in mine if pid in table}

    def _run(self) -> None:
        prev_t, prev_busy = time.time(), _busy_ticks()
        prev_ours = self._ours(_proc_table())
        while not self._stop.wait(self.interval_s):
            now, busy = time.time(), _busy_ticks()
            ours = self._ours(_proc_table())
            d_ours = sum(v - prev_ours.get(p, 0) for p, v in ours.items())
            wall = now - prev_t
            with open("/proc/loadavg") as fh:
                load1 = float(fh.read().split()[0])
            total = (busy - prev_busy) / self.hz
            foreign = max(0.0, total - d_ours / self.hz)
            self.samples.append(
                {
                    "t": now,
                    "load1": load1,
                    "ours_cores": d_ours / self.hz / wall,
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
