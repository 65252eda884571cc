"""A small in-process CPU profiler for every thread (py-spy is not installed here).

Every ``interval_s`` a daemon thread reads each thread's CPU ticks from /proc/self/task and its
Python stack from ``sys._current_frames()``, and charges the CPU the thread used since the last
sample to that stack. Statistically this is a CPU profile across threads (cProfile sees one
thread only, and inflates small calls). Resolution is the kernel's clock tick (10 ms).
"""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _thread_ticks(tid: int) -> int:
    try:
        raw = Path(f"/proc/self/task/{tid}/stat").read_text()
    except OSError:
        return 0
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _where(code: Any) -> str:
    name = code.co_filename
    for marker in ("/site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in name:
            name = name.split(marker, 1)[1]
            break
    return f"{name}:{code.co_name}"


class Sampler:
    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.inclusive: Counter[str] = Counter()  # ticks with the function anywhere on the stack
        self.leaf: Counter[str] = Counter()  # ticks with the function on top
        self.by_thread: Counter[str] = Counter()
        self.by_module: Counter[str] = Counter()  # leaf frame's top-level package
        self.total = 0
        self._last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            names = {t.ident: (t.name, t.native_id) for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me or ident not in names:
                    continue
                name, tid = names[ident]
                if tid is None:
                    continue
                ticks = _thread_ticks(tid)
                used = ticks - self._last.get(tid, ticks)
                self._last[tid] = ticks
                if used <= 0:
                    continue
                self.total += used
                self.by_thread[_thread_kind(name)] += used
                seen: set[str] = set()
                top = _where(frame.f_code)
                self.leaf[top] += used
                self.by_module[top.split("/", 1)[0].split(":", 1)[0]] += used
                f: Any = frame
                while f is not None:
                    key = _where(f.f_code)
                    if key not in seen:
                        seen.add(key)
                        self.inclusive[key] += used
                    f = f.f_back

    def report(self, top: int = 40) -> dict[str, Any]:
        def seconds(counter: Counter[str]) -> list[tuple[str, float]]:
            return [(k, round(v / CLK_TCK, 2)) for k, v in counter.most_common(top)]

        return {
            "sampled_cpu_s": round(self.total / CLK_TCK, 2),
            "by_thread": seconds(self.by_thread),
            "by_leaf_module": seconds(self.by_module),
            "inclusive": seconds(self.inclusive),
            "leaf": seconds(self.leaf),
        }


def _thread_kind(name: str) -> str:
    """Group worker threads by pool: 'asyncio_3' -> 'asyncio', 'ThreadPoolExecutor-0_1' -> ..."""
    base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
    return base.split(" (", 1)[0]
