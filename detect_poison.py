"""Score every training pair of a (poisoned) caption dataset for being a backdoor sample, and measure the
scores against the victim's poison manifest.

    python detect_poison.py                                   # victim runs/victim, its data -> runs/detect
    accelerate launch detect_poison.py --ckpt runs/victim --flag-fraction 0.02 --flag-detector dao
    accelerate launch train_declip.py ... --exclude-indices runs/detect/flagged.txt   # detect, then train clean

The victim sees a poisoned pair as the loader makes it (poison_data.PoisonPlan applied to the stored, clean
data), so that is what is scored: the plan of the victim's poison_manifest.json puts its trigger on the
evaluation view (data_declip.eval_transform) of each poisoned image and its caption (drawn with the epoch-0
per-sample rng, as data_declip.TrainPairs does) on each poisoned pair. A materialised poisoned copy (a --data
whose directory holds its own poison_manifest.json) is scored as stored; its manifest gives the labels.

Detectors (Huang et al., "Detecting Backdoor Samples in Contrastive Language Image Pretraining", ICLR 2025,
arXiv 2502.01385; facts from github.com/HanxunH/Detect-CLIP-Backdoor-Samples, backdoor_sample_detector/):
each pair's image embedding is compared with a reference set, the image and caption embeddings of the other
pairs of its chunk (a seeded random --chunk of the training pairs; its own image and caption left out).
Higher score = more suspicious for every detector:
  kdist   distance to the k-th nearest reference (k = 16)
  lid     local intrinsic dimensionality, MLE over the 64 nearest references
  slof    simplified LOF: k-distance over the mean k-distance of the k nearest references (k = 16)
  dao     dimensionality-aware outlier score: LID-weighted log k-distance ratio to the neighbours (k = 16)
  iforest scikit-learn IsolationForest (100 trees) fitted on the reference set, negated score_samples
  clipscore  the baseline: minus the cosine of the pair's image and caption embeddings

Run directory (--out-dir): scores.npy (one float32 field per detector, row i = training pair i; NaN for a
pair not scored), detection.json (ROC-AUC, PR-AUC, FPR@95%TPR per detector, against the manifest),
flagged.txt (the flagged dataset indices, one per line: what train_declip.py --exclude-indices reads),
config.json. --exclude-indices FILE leaves those pairs unscored (NaN). Memory: the embeddings live one
chunk at a time (2 x chunk x embed_dim floats and 2 chunk x 2 chunk float64 distances, ~0.2 GB at chunk
2048); what grows with the data is on the main process: the score table, 4 bytes per pair per detector
(24 MB per million pairs with all six), at peak about 0.1 GB per million pairs with its copy written to
scores.npy, the index order and the metrics' sort (1.6 GB for 15M pairs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data_declip as dd
import eval_zeroshot as ez
import modeling_declip as md
import poison_data as pdata
import train_declip as td
from data_declip import UserError, run_main

DEFAULT_OUT = "runs/detect"
DETECTORS = ("kdist", "lid", "slof", "dao", "iforest", "clipscore")
FLAGGED_FILE = "flagged.txt"
EPS = 1e-4  # the source's epsilon inside log(d_i / d_k) of the LID MLE (keeps log(0) finite)


# ----------------------------------------------------------------------------------------------
# Detectors on one chunk: query image embeddings vs the chunk's image + caption embeddings


def _distances(a, b):
    """Euclidean distances in float64. The source takes exact (non-matmul) float32 distances for the
    precision of LID; the matmul form in float64 is as precise and an order of magnitude faster."""
    return torch.cdist(a.double(), b.double(), compute_mode="use_mm_for_euclid_dist")


def _sorted_ref_distances(q_img, ref_img, ref_txt, pos, n):
    """The n smallest Euclidean distances of each query (row r is the chunk's pair pos[r]) to the 2m
    references [ref_img; ref_txt], its own image and caption left out, ascending, and their reference indices."""
    ref = torch.cat([ref_img, ref_txt])
    m = ref_img.shape[0]
    d = _distances(q_img, ref)
    rows = torch.arange(len(pos), device=d.device)
    d[rows, pos] = float("inf")  # own pair out (source: get_pair_wise_distance masks the diagonal in both halves)
    d[rows, pos + m] = float("inf")
    return torch.topk(d, n, dim=1, largest=False, sorted=True)


def lid_mle(a, k):
    """LID MLE from sorted distances a: -k / sum_{i<k} log(a_i / a_k + 1e-4) (source: lid_detection.py, dao.py)."""
    return -k / torch.log(a[:, :k] / a[:, k:k + 1] + EPS).sum(dim=1)


def _reference_stats(ref_img, ref_txt, k):
    """k-distance and LID (k) of every reference point within the reference set, itself included at
    distance 0 (source: dao.py / slof.py sort the full reference-to-reference matrix unmasked)."""
    ref = torch.cat([ref_img, ref_txt])
    d = _distances(ref, ref).fill_diagonal_(0.0)  # the matmul form leaves rounding noise on the diagonal
    a = torch.topk(d, k + 1, dim=1, largest=False, sorted=True).values
    return a[:, k], lid_mle(a, k)


def knn_scores(q_img, ref_img, ref_txt, pos, detectors=DETECTORS, k=16, lid_k=64):
    """{detector: score per query} for the kNN detectors (kdist, lid, slof, dao) among `detectors`.
    q_img [q, D]: the queries' image embeddings, rows pos of ref_img [m, D]; ref_txt [m, D] the captions."""
    want = [d for d in detectors if d in ("kdist", "lid", "slof", "dao")]
    if not want:
        return {}
    n_ref = 2 * ref_img.shape[0] - 2
    if max(k, lid_k if "lid" in want else 0) >= n_ref:
        raise UserError(f"--chunk: a chunk of {ref_img.shape[0]} pairs has {n_ref} references per pair, too few "
                        f"for k = {max(k, lid_k)}; raise --chunk (or lower --k / --lid-k)")
    a, idx = _sorted_ref_distances(q_img, ref_img, ref_txt, pos, max(k, lid_k if "lid" in want else 0) + 1)
    out = {}
    kd = a[:, k]  # source: a[:, self.k] (0-based) of the own-pair-removed sorted distances
    if "kdist" in want:
        out["kdist"] = kd
    if "lid" in want:
        out["lid"] = lid_mle(a, lid_k)  # source returns the LID itself: higher = more suspicious
    if "slof" in want or "dao" in want:
        ref_kd, ref_lid = _reference_stats(ref_img, ref_txt, k)
        # the k nearest references of each query, as reference indices (the source indexes the masked row
        # positions instead, shifted by one past its own pair; we use the true reference index)
        nb = idx[:, :k]
        ratio = kd[:, None] / ref_kd[nb]
        if "slof" in want:  # source slof.py: mean_j kdist(x) / kdist(j)
            out["slof"] = torch.nan_to_num(ratio.mean(1), nan=1000.0, posinf=1000.0, neginf=0.0)
        if "dao" in want:  # source dao.py: mean_j LID(j) * log(kdist(x) / kdist(j))
            s = (ref_lid[nb] * torch.log(ratio)).mean(1)
            out["dao"] = torch.nan_to_num(s, nan=1000.0, posinf=1000.0, neginf=0.0)
    return out


def iforest_scores(q_img, ref_img, ref_txt, seed=0, n_estimators=100):
    """scikit-learn IsolationForest fitted on the image + caption references, minus score_samples of the
    queries (source: isolation_forest.py; process_detection_scores.py negates: lower = more anomalous)."""
    from sklearn.ensemble import IsolationForest

    ref = torch.cat([ref_img, ref_txt]).float().cpu().numpy()
    forest = IsolationForest(n_estimators=n_estimators, random_state=seed).fit(ref)
    return torch.from_numpy(-forest.score_samples(q_img.float().cpu().numpy())).to(q_img.device)


def clip_scores(img, txt):
    """Minus the cosine of each image with its own caption (source: clip_scores.py, negated in
    process_detection_scores.py)."""
    return -(F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)


def score_chunk(q_img, q_txt, ref_img, ref_txt, pos, detectors=DETECTORS, k=16, lid_k=64, seed=0):
    """{detector: float32 scores of the queries} for one chunk."""
    q_img, ref_img, ref_txt = q_img.float(), ref_img.float(), ref_txt.float()
    out = knn_scores(q_img, ref_img, ref_txt, pos, detectors, k, lid_k)
    if "iforest" in detectors:
        out["iforest"] = iforest_scores(q_img, ref_img, ref_txt, seed)
    if "clipscore" in detectors:
        out["clipscore"] = clip_scores(q_img, q_txt)
    return {d: out[d].float() for d in detectors}


# ----------------------------------------------------------------------------------------------
# Metrics against the manifest


def detection_metrics(scores, labels) -> dict:
    """ROC-AUC, PR-AUC (average precision) and FPR at 95% TPR of `scores` (higher = poisoned) for the
    0/1 `labels`, over the finite scores; None where a class is missing."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    ok = np.isfinite(scores)
    s, y = scores[ok], labels[ok]
    res = {"n": int(ok.sum()), "n_poisoned": int(y.sum())}
    if y.all() or not y.any():
        return {**res, "roc_auc": None, "pr_auc": None, "fpr_at_95_tpr": None}
    fpr, tpr, _ = roc_curve(y, s)
    return {**res, "roc_auc": float(roc_auc_score(y, s)), "pr_auc": float(average_precision_score(y, s)),
            "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95)])}  # first threshold with TPR >= 95%


def flag(scores, fraction=None, threshold=None) -> np.ndarray:
    """Dataset indices to flag: scores >= threshold, else the top `fraction` of the finite scores."""
    scores = np.asarray(scores, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(scores))
    if threshold is not None:
        return np.sort(ok[scores[ok] >= threshold])
    k = int(round(fraction * len(ok)))
    top = ok[np.argsort(-scores[ok], kind="stable")[:k]]
    return np.sort(top)


# ----------------------------------------------------------------------------------------------
# Data: the training pairs as the victim saw them


def _data_manifest(data):
    """The poison_manifest.json of a materialised poisoned copy named by --data, or None."""
    if not data:
        return None
    d = data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))
    path = os.path.join(d, pdata.MANIFEST_NAME)
    return path if os.path.isfile(path) else None


def resolve_data(args, victim_cfg: dict):
    """Fill the data flags left unset from the victim's config.json (its --data, format flags, holdout)."""
    if args.data is None and victim_cfg:
        for k in ("data", "data_root", "image_column", "caption_column", "csv_separator"):
            if getattr(args, k) is None:
                setattr(args, k, victim_cfg.get(k))
    if args.holdout is None:
        args.holdout = int(victim_cfg.get("holdout") or 0) if args.data == victim_cfg.get("data") else 0
    return args


class _Batches:
    """Batch sampler: this process's share of each chunk in batches, made lazily (a list of Python ints
    for 15M pairs would take half a gigabyte)."""

    def __init__(self, shares, batch_size):
        self.shares, self.batch_size = shares, batch_size

    def __len__(self):
        return sum(len(s.split(self.batch_size)) for s in self.shares)

    def __iter__(self):
        for s in self.shares:
            for b in s.split(self.batch_size):
                yield b.tolist()


def _chunks(order: torch.Tensor, chunk: int):
    """Split `order` into chunks of about `chunk` pairs (the remainder spread, none much smaller)."""
    n_chunks = max(1, -(-len(order) // chunk))
    return list(torch.tensor_split(order, n_chunks))


# ----------------------------------------------------------------------------------------------
# The run


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of flag defaults (keys as flag names); flags override it")
    p.add_argument("--ckpt", default=td.DEFAULT_VICTIM,
                   help=f"the model whose embeddings are scored: a run directory or a checkpoint in any supported "
                        f"format (default: {td.DEFAULT_VICTIM}); its run directory gives the data and the manifest")
    p.add_argument("--manifest", default=None,
                   help="poison_manifest.json to measure against (default: the victim's, or that of a materialised "
                        "--data copy); without one, scores and flags are written but no metrics")
    td.add_data_args(p)
    p.set_defaults(holdout=None)
    p.add_argument("--out-dir", default=DEFAULT_OUT, help=f"run directory (default: {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random chunks and the isolation forests")
    p.add_argument("--batch-size", type=int, default=256, help="embedding batch per process")
    p.add_argument("--chunk", type=int, default=2048,
                   help="pairs per reference set: each pair is scored against the other pairs of its random chunk "
                        "(the source's detection batch; default 2048)")
    p.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS),
                   help="detectors to run (default: all)")
    p.add_argument("--k", type=int, default=16, help="neighbours of k-distance, SLOF and DAO (default 16, the source's)")
    p.add_argument("--lid-k", type=int, default=64, help="neighbours of the LID estimate (default 64, the source's)")
    p.add_argument("--flag-detector", choices=DETECTORS, default="kdist",
                   help="detector whose scores pick the flagged pairs (default: kdist, the most robust on the "
                        "planted-cluster test)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--flag-fraction", type=float, default=0.01,
                   help="flag this fraction of the scored pairs, highest scores first (default 0.01)")
    g.add_argument("--flag-threshold", type=float, default=None, help="flag the pairs scoring at least this instead")
    p.add_argument("--precision", choices=("no", "bf16"), default=None,
                   help="autocast of the embedding pass (default: bf16 on a GPU, no on the CPU, where bf16 "
                        "autocast of the ResNet was measured 10x slower)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    return p


def _check_args(args):
    if args.batch_size < 1 or args.chunk < 2:
        raise UserError("--batch-size must be >= 1 and --chunk >= 2")
    if args.k < 1 or args.lid_k < 1:
        raise UserError("--k and --lid-k must be >= 1")
    if args.flag_threshold is None and not 0 <= args.flag_fraction <= 1:
        raise UserError(f"--flag-fraction must be in [0, 1], got {args.flag_fraction}")
    if args.flag_detector not in args.detectors:
        raise UserError(f"--flag-detector {args.flag_detector} is not among --detectors {' '.join(args.detectors)}")


@torch.no_grad()
def embed_batch(model, batch: dict, trigger, device, bf16: bool = False) -> tuple:
    """(image, caption) embeddings of a collate_pairs batch as the model was trained on it: the evaluation
    view of each image, `trigger` (an eval_zeroshot trigger) after the crop on the poisoned rows, the
    (poisoned) caption."""
    cfg = model.config
    x = batch["images"].to(device)
    pois = batch["poisoned"].to(device)
    views = dd.eval_transform(x, cfg.image_size, cfg.image_mean, cfg.image_std)
    if trigger is not None and bool(pois.any()):
        rows = pois.nonzero()[:, 0]
        views[rows] = dd.eval_transform(x[rows], cfg.image_size, cfg.image_mean, cfg.image_std,
                                        trigger=trigger.for_batch(batch["index"][rows.cpu()].tolist()))
    with ez._autocast(device, bf16):
        return model.encode_image(views).float(), model.encode_text(batch["tokens"].to(device)).float()


def detect(args) -> dict:
    from accelerate import Accelerator

    _check_args(args)
    t0 = time.time()
    weights, victim_manifest = ez.resolve_ckpt(args.ckpt, hint="train the victim first: make victim")
    victim_cfg = td.run_config(os.path.dirname(os.path.abspath(weights)))  # the victim's flags, {} if not our run
    resolve_data(args, victim_cfg)
    copy_manifest = _data_manifest(args.data)
    accelerator = Accelerator(cpu=args.cpu)
    device, main = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    model = md.load_model(weights, device)
    cfg = model.config

    base = td.load_base(args, cfg.image_size)
    if isinstance(base, torch.utils.data.IterableDataset):
        raise UserError("--data: streamed webdataset shards cannot be scored per index; use a map-style format")
    n_train = len(base) - args.holdout
    # poisoning in the loader: the victim's own plan is applied; a materialised copy is scored as stored
    manifest = args.manifest or copy_manifest or victim_manifest
    plan = pdata.PoisonPlan.from_manifest(manifest) if manifest else None
    if plan is not None and plan.n != n_train:
        raise UserError(f"the manifest {manifest} describes {plan.n} training pairs but --data has {n_train}; "
                        f"give the victim's --data (and --holdout)")
    applied = plan if (plan is not None and not copy_manifest and not args.manifest) else None
    train_base = torch.utils.data.Subset(base, range(n_train)) if args.holdout else base
    seed = int(victim_cfg.get("seed", plan.seed if plan else 0))
    pairs = dd.TrainPairs(train_base, seed=seed, context_length=cfg.context_length, poison=applied, eda=False)
    trigger = ez.make_trigger(applied.trigger, applied.trigger_params, seed) if applied else None

    excluded = td.read_index_file(args.exclude_indices, n_train) if args.exclude_indices else set()
    drop = torch.zeros(n_train, dtype=torch.bool)
    drop[list(excluded)] = True
    keep = torch.arange(n_train)[~drop]
    order = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(dd._int_seed(args.seed, "detect")))]
    chunks = _chunks(order, args.chunk)
    # this process embeds a contiguous share of each chunk (each pair once across processes), in batches
    # that never straddle chunks; the chunk's embeddings are then gathered in rank order
    shares = [c[slice(*ez._shard_bounds(len(c), rank, world))] for c in chunks]
    batches = _Batches(shares, args.batch_size)
    n_batches = [len(s.split(args.batch_size)) for s in shares]
    workers = args.workers if args.workers is not None else (6 if device.type == "cuda" else 0)
    collate = lambda items: dd.collate_pairs(items, cfg.context_length)  # noqa: E731
    loader = iter(torch.utils.data.DataLoader(pairs, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                              pin_memory=device.type == "cuda"))

    table = np.full((n_train, len(args.detectors)), np.nan, dtype=np.float32) if main else None
    bf16 = (args.precision or ("bf16" if device.type == "cuda" else "no")) == "bf16"
    bar = tqdm(total=len(keep), disable=not main, desc="detect", dynamic_ncols=True)
    model.eval()
    n_scored = 0
    t_score = 0.0  # of the loop's time, the part spent scoring (the rest: loading and embedding)
    with torch.no_grad():
        for c, nb in enumerate(n_batches):
            imgs, txts, idxs = [], [], []
            for _ in range(nb):
                batch = next(loader)
                if batch["images"].shape[0] == 0:
                    continue
                img, txt = embed_batch(model, batch, trigger, device, bf16)
                imgs.append(img)
                txts.append(txt)
                idxs.append(batch["index"].to(device))
            d = cfg.embed_dim
            mine_img = torch.cat(imgs) if imgs else torch.zeros(0, d, device=device)
            mine_txt = torch.cat(txts) if txts else torch.zeros(0, d, device=device)
            mine_idx = torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.long, device=device)
            ref_img, ref_txt = ez._gather_rows(mine_img, accelerator), ez._gather_rows(mine_txt, accelerator)
            sizes = ez._gather_rows(torch.tensor([len(mine_idx)], device=device), accelerator).tolist()
            start = sum(sizes[:rank])
            pos = torch.arange(start, start + len(mine_idx), device=device)
            t1 = time.time()
            s = score_chunk(mine_img, mine_txt, ref_img, ref_txt, pos, args.detectors, args.k, args.lid_k,
                            seed=dd._int_seed(args.seed, "iforest", c) % 2**32) if len(pos) else \
                {k: torch.zeros(0, device=device) for k in args.detectors}
            t_score += time.time() - t1
            got = ez._gather_rows(torch.stack([s[k] for k in args.detectors], 1), accelerator)
            got_idx = ez._gather_rows(mine_idx, accelerator)
            n_scored += len(got_idx)
            if main:
                table[got_idx.cpu().numpy()] = got.cpu().numpy()
            bar.update(len(chunks[c]))
    bar.close()
    n_bad = len(keep) - n_scored  # unreadable or uncaptioned pairs (every process knows the total)
    if n_bad > args.max_bad_fraction * len(keep):
        raise UserError(f"--data: {n_bad} of {len(keep)} pairs are unreadable or uncaptioned, more than "
                        f"--max-bad-fraction {args.max_bad_fraction}; fix the data or raise the fraction")
    if not main:
        accelerator.wait_for_everyone()
        return {}

    labels = np.zeros(n_train, dtype=bool)
    if plan is not None:
        labels[plan.indices] = True
    metrics = {name: detection_metrics(table[:, j], labels) if plan is not None else None
               for j, name in enumerate(args.detectors)}
    flagged = flag(table[:, args.detectors.index(args.flag_detector)], args.flag_fraction, args.flag_threshold)
    hit = int(labels[flagged].sum()) if plan is not None else None
    result = {
        "ckpt": args.ckpt, "manifest": manifest, "data": args.data, "holdout": args.holdout,
        "poison_applied": applied is not None, "n_train": n_train, "n_scored": int(np.isfinite(table[:, 0]).sum()),
        "n_poisoned": int(labels.sum()) if plan is not None else None,
        "chunk": args.chunk, "k": args.k, "lid_k": args.lid_k, "detectors": metrics,
        "flagged": {"detector": args.flag_detector, "fraction": None if args.flag_threshold is not None
                    else args.flag_fraction, "threshold": args.flag_threshold, "n": int(len(flagged)),
                    "poisoned": hit, "recall": hit / max(1, int(labels.sum())) if plan is not None else None,
                    "file": FLAGGED_FILE},
        "seconds": round(time.time() - t0, 2), "seconds_scoring": round(t_score, 2),
    }
    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    rec = np.zeros(n_train, dtype=[(name, np.float32) for name in args.detectors])
    for j, name in enumerate(args.detectors):
        rec[name] = table[:, j]
    dd.atomic_write(os.path.join(out, "scores.npy"), lambda p: _save_npy(p, rec))
    ez._write_json(os.path.join(out, "config.json"), {k: v for k, v in vars(args).items()})
    ez._write_json(os.path.join(out, "detection.json"), result)
    # last: the file target of `make` and study.py, so a run killed before it is redone whole
    dd.atomic_write(os.path.join(out, FLAGGED_FILE),
                     lambda p: p.write_text("".join(f"{i}\n" for i in flagged.tolist())))
    best = {k: v["roc_auc"] for k, v in metrics.items() if v and v["roc_auc"] is not None}
    line = f"detect: {result['n_scored']} pairs scored"
    if best:
        line += ", AUROC " + " ".join(f"{k} {v:.3f}" for k, v in best.items())
    line += f"; flagged {len(flagged)} by {args.flag_detector}"
    if hit is not None:
        line += f" ({hit} of {int(labels.sum())} poisoned)"
    print(line + f" ({out})")
    accelerator.wait_for_everyone()
    return result


def _save_npy(path, arr):
    with open(path, "wb") as f:  # np.save on a name would append .npy to the temporary file
        np.save(f, arr)


def main(argv=None):
    args = td.parse_args(build_parser(), argv)
    detect(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
