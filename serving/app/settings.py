"""The application's settings: limits, served models, Triton and batching; `build_app`'s typed argument.

Everything here arrives as YAML (deploy/serve_config.yaml `args:`) or from `vtfuse serve`,
so it is Pydantic with unknown keys refused. Environment variables `VTFUSE_<FIELD>` and
`VTFUSE_LIMITS_<FIELD>` override scalar fields (see `AppArgs.with_env`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from serving.paths import REPO_ROOT

if TYPE_CHECKING:
    from serving.triton.client import TritonClientSettings

DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"


class Limits(BaseModel):
    """Per-request limits; going over one is a 4xx whose message names the setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest HTTP body (JSON or multipart) in bytes; over it: 413."
    )
    max_pixels: int = Field(
        default=4096 * 4096, ge=64 * 64, description="Largest width x height of one image; over it (or a bomb): 413."
    )
    max_questions: int = Field(default=32, ge=1, description="Questions per /v1/vqa request; over it: 413.")
    max_texts: int = Field(
        default=128, ge=1, description="Texts per /v1/match, /v1/retrieve, /v1/embed request; over it: 413."
    )
    max_images: int = Field(default=64, ge=1, description="Images per /v1/retrieve or /v1/embed request; over it: 413.")
    max_text_chars: int = Field(
        default=1000, ge=16, description="Characters per text, checked before tokenizing; over it: 422."
    )
    max_top_k: int = Field(default=100, ge=1, description="Largest `top_k`; over it: 422.")
    request_timeout_s: float = Field(
        default=10.0, gt=0, description="Deadline of one admitted request, preprocessing and Triton included; then 504."
    )
    generation_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Deadline of a generation request (/v1/caption, /v1/vqa on a generative model): then 504 and its "
        "decoder slot is freed.",
    )
    max_inflight: int = Field(
        default=64, ge=1, description="Requests one ingress replica works on at once; beyond: 429 with Retry-After."
    )
    rate_limit_rps: float = Field(
        default=0.0,
        ge=0,
        description="Task requests per second per API key (per client address without keys), per ingress "
        "replica; beyond: 429 `rate_limited` with Retry-After. 0: no limit.",
    )
    rate_limit_burst: int = Field(default=20, ge=1, description="Requests a caller may send at once above the rate.")


class ModelSpec(BaseModel):
    """One servable model: the Triton engines it routes to and its tokenizer/config/answers folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_encoder: str = "image_encoder"
    text_encoder: str = "text_encoder"
    fusion: str = "fusion"
    version: str = Field(default="", description="Triton model version of all three engines; empty: Triton's latest.")
    vqa: str | None = Field(
        default=None,
        description="Triton's server-side VQA model (BLS over these same engines, e.g. `vqa`): a /v1/vqa call "
        "with one question, top_k 1 and no attention is sent there as one gRPC call with the encoded image, "
        "decoded and batched inside Triton; None: every call runs the three engines from the ingress.",
    )
    checkpoint: str | None = Field(
        default=None,
        description="Folder with config.json, tokenizer.json, answers.json; default: the one installed "
        "next to the fusion engine in the model repository.",
    )
    generate: str | None = Field(
        default=None,
        description="Triton's generation model of this model's caption decoder (e.g. `caption`): /v1/caption "
        "streams from it; None, or a repository without it: the model has no caption task.",
    )

    def engines(self) -> tuple[str, str, str]:
        """Triton names of (image_encoder, text_encoder, fusion)."""
        return (self.image_encoder, self.text_encoder, self.fusion)

    def checkpoint_dir(self, repository: Path) -> Path:
        """Where this model's config.json, tokenizer.json and answers.json live."""
        if self.checkpoint:
            return Path(self.checkpoint)
        engine_dir = repository / self.fusion
        if self.version:
            return engine_dir / self.version / "checkpoint"
        versions = sorted((int(p.name) for p in engine_dir.glob("[0-9]*") if p.name.isdigit()), reverse=True)
        return engine_dir / str(versions[0] if versions else 1) / "checkpoint"


