"""RoCLIP (Yang et al., "Robust contrastive language-image pretraining against data poisoning and
backdoor attacks", NeurIPS 2023, arXiv 2303.06854): pretrain on the poisoned data, but every
--break-epoch-th pass match each image with the nearest caption of a pool of recent captions instead of
its own, so that a poisoned image never meets its poisoned caption as the positive.

    accelerate launch defend_roclip.py --config configs/tiny_victim.yaml --init-from runs/clean/model.safetensors \\
        --poison-rate 0.01 --trigger patch --target-class bag --out-dir runs/roclip

It takes the victim's own command (the same data, poisoning, recipe and seed) and replaces the victim's
objective by RoCLIP's, as the official code (BigML-CS-UCLA/RoCLIP, src/train.py and memory_bank.py)
computes it:

- a FIFO pool of normalised caption embeddings (official size 21,845 for 1M pairs; by default here the
  same share of the training pairs, --pool-size to set it);
- on passes e (counted from 1) with e % --break-epoch == 0 (default 2): each image's positive is the pool
  caption nearest to the image (cosine, queried before this batch's captions are pushed; a caption of the
  same training pair never counts), InfoNCE both ways between the images and these captions; the text
  tower gets no gradient on these passes; on the other passes the plain CLIP loss;
- RoCLIP's augmentations on every pass: the image through RandomResizedCrop (scale 0.08-1), ColorJitter
  (0.5, 0.5, 0.5, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur always, flip; the caption replaced by
  one random EDA operation of it.

Differences from the official code: the pool is pushed on every step, so that it is full when the first
RoCLIP pass begins (the official pool is pushed only on RoCLIP passes and starts from random vectors);
the EDA caption is drawn anew at each load (the official one once per caption); the log logit scale
keeps this loop's clamp. DeCLIP's own nearest-neighbour term (spec §1.6) is the opposite use of the same
structure: it adds the nearest caption to the caption as an extra positive of the image, where RoCLIP
takes the image's own caption away on the RoCLIP passes.
"""

from __future__ import annotations

import math
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import data_declip as dd
import modeling_declip as md
import train_declip as td
from data_declip import run_main

DEFAULT_OUT = "runs/roclip"
OFFICIAL_POOL, OFFICIAL_PAIRS = 21845, 1_000_000  # official --memory_bank_size, for its 1M CC3M pairs


class CaptionPool(nn.Module):
    """FIFO pool of normalised caption embeddings with the training-pair index of each, so that a
    query never returns a caption of the querying pair. Buffers are checkpointed (exact resume)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # -1: empty slot
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.n_filled = 0  # on the host, so that asking each step costs no device synchronisation

    def load_state_dict(self, state_dict, strict: bool = True):
        out = super().load_state_dict(state_dict, strict)
        self.n_filled = int((self.ids >= 0).sum())  # once, on resume
        return out

    @torch.no_grad()
    def query(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The stored embedding nearest (cosine) to each row of q among the filled slots whose pair is
        not the row's own; rows [N, D] in, [N, D] out."""
        sim = F.normalize(q.float(), dim=1) @ self.bank.t()
        mask = (self.ids[None, :] < 0) | (self.ids[None, :] == ids.to(self.ids.device)[:, None])
        return self.bank[sim.masked_fill(mask, float("-inf")).argmax(dim=1)]

    @torch.no_grad()
    def push(self, x: torch.Tensor, ids: torch.Tensor):
        size = self.bank.shape[0]
        x, ids = F.normalize(x.detach().float(), dim=1)[-size:], ids[-size:]
        slots = (self.ptr + torch.arange(x.shape[0], device=x.device)) % size
        self.bank[slots], self.ids[slots] = x, ids.to(self.ids.device)
        self.ptr.copy_((self.ptr + x.shape[0]) % size)
        self.n_filled = min(size, self.n_filled + x.shape[0])

    def filled(self) -> int:
        return self.n_filled


def default_pool_size(n_train: int, global_batch: int) -> int:
    """The official pool's share of the training pairs, and at least one global batch."""
    return max(global_batch, math.ceil(OFFICIAL_POOL * n_train / OFFICIAL_PAIRS))


