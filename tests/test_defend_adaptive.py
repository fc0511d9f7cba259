"""defend_adaptive.py: MI-FGSM bounds and ascent, CropResizeCorrupt statistics, false-negative masking
of the appended rows, and end-to-end runs (cache and online) on a tiny poisoned victim."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data_declip as dd
import defend_adaptive as adp
import defend_nad as nad
import modeling_declip as md
import train_declip as td


# the same one-thread setting, small flags and tiny poisoned victim as the NAD tests
from test_defend_nad import SMALL, victim  # noqa: E402,F401  (pytest fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(seed=0):
    torch.manual_seed(seed)
    return md.build_model("tiny").eval().requires_grad_(False)


def _batch(model, b=6, seed=0):
    """uint8 Fashion-MNIST images and the DeCLIP text inputs of b pairs."""
    base = dd.build_caption_dataset(None, image_size=model.config.image_size)
    items = [base[i] for i in range(b)]
    imgs = torch.stack([it["image"] for it in items])
    tokens = dd.tokenize([it["caption"] for it in items], model.config.context_length)
    masked, labels = dd.mask_tokens(tokens, torch.Generator().manual_seed(seed))
    return imgs, dict(tokens=masked, tokens_aug=tokens, mlm_labels=labels, weights=md.LossWeights())


# ----------------------------------------------------------------------------------------------
# (A) MI-FGSM


def test_mi_fgsm_stays_within_eps_and_bounds_and_increases_the_teacher_loss():
    teacher = _teacher()
    imgs, text = _batch(teacher)
    cfg = teacher.config
    x0 = dd.eval_transform(imgs, cfg.image_size, cfg.image_mean, cfg.image_std)
    loss_fn = adp.teacher_loss_fn(teacher, text)
    before = float(loss_fn(x0, x0))
    x1, x2 = adp.mi_fgsm(loss_fn, [x0, x0])
    after = float(loss_fn(x1, x2))
    lb, ub = x0.amin(dim=(2, 3), keepdim=True), x0.amax(dim=(2, 3), keepdim=True)
    eps = 0.0125 * (ub - lb)
    # a random untrained teacher is flat: compare with random +-eps corners of the same ball
    g = torch.Generator().manual_seed(0)
    corner = lambda: x0 + eps * (torch.randint(0, 2, x0.shape, generator=g) * 2 - 1)
    random_change = max(abs(float(loss_fn(corner(), corner())) - before) for _ in range(3))
    assert after - before > 1e-4 and after - before > 50 * random_change
    for x in (x1, x2):
        assert ((x - x0).abs() <= eps + 1e-6).all()
        assert ((x >= lb - 1e-6) & (x <= ub + 1e-6)).all()
        assert (x - x0).abs().amax(dim=(2, 3)).gt(0.5 * eps[..., 0, 0]).float().mean() > 0.9  # mostly at the bound
    assert all(p.grad is None for p in teacher.parameters())  # no parameter gradient was computed
    # the loss is a deterministic function of the images (eval mode, no memory-bank update)
    assert float(loss_fn(x1, x2)) == after
    # stored as uint8, the perturbation stays within eps (in pixel levels) and within [lb, ub]
    u8 = adp.to_uint8(x1, imgs, cfg.image_mean, cfg.image_std)
    d = u8.float() - imgs.float()
    eps_px = 0.0125 * (imgs.float().amax(dim=(2, 3), keepdim=True) - imgs.float().amin(dim=(2, 3), keepdim=True))
    assert (d.abs() <= eps_px + 1e-4).all() and d.abs().sum() > 0
    assert (u8 >= imgs.amin(dim=(2, 3), keepdim=True)).all() and (u8 <= imgs.amax(dim=(2, 3), keepdim=True)).all()


def test_mi_fgsm_follows_the_update_rule_on_a_linear_loss():
    # loss = sum(w * x): the gradient is w everywhere, so every step moves x by alpha * sign(w), clipped to eps
    x0 = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])
    w = torch.tensor([[[[1.0, -1.0], [2.0, -3.0]]]])
    (x,) = adp.mi_fgsm(lambda v: (w * v).sum(), [x0], eps=0.1, alpha=0.05, steps=3)
    want = torch.minimum(torch.maximum(x0 + 0.1 * w.sign(), x0.amin()), x0.amax())
    assert torch.allclose(x, want)
    (x,) = adp.mi_fgsm(lambda v: (w * v).sum(), [x0], eps=0.1, alpha=0.05, steps=1)
    assert torch.allclose(x, torch.minimum(torch.maximum(x0 + 0.05 * w.sign(), x0.amin()), x0.amax()))


# ----------------------------------------------------------------------------------------------
# (B) CropResizeCorrupt


def test_crop_resize_corrupt_adds_noise_only_for_large_crops_at_rate_0_15():
    aug = adp.CropResizeCorrupt(16, mean=(0, 0, 0), std=(1, 1, 1), mocov2=False)
    imgs = torch.full((4000, 3, 16, 16), 128, dtype=torch.uint8)  # a constant image stays constant unless noised
    out = aug(imgs, torch.Generator().manual_seed(0))
    draw = aug.last_draw
    noisy = out.flatten(1).std(dim=1) > 1e-4
    assert torch.equal(noisy, draw["corrupt"])
    assert (draw["s"][draw["corrupt"]] > 0.6).all()
    assert draw["s"].min() >= 0.2 and draw["s"].max() <= 1.0
    rate = draw["corrupt"].float().mean().item()
    assert abs(rate - 0.15) < 0.02, rate  # 0.4 of the draws have s > 0.6, times p 0.3 (std of the rate 0.006)
    large = draw["s"] > 0.6
    assert abs(draw["corrupt"][large].float().mean().item() - 0.3) < 0.04
    sig = draw["sigma"][draw["corrupt"]]
    assert sig.unique().tolist() == pytest.approx([0.08, 0.12])
    measured = out[draw["corrupt"]].flatten(1).std(dim=1)
    assert torch.allclose(measured, sig, atol=0.012)


def test_crop_resize_corrupt_crops_area_s_and_is_deterministic_given_the_generator():
    aug = adp.CropResizeCorrupt(32)
    boxes = aug.crop_boxes(2000, 224, 224, torch.Generator().manual_seed(1))
    s = aug.last_draw["s"].double()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 224 ** 2
    ok = (area - s).abs() < 0.02  # w, h rounded to pixels
    assert ok.float().mean() > 0.97  # the rest: torchvision's centre-crop fallback
    assert aug.scale == (0.2, 1.0)
    imgs = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    a = aug(imgs, torch.Generator().manual_seed(3))
    b = aug(imgs, torch.Generator().manual_seed(3))
    c = aug(imgs, torch.Generator().manual_seed(4))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_crop_resize_corrupt_keeps_the_trigger_hook():
    aug = adp.CropResizeCorrupt(16, mean=(0, 0, 0), std=(1, 1, 1), mocov2=False)
    imgs = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    mask = torch.tensor([True, False, True, False, False, False])
    out = aug(imgs, torch.Generator().manual_seed(0), trigger=lambda x: torch.ones_like(x), poison_mask=mask)
    assert (out[mask] == 1).all() and not (out[~mask] == 1).all()


# ----------------------------------------------------------------------------------------------
# (C) appended rows and false negatives


def test_appended_rows_duplicate_text_and_mask_exactly_the_duplicate_pairs():
    g = torch.Generator().manual_seed(0)
    b, k, d = 6, 3, 8
    inputs = dict(images=torch.randn(b, 3, 4, 4, generator=g), images2=torch.randn(b, 3, 4, 4, generator=g),
                  tokens=torch.randint(1, 99, (b, 5), generator=g), tokens_aug=torch.randint(1, 99, (b, 5), generator=g),
                  mlm_labels=torch.randint(-100, 99, (b, 5), generator=g), weights=md.LossWeights())
    index = torch.tensor([40, 7, 13, 2, 99, 5])
    sel = torch.tensor([4, 0, 2])
    adv = [torch.randn(k, 3, 4, 4, generator=g) for _ in range(2)]
    out = adp.append_rows(inputs, sel, adv, index)
    assert out["images"].shape[0] == out["images2"].shape[0] == b + k
    assert torch.equal(out["images"][b:], adv[0]) and torch.equal(out["images2"][b:], adv[1])
    for key in ("tokens", "tokens_aug", "mlm_labels"):
        assert torch.equal(out[key][b:], inputs[key][sel]) and torch.equal(out[key][:b], inputs[key])
    assert out["ids"].tolist() == [40, 7, 13, 2, 99, 5, 99, 40, 13]
    assert "ids" not in adp.append_rows(inputs, sel, adv, index, mask_duplicates=False)

    # the contrastive loss with these ids equals a hand computation with the duplicate pairs at -inf
    x = F.normalize(torch.randn(b + k, d, generator=g), dim=1)
    y = F.normalize(torch.randn(b + k, d, generator=g), dim=1)
    scale = torch.tensor(10.0)
    dup = [(4, 6), (0, 7), (2, 8)]  # (clean row, its adversarial row)
    mask = torch.zeros(b + k, b + k, dtype=torch.bool)
    for i, j in dup:
        mask[i, j] = mask[j, i] = True
    ids = out["ids"]
    got = ids[:, None] == ids[None, :]
    got.fill_diagonal_(False)
    assert torch.equal(got, mask) and int(mask.sum()) == 2 * k  # exactly the duplicate pairs

    def ce(logits):
        return F.cross_entropy(logits, torch.arange(b + k))

    lxy, lyx = scale * x @ y.t(), scale * y @ x.t()
    want = 0.5 * (ce(lxy.masked_fill(mask, -math.inf)) + ce(lyx.masked_fill(mask, -math.inf)))
    assert torch.allclose(md.info_nce(x, y, scale, ids), want)
    assert not torch.allclose(md.info_nce(x, y, scale, None), want)
    assert torch.allclose(md.info_nce(x, y, scale, None), 0.5 * (ce(lxy) + ce(lyx)))


class _Acc:
    device = torch.device("cpu")
    is_main_process = True

    @staticmethod
    def autocast():
        import contextlib
        return contextlib.nullcontext()


def test_online_extend_batch_appends_half_the_batch_of_crafted_rows(tmp_path):
    teacher = _teacher(1)
    path = str(tmp_path / "t.safetensors")
    md.save_model(teacher, path)
    student = _teacher(2).train()
    ext = adp.AdaptiveExtension(path, mode="online")
    ext.setup(_Acc(), student, td.parse_args(adp.build_parser(), []), None)
    imgs, text = _batch(student, b=6)
    aug = dd.GpuAugment(32)
    g = torch.Generator().manual_seed(0)
    inputs = dict(images=aug(imgs, g), images2=aug(imgs, g), **text)
    batch = dict(index=torch.tensor([10, 11, 12, 13, 14, 15]))
    out = ext.extend_batch(inputs, batch, torch.Generator().manual_seed(5))
    again = ext.extend_batch(inputs, batch, torch.Generator().manual_seed(5))
    assert out["images"].shape == (9, 3, 32, 32) and torch.equal(out["images"], again["images"])
    sel = torch.tensor([int(i) - 10 for i in out["ids"][6:]])
    assert len(set(sel.tolist())) == 3
    for key, clean in (("images", inputs["images"]), ("images2", inputs["images2"])):
        delta = out[key][6:] - clean[sel]
        lb, ub = clean[sel].amin(dim=(2, 3), keepdim=True), clean[sel].amax(dim=(2, 3), keepdim=True)
        assert (delta.abs() <= 0.0125 * (ub - lb) + 1e-6).all() and delta.abs().sum() > 0
    assert torch.equal(out["tokens"][6:], inputs["tokens"][sel])
    # the distillation term covers every row and both views
    with student.tap(ext.tap_names(student)) as taps:
        student(**out)
        term = ext.extra_loss(student, out, taps)["nad"]
    assert taps["visual.layer1"][0].shape[0] == 9 and float(term.detach()) > 0


def test_attack_uses_the_teachers_trained_memory_bank_and_leaves_the_nn_term_out_without_one(victim, tmp_path):
    args = td.parse_args(adp.build_parser(), [])
    saved = torch.load(victim / "state" / "custom_checkpoint_0.pkl", weights_only=True)
    with_state = adp.AdaptiveExtension(str(victim / "model.safetensors"), mode="online")
    with_state.setup(_Acc(), _teacher(2).train(), args, None)
    assert torch.equal(with_state.teacher.nn_bank.bank, saved["bank_bank"])
    assert with_state.attack_weights.nn == 0.2 and "trained memory bank" in with_state.record()["attack_nn_bank"]
    # a bare model file has no bank: its random initial bank must not steer the attack
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((victim / "model.safetensors").read_bytes())
    alone = adp.AdaptiveExtension(str(bare), mode="online")
    alone.setup(_Acc(), _teacher(2).train(), args, None)
    assert alone.attack_weights.nn == 0.0 and alone.attack_weights.clip == 0.4
    assert "left out" in alone.record()["attack_nn_bank"]


class _Acc1(_Acc):
    process_index, num_processes = 0, 1

    @staticmethod
    def wait_for_everyone():
        pass


def test_cache_crafts_on_a_model_size_resize_of_each_photo_and_resizes_it_back(tmp_path):
    """spec §6.4 A: each whole photo resized to exactly S x S (aspect not kept) is attacked; the result is
    used at the photo's own size (resized back, bicubic), with the photo's crop statistics."""
    from PIL import Image
    import numpy as np
    import torchvision.transforms.functional as TF

    teacher = _teacher(1)
    path = str(tmp_path / "t.safetensors")
    md.save_model(teacher, path)
    student = _teacher(2).train()
    g = torch.Generator().manual_seed(0)
    shapes = [(60, 40), (30, 50), (32, 32), (44, 36)]  # (w, h); one already 32 x 32
    rows = []
    for k, (w, h) in enumerate(shapes):
        arr = TF.gaussian_blur(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), 5, 1.5)
        Image.fromarray(arr.permute(1, 2, 0).numpy()).save(tmp_path / f"{k}.png")
        rows.append(json.dumps(dict(filename=f"{k}.png", caption=f"a photo of thing {k}")))
    (tmp_path / "m.jsonl").write_text("\n".join(rows))
    ds = dd.build_caption_dataset(str(tmp_path / "m.jsonl"), image_size=32, keep_aspect=True)
    clean = [ds[k]["image"] for k in range(4)]
    args = td.parse_args(adp.build_parser(), ["--out-dir", str(tmp_path), "--batch-size", "4"])
    ext = adp.AdaptiveExtension(path, mode="cache")
    ext.setup(_Acc1(), student, args, ds)
    assert ext.cache.shape == (4, 3, 32, 32)
    assert ext.cache_sizes.tolist() == [[h, w] for w, h in shapes] == [list(c.shape[1:]) for c in clean]
    for k, img in enumerate(clean):  # within eps of torchvision's Resize((32, 32)) of the whole photo
        ref = TF.resize(img, [32, 32], antialias=True).float()
        eps = 0.0125 * (ref.amax(dim=(1, 2), keepdim=True) - ref.amin(dim=(1, 2), keepdim=True))
        d = ext.cache[k].float() - ref
        assert (d.abs() <= eps + 1e-4).all() and (d != 0).any(), k
    canvas, hw = adp.resize_back(ext.cache, ext.cache_sizes)
    assert hw.tolist() == ext.cache_sizes.tolist() and canvas.shape == (4, 3, 50, 60)
    for k, (w, h) in enumerate(shapes):  # PIL's default (bicubic) resize back to the photo's size
        pil = np.asarray(Image.fromarray(ext.cache[k].permute(1, 2, 0).numpy()).resize((w, h)))
        assert (canvas[k, :, :h, :w].float() - torch.from_numpy(pil.copy()).permute(2, 0, 1).float()).abs().max() <= 1
    assert torch.equal(canvas[2, :, :32, :32], ext.cache[2])  # a 32 x 32 photo is never resampled
    # each step: the adversarial rows' views come from their whole photos
    imgs, text = _batch(student, b=4)
    aug = dd.GpuAugment(32)
    inputs = dict(images=aug(imgs, g), images2=aug(imgs, g), **text)
    out = ext.extend_batch(inputs, dict(index=torch.arange(4)), torch.Generator().manual_seed(5))
    assert out["images"].shape == (6, 3, 32, 32) and out["images2"].shape == (6, 3, 32, 32)


# ----------------------------------------------------------------------------------------------
# End to end


def _run(victim, out, *extra):
    args = td.parse_args(adp.build_parser(), SMALL + ["--ckpt", str(victim), "--teacher", str(victim),
                                                      "--clean-fraction", "0.01", "--no-eval", "--out-dir", str(out),
                                                      *extra])
    adp.check_args(args)
    ext = adp.AdaptiveExtension(nad.prepare_teacher(args), mode=args.adv_mode, adv_rows=args.adv_rows,
                                mask_duplicates=not args.keep_duplicate_negatives)
    summary = td.run_defense(args, ext)
    return summary, ext


def test_cache_mode_run_writes_run_dir_and_a_cache_within_eps(victim, tmp_path):
    out = tmp_path / "adp"
    summary, ext = _run(victim, out, "--max-steps", "2", "--clean-fraction", "0.002")
    assert summary["steps"] == 2
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "adv_cache.pt"):
        assert (out / name).is_file()
    assert not (out / "eval.json").exists()  # --no-eval: no evaluation, no numbers
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2] and all(r["nad"] > 0 for r in rows)
    cfg = json.load(open(out / "config.json"))
    assert cfg["resolved"]["defense"] == "adaptive" and cfg["resolved"]["defense_settings"]["mode"] == "cache"
    assert cfg["resolved"]["defense_settings"]["mask_duplicates"] is True

    # one adversarial image per clean pair, each within eps of its clean image (pixel levels)
    subset = cfg["clean_subset"]["indices"]
    cache = torch.load(out / "adv_cache.pt", weights_only=True)
    assert cache["images"].shape == (len(subset), 3, 32, 32) and cache["meta"]["n"] == len(subset)
    base = dd.build_caption_dataset(None, image_size=32)
    clean = torch.stack([base[i]["image"] for i in subset]).float()
    d = cache["images"].float() - clean
    eps_px = 0.0125 * (clean.amax(dim=(2, 3), keepdim=True) - clean.amin(dim=(2, 3), keepdim=True))
    assert (d.abs() <= eps_px + 1e-4).all() and (d != 0).float().mean() > 0.05

    # the teacher never changed; the clean subset excludes every poisoned index
    saved = load_file(str(victim / "model.safetensors"))
    assert all(torch.equal(ext.teacher.state_dict()[k], v) for k, v in saved.items())
    assert not ext.teacher.training and not any(p.requires_grad for p in ext.teacher.parameters())
    poisoned = set(json.load(open(victim / "poison_manifest.json"))["indices"])
    assert poisoned and not poisoned & set(subset)


def test_online_mode_with_duplicate_negatives_runs_end_to_end(victim, tmp_path):
    out = tmp_path / "adp_online"
    summary, _ = _run(victim, out, "--max-steps", "1", "--adv-mode", "online", "--adv-rows", "8",
                      "--keep-duplicate-negatives")
    assert summary["steps"] == 1 and not (out / "adv_cache.pt").exists()
    cfg = json.load(open(out / "config.json"))
    assert cfg["resolved"]["defense_settings"]["mode"] == "online" and cfg["resolved"]["defense_settings"]["mask_duplicates"] is False
    assert "nad" in json.loads(open(out / "metrics.jsonl").readline())
