"""Zero-shot clean accuracy, attack success rate (ASR), robust accuracy (RA) and retrieval of DeCLIP
checkpoints, and a comparison report over several of them.

    python eval_zeroshot.py --trigger patch                       # default run dir, target from its manifest
    accelerate launch eval_zeroshot.py --ckpt runs/demo/clean runs/demo/victim runs/demo/ft \
        --trigger patch --report runs/demo --bar-asr 10 --bar-ca-drop 3
    python eval_zeroshot.py --aggregate runs/demo/seed0/report.json runs/demo/seed1/report.json --report runs/demo

Procedure (spec section 7): class embeddings from a prompt ensemble (each prompt embedding L2-normalised,
averaged over the templates, renormalised), computed once per checkpoint; image embeddings L2-normalised;
scores are cosine similarities (no logit scale); top-1 / top-5 over every test image exactly once, also
when several processes share the work (contiguous index ranges per rank, no padding duplicates).
The trigger is inserted after resize + centre crop and before normalisation (spec section 5.4).

Backdoor metrics (percentages 0-100):
  asr      share of triggered images whose true class is not the target that are classified as the target
           (BackdoorBench / CleanCLIP convention);
  asr_all  the same over all triggered images, target-class images included (the original repo, spec 5.5);
  ra       share of triggered non-target images still classified as their true class;
  DER      (max(0, ASR_v - ASR_d) - max(0, CA_v - CA_d) + 100) / 2, in percent (100 = backdoor removed at
           no cost in clean accuracy, 50 = no change), with CA = clean top-1 and ASR = asr.
A targeted-poisoning run (manifest attack 'targeted', Carlini & Terzis, arXiv 2106.09667) gets a "targeted"
block instead: success (its chosen test images classified as their own target; the report's ASR column),
collateral (the other test images misclassified as one of the chosen targets), ca_others (clean top-1
without the chosen images) and one row per chosen image.

Report (--report DIR: report.md, report.json, report.png; the report.md table is also printed): one row per
checkpoint with CA top-1/top-5, ASR, asr_all, RA, DER and `train min` (the "minutes" of the run directory's
summary.json, or --timings FILE), a total-minutes footer; rows named 'clean' (or --clean NAME) are the clean
reference, without DER or bar. --bar-asr / --bar-ca-drop give every defense row `meets bar` (ASR <= bar and
victim CA - CA <= bar) and end report.md with a sentence naming the defenses that meet it, or saying that none
does. --aggregate REPORT.json ... writes the same files with mean ± sample std (n - 1) per numeric column over
the seeds' reports, without evaluating any model. report.json records the git commit ("-dirty" with uncommitted
changes) and the command line; report.md names them in its footer.

The library part (class_embeddings, evaluate, retrieval, der, get_templates, build_test_set) is imported by
train_declip.py (--eval-every) and the defense scripts, whose evaluations therefore give this script's numbers:
one preprocessing (default_crop_pct) and one precision rule (fp32 unless --eval-bf16, in every script).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F

from data_declip import UserError, atomic_write, build_class_dataset, is_fashion_mnist, read_config, run_main
from poison_data import MANIFEST_NAME as MANIFEST_FILE

DEFAULT_TRAIN_DIR = "runs/train"  # default --out-dir of train_declip.py
MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "summary.json"  # written into every run directory by train_declip.py / defend_*.py

BASE_TEMPLATE = "a photo of a {}."
# The 7 templates found by sequential forward selection over the 80 ImageNet templates in OpenAI's
# notebook "Prompt_Engineering_for_ImageNet.ipynb" (github.com/openai/CLIP, notebooks/); open_clip ships
# them as SIMPLE_IMAGENET_TEMPLATES. `--templates 8` adds the single default prompt to them.
SELECTED_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


# --------------------------------------------------------------------------------------------------------
# small helpers


def get_templates(spec="80") -> list[str]:
    """Prompt templates from `spec`: 1 ("a photo of a {}."), 7 (OpenAI's selected subset), 8 (the 7 plus
    "a photo of a {}."), 80 (the CLIP ImageNet templates), a text file with one template per line,
    or a list of templates (returned as is). Each template holds one "{}" (or "{0}")."""
    if isinstance(spec, (list, tuple)):
        templates = [str(t) for t in spec]
    else:
        spec = str(spec).strip()
        if spec == "1":
            templates = [BASE_TEMPLATE]
        elif spec == "7":
            templates = list(SELECTED_TEMPLATES)
        elif spec == "8":
            templates = list(SELECTED_TEMPLATES) + [BASE_TEMPLATE]
        elif spec == "80":
            from poison_data import IMAGENET_TEMPLATES

            templates = list(IMAGENET_TEMPLATES)
        elif os.path.isfile(spec):
            with open(spec, encoding="utf-8") as f:
                templates = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        else:
            raise UserError(f"--templates {spec!r} is neither 1, 7, 8, 80 nor an existing file; pick one of those.")
    templates = [t.replace("{0}", "{}") for t in templates]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise UserError(f"--templates: every template needs exactly one '{{}}' placeholder (bad: {bad[:3]!r}).")
    return templates


def _cfg(model, name, default):
    return getattr(getattr(model, "config", None), name, default)


def _norm_stats(model):
    """(mean, std) the model's images are normalised with (CLIP's for a model that does not say)."""
    from modeling_declip import CLIP_MEAN, CLIP_STD

    return _cfg(model, "image_mean", CLIP_MEAN), _cfg(model, "image_std", CLIP_STD)


def _model_device(model):
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _autocast(device, bf16):
    if not bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _world(accelerator):
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def _is_main(accelerator):
    return accelerator is None or accelerator.is_main_process


def _gather_rows(t: torch.Tensor, accelerator) -> torch.Tensor:
    """Concatenate each rank's rows in rank order, without duplicates (shards may differ in size)."""
    rank, world = _world(accelerator)
    if world == 1:
        return t
    t = t.contiguous()
    info = torch.tensor([t.shape[0], t.shape[1] if t.dim() > 1 else 0], device=t.device)
    info = accelerator.gather(info).view(world, 2)
    sizes = info[:, 0].tolist()
    if t.dim() == 2 and t.shape[0] == 0:  # an empty shard does not know the feature width
        t = t.new_zeros(0, int(info[:, 1].max()))
    padded = accelerator.pad_across_processes(t, dim=0)
    g = accelerator.gather(padded)
    m = max(sizes)
    return torch.cat([g[r * m: r * m + s] for r, s in enumerate(sizes)]).to(t.device)


def _gather_list(items: list, accelerator) -> list:
    rank, world = _world(accelerator)
    if world == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def _shard_bounds(n, rank, world):
    return n * rank // world, n * (rank + 1) // world


class _IndexedRange(torch.utils.data.Dataset):
    """Items lo..hi-1 of a map-style dataset as (global index, item)."""

    def __init__(self, base, lo, hi):
        self.base, self.lo, self.hi = base, lo, hi

    def __len__(self):
        return self.hi - self.lo

    def __getitem__(self, j):
        return self.lo + j, self.base[self.lo + j]


class _StridedIterable(torch.utils.data.IterableDataset):
    """Shard of an iterable dataset as (global index, item): item i goes to exactly one (rank, worker)."""

    def __init__(self, base, rank, world, limit=None):
        self.base, self.rank, self.world, self.limit = base, rank, world, limit

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        slots, slot = self.world * nw, self.rank * nw + wid
        for i, item in enumerate(self.base):
            if self.limit is not None and i >= self.limit:
                break
            if i % slots == slot:
                yield i, item


def _is_indexable(ds):
    return hasattr(ds, "__len__") and hasattr(ds, "__getitem__") and not isinstance(
        ds, torch.utils.data.IterableDataset)


def _shard_loader(dataset, accelerator, batch_size, num_workers, collate, limit=None):
    """DataLoader over this rank's share of `dataset`: a contiguous index range for map-style datasets,
    every world-th item for iterable ones. The shares partition the dataset (each item once)."""
    rank, world = _world(accelerator)
    if _is_indexable(dataset):
        n = len(dataset) if limit is None else min(len(dataset), limit)
        lo, hi = _shard_bounds(n, rank, world)
        part = _IndexedRange(dataset, lo, hi)
    else:
        part = _StridedIterable(dataset, rank, world, limit)
    return torch.utils.data.DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=collate, drop_last=False)


def _collate_class(pairs):
    """(index, item) pairs -> dict(images uint8, labels, index); unreadable items are dropped."""
    good = [(i, it) for i, it in pairs if it is not None and it.get("image") is not None]
    if not good:
        return None
    return {"images": torch.stack([it["image"] for _, it in good]),
            "labels": torch.tensor([int(it["label"]) for _, it in good], dtype=torch.long),
            "index": [i for i, _ in good]}


def _collate_caption(pairs):
    good = [(i, it) for i, it in pairs if it is not None and it.get("image") is not None and it.get("caption")]
    if not good:
        return None
    return {"images": torch.stack([it["image"] for _, it in good]), "captions": [it["caption"] for _, it in good],
            "index": [i for i, _ in good]}


