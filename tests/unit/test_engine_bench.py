"""The in-process engine sweep (loadtests.engine_bench): rows are medians over interleaved passes."""

from __future__ import annotations

from typing import Any

from loadtests import engine_bench
from serving.model.config import FusionConfig


class ScriptedEngines:
    """Engines whose timings per batch size are given, one per pass, in the order they are asked for."""

    items_per_s = {1: [10.0, 10.0, 30.0], 2: [12.0, 12.0, 12.0]}  # batch 1 had one lucky window

    def __init__(self, paths: Any, cfg: Any, settings: Any) -> None:
        self.asked: dict[int, int] = {}
        self.warm: list[bool] = []

    def time_batch(self, batch: int, min_time_s: float, min_reps: int = 3, warm_up: bool = True) -> dict[str, Any]:
        i = self.asked.get(batch, 0)
        self.asked[batch] = i + 1
        self.warm.append(warm_up)
        rate = self.items_per_s[batch][i]
        return {"batch": batch, "reps": 1, "ms_per_batch": 1e3 * batch / rate, "items_per_s": rate}


def test_a_lucky_window_does_not_make_a_batch_size_best(monkeypatch):
    monkeypatch.setattr(engine_bench, "Engines", ScriptedEngines)
    res = engine_bench.sweep_paths({}, FusionConfig.preset("tiny"), batches=(1, 2), min_time_s=0.3, passes=3)
    rows = {r["batch"]: r for r in res["rows"]}
    assert rows[1]["items_per_s"] == 10.0 and rows[1]["passes_items_per_s"] == [10.0, 10.0, 30.0]
    assert res["best"]["batch"] == 2 and res["best"]["items_per_s"] == 12.0


def test_the_sweep_times_real_engines_in_passes():
    res = engine_bench.sweep("model_repository", batches=(1, 2), min_time_s=0.06, passes=3)
    assert [r["batch"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert len(r["passes_items_per_s"]) == 3 and r["items_per_s"] > 0
    assert res["best"] in res["rows"]
