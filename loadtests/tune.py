"""`vtfuse tune`: sweep the engines' batching and instance settings against a p99 budget, as Model Analyzer does.

For every candidate (queue delay × preferred batch sizes × instance count, optionally ×
ONNX Runtime threads), the built repository is copied with the candidate applied to the
tuned models' config.pbtxt (engines by default), a tritonserver is started on it, and a
closed loop at a fixed concurrency drives the `vqa` model over gRPC. The best candidate is
the highest throughput whose p99 stays within the budget with no errors. Written under
`--out`: `tune.json` and `tune.md` (the sweep's table) and `<model>/config.pbtxt` for each
tuned model with the best settings; `--apply` also writes them into the repository.

Needs the load tools in `loadtests/` (a repository checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from export.render_repo import dump_config, leading_comments, load_config
from serving.model.checkpoint import REPO_ROOT
from serving.model.io_spec import ENGINES

log = logging.getLogger(__name__)

WORK_DIR = REPO_ROOT / "build" / "tune" / "work"  # the candidate repositories, one at a time


@dataclass(frozen=True)
class Candidate:
    """One point of the sweep; `threads` None leaves intra_op_threads as configured."""

    queue_delay_us: int
    preferred: tuple[int, ...]
    instances: int
    threads: int | None = None

    @property
    def label(self) -> str:
        pref = "-".join(map(str, self.preferred)) or "none"
        t = f" threads={self.threads}" if self.threads else ""
        return f"delay={self.queue_delay_us}us preferred={pref} instances={self.instances}{t}"

    def apply(self, config: Any) -> None:
        """Set this candidate's values on a parsed ModelConfig (in place)."""
        db = config.dynamic_batching
        db.max_queue_delay_microseconds = self.queue_delay_us
        del db.preferred_batch_size[:]
        db.preferred_batch_size.extend(p for p in self.preferred if p <= config.max_batch_size)
        if config.instance_group:
            config.instance_group[0].count = self.instances
        else:
            g = config.instance_group.add()
            g.count = self.instances
        if self.threads is not None and "intra_op_threads" in config.parameters:
            config.parameters["intra_op_threads"].string_value = str(self.threads)


def grid(
    delays: list[int], preferred: list[tuple[int, ...]], instances: list[int], threads: list[int] | None = None
) -> list[Candidate]:
    """Every combination of the swept values."""
    return [
        Candidate(d, p, i, t)
        for d, p, i, t in itertools.product(delays, preferred, instances, threads or [None])  # type: ignore[list-item]
    ]


def pick_best(rows: list[dict[str, Any]], p99_budget_ms: float) -> dict[str, Any] | None:
    """The highest-throughput row within the budget and without errors (None when no row qualifies)."""
    ok = [r for r in rows if r.get("p99_ms") is not None and r["p99_ms"] <= p99_budget_ms and not r.get("errors")]
    return max(ok, key=lambda r: r["throughput_rps"]) if ok else None


def parse_preferred(text: str) -> tuple[int, ...]:
    """`16,32` → (16, 32); `none` → ()."""
    return () if text.strip().lower() in ("none", "") else tuple(int(x) for x in text.split(","))


def measure(candidate: Candidate, repository: Path, models: list[str], work: Path, concurrency: int,
            duration_s: float, warmup_s: float) -> dict[str, Any]:
    """Start Triton on the candidate's repository copy and drive `vqa` at `concurrency`."""
    from loadtests import grpc_driver, servers
    from loadtests.common import make_corpus, uncontended

    def edit(name: str, config: Any) -> None:
        if name in models:
            candidate.apply(config)

    variant = servers.variant_repository(repository, work / "repository", edit)
    row: dict[str, Any] = {"candidate": asdict(candidate), "label": candidate.label}
    try:
        with servers.triton(variant, "tune") as t:
            # A run during which other work took the CPU is repeated once the machine is quiet.
            res, foreign_share, _ = uncontended(lambda: asyncio.run(grpc_driver.drive(
                t.url_grpc, make_corpus(64), concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s,
                metrics_url=t.url_metrics, name="tune",
            )), candidate.label)
    except Exception as e:  # noqa: BLE001 — a candidate Triton refuses is a row, not the end of the sweep
        log.error("%s: %s", candidate.label, e)
        return row | {"throughput_rps": 0.0, "p50_ms": None, "p99_ms": None, "errors": {type(e).__name__: 1}}
    batches = res.extra.get("triton_batches", {})
    return row | {
        "throughput_rps": round(res.throughput_rps, 2),
        "p50_ms": round(res.p50_ms, 2),
        "p99_ms": round(res.p99_ms, 2),
        "engines_avg_batch": round(batches.get("engines_avg_batch") or 0.0, 2),
        "errors": res.errors,
        "foreign_cpu_share": round(foreign_share, 3),  # other work on the machine meanwhile, of all cores
    }


