"""Zero-shot clean accuracy, attack success rate (ASR), robust accuracy (RA) and retrieval of DeCLIP
checkpoints, and a comparison report over several of them.

    python eval_zeroshot.py --trigger patch                       # default run dir, target from its manifest
    accelerate launch eval_zeroshot.py --ckpt runs/demo/clean runs/demo/victim runs/demo/ft \
        --trigger patch --report runs/demo

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

The library part (class_embeddings, evaluate, retrieval, der, get_templates) is imported by
train_declip.py (--eval-every) and the defense scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from data_declip import UserError

DEFAULT_TRAIN_DIR = "runs/train"  # default --out-dir of train_declip.py
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "poison_manifest.json"

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
        tokens = tokenize(prompts[s:min(s + batch_size, hi)], context_length=context_length).to(device)
        with _autocast(device, bf16):
            z = model.encode_text(tokens)
        feats.append(F.normalize(z.float(), dim=-1))
    local = torch.cat(feats) if feats else torch.empty(0, 0, device=device)
    allp = _gather_rows(local, accelerator) if len(prompts) >= world else local
    emb = allp.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


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
             progress=True, crop_pct=None, seed=0) -> dict:
    """Zero-shot clean accuracy and, with `trigger` and `target`, the backdoor metrics.

    data: a class dataset (items dict(image=uint8[3,S,S], label=int)) or a DataLoader over one (its dataset
      and batch size are used; the sharding here replaces any distributed sampler).
    classnames: one name per label. templates: a get_templates() spec or a list (ignored with class_emb).
    trigger: a poison_data.TRIGGERS name or a callable on float [N,3,H,W] in [0,1]; trigger_params: its kwargs.
    target: class name or index. accelerator: share the images among processes (each image scored once);
      all processes return the same dict. class_emb: a precomputed class_embeddings() matrix.
    crop_pct: centre-crop this fraction of each stored image before the resize to the model's input size
      (spec 7: Resize(256) + CenterCrop(224) = images stored at 256 with crop_pct 0.875); None = all of it.
    seed: per-image randomness of random triggers (patch-random at a random place).
    Returns {"templates", "clean": {"top1","top5","n"}, "backdoor": {"trigger","trigger_params","target","asr",
      "asr_all","ra","asr_top5","n","n_nontarget","per_class_asr"} or None}, percentages in 0-100.
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
    image_size = _cfg(model, "image_size", 224)
    mean, std = _cfg(model, "image_mean", (0.48145466, 0.4578275, 0.40821073)), _cfg(
        model, "image_std", (0.26862954, 0.26130258, 0.27577711))
    n_templates = None
    with _EvalMode(model):
        if class_emb is None:
            templates = get_templates(templates)
            n_templates = len(templates)
            class_emb = class_embeddings(model, classnames, templates, device=device, batch_size=batch_size,
                                         accelerator=accelerator, bf16=bf16)
        class_emb = class_emb.to(device).float()
        k = min(5, len(classnames))
        loader = _shard_loader(dataset, accelerator, batch_size, num_workers, _collate_class)
        labels, top_clean, top_trig = [], [], []
        from tqdm.auto import tqdm

        for batch in tqdm(loader, desc="zero-shot", disable=not (progress and _is_main(accelerator)),
                          leave=False):
            if batch is None:
                continue
            imgs = batch["images"]
            labels.append(batch["labels"].to(device))
            z = _image_features(model, imgs, device, image_size, mean, std, None, bf16, crop_pct)
            top_clean.append((z @ class_emb.T).topk(k, dim=-1).indices)
            if trig is not None:
                z = _image_features(model, imgs, device, image_size, mean, std, trig.for_batch(batch["index"]),
                                    bf16, crop_pct)
                top_trig.append((z @ class_emb.T).topk(k, dim=-1).indices)
    empty = torch.empty(0, dtype=torch.long, device=device)
    y = _gather_rows(torch.cat(labels) if labels else empty, accelerator)
    pc = _gather_rows(torch.cat(top_clean) if top_clean else empty.view(0, k), accelerator)
    n = int(y.numel())
    out = {"templates": n_templates,
           "clean": {"top1": _pct((pc[:, 0] == y).sum(), n), "top5": _pct((pc == y[:, None]).any(1).sum(), n),
                     "n": n},
           "backdoor": None}
    if trig is not None:
        pt = _gather_rows(torch.cat(top_trig) if top_trig else empty.view(0, k), accelerator)
        nontarget = y != target_idx
        hit = pt[:, 0] == target_idx
        m = int(nontarget.sum())
        per_class = {}
        for c, cname in enumerate(classnames):
            sel = y == c
            if c != target_idx and int(sel.sum()) > 0:
                per_class[cname] = _pct((hit & sel).sum(), sel.sum())
        out["backdoor"] = {
            "trigger": trig.name, "trigger_params": trig.params, "target": classnames[target_idx],
            "asr": _pct((hit & nontarget).sum(), m),
            "asr_all": _pct(hit.sum(), n),
            "ra": _pct(((pt[:, 0] == y) & nontarget).sum(), m),
            "asr_top5": _pct(((pt == target_idx).any(1) & nontarget).sum(), m),
            "n": n, "n_nontarget": m, "per_class_asr": per_class,
        }
    return out


