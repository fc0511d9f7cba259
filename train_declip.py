"""DeCLIP (or CLIP) pretraining with HF Accelerate, optionally on backdoor-poisoned data.

    accelerate launch train_declip.py                          # tiny DeCLIP on Fashion-MNIST -> runs/train
    accelerate launch train_declip.py --poison-rate 0.01 --trigger patch --target-class bag
    accelerate launch train_declip.py --config configs/rn50_yfcc15m.yaml --data meta.jsonl --data-root imgs/ \\
        --init-from r50_declip.pth.tar

The loop here is the one every defense reuses: `train(args, extension)` runs init -> data -> model ->
optimizer -> steps, and a defense passes an `Extension` that adds loss terms, extra views or a
teacher. Run directory: config.json, metrics.jsonl, model.safetensors, state/ (exact resume),
poison_manifest.json when poisoned.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

import data_declip as dd
import eval_zeroshot as ez
import modeling_declip as md
import poison_data as pdata
from data_declip import Preempted, UserError

DEFAULT_OUT = "runs/train"


# ----------------------------------------------------------------------------------------------
# Arguments: shared flags are defined once here and mean the same in every script


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"model preset: {', '.join(md.PRESETS)} (default: tiny; with --init-from, the checkpoint's "
                        f"architecture, which must match the preset when one is given)")
    g.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from these weights (ours, official DeCLIP .pth.tar, OpenAI .pt, open_clip); "
                        "the architecture comes from the checkpoint")
    g.add_argument("--init-optimizer", action="store_true",
                   help="also start AdamW from --init-from's moments, as the original attack did (spec §4.5): those of "
                        "an official DeCLIP .pth.tar, or of the run whose state/ is beside our model file "
                        "(default: fresh moments)")
    g.add_argument("--activation", choices=md.ACTIVATIONS, default=None,
                   help="MLP activation: of a fresh model (default quick_gelu), or of a bare state dict given as a "
                        "checkpoint, which cannot say it (default: quick_gelu, with a note; open_clip's non-quickgelu "
                        "models need gelu); a checkpoint that says its activation keeps it")
    g.add_argument("--mode", choices=("declip", "clip"), default="declip",
                   help="declip: 2 image x 2 text views + SimSiam + MLM + NN; clip: one view each, InfoNCE only")
    g.add_argument("--w-clip", type=float, default=0.4, help="weight of the (multi-view) CLIP InfoNCE term")
    g.add_argument("--w-ss", type=float, default=0.2, help="weight of the image SimSiam term")
    g.add_argument("--w-mlm", type=float, default=0.2, help="weight of the text MLM term")
    g.add_argument("--w-nn", type=float, default=0.2, help="weight of the nearest-neighbour InfoNCE term")
    g.add_argument("--mlm-prob", type=float, default=0.15, help="MLM masking probability per token")
    g.add_argument("--no-eda", action="store_true", help="use the caption itself as the second text view")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute Transformer blocks in backward")


def add_data_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("data")
    dd.add_caption_data_args(g)
    g.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop when more than this fraction of the samples seen are unreadable or uncaptioned")
    g.add_argument("--holdout", type=int, default=0,
                   help="hold out the last N training pairs (never trained on) and evaluate on them instead "
                        "of the test split: tune recipes on this, never on the test split")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, 6 on GPU)")
    g.add_argument("--exclude-indices", default=None, metavar="FILE",
                   help="never train on these pairs (a file of dataset indices, one per line, e.g. detect_poison.py's "
                        "flagged.txt): the 'detect, then train clean' defense (default: none)")


def add_optim_args(p: argparse.ArgumentParser, lr: float = 1e-3):
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256, help="batch per process (global = x processes x accum)")
    g.add_argument("--epochs", type=float, default=2.0, help="passes over the training pairs")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of the run)")
    g.add_argument("--warmup-init-lr", type=float, default=0.0, help="learning rate at step 0 of the warm-up")
    g.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the cosine schedule (default: this run's steps)")
    g.add_argument("--start-step", type=int, default=0,
                   help="schedule position of the first step (the original continued the official checkpoint "
                        "at step 118000 of a 138001-step schedule: spec §4.5)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    g.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2")
    g.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--logit-scale-min", type=float, default=3.0, help="clamp of the raw log logit scale (spec §2.6)")
    g.add_argument("--logit-scale-max", type=float, default=6.0, help="clamp of the raw log logit scale (spec §2.6)")


def add_run_args(p: argparse.ArgumentParser, out: str = DEFAULT_OUT):
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, help="YAML file of flag defaults (keys as flag names); flags override it")
    g.add_argument("--out-dir", default=out, help=f"run directory (default: {out})")
    g.add_argument("--seed", type=int, default=0, help="seed for the poison set, data order, augmentation, EDA, init")
    g.add_argument("--resume", action="store_true", help="continue the stopped run in --out-dir exactly")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --out-dir")
    g.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="mixed precision; auto: bf16 on a GPU and on a CPU that computes bf16 natively "
                        "(avx512_bf16 / amx_bf16), else no (fp32); config.json records the one used")
    g.add_argument("--log-every", type=int, default=20, help="log to metrics.jsonl every N steps")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint state/ every N steps (0 = only at the end)")
    g.add_argument("--eval-every", type=int, default=0, help="zero-shot evaluation every N steps (0 = at the end only)")
    g.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation at the end")
    g.add_argument("--eval-data", default=None, help="class dataset for evaluation (default: Fashion-MNIST test split)")
    g.add_argument("--eval-data-root", default=None,
                   help="directory the image paths of an --eval-data meta file are relative to (eval_zeroshot.py's "
                        "--data-root)")
    g.add_argument("--eval-bf16", action="store_true",
                   help="evaluate with bf16 autocast instead of fp32 (as eval_zeroshot.py --eval-bf16); the "
                        "training --precision never changes the evaluation")
    g.add_argument("--templates", default="80", help="prompt templates for zero-shot evaluation: 1, 8, 80 or a file")
    g.add_argument("--report-to", default=None, choices=("tensorboard", "wandb"),
                   help="also log every metrics row to a tracker (needs `pip install tensorboard` or `wandb`); "
                        "TensorBoard files go under OUT/<run name>/")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format for the ResNet (default: on; on the CPU too, where oneDNN's "
                        "convolutions run faster in it: tiny DeCLIP step +7 %% fp32, +10 %% bf16)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")


def build_parser(description: str = __doc__, out: str = DEFAULT_OUT, lr: float = 1e-3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p)
    pdata.add_poison_args(p.add_argument_group("poisoning"))
    add_optim_args(p, lr=lr)
    add_run_args(p, out=out)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags; a --config YAML supplies defaults that explicit flags override."""
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**dd.read_config(pre.config, parser, strict=True))
    args = parser.parse_args(argv)
    if getattr(args, "model", None) is not None and args.model not in md.PRESETS:
        raise UserError(f"--model {args.model!r} is not a preset; choose one of: {', '.join(md.PRESETS)}")
    return args


# ----------------------------------------------------------------------------------------------
# The defense interface


