"""Stage 4: install engines and checkpoint files into `<repo>/<model>/<version>/`, with a manifest.json each.

Per model version folder:

- engines: `model.onnx` (targets `embedded`, `onnxruntime`; fp32, or with `precision="int8"` the
  dynamic-int8 copies of `vtfuse export quantize`), `model.plan` (`tensorrt`), or the checkpoint's
  `checkpoint/model.safetensors` (`torch`: PyTorch engines, checked against ONNX Runtime first);
  `libtorch`: each engine's folder holds the ensemble that keeps its tensor names, and
  `<engine>_libtorch/<version>/model.pt` the TorchScript engine (traced, checked against ONNX Runtime);
- every model: `checkpoint/{config,tokenizer,answers}.json` (preprocess and vqa read them; the
  engines carry them too, so each folder says what it was built from);
- `manifest.json`: sha256 of every installed file and of config.pbtxt, the parity figures, the
  precision (and the int8 figures), export settings (opset, preset, target), the source
  checkpoint and the sha256 of its `model.safetensors`, and the time.

A preset with a caption decoder also gets `caption/<version>/` (`export/caption.py`): the decoder's
two ONNX graphs (fp32 whatever the precision), `decoder.json`, `model.py`, `checkpoint/generation.json`
and the tokenizer, with a manifest holding the graphs' parity and, for int8, the agreement of greedy
captions from int8 image features with fp32 ones.

`embedded` installs into the committed `model_repository/` (whose configs must already describe
the preset: `tiny`), or renders a full Python-backend repository when `--repo` names another
folder; the other targets always render one (default `build/model_repository-<target>/`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from export.check import PARITY_FILE
from export.engine import ENGINES_FILE
from export.engine_layout import ENGINE_THREADS
from export.errors import InstallError, ParityError
from export.onnx_export import CHECKPOINT_FILES, read_export_info, sha256_file
from export.quantize import INT8_DIR, read_quantize_report
from export.render_repo import (
    CAPTION_MODEL,
    COMMITTED_REPO,
    LIBTORCH_FILE,
    ORT_PARAMETER_MAP,
    TARGETS,
    config_mismatches,
    default_repo,
    dump_config,
    leading_comments,
    libtorch_name,
    load_config,
    model_dirs,
    render_repository,
)
from serving.model.io_spec import ENGINES
from serving.model.model import FusionConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ARTEFACT = {"embedded": "model.onnx", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}  # torch: the weights
PRECISIONS = ("fp32", "int8")
# The precision a target gets unless told: the embedded (CPU, Python-backend) repository serves
# int8 (2.2× fp32 on `small` here, answers unchanged on `tiny`: loadtests/README.md); the NGC
# targets keep fp32 ONNX, which TensorRT and ONNX Runtime's GPU providers build their own precision from.
# `torch` keeps fp32 weights; its GPU instances compute under FP16 autocast (config parameter `autocast`).
# `libtorch` installs fp32 TorchScript engines (export/libtorch.py).
DEFAULT_PRECISION = {
    "embedded": "int8", "onnxruntime": "fp32", "tensorrt": "fp32", "torch": "fp32", "libtorch": "fp32"
}
# The engines' thread parameter in each target's config (TensorRT and libtorch engines have none).
THREAD_PARAMETER = {
    "embedded": "intra_op_threads", "onnxruntime": ORT_PARAMETER_MAP["intra_op_threads"], "torch": "torch_threads"
}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _engine_parity(parity: dict[str, Any] | None, engine: str | None) -> dict[str, Any] | None:
    """An engine's own figures (every engine's for preprocess and vqa, which depend on them all)."""
    if parity is None or engine is None:
        return parity
    return {
        "tolerance": parity.get("tolerance"),
        "onnxruntime": parity.get("onnxruntime"),
        "ok": parity.get("ok"),
        **{s: parity[s][engine] for s in ("random", "real") if engine in parity.get(s, {})},
    }


def _artefact_source(onnx_dir: Path, engine: str, target: str, export_info: dict[str, Any], precision: str) -> Path:
    if target != "tensorrt":
        return onnx_dir / (f"{INT8_DIR}/{engine}.onnx" if precision == "int8" else f"{engine}.onnx")
    engines = _read_json(onnx_dir / ENGINES_FILE)
    if engines is None or engine not in engines.get("engines", {}):
        raise InstallError(
            f"no TensorRT plan of {engine} in {onnx_dir / ENGINES_FILE}: run `vtfuse export engine` "
            "on the GPU machine that will serve it first"
        )
    entry = engines["engines"][engine]
    if entry["onnx_sha256"] != export_info["files"][engine]["sha256"]:
        raise InstallError(
            f"the {engine} plan was built from another ONNX file than {onnx_dir}/{engine}.onnx: "
            "rerun `vtfuse export engine`"
        )
    plan = Path(entry["plan"])
    if not plan.exists():
        raise InstallError(f"plan {plan} is gone from the cache: rerun `vtfuse export engine`")
    return plan


def _ensure_python_model(model_dir: Path, version: int) -> None:
    """A Python-backend model needs model.py in the served version folder: copy it from another version."""
    vdir = model_dir / str(version)
    if (vdir / "model.py").exists():
        return
    for other in sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        if (other / "model.py").exists():
            shutil.copyfile(other / "model.py", vdir / "model.py")
            log.info("%s: copied %s/model.py into version %d", model_dir.name, other.name, version)
            return


def _set_engine_threads(config_path: Path, target: str, precision: str) -> None:
    """A rendered engine config gets the thread count its precision measured best with (ENGINE_THREADS)."""
    key = THREAD_PARAMETER.get(target)
    if key is None:
        return
    config = load_config(config_path)
    if key not in config.parameters:
        return
    threads = str(ENGINE_THREADS[precision])
    if config.parameters[key].string_value != threads:
        config.parameters[key].string_value = threads
        config_path.write_text(dump_config(config, leading_comments(config_path).strip()))


def _clear_artefacts(vdir: Path) -> None:
    for name in ("model.onnx", "model.plan", MANIFEST):
        (vdir / name).unlink(missing_ok=True)
    if (vdir / "checkpoint").exists():
        shutil.rmtree(vdir / "checkpoint")


def install(
    onnx_dir: str | Path,
    target: str,
    *,
    repo: str | Path | None = None,
    version: int = 1,
    source_repo: str | Path = COMMITTED_REPO,
    require_parity: bool = True,
    precision: str | None = None,
) -> dict[str, Any]:
    """Install a stage-1 folder's artefacts into a model repository for `target`.

    Args:
        onnx_dir: the stage-1 folder (ONNX files, export.json, checkpoint/, parity.json, engines.json).
        target: `embedded`, `onnxruntime` or `tensorrt`.
        repo: destination repository (default: the committed one for `embedded`, else
            `build/model_repository-<target>/`).
        version: the version folder to install into.
        source_repo: the committed repository rendered from.
        require_parity: refuse to install artefacts that stage 2 (and for int8, stage 2b) has not passed.
        precision: `fp32` or `int8` (the engines of `vtfuse export quantize`); None: the
            target's default (`DEFAULT_PRECISION`).

    Returns:
        {"repo", "target", "version", "models": {model: manifest path}}.

    Raises:
        InstallError: a stage has not run, parity failed, or the committed configs describe another preset.
    """
    if target not in TARGETS:
        raise InstallError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    if version < 1:
        raise InstallError(f"version {version}: Triton version folders are positive integers")
    onnx_dir = Path(onnx_dir)
    info = read_export_info(onnx_dir)
    cfg = FusionConfig.from_json(onnx_dir / "checkpoint" / "config.json")
    parity = _read_json(onnx_dir / PARITY_FILE)
    if require_parity and parity is None:
        raise InstallError(f"no {PARITY_FILE} in {onnx_dir}: run `vtfuse export check` before installing")
    if require_parity and parity is not None and not parity.get("ok", False):
        raise InstallError(f"{onnx_dir / PARITY_FILE} records a parity failure: fix the export before installing")
    precision = precision or DEFAULT_PRECISION[target]
    if precision not in PRECISIONS:
        raise InstallError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    int8 = _int8_report(onnx_dir, target, require_parity) if precision == "int8" else None
    _check_caption_stages(onnx_dir, cfg, parity, require_parity)
    trt_info = _read_json(onnx_dir / ENGINES_FILE) if target == "tensorrt" else None
    torch_engines = _torch_engines(onnx_dir, info, precision) if target == "torch" else None
    libtorch = _libtorch_engines(onnx_dir, info, precision) if target == "libtorch" else None
    native = torch_engines is None and libtorch is None
    sources = {e: _artefact_source(onnx_dir, e, target, info, precision) for e in ENGINES} if native else {}
    traced = {libtorch_name(e): e for e in ENGINES} if libtorch is not None else {}  # model → its engine

    dest = Path(repo) if repo is not None else default_repo(target)
    if dest.resolve() == Path(source_repo).resolve():
        if target != "embedded":
            raise InstallError(f"target {target} cannot be installed into {dest}, the source: pass another --repo")
        bad = config_mismatches(dest, cfg)
        if bad:
            raise InstallError(
                f"the configs of {', '.join(bad)} in {dest} do not describe preset {cfg.name}: "
                f"pass --repo build/model_repository-embedded-{cfg.name} to render a repository for it"
            )
        if not cfg.has_decoder and (dest / CAPTION_MODEL / "config.pbtxt").exists():
            raise InstallError(
                f"{dest} has the `{CAPTION_MODEL}` model but {cfg.name}'s checkpoint has no caption decoder: "
                f"pass --repo build/model_repository-embedded-{cfg.name} to render a repository without it"
            )
        if target == "embedded" and precision != "int8":
            log.warning("the committed configs give each %s engine instance %d thread(s), measured best for int8; "
                        "pass --repo to render a repository with %d for %s", precision, ENGINE_THREADS["int8"],
                        ENGINE_THREADS[precision], precision)
    else:
        render_repository(dest, cfg, target, source=source_repo)
        for engine in ENGINES:
            _set_engine_threads(dest / engine / "config.pbtxt", target, precision)

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifests = {}
    for model_dir in model_dirs(dest):
        model = model_dir.name
        vdir = model_dir / str(version)
        vdir.mkdir(parents=True, exist_ok=True)
        if model == CAPTION_MODEL:
            manifests[model] = _install_caption(onnx_dir, model_dir, version, target, cfg, info, parity, int8,
                                                precision, created)
            continue
        _clear_artefacts(vdir)
        installed: list[Path] = []
        if model in ENGINES and native:
            artefact = vdir / ARTEFACT[target]
            shutil.copyfile(sources[model], artefact)
            installed.append(artefact)
        if libtorch is not None and model in traced:
            shutil.copyfile(libtorch[0][traced[model]], vdir / LIBTORCH_FILE)
            installed.append(vdir / LIBTORCH_FILE)
        if (model not in ENGINES and model not in traced) or target in ("embedded", "torch"):
            _ensure_python_model(model_dir, version)
        (vdir / "checkpoint").mkdir()
        if model in ENGINES and torch_engines is not None:
            from export.torch_target import write_weights

            installed.append(write_weights(torch_engines[0], vdir / "checkpoint"))
        for name in CHECKPOINT_FILES:
            shutil.copyfile(onnx_dir / "checkpoint" / name, vdir / "checkpoint" / name)
            installed.append(vdir / "checkpoint" / name)
        manifest: dict[str, Any] = {
            "model": model,
            "version": version,
            "target": target,
            "preset": cfg.name,
            "created": created,
            "source_checkpoint": info["source"],
            "export": {**info["settings"], "versions": info["versions"], "onnx_files": info["files"]},
            "config_pbtxt_sha256": sha256_file(model_dir / "config.pbtxt"),
            "artefacts": {p.relative_to(vdir).as_posix(): sha256_file(p) for p in installed},
            "parity": _engine_parity(parity, model if model in ENGINES else None),
            "precision": precision,
        }
        if int8 is not None:
            manifest["int8"] = {k: int8.get(k) for k in ("method", "weight_type", "op_types", "onnxruntime", "n",
                                                          "criteria", "figures", "ok")}
        if torch_engines is not None and model in ENGINES:
            params = {k: v.string_value for k, v in load_config(model_dir / "config.pbtxt").parameters.items()}
            manifest["torch"] = {
                "autocast_on_gpu": params.get("autocast"),
                "mode_on_gpu": params.get("mode"),
                "parity": torch_engines[1],
            }
        if libtorch is not None and model in traced:
            manifest["libtorch"] = {"traced": "torch.jit.trace, fp32, CPU", "parity": libtorch[1]}
        if trt_info is not None and model in ENGINES:
            entry = trt_info["engines"][model]
            manifest["tensorrt"] = {
                "version": trt_info["tensorrt"],
                "gpu": trt_info["gpu"],
                "fp16": trt_info["fp16"],
                "profile": entry["profile"],
                "parity": entry.get("parity"),
            }
        (vdir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        manifests[model] = vdir / MANIFEST
    log.info("installed %s (%s, version %d) into %s: %s", cfg.name, target, version, dest, ", ".join(manifests))
    models = {m: str(p) for m, p in manifests.items()}
    return {"repo": str(dest), "target": target, "version": version, "precision": precision, "models": models}


def _check_caption_stages(onnx_dir: Path, cfg: FusionConfig, parity: dict[str, Any] | None,
                          require_parity: bool) -> None:
    """A preset with a caption decoder needs its graphs (stage 1) and their checks (stage 2) before installing."""
    from export.caption import has_caption_graphs

    if not cfg.has_decoder:
        return
    if not has_caption_graphs(onnx_dir):
        raise InstallError(f"{cfg.name} has a caption decoder but {onnx_dir} has no decoder graphs: "
                           "run `vtfuse export onnx` first")
    if require_parity and parity is not None and "caption" not in parity:
        raise InstallError(f"{onnx_dir / PARITY_FILE} has no caption decoder figures: run `vtfuse export check`")


def _install_caption(
    onnx_dir: Path, model_dir: Path, version: int, target: str, cfg: FusionConfig, info: dict[str, Any],
    parity: dict[str, Any] | None, int8: dict[str, Any] | None, precision: str, created: str,
) -> Path:
    """`caption/<version>/` (export/caption.py) and its manifest; returns the manifest's path."""
    from export.caption import GRAPHS, install_caption

    vdir = model_dir / str(version)
    installed = install_caption(onnx_dir, vdir)
    graphs = None
    if parity is not None:
        graphs = {
            "tolerance": parity.get("tolerance"),
            "onnxruntime": parity.get("onnxruntime"),
            "ok": parity.get("ok"),
            **{s: {g: parity[s][g] for g in GRAPHS if g in parity.get(s, {})}
               for s in ("random", "real", "first_step")},
            "served_greedy_vs_pytorch": parity.get("caption"),
        }
    manifest: dict[str, Any] = {
        "model": CAPTION_MODEL,
        "version": version,
        "target": target,
        "preset": cfg.name,
        "created": created,
        "source_checkpoint": info["source"],
        "export": {**info["settings"], "versions": info["versions"], "onnx_files": info["files"]},
        "config_pbtxt_sha256": sha256_file(model_dir / "config.pbtxt"),
        "artefacts": {p.relative_to(vdir).as_posix(): sha256_file(p) for p in installed},
        "parity": graphs,
        "precision": "fp32",  # the decoder graphs; the image features come from `image_encoder`
        "image_features_precision": precision,
    }
    if int8 is not None:
        manifest["int8_image_features"] = int8.get("figures", {}).get("caption")
    (vdir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return vdir / MANIFEST


def _torch_engines(onnx_dir: Path, info: dict[str, Any], precision: str) -> tuple[Any, dict[str, Any]]:
    """The `torch` target's checkpoint and its engines' parity against ONNX Runtime, before anything is written."""
    from export.torch_target import check_torch_parity, source_checkpoint

    if precision != "fp32":
        raise InstallError("--target torch installs fp32 weights (its GPU instances compute in FP16 autocast)")
    ckpt = source_checkpoint(info)
    try:
        return ckpt, check_torch_parity(ckpt, onnx_dir)
    except ParityError as e:
        raise InstallError(f"not installed: {e}") from e


def _libtorch_engines(onnx_dir: Path, info: dict[str, Any], precision: str) -> tuple[dict[str, Path], dict[str, Any]]:
    """The `libtorch` target's traced engines and their parity against ONNX Runtime, before anything is written."""
    from export.libtorch import build_engines
    from export.torch_target import source_checkpoint

    if precision != "fp32":
        raise InstallError("--target libtorch installs fp32 TorchScript engines")
    try:
        return build_engines(source_checkpoint(info), onnx_dir)
    except ParityError as e:
        raise InstallError(f"not installed: {e}") from e


def _int8_report(onnx_dir: Path, target: str, require_parity: bool) -> dict[str, Any] | None:
    """The int8 judgement of `vtfuse export quantize`, checked before anything is written."""
    if target == "tensorrt":
        raise InstallError("--precision int8 is for the ONNX targets: TensorRT builds FP16 plans from the fp32 ONNX")
    report = read_quantize_report(onnx_dir)
    if report is None:
        raise InstallError(f"no {onnx_dir / INT8_DIR}: run `vtfuse export quantize` before installing int8 engines")
    if require_parity and not report.get("ok", False):
        raise InstallError(
            f"the int8 engines of {onnx_dir} missed their criteria ({'; '.join(report.get('failures', []))}): "
            "install fp32 with --precision fp32"
        )
    return report
