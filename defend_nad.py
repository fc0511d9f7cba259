"""Neural Attention Distillation (NAD; Li et al., ICLR 2021) against a backdoored DeCLIP model.

    accelerate launch defend_nad.py --ckpt runs/victim                      # teacher fine-tuned inline
    accelerate launch defend_nad.py --ckpt runs/victim --teacher runs/ft    # an existing FT model as teacher
    accelerate launch defend_nad.py --ckpt runs/victim --betas-original     # the original study's weights

The student is the victim, trained on the defender's clean subset with the DeCLIP loss plus the
attention-transfer term (spec §6.3):

    NAD = sum over tapped layers l of  beta_l * sum over image views v of  MSE(A(student_l,v), A(teacher_l,v))
    A(F) = sum_c |F_c|^p over channels, divided per sample by its Frobenius norm over H x W (+ 1e-6)

on every ResNet stage (or every ViT block, tokens as the spatial axis without the class token). The
teacher (`--teacher CKPT`, or the victim fine-tuned inline for `--teacher-steps` on the same clean
subset into OUT/teacher, i.e. the FT defense) is frozen: eval mode (BatchNorm running statistics),
no gradient, never updated. It sees the same augmented tensors as the student.

Run directory: as training's (config.json, metrics.jsonl with the 'nad' term, model.safetensors,
state/, eval.json with clean accuracy and ASR before and after), plus teacher/ when trained inline.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import eval_zeroshot as ez
import modeling_declip as md
import train_declip as td
from data_declip import UserError, is_main_env, run_main

DEFAULT_OUT = "runs/nad"
# NAD's own defaults (bboylyg/NAD config: beta1=500 low, beta2=1000 middle, beta3=1000 high, p=2):
# the first tapped layer gets the "low" weight, every later one the middle/high weight.
NAD_BETA_LOW, NAD_BETA_HIGH = 500.0, 1000.0
NAD_POWER = 2.0
# The original study: beta 1 per layer and view, the term not divided by its 4 GPUs while the DeCLIP
# loss was, i.e. weight 4 on one process with the global batch (spec §6.3, §8 item 9).
ORIGINAL_BETA = 4.0


# ----------------------------------------------------------------------------------------------
# Attention transfer


def attention_map(feat: torch.Tensor, p: float = NAD_POWER, eps: float = 1e-6) -> torch.Tensor:
    """Spatial attention of an activation: sum_c |F_c|^p, divided per sample by its Frobenius norm
    over the spatial positions plus eps (spec §6.3). feat: (B, C, H, W) from a ResNet stage, or
    (B, N, C) from a ViT block (the N-1 patch tokens are the positions; the class token is dropped).
    Returns float32 (B, positions)."""
    feat = feat.float()
    if feat.dim() == 4:
        a = feat.abs().pow(p).sum(dim=1).flatten(1)
    elif feat.dim() == 3:
        a = feat[:, 1:].abs().pow(p).sum(dim=2)
    else:
        raise ValueError(f"attention_map expects (B, C, H, W) or (B, N, C) features, got shape {tuple(feat.shape)}")
    return a / (a.norm(dim=1, keepdim=True) + eps)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = NAD_POWER) -> torch.Tensor:
    """MSE between the two attention maps, mean over batch and positions."""
    s, t = attention_map(student, p), attention_map(teacher, p)
    if s.shape != t.shape:
        raise UserError(f"the teacher's attention map has shape {tuple(t.shape)} but the student's "
                        f"{tuple(s.shape)}; give a --teacher with the victim's image tower")
    return F.mse_loss(s, t.detach())


def nad_loss(student: Dict[str, Sequence[torch.Tensor]], teacher: Dict[str, Sequence[torch.Tensor]],
             betas: Dict[str, float], p: float = NAD_POWER) -> torch.Tensor:
    """sum_l beta_l * sum_v MSE(A(student[l][v]), A(teacher[l][v])) over the layers in `betas`
    (each value a list of per-view activations, as `DeCLIP.tap` records them)."""
    total = None
    for name, beta in betas.items():
        s_views, t_views = student[name], teacher[name]
        if len(s_views) != len(t_views):
            raise ValueError(f"{name}: {len(s_views)} student views but {len(t_views)} teacher views")
        for s, t in zip(s_views, t_views):
            term = beta * at_loss(s, t, p)
            total = term if total is None else total + term
    if total is None:
        raise ValueError("nad_loss needs at least one layer")
    return total


# ----------------------------------------------------------------------------------------------
# Teacher


def load_teacher(path: str, device) -> md.DeCLIP:
    """A frozen teacher: eval mode (BatchNorm running statistics, no memory-bank updates), every
    parameter with requires_grad False, so no parameter gradient is ever computed for it."""
    teacher = md.load_model(path, device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def teacher_features(teacher: md.DeCLIP, views: Sequence[torch.Tensor], names: Sequence[str]) -> Dict[str, List[torch.Tensor]]:
    """The teacher's activations at `names` for each image view (list per name, in view order)."""
    with teacher.tap(names) as taps:
        for v in views:
            teacher.encode_image(v)
    return {k: list(v) for k, v in taps.items()}


