"""The all-to-all cost model fitted to measurements, and what it predicts (pure functions).

``fit_alltoall`` fits ``t = call + latency·(ep - 1) + V_intra/B_intra + V_inter/B_inter`` to
measured flat all-to-alls (volumes per rank from the real layout); ``all_to_all_flat_seconds``
and ``all_to_all_hierarchical_seconds`` (DESIGN.md §10) evaluate it; ``predictions`` compares
the two up to a given EP size; ``load_fit`` reads the fit of a ``python -m benchmarks cluster``
result and ``fitted_assumptions`` maps it onto the parameters of :mod:`.layer`'s model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from benchmarks.cost_model.checks import nonneg_float, nonneg_volume, positive_float, positive_int

FIT_MODEL = ("t = call + latency·messages + intra_bytes / intra_bw + inter_bytes / inter_bw "
             "(least squares on the relative error)")
FIT_TERMS = ("call", "message", "intra", "inter")


def alltoall_volumes(volume_bytes: float, ep: int, ranks_per_node: int
                     ) -> tuple[int, float, float]:
    """``(messages, intra_bytes, inter_bytes)`` of one rank in a balanced flat all-to-all over
    ``ep`` ranks packed onto nodes of ``G = ranks_per_node``, the rank's send buffer ``V =
    volume_bytes`` (own chunk included, ``V/ep`` per destination, as nccl-tests counts it):
    ``ep - 1`` messages, ``V·(min(ep, G) - 1)/ep`` bytes to ranks of its node and
    ``V·(ep - min(ep, G))/ep`` to other nodes. ``ep > G`` must be a multiple of G."""
    v = nonneg_volume("volume_bytes", volume_bytes)
    positive_int("ep", ep)
    g = positive_int("ranks_per_node", ranks_per_node)
    if ep > g and ep % g:
        raise ValueError(f"ep {ep} above ranks_per_node {g} must be a multiple of it "
                         f"(EP ranks packed onto full nodes)")
    intra = min(ep, g)
    return ep - 1, v * (intra - 1) / ep, v * (ep - intra) / ep

def _fit_rows(points: list[dict], g: int) -> list[dict]:
    """Checked copies of the points of :func:`fit_alltoall`, each with its ``messages``,
    ``intra_bytes`` and ``inter_bytes`` (given, else :func:`alltoall_volumes`)."""
    rows = []
    for i, p in enumerate(points):
        if not isinstance(p, dict):
            raise ValueError(f"points[{i}] must be a dict, got {type(p).__name__}")
        ep = positive_int(f"points[{i}].ep", p.get("ep"))
        if ep < 2:
            raise ValueError(f"points[{i}].ep must be >= 2 (an all-to-all between ranks), "
                             f"got {ep}")
        volume = positive_float(f"points[{i}].bytes", p.get("bytes"))
        seconds = positive_float(f"points[{i}].seconds", p.get("seconds"))
        explicit = [k for k in ("messages", "intra_bytes", "inter_bytes") if k in p]
        if explicit and len(explicit) < 3:
            raise ValueError(f"points[{i}] gives {explicit}: messages, intra_bytes and "
                             f"inter_bytes go together")
        if explicit:
            m = positive_int(f"points[{i}].messages", p["messages"])
            vi = nonneg_volume(f"points[{i}].intra_bytes", p["intra_bytes"])
            vx = nonneg_volume(f"points[{i}].inter_bytes", p["inter_bytes"])
        else:
            m, vi, vx = alltoall_volumes(volume, ep, g)
        rows.append({"ep": ep, "bytes": volume, "seconds": seconds, "messages": m,
                     "intra_bytes": vi, "inter_bytes": vx})
    if not rows:
        raise ValueError("points is empty: nothing to fit")
    return rows


def _solve(rows: list[dict]):
    """``(terms, coefficients, predicted, relative errors)`` of the least-squares fit on the
    relative error over the terms the rows determine (:func:`fit_alltoall`)."""
    import numpy as np

    col = {"call": [1.0] * len(rows), "message": [float(r["messages"]) for r in rows],
           "intra": [r["intra_bytes"] for r in rows], "inter": [r["inter_bytes"] for r in rows]}
    terms = [t for t in FIT_TERMS
             if (t == "call" and len(set(col["message"])) > 1) or t == "message"
             or (t in ("intra", "inter") and any(v > 0 for v in col[t]))]
    a = np.array([[col[t][j] for t in terms] for j in range(len(rows))], dtype=np.float64)
    t_meas = np.array([r["seconds"] for r in rows], dtype=np.float64)
    scale = np.abs(a).max(axis=0)
    weighted = a / t_meas[:, None] / scale
    coef, _, rank, _ = np.linalg.lstsq(weighted, np.ones(len(rows)), rcond=None)
    if rank < len(terms):
        raise ValueError(
            f"points do not determine the terms {terms}: {len(rows)} point(s) of rank {rank}; "
            f"measure more volumes per EP size (and two EP sizes for a per-call latency)")
    coef = coef / scale
    pred = a @ coef
    return terms, dict(zip(terms, (float(v) for v in coef))), pred, (pred - t_meas) / t_meas


def _fitted_gbps(c: dict, term: str, warnings: list[str]) -> float | None:
    """GB/s of a fitted slope ``c[term]`` (s/B); None, with a warning, when it is <= 0."""
    if term not in c:
        return None
    if c[term] <= 0:
        warnings.append(f"fitted {term} slope {c[term]:.3g} s/B <= 0: the points show no "
                        f"{term}-node bandwidth cost; {term}_gbps left None")
        return None
    return 1.0 / c[term] / 1e9


def fit_alltoall(points: list[dict], ranks_per_node: int) -> dict:
    """Fit the flat all-to-all cost model, linear in its parameters,

        t = call + latency·m + V_intra·β_intra + V_inter·β_inter,

    to measured ``points`` (dicts with ``ep``, ``bytes`` = one rank's send buffer, ``seconds`` =
    one all-to-all, slowest rank; optionally ``messages``, ``intra_bytes``, ``inter_bytes`` from
    the real layout, else :func:`alltoall_volumes` with ``ranks_per_node``). ``m = ep - 1``
    messages per rank; ``call`` is a fixed cost per call, ``latency`` one per peer message;
    bandwidth ``= 1/β``. Least squares on the relative error (every row of the system divided
    by its measured ``t``, solved by ``numpy.linalg.lstsq`` on unit-scaled columns), so short
    and long transfers weigh alike. A term the points cannot determine is left out: ``inter``
    (``inter_gbps`` None) when no point sends across nodes, ``intra`` when none sends within a
    node, and ``call`` (``call_us`` None; ``latency_us`` then holds the whole fixed cost, per
    message) when every point has the same message count.

    Returns ``{"model", "ranks_per_node", "terms", "call_us", "latency_us", "intra_gbps",
    "inter_gbps", "coefficients", "rel_rms", "max_rel_error", "points", "warnings"}``: ``rel_rms
    = sqrt(mean(((pred - t)/t)²))``, ``max_rel_error = max |pred - t|/t`` over the points, each
    point with its ``predicted_s`` and ``rel_error``; a fitted slope <= 0 gives a bandwidth of
    None and a warning. ValueError naming the bad field of a bad point, a bad
    ``ranks_per_node``, no points, or points that do not determine the terms.
    """
    import numpy as np

    g = positive_int("ranks_per_node", ranks_per_node)
    rows = _fit_rows(points, g)
    terms, c, pred, rel = _solve(rows)
    warnings: list[str] = []
    intra_gbps, inter_gbps = _fitted_gbps(c, "intra", warnings), _fitted_gbps(c, "inter", warnings)
    for term in ("call", "message"):
        if c.get(term, 0.0) < 0:
            warnings.append(f"fitted {term} latency {c[term] * 1e6:.3g} us < 0")
    for r, p_s, e in zip(rows, pred, rel):
        r.update(predicted_s=float(p_s), rel_error=float(e))
    return {
        "model": FIT_MODEL,
        "ranks_per_node": g,
        "terms": terms,
        "call_us": c["call"] * 1e6 if "call" in c else None,
        "latency_us": c["message"] * 1e6,
        "intra_gbps": intra_gbps,
        "inter_gbps": inter_gbps,
        "coefficients": {"call_s": c.get("call"), "message_s": c["message"],
                         "intra_s_per_byte": c.get("intra"), "inter_s_per_byte": c.get("inter")},
        "rel_rms": float(np.sqrt(np.mean(rel ** 2))),
        "max_rel_error": float(np.max(np.abs(rel))),
        "points": rows,
        "warnings": warnings,
    }


def _transfer_seconds(volume: float, gbps: float | None, what: str) -> float:
    """``volume / bandwidth`` over the ``what`` ("intra"/"inter") link; ``gbps`` must be given
    when ``volume > 0``."""
    if volume == 0:
        return 0.0
    if gbps is None:
        raise ValueError(f"{what}_gbps is needed: this all-to-all sends {volume:g} B {what}-node")
    return volume / (positive_float(f"{what}_gbps", gbps) * 1e9)


def _phase_seconds(messages: int, volume: float, gbps: float | None, what: str,
                   latency_us: float, call_us: float) -> float:
    """One all-to-all phase on one link: ``call + latency·messages + volume / bandwidth`` (0
    with no messages)."""
    if messages == 0:
        return 0.0
    return (call_us + latency_us * messages) * 1e-6 + _transfer_seconds(volume, gbps, what)


def all_to_all_flat_seconds(volume_bytes: float, ep: int, ranks_per_node: int,
                            latency_us: float, intra_gbps: float | None,
                            inter_gbps: float | None = None, call_us: float = 0.0) -> float:
    """One flat all-to-all in :func:`fit_alltoall`'s model: with ``V = volume_bytes`` (a rank's
    send buffer), ``G = min(ep, ranks_per_node)``,

        t = call + latency·(ep - 1) + V·(G - 1)/ep / B_intra + V·(ep - G)/ep / B_inter

    seconds (the link times add: no overlap of NVLink and network is assumed, unlike
    :func:`all_to_all_seconds`). ``inter_gbps`` may be None when ``ep <= ranks_per_node``."""
    nonneg_float("latency_us", latency_us)
    nonneg_float("call_us", call_us)
    m, vi, vx = alltoall_volumes(volume_bytes, ep, ranks_per_node)
    if m == 0:
        return 0.0
    return ((call_us + latency_us * m) * 1e-6 + _transfer_seconds(vi, intra_gbps, "intra")
            + _transfer_seconds(vx, inter_gbps, "inter"))


def all_to_all_hierarchical_seconds(volume_bytes: float, ep: int, ranks_per_node: int,
                                    latency_us: float, intra_gbps: float | None,
                                    inter_gbps: float | None = None,
                                    call_us: float = 0.0) -> float:
    """One hierarchical all-to-all (DESIGN.md §10) in :func:`fit_alltoall`'s model, over ``ep``
    ranks on ``n = ep / G`` nodes of ``G = ranks_per_node`` ranks, ``V = volume_bytes`` per rank:

      1. intra-node all-to-all of the whole volume over the G ranks of the node (rank ``g``
         receives the rows bound for local rank ``g`` of every node):
         ``call + latency·(G - 1) + V·(G - 1)/G / B_intra``;
      2. ``n - 1`` inter-node messages to the same local rank of every other node, each G times
         a flat message (``G·V/ep``): ``call + latency·(n - 1) + V·(n - 1)/n / B_inter``.

    The inter-node volume equals the flat one (``V·(ep - G)/ep``); the exchange trades
    ``ep - G - n + 1`` fewer messages for ``V·(G - 1)·(1/G - 1/ep)`` more intra-node bytes and
    one more call. With ``ep <= G`` (one node) or ``G = 1`` it is the flat all-to-all."""
    nonneg_float("latency_us", latency_us)
    nonneg_float("call_us", call_us)
    v = nonneg_volume("volume_bytes", volume_bytes)
    alltoall_volumes(v, ep, ranks_per_node)  # validates ep against ranks_per_node
    g = ranks_per_node
    if ep <= g or g == 1:
        return all_to_all_flat_seconds(v, ep, g, latency_us, intra_gbps, inter_gbps, call_us)
    n = ep // g
    return (_phase_seconds(g - 1, v * (g - 1) / g, intra_gbps, "intra", latency_us, call_us)
            + _phase_seconds(n - 1, v * (n - 1) / n, inter_gbps, "inter", latency_us, call_us))

def load_fit(path: str | Path) -> dict:
    """The ``fit`` of a cluster bench result JSON (``python -m benchmarks cluster``).
    ValueError when the file has none or its fit failed."""
    data = json.loads(Path(path).read_text())
    fit = data.get("fit") if isinstance(data, dict) else None
    if not isinstance(fit, dict):
        raise ValueError(f"{path} holds no 'fit' (not a cluster bench result?)")
    if fit.get("error"):
        raise ValueError(f"{path}: its all-to-all fit failed: {fit['error']}")
    return fit


def fitted_assumptions(fit: dict) -> dict:
    """The cost-model parameters a :func:`fit_alltoall` result gives: ``gpus_per_node`` (its
    ranks per node), ``nvlink_gbps`` (intra-node bandwidth), ``ib_gbps`` (inter-node),
    ``latency_us`` (per call) and ``message_latency_us`` (per peer message). Parameters the fit
    left None or fitted <= 0 are absent (the caller keeps its default for them)."""
    out = {"gpus_per_node": fit.get("ranks_per_node"), "nvlink_gbps": fit.get("intra_gbps"),
           "ib_gbps": fit.get("inter_gbps"), "latency_us": fit.get("call_us"),
           "message_latency_us": fit.get("latency_us")}
    return {k: v for k, v in out.items() if v is not None and v > 0}


def _pow2_range(lo: int, hi: int) -> list[int]:
    out, v = [], 1
    while v <= hi:
        if v >= lo:
            out.append(v)
        v *= 2
    return out


def _prediction_bandwidths(fit: dict, inter_gbps: Optional[float]
                           ) -> Optional[tuple[float, str, float, str]]:
    """``(intra GB/s, its source, inter GB/s, its source)`` of :func:`predictions`: the fitted
    ones, the inter-node one else ``inter_gbps`` else the intra-node one (and the reverse);
    None when the fit has neither."""
    intra = fit["intra_gbps"]
    if fit["inter_gbps"] is not None:
        inter, inter_src = fit["inter_gbps"], "fitted"
    elif inter_gbps is not None:
        inter, inter_src = inter_gbps, "--predict-inter-gbps"
    else:
        inter, inter_src = intra, "ASSUMED = intra-node (no inter-node point measured)"
    intra_src = "fitted"
    if intra is None:
        intra, intra_src = inter, f"ASSUMED = inter-node ({inter_src})"
    if intra is None:
        return None
    return intra, intra_src, inter, inter_src


def predictions(fit: dict, volume_bytes: float, ep_max: int, measured: Mapping[int, float],
                inter_gbps: Optional[float] = None) -> dict:
    """Flat and hierarchical all-to-all times predicted by ``fit`` at ``volume_bytes`` per
    rank for EP sizes up to ``ep_max`` (powers of 2 and the measured sizes that suit the fitted
    G), beside the measured time where there is one (``measured``: ep -> seconds), and which
    wins. Inter-node bandwidth: ``fit``'s, else ``inter_gbps``, else the intra-node one."""
    g = fit["ranks_per_node"]
    latency, call = max(fit["latency_us"], 0.0), max(fit["call_us"] or 0.0, 0.0)
    bandwidths = _prediction_bandwidths(fit, inter_gbps)
    if bandwidths is None:
        return {"error": "the fit gave no usable bandwidth (see its warnings)"}
    intra, intra_src, inter, inter_src = bandwidths
    eps = sorted({*_pow2_range(2, ep_max), *(e for e in measured if e <= ep_max)})
    rows = []
    for ep in eps:
        if ep > g and ep % g:
            continue
        flat = all_to_all_flat_seconds(volume_bytes, ep, g, latency, intra, inter, call)
        hier = all_to_all_hierarchical_seconds(volume_bytes, ep, g, latency, intra, inter,
                                                  call)
        winner = ("same (one node)" if ep <= g or g == 1 else
                  "hierarchical" if hier < flat else "flat")
        row = {"ep": ep, "nodes": max(1, ep // g), "flat_s": flat, "hierarchical_s": hier,
               "winner": winner, "measured_s": measured.get(ep)}
        if row["measured_s"]:
            row["rel_error"] = (flat - row["measured_s"]) / row["measured_s"]
        rows.append(row)
    multi = [r for r in rows if r["ep"] > g and g > 1]
    hier_wins = [r["ep"] for r in multi if r["winner"] == "hierarchical"]
    flat_wins = [r["ep"] for r in multi if r["winner"] == "flat"]
    if not multi:
        verdict = f"every predicted EP size fits one node of {g}: flat and hierarchical agree"
    else:
        verdict = (f"across nodes (G={g}): flat wins at ep {flat_wins or 'none'}, "
                   f"hierarchical at ep {hier_wins or 'none'}")
    return {"volume_bytes": volume_bytes, "ranks_per_node": g, "latency_us": latency,
            "call_us": call, "intra_gbps": intra, "inter_gbps": inter,
            "intra_source": intra_src, "inter_source": inter_src, "rows": rows,
            "verdict": verdict}