def _as_dataset(data, batch_size):
    """Accept a dataset or a (non-distributed) DataLoader; return (dataset, batch_size)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data.dataset, (data.batch_size or batch_size)
    return data, batch_size


class _EvalTrigger:
    """A trigger for evaluation: poison_data.Trigger(name, **params) (validated) or any callable on float
    [N,3,H,W] in [0,1]. Triggers with per-call randomness (patch-random at a random place) draw it per image
    from (seed, dataset index), so the result does not depend on batching or on the number of processes."""

    def __init__(self, trigger, trigger_params=None, seed=0):
        self.seed = int(seed)
        if isinstance(getattr(trigger, "name", None), str) and isinstance(getattr(trigger, "params", None), dict):
            trigger, trigger_params = trigger.name, {**trigger.params, **dict(trigger_params or {})}  # a Trigger
        if callable(trigger) and not isinstance(trigger, str):
            self.fn, self.name, self.params = trigger, getattr(trigger, "name", None) or getattr(
                trigger, "__name__", "custom"), dict(getattr(trigger, "params", None) or trigger_params or {})
            self.per_image = False
            return
        from poison_data import TRIGGERS, Trigger

        self.fn = Trigger(str(trigger), **dict(trigger_params or {}))  # UserError on unknown name / params
        self.name, self.params = self.fn.name, dict(self.fn.params)
        self.per_image = "generator" in TRIGGERS[self.name].runtime

    def for_batch(self, index):
        """Callable on the batch of float images whose dataset indices are `index`."""
        if not self.per_image:
            return self.fn

        def fn(x):
            gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + int(i)) for i in index]
            return torch.cat([self.fn(x[j:j + 1], generator=g) for j, g in enumerate(gens)])

        return fn


def make_trigger(trigger, trigger_params=None, seed=0):
    """An _EvalTrigger (or None) for a poison_data trigger name or a callable; raises UserError when unknown."""
    if trigger is None:
        return None
    if isinstance(trigger, _EvalTrigger):
        return trigger
    return _EvalTrigger(trigger, trigger_params, seed)


def resolve_target(target, classnames) -> int:
    """Index of `target` (a class name, case-insensitive, or an index) in `classnames`."""
    if isinstance(target, bool):
        raise UserError(f"--target-class {target!r} is not a class name.")
    if isinstance(target, int):
        if 0 <= target < len(classnames):
            return target
        raise UserError(f"--target-class index {target} is out of range for {len(classnames)} classes.")
    name = str(target).strip().lower()
    lowered = [c.lower() for c in classnames]
    if name in lowered:
        return lowered.index(name)
    shown = ", ".join(classnames[:12]) + (", ..." if len(classnames) > 12 else "")
    raise UserError(f"--target-class {target!r} is not among the class names ({shown}); use one of them.")


# --------------------------------------------------------------------------------------------------------
# library: class embeddings, zero-shot evaluation, retrieval, DER


@torch.no_grad()
def class_embeddings(model, classnames, templates="80", device=None, context_length=None, batch_size=256,
                     accelerator=None, bf16=False) -> torch.Tensor:
    """[C, D] float32 zero-shot classifier (spec 7): for each class, encode every filled template, L2-normalise
    each prompt embedding, average over templates, L2-normalise the mean. With an accelerator the prompts are
    split among the processes and gathered, and every process returns the full matrix."""
    from data_declip import tokenize

    templates = get_templates(templates)
    device = torch.device(device) if device is not None else _model_device(model)
    context_length = context_length or _cfg(model, "context_length", 77)
    prompts = [t.format(c) for c in classnames for t in templates]
    rank, world = _world(accelerator)
    lo, hi = _shard_bounds(len(prompts), rank, world) if len(prompts) >= world else (0, len(prompts))
    feats = []
    for s in range(lo, hi, batch_size):
        tokens = tokenize(prompts[s:min(s + batch_size, hi)], context_length=context_length, trim=True).to(device)
        with _autocast(device, bf16):
            z = model.encode_text(tokens)
        feats.append(F.normalize(z.float(), dim=-1))
    local = torch.cat(feats) if feats else torch.empty(0, 0, device=device)
    allp = _gather_rows(local, accelerator) if len(prompts) >= world else local
    emb = allp.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def default_crop_pct(data) -> float:
    """The centre-crop fraction of every evaluation, in this script and during training and defenses:
    0.875 for photos (spec 7: Resize(256) + CenterCrop(224) at 224 px), 1.0 for Fashion-MNIST, whose
    garments fill the whole padded 28-px frame."""
    return 1.0 if is_fashion_mnist(data) else 0.875


def eval_load_size(image_size, crop_pct) -> int:
    """The size test images are decoded at (shorter side resized, centre crop) so that their central crop_pct
    is the model input: 256 for 224 px at 0.875."""
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"--crop-pct {crop_pct} must be in (0, 1].")
    return int(image_size) if crop_pct >= 1.0 else int(round(image_size / crop_pct))


def build_test_set(data, image_size, crop_pct, classnames=None, root=None):
    """(dataset, classnames) of the class test data `data`, decoded at eval_load_size(image_size, crop_pct);
    evaluate(..., crop_pct=crop_pct) then crops and resizes them to the model input."""
    return _build_class_dataset(data, eval_load_size(image_size, crop_pct), classnames, root)


def _center_crop_frac(images, crop_pct):
    if crop_pct is None or crop_pct >= 1.0:
        return images
    h, w = images.shape[-2:]
    ch, cw = max(1, round(h * crop_pct)), max(1, round(w * crop_pct))
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[..., top:top + ch, left:left + cw]


def _image_features(model, images_uint8, device, image_size, mean, std, trigger, bf16, crop_pct=None):
    from data_declip import eval_transform

    x = eval_transform(_center_crop_frac(images_uint8.to(device), crop_pct), image_size, mean, std, trigger=trigger)
    with _autocast(device, bf16):
        z = model.encode_image(x)
    return F.normalize(z.float(), dim=-1)


def _class_batches(model, dataset, trig, accelerator, device, bf16, batch_size, num_workers, crop_pct, progress,
                   desc, reduce):
    """This process's share of a class dataset: per batch its labels, reduce(normalised image features),
    with a trigger reduce(features of the triggered images), and the dataset indices; four lists (the third
    empty without a trigger)."""
    from tqdm.auto import tqdm

    image_size = _cfg(model, "image_size", 224)
    mean, std = _norm_stats(model)
    loader = _shard_loader(dataset, accelerator, batch_size, num_workers, _collate_class)
    labels, clean, triggered, index = [], [], [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if batch is None:
            continue
        imgs = batch["images"]
        labels.append(batch["labels"].to(device))
        index.append(torch.tensor(batch["index"], dtype=torch.long, device=device))
        clean.append(reduce(_image_features(model, imgs, device, image_size, mean, std, None, bf16, crop_pct)))
        if trig is not None:
            triggered.append(reduce(_image_features(model, imgs, device, image_size, mean, std,
                                                    trig.for_batch(batch["index"]), bf16, crop_pct)))
    return labels, clean, triggered, index


def _backdoor_metrics(pred_trig, y, target_idx, classnames, trig) -> dict:
    """ASR, asr_all and RA (percent) from the top-1 predictions of the triggered images and their labels."""
    nontarget = y != target_idx
    hit = pred_trig == target_idx
    m = int(nontarget.sum())
    return {"trigger": trig.name, "trigger_params": trig.params, "target": classnames[target_idx],
            "asr": _pct((hit & nontarget).sum(), m), "asr_all": _pct(hit.sum(), len(y)),
            "ra": _pct(((pred_trig == y) & nontarget).sum(), m), "n": len(y), "n_nontarget": m}


def _top1(pred, y) -> float:
    """Clean top-1 accuracy (percent) of top-1 predictions `pred` against labels `y`."""
    return _pct((pred == y).sum(), len(y))


def targeted_pairs(entries, dataset=None, classnames=None, test_data=None) -> list[tuple[int, str]]:
    """(test index, target class) of a targeted-poisoning plan's manifest entries ("test_index", "target",
    "pixels_sha256"). With `dataset` (the class test set) each entry's image must be that set's item at its
    test index, pixel for pixel, and with `classnames` its target one of them; else a UserError naming
    `test_data`, the plan's test set, when known."""
    from data_declip import source_image
    from poison_data import image_sha256

    pairs = []
    for e in entries:
        i = int(e["test_index"])
        if dataset is not None:
            img = source_image(dataset, i) if 0 <= i < len(dataset) else None
            if img is None or image_sha256(img) != e["pixels_sha256"]:
                drawn = f"--data {test_data}" if test_data else "its manifest's test_data"
                raise UserError(f"test image {i} of the evaluation data is not the image the targeted-poisoning "
                                f"plan chose; evaluate on the test data the run drew it from ({drawn})")
        if classnames is not None:
            resolve_target(e["target"], classnames)
        pairs.append((i, str(e["target"])))
    return pairs


def _targeted_metrics(pred, y, index, pairs, classnames) -> dict:
    """Targeted poisoning (Carlini & Terzis, arXiv 2106.09667) from the clean top-1 predictions `pred` of the
    test images `index` (labels `y`) and the plan's (test index, target) `pairs`, percentages:
      success     chosen images classified as their target (the paper's attack success);
      collateral  the other test images misclassified as one of the chosen targets;
      ca_others   clean top-1 of the other test images (the chosen ones left out);
    and one row per chosen image (test index, true class, target, predicted, success)."""
    row_of = {int(i): r for r, i in enumerate(index.tolist())}
    chosen = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    is_target = torch.zeros(len(classnames), dtype=torch.bool, device=y.device)
    images = []
    for i, target in pairs:
        r = row_of.get(int(i))
        if r is None:
            raise UserError(f"the targeted-poisoning test image {i} is not among the readable test images")
        t = resolve_target(target, classnames)
        chosen[r] = True
        is_target[t] = True
        p = int(pred[r])
        images.append({"test_index": int(i), "true_class": classnames[int(y[r])], "target": classnames[t],
                       "predicted": classnames[p], "success": p == t})
    others = ~chosen
    m = int(others.sum())
    return {"success": _pct(sum(im["success"] for im in images), len(images)), "n": len(images),
            "collateral": _pct(((pred != y) & is_target[pred] & others).sum(), m),
            "ca_others": _top1(pred[others], y[others]), "n_others": m, "images": images}