class Extension:
    """What a defense adds to the training loop, without copying it.

    - `loss_weights(args)`: the objective's weights (default: DeCLIP's from the flags, or CLIP mode's).
    - `text_aug(args)`: the function making each item's second caption view (default: DeCLIP's EDA in
      DeCLIP mode, none in CLIP mode).
    - `setup(accelerator, model, args, dataset)`: after the model is prepared (build a teacher, caches);
      dataset: the training pairs' dataset (a defense's clean subset).
    - `tap_names(model)`: student activations to record during the loss forward (e.g. ResNet stages).
    - `augment`: replace the MoCo-v2 GpuAugment (e.g. the adaptive defense's CropResizeCorrupt views).
    - `make_inputs(batch, b, generator, views)`: the DeCLIP.forward keyword arguments of a step;
      `views(batch, b, generator)` builds the loop's own (MoCo-v2 image views, MLM-masked caption).
    - `extend_batch(inputs, batch, generator)`: change the model inputs (e.g. append adversarial rows).
    - `extra_loss(model, inputs, taps)`: weighted terms added to the loss, returned by name.
    - `record()`: the defense's settings, written to config.json as resolved.defense_settings.
    """

    name = "train"
    augment = None

    def loss_weights(self, args) -> md.LossWeights:
        if args.mode != "declip":
            return md.LossWeights.clip_only()
        return md.LossWeights(clip=args.w_clip, ss=args.w_ss, mlm=args.w_mlm, nn=args.w_nn)

    def text_aug(self, args) -> Optional[Callable]:
        return dd.eda if args.mode == "declip" and not args.no_eda else None

    def setup(self, accelerator, model, args, dataset):
        pass

    def tap_names(self, model) -> List[str]:
        return []

    def make_inputs(self, batch: dict, b: int, generator: torch.Generator, views: Callable) -> dict:
        return views(batch, b, generator)

    def extend_batch(self, inputs: dict, batch: dict, generator: torch.Generator) -> dict:
        return inputs

    def extra_loss(self, model, inputs: dict, taps: Dict[str, List[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        return {}

    def record(self) -> dict:
        return {}


# ----------------------------------------------------------------------------------------------
# Pieces of the loop


def lr_at(step: int, args, total: int) -> float:
    """Linear warm-up from --warmup-init-lr to --lr, then cosine to --min-lr, at schedule position step."""
    sched = args.schedule_steps or (args.start_step + total)
    warm = args.warmup_steps if args.warmup_steps is not None else max(1, int(0.05 * sched))
    if step < warm:
        return args.warmup_init_lr + (args.lr - args.warmup_init_lr) * step / warm
    t = min(1.0, (step - warm) / max(1, sched - warm))
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def tracker_scalars(row: dict, prefix: str = "") -> Dict[str, float]:
    """The numbers of a metrics row for TensorBoard / W&B, nested keys joined by '/'
    ({'eval': {'clean': {'top1': 87.5}}} -> {'eval/clean/top1': 87.5}); the step is the x axis."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(tracker_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            out[prefix + k] = v
    return out


def host_group():
    """A process group for small host-side collectives: the default group when it is gloo (CPU),
    else a gloo group beside NCCL, so that agreeing on a number does not wait for the GPU."""
    import torch.distributed as dist

    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def agree_on_batch(b: int, n_bad: int, group=None) -> tuple:
    """(smallest local batch, bad samples of all processes) for this step: bad samples make local
    batches shorter, and every process must contribute equal rows to the contrastive batch. One
    collective on CPU tensors, so the step has no host synchronisation with the GPU."""
    import torch.distributed as dist

    parts = [torch.zeros(2, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, torch.tensor([b, n_bad]), group=group)
    table = torch.stack(parts)
    return int(table[:, 0].min()), int(table[:, 1].sum())


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 natively (x86 avx512_bf16 or amx_bf16). On an AVX2-only CPU
    PyTorch emulates bf16 matmuls and convolutions: a tiny DeCLIP step took 48 s instead of 1.9 s in
    fp32 on a 2-core AMD EPYC. True where it cannot tell (not Linux, not x86)."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return True
    flags = set(" ".join(line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")).split())
    return not flags or bool(flags & {"avx512_bf16", "amx_bf16"})


def keep_freed_cpu_memory() -> bool:
    """Make glibc serve every allocation from its heap and keep freed memory for reuse.

    By default glibc maps each block above 32 MiB afresh and unmaps it when freed, so every large
    tensor of a CPU training step (the MLM logits over 49,409 classes, the contrastive batch's
    activations) page-faults in zeroed memory again: a third of a tiny DeCLIP step here. With
    M_MMAP_MAX = 0 and no trimming the step reuses the same pages: +15-20 % CLIP and +20-60 % DeCLIP
    training images/s on this 2-core machine (bench_declip.py --default-malloc shows the difference).
    The price is that the process keeps its peak memory until it exits. Linux with glibc only; a
    no-op elsewhere or under another allocator. Returns whether glibc took the settings."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))


def use_available_cores(device) -> Optional[int]:
    """On the CPU, let torch use this process's share of the machine's cores when a launcher left it
    at one thread; returns the thread count set, or None when nothing changed.

    `accelerate launch` exports OMP_NUM_THREADS=1 unless given --num_cpu_threads_per_process (and
    torchrun does with several processes), so a plain `accelerate launch train_declip.py` on a CPU
    would train on one core. Under a launcher (its ACCELERATE_MIXED_PRECISION or LOCAL_WORLD_SIZE
    variable is set), a process at one thread gets the cores it may run on (sched_getaffinity)
    divided by the processes on this machine (LOCAL_WORLD_SIZE). Any other count is the user's and
    kept; an explicit 1 under a launcher cannot be told from the default (README, At scale)."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() != 1:
        return None
    if "ACCELERATE_MIXED_PRECISION" not in os.environ and "LOCAL_WORLD_SIZE" not in os.environ:
        return None  # started without a launcher: OMP_NUM_THREADS=1 was set by the user
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if share <= 1:
        return None
    torch.set_num_threads(share)
    return share


def use_cpu(requested: bool) -> bool:
    """The Accelerator's cpu flag: --cpu (or ACCELERATE_USE_CPU), or a process of a multi-process
    launch that finds no accelerator. `accelerate launch` does not hand a config's use_cpu to the
    processes it starts through torchrun (configs/accelerate/cpu_2proc.yaml), and Accelerate then
    makes each of them a separate one-process run (distributed type NO) in the same run directory;
    told cpu=True they form one gloo group instead."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, parse_flag_from_env

    if requested or parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if PartialState().distributed_type != DistributedType.NO:  # a GPU group (or an earlier train())
        return False
    PartialState._reset_state()  # without a backend nothing was initialised
    return True


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """Augmentation and masking randomness of one step: a function of (seed, step, rank) only,
    so a resumed run draws exactly what the uninterrupted run drew. The loop draws on the CPU
    (device "cpu"): the same views and masks on every device, and no GPU synchronisation."""
    g = torch.Generator(device=device)
    g.manual_seed(dd._int_seed(seed, "step", step, rank))
    return g


class RunState:
    """Loop counters and the NN memory bank, checkpointed with accelerator.save_state."""

    def __init__(self, model):
        self.model = model
        self.step = 0
        self.seen = 0
        self.bad = 0
        self.elapsed = 0.0
        self.param_names: List[str] = []

    def state_dict(self):
        return {"step": self.step, "seen": self.seen, "bad": self.bad, "elapsed": self.elapsed,
                "param_names": self.param_names,  # names of the optimizer's parameters, in its order
                **{"bank_" + k: v for k, v in self.model.nn_bank.bank_state().items()}}

    def load_state_dict(self, sd):
        self.step, self.seen, self.bad, self.elapsed = int(sd["step"]), int(sd["seen"]), int(sd["bad"]), float(sd["elapsed"])
        self.model.nn_bank.load_bank_state({"bank": sd["bank_bank"], "ptr": sd["bank_ptr"]})


def check_bad_fraction(run, args):
    if run.bad > args.max_bad_fraction * (run.seen + run.bad):
        raise UserError(f"{run.bad} of {run.seen + run.bad} training samples were unreadable or had no caption, "
                        f"more than --max-bad-fraction {args.max_bad_fraction}; fix the data or raise the fraction")


class Stop(Exception):
    """Raised inside the loop to end the run early on a fault (non-finite loss)."""


def resolve_target(args, base) -> Optional[str]:
    classnames = getattr(base, "classnames", None)
    target = pdata.default_target(args.target_class, base)
    if classnames and target not in classnames:
        raise UserError(f"--target-class {target!r} is not a class of this dataset; choose one of: {', '.join(classnames)}")
    return target


def make_poison_plan(args, base, n_train: int) -> Optional["pdata.PoisonPlan"]:
    targeted = getattr(args, "attack", "backdoor") == "targeted"
    if args.poison_rate is None and args.poison_count is None:
        if targeted:
            raise UserError("--attack targeted needs --poison-rate or --poison-count: the number of poisoned "
                            "pairs (the copies of its test images)")
        return None
    if args.poison_rate is not None and args.poison_count is not None:
        raise UserError("give either --poison-rate or --poison-count, not both")
    captions = None
    if args.caption_mode in pdata.CAPTION_MODES_FROM_DATA:
        captions = pdata.dataset_captions(base)[:n_train]
    if targeted and args.holdout:
        raise UserError("--attack targeted draws its images from the class test split (--eval-data), which is "
                        "what the run evaluates on; drop --holdout")
    return pdata.PoisonPlan.from_args(
        n_train, rate=args.poison_rate, count=args.poison_count,
        target=args.target_class if targeted else resolve_target(args, base),
        trigger=args.trigger, trigger_params=pdata.parse_trigger_params(args.trigger_param),
        caption_mode=args.caption_mode, seed=args.seed, captions=captions, fixed_caption=args.fixed_caption,
        classnames=getattr(base, "classnames", None), dataset_fingerprint=pdata.dataset_fingerprint(base),
        **pdata.attack_kwargs(args))


def resumed_plan(args, plan):
    """A resumed targeted run trains on the images its run directory holds (poison_target_*.png): the plan
    drawn again from the flags must be the saved one, test images, targets and pixels alike."""
    if plan is None or plan.attack != "targeted" or not args.resume:
        return plan
    saved = pdata.PoisonPlan.from_manifest(args.out_dir)
    if saved.to_manifest() != plan.to_manifest():
        raise UserError(f"--resume: the targeted-poisoning plan drawn from these flags differs from "
                        f"{os.path.join(args.out_dir, pdata.MANIFEST_NAME)} (other --seed, --eval-data or test "
                        f"images?); resume with the run's own flags")
    saved.target_images()  # read and checked against the manifest's pixels_sha256 now, not in a worker
    return saved


def read_index_file(path: str, n: int) -> set:
    """The dataset indices in `path` (whitespace-separated integers; '#' starts a comment), each in [0, n)."""
    try:
        with open(path) as f:
            words = [w for line in f for w in line.split("#", 1)[0].split()]
        indices = [int(w) for w in words]
    except OSError as e:
        raise UserError(f"--exclude-indices {path}: cannot read it ({e.strerror}); give a file of indices") from None
    except ValueError as e:
        raise UserError(f"--exclude-indices {path}: not a list of integer indices ({e})") from None
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise UserError(f"--exclude-indices {path}: index {bad[0]} is outside the {n} training pairs [0, {n}); "
                        f"give the flagged list of this --data (and --holdout)")
    return set(indices)


class _SubsetPlan:
    """A poison plan seen through a subset: position j of the subset is dataset index keep[j]."""

    def __init__(self, plan, keep: Sequence[int]):
        self.plan, self.keep = plan, list(keep)

    def is_poisoned(self, j: int) -> bool:
        return self.plan.is_poisoned(self.keep[j])

    def caption(self, j: int, caption, rng=None):
        return self.plan.caption(self.keep[j], caption, rng)

    def poisoned_image(self, j: int):
        return self.plan.poisoned_image(self.keep[j])


def prepare_run_dir(args):
    out = args.out_dir
    finished = os.path.exists(os.path.join(out, "model.safetensors"))
    started = os.path.isdir(os.path.join(out, "state")) or os.path.isdir(os.path.join(out, "state.old"))
    if args.resume:
        if not started:
            raise UserError(f"--resume: {out} holds no checkpoint state to resume from")
        if finished:
            raise UserError(f"--resume: the run in {out} already finished; use --overwrite to train it again")
        return
    if (finished or started) and not args.overwrite:
        what = "a finished run" if finished else "a stopped run (continue it with --resume)"
        raise UserError(f"--out-dir {out} already holds {what}; pass --overwrite to replace it")
    if args.overwrite and os.path.isdir(out):
        for name in ("state", "state.old", "state.tmp", "model.safetensors", "metrics.jsonl",
                     "config.json", "poison_manifest.json", "eval.json", "summary.json", ez.EVAL_CACHE_DIR):
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)


def save_state(accelerator, out_dir: str):
    """accelerator.save_state into state.tmp, then swap it in: a kill mid-write never corrupts the
    latest complete state (state.old stays until the new one is in place)."""
    tmp, cur, old = (os.path.join(out_dir, n) for n in ("state.tmp", "state", "state.old"))
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(cur):
            if os.path.isdir(old):
                shutil.rmtree(old)
            os.replace(cur, old)
        os.replace(tmp, cur)
        if os.path.isdir(old):
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def state_dir(out_dir: str) -> str:
    cur = os.path.join(out_dir, "state")
    return cur if os.path.isdir(cur) else os.path.join(out_dir, "state.old")


def optimizer_param_names(model, opt) -> List[str]:
    """The names of an optimizer's parameters, in its state-dict order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def init_optimizer_state(opt, names: Sequence[str], source: str) -> str:
    """Start AdamW from the moments of `source` (--init-optimizer): an official DeCLIP .pth.tar, or our
    model file whose run's state/ is beside it. Parameters are matched by name; those the source has no
    state for start fresh. Returns a one-line description."""
    source = md.checkpoint_file(source) or source
    if source.endswith(".safetensors"):
        d = state_dir(os.path.dirname(os.path.abspath(source)))
        run_path, opt_path = os.path.join(d, "custom_checkpoint_0.pkl"), os.path.join(d, "optimizer.bin")
        if not (os.path.isfile(run_path) and os.path.isfile(opt_path)):
            raise UserError(f"--init-optimizer: no run state (state/optimizer.bin) beside {source}; drop the flag "
                            f"to start with fresh moments")
        saved_names = torch.load(run_path, map_location="cpu", weights_only=True).get("param_names")
        if not saved_names:
            raise UserError(f"--init-optimizer: the run state beside {source} predates parameter names in "
                            f"state/; drop the flag")
        saved = torch.load(opt_path, map_location="cpu", weights_only=True)
        ids = [i for group in saved["param_groups"] for i in group["params"]]
        states = {n: saved["state"][i] for n, i in zip(saved_names, ids) if i in saved["state"]}
    else:
        states = md.declip_optimizer_state(source)
    sd = opt.state_dict()
    params = [p for group in opt.param_groups for p in group["params"]]
    loaded = 0
    for i, (name, p) in enumerate(zip(names, params)):
        st = states.get(name)
        if st is None:
            continue
        if st["exp_avg"].shape != p.shape:
            raise UserError(f"--init-optimizer: {source} holds moments of shape {tuple(st['exp_avg'].shape)} for "
                            f"{name}, not {tuple(p.shape)}")
        st = dict(st)
        st["step"] = torch.as_tensor(st["step"], dtype=torch.float32)  # torch 1.x stored an int
        sd["state"][i] = st
        loaded += 1
    opt.load_state_dict(sd)
    return f"AdamW moments of {loaded} of {len(names)} parameters from {source}"


def read_memory_bank(weights: str) -> Optional[dict]:
    """The NN memory bank ({'bank', 'ptr'}) of the run that wrote the model file `weights`, from the
    run's state/ beside it (the bank is not in model files), or None when there is none."""
    path = os.path.join(state_dir(os.path.dirname(os.path.abspath(weights))), "custom_checkpoint_0.pkl")
    if not os.path.isfile(path):
        return None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {"bank": sd["bank_bank"], "ptr": sd["bank_ptr"]} if "bank_bank" in sd else None


class EvalHook:
    """Zero-shot clean accuracy, and ASR when a trigger and target are known (`plan`: anything with
    trigger, trigger_params and target, e.g. a PoisonPlan), or the targeted block of a targeted plan
    (attack 'targeted' and its `targeted` entries: eval_zeroshot.evaluate's `targeted`). Evaluates on the
    held-out training pairs with --holdout, else on --eval-data (default: the Fashion-MNIST test split); the
    dataset is built once per image size, the class text embeddings once per call (the weights change
    between calls).
    The numbers are eval_zeroshot.py --json's for the same weights and data: its preprocessing
    (eval_zeroshot.default_crop_pct) and precision (fp32 unless --eval-bf16)."""

    def __init__(self, args, plan, base=None):
        self.args, self.plan, self.base = args, plan, base
        self.sets = {}  # image size -> (dataset, classnames)

    def test_set(self, image_size: int):
        if image_size not in self.sets:
            args = self.args
            crop = ez.default_crop_pct(args.data if args.holdout else args.eval_data)
            if args.holdout:
                load = ez.eval_load_size(image_size, crop)
                # evaluation decodes its own centre crops, not the training decode
                base = dd.square_decoding(self.base) if self.base is not None and load == image_size \
                    else load_base(args, load)
                if not getattr(base, "classnames", None):
                    raise UserError("--holdout needs a labelled dataset with class names (e.g. the embedded "
                                    "Fashion-MNIST)")
                n = len(base)
                self.sets[image_size] = (torch.utils.data.Subset(base, list(range(n - args.holdout, n))),
                                         list(base.classnames), crop)
            else:
                ds, names = ez.build_test_set(args.eval_data, image_size, crop, root=args.eval_data_root)
                self.sets[image_size] = (ds, list(names), crop)
        return self.sets[image_size]

    def _plan_kw(self, dataset, classnames) -> dict:
        if self.plan is None:
            return {}
        if getattr(self.plan, "attack", "backdoor") == "targeted":  # its chosen test images, no trigger
            if self.args.holdout:
                raise UserError("a targeted-poisoning plan is measured on the class test split it drew its images "
                                "from (--eval-data), not on --holdout pairs; drop --holdout")
            return dict(targeted=ez.targeted_pairs(self.plan.targeted, dataset, classnames,
                                                        self.plan.test_data))
        return dict(trigger=self.plan.trigger, trigger_params=self.plan.trigger_params, target=self.plan.target)

    def check(self, image_size: int = 32):
        """Raise the UserError a bad test set, trigger or target would raise, without evaluating anything."""
        dataset, classnames, _ = self.test_set(image_size)
        kw = self._plan_kw(dataset, classnames)
        if kw and not kw.get("targeted"):
            ez.make_trigger(kw["trigger"], kw["trigger_params"])
            ez.resolve_target(kw["target"], classnames)
        ez.get_templates(self.args.templates)

    def key(self, weights: str) -> str:
        """eval_zeroshot.evaluation_key of evaluating this weights file, loaded from disk, here: the key
        eval_zeroshot.py's report computes for the same weights, test set, trigger and target."""
        a, plan = self.args, self.plan
        test = (a.data, a.data_root) if a.holdout else (a.eval_data, a.eval_data_root)
        settings = dict(templates=ez.get_templates(a.templates), bf16=a.eval_bf16,
                        crop_pct=ez.default_crop_pct(test[0]), seed=0)
        if plan is not None and getattr(plan, "attack", "backdoor") == "targeted":
            settings["targeted"] = plan.targeted
        elif plan is not None:
            settings.update(trigger=plan.trigger, trigger_params=plan.trigger_params, target=plan.target)
        if a.holdout:  # the last pairs of the training data, decoded with its format flags
            settings["holdout"] = {k: getattr(a, k, None) for k in ("holdout", "image_column", "caption_column",
                                                                     "csv_separator")}
        return ez.evaluation_key(weights, *test, **settings)

    def __call__(self, model, accelerator=None) -> dict:
        dataset, classnames, crop = self.test_set(model.config.image_size)
        with unsharded(model):
            # FSDP's bf16 mixed precision unshards bf16 weights, which only run under autocast
            bf16 = self.args.eval_bf16 or any(p.dtype == torch.bfloat16 for p in model.parameters())
            return ez.evaluate(model, dataset, classnames, templates=ez.get_templates(self.args.templates),
                               accelerator=accelerator, bf16=bf16, crop_pct=crop,
                               **self._plan_kw(dataset, classnames))


@contextlib.contextmanager
def unsharded(model):
    """Evaluation calls encode_image/encode_text, not the model's forward, so under FSDP2 nothing would
    gather the parameters the root module holds (stem, attention pool, embeddings, projections):
    gather them for the block. The wrapped blocks gather their own in their forwards."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def load_base(args, image_size: int, keep_aspect: bool = False):
    """The caption dataset named by --data and its format flags (keep_aspect: the training decode)."""
    return dd.build_caption_dataset(args.data, image_size=image_size, keep_aspect=keep_aspect,
                                    **dd.caption_data_options(args))


def summarize_eval(res: dict) -> str:
    s = f"CA top-1 {res['clean']['top1']:.2f}%"
    if res.get("backdoor"):
        s += f", ASR {res['backdoor']['asr']:.2f}% (target {res['backdoor']['target']!r})"
    if res.get("targeted"):
        t = res["targeted"]
        s += f", targeted success {t['success']:.2f}% of {t['n']} test image(s)"
    return s


# ----------------------------------------------------------------------------------------------
# The loop


def check_tracker_installed(args):
    """Accelerate skips a tracker whose package is missing without a word: say so instead."""
    if not args.report_to:
        return
    import importlib.util

    packages = ("tensorboard", "tensorboardX") if args.report_to == "tensorboard" else ("wandb",)
    if not any(importlib.util.find_spec(p) for p in packages):
        raise UserError(f"--report-to {args.report_to}: the package is not installed; pip install {packages[0]}")


def resolve_precision(precision: str, cpu: bool) -> str:
    """--precision auto: bf16 on a GPU and on a CPU with native bf16 (the tiny demo step is 1.2x faster there
    than in fp32), else 'no' (fp32; emulated bf16 would be ~25x slower). Other values are kept."""
    if precision != "auto":
        return precision
    return "bf16" if not cpu or cpu_has_native_bf16() else "no"


def make_accelerator(args):
    """The run's Accelerator, seeded; args.precision becomes the precision used (--precision auto resolved).
    Several train() calls may share a process (a defense's teacher, SafeCLIP's phases) as Accelerate allows:
    with the same --precision, any accumulation."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    cpu = use_cpu(args.cpu)
    args.precision = resolve_precision(args.precision, cpu or not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, mixed_precision=args.precision,
                              gradient_accumulation_steps=args.grad_accum, log_with=args.report_to,
                              project_dir=args.out_dir,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    if accelerator.device.type == "cpu":
        keep_freed_cpu_memory()
        use_available_cores(accelerator.device)
        if args.precision == "bf16" and not cpu_has_native_bf16() and accelerator.is_main_process:
            print("note: this CPU has no native bf16 (no avx512_bf16/amx_bf16): bf16 is emulated, about 25x "
                  "slower than fp32 here; pass --precision no")
    return accelerator


def build_train_model(args, weights: md.LossWeights, main: bool):
    """The model to train: --init-from's weights, else a fresh --model; heads whose term is off are
    frozen, so that DDP does not wait for their gradients."""
    if args.init_from:
        model, info = md.load_model(args.init_from, return_info=True, preset=args.model,
                                    activation=getattr(args, "activation", None))
        if info["fresh"] and main:
            print(f"note: {args.init_from} has no {', '.join(info['fresh'])}: initialised fresh")
    else:
        model = md.build_model(args.model or "tiny", act=getattr(args, "activation", None))
    model.set_grad_checkpointing(bool(args.grad_checkpointing))
    model.projector.requires_grad_(weights.ss > 0)
    model.predictor.requires_grad_(weights.ss > 0)
    model.text_label_predictor.requires_grad_(weights.mlm > 0 and args.mode == "declip")
    model.train()
    return model


@dataclasses.dataclass
class TrainData:
    """What the loop trains on: the pairs' loader and the counts that fix the schedule."""
    base: object  # the whole --data dataset (the holdout's source)
    train_base: object  # the pairs trained on (a subset with --holdout, a clean subset, --exclude-indices)
    plan: Optional["pdata.PoisonPlan"]
    loader: torch.utils.data.DataLoader
    streamed: bool
    n: int
    global_batch: int
    steps_per_epoch: int
    total: int
    record: Optional[dict]  # config.json's extra record, with the excluded pairs when any


def build_data(args, cfg, ext, accelerator, train_indices=None, record=None) -> TrainData:
    """The training pairs (--holdout, a defense's clean subset and --exclude-indices left out), their
    poison plan and loader, and the step count the schedule runs for."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    base = load_base(args, cfg.image_size, keep_aspect=True)
    streamed = isinstance(base, torch.utils.data.IterableDataset)  # webdataset shards
    exclude = getattr(args, "exclude_indices", None)
    if streamed and (args.holdout or train_indices is not None or exclude or args.caption_mode == "label-consistent"):
        raise UserError("--data: streamed webdataset shards cannot be subset (--holdout, a defense's clean "
                        "subset, label-consistent poisoning); use --clean-data or a map-style format")
    n_all = len(base)
    if args.holdout and not getattr(base, "classnames", None):
        raise UserError("--holdout needs a labelled dataset with class names (e.g. the embedded Fashion-MNIST)")
    n_train = n_all - (args.holdout or 0)
    plan = resumed_plan(args, make_poison_plan(args, base, n_train))
    pair_plan = plan  # what TrainPairs asks is_poisoned / caption, with its own (subset) index
    if exclude:  # "detect, then train clean": the flagged pairs are never loaded
        drop = read_index_file(exclude, n_train)
        record = {**(record or {}), "excluded": {"file": exclude, "n": len(drop)}}
        if train_indices is not None:
            train_indices = [i for i in train_indices if i not in drop]
    if train_indices is not None:
        if plan is not None:
            raise UserError("poisoning a defense's clean subset is not supported")
        train_base = torch.utils.data.Subset(base, list(train_indices))
    elif exclude:
        keep = [i for i in range(n_train) if i not in drop]
        train_base = torch.utils.data.Subset(base, keep)
        pair_plan = _SubsetPlan(plan, keep) if plan is not None else None
    elif args.holdout:
        train_base = torch.utils.data.Subset(base, list(range(n_train)))
    else:
        train_base = base
    n = len(train_base)
    global_batch = args.batch_size * world * args.grad_accum
    if n < global_batch:
        raise UserError(f"--batch-size {args.batch_size} x {world} processes x {args.grad_accum} accumulation "
                        f"exceeds the {n} training pairs; lower --batch-size")
    steps_per_epoch = n // global_batch
    total = args.max_steps if args.max_steps is not None else max(1, int(round(args.epochs * steps_per_epoch)))
    num_epochs = math.ceil(total / steps_per_epoch) + 1
    eda = ext.text_aug(args)
    if streamed:  # epochs streamed through a seeded shuffle buffer, each process reading its own share
        pairs = dd.TrainPairsIterable(train_base, seed=args.seed, context_length=cfg.context_length, poison=plan,
                                      eda=eda, num_epochs=num_epochs, rank=rank, world=world)
        sampler = None
    else:  # virtual indices epoch * n + i: per-sample randomness independent of workers and processes
        pairs = dd.TrainPairs(train_base, seed=args.seed, context_length=cfg.context_length, poison=pair_plan, eda=eda)
        sampler = dd.EpochSampler(n, seed=args.seed, num_epochs=num_epochs)
    workers = args.workers if args.workers is not None else (6 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        pairs, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=workers,
        collate_fn=partial(dd.collate_pairs, context_length=cfg.context_length),
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)
    return TrainData(base, train_base, plan, loader, streamed, n, global_batch, steps_per_epoch, total, record)


def fused_adamw(device) -> bool:
    """Whether AdamW takes its fused kernel here: on CUDA and the CPU (6x faster than the per-tensor
    loop there on the tiny model's 18.8 M parameters)."""
    return device.type in ("cuda", "cpu")


def build_optimizer(args, model, device, main: bool):
    """AdamW over the weight-decay groups, with --init-optimizer's moments when given. The learning
    rate is set from the step before each update (no scheduler object to keep in sync across
    processes, accumulation and resume)."""
    opt = torch.optim.AdamW(md.param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, args.beta2),
                            eps=args.eps, fused=fused_adamw(device))
    param_names = optimizer_param_names(model, opt)
    if args.init_optimizer and not args.resume:
        if not args.init_from:
            raise UserError("--init-optimizer needs --init-from")
        note = init_optimizer_state(opt, param_names, args.init_from)
        if main:
            print(f"note: {note}")
    return opt, param_names


def write_run_config(args, data: TrainData, cfg, world: int, weights: md.LossWeights, ext: Extension):
    """config.json (the flags and what they resolved to) and the poison manifest of a new run."""
    record_cfg = dict(vars(args))
    record_cfg.update(resolved=dict(model_config=cfg.to_dict(), world_size=world, global_batch=data.global_batch,
                                    total_steps=data.total, steps_per_epoch=data.steps_per_epoch, n_train=data.n,
                                    weights=dataclasses.asdict(weights), defense=ext.name,
                                    defense_settings=ext.record()), **(data.record or {}))
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(record_cfg, f, indent=2, default=str)
    if data.plan is not None:
        data.plan.save(args.out_dir)
        print(data.plan.summary())


def loop_views(batch: dict, b: int, g: torch.Generator, *, device, augment, trigger, weights: md.LossWeights,
               declip: bool, mlm_prob: float) -> dict:
    """The loop's own DeCLIP.forward inputs for the first b rows: MoCo-v2 image views (the trigger on
    poisoned rows), the caption (MLM-masked in DeCLIP mode) and its second view."""
    images = batch["images"][:b].to(device, non_blocking=True)
    poisoned, sizes = batch["poisoned"][:b], batch["sizes"][:b]
    tokens = batch["tokens"][:b]
    # a random trigger (patch-random's place) draws from the step generator too, not from a state of
    # its own that a resume would restart
    step_trigger = partial(trigger, generator=g) if trigger is not None else None
    inputs = dict(images=augment(images, g, step_trigger, poisoned, sizes), weights=weights)
    if declip:
        inputs["images2"] = augment(images, g, step_trigger, poisoned, sizes)
        inputs["tokens_aug"] = batch["tokens_aug"][:b].to(device, non_blocking=True)
        if weights.mlm > 0:
            tokens, labels = dd.mask_tokens(tokens, g, mlm_prob)
            inputs.update(mlm_labels=labels.to(device, non_blocking=True),
                          mlm_index=(labels.flatten() != -100).nonzero()[:, 0].to(device, non_blocking=True))
    inputs["tokens"] = tokens.to(device, non_blocking=True)
    return inputs


def count_batch(batch: dict, run: RunState, args, world: int, cpu_group) -> int:
    """The rows of this batch every process trains on (the fewest good ones), counting the seen and
    the bad samples; the bad fraction is judged once a thousand samples make it mean something."""
    b, n_bad = batch["images"].shape[0], int(batch["n_bad"])
    if world > 1:
        b, n_bad = agree_on_batch(b, n_bad, cpu_group)
    run.bad += n_bad
    run.seen += b * world
    if b and run.seen + run.bad >= 1000:
        check_bad_fraction(run, args)
    return b


def step_inputs(ext: Extension, batch: dict, b: int, g: torch.Generator, views, channels_last: bool) -> dict:
    """A step's model inputs: the extension's (by default the loop's views, then its extra rows), in the
    model's memory layout."""
    inputs = ext.extend_batch(ext.make_inputs(batch, b, g, views), batch, g)
    if channels_last:
        for k in ("images", "images2"):
            if inputs.get(k) is not None:
                inputs[k] = inputs[k].contiguous(memory_format=torch.channels_last)
    return inputs


def set_lr(opt, lr: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def train_step(accelerator, model, fwd, raw, opt, ext: Extension, inputs: dict, grad_clip: float) -> dict:
    """One micro-batch: forward with the extension's extra terms, backward, clip and update when the
    accumulated gradients sync. Returns the forward's outputs (loss and its terms)."""
    with accelerator.accumulate(model):
        with accelerator.autocast(), raw.tap(ext.tap_names(raw)) as taps:
            out = fwd(**inputs)
            for k, v in ext.extra_loss(raw, inputs, taps).items():
                out[k] = v
                out["loss"] = out["loss"] + v
        accelerator.backward(out["loss"])
        if grad_clip > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def finish_trackers(accelerator):
    """Close the trackers; accelerator.end_training() would also end the process group, which a
    later train() in this process (a defense's teacher, SafeCLIP's next phase) still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()


class Bookkeeping:
    """Everything after an optimizer step but the step: the non-finite check, logged means
    (metrics.jsonl, trackers, the progress bar), periodic evaluation, periodic saves and SIGTERM
    (what Slurm sends before a kill: save the state and stop). As a context manager it holds the
    SIGTERM handler and the bar for the loop and closes the trackers when the run stops early."""

    def __init__(self, args, accelerator, run: RunState, evaluator: EvalHook, n: int, total: int, name: str):
        self.args, self.acc, self.run, self.evaluator, self.n, self.total = args, accelerator, run, evaluator, n, total
        self.metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
        self.sums: Dict[str, torch.Tensor] = {}
        self.first_bad = torch.tensor(-1, device=accelerator.device)  # the first non-finite step, on device
        self.t_log, self.seen_log, self.last_saved = time.time(), run.seen, run.step
        self.signal = None
        self.name = name

    def __enter__(self):
        self.old_handler = signal.signal(signal.SIGTERM, self._on_term)
        self.bar = tqdm(total=self.total, initial=self.run.step, disable=not self.acc.is_main_process,
                        desc=self.name, dynamic_ncols=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.bar.close()
        signal.signal(signal.SIGTERM, self.old_handler)
        if exc_type in (Stop, Preempted):
            finish_trackers(self.acc)
        if exc_type is Stop:
            raise UserError(str(exc)) from None
        return False

    def _on_term(self, signum, _frame):
        self.signal = signum

    def log(self, row: dict):
        if self.acc.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.args.report_to:
            self.acc.log(tracker_scalars(row), step=row.get("step"))

    def check_finite(self):
        fb = int(self.acc.gather(self.first_bad.reshape(1)).max())
        if fb >= 0:
            raise Stop(f"non-finite loss at step {fb}; the last good checkpoint is "
                       f"{state_dir(self.args.out_dir) if self.last_saved else 'none (no state saved yet)'}"
                       f" at step {self.last_saved}")

    def add(self, out: dict):
        """Count a finished optimizer step: its loss terms to the sums, a non-finite loss noted on
        the device (checked, with one sync, only when logging or saving)."""
        run = self.run
        bad_now = ~torch.isfinite(out["loss"].detach())
        self.first_bad = torch.where(bad_now & (self.first_bad < 0), torch.full_like(self.first_bad, run.step),
                                     self.first_bad)
        for k, v in out.items():
            if k != "logit_scale" and v is not None:
                self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.bar.update(1)

    def after_step(self, out: dict, lr: float, raw):
        args, run, total = self.args, self.run, self.total
        if run.step % args.log_every == 0 or run.step == total:
            self._log_means(out, lr)
        if args.eval_every and run.step % args.eval_every == 0 and run.step < total:
            raw.eval()
            res = self.evaluator(raw, self.acc)
            raw.train()
            self.log({"step": run.step, "eval": res})
            if self.acc.is_main_process:
                tqdm.write(f"step {run.step}: {summarize_eval(res)}")
        if self.signal is not None:
            self.check_finite()
            save_state(self.acc, args.out_dir)
            resume = " ".join(shlex.quote(a) for a in [sys.argv[0]] + [a for a in sys.argv[1:] if a != "--resume"])
            raise Preempted(self.signal, f"stopped by signal {self.signal} at step {run.step}/{total}; state "
                            f"saved in {args.out_dir}/state; resume with: {resume} --resume")
        if args.save_every and run.step % args.save_every == 0 and run.step < total:
            self.check_finite()
            save_state(self.acc, args.out_dir)
            self.last_saved = run.step

    def _log_means(self, out: dict, lr: float):
        """One metrics row: each term averaged over the logged steps and over processes."""
        args, run = self.args, self.run
        self.check_finite()
        dt = time.time() - self.t_log
        steps_logged = args.log_every if run.step % args.log_every == 0 else run.step % args.log_every
        names = sorted(self.sums)
        means = self.acc.reduce(torch.stack([self.sums[k] for k in names]), reduction="mean") / steps_logged
        row = {"step": run.step, "epoch": round(run.seen / self.n, 4), "lr": lr,
               "logit_scale": float(out["logit_scale"]),
               **{k: round(float(v), 5) for k, v in zip(names, means.tolist())},
               "img_s": round((run.seen - self.seen_log) / max(dt, 1e-9), 1), "bad": run.bad}
        self.sums, self.t_log, self.seen_log = {}, time.time(), run.seen
        self.log(row)
        self.bar.set_postfix({k: row[k] for k in ("loss", "clip", "lr", "logit_scale", "img_s") if k in row},
                             refresh=False)


def finish_run(args, accelerator, model, raw, run: RunState, ext: Extension, plan, evaluator: EvalHook,
               book: Bookkeeping) -> dict:
    """The end of a run: its state, its weights (model.safetensors), the final evaluation (eval.json)
    and summary.json, one printed line."""
    main = accelerator.is_main_process
    save_state(accelerator, args.out_dir)
    summary = {"steps": run.step, "seen": run.seen, "bad_samples": run.bad, "minutes": round(run.elapsed / 60, 2)}
    full_weights = accelerator.get_state_dict(model)  # a collective under FSDP: every process calls it
    if main:
        meta = {"parent": args.init_from, "steps": run.step, "defense": ext.name, "seed": args.seed}
        if plan is not None:
            meta["poison"] = {k: v for k, v in plan.to_manifest().items() if k != "indices"}
            if "targeted" in meta["poison"]:
                meta["poison"]["targeted"] = [{k: v for k, v in e.items() if k != "indices"}
                                              for e in meta["poison"]["targeted"]]
        md.save_model(raw, os.path.join(args.out_dir, "model.safetensors"), metadata=meta, state_dict=full_weights)
    if not args.no_eval:  # the saved file, as eval_zeroshot.py and a defense of this run evaluate it (cached)
        path = os.path.join(args.out_dir, "model.safetensors")
        accelerator.wait_for_everyone()  # the main process has written it
        res = ez.cached_evaluation(path, evaluator.key(path),
                                   lambda: evaluator(md.load_model(path, accelerator.device), accelerator),
                                   accelerator, "the evaluation")
        summary["eval"] = res
        book.log({"step": run.step, "eval": res})
        if main:
            with open(os.path.join(args.out_dir, "eval.json"), "w") as f:
                json.dump(res, f, indent=2)
    if main:
        with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    accelerator.wait_for_everyone()
    if main:
        line = f"{ext.name}: {run.step} steps, {run.seen} pairs in {summary['minutes']:.1f} min"
        if run.bad:
            line += f", {run.bad} bad samples skipped"
        if "eval" in summary:
            line += f"; {summarize_eval(summary['eval'])}"
        print(line + f" -> {args.out_dir}")
    finish_trackers(accelerator)
    return summary


def train(args: argparse.Namespace, extension: Optional[Extension] = None,
          train_indices: Optional[Sequence[int]] = None, record: Optional[dict] = None,
          before_loop=None) -> dict:
    """Run one training job described by args (see build_parser) and return its summary.

    extension: how a defense changes the loop. train_indices: train on these pairs of the dataset
    only (a defense's clean subset). record: extra JSON written into config.json (e.g. the subset).
    before_loop: called with the accelerator once every check has passed and the run directory is
    written, before the first step (a defense evaluates the victim there).
    """
    ext = extension or Extension()
    check_tracker_installed(args)
    if dd.is_main_env():
        prepare_run_dir(args)
    accelerator = make_accelerator(args)
    device, world, main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    t_start = time.time()

    weights = ext.loss_weights(args)
    model = build_train_model(args, weights, main)
    cfg = model.config
    data = build_data(args, cfg, ext, accelerator, train_indices, record)
    trigger = data.plan.trigger_fn() if data.plan is not None else None
    channels_last = bool(args.channels_last) and cfg.vision == "resnet"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, param_names = build_optimizer(args, model, device, main)
    if data.streamed:  # already split by process; Accelerate would make process 0 read and send every batch
        model, opt = accelerator.prepare(model, opt)
        loader = data.loader
    else:  # Accelerate shards our epoch sampler's batches over the processes
        model, opt, loader = accelerator.prepare(model, opt, data.loader)
    raw = accelerator.unwrap_model(model)
    fwd = torch.compile(model) if args.compile else model
    run = RunState(raw)
    run.param_names = param_names
    accelerator.register_for_checkpointing(run)
    ext.setup(accelerator, raw, args, data.train_base)
    augment = ext.augment or dd.GpuAugment(cfg.image_size, cfg.image_mean, cfg.image_std, mocov2=True)
    views = partial(loop_views, device=device, augment=augment, weights=weights, declip=args.mode == "declip",
                    mlm_prob=args.mlm_prob, trigger=trigger)
    raw.clamp_logit_scale_(args.logit_scale_min, args.logit_scale_max)

    if args.resume:
        accelerator.load_state(state_dir(args.out_dir))
        if main:
            print(f"resumed {args.out_dir} at step {run.step}/{data.total}")
    elif main:
        write_run_config(args, data, cfg, world, weights, ext)
    if args.report_to:
        accelerator.init_trackers(os.path.basename(os.path.abspath(args.out_dir)))
    evaluator = EvalHook(args, data.plan, data.base)
    if before_loop is not None:
        with torch.random.fork_rng(devices=[]):  # what it draws leaves the training's random state alone
            before_loop(accelerator)

    iterator = accelerator.skip_first_batches(loader, run.step * args.grad_accum) if run.step else loader
    cpu_group = host_group() if world > 1 else None
    micro = 0
    with Bookkeeping(args, accelerator, run, evaluator, data.n, data.total, ext.name) as book:
        for batch in iterator:
            if run.step >= data.total:
                break
            b = count_batch(batch, run, args, world, cpu_group)
            if b == 0:  # every sample of this batch was bad (counted)
                continue
            # the step's random decisions are drawn on the host (a CPU generator, masks on the CPU
            # tokens): the GPU gets index and token copies and never makes the host wait
            g = step_generator(args.seed, run.step * args.grad_accum + micro, accelerator.process_index, "cpu")
            inputs = step_inputs(ext, batch, b, g, views, channels_last)
            lr = set_lr(opt, lr_at(args.start_step + run.step, args, data.total))
            out = train_step(accelerator, model, fwd, raw, opt, ext, inputs, args.grad_clip)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            micro = 0
            raw.clamp_logit_scale_(args.logit_scale_min, args.logit_scale_max)
            run.step += 1
            book.add(out)
            book.after_step(out, lr, raw)
        book.check_finite()
        check_bad_fraction(run, args)
    run.elapsed += time.time() - t_start
    return finish_run(args, accelerator, model, raw, run, ext, data.plan, evaluator, book)


# ----------------------------------------------------------------------------------------------
# What every defense shares: victim, clean subset, before/after evaluation


DEFAULT_VICTIM = "runs/victim"


def build_defense_parser(description: str, out: str, lr: float = 1e-4, epochs: float = 10.0) -> argparse.ArgumentParser:
    """The training flags plus the defense's: --ckpt (the victim), --clean-fraction, --data."""
    p = build_parser(description, out=out, lr=lr)
    p.set_defaults(epochs=epochs, batch_size=128, save_every=0)
    g = p.add_argument_group("defense")
    g.add_argument("--ckpt", default=DEFAULT_VICTIM,
                   help=f"the poisoned model: a run directory or a checkpoint in any supported format "
                        f"(default: {DEFAULT_VICTIM})")
    g.add_argument("--clean-fraction", type=float, default=0.05,
                   help="defender's clean set: this random fraction of the training pairs, excluding the victim's "
                        "poisoned indices when its poison_manifest.json is found (default 0.05, as the original's "
                        "5%% subset); ignored with --clean-data")
    g.add_argument("--clean-data", default=None,
                   help="an explicit clean caption dataset for the defense (same formats as --data), trained on "
                        "whole; --holdout still names the victim's held-out pairs for the evaluation")
    # None = not given: resolved from the victim (its manifest, its config.json) in run_defense, so
    # that a flag given always wins, also when it equals the training default
    p.set_defaults(trigger=None, holdout=None)
    for action in p._actions:
        if action.dest == "trigger":
            action.help = "trigger the ASR is evaluated with (default: the victim's manifest, else patch)"
        elif action.dest in VICTIM_FLAGS:
            action.help += " (default: the victim's, from its run directory's config.json)"
    return p


# flags a defense takes from the victim's config.json unless given; the format flags describe --data
# (--eval-data-root describes --eval-data) and come with it
VICTIM_FLAGS = ("data", "eval_data", "holdout")
VICTIM_FORMAT_FLAGS = {"data": ("data_root", "image_column", "caption_column", "csv_separator"),
                       "eval_data": ("eval_data_root",), "holdout": ()}


def run_config(run_dir: Optional[str]) -> dict:
    """The flags of the training run in run_dir (its config.json); {} for anything else (a transformers or
    open_clip directory, a bare file, an unreadable config)."""
    path = os.path.join(run_dir, "config.json") if run_dir else None
    cfg = None
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            cfg = None
    return cfg if isinstance(cfg, dict) and "resolved" in cfg else {}


def take_victim_flags(args, ckpt_dir: Optional[str]) -> dict:
    """Fill --data (with its format flags), --eval-data (with --eval-data-root) and --holdout that the user
    did not give (None) from the victim's config.json in ckpt_dir, so that the defense draws its clean subset
    from, and evaluates on, what the victim was trained and evaluated on. Returns {flag: value} taken."""
    cfg = run_config(ckpt_dir)
    taken = {}
    for flag in VICTIM_FLAGS:
        if getattr(args, flag) is not None or flag not in cfg:
            continue
        for k in (flag,) + VICTIM_FORMAT_FLAGS[flag]:
            if cfg.get(k) is not None and getattr(args, k, None) is None:
                setattr(args, k, cfg[k])
                taken[k] = cfg[k]
    if args.holdout is None:
        args.holdout = 0
    return taken


def clean_subset(n: int, fraction: float, poisoned: Sequence[int], seed: int) -> List[int]:
    """A seeded random `fraction` of range(n) that never contains a poisoned index."""
    if not 0 < fraction <= 1:
        raise UserError(f"--clean-fraction must be in (0, 1], got {fraction}")
    bad = set(int(i) for i in poisoned)
    pool = torch.tensor([i for i in range(n) if i not in bad], dtype=torch.long)
    k = max(1, int(round(fraction * n)))
    g = torch.Generator().manual_seed(dd._int_seed(seed, "clean-subset"))
    return sorted(pool[torch.randperm(len(pool), generator=g)[:min(k, len(pool))]].tolist())


def run_defense(args: argparse.Namespace, extension: Extension, before=None) -> dict:
    """Evaluate the victim, train it with the defense's extension on the clean set, evaluate again and
    print one line with clean accuracy and ASR before and after.

    Every flag is checked before the first evaluation: the evaluation's here, train()'s in train(),
    which calls back for the "before" once its checks have passed. Both evaluations load the weights
    from disk (as eval_zeroshot.py does) and go through train()'s accelerator, each process scoring its
    share of the test set. --no-eval: neither runs and eval.json is not written. before: the victim's
    evaluation when the caller has it already (reused, not recomputed), or False to leave it out."""
    t0 = time.time()
    args = copy.copy(args)  # the victim's flags are filled in here; the caller's namespace stays as it was
    weights, manifest = ez.resolve_ckpt(args.ckpt, hint="train the victim first: make victim")
    user_format = {k: getattr(args, k) for k in VICTIM_FORMAT_FLAGS["data"]}  # for --clean-data
    taken = take_victim_flags(args, os.path.dirname(weights))
    plan = pdata.PoisonPlan.from_manifest(manifest) if manifest else None
    # a defense is never poisoned itself; the trigger/target (flags, else manifest) are for evaluation;
    # train() must not evaluate with a poison plan of its own (the evaluations are this function's)
    args.poison_rate = args.poison_count = None
    eval_args = copy.copy(args)  # the victim's data and holdout, also when the defense trains on --clean-data
    train_args = dict(init_from=weights, no_eval=True)
    record, indices = {"victim": args.ckpt, "victim_manifest": manifest, "from_victim_config": taken}, None
    if args.clean_data:
        train_args.update(data=args.clean_data, holdout=0, **user_format)
    else:
        n_train = len(load_base(args, 32)) - args.holdout
        poisoned = plan.indices if plan is not None else []
        if plan is not None and plan.n != n_train:
            raise UserError(f"the victim's manifest describes {plan.n} training pairs but --data has {n_train}; "
                            f"give the victim's --data (and --holdout) or --clean-data")
        indices = clean_subset(n_train, args.clean_fraction, poisoned, args.seed)
        record["clean_subset"] = {"fraction": args.clean_fraction, "n": len(indices), "indices": indices}
    evaluator = None
    if not args.no_eval:
        eval_plan = _eval_plan(args, plan)
        evaluator = EvalHook(eval_args, eval_plan)
        evaluator.check()
        record["evaluation"] = {"data": eval_args.eval_data if not eval_args.holdout else eval_args.data,
                                "holdout": eval_args.holdout, "eval_bf16": args.eval_bf16,
                                "plan": vars(eval_plan) if eval_plan is not None else None}
    run = {"accelerator": None, "before": before if before else None}

    def evaluate(path, accelerator, what):
        """The weights' evaluation, cached beside them (a later defense of the victim, and a report over
        the runs, read it)."""
        def compute():
            model = md.load_model(path, accelerator.device if accelerator is not None else "cpu",
                                  activation=getattr(args, "activation", None))
            return evaluator(model, accelerator)

        return ez.cached_evaluation(path, evaluator.key(path), compute, accelerator, what)

    def before_loop(accelerator):
        run["accelerator"] = accelerator
        if evaluator is not None and before is None:
            run["before"] = evaluate(weights, accelerator, "the victim's evaluation")

    summary = train(argparse.Namespace(**{**vars(args), **train_args}), extension, train_indices=indices,
                    record=record, before_loop=before_loop)
    acc = run["accelerator"]
    after = evaluate(os.path.join(args.out_dir, "model.safetensors"), acc, "the evaluation") \
        if evaluator is not None else None
    before = run["before"]
    summary.update(before=before, after=after, minutes=round((time.time() - t0) / 60, 2))
    if (acc.is_main_process if acc is not None else dd.is_main_env()):
        if evaluator is not None:
            ez._write_json(os.path.join(args.out_dir, "eval.json"), {"before": before, "after": after})
        ez._write_json(os.path.join(args.out_dir, "summary.json"), summary)
        if after is not None:  # with --no-eval train() has printed the run's line
            line = f"{extension.name}: CA {before['clean']['top1']:.2f}% -> {after['clean']['top1']:.2f}%" if before \
                else f"{extension.name}: CA {after['clean']['top1']:.2f}%"
            if after.get("backdoor"):
                line += f", ASR {before['backdoor']['asr']:.2f}% -> " if before else ", ASR "
                line += f"{after['backdoor']['asr']:.2f}%"
            if after.get("targeted"):
                line += f", targeted success {before['targeted']['success']:.2f}% -> " if before else \
                    ", targeted success "
                line += f"{after['targeted']['success']:.2f}%"
            print(line + f" ({args.out_dir})")
    return summary


def _eval_plan(args, plan):
    """The trigger and target to evaluate a defense with: each flag given (not None) wins over the victim's
    manifest; the trigger defaults to the manifest's, else patch; no target at all: no backdoor metrics.
    A targeted-poisoning victim without those flags: its chosen test images' metrics."""
    if plan is not None and plan.attack == "targeted" and args.trigger is None and args.target_class is None:
        return argparse.Namespace(attack="targeted", targeted=plan.targeted)  # its test images' success
    if plan is not None and plan.attack == "targeted":
        plan = None  # a trigger asked of a victim that has none: the flags alone say what to measure
    target = args.target_class if args.target_class is not None else (plan.target if plan is not None else None)
    if target is None:
        if args.trigger is not None:
            raise UserError(f"--trigger {args.trigger} needs a target to measure the ASR: the victim has no "
                            f"{pdata.MANIFEST_NAME}, so pass --target-class")
        return None
    trigger = args.trigger if args.trigger is not None else (plan.trigger if plan is not None else "patch")
    params = dict(plan.trigger_params) if plan is not None and trigger == plan.trigger else {}
    params.update(pdata.parse_trigger_params(args.trigger_param))
    return argparse.Namespace(trigger=trigger, trigger_params=params, target=target)


def main(argv=None):
    args = parse_args(build_parser(), argv)
    train(args)


if __name__ == "__main__":
    sys.exit(dd.run_main(main))
