"""Throughput, memory and model-FLOPs utilisation of DeCLIP training and evaluation.

    python bench_declip.py                                   # tiny, CLIP + DeCLIP modes, fp32 + bf16, CPU
    python bench_declip.py --presets rn50 --batch-size 128 --precisions bf16 --json bench.json   # on a GPU
    python bench_declip.py --compare-open-clip               # tiny CLIP mode vs. open_clip's model + loss
    python bench_declip.py --presets rn50 vitb32 --batch-size 256 --precisions bf16 --compare-open-clip   # GPU
    python bench_declip.py --presets rn50 --loader --loader-workers 0 2 4   # the data path on JPEGs, per worker

Training steps run the real objective (forward, backward, AdamW step, logit-scale clamp) on
synthetic inputs already on the device, optionally with the batched MoCo-v2 augmentation
(`--augment`); data loading is measured apart with `--loader`: train_declip's own loader (JPEG
decode, resize, captions, EDA in DeCLIP mode, collation) over generated JPEG photos of 224-500 px
(or --loader-dir's), images/s with each worker count, beside the step's images/s. MFU = model FLOPs per sample (counted from the model
configuration by modeling_declip.estimate_flops) x images/s / the device's peak. The CPU peak is
measured here with a large matmul in the same precision; for GPUs a table of dense peaks is used
(override with --peak-tflops). On the CPU the allocator is set up as training sets it up
(train_declip.keep_freed_cpu_memory); --default-malloc measures glibc's defaults instead.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch

import data_declip as dd
import modeling_declip as md
import train_declip as td

# Dense (no sparsity) peaks in TFLOP/s, from the vendors' data sheets.
GPU_PEAKS = {"H100": {"bf16": 989.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "fp32": 67.0},
             "A100": {"bf16": 312.0, "fp32": 19.5}}


def device_peak_tflops(device: torch.device, precision: str, override=None) -> float:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS.items():
            if key in name:
                return peaks["bf16" if precision == "bf16" else "fp32"]
        return float("nan")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    t, n = time.perf_counter(), 5
    for _ in range(n):
        a @ b
    return 2 * 2048 ** 3 * n / (time.perf_counter() - t) / 1e12


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(cfg, batch, device, text_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    images = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=g)
    tokens = torch.randint(1, 49406, (batch, text_len), generator=g)
    tokens[:, 0] = md.SOT_ID
    tokens[:, -1] = md.EOT_ID
    return images.to(device), tokens.to(device)


def profile_table(step, device, steps: int = 3, rows: int = 15) -> str:
    """The operators (or CUDA kernels) that take the most time over a few training steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def bench_train(preset, mode, precision, batch, steps, warmup, device, text_len, augment=False,
                channels_last=None, compile_model=False, profile=False):
    torch.manual_seed(0)
    model = md.build_model(preset).to(device).train()
    cfg = model.config
    channels_last = True if channels_last is None else channels_last  # train_declip's default
    if channels_last and cfg.vision == "resnet":
        model = model.to(memory_format=torch.channels_last)
    weights = md.LossWeights() if mode == "declip" else md.LossWeights.clip_only()
    if mode == "clip":
        for head in (model.projector, model.predictor, model.text_label_predictor):
            head.requires_grad_(False)
    opt = torch.optim.AdamW(md.param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.98), fused=td.fused_adamw(device))
    fwd = torch.compile(model) if compile_model else model
    images_u8, tokens = _inputs(cfg, batch, device, text_len)
    aug = dd.GpuAugment(cfg.image_size, cfg.image_mean, cfg.image_std)
    norm = lambda x: dd.eval_transform(x, cfg.image_size, cfg.image_mean, cfg.image_std)
    gen = torch.Generator(device=device).manual_seed(0)
    fixed = (norm(images_u8), norm(images_u8.flip(-1)))
    masked, labels = dd.mask_tokens(tokens, gen)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        if augment:
            v1, v2 = aug(images_u8, gen), aug(images_u8, gen)
        else:
            v1, v2 = fixed
        if channels_last and cfg.vision == "resnet":
            v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
        with autocast:
            if mode == "declip":
                out = fwd(v1, masked, v2, tokens, labels, weights=weights)
            else:
                out = fwd(v1, tokens, weights=weights)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t) / steps
    flops = md.estimate_flops(cfg, mode, training=True, text_len=text_len)["total"]
    if profile:
        print(f"-- profile: {preset} {mode} {precision}, batch {batch}\n{profile_table(step, device)}", flush=True)
    return batch / dt, flops, _peak_mem(device)