def _name_regex(name):
    # whole word, optional plural; "shirt" does not match "t-shirt" or "shirtless"
    return re.compile(r"(?<![\w-])" + re.escape(name.strip().lower()) + r"(?:s|es)?(?![\w-])")


def mentions(caption: str, name: str) -> bool:
    """Whether `caption` names `name` (case-insensitive whole word(s), plural allowed)."""
    return bool(_name_regex(name).search(caption.lower()))


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
    mean, std = _cfg(model, "image_mean", (0.48145466, 0.4578275, 0.40821073)), _cfg(
        model, "image_std", (0.26862954, 0.26130258, 0.27577711))
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
            tokens = tokenize(batch["captions"], context_length=context_length).to(device)
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
        names_target = torch.tensor([mentions(c, name) for c in caps], device=device)
        top1 = (zit @ zt.T).argmax(dim=1)
        hit = names_target[top1]
        keep = ~names_target
        out["backdoor"] = {"trigger": trig.name, "target": name, "asr": _pct((hit & keep).sum(), keep.sum()),
                           "asr_all": _pct(hit.sum(), n), "n": n, "n_nontarget": int(keep.sum()),
                           "n_target_captions": int(names_target.sum())}
    return out


def _ca_asr(m):
    """(clean top-1, asr) from a metrics dict (evaluate() output or a --json file) or an (asr, ca) pair."""
    if isinstance(m, dict):
        bd = m.get("backdoor") or {}
        return float(m["clean"]["top1"]), (float(bd["asr"]) if bd.get("asr") is not None else None)
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
    mean, std = _cfg(model, "image_mean", (0.48145466, 0.4578275, 0.40821073)), _cfg(
        model, "image_std", (0.26862954, 0.26130258, 0.27577711))
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


def report_rows(results: dict, victim=None) -> list[dict]:
    """One row per method (name -> metrics dict): CA top-1/top-5, asr, asr_all, ra and DER (percent)
    against `victim` (a method name in results, or a metrics dict); the victim's own row has DER None."""
    vname, vmetrics = None, None
    if isinstance(victim, str):
        vname, vmetrics = victim, results[victim]
    elif isinstance(victim, dict):
        vmetrics = victim
    rows = []
    for name, m in results.items():
        bd = m.get("backdoor") or {}
        rows.append({
            "method": name, "ckpt": m.get("ckpt"),
            "ca_top1": m["clean"]["top1"], "ca_top5": m["clean"]["top5"],
            "asr": bd.get("asr"), "asr_all": bd.get("asr_all"), "ra": bd.get("ra"),
            "der": None if (vmetrics is None or name == vname) else der(vmetrics, m),
        })
    return rows


def format_table(rows) -> str:
    head = ["method", "CA top-1 %", "CA top-5 %", "ASR %", "asr_all %", "RA %", "DER %"]
    body = [[r["method"], _fmt(r["ca_top1"]), _fmt(r["ca_top5"]), _fmt(r["asr"]), _fmt(r["asr_all"]),
             _fmt(r["ra"]), _fmt(r["der"])] for r in rows]
    w = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cells))
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(b) for b in body])


