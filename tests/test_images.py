"""Preprocessing equals transformers' CLIP-style image processor configured as Florence-2's, and fails clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from florenz_fast.images import IMAGENET_MEAN, IMAGENET_STD, load_image, preprocess


@pytest.mark.parametrize("size", [224, 768])
def test_matches_transformers_processor(size, tmp_path):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray((rng.random((97, 131, 4)) * 255).astype("uint8"), "RGBA")
    gray = Image.fromarray((rng.random((40, 30)) * 255).astype("uint8"), "L")
    gray.save(tmp_path / "gray.png")
    ref = CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False, resample=Image.BICUBIC,
                             image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)
    want = ref(images=[rgba, gray], return_tensors="pt")["pixel_values"]
    got = preprocess([rgba, tmp_path / "gray.png"], size)
    assert got.shape == (2, 3, size, size) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5


def test_bad_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg: no such image file"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg: cannot read image"):
        preprocess([tmp_path / "notes.jpg"], 224)
    Image.fromarray(np.zeros((64, 64, 3), dtype="uint8")).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png: cannot read image"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="no images"):
        preprocess([], 224)
