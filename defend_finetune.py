"""Fine-tuning defenses: FT (spec §6.2), CleanCLIP (Bansal et al., ICCV 2023) and PAR (Singh et al.,
arXiv 2412.00727).

    accelerate launch defend_finetune.py --ckpt runs/victim                       # FT -> runs/ft
    accelerate launch defend_finetune.py --ckpt runs/victim --method cleanclip    # -> runs/cleanclip
    accelerate launch defend_finetune.py --ckpt runs/victim --method par          # -> runs/par

FT continues training the poisoned model on a small clean set with the DeCLIP loss (or the victim's
--mode). CleanCLIP (as its official code, nishadsinghi/CleanCLIP src/train.py, computes it) replaces
the objective, whatever the victim's mode, by

    --clip-weight * L_cross + --inmodal-weight * (L_img + L_txt) / 2      (both weights 1 by default)

L_cross: the symmetric CLIP InfoNCE (halved) of the original images (resized and centre-cropped, no
random augmentation) and their unmasked captions; L_img: one-way InfoNCE of each image against its
AutoAugment copy (torchvision's ImageNet policy); L_txt: the same for each caption against its EDA copy
(one of synonym replacement, insertion, swap or deletion). The clean set is the victim's training data
minus its poisoned pairs (a random --clean-fraction), or --clean-data. Differences from the official
code: the EDA caption is drawn anew at each load (the official code draws it once per caption), and
the log logit scale keeps this loop's clamp (--logit-scale-min/max) instead of CleanCLIP's [0, ln 100].

PAR ("perturb and recover", official code nmndeep/PerturbAndRecover losses.py and train.py) trains,
whatever the victim's mode,

    L_CLIP - 0.5 * (D_img + D_txt),    D = mean_i ||e_i / |e_i| - f_i / |f_i| ||^2, set to 0 once D > --par-tau

e: the trained model's embeddings, f: those of a frozen copy of the victim (eval mode) on the same
inputs, means over the global batch; the image is resized and centre-cropped, then with p 0.5 gets
Gaussian noise (std 0.2, clipped to [0, 1] before it is added, as the official AddGaussianNoise does)
and, after normalisation, with p 0.5 a random square erased to 0 (0.5-1 % of the area); the caption
is used as it is. Difference from the official code: the logit scale trains, as everywhere in this
loop (the official code detaches it).
"""

from __future__ import annotations

import copy
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import data_declip as dd
import modeling_declip as md
import train_declip as td
from data_declip import run_main

OUT = {"ft": "runs/ft", "cleanclip": "runs/cleanclip", "par": "runs/par"}
PAR_TAU = 2.15  # official --loss-thresh


def whole_images(batch: dict, b: int, device) -> list:
    """The first b images of a batch as (uint8) tensors of their own sizes, not the padded canvas."""
    canvas = batch["images"][:b].to(device, non_blocking=True)
    return [canvas[k, :, :h, :w] for k, (h, w) in enumerate(batch["sizes"][:b].tolist())]


def resized_and_cropped(images, cfg, noise: Optional[Callable] = None) -> torch.Tensor:
    """Each (uint8, whole) image's shorter side resized to the model size, centre crop, `noise` on the
    [0, 1] image if given, normalised: the open_clip/CLIP processor CleanCLIP and PAR start from."""
    return torch.cat([dd.eval_transform(x[None], cfg.image_size, cfg.image_mean, cfg.image_std, trigger=noise)
                      for x in images])


class FineTune(td.Extension):
    """FT: the training loop as it is, on the clean set."""

    name = "ft"


class CleanCLIP(td.Extension):
    """CleanCLIP's views and objective (DeCLIP.forward objective "cleanclip") on the training loop."""

    name = "cleanclip"

    def __init__(self, clip_weight: float = 1.0, inmodal_weight: float = 1.0):
        self.weights = md.LossWeights(clip=clip_weight, ss=0.0, mlm=0.0, nn=0.0, inmodal=inmodal_weight)

    def loss_weights(self, args) -> md.LossWeights:
        return self.weights

    def record(self) -> dict:
        return {"clip_weight": self.weights.clip, "inmodal_weight": self.weights.inmodal}

    def text_aug(self, args):
        return dd.eda_cleanclip

    def setup(self, accelerator, model, args, dataset):
        from torchvision.transforms import AutoAugment, AutoAugmentPolicy

        self.cfg, self.device = model.config, accelerator.device
        self.autoaugment = AutoAugment(AutoAugmentPolicy.IMAGENET)

    def augmented(self, images, generator: torch.Generator) -> list:
        """AutoAugment each uint8 image on its own (one policy per image, as the official per-file
        augmentation), drawing from a seed taken from the step's generator."""
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return [self.autoaugment(x) for x in images]

    def view(self, images) -> torch.Tensor:
        return resized_and_cropped(images, self.cfg)

    def make_inputs(self, batch: dict, b: int, generator: torch.Generator, views) -> dict:
        dev = self.device
        images = whole_images(batch, b, dev)
        return dict(images=self.view(images), images2=self.view(self.augmented(images, generator)),
                    tokens=batch["tokens"][:b].to(dev, non_blocking=True),
                    tokens_aug=batch["tokens_aug"][:b].to(dev, non_blocking=True),
                    weights=self.weights, objective="cleanclip")