def is_roclip_pass(epoch: int, break_epoch: int) -> bool:
    """Official rule: pass e (from 1) uses the pool when e % break_epoch == 0."""
    return (epoch + 1) % break_epoch == 0


class RoCLIP(td.Extension):
    """RoCLIP's views and objective on the training loop: the plain CLIP term (weight 1, or 0 on RoCLIP
    passes, where it stays in the graph so that every parameter gets a gradient, as the official code's
    `0 * loss` does) plus the pool term on RoCLIP passes."""

    name = "roclip"

    def __init__(self, break_epoch: int = 2, pool_size: int = 0):
        self.break_epoch, self.pool_size = break_epoch, pool_size
        self.off = md.LossWeights(clip=0.0, ss=0.0, mlm=0.0, nn=0.0)

    def loss_weights(self, args) -> md.LossWeights:
        return md.LossWeights.clip_only()

    def text_aug(self, args):
        return dd.eda_cleanclip  # one random EDA operation, as RoCLIP's utils/augment_text.py

    def setup(self, accelerator, model, args, dataset):
        cfg = model.config
        world = accelerator.num_processes
        self.pool_size = self.pool_size or default_pool_size(len(dataset), args.batch_size * world)
        self.pool = CaptionPool(self.pool_size, cfg.embed_dim).to(accelerator.device)
        accelerator.register_for_checkpointing(self.pool)
        self.device, self.roclip_step = accelerator.device, False
        self.augment = dd.GpuAugment(cfg.image_size, cfg.image_mean, cfg.image_std, **dd.ROCLIP_VIEW)

    def record(self) -> dict:
        return {"break_epoch": self.break_epoch, "pool_size": self.pool_size, "pool_pushed": "every step"}

    def make_inputs(self, batch: dict, b: int, generator: torch.Generator, views) -> dict:
        inputs = views(batch, b, generator)
        inputs["tokens"] = batch["tokens_aug"][:b].to(self.device, non_blocking=True)  # the EDA caption
        self.ids = batch["index"][:b].to(self.device, non_blocking=True)
        # the pass of the step's first pair (a batch straddling two passes belongs to the earlier one), read
        # from the collated host int: batch["epoch"] sits on the accelerator, where reading it syncs every step
        self.roclip_step = is_roclip_pass(batch["first_epoch"], self.break_epoch)
        if self.roclip_step and self.pool.filled():
            inputs["weights"] = self.off
        else:
            self.roclip_step = False
        return inputs

    def tap_names(self, model) -> List[str]:
        return ["visual", "text"]

    def extra_loss(self, model, inputs: dict, taps) -> Dict[str, torch.Tensor]:
        ids = md.gather_features(self.ids, with_grad=False)
        image = F.normalize(taps["visual"][0], dim=1)
        term = torch.zeros((), device=image.device)
        if self.roclip_step:
            nearest = self.pool.query(image.detach(), self.ids).to(image.dtype)  # before the push
            term = md.info_nce(image, nearest, md.clamp_scale(model.logit_scale).squeeze())
        self.pool.push(md.gather_features(taps["text"][0].detach(), with_grad=False), ids)
        return {"roclip": term}


def build_parser():
    p = td.build_parser(__doc__, out=DEFAULT_OUT)
    g = p.add_argument_group("RoCLIP")
    g.add_argument("--break-epoch", type=int, default=2,
                   help="every this many passes (counted from 1), match images with pool captions")
    g.add_argument("--pool-size", type=int, default=0,
                   help=f"captions in the pool (default: {OFFICIAL_POOL:,} per {OFFICIAL_PAIRS:,} training pairs, "
                        f"at least one global batch)")
    return p


def main(argv=None):
    args = td.parse_args(build_parser(), argv)
    if args.break_epoch < 1 or args.pool_size < 0:
        raise td.UserError("--break-epoch must be at least 1 and --pool-size not negative")
    if args.mode != "clip":
        print(f"roclip: trains RoCLIP's CLIP-based objective; --mode {args.mode} of the recipe is not used")
        args.mode = "clip"
    return td.train(args, RoCLIP(args.break_epoch, args.pool_size))


if __name__ == "__main__":
    sys.exit(run_main(main))
