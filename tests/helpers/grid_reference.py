"""The documented rank layout, written out independently of ``grid_groups``: every valid grid
of small worlds, and the groups each axis forms (ranks sharing every other coordinate).

Dense rank ``tp + TP·(cp + CP·(dp + DP·pp))``; expert rank ``etp + ETP·(ep + EP·(edp + EDP·pp))``.
"""

import itertools
from collections import defaultdict

WORLDS = (1, 2, 3, 4, 6, 8, 16)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _configs():
    """Every valid (world, tp, cp, ep, etp, pp) for the worlds above."""
    for world in WORLDS:
        ds = _divisors(world)
        for tp, cp, ep, etp, pp in itertools.product(ds, repeat=5):
            if world % (tp * cp * pp) == 0 and world % (etp * ep * pp) == 0:
                yield world, tp, cp, ep, etp, pp


CONFIGS = list(_configs())


def dense_coords(world, tp, cp, pp, order="dp-pp"):
    """rank -> (tp, cp, dp, pp) coordinates from the documented encoding (or dp/pp swapped)."""
    dp = world // (tp * cp * pp)
    out = {}
    for t, c, d, p in itertools.product(range(tp), range(cp), range(dp), range(pp)):
        outer = d + dp * p if order == "dp-pp" else p + pp * d
        r = t + tp * (c + cp * outer)
        out[r] = (t, c, d, p)
    return out


def expert_coords(world, ep, etp, pp):
    """rank -> (etp, ep, edp, pp) coordinates: rank = etp + ETP*(ep + EP*(edp + EDP*pp))."""
    edp = world // (etp * ep * pp)
    return {t + etp * (e + ep * (d + edp * p)): (t, e, d, p)
            for t, e, d, p in itertools.product(range(etp), range(ep), range(edp), range(pp))}


def groups_varying(coords, vary):
    """Ranks sharing every coordinate outside ``vary`` form one group."""
    buckets = defaultdict(list)
    for r, c in coords.items():
        buckets[tuple(x for i, x in enumerate(c) if i not in vary)].append(r)
    return sorted(sorted(g) for g in buckets.values())


def reference(world, tp, cp, ep, etp, pp, order="dp-pp"):
    d, e = dense_coords(world, tp, cp, pp, order), expert_coords(world, ep, etp, pp)
    return {"tp": groups_varying(d, {0}), "cp": groups_varying(d, {1}),
            "dp": groups_varying(d, {2}), "dp_cp": groups_varying(d, {1, 2}),
            "pp": groups_varying(d, {3}), "etp": groups_varying(e, {0}),
            "ep": groups_varying(e, {1}), "edp": groups_varying(e, {2}),
            "tp_ep": groups_varying(e, {0, 1}), "stage": groups_varying(d, {0, 1, 2})}
