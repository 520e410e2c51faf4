"""GPU served benchmark: the `torch` target in the real tritonserver on a GPU, against the same engines in-process.

Run on a machine with an NVIDIA GPU, PyTorch with CUDA, and the `nvidia-pytriton` 0.7.0 wheel
carried as a file (it holds tritonserver 2.51, the Python backend and its shared libraries; no
registry is needed). From the repository root, with that machine's python3:

    python3 loadtests/gpu_served.py --wheel nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl \\
        --out loadtests/results/gpu-served

`--wheel` takes the wheel as published or the slimmer copy `--make-slim-wheel` writes (the other
Pythons' stubs and libpython dropped). Missing client packages (tritonclient, python-rapidjson)
can travel as wheels in `--wheels-dir`; they are unpacked only when the import fails.

Steps, each written to `<out>/gpu.json` as soon as it is done (a cut-off run keeps what it had):

1. unpack the wheel with zipfile; measure the FP16/BF16 matmul ceilings;
2. `vtfuse export all --target torch` for each preset (`tiny` for the answers check, then `small`,
   `base`): ONNX, ONNX Runtime parity, then the torch engines' parity on CPU fp32 and on this GPU
   under FP16 autocast (the install refuses engines that miss it);
3. in-process: the three `TorchEngine`s chained (image and text encoder, then fusion without the
   attention weights, as served), FP16 autocast, eager and CUDA graphs, per batch size; the best
   is the denominator of `served_over_engine_gpu`, and its share of the FP16 ceiling is reported;
4. served: tritonserver on that repository (engines `KIND_AUTO` → on the GPU), driven by the
   project's gRPC load driver from several client processes, per concurrency: `ensemble` (one round
   trip to `vqa_tensors`, features stay on the GPU) and `engines` (three round trips, features
   through the client, as the API layer does); items/s, p50/p99 and the engines' average batch
   from Triton's metrics; `vqa` (image bytes + question, the BLS model with GPU engines) for errors;
5. for `tiny` (trained): 200 fresh shapes-world questions through `vqa` on the GPU engines, answers
   checked.

An item is one (image, question) through all three engines, as in gpu_bench.py and the CPU figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

PRESETS = ("small", "base")
BATCHES = (1, 8, 32, 64, 128, 256)
CONCURRENCY = (1, 8, 32, 128, 256)
SLIM_DROP = ("nvidia_pytriton.libs/libpython3-",)  # the 3.13 stub's libpython: other Pythons bring their own


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_slim_wheel(wheel: Path, dest: Path, python: str) -> Path:
    """A copy of the wheel with only `python`'s Python-backend stub, no bundled libpython, LZMA-compressed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        for info in src.infolist():
            stubs = "/python_backend_stubs/"
            if stubs in info.filename and f"{stubs}{python}/" not in info.filename:
                continue
            if info.filename.startswith(SLIM_DROP):
                continue
            # LZMA: a third smaller than the wheel's deflate, and zipfile reads it.
            out.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_LZMA)
    return dest


