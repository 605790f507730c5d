"""A wall-clock stack sampler for host-side time (where a process's seconds go, all threads).

    sampler = StackSampler(interval_s=0.005).start()
    ...                                   # the code to look at
    print(sampler.stop().report(top=30))

cProfile sees only the thread that starts it and inflates short Python calls; the loader's work
runs on a thread pool and much of it waits on the GIL or the device. This samples every
thread's stack from a daemon thread (`sys._current_frames`) every `interval_s` and counts, per
thread group (the main thread, the others), how long each function was on the stack
(inclusive) and at the top (self). The sampler itself needs the GIL, so a thread that holds it
delays the next sample: each sample is weighted by the wall time since the previous one, not
by the nominal interval. Stdlib only: it must run before `import jax` to see the import.
"""

from __future__ import annotations

import collections
import sys
import threading
import time


def _label(code) -> str:
    path = code.co_filename
    for marker in ("site-packages/", "gemma4_jax/", "pallas_kernels/", "benchmarks/"):
        i = path.rfind(marker)
        if i >= 0:
            path = path[i + (len(marker) if marker == "site-packages/" else 0) :]
            break
    return f"{path}:{code.co_name}"


class StackSampler:
    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.inclusive = {"main": collections.Counter(), "other": collections.Counter()}
        self.self_ = {"main": collections.Counter(), "other": collections.Counter()}
        self.seconds = {"main": 0.0, "other": 0.0}  # thread-seconds sampled per group
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stack-sampler")

    def start(self) -> StackSampler:
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> StackSampler:
        self._stop.set()
        self._thread.join()
        self.wall_s = time.perf_counter() - self.t0
        return self

    def _run(self):
        main_id = threading.main_thread().ident
        me = threading.get_ident()
        last = time.perf_counter()
        while not self._stop.wait(self.interval_s):
            now = time.perf_counter()
            dt, last = now - last, now
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                group = "main" if tid == main_id else "other"
                self.seconds[group] += dt
                self.self_[group][_label(frame.f_code)] += dt
                seen = set()
                while frame is not None:
                    seen.add(_label(frame.f_code))
                    frame = frame.f_back
                for name in seen:
                    self.inclusive[group][name] += dt

    def report(self, top: int = 30) -> str:
        ms = self.interval_s * 1e3
        lines = [f"stack samples every >= {ms:.1f} ms over {self.wall_s:.2f} s wall"]
        for group in ("main", "other"):
            if not self.seconds[group]:
                continue
            lines.append(f"-- {group} thread(s): {self.seconds[group]:.2f} thread-s")
            lines.append("   inclusive s   self s   function")
            for name, t in self.inclusive[group].most_common(top):
                lines.append(f"   {t:11.2f} {self.self_[group][name]:8.2f}   {name}")
            lines.append("   by self time:")
            for name, t in self.self_[group].most_common(max(1, top // 2)):
                lines.append(f"   {self.inclusive[group][name]:11.2f} {t:8.2f}   {name}")
        return "\n".join(lines)