class DeploymentDefaults(BaseModel):
    """Replica settings used when no Serve config overrides them (the YAML's `deployments:` wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ingress_replicas: int = Field(default=1, ge=1)
    ingress_num_cpus: float = Field(default=0.25, ge=0)
    preprocess_replicas: int = Field(default=1, ge=1)
    preprocess_num_cpus: float = Field(default=0.25, ge=0)


class AppArgs(BaseModel):
    """Arguments of `build_app` (the Serve import path `serving.app.builder:build_app`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    triton_url: str = Field(default="127.0.0.1:8001", description="Triton gRPC endpoint host:port.")
    triton_pool_size: int = Field(default=2, ge=1, le=16, description="gRPC channels per ingress replica.")
    triton_max_reconnect_backoff_ms: int = Field(
        default=2000, ge=100, description="Cap on gRPC reconnect backoff: how soon a restarted Triton is found again."
    )
    engine_max_batch: int = Field(
        default=64, ge=1, description="Rows per engine request (the engines' max_batch_size)."
    )
    repository: str = Field(
        default=str(DEFAULT_REPOSITORY), description="Model repository the checkpoints are read from."
    )
    models: dict[str, ModelSpec] = Field(
        default_factory=lambda: {"tiny": ModelSpec()},
        description="Servable models by the name a request's `model` field uses.",
    )
    default_model: str = Field(
        default="tiny", description="Model used when a request names none; /readyz waits for it."
    )
    limits: Limits = Field(default_factory=Limits)
    preprocess: Literal["deployment", "inline"] = Field(
        default="inline",
        description="`inline`: decode/tokenize in the ingress process, in a worker thread (one hop less: "
        "the faster composition on a small machine, see serving/app/README.md); `deployment`: in a separate, "
        "@serve.batch-ed Preprocess deployment that scales apart from the ingress.",
    )
    preprocess_max_batch_size: int = Field(default=16, ge=1, description="@serve.batch max_batch_size of Preprocess.")
    preprocess_batch_wait_s: float = Field(default=0.002, ge=0, description="@serve.batch batch_wait_timeout_s.")
    metrics_urls: list[str] = Field(
        default_factory=list,
        description="Ray metrics endpoints /metrics aggregates; empty: every alive node's metrics export port.",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        repr=False,
        description="Keys accepted on /v1/* (X-API-Key or Authorization: Bearer; gRPC x-api-key metadata); "
        "empty: no auth. Prefer the environment: VTFUSE_API_KEYS='[\"key1\"]'. Never logged or printed.",
    )
    triton_catalog: bool = Field(
        default=True,
        description="Learn imported models the repository folder here lacks from Triton's `vtfuse_catalog` "
        "model (API replicas apart from Triton's repository, as on Kubernetes), when a request names one.",
    )
    triton_tls: bool = Field(default=False, description="Talk to Triton's gRPC endpoint over TLS.")
    triton_tls_root_cert: str | None = Field(
        default=None, description="PEM file of the CA that signed Triton's certificate; default: the system's."
    )
    triton_tls_client_cert: str | None = Field(default=None, description="PEM client certificate (mutual TLS).")
    triton_tls_client_key: str | None = Field(default=None, description="PEM client key (mutual TLS).", repr=False)
    triton_tls_server_name: str | None = Field(
        default=None, description="Name to check Triton's certificate against, when not the host of triton_url."
    )
    deployments: DeploymentDefaults = Field(default_factory=DeploymentDefaults)
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _default_model_is_served(self) -> AppArgs:
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not one of models: {sorted(self.models)}")
        return self

    def triton_settings(self) -> TritonClientSettings:
        """The API's gRPC client settings for Triton (address, pool, reconnect backoff, TLS)."""
        from serving.triton.client import TritonClientSettings

        return TritonClientSettings(
            url=self.triton_url,
            pool_size=self.triton_pool_size,
            max_reconnect_backoff_ms=self.triton_max_reconnect_backoff_ms,
            tls=self.triton_tls,
            tls_root_cert=self.triton_tls_root_cert,
            tls_client_cert=self.triton_tls_client_cert,
            tls_client_key=self.triton_tls_client_key,
            tls_server_name=self.triton_tls_server_name,
        )

    def api_key_values(self) -> list[str]:
        """The configured API keys as plain strings (for comparing, never for logging)."""
        return [k.get_secret_value() for k in self.api_keys if k.get_secret_value()]

    def checkpoint_dir(self, model: str) -> Path:
        """The checkpoint folder of a served model."""
        return self.models[model].checkpoint_dir(Path(self.repository))

    def with_env(self, env: Mapping[str, str] | None = None) -> AppArgs:
        """A copy with `VTFUSE_<FIELD>` / `VTFUSE_LIMITS_<FIELD>` environment overrides applied.

        Values are parsed as JSON when they parse (numbers, lists), else taken as strings.
        """
        env = os.environ if env is None else env

        def parse(v: str) -> object:
            try:
                return json.loads(v)
            except json.JSONDecodeError:
                return v

        top = {
            k: parse(env[f"VTFUSE_{k.upper()}"])
            for k in type(self).model_fields
            if k not in ("limits", "models", "deployments") and f"VTFUSE_{k.upper()}" in env
        }
        lim = {
            k: parse(env[f"VTFUSE_LIMITS_{k.upper()}"])
            for k in Limits.model_fields
            if f"VTFUSE_LIMITS_{k.upper()}" in env
        }
        if not top and not lim:
            return self
        data = self.model_dump()
        data.update(top)
        data["limits"].update(lim)
        return type(self).model_validate(data)