def unpack(wheel: Path, site: Path) -> Path:
    """Unpack a wheel into `site` (zipfile keeps no modes: executables get theirs back); returns the bundle."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    bundle = site / "pytriton" / "tritonserver"
    for p in [bundle / "bin" / "tritonserver", *bundle.glob("python_backend_stubs/*/triton_python_backend_stub")]:
        if p.exists():
            p.chmod(0o755)
    return bundle


# What the load driver and `vtfuse export` need beyond PyTorch: {distribution: lowest version that works}.
# tritonclient's generated modules check the protobuf and grpcio they run with.
CLIENT_NEEDS = {"tritonclient": None, "python-rapidjson": None, "protobuf": "6.33.5", "grpcio": "1.81.1"}


def ensure_client(site: Path, wheels_dir: Path | None) -> list[str]:
    """Unpack carried wheels into `site` for each client package that is missing or too old; returns their names."""
    from importlib import metadata

    from packaging.version import Version

    needed = []
    for dist, lowest in CLIENT_NEEDS.items():
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            needed.append(dist)
            continue
        if lowest is not None and Version(have) < Version(lowest):
            needed.append(dist)
    for dist in needed:
        prefix = dist.replace("-", "_")
        wheels = sorted(wheels_dir.glob(f"{prefix}-*.whl")) if wheels_dir else []
        if not wheels:
            raise SystemExit(f"{dist} is missing or too old here: carry its wheel in --wheels-dir")
        with zipfile.ZipFile(wheels[-1]) as z:
            z.extractall(site)
    return needed


def stub_site(work: Path, wheels_dir: Path | None) -> Path | None:
    """numpy < 2 for the Python-backend stubs, where this interpreter has numpy 2.

    The stub of tritonserver 2.51 is built against numpy 1: under numpy 2 it hands BYTES inputs
    over corrupted (seen: `vqa` died in deserialize_bytes_tensor). Only tritonserver's environment
    gets this folder; the rest of this script keeps the machine's numpy.
    """
    import numpy as np

    if int(np.__version__.split(".")[0]) < 2:
        return None
    wheels = sorted(wheels_dir.glob("numpy-1.*.whl")) if wheels_dir else []
    if not wheels:
        raise SystemExit(f"numpy {np.__version__} here: carry a numpy<2 wheel in --wheels-dir for Triton's stubs")
    dest = work / "stub-site"
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(dest)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Triton:
    """tritonserver from the unpacked bundle on free ports, in its own process group; always stopped."""

    def __init__(self, bundle: Path, repo: Path, work: Path, log_path: Path, stub_path: Path | None = None) -> None:
        self.stub_path = stub_path
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        backends = work / "backends"
        py = backends / "python"
        py.mkdir(parents=True, exist_ok=True)
        for src in [*(bundle / "backends" / "python").iterdir(),
                    bundle / "python_backend_stubs" / version / "triton_python_backend_stub"]:
            shutil.copy2(src, py / src.name)
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.cmd = [
            str(bundle / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}",
            f"--http-port={self.http}", f"--grpc-port={self.grpc}", f"--metrics-port={self.metrics}",
            "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
            "--allow-metrics=true", "--allow-gpu-metrics=true", "--strict-readiness=true",
            "--exit-timeout-secs=10", "--log-verbose=0",
            # BLS and ensembles hand GPU tensors between Python models through these pools.
            "--cuda-memory-pool-byte-size=0:4294967296", "--pinned-memory-pool-byte-size=1073741824",
            f"--backend-config=python,shm-region-prefix-name=vtfusegpu{self.grpc}_",
            "--backend-config=python,shm-default-byte-size=67108864",
        ]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Triton:
        env = dict(os.environ)
        import sysconfig

        # The bundle's libs, then this interpreter's libpython (the stub links it), then the system's.
        libdir = sysconfig.get_config_var("LIBDIR")
        libs = [str(Path(self.cmd[0]).parents[3] / "nvidia_pytriton.libs"), *([libdir] if libdir else []),
                "/usr/lib/x86_64-linux-gnu", env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
        site = sysconfig.get_paths()["purelib"]
        first = [str(REPO_ROOT), *([str(self.stub_path)] if self.stub_path else [])]
        env["PYTHONPATH"] = ":".join(p for p in (*first, site, env.get("PYTHONPATH", "")) if p)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < 300:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = round(time.time() - t0, 1)
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"tritonserver not ready in 300 s: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics}/metrics"


def export_torch(preset: str, work: Path) -> tuple[Path, dict[str, Any]]:
    """`vtfuse export all --target torch` into work/<preset>; its torch parity figures from a manifest."""
    repo = work / f"repo-{preset}"
    cmd = [sys.executable, "-m", "serving.cli", "export", "all", "--target", "torch", "--checkpoint", preset,
           "--onnx-dir", str(work / f"onnx-{preset}"), "--repo", str(repo), "--samples", "4"]
    t0 = time.time()
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"export {preset} failed ({done.returncode}): {done.stderr[-3000:]}")
    manifest = json.loads((repo / "fusion" / "1" / "manifest.json").read_text())
    parity = {}
    for engine in ("image_encoder", "text_encoder", "fusion"):
        m = json.loads((repo / engine / "1" / "manifest.json").read_text())["torch"]["parity"]
        for kind in ("cpu_fp32", "cuda_fp16"):
            for out, f in m.get(kind, {}).get("engines", {}).get(engine, {}).items():
                parity[f"{kind}.{engine}.{out}"] = {k: f[k] for k in ("max_abs", "max_rel", "ok")}
    return repo, {"export_s": round(time.time() - t0, 1), "gpu": manifest["torch"]["parity"]["cuda_fp16"].get("gpu"),
                  "parity": parity}


def _time(fn: Any, reps: int, device: str) -> float:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def in_process(preset: str, fp16_ceiling: float, budget_s: float, device: str = "cuda") -> dict[str, Any]:
    """The three engines chained in-process on the GPU, FP16 autocast, eager and CUDA graphs, per batch."""
    import torch

    from serving.model.checkpoint import random_checkpoint
    from serving.model.engines import EngineSettings, TorchEngine

    model = random_checkpoint(preset).model.to(device)
    if device == "cuda":
        from loadtests.gpu_bench import flops_per_item

        flops = flops_per_item(model, model.cfg)
    else:
        flops = 0.0
    rows: list[dict[str, Any]] = []
    t_end = time.time() + budget_s
    for mode in ("cuda_graphs", "eager"):
        engines = {r: TorchEngine(model, r, device, EngineSettings(mode=mode, max_batch=max(BATCHES)))
                   for r in ("image_encoder", "text_encoder", "fusion")}
        for batch in BATCHES:
            if time.time() > t_end:
                break
            px, ids_mask = engines["image_encoder"].example_inputs(batch), engines["text_encoder"].example_inputs(batch)
            px[0].random_(0, 256)
            ids_mask[0].random_(4, model.cfg.vocab_size)

            def item(px=px, ids_mask=ids_mask, engines=engines):
                feats = engines["image_encoder"](px)[0]
                tfeats = engines["text_encoder"](ids_mask)[0]
                return engines["fusion"]([feats, tfeats, ids_mask[1]], need_attention=False)

            dt = _time(item, max(5, min(50, 2000 // batch)), device)
            rows.append({"mode": mode, "batch": batch, "ms": round(dt * 1e3, 3), "items_s": round(batch / dt, 1)})
            log(f"  in-process {preset} {mode} batch {batch}: {rows[-1]['items_s']} items/s")
        del engines
        torch.cuda.empty_cache()
    best = max(rows, key=lambda r: r["items_s"])
    model.cpu()
    del model
    torch.cuda.empty_cache()
    return {"flops_per_item": flops, "rows": rows, "best": best,
            "efficiency_vs_fp16_ceiling": round(best["items_s"] * flops / fp16_ceiling, 4)
            if flops and fp16_ceiling > 1 else None}


def _merge(results: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    import numpy as np

    lat = np.array(sorted(x for r in results for x in r.get("latencies_ms", [])), dtype=float)
    items = sum(r["items"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if lat.size else (lambda q: None)
    return {"items_per_s": round(items / duration, 1), "p50_ms": pct(50), "p99_ms": pct(99), "errors": errors}


def model_stats(server: Triton) -> dict[str, dict[str, float]]:
    """Triton's cumulative statistics per model: executions, items, and ns spent per phase."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/v2/models/stats", timeout=10) as r:
        stats = json.loads(r.read())
    out = {}
    for m in stats.get("model_stats", []):
        inf = m.get("inference_stats", {})
        out[m["name"]] = {"executions": float(m.get("execution_count", 0)),
                          "items": float(m.get("inference_count", 0)),
                          **{k: float(inf.get(k, {}).get("ns", 0)) for k in
                             ("queue", "compute_input", "compute_infer", "compute_output")}}
    return out


