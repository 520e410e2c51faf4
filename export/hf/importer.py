"""`vtfuse import-hf`: a Hugging Face checkpoint → ONNX engines → parity gate → (int8) → a Triton repository.

Steps, each failing loudly before anything is installed:

1. resolve the source and its family (`architectures` in config.json; anything else is refused
   with the list of what is supported); read its image processor and tokenizer through `transformers`;
2. compute the parity cases: the family's engine inputs built as the served path builds them
   (vtfuse's resize, our tokenizer with padding) and the `transformers` module's own outputs
   on the processor's tensors, for rendered images and texts;
3. export each engine with the TorchScript exporter (batch, token and, for ViLT, image axes dynamic);
4. fp32 gate (`export.hf.parity`): a model that misses it is not installed;
5. int8 (default for the embedded CPU target): ONNX Runtime dynamic quantisation, judged by what
   users see (the family's `judge`); when it misses, the default falls back to fp32 and says so,
   an explicit `--precision int8` fails;
5b. TensorRT (`--target tensorrt`, `export.hf.tensorrt`): FP16 plans with profiles over every variable
   axis, judged like int8; where TensorRT or a GPU is missing, `EngineUnavailable` (a skip, exit 3);
5c. PyTorch (`--target torch`, `export.hf.torch_engine`): the family's modules themselves, held to the
   fp32 gate on the CPU and, where CUDA is present, judged like int8 under FP16 autocast on the GPU;
5d. TorchScript (`--target libtorch`, `export.hf.libtorch`): each module traced, loaded back and held
   to the fp32 gate on the parity cases; installed for Triton's PyTorch backend behind an ensemble
   with the engine's name and tensors (as the native model's libtorch target);
6. install `NAME_<role>/` Triton models (config.pbtxt, `1/model.onnx` or `model.plan`, `1/model.py` for the
   Python-backend targets, `1/checkpoint/` with import.json and tokenizer.json (and, for torch, the
   source's config.json and weights), `1/manifest.json`), next to what the repository holds, and list
   the model in `vtfuse_models.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.engine_layout import engine_layout
from export.errors import InstallError, ParityError
from export.generate_model import generate_config, write_version_folder
from export.hf import parity
from export.hf.graphs import EngineGraph, family_module
from export.hf.source import (
    PROCESSOR_BACKEND,
    HfSource,
    decode_clean_up,
    image_processing,
    resolve_source,
    tokenizer_json,
)
from export.hf.torch_engine import ENGINE_PARAMETERS as TORCH_ENGINE_PARAMETERS
from export.hf.torch_engine import check_parity as check_torch_parity
from export.hf.torch_engine import copy_weights
from export.onnx_export import sha256_file
from export.quantize import dynamic_int8
from export.render_repo import (
    COMMITTED_REPO,
    ENGINE_BACKENDS,
    LIBTORCH_FILE,
    ORT_PARAMETER_MAP,
    engine_ensemble_config,
    libtorch_config,
    libtorch_name,
)
from serving.families.imported import (
    IMPORT_RECORD,
    TOKENIZER_FILE,
    ImportRecord,
    check_model_name,
    load_plain_tokenizer,
    read_repository_models,
    write_repository_models,
)

log = logging.getLogger(__name__)

IMPORT_TARGETS = ("embedded", "onnxruntime", "tensorrt", "torch", "libtorch")
GENERATION_TARGETS = ("embedded", "onnxruntime", "torch")
GENERATE_ROLE = "generate"  # the decoupled Triton model of a generative family (export/generate_model.py)
DEFAULT_PRECISION = {"embedded": "int8", "onnxruntime": "fp32", "tensorrt": "fp32", "torch": "fp32", "libtorch": "fp32"}
# The engine file each target installs in NAME_<role>/1/ (torch: none, the weights go into checkpoint/;
# libtorch: none, NAME_<role> is an ensemble and model.pt goes into NAME_<role>_libtorch/1/).
ARTEFACT = {"embedded": "model.onnx", "onnxruntime": "model.onnx", "tensorrt": "model.plan", "torch": None,
            "libtorch": None}
OPSET = 17
# Instances and threads of every engine: export/engine_layout.py, the table tiny's engines use too (with the
# measurements: a generative model's vision tower 2 × 1 and its decoder 1 thread beside the decode loop).
# Copied next to import.json so each installed model says what it came from.
SOURCE_FILES = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
PYTHON_MODEL = {
    "embedded": (
        '"""Triton Python model: an imported engine run by ONNX Runtime (serving/triton/python_models/engine.py)."""'
        "\n\nfrom serving.triton.python_models.engine import OnnxEngineModel as TritonPythonModel  # noqa: F401\n"
    ),
    "torch": (
        '"""Triton Python model: an imported engine run by PyTorch '
        '(serving/triton/python_models/hf_torch_engine.py)."""\n\n'
        "from serving.triton.python_models.hf_torch_engine import HfTorchEngineModel as TritonPythonModel"
        "  # noqa: F401\n"
    ),
}


