"""Resident memory of a whole `flwr run` process tree, sampled while it runs.

`flwr run` starts a detached SuperLink, which starts the simulation, which starts Ray and its actors;
they are not all children of one process, so a process belongs to the run when its environment holds
the run's FLWR_HOME (every one of them inherits it). Each sample sums the resident set (RSS) of all of
them; the peak of those sums is the tree's peak, and each process's own peak is kept by its role.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil

MIB = 1024 * 1024


def role(cmdline: list[str]) -> str:
    """A short name for what a process of the run is (SuperLink, simulation, Ray part, node actor...)."""
    text = " ".join(cmdline)
    for marker, name in (
        ("flower-superlink", "superlink"),
        ("flwr-simulation", "simulation + ServerApp"),
        ("flwr-serverapp", "ServerApp"),
        ("gcs_server", "ray gcs_server"),
        ("raylet", "ray raylet"),
        ("dashboard", "ray dashboard"),
        ("log_monitor", "ray log_monitor"),
        ("monitor.py", "ray monitor"),
        ("ray::ClientAppActor", "node actor"),
        ("default_worker.py", "ray worker"),
        ("flwr run", "flwr CLI"),
    ):
        if marker in text:
            return name
    return cmdline[0].rsplit("/", 1)[-1] if cmdline else "?"


@dataclass
class TreeMemory:
    """Samples the run's processes every ``interval`` seconds in a thread, until stopped."""

    flwr_home: str
    interval: float = 0.2
    peak_total: int = 0
    peaks: dict[str, int] = field(default_factory=dict)  # role -> highest RSS of one process
    counts: dict[str, int] = field(default_factory=dict)  # role -> processes seen
    _seen: set[tuple[int, str]] = field(default_factory=set)  # (pid, role): a Ray worker renames itself
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _members(self) -> list[tuple[psutil.Process, str]]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.environ().get("FLWR_HOME") == self.flwr_home:
                    found.append((proc, role(proc.info["cmdline"] or [])))
            except (psutil.Error, OSError):
                continue
        return found

    def sample(self) -> None:
        """One sample: add up the RSS of every process of the run now."""
        total = 0
        for proc, name in self._members():
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.peaks[name] = max(self.peaks.get(name, 0), rss)
            if (proc.pid, name) not in self._seen:
                self._seen.add((proc.pid, name))
                self.counts[name] = self.counts.get(name, 0) + 1
        self.peak_total = max(self.peak_total, total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def start(self) -> TreeMemory:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
