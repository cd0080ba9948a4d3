"""Small statistics for the speed benchmarks: medians, ratio intervals over prompts, formatting.

Ratios are summarised on the log scale (a 2x speed-up and a 2x slow-down are symmetric): the
geometric mean with a 95% t-interval over prompts, plus the median.
"""
from __future__ import annotations

import math
import statistics


def median(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def ratio_summary(ratios) -> dict:
    """{'n', 'median', 'geomean', 'lo', 'hi'} for per-prompt ratios; lo/hi is a 95% t-interval of
    the geometric mean (NaN with fewer than two prompts)."""
    rs = [r for r in ratios if r is not None and r > 0 and not math.isnan(r)]
    if not rs:
        return {"n": 0, "median": float("nan"), "geomean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    logs = [math.log(r) for r in rs]
    mu = statistics.fmean(logs)
    if len(rs) < 2:
        lo = hi = float("nan")
    else:
        hw = _t975(len(rs) - 1) * statistics.stdev(logs) / math.sqrt(len(rs))
        lo, hi = math.exp(mu - hw), math.exp(mu + hw)
    return {"n": len(rs), "median": statistics.median(rs), "geomean": math.exp(mu), "lo": lo, "hi": hi}


def mean_ci(xs) -> tuple[float, float]:
    """Mean and half-width of a 95% t-interval (NaN half-width for fewer than two values)."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, _t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def fmt_ratio(s: dict, digits: int = 2) -> str:
    if s["n"] == 0:
        return "-"
    interval = "" if math.isnan(s["lo"]) else f" [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"
    return f"{s['geomean']:.{digits}f}x{interval} (med {s['median']:.{digits}f}, n={s['n']})"


def fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
