"""The main job's figure, one row per (dtype, layer shape), against tokens: step time and bytes saved
for backward of every implementation (fused adapters once per strategy), the step-time ratio
fused (auto) / unfused, and auto's step time over the best strategy's.

Ratios sit on log axes, each point the median of the per-round ratios (the two timings of a round
were taken one after the other) with error bars from their first to their third quartile: a
ratio of positive times is positive, so no bar reaches 0, however noisy the run. Rows without
per-round figures fall back to the median ratio with its noise as a factor (ratio / (1 + s),
ratio * (1 + s), s the relative half-IQR), positive too."""

from pathlib import Path

COLORS = {"vera": "tab:blue", "lora": "tab:orange", "deep_lora": "tab:green", "lorma": "tab:red"}
# Fused adapters: one line style per strategy (auto solid).
STRATEGY_STYLES = {
    "auto": {"linestyle": "-", "marker": "o"},
    "fused": {"linestyle": (0, (5, 1)), "marker": "D"},
    "split": {"linestyle": "-.", "marker": "v"},
    "lean": {"linestyle": (0, (3, 1, 1, 1, 1, 1)), "marker": "^"},
    "weight": {"linestyle": (0, (1, 1)), "marker": "P"},
}


def _rank_style(rank: int, ranks: list[int]) -> dict:
    # Two ranks of one family share a colour: the higher one gets hollow markers and a thinner line.
    if sorted(ranks).index(rank) % 2 == 0:
        return {}
    return {"markerfacecolor": "white", "linewidth": 1.0}


def _style(rec: dict) -> dict:
    if rec["fused"]:
        style = dict(STRATEGY_STYLES.get(rec.get("strategy") or "auto", STRATEGY_STYLES["auto"]))
        if rec.get("strategy") not in (None, "auto"):
            style["linewidth"] = 1.0  # the named strategies are thinner than auto
    elif rec["impl"].startswith("peft"):
        style = {"linestyle": "--", "marker": "s"}
    else:
        style = {"linestyle": ":", "marker": "x"}
    return {"linewidth": 1.6, **style, "color": COLORS.get(rec["family"], "black"), "markersize": 5}


def ratio_bars(rows: list[dict], prefix: str, spread_key: str) -> tuple[list[float], list[list[float]]]:
    """(points, [lower lengths, upper lengths]) of the error bars of ``rows``' ratios: the median of the
    per-round ratios ``<prefix>_rounds_median`` between its quartiles ``_q1`` and ``_q3``, or, without
    them, ``<prefix>`` with its noise ``spread_key`` as a factor. Every bar's lower end is above 0."""
    points, lower, upper = [], [], []
    for row in rows:
        if row.get(f"{prefix}_rounds_median") is not None:
            mid, lo, hi = (row[f"{prefix}_rounds_{k}"] for k in ("median", "q1", "q3"))
        else:
            mid = row[prefix]
            factor = 1.0 + (row.get(spread_key) or 0.0) / mid
            lo, hi = mid / factor, mid * factor
        points.append(mid)
        lower.append(mid - lo)
        upper.append(hi - mid)
    return points, [lower, upper]