def resolve_layers(model: md.DeCLIP, spec: Optional[Sequence[str]]) -> List[str]:
    """Module names to tap: the model's defaults (ResNet layer1..4, every ViT block), or `spec`,
    where 'layer3' means 'visual.layer3' and an integer k means ViT block k."""
    if not spec:
        return model.default_tap_names()
    modules = dict(model.named_modules())
    names = []
    for item in spec:
        for s in str(item).split(","):
            s = s.strip()
            if not s:
                continue
            if s.isdigit():
                name = f"visual.transformer.resblocks.{s}"
            elif s.startswith("layer"):
                name = f"visual.{s}"
            else:
                name = s
            if name not in modules:
                raise UserError(f"--nad-layers: the model has no module {name!r}; use e.g. "
                                f"{', '.join(model.default_tap_names())}")
            names.append(name)
    return names


def parse_betas(text: Optional[str]) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--nad-betas {text!r} is not a comma list of numbers (e.g. 500,1000,1000,1000)") from None
    if not vals or any(v < 0 for v in vals):
        raise UserError(f"--nad-betas {text!r} needs non-negative numbers")
    return vals


def resolve_betas(layers: Sequence[str], betas: Optional[Sequence[float]], original: bool = False) -> Dict[str, float]:
    """Per-layer weights: `betas` (one value for all layers, or one per layer), the original's
    effective 4 per layer, or NAD's defaults (500 for the first layer, 1000 for the others)."""
    if original:
        return {n: ORIGINAL_BETA for n in layers}
    if betas is None:
        return {n: (NAD_BETA_LOW if i == 0 else NAD_BETA_HIGH) for i, n in enumerate(layers)}
    if len(betas) == 1:
        return {n: float(betas[0]) for n in layers}
    if len(betas) != len(layers):
        raise UserError(f"--nad-betas has {len(betas)} values but {len(layers)} layers are distilled "
                        f"({', '.join(layers)}); give one value per layer or a single value")
    return {n: float(b) for n, b in zip(layers, betas)}


def add_teacher_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", default=None, metavar="CKPT",
                   help="the teacher: a run directory or checkpoint in any supported format (the original used "
                        "the FT defense's model); default: fine-tune the victim inline into OUT/teacher")
    g.add_argument("--teacher-steps", type=int, default=None,
                   help="steps of the inline FT teacher on the same clean subset (default: half of this run's "
                        "steps, as the original's 1001-step FT teacher for its 2001-step NAD run, spec §6.2-6.3)")


def add_nad_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("attention distillation")
    g.add_argument("--nad-layers", nargs="+", default=None, metavar="LAYER",
                   help="modules to distil: 'layer1'..'layer4' (ResNet stages), ViT block numbers, or full module "
                        "names (default: every ResNet stage, or every ViT block; at 32 px the tiny ResNet's layer4 "
                        "map is 1x1, whose normalised attention is always 1, so its term is zero)")
    g.add_argument("--nad-betas", default=None, metavar="B1,B2,...",
                   help=f"per-layer weights, one per layer or one for all (default: {NAD_BETA_LOW:g} for the first "
                        f"layer, {NAD_BETA_HIGH:g} for the others: the NAD paper's CIFAR-10 values)")
    g.add_argument("--betas-original", action="store_true",
                   help=f"reproduce the original study's effective weights: beta 1 per layer and view with the term "
                        f"not divided by its 4 GPUs while the DeCLIP loss was, i.e. beta {ORIGINAL_BETA:g} for every "
                        f"layer on one process with the global batch (spec §6.3, §8 item 9); over 100x smaller "
                        f"than NAD's betas")
    g.add_argument("--nad-power", type=float, default=NAD_POWER, help="power p of the attention map (default 2)")