def stats_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per engine over a window: ms per execution in each phase, and ms a request queued (where the time went)."""
    out = {}
    for model, a in after.items():
        b = before.get(model, {})
        d = {k: a[k] - b.get(k, 0.0) for k in a}
        if not d["executions"]:
            continue
        # Triton sums queue and compute per request: per request, then per execution for the compute phases.
        reqs = max(d["items"], 1.0)
        out[model] = {"queue_ms_per_request": round(d["queue"] / reqs / 1e6, 3),
                      **{f"{k}_ms_per_request": round(d[k] / reqs / 1e6, 3)
                         for k in ("compute_input", "compute_infer", "compute_output")}}
    return out


def drive(server: Triton, repo: Path, target: str, concurrency: int, duration: float, work: Path) -> dict[str, Any]:
    """Closed loop at `concurrency` from several driver processes (one Python process tops out first)."""
    from loadtests.grpc_driver import batch_delta, scrape

    procs = max(1, min(8, concurrency // 4))
    per = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    outs = [work / f"drive-{target}-{concurrency}-{i}.json" for i in range(procs)]
    for o in outs:  # a driver that fails writes nothing: never read an earlier window's file
        o.unlink(missing_ok=True)
    before, stats0 = scrape(server.metrics_url), model_stats(server)
    running = [
        subprocess.Popen([sys.executable, "-m", "loadtests.grpc_driver", "--url", f"127.0.0.1:{server.grpc}",
                          "--target", target, "--concurrency", str(c), "--duration", str(duration), "--warmup", "1.5",
                          "--repository", str(repo), "--samples", "32", "--out", str(o)],
                         cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for c, o in zip(per, outs)
    ]
    codes = [p.wait() for p in running]
    failures = [f"exit {c}: " + (p.stderr.read().decode()[-800:] if p.stderr else "")
                for p, c in zip(running, codes) if c != 0]
    after, stats1 = scrape(server.metrics_url), model_stats(server)
    results = [json.loads(o.read_text()) for o in outs if o.exists()]
    row = {"target": target, "concurrency": concurrency, "client_processes": procs, **_merge(results, duration)}
    # The load generators' own CPU: near `duration` per process means the clients, not the server, set the pace.
    row["client_cpu_s"] = [r.get("extra", {}).get("client_cpu_s") for r in results]
    row["triton_stats"] = stats_delta(stats0, stats1)
    batches = batch_delta(before, after)["models"]
    row["avg_batch"] = {m: (round(v["avg_batch"], 2) if v["avg_batch"] else None) for m, v in batches.items()
                        if m in ("image_encoder", "text_encoder", "fusion", "vqa")}
    if failures:
        row["driver_failures"] = failures
    return row


def answers_check(server: Triton, n: int) -> dict[str, Any]:
    """`vqa` (image bytes + question) on the GPU engines: fresh shapes-world renders, answers checked."""
    import numpy as np
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.grpc import InferInput

    from tests.helpers import fresh_samples

    samples = fresh_samples(n, seed=4242)

    async def run() -> list[str]:
        client = grpcaio.InferenceServerClient(f"127.0.0.1:{server.grpc}")
        sem = asyncio.Semaphore(32)

        async def one(img: bytes, question: str) -> str:
            a = InferInput("IMAGE", [1, 1], "BYTES")
            a.set_data_from_numpy(np.array([[img]], dtype=object))
            b = InferInput("QUESTION", [1, 1], "BYTES")
            b.set_data_from_numpy(np.array([[question.encode()]], dtype=object))
            async with sem:
                r = await client.infer("vqa", [a, b])
            return r.as_numpy("ANSWER").reshape(-1)[0].decode()

        try:
            return list(await asyncio.gather(*(one(img, qa.question) for img, qa, _ in samples)))
        finally:
            await client.close()

    got = asyncio.run(run())
    correct = sum(g == qa.answer for g, (_, qa, _) in zip(got, samples))
    return {"n": n, "correct": correct, "accuracy": round(correct / n, 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheel", type=Path, help="the nvidia-pytriton 0.7.0 wheel (or its --make-slim-wheel copy)")
    p.add_argument("--wheels-dir", type=Path, help="carried wheels of missing client packages")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "loadtests" / "results" / "gpu-served")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    p.add_argument("--window", type=float, default=4.0, help="seconds per load window")
    p.add_argument("--answers", type=int, default=200, help="fresh questions of the tiny answers check (0: skip it)")
    p.add_argument("--make-slim-wheel", type=Path, metavar="DEST",
                   help="write a slimmer copy of --wheel for --python-version's stub and exit")
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--no-ceilings", action="store_true", help="skip the matmul ceilings (no efficiency figure)")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="check the script itself on a machine without a GPU (tiny, CPU engines; no figures)")
    a = p.parse_args()
    if a.make_slim_wheel:
        dest = make_slim_wheel(a.wheel, a.make_slim_wheel, a.python_version)
        print(f"{dest}: {dest.stat().st_size / 2**20:.1f} MiB")
        return 0

    import torch

    device = "cpu" if a.smoke_cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to PyTorch: run this on a GPU machine (or --smoke-cpu)")

    a.out.mkdir(parents=True, exist_ok=True)
    out_json = a.out / "gpu.json"
    work = Path(tempfile.mkdtemp(prefix="vtfuse-gpu-"))
    site = work / "site"
    bundle = unpack(a.wheel, site)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = ":".join(p for p in (str(REPO_ROOT), str(site), os.environ.get("PYTHONPATH", "")) if p)
    unpacked = ensure_client(site, a.wheels_dir)
    stubs = stub_site(work, a.wheels_dir)
    result: dict[str, Any] = {
        "command": " ".join(["python3", "loadtests/gpu_served.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "precision": "FP16 autocast (fp32 weights), both sides",
        "carried_packages": unpacked,
        "stub_numpy": "carried numpy<2 (this machine has numpy 2)" if stubs else "this machine's",
        "presets": {},
    }

    def save() -> None:
        out_json.write_text(json.dumps(result, indent=2) + "\n")

    if device == "cuda" and not a.no_ceilings:
        from loadtests.gpu_bench import matmul_ceiling

        result["fp16_matmul_flops"] = matmul_ceiling(torch.float16)
        result["bf16_matmul_flops"] = matmul_ceiling(torch.bfloat16)
        log(f"ceilings: fp16 {result['fp16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    else:
        result["fp16_matmul_flops"] = 1.0
    save()
    concurrencies = [int(c) for c in a.concurrency.split(",")]
    presets = [x for x in a.presets.split(",") if x]
    if a.answers:
        try:
            repo, exported = export_torch("tiny", work)
            with Triton(bundle, repo, work, a.out / "tritonserver-tiny.log", stubs) as server:
                result["tiny_vqa_answers"] = {**answers_check(server, a.answers), **exported, "ready_s": server.ready_s}
                result["tiny_vqa_answers"]["avg_batch"] = drive(server, repo, "vqa", 32, a.window, work)["avg_batch"]
        except Exception as e:  # keep going: the presets' figures still count
            result["tiny_vqa_answers"] = {"error": repr(e)[:3000]}
        log(f"tiny answers: {result['tiny_vqa_answers']}")
        save()
    for preset in presets:
        entry: dict[str, Any] = result["presets"].setdefault(preset, {})
        try:
            repo, exported = export_torch(preset, work)
            entry.update(exported)
            log(f"{preset}: exported in {exported['export_s']} s")
            budget = 40 if device == "cuda" else 10
            entry["in_process"] = in_process(preset, result["fp16_matmul_flops"], budget, device)
            save()
            rows = []
            with Triton(bundle, repo, work, a.out / f"tritonserver-{preset}.log", stubs) as server:
                entry["ready_s"] = server.ready_s
                for target, levels in (("ensemble", concurrencies), ("engines", [max(concurrencies)]), ("vqa", [64])):
                    for c in levels:
                        rows.append(drive(server, repo, target, c, a.window, work))
                        log(f"  served {preset} {target} c={c}: {json.dumps(rows[-1])[:600]}")
                        entry["served"] = rows
                        save()
            best_served = max((r for r in rows if r["target"] != "vqa"), key=lambda r: r["items_per_s"])
            keys = ("target", "concurrency", "items_per_s")
            entry["best_served"] = {k: best_served[k] for k in keys}
            engine_best = entry["in_process"]["best"]["items_s"]
            entry["served_over_engine_gpu"] = round(best_served["items_per_s"] / engine_best, 3)
        except Exception as e:
            entry["error"] = repr(e)[:3000]
            log(f"{preset} failed: {entry['error']}")
        save()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    log(json.dumps({k: {kk: v.get(kk) for kk in ("served_over_engine_gpu", "best_served")}
                    for k, v in result["presets"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