def par_distance(emb: torch.Tensor, ref: torch.Tensor, tau: float) -> torch.Tensor:
    """PAR's D: the squared distance of the normalised embeddings, summed over dimensions and averaged
    over the global batch, set to 0 (with no gradient) once it exceeds tau."""
    e = md.gather_features(F.normalize(emb.float(), dim=1))
    f = md.gather_features(F.normalize(ref.float(), dim=1), with_grad=False)
    d = (e - f).pow(2).sum(dim=1).mean()
    return torch.where(d > tau, torch.zeros_like(d), d)


class PAR(td.Extension):
    """PAR: the CLIP loss minus half the embedding drift from a frozen copy of the victim, each drift
    term dropped once it exceeds tau; the drift is measured on the student's own tapped embeddings."""

    name = "par"

    def __init__(self, tau: float = PAR_TAU):
        self.tau = tau

    def loss_weights(self, args) -> md.LossWeights:
        return md.LossWeights.clip_only()

    def text_aug(self, args):
        return None

    def setup(self, accelerator, model, args, dataset):
        from torchvision.transforms import RandomErasing

        self.cfg, self.device = model.config, accelerator.device
        self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        self.erase = RandomErasing(p=0.5, scale=(0.005, 0.01), ratio=(1.0, 1.0), value=0)

    def record(self) -> dict:
        return {"tau": self.tau, "drift_weight": 0.5}

    def augmented(self, images, generator: torch.Generator) -> torch.Tensor:
        """PAR's training view of each image, drawn from a seed taken from the step's generator."""
        def noise(x):
            if torch.rand(1) < 0.5:
                x = (x + (torch.randn(x.shape, device=x.device) * 0.2).clamp(0, 1)).clamp(0, 1)
            return x

        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return torch.stack([self.erase(x) for x in resized_and_cropped(images, self.cfg, noise)])

    def make_inputs(self, batch: dict, b: int, generator: torch.Generator, views) -> dict:
        return dict(images=self.augmented(whole_images(batch, b, self.device), generator),
                    tokens=batch["tokens"][:b].to(self.device, non_blocking=True), weights=self.loss_weights(None))

    def tap_names(self, model):
        return ["visual", "text"]

    def extra_loss(self, model, inputs: dict, taps) -> dict:
        with torch.no_grad():
            ref_img, ref_txt = self.frozen.encode_image(inputs["images"]), self.frozen.encode_text(inputs["tokens"])
        # two terms, so that each is logged: D_img = -2 * par_img
        return {"par_img": -0.5 * par_distance(taps["visual"][0], ref_img, self.tau),
                "par_txt": -0.5 * par_distance(taps["text"][0], ref_txt, self.tau)}


def build_parser():
    p = td.build_defense_parser(__doc__, out=None, lr=1e-4, epochs=10.0)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--method", choices=("ft", "cleanclip", "par"), default="ft",
                   help="ft: the victim's training loss (default); cleanclip: CleanCLIP's multimodal + unimodal "
                        "loss; par: CLIP loss minus the clamped drift from the frozen victim")
    g.add_argument("--clip-weight", type=float, default=1.0, help="CleanCLIP: weight of the multimodal InfoNCE")
    g.add_argument("--inmodal-weight", type=float, default=1.0,
                   help="CleanCLIP: weight of the unimodal term (L_img + L_txt) / 2")
    g.add_argument("--par-tau", type=float, default=PAR_TAU,
                   help="PAR: each drift term is dropped once it exceeds this (normalised embeddings: 0 to 4)")
    return p


def main(argv=None):
    args = td.parse_args(build_parser(), argv)
    if args.out_dir is None:
        args.out_dir = OUT[args.method]
    ext = {"ft": FineTune, "cleanclip": lambda: CleanCLIP(args.clip_weight, args.inmodal_weight),
           "par": lambda: PAR(args.par_tau)}[args.method]()
    return td.run_defense(args, ext)


if __name__ == "__main__":
    sys.exit(run_main(main))
