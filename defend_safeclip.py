"""SafeCLIP (Yang et al., "Better safe than sorry: pre-training CLIP against targeted data poisoning and
backdoor attacks", ICML 2024, arXiv 2310.05862): pretrain on the poisoned data, but let only the pairs
whose image and caption already agree get the image-caption loss; the others train image-image and
caption-caption only, so a poisoned pair rarely teaches its caption to its triggered image.

    accelerate launch defend_safeclip.py --config configs/tiny_victim.yaml --init-from runs/clean/model.safetensors \\
        --poison-rate 0.01 --trigger patch --target-class bag --epochs 8 --out-dir runs/safeclip

It takes the victim's own command (data, poisoning, recipe, seed) and trains it in SafeCLIP's phases, as
the official code (BigML-CS-UCLA/SafeCLIP, src/main.py, train.py, samplers.py) runs them; --epochs is
the total number of passes:

1. --inmodal-warmup passes (default 5) of the in-modal loss on every pair: (InfoNCE image view 1 ->
   view 2 + InfoNCE caption -> its EDA copy) / 2;
2. --multimodal-warmup passes (default 1) of the CLIP loss on every pair at the constant --filter-lr
   (default lr / 100, the official 5e-6 against 5e-4);
3. each later pass: the image-caption cosine of every pair (evaluation view, the trigger on poisoned
   images) under the current model, a 2-component Gaussian mixture on it (scikit-learn, random_state
   0), the posterior of its higher-mean component; the first time the safe set is the pairs with
   posterior >= 0.9, then the top share by posterior, the share growing by --filter-step (0.01) per
   pass up to --filter-cap (0.85); one pass of the in-modal loss on the risky pairs, then one of the CLIP
   loss on the safe pairs.

Each phase is a run of the training loop in OUT/phases/<name> (skipped when done, so a stopped SafeCLIP
continues where it was), AdamW's moments carried from phase to phase, one cosine schedule over the
whole run. OUT/safeclip.json records every split: its size and, against the poison manifest, how many
poisoned pairs it put in the safe set (precision and recall of the risky set). OUT/model.safetensors and
OUT/eval.json are the last phase's. Images get RoCLIP's augmentation (crop scale 0.08-1, jitter 0.5, blur
always), captions one random EDA operation. Differences from the official code: the EDA caption is drawn
anew at each load (official: two fixed copies per caption), the CLIP loss pairs image view 1 with the
EDA caption (official: view 1 with EDA copy 2 and EDA copy 1 with view 2), the cosines use the
evaluation view (official: an augmented view), no memory bank (the official default), and each process
computes every cosine itself.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys

import numpy as np
import torch

import data_declip as dd
import detect_poison as dp
import eval_zeroshot as ez
import modeling_declip as md
import poison_data as pdata
import train_declip as td
from data_declip import UserError, run_main

DEFAULT_OUT = "runs/safeclip"
FIRST_POSTERIOR = 0.9  # official: the first safe set is the pairs with clean posterior >= 0.9


class SafeCLIPPass(td.Extension):
    """One SafeCLIP phase on the training loop: the in-modal loss (CleanCLIP's unimodal term with the
    cross-modal weight 0) on two augmented views, or the CLIP loss on one view and the EDA caption."""

    def __init__(self, inmodal: bool):
        self.inmodal = inmodal
        self.name = "safeclip-inmodal" if inmodal else "safeclip-clip"

    def loss_weights(self, args) -> md.LossWeights:
        if self.inmodal:
            return md.LossWeights(clip=0.0, ss=0.0, mlm=0.0, nn=0.0, inmodal=1.0)
        return md.LossWeights.clip_only()

    def text_aug(self, args):
        return dd.eda_cleanclip

    def setup(self, accelerator, model, args, dataset):
        cfg = model.config
        self.device = accelerator.device
        self.augment = dd.GpuAugment(cfg.image_size, cfg.image_mean, cfg.image_std, **dd.ROCLIP_VIEW)

    def make_inputs(self, batch: dict, b: int, generator: torch.Generator, views) -> dict:
        inputs = views(batch, b, generator)
        if self.inmodal:
            inputs["objective"] = "cleanclip"  # L_img(view 1 -> view 2) and L_txt(caption -> EDA), halved
        else:
            inputs["tokens"] = batch["tokens_aug"][:b].to(self.device, non_blocking=True)
        return inputs


def clean_posterior(cos: np.ndarray) -> np.ndarray:
    """Posterior of the higher-mean component of a 2-component GMM fitted to the cosines (official
    samplers.fit_gmm_to_cos_sim)."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(cos, dtype=np.float64).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, random_state=0).fit(x)
    return gmm.predict_proba(x)[:, int(np.argmax(gmm.means_))]