def _ratio_axis(ax) -> None:
    """A log axis for ratios, labelled in plain numbers (0.8, 1, 1.25) rather than powers of 10."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=tuple(x / 10 for x in range(10, 100, 5))))
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2g}" if ax.get_ylim()[1] / ax.get_ylim()[0] < 4
                                               else ""))


def _log_tokens(ax, ylabel: str, title: str, logy: bool = True) -> None:
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)


def plot(records: list[dict], comparisons: list[dict], path: Path, strategies: list[dict] | None = None) -> Path:
    """Writes a PNG, one row per (dtype, layer shape), against tokens: step time, bytes saved for
    backward, the step-time ratio fused / unfused of the ``auto`` rows of ``comparisons`` and auto /
    best strategy of ``strategies`` (:func:`bench.report.strategy_rows`), ratios with error bars."""
    import matplotlib.pyplot as plt

    fig = figure(records, comparisons, strategies)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure(records: list[dict], comparisons: list[dict], strategies: list[dict] | None = None):
    """The figure :func:`plot` writes (a matplotlib ``Figure``; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    strategies = strategies or []

    def line_key(r):
        return r["impl"], r["r"], r.get("strategy") or ""

    panels = sorted({(r["dtype"], r["in_features"], r["out_features"]) for r in ok})
    nrows = max(1, len(panels))
    n_lines = len({line_key(r) for r in ok})
    legend_rows = -(-n_lines // 4)
    height = 4.2 * nrows + 0.8 + 0.22 * legend_rows
    fig, axes = plt.subplots(nrows, 4, figsize=(22.0, height), squeeze=False)
    device = ok[0]["device"].upper() if ok else "?"
    device_name = ok[0]["device_name"] if ok else "?"
    handles = {}
    for row, (dtype, n, m) in enumerate(panels):
        where = f"{n}x{m}, {dtype}, measured on {device}"
        here = [r for r in ok if (r["dtype"], r["in_features"], r["out_features"]) == (dtype, n, m)]
        for key in sorted({line_key(r) for r in here}):
            pts = sorted((r for r in here if line_key(r) == key), key=lambda r: r["tokens"])
            impl, rank, strategy = key
            label = f"{pts[0]['label']} r={rank}" + (f" [{strategy}]" if strategy else "")
            tokens = [p["tokens"] for p in pts]
            ranks = sorted({r["r"] for r in here if r["family"] == pts[0]["family"]})
            style = {**_style(pts[0]), **_rank_style(rank, ranks)}
            for col, values in ((0, [p["step_ms"] for p in pts]), (1, [p["saved_bytes"] / 1e6 for p in pts])):
                (h,) = axes[row][col].plot(tokens, values, label=label, **style)
            handles.setdefault(label, h)
        _log_tokens(axes[row][0], "step time, forward + backward (ms)", f"time: {where}")
        _log_tokens(axes[row][1], "saved for backward (MB)", f"memory: {where}")

        ax = axes[row][2]
        pairs = [c for c in comparisons if (c["dtype"], c["in_features"], c["out_features"]) == (dtype, n, m)
                 and c.get("strategy") in (None, "auto")]

        def pair(c):
            return c["fused"], c["unfused"], c["r"]

        for fused, unfused, rank in sorted({pair(c) for c in pairs}):
            pts = sorted((c for c in pairs if pair(c) == (fused, unfused, rank)), key=lambda c: c["tokens"])
            family = pts[0]["family"]
            ranks = sorted({c["r"] for c in pairs if c["family"] == family})
            style = {"color": COLORS.get(family, "black"), "marker": "o", "markersize": 4, "linewidth": 1.4,
                     "linestyle": "--" if unfused.startswith("PEFT") else ":", "capsize": 3, **_rank_style(rank, ranks)}
            mids, yerr = ratio_bars(pts, "step_time_ratio", "step_time_ratio_spread")
            ax.errorbar([c["tokens"] for c in pts], mids, yerr=yerr, label=f"{fused} / {unfused} r={rank}", **style)
        ax.axhline(1.0, color="black", linewidth=0.8)
        _log_tokens(ax, "step time fused (auto) / unfused (< 1: fused faster)", f"time ratio: {where}", logy=False)
        _ratio_axis(ax)
        if pairs:
            ax.legend(fontsize=7, loc="best")

        ax = axes[row][3]
        rows = [s for s in strategies if (s["dtype"], s["in_features"], s["out_features"]) == (dtype, n, m)
                and s["auto_over_best"] is not None]
        for adapter, rank in sorted({(s["adapter"], s["r"]) for s in rows}):
            pts = sorted((s for s in rows if (s["adapter"], s["r"]) == (adapter, rank)), key=lambda s: s["tokens"])
            family = pts[0]["family"]
            ranks = sorted({s["r"] for s in rows if s["family"] == family})
            mids, yerr = ratio_bars(pts, "auto_over_best", "auto_over_best_spread")
            ax.errorbar([s["tokens"] for s in pts], mids, yerr=yerr, label=f"{adapter} r={rank}",
                        color=COLORS.get(family, "black"), marker="o", markersize=4, linewidth=1.4, capsize=3,
                        **_rank_style(rank, ranks))
            for s, mid in zip(pts, mids):  # which strategy was fastest, at each point
                ax.annotate(s["best"], (s["tokens"], mid), fontsize=6, textcoords="offset points",
                            xytext=(3, 3), color=COLORS.get(family, "black"))
        if rows:
            ax.axhline(rows[0]["target"], color="tab:red", linewidth=0.8, linestyle="--",
                       label=f"target {rows[0]['target']:g}")
            ax.legend(fontsize=7, loc="best")
        ax.axhline(1.0, color="black", linewidth=0.8)
        _log_tokens(ax, "step time auto / best strategy (labels: best)", f"auto vs best strategy: {where}", logy=False)
        _ratio_axis(ax)
    fused_strategies = sorted({r.get("strategy") for r in ok if r["fused"] and r.get("strategy")})
    fig.suptitle(
        f"pefttriton fused vs unfused, measured on {device}: {device_name}\n"
        f"fused strategies: {', '.join(fused_strategies) or 'n/a'}; baselines: torch eager / PEFT"
        + ("  (CPU figures, not GPU)" if device == "CPU" else ""),
        fontsize=11,
    )
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=min(4, max(1, len(handles))), fontsize=9, frameon=False)
    bottom = (0.15 + 0.22 * legend_rows) / height
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.55 / height))
    return fig