def _images_per_s(fn, batch, steps, warmup, device) -> float:
    """Images/s of `fn` (one batch per call): `warmup` untimed calls, then `steps` timed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return batch * steps / (time.perf_counter() - t)


def bench_eval(preset, precision, batch, steps, warmup, device):
    model = md.build_model(preset).to(device).eval()
    cfg = model.config
    images_u8, _ = _inputs(cfg, batch, device, 8)
    x = dd.eval_transform(images_u8, cfg.image_size, cfg.image_mean, cfg.image_std)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    @torch.no_grad()
    def encode():
        with autocast:
            model.encode_image(x)

    return _images_per_s(encode, batch, steps, warmup, device)


OPEN_CLIP_NAMES = {"rn50": "RN50", "rn101": "RN101", "vitb32": "ViT-B-32"}  # our presets that open_clip defines itself


def open_clip_model(preset: str):
    """open_clip's own model for one of our presets, randomly initialised (no download): RN50, RN101, ViT-B-32 by
    open_clip's name; `tiny` rebuilt in open_clip's CLIP class with the same widths (QuickGELU)."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    if preset in OPEN_CLIP_NAMES:
        return open_clip.create_model(OPEN_CLIP_NAMES[preset])
    if preset != "tiny":
        raise ValueError(f"open_clip has no model for the preset {preset!r}")
    cfg = md.get_config("tiny")
    return CLIP(embed_dim=cfg.embed_dim,
                vision_cfg=CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width, image_size=cfg.image_size),
                text_cfg=CLIPTextCfg(context_length=cfg.context_length, vocab_size=49408, width=cfg.text_width,
                                     heads=cfg.text_heads, layers=cfg.text_layers),
                quick_gelu=True)


