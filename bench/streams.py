"""Which CUDA streams a profiled step's kernels ran on, and how long kernels of different
streams ran at once: whether the split path's side stream (``kernels.tuning.split_overlap``,
``split_parallel``) overlapped anything. Used by ``profile_step.py``; no GPU needed to test."""
from __future__ import annotations

from collections import Counter, defaultdict


def stream_summary(events) -> str:
    """A few lines from ``torch.profiler`` events: per stream, its kernels and busy time (the
    union of its kernels' intervals), then the time at least two streams were busy together.
    ``events``: objects with ``device_type``, ``device_resource_id`` (the stream of a kernel),
    ``time_range.start``/``.end`` (µs) and ``name``, as ``prof.events()`` yields."""
    from torch.autograd import DeviceType

    intervals: dict[int, list[tuple[float, float]]] = defaultdict(list)
    names: dict[int, Counter] = defaultdict(Counter)
    for e in events:
        if e.device_type == DeviceType.CUDA:
            intervals[e.device_resource_id].append((e.time_range.start, e.time_range.end))
            names[e.device_resource_id][e.name] += 1
    if not intervals:
        return "no CUDA kernels in the profile"
    lines = []
    sweep = []
    for sid in sorted(intervals):
        merged = _union(intervals[sid])
        busy = sum(b - a for a, b in merged)
        top = ", ".join(f"{n[:40]} x{c}" for n, c in names[sid].most_common(3))
        lines.append(f"stream {sid}: {len(intervals[sid])} kernels, busy {busy / 1e3:.3f} ms ({top})")
        sweep += [(a, 1) for a, _ in merged] + [(b, -1) for _, b in merged]
    together, active, last = 0.0, 0, None
    for t, step in sorted(sweep, key=lambda p: (p[0], p[1])):  # ends before starts at a tie
        if active >= 2:
            together += t - last
        active += step
        last = t
    lines.append(f"kernels of two or more streams at once: {together / 1e3:.3f} ms")
    return "\n".join(lines)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]