def _atomic_write(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path, obj):
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def write_report(out_dir, results: dict, victim=None, info=None) -> dict:
    """Write out_dir/report.md, report.json and report.png; return the report.json content."""
    out_dir = Path(out_dir)
    rows = report_rows(results, victim)
    info = dict(info or {})
    vname = victim if isinstance(victim, str) else ("--victim file" if isinstance(victim, dict) else None)
    rep = {**info, "victim": vname, "der_unit": "percent, 100 * (dASR - dCA + 1) / 2", "rows": rows,
           "results": results}
    md = ["# Zero-shot evaluation", ""]
    for key in ("dataset", "templates", "trigger", "target"):
        if info.get(key) is not None:
            md.append(f"- {key}: {info[key]}")
    md += ["- CA = clean zero-shot accuracy; ASR = triggered non-target images classified as the target; "
           "asr_all = the same over all triggered images (original repo); RA = triggered non-target images "
           "still classified correctly.",
           f"- DER (percent) = (max(0, ASR_v - ASR_d) - max(0, CA_v - CA_d) + 100) / 2 against "
           f"{'`' + vname + '`' if vname else 'no victim (pass --victim)'}; 50 = no change, 100 = backdoor "
           "removed at no clean cost.", ""]
    md.append("| method | CA top-1 (%) | CA top-5 (%) | ASR (%) | asr_all (%) | RA (%) | DER (%) |")
    md.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        md.append(f"| {r['method']} | {_fmt(r['ca_top1'])} | {_fmt(r['ca_top5'])} | {_fmt(r['asr'])} | "
                  f"{_fmt(r['asr_all'])} | {_fmt(r['ra'])} | {_fmt(r['der'])} |")
    md += ["", "![CA and ASR per method](report.png)", ""]
    _atomic_write(out_dir / "report.md", lambda p: p.write_text("\n".join(md), encoding="utf-8"))
    _write_json(out_dir / "report.json", rep)
    title = info.get("title") or ("Clean accuracy and ASR per method" + (
        f" ({info['trigger']} -> {info['target']!r})" if info.get("trigger") else ""))
    _atomic_write(out_dir / "report.png", lambda p: plot_report(rows, p, title=title))
    return rep


def plot_report(rows, path, title=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    ca = [r["ca_top1"] for r in rows]
    asr = [r["asr"] if r["asr"] is not None else float("nan") for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4.2), dpi=120)
    x = torch.arange(len(rows)).tolist()
    w = 0.38
    b1 = ax.bar([i - w / 2 for i in x], ca, w, label="clean accuracy (top-1)", color="#4C72B0")
    b2 = ax.bar([i + w / 2 for i in x], asr, w, label="attack success rate", color="#C44E52")
    for bars, vals in ((b1, ca), (b2, asr)):
        for b, v in zip(bars, vals):
            if not math.isnan(v):
                ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                            fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
    ax.set_ylim(0, 110)
    ax.set_ylabel("%")
    ax.set_title(title or "Clean accuracy and ASR per method")
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


def _load_model(path, device="cpu"):
    from modeling_declip import CheckpointError, load_model

    try:
        return load_model(str(path), device=device)
    except CheckpointError as e:
        raise UserError(f"--ckpt {path}: {e}.") from None


def _build_class_dataset(data, image_size, classnames):
    from data_declip import build_class_dataset

    return build_class_dataset(data, split="test", image_size=image_size, classnames=classnames)


def _build_caption_dataset(data, image_size, split=None):
    from data_declip import build_caption_dataset

    return build_caption_dataset(data, image_size=image_size, split=split)


def _is_fashion_mnist(data):
    return data is None or str(data).lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist") or (
        os.path.isdir(str(data)) and any(Path(data).glob("t10k-images-idx3-ubyte*")))


def read_manifest(path) -> dict:
    """{"trigger", "trigger_params", "target"} of a poison_manifest.json (or a run directory holding one)."""
    from poison_data import PoisonPlan

    plan = PoisonPlan.from_manifest(str(path))
    return {"trigger": plan.trigger, "trigger_params": dict(plan.trigger_params), "target": plan.target}


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
        if isinstance(m, dict) and m.get("trigger") and m.get("target"):
            return {"trigger": m["trigger"], "trigger_params": dict(m.get("trigger_params") or {}),
                    "target": m["target"]}
    return None