@torch.no_grad()
def linear_probe(model, train_set, test_set, classnames, trigger=None, trigger_params=None, target=None,
                 accelerator=None, bf16=False, batch_size=256, num_workers=0, crop_pct=None, seed=0,
                 max_train=10000, c=None, progress=True) -> dict:
    """Backdoor persistence under a downstream head: a multinomial logistic regression (scikit-learn,
    L-BFGS) on the frozen, normalised image features of up to `max_train` clean training images, its
    inverse regularisation C given or chosen from 10^-2..10^3 on a held-out 20 % of them, then its clean
    accuracy on the test set and its ASR / asr_all / RA on the triggered test images (the zero-shot
    definitions). Every process returns the same dict."""
    from sklearn.linear_model import LogisticRegression

    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    device = accelerator.device if accelerator is not None else _model_device(model)
    trig = make_trigger(trigger, trigger_params, seed)
    target_idx = resolve_target(target, classnames) if trig is not None else None
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train_set), generator=g)[:max_train].sort().values.tolist()
    ident = lambda z: z  # noqa: E731

    def gathered(dataset, t, desc):
        y, z, zt, _ = _class_batches(model, dataset, t, accelerator, device, bf16, batch_size, num_workers,
                                     crop_pct, progress and _is_main(accelerator), desc, ident)
        cat = lambda xs, d: _gather_rows(torch.cat(xs) if xs else torch.zeros(0, d, device=device), accelerator)
        dim = model.config.embed_dim
        return (cat(y, 0).reshape(-1).long().cpu().numpy(), cat(z, dim).cpu().numpy(),
                cat(zt, dim).cpu().numpy() if t is not None else None)

    with _EvalMode(model):
        y_tr, z_tr, _ = gathered(torch.utils.data.Subset(train_set, pick), None, "probe features")
        y_te, z_te, z_trig = gathered(test_set, trig, "probe test")
    if len(set(y_tr.tolist())) < 2 or len(y_te) == 0:
        raise UserError("--linear-probe needs labelled training images of at least two classes and test images.")
    fit = lambda cc, x, y: LogisticRegression(C=cc, max_iter=1000).fit(x, y)  # noqa: E731
    val_top1 = None
    if c is None:  # the held-out part of the training features picks C; the test split never does
        order = np.random.default_rng(seed).permutation(len(y_tr))
        val, tr = order[:len(order) // 5], order[len(order) // 5:]
        scores = {cc: fit(cc, z_tr[tr], y_tr[tr]).score(z_tr[val], y_tr[val]) for cc in 10.0 ** np.arange(-2, 4)}
        c = max(scores, key=scores.get)
        val_top1 = 100.0 * scores[c]
    probe = fit(c, z_tr, y_tr)
    y = torch.from_numpy(y_te)
    out = {"n_train": len(y_tr), "C": float(c), "val_top1": val_top1,
           "clean": {"top1": _pct((torch.from_numpy(probe.predict(z_te)) == y).sum(), len(y)), "n": len(y)},
           "backdoor": None}
    if trig is not None:
        out["backdoor"] = _backdoor_metrics(torch.from_numpy(probe.predict(z_trig)), y, target_idx,
                                            list(classnames), trig)
    return out


class _EvalMode:
    """model.eval() inside, the previous train/eval mode restored after (periodic eval during training)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _pct(num, den):
    return 100.0 * float(num) / float(den) if den else float("nan")


@torch.no_grad()
def evaluate(model, data, classnames, templates="80", trigger=None, trigger_params=None, target=None,
             accelerator=None, bf16=False, batch_size=256, num_workers=0, class_emb=None, device=None,
             progress=True, crop_pct=None, seed=0, targeted=None) -> dict:
    """Zero-shot clean accuracy and, with `trigger` and `target`, the backdoor metrics; with `targeted`,
    the targeted-poisoning metrics.

    data: a class dataset (items dict(image=uint8[3,S,S], label=int)) or a DataLoader over one (its dataset
      and batch size are used; the sharding here replaces any distributed sampler).
    classnames: one name per label. templates: a get_templates() spec or a list (ignored with class_emb).
    trigger: a poison_data.TRIGGERS name or a callable on float [N,3,H,W] in [0,1]; trigger_params: its kwargs.
    target: class name or index. accelerator: share the images among processes (each image scored once);
      all processes return the same dict. class_emb: a precomputed class_embeddings() matrix.
    crop_pct: centre-crop this fraction of each stored image before the resize to the model's input size
      (spec 7: Resize(256) + CenterCrop(224) = images stored at 256 with crop_pct 0.875); None = all of it.
    seed: per-image randomness of random triggers (patch-random at a random place).
    targeted: (dataset index, target class) pairs of a targeted-poisoning plan (targeted_pairs()).
    Returns {"templates", "clean": {"top1","top5","n"}, "backdoor": {"trigger","trigger_params","target","asr",
      "asr_all","ra","asr_top5","n","n_nontarget","per_class_asr"} or None}, percentages in 0-100, and with
      `targeted` "targeted": {"success","n","collateral","ca_others","n_others","images"} (_targeted_metrics).
    """
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    dataset, batch_size = _as_dataset(data, batch_size)
    device = torch.device(device) if device is not None else (
        accelerator.device if accelerator is not None else _model_device(model))
    classnames = list(classnames)
    trig = make_trigger(trigger, trigger_params, seed)
    target_idx = None
    if trig is not None:
        if target is None:
            raise UserError("--target-class is needed with --trigger (or a run directory with poison_manifest.json).")
        target_idx = resolve_target(target, classnames)
    n_templates = None
    with _EvalMode(model):
        if class_emb is None:
            templates = get_templates(templates)
            n_templates = len(templates)
            class_emb = class_embeddings(model, classnames, templates, device=device, batch_size=batch_size,
                                         accelerator=accelerator, bf16=bf16)
        class_emb = class_emb.to(device).float()
        k = min(5, len(classnames))
        labels, top_clean, top_trig, index = _class_batches(
            model, dataset, trig, accelerator, device, bf16, batch_size, num_workers, crop_pct,
            progress and _is_main(accelerator), "zero-shot", lambda z: (z @ class_emb.T).topk(k, dim=-1).indices)
    empty = torch.empty(0, dtype=torch.long, device=device)
    y = _gather_rows(torch.cat(labels) if labels else empty, accelerator)
    pc = _gather_rows(torch.cat(top_clean) if top_clean else empty.view(0, k), accelerator)
    n = int(y.numel())
    if n == 0:  # every process sees the gathered count, so all of them stop here
        raise UserError("no test image could be read: check the class test data's path (--data, --eval-data) "
                        "and, for a meta file with relative image paths, its image folder (--data-root, "
                        "--eval-data-root).")
    out = {"templates": n_templates,
           "clean": {"top1": _top1(pc[:, 0], y), "top5": _pct((pc == y[:, None]).any(1).sum(), n),
                     "n": n},
           "backdoor": None}
    if targeted is not None:
        idx = _gather_rows(torch.cat(index) if index else empty, accelerator)
        out["targeted"] = _targeted_metrics(pc[:, 0], y, idx, list(targeted), classnames)
    if trig is not None:
        pt = _gather_rows(torch.cat(top_trig) if top_trig else empty.view(0, k), accelerator)
        bd = _backdoor_metrics(pt[:, 0], y, target_idx, classnames, trig)
        hit, nontarget = pt[:, 0] == target_idx, y != target_idx
        bd["asr_top5"] = _pct(((pt == target_idx).any(1) & nontarget).sum(), bd["n_nontarget"])
        bd["per_class_asr"] = {cname: _pct((hit & (y == c)).sum(), (y == c).sum()) for c, cname in enumerate(classnames)
                               if c != target_idx and int((y == c).sum()) > 0}
        out["backdoor"] = bd
    return out


EVAL_CACHE_DIR = "eval_cache"


def files_stamp(path) -> list:
    """(path, size, mtime) of a file, of every file under a directory or matching a glob pattern; a changed,
    added or removed file changes it. None: the embedded Fashion-MNIST's directory."""
    import glob

    from data_declip import fashion_mnist_dir

    path = fashion_mnist_dir() if path is None or is_fashion_mnist(path) else path
    if os.path.isdir(path):
        files = [os.path.join(d, name) for d, _, names in os.walk(path) for name in names]
    else:
        files = [f for f in glob.glob(path) if os.path.isfile(f)]
    return sorted([f, st.st_size, st.st_mtime_ns] for f, st in ((f, os.stat(f)) for f in files))


def evaluation_key(weights, data, root=None, classnames_file=None, **settings) -> str:
    """What an evaluation's numbers depend on, hashed: the weights' bytes, the test set (its data path, None =
    Fashion-MNIST, its root and its class-names file: the names, sizes and times of their files), the settings
    (templates, trigger and target or the targeted plan's images, precision, crop, seed, a holdout's flags)
    and the code that evaluates, so a changed evaluation is never served from an old result. Trigger
    parameters get their defaults filled in, so training and eval_zeroshot.py reach one key."""
    import hashlib

    import data_declip
    import modeling_declip
    import poison_data
    from data_declip import file_sha256

    if settings.get("trigger") is not None:
        settings["trigger_params"] = make_trigger(settings["trigger"], settings.get("trigger_params")).params
    h = hashlib.sha256(file_sha256(weights).encode())
    files = [files_stamp(data)] + [files_stamp(p) if p else None for p in (root, classnames_file)]
    h.update(json.dumps({"files": files, "settings": settings}, sort_keys=True, default=str).encode())
    for module in (sys.modules[__name__], data_declip, modeling_declip, poison_data):
        with open(module.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:32]


def cached_evaluation(weights, key: str, evaluate, accelerator, what: str = "evaluation") -> dict:
    """evaluate(), or the result an earlier evaluation of the same key saved beside the weights
    (EVAL_CACHE_DIR): each defense of a victim evaluates the same victim "before", and a report reads the
    victim's and each defense's evaluation from their runs. Every process evaluates unless every process
    found the result, so a launch never splits."""
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), EVAL_CACHE_DIR, key + ".json")
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError):
        found = None
    hit = torch.tensor([int(found is not None)], device=accelerator.device if accelerator is not None else "cpu")
    if int((accelerator.gather(hit) if accelerator is not None else hit).min()):
        if _is_main(accelerator):
            print(f"{what}: {path} (same weights, test set, settings and code)", file=sys.stderr)
        return found
    res = evaluate()
    if _is_main(accelerator):
        try:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(res, indent=2)))
        except OSError as e:  # a read-only run directory: the next reader evaluates again
            print(f"note: {what} is not cached ({e})", file=sys.stderr)
    return res


def _recall_grouped(sims, row_group, col_group, ks):
    """Percent of rows whose top-k columns contain a column of the row's group, for each k."""
    kmax = min(max(ks), sims.shape[1])
    top = sims.topk(kmax, dim=1).indices
    match = col_group[top] == row_group[:, None]
    return {k: _pct(match[:, :min(k, kmax)].any(1).sum(), sims.shape[0]) for k in ks}


@torch.no_grad()
def retrieval(model, caption_dataset, trigger=None, trigger_params=None, target=None, accelerator=None,
              bf16=False, batch_size=256, num_workers=0, max_items=5000, device=None, progress=True,
              ks=(1, 5, 10), crop_pct=None, seed=0) -> dict:
    """Image->text and text->image recall@k on (up to `max_items` of) a caption dataset (items dict(image,
    caption); bad items are skipped). Each image's ground truth is its own caption; identical caption
    strings count as the same caption (templated captions repeat). With a trigger and a target name,
    also the retrieval ASR: share of triggered images whose top-1 retrieved caption names the target
    ("asr": images whose own caption does not name it; "asr_all": all images)."""
    from data_declip import tokenize

    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    dataset, batch_size = _as_dataset(caption_dataset, batch_size)
    device = torch.device(device) if device is not None else (
        accelerator.device if accelerator is not None else _model_device(model))
    trig = make_trigger(trigger, trigger_params, seed)
    if trig is not None and target is None:
        raise UserError("--target-class is needed with --trigger for retrieval.")
    image_size = _cfg(model, "image_size", 224)
    mean, std = _norm_stats(model)
    context_length = _cfg(model, "context_length", 77)
    loader = _shard_loader(dataset, accelerator, batch_size, num_workers, _collate_caption, limit=max_items)
    zi, zt, zit, caps = [], [], [], []
    from tqdm.auto import tqdm

    with _EvalMode(model):
        for batch in tqdm(loader, desc="retrieval", disable=not (progress and _is_main(accelerator)), leave=False):
            if batch is None:
                continue
            caps += batch["captions"]
            zi.append(_image_features(model, batch["images"], device, image_size, mean, std, None, bf16, crop_pct))
            tokens = tokenize(batch["captions"], context_length=context_length, trim=True).to(device)
            with _autocast(device, bf16):
                zt.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
            if trig is not None:
                zit.append(_image_features(model, batch["images"], device, image_size, mean, std,
                                           trig.for_batch(batch["index"]), bf16, crop_pct))

    def cat(xs):
        return torch.cat(xs) if xs else torch.empty(0, 0, device=device)

    zi, zt = _gather_rows(cat(zi), accelerator), _gather_rows(cat(zt), accelerator)
    caps = _gather_list(caps, accelerator)
    n = len(caps)
    out = {"n": n}
    if n == 0:
        raise UserError("--retrieval-data holds no usable image-caption pairs.")
    keys = {}
    group = torch.tensor([keys.setdefault(" ".join(c.lower().split()), len(keys)) for c in caps], device=device)
    sims = zi @ zt.T
    for k, v in _recall_grouped(sims, group, group, ks).items():
        out[f"i2t_r{k}"] = v
    for k, v in _recall_grouped(sims.T, group, group, ks).items():
        out[f"t2i_r{k}"] = v
    out["backdoor"] = None
    if trig is not None:
        zit = _gather_rows(cat(zit), accelerator)
        name = str(target)
        from poison_data import names_target

        named = torch.tensor([names_target(c, name) for c in caps], device=device)
        top1 = (zit @ zt.T).argmax(dim=1)
        hit = named[top1]
        keep = ~named
        out["backdoor"] = {"trigger": trig.name, "target": name, "asr": _pct((hit & keep).sum(), keep.sum()),
                           "asr_all": _pct(hit.sum(), n), "n": n, "n_nontarget": int(keep.sum()),
                           "n_target_captions": int(named.sum())}
    return out


