"""Fine-tuning defenses: FT (spec §6.2) and CleanCLIP (Bansal et al., ICCV 2023).

    accelerate launch defend_finetune.py --ckpt runs/victim                       # FT -> runs/ft
    accelerate launch defend_finetune.py --ckpt runs/victim --method cleanclip    # -> runs/cleanclip

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
"""

from __future__ import annotations

import torch

import data_declip as dd
import modeling_declip as md
import train_declip as td

OUT = {"ft": "runs/ft", "cleanclip": "runs/cleanclip"}


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
        """CleanCLIP's processing of each (uint8, whole) image: shorter side resized to the model size,
        centre crop, normalised."""
        cfg = self.cfg
        return torch.cat([dd.eval_transform(x[None], cfg.image_size, cfg.image_mean, cfg.image_std) for x in images])

    def make_inputs(self, batch: dict, b: int, generator: torch.Generator, views) -> dict:
        dev = self.device
        canvas = batch["images"][:b].to(dev, non_blocking=True)
        images = [canvas[k, :, :h, :w] for k, (h, w) in enumerate(batch["sizes"][:b].tolist())]
        return dict(images=self.view(images), images2=self.view(self.augmented(images, generator)),
                    tokens=batch["tokens"][:b].to(dev, non_blocking=True),
                    tokens_aug=batch["tokens_aug"][:b].to(dev, non_blocking=True),
                    weights=self.weights, objective="cleanclip")


def build_parser():
    p = td.build_defense_parser(__doc__, out=None, lr=1e-4, epochs=10.0)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--method", choices=("ft", "cleanclip"), default="ft",
                   help="ft: the victim's training loss (default); cleanclip: CleanCLIP's multimodal + unimodal loss")
    g.add_argument("--clip-weight", type=float, default=1.0, help="CleanCLIP: weight of the multimodal InfoNCE")
    g.add_argument("--inmodal-weight", type=float, default=1.0,
                   help="CleanCLIP: weight of the unimodal term (L_img + L_txt) / 2")
    return p


def main(argv=None):
    args = td.parse_args(build_parser(), argv)
    if args.out_dir is None:
        args.out_dir = OUT[args.method]
    ext = CleanCLIP(args.clip_weight, args.inmodal_weight) if args.method == "cleanclip" else FineTune()
    return td.run_defense(args, ext)


if __name__ == "__main__":
    td.run_main(main)
