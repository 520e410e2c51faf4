"""Stage 3: TensorRT 10 plans from the ONNX engines, cached per GPU and TensorRT version, checked against ONNX Runtime.

A plan is valid only for the GPU model and TensorRT version that built it, so plans are cached
under `build/trt_cache/<gpu>-trt<version>/<engine>-<onnx sha>-b<min>-<opt>-<max>[-fp16].plan`:
a rebuild happens only when the ONNX file, the batch profile, the GPU or TensorRT changes.
The batch profile comes from the engine's config.pbtxt (min 1, opt the largest preferred batch
size or max/2, max `max_batch_size`).

Where `tensorrt` cannot be imported or no CUDA GPU is visible, every entry point raises
`EngineUnavailable` with the reason: a SKIP, not a failure (the CLI exits 3 for it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from export.check import FP16_TOLERANCE, Tolerance, compare, ort_session, random_inputs, run_session
from export.errors import EngineBuildError, EngineUnavailable, ParityError
from export.onnx_export import sha256_file
from export.render_repo import COMMITTED_REPO, load_config, render_config
from serving.model.checkpoint import REPO_ROOT
from serving.model.io_spec import ENGINES, engine_specs
from serving.model.model import FusionConfig

log = logging.getLogger(__name__)

DEFAULT_CACHE = REPO_ROOT / "build" / "trt_cache"
ENGINES_FILE = "engines.json"
INSTALL_HINT = (
    "install TensorRT 10 on a machine with an NVIDIA GPU and its driver: `make install-gpu` "
    "(CUDA PyTorch and TensorRT, the `gpu` extra)"
)


@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile's batch sizes (every other axis is static)."""

    min: int
    opt: int
    max: int