def attack_success(m: dict) -> float | None:
    """The attack's success rate (percent) in a metrics dict: the backdoor's ASR, else a targeted-poisoning
    run's success (chosen test images classified as their target); None when it has neither."""
    bd, tg = m.get("backdoor") or {}, m.get("targeted") or {}
    value = bd.get("asr") if bd else tg.get("success")
    return float(value) if value is not None else None


def _ca_asr(m):
    """(clean top-1, asr) from a metrics dict (evaluate() output or a --json file) or an (asr, ca) pair."""
    if isinstance(m, dict):
        return float(m["clean"]["top1"]), attack_success(m)
    asr, ca = m
    return float(ca), float(asr)


def der(victim, defended) -> float | None:
    """Defense effectiveness rating in percent: (max(0, ASR_v - ASR_d) - max(0, CA_v - CA_d) + 100) / 2,
    i.e. 100 * (dASR - dCA + 1) / 2 with the drops as fractions. Arguments: metrics dicts (evaluate() output
    or a --json file; CA = clean top-1, ASR = asr) or (asr, ca) pairs in percent. None when an ASR is missing."""
    ca_v, asr_v = _ca_asr(victim)
    ca_d, asr_d = _ca_asr(defended)
    if asr_v is None or asr_d is None or any(map(math.isnan, (ca_v, asr_v, ca_d, asr_d))):
        return None
    return (max(0.0, asr_v - asr_d) - max(0.0, ca_v - ca_d) + 100.0) / 2.0


def summary_line(metrics: dict) -> str:
    """One line: clean top-1/top-5 and, when present, ASR / asr_all / RA."""
    c = metrics["clean"]
    s = f"CA top-1 {c['top1']:.2f}%, top-5 {c['top5']:.2f}% (n={c['n']})"
    bd = metrics.get("backdoor")
    if bd:
        s += (f" | {bd['trigger']} -> {bd['target']!r}: ASR {bd['asr']:.2f}% (all {bd['asr_all']:.2f}%), "
              f"RA {bd['ra']:.2f}%")
    tg = metrics.get("targeted")
    if tg:
        s += (f" | targeted: {tg['success']:.2f}% of {tg['n']} chosen test image(s) classified as their target, "
              f"collateral {_fmt(tg['collateral'])}%, CA of the others {_fmt(tg['ca_others'])}%")
    return s


def pick_examples(dataset, n, target_idx=None, seed=0) -> list[int]:
    """n dataset indices drawn with `seed`, avoiding target-class images when a target is given."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in torch.randperm(len(dataset), generator=g)[: 50 * n + 100].tolist():
        if len(out) == n:
            break
        if target_idx is None or int(dataset[i]["label"]) != target_idx:
            out.append(i)
    return out


@torch.no_grad()
def predict_examples(model, dataset, classnames, class_emb, indices, trigger=None, trigger_params=None,
                     device=None, bf16=False, k=3, crop_pct=None, seed=0):
    """(images float [N,3,s,s] in [0,1] as fed to the model before normalisation, labels, top-k (idx, score))."""
    from data_declip import eval_transform

    device = torch.device(device) if device is not None else _model_device(model)
    trig = make_trigger(trigger, trigger_params, seed)
    trig_fn = trig.for_batch(indices) if trig is not None else None
    items = [dataset[i] for i in indices]
    imgs = _center_crop_frac(torch.stack([it["image"] for it in items]).to(device), crop_pct)
    labels = [int(it["label"]) for it in items]
    size = _cfg(model, "image_size", 224)
    mean, std = _norm_stats(model)
    view = eval_transform(imgs, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), trigger=trig_fn)
    with _EvalMode(model):
        z = _image_features(model, imgs, device, size, mean, std, trig_fn, bf16)
    sims = z @ class_emb.to(device).float().T
    top = sims.topk(min(k, len(classnames)), dim=-1)
    return view.clamp(0, 1).cpu(), labels, list(zip(top.indices.tolist(), top.values.tolist()))


# --------------------------------------------------------------------------------------------------------
# report


def _fmt(v, nd=2):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_minutes(ckpt) -> float | None:
    """Training minutes ("minutes" of summary.json) of the run directory `ckpt` or of the run directory
    holding the checkpoint file `ckpt`; None when there is no readable summary.json with a number there."""
    p = Path(ckpt)
    f = (p if p.is_dir() else p.parent) / SUMMARY_FILE
    try:
        s = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    m = s.get("minutes") if isinstance(s, dict) else None
    return float(m) if _is_number(m) else None


def _read_json(path, flag: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: cannot read it as JSON ({e}).")


def read_timings(path) -> dict:
    """--timings FILE: a JSON object mapping method name -> training minutes (a number, or null = unknown)."""
    t = _read_json(path, "--timings")
    bad = [k for k, v in t.items() if v is not None and not (_is_number(v) and v >= 0)] if isinstance(t, dict) \
        else None
    if bad is None or bad:
        raise UserError(f"--timings {path}: expected a JSON object of method name -> minutes (a number >= 0)"
                        + (f"; bad entries: {bad[:3]!r}" if bad else "") + ".")
    return {str(k): (None if v is None else float(v)) for k, v in t.items()}


def _bar_terms(bar) -> str:
    bar_asr, bar_ca = bar
    terms = ([f"ASR ≤ {bar_asr:g}%"] if bar_asr is not None else []) + (
        [f"CA drop ≤ {bar_ca:g} points"] if bar_ca is not None else [])
    return ", ".join(terms)


def _bar_active(bar):
    return bar is not None and any(b is not None for b in bar)


def meets_bar(asr, ca_drop, bar) -> bool | None:
    """Whether a defense with `asr` (percent) and clean-accuracy drop `ca_drop` (points, victim CA - CA) meets
    bar = (max ASR, max CA drop), either part None = not checked; None when a needed number is missing."""
    bar_asr, bar_ca = bar
    ok = True
    for value, limit in ((asr, bar_asr), (ca_drop, bar_ca)):
        if limit is None:
            continue
        if not _is_number(value):
            return None
        ok = ok and value <= limit + 1e-9  # percentages of counts: no float-rounding misses at the limit
    return ok


def report_rows(results: dict, victim=None, minutes=None, clean=None, bar=None) -> list[dict]:
    """One row per method (name -> metrics dict): CA top-1/top-5, asr, asr_all, ra and DER (percent)
    against `victim` (a method name in results, or a metrics dict). The victim's row and the clean reference
    rows (names in `clean`; default: a method named 'clean') have DER None and no bar. minutes: name ->
    training minutes. bar: (max ASR %, max CA drop in points against the victim), parts None = off; it gives
    every defense row "meets_bar" (True / False / None when a number is missing)."""
    vname, vmetrics = None, None
    if isinstance(victim, str):
        vname, vmetrics = victim, results[victim]
    elif isinstance(victim, dict):
        vmetrics = victim
    clean = {n for n in results if n.lower() == "clean"} if clean is None else set(clean)
    ca_v = float(vmetrics["clean"]["top1"]) if vmetrics is not None else None
    minutes = minutes or {}
    rows = []
    for name, m in results.items():
        bd = m.get("backdoor") or {}
        role = "victim" if name == vname else ("clean" if name in clean else "defense")
        ca = m["clean"]["top1"]
        row = {
            "method": name, "role": role, "ckpt": m.get("ckpt"),
            "ca_top1": ca, "ca_top5": m["clean"]["top5"],
            "asr": attack_success(m), "asr_all": bd.get("asr_all"), "ra": bd.get("ra"),
            "der": der(vmetrics, m) if (vmetrics is not None and role == "defense") else None,
            "ca_drop": ca_v - ca if (ca_v is not None and role == "defense") else None,
            "minutes": minutes.get(name),
            "meets_bar": None,
        }
        if m.get("targeted"):  # targeted poisoning: its success is the row's ASR
            row.update(collateral=m["targeted"]["collateral"], ca_others=m["targeted"]["ca_others"])
        if role == "defense" and _bar_active(bar):
            row["meets_bar"] = meets_bar(row["asr"], row["ca_drop"], bar)
        rows.append(row)
    return rows


def bar_sentence(rows, bar, n_seeds=None) -> str:
    """One plain sentence: which defense rows meet the bar, with their numbers, or that none does."""
    terms = _bar_terms(bar)
    lead = f"On the mean over {n_seeds} seeds, " if n_seeds else ""
    defenses = [r for r in rows if r.get("role", "defense") == "defense"]
    met = [r for r in defenses if r.get("meets_bar") is True]
    if not met:
        return (lead + "no" if lead else "No") + f" defense meets the bar ({terms})."

    def numbers(r):
        parts = ([f"ASR {_fmt(r['asr'])}%"] if bar[0] is not None else []) + (
            [f"CA drop {_fmt(r['ca_drop'])} points"] if bar[1] is not None else [])
        return f"{r['method']} ({', '.join(parts)})"

    verb = "meets" if len(met) == 1 else "meet"
    return (f"{lead}{len(met)} of {len(defenses)} defense{'s' if len(defenses) != 1 else ''} {verb} the bar "
            f"({terms}): {', '.join(numbers(r) for r in met)}.")


def total_minutes_line(rows) -> str:
    known = [r["minutes"] for r in rows if _is_number(r.get("minutes"))]
    if not known:
        return "Total training time: – (no row has a summary.json or a --timings entry)."
    s = f"Total training time: {sum(known):.2f} min over "
    if len(known) == len(rows):
        return s + f"all {len(rows)} rows."
    return s + f"{len(known)} of {len(rows)} rows (– = no summary.json or --timings entry)."


def _cell(r, key):
    """A table cell: the value, or 'mean ± std' for aggregated rows (just the mean for one value)."""
    if f"{key}_std" not in r:
        return _fmt(r.get(key))
    mean, std, n = r.get(key), r.get(f"{key}_std"), r.get(f"{key}_n")
    s = _fmt(mean) if std is None else f"{_fmt(mean)} ± {_fmt(std)}"
    if mean is not None and n is not None and r.get("seeds") and n < r["seeds"]:
        s += f" (n={n})"
    return s


def _bar_cell(r):
    if r.get("role", "defense") != "defense":
        return "–"
    s = {True: "yes", False: "no", None: "–"}[r.get("meets_bar")]
    if r.get("meets_bar_seeds"):
        k, n = r["meets_bar_seeds"]
        s += f" ({k}/{n} seeds)"
    return s


_COLUMNS = [("CA top-1 (%)", "ca_top1"), ("CA top-5 (%)", "ca_top5"), ("ASR (%)", "asr"),
            ("asr_all (%)", "asr_all"), ("RA (%)", "ra"), ("DER (%)", "der"), ("train min", "minutes")]
_TARGETED_COLUMN = ("collateral (%)", "collateral")  # after ASR, in tables with a targeted-poisoning row


def _columns(rows) -> list:
    if not any("collateral" in r for r in rows):
        return _COLUMNS
    return _COLUMNS[:3] + [_TARGETED_COLUMN] + _COLUMNS[3:]


def markdown_table(rows, bar=None) -> list[str]:
    """The report.md table: method, CA top-1/top-5, ASR, [collateral], asr_all, RA, DER, train min, [meets bar],
    [seeds]."""
    with_bar = _bar_active(bar)
    with_seeds = any("seeds" in r for r in rows)
    columns = _columns(rows)
    head = ["method"] + [h for h, _ in columns] + (["meets bar"] if with_bar else []) + (
        ["seeds"] if with_seeds else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["method"]] + [_cell(r, k) for _, k in columns] + ([_bar_cell(r)] if with_bar else []) + (
            [str(r.get("seeds", "–"))] if with_seeds else [])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_table(rows, bar=None) -> str:
    head = ["method", "CA top-1 %", "CA top-5 %", "ASR %", "asr_all %", "RA %", "DER %"]
    keys = ["ca_top1", "ca_top5", "asr", "asr_all", "ra", "der"]
    if any("collateral" in r for r in rows):
        head, keys = head[:4] + ["collateral %"] + head[4:], keys[:3] + ["collateral"] + keys[3:]
    if any(_is_number(r.get("minutes")) for r in rows):
        head, keys = head + ["train min"], keys + ["minutes"]
    body = [[r["method"]] + [_cell(r, k) for k in keys] for r in rows]
    if _bar_active(bar):
        head = head + ["meets bar"]
        body = [b + [_bar_cell(r)] for b, r in zip(body, rows)]
    w = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cells))
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(b) for b in body])


def json_safe(obj):
    """obj with every NaN / infinite float replaced by None (JSON has no NaN: a rate over zero images)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _write_json(path, obj):
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def provenance(argv) -> dict:
    """{"git_commit", "command"} of a report: HEAD of the git checkout holding this script, plus "-dirty" when
    tracked files have uncommitted changes (untracked files ignored, as `git describe --dirty`), None outside
    a checkout; the command line that wrote it."""
    import shlex
    import subprocess

    def git(*a):
        return subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), *a], capture_output=True,
                              text=True, timeout=60)

    try:
        head = git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 and head.stdout.strip() else None
        if commit and git("status", "--porcelain", "--untracked-files=no").stdout.strip():
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        commit = None
    return {"git_commit": commit, "command": shlex.join([os.path.basename(__file__), *map(str, argv)])}