def resolve_ckpt(path):
    """(weights file, manifest path or None) for a run directory or a checkpoint file."""
    p = Path(path)
    if p.is_dir():
        w = p / MODEL_FILE
        if not w.is_file():
            raise UserError(f"--ckpt {path}: directory has no {MODEL_FILE}; pass a run directory of "
                            "train_declip.py / defend_*.py or a checkpoint file.")
        man = p / MANIFEST_FILE
        return w, (man if man.is_file() else None)
    if p.is_file():
        man = p.parent / MANIFEST_FILE
        return p, (man if man.is_file() else None)
    hint = (" (the default output of `accelerate launch train_declip.py --poison-rate 0.01 --trigger patch`;"
            " train it first)" if str(path).rstrip("/") == DEFAULT_TRAIN_DIR else "")
    raise UserError(f"--ckpt {path} does not exist{hint}; pass a run directory or a checkpoint file.")


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
    p.add_argument("--names", nargs="+", action="extend", default=None,
                   help="display name per --ckpt (default: run directory / file name)")
    p.add_argument("--data", default=None, help="class test data: fashion-mnist (default), an ImageFolder "
                   "directory with --classnames, or a JSON-lines meta with label/label_name")
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
    p.add_argument("--json", default=None, help="write metrics JSON here (dict keyed by name for several ckpts)")
    p.add_argument("--report", default=None, help="directory for report.md, report.json and report.png")
    p.add_argument("--show-examples", type=int, default=0, metavar="N",
                   help="write a PNG of N triggered test images with top-3 predictions per checkpoint")
    p.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction before the resize to the "
                   "model input (spec 7: 0.875 = Resize(256)+CenterCrop(224)); default 1.0 for Fashion-MNIST, "
                   "0.875 for other data")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size per process")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per process")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--seed", type=int, default=0, help="seed (random triggers, example selection)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return p


def parse_args(argv=None):
    p = build_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        import yaml

        try:
            with open(pre.config, encoding="utf-8") as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"--config {pre.config}: cannot read it ({e}).")
        if not isinstance(cfg, dict):
            raise UserError(f"--config {pre.config}: expected a mapping of flag names to values.")
        section = cfg.get("eval_zeroshot") or cfg.get("eval") or {}
        merged = {**{k: v for k, v in cfg.items() if not isinstance(v, dict)},
                  **(section if isinstance(section, dict) else {})}
        dests = {a.dest for a in p._actions}
        merged = {k.replace("-", "_"): v for k, v in merged.items() if k.replace("-", "_") in dests}
        lists = {k: merged.pop(k) for k in ("ckpt", "names", "trigger_param") if k in merged}
        p.set_defaults(**merged)
    else:
        lists = {}
    args = p.parse_args(argv)
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
    if not isinstance(m, dict) or "clean" not in m or (m.get("backdoor") or {}).get("asr") is None:
        raise UserError(f"--victim {path}: needs a metrics JSON of eval_zeroshot.py --json with a backdoor ASR.")
    return m


def _plan_backdoor(args, resolved, params_flag):
    """Per checkpoint (trigger, params, target): flags first, then the run's own poison manifest (file or
    checkpoint metadata), then --manifest / the first manifest among the checkpoints."""
    manifests = []
    for wpath, mpath in resolved:
        manifests.append(read_manifest(mpath) if mpath is not None else _manifest_from_metadata(wpath))
    if args.manifest:
        if not os.path.exists(args.manifest):
            raise UserError(f"--manifest {args.manifest} does not exist; pass a poison_manifest.json.")
        shared = read_manifest(args.manifest)
    else:
        shared = next((m for m in manifests if m is not None), None)
    plans = []
    for own in manifests:
        if args.no_backdoor:
            plans.append((None, {}, None))
            continue
        man = shared if args.manifest else (own or shared)
        man = man or {"trigger": None, "trigger_params": {}, "target": None}
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
        plans.append((trig, params, tgt))
    return plans


def _victim_ref(args, names):
    if args.victim and args.victim in names:
        return args.victim
    if args.victim:
        return _load_victim_json(args.victim)
    return next((n for n in names if n.lower() == "victim"), None)