def batch_profile(max_batch_size: int, preferred: list[int] | tuple[int, ...] = ()) -> BatchProfile:
    """The batch profile: min 1, opt the largest preferred batch size up to max (else max/2), max `max_batch_size`."""
    if max_batch_size < 1:
        raise EngineBuildError(f"max_batch_size is {max_batch_size}: an engine needs max_batch_size >= 1")
    fits = [b for b in preferred if 1 <= b <= max_batch_size]
    opt = max(fits) if fits else max(1, max_batch_size // 2)
    return BatchProfile(1, opt, max_batch_size)


def profile_from_config(config_path: str | Path, cfg: FusionConfig | None = None) -> BatchProfile:
    """The batch profile of an engine from its config.pbtxt (`max_batch_size`, preferred batch sizes)."""
    config = load_config(config_path)
    if cfg is not None:
        config = render_config(config, cfg, "tensorrt", Path(config_path).parent.name)
    return batch_profile(config.max_batch_size, list(config.dynamic_batching.preferred_batch_size))


def import_tensorrt() -> ModuleType:
    """Import `tensorrt` (version 10 or later).

    Raises:
        EngineUnavailable: not installed, or older than 10.
    """
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as e:
        raise EngineUnavailable(f"tensorrt is not installed ({e}): {INSTALL_HINT}") from e
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise EngineUnavailable(f"tensorrt {trt.__version__} is too old: {INSTALL_HINT}")
    return trt


def gpu_name() -> str:
    """The name of CUDA device 0 (from PyTorch when it sees CUDA, else nvidia-smi).

    Raises:
        EngineUnavailable: no CUDA GPU is visible.
    """
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise EngineUnavailable(f"no CUDA GPU is visible (nvidia-smi: {e}): {INSTALL_HINT}") from e
    if not out:
        raise EngineUnavailable(f"no CUDA GPU is visible (nvidia-smi lists none): {INSTALL_HINT}")
    return out.splitlines()[0].strip()


def availability() -> tuple[ModuleType, str]:
    """`(tensorrt, gpu name)` where plans can be built here.

    Raises:
        EngineUnavailable: the reason they cannot.
    """
    trt = import_tensorrt()
    return trt, gpu_name()


def cache_dir(root: str | Path, gpu: str, trt_version: str) -> Path:
    """The cache folder of one GPU model and TensorRT version, e.g. `nvidia-h100-80gb-hbm3-trt10.3.0.26`."""
    slug = re.sub(r"[^a-z0-9.]+", "-", gpu.lower()).strip("-")
    return Path(root) / f"{slug}-trt{trt_version}"


Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input → (min, opt, max) shapes


def plan_name(engine: str, onnx_sha256: str, profile: BatchProfile, fp16: bool, shapes: Shapes | None = None) -> str:
    """The cache file name: what the plan was built from and how (explicit input shapes add a hash of them)."""
    extra = ""
    if shapes:
        extra = "-s" + hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()[:8]
    batch = f"b{profile.min}-{profile.opt}-{profile.max}"
    return f"{engine}-{onnx_sha256[:16]}-{batch}{extra}{'-fp16' if fp16 else ''}.plan"


def build_plan(
    onnx_path: str | Path,
    profile: BatchProfile,
    *,
    fp16: bool = True,
    cache_root: str | Path = DEFAULT_CACHE,
    workspace_gib: float = 4.0,
    rebuild: bool = False,
    shapes: Shapes | None = None,
) -> Path:
    """Build (or reuse from the cache) the TensorRT plan of one ONNX engine.

    The network is parsed from ONNX into an explicit-batch network (the only kind TensorRT 10
    has), with one optimization profile over the batch axis; `shapes` gives the full (min, opt,
    max) shapes of inputs with more variable axes (an imported model's tokens or image sides).
    With `fp16`, FP16 kernels are allowed and normalization layers are pinned to FP32 (their
    reductions overflow in FP16).

    Raises:
        EngineUnavailable: no TensorRT or no GPU here.
        EngineBuildError: the parser or the builder failed (the parser's errors are in the message).
    """
    trt, gpu = availability()
    onnx_path = Path(onnx_path)
    engine = onnx_path.stem
    out = cache_dir(cache_root, gpu, trt.__version__) / plan_name(engine, sha256_file(onnx_path), profile, fp16, shapes)
    if out.exists() and not rebuild:
        log.info("%s: cached plan %s", engine, out)
        return out
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch; no flag needed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{engine}: TensorRT's ONNX parser refused {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if shapes and tensor.name in shapes:
            opt_profile.set_shape(tensor.name, *shapes[tensor.name])
            continue
        rest = tuple(tensor.shape)[1:]
        opt_profile.set_shape(tensor.name, (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest))
    config.add_optimization_profile(opt_profile)
    log.info("%s: building a TensorRT %s plan for %s, batch %s (fp16=%s)", engine, trt.__version__, gpu, profile, fp16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{engine}: TensorRT could not build a plan from {onnx_path} (see its log above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(serialized)
    tmp.replace(out)
    return out


def run_plan(plan_path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a plan once on numpy feeds (device buffers from PyTorch's CUDA allocator).

    Raises:
        EngineUnavailable: no TensorRT, or no CUDA build of PyTorch to hold the buffers.
    """
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise EngineUnavailable(
            "checking a plan needs a CUDA build of PyTorch that sees the GPU (for its buffers): "
            "install one, or build without the check (`vtfuse export engine --no-check`)"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    context = engine.create_execution_context()
    buffers: dict[str, torch.Tensor] = {}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            buffers[name] = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            context.set_input_shape(name, tuple(feeds[name].shape))
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
    for name, buf in buffers.items():
        context.set_tensor_address(name, buf.data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise EngineBuildError(f"TensorRT could not run {plan_path}")
    stream.synchronize()
    return {n: buffers[n].cpu().numpy() for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT}


def check_plan(
    plan_path: str | Path,
    onnx_path: str | Path,
    cfg: FusionConfig,
    batches: tuple[int, ...] = (1, 5),
    tolerance: Tolerance = FP16_TOLERANCE,
    seed: int = 0,
) -> dict[str, Any]:
    """Parity of a plan against ONNX Runtime (fp32) on random inputs, per output, at each batch size.

    Raises:
        ParityError: an output is out of tolerance.
    """
    engine = Path(onnx_path).stem
    spec = engine_specs(cfg)[engine]
    sess = ort_session(onnx_path)
    rng = np.random.default_rng(seed)
    figures: dict[str, Any] = {"tolerance": asdict(tolerance)}
    for b in batches:
        feeds = random_inputs(spec, cfg, b, rng)
        ref, got = run_session(sess, feeds), run_plan(plan_path, feeds)
        figures[f"batch_{b}"] = {o: compare(ref[o], got[o].astype(np.float32), tolerance) for o in ref}
        for o, f in figures[f"batch_{b}"].items():
            if not f["ok"]:
                raise ParityError(
                    f"{engine}.{o}: TensorRT plan vs ONNX Runtime at batch {b}: max_abs {f['max_abs']:.3g}, "
                    f"max_rel {f['max_rel']:.3g} over {tolerance}; rebuild without FP16 (--no-fp16) to compare",
                    engine=engine,
                    output=o,
                    figures=figures,
                )
    return figures


def build_engines(
    onnx_dir: str | Path,
    *,
    source_repo: str | Path = COMMITTED_REPO,
    cache_root: str | Path = DEFAULT_CACHE,
    fp16: bool = True,
    check: bool = True,
) -> dict[str, Any]:
    """Build the plans of all three engines of a stage-1 folder, check them, and write `engines.json`.

    Returns:
        {"tensorrt", "gpu", "fp16", "engines": {engine: {plan, plan_sha256, onnx_sha256, profile, parity}}}.

    Raises:
        EngineUnavailable: no TensorRT or no GPU here (nothing is written).
        EngineBuildError, ParityError: a plan failed to build or to match ONNX Runtime.
    """
    trt, gpu = availability()
    onnx_dir = Path(onnx_dir)
    cfg = FusionConfig.from_json(onnx_dir / "checkpoint" / "config.json")
    result: dict[str, Any] = {"tensorrt": trt.__version__, "gpu": gpu, "fp16": fp16, "engines": {}}
    for engine in ENGINES:
        onnx_path = onnx_dir / f"{engine}.onnx"
        profile = profile_from_config(Path(source_repo) / engine / "config.pbtxt", cfg)
        plan = build_plan(onnx_path, profile, fp16=fp16, cache_root=cache_root)
        entry = {
            "plan": str(plan),
            "plan_sha256": sha256_file(plan),
            "onnx_sha256": sha256_file(onnx_path),
            "profile": asdict(profile),
        }
        if check:
            entry["parity"] = check_plan(plan, onnx_path, cfg)
        result["engines"][engine] = entry
    (onnx_dir / ENGINES_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result