def provenance_line(prov) -> str:
    """The report.md footer line naming the command and the commit (from provenance())."""
    if not prov:
        return ""
    commit = f"git commit {prov['git_commit']}" if prov.get("git_commit") else "no git commit (not a git checkout)"
    return f"Written by `{prov['command']}` at {commit}."


def _bar_json(rows, bar, sentence):
    if not _bar_active(bar):
        return None
    return {"asr": bar[0], "ca_drop": bar[1], "sentence": sentence,
            "meets": [r["method"] for r in rows if r.get("role") == "defense" and r.get("meets_bar") is True]}


def _der_bullet(vname):
    return (f"- DER (percent) = (max(0, ASR_v - ASR_d) - max(0, CA_v - CA_d) + 100) / 2 against "
            f"{'`' + vname + '`' if vname else 'no victim (pass --victim)'}; 50 = no change, 100 = backdoor "
            "removed at no clean cost; not given for the victim and the clean reference.")


_METRIC_BULLET = ("- CA = clean zero-shot accuracy; ASR = triggered non-target images classified as the target; "
                  "asr_all = the same over all triggered images (original repo); RA = triggered non-target images "
                  "still classified correctly; train min = training minutes of the run (its summary.json or "
                  "--timings).")


_TARGETED_BULLET = ("- targeted poisoning (Carlini & Terzis, arXiv 2106.09667): ASR = the chosen test images "
                    "classified as their own target class; collateral = the other test images misclassified as "
                    "one of the chosen targets (per-image rows and the others' CA in report.json).")


def _targeted_bullets(rows) -> list:
    return [_TARGETED_BULLET] if any("collateral" in r for r in rows) else []


def _finish_md(md, rows, bar, footer, sentence):
    """Table, footer, figure, and (with a bar) the bar sentence as the last line; returns the printable part."""
    table = markdown_table(rows, bar) + ["", footer]
    md += table + ["", "![CA and ASR per method](report.png)", ""]
    if sentence:
        md += [sentence, ""]
        table += ["", sentence]
    return "\n".join(table)


def _report_head(title: str, info: dict, bullets: list, victim, clean: list, bar, sentence, bar_scope: str) -> list:
    """The markdown lines above a report's table: title, run facts, metric notes, the bar's wording."""
    md = [title, ""]
    md += [f"- {key}: {info[key]}" for key in ("dataset", "templates", "attack", "trigger", "target")
           if info.get(key) is not None]
    md += [*bullets, _METRIC_BULLET, _der_bullet(victim)]
    if clean:
        md.append(f"- clean reference: {', '.join('`' + c + '`' for c in clean)}.")
    if sentence:
        md.append(f"- bar ({_bar_terms(bar)}; CA drop = victim CA top-1 - row CA top-1) {bar_scope}")
    md.append("")
    return md


def _write_report_files(out_dir: Path, md: list, rep: dict, rows: list, title: str):
    atomic_write(out_dir / "report.md", lambda p: p.write_text("\n".join(md), encoding="utf-8"))
    _write_json(out_dir / "report.json", rep)
    atomic_write(out_dir / "report.png", lambda p: plot_report(rows, p, title=title))


def write_report(out_dir, results: dict, victim=None, info=None, minutes=None, clean=None, bar=None,
                 prov=None) -> dict:
    """Write out_dir/report.md, report.json and report.png; return the report.json content (its "table" key
    holds the markdown table with the footer and bar sentence, as printed by the CLI). prov: provenance()
    of the run, stored in report.json and named in the footer."""
    out_dir = Path(out_dir)
    rows = report_rows(results, victim, minutes=minutes, clean=clean, bar=bar)
    info = dict(info or {})
    vname = victim if isinstance(victim, str) else ("--victim file" if isinstance(victim, dict) else None)
    vmetrics = results[victim] if isinstance(victim, str) else victim
    sentence = bar_sentence(rows, bar) if _bar_active(bar) else None
    footer = "\n".join(x for x in (total_minutes_line(rows), provenance_line(prov)) if x)
    clean_rows = [r["method"] for r in rows if r["role"] == "clean"]
    md = _report_head("# Zero-shot evaluation", info, _targeted_bullets(rows), vname, clean_rows, bar, sentence,
                      "for every row but the victim and the clean reference.")
    table = _finish_md(md, rows, bar, footer, sentence)
    known = [r["minutes"] for r in rows if _is_number(r.get("minutes"))]
    rep = {**info, "victim": vname,
           "victim_ca_top1": vmetrics["clean"]["top1"] if vmetrics is not None else None,
           "victim_asr": attack_success(vmetrics) if vmetrics is not None else None,
           "clean": clean_rows, "der_unit": "percent, 100 * (dASR - dCA + 1) / 2", "rows": rows,
           "total_minutes": sum(known) if known else None, "bar": _bar_json(rows, bar, sentence),
           **(prov or {}), "results": results}
    title = info.get("title") or ("Clean accuracy and ASR per method" + (
        f"\n{info['trigger']} -> {info['target']!r}" if info.get("trigger") else ""))
    _write_report_files(out_dir, md, rep, rows, title)
    return {**rep, "table": table}


# --------------------------------------------------------------------------------------------------------
# several seeds: mean ± std of report.json files


def _mean_std(values):
    """(mean, sample std with n - 1, n) of the numbers among values; std None for fewer than two."""
    xs = [float(v) for v in values if _is_number(v)]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, std, len(xs)


def _read_report(path) -> dict:
    rep = _read_json(path, "--aggregate")
    rows = rep.get("rows") if isinstance(rep, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "method" in r for r in rows):
        raise UserError(f"--aggregate {path}: not a report.json of eval_zeroshot.py --report (no rows).")
    return rep


def _victim_ca(rep):
    """Victim clean top-1 of one report.json: its victim row, else the stored --victim file value."""
    for r in rep["rows"]:
        if r["method"] == rep.get("victim"):
            return r.get("ca_top1")
    return rep.get("victim_ca_top1")


