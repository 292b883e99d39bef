"""train_gpt.py, run unchanged, plus a CUDA profile of a few training steps on rank 0: GPU time by kernel kind
and the communication (NCCL all-reduce, all-gather, ...) per step, split into the part hidden under compute
kernels and the part the GPU runs with nothing else beside it (exposed: it lengthens the step).

    PROFILE=1 NPROC_PER_NODE=8 MAX_WALLCLOCK_SECONDS=120 bash run.sh record

run.sh launches this file instead of train_gpt.py when PROFILE=1. PROFILE_AT (default 10): the first profiled
optimizer step counted after the compile warm-up; PROFILE_STEPS (default 2): how many. Only rank 0 records (the
others run as usual). The result is a `profile:` log line and logs/<RUN_ID>_profile.json (and the Chrome trace
logs/<RUN_ID>_profile_trace.json.gz, for chrome://tracing or Perfetto); the run then goes on as usual.
"""
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
import torch  # noqa: E402

import bench  # noqa: E402
import train_gpt as T  # noqa: E402

COLLECTIVES = ("AllReduce", "AllGather", "ReduceScatter", "Broadcast", "SendRecv", "AllToAll")
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # Chrome-trace categories that occupy the GPU


def union(intervals):
    """Sorted, disjoint (start, end) covering the given intervals."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [tuple(iv) for iv in out]


def covered(intervals, cover):
    """Length of `intervals` (disjoint, sorted) lying inside `cover` (disjoint, sorted)."""
    total, j = 0.0, 0
    for a, b in intervals:
        while j < len(cover) and cover[j][1] <= a:
            j += 1
        k = j
        while k < len(cover) and cover[k][0] < b:
            total += min(b, cover[k][1]) - max(a, cover[k][0])
            k += 1
    return total


def collective(name):
    """The NCCL collective a kernel runs (AllReduce, ...), or None for any other kernel."""
    if "nccl" not in name.lower():
        return None
    return next((c for c in COLLECTIVES if c.lower() in name.lower()), "other")


def summarize(events, steps):
    """Per-step GPU ms from (name, start_us, duration_us) GPU events: busy time, compute by kernel kind, and per
    NCCL collective its kernel time, the part overlapped by compute kernels and the exposed rest."""
    compute = union((s, s + d) for n, s, d in events if collective(n) is None)
    busy = union((s, s + d) for _, s, d in events)
    per = lambda us: round(us / 1000 / steps, 3)
    kinds, comm = {}, {}
    for n, s, d in events:
        c = collective(n)
        if c is None:
            kind = bench.kernel_kind(n)
            kinds[kind] = kinds.get(kind, 0.0) + d
        else:
            comm.setdefault(c, []).append((s, s + d))
    out = dict(steps=steps, gpu_busy_ms=per(sum(b - a for a, b in busy)),
               gpu_span_ms=per(max((s + d for _, s, d in events), default=0) - min((s for _, s, _ in events), default=0)),
               compute_ms_by_kind={k: per(v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}, comm={})
    for c, ivs in sorted(comm.items()):
        u = union(ivs)
        length = sum(b - a for a, b in u)
        hidden = covered(u, compute)
        out["comm"][c] = dict(calls=round(len(ivs) / steps, 1), ms=per(length), overlapped_ms=per(hidden),
                              exposed_ms=per(length - hidden))
    all_comm = union(iv for ivs in comm.values() for iv in ivs)
    comm_us = sum(b - a for a, b in all_comm)
    out["comm_ms"], out["comm_exposed_ms"] = per(comm_us), per(comm_us - covered(all_comm, compute))
    return out


def trace_events(path):
    """(name, start_us, duration_us) of the GPU work in a Chrome trace written by torch.profiler."""
    with open(path) as fh:
        trace = json.load(fh)
    return [(e["name"], float(e["ts"]), float(e["dur"])) for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") in GPU_WORK]


class StepProfiler:
    """Wraps Trainer.warmup (counting starts after it) and Trainer.step (rank 0 profiles steps at..at+n-1)."""

    def __init__(self, at, steps):
        self.at, self.steps, self.n, self.run, self.h, self.prof = at, steps, -1, None, None, None
        self.step, self.warmup, self.start_run = T.Trainer.step, T.Trainer.warmup, T.start_run
        T.start_run = self._start_run
        T.Trainer.warmup = lambda trainer, *args: self._warmup(trainer, *args)  # functions: bound to the trainer
        T.Trainer.step = lambda trainer, *args: self._step(trainer, *args)

    def _start_run(self, h, log):
        self.h, self.run = h, self.start_run(h, log)
        return self.run

    def _warmup(self, trainer, *args):
        self.warmup(trainer, *args)
        self.n = 0

    def _step(self, trainer, *args):
        if self.n < 0 or self.run.rank != 0:
            return self.step(trainer, *args)
        n, self.n = self.n, self.n + 1
        if n == self.at:
            self.run.sync()
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.run.is_cuda else [])
            self.prof, self.t0 = torch.profiler.profile(activities=activities), time.perf_counter()
            self.prof.__enter__()
        out = self.step(trainer, *args)
        if n == self.at + self.steps - 1:
            self.run.sync()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.report(n, wall)
        return out

    def report(self, last, wall):
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "trace.json")
            self.prof.export_chrome_trace(raw)
            res = dict(event="profile", first_step=self.at, world_size=self.run.world,
                       wall_ms_per_step=round(1000 * wall / self.steps, 2), **summarize(trace_events(raw), self.steps))
            base = os.path.join("logs", f"{self.h.run_id}_profile")
            with open(raw, "rb") as src, gzip.open(base + "_trace.json.gz.tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(base + "_trace.json.gz.tmp", base + "_trace.json.gz")
        with open(base + ".json.tmp", "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(base + ".json.tmp", base + ".json")
        comm = ", ".join(f"{c} {v['ms']:.2f} ms ({v['exposed_ms']:.2f} exposed, {v['calls']:g} calls)"
                         for c, v in res["comm"].items()) or "none"
        self.run.log(f"profile: steps {self.at}-{last} on rank 0: {res['wall_ms_per_step']:.1f} ms/step wall, GPU busy "
                     f"{res['gpu_busy_ms']:.1f} ms; communication per step: {comm}; {base}.json")


def main():
    env = lambda name, default: int(os.environ.get(name, "").strip() or default)
    StepProfiler(env("PROFILE_AT", 10), env("PROFILE_STEPS", 2))
    sys.exit(T.cli())


if __name__ == "__main__":
    main()