def export_graph(graph: EngineGraph, path: Path) -> Path:
    """Trace one engine to ONNX (TorchScript exporter, opset 17) with its batch and variable axes dynamic."""
    names_in = [t.name for t in graph.inputs]
    names_out = [t.name for t in graph.outputs]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-level shape checks in transformers
        torch.onnx.export(
            graph.module.eval(),
            graph.example,
            str(path),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=graph.dynamic_axes(),
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def engine_config(triton_name: str, graph: EngineGraph, target: str, precision: str = "fp32",
                  generative: bool = False) -> mc.ModelConfig:
    """config.pbtxt of one imported engine for a target (embedded: Python backend over ONNX Runtime).

    Instances and threads on the CPU targets come from the engine layout table (`precision`; a
    generative model's own row for its vision tower); GPU instances stay one a device.
    """
    layout = engine_layout(precision, graph.role, generative)
    c = mc.ModelConfig(name=triton_name, max_batch_size=graph.max_batch_size)
    for t in graph.inputs:
        c.input.append(mc.ModelInput(name=t.name, data_type=mc.DataType.Value(f"TYPE_{t.dtype}"), dims=list(t.dims)))
    for t in graph.outputs:
        c.output.append(mc.ModelOutput(name=t.name, data_type=mc.DataType.Value(f"TYPE_{t.dtype}"), dims=list(t.dims)))
    group = c.instance_group.add()
    group.count = 1
    c.dynamic_batching.max_queue_delay_microseconds = 0
    policy = c.dynamic_batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = 30_000_000
    policy.allow_timeout_override = True
    policy.max_queue_size = 256
    if graph.role == "image_encoder":
        # A repeated image (several calls about one picture) is answered from Triton's response cache
        # (on when tritonserver runs with --cache-config: VTFUSE_RESPONSE_CACHE_MB, as for tiny).
        c.response_cache.enable = True
    if target == "embedded":
        c.backend = "python"
        group.kind = mc.ModelInstanceGroup.KIND_CPU
        group.count = layout.instances
        c.parameters["intra_op_threads"].string_value = str(layout.threads)
    elif target == "torch":
        # The GPU Triton gives the instance (KIND_AUTO), else the CPU; the parameters are hf_torch_engine.py's.
        c.backend = "python"
        group.kind = mc.ModelInstanceGroup.KIND_AUTO
        for key, value in {**TORCH_ENGINE_PARAMETERS, "role": graph.role, "torch_threads": str(layout.threads)}.items():
            c.parameters[key].string_value = value
    elif target == "libtorch":  # the ensemble in front of NAME_<role>_libtorch (_install_libtorch_model)
        return engine_ensemble_config(engine_config(triton_name, graph, "embedded", precision, generative),
                                      triton_name)
    else:
        backend, platform, filename = ENGINE_BACKENDS[target]
        c.backend, c.platform, c.default_model_filename = backend, platform, filename
        if target == "tensorrt":
            group.kind = mc.ModelInstanceGroup.KIND_GPU
        else:
            group.kind = mc.ModelInstanceGroup.KIND_AUTO
            c.parameters[ORT_PARAMETER_MAP["intra_op_threads"]].string_value = str(layout.threads)
    return c


EXPORT_NOTE = {
    "torch": {"engine": "the family's PyTorch module over the checkpoint's weights (export/hf/torch_engine.py)"},
    "libtorch": {"engine": f"torch.jit.trace of the family's module ({LIBTORCH_FILE} of the model behind this "
                           "ensemble, export/hf/libtorch.py)"},
}


def _install_libtorch_model(repo: Path, triton_name: str, graph: EngineGraph, traced: Path, header: str) -> None:
    """`NAME_<role>_libtorch/`: the TorchScript engine on Triton's PyTorch backend, behind the ensemble NAME_<role>."""
    config = libtorch_config(engine_config(triton_name, graph, "embedded"), triton_name)
    mdir = repo / config.name
    if mdir.exists():
        shutil.rmtree(mdir)
    (mdir / "1").mkdir(parents=True)
    note = f"{header}# The TorchScript engine behind the ensemble {triton_name} (export/hf/libtorch.py).\n"
    (mdir / "config.pbtxt").write_text(note + text_format.MessageToString(config))
    shutil.copyfile(traced, mdir / "1" / LIBTORCH_FILE)


def _header(model: str, role: str, source: str, target: str) -> str:
    return (
        f"# Imported model {model!r}, engine {role}: written by `vtfuse import-hf {source} --name {model}`\n"
        f"# (target {target}). Variable dims (-1): token length; for ViLT also image height and width.\n"
    )


def _processor(src: HfSource) -> Any:
    """The checkpoint's own `transformers` processor: the parity reference's preprocessing."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(src.folder), backend=PROCESSOR_BACKEND)


def import_hf(
    source: str,
    name: str,
    *,
    repo: str | Path | None = None,
    precision: str | None = None,
    target: str = "embedded",
    work_dir: str | Path | None = None,
    threads: int | None = None,
    plan_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Import one checkpoint into a Triton repository (see the module doc for the steps).

    Returns:
        {"name", "family", "tasks", "precision", "engines", "repo", "parity", "int8"}.

    Raises:
        ImportSourceError / UnsupportedArchitecture: the source cannot be imported.
        ParityError: the fp32 engines (or explicitly requested int8 ones) miss their gate; nothing installed.
        InstallError: bad target, precision or name.
    """
    t0 = time.monotonic()
    try:
        check_model_name(name)
    except ValueError as e:
        raise InstallError(str(e)) from None
    if target not in IMPORT_TARGETS:
        raise InstallError(f"target {target!r}: import-hf renders {', '.join(IMPORT_TARGETS)}")
    if precision not in (None, "fp32", "int8"):
        raise InstallError(f"precision {precision!r}: choose fp32 or int8")
    if target == "tensorrt" and precision == "int8":
        raise InstallError("--precision int8 is for the ONNX targets: TensorRT builds FP16 plans from the fp32 ONNX")
    if target == "torch" and precision == "int8":
        raise InstallError("--precision int8 is for the ONNX targets: the torch target runs the checkpoint's own "
                           "weights (FP32 on the CPU, FP16 autocast on a GPU)")
    if target == "libtorch" and precision == "int8":
        raise InstallError("--precision int8 is for the ONNX targets: the libtorch target traces the checkpoint's "
                           "own FP32 modules")
    repo = Path(repo) if repo is not None else COMMITTED_REPO
    if work_dir:
        return _import(source, name, repo, precision, target, Path(work_dir), threads, t0, plan_cache)
    # No --work-dir: the ONNX files (fp32 and int8, each the size of the model) go once installed.
    with tempfile.TemporaryDirectory(prefix=f"vtfuse-import-{name}-") as tmp:
        return _import(source, name, repo, precision, target, Path(tmp), threads, t0, plan_cache)


def _import(
    source: str, name: str, repo: Path, precision: str | None, target: str, work: Path, threads: int | None,
    t0: float,
    plan_cache: str | Path | None = None,
) -> dict[str, Any]:
    """`import_hf` once its arguments are checked, with `work` for the ONNX files and parity.json."""
    src = resolve_source(source)
    fam = family_module(src.family.name)
    image = image_processing(src)
    tok_text, max_tokens = tokenizer_json(src)
    work.mkdir(parents=True, exist_ok=True)
    (work / TOKENIZER_FILE).write_text(tok_text)
    tokenizer = load_plain_tokenizer(work / TOKENIZER_FILE)
    log.info("import %s: %s (%s), max %d tokens, image %s", name, src.config.get("architectures"), src.family.name,
             max_tokens, image)

    spec_of = getattr(fam, "generation_spec", None)  # generative families (blip_caption, blip_vqa)
    if spec_of is not None and target not in GENERATION_TARGETS:
        raise InstallError(
            f"target {target!r}: {src.family.architecture} imports for {', '.join(GENERATION_TARGETS)} "
            "(its decode loop is a Python-backend model on every target)"
        )
    model = fam.load_model(str(src.folder))
    processor = _processor(src)
    cases = fam.parity_cases(
        model, processor, tokenizer, image, parity.parity_images(), list(parity.PARITY_TEXTS), max_tokens
    )
    graphs = fam.graphs(model, src.config, image)  # after the reference: a family may patch the instance
    fp32_paths = {g.role: export_graph(g, work / f"{g.role}.onnx") for g in graphs}
    fp32_out = parity.run_cases(fp32_paths, cases, threads)
    report = parity.fp32_report(cases, fp32_out)
    (work / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    if not report["ok"]:
        raise ParityError(
            f"{name}: the fp32 engines differ from transformers: {'; '.join(report['failures'])}",
            engine=report["failures"][0].split(".")[0],
            output=report["failures"][0].split(".")[1].split(":")[0],
            figures=report,
        )
    log.info("import %s: fp32 parity ok %s", name, json.dumps(report["engines"]))

    engines = {r: f"{name}_{r}" for r in dict.fromkeys(g.triton_role for g in graphs)}
    # Triton models a family brings beside its engines (BLIP retrieval: `itm`, one image against N texts).
    extras = fam.extra_models(name, engines, graphs) if hasattr(fam, "extra_models") else {}
    spec = None
    generation: dict[str, Any] | None = None
    if spec_of is not None:
        spec = spec_of(model, src.config, engines, image, max_tokens, decode_clean_up(src))
        generation = fam.check_generation(model, processor, tokenizer, image, fp32_paths, spec,
                                          parity.parity_images(), threads)
        (work / "generation.json").write_text(json.dumps(generation, indent=2) + "\n")
        if not generation["ok"]:
            raise ParityError(
                f"{name}: the served decoding differs from transformers' generate(): "
                f"{'; '.join(generation['failures'])}",
                engine="generate",
                output="token_ids",
                figures=generation,
            )
        log.info("import %s: %d of %d generated sequences equal generate()", name, generation["identical"],
                 generation["sequences"])

    chosen = precision or DEFAULT_PRECISION[target]
    int8: dict[str, Any] | None = None
    paths = fp32_paths
    if chosen == "int8":
        # A family may keep graphs in fp32 (generation: dynamic int8 quantises activations per tensor, which
        # would make a row's tokens depend on its batch-mates in the decoder).
        roles = getattr(fam, "INT8_ROLES", tuple(fp32_paths))
        int8_paths = {**fp32_paths, **dynamic_int8({r: fp32_paths[r] for r in roles}, work / "int8")}
        int8_out = parity.run_cases(int8_paths, cases, threads)
        view = fam.judge(parity.by_role(cases, fp32_out), parity.by_role(cases, int8_out))
        if spec is not None:  # what users see: the same greedy tokens as fp32 (which equal generate())
            gen8 = fam.check_generation(model, processor, tokenizer, image, int8_paths, spec, parity.parity_images(),
                                        threads)
            view.figures["generate_agreement"] = gen8["agreement"]
            view.failures += [f"int8 tokens differ: {f}" for f in gen8["failures"]]
        int8 = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                "figures": view.figures, "failures": view.failures, "ok": not view.failures}
        if view.failures and precision == "int8":
            raise ParityError(
                f"{name}: int8 engines changed what users see ({'; '.join(view.failures)}): "
                "import with --precision fp32",
                engine="all",
                output="int8",
                figures=int8,
            )
        if view.failures:
            log.warning("import %s: int8 missed its criteria (%s): installing fp32", name, "; ".join(view.failures))
            chosen = "fp32"
        else:
            paths = int8_paths

    tensorrt: dict[str, Any] | None = None
    if target == "tensorrt":
        from export.hf import tensorrt as hf_trt

        cache = plan_cache or hf_trt.DEFAULT_CACHE
        plans, tensorrt = hf_trt.build_plans(graphs, fp32_paths, image, max_tokens, cache)  # EngineUnavailable: skip
        view = fam.judge(parity.by_role(cases, fp32_out), parity.by_role(cases, hf_trt.run_cases(plans, cases)))
        tensorrt.update(figures=view.figures, failures=view.failures, ok=not view.failures)
        if view.failures:
            raise ParityError(
                f"{name}: the FP16 TensorRT plans changed what users see ({'; '.join(view.failures)})",
                engine="all",
                output="tensorrt",
                figures=tensorrt,
            )
        paths, chosen = plans, "fp16"

    torch_parity: dict[str, Any] | None = None
    if target == "torch":
        torch_parity = check_torch_parity(graphs, cases, fam.judge, autocast=TORCH_ENGINE_PARAMETERS["autocast"])
        (work / "parity-torch.json").write_text(json.dumps(torch_parity, indent=2) + "\n")
        if not torch_parity["ok"]:
            failures = torch_parity["cpu_fp32"]["failures"] + torch_parity["cuda"].get("failures", [])
            raise ParityError(
                f"{name}: the PyTorch engines differ ({'; '.join(failures)})",
                engine="all",
                output="torch",
                figures=torch_parity,
            )

    libtorch: dict[str, Any] | None = None
    if target == "libtorch":
        from export.hf import libtorch as hf_libtorch

        paths, libtorch = hf_libtorch.build(graphs, cases, work)
        (work / "parity-libtorch.json").write_text(json.dumps(libtorch, indent=2) + "\n")
        if not libtorch["ok"]:
            raise ParityError(
                f"{name}: the TorchScript engines differ from transformers: {'; '.join(libtorch['failures'])}",
                engine=libtorch["failures"][0].split(".")[0],
                output="libtorch",
                figures=libtorch,
            )
        log.info("import %s: TorchScript parity ok %s", name, json.dumps(libtorch["engines"]))

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    parity_summary = {
        "tolerance": report["tolerance"],
        "reference": report["reference"],
        "fp32": report["engines"],
        "ok": True,
        **({"int8": int8} if int8 is not None else {}),
        **({"tensorrt": tensorrt} if tensorrt is not None else {}),
        **({"torch": torch_parity} if torch_parity is not None else {}),
        **({"libtorch": libtorch} if libtorch is not None else {}),
        **({"generate": generation} if generation is not None else {}),
    }
    record = ImportRecord(
        name=name,
        family=src.family.name,
        architecture=src.family.architecture or "",
        tasks=src.family.tasks,
        engines=engines,
        precision=chosen,
        source=str(source),
        image=image,
        max_tokens=max_tokens,
        embed_dim=int(src.config.get("image_text_hidden_size", 0) or 0),
        labels=_labels(src.config) if "vqa" in src.family.tasks else (),
        parity=parity_summary,
        created=created,
        max_batch={g.role: g.max_batch_size for g in graphs if g.role == g.triton_role},
        generation=spec.to_json() if spec is not None else {},
    )
    note = getattr(fam, "check_sampling", None)
    if note is not None and (msg := note(src.config, image)):
        log.warning("import %s: %s", name, msg)
    _install(repo, record, graphs, paths, src, work, target)
    _install_extras(repo, record, extras, src)
    log.info("import %s: installed %s engines into %s in %.1f s", name, chosen, repo, time.monotonic() - t0)
    return {
        "name": name,
        "family": src.family.name,
        "tasks": list(src.family.tasks),
        "precision": chosen,
        "engines": engines,
        "repo": str(repo),
        "parity": report["engines"],
        "int8": int8,
        **({"torch": torch_parity} if torch_parity is not None else {}),
        "seconds": round(time.monotonic() - t0, 1),
    }


def _labels(config: dict[str, Any]) -> tuple[str, ...]:
    id2label = config.get("id2label") or {}
    return tuple(str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k)))