def split_pairs(posterior: np.ndarray, share) -> tuple:
    """(safe indices, share): the first time (share None) the pairs with posterior >= 0.9 and their
    share of all pairs; then the top `share` by posterior (ties in index order)."""
    if share is None:
        safe = np.nonzero(posterior >= FIRST_POSTERIOR)[0]
        return safe, len(safe) / len(posterior)
    order = np.argsort(-posterior, kind="stable")
    return np.sort(order[:int(len(posterior) * share)]), share


def split_quality(safe: np.ndarray, n: int, poisoned) -> dict:
    """How a split treats the poisoned pairs: the risky set's precision and recall of them."""
    risky = np.setdiff1d(np.arange(n), safe)
    pois = np.asarray(sorted(poisoned), dtype=np.int64)
    caught = len(np.intersect1d(risky, pois))
    return {"n_safe": int(len(safe)), "n_risky": int(len(risky)), "poisoned_in_safe": int(len(pois) - caught),
            "risky_precision": 100.0 * caught / len(risky) if len(risky) else None,
            "risky_recall": 100.0 * caught / len(pois) if len(pois) else None}


@torch.no_grad()
def pair_cosines(model_path: str, args, plan, device) -> np.ndarray:
    """The image-caption cosine of every training pair under the model at model_path, each pair as the
    victim's loader poisons it."""
    model = md.load_model(model_path, device).eval()
    cfg = model.config
    base = td.load_base(args, cfg.image_size)
    n = plan.n if plan is not None else len(base) - args.holdout
    train_base = torch.utils.data.Subset(base, range(n)) if args.holdout else base
    pairs = dd.TrainPairs(train_base, seed=args.seed, context_length=cfg.context_length, poison=plan, eda=False)
    trigger = ez.make_trigger(plan.trigger, plan.trigger_params, args.seed) if plan is not None else None
    loader = torch.utils.data.DataLoader(pairs, batch_size=256, collate_fn=lambda it: dd.collate_pairs(it, cfg.context_length))
    cos = np.full(n, np.nan)
    for batch in loader:
        if batch["images"].shape[0]:
            img, txt = dp.embed_batch(model, batch, trigger, device)
            cos[batch["index"].numpy()] = torch.cosine_similarity(img, txt).cpu().numpy()
    if np.isnan(cos).any():
        raise UserError(f"{int(np.isnan(cos).sum())} training pairs could not be read for SafeCLIP's split")
    return cos


def phase_plan(args) -> list:
    """The phases before the first split, then one (in-modal on risky, CLIP on safe) pair per later pass."""
    filtering = int(args.epochs) - args.inmodal_warmup - args.multimodal_warmup
    plan = []
    if args.inmodal_warmup:
        plan.append(("warmup-inmodal", True, None, args.inmodal_warmup))
    if args.multimodal_warmup:
        plan.append(("warmup-clip", False, None, args.multimodal_warmup))
    for e in range(filtering):
        plan += [(f"pass{e + 1}-inmodal", True, ("risky", e), 1), (f"pass{e + 1}-clip", False, ("safe", e), 1)]
    return plan


