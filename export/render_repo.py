"""Render Triton model configs and repositories for a target and preset from the committed model_repository/.

The committed `model_repository/` is the source of truth: the `embedded` target (every model
a Python-backend model; the engines run `model.onnx` with ONNX Runtime). The NGC targets are
rendered from it by rewriting each engine's config.pbtxt (backend/platform, model file,
instance kind, parameters), and any preset is rendered by rewriting every tensor's dims
(inputs, outputs and warm-up inputs) from `serving.model.io_spec`. `render_config` is the one
function that does this; the unit test comparing committed configs with io_spec calls it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.engine_layout import ENGINE_THREADS
from export.errors import RenderError
from serving.families.imported import read_repository_models
from serving.model.checkpoint import REPO_ROOT
from serving.model.io_spec import ENGINES, VQA_TENSORS, EngineSpec, engine_specs, preprocess_spec
from serving.model.model import FusionConfig

log = logging.getLogger(__name__)

COMMITTED_REPO = REPO_ROOT / "model_repository"
TARGETS = ("embedded", "onnxruntime", "tensorrt", "torch", "libtorch")
# backend, platform and model file of an engine per target (embedded: as committed).
ENGINE_BACKENDS = {
    "onnxruntime": ("onnxruntime", "onnxruntime_onnx", "model.onnx"),
    "tensorrt": ("tensorrt", "tensorrt_plan", "model.plan"),
}
# Python-backend engine parameters that have an ONNX Runtime backend equivalent; every other
# parameter of a Python-backend engine is read by its model.py alone and is dropped.
ORT_PARAMETER_MAP = {"intra_op_threads": "intra_op_thread_count", "inter_op_threads": "inter_op_thread_count"}
# CPU threads per engine instance by precision (ENGINE_THREADS) come from the one table of instances
# and threads, export/engine_layout.py, with the measurements. The committed configs carry the int8
# row; `vtfuse export install` sets the installed precision's.
# The `torch` target: engines stay Python-backend models, running PyTorch (torch_engine.py) on the
# GPU Triton gives them (KIND_AUTO), else the CPU. Larger batches than the CPU engines take, with
# no preferred sizes, so the dynamic batcher fills a GPU batch from whatever is queued.
TORCH_MAX_BATCH = 256
TORCH_ENGINE_PARAMETERS = {
    "autocast": "fp16",
    "mode": "cuda_graphs",
    # GPU tensors from a BLS caller (vqa handing on features) stay on the GPU.
    "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
}
TORCH_MODEL_PY = (
    '"""Triton Python model: an engine run by PyTorch (see serving/triton/python_models/torch_engine.py)."""\n\n'
    "from serving.triton.python_models.torch_engine import TorchEngineModel as TritonPythonModel  # noqa: F401\n"
)
# The torch target's one-round-trip entry for clients that preprocess themselves: Triton chains
# the engines (image and text encoders side by side, then fusion) with the features left on the GPU.
TENSORS_ENSEMBLE = "vqa_tensors"
# The `libtorch` target: each engine's TorchScript file is its own model, behind an ensemble that
# has the engine's name and tensor names (export/libtorch.py).
LIBTORCH_SUFFIX = "_libtorch"
LIBTORCH_FILE = "model.pt"
# Left in the committed tree by an install or by Python: never copied into a rendered repository.
BUILT_ARTEFACTS = (
    "model.onnx", "model.plan", "manifest.json", "checkpoint", "__pycache__", "cross_kv.onnx", "decoder_step.onnx",
    "decoder.json",
)
# The caption decoder's decoupled generate model: rendered only for a preset that has a decoder.
CAPTION_MODEL = "caption"


def default_repo(target: str) -> Path:
    """Where a target's repository goes unless --repo says otherwise."""
    return COMMITTED_REPO if target == "embedded" else REPO_ROOT / "build" / f"model_repository-{target}"


def load_config(path: str | Path) -> mc.ModelConfig:
    """Parse a config.pbtxt into Triton's ModelConfig proto.

    Raises:
        RenderError: the file is not valid text-format ModelConfig.
    """
    try:
        return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        raise RenderError(f"{path} is not a valid Triton config.pbtxt: {e}") from e


