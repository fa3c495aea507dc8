"""Image loading and preprocessing (SPEC §2): RGB (transparency on white), bicubic resize to a square,
ImageNet mean/std.

224 px for continued pre-training (50 image tokens), 768 px for fine-tuning and evaluation (577).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB; transparency is composited onto white (as transformers' processors do), not silently dropped."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB; errors name the file: FileNotFoundError if it is missing, ValueError for anything
    else (not an image, truncated, a decoder failure, or a decompression bomb).

    Bombs: PIL warns (DecompressionBombWarning) above Image.MAX_IMAGE_PIXELS (89.5 M pixels by default) and
    raises above twice that. We refuse both, before decoding: every Florenz input is resized to 224 or 768 px, so
    an image of ~90 M pixels is a mistake or an attack, and decoding it would take ~270 MB (RGB) or far more.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now, so a truncated file fails here and not later
                return to_rgb(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{path}: refused as a possible decompression bomb ({exc}); raise "
                         f"PIL.Image.MAX_IMAGE_PIXELS if the image is genuine") from exc  # chained: --debug shows PIL's
    except UnidentifiedImageError:
        raise ValueError(f"{path}: cannot read image (not an image file PIL can identify)") from None
    except Exception as exc:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def preprocess(images: Sequence[Image.Image | str | Path], size: int) -> torch.Tensor:
    """(B, 3, size, size) float32 pixels: RGB, bicubic resize to size x size, /255, ImageNet normalisation."""
    if not images:
        raise ValueError("preprocess: no images given")
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    out = []
    for im in images:
        im = load_image(im) if isinstance(im, (str, Path)) else to_rgb(im)
        arr = np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy()))
    return torch.stack(out)
