"""Adaptive defense: adversarial views + attention distillation (the original study's "Ours-ADP", spec §6.4).

    accelerate launch defend_adaptive.py --ckpt runs/victim                    # teacher fine-tuned inline
    accelerate launch defend_adaptive.py --ckpt runs/victim --teacher runs/ft --adv-mode online

Three parts, on top of the training loop of train_declip.py:

(A) Adversarial images made with MI-FGSM against the frozen teacher (the FT model; same teacher flags
    as defend_nad.py) in eval mode, maximising the teacher's DeCLIP loss (no memory-bank update; the
    step's MLM and EDA text views as given; the NN term against the memory bank the teacher was trained
    with, read from its run's state/, or left out for a bare model file), on the normalised input. Per sample and channel,
    lb/ub = min/max of x0 over H x W, eps = --adv-eps (ub - lb), alpha = --adv-alpha (ub - lb); momentum
    --adv-decay, --adv-steps iterations; the gradient is divided by its mean |.| per sample. Only the
    input gets a gradient (the teacher's parameters have requires_grad False: spec §8 item 12).
    --adv-mode cache (default, like the original): one pass over the clean subset before training on each
    whole image resized to exactly S x S (aspect not kept, no augmentation); the images are stored as uint8
    in OUT/adv_cache.pt with their images' sizes, resized back to them (bicubic) and put through the same
    augmentation as clean images at every step. --adv-mode online: crafted each step on the current
    augmented views of the adversarial rows.
(B) CropResizeCorrupt views: random resized crop with area fraction s ~ U(0.2, 1), and for s > 0.6 with
    probability 0.3 Gaussian noise (sigma 0.08 or 0.12), then the MoCo-v2 colour/blur/flip ops.
(C) Each step appends --adv-rows adversarial rows (default half the batch) after the clean rows, each
    with its own image's captions, and trains with the DeCLIP loss plus the NAD term of defend_nad.py over
    all rows and both views. The adversarial copy and its clean image share a caption: by default the
    contrastive loss masks those pairs as false negatives (--keep-duplicate-negatives: the original's
    behaviour, where they are negatives for each other's caption).

Run directory: as training's (config.json, metrics.jsonl with the 'nad' term, model.safetensors, state/,
eval.json before/after), plus adv_cache.pt (cache mode) and teacher/ when the teacher is trained inline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from typing import Callable, List, Optional, Sequence

import torch

import data_declip as dd
import defend_nad as nad
import modeling_declip as md
import train_declip as td
from data_declip import UserError, run_main

DEFAULT_OUT = "runs/adaptive"
# MI-FGSM settings of the original's adversarial solver (spec §6.4 A, config_adv.yaml).
ADV_EPS, ADV_ALPHA, ADV_DECAY, ADV_STEPS = 0.0125, 0.05, 0.9, 5
# CropResizeCorrupt of the original's MOCOV2_ADP (spec §6.4 B): corrupt only crops with s > 0.6, with
# p 0.3; imagecorruptions' gaussian_noise sigma at severities 1 and 2.
CORRUPT_MIN_SCALE, CORRUPT_P, NOISE_SIGMAS = 0.6, 0.3, (0.08, 0.12)
CACHE_NAME = "adv_cache.pt"


# ----------------------------------------------------------------------------------------------
# (A) MI-FGSM


def mi_fgsm(loss_fn: Callable[..., torch.Tensor], views: Sequence[torch.Tensor], eps: float = ADV_EPS,
            alpha: float = ADV_ALPHA, decay: float = ADV_DECAY, steps: int = ADV_STEPS) -> List[torch.Tensor]:
    """Momentum iterative FGSM that maximises loss_fn(*views) (spec §6.4 A).

    views: normalised image batches (B, 3, H, W), attacked jointly as one (B, 3V, H, W) input like the
    original's 6-channel pair. Per sample and channel lb/ub = min/max of x0 over H x W; eps and alpha are
    fractions of (ub - lb). Each step: grad / mean|grad| over (C, H, W) per sample, g = grad + decay * g,
    x += alpha * sign(g), delta = clip(x - x0, -eps, eps), x = clip(x0 + delta, lb, ub). Only the input
    gets a gradient (parameters that require grad are left out of autograd.grad). Returns the views.
    """
    c = views[0].shape[1]
    x0 = torch.cat([v.detach().float() for v in views], dim=1)
    lb, ub = x0.amin(dim=(2, 3), keepdim=True), x0.amax(dim=(2, 3), keepdim=True)
    e, a = eps * (ub - lb), alpha * (ub - lb)
    x, g = x0.clone(), torch.zeros_like(x0)
    for _ in range(steps):
        x.requires_grad_(True)
        loss = loss_fn(*x.split(c, dim=1))
        (grad,) = torch.autograd.grad(loss, x)
        grad = grad.float()
        grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        g = grad + decay * g
        x = x.detach() + a * g.sign()
        delta = torch.maximum(torch.minimum(x - x0, e), -e)
        x = torch.minimum(torch.maximum(x0 + delta, lb), ub)
    return list(x.detach().split(c, dim=1))


def teacher_loss_fn(teacher: md.DeCLIP, inputs: dict, autocast=None,
                    weights: Optional[md.LossWeights] = None) -> Callable[..., torch.Tensor]:
    """The teacher's DeCLIP loss on given image views, with `inputs`' text views, MLM labels and ids,
    and `weights` (default: inputs'); eval mode and update_bank=False make it a deterministic function
    of the images."""
    kw = {k: v for k, v in inputs.items() if k not in ("images", "images2")}
    if weights is not None:
        kw["weights"] = weights

    def fn(*views):
        images2 = views[1] if len(views) > 1 else None
        with autocast() if autocast is not None else contextlib.nullcontext():
            return teacher(images=views[0], images2=images2, update_bank=False, **kw)["loss"].float()

    return fn


def to_uint8(adv: torch.Tensor, clean_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Store a normalised adversarial view of uint8 images as uint8: the perturbation in pixel levels is
    truncated toward zero, so the stored image stays within eps and [lb, ub] of the clean one (the
    original truncated the pixel values instead and then resized and JPEG-coded them: spec §8 item 11)."""
    m = torch.tensor(tuple(mean), device=adv.device).view(1, 3, 1, 1)
    s = torch.tensor(tuple(std), device=adv.device).view(1, 3, 1, 1)
    pix = (adv.float() * s + m) * 255.0
    delta = pix - clean_u8.to(adv.device).float()
    delta = torch.trunc(torch.round(delta * 1000.0) / 1000.0)
    return (clean_u8.to(adv.device).float() + delta).clamp_(0, 255).to(torch.uint8)


def _resize_each(images: Sequence[torch.Tensor], out_sizes: Sequence[tuple], mode: str) -> List[torch.Tensor]:
    """uint8 images [3,h,w] each resized to its out size (antialiased, as PIL), one call per pair of sizes."""
    out: List[Optional[torch.Tensor]] = [None] * len(images)
    groups: dict = {}
    for k, (im, hw) in enumerate(zip(images, out_sizes)):
        groups.setdefault((tuple(im.shape[-2:]), tuple(hw)), []).append(k)
    for (src, dst), rows in groups.items():
        x = torch.stack([images[k] for k in rows])
        if src != dst:
            x = torch.nn.functional.interpolate(x.float(), size=dst, mode=mode, antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        for k, im in zip(rows, x):
            out[k] = im
    return out


def resize_to_model(images: torch.Tensor, sizes: torch.Tensor, size: int) -> torch.Tensor:
    """The original's MOCOV2_ADV resize (spec §6.4 A): each whole image of a padded uint8 canvas (true
    (h, w) in `sizes`) to exactly size x size, aspect not kept (bilinear); size x size images are unchanged."""
    crops = [im[:, :h, :w] for im, (h, w) in zip(images, sizes.tolist())]
    return torch.stack(_resize_each(crops, [(size, size)] * len(crops), "bilinear"))


def resize_back(images: torch.Tensor, sizes: torch.Tensor) -> tuple:
    """Stored size x size adversarial images back at their images' sizes (spec §6.4 A: saved after a
    resize back to the original size; bicubic as PIL's default), padded into a canvas:
    -> (canvas uint8 [k,3,H,W], sizes [k,2]) as collate_pairs makes for clean images."""
    return dd.pad_images(_resize_each(list(images), [tuple(r) for r in sizes.tolist()], "bicubic"))


# ----------------------------------------------------------------------------------------------
# (B) CropResizeCorrupt


class CropResizeCorrupt(dd.GpuAugment):
    """MOCOV2_ADP views (spec §6.4 B) on the device: per image s ~ U(0.2, 1); RandomResizedCrop with
    area fraction in [s - 1e-4, s] and ratio (3/4, 4/3); only if s > 0.6, with p 0.3, Gaussian noise of
    sigma 0.08 or 0.12 (imagecorruptions gaussian_noise severity 1 or 2, uniform) clipped to [0, 1];
    then GpuAugment's trigger hook and MoCo-v2 ops (jitter, grayscale, blur, flip, normalize).
    Random numbers come from the call's generator (deterministic); `last_draw` keeps the last call's
    s, corruption mask and sigma for inspection."""

    def __init__(self, image_size: int, mean: Sequence[float] = dd.IMAGENET_MEAN, std: Sequence[float] = dd.IMAGENET_STD,
                 mocov2: bool = True, scale: tuple = (0.2, 1.0), corrupt_min_scale: float = CORRUPT_MIN_SCALE,
                 corrupt_p: float = CORRUPT_P, sigmas: Sequence[float] = NOISE_SIGMAS):
        super().__init__(image_size, mean, std, mocov2=mocov2, scale=scale)
        self.s_range = tuple(scale)
        self.corrupt_min_scale, self.corrupt_p, self.sigmas = corrupt_min_scale, corrupt_p, tuple(sigmas)
        self._noise = None
        self.last_draw: Optional[dict] = None

    def crop_boxes(self, b: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        gdev = generator.device
        s = self.s_range[0] + (self.s_range[1] - self.s_range[0]) * torch.rand(
            b, 1, generator=generator, device=gdev, dtype=torch.float64)
        # GpuAugment's box sampler with a per-image scale range [s - 1e-4, s] (broadcast over attempts)
        self.scale = (s - 1e-4, s)
        try:
            boxes = super().crop_boxes(b, height, width, generator)
        finally:
            self.scale = self.s_range
        s = s[:, 0]
        corrupt = (s > self.corrupt_min_scale) & (torch.rand(b, generator=generator, device=gdev) < self.corrupt_p)
        severity = torch.randint(len(self.sigmas), (b,), generator=generator, device=gdev)
        sigma = torch.tensor(self.sigmas, device=gdev, dtype=torch.float32)[severity]
        rows = corrupt.nonzero()[:, 0]
        noise = torch.randn(rows.numel(), 3, self.size, self.size, generator=generator, device=gdev)
        self._noise = (rows, noise * sigma[rows].view(-1, 1, 1, 1))
        self.last_draw = dict(s=s.float(), corrupt=corrupt, sigma=torch.where(corrupt, sigma, torch.zeros_like(sigma)))
        return boxes

    def crop(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        out = super().crop(x, boxes)
        if self._noise is not None:
            rows, noise = self._noise
            self._noise = None
            if rows.numel():
                rows = rows.to(out.device, non_blocking=True)
                noise = noise.to(out.device, out.dtype, non_blocking=True)
                out[rows] = (out[rows].clamp(0.0, 1.0) + noise).clamp_(0.0, 1.0)
        return out


# ----------------------------------------------------------------------------------------------
# (C) Training on clean + adversarial rows


def append_rows(inputs: dict, sel: torch.Tensor, adv_views: Sequence[torch.Tensor], index: torch.Tensor,
                mask_duplicates: bool = True) -> dict:
    """Append adversarial rows for the batch rows `sel`: image views, duplicated text views and MLM labels,
    and (mask_duplicates) ids = dataset indices, so each clean row and its adversarial copy are masked
    as false negatives in the contrastive loss."""
    out = dict(inputs)
    out["images"] = torch.cat([inputs["images"], adv_views[0].to(inputs["images"].dtype)])
    if inputs.get("images2") is not None:
        out["images2"] = torch.cat([inputs["images2"], adv_views[1].to(inputs["images2"].dtype)])
    for k in ("tokens", "tokens_aug", "mlm_labels"):
        if inputs.get(k) is not None:
            out[k] = torch.cat([inputs[k], inputs[k][sel]])
    if mask_duplicates:
        index = index.to(inputs["images"].device)
        out["ids"] = torch.cat([index, index[sel]])
    return out


class AdaptiveExtension(nad.NADExtension):
    name = "adaptive"

    def __init__(self, teacher_path: str, mode: str = "cache", adv_rows: Optional[int] = None,
                 eps: float = ADV_EPS, alpha: float = ADV_ALPHA, decay: float = ADV_DECAY, steps: int = ADV_STEPS,
                 mask_duplicates: bool = True, **nad_kw):
        super().__init__(teacher_path, **nad_kw)
        self.mode, self.adv_rows = mode, adv_rows
        self.attack = dict(eps=eps, alpha=alpha, decay=decay, steps=steps)
        self.mask_duplicates = mask_duplicates
        self.cache: Optional[torch.Tensor] = None
        self.cache_sizes: Optional[torch.Tensor] = None  # each cached image's training-decode (h, w)
        self.autocast = None

    def setup(self, accelerator, model, args, dataset):
        super().setup(accelerator, model, args, dataset)
        cfg = model.config
        self.augment = CropResizeCorrupt(cfg.image_size, cfg.image_mean, cfg.image_std)
        self.cfg, self.autocast = cfg, accelerator.autocast
        self.attack_weights, bank_source = self._attack_weights(args)
        if accelerator.is_main_process:
            print(f"adaptive: the attack's nearest-neighbour term: {bank_source}")
        self.bank_source = bank_source
        if self.mode == "cache":
            self.cache, self.cache_sizes = self._load_or_build_cache(accelerator, args, dataset)

    def record(self) -> dict:
        return {**super().record(), "mode": self.mode, **self.attack, "mask_duplicates": self.mask_duplicates,
                "attack_nn_bank": self.bank_source}

    def _attack_weights(self, args):
        """The attacked loss's weights and where its NN term's memory bank comes from: the bank the
        teacher was trained with (its run's state/), or, for a bare model file, no NN term (a model file
        holds no bank, and a random one would make the term noise)."""
        weights = self.loss_weights(args)
        if weights.nn == 0:
            return weights, "off (not in the objective)"
        bank = td.read_memory_bank(self.teacher_path)
        if bank is not None and bank["bank"].shape == self.teacher.nn_bank.bank.shape:
            self.teacher.nn_bank.load_bank_state(bank)
            return weights, f"the teacher's trained memory bank ({td.state_dir(os.path.dirname(os.path.abspath(self.teacher_path)))})"
        return dataclasses.replace(weights, nn=0.0), \
            f"left out: {self.teacher_path} has no run state with its memory bank beside it"

    # -- the cache pass (before training)
    def _cache_meta(self, args, n: int) -> dict:
        return {"teacher": os.path.abspath(self.teacher_path), "n": n, "seed": args.seed, **self.attack,
                "image_size": self.cfg.image_size, "mode": args.mode}

    def _load_or_build_cache(self, accelerator, args, dataset) -> tuple:
        """Adversarial copies of the defense's training pairs (dataset), in its order, and their images'
        sizes."""
        path = os.path.join(args.out_dir, CACHE_NAME)
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise UserError("--adv-mode cache needs map-style clean data (streamed webdataset shards cannot be "
                            "indexed); use --adv-mode online or convert the data")
        meta = self._cache_meta(args, len(dataset))
        if args.resume and os.path.isfile(path):
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if saved.get("meta") == meta and "sizes" in saved:
                return saved["images"], saved["sizes"]
        images, sizes = self.build_cache(accelerator, args, dataset)
        if accelerator.is_main_process:
            dd.atomic_write(path, lambda p: torch.save({"images": images, "sizes": sizes, "meta": meta}, p))
        accelerator.wait_for_everyone()
        return images, sizes

    def build_cache(self, accelerator, args, subset) -> tuple:
        """One pass over the training pairs before training: each process crafts an equal share in batches
        of --batch-size, and every batch is gathered, so each process holds all images (uint8, n x 3 x S x S
        bytes in CPU memory). As the original (spec §6.4 A) each whole image is resized to exactly S x S
        (aspect not kept) and attacked without augmentation; the S x S result is stored with the image's
        size, and resized back to it when used (resize_back). -> (images, sizes [n,2])."""
        from tqdm.auto import tqdm

        device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
        cfg, declip = self.cfg, args.mode == "declip"
        weights = self.attack_weights
        pairs = dd.TrainPairs(subset, seed=args.seed, context_length=cfg.context_length, eda=self.text_aug(args))
        n = len(pairs)
        per = -(-n // world)
        order = torch.arange(per * world) % n  # padded so every process crafts equally many
        images = torch.zeros(n, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
        sizes = torch.full((n, 2), cfg.image_size, dtype=torch.long)
        bs = args.batch_size
        starts = range(0, per, bs)
        for c, start in enumerate(tqdm(starts, disable=not accelerator.is_main_process, desc="adversarial cache")):
            rows = [order[r * per + start:r * per + min(start + bs, per)] for r in range(world)]
            items = [pairs[int(i)] for i in rows[rank]]
            good = [it for it in items if it is not None]
            # an unreadable sample is never trained on; a stand-in keeps the batch size equal on all processes
            filler = good[0] if good else dict(image=torch.zeros(3, cfg.image_size, cfg.image_size, dtype=torch.uint8),
                                               text="a photo", text_aug="a photo", index=-1, poisoned=False)
            batch = dd.collate_pairs([it if it is not None else filler for it in items],
                                     context_length=cfg.context_length)
            hw = batch["sizes"].to(device)
            imgs = resize_to_model(batch["images"].to(device), hw, cfg.image_size)
            x0 = dd.eval_transform(imgs, cfg.image_size, cfg.image_mean, cfg.image_std)
            g = torch.Generator(device=device).manual_seed(dd._int_seed(args.seed, "adv-cache", c, rank))
            inputs = dict(tokens=batch["tokens"].to(device), weights=weights)
            if declip:
                inputs["tokens_aug"] = batch["tokens_aug"].to(device)
                if weights.mlm > 0:
                    inputs["tokens"], inputs["mlm_labels"] = dd.mask_tokens(inputs["tokens"], g, args.mlm_prob)
            views = [x0, x0] if declip else [x0]  # the original's two identical eval views; view 1 is kept
            adv = mi_fgsm(teacher_loss_fn(self.teacher, inputs, self.autocast, weights), views, **self.attack)[0]
            u8 = to_uint8(adv, imgs, cfg.image_mean, cfg.image_std)
            if world > 1:
                u8, hw = accelerator.gather(u8), accelerator.gather(hw)
            images[torch.cat(rows)] = u8.cpu()
            sizes[torch.cat(rows)] = hw.cpu()
        return images, sizes

    # -- each step
    def extend_batch(self, inputs: dict, batch: dict, generator: torch.Generator) -> dict:
        b = inputs["images"].shape[0]
        k = b // 2 if self.adv_rows is None else min(self.adv_rows, b)  # equal on every process (equal b)
        if k <= 0:
            return inputs
        # rows are selected and appended below: the masked positions the loop found no longer apply,
        # so DeCLIP.forward finds them again from the labels
        inputs = {key: v for key, v in inputs.items() if key != "mlm_index"}
        sel = torch.randperm(b, generator=generator, device=generator.device)[:k].to(inputs["images"].device)
        index = batch["index"][:b]
        if self.mode == "cache":
            if int(index.max()) >= len(self.cache):
                raise RuntimeError(f"batch index {int(index.max())} outside the adversarial cache of {len(self.cache)} "
                                   f"images: the cache was built for another training subset")
            rows = index[sel.cpu()].cpu()
            adv_u8, hw = resize_back(self.cache[rows].to(inputs["images"].device), self.cache_sizes[rows])
            views = [self.augment(adv_u8, generator, sizes=hw)]
            if inputs.get("images2") is not None:
                views.append(self.augment(adv_u8, generator, sizes=hw))
        else:
            sub = {key: (v[sel] if torch.is_tensor(v) else v) for key, v in inputs.items()}
            clean = [sub[key] for key in ("images", "images2") if sub.get(key) is not None]
            views = mi_fgsm(teacher_loss_fn(self.teacher, sub, self.autocast, self.attack_weights), clean,
                            **self.attack)
        return append_rows(inputs, sel, views, index, self.mask_duplicates)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = td.build_defense_parser(__doc__, out=DEFAULT_OUT)
    nad.add_teacher_args(p)
    nad.add_nad_args(p)
    g = p.add_argument_group("adversarial views")
    g.add_argument("--adv-mode", choices=("cache", "online"), default="cache",
                   help="cache: craft once per image before training on the eval view and augment the stored "
                        "images each step (the original); online: craft on the current augmented views each step")
    g.add_argument("--adv-rows", type=int, default=None,
                   help="adversarial rows appended to each batch (default: half the batch, as the original)")
    g.add_argument("--adv-eps", type=float, default=ADV_EPS,
                   help="perturbation bound as a fraction of each image channel's range (default 0.0125)")
    g.add_argument("--adv-alpha", type=float, default=ADV_ALPHA,
                   help="MI-FGSM step size as a fraction of each image channel's range (default 0.05)")
    g.add_argument("--adv-decay", type=float, default=ADV_DECAY, help="MI-FGSM momentum decay (default 0.9)")
    g.add_argument("--adv-steps", type=int, default=ADV_STEPS, help="MI-FGSM iterations (default 5)")
    g.add_argument("--keep-duplicate-negatives", action="store_true",
                   help="do not mask an adversarial copy and its clean image as false negatives of each other's "
                        "caption (the original's behaviour, spec §6.4 C)")
    return p


def check_args(args):
    if args.adv_rows is not None and args.adv_rows < 0:
        raise UserError(f"--adv-rows must be 0 or more, got {args.adv_rows}")
    if args.adv_steps < 1 or args.adv_eps < 0 or args.adv_alpha < 0 or args.adv_decay < 0:
        raise UserError("--adv-steps must be at least 1 and --adv-eps, --adv-alpha, --adv-decay non-negative")
    nad.check_args(args)


def main(argv=None):
    args = td.parse_args(build_parser(), argv)
    check_args(args)
    betas = nad.parse_betas(args.nad_betas)
    teacher = nad.prepare_teacher(args)
    ext = AdaptiveExtension(teacher, mode=args.adv_mode, adv_rows=args.adv_rows, eps=args.adv_eps,
                            alpha=args.adv_alpha, decay=args.adv_decay, steps=args.adv_steps,
                            mask_duplicates=not args.keep_duplicate_negatives, layers=args.nad_layers,
                            betas=betas, betas_original=args.betas_original, power=args.nad_power)
    return td.run_defense(args, ext)


if __name__ == "__main__":
    sys.exit(run_main(main))
