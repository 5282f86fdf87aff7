"""Arrival traces for the simulator: steady, bursty, diurnal, or read from a file.

A trace is a list of `TraceRequest`s sorted by arrival time. The generators
are seeded, so a (kind, rate, duration, seed) tuple always gives the same trace.
Files are CSV (header `arrival_s,prompt_tokens,output_tokens`; `timestamp` is
accepted for the first column) or JSONL with the same keys, one request a line.
Timestamps are shifted so that the first request arrives at 0.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace."""

    arrival_s: float  # seconds since the trace began
    prompt_tokens: int  # prompt length
    output_tokens: int  # tokens to generate (the simulator runs each to exactly this many)


@dataclass(frozen=True, slots=True)
class TokenMix:
    """Prompt and output lengths: log-normal around a median, clipped.

    Args:
        prompt_median, prompt_sigma, prompt_min, prompt_max: prompt tokens.
        output_median, output_sigma, output_min, output_max: generated tokens.
    """

    prompt_median: float = 128.0
    prompt_sigma: float = 0.5
    prompt_min: int = 16
    prompt_max: int = 512
    output_median: float = 48.0
    output_sigma: float = 0.5
    output_min: int = 8
    output_max: int = 192

    def sample(self, rng: random.Random) -> tuple[int, int]:
        p = int(round(self.prompt_median * math.exp(rng.gauss(0.0, self.prompt_sigma))))
        o = int(round(self.output_median * math.exp(rng.gauss(0.0, self.output_sigma))))
        return min(max(p, self.prompt_min), self.prompt_max), min(max(o, self.output_min), self.output_max)


def _thinned_poisson(rate_at: Callable[[float], float], peak_rate: float, duration_s: float, rng: random.Random, mix: TokenMix) -> list[TraceRequest]:
    """Non-homogeneous Poisson arrivals by thinning (Lewis and Shedler)."""
    out: list[TraceRequest] = []
    if peak_rate <= 0:
        return out
    t = 0.0
    while True:
        t += rng.expovariate(peak_rate)
        if t >= duration_s:
            return out
        accept = rng.random() * peak_rate < rate_at(t)
        p, o = mix.sample(rng)  # drawn either way: lengths do not depend on the thinning
        if accept:
            out.append(TraceRequest(t, p, o))


def steady_trace(rate: float, duration_s: float, seed: int = 0, mix: TokenMix = TokenMix()) -> list[TraceRequest]:
    """Poisson arrivals at `rate` requests/s."""
    _check(rate=rate, duration_s=duration_s)
    return _thinned_poisson(lambda t: rate, rate, duration_s, random.Random(seed), mix)


def bursty_trace(
    rate: float,
    duration_s: float,
    seed: int = 0,
    *,
    base_fraction: float = 0.15,
    mean_on_s: float = 120.0,
    mean_off_s: float = 480.0,
    mix: TokenMix = TokenMix(),
) -> list[TraceRequest]:
    """On/off bursts: Poisson at `rate` (the peak) while on, at `base_fraction * rate` while off.

    On and off periods last exponentially distributed times (means `mean_on_s`,
    `mean_off_s`), starting off; the pattern is drawn from the seed.
    """
    _check(rate=rate, duration_s=duration_s, mean_on_s=mean_on_s, mean_off_s=mean_off_s)
    if not 0 <= base_fraction <= 1:
        raise ValueError(f"base_fraction must be in [0, 1], got {base_fraction}")
    rng = random.Random(seed)
    edges: list[tuple[float, bool]] = []  # (start, is_on)
    t, on = 0.0, False
    while t < duration_s:
        edges.append((t, on))
        t += rng.expovariate(1.0 / (mean_on_s if on else mean_off_s))
        on = not on

    def rate_at(x: float) -> float:
        lo, hi = 0, len(edges) - 1
        while lo < hi:  # last edge starting at or before x
            mid = (lo + hi + 1) // 2
            if edges[mid][0] <= x:
                lo = mid
            else:
                hi = mid - 1
        return rate if edges[lo][1] else rate * base_fraction

    return _thinned_poisson(rate_at, rate, duration_s, rng, mix)


def diurnal_trace(
    rate: float,
    duration_s: float,
    seed: int = 0,
    *,
    period_s: float = 3600.0,
    trough_fraction: float = 0.1,
    mix: TokenMix = TokenMix(),
) -> list[TraceRequest]:
    """A sinusoidal rate between `trough_fraction * rate` and `rate` (the peak), starting at the trough."""
    _check(rate=rate, duration_s=duration_s, period_s=period_s)
    if not 0 <= trough_fraction <= 1:
        raise ValueError(f"trough_fraction must be in [0, 1], got {trough_fraction}")
    lo = rate * trough_fraction

    def rate_at(t: float) -> float:
        return lo + (rate - lo) * 0.5 * (1.0 - math.cos(2.0 * math.pi * t / period_s))

    return _thinned_poisson(rate_at, rate, duration_s, random.Random(seed), mix)


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a CSV or JSONL trace of (arrival_s or timestamp, prompt_tokens, output_tokens)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows: Iterable[dict] = (json.loads(line) for line in text.splitlines() if line.strip())
    else:
        rows = csv.DictReader(text.splitlines())
    out = []
    for i, row in enumerate(rows, start=1):
        try:
            t = float(row["arrival_s"] if "arrival_s" in row else row["timestamp"])
            p, o = int(row["prompt_tokens"]), int(row["output_tokens"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}: request {i}: need arrival_s (or timestamp), prompt_tokens, output_tokens: {e}"
            ) from None
        if p < 1 or o < 1 or not math.isfinite(t):
            raise ValueError(f"{path}: request {i}: token counts must be >= 1 and the time finite")
        out.append(TraceRequest(t, p, o))
    if not out:
        raise ValueError(f"trace file {path} holds no requests")
    out.sort(key=lambda r: r.arrival_s)
    t0 = out[0].arrival_s
    return [TraceRequest(r.arrival_s - t0, r.prompt_tokens, r.output_tokens) for r in out]


def make_trace(kind: str, rate: float, duration_s: float, seed: int = 0) -> list[TraceRequest]:
    """A trace by name (steady, bursty, diurnal) or from a file path."""
    if kind == "steady":
        return steady_trace(rate, duration_s, seed)
    if kind == "bursty":
        return bursty_trace(rate, duration_s, seed)
    if kind == "diurnal":
        return diurnal_trace(rate, duration_s, seed, period_s=min(3600.0, duration_s))
    if Path(kind).suffix or Path(kind).exists():
        return load_trace(kind)
    raise ValueError(f"unknown trace {kind!r}: expected steady, bursty, diurnal or a .csv/.jsonl file")


def _check(**values: float) -> None:
    for name, v in values.items():
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive number, got {v}")
