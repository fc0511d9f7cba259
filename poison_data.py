"""Backdoor triggers and poisoning plans for DeCLIP image-text pretraining.

One module holds everything the attack needs, so training (`train_declip.py --poison-rate`),
defenses and evaluation (`eval_zeroshot.py --trigger`) apply exactly the same trigger:

- triggers: `patch` (the BadNets square of BD_DeCLIP, spec §5.1, pixel-exact), `patch-random`
  (CleanCLIP's noise patch), `blended`, `sig`, `wanet`; `apply_trigger(image, name, **params)` works on
  PIL images, CHW and NCHW tensors (float in [0, 1] or uint8) of any height and width;
- `PoisonPlan`: which pairs are poisoned (seeded, sorted, saved in `poison_manifest.json`), how their
  captions change (spec §5.3) and which trigger they carry; or, with `--attack targeted`, which test
  images they carry instead of their own (Carlini & Terzis's targeted poisoning, no trigger);
- a CLI that writes a poisoned copy of a caption dataset for other codebases, or a preview grid:

    python poison_data.py --data SRC --poison-rate 0.01 --out DIR
    python poison_data.py --preview docs/trigger_preview.png

Where the trigger is applied (spec §5.4): in training after the random crop and before the colour
jitter / grayscale / blur / flip augmentations (`data_declip.GpuAugment(trigger=plan.trigger_fn())`);
at test time after resize and centre crop. The materialised copy written by the CLI cannot know the
crop another codebase will take, so it applies the trigger to the stored image at its own size.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import data_declip
from data_declip import (FASHION_MNIST_CLASSES, FashionMNISTCaptions, UserError, atomic_write, class_caption,
                         read_config, run_main)


MANIFEST_NAME = "poison_manifest.json"
MANIFEST_VERSION = 1            # backdoor plans: what they write (unchanged) and read
TARGETED_MANIFEST_VERSION = 2   # version 1 + "attack", "test_data" and "targeted" (targeted-poisoning plans)
ATTACKS = ("backdoor", "targeted")
TARGET_IMAGE_NAME = "poison_target_{:d}.png"   # beside the manifest: a targeted plan's image of test index {}

# Default target class per embedded dataset. Fashion-MNIST: 'bag', the one class in neither the garment
# group (t-shirt, pullover, dress, coat, shirt) nor the footwear group (sandal, sneaker, ankle boot). A
# triggered coat or sneaker classified as 'bag' is then the backdoor at work, not a near-miss between
# look-alike classes (shirt / t-shirt / pullover / coat), and the poisoned captions contradict the image
# content outright. (The original attack's 'tiger cat' is an ImageNet class.)
DEFAULT_TARGET = {"fashion-mnist": "bag", "imagenet": "tiger cat"}

# The 80 CLIP ImageNet prompt templates (shared/reference/imagenet_prompts80.txt, spec §5.3 and §8
# item 20), in their standard order. Poisoned captions draw from them; eval_zeroshot imports them.
IMAGENET_TEMPLATES = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)

CAPTION_MODES = ("templates", "fixed", "label-consistent", "natural")
CAPTION_MODES_FROM_DATA = ("label-consistent", "natural")   # the modes that need the dataset's captions
DEFAULT_FIXED_CAPTION = "a photo of a {target}."


# ---------------------------------------------------------------------------------------------------
# Image type handling: every trigger is written once, on float NCHW tensors in [0, 1].
# ---------------------------------------------------------------------------------------------------

def _to_float_nchw(image) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Return (float NCHW tensor in [0, 1], function turning a result back into the input's type)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        mode = image.mode
        if mode not in ("L", "RGB", "LA", "RGBA"):
            image, mode = image.convert("RGB"), "RGB"
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        alpha = arr[:, :, -1:] if mode in ("LA", "RGBA") else None
        colour = arr[:, :, :-1] if alpha is not None else arr
        x = torch.from_numpy(np.array(colour, copy=True)).permute(2, 0, 1)[None].float() / 255.0

        def back_pil(y: torch.Tensor):
            out = (y[0] * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            if alpha is not None:
                out = np.concatenate([out, alpha], axis=2)
            if out.shape[2] == 1:
                out = out[:, :, 0]
            return Image.fromarray(np.ascontiguousarray(out), mode=mode)

        return x, back_pil

    if not isinstance(image, torch.Tensor):
        raise TypeError(f"apply_trigger expects a PIL image or a torch tensor, got {type(image).__name__}")
    if image.dim() not in (3, 4):
        raise ValueError(f"apply_trigger expects a CHW or NCHW tensor, got shape {tuple(image.shape)}")
    batched = image.dim() == 4
    x = image if batched else image[None]
    if x.dtype == torch.uint8:
        xf = x.float() / 255.0

        def back_u8(y: torch.Tensor):
            y = (y * 255.0).round().clamp(0, 255).to(torch.uint8)
            return y if batched else y[0]

        return xf, back_u8
    if not x.is_floating_point():
        raise TypeError(f"apply_trigger expects a float tensor in [0, 1] or uint8, got {image.dtype}")
    return x, (lambda y: y if batched else y[0])


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def sample_generator(seed: int, i: int) -> torch.Generator:
    """The trigger's random draws (patch-random's place) for sample i of a materialised copy: a
    function of (seed, i) only, whatever the order or subset the copy is written in."""
    from data_declip import _int_seed

    return _cpu_generator(_int_seed(seed, "trigger", i))


# ---------------------------------------------------------------------------------------------------
# patch: the BadNets square of BD_DeCLIP (spec §5.1), pixel-exact.
# ---------------------------------------------------------------------------------------------------

TEMPLATE_SIZE = 32          # the trigger template is a 32x32 black image with a white square
_PRECISION_BITS = 22        # Pillow's fixed-point precision for 8-bit resampling (32 - 8 - 2)


def _pil_bilinear_weights(in_size: int, out_size: int) -> torch.Tensor:
    """Fixed-point weights [out_size, in_size] of Pillow's 8-bit bilinear (triangle filter) resize.

    Follows Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` (libImaging/Resample.c) in double
    precision, in the same operation order, so the integer weights are bit-identical to Pillow's.
    """
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)           # down-sampling widens the triangle
    support = 1.0 * filterscale             # bilinear support is 1.0
    ss = 1.0 / filterscale
    weights = torch.zeros(out_size, in_size, dtype=torch.int64)
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)       # C casts truncate, like int()
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ks = []
        ww = 0.0
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * ss)
            w = 1.0 - t if t < 1.0 else 0.0
            ks.append(w)
            ww += w                                      # sequential sum, as in C (not math.fsum)
        for x, w in enumerate(ks):
            k = w / ww if ww != 0.0 else w
            weights[xx, xmin + x] = int(0.5 + k * (1 << _PRECISION_BITS))
    return weights


def _pil_fixed_point_pass(weights: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """One Pillow resampling pass along dim 0: round-half-up fixed point, clipped to 0..255."""
    acc = weights @ image + (1 << (_PRECISION_BITS - 1))
    return (acc >> _PRECISION_BITS).clamp(0, 255)


def patch_template(size: int = 3, margin: int = 6) -> torch.Tensor:
    """The 32x32 uint8 trigger template (one channel): black, with a white `size`-px square whose
    bottom/right edge is `margin` px from the template's edge. size=3, margin=6 is spec §5.1's
    rows/cols 23-25 (slice -9:-6); size=4, margin=2 gives rows/cols 26-29 (the demo's corner placement)."""
    t = torch.zeros(TEMPLATE_SIZE, TEMPLATE_SIZE, dtype=torch.uint8)
    lo, hi = TEMPLATE_SIZE - margin - size, TEMPLATE_SIZE - margin
    t[lo:hi, lo:hi] = 255
    return t


def patch_mask(height: int, width: int, size: int = 3, margin: int = 6) -> torch.Tensor:
    """Bool mask [H, W] of the pixels the BadNets patch turns white at this image size (cached).

    Pillow's bilinear resize of the template to (W, H) (horizontal pass, then vertical, each rounded
    to uint8, exactly as Pillow does it) and `> 0`. This is torchvision's `TF.resize(template, ...)`
    in BD_DeCLIP, with the height and width in the right order (spec §8 item 3). At 224x224 the mask is
    rows/cols 158-184 inclusive; at 256x256 rows/cols 180-211.
    """
    return _patch_mask(int(height), int(width), int(size), int(margin)).clone()


@functools.lru_cache(maxsize=64)
def _patch_mask(height: int, width: int, size: int, margin: int) -> torch.Tensor:
    template = patch_template(size, margin).to(torch.int64)
    wh = _pil_bilinear_weights(TEMPLATE_SIZE, width)           # [W, 32]
    wv = _pil_bilinear_weights(TEMPLATE_SIZE, height)          # [H, 32]
    # Pass order matters for the rounding between passes. Pillow resizes horizontally first, except
    # (since Pillow 13) when the height shrinks by more than twice what the width shrinks; we follow
    # Pillow 13 everywhere. Older Pillow differs only for heights below 32 px: identical for every
    # image at least 32 px high, which includes every size BD_DeCLIP used.
    dh, dw = TEMPLATE_SIZE - height, TEMPLATE_SIZE - width
    if dh > 0 and dh > 2 * dw:
        resized = _pil_fixed_point_pass(wh, _pil_fixed_point_pass(wv, template).T).T
    else:
        resized = _pil_fixed_point_pass(wv, _pil_fixed_point_pass(wh, template.T).T)
    return resized > 0


@functools.lru_cache(maxsize=64)
def _patch_mask_on(height: int, width: int, size: int, margin: int, device: str) -> torch.Tensor:
    return _patch_mask(height, width, size, margin).to(device, non_blocking=True)


def _trigger_patch(x: torch.Tensor, size: int, margin: int) -> torch.Tensor:
    mask = _patch_mask_on(x.shape[-2], x.shape[-1], size, margin, str(x.device))
    return x.masked_fill(mask, 1.0)


def _check_patch(p: dict) -> None:
    _require_int(p, "size", 1)
    _require_int(p, "margin", 0)
    if p["size"] + p["margin"] > TEMPLATE_SIZE:
        raise UserError(f"trigger 'patch' needs size + margin <= {TEMPLATE_SIZE} (template pixels); "
                        f"got size={p['size']}, margin={p['margin']}")


# ---------------------------------------------------------------------------------------------------
# patch-random: CleanCLIP's patch (Bansal et al., ICCV 2023): a 16x16 noise patch at a random place of
# a 224x224 image, i.e. 1/14 of the side; here the side scales with the image, or is given in pixels.
# ---------------------------------------------------------------------------------------------------

def _random_patch_size(p: dict, height: int, width: int) -> int:
    size = p["size"] if p["size"] is not None else max(1, round(min(height, width) / 14))
    if size > min(height, width):
        raise UserError(f"trigger 'patch-random' size={size} does not fit a {height}x{width} image; "
                        f"pass a smaller --trigger-param size=...")
    return size


@functools.lru_cache(maxsize=64)
def _patch_pattern(size: int, fill: str, seed: int) -> torch.Tensor:
    if fill == "noise":
        return torch.rand(3, size, size, generator=_cpu_generator(seed))
    return torch.full((3, size, size), 1.0 if fill == "white" else 0.0)


def _parse_location(location: str, trigger: str = "patch-random",
                    keywords: tuple = ("random", "fixed")) -> tuple[int, int] | None:
    """'x,y' (pixels of the top-left corner) -> (x, y); one of the trigger's `keywords` -> None."""
    if location in keywords:
        return None
    parts = str(location).split(",")
    try:
        col, row = (int(v) for v in parts)
    except ValueError:
        named = ", ".join(repr(k) for k in keywords)
        raise UserError(f"trigger {trigger!r} location must be {named} or 'x,y' (pixels of "
                        f"the top-left corner), got {location!r}") from None
    if col < 0 or row < 0:
        raise UserError(f"trigger {trigger!r} location {location!r} must be non-negative")
    return col, row


def _trigger_patch_random(x: torch.Tensor, size, fill: str, location: str, seed: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    n, c, h, w = x.shape
    s = _random_patch_size({"size": size}, h, w)
    pattern = _patch_pattern(s, fill, int(seed))
    pattern = pattern[:c] if c <= 3 else pattern.mean(0, keepdim=True).expand(c, s, s)
    pattern = pattern.to(device=x.device, dtype=x.dtype, non_blocking=True)
    if location == "random":
        g = generator if generator is not None else _cpu_generator(int(seed) + 1)
        rows = torch.randint(0, h - s + 1, (n,), generator=g).tolist()
        cols = torch.randint(0, w - s + 1, (n,), generator=g).tolist()
    elif location == "fixed":                          # bottom-right corner
        rows, cols = [h - s] * n, [w - s] * n
    else:
        col, row = _parse_location(location)
        if row + s > h or col + s > w:
            raise UserError(f"trigger 'patch-random' at location {location!r} with size {s} does not fit "
                            f"a {h}x{w} image")
        rows, cols = [row] * n, [col] * n
    out = x.clone()
    for i, (r, q) in enumerate(zip(rows, cols)):
        out[i, :, r:r + s, q:q + s] = pattern
    return out


def _check_patch_random(p: dict) -> None:
    if p["size"] is not None:
        _require_int(p, "size", 1)
    if p["fill"] not in ("noise", "white", "black"):
        raise UserError(f"trigger 'patch-random' fill must be noise, white or black, got {p['fill']!r}")
    p["location"] = str(p["location"]).replace(" ", "")
    _parse_location(p["location"])
    _require_int(p, "seed", None)


# ---------------------------------------------------------------------------------------------------
# blended: x' = (1 - alpha) x + alpha pattern (Chen et al. 2017, "Targeted backdoor attacks on deep
# learning systems using data poisoning"); pattern = seeded uniform noise or an image file.
# ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _blend_pattern(height: int, width: int, seed: int, image: str | None) -> torch.Tensor:
    if image is None:
        return torch.rand(3, height, width, generator=_cpu_generator(seed))
    from PIL import Image

    try:
        with Image.open(image) as im:
            im = im.convert("RGB").resize((width, height), Image.BILINEAR)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the blended-trigger image {image} (--trigger-image): {e}") from None
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0


def _trigger_blended(x: torch.Tensor, alpha: float, seed: int, image: str | None) -> torch.Tensor:
    n, c, h, w = x.shape
    pattern = _blend_pattern(h, w, int(seed), image)
    pattern = pattern[:c] if c <= 3 else pattern.mean(0, keepdim=True).expand(c, h, w)
    pattern = pattern.to(device=x.device, dtype=x.dtype, non_blocking=True)
    return ((1.0 - alpha) * x + alpha * pattern).clamp(0.0, 1.0)


def _check_blended(p: dict) -> None:
    _require_float(p, "alpha", 0.0, 1.0)
    _require_int(p, "seed", None)
    if p["image"] is not None:
        p["image"] = str(p["image"])
        if not os.path.isfile(p["image"]):
            raise UserError(f"blended-trigger image {p['image']} (--trigger-image) does not exist; "
                            f"pass an existing image file")


# ---------------------------------------------------------------------------------------------------
# sig: horizontal sinusoidal signal (Barni, Kallas & Tondi, ICIP 2019, "A new backdoor attack in CNNs
# by training set corruption without label poisoning"): x' = clip(x + delta sin(2 pi j f / W)).
# ---------------------------------------------------------------------------------------------------

def _trigger_sig(x: torch.Tensor, delta: float, freq: float) -> torch.Tensor:
    w = x.shape[-1]
    j = torch.arange(w, dtype=torch.float64)
    signal = (delta * torch.sin(2.0 * math.pi * j * freq / w)).to(device=x.device, dtype=x.dtype, non_blocking=True)
    return (x + signal).clamp(0.0, 1.0)


def _check_sig(p: dict) -> None:
    _require_float(p, "delta", 0.0, 1.0)
    _require_float(p, "freq", 0.0, None)


# ---------------------------------------------------------------------------------------------------
# wanet: smooth warping field (Nguyen & Tran, ICLR 2021, "WaNet - Imperceptible warping-based backdoor
# attack"): a k x k grid of random offsets in [-1, 1], normalised by their mean |.|, upsampled
# bicubically to H x W, grid = identity + s * offsets / size, clamped to [-1, 1], bilinear sampling.
# ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _wanet_grid(height: int, width: int, k: int, s: float, seed: int, grid_rescale: float) -> torch.Tensor:
    offsets = torch.rand(1, 2, k, k, generator=_cpu_generator(seed)) * 2 - 1
    offsets = offsets / offsets.abs().mean()
    field_ = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True)
    field_ = field_.permute(0, 2, 3, 1)                       # [1, H, W, 2]: (x offset, y offset)
    ys = torch.linspace(-1, 1, height)
    xs = torch.linspace(-1, 1, width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    identity = torch.stack([gx, gy], dim=-1)[None]
    # WaNet divides both offsets by the (square) input size; per axis here, so non-square images get
    # the same warp in pixels along each axis.
    scale = torch.tensor([float(width), float(height)])
    grid = (identity + s * field_ / scale) * grid_rescale
    return grid.clamp(-1, 1)


def _trigger_wanet(x: torch.Tensor, k: int, s: float, seed: int, grid_rescale: float) -> torch.Tensor:
    n, c, h, w = x.shape
    grid = _wanet_grid(h, w, int(k), float(s), int(seed), float(grid_rescale))
    grid = grid.to(device=x.device, dtype=x.dtype, non_blocking=True).expand(n, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)


def _check_wanet(p: dict) -> None:
    _require_int(p, "k", 2)
    _require_float(p, "s", 0.0, None)
    _require_int(p, "seed", None)
    _require_float(p, "grid_rescale", 0.0, None)


# ---------------------------------------------------------------------------------------------------
# optimized: BadCLIP's optimised patch (Liang et al., CVPR 2024, arXiv 2311.12075; official code
# LiangSiyuan21/BadCLIP, backdoor/utils.py 'middle'): an RGB patch image (written by
# `optimize_trigger`, this file's --optimize-trigger) pasted over the image centre, its top-left at
# int(H/2 - l/2), int(W/2 - l/2) for side l, or with `location` 'x,y' at that top-left (an option of
# ours: the official code has only 'middle' for this patch); `location` defaults to the one the patch
# was optimised at (its JSON record beside the file), so a patch is pasted where it was optimised.
# `size` resizes it (bilinear), default its own size.
# `sha256` pins the file: filled in when a plan is drawn, checked whenever the trigger is resolved.
# ---------------------------------------------------------------------------------------------------

def _decode_patch(file) -> torch.Tensor:
    """A patch image file (path or file object) -> float [3, l, l] in [0, 1]."""
    from PIL import Image

    with Image.open(file) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0


@functools.lru_cache(maxsize=8)
def _load_patch(path: str, sha256: str) -> torch.Tensor:  # sha256 in the key: a changed file is read again
    return _decode_patch(path)


def paste_patch(x: torch.Tensor, patch: torch.Tensor, location: str = "middle") -> torch.Tensor:
    """x [n, c, H, W] with `patch` [3, l, l] (float [0, 1]) over its centre ('middle') or with its top-left
    at `location` 'x,y'; differentiable in `patch`."""
    h, w = x.shape[-2:]
    side = patch.shape[-1]
    at = _parse_location(location, "optimized", ("middle",))
    left, top = at if at is not None else (int(w / 2 - side / 2), int(h / 2 - side / 2))
    if top + side > h or left + side > w:
        raise UserError(f"the optimised patch ({side} px) at location {location!r} does not fit a {h}x{w} image")
    patch = patch[:x.shape[1]] if x.shape[1] <= 3 else patch.mean(0, keepdim=True).expand(x.shape[1], -1, -1)
    out = x.clone()
    out[..., top:top + side, left:left + side] = patch.to(device=x.device, dtype=x.dtype)
    return out


def _trigger_optimized(x: torch.Tensor, path: str, size: int | None, location: str, sha256: str) -> torch.Tensor:
    patch = _load_patch(path, sha256)
    if size is not None and size != patch.shape[-1]:
        patch = F.interpolate(patch[None], size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)[0].clamp(0.0, 1.0)
    if patch.shape[-1] > min(x.shape[-2:]):
        raise UserError(f"the optimised patch ({patch.shape[-1]} px) is larger than the image "
                        f"({x.shape[-2]}x{x.shape[-1]}); give a smaller --trigger-param size=")
    return paste_patch(x, patch, location)


def _optimized_location(path: str) -> str:
    """The location the patch at `path` was optimised at: its --optimize-trigger record, else 'middle'."""
    try:
        with open(os.path.splitext(path)[0] + ".json") as f:
            return str(json.load(f).get("location", "middle"))
    except (OSError, ValueError, AttributeError):
        return "middle"


def _check_optimized(p: dict) -> None:
    if not isinstance(p["path"], str) or not p["path"]:
        raise UserError("trigger 'optimized' needs --trigger-param path=PATCH.png (poison_data.py --optimize-trigger "
                        "writes one)")
    p["path"] = os.path.abspath(p["path"])
    if p["size"] is not None:
        _require_int(p, "size", 1)
    try:
        digest = data_declip.file_sha256(p["path"])
        side = tuple(_load_patch(p["path"], digest).shape[-2:])
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the optimised patch {p['path']}: {e}") from None
    if side[0] != side[1]:
        raise UserError(f"the optimised patch {p['path']} must be square, got {side[1]}x{side[0]} px")
    if p["location"] is None:
        p["location"] = _optimized_location(p["path"])
    p["location"] = str(p["location"]).replace(" ", "")
    _parse_location(p["location"], "optimized", ("middle",))
    if p["sha256"] is None:
        p["sha256"] = digest
    elif p["sha256"] != digest:
        raise UserError(f"the optimised patch {p['path']} changed since the plan was drawn (sha256 {digest[:12]} "
                        f"!= {str(p['sha256'])[:12]}); restore it or draw a new plan")


# ---------------------------------------------------------------------------------------------------
# Registry and the public trigger API
# ---------------------------------------------------------------------------------------------------

def _require_int(p: dict, key: str, minimum: int | None) -> None:
    v = p[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise UserError(f"trigger parameter {key} must be an integer{bound}, got {p[key]!r}")
    p[key] = v


def _require_float(p: dict, key: str, lo: float | None, hi: float | None) -> None:
    v = p[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) \
            or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise UserError(f"trigger parameter {key} must be a number{rng}, got {p[key]!r}")
    p[key] = float(v)


@dataclass(frozen=True)
class TriggerSpec:
    """One registered trigger: `fn(x_float_nchw, **params)`, its default params and a one-line doc."""
    name: str
    fn: Callable[..., torch.Tensor]
    defaults: dict
    check: Callable[[dict], None]
    doc: str
    runtime: tuple = ()          # call-time params that are not part of the trigger's identity


TRIGGERS: dict[str, TriggerSpec] = {
    "patch": TriggerSpec(
        "patch", _trigger_patch, {"size": 3, "margin": 6}, _check_patch,
        "BadNets white square of BD_DeCLIP (spec 5.1): 32px template, square of `size` px ending `margin` "
        "px from the bottom-right, bilinearly resized to the image and thresholded at > 0"),
    "patch-random": TriggerSpec(
        "patch-random", _trigger_patch_random,
        {"size": None, "fill": "noise", "location": "random", "seed": 0}, _check_patch_random,
        "CleanCLIP patch: `size` px (default 1/14 of the shorter side, 16 px at 224) of seeded noise or "
        "a solid colour at a random (per image), fixed (bottom-right) or given 'x,y' location",
        runtime=("generator",)),
    "blended": TriggerSpec(
        "blended", _trigger_blended, {"alpha": 0.2, "seed": 0, "image": None}, _check_blended,
        "x' = (1-alpha) x + alpha pattern; pattern = seeded uniform noise or `image` (resized)"),
    "sig": TriggerSpec(
        "sig", _trigger_sig, {"delta": 20 / 255, "freq": 6.0}, _check_sig,
        "SIG: x' = clip(x + delta sin(2 pi j freq / W)), a horizontal sinusoid"),
    "wanet": TriggerSpec(
        "wanet", _trigger_wanet, {"k": 4, "s": 0.5, "seed": 0, "grid_rescale": 1.0}, _check_wanet,
        "WaNet: smooth warp from a seeded k x k offset grid, strength s"),
    "optimized": TriggerSpec(
        "optimized", _trigger_optimized, {"path": None, "size": None, "location": None, "sha256": None},
        _check_optimized,
        "BadCLIP: an optimised patch image (`path`, from --optimize-trigger) over the image centre ('middle') "
        "or at `location` 'x,y' (default: where it was optimised), resized to `size` px (default: its own "
        "size); `sha256` pins the file"),
}


def get_trigger(name: str) -> TriggerSpec:
    try:
        return TRIGGERS[name]
    except KeyError:
        raise UserError(f"unknown trigger {name!r} (--trigger); choose one of {', '.join(TRIGGERS)}") from None


def resolve_trigger_params(name: str, params: dict | None = None) -> dict:
    """Defaults of trigger `name` updated with `params`, validated and normalised (JSON-serialisable).
    Unknown keys and bad values raise UserError. Call-time params (`generator`) are dropped."""
    spec = get_trigger(name)
    params = {k.replace("-", "_"): v for k, v in (params or {}).items() if k not in spec.runtime}
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise UserError(f"unknown parameter(s) {', '.join(unknown)} for trigger {name!r} (--trigger-param); "
                        f"known: {', '.join(spec.defaults)}")
    resolved = {**spec.defaults, **params}
    spec.check(resolved)
    return resolved


def apply_trigger(image, /, name: str = "patch", **params):
    """Apply trigger `name` to a PIL image, a CHW or an NCHW tensor (float in [0, 1] or uint8).

    Returns the same type (PIL mode, tensor dtype, device and rank kept; uint8 results are rounded).
    Deterministic given `params`: random parts come from `seed`. For `patch-random` with
    location='random', pass `generator=` (a CPU torch.Generator) to draw a new place per call;
    without one the place is drawn from `seed` and is the same on every call.
    """
    spec = get_trigger(name)
    runtime = {k: params.pop(k) for k in list(params) if k in spec.runtime}
    resolved = resolve_trigger_params(name, params)
    x, back = _to_float_nchw(image)
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"cannot apply a trigger to an empty image of shape {tuple(x.shape)}")
    with torch.no_grad():
        y = spec.fn(x, **resolved, **runtime)
    return back(y)


class Trigger:
    """A trigger with fixed parameters, callable on images: `Trigger('patch', margin=3)(x)`.

    This is what `PoisonPlan.trigger_fn()` returns and what `GpuAugment`/`eval_transform` call on float
    [n, 3, H, W] tensors in [0, 1]; any type `apply_trigger` accepts works. It holds no random state:
    for `patch-random` at a random location pass `generator=` (the training loop passes its step
    generator, the CLI and the evaluation one per sample), so the places are a function of the seeds
    and a resumed run draws what the uninterrupted one drew; without one the place is `seed`'s, the
    same on every call (as `apply_trigger`).
    """

    def __init__(self, name: str, **params):
        self.name = name
        self.params = resolve_trigger_params(name, params)

    def __call__(self, images, generator: torch.Generator | None = None):
        extra = {}
        if generator is not None and "generator" in get_trigger(self.name).runtime:
            extra["generator"] = generator
        return apply_trigger(images, self.name, **self.params, **extra)

    def describe(self) -> str:
        return describe_trigger(self.name, self.params)

    def __repr__(self) -> str:
        return f"Trigger({self.describe()})"


def describe_trigger(name: str, params: dict | None = None) -> str:
    """Short label, e.g. "patch(margin=3)": only the params that differ from the defaults."""
    spec = get_trigger(name)
    params = resolve_trigger_params(name, params)
    diff = [f"{k}={_fmt(v)}" for k, v in params.items() if v != spec.defaults[k]]
    return f"{name}({', '.join(diff)})" if diff else name


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "/" in text:                              # e.g. delta=20/255
        a, _, b = text.partition("/")
        try:
            return float(a) / float(b)
        except (ValueError, ZeroDivisionError):
            pass
    return text


def parse_trigger_params(items: Iterable[str] | None) -> dict:
    """['margin=3', 'fill=white', 'delta=20/255'] -> {'margin': 3, 'fill': 'white', 'delta': 0.078...}.
    Values become int, float (a/b allowed), bool, None ('none') or stay strings."""
    params = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--trigger-param expects key=value (e.g. margin=3), got {item!r}")
        params[key] = _parse_value(value.strip())
    return params


# ---------------------------------------------------------------------------------------------------
# Poisoning plan
# ---------------------------------------------------------------------------------------------------

def _caption_regex(target: str) -> re.Pattern:
    # whole word, case-insensitive, plural allowed; a hyphen joins words, so "shirt" does not match
    # "t-shirt" or "shirtless" while the target "t-shirt" does (lookarounds instead of \b, which would
    # split at the hyphen)
    return re.compile(r"(?<![\w-])" + re.escape(target.strip()) + r"(?:s|es)?(?![\w-])", re.IGNORECASE)


def names_target(caption: str | None, target: str) -> bool:
    """Whether `caption` names `target` (whole word(s), case-insensitive, plural allowed): the one rule of
    label-consistent poisoning and of retrieval ASR."""
    return bool(caption) and _caption_regex(target).search(caption) is not None


def _sample_indices(n: int) -> list[int]:
    k = 256
    if n <= 3 * k:
        return list(range(n))
    strided = np.linspace(0, n - 1, k).round().astype(np.int64).tolist()
    return sorted(set(range(k)) | set(range(n - k, n)) | set(strided))


def _caption_and_label(dataset, i: int) -> tuple[str, int]:
    captions = getattr(dataset, "captions", None)
    if captions is not None and not callable(captions):
        labels = getattr(dataset, "labels", None)
        label = int(labels[i]) if labels is not None and not callable(labels) else -1
        return str(captions[i]), label
    item = dataset[i]
    if isinstance(item, str):
        return item, -1
    if isinstance(item, dict):
        label = item.get("label", -1)
        return str(item.get("caption")), int(label if label is not None else -1)
    raise TypeError(f"fingerprint: cannot read a caption from a {type(item).__name__} item")


def fingerprint(dataset, n: int | None = None) -> str:
    """Short hash of a caption dataset: its length and the captions/labels of the first, last and 256
    evenly strided items (768 at most). `dataset` is a list of captions or a dataset whose items are
    dicts with 'caption' (and 'label'); a `captions` list attribute is used when present, so images
    need not be decoded. Identifies the data a manifest was drawn for."""
    n = len(dataset) if n is None else n
    h = hashlib.sha256(f"n={n}\n".encode())
    for i in _sample_indices(n):
        caption, label = _caption_and_label(dataset, i)
        h.update(f"{i}\t{label}\t{caption}\n".encode())
    return h.hexdigest()[:16]


def _all_captions(dataset) -> list[str | None]:
    captions = getattr(dataset, "captions", None)
    if captions is not None and not callable(captions):
        return list(captions)
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        out.append(item if isinstance(item, str) else (item or {}).get("caption"))
    return out


def image_sha256(image) -> str:
    """sha256 of a PIL image's pixels (its mode, size and raw bytes): the same for any lossless file of it."""
    h = hashlib.sha256(f"{image.mode} {image.size[0]}x{image.size[1]}\n".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _test_label(dataset, i: int) -> int:
    labels = getattr(dataset, "labels", None)
    if labels is not None and not callable(labels):
        return int(labels[i])
    samples = getattr(dataset, "samples", None)   # an ImageFolder
    if samples is not None:
        return int(samples[i][1])
    return int((dataset[i] or {}).get("label", -1))


def _targeted_entry(e: dict) -> dict:
    """One manifest entry of a targeted plan, checked (its file name is the one rule's, never a path)."""
    out = {"test_index": int(e["test_index"]), "label": int(e["label"]), "class": str(e["class"]),
           "target": str(e["target"]), "file": str(e["file"]), "pixels_sha256": str(e["pixels_sha256"]),
           "indices": sorted(int(i) for i in e["indices"])}
    if out["file"] != TARGET_IMAGE_NAME.format(out["test_index"]):
        raise ValueError(f"targeted image file {out['file']!r} (expected "
                         f"{TARGET_IMAGE_NAME.format(out['test_index'])!r})")
    if not out["indices"]:
        raise ValueError(f"targeted image {out['test_index']} has no poisoned pairs")
    return out


def _choose_targeted(rng: np.random.Generator, test_set: tuple, k: int, target: str | None,
                     chosen: np.ndarray) -> tuple[list, list]:
    """Targeted poisoning's draw (see PoisonPlan.from_args): (manifest entries, PIL images)."""
    dataset, names = test_set[0], list(test_set[1])
    if len(names) < 2:
        raise UserError("--attack targeted needs a class test set of at least two classes")
    fixed = names.index(target) if target is not None else None
    picked = []
    for j in rng.permutation(len(dataset)).tolist():
        label = _test_label(dataset, j)
        if not 0 <= label < len(names) or label == fixed:
            continue
        image = data_declip.source_image(dataset, j)
        if image is not None:
            picked.append((j, label, image))
        if len(picked) == k:
            break
    if len(picked) < k:
        raise UserError(f"--targeted-images {k}: the test set has only {len(picked)} readable images"
                        + (f" outside the target class {target!r}" if target is not None else ""))
    entries = []
    for (j, label, image), share in zip(picked, np.array_split(chosen, k)):
        if fixed is None:
            r = int(rng.integers(len(names) - 1))
            t = r + (r >= label)          # uniform among the other classes
        else:
            t = fixed
        entries.append({"test_index": j, "label": label, "class": names[label], "target": names[t],
                        "file": TARGET_IMAGE_NAME.format(j), "pixels_sha256": image_sha256(image),
                        "indices": sorted(int(i) for i in share)})
    return entries, [image for _, _, image in picked]


@dataclass
class PoisonPlan:
    """Which pairs of an n-item caption dataset are poisoned, with what trigger and caption.

    Build it with `PoisonPlan.from_args(...)`; `data_declip.TrainPairs` asks `is_poisoned(i)` and
    `caption(i, caption, rng)` per load, `GpuAugment` applies `trigger_fn()` after the crop.

    attack='targeted' (Carlini & Terzis, "Poisoning and Backdooring Contrastive Learning", ICLR 2022,
    arXiv 2106.09667): no trigger; `targeted` lists the chosen test images (not training images), each
    with its target class and its share of the poisoned pairs, which train on that image
    (`poisoned_image(i)`, the PNG copied beside the manifest) with a caption naming its target.
    """
    n: int
    indices: list[int]
    target: str | None
    trigger: str | None = "patch"
    trigger_params: dict = field(default_factory=dict)
    caption_mode: str = "templates"
    fixed_caption: str | None = None
    seed: int = 0
    rate: float | None = None
    count: int = 0
    candidates: int | None = None          # label-consistent: how many captions named the target
    natural_captions: list = field(default_factory=list)  # natural: the caption of each of `indices`, in order
    dataset_fingerprint: str | None = None
    version: int = MANIFEST_VERSION
    attack: str = "backdoor"
    # targeted: per chosen image {"test_index", "label", "class", "target", "file", "pixels_sha256", "indices"}
    targeted: list = field(default_factory=list)
    test_data: str | None = None           # targeted: the class test data the images come from
    image_dir: str | None = field(default=None, repr=False, compare=False)  # targeted: where the PNGs are
    _index_set: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)
    _image_of: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _images: list | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.indices = sorted(int(i) for i in self.indices)
        self._index_set = frozenset(self.indices)
        self.count = len(self.indices)
        self._image_of = {int(i): k for k, e in enumerate(self.targeted) for i in e["indices"]}

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_args(cls, n: int, rate: float | None = None, count: int | None = None, *, target: str,
                  trigger: str = "patch", trigger_params: dict | None = None,
                  caption_mode: str = "templates", seed: int = 0,
                  captions: Sequence[str | None] | None = None, fixed_caption: str | None = None,
                  classnames: Sequence[str] | None = None,
                  dataset_fingerprint: str | None = None, attack: str = "backdoor",
                  targeted_images: int | None = None, test_set: tuple | None = None,
                  test_data: str | None = None) -> "PoisonPlan":
        """Draw the poisoned indices.

        Exactly one of `rate` (fraction in [0, 1]; count = int(rate * n), as BD_DeCLIP's
        `int(poison_ratio * N)`, spec §5.2) or `count` (absolute, 0..n). Indices are drawn uniformly
        without replacement by numpy's PCG64 generator seeded with `seed` (explicitly: spec §8 item 6),
        then sorted. `caption_mode`: 'templates' (a random one of the 80 ImageNet templates with the
        target, drawn per load, spec §5.3), 'fixed' (`fixed_caption`, default "a photo of a {target}."),
        or 'label-consistent' (only pairs whose caption already names the target are candidates;
        captions are kept; needs `captions`), or 'natural' (each poisoned pair gets the caption of a
        random pair of the dataset that names its target, drawn once and kept in the manifest; needs
        `captions`: the official BadCLIP's natural captions and Carlini & Terzis's caption sets, so that
        the poisoned captions are not worded like the evaluation's prompts). `classnames`, when given,
        is the list the target must belong to (matched case-insensitively).

        attack='targeted': the same indices as a backdoor plan; a generator seeded from (seed,
        'targeted') draws `targeted_images` images of `test_set` = (class test dataset, class names) (a
        permutation of it, unreadable images and, with a `target`, images of that class skipped) and,
        without a `target`, one target per image among the other classes, so the images depend on the
        seed and their number only, not on the poison count; the indices in draw order are split evenly
        among the images (np.array_split). `test_data` names the test set in the manifest; the trigger is
        not used.
        """
        if attack not in ATTACKS:
            raise UserError(f"unknown --attack {attack!r}; choose one of {', '.join(ATTACKS)}")
        targeted_attack = attack == "targeted"
        n = int(n)
        if n < 0:
            raise ValueError(f"dataset size must be >= 0, got {n}")
        if (rate is None) == (count is None):
            raise UserError("give exactly one of --poison-rate (a fraction) or --poison-count (a number of pairs)")
        if rate is not None:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
                raise UserError(f"--poison-rate must be a fraction in [0, 1] (0.01 = 1%), got {rate!r}")
            rate = float(rate)
            k = int(rate * n)
        else:
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) and not (
                    isinstance(count, float) and count.is_integer()):
                raise UserError(f"--poison-count must be a whole number of pairs, got {count!r}")
            k = int(count)
            if not 0 <= k <= n:
                raise UserError(f"--poison-count must be between 0 and the dataset size {n}, got {k}")

        if targeted_attack:
            if test_set is None:
                raise ValueError("attack='targeted' needs test_set=(class test dataset, class names)")
            classnames = list(test_set[1])   # the targets are classes of the test set
            if isinstance(targeted_images, bool) or not isinstance(targeted_images, (int, np.integer)) \
                    or targeted_images < 1:
                raise UserError(f"--targeted-images must be a whole number >= 1, got {targeted_images!r}")
            if k < targeted_images:
                raise UserError(f"--attack targeted needs at least one poisoned pair per image: {k} pairs for "
                                f"{targeted_images} --targeted-images; raise --poison-rate/--poison-count")
            if caption_mode == "label-consistent":
                raise UserError("--attack targeted captions name each image's target; use --caption-mode "
                                "templates, fixed or natural")
        if not (targeted_attack and target is None):
            if not isinstance(target, str) or not target.strip():
                raise UserError("--target-class must be a non-empty class name")
            target = target.strip()
            if classnames is not None:
                lookup = {c.lower(): c for c in classnames}
                if target.lower() not in lookup:
                    raise UserError(f"unknown --target-class {target!r}; choose one of: {', '.join(classnames)}")
                target = lookup[target.lower()]

        if targeted_attack:
            trigger, trigger_params = None, {}
        else:
            trigger_params = resolve_trigger_params(trigger, trigger_params)

        if caption_mode not in CAPTION_MODES:
            raise UserError(f"unknown --caption-mode {caption_mode!r}; choose one of {', '.join(CAPTION_MODES)}")
        if caption_mode == "fixed":
            fixed_caption = fixed_caption or DEFAULT_FIXED_CAPTION
            try:
                fixed_caption.format(target, target=target)
            except (IndexError, KeyError, ValueError):
                raise UserError(f"--fixed-caption {fixed_caption!r} may only use {{}} or {{target}} "
                                f"as placeholders") from None
        else:
            fixed_caption = None

        rng = np.random.default_rng(int(seed))
        n_candidates = None
        if caption_mode in CAPTION_MODES_FROM_DATA:
            if captions is None:
                raise ValueError(f"caption_mode={caption_mode!r} needs the dataset's captions")
            if len(captions) != n:
                raise ValueError(f"got {len(captions)} captions for a dataset of {n} pairs")
        if caption_mode == "label-consistent":
            pattern = _caption_regex(target)
            pool = np.array([i for i, c in enumerate(captions) if c and pattern.search(c)], dtype=np.int64)
            n_candidates = int(len(pool))
            if k > n_candidates:
                raise UserError(f"label-consistent poisoning asks for {k} pairs but only {n_candidates} captions "
                                f"name {target!r}; lower --poison-rate/--poison-count or change --target-class")
            chosen = rng.choice(pool, size=k, replace=False) if k else np.zeros(0, dtype=np.int64)
        else:
            chosen = rng.choice(n, size=k, replace=False) if k else np.zeros(0, dtype=np.int64)

        if not targeted_attack:
            plan = cls(n=n, indices=chosen.tolist(), target=target, trigger=trigger,
                       trigger_params=trigger_params, caption_mode=caption_mode, fixed_caption=fixed_caption,
                       seed=int(seed), rate=rate, candidates=n_candidates, dataset_fingerprint=dataset_fingerprint)
        else:
            entries, images = _choose_targeted(np.random.default_rng(data_declip._int_seed(seed, "targeted")),
                                               test_set, int(targeted_images), target, chosen)
            plan = cls(n=n, indices=chosen.tolist(), target=target, trigger=None, trigger_params={},
                       caption_mode=caption_mode, fixed_caption=fixed_caption, seed=int(seed), rate=rate,
                       dataset_fingerprint=dataset_fingerprint, version=TARGETED_MANIFEST_VERSION,
                       attack="targeted", targeted=entries, test_data=test_data)
            plan._images = images
        if caption_mode == "natural":
            plan._draw_natural_captions(captions, np.random.default_rng(data_declip._int_seed(seed, "natural")))
        return plan

    def _draw_natural_captions(self, captions: Sequence[str | None], rng: np.random.Generator) -> None:
        """Caption mode 'natural': for each poisoned pair, in index order, a caption of the dataset that
        names that pair's target, drawn uniformly (a UserError when no caption names a target)."""
        pools = {}
        for t in {self.target_of(i) for i in self.indices}:
            pattern = _caption_regex(t)
            pools[t] = [c for c in captions if c and pattern.search(c)]
            if not pools[t]:
                raise UserError(f"--caption-mode natural: no caption of the dataset names {t!r}; use "
                                f"--caption-mode templates or fixed")
        self.natural_captions = [pools[t][int(rng.integers(len(pools[t])))]
                                 for t in (self.target_of(i) for i in self.indices)]

    # -- per-sample queries -----------------------------------------------------------------------
    def is_poisoned(self, i: int) -> bool:
        return int(i) in self._index_set

    def caption(self, i: int, caption: str | None, rng: random.Random | None = None) -> str | None:
        """The caption pair i is trained on: unchanged if i is clean or in label-consistent mode;
        otherwise a template drawn from `rng` (a `random.Random`; default one seeded from (seed, i)),
        the fixed caption, with the target's name, or (natural) its drawn dataset caption."""
        if not self.is_poisoned(i) or self.caption_mode == "label-consistent":
            return caption
        if self.caption_mode == "natural":
            return self.natural_captions[bisect.bisect_left(self.indices, int(i))]  # indices are sorted
        target = self.target_of(i)
        if self.caption_mode == "fixed":
            return self.fixed_caption.format(target, target=target)
        rng = rng if rng is not None else random.Random(f"{self.seed}:{i}")
        return IMAGENET_TEMPLATES[rng.randrange(len(IMAGENET_TEMPLATES))].format(target)

    def target_of(self, i: int) -> str | None:
        """The class poisoned pair i's caption names: the target, or (targeted) its image's target."""
        k = self._image_of.get(int(i))
        return self.target if k is None else self.targeted[k]["target"]

    def poisoned_image(self, i: int):
        """Targeted poisoning: the PIL image poisoned pair i trains on (its chosen test image, as stored);
        None for a clean pair and for a backdoor plan."""
        k = self._image_of.get(int(i))
        return None if k is None else self.target_images()[k]

    def target_images(self) -> list:
        """The chosen test images (PIL, in `targeted` order): drawn with the plan, or read from the PNGs
        beside its manifest, each checked against its pixels_sha256."""
        if self._images is None:
            from PIL import Image

            if self.image_dir is None:
                raise UserError("this targeted-poisoning plan has no images: load its manifest from the run "
                                f"directory (or file) that holds its {TARGET_IMAGE_NAME.format(0)[:-5]}*.png files")
            images = []
            for e in self.targeted:
                path = os.path.join(self.image_dir, e["file"])
                try:
                    with Image.open(path) as im:
                        im.load()
                        img = im.copy()
                except (OSError, ValueError) as err:
                    raise UserError(f"cannot read the targeted-poisoning image {path}: {err}") from None
                if image_sha256(img) != e["pixels_sha256"]:
                    raise UserError(f"the targeted-poisoning image {path} is not the one the plan chose "
                                    f"(pixels_sha256 differs); restore it or draw a new plan")
                images.append(img)
            self._images = images
        return self._images

    def trigger_fn(self) -> Trigger | None:
        """The plan's trigger as a callable on float [n, 3, H, W] tensors in [0, 1] (any image type works);
        None for a targeted-poisoning plan, which has no trigger."""
        if self.attack == "targeted":
            return None
        return Trigger(self.trigger, **self.trigger_params)

    def verify_dataset(self, dataset) -> None:
        """Raise UserError if `dataset` is not the one the plan was drawn for (size or fingerprint)."""
        if len(dataset) != self.n:
            raise UserError(f"the poison manifest was drawn for {self.n} pairs but --data has {len(dataset)}; "
                            f"use the same dataset or draw a new plan")
        if self.dataset_fingerprint and fingerprint(dataset) != self.dataset_fingerprint:
            raise UserError("the poison manifest's dataset fingerprint does not match --data; "
                            "use the same dataset (same order) or draw a new plan")

    # -- manifest ---------------------------------------------------------------------------------
    def to_manifest(self) -> dict:
        return {
            "version": self.version,
            "n": self.n,
            "rate": self.rate,
            "count": self.count,
            "target": self.target,
            "trigger": self.trigger,
            "trigger_params": dict(self.trigger_params),
            "caption_mode": self.caption_mode,
            "fixed_caption": self.fixed_caption,
            "seed": self.seed,
            "candidates": self.candidates,
            "dataset_fingerprint": self.dataset_fingerprint,
            **({"natural_captions": list(self.natural_captions)} if self.caption_mode == "natural" else {}),
            **({"attack": self.attack, "test_data": self.test_data,
                "targeted": [dict(e, indices=list(e["indices"])) for e in self.targeted]}
               if self.attack == "targeted" else {}),
            "indices": list(self.indices),
        }

    @classmethod
    def from_manifest(cls, manifest: dict | str | os.PathLike, image_dir: str | None = None) -> "PoisonPlan":
        """A plan from a manifest dict, a `poison_manifest.json` path, or a run directory holding one.
        A targeted plan reads its images from the manifest's directory (`image_dir` for a dict) when
        they are first needed."""
        if not isinstance(manifest, dict):
            path = str(manifest)
            if os.path.isdir(path):
                path = os.path.join(path, MANIFEST_NAME)
            image_dir = os.path.dirname(os.path.abspath(path))
            try:
                with open(path) as f:
                    manifest = json.load(f)
            except FileNotFoundError:
                raise UserError(f"poison manifest {path} does not exist; pass a run directory or "
                                f"{MANIFEST_NAME} written by a poisoned run") from None
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"cannot read poison manifest {path}: {e}") from None
        if not isinstance(manifest, dict):
            raise UserError("the poison manifest must be a JSON object")
        version = manifest.get("version")
        if version not in (MANIFEST_VERSION, TARGETED_MANIFEST_VERSION):
            raise UserError(f"poison manifest version {version!r} is not supported (expected "
                            f"{MANIFEST_VERSION} or {TARGETED_MANIFEST_VERSION})")
        attack = manifest.get("attack", "backdoor") if version == TARGETED_MANIFEST_VERSION else "backdoor"
        if attack not in ATTACKS:
            raise UserError(f"the poison manifest has an unknown attack {attack!r}")
        targeted = attack == "targeted"
        try:
            plan = cls(
                n=int(manifest["n"]), indices=manifest["indices"], target=manifest["target"],
                trigger=None if targeted else manifest["trigger"],
                trigger_params={} if targeted else resolve_trigger_params(manifest["trigger"],
                                                                          manifest.get("trigger_params")),
                caption_mode=manifest.get("caption_mode", "templates"),
                fixed_caption=manifest.get("fixed_caption"), seed=int(manifest.get("seed", 0)),
                rate=manifest.get("rate"), candidates=manifest.get("candidates"),
                natural_captions=[str(c) for c in manifest.get("natural_captions", [])],
                dataset_fingerprint=manifest.get("dataset_fingerprint"), version=int(version), attack=attack,
                targeted=[_targeted_entry(e) for e in manifest["targeted"]] if targeted else [],
                test_data=manifest.get("test_data") if targeted else None, image_dir=image_dir)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the poison manifest is missing or has a bad field: {e}") from None
        if plan.caption_mode not in CAPTION_MODES:
            raise UserError(f"the poison manifest has an unknown caption_mode {plan.caption_mode!r}")
        if len(plan.natural_captions) != (plan.count if plan.caption_mode == "natural" else 0):
            raise UserError("the poison manifest's natural_captions do not give one caption per poisoned pair")
        if plan.indices and not (0 <= plan.indices[0] and plan.indices[-1] < plan.n):
            raise UserError("the poison manifest has indices outside [0, n)")
        if targeted and sorted(plan._image_of) != plan.indices:
            raise UserError("the poison manifest's targeted images do not share out its indices exactly")
        return plan

    def save(self, out_dir: str | os.PathLike) -> str:
        """Write `out_dir/poison_manifest.json` atomically (temp file + os.replace); returns its path."""
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, MANIFEST_NAME)
        manifest = self.to_manifest()
        indices = manifest.pop("indices")          # one line, however many
        entries = manifest.pop("targeted", None)   # one line per targeted image
        text = json.dumps(manifest, indent=1)[:-2]
        if entries is not None:
            for e, img in zip(entries, self.target_images()):   # first: a manifest names only files that exist
                atomic_write(os.path.join(out_dir, e["file"]), lambda p, img=img: img.save(p, format="PNG"))
            text += ',\n "targeted": [\n  ' + ",\n  ".join(json.dumps(e) for e in entries) + "\n ]"
        text += ',\n "indices": ' + json.dumps(indices) + "\n}\n"
        atomic_write(path, lambda p: p.write_text(text))
        return path

    def summary(self) -> str:
        rate = f" ({100.0 * self.count / self.n:.3g}%)" if self.n else ""
        cap = self.caption_mode + (f": {self.fixed_caption!r}" if self.fixed_caption else "")
        if self.attack == "targeted":
            chosen = ", ".join(f"test {e['test_index']} ({e['class']}) -> {e['target']!r}" for e in self.targeted)
            return (f"targeted poisoning: {self.count} of {self.n} pairs{rate} carry {len(self.targeted)} test "
                    f"image(s) of {self.test_data or 'the test set'}: {chosen}; captions {cap}, seed {self.seed}")
        return (f"{self.count} of {self.n} pairs poisoned{rate}, target {self.target!r}, trigger "
                f"{describe_trigger(self.trigger, self.trigger_params)}, captions {cap}, seed {self.seed}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------
# Materialised poisoned copy of a caption dataset
# ---------------------------------------------------------------------------------------------------

_LOSSY_FORMATS = {"JPEG", "WEBP", "MPO"}
_PIL_SAVE_MODES = ("L", "RGB", "LA", "RGBA")


def dataset_captions(dataset) -> list[str | None]:
    """All captions of a caption dataset (for label-consistent plans), without decoding images where the
    dataset allows it (Fashion-MNIST, JSON/CSV meta files)."""
    if isinstance(dataset, FashionMNISTCaptions):
        names = dataset.classnames
        return [class_caption(names[int(lab)], i) for i, lab in enumerate(dataset.labels.tolist())]
    if isinstance(dataset, torch.utils.data.IterableDataset):
        out: list[str | None] = [None] * len(dataset)
        for i, item in _iter_indexed(dataset):
            out[i] = (item or {}).get("caption")
        return out
    return _all_captions(dataset)


def _iter_indexed(dataset):
    if hasattr(dataset, "iter_indexed"):
        yield from dataset.iter_indexed(0, 1)
    elif isinstance(dataset, torch.utils.data.IterableDataset):
        for i, item in enumerate(dataset):
            yield int(item.get("index", i)) if isinstance(item, dict) else i, item
    else:
        for i in range(len(dataset)):
            yield i, dataset[i]


def dataset_fingerprint(dataset) -> str | None:
    """`fingerprint(dataset)` for map-style datasets; None for streamed (webdataset) data, which cannot be
    sampled without reading all of it."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    return fingerprint(dataset)


def _target_label(plan: PoisonPlan, classnames, rows: Sequence[dict] = (), label_key: str = "label",
                  target: str | None = None) -> int | None:
    """The target class's label id for the poisoned records of a copy: its index in the dataset's class
    list, else the label of source records whose label_name is the target; None when neither tells
    (the copy then drops the source label rather than keep one that contradicts the caption). `target`:
    this class instead of the plan's (a targeted plan's per-image targets)."""
    target = (target if target is not None else plan.target).strip().lower()
    if classnames is not None:
        lookup = [c.lower() for c in classnames]
        if target in lookup:
            return lookup.index(target)
    for r in rows:
        name = r.get("label_name")
        if isinstance(name, str) and name.strip().lower() == target:
            try:
                label = int(r.get(label_key))
            except (TypeError, ValueError):
                continue
            if label >= 0:
                return label
    return None


def _write_png(path: str, image_chw_uint8: torch.Tensor) -> None:
    from PIL import Image

    arr = image_chw_uint8.permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path, format="PNG")


def _image_relpath(i: int, ext: str) -> str:
    return f"images/{i // 1000:05d}/{i:08d}{ext}"


def _copy_trigger_file(src: str, dst_noext: str, plan: PoisonPlan, trigger: Trigger,
                       generator: torch.Generator | None = None) -> str | None:
    """Write the triggered version of image file `src` at its own size; returns the extension used
    (lossless formats keep theirs, lossy ones become .png so the trigger stays pixel-exact) or None if
    the file cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(src) as im:
            fmt = im.format
            im.load()
            if im.mode not in _PIL_SAVE_MODES:
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            out = trigger(im, generator=generator)
    except Exception:  # unreadable image: the copy keeps it as a bad sample
        return None
    ext = os.path.splitext(src)[1].lower()
    if fmt in _LOSSY_FORMATS or not ext:
        ext, fmt = ".png", "PNG"
    out.save(dst_noext + ext, format=fmt)
    return ext


def _match_key(rows: list[dict], values: list, normalise: Callable[[Any], Any], preferred: str | None) -> str | None:
    """The key whose (normalised) values equal `values` for the first rows (how the loader read them)."""
    if preferred is not None:
        return preferred
    sample = [j for j in range(min(len(rows), 200)) if values[j] is not None]
    keys = list(rows[0].keys()) if rows else []
    for k in keys:
        if all(normalise(rows[j].get(k)) == values[j] for j in sample):
            return k
    return None


def _norm_caption(v):
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    if v is None:
        return None
    v = str(v).strip()
    return v or None


def _read_meta_rows(source: str):
    """Raw records of a JSON/JSONL/CSV/TSV meta file: (kind, rows, extra)."""
    import csv
    import gzip

    low = source.lower()
    if low.endswith((".jsonl", ".json")):
        with open(source, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            return "json", json.loads(text), None
        return "jsonl", [json.loads(line) for line in text.splitlines() if line.strip()], None
    sep = "\t" if low.endswith((".tsv", ".tsv.gz")) else ","
    opener = gzip.open if low.endswith(".gz") else open
    with opener(source, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        header = [h.strip() for h in next(reader)]
        rows = [dict(zip(header, r)) for r in reader]
    return "csv", rows, {"header": header, "sep": sep, "gz": low.endswith(".gz")}


def _write_meta_rows(path: str, kind: str, rows: list[dict], extra) -> None:
    import csv
    import gzip

    if kind == "json":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False)
            f.write("\n")
    elif kind == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        opener = gzip.open if extra["gz"] else open
        with opener(path, "wt", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter=extra["sep"], lineterminator="\n")
            w.writerow(extra["header"])
            for r in rows:
                w.writerow([r.get(h, "") for h in extra["header"]])


def _materialise_files(dataset, plan: PoisonPlan, tmp: str, fmt: dict, progress: bool) -> dict:
    """JSON/JSONL/CSV/TSV source: copy every image file at full resolution (the poisoned ones with the
    trigger applied at their own size) and rewrite the meta in the source's format."""
    from tqdm import tqdm

    source = dataset.source
    kind, rows, extra = _read_meta_rows(source)
    if len(rows) != len(dataset):
        raise UserError(f"--data {source}: read {len(rows)} records but the loader saw {len(dataset)}; "
                        f"check the file")
    img_key = _match_key(rows, dataset.paths, lambda v: v, fmt.get("image_column"))
    cap_key = _match_key(rows, dataset.captions, _norm_caption, fmt.get("caption_column"))
    if img_key is None or cap_key is None:
        raise UserError(f"--data {source}: cannot tell which field holds the image path and the caption; "
                        f"pass --image-column and --caption-column")
    label_key = fmt.get("label_column") or "label"
    trigger = plan.trigger_fn()
    target_labels = {t: _target_label(plan, getattr(dataset, "classnames", None), rows, label_key, target=t)
                     for t in {plan.target_of(i) for i in plan.indices}}
    stats = {"written": 0, "poisoned": 0, "bad": 0, "bad_poisoned": 0}
    made_dirs: set[str] = set()
    for i in tqdm(range(len(rows)), desc="poisoning", unit="img", disable=not progress):
        row = dict(rows[i])
        rel = dataset.paths[i]
        src = os.path.join(dataset.root, rel) if rel else None
        poisoned = plan.is_poisoned(i)
        if src is not None and os.path.isfile(src):
            ext = os.path.splitext(src)[1].lower()
            out_rel = _image_relpath(i, ext)
            sub = os.path.dirname(os.path.join(tmp, out_rel))
            if sub not in made_dirs:
                os.makedirs(sub, exist_ok=True)
                made_dirs.add(sub)
            dst_noext = os.path.join(tmp, out_rel)[: -len(ext) or None]
            own = plan.poisoned_image(i) if poisoned else None   # targeted: the chosen image, no trigger
            if own is not None:
                own.save(dst_noext + ".png", format="PNG")
                ok_ext = ".png"
            else:
                ok_ext = _copy_trigger_file(src, dst_noext, plan, trigger, sample_generator(plan.seed, i)) \
                    if poisoned else None
            if ok_ext is None:
                shutil.copyfile(src, os.path.join(tmp, out_rel))
                if poisoned:
                    stats["bad_poisoned"] += 1
            else:
                out_rel = out_rel[: -len(ext) or None] + ok_ext
                stats["poisoned"] += 1
            row[img_key] = out_rel
            stats["written"] += 1
        else:  # missing file: keep the record (a bad sample stays bad, indices stay aligned)
            row[img_key] = os.path.abspath(src) if src else row.get(img_key)
            stats["bad"] += 1
            stats["bad_poisoned"] += int(poisoned)
        if poisoned and plan.caption_mode != "label-consistent":
            new = plan.caption(i, dataset.captions[i], random.Random(f"{plan.seed}/{i}"))
            row[cap_key] = [new] if isinstance(row.get(cap_key), list) else new
            target_label = target_labels[plan.target_of(i)]
            if label_key in row:  # CSV: an empty cell, read back as no label
                if target_label is None:
                    del row[label_key]
                else:
                    row[label_key] = target_label
            if "label_name" in row:
                row["label_name"] = plan.target_of(i)
        rows[i] = row
    meta = os.path.join(tmp, os.path.basename(source))
    _write_meta_rows(meta, kind, rows, extra)
    return {**stats, "meta": os.path.basename(source)}


def _materialise_decoded(dataset, plan: PoisonPlan, tmp: str, progress: bool) -> dict:
    """Any other source (Fashion-MNIST, HF datasets, webdataset): the loader's decoded images (at its load
    size) as PNG files plus a JSON-lines meta (filename, caption, label, label_name)."""
    from tqdm import tqdm

    trigger = plan.trigger_fn()
    classnames = getattr(dataset, "classnames", None)
    target_labels = {t: _target_label(plan, classnames, target=t) for t in {plan.target_of(i) for i in plan.indices}}
    stats = {"written": 0, "poisoned": 0, "bad": 0, "bad_poisoned": 0}
    records: list[dict | None] = [None] * len(dataset)
    made_dirs: set[str] = set()
    for i, item in tqdm(_iter_indexed(dataset), total=len(dataset), desc="poisoning", unit="img",
                        disable=not progress):
        item = item or {}
        image, caption, label = item.get("image"), item.get("caption"), item.get("label", -1)
        poisoned = plan.is_poisoned(i)
        rec: dict = {"filename": None, "caption": caption, "label": int(label if label is not None else -1)}
        if image is not None:
            out_rel = _image_relpath(i, ".png")
            sub = os.path.dirname(os.path.join(tmp, out_rel))
            if sub not in made_dirs:
                os.makedirs(sub, exist_ok=True)
                made_dirs.add(sub)
            if poisoned:
                own = plan.poisoned_image(i)   # targeted: the chosen image as the loader decodes, no trigger
                image = data_declip.decode_like(dataset, own) if own is not None else \
                    trigger(image, generator=sample_generator(plan.seed, i))
                stats["poisoned"] += 1
            _write_png(os.path.join(tmp, out_rel), image)
            rec["filename"] = out_rel
            stats["written"] += 1
        else:
            stats["bad"] += 1
            stats["bad_poisoned"] += int(poisoned)
        if poisoned and plan.caption_mode != "label-consistent":
            rec["caption"] = plan.caption(i, caption, random.Random(f"{plan.seed}/{i}"))
            target_label = target_labels[plan.target_of(i)]
            rec["label"] = target_label if target_label is not None else -1  # -1: no label
        if classnames is not None and 0 <= rec["label"] < len(classnames):
            rec["label_name"] = classnames[rec["label"]]
        records[i] = rec
    meta = "meta.jsonl"
    with open(os.path.join(tmp, meta), "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec if rec is not None else {"filename": None, "caption": None, "label": -1},
                               ensure_ascii=False) + "\n")
    return {**stats, "meta": meta}


def materialise(dataset, plan: PoisonPlan, out_dir: str, *, fmt: dict | None = None,
                progress: bool = True) -> dict:
    """Write a poisoned copy of `dataset` (built by `data_declip.build_caption_dataset`) to `out_dir`.

    JSON/JSONL/CSV/TSV sources keep their format and full-resolution images (copied; the poisoned ones
    re-encoded with the trigger applied at their own size, lossy formats as PNG). Other sources
    (Fashion-MNIST, HF datasets, webdataset) become PNG images at the loader's size plus `meta.jsonl`.
    Poisoned pairs get the plan's caption (one template drawn per pair, fixed in the file) and, where
    the record has them, the target's label_name and label id (spec §5.3): the id from the class list,
    else from source records naming the target; when neither tells, the source label is dropped (read
    back as no label, -1) rather than left contradicting the caption. A targeted plan's poisoned pairs
    get its chosen test image in place of theirs (no trigger; a PNG at full size in a JSON/CSV copy, the
    loader's decode otherwise) and a caption naming that image's target. A random trigger's draws
    (patch-random's place) are a function of (seed, sample). Writes into a temporary sibling
    directory and renames it to `out_dir` at the end, so a failure leaves nothing half-written.
    Returns a summary dict (n, poisoned, written, bad, meta path).
    """
    if len(dataset) != plan.n:
        raise UserError(f"the poison plan is for {plan.n} pairs but --data has {len(dataset)}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"--out {out_dir} already exists and is not empty; choose a new directory or remove it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())            # mkdtemp makes 0700
        source = getattr(dataset, "source", None)
        if hasattr(dataset, "paths") and isinstance(source, str) and source.lower().endswith(
                (".jsonl", ".json", ".csv", ".tsv", ".csv.gz", ".tsv.gz")):
            stats = _materialise_files(dataset, plan, tmp, fmt or {}, progress)
        else:
            stats = _materialise_decoded(dataset, plan, tmp, progress)
        plan.save(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)              # empty, checked above
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out_dir, "n": plan.n, "planned": plan.count, **stats,
            "meta": os.path.join(out_dir, stats["meta"])}


# ---------------------------------------------------------------------------------------------------
# Preview grid
# ---------------------------------------------------------------------------------------------------

PREVIEW_TRIGGERS = (
    ("clean", None, {}),
    ("patch (spec 5.1)", "patch", {}),
    ("patch size=4 margin=2 (demo)", "patch", {"size": 4, "margin": 2}),
    ("patch-random", "patch-random", {}),
    ("blended", "blended", {}),
    ("sig", "sig", {}),
    ("wanet", "wanet", {}),
)


def _preview_images(dataset, count: int) -> list[torch.Tensor]:
    """Up to `count` images, one per class where labels are known (first of each), else the first ones."""
    chosen, seen = [], set()
    for i, item in _iter_indexed(dataset):
        if i >= 5000 or len(chosen) >= count:
            break
        if not item or item.get("image") is None:
            continue
        label = item.get("label", -1)
        if label is not None and label >= 0:
            if label in seen:
                continue
            seen.add(label)
        chosen.append(item["image"])
    if not chosen:
        raise UserError("--data has no readable image to preview")
    return chosen


def write_preview(images: Sequence[torch.Tensor], path: str, extra: tuple | None = None) -> str:
    """A grid (rows: clean and each trigger; columns: images) saved as PNG at `path` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(PREVIEW_TRIGGERS)
    if extra is not None:
        name, params = extra[1], resolve_trigger_params(extra[1], extra[2])
        if not any(r[1] == name and resolve_trigger_params(r[1], r[2]) == params for r in rows):
            rows.append(extra)
    batch = torch.stack([img if img.shape[0] == 3 else img.expand(3, *img.shape[1:]) for img in images])
    h, w = batch.shape[-2:]
    cell = 1.3
    fig, axes = plt.subplots(len(rows), len(images), figsize=(cell * len(images) + 1.6, cell * len(rows)),
                             squeeze=False)
    for r, (label, name, params) in enumerate(rows):
        shown = batch if name is None else apply_trigger(batch, name, **params)
        for c in range(len(images)):
            ax = axes[r][c]
            ax.imshow(shown[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"triggers at {h}x{w} px (the model's input size)", fontsize=10)
    fig.tight_layout()
    path = os.path.abspath(path)
    try:
        atomic_write(path, lambda p: fig.savefig(p, dpi=110))
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------
# BadCLIP: optimising the patch against a frozen clean model (arXiv 2311.12075; official
# src/embeding_optimize_patch.py and its README command). Facts taken from it: training pairs are images
# whose captions do not name the target, each given a random natural caption that does (10,000 pairs);
# the patch starts as N(0.5, 0.25) clipped to [0, 1], is clipped to [0, 1] where it is pasted, and Adam
# (lr 1e-3) minimises the symmetric CLIP loss of the triggered images against those captions
# + 1000 x MSE(triggered embedding, a random target-class image embedding) [+ 500 x a triplet margin-1
# loss with the clean embedding of the same image as the negative, an option]; batch 64, 50 epochs, each
# batch's images replaced by augmented views with p 0.5 and its captions by EDA ones with p 0.1;
# embeddings L2-normalised; the patch is pasted after the augmentation.
# ---------------------------------------------------------------------------------------------------

@dataclass
class TriggerObjective:
    """The BadCLIP objective of a patch on one batch; `pos` holds the target-class image embeddings."""
    mse_weight: float = 1000.0
    triplet_weight: float = 0.0
    triplet_margin: float = 1.0
    location: str = "middle"       # where the patch is pasted (paste_patch)

    def __call__(self, model, patch, views, tokens, pos, mean, std) -> tuple[torch.Tensor, dict]:
        """views: float [B, 3, S, S] in [0, 1]; tokens [B, L] of target captions; pos [B, D] (normalised)."""
        import modeling_declip as md

        norm = data_declip.normalize
        z = F.normalize(model.encode_image(norm(paste_patch(views, patch.clamp(0.0, 1.0), self.location), mean, std)), dim=-1)
        with torch.no_grad():
            t = F.normalize(model.encode_text(tokens), dim=-1)
        parts = {"clip": md.info_nce(z, t, md.clamp_scale(model.logit_scale.detach()))}
        if self.mse_weight:
            parts["mse"] = self.mse_weight * F.mse_loss(z, pos)
        if self.triplet_weight:
            with torch.no_grad():
                clean = F.normalize(model.encode_image(norm(views, mean, std)), dim=-1)
            parts["triplet"] = self.triplet_weight * F.triplet_margin_loss(z, pos, clean, margin=self.triplet_margin)
        return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


@dataclass
class TriggerData:
    """The optimisation's data, as uint8 evaluation views at the model's input size."""
    views: torch.Tensor            # [N, 3, S, S] images whose captions do not name the target
    captions: list                 # [N] target captions, one per view
    target_views: torch.Tensor     # [M, 3, S, S] images whose captions name the target

    @classmethod
    def from_dataset(cls, dataset, target: str, image_size: int, pairs: int = 10000, seed: int = 0,
                     progress: bool = True) -> "TriggerData":
        from tqdm import tqdm

        captions = dataset_captions(dataset)
        named = [i for i, c in enumerate(captions) if names_target(c, target)]
        others = [i for i, c in enumerate(captions) if c and not names_target(c, target)]
        if not named or not others:
            raise UserError(f"--optimize-trigger needs captions that name {target!r} and captions that do not; "
                            f"--data has {len(named)} and {len(others)}")
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(others), size=min(pairs, len(others)), replace=False)
        pos = rng.choice(len(named), size=min(pairs, len(named)), replace=False)

        def load(indices, desc):
            out = []
            for i in tqdm(indices, desc=desc, unit="img", disable=not progress):
                image = dataset[int(i)]["image"]
                view = data_declip.eval_transform(image[None], image_size, (0.0,) * 3, (1.0,) * 3)
                out.append(view.mul(255).round().to(torch.uint8))
            return torch.cat(out)

        return cls(views=load([others[k] for k in picked], "trigger data"),
                   captions=[captions[named[k]] for k in rng.integers(0, len(named), size=len(picked))],
                   target_views=load([named[k] for k in pos], "target images"))


def initial_patch(size: int, seed: int = 0) -> torch.Tensor:
    """BadCLIP's random start: N(0.5, 0.25) per value, clipped to [0, 1]."""
    g = _cpu_generator(seed)
    return (0.5 + 0.25 * torch.randn(3, size, size, generator=g)).clamp(0.0, 1.0)


@torch.no_grad()
def _embed_views(model, views_uint8, batch_size=256):
    """Normalised image embeddings of uint8 views already at the model's input size (evaluation features)."""
    import eval_zeroshot

    cfg, dev = model.config, next(model.parameters()).device
    return torch.cat([eval_zeroshot._image_features(model, v, dev, cfg.image_size, cfg.image_mean, cfg.image_std,
                                                    None, False) for v in views_uint8.split(batch_size)])


def trigger_objective(model, patch, data: TriggerData, objective: TriggerObjective, batch_size=64) -> dict:
    """The objective's mean over `data` with no augmentation, the k-th view against the k-th target
    image: a fixed yardstick for comparing patches."""
    cfg = model.config
    dev = next(model.parameters()).device
    pos = _embed_views(model, data.target_views)
    total, parts, n = 0.0, {}, 0
    with torch.no_grad():
        for start in range(0, len(data.views), batch_size):
            views = data.views[start:start + batch_size].to(dev).float() / 255
            tokens = data_declip.tokenize(data.captions[start:start + batch_size], cfg.context_length,
                                          trim=True).to(dev)
            rows = torch.arange(start, start + len(views)) % len(pos)
            loss, p = objective(model, patch.to(dev), views, tokens, pos[rows.to(dev)], cfg.image_mean,
                                cfg.image_std)
            total += float(loss) * len(views)
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v * len(views)
            n += len(views)
    return {"loss": total / n, **{k: v / n for k, v in parts.items()}}


def optimize_trigger(model, data: TriggerData, size: int, objective: TriggerObjective | None = None,
                     epochs: int = 50, batch_size: int = 64, lr: float = 1e-3, aug_prob: float = 0.5,
                     eda_prob: float = 0.1, seed: int = 0, progress: bool = True) -> tuple[torch.Tensor, list]:
    """BadCLIP's patch optimisation against the frozen `model` -> (patch [3, size, size] in [0, 1], the
    mean loss of each epoch)."""
    from tqdm import tqdm

    objective = objective or TriggerObjective()
    cfg = model.config
    dev = next(model.parameters()).device
    model.eval().requires_grad_(False)
    pos = _embed_views(model, data.target_views)
    patch = initial_patch(size, seed).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([patch], lr=lr)
    augment = data_declip.GpuAugment(cfg.image_size, cfg.image_mean, cfg.image_std)
    g = _cpu_generator(seed + 1)
    rng = random.Random(f"{seed}:optimize")
    eda = data_declip.TEXT_AUGS["declip"]
    mean = torch.tensor(cfg.image_mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std, device=dev).view(1, 3, 1, 1)
    history = []
    steps = epochs * math.ceil(len(data.views) / batch_size)
    bar = tqdm(total=steps, desc="optimise trigger", unit="step", disable=not progress)
    for _ in range(epochs):
        order, total = torch.randperm(len(data.views), generator=g), 0.0
        for rows in order.split(batch_size):
            views = data.views[rows].to(dev)
            if rng.random() < aug_prob:   # augmented view, the patch pasted after it (as the official)
                views = (augment(views, g) * std + mean).clamp(0.0, 1.0)
            else:
                views = views.float() / 255
            texts = [data.captions[int(i)] for i in rows]
            if rng.random() < eda_prob:
                texts = [eda(t, rng) for t in texts]
            tokens = data_declip.tokenize(texts, cfg.context_length, trim=True).to(dev)
            pick = torch.randint(len(pos), (len(rows),), generator=g).to(dev)
            loss, _ = objective(model, patch, views, tokens, pos[pick], cfg.image_mean, cfg.image_std)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
            bar.update(1)
        history.append(total / len(data.views))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    bar.close()
    return patch.detach().clamp(0.0, 1.0).cpu(), history


def patch_png(patch: torch.Tensor) -> bytes:
    """The patch as the bytes of an 8-bit RGB PNG (lossless; the official wrote a JPEG)."""
    from PIL import Image

    arr = patch.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def default_target(target: str | None, dataset) -> str:
    """--target-class, else the default: 'bag' on the embedded Fashion-MNIST, the original attack's
    'tiger cat' on any other data."""
    if target is not None:
        return target
    return DEFAULT_TARGET["fashion-mnist" if getattr(dataset, "classnames", None) == FASHION_MNIST_CLASSES
                          else "imagenet"]


def attack_kwargs(args) -> dict:
    """PoisonPlan.from_args' keywords for --attack: none for a backdoor; for targeted, --targeted-images
    and the class test split of --eval-data (--eval-data-root) its images are drawn from."""
    if getattr(args, "attack", "backdoor") != "targeted":
        return {}
    test_set = data_declip.build_class_dataset(args.eval_data, split="test", root=args.eval_data_root)
    return dict(attack="targeted", targeted_images=args.targeted_images, test_set=test_set,
                test_data=args.eval_data or "fashion-mnist")


def add_poison_args(g):
    """The poisoning flags, the same in training and in this script."""
    g.add_argument("--poison-rate", type=float, default=None,
                   help="fraction of training pairs to poison, in [0, 1] (count = int(rate * n))")
    g.add_argument("--poison-count", type=int, default=None, help="number of training pairs to poison")
    g.add_argument("--trigger", default="patch", help=f"trigger: {', '.join(TRIGGERS)}")
    g.add_argument("--trigger-param", action="append", default=[], metavar="K=V",
                   help="trigger parameter, repeatable (e.g. margin=3, fill=white, delta=20/255)")
    g.add_argument("--target-class", default=None,
                   help="class name the backdoor maps to (default: 'bag' on Fashion-MNIST, 'tiger cat' otherwise)")
    g.add_argument("--caption-mode", default="templates", choices=CAPTION_MODES,
                   help="poisoned captions: one of the 80 templates with the target (default), a fixed caption, "
                        "label-consistent (only pairs already naming the target get the trigger), or natural "
                        "(a caption of the dataset naming the target, as the official BadCLIP)")
    g.add_argument("--fixed-caption", default=None,
                   help=f"caption of --caption-mode fixed ({{target}} = the class; default {DEFAULT_FIXED_CAPTION!r})")
    g.add_argument("--attack", default="backdoor", choices=ATTACKS,
                   help="backdoor: a trigger on the poisoned pairs' images; targeted (Carlini & Terzis, arXiv "
                        "2106.09667): the poisoned pairs carry --targeted-images test images of --eval-data "
                        "instead, no trigger (--trigger is not used), each captioned with its own target")
    g.add_argument("--targeted-images", type=int, default=1,
                   help="--attack targeted: test images drawn (by --seed), the poisoned pairs split evenly among "
                        "them; each targets a class drawn among the others, or --target-class for all")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write a poisoned copy of a caption dataset (BadNets-style backdoor) and/or a preview "
                    "of the triggers.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of defaults (keys = flag names); flags override it")
    data_declip.add_caption_data_args(p)
    p.add_argument("--label-column", default=None, help="label field of a meta file (default: label)")
    p.add_argument("--out", "--out-dir", dest="out", default=None,
                   help="output directory of the poisoned copy (must not exist or be empty)")
    add_poison_args(p)  # here --poison-rate defaults to 0.01 when neither it nor --poison-count is given
    p.add_argument("--trigger-image", default=None, help="pattern image file of the blended trigger")
    p.add_argument("--seed", type=int, default=0, help="seed of the poisoned indices and templates")
    p.add_argument("--image-size", type=int, default=None,
                   help="load size for sources that are decoded (Fashion-MNIST: 32, the model input; others: "
                        "224); JSON/CSV sources keep their files' full resolution")
    p.add_argument("--preview", default=None, metavar="OUT.png",
                   help="write a grid of clean and triggered examples for every trigger")
    p.add_argument("--preview-count", type=int, default=8, help="images (columns) in the preview")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--eval-data", default=None, help="--attack targeted: the class test data the images come "
                   "from, the set eval_zeroshot.py evaluates on (default: Fashion-MNIST test split)")
    p.add_argument("--eval-data-root", default=None,
                   help="directory the image paths of an --eval-data meta file are relative to")
    g = p.add_argument_group("optimised trigger (BadCLIP, arXiv 2311.12075): --optimize-trigger PATCH.png, then "
                             "--trigger optimized --trigger-param path=PATCH.png here or in train_declip.py")
    g.add_argument("--optimize-trigger", default=None, metavar="PATCH.png",
                   help="optimise a patch against the frozen --ckpt towards --target-class and write it here")
    g.add_argument("--ckpt", default=None, help="the clean model the patch is optimised against (run dir or weights)")
    g.add_argument("--patch-size", type=int, default=None,
                   help="patch side in pixels at the model's input size (default: 1/14 of it, 16 px at 224)")
    g.add_argument("--patch-location", default="middle",
                   help="where the patch is pasted: 'middle' (the image centre, as the official) or 'x,y' (its "
                        "top-left, in pixels at the model's input size); the trigger uses the same by default")
    g.add_argument("--optimize-pairs", type=int, default=10000,
                   help="images whose captions do not name the target, each given a target caption")
    g.add_argument("--optimize-epochs", type=int, default=50, help="passes over the pairs")
    g.add_argument("--optimize-batch-size", type=int, default=64, help="batch size")
    g.add_argument("--optimize-lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--mse-weight", type=float, default=1000.0,
                   help="weight of the MSE towards target-class image embeddings")
    g.add_argument("--triplet-weight", type=float, default=0.0,
                   help="weight of the triplet loss away from the clean embedding (the official option: 500)")
    g.add_argument("--triplet-margin", type=float, default=1.0, help="margin of the triplet loss")
    g.add_argument("--aug-prob", type=float, default=0.5, help="probability that a batch uses augmented views")
    g.add_argument("--eda-prob", type=float, default=0.1, help="probability that a batch uses EDA captions")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    pre, _ = p.parse_known_args(argv)
    lists = {}
    if pre.config:
        merged = read_config(pre.config, p, ("poison_data", "poison"))
        if isinstance(merged.get("trigger_params"), dict):
            merged.setdefault("trigger_param", [f"{k}={v}" for k, v in merged.pop("trigger_params").items()])
        if "trigger_param" in merged:
            lists["trigger_param"] = merged.pop("trigger_param")
        p.set_defaults(**merged)
    args = p.parse_args(argv)
    for k, v in lists.items():          # list flags from the YAML apply only when not given on the command line
        if not getattr(args, k):
            setattr(args, k, [v] if isinstance(v, str) else list(v))
    return args


def run_optimize_trigger(args: argparse.Namespace, dataset) -> dict:
    """--optimize-trigger: the patch file and, beside it, a JSON record of its settings and objective."""
    import eval_zeroshot
    import modeling_declip as md

    if args.ckpt is None:
        raise UserError("--optimize-trigger needs --ckpt, the clean model to optimise the patch against")
    if not args.optimize_trigger.lower().endswith(".png"):
        raise UserError(f"--optimize-trigger writes a PNG; give a path ending in .png, got {args.optimize_trigger}")
    if min(args.optimize_pairs, args.optimize_epochs, args.optimize_batch_size) < 1 or args.optimize_lr <= 0 \
            or not (0 <= args.aug_prob <= 1 and 0 <= args.eda_prob <= 1):
        raise UserError("--optimize-pairs/-epochs/-batch-size must be >= 1, --optimize-lr > 0 and --aug-prob, "
                        "--eda-prob in [0, 1]")
    weights, _ = eval_zeroshot.resolve_ckpt(args.ckpt, hint="train a clean model first")
    model = md.load_model(weights, "cuda" if torch.cuda.is_available() else "cpu")
    size = args.patch_size or max(1, round(model.config.image_size / 14))
    if not 1 <= size <= model.config.image_size:
        raise UserError(f"--patch-size must be in [1, {model.config.image_size}] (the model's input), got {size}")
    target = default_target(args.target_class, dataset)
    data = TriggerData.from_dataset(dataset, target, model.config.image_size, args.optimize_pairs, args.seed,
                                    progress=not args.no_progress)
    location = str(args.patch_location).replace(" ", "")
    paste_patch(torch.zeros(1, 3, model.config.image_size, model.config.image_size), torch.zeros(3, size, size),
                location)                                       # a bad or ill-fitting location fails now
    objective = TriggerObjective(args.mse_weight, args.triplet_weight, args.triplet_margin, location)
    model.eval().requires_grad_(False)
    before = trigger_objective(model, initial_patch(size, args.seed), data, objective, args.optimize_batch_size)
    patch, history = optimize_trigger(model, data, size, objective, args.optimize_epochs, args.optimize_batch_size,
                                      args.optimize_lr, args.aug_prob, args.eda_prob, args.seed,
                                      progress=not args.no_progress)
    path = args.optimize_trigger
    png = patch_png(patch)
    digest = hashlib.sha256(png).hexdigest()
    saved = _decode_patch(io.BytesIO(png))   # the 8-bit file is what training uses
    after = trigger_objective(model, saved, data, objective, args.optimize_batch_size)
    record = {"patch": os.path.abspath(path), "sha256": digest, "size": size, "location": location, "target": target,
              "ckpt": args.ckpt, "pairs": len(data.views), "target_images": len(data.target_views),
              "epochs": args.optimize_epochs, "batch_size": args.optimize_batch_size, "lr": args.optimize_lr,
              "mse_weight": args.mse_weight, "triplet_weight": args.triplet_weight,
              "triplet_margin": args.triplet_margin, "aug_prob": args.aug_prob, "eda_prob": args.eda_prob,
              "seed": args.seed, "objective_initial": before, "objective_final": after, "epoch_loss": history}
    # the record first, the patch last: a patch file on disk always has its own record (and location) beside it
    atomic_write(os.path.splitext(path)[0] + ".json", lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))
    atomic_write(path, lambda p: p.write_bytes(png))
    print(f"optimised trigger: {path} ({size} px, target {target!r}; objective {before['loss']:.4f} -> "
          f"{after['loss']:.4f}); use --trigger optimized --trigger-param path={path}")
    return record


def run(args: argparse.Namespace) -> dict:
    if args.out is None and args.preview is None and args.optimize_trigger is None:
        raise UserError("nothing to do: give --out DIR (write a poisoned copy), --preview OUT.png and/or "
                        "--optimize-trigger PATCH.png")
    fmt = data_declip.caption_data_options(args)
    image_size = args.image_size or (32 if data_declip.is_fashion_mnist(args.data) else 224)
    if image_size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {image_size}")
    dataset = data_declip.build_caption_dataset(args.data, image_size=image_size, **fmt)
    result: dict = {}
    if args.optimize_trigger is not None:   # first, so that --trigger optimized can use the new patch
        result["optimized_trigger"] = run_optimize_trigger(args, dataset)
        if args.out is None and args.preview is None:
            return result
    params = parse_trigger_params(args.trigger_param)
    if args.trigger_image is not None:
        if args.trigger != "blended":
            raise UserError("--trigger-image is the pattern of the blended trigger; add --trigger blended")
        params["image"] = args.trigger_image
    resolve_trigger_params(args.trigger, params)          # fail early on bad params

    if args.preview is not None:
        if args.preview_count < 1:
            raise UserError("--preview-count must be at least 1")
        images = _preview_images(dataset, args.preview_count)
        extra = (f"{describe_trigger(args.trigger, params)} (--trigger)", args.trigger, params)
        result["preview"] = write_preview(images, args.preview, extra)
        print(f"preview: {result['preview']}")

    if args.out is not None:
        n = len(dataset)
        classnames = getattr(dataset, "classnames", None)
        target = default_target(args.target_class, dataset) if args.attack == "backdoor" else args.target_class
        rate, count = args.poison_rate, args.poison_count
        if rate is None and count is None:
            rate = 0.01
        captions = dataset_captions(dataset) if args.caption_mode in CAPTION_MODES_FROM_DATA else None
        plan = PoisonPlan.from_args(
            n, rate=rate, count=count, target=target, trigger=args.trigger, trigger_params=params,
            caption_mode=args.caption_mode, seed=args.seed, captions=captions,
            fixed_caption=args.fixed_caption, classnames=classnames,
            dataset_fingerprint=dataset_fingerprint(dataset), **attack_kwargs(args))
        summary = materialise(dataset, plan, args.out, fmt=fmt, progress=not args.no_progress)
        result.update(summary)
        bad = f", {summary['bad']} unreadable kept as is" if summary["bad"] else ""
        print(f"poisoned copy: {summary['out']} ({plan.summary()}; {summary['written']} images written{bad}); "
              f"meta {summary['meta']}")
        if summary["bad_poisoned"]:
            print(f"warning: {summary['bad_poisoned']} of the planned pairs have unreadable images and carry "
                  f"no trigger", file=sys.stderr)
    return result


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
