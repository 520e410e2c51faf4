"""Decoupled Python-backend model `<name>_generate` (`caption` for tiny): the decode scheduler behind Triton.

The model owns its engines and batches on its own loop, as Triton's vLLM backend does: Triton
hands each request over at once (max_batch_size 0, decoupled), a worker thread prepares it (the
vision tower and, for VQA, the question encoder through BLS, so their dynamic batching and the
response cache apply; then the cross-attention K/V, once) and submits its sequences to the
`DecodeScheduler`; one loop thread runs decoder steps over every active sequence and sends each
event back. `request.is_cancelled()` is asked before every step: a client that went away (a
cancelled gRPC stream) frees its rows within one step.

Inputs (all optional but an image):
    PIXELS uint8 (H, W, 3)         the image already resized as the model's processor does (the API sends this)
    IMAGE BYTES (1)                or the encoded PNG/JPEG/WebP file, resized here (direct clients)
    PROMPT_IDS, PROMPT_MASK int64 (Q, L)   token ids with special tokens and their mask: the caption's
                                   prompt (Q = 1) or VQA's questions (Q ≥ 1)
    PROMPT BYTES (Q)               or their text, tokenized here
    PARAMETERS BYTES (1)           JSON: generation parameters (`serving.generation.params`) and `"stream"`
Outputs of every response:
    TOKEN_IDS int64 (Q, n)         streamed: each sequence's new token (-1: none this step); final: the whole
                                   sequences as `generate()` returns them (padded with -1)
    TEXT BYTES (Q)                 streamed: the text delta; final: the whole text
    FINISH_REASON BYTES (Q)        "" while running, then "stop" or "length"
    SCORE FP32 (Q)                 the generated tokens' probability under the model (final)
    PROMPT_TOKENS INT64 (Q)        tokens the decoder started from
With `"stream": true` a response follows every token; the last response (flagged final) holds the
whole result. Without it, only that one. Errors are per request: `vtfuse:<code>: <message>` with
the API's error codes (`schema_violation`, `overloaded`, ...), so the API answers the same status.

Triton metrics (port 8002): vtfuse_generate_active_sequences, vtfuse_generate_waiting_sequences,
vtfuse_generate_decode_steps_total, vtfuse_generate_step_rows (histogram: rows per step),
vtfuse_generate_tokens_total, vtfuse_generate_time_to_first_token_seconds (histogram),
vtfuse_generate_sequences_total{outcome=stop|length|cancelled|error}.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.errors import InvalidInput, Overloaded, SchemaViolation, VtfuseError
from serving.families.imported import ImageProcessing, decode_for, load_plain_tokenizer, tokenize_padded
from serving.generation.detokenize import Stream, TextDecoder
from serving.generation.engine import OnnxDecoderEngine
from serving.generation.params import GenerationParams, resolve
from serving.generation.scheduler import DecodeScheduler, Event, GenSequence, QueueFull, TooLarge
from serving.generation.search import DecodeResult, decoder_for
from serving.generation.spec import GenerationSpec, read_spec
from serving.model.preprocess import DEFAULT_MAX_PIXELS, decode_image
from serving.triton.python_models.common import parameters, version_dir
from serving.triton.python_models.vqa import cpu_memory, to_numpy

log = logging.getLogger(__name__)

OUTPUTS = ("TOKEN_IDS", "TEXT", "FINISH_REASON", "SCORE", "PROMPT_TOKENS")
ROWS_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


def error_response(err: VtfuseError) -> Any:
    """A per-request error the API maps back to the same error class (`vtfuse:<code>: <message>`)."""
    code = pb_utils.TritonError.UNAVAILABLE if isinstance(err, Overloaded) else pb_utils.TritonError.INVALID_ARG
    if err.http_status >= 500:
        code = pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"vtfuse:{err.code}: {err.message}"[:2000], code))


class Metrics:
    """The model's custom Triton metrics."""

    def __init__(self, model: str) -> None:
        fam = pb_utils.MetricFamily
        labels = {"model": model}
        self.families = [
            fam("vtfuse_generate_active_sequences", "Sequences being decoded (in the batch)", fam.GAUGE),
            fam("vtfuse_generate_waiting_sequences", "Sequences waiting for a decoder slot", fam.GAUGE),
            fam("vtfuse_generate_decode_steps_total", "Decoder steps run (each advances every active row)",
                fam.COUNTER),
            fam("vtfuse_generate_step_rows", "Rows advanced by one decoder step", fam.HISTOGRAM),
            fam("vtfuse_generate_tokens_total", "Tokens generated (prompt tokens not counted)", fam.COUNTER),
            fam("vtfuse_generate_time_to_first_token_seconds", "Request arrival to its first generated token",
                fam.HISTOGRAM),
            fam("vtfuse_generate_sequences_total", "Sequences ended, by outcome", fam.COUNTER),
        ]
        active, waiting, steps, rows, tokens, ttft, ended = self.families
        self.active, self.waiting = active.Metric(labels=labels), waiting.Metric(labels=labels)
        self.steps, self.tokens = steps.Metric(labels=labels), tokens.Metric(labels=labels)
        self.rows = rows.Metric(labels=labels, buckets=ROWS_BUCKETS)
        self.ttft = ttft.Metric(labels=labels, buckets=TTFT_BUCKETS)
        outcomes = ("stop", "length", "cancelled", "error")
        self.ended = {o: ended.Metric(labels={**labels, "outcome": o}) for o in outcomes}


