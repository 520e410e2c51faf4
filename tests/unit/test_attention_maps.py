"""The attention map the API draws falls mostly on the object a question names (fresh renders)."""

from __future__ import annotations

import random

import numpy as np
import torch

from serving.app.router import attention_grid
from serving.model.checkpoint import load_checkpoint
from serving.model.preprocess import decode_image, tokenize
from serving.shapes import world


def _named_objects(scene: world.Scene, qa: world.QA) -> list[world.ShapeObject]:
    w = qa.question.rstrip("?").split()
    if qa.qtype == "color_of_shape":
        return [o for o in scene.objects if o.shape == w[-1]]
    if qa.qtype == "shape_of_color":
        return [o for o in scene.objects if o.color == w[4]]
    return [o for o in scene.objects if o.color == w[3] and o.shape == w[4]]  # "is there a red circle" → yes


def test_heat_map_mass_falls_on_the_named_object():
    ckpt = load_checkpoint()
    cfg = ckpt.config
    rng = random.Random(2025)
    masses, areas = [], []
    while len(masses) < 150:
        scene = world.random_scene(rng)
        qas = [
            q
            for q in world.all_questions(scene)
            if q.qtype in ("color_of_shape", "shape_of_color") or (q.qtype == "exists" and q.answer == "yes")
        ]
        if not qas:
            continue
        qa = rng.choice(qas)
        image = world.encode(world.render(scene, rng.choice([64, 128, 200]), supersample=2))
        px = torch.from_numpy(decode_image(image, cfg.image_size)[None].copy())
        ids, mask = tokenize(ckpt.tokenizer, [qa.question], cfg.max_text_len)
        with torch.no_grad():
            feats, _ = ckpt.model.encode_image(px)
            tfeats, _ = ckpt.model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
            _, _, att = ckpt.model.fuse(feats, tfeats, torch.from_numpy(mask))
        grid = attention_grid(att[0].numpy(), cfg.grid)
        colors, _ = world.label_map(world.Scene(scene.background, tuple(_named_objects(scene, qa))), cfg.image_size)
        ps = cfg.patch_size
        region = (colors > 0).reshape(cfg.grid, ps, cfg.grid, ps).any(axis=(1, 3))
        masses.append(float(grid[region].sum()))
        areas.append(float(region.mean()))
    mean_mass, mean_area = float(np.mean(masses)), float(np.mean(areas))
    # Measured at commit time: 0.55 of the mass on ~0.11 of the image.
    assert mean_mass >= 0.45, (mean_mass, mean_area)
    assert mean_mass >= 3 * mean_area, (mean_mass, mean_area)
    assert np.mean(np.array(masses) > 0.5) >= 0.6
