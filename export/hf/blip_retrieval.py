"""`BlipForImageTextRetrieval` → three engines, and their parity cases against the `transformers` forward.

The split follows the module's own `forward`:

- `image_encoder`: `vision_model` → IMAGE_FEATURES (B, 1 + patches, Dv), the last hidden state the
  ITM pass cross-attends to, and IMAGE_EMBEDDING = normalize(vision_proj(CLS)) for the ITC shortlist;
- `text_encoder`: `text_encoder` in text-only mode → TEXT_EMBEDDING = normalize(text_proj(CLS));
- `fusion`: token ids + mask + image features → `text_encoder` with cross-attention → `itm_head`
  on CLS → ITM_LOGITS (B, 2); the ITM probability is softmax index 1. BLIP's multimodal pass
  re-embeds the tokens, so the fusion takes ids, not the text encoder's features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

from export.hf.graphs import ParityCase, UserView, to_numpy
from serving.families import BLIP_RETRIEVAL
from serving.families.imported import ImageProcessing, tokenize_padded
from serving.families.modules.blip_retrieval import (  # noqa: F401 - the family's engines, traced by the import
    Fusion,
    ImageEncoder,
    TextEncoder,
    graphs,
    image_tokens,
    load_model,
)


def parity_cases(
    model: Any, processor: Any, tokenizer: Any, image: ImageProcessing, images: list[Image.Image], texts: list[str],
    max_tokens: int,
) -> list[ParityCase]:
    """Each engine's inputs (as the served path builds them) with what `BlipForImageTextRetrieval.forward` gives.

    Pixels are vtfuse's resize of each image, expected outputs come from the processor's own
    pixel_values, so a preprocessing difference shows as a parity failure.
    """
    pixels = np.stack([image.resize(im.convert("RGB")) for im in images])
    ids, mask = tokenize_padded(tokenizer, texts, max_tokens)
    cases: list[ParityCase] = []
    with torch.no_grad():
        enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
        pv = enc["pixel_values"]  # (I, 3, H, W)
        n_img, n_txt = pv.shape[0], len(texts)
        itc = model(input_ids=enc["input_ids"][:1].repeat(n_img, 1), attention_mask=enc["attention_mask"][:1]
                    .repeat(n_img, 1), pixel_values=pv, use_itm_head=False)
        hidden = itc.last_hidden_state  # (I, T, Dv): transformers' own vision output
        img_emb = F.normalize(model.vision_proj(hidden[:, 0, :]), dim=-1)
        cases.append(
            ParityCase("image_encoder", {"PIXELS": pixels},
                       {"IMAGE_FEATURES": to_numpy(hidden), "IMAGE_EMBEDDING": to_numpy(img_emb)})
        )
        txt = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pv[:1],
                    use_itm_head=False)
        txt_emb = F.normalize(model.text_proj(txt.question_embeds[:, 0, :]), dim=-1)
        cases.append(
            ParityCase("text_encoder", {"INPUT_IDS": ids, "ATTENTION_MASK": mask},
                       {"TEXT_EMBEDDING": to_numpy(txt_emb)})
        )
        for i in range(n_img):  # every text against image i, through the module's ITM head
            itm = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        pixel_values=pv[i : i + 1].repeat(n_txt, 1, 1, 1), use_itm_head=True).itm_score
            cases.append(
                ParityCase(
                    "fusion",
                    {"IMAGE_FEATURES": np.repeat(to_numpy(hidden[i : i + 1]).astype(np.float32), n_txt, axis=0),
                     "INPUT_IDS": ids, "ATTENTION_MASK": mask},
                    {"ITM_LOGITS": to_numpy(itm)},
                    note=f"image {i}",
                )
            )
    return cases


def judge(fp32: dict[str, list[dict[str, np.ndarray]]], int8: dict[str, list[dict[str, np.ndarray]]]) -> UserView:
    """int8 against fp32 as a user sees it: the ITM ranking of the texts per image, probabilities, embeddings."""
    view = UserView()
    same_top, rank_pairs, prob_diff = [], [], []
    for a, b in zip(fp32["fusion"], int8["fusion"]):
        pa, pb = BLIP_RETRIEVAL.itm_probability(a), BLIP_RETRIEVAL.itm_probability(b)
        same_top.append(float(np.argmax(pa) == np.argmax(pb)))
        prob_diff.append(float(np.abs(pa - pb).max()))
        da, db = np.sign(pa[:, None] - pa[None, :]), np.sign(pb[:, None] - pb[None, :])
        rank_pairs.append(float((da == db).mean()))
    cos = []
    for role, key in (("image_encoder", "IMAGE_EMBEDDING"), ("text_encoder", "TEXT_EMBEDDING")):
        for a, b in zip(fp32[role], int8[role]):
            x, y = a[key].astype(np.float64), b[key].astype(np.float64)
            cos.append(float(((x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))).min()))
    view.figures = {
        "itm_top1_agreement": float(np.mean(same_top)),
        "itm_pair_order_agreement": float(np.mean(rank_pairs)),
        "itm_probability_max_abs_diff": float(max(prob_diff)),
        "embedding_cosine_min": float(min(cos)),
    }
    if view.figures["itm_top1_agreement"] < 1.0:
        view.failures.append("the best text of some image changed")
    if view.figures["embedding_cosine_min"] < 0.99:
        view.failures.append(f"embedding cosine {view.figures['embedding_cosine_min']:.4f} < 0.99")
    if view.figures["itm_probability_max_abs_diff"] > 0.05:
        view.failures.append(f"ITM probability moved by {view.figures['itm_probability_max_abs_diff']:.3f} > 0.05")
    return view



ITM_MODEL_PY = (
    '"""Triton Python model: one image against N texts through BLIP\'s fusion '
    '(serving/triton/python_models/itm_broadcast.py)."""\n\n'
    "from serving.triton.python_models.itm_broadcast import ItmBroadcastModel as TritonPythonModel  # noqa: F401\n"
)