def aggregate_reports(paths, bar=None, clean=None) -> dict:
    """Mean ± sample std (n - 1) over several report.json files (one per seed, the same methods) for every
    numeric row column, as rows with KEY (the mean), KEY_std (None for one value) and KEY_n, plus "seeds".
    With a bar, "meets_bar" holds the verdict on the means and "meets_bar_seeds" [seeds meeting it, seeds]."""
    reps = [_read_report(p) for p in paths]
    methods = [r["method"] for r in reps[0]["rows"]]
    if len(set(methods)) != len(methods):
        raise UserError(f"--aggregate {paths[0]}: method names repeat ({methods}).")
    for p, rep in zip(paths[1:], reps[1:]):
        other = [r["method"] for r in rep["rows"]]
        if sorted(other) != sorted(methods):
            raise UserError(f"--aggregate {p}: its methods {other} differ from those of {paths[0]} ({methods}); "
                            "aggregate reports of the same study.")
    victims = {rep.get("victim") for rep in reps}
    if len(victims) > 1:
        raise UserError(f"--aggregate: the reports name different victims ({sorted(map(str, victims))}).")
    vname = victims.pop()
    clean = set(clean) if clean is not None else {
        r["method"] for rep in reps for r in rep["rows"] if r.get("role") == "clean" or r["method"].lower() == "clean"}
    if clean - set(methods):
        raise UserError(f"--clean {sorted(clean - set(methods))[0]} is not a method of the reports ({methods}).")
    by_name = [{r["method"]: r for r in rep["rows"]} for rep in reps]
    keys = []
    for rep in reps:
        for r in rep["rows"]:
            keys += [k for k, v in r.items() if _is_number(v) and k not in keys]
    # per-seed CA drop and bar verdicts, from each file's own victim CA
    v_cas = [_victim_ca(rep) for rep in reps]
    if bar is not None and bar[1] is not None and not all(_is_number(v) for v in v_cas):
        raise UserError("--bar-ca-drop needs the victim's clean accuracy in every report (a victim row or a "
                        "--victim file when they were written).")
    rows = []
    for name in methods:
        seed_rows = [b[name] for b in by_name]
        role = "victim" if name == vname else ("clean" if name in clean else "defense")
        drops = [v - r["ca_top1"] if role == "defense" and _is_number(v) and _is_number(r.get("ca_top1"))
                 else None for v, r in zip(v_cas, seed_rows)]
        row = {"method": name, "role": role, "seeds": len(reps), "ckpts": [r.get("ckpt") for r in seed_rows]}
        for k in keys + (["ca_drop"] if "ca_drop" not in keys else []):
            vals = drops if k == "ca_drop" else [r.get(k) for r in seed_rows]
            if k in ("der", "ca_drop") and role != "defense":
                vals = []
            row[k], row[f"{k}_std"], row[f"{k}_n"] = _mean_std(vals)
        row["meets_bar"], row["meets_bar_seeds"] = None, None
        if role == "defense" and _bar_active(bar):
            row["meets_bar"] = meets_bar(row.get("asr"), row.get("ca_drop"), bar)
            verdicts = [meets_bar(r.get("asr"), d, bar) for r, d in zip(seed_rows, drops)]
            row["meets_bar_seeds"] = [sum(v is True for v in verdicts), len(verdicts)]
        rows.append(row)
    totals = [sum(r["minutes"] for r in rep["rows"] if _is_number(r.get("minutes"))) for rep in reps
              if any(_is_number(r.get("minutes")) for r in rep["rows"])]
    t_mean, t_std, t_n = _mean_std(totals)
    info = {k: reps[0].get(k) for k in ("dataset", "templates", "attack", "trigger", "target")
            if reps[0].get(k) is not None and all(rep.get(k) == reps[0].get(k) for rep in reps)}
    return {**info, "aggregate_of": [str(p) for p in paths], "n_seeds": len(reps), "std": "sample (n - 1)",
            "victim": vname, "clean": [m for m in methods if m in clean], "rows": rows,
            "total_minutes": {"mean": t_mean, "std": t_std, "n": t_n, "per_seed": totals}}


def write_aggregate(out_dir, paths, bar=None, clean=None, prov=None) -> dict:
    """Write out_dir/report.md, report.json and report.png for aggregate_reports(paths); return report.json
    content plus "table" (what the CLI prints). prov: as for write_report."""
    out_dir = Path(out_dir)
    rep = {**aggregate_reports(paths, bar=bar, clean=clean), **(prov or {})}
    rows, n = rep["rows"], rep["n_seeds"]
    sentence = bar_sentence(rows, bar, n_seeds=n) if _bar_active(bar) else None
    rep["bar"] = _bar_json(rows, bar, sentence)
    t = rep["total_minutes"]
    if t["mean"] is None:
        footer = "Total training time: – (no row of any report has training minutes)."
    else:
        spread = f" ± {t['std']:.2f}" if t["std"] is not None else ""
        footer = (f"Total training time per seed: {t['mean']:.2f}{spread} min (all rows; mean"
                  f"{' ± std' if spread else ''} over {t['n']} seed{'s' if t['n'] != 1 else ''}); "
                  f"all seeds together: {sum(t['per_seed']):.2f} min.")
    footer = "\n".join(x for x in (footer, provenance_line(prov)) if x)
    seeds = [f"- seeds: {n} (" + ", ".join(f"`{p}`" for p in rep["aggregate_of"]) + ")",
             "- each cell: mean ± sample standard deviation (n - 1) over the seeds (just the mean for one seed); "
             "(n=k) = only k seeds had the number."]
    md = _report_head(f"# Zero-shot evaluation: mean ± std over {n} seed{'s' if n != 1 else ''}", rep,
                      seeds + _targeted_bullets(rows),
                      rep["victim"], rep["clean"], bar, sentence,
                      "checked on the means; (k/n seeds) = seeds on which the row meets it alone.")
    table = _finish_md(md, rows, bar, footer, sentence)
    title = f"Clean accuracy and ASR per method\nmean ± std over {n} seed{'s' if n != 1 else ''}" + (
        f", {rep['trigger']} -> {rep['target']!r}" if rep.get("trigger") and rep.get("target") else "")
    _write_report_files(out_dir, md, rep, rows, title)
    return {**rep, "table": table}


