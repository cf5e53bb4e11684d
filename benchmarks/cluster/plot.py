"""The cluster report's PNG: sweep bandwidth, dispatch ratios, layer efficiency and the flat vs
hierarchical predictions."""

from __future__ import annotations

from pathlib import Path

from benchmarks.cluster.units import size as _size
from benchmarks.plotting import pyplot, save_figure


def _plot_sweep(ax, rec: dict) -> None:
    """Sweep bus bandwidth per send-buffer size, one line per EP size."""
    for ep in rec["config"]["ep_sizes"]:
        pts = [r for r in rec["results"].get("sweep", []) if r["ep"] == ep]
        if pts:
            ax.plot([r["bytes"] for r in pts], [r["busbw_gbps"] for r in pts], "o-",
                    label=f"ep {ep}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("send buffer per rank (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title("all_to_all_single sweep", fontsize=9)


def _plot_dispatch(ax, rec: dict) -> None:
    """Dispatch forward+backward time over raw, one bar per variant."""
    labels, ratios = [], []
    for r in rec["results"].get("dispatch", []):
        for kind, v in r["variants"].items():
            if kind != "raw":
                labels.append(f"ep{r['ep']} {r['routing']}\n{kind}")
                ratios.append(v["fwd_bwd"]["ratio"])
    ax.bar(range(len(ratios)), ratios, color="C1")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=60)
    ax.set_ylabel("ours / raw all-to-all (fwd+bwd)")
    ax.set_title("dispatch overhead", fontsize=9)


def _plot_layer(ax, rec: dict) -> None:
    """Layer efficiency vs EP size, weak and strong."""
    for mode, style in (("weak", "o-"), ("strong", "s--")):
        pts = [r for r in rec["results"].get("layer", {}).get("rows", []) if r["mode"] == mode]
        if pts:
            ax.plot([r["ep"] for r in pts], [r["efficiency"] for r in pts], style, label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("EP size")
    ax.set_ylabel("efficiency vs ep 1")
    ax.set_ylim(bottom=0)
    ax.set_title("MoE layer forward+backward", fontsize=9)


def _plot_predictions(ax, rec: dict) -> None:
    """Flat vs hierarchical predictions (and the measured points)."""
    pred = rec.get("predictions")
    if pred and "error" not in pred:
        eps = [r["ep"] for r in pred["rows"]]
        ax.plot(eps, [r["flat_s"] * 1e3 for r in pred["rows"]], "o-", label="flat (model)")
        ax.plot(eps, [r["hierarchical_s"] * 1e3 for r in pred["rows"]], "s--",
                label="hierarchical (model)")
        meas = [(r["ep"], r["measured_s"]) for r in pred["rows"] if r["measured_s"]]
        if meas:
            ax.plot([e for e, _ in meas], [s * 1e3 for _, s in meas], "k^", label="measured")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"one all-to-all of {_size(pred['volume_bytes'])}/rank, "
                     f"G={pred['ranks_per_node']} (inter: "
                     f"{pred['inter_source'].split(' (')[0]})",
                     fontsize=9)
    ax.set_xlabel("EP size")
    ax.set_ylabel("ms")


def plot_report(rec: dict, path: Path) -> bool:
    """Sweep bus bandwidth, dispatch ratios, layer efficiency and the flat vs hierarchical
    predictions as one PNG; False (with a message) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, draw in zip((axes[0][0], axes[0][1], axes[1][0], axes[1][1]),
                        (_plot_sweep, _plot_dispatch, _plot_layer, _plot_predictions)):
        draw(ax, rec)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    topo = rec["topology"]
    fig.suptitle(f"cluster bench: {topo['nodes']} node(s) x {topo['ranks_per_node']} ranks, "
                 f"{topo['backend']}, {topo['device']}, {rec['date']}", fontsize=10)
    save_figure(fig, path, dpi=110)
    return True