def run(args) -> dict:
    if args.epochs != int(args.epochs) or args.epochs < args.inmodal_warmup + args.multimodal_warmup + 1:
        raise UserError(f"--epochs must be a whole number of passes above the warm-up "
                        f"({args.inmodal_warmup} + {args.multimodal_warmup}); got {args.epochs:g}")
    if not 0 < args.filter_cap <= 1 or args.filter_step < 0:
        raise UserError("--filter-cap must be in (0, 1] and --filter-step not negative")
    if args.max_steps is not None:
        raise UserError("SafeCLIP counts passes: give --epochs, not --max-steps")
    if not args.inmodal_warmup + args.multimodal_warmup and not args.init_from:
        raise UserError("no warm-up passes: the first split needs a trained model's cosines; give --init-from")
    out = args.out_dir
    os.makedirs(os.path.join(out, "phases"), exist_ok=True)
    record_path = os.path.join(out, "safeclip.json")
    record = json.load(open(record_path)) if os.path.isfile(record_path) and not args.overwrite else {"splits": []}
    if args.overwrite and os.path.isdir(os.path.join(out, "phases")):
        shutil.rmtree(os.path.join(out, "phases"))
    base = td.load_base(args, 32)
    n = len(base) - args.holdout
    global_batch = args.batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = max(1, n // global_batch)
    phases = phase_plan(args)
    filter_lr = args.filter_lr if args.filter_lr is not None else args.lr / 100
    # the pairs as every phase's loader poisons them, drawn from the command itself: the first split may come
    # before any phase has run (no warm-up: the init model's cosines), so no phase's manifest is there yet
    plan = td.make_poison_plan(args, base, n)
    prev, start, share, summary = args.init_from, 0, None, None
    totals = {"steps": 0, "seen": 0, "bad_samples": 0, "minutes": 0.0}  # the whole run, every phase
    schedule = int(args.epochs) * steps_per_epoch  # one cosine over the whole run (the warm-up's lr aside)
    for name, inmodal, subset, epochs in phases:
        pdir = os.path.join(out, "phases", name)
        pargs = copy.copy(args)
        pargs.out_dir, pargs.init_from, pargs.epochs, pargs.overwrite = pdir, prev, epochs, False
        pargs.init_optimizer = prev != args.init_from or args.init_optimizer
        pargs.mode = "declip" if inmodal else "clip"
        pargs.schedule_steps, pargs.start_step = schedule, start
        if name == "warmup-clip":  # the official constant cross-modal warm-up lr
            pargs.lr = pargs.min_lr = pargs.warmup_init_lr = filter_lr
        if subset is not None:
            kind, e = subset
            if kind == "risky":  # a new split from the model so far
                if e < len(record["splits"]):
                    split = record["splits"][e]
                    safe, share = np.asarray(split["safe"]), split["share"]
                else:
                    safe, share = split_pairs(clean_posterior(pair_cosines(prev, args, plan, _device(args))), share)
                    split = {"pass": e + 1, "share": share, **split_quality(safe, n, plan.indices if plan else []),
                             "safe": safe.tolist()}
                    record["splits"].append(split)
                    if dd.is_main_env():
                        ez._write_json(record_path, record)
                        print(f"safeclip: pass {e + 1}: {split['n_safe']} safe pairs ({100 * len(safe) / n:.1f} %), "
                              f"{split['poisoned_in_safe']} of them poisoned")
                keep = {"risky": np.setdiff1d(np.arange(n), safe), "safe": safe}
            exclude = keep["safe"] if kind == "risky" else keep["risky"]
            if kind == "safe":  # the share grows for the next split
                share = min(share + args.filter_step, args.filter_cap)
            if n - len(exclude) < global_batch:
                if dd.is_main_env():
                    print(f"safeclip: {name}: {n - len(exclude)} {kind} pairs, less than one batch; pass skipped")
                continue
            pargs.exclude_indices = pdir + ".exclude.txt"
            _write_indices(pargs.exclude_indices, exclude)
        pargs.no_eval = args.no_eval or name != phases[-1][0]  # the last phase evaluates, as a training run does
        done = os.path.isfile(os.path.join(pdir, "model.safetensors"))
        if not done:
            pargs.resume = os.path.isdir(os.path.join(pdir, "state"))
            pargs.overwrite = not pargs.resume  # a phase stopped before its first state starts again
            summary = td.train(pargs, SafeCLIPPass(inmodal))
        else:
            summary = json.load(open(os.path.join(pdir, "summary.json")))
        start += summary["steps"]
        totals = {k: v + summary[k] for k, v in totals.items()}
        prev = os.path.join(pdir, "model.safetensors")
    return finish(args, prev, record, {**summary, **totals, "minutes": round(totals["minutes"], 2)})


def _write_indices(path: str, indices: np.ndarray):
    """Every process writes the same list, each through a temporary file of its own: no reader sees half."""
    dd.atomic_write(path, lambda p: p.write_text("\n".join(map(str, indices.tolist())) + "\n"))


def _device(args):
    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def finish(args, last: str, record: dict, summary: dict) -> dict:
    """OUT gets the last phase's model.safetensors, config.json, poison manifest and eval.json, and the
    run's summary.json (steps, pairs and minutes of all phases, the splits without their index lists)."""
    out = args.out_dir
    summary = {**summary, "splits": [{k: v for k, v in s.items() if k != "safe"} for s in record["splits"]]}
    if dd.is_main_env():
        for f in ("model.safetensors", "config.json", "eval.json", pdata.MANIFEST_NAME):
            src = os.path.join(os.path.dirname(last), f)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out, f))
        ez._write_json(os.path.join(out, "summary.json"), summary)
    return summary


def build_parser():
    p = td.build_parser(__doc__, out=DEFAULT_OUT)
    p.set_defaults(epochs=8)
    g = p.add_argument_group("SafeCLIP")
    g.add_argument("--inmodal-warmup", type=int, default=5, help="passes of in-modal loss on every pair first")
    g.add_argument("--multimodal-warmup", type=int, default=1, help="then passes of CLIP loss on every pair")
    g.add_argument("--filter-lr", type=float, default=None,
                   help="constant lr of the CLIP warm-up (default: --lr / 100, the official ratio)")
    g.add_argument("--filter-step", type=float, default=0.01, help="growth of the safe share per pass")
    g.add_argument("--filter-cap", type=float, default=0.85, help="largest safe share")
    return p


def main(argv=None):
    return run(td.parse_args(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