def _install_generate(vdir: Path, record: ImportRecord, paths: dict[str, Path], src: HfSource, work: Path,
                      target: str) -> None:
    """The generate model's version folder: its two decoder graphs (ONNX targets), decoder.json, generation.json."""
    spec = record.generation_spec
    assert spec is not None
    shape = family_module(record.family).decoder_shape(src.config)
    onnx = target != "torch"
    write_version_folder(vdir, paths["cross_kv"] if onnx else None, paths["decoder_step"] if onnx else None, shape,
                         spec, work / TOKENIZER_FILE)


def _engine_precision(record: ImportRecord, role: str) -> str:
    """The precision one engine is installed in: int8 imports keep a family's INT8_ROLES only in int8."""
    if record.precision != "int8":
        return "fp32"
    return "int8" if role in getattr(family_module(record.family), "INT8_ROLES", (role,)) else "fp32"


def _install_extras(repo: Path, record: ImportRecord, extras: dict[str, tuple[mc.ModelConfig, str]],
                    src: HfSource) -> None:
    """A family's Triton models that are not engines (Python BLS models): config, model.py, record, manifest."""
    for role, (config, model_py) in extras.items():
        mdir = repo / record.engines[role]
        if mdir.exists():
            shutil.rmtree(mdir)
        (mdir / "1" / "checkpoint").mkdir(parents=True)
        header = _header(record.name, role, record.source, "any")
        (mdir / "config.pbtxt").write_text(header + text_format.MessageToString(config))
        (mdir / "1" / "model.py").write_text(model_py)
        (mdir / "1" / "checkpoint" / IMPORT_RECORD).write_text(json.dumps(record.to_json(), indent=2) + "\n")
        manifest = {
            "model": mdir.name, "served_as": record.name, "role": role, "version": 1, "family": record.family,
            "source": record.source, "created": record.created, "bls": "a Python model over the engines, no weights",
            "config_pbtxt_sha256": sha256_file(mdir / "config.pbtxt"),
            "artefacts": {p.relative_to(mdir / "1").as_posix(): sha256_file(p)
                          for p in sorted((mdir / "1").rglob("*")) if p.is_file()},
        }
        (mdir / "1" / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _install(
    repo: Path, record: ImportRecord, graphs: list[EngineGraph], paths: dict[str, Path], src: HfSource, work: Path,
    target: str,
) -> None:
    """Write the Triton models and list the model in the repository (replacing an earlier import of NAME)."""
    repo.mkdir(parents=True, exist_ok=True)
    models = read_repository_models(repo)
    old = models.get(record.name)
    for triton_name in (old.engines.values() if old else ()):
        for folder in (repo / triton_name, repo / libtorch_name(triton_name)):
            if folder.exists():
                shutil.rmtree(folder)
    lower_precision: dict[str, Any] = {
        k: record.parity[k] for k in ("int8", "tensorrt", "torch", "libtorch", "generate") if k in record.parity
    }
    models_of: dict[str, list[EngineGraph]] = {}  # Triton model role → its graphs (generate: two)
    for g in graphs:
        models_of.setdefault(g.triton_role, []).append(g)
    for role, members in models_of.items():
        g = members[0]
        triton_name = record.engines[role]
        mdir = repo / triton_name
        if mdir.exists():
            shutil.rmtree(mdir)
        vdir = mdir / "1"
        (vdir / "checkpoint").mkdir(parents=True)
        header = _header(record.name, role, record.source, target)
        if role == GENERATE_ROLE:
            _install_generate(vdir, record, {m.role: paths[m.role] for m in members}, src, work, target)
            decoder = engine_layout("fp32") if target == "torch" else engine_layout("fp32", "decoder", generative=True)
            config = generate_config(triton_name, target, decoder.threads)
            (mdir / "config.pbtxt").write_text(header + text_format.MessageToString(config))
        else:
            config = engine_config(triton_name, g, target, _engine_precision(record, g.role),
                                   generative=bool(record.generation))
            (mdir / "config.pbtxt").write_text(header + text_format.MessageToString(config))
        if target == "libtorch":
            _install_libtorch_model(repo, triton_name, g, paths[g.role], header)
        artefact = ARTEFACT[target]
        if artefact is not None and role != GENERATE_ROLE:
            shutil.copyfile(paths[g.role], vdir / artefact)
        if target in PYTHON_MODEL and role != GENERATE_ROLE:
            (vdir / "model.py").write_text(PYTHON_MODEL[target])
        ckpt = vdir / "checkpoint"
        if target == "torch":
            copy_weights(src.folder, ckpt)
        (ckpt / IMPORT_RECORD).write_text(json.dumps(record.to_json(), indent=2) + "\n")
        shutil.copyfile(work / TOKENIZER_FILE, ckpt / TOKENIZER_FILE)
        for f in SOURCE_FILES:
            if (src.folder / f).exists():
                shutil.copyfile(src.folder / f, ckpt / f)
        weights = sorted(src.folder.glob("*.safetensors"))
        manifest = {
            "model": triton_name,
            "served_as": record.name,
            "role": role,
            "version": 1,
            "target": target,
            "family": record.family,
            "architecture": record.architecture,
            "tasks": list(record.tasks),
            "precision": record.precision,
            "source": record.source,
            "source_weights_sha256": {w.name: sha256_file(w) for w in weights},
            "created": record.created,
            "export": EXPORT_NOTE.get(target, {"exporter": "torch.onnx.export (TorchScript, dynamo=False)",
                                               "opset": OPSET}),
            "config_pbtxt_sha256": sha256_file(mdir / "config.pbtxt"),
            "artefacts": {
                p.relative_to(vdir).as_posix(): sha256_file(p) for p in sorted(vdir.rglob("*")) if p.is_file()
            },
            "parity": {
                "tolerance": record.parity["tolerance"],
                "fp32": {m.role: record.parity["fp32"].get(m.role) for m in members} if len(members) > 1
                else record.parity["fp32"].get(g.role),
                **lower_precision,
            },
        }
        if target == "libtorch":
            behind = repo / libtorch_name(triton_name)
            manifest["libtorch_model"] = {"name": behind.name, LIBTORCH_FILE: sha256_file(behind / "1" / LIBTORCH_FILE)}
        (vdir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    models[record.name] = record
    write_repository_models(repo, models)