def dump_config(config: mc.ModelConfig, header: str = "") -> str:
    """Text-format a ModelConfig, after an optional `# ` comment header."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    return "\n".join([*lines, text_format.MessageToString(config)]).rstrip() + "\n"


def model_spec(name: str, cfg: FusionConfig) -> EngineSpec | None:
    """The io_spec contract of a model in the repository (None for a model io_spec does not describe)."""
    if name in ENGINES:
        return engine_specs(cfg)[name]
    if name == "preprocess":
        return preprocess_spec(cfg)
    if name == "vqa":
        return VQA_TENSORS
    return None


def _set_tensor(tensor: mc.ModelInput | mc.ModelOutput, spec: EngineSpec, model: str) -> None:
    by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    t = by_name.get(tensor.name)
    if t is None:
        raise RenderError(
            f"{model}: tensor {tensor.name!r} is not in io_spec ({', '.join(by_name)}): "
            "fix the name in config.pbtxt or add it to serving/model/io_spec.py"
        )
    tensor.data_type = mc.DataType.Value(f"TYPE_{t.dtype}")
    del tensor.dims[:]
    tensor.dims.extend(t.dims)


def render_config(
    config: mc.ModelConfig, cfg: FusionConfig, target: str = "embedded", name: str | None = None
) -> mc.ModelConfig:
    """A copy of `config` for `target` with every tensor's dtype and dims from io_spec for `cfg`.

    Dims and dtypes of inputs, outputs and warm-up inputs are rewritten for every model io_spec
    describes (engines, preprocess, vqa). For `onnxruntime`/`tensorrt`, an engine's Python
    backend becomes the native one: backend and platform set, `default_model_filename` set,
    Python-only parameters dropped (thread counts mapped to the ONNX Runtime backend's), and
    instances on any device (`onnxruntime`: KIND_AUTO, GPU when there is one) or the GPU
    (`tensorrt`: KIND_GPU). With `embedded` and a config already right for `cfg`, the result
    equals the input: that is the check of the committed repository.

    Args:
        config: the committed ModelConfig (not modified).
        cfg: the preset's architecture.
        target: `embedded`, `onnxruntime`, `tensorrt`, `torch` (engines stay Python-backend
            models running PyTorch, KIND_AUTO, batches up to TORCH_MAX_BATCH) or `libtorch` (an
            engine becomes the ensemble in front of its TorchScript model: `libtorch_config`).
        name: the model's name when the config has no `name` field.

    Raises:
        RenderError: unknown target, or a tensor name io_spec does not know.
    """
    if target not in TARGETS:
        raise RenderError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    out = mc.ModelConfig()
    out.CopyFrom(config)
    model = config.name or name or ""
    spec = model_spec(model, cfg)
    if spec is not None:
        for tensor in (*out.input, *out.output):
            _set_tensor(tensor, spec, model)
        for warmup in out.model_warmup:
            for key, inp in warmup.inputs.items():
                t = next((x for x in spec.inputs if x.name == key), None)
                if t is None:
                    raise RenderError(f"{model}: warm-up input {key!r} is not an input in io_spec")
                inp.data_type = mc.DataType.Value(f"TYPE_{t.dtype}")
                del inp.dims[:]
                inp.dims.extend(t.dims)
    if target == "torch":
        return _torch_config(out, model)
    if target == "libtorch" and model in ENGINES:
        return engine_ensemble_config(out, model)
    if target == "embedded" or model not in ENGINES:
        return out
    backend, platform, filename = ENGINE_BACKENDS[target]
    out.backend = backend
    out.platform = platform
    out.default_model_filename = filename
    params = dict(out.parameters)
    out.parameters.clear()
    for key, value in params.items():
        if target == "onnxruntime" and key in ORT_PARAMETER_MAP:
            out.parameters[ORT_PARAMETER_MAP[key]].string_value = value.string_value
        else:
            log.debug("%s: dropped Python-backend parameter %s for target %s", model, key, target)
    for group in out.instance_group:
        group.kind = mc.ModelInstanceGroup.KIND_GPU if target == "tensorrt" else mc.ModelInstanceGroup.KIND_AUTO
        if target != "tensorrt":
            del group.gpus[:]
    return out


def _torch_config(out: mc.ModelConfig, model: str) -> mc.ModelConfig:
    """An embedded config made into the `torch` target's: PyTorch engines, GPU when present, GPU-sized batches."""
    if model == "vqa":
        out.parameters["engine_max_batch"].string_value = str(TORCH_MAX_BATCH)
    if model not in ENGINES:
        return out
    out.parameters.clear()
    # fp32 weights: on the CPU, the threads fp32 engines measured best with.
    for key, value in {**TORCH_ENGINE_PARAMETERS, "torch_threads": str(ENGINE_THREADS["fp32"])}.items():
        out.parameters[key].string_value = value
    out.max_batch_size = TORCH_MAX_BATCH
    del out.dynamic_batching.preferred_batch_size[:]
    for group in out.instance_group:
        group.kind = mc.ModelInstanceGroup.KIND_AUTO
    return out


def libtorch_name(engine: str) -> str:
    """The TorchScript model behind an engine's ensemble (`image_encoder` → `image_encoder_libtorch`)."""
    return engine + LIBTORCH_SUFFIX


def engine_ensemble_config(engine_config: mc.ModelConfig, model: str) -> mc.ModelConfig:
    """The `libtorch` target's `<engine>`: a one-step ensemble over `<engine>_libtorch`, with the contract's names.

    It keeps the engine's tensors, batch size and response cache; batching happens in the
    TorchScript model behind it (an ensemble has no scheduler or instances of its own).
    """
    out = mc.ModelConfig(name=model, platform="ensemble", max_batch_size=engine_config.max_batch_size)
    out.input.extend(engine_config.input)
    out.output.extend(engine_config.output)
    if engine_config.HasField("response_cache"):
        out.response_cache.CopyFrom(engine_config.response_cache)
    ins, outs = _indexed(engine_config)
    step = out.ensemble_scheduling.step.add(model_name=libtorch_name(model), model_version=-1)
    step.input_map.update({backend: contract for contract, backend in ins.items()})
    step.output_map.update({backend: contract for contract, backend in outs.items()})
    return out


def _indexed(config: mc.ModelConfig) -> tuple[dict[str, str], dict[str, str]]:
    """`<name>__<index>` for each input and output, by position (as Triton's PyTorch backend binds them)."""
    return (
        {t.name: f"{t.name}__{i}" for i, t in enumerate(config.input)},
        {t.name: f"{t.name}__{i}" for i, t in enumerate(config.output)},
    )


def libtorch_config(engine_config: mc.ModelConfig, model: str) -> mc.ModelConfig:
    """The `libtorch` target's `<engine>_libtorch`: the engine's config on Triton's PyTorch backend.

    `engine_config` is the engine's config rendered for `embedded`. Tensors are renamed
    `<name>__<index>` (warm-up inputs too); batching and instances stay the engine's, on any
    device (KIND_AUTO); Python-backend parameters and the response cache (the ensemble's) go.
    """
    out = mc.ModelConfig()
    out.CopyFrom(engine_config)
    out.name = libtorch_name(model)
    out.backend, out.platform, out.default_model_filename = "pytorch", "pytorch_libtorch", LIBTORCH_FILE
    ins, outs = _indexed(engine_config)
    for tensor in out.input:
        tensor.name = ins[tensor.name]
    for tensor in out.output:
        tensor.name = outs[tensor.name]
    for warmup in out.model_warmup:
        renamed = {ins[k]: v for k, v in warmup.inputs.items()}
        warmup.inputs.clear()
        for key, value in renamed.items():
            warmup.inputs[key].CopyFrom(value)
    out.parameters.clear()
    out.ClearField("response_cache")
    for group in out.instance_group:
        group.kind = mc.ModelInstanceGroup.KIND_AUTO
        del group.gpus[:]
    return out


def tensors_ensemble_config(cfg: FusionConfig) -> mc.ModelConfig:
    """`vqa_tensors`: PIXELS, INPUT_IDS, ATTENTION_MASK → VQA_LOGITS through the three engines, as a Triton ensemble."""
    specs = engine_specs(cfg)
    out = mc.ModelConfig(name=TENSORS_ENSEMBLE, platform="ensemble", max_batch_size=TORCH_MAX_BATCH)
    for t in (*specs["image_encoder"].inputs, *specs["text_encoder"].inputs):
        out.input.add(name=t.name, data_type=mc.DataType.Value(f"TYPE_{t.dtype}"), dims=list(t.dims))
    logits = next(t for t in specs["fusion"].outputs if t.name == "VQA_LOGITS")
    out.output.add(name=logits.name, data_type=mc.DataType.Value(f"TYPE_{logits.dtype}"), dims=list(logits.dims))
    steps = (
        ("image_encoder", {"PIXELS": "PIXELS"}, {"IMAGE_FEATURES": "image_features"}),
        ("text_encoder", {"INPUT_IDS": "INPUT_IDS", "ATTENTION_MASK": "ATTENTION_MASK"},
         {"TEXT_FEATURES": "text_features"}),
        ("fusion", {"IMAGE_FEATURES": "image_features", "TEXT_FEATURES": "text_features",
                    "ATTENTION_MASK": "ATTENTION_MASK"}, {"VQA_LOGITS": "VQA_LOGITS"}),
    )
    for model, inputs, outputs in steps:
        step = out.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        step.input_map.update(inputs)
        step.output_map.update(outputs)
    return out


def leading_comments(path: Path) -> str:
    """The `#` comment lines a config.pbtxt starts with, without the `#`."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines)


def model_dirs(repo: str | Path) -> list[Path]:
    """Folders of a repository that hold a config.pbtxt, sorted by name, except imported models' engines.

    Models that `vtfuse import-hf` installed (listed in the repository's vtfuse_models.json) are
    left alone: exporting or rendering the native model neither overwrites nor copies them.
    """
    imported = {e for r in read_repository_models(repo).values() for e in r.engines.values()}
    return sorted(p.parent for p in Path(repo).glob("*/config.pbtxt") if p.parent.name not in imported)


def config_mismatches(repo: str | Path, cfg: FusionConfig) -> list[str]:
    """Models whose committed config.pbtxt differs from io_spec for `cfg` (empty: all agree)."""
    bad = []
    for d in model_dirs(repo):
        config = load_config(d / "config.pbtxt")
        spec = model_spec(config.name or d.name, cfg)
        names_ok = spec is None or (
            [t.name for t in config.input] == [t.name for t in spec.inputs]
            and [t.name for t in config.output] == [t.name for t in spec.outputs]
        )
        if not names_ok or render_config(config, cfg, "embedded", d.name) != config:
            bad.append(d.name)
    return bad


def _ignore_for(model: str, target: str) -> Callable[[str, list[str]], set[str]]:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in BUILT_ARTEFACTS or n.endswith(".pyc")}
        # A native engine has no Python code: its version folders get the artefact alone.
        if model in ENGINES and target not in ("embedded", "torch"):
            skip |= {n for n in names if n.endswith(".py")}
        return skip

    return ignore


def _render_libtorch_model(out: Path, engine_dir: Path, cfg: FusionConfig, header: str) -> dict[str, Path]:
    """`<engine>_libtorch/` next to the engine's ensemble: its config and an empty version folder."""
    name = libtorch_name(engine_dir.name)
    model_dir = out / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    embedded = render_config(load_config(engine_dir / "config.pbtxt"), cfg, "embedded", engine_dir.name)
    config = libtorch_config(embedded, engine_dir.name)
    note = f"{header.strip()}\nThe TorchScript engine behind the ensemble {engine_dir.name} (export/libtorch.py)."
    (model_dir / "config.pbtxt").write_text(dump_config(config, note))
    return {name: model_dir / "config.pbtxt"}


def render_repository(
    dest: str | Path, cfg: FusionConfig, target: str, source: str | Path = COMMITTED_REPO
) -> dict[str, Path]:
    """Copy the committed repository's models into `dest` with configs rendered for `target` and `cfg`.

    Each model folder in `dest` is replaced whole (built artefacts are not copied: stage 4
    installs them). Files of Python-backend models (`1/model.py`) are copied; a native engine's
    are not. The `caption` model is left out for a preset without a caption decoder.

    Returns:
        {model: path of its rendered config.pbtxt}.

    Raises:
        RenderError: `source` has no config.pbtxt, or `dest` is `source`.
    """
    src, out = Path(source).resolve(), Path(dest).resolve()
    if src == out:
        raise RenderError(f"cannot render {src} onto itself: pass --repo DIR for a rendered repository")
    dirs = model_dirs(src)
    if not dirs:
        raise RenderError(f"no */config.pbtxt under {src}: point --source-repo at a Triton model repository")
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.has_decoder:  # nothing to caption with: Triton would fail to load the model
        dirs = [d for d in dirs if d.name != CAPTION_MODEL]
        if (out / CAPTION_MODEL).exists():
            shutil.rmtree(out / CAPTION_MODEL)
    written = {}
    for d in dirs:
        target_dir = out / d.name
        if target_dir.exists():
            shutil.rmtree(target_dir)
        shutil.copytree(d, target_dir, ignore=_ignore_for(d.name, target))
        if target == "torch" and d.name in ENGINES:
            for model_py in target_dir.glob("[0-9]*/model.py"):
                model_py.write_text(TORCH_MODEL_PY)
        config = render_config(load_config(d / "config.pbtxt"), cfg, target, d.name)
        rel = d.relative_to(REPO_ROOT) if d.is_relative_to(REPO_ROOT) else d
        header = leading_comments(d / "config.pbtxt")
        header += f"\nRendered by `vtfuse export` for target {target}, preset {cfg.name}, from {rel}/config.pbtxt:"
        header += "\nedit that file, not this one."
        (target_dir / "config.pbtxt").write_text(dump_config(config, header.strip()))
        written[d.name] = target_dir / "config.pbtxt"
        if target == "libtorch" and d.name in ENGINES:
            written.update(_render_libtorch_model(out, d, cfg, header))
    if target == "torch":
        ensemble_dir = out / TENSORS_ENSEMBLE
        if ensemble_dir.exists():
            shutil.rmtree(ensemble_dir)
        (ensemble_dir / "1").mkdir(parents=True)
        header = (
            "Pre-processed tensors in, VQA logits out: the three PyTorch engines chained by Triton, features\n"
            f"kept on the GPU. Rendered by `vtfuse export` for target torch, preset {cfg.name}."
        )
        (ensemble_dir / "config.pbtxt").write_text(dump_config(tensors_ensemble_config(cfg), header))
        written[TENSORS_ENSEMBLE] = ensemble_dir / "config.pbtxt"
    log.info("rendered %d model configs for target %s, preset %s into %s", len(written), target, cfg.name, out)
    return written
