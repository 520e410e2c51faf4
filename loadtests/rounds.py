"""Paired rounds: how adjacent windows of two (or more) setups become one headline ratio.

On 2 shared cores a setup's rate moves between windows minutes apart, and now and then one window
collapses. So every comparison is measured in rounds: each round measures every side once, back to
back, the order reversed in every other round. The rule, the same in every bench:

1. a round where any side's rate is more than 25 % from that side's median over the rounds is run
   again once, and marked as re-run (its first try kept beside it);
2. a round that still strays after its re-run is left out;
3. the headline is the median, over the kept rounds, of each round's ratio (the lower middle of an
   even count).

Where the baseline is "what a user would write" and that has several configurations (the naive
server in fp32 and with PyTorch's dynamic int8), every round measures each of them, and the ratio is
against the faster one: the configuration with the higher median rate over the kept rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

STRAY = 0.25  # a side this far (relative) from its median makes its round run again once


def order(sides: Sequence[str], r: int) -> tuple[str, ...]:
    """The sides in the order round `r` measures them: as given in even rounds, reversed in odd ones."""
    return tuple(sides) if r % 2 == 0 else tuple(reversed(sides))


def strayed(rounds: list[dict[str, float]], tolerance: float = STRAY, sides: Sequence[str] = ("served", "naive")
            ) -> list[int]:
    """Indices of the rounds where any side's rate is more than `tolerance` (relative) from that side's median."""
    out = []
    medians = {side: statistics.median(r[side] for r in rounds) for side in sides} if rounds else {}
    for i, r in enumerate(rounds):
        if any(medians[s] and abs(r[s] - medians[s]) > tolerance * medians[s] for s in sides):
            out.append(i)
    return out


def headline(rounds: list[dict[str, Any]], tolerance: float = STRAY, sides: tuple[str, str] = ("served", "naive"),
             stray_sides: Sequence[str] | None = None) -> tuple[float | None, dict[str, Any]]:
    """The median ratio sides[0] ÷ sides[1] (lower middle of an even count) over the rounds that do not stray.

    `rounds` are the final rounds (a re-run already in place of its first try), each with every side's
    rate; a round that strays (on any of `stray_sides`, by default the two) after its re-run is left
    out. None when no round has every side.
    """
    check = tuple(stray_sides or sides)
    need = tuple(dict.fromkeys((*sides, *check)))
    full = [r for r in rounds if all(r.get(s) for s in need)]
    if not full:
        return None, {"kept": [], "left_out": []}
    out_idx = set(strayed([{s: r[s] for s in check} for r in full], tolerance, check))
    kept = [r for i, r in enumerate(full) if i not in out_idx] or full
    ratios = sorted((r[sides[0]] / r[sides[1]], k) for k, r in enumerate(kept))
    value, k = ratios[(len(ratios) - 1) // 2]
    return round(value, 4), {"kept": [r["round"] for r in kept], "left_out": [full[i]["round"] for i in sorted(out_idx)]
                             if len(kept) < len(full) else [], "median_round": kept[k]["round"]}


def against_faster(rounds: list[dict[str, Any]], ours: str, baselines: Sequence[str], tolerance: float = STRAY
                   ) -> tuple[float | None, dict[str, Any]]:
    """`headline` of `ours` ÷ the faster baseline: the one with the higher median rate over the kept rounds.

    Every side (ours and each baseline) counts for the stray rule. The details add `baseline` (the one
    divided by) and `baseline_medians` (each one's median rate over the kept rounds).
    """
    sides = (ours, *baselines)
    value, which = headline(rounds, tolerance, (ours, baselines[0]), sides)
    if value is None:
        return None, which | {"baseline": None, "baseline_medians": {}}
    kept = [r for r in rounds if r["round"] in set(which["kept"]) and all(r.get(s) for s in sides)]
    medians = {b: round(statistics.median(r[b] for r in kept), 4) for b in baselines}
    faster = max(baselines, key=lambda b: medians[b])
    value, which = headline(rounds, tolerance, (ours, faster), sides)
    return value, which | {"baseline": faster, "baseline_medians": medians}