def teacher_run_args(args: argparse.Namespace) -> argparse.Namespace:
    """Flags of the inline FT teacher: this run's flags, into OUT/teacher, for --teacher-steps."""
    targs = copy.deepcopy(args)
    targs.out_dir = os.path.join(args.out_dir, "teacher")
    if args.teacher_steps is not None:
        targs.max_steps = args.teacher_steps
    elif args.max_steps is not None:
        targs.max_steps = max(1, args.max_steps // 2)
    else:
        targs.epochs = args.epochs / 2
    targs.report_to = None
    return targs


def prepare_teacher(args: argparse.Namespace) -> str:
    """The teacher's checkpoint path: --teacher, or the inline FT teacher (trained now unless
    OUT/teacher already holds it; a stopped one is continued; --overwrite trains it again)."""
    if args.teacher:
        path = args.teacher
        if os.path.isdir(path):
            path = md.checkpoint_file(path) or os.path.join(path, "model.safetensors")
        if not os.path.isfile(path):
            raise UserError(f"--teacher {args.teacher} does not exist; give a checkpoint or run directory, "
                            f"or leave it out to fine-tune a teacher inline")
        return path
    if args.teacher_steps is not None and args.teacher_steps < 1:
        raise UserError(f"--teacher-steps must be at least 1, got {args.teacher_steps}")
    targs = teacher_run_args(args)
    path = os.path.join(targs.out_dir, "model.safetensors")
    if os.path.isfile(path) and not args.overwrite:
        if is_main_env():
            print(f"teacher: using {path}")
        return path
    started = any(os.path.isdir(os.path.join(targs.out_dir, s)) for s in ("state", "state.old"))
    targs.resume = bool(started and not os.path.isfile(path) and not args.overwrite)  # a stopped teacher continues
    teacher_ext = td.Extension()
    teacher_ext.name = "teacher (FT)"
    td.run_defense(targs, teacher_ext, before=False)  # the victim's "before" is this run's
    return path


# ----------------------------------------------------------------------------------------------
# The extension


class NADExtension(td.Extension):
    """The NAD term as a training-loop extension: student taps via `tap_names`, teacher taps on the
    same image tensors in `extra_loss`, returned as {'nad': term}."""

    name = "nad"

    def __init__(self, teacher_path: str, layers: Optional[Sequence[str]] = None,
                 betas: Optional[Sequence[float]] = None, betas_original: bool = False, power: float = NAD_POWER):
        self.teacher_path, self.layer_spec, self.beta_list = teacher_path, layers, betas
        self.betas_original, self.power = betas_original, power
        self.teacher: Optional[md.DeCLIP] = None
        self.betas: Dict[str, float] = {}

    def setup(self, accelerator, model, args, dataset):
        self.teacher = load_teacher(self.teacher_path, accelerator.device)
        layers = resolve_layers(model, self.layer_spec)
        missing = [n for n in layers if n not in dict(self.teacher.named_modules())]
        if missing:
            raise UserError(f"--teacher {self.teacher_path} has no module {missing[0]!r}; give a teacher with the "
                            f"victim's image tower")
        self.betas = resolve_betas(layers, self.beta_list, self.betas_original)

    def record(self) -> dict:
        return {"teacher": self.teacher_path, "betas": self.betas, "power": self.power}

    def tap_names(self, model) -> List[str]:
        return [n for n, b in self.betas.items() if b != 0]

    def extra_loss(self, model, inputs: dict, taps: Dict[str, List[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        betas = {n: b for n, b in self.betas.items() if b != 0}
        if not betas:
            return {}
        views = [v for v in (inputs["images"], inputs.get("images2")) if v is not None]
        teacher = teacher_features(self.teacher, views, list(betas))
        student = {n: taps[n][:len(views)] for n in betas}
        return {"nad": nad_loss(student, teacher, betas, self.power)}


def build_parser() -> argparse.ArgumentParser:
    p = td.build_defense_parser(__doc__, out=DEFAULT_OUT)
    add_teacher_args(p)
    add_nad_args(p)
    return p


def check_args(args: argparse.Namespace):
    """Flag errors found before any work is done (the run directory is checked as train() will)."""
    if args.betas_original and args.nad_betas is not None:
        raise UserError("give either --nad-betas or --betas-original, not both")
    if args.nad_power <= 0:
        raise UserError(f"--nad-power must be positive, got {args.nad_power}")
    if args.teacher and args.teacher_steps is not None:
        raise UserError("give either --teacher (an existing teacher) or --teacher-steps (train one inline), not both")
    betas = parse_betas(args.nad_betas)
    if args.nad_layers and betas is not None and len(betas) > 1:
        n = len([s for item in args.nad_layers for s in str(item).split(",") if s.strip()])
        if n != len(betas):
            raise UserError(f"--nad-betas has {len(betas)} values for the {n} --nad-layers; give one per layer")
    ez.resolve_ckpt(args.ckpt, hint="train the victim first: make victim")
    if is_main_env() and os.path.isdir(args.out_dir):
        td.prepare_run_dir(args)  # a finished run without --overwrite fails here, before the teacher is trained


def main(argv=None):
    args = td.parse_args(build_parser(), argv)
    check_args(args)
    betas = parse_betas(args.nad_betas)
    teacher = prepare_teacher(args)
    ext = NADExtension(teacher, layers=args.nad_layers, betas=betas, betas_original=args.betas_original,
                       power=args.nad_power)
    return td.run_defense(args, ext)


if __name__ == "__main__":
    sys.exit(run_main(main))