@dataclass(eq=False)
class Call:
    """One Triton request: its sequences, their streams and results, its response sender."""

    request: Any
    sender: Any
    arrived: float
    stream: bool = False
    n: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    streams: list[Stream] = field(default_factory=list)
    results: dict[int, DecodeResult] = field(default_factory=dict)
    first_token: bool = False
    closed: bool = False
    cancelled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def is_cancelled(self) -> bool:
        if not self.cancelled and self.request.is_cancelled():
            self.cancelled = True
        return self.cancelled

    def send(self, response: Any = None, final: bool = False) -> None:
        done = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        with self.lock:
            if self.closed:
                return
            self.closed = final
            if response is None:
                self.sender.send(flags=done)
            else:
                self.sender.send(response, flags=done if final else 0)

    def fail(self, err: VtfuseError) -> None:
        self.send(error_response(err), final=True)


def _tensor(name: str, value: np.ndarray) -> Any:
    return pb_utils.Tensor(name, value)


def _texts(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


class GenerateModel:
    """TritonPythonModel: the decode scheduler over one decoder engine (see the module doc)."""

    def initialize(self, args: dict[str, Any]) -> None:
        cfg = json.loads(args["model_config"])
        params = parameters(cfg)
        vdir = version_dir(args)
        self.name = args["model_name"]
        self.spec: GenerationSpec = read_spec(vdir / "checkpoint")
        self.tokenizer = load_plain_tokenizer(vdir / "checkpoint" / "tokenizer.json")
        self.text = TextDecoder(self.tokenizer, self.spec.clean_up_spaces)
        self.max_pixels = int(params.get("max_pixels", str(DEFAULT_MAX_PIXELS)))
        self.engine = self._engine(vdir, params)
        self.scheduler = DecodeScheduler(
            self.engine,
            max_rows=int(params.get("max_rows", "32")),
            max_positions=self.spec.defaults.max_positions,
            max_cross_len=self.spec.max_cross_len,
            memory_budget_bytes=int(float(params.get("memory_budget_mb", "1536")) * 2**20),
            max_waiting=int(params.get("max_waiting", "256")),
        )
        self.metrics = Metrics(self.name)
        self.pool = ThreadPoolExecutor(int(params.get("prepare_workers", "4")), thread_name_prefix="prepare")
        self.wake = threading.Condition()
        self.stopping = False
        self.loop = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self.loop.start()
        log.info("%s: %s decoder, %d rows, queue %d", self.name, self.spec.task, self.scheduler.capacity,
                 self.scheduler.max_waiting)

    @staticmethod
    def _engine(vdir: Any, params: dict[str, str]) -> Any:
        if params.get("engine", "onnx") == "torch":
            from serving.generation.torch_engine import TorchDecoderEngine

            return TorchDecoderEngine.from_checkpoint(vdir / "checkpoint", autocast=params.get("autocast", "fp16"),
                                                      threads=int(params.get("torch_threads", "1")))
        return OnnxDecoderEngine(vdir, int(params.get("intra_op_threads", "1")))

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            call = Call(request, request.get_response_sender(), time.monotonic())
            self.pool.submit(self._admit, call)
        return None

    # -- preparing a request (worker threads) ---------------------------------------------

    def _admit(self, call: Call) -> None:
        try:
            seqs = self._prepare(call)
            self.scheduler.submit_all(seqs)
        except QueueFull as e:
            call.fail(Overloaded(str(e), retry_after=1.0))
            return
        except TooLarge as e:
            call.fail(SchemaViolation(str(e)))
            return
        except VtfuseError as e:
            call.fail(e)
            return
        except Exception as e:  # a bug or an engine failure: this request fails, the model goes on
            log.exception("%s: preparing a request failed", self.name)
            call.fail(VtfuseError(f"generation failed: {e}"))
            return
        with self.wake:
            self.wake.notify()

    def _input(self, call: Call, name: str) -> np.ndarray | None:
        t = pb_utils.get_input_tensor_by_name(call.request, name)
        return None if t is None else t.as_numpy()

    def _prepare(self, call: Call) -> list[GenSequence]:
        raw = self._input(call, "PARAMETERS")
        try:
            options = json.loads(raw.reshape(-1)[0]) if raw is not None and raw.size else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidInput(f"PARAMETERS is not valid JSON ({e})") from None
        if not isinstance(options, dict):
            raise SchemaViolation("PARAMETERS must be a JSON object")
        call.stream = bool(options.pop("stream", False))
        params = GenerationParams.from_dict(options)
        pixels = self._pixels(call)
        ids, mask = self._prompts(call)
        if self.spec.task == "caption":
            if ids is not None and ids.shape[0] != 1:
                raise SchemaViolation(f"a caption starts from one prompt, not {ids.shape[0]}: send one PROMPT")
            given = list(ids[0, : int(mask[0].sum())]) if ids is not None and mask is not None else None
            prompts = [self.spec.decoder_prompt(given)]
        else:
            if ids is None:
                raise SchemaViolation("a VQA model needs questions: PROMPT or PROMPT_IDS")
            prompts = [self.spec.decoder_prompt(None) for _ in range(ids.shape[0])]
        settings = [resolve(params, self.spec.defaults, len(p), stream=call.stream) for p in prompts]
        states, states_mask = self._encoder_states(pixels, ids, mask)
        cross = self.engine.cross_kv(states)
        call.n = len(prompts)
        call.prompt_tokens = [len(p) for p in prompts]
        call.streams = [self.text.stream(p) for p in prompts]
        return [
            GenSequence((call, q), decoder_for(p, r), [kv[q : q + 1] for kv in cross], states_mask[q],
                        is_cancelled=call.is_cancelled)
            for q, (p, r) in enumerate(zip(prompts, settings))
        ]

    def _pixels(self, call: Call) -> np.ndarray:
        pixels = self._input(call, "PIXELS")
        if pixels is not None:
            return np.ascontiguousarray(pixels, dtype=np.uint8)
        image = self._input(call, "IMAGE")
        if image is None or image.size == 0:
            raise SchemaViolation("send the image: PIXELS (resized uint8) or IMAGE (the encoded file)")
        data = image.reshape(-1)[0]
        data = data if isinstance(data, bytes) else bytes(data)
        if self.spec.image.get("mode") == "native":
            return decode_image(data, int(self.spec.image["size"]), self.max_pixels)
        return decode_for(ImageProcessing.from_dict(self.spec.image), data, self.max_pixels)

    def _prompts(self, call: Call) -> tuple[np.ndarray | None, np.ndarray | None]:
        ids = self._input(call, "PROMPT_IDS")
        if ids is not None:
            mask = self._input(call, "PROMPT_MASK")
            ids = np.asarray(ids, dtype=np.int64).reshape(-1, ids.shape[-1])
            mask = np.ones_like(ids) if mask is None else np.asarray(mask, dtype=np.int64).reshape(ids.shape)
            if ids.size and (ids.min() < 0 or ids.max() >= self.engine.shape.vocab):
                vocab = self.engine.shape.vocab
                raise SchemaViolation(f"PROMPT_IDS holds ids outside this model's vocabulary 0..{vocab - 1}")
            if ids.shape[1] > self.spec.max_prompt_tokens:
                raise SchemaViolation(f"PROMPT_IDS rows have {ids.shape[1]} tokens, over this model's limit of "
                                      f"{self.spec.max_prompt_tokens}: shorten them")
            return ids, mask
        texts = self._input(call, "PROMPT")
        if texts is None or texts.size == 0:
            return None, None
        strings = [t.decode() if isinstance(t, bytes) else str(t) for t in texts.reshape(-1)]
        return tokenize_padded(self.tokenizer, strings, self.spec.max_prompt_tokens)

    def _bls(self, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        kwargs = {"preferred_memory": cpu_memory()} if cpu_memory() is not None else {}
        request = pb_utils.InferenceRequest(
            model_name=model, inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()],
            requested_output_names=[output], **kwargs,
        )
        response = request.exec()
        if response.has_error():
            raise InvalidInput(f"{model} refused the input: {response.error().message()}")
        return to_numpy(pb_utils.get_output_tensor_by_name(response, output))

    def _encoder_states(
        self, pixels: np.ndarray, ids: np.ndarray | None, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The states the decoder cross-attends to, one row per sequence, and their masks."""
        feats = self._bls(self.spec.image_model, {"PIXELS": pixels[None]}, self.spec.image_output)  # (1, T, D)
        if self.spec.task == "caption":
            return feats, np.ones((1, feats.shape[1]), np.int64)
        assert ids is not None and mask is not None
        q = ids.shape[0]
        states = self._bls(
            self.spec.question_model,
            {"IMAGE_FEATURES": np.repeat(feats, q, axis=0), "INPUT_IDS": ids, "ATTENTION_MASK": mask},
            "QUESTION_STATES",
        )
        return states, mask

    # -- the decode loop (one thread) -----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.scheduler.has_work():
                    self.wake.wait(timeout=0.5)
                if self.stopping:
                    return
            try:
                events = self.scheduler.step()
            except Exception as e:  # an engine failure: every active and waiting request fails, the loop goes on
                log.exception("%s: a decoder step failed", self.name)
                for seq in self.scheduler.abort_all():
                    seq.key[0].fail(VtfuseError(f"generation failed: {e}"))
                    self.metrics.ended["error"].increment(1)
                continue
            self._observe(events)
            for event in events:
                try:
                    self._deliver(event)
                except Exception:  # a client whose stream broke: nothing to send it
                    log.exception("%s: sending a response failed", self.name)

    def _observe(self, events: list[Event]) -> None:
        s = self.scheduler
        self.metrics.active.set(len(s.active))
        self.metrics.waiting.set(s.waiting_count())
        if s.last_step_rows:
            self.metrics.steps.increment(1)
            self.metrics.rows.observe(float(s.last_step_rows))
        if s.last_step_tokens:
            self.metrics.tokens.increment(float(s.last_step_tokens))

    def _deliver(self, event: Event) -> None:
        call, q = event.seq.key
        if event.kind == "cancelled":
            self.metrics.ended["cancelled"].increment(1)
            call.results[q] = None  # type: ignore[assignment]
            if len(call.results) == call.n:
                call.send(final=True)  # nothing more for a client that went away
            return
        if event.kind == "token":
            if not call.first_token:
                call.first_token = True
                self.metrics.ttft.observe(time.monotonic() - call.arrived)
            if call.stream:
                self._send_token(call, q, int(event.token))  # type: ignore[arg-type]
            return
        assert event.result is not None
        self.metrics.ended[event.result.finish_reason].increment(1)
        if not call.first_token:  # beam search: the first token is known when the sequence ends
            call.first_token = True
            self.metrics.ttft.observe(time.monotonic() - call.arrived)
        call.results[q] = event.result
        if len(call.results) == call.n:
            self._send_final(call)

    def _send_token(self, call: Call, q: int, token: int) -> None:
        n = call.n
        ids = np.full((n, 1), -1, np.int64)
        ids[q, 0] = token
        texts = [""] * n
        texts[q] = call.streams[q].push(token)
        call.send(self._response(ids, texts, [""] * n, np.zeros(n, np.float32), call))

    def _send_final(self, call: Call) -> None:
        results = [call.results[q] for q in range(call.n)]
        width = max(len(r.token_ids) for r in results)
        ids = np.full((call.n, width), -1, np.int64)
        for q, r in enumerate(results):
            ids[q, : len(r.token_ids)] = r.token_ids
        texts = [self.text.decode(r.token_ids) for r in results]
        scores = np.array([r.probability for r in results], np.float32)
        call.send(self._response(ids, texts, [r.finish_reason for r in results], scores, call), final=True)

    @staticmethod
    def _response(ids: np.ndarray, texts: list[str], reasons: list[str], scores: np.ndarray, call: Call) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[
            _tensor("TOKEN_IDS", ids),
            _tensor("TEXT", _texts(texts)),
            _tensor("FINISH_REASON", _texts(reasons)),
            _tensor("SCORE", scores),
            _tensor("PROMPT_TOKENS", np.array(call.prompt_tokens, np.int64)),
        ])

    def finalize(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        self.loop.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)

