"""The main job's figure: step time and bytes saved for backward against tokens, fused vs unfused."""

from pathlib import Path

COLORS = {"vera": "tab:blue", "lora": "tab:orange", "deep_lora": "tab:green", "lorma": "tab:red"}


def _rank_style(rank: int, ranks: list[int]) -> dict:
    # Two ranks of one family share a colour: the higher one gets hollow markers and a thinner line.
    if sorted(ranks).index(rank) % 2 == 0:
        return {}
    return {"markerfacecolor": "white", "linewidth": 1.0}


def _style(rec: dict) -> dict:
    if rec["fused"]:
        style = {"linestyle": "-", "marker": "o"}
        if rec.get("gemm_mode") == "split":
            style = {"linestyle": "-.", "marker": "D"}
    elif rec["impl"].startswith("peft"):
        style = {"linestyle": "--", "marker": "s"}
    else:
        style = {"linestyle": ":", "marker": "x"}
    return {**style, "color": COLORS.get(rec["family"], "black"), "markersize": 5, "linewidth": 1.6}


def plot(records: list[dict], comparisons: list[dict], path: Path) -> Path:
    """Writes a PNG, one row per (dtype, layer shape), log-log against tokens: step time, bytes saved
    for backward, and the step-time ratio fused / unfused of every row of ``comparisons``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    panels = sorted({(r["dtype"], r["in_features"], r["out_features"]) for r in ok})
    nrows = max(1, len(panels))
    n_lines = len({(r["impl"], r["r"], r.get("gemm_mode")) for r in ok})
    legend_rows = -(-n_lines // 3)
    height = 4.2 * nrows + 0.8 + 0.22 * legend_rows
    fig, axes = plt.subplots(nrows, 3, figsize=(17.0, height), squeeze=False)
    device = ok[0]["device"].upper() if ok else "?"
    device_name = ok[0]["device_name"] if ok else "?"
    fused_backends = sorted({r["backend"] for r in ok if r["fused"]})
    handles = {}
    for row, (dtype, n, m) in enumerate(panels):
        here = [r for r in ok if (r["dtype"], r["in_features"], r["out_features"]) == (dtype, n, m)]
        lines = sorted({(r["impl"], r["r"], r.get("gemm_mode")) for r in here}, key=str)
        for impl, rank, mode in lines:
            pts = sorted((r for r in here if (r["impl"], r["r"], r.get("gemm_mode")) == (impl, rank, mode)),
                         key=lambda r: r["tokens"])
            label = f"{pts[0]['label']} r={rank}" + (f" gemm={mode}" if mode else "")
            tokens = [p["tokens"] for p in pts]
            ranks = sorted({r["r"] for r in here if r["family"] == pts[0]["family"]})
            style = {**_style(pts[0]), **_rank_style(rank, ranks)}
            for col, values in ((0, [p["step_ms"] for p in pts]), (1, [p["saved_bytes"] / 1e6 for p in pts])):
                (h,) = axes[row][col].plot(tokens, values, label=label, **style)
            handles.setdefault(label, h)
        for col, ylabel in ((0, "step time, forward + backward (ms)"), (1, "saved for backward (MB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            kind = "time" if col == 0 else "memory"
            ax.set_title(f"{kind}: {n}x{m}, {dtype}, measured on {device}", fontsize=10)
        ax = axes[row][2]
        pairs = [c for c in comparisons if (c["dtype"], c["in_features"], c["out_features"]) == (dtype, n, m)]
        def line(c):
            return c["fused"], c["unfused"], c["r"], c["fused_backend"]

        for fused, unfused, rank, backend in sorted({line(c) for c in pairs}):
            pts = sorted((c for c in pairs if line(c) == (fused, unfused, rank, backend)), key=lambda c: c["tokens"])
            family = pts[0]["family"]
            ranks = sorted({c["r"] for c in pairs if c["family"] == family})
            style = {"color": COLORS.get(family, "black"), "marker": "o", "markersize": 4, "linewidth": 1.4,
                     "linestyle": "--" if unfused.startswith("PEFT") else ":", **_rank_style(rank, ranks)}
            ax.plot([c["tokens"] for c in pts], [c["step_time_ratio"] for c in pts],
                    label=f"{fused} / {unfused} r={rank}" + (f" [{backend}]" if "gemm" in backend else ""), **style)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("step time fused / unfused (< 1: fused faster)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"time ratio: {n}x{m}, {dtype}, measured on {device}", fontsize=10)
        if pairs:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(
        f"pefttriton fused vs unfused, measured on {device}: {device_name}\n"
        f"fused backend: {', '.join(fused_backends) or 'n/a'}; baselines: torch eager / PEFT"
        + ("  (CPU figures, not GPU)" if device == "CPU" else ""),
        fontsize=11,
    )
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=min(3, max(1, len(handles))), fontsize=9, frameon=False)
    bottom = (0.15 + 0.22 * legend_rows) / height
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.55 / height))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
