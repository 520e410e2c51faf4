"""Session fixtures: ONE real tritonserver (and, where used, one Ray Serve app) for the whole run.

The server's repository is a copy of the built embedded repository with two imported
Hugging Face checkpoints added (`blip-test`, `vilt-test`: random-weight BLIP retrieval and
ViLT VQA built by tests/hf/checkpoints.py, imported fp32 with `vtfuse import-hf`), so the same
stack serves the native model and imported ones, as `make serve REPOSITORY=...` does.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.tracing import triton_trace_args
from serving.triton.launcher import DEFAULT_REPOSITORY, TritonServer
from tests.helpers import running_triton
from tests.otlp import OtlpReceiver

ARTIFACTS = Path(__file__).parent / "artifacts"
# Served name → checkpoint folder in `hf_checkpoints`.
HF_MODELS = {"blip-test": "blip", "vilt-test": "vilt", "blip-cap-test": "blip_caption", "blip-vqa-test": "blip_vqa"}
# The captioning checkpoint once more, its generate model held to one decoder row and one waiting sequence: a
# second request at once waits, a third is refused (429).
TIGHT_CAPTION = "blip-cap-tight"
TIGHT_SCHEDULER = {"max_rows": "1", "max_waiting": "1"}


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-weight `save_pretrained` folders of every imported family.

    "blip" (BlipForImageTextRetrieval; seed 4: its ITM probabilities spread over 0.15-0.5 across captions on
    the test images), "vilt" (ViltForQuestionAnswering), "blip_caption" (BlipForConditionalGeneration, a
    512-position decoder so a test can ask for a long caption) and "blip_vqa" (BlipForQuestionAnswering).
    """
    from tests.hf.checkpoints import build_blip, build_blip_caption, build_blip_vqa, build_vilt

    root = tmp_path_factory.mktemp("hf")
    return {
        "blip": build_blip(root / "blip", seed=4),
        "vilt": build_vilt(root / "vilt", seed=2),
        "blip_caption": build_blip_caption(root / "blip_caption", positions=512),
        "blip_vqa": build_blip_vqa(root / "blip_vqa"),
    }


@pytest.fixture(scope="session")
def test_repository(tmp_path_factory: pytest.TempPathFactory, hf_checkpoints: dict[str, Path]) -> Path:
    """The built embedded repository, copied, with `blip-test` and `vilt-test` imported into it (fp32)."""
    from export.hf.importer import import_hf

    base = Path(os.environ.get("VTFUSE_TEST_REPOSITORY", DEFAULT_REPOSITORY))
    if not (base / "fusion" / "1" / "model.onnx").exists():
        pytest.fail(f"{base} is not built: run `make repository` (vtfuse export all --target embedded) first")
    repo = tmp_path_factory.mktemp("repository") / "model_repository"
    shutil.copytree(base, repo, ignore=shutil.ignore_patterns("__pycache__", "vtfuse_models.json"))
    for name, key in HF_MODELS.items():
        import_hf(str(hf_checkpoints[key]), name, repo=repo, precision="fp32")
    import_hf(str(hf_checkpoints["blip_caption"]), TIGHT_CAPTION, repo=repo, precision="fp32")
    config = repo / f"{TIGHT_CAPTION}_generate" / "config.pbtxt"
    text = config.read_text()
    for key, value in TIGHT_SCHEDULER.items():
        text = re.sub(rf'(key: "{key}"\s*value \{{\s*string_value: )"\d+"', rf'\1"{value}"', text)
    config.write_text(text)
    return repo


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP trace receiver (a thread) the session's Triton and Ray Serve app export spans to."""
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def triton(test_repository: Path, otlp_receiver: OtlpReceiver) -> Iterator[TritonServer]:
    """A real tritonserver on free ports over the test repository (tiny + imported models); always stopped.

    Its OpenTelemetry trace mode points at `otlp_receiver` with trace level OFF: a test turns
    tracing on through Triton's trace API for as long as it needs it.
    """
    trace_args = (
        *triton_trace_args(otlp_receiver.endpoint, enabled=False),
        "--trace-config=opentelemetry,bsp_schedule_delay=200",  # export within 0.2 s (default 5 s)
    )
    with running_triton(test_repository, ARTIFACTS / "tritonserver.log", extra_args=trace_args) as server:
        yield server  # type: ignore[misc]
