"""defend_finetune.py: CleanCLIP's objective against its official formula, its views built whatever the
victim's mode, and FT on the victim's own loss."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

import data_declip as dd
import defend_finetune as dft
import modeling_declip as md
from test_defend_nad import SMALL, victim  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(b=6, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g)
    images_aug = torch.randn(b, 3, size, size, generator=g)
    tokens = dd.tokenize([f"a photo of thing {i}" for i in range(b)], 16)
    tokens_aug = dd.tokenize([f"photo thing {i} a" for i in range(b)], 16)
    return images, images_aug, tokens, tokens_aug


@pytest.mark.parametrize("clip_weight,inmodal_weight", [(1.0, 1.0), (2.0, 0.5)])
def test_cleanclip_loss_equals_the_official_formula(clip_weight, inmodal_weight):
    """CleanCLIP src/train.py get_loss: clip_weight * (CE(I T^T) + CE(T I^T)) / 2
    + inmodal_weight * (CE(I I_aug^T) + CE(T T_aug^T)) / 2, embeddings of one forward over the
    originals and their augmented copies."""
    torch.manual_seed(0)
    model = md.build_model("tiny", context_length=16).train()
    images, images_aug, tokens, tokens_aug = _batch()
    w = md.LossWeights(clip=clip_weight, ss=0, mlm=0, nn=0, inmodal=inmodal_weight)
    out = model(images=images, images2=images_aug, tokens=tokens, tokens_aug=tokens_aug, weights=w,
                objective="cleanclip")

    f = F.normalize(model.encode_image(torch.cat([images, images_aug])), dim=1)
    t = F.normalize(model.encode_text(torch.cat([tokens, tokens_aug])), dim=1)
    i, ia, x, xa = f[:6], f[6:], t[:6], t[6:]
    s = model.logit_scale.exp().clamp(max=100)
    target = torch.arange(6)
    cross = (F.cross_entropy(s * i @ x.t(), target) + F.cross_entropy(s * x @ i.t(), target)) / 2
    inmodal = (F.cross_entropy(s * i @ ia.t(), target) + F.cross_entropy(s * x @ xa.t(), target)) / 2
    assert out["clip"].item() == pytest.approx(cross.item(), rel=1e-5)
    assert out["inmodal"].item() == pytest.approx(inmodal.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((clip_weight * cross + inmodal_weight * inmodal).item(), rel=1e-5)
    out["loss"].backward()  # one graph through both towers
    assert model.visual.conv1.weight.grad is not None and model.text.token_embedding.weight.grad is not None


def test_cleanclip_caption_view_is_one_eda_operation_on_letters_and_spaces():
    caption = "A Photo of the Pullover, on a white background!"
    outs = {dd.eda_cleanclip(caption, random.Random(k)) for k in range(200)}
    base = "a photo of the pullover on a white background".split()
    assert all(set(o) <= set("abcdefghijklmnopqrstuvwxyz ") for o in outs)
    lengths = {len(o.split()) - len(base) for o in outs}
    assert lengths & {1} and lengths & {-1}  # insertion and deletion both occur
    assert any(sorted(o.split()) == sorted(base) and o.split() != base for o in outs)  # a swap
    assert dd.eda_cleanclip(caption, random.Random(3)) == dd.eda_cleanclip(caption, random.Random(3))


def test_autoaugment_view_is_per_image_and_a_function_of_the_step_generator():
    ext = dft.CleanCLIP()
    ext.setup(type("A", (), {"device": torch.device("cpu")})(), md.build_model("tiny"), None, None)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a, b, c = (torch.stack(ext.augmented(images, torch.Generator().manual_seed(s))) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = [(a[k] != images[k]).float().mean().item() for k in range(16)]
    assert len({round(v, 4) for v in changed}) > 3  # different policies per image, not one for the batch


def test_cleanclip_views_are_the_whole_photo_resized_and_centre_cropped():
    """CleanCLIP's processor: Resize(S) on the shorter side, CenterCrop(S), of the whole image (not of
    the canvas the loader pads photos into)."""
    ext = dft.CleanCLIP()
    ext.setup(type("A", (), {"device": torch.device("cpu")})(), md.build_model("tiny"), None, None)
    g = torch.Generator().manual_seed(0)
    wide, tall = torch.randint(0, 256, (3, 40, 100), generator=g, dtype=torch.uint8), \
        torch.randint(0, 256, (3, 90, 45), generator=g, dtype=torch.uint8)
    batch = dict(images=dd.pad_images([wide, tall])[0], sizes=torch.tensor([[40, 100], [90, 45]]),
                 tokens=dd.tokenize(["a", "b"], 77), tokens_aug=dd.tokenize(["a", "b"], 77))
    inputs = ext.make_inputs(batch, 2, torch.Generator().manual_seed(1), None)
    for k, img in enumerate((wide, tall)):
        ref = TF.center_crop(TF.resize(img.float() / 255, 32, antialias=True), 32)
        ref = TF.normalize(ref.clamp(0, 1), ext.cfg.image_mean, ext.cfg.image_std)
        assert (inputs["images"][k] - ref).abs().max() < 2e-5
    assert inputs["images2"].shape == (2, 3, 32, 32) and inputs["objective"] == "cleanclip"


@pytest.mark.parametrize("mode", ["clip", "declip"])
def test_cleanclip_trains_its_unimodal_terms_whatever_the_victim_mode(victim, tmp_path, mode):
    out = tmp_path / "cc"
    dft.main(SMALL + ["--ckpt", str(victim), "--clean-fraction", "0.01", "--no-eval", "--method", "cleanclip",
                      "--mode", mode, "--max-steps", "2", "--out-dir", str(out)])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert len(rows) == 2
    for r in rows:
        assert r["img_inmodal"] > 0 and r["txt_inmodal"] > 0 and "mlm" not in r and "nn" not in r
        assert r["loss"] == pytest.approx(r["clip"] + 0.5 * (r["img_inmodal"] + r["txt_inmodal"]), rel=1e-4)
    cfg = json.load(open(out / "config.json"))
    assert cfg["resolved"]["weights"] == dict(clip=1.0, ss=0.0, mlm=0.0, nn=0.0, inmodal=1.0)
    assert cfg["resolved"]["defense"] == "cleanclip"


def test_ft_trains_the_victims_declip_loss(victim, tmp_path):
    out = tmp_path / "ft"
    dft.main(SMALL + ["--ckpt", str(victim), "--clean-fraction", "0.01", "--no-eval", "--max-steps", "1",
                      "--out-dir", str(out)])
    row = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line][0]
    assert {"clip", "ss", "mlm", "nn"} <= set(row) and "inmodal" not in row
    assert json.load(open(out / "config.json"))["resolved"]["defense"] == "ft"


# ----------------------------------------------------------------------------------------------
# PAR


def _par(model):
    ext = dft.PAR()
    ext.setup(type("A", (), {"device": torch.device("cpu")})(), model, None, None)
    return ext


def test_par_drift_is_the_official_squared_distance_and_vanishes_past_tau():
    """PerturbAndRecover losses.py: l2(normalize(e), normalize(f)) summed over dimensions, mean over the
    batch; threshold_tensor sets it to 0 once it exceeds loss_thresh."""
    g = torch.Generator().manual_seed(0)
    e, f = torch.randn(8, 16, generator=g, requires_grad=True), torch.randn(8, 16, generator=g)
    d = dft.par_distance(e, f, tau=4.0)
    ref = F.mse_loss(F.normalize(e, dim=-1), F.normalize(f, dim=-1), reduction="none").sum(dim=1).mean()
    assert d.item() == pytest.approx(ref.item(), rel=1e-6) and 0.5 < d.item() < 4
    d.backward()
    assert e.grad.abs().sum() > 0
    e.grad = None
    past = dft.par_distance(e, f, tau=d.item() - 1e-3)
    past.backward()
    assert past.item() == 0.0 and e.grad.abs().sum() == 0


def test_par_loss_is_clip_minus_half_the_drift_from_the_frozen_victim():
    torch.manual_seed(0)
    model = md.build_model("tiny", context_length=16).train()
    ext = _par(model)
    with torch.no_grad():  # the student has moved away from the victim
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images, _, tokens, _ = _batch()
    inputs = dict(images=images, tokens=tokens, weights=ext.loss_weights(None))
    with model.tap(ext.tap_names(model)) as taps:
        out = model(**inputs)
        terms = ext.extra_loss(model, inputs, taps)
    e_img, e_txt = model.encode_image(images), model.encode_text(tokens)
    f_img, f_txt = ext.frozen.encode_image(images), ext.frozen.encode_text(tokens)
    d = lambda a, b: (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1).mean()
    s = model.logit_scale.exp().clamp(max=100)
    i, t, target = F.normalize(e_img, dim=1), F.normalize(e_txt, dim=1), torch.arange(6)
    clip = (F.cross_entropy(s * i @ t.t(), target) + F.cross_entropy(s * t @ i.t(), target)) / 2
    assert out["clip"].item() == pytest.approx(clip.item(), rel=1e-5)
    assert terms["par_img"].item() == pytest.approx(-0.5 * d(e_img, f_img).item(), rel=1e-5)
    assert terms["par_txt"].item() == pytest.approx(-0.5 * d(e_txt, f_txt).item(), rel=1e-5)
    assert terms["par_img"].item() < 0 and terms["par_txt"].item() < 0
    (out["loss"] + terms["par_img"] + terms["par_txt"]).backward()
    assert model.visual.conv1.weight.grad is not None
    assert all(p.grad is None for p in ext.frozen.parameters()) and not ext.frozen.training


def test_par_view_adds_only_positive_noise_and_erases_one_small_square():
    """The official transform: Resize + CenterCrop, RandomApply(AddGaussianNoise(0, 0.2), p=0.5) whose
    noise is clipped to [0, 1] before it is added, Normalize, RandomErasing(p=0.5, scale 0.5-1 %,
    ratio 1, value 0)."""
    model = md.build_model("tiny")
    ext, cfg = _par(model), model.config
    images = [torch.full((3, 32, 32), 100, dtype=torch.uint8)] * 200
    plain = dft.resized_and_cropped(images[:1], cfg)[0]
    views = ext.augmented(images, torch.Generator().manual_seed(0))
    again = ext.augmented(images, torch.Generator().manual_seed(0))
    assert torch.equal(views, again)
    erased = (views == 0).all(dim=1)  # 0 after normalisation: the erased square, in every channel
    noisy = ((views - plain).abs() > 1e-6).any(dim=1) & ~erased
    n_erased = [int(erased[k].sum()) for k in range(200)]
    assert 0.4 < sum(n > 0 for n in n_erased) / 200 < 0.6
    assert {n for n in n_erased if n} <= {4, 9}  # side round(sqrt(0.5-1 % of 1,024 px)): 2 or 3
    frac_noisy = sum(bool(noisy[k].any()) for k in range(200)) / 200
    assert 0.4 < frac_noisy < 0.6
    assert ((views - plain)[~erased.unsqueeze(1).expand_as(views)] >= -1e-6).all()  # noise only adds


def test_par_trains_clip_minus_drift_whatever_the_victim_mode(victim, tmp_path):
    out = tmp_path / "par"
    dft.main(SMALL + ["--ckpt", str(victim), "--clean-fraction", "0.01", "--no-eval", "--method", "par",
                      "--max-steps", "2", "--warmup-steps", "0", "--lr", "1e-3", "--out-dir", str(out)])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert len(rows) == 2
    # the text tower starts equal to the frozen copy (drift 0); the image tower's BatchNorm uses batch
    # statistics where the frozen copy uses its running ones
    assert rows[0]["par_txt"] == 0 and rows[1]["par_txt"] < 0
    for r in rows:
        assert r["par_img"] < 0 and not {"ss", "mlm", "nn"} & set(r)
        assert r["loss"] == pytest.approx(r["clip"] + r["par_img"] + r["par_txt"], rel=1e-4)
    cfg = json.load(open(out / "config.json"))["resolved"]
    assert cfg["defense"] == "par" and cfg["defense_settings"] == {"tau": 2.15, "drift_weight": 0.5}
    assert cfg["weights"] == dict(clip=1.0, ss=0.0, mlm=0.0, nn=0.0, inmodal=0.0)