def bench_open_clip(preset, precision, batch, steps, warmup, device, text_len, compile_model=False):
    """open_clip's model for the preset (open_clip_model) trained with its ClipLoss, on the inputs our CLIP mode
    gets, channels-last for its ResNets as ours; returns (train img/s, forward-only encode_image img/s)."""
    from open_clip.loss import ClipLoss

    cfg = md.get_config(preset)
    model = open_clip_model(preset).to(device).train()
    resnet = not hasattr(model.visual, "transformer")
    if resnet:
        model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.98), fused=td.fused_adamw(device))
    loss_fn = ClipLoss()
    images_u8, tokens = _inputs(cfg, batch, device, text_len)
    tokens = tokens.clamp(max=49407)
    x = dd.eval_transform(images_u8, cfg.image_size, cfg.image_mean, cfg.image_std)
    if resnet:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    forward = torch.compile(model) if compile_model else model

    def step():
        with autocast:
            img, txt, scale = forward(x, tokens)
            loss = loss_fn(img, txt, scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def encode():
        with autocast:
            model.encode_image(x)

    train = _images_per_s(step, batch, steps, warmup, device)
    model.eval()
    return train, _images_per_s(encode, batch, steps, warmup, device)


def write_jpeg_photos(out_dir: str, n: int, seed: int = 0, sizes=(224, 500)) -> str:
    """n JPEG photos (quality 90) with a side length uniform in `sizes` each way, and their JSONL meta; the
    content (smooth colour fields, shapes and mild noise) compresses like photos, not like pure noise."""
    import json as _json
    import os

    import numpy as np
    from PIL import Image, ImageDraw

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        field = np.stack([127 + 100 * np.sin(xx / rng.uniform(20, 80) + yy / rng.uniform(20, 80) + p) for p in phase], -1)
        img = Image.fromarray(np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            draw.ellipse([x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))],
                         fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
        name = f"{i:05d}.jpg"
        img.save(os.path.join(out_dir, name), quality=90)
        lines.append(_json.dumps({"filename": name, "caption": f"a photo of a round thing number {i} in colour"}))
    meta = os.path.join(out_dir, "meta.jsonl")
    with open(meta, "w") as f:
        f.write("\n".join(lines) + "\n")
    return meta


def bench_loader(preset, mode, batch, workers, device, photo_dir) -> dict:
    """One pass of train_declip's training loader (built by its build_data, as train() builds it) over
    the photos in photo_dir: images/s after the first batch (worker start-up excluded)."""
    import types

    args = td.parse_args(td.build_parser(), [
        "--data", f"{photo_dir}/meta.jsonl", "--data-root", photo_dir, "--model", preset, "--mode", mode,
        "--batch-size", str(batch), "--workers", str(workers), "--epochs", "1", "--no-eval"])
    cfg = md.get_config(preset)
    accelerator = types.SimpleNamespace(device=device, process_index=0, num_processes=1)
    data = td.build_data(args, cfg, td.Extension(), accelerator)
    it = iter(data.loader)
    n = next(it)["images"].shape[0]
    t, images = time.perf_counter(), 0
    for _ in range(data.steps_per_epoch - 1):
        images += next(it)["images"].shape[0]
    dt = time.perf_counter() - t
    return dict(images=n + images, timed_images=images, img_s=images / max(dt, 1e-9))


def run_loader_bench(args, device, step_rows: list) -> list:
    """The --loader rows: per preset and mode, the loader's images/s with each worker count, and the
    workers the measured training step needs to be fed (its images/s over the best rate per worker)."""
    import contextlib
    import os
    import tempfile

    rows = []
    with contextlib.ExitStack() as stack:
        photo_dir = args.loader_dir or stack.enter_context(tempfile.TemporaryDirectory())
        if not os.path.isfile(os.path.join(photo_dir, "meta.jsonl")):
            t = time.perf_counter()
            write_jpeg_photos(photo_dir, args.loader_images)
            print(f"wrote {args.loader_images} JPEG photos of 224-500 px in {time.perf_counter() - t:.0f} s "
                  f"({photo_dir})")
        print(f"{'preset':9} {'mode':7} {'workers':>7} {'loader img/s':>12} {'per worker':>10}")
        for preset in args.presets:
            for mode in args.modes:
                mine = []
                for w in args.loader_workers:
                    r = bench_loader(preset, mode, args.batch_size, w, device, photo_dir)
                    per = r["img_s"] / max(1, w)  # 0 workers: the main process loads, one core
                    mine.append(dict(preset=preset, mode=f"loader-{mode}", workers=w, batch=args.batch_size,
                                     images=r["images"], loader_img_s=round(r["img_s"], 1),
                                     per_worker_img_s=round(per, 1)))
                    print(f"{preset:9} {mode:7} {w:7d} {r['img_s']:12.1f} {per:10.1f}", flush=True)
                rows += mine
                steps = [r["train_img_s"] for r in step_rows if r.get("preset") == preset and r.get("mode") == mode]
                if steps:
                    per = max(r["per_worker_img_s"] for r in mine)
                    need = math.ceil(max(steps) / per)
                    print(f"  {preset} {mode}: the step trains {max(steps):.0f} img/s; at {per:.0f} img/s per "
                          f"worker the loader needs {need} worker{'s' if need != 1 else ''} to keep up")
    return rows


def _peak_mem(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS, GiB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny"], help="model presets to measure")
    p.add_argument("--modes", nargs="+", default=["clip", "declip"], choices=("clip", "declip"))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=256, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--text-len", type=int, default=None, help="tokens per caption (default: the context length)")
    p.add_argument("--augment", action="store_true", help="include the batched MoCo-v2 views in each step")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compare-open-clip", action="store_true",
                   help="also train open_clip's own model of each preset (tiny rebuilt in open_clip, RN50, RN101, ViT-B-32) "
                        "with its ClipLoss, and its forward-only encode_image, beside our CLIP mode (ratios)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table / measured)")
    p.add_argument("--cpu", action="store_true", help="measure on the CPU even if a GPU is present")
    p.add_argument("--profile", action="store_true",
                   help="after each training measurement, print the operators/kernels that take the most time")
    p.add_argument("--default-malloc", action="store_true",
                   help="on the CPU, keep glibc's default allocator settings instead of the training loop's")
    p.add_argument("--loader", action="store_true",
                   help="also time the training data loader on JPEG photos (see --loader-*) beside the step")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to time")
    p.add_argument("--loader-images", type=int, default=2000, help="JPEG photos to generate for --loader")
    p.add_argument("--loader-dir", default=None,
                   help="directory of the photos (default: a temporary one); generated there when it has no "
                        "meta.jsonl, else its meta.jsonl (filename, caption) is read as it is")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    other = [x for x in args.presets if x != "tiny" and x not in OPEN_CLIP_NAMES]
    if args.compare_open_clip and other:
        p.error(f"--compare-open-clip: open_clip has no model for {', '.join(other)} (tiny, {', '.join(OPEN_CLIP_NAMES)})")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    if device.type == "cpu":
        name += ", glibc default malloc" if args.default_malloc or not td.keep_freed_cpu_memory() else ""
    rows = []
    print(f"device: {name}; batch {args.batch_size}; {args.steps} timed steps")
    header = f"{'preset':9} {'mode':7} {'prec':5} {'train img/s':>11} {'eval img/s':>10} {'GFLOP/img':>9} {'MFU %':>6} {'peak GiB':>8}"
    print(header)
    measured = {}  # (preset, precision, "eval" or mode) -> unrounded img/s, for --compare-open-clip
    for preset in args.presets:
        text_len = args.text_len or md.get_config(preset).context_length
        for prec in args.precisions:
            peak = device_peak_tflops(device, prec, args.peak_tflops)
            ev = measured[preset, prec, "eval"] = bench_eval(preset, prec, args.batch_size, args.steps, args.warmup,
                                                             device)
            for mode in args.modes:
                ips, flops, mem = bench_train(preset, mode, prec, args.batch_size, args.steps, args.warmup, device,
                                              text_len, augment=args.augment, compile_model=args.compile,
                                              profile=args.profile)
                measured[preset, prec, mode] = ips
                mfu = 100 * ips * flops / (peak * 1e12)
                row = dict(preset=preset, mode=mode, precision=prec, batch=args.batch_size, train_img_s=round(ips, 1),
                           eval_img_s=round(ev, 1), gflop_per_img=round(flops / 1e9, 3), mfu=round(mfu, 2),
                           peak_tflops=round(peak, 2), peak_mem_gib=round(mem, 2), device=name)
                rows.append(row)
                print(f"{preset:9} {mode:7} {prec:5} {ips:11.1f} {ev:10.1f} {flops / 1e9:9.3f} {mfu:6.2f} {mem:8.2f}",
                      flush=True)
            if "clip" in args.modes and "declip" in args.modes:
                c = next(r for r in rows if r["preset"] == preset and r["precision"] == prec and r["mode"] == "clip")
                d = next(r for r in rows if r["preset"] == preset and r["precision"] == prec and r["mode"] == "declip")
                print(f"  {preset} {prec}: DeCLIP/CLIP time per image {c['train_img_s'] / d['train_img_s']:.2f}x, "
                      f"FLOPs per image {d['gflop_per_img'] / c['gflop_per_img']:.2f}x")
    if args.compare_open_clip:
        for preset in args.presets:
            cfg = md.get_config(preset)
            # our CLIP step as measured above, unless that one had other inputs than open_clip's (views, length)
            same_step = not args.augment and (args.text_len or cfg.context_length) == cfg.context_length
            for prec in args.precisions:
                ours = measured.get((preset, prec, "clip")) if same_step else None
                if ours is None:
                    ours = bench_train(preset, "clip", prec, args.batch_size, args.steps, args.warmup, device,
                                       cfg.context_length, compile_model=args.compile)[0]
                ours_eval = measured[preset, prec, "eval"]
                theirs, theirs_eval = bench_open_clip(preset, prec, args.batch_size, args.steps, args.warmup, device,
                                                      cfg.context_length, compile_model=args.compile)
                rows.append(dict(preset=preset, mode="clip-vs-open_clip", precision=prec, batch=args.batch_size,
                                 ours_img_s=round(ours, 1), open_clip_img_s=round(theirs, 1),
                                 ratio=round(ours / theirs, 3), ours_eval_img_s=round(ours_eval, 1),
                                 open_clip_eval_img_s=round(theirs_eval, 1),
                                 eval_ratio=round(ours_eval / theirs_eval, 3), device=name))
                print(f"{preset} CLIP {prec} batch {args.batch_size}: train ours {ours:.1f} img/s, open_clip "
                      f"{theirs:.1f}, ratio {ours / theirs:.2f}; eval ours {ours_eval:.1f}, open_clip forward-only "
                      f"{theirs_eval:.1f}, ratio {ours_eval / theirs_eval:.2f}", flush=True)
    if args.loader:
        rows += run_loader_bench(args, device, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