def table(rows: list[dict[str, Any]], best: dict[str, Any] | None, budget: float) -> str:
    """The sweep as a markdown table, best row marked."""
    lines = [
        f"p99 budget {budget:g} ms; best: {best['label'] if best else 'none within budget'}",
        "",
        "| queue delay µs | preferred | instances | threads | req/s | p50 ms | p99 ms | avg engine batch | errors "
        "| other load | |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        c = r["candidate"]
        lines.append(
            f"| {c['queue_delay_us']} | {','.join(map(str, c['preferred'])) or 'none'} | {c['instances']} | "
            f"{c['threads'] or '-'} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r.get('engines_avg_batch', '-')} | {sum(r['errors'].values()) if r['errors'] else 0} | "
            f"{r.get('foreign_cpu_share', '-')} | {'**best**' if r is best else ''} |"
        )
    return "\n".join(lines) + "\n"


def write_best(best: Candidate, repository: Path, models: list[str], dest: Path) -> list[Path]:
    """The tuned models' config.pbtxt with the best candidate applied (leading comments kept) under `dest`."""
    written = []
    for model in models:
        src = repository / model / "config.pbtxt"
        config = load_config(src)
        best.apply(config)
        out = dest / model / "config.pbtxt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dump_config(config, leading_comments(src)))
        written.append(out)
    return written


def run(args: argparse.Namespace) -> int:
    repository = Path(args.repository)
    if not (repository / "fusion" / "1" / "model.onnx").exists():
        print(f"{repository} is not built: run `vtfuse export all` (or `make repository`) first", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    candidates = grid(args.queue_delays, [parse_preferred(p) for p in args.preferred], args.instances, args.threads)
    log.info("tune: %d candidates × %.0f s at concurrency %d", len(candidates), args.duration, args.concurrency)
    rows = []
    for i, cand in enumerate(candidates, 1):
        row = measure(cand, repository, args.models, WORK_DIR, args.concurrency, args.duration, args.warmup)
        log.info("[%d/%d] %s → %.1f req/s, p99 %s ms", i, len(candidates), cand.label, row["throughput_rps"],
                 row["p99_ms"])
        rows.append(row)
    best = pick_best(rows, args.p99_ms)
    report = {
        "repository": str(repository), "models": args.models, "concurrency": args.concurrency,
        "duration_s": args.duration, "p99_budget_ms": args.p99_ms, "rows": rows, "best": best,
    }
    (out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "tune.md").write_text(table(rows, best, args.p99_ms))
    print(table(rows, best, args.p99_ms))
    if best is None:
        print(f"no candidate kept p99 within {args.p99_ms:g} ms without errors: raise --p99-ms or lower "
              "--concurrency", file=sys.stderr)
        return 1
    c = best["candidate"]
    cand = Candidate(c["queue_delay_us"], tuple(c["preferred"]), c["instances"], c["threads"])
    for p in write_best(cand, repository, args.models, out / "best"):
        print(f"wrote {p}")
    if args.apply:
        for p in write_best(cand, repository, args.models, repository):
            print(f"applied {p}")
    return 0


def register(subparsers: Any) -> None:
    """Add `tune` to the `vtfuse` CLI."""
    p = subparsers.add_parser(
        "tune", help="sweep queue delay, preferred batch sizes and instances against a p99 budget"
    )
    p.add_argument("--repository", default=str(REPO_ROOT / "model_repository"), help="a built model repository")
    p.add_argument("--models", nargs="+", default=list(ENGINES), help="models to tune (default: the engines)")
    p.add_argument("--queue-delays", type=int, nargs="+", default=[0, 1000, 2000, 5000], help="microseconds")
    p.add_argument("--preferred", nargs="+", default=["none", "8,16", "16,32"],
                   help="preferred batch sizes per candidate, comma-separated, or none")
    p.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, nargs="*", default=None, help="intra_op_threads values (default: as set)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per candidate")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--p99-ms", type=float, default=150.0, help="p99 latency budget")
    p.add_argument("--out", default=str(REPO_ROOT / "build" / "tune"), help="tune.json, tune.md, best/<model>/")
    p.add_argument("--apply", action="store_true", help="also write the best config.pbtxt into --repository")
    p.set_defaults(func=run)