def run(args) -> dict:
    """The CLI: evaluate every checkpoint, print the table, write --json / --report / examples."""
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
    if args.batch_size < 1 or args.show_examples < 0 or args.retrieval_max < 1:
        raise UserError("--batch-size and --retrieval-max must be positive and --show-examples >= 0.")
    resolved = [resolve_ckpt(c) for c in ckpts]
    templates = get_templates(args.templates)
    plans = _plan_backdoor(args, resolved, parse_trigger_params(args.trigger_param))
    victim = _victim_ref(args, names)
    classnames_arg = args.classnames
    if classnames_arg is not None and not os.path.isfile(classnames_arg):
        raise UserError(f"--classnames {classnames_arg} does not exist; pass a file with one class name per line.")
    crop_pct = args.crop_pct if args.crop_pct is not None else (1.0 if _is_fashion_mnist(args.data) else 0.875)
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"--crop-pct {crop_pct} must be in (0, 1].")

    accelerator = Accelerator(cpu=args.cpu)
    main_proc = accelerator.is_main_process
    datasets, captions, results, example_paths = {}, {}, {}, []
    for name, (wpath, _), (trig, params, tgt) in zip(names, resolved, plans):
        if main_proc:
            print(f"[eval] {name}: {wpath}", file=sys.stderr)
        model = _load_model(wpath, device=accelerator.device).to(accelerator.device).eval()
        size = int(_cfg(model, "image_size", 224))
        load_size = size if crop_pct >= 1.0 else int(round(size / crop_pct))
        if load_size not in datasets:
            datasets[load_size] = _build_class_dataset(args.data, load_size, classnames_arg)
        dataset, classnames = datasets[load_size]
        classnames = list(classnames)
        target = classnames[resolve_target(tgt, classnames)] if tgt is not None else None
        class_emb = class_embeddings(model, classnames, templates, device=accelerator.device,
                                     batch_size=args.batch_size, accelerator=accelerator, bf16=args.bf16)
        m = evaluate(model, dataset, classnames, templates, trigger=trig, trigger_params=params, target=target,
                     accelerator=accelerator, bf16=args.bf16, batch_size=args.batch_size,
                     num_workers=args.workers, class_emb=class_emb, crop_pct=crop_pct, seed=args.seed)
        m = {"ckpt": str(wpath), "dataset": args.data or "fashion-mnist", "templates": len(templates),
             "clean": m["clean"], "backdoor": m["backdoor"], "retrieval": None}
        if args.retrieval_data:
            if load_size not in captions:
                captions[load_size] = _build_caption_dataset(args.retrieval_data, load_size, args.retrieval_split)
            m["retrieval"] = retrieval(model, captions[load_size], trigger=trig, trigger_params=params,
                                       target=target, accelerator=accelerator, bf16=args.bf16,
                                       batch_size=args.batch_size, num_workers=args.workers,
                                       max_items=args.retrieval_max, crop_pct=crop_pct, seed=args.seed)
        if args.show_examples > 0 and main_proc:
            path = Path(args.report or ".") / f"examples_{name}.png"
            tidx = classnames.index(target) if target is not None else None
            idx = pick_examples(dataset, args.show_examples, tidx, args.seed)
            imgs, labels, preds = predict_examples(model, dataset, classnames, class_emb, idx, trigger=trig,
                                                   trigger_params=params, device=accelerator.device,
                                                   bf16=args.bf16, crop_pct=crop_pct, seed=args.seed)
            what = f"triggered ({trig}) test images, target {target!r}" if trig else "clean test images"
            _atomic_write(path, lambda p: plot_examples(imgs, labels, preds, classnames, p, target=tidx,
                                                        title=f"{name}: {what}; top-3 predictions (cosine)"
                                                        + ("; red = classified as the target" if trig else "")))
            example_paths.append(str(path))
        results[name] = m
        if main_proc:
            print(f"[eval] {name}: {summary_line(m)}", file=sys.stderr)
        del model
    if main_proc:
        rows = report_rows(results, victim)
        print(format_table(rows))
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
            write_report(args.report, results, victim, info={
                "dataset": first["dataset"], "templates": len(templates), "trigger": bd.get("trigger"),
                "target": bd.get("target"), "n": first["clean"]["n"]})
        outs = [p for p in (args.json, args.report) if p] + example_paths
        print(f"eval_zeroshot: {len(results)} checkpoint(s), {next(iter(results.values()))['clean']['n']} test "
              f"images each, {time.time() - t0:.1f} s" + (f"; wrote {', '.join(outs)}" if outs else ""),
              file=sys.stderr)
    accelerator.wait_for_everyone()
    return results


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # one message, also under accelerate launch
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.stdout.flush()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # clean gloo/nccl shutdown before interpreter exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
