"""PNG charts for benchmark results (matplotlib, headless).

Charts are drawn from the JSON a benchmark just wrote, never from numbers kept
aside, so a chart cannot disagree with the figures beside it. matplotlib is in
the `bench` extra (`make bench` installs it); without it a benchmark still
prints and writes JSON and says the charts were skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.common import RESULTS_DIR

Series = Mapping[str, Sequence[tuple[float, float]]]
"""Label -> (x, y) points, drawn as one line with markers each."""


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def line_chart(
    name: str,
    title: str,
    xlabel: str,
    ylabel: str,
    series: Series,
    *,
    logx: bool = False,
    logy: bool = False,
    note: str = "",
    hlines: Mapping[str, float] | None = None,
) -> Path | None:
    """Write `bench/results/<name>.png`; None when matplotlib is missing.

    `note` goes under the title (the machine and run it came from: a chart
    copied out of context should still say what it measured). `hlines` are
    labelled horizontal references (a target, a baseline's figure).
    """
    if not available():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    try:
        for label, points in series.items():
            pts = sorted(points)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for label, y in (hlines or {}).items():
            ax.axhline(y, linestyle="--", linewidth=1, color="grey")
            ax.annotate(label, xy=(0.01, y), xycoords=("axes fraction", "data"), fontsize=8)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=8)
        fig.tight_layout()
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}.png"
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def bar_chart(
    name: str,
    title: str,
    ylabel: str,
    bars: Mapping[str, Mapping[str, float]],
    *,
    note: str = "",
    logy: bool = False,
) -> Path | None:
    """Write `bench/results/<name>.png`: one bar per label at its median, min-max as error bar.

    `bars` maps a label to a spread (`{"median", "min", "max"}`, as bench.common.spread
    returns): a noisy machine's figure is a range, and the chart shows it.
    """
    if not available():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(bars)
    medians = [bars[k]["median"] for k in labels]
    low = [bars[k]["median"] - bars[k]["min"] for k in labels]
    high = [bars[k]["max"] - bars[k]["median"] for k in labels]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    try:
        ax.bar(labels, medians, yerr=[low, high], capsize=4, color="tab:blue", alpha=0.8)
        for x, y in enumerate(medians):
            ax.annotate(
                f"{y:,.0f}" if y >= 100 else f"{y:.2f}",
                (x, y),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        if logy:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}.png"
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