def plot_report(rows, path, title=None):
    """CA and ASR bars per method; rows with "ca_top1_std" / "asr_std" (aggregates) get std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(key):
        return [float(r[key]) if _is_number(r.get(key)) else float("nan") for r in rows]

    names = [r["method"] for r in rows]
    ca, asr = col("ca_top1"), col("asr")
    errs = [[0.0 if math.isnan(e) else e for e in col(f"{k}_std")] for k in ("ca_top1", "asr")]
    with_err = any(f"{k}_std" in r for r in rows for k in ("ca_top1", "asr"))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4.2), dpi=120)
    x = list(range(len(rows)))
    w = 0.38
    kw = dict(capsize=4, error_kw={"elinewidth": 1.2, "ecolor": "#333333"})
    b1 = ax.bar([i - w / 2 for i in x], ca, w, label="clean accuracy (top-1)", color="#4C72B0",
                **(dict(yerr=errs[0], **kw) if with_err else {}))
    b2 = ax.bar([i + w / 2 for i in x], asr, w, label="attack success rate", color="#C44E52",
                **(dict(yerr=errs[1], **kw) if with_err else {}))
    for bars, vals, err in ((b1, ca, errs[0]), (b2, asr, errs[1])):
        for b, v, e in zip(bars, vals, err):
            if not math.isnan(v):
                ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v + (e if with_err else 0.0)),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
    ax.set_ylim(0, 115 if with_err else 110)
    ax.set_ylabel("% (mean ± std over seeds)" if with_err else "%")
    ax.set_title(title or "Clean accuracy and ASR per method", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15 if len(rows) <= 4 else -0.25), ncol=2,
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_examples(images, labels, preds, classnames, path, target=None, title=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 3.1 * rows + 0.4), dpi=110, squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        lines = [f"true: {classnames[labels[i]]}"]
        lines += [f"{j + 1}. {classnames[c]} ({s:.2f})" for j, (c, s) in enumerate(zip(*preds[i]))]
        ax.set_title("\n".join(lines), fontsize=8, loc="left",
                     color="#C44E52" if target is not None and preds[i][0][0] == target else "black")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# CLI


def _load_model(path, device="cpu", activation=None):
    from modeling_declip import CheckpointError, load_model

    try:
        return load_model(str(path), device=device, activation=activation)
    except CheckpointError as e:
        raise UserError(f"--ckpt {path}: {e}.") from None


def runs_test_data(resolved) -> tuple:
    """(--eval-data, --eval-data-root) that the training runs among the checkpoints evaluated on (their
    config.json), so that a run trained with its own test set is not measured on Fashion-MNIST by default;
    (None, None) when none names one. Runs that name different ones need --data."""
    from train_declip import run_config

    named = {}
    for wpath, _ in resolved:
        cfg = run_config(os.path.dirname(os.path.abspath(wpath)))
        if cfg.get("eval_data") is not None and not cfg.get("holdout"):
            named.setdefault((cfg["eval_data"], cfg.get("eval_data_root")), wpath)
    if len(named) > 1:
        raise UserError("the checkpoints' runs were evaluated on different test data ("
                        + ", ".join(f"{d} for {w}" for (d, _), w in named.items()) + "); pass --data")
    if named:
        (data, root), wpath = next(iter(named.items()))
        print(f"[eval] test data: {data}, the --eval-data of {wpath}'s run (--data to change it)", file=sys.stderr)
        return data, root
    return None, None


def _build_class_dataset(data, image_size, classnames, root=None):
    return build_class_dataset(data, split="test", image_size=image_size, classnames=classnames, root=root)


def _build_caption_dataset(data, image_size, split=None):
    from data_declip import build_caption_dataset

    return build_caption_dataset(data, image_size=image_size, split=split)


def read_manifest(path) -> dict:
    """{"trigger", "trigger_params", "target", "targeted", "count"} of a poison_manifest.json (or a run directory
    holding one); "targeted": a targeted-poisoning plan's entries (no trigger, no single target), else None;
    "count": its number of poisoned pairs."""
    from poison_data import PoisonPlan

    plan = PoisonPlan.from_manifest(str(path))
    if plan.attack == "targeted":
        return {"trigger": None, "trigger_params": {}, "target": None, "targeted": list(plan.targeted),
                "test_data": plan.test_data, "count": len(plan.indices)}
    return {"trigger": plan.trigger, "trigger_params": dict(plan.trigger_params), "target": plan.target,
            "targeted": None, "count": len(plan.indices)}


def _manifest_from_metadata(weights) -> dict | None:
    """The poison manifest (summary) stored in our .safetensors metadata, when it names trigger and target."""
    if not str(weights).endswith(".safetensors"):
        return None
    try:
        from modeling_declip import read_metadata

        meta = read_metadata(str(weights)) or {}
    except Exception:  # foreign or unreadable metadata: loading reports real problems later
        return None
    for key in ("poison_manifest", "poison", "manifest"):
        m = meta.get(key)
        if isinstance(m, dict) and m.get("attack") == "targeted" and isinstance(m.get("targeted"), list):
            return {"trigger": None, "trigger_params": {}, "target": None, "targeted": m["targeted"],
                    "test_data": m.get("test_data"), "count": m.get("count")}
        if isinstance(m, dict) and m.get("trigger") and m.get("target"):
            return {"trigger": m["trigger"], "trigger_params": dict(m.get("trigger_params") or {}),
                    "target": m["target"], "targeted": None, "count": m.get("count")}
    return None


def resolve_ckpt(path, hint: str = "") -> tuple:
    """(weights file, manifest path or None) of a run directory (ours, or a transformers / open_clip
    directory) or a checkpoint file; the manifest is the poison manifest beside the weights.
    hint: what to do when the path does not exist (default: for train_declip.py's default output)."""
    from modeling_declip import checkpoint_file

    p = Path(path)
    if p.is_dir():
        w = checkpoint_file(str(p))
        if w is None:
            raise UserError(f"--ckpt {path}: directory has no {MODEL_FILE}; pass a run directory of "
                            "train_declip.py / defend_*.py or a checkpoint file.")
        d = p
    elif p.is_file():
        w, d = str(p), p.parent
    else:
        if not hint and str(path).rstrip("/") == DEFAULT_TRAIN_DIR:
            hint = ("the default output of `accelerate launch train_declip.py --poison-rate 0.01 --trigger patch`;"
                    " train it first")
        raise UserError(f"--ckpt {path} does not exist{f' ({hint})' if hint else ''}; pass a run directory or a "
                        f"checkpoint file.")
    man = d / MANIFEST_FILE
    return w, (str(man) if man.is_file() else None)


def _default_name(path):
    p = Path(path)
    if p.is_file() and p.name == MODEL_FILE:
        p = p.parent
    elif p.is_file():
        return p.name.split(".")[0]
    return p.resolve().name or str(path)


def parse_trigger_params(items) -> dict:
    """['margin=3', 'delta=20/255'] -> dict (poison_data's parser: ints, floats, a/b, bools, none)."""
    from poison_data import parse_trigger_params as parse

    return parse(items)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of defaults (keys = flag names); flags override it")
    p.add_argument("--ckpt", nargs="+", action="extend", default=None,
                   help=f"checkpoint file(s) or run directories (DIR/{MODEL_FILE}); repeatable "
                        f"[default: {DEFAULT_TRAIN_DIR}]")
    p.add_argument("--activation", choices=("quick_gelu", "gelu"), default=None,
                   help="MLP activation of a bare open_clip/OpenAI state dict, which cannot say it (default: "
                        "quick_gelu, with a note; open_clip's non-quickgelu models need gelu)")
    p.add_argument("--names", nargs="+", action="extend", default=None,
                   help="display name per --ckpt (default: run directory / file name)")
    p.add_argument("--data", default=None, help="class test data: fashion-mnist, an ImageFolder directory with "
                   "--classnames, or a JSON-lines meta with label/label_name (default: the --eval-data the "
                   "checkpoints' training runs evaluated on, else fashion-mnist)")
    p.add_argument("--data-root", default=None, help="directory the image paths of a --data meta file (JSONL, "
                   "CSV, HF) are relative to (default: the meta file's directory)")
    p.add_argument("--classnames", default=None, help="class-names file (one name per line, in label order)")
    p.add_argument("--templates", default="80", help="prompt templates: 1, 7, 8, 80 or a file (one per line)")
    p.add_argument("--trigger", default=None, help="trigger name of poison_data (default: the run's manifest)")
    p.add_argument("--trigger-param", action="append", default=[], metavar="K=V",
                   help="trigger parameter, repeatable (overrides the manifest's)")
    p.add_argument("--target-class", default=None, help="target class name (default: the run's manifest)")
    p.add_argument("--manifest", default=None, help="poison_manifest.json to read trigger/target from "
                   "(default: each run directory's own, else the first one found among --ckpt)")
    p.add_argument("--no-backdoor", action="store_true", help="clean accuracy only, even with a manifest")
    p.add_argument("--victim", default=None, help="victim for DER: a name among --names or a metrics JSON "
                   "written by --json (default: the checkpoint named 'victim')")
    p.add_argument("--retrieval-data", default=None, help="caption data for image<->text retrieval (optional)")
    p.add_argument("--retrieval-split", default=None, help="split of --retrieval-data (fashion-mnist: test "
                   "gives held-out captioned images; default: the format's default, train for fashion-mnist)")
    p.add_argument("--retrieval-max", type=int, default=5000, help="use at most this many retrieval pairs")
    p.add_argument("--linear-probe", action="store_true",
                   help="also fit a logistic-regression probe on frozen image features of clean training images and "
                        "report its CA and ASR (does the backdoor survive a head trained on clean data?)")
    p.add_argument("--probe-data", default=None,
                   help="labelled training images of the probe (default: the training split of --data: "
                        "Fashion-MNIST's, or an image folder's train/)")
    p.add_argument("--probe-max", type=int, default=10000, help="fit the probe on at most this many images")
    p.add_argument("--probe-c", type=float, default=None,
                   help="the probe's inverse regularisation C (default: chosen on a held-out 20%% of its images)")
    p.add_argument("--json", default=None, help="write metrics JSON here (dict keyed by name for several ckpts)")
    p.add_argument("--report", default=None, help="directory for report.md, report.json and report.png")
    p.add_argument("--timings", default=None, metavar="FILE", help="JSON object of method name -> training "
                   f"minutes for the report's 'train min' column (overrides each run directory's {SUMMARY_FILE})")
    p.add_argument("--clean", nargs="+", action="extend", default=None, metavar="NAME",
                   help="clean-reference row(s): no DER and no bar for them (default: the row named 'clean')")
    p.add_argument("--bar-asr", type=float, default=None, metavar="PCT",
                   help="bar: a defense meets it with ASR <= PCT (default: no bar)")
    p.add_argument("--bar-ca-drop", type=float, default=None, metavar="POINTS",
                   help="bar: a defense meets it losing <= POINTS of clean top-1 against the victim (default: no bar)")
    p.add_argument("--aggregate", nargs="+", action="extend", default=None, metavar="REPORT_JSON",
                   help="no evaluation: write --report DIR with mean ± std (sample, n - 1) over these report.json "
                        "files of one study run with several seeds")
    p.add_argument("--show-examples", type=int, default=0, metavar="N",
                   help="write a PNG of N triggered test images with top-3 predictions per checkpoint")
    p.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction before the resize to the "
                   "model input (spec 7: 0.875 = Resize(256)+CenterCrop(224)); default 1.0 for Fashion-MNIST, "
                   "0.875 for other data")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size per process")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per process")
    p.add_argument("--eval-bf16", "--bf16", dest="eval_bf16", action="store_true",
                   help="bf16 autocast for the towers (faster; numbers may differ from the fp32 default, which "
                        "training's and the defenses' evaluations use unless they get --eval-bf16 too)")
    p.add_argument("--seed", type=int, default=0, help="seed (random triggers, example selection)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return p


def parse_args(argv=None):
    p = build_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        merged = read_config(pre.config, p, ("eval_zeroshot", "eval"))
        lists = {k: merged.pop(k) for k in ("ckpt", "names", "trigger_param", "clean", "aggregate") if k in merged}
        p.set_defaults(**merged)
    else:
        lists = {}
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the report's provenance
    for k, v in lists.items():  # list flags from the YAML apply only when not given on the command line
        if not getattr(args, k):
            setattr(args, k, [v] if isinstance(v, str) else list(v))
    return args


def _load_victim_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--victim {path}: not a checkpoint name and not a readable metrics JSON ({e}).")
    if isinstance(m, dict) and "results" in m and isinstance(m["results"], dict):  # report.json
        m = m["results"].get(m.get("victim")) or next(iter(m["results"].values()))
    elif isinstance(m, dict) and "clean" not in m and m:  # --json of several checkpoints
        m = m.get("victim") or next(iter(m.values()))
    if not isinstance(m, dict) or "clean" not in m or attack_success(m) is None:
        raise UserError(f"--victim {path}: needs a metrics JSON of eval_zeroshot.py --json with a backdoor ASR "
                        f"(or a targeted-poisoning success).")
    return m


def _plan_backdoor(args, resolved, params_flag):
    """Per checkpoint (trigger, params, target, targeted): flags first, then the run's own poison manifest (file
    or checkpoint metadata), then --manifest / the first manifest among the checkpoints. targeted: the entries
    of a targeted-poisoning manifest (measured unless --trigger / --target-class ask for a backdoor), else None."""
    manifests = []
    for wpath, mpath in resolved:
        m = read_manifest(mpath) if mpath is not None else _manifest_from_metadata(wpath)
        # a run that poisoned no pair (--poison-rate 0: a clean baseline) names no attack; its defaults
        # (trigger, target) must not measure it or the others
        manifests.append(m if m is not None and m["count"] != 0 else None)
    if args.manifest:
        if not os.path.exists(args.manifest):
            raise UserError(f"--manifest {args.manifest} does not exist; pass a poison_manifest.json.")
        shared = read_manifest(args.manifest)
    else:
        shared = next((m for m in manifests if m is not None), None)
    plans = []
    for own in manifests:
        if args.no_backdoor:
            plans.append((None, {}, None, None))
            continue
        man = shared if args.manifest else (own or shared)
        man = man or {"trigger": None, "trigger_params": {}, "target": None, "targeted": None}
        if man.get("targeted") and args.trigger is None and args.target_class is None:
            plans.append((None, {}, None, (man["targeted"], man.get("test_data"))))
            continue
        trig = args.trigger or man["trigger"]
        params = dict(man["trigger_params"]) if (man["trigger"] and trig == man["trigger"]) else {}
        params.update(params_flag)
        tgt = args.target_class if args.target_class is not None else man["target"]
        if trig is not None and tgt is None:
            raise UserError("--trigger needs a target: pass --target-class or a --ckpt run directory with "
                            f"{MANIFEST_FILE}.")
        if trig is None and args.target_class is not None:
            raise UserError("--target-class needs a trigger: pass --trigger or a run with a poison manifest.")
        if trig is not None:
            params = make_trigger(trig, params).params  # validates name and parameters
        plans.append((trig, params, tgt, None))
    return plans


def _victim_ref(args, names):
    if args.victim and args.victim in names:
        return args.victim
    if args.victim:
        return _load_victim_json(args.victim)
    return next((n for n in names if n.lower() == "victim"), None)


def _bar_args(args):
    """(--bar-asr, --bar-ca-drop) or None when neither is given."""
    if args.bar_asr is not None and not 0.0 <= args.bar_asr <= 100.0:
        raise UserError(f"--bar-asr {args.bar_asr:g} must be a percentage in [0, 100].")
    if args.bar_ca_drop is not None and not math.isfinite(args.bar_ca_drop):
        raise UserError(f"--bar-ca-drop {args.bar_ca_drop} must be a number of points.")
    bar = (args.bar_asr, args.bar_ca_drop)
    return bar if _bar_active(bar) else None


def run_aggregate(args) -> dict:
    """--aggregate: mean ± std over report.json files; no model is loaded."""
    t0 = time.time()
    if not args.report:
        raise UserError("--aggregate needs --report DIR to write the mean ± std report into.")
    if args.ckpt:
        raise UserError("--aggregate evaluates no checkpoint: drop --ckpt (it reads report.json files only).")
    if args.timings:
        raise UserError("--timings applies to evaluation runs; --aggregate takes the minutes from the report.json "
                        "files.")
    paths = []
    for path in args.aggregate:
        p = Path(path) / "report.json" if Path(path).is_dir() else Path(path)
        if not p.is_file():
            raise UserError(f"--aggregate {path} does not exist; pass report.json files written by --report.")
        paths.append(str(p))
    bar = _bar_args(args)
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch: one writer
        return {}
    rep = write_aggregate(args.report, paths, bar=bar, clean=args.clean, prov=provenance(args.argv))
    print(rep["table"])
    print(f"eval_zeroshot: mean ± std over {rep['n_seeds']} report(s), {time.time() - t0:.1f} s; wrote "
          f"{args.report}", file=sys.stderr)
    return rep


def _minutes(args, names, ckpts):
    """name -> training minutes: each run directory's summary.json, overridden by --timings."""
    minutes = {name: read_minutes(c) for name, c in zip(names, ckpts)}
    if args.timings:
        timings = read_timings(args.timings)
        unknown = [k for k in timings if k not in minutes]
        if unknown:
            print(f"[eval] --timings {args.timings}: no row named {', '.join(unknown)}; ignored.", file=sys.stderr)
        minutes.update({k: v for k, v in timings.items() if k in minutes})
    return minutes


def run(args) -> dict:
    """The CLI: evaluate every checkpoint, print the table, write --json / --report / examples."""
    if args.aggregate:
        return run_aggregate(args)
    from accelerate import Accelerator

    t0 = time.time()
    torch.manual_seed(args.seed)
    ckpts = args.ckpt or [DEFAULT_TRAIN_DIR]
    names = list(args.names or [_default_name(c) for c in ckpts])
    if len(names) != len(ckpts):
        raise UserError(f"--names gives {len(names)} names for {len(ckpts)} --ckpt; give one name per checkpoint.")
    for i in range(len(names)):  # unique display names
        if names[i] in names[:i]:
            names[i] = f"{names[i]}-{i}"
    if args.batch_size < 1 or args.show_examples < 0 or args.retrieval_max < 1 or args.probe_max < 2:
        raise UserError("--batch-size and --retrieval-max must be positive, --probe-max at least 2 and "
                        "--show-examples >= 0.")
    if args.probe_c is not None and args.probe_c <= 0:
        raise UserError(f"--probe-c must be positive, got {args.probe_c}")
    resolved = [resolve_ckpt(c) for c in ckpts]
    if args.data is None and args.data_root is None:
        args.data, args.data_root = runs_test_data(resolved)
    templates = get_templates(args.templates)
    plans = _plan_backdoor(args, resolved, parse_trigger_params(args.trigger_param))
    victim = _victim_ref(args, names)
    bar = _bar_args(args)
    if bar is not None and bar[1] is not None and victim is None:
        raise UserError("--bar-ca-drop needs a victim: a checkpoint named 'victim', --victim NAME or "
                        "--victim METRICS.json.")
    for c in args.clean or []:
        if c not in names:
            raise UserError(f"--clean {c} is not among the checkpoint names ({', '.join(names)}).")
        if c == victim:
            raise UserError(f"--clean {c} is the victim; name the clean reference run instead.")
    minutes = _minutes(args, names, ckpts)
    classnames_arg = args.classnames
    if classnames_arg is not None and not os.path.isfile(classnames_arg):
        raise UserError(f"--classnames {classnames_arg} does not exist; pass a file with one class name per line.")
    crop_pct = args.crop_pct if args.crop_pct is not None else default_crop_pct(args.data)
    eval_load_size(1, crop_pct)  # validates it before any model is loaded

    from train_declip import use_available_cores, use_cpu

    accelerator = Accelerator(cpu=use_cpu(args.cpu))  # launch-config and CPU-thread rules of train_declip
    use_available_cores(accelerator.device)
    main_proc = accelerator.is_main_process
    datasets, captions, results, example_paths = {}, {}, {}, []
    for name, (wpath, _), (trig, params, tgt, chosen) in zip(names, resolved, plans):
        if main_proc:
            print(f"[eval] {name}: {wpath}", file=sys.stderr)
        act = getattr(args, "activation", None)
        model = _load_model(wpath, device=accelerator.device, activation=act).to(accelerator.device).eval()
        size = int(_cfg(model, "image_size", 224))
        load_size = eval_load_size(size, crop_pct)
        if load_size not in datasets:
            datasets[load_size] = build_test_set(args.data, size, crop_pct, classnames_arg, args.data_root)
        dataset, classnames = datasets[load_size]
        classnames = list(classnames)
        target = classnames[resolve_target(tgt, classnames)] if tgt is not None else None
        class_emb = class_embeddings(model, classnames, templates, device=accelerator.device,
                                     batch_size=args.batch_size, accelerator=accelerator, bf16=args.eval_bf16)
        pairs = targeted_pairs(chosen[0], dataset, classnames, chosen[1]) if chosen else None  # images checked
        settings = dict(templates=templates, bf16=args.eval_bf16, crop_pct=crop_pct, seed=args.seed)
        if chosen:
            settings["targeted"] = chosen[0]
        else:
            settings.update(trigger=trig, trigger_params=params, target=target)
        compute = partial(evaluate, model, dataset, classnames, templates, trigger=trig, trigger_params=params,
                          target=target, accelerator=accelerator, bf16=args.eval_bf16, batch_size=args.batch_size,
                          num_workers=args.workers, class_emb=class_emb, crop_pct=crop_pct, seed=args.seed,
                          targeted=pairs)
        # a run that evaluated these weights the same way (a training run, a defense) saved it: read it
        m = cached_evaluation(wpath, evaluation_key(wpath, args.data, args.data_root, classnames_arg, **settings),
                              compute, accelerator, f"[eval] {name}")
        m = {"ckpt": str(wpath), "dataset": args.data or "fashion-mnist", "templates": len(templates),
             "clean": m["clean"], "backdoor": m["backdoor"], "retrieval": None,
             **({"targeted": m["targeted"]} if pairs else {})}
        if args.retrieval_data:
            if load_size not in captions:
                captions[load_size] = _build_caption_dataset(args.retrieval_data, load_size, args.retrieval_split)
            m["retrieval"] = retrieval(model, captions[load_size], trigger=trig, trigger_params=params,
                                       target=target, accelerator=accelerator, bf16=args.eval_bf16,
                                       batch_size=args.batch_size, num_workers=args.workers,
                                       max_items=args.retrieval_max, crop_pct=crop_pct, seed=args.seed)
        if args.linear_probe:
            if ("probe", load_size) not in datasets:
                datasets["probe", load_size] = build_class_dataset(
                    args.probe_data or args.data, split="train", image_size=load_size, classnames=classnames_arg,
                    root=args.data_root if args.probe_data is None else None)
            m["linear_probe"] = linear_probe(model, datasets["probe", load_size][0], dataset, classnames, trigger=trig,
                                             trigger_params=params, target=target, accelerator=accelerator,
                                             bf16=args.eval_bf16, batch_size=args.batch_size, num_workers=args.workers,
                                             crop_pct=crop_pct, seed=args.seed, max_train=args.probe_max,
                                             c=args.probe_c)
        if args.show_examples > 0 and main_proc:
            path = Path(args.report or ".") / f"examples_{name}.png"
            tidx = classnames.index(target) if target is not None else None
            idx = pick_examples(dataset, args.show_examples, tidx, args.seed)
            imgs, labels, preds = predict_examples(model, dataset, classnames, class_emb, idx, trigger=trig,
                                                   trigger_params=params, device=accelerator.device,
                                                   bf16=args.eval_bf16, crop_pct=crop_pct, seed=args.seed)
            what = f"triggered ({trig}) test images, target {target!r}" if trig else "clean test images"
            atomic_write(path, lambda p: plot_examples(imgs, labels, preds, classnames, p, target=tidx,
                                                        title=f"{name}: {what}; top-3 predictions (cosine)"
                                                        + ("; red = classified as the target" if trig else "")))
            example_paths.append(str(path))
        results[name] = m
        if main_proc:
            print(f"[eval] {name}: {summary_line(m)}", file=sys.stderr)
            lp = m.get("linear_probe")
            if lp:
                print(f"[eval] {name}: linear probe (C {lp['C']:g}, {lp['n_train']} images) CA {lp['clean']['top1']:.2f}%"
                      + (f", ASR {lp['backdoor']['asr']:.2f}%" if lp["backdoor"] else ""), file=sys.stderr)
        del model
    if main_proc:
        rows = report_rows(results, victim, minutes=minutes, clean=args.clean, bar=bar)
        if not args.report:  # with --report the report.md table is printed at the end
            print(format_table(rows, bar))
            if bar is not None:
                print(bar_sentence(rows, bar))
        for name, m in results.items():
            r = m.get("retrieval")
            if r:
                line = (f"retrieval {name}: i2t R@1/5/10 {r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f}, "
                        f"t2i {r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f} (n={r['n']})")
                if r.get("backdoor"):
                    line += f", retrieval ASR {r['backdoor']['asr']:.1f}% (all {r['backdoor']['asr_all']:.1f}%)"
                print(line)
        if args.json:
            _write_json(args.json, next(iter(results.values())) if len(results) == 1 else results)
        if args.report:
            first = next(iter(results.values()))
            bd = first.get("backdoor") or {}
            rep = write_report(args.report, results, victim, minutes=minutes, clean=args.clean, bar=bar, info={
                "dataset": first["dataset"], "templates": len(templates), "trigger": bd.get("trigger"),
                "target": bd.get("target"), "n": first["clean"]["n"],
                **({"attack": "targeted"} if first.get("targeted") else {})}, prov=provenance(args.argv))
        outs = [p for p in (args.json, args.report) if p] + example_paths
        print(f"eval_zeroshot: {len(results)} checkpoint(s), {next(iter(results.values()))['clean']['n']} test "
              f"images each, {time.time() - t0:.1f} s" + (f"; wrote {', '.join(outs)}" if outs else ""),
              file=sys.stderr)
        if args.report:
            print(rep["table"])  # the report.md table (with total minutes and the bar sentence), last
    accelerator.wait_for_everyone()
    return results


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