def extra_models(name: str, engines: dict[str, str], engine_graphs: list[Any]) -> dict[str, tuple[Any, str]]:
    """Triton models beside the engines: `itm`, the image's features once against N texts (one BLS call).

    Returns role → (config, model.py); `engines` gets their names.
    """
    from tritonclient.grpc import model_config_pb2 as mc

    fusion = next(g for g in engine_graphs if g.role == "fusion")
    image = next(g for g in engine_graphs if g.role == "image_encoder")
    tokens, width = image.outputs[0].dims
    h, w, _ = image.inputs[0].dims
    engines["itm"] = f"{name}_itm"
    c = mc.ModelConfig(name=engines["itm"], backend="python", max_batch_size=0)
    for n, t, dims in (("PIXELS", "TYPE_UINT8", (1, h, w, 3)), ("IMAGE_FEATURES", "TYPE_FP32", (1, tokens, width)),
                       ("INPUT_IDS", "TYPE_INT64", (-1, -1)), ("ATTENTION_MASK", "TYPE_INT64", (-1, -1))):
        c.input.append(mc.ModelInput(name=n, data_type=mc.DataType.Value(t), dims=list(dims),
                                     optional=n in ("PIXELS", "IMAGE_FEATURES")))
    c.output.append(mc.ModelOutput(name="ITM_LOGITS", data_type=mc.TYPE_FP32, dims=[-1, 2]))
    group = c.instance_group.add()
    group.count, group.kind = 2, mc.ModelInstanceGroup.KIND_CPU
    for k, v in {"image_encoder": engines["image_encoder"], "fusion": engines["fusion"],
                 "fusion_max_batch": str(fusion.max_batch_size)}.items():
        c.parameters[k].string_value = v
    return {"itm": (c, ITM_MODEL_PY)}
