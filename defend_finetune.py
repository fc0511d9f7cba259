"""Fine-tuning defenses: FT (spec §6.2) and CleanCLIP (Bansal et al., ICCV 2023).

    accelerate launch defend_finetune.py --ckpt runs/victim                       # FT -> runs/ft
    accelerate launch defend_finetune.py --ckpt runs/victim --method cleanclip    # -> runs/cleanclip

FT continues training the poisoned model on a small clean set with the DeCLIP loss. CleanCLIP
replaces the objective by the multimodal InfoNCE plus unimodal self-supervision: image vs. its
second augmented view and caption vs. its EDA-augmented version, each an in-modal InfoNCE, which
weakens the spurious trigger-target alignment learnt from poisoned pairs. Both are the training
loop of train_declip.py with other loss weights; the clean set is the victim's training data
minus its poisoned pairs (a random --clean-fraction), or --clean-data.
"""

from __future__ import annotations

import train_declip as td

OUT = {"ft": "runs/ft", "cleanclip": "runs/cleanclip"}


class FineTune(td.Extension):
    def __init__(self, method: str):
        self.name = method


def build_parser():
    p = td.build_defense_parser(__doc__, out=None, lr=1e-4, epochs=10.0)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--method", choices=("ft", "cleanclip"), default="ft",
                   help="ft: the DeCLIP loss (default); cleanclip: multimodal + unimodal InfoNCE")
    g.add_argument("--w-img-inmodal", type=float, default=None,
                   help="CleanCLIP: weight of the image-image InfoNCE (default 1 with --method cleanclip)")
    g.add_argument("--w-txt-inmodal", type=float, default=None,
                   help="CleanCLIP: weight of the text-text InfoNCE (default 1 with --method cleanclip)")
    return p


def main(argv=None):
    args = td.parse_args(build_parser(), argv)
    if args.out_dir is None:
        args.out_dir = OUT[args.method]
    if args.method == "cleanclip":
        # CleanCLIP's objective: lambda1 * multimodal + lambda2 * unimodal, lambda1 = lambda2 = 1
        # (Bansal et al. 2023, section 4); the captions are not MLM-masked.
        args.w_clip, args.w_ss, args.w_mlm, args.w_nn = 1.0, 0.0, 0.0, 0.0
        args.w_img_inmodal = 1.0 if args.w_img_inmodal is None else args.w_img_inmodal
        args.w_txt_inmodal = 1.0 if args.w_txt_inmodal is None else args.w_txt_inmodal
    return td.run_defense(args, FineTune(args.method))


if __name__ == "__main__":
    td.run_main(main)
