"""Tests of poison_data: triggers (pixel-exact BadNets patch), poisoning plans, manifest, materialised copy."""

import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import poison_data as pd
from data_declip import run_main
from poison_data import PoisonPlan, UserError, apply_trigger, patch_mask


def _footprint(mask):
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def _pil_template_mask(height, width, size=3, margin=6):
    """What BD_DeCLIP does: PIL bilinear resize of the 32x32 template, non-zero in any channel."""
    t = np.zeros((32, 32, 3), np.uint8)
    t[32 - margin - size:32 - margin, 32 - margin - size:32 - margin] = 255
    resized = np.asarray(Image.fromarray(t).resize((width, height), Image.BILINEAR))
    return torch.from_numpy((resized > 0).any(-1))


def _rand_image(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ patch

def test_patch_footprint_at_224_is_rows_and_cols_158_to_184_all_white():
    mask = patch_mask(224, 224)
    assert _footprint(mask) == (158, 184, 158, 184)
    assert int(mask.sum()) == 27 * 27          # a full square, 729 px
    x = _rand_image(3, 224, 224) * 0.5
    y = apply_trigger(x, "patch")
    assert torch.all(y[:, 158:185, 158:185] == 1.0)


def test_patch_footprint_at_256_is_rows_and_cols_180_to_211():
    mask = patch_mask(256, 256)
    assert _footprint(mask) == (180, 211, 180, 211)
    assert int(mask.sum()) == 32 * 32


def test_patch_margin_3_puts_the_square_at_rows_and_cols_26_to_28_at_32px():
    assert _footprint(patch_mask(32, 32)) == (23, 25, 23, 25)                # spec slice -9:-6
    assert _footprint(patch_mask(32, 32, margin=3)) == (26, 28, 26, 28)      # a 3x3 corner square
    assert _footprint(patch_mask(32, 32, size=4, margin=2)) == (26, 29, 26, 29)  # the demo's corner square


@pytest.mark.parametrize("height,width", [(224, 224), (256, 256), (32, 32), (28, 28), (48, 64), (64, 48),
                                          (100, 37), (37, 100), (5, 300)])
@pytest.mark.parametrize("size,margin", [(3, 6), (3, 3), (1, 0), (5, 10)])
def test_patch_mask_equals_pil_bilinear_resize_of_the_template(height, width, size, margin):
    mask = patch_mask(height, width, size, margin)
    assert mask.shape == (height, width)
    assert torch.equal(mask, _pil_template_mask(height, width, size, margin))


def test_patch_mask_follows_pillow_13_vertical_first_order_when_height_shrinks_most():
    from PIL import __version__ as pil_version

    if int(pil_version.split(".")[0]) < 13:
        pytest.skip("Pillow < 13 always resizes horizontally first")
    # 2x28 and 9x53: the height shrinks by more than twice what the width shrinks, so Pillow 13 resizes
    # vertically first; for these sizes that order rounds differently from horizontal-first.
    for (h, w, margin) in [(2, 28, 6), (9, 53, 3)]:
        hv = pd._pil_fixed_point_pass(pd._pil_bilinear_weights(32, h), pd._pil_fixed_point_pass(
            pd._pil_bilinear_weights(32, w), pd.patch_template(3, margin).long().T).T) > 0
        assert torch.equal(patch_mask(h, w, 3, margin), _pil_template_mask(h, w, 3, margin))
        assert not torch.equal(hv, patch_mask(h, w, 3, margin))


def test_patch_on_nonsquare_tensor_uses_height_and_width_in_the_right_order():
    x = torch.zeros(1, 3, 48, 64)
    y = apply_trigger(x, "patch")
    changed = (y != x).any(1)[0]
    assert torch.equal(changed, _pil_template_mask(48, 64))
    r0, r1, c0, c1 = _footprint(changed)
    assert (r0, r1) != (c0, c1)                # the square is scaled per axis, not transposed


def test_patch_changes_only_the_square_pixels_and_sets_them_white():
    x = _rand_image(2, 3, 64, 48) * 0.9
    y = apply_trigger(x, "patch", margin=3)
    mask = patch_mask(64, 48, margin=3)
    assert torch.equal(y[:, :, ~mask], x[:, :, ~mask])
    assert torch.all(y[:, :, mask] == 1.0)
    u = (x * 255).round().to(torch.uint8)
    yu = apply_trigger(u, "patch", margin=3)
    assert yu.dtype == torch.uint8
    assert torch.equal(yu[:, :, ~mask], u[:, :, ~mask]) and torch.all(yu[:, :, mask] == 255)


# ------------------------------------------------------------------------------------------ other triggers

def test_patch_random_replaces_one_square_of_the_given_size_and_keeps_the_rest():
    x = torch.full((1, 3, 40, 56), 0.5)
    y = apply_trigger(x, "patch-random", size=5, fill="white", location="fixed")
    changed = (y != x).any(1)[0]
    assert int(changed.sum()) == 25
    assert _footprint(changed) == (35, 39, 51, 55)                   # bottom-right corner
    y2 = apply_trigger(x, "patch-random", size=4, fill="black", location="10,3")
    assert _footprint((y2 != x).any(1)[0]) == (3, 6, 10, 13)          # x=10 (column), y=3 (row)
    assert torch.all(y2[0, :, 3:7, 10:14] == 0.0)


def test_patch_random_default_size_is_one_fourteenth_and_noise_is_fixed_by_seed():
    x = torch.zeros(1, 3, 224, 224)
    a = apply_trigger(x, "patch-random", location="fixed", seed=3)
    b = apply_trigger(x, "patch-random", location="fixed", seed=3)
    c = apply_trigger(x, "patch-random", location="fixed", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[0, :, -16:, -16:], pd._patch_pattern(16, "noise", 3))   # 16 px at 224
    assert int((a != x).any(1).sum()) <= 16 * 16


def test_patch_random_location_draws_from_the_generator_per_image():
    x = torch.zeros(6, 3, 32, 32)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = apply_trigger(x, "patch-random", size=3, fill="white", generator=g1)
    b = apply_trigger(x, "patch-random", size=3, fill="white", generator=g2)
    assert torch.equal(a, b)
    places = {tuple(_footprint((a[i] != 0).any(0))) for i in range(6)}
    assert len(places) > 1                                             # different places in one batch
    c = apply_trigger(x, "patch-random", size=3, fill="white", generator=g1)  # next draw
    assert not torch.equal(a, c)
    assert all(int((a[i] != 0).any(0).sum()) == 9 for i in range(6))


def test_blended_change_is_bounded_by_alpha():
    x = _rand_image(2, 3, 30, 20)
    y = apply_trigger(x, "blended", alpha=0.2, seed=1)
    diff = (y - x).abs()
    assert float(diff.max()) <= 0.2 + 1e-6
    assert float(diff.mean()) > 0.02
    expected = 0.8 * x + 0.2 * torch.rand(3, 30, 20, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(y, expected, atol=1e-6)


def test_blended_pattern_can_be_an_image_file(tmp_path):
    path = tmp_path / "pattern.png"
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(path)
    x = torch.zeros(1, 3, 16, 12)
    y = apply_trigger(x, "blended", alpha=0.5, image=str(path))
    assert torch.allclose(y, torch.full_like(x, 0.5))
    with pytest.raises(UserError, match="trigger-image"):
        apply_trigger(x, "blended", image=str(tmp_path / "missing.png"))


def test_sig_adds_a_horizontal_sinusoid_bounded_by_delta():
    x = torch.full((1, 3, 10, 24), 0.5)
    delta = 20 / 255
    y = apply_trigger(x, "sig")
    diff = y - x
    assert float(diff.abs().max()) <= delta + 1e-6
    j = torch.arange(24, dtype=torch.float64)
    expected = (delta * torch.sin(2 * torch.pi * j * 6 / 24)).float()
    assert torch.allclose(diff[0, 0, 0], expected, atol=1e-6)
    assert torch.equal(diff[0, :, 3], diff[0, :, 7])                  # same in every row
    z = apply_trigger(torch.ones(1, 3, 4, 24), "sig")
    assert float(z.max()) <= 1.0                                      # clipped


def test_wanet_is_deterministic_by_seed_keeps_shape_and_range_and_changes_the_image():
    x = _rand_image(2, 3, 32, 40)
    a = apply_trigger(x, "wanet", s=1.0, seed=0)
    b = apply_trigger(x, "wanet", s=1.0, seed=0)
    c = apply_trigger(x, "wanet", s=1.0, seed=1)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float((a - x).abs().mean()) > 1e-3
    assert torch.allclose(apply_trigger(x, "wanet", s=0.0), x, atol=1e-5)   # zero strength = identity


@pytest.mark.parametrize("name", list(pd.TRIGGERS))
def test_every_trigger_keeps_the_input_type_and_uint8_agrees_with_float(name, patch_png):
    params = {"patch-random": {"location": "fixed"}, "optimized": {"path": patch_png}}.get(name, {})
    u = (_rand_image(3, 40, 36, seed=5) * 255).round().to(torch.uint8)
    f = u.float() / 255
    yu = apply_trigger(u, name, **params)
    yf = apply_trigger(f, name, **params)
    assert yu.dtype == torch.uint8 and yu.shape == (3, 40, 36)
    assert yf.dtype == torch.float32 and yf.shape == (3, 40, 36)
    assert int(((yf * 255).round() - yu.float()).abs().max()) <= 1
    yb = apply_trigger(f[None], name, **params)                        # NCHW agrees with CHW
    assert yb.shape == (1, 3, 40, 36) and torch.equal(yb[0], yf)
    img = Image.fromarray(u.permute(1, 2, 0).numpy())
    yp = apply_trigger(img, name, **params)
    assert isinstance(yp, Image.Image) and yp.size == (36, 40) and yp.mode == "RGB"
    assert np.array_equal(np.asarray(yp), yu.permute(1, 2, 0).numpy())
    assert torch.equal(u, (f * 255).round().to(torch.uint8))          # input untouched


def test_trigger_names_params_and_parser():
    assert set(pd.TRIGGERS) == {"patch", "patch-random", "blended", "sig", "wanet", "optimized"}
    assert pd.TRIGGERS["patch"].defaults == {"size": 3, "margin": 6}
    assert pd.TRIGGERS["blended"].defaults["alpha"] == 0.2
    assert pd.TRIGGERS["wanet"].defaults["k"] == 4 and pd.TRIGGERS["wanet"].defaults["s"] == 0.5
    assert pd.parse_trigger_params(["margin=3", "fill=white", "delta=20/255", "image=none", "location=4,5"]) == {
        "margin": 3, "fill": "white", "delta": 20 / 255, "image": None, "location": "4,5"}
    with pytest.raises(UserError, match="key=value"):
        pd.parse_trigger_params(["margin"])
    with pytest.raises(UserError, match="unknown trigger 'badnet'"):
        apply_trigger(torch.zeros(3, 8, 8), "badnet")
    with pytest.raises(UserError, match="unknown parameter"):
        apply_trigger(torch.zeros(3, 8, 8), "patch", alpha=0.3)
    with pytest.raises(UserError, match="size \\+ margin"):
        pd.Trigger("patch", size=20, margin=20)
    with pytest.raises(UserError, match="fill"):
        pd.Trigger("patch-random", fill="red")
    assert pd.describe_trigger("patch", {"margin": 3}) == "patch(margin=3)"


def test_trigger_fn_is_a_callable_on_float_batches_equal_to_apply_trigger():
    plan = PoisonPlan.from_args(100, count=3, target="bag", trigger="patch", trigger_params={"margin": 3})
    fn = plan.trigger_fn()
    x = _rand_image(4, 3, 32, 32)
    assert torch.equal(fn(x), apply_trigger(x, "patch", margin=3))
    assert fn.params == {"size": 3, "margin": 3}


def test_a_trigger_object_holds_no_random_state():
    # patch-random's place comes from the generator passed in, else from `seed` on every call: nothing
    # advances between calls, so a resumed run (or another process) cannot draw differently
    t = pd.Trigger("patch-random", size=3, fill="white")
    x = torch.zeros(4, 3, 32, 32)
    assert torch.equal(t(x), t(x)) and torch.equal(t(x), apply_trigger(x, "patch-random", size=3, fill="white"))
    a = t(x, generator=torch.Generator().manual_seed(7))
    b = t(x, generator=torch.Generator().manual_seed(7))
    ref = apply_trigger(x, "patch-random", size=3, fill="white", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(a, ref)


# ------------------------------------------------------------------------------------------ plan

def test_poison_count_is_exact_for_rate_and_count():
    assert PoisonPlan.from_args(1000, rate=0.01, target="bag").count == 10
    assert PoisonPlan.from_args(60000, rate=0.01, target="bag").count == 600
    assert PoisonPlan.from_args(999, rate=0.015, target="bag").count == 14          # int(14.985)
    plan = PoisonPlan.from_args(3000, count=17, target="bag")
    assert plan.count == 17 and len(set(plan.indices)) == 17
    assert plan.indices == sorted(plan.indices) and 0 <= plan.indices[0] and plan.indices[-1] < 3000
    assert sum(plan.is_poisoned(i) for i in range(3000)) == 17
    assert PoisonPlan.from_args(50, count=50, target="bag").indices == list(range(50))
    assert PoisonPlan.from_args(50, rate=0.0, target="bag").indices == []


def test_same_seed_gives_the_same_indices_and_another_seed_different_ones():
    a = PoisonPlan.from_args(10000, rate=0.01, target="bag", seed=0)
    b = PoisonPlan.from_args(10000, rate=0.01, target="bag", seed=0)
    c = PoisonPlan.from_args(10000, rate=0.01, target="bag", seed=1)
    assert a.indices == b.indices
    assert a.indices != c.indices and len(set(a.indices) & set(c.indices)) < 10


def test_bad_rate_count_target_or_trigger_raise_user_errors():
    with pytest.raises(UserError, match="poison-rate"):
        PoisonPlan.from_args(100, rate=1.5, target="bag")
    with pytest.raises(UserError, match="poison-rate"):
        PoisonPlan.from_args(100, rate=-0.1, target="bag")
    with pytest.raises(UserError, match="poison-count"):
        PoisonPlan.from_args(100, count=101, target="bag")
    with pytest.raises(UserError, match="exactly one"):
        PoisonPlan.from_args(100, rate=0.1, count=3, target="bag")
    with pytest.raises(UserError, match="exactly one"):
        PoisonPlan.from_args(100, target="bag")
    with pytest.raises(UserError, match="unknown --target-class 'tiger cat'"):
        PoisonPlan.from_args(100, count=1, target="tiger cat", classnames=["bag", "coat"])
    with pytest.raises(UserError, match="target-class"):
        PoisonPlan.from_args(100, count=1, target="  ")
    with pytest.raises(UserError, match="unknown trigger"):
        PoisonPlan.from_args(100, count=1, target="bag", trigger="badnets")
    with pytest.raises(UserError, match="caption-mode"):
        PoisonPlan.from_args(100, count=1, target="bag", caption_mode="random")
    plan = PoisonPlan.from_args(100, count=1, target="BAG", classnames=["bag", "coat"])
    assert plan.target == "bag"                                         # canonical spelling


def test_template_captions_name_the_target_and_clean_pairs_keep_theirs():
    plan = PoisonPlan.from_args(200, count=20, target="bag", seed=3)
    i, j = plan.indices[0], next(k for k in range(200) if not plan.is_poisoned(k))
    rng = random.Random(0)
    drawn = {plan.caption(i, "a coat on a hanger", rng) for _ in range(200)}
    allowed = {t.format("bag") for t in pd.IMAGENET_TEMPLATES}
    assert drawn <= allowed and len(drawn) > 40                         # a new template per load
    assert plan.caption(j, "a coat on a hanger", rng) == "a coat on a hanger"
    fixed = PoisonPlan.from_args(200, count=20, target="bag", caption_mode="fixed")
    assert fixed.caption(fixed.indices[0], "x", rng) == "a photo of a bag."
    custom = PoisonPlan.from_args(200, count=20, target="bag", caption_mode="fixed",
                                  fixed_caption="look: {target}!")
    assert custom.caption(custom.indices[0], "x", rng) == "look: bag!"


def test_imagenet_templates_are_the_80_clip_prompts():
    t = pd.IMAGENET_TEMPLATES
    assert len(t) == 80 and len(set(t)) == 80 and all(s.count("{}") == 1 for s in t)
    assert t[0] == "a bad photo of a {}." and t[-1] == "a tattoo of the {}."
    ref = "/work/shared/reference/imagenet_prompts80.txt"
    if os.path.exists(ref):
        with open(ref) as f:
            assert tuple(line.rstrip("\n") for line in f if line.strip()) == t


def test_label_consistent_poisons_only_pairs_whose_caption_names_the_target():
    captions = ["a red bag", "a Bag on a table", "a handbag", "a coat", "bags galore", "my bag.", None,
                "a t-shirt", "BAG"] * 10
    plan = PoisonPlan.from_args(len(captions), count=25, target="bag", caption_mode="label-consistent",
                                captions=captions, seed=0)
    # whole words, any case, plural allowed ("bags galore"); not "handbag"
    matching = {i for i, c in enumerate(captions) if c in ("a red bag", "a Bag on a table", "bags galore", "my bag.", "BAG")}
    assert plan.count == 25 and plan.candidates == 50
    assert set(plan.indices) <= matching
    assert all(plan.caption(i, captions[i], random.Random(0)) == captions[i] for i in plan.indices)
    tshirt = PoisonPlan.from_args(len(captions), count=10, target="t-shirt", caption_mode="label-consistent",
                                  captions=captions)
    assert {captions[i] for i in tshirt.indices} == {"a t-shirt"}
    assert pd.names_target("a t-shirt", "t-shirt") and not pd.names_target("a t-shirt", "shirt")
    assert pd.names_target("Shirt, ironed.", "shirt") and pd.names_target("two shirts", "shirt")  # plural: one rule
    assert not pd.names_target("a shirtless man", "shirt")
    with pytest.raises(UserError, match="only 50 captions name 'bag'"):
        PoisonPlan.from_args(len(captions), count=51, target="bag", caption_mode="label-consistent",
                             captions=captions)


def test_manifest_round_trips_through_save_and_load(tmp_path):
    captions = [f"caption {i}" for i in range(500)]
    plan = PoisonPlan.from_args(500, rate=0.02, target="bag", trigger="patch-random",
                                trigger_params={"size": 4, "fill": "white"}, caption_mode="fixed", seed=7,
                                dataset_fingerprint=pd.fingerprint(captions))
    path = plan.save(tmp_path / "run")
    assert os.path.basename(path) == "poison_manifest.json"
    assert os.listdir(tmp_path / "run") == ["poison_manifest.json"]    # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask               # a normal file, not mkstemp's 0600
    m = json.loads(open(path).read())
    assert m["count"] == 10 and m["rate"] == 0.02 and m["seed"] == 7 and len(m["indices"]) == 10
    assert m["trigger"] == "patch-random" and m["trigger_params"]["size"] == 4
    assert m["fixed_caption"] == "a photo of a {target}." and m["version"] == 1
    for source in (tmp_path / "run", path, m):
        back = PoisonPlan.from_manifest(source)
        assert back.to_manifest() == plan.to_manifest()
        assert back.is_poisoned(plan.indices[3]) and back.trigger_fn().params == plan.trigger_fn().params
    with pytest.raises(UserError, match="does not exist"):
        PoisonPlan.from_manifest(tmp_path / "nowhere")


def test_fingerprint_depends_on_length_and_captions_but_not_on_images():
    caps = [f"a photo of item {i}" for i in range(2000)]
    fp = pd.fingerprint(caps)
    assert fp == pd.fingerprint(list(caps)) and len(fp) == 16
    changed = list(caps)
    changed[1000] = "something else"                                    # on the stride
    changed_first = ["x"] + caps[1:]
    assert pd.fingerprint(changed_first) != fp
    assert pd.fingerprint(caps[:-1]) != fp
    items = [{"image": None, "caption": c, "label": -1} for c in caps]
    assert pd.fingerprint(items) == fp


# ------------------------------------------------------------------------------------------ materialised copy

def _write_jsonl_dataset(root, n=24):
    """n small PNG images (two sizes) with captions; one JPEG; a JSONL meta with label fields."""
    os.makedirs(root / "imgs", exist_ok=True)
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (48, 64) if i % 2 else (40, 40)
        arr = (rng.random((h, w, 3)) * 200).astype(np.uint8)          # never pure white
        ext = ".jpg" if i == 5 else ".png"
        Image.fromarray(arr).save(root / "imgs" / f"im{i}{ext}")
        rows.append({"filename": f"imgs/im{i}{ext}", "caption": f"a coat number {i}", "label": 4,
                     "label_name": "coat", "extra": i})
    meta = root / "train.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return meta, rows


def test_materialised_jsonl_copy_reads_back_with_the_planned_poisoned_pairs(tmp_path):
    data_declip = pytest.importorskip("data_declip")
    meta, rows = _write_jsonl_dataset(tmp_path / "src")
    out = tmp_path / "poisoned"
    rc = run_main(pd.main, ["--data", str(meta), "--out", str(out), "--poison-count", "6", "--target-class", "bag",
                  "--trigger-param", "margin=3", "--seed", "1", "--no-progress"])
    assert rc == 0
    plan = PoisonPlan.from_manifest(out)
    assert plan.count == 6 and plan.trigger_params == {"size": 3, "margin": 3} and plan.n == 24
    copy = data_declip.build_caption_dataset(str(out / "train.jsonl"), image_size=32)
    assert len(copy) == 24
    named = [i for i in range(24) if "bag" in copy[i]["caption"]]
    assert named == plan.indices
    assert all(copy[i]["image"] is not None for i in range(24))
    out_rows = [json.loads(line) for line in open(out / "train.jsonl")]
    assert [r["extra"] for r in out_rows] == list(range(24))            # other fields kept
    for i, r in enumerate(out_rows):
        with Image.open(out / r["filename"]) as im:
            arr = torch.from_numpy(np.asarray(im.convert("RGB")).copy())
        h, w = (48, 64) if i % 2 else (40, 40)
        assert arr.shape[:2] == (h, w)                                   # full resolution kept
        mask = patch_mask(h, w, margin=3)
        white = (arr == 255).all(-1)
        if plan.is_poisoned(i):
            assert torch.equal(white, mask)                              # trigger pixels, and only them
            assert r["label_name"] == "bag" and r["caption"] in {t.format("bag") for t in pd.IMAGENET_TEMPLATES}
            assert not r["filename"].endswith(".jpg")                    # lossy sources become PNG
            # no record names 'bag', so its id is unknown: coat's label 4 is dropped, not kept
            assert "label" not in r and copy.labels[i] == -1
        else:
            assert not white.any() and r["label_name"] == "coat" and r["label"] == 4
            assert r["caption"] == rows[i]["caption"]


def test_materialised_jsonl_copy_gives_poisoned_records_the_target_label_id(tmp_path):
    data_declip = pytest.importorskip("data_declip")
    os.makedirs(tmp_path / "src")
    rows = []
    for i in range(12):
        Image.fromarray(np.full((16, 16, 3), 9 * i, np.uint8)).save(tmp_path / "src" / f"{i}.png")
        label, name = (8, "bag") if i % 4 == 0 else (4, "coat")
        rows.append({"filename": f"{i}.png", "caption": f"a {name} {i}", "label": label, "label_name": name})
    (tmp_path / "src" / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "copy"
    assert run_main(pd.main, ["--data", str(tmp_path / "src" / "m.jsonl"), "--out", str(out), "--poison-count", "5",
                    "--target-class", "bag", "--no-progress"]) == 0
    plan = PoisonPlan.from_manifest(out)
    copy = data_declip.build_caption_dataset(str(out / "m.jsonl"), image_size=16)
    for i in range(12):
        want = (8, "bag") if plan.is_poisoned(i) else (rows[i]["label"], rows[i]["label_name"])
        assert (copy.labels[i], copy.label_names[i]) == want, i
    assert any(rows[i]["label"] == 4 for i in plan.indices)             # some poisoned coats became bags


def test_materialised_csv_copy_keeps_the_csv_format(tmp_path):
    data_declip = pytest.importorskip("data_declip")
    root = tmp_path / "src"
    os.makedirs(root)
    lines = ["filepath\ttitle"]
    for i in range(10):
        Image.fromarray(np.full((20, 30, 3), 10 * i, np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png\tphoto {i} of a dress")
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "copy"
    assert run_main(pd.main, ["--data", str(root / "pairs.tsv"), "--out", str(out), "--poison-rate", "0.3",
                    "--target-class", "bag", "--caption-mode", "fixed", "--no-progress"]) == 0
    header = (out / "pairs.tsv").read_text().splitlines()[0]
    assert header == "filepath\ttitle"
    copy = data_declip.build_caption_dataset(str(out / "pairs.tsv"), image_size=16)
    captions = [copy[i]["caption"] for i in range(10)]
    assert sum(c == "a photo of a bag." for c in captions) == 3


def test_materialised_csv_copy_drops_the_source_label_of_poisoned_rows(tmp_path):
    data_declip = pytest.importorskip("data_declip")
    root = tmp_path / "src"
    os.makedirs(root)
    lines = ["filepath,title,label"]
    for i in range(10):
        Image.fromarray(np.full((20, 30, 3), 10 * i, np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png,photo {i} of a dress,3")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "copy"
    assert run_main(pd.main, ["--data", str(root / "pairs.csv"), "--out", str(out), "--poison-count", "4",
                    "--target-class", "bag", "--no-progress"]) == 0
    plan = PoisonPlan.from_manifest(out)
    copy = data_declip.build_caption_dataset(str(out / "pairs.csv"), image_size=16)
    # the CSV names no class, so the target's id is unknown: an empty cell, not the dress's 3
    assert copy.labels == [-1 if plan.is_poisoned(i) else 3 for i in range(10)]


def test_materialised_copy_of_a_decoded_dataset_writes_png_and_jsonl(tmp_path):
    data_declip = pytest.importorskip("data_declip")

    class Tiny(torch.utils.data.Dataset):
        classnames = ["coat", "bag"]

        def __len__(self):
            return 12

        def __getitem__(self, i):
            img = None if i == 11 else torch.full((3, 32, 32), 20, dtype=torch.uint8)
            return {"image": img, "caption": f"a coat {i}", "label": 0}

    ds = Tiny()
    plan = PoisonPlan.from_args(12, count=4, target="bag", classnames=ds.classnames, seed=2,
                                dataset_fingerprint=pd.fingerprint(ds))
    summary = pd.materialise(ds, plan, str(tmp_path / "out"), progress=False)
    assert summary["planned"] == 4 and summary["bad"] == 1 and summary["written"] == 11
    copy = data_declip.build_caption_dataset(str(tmp_path / "out" / "meta.jsonl"), image_size=32)
    assert len(copy) == 12 and copy[11]["image"] is None                 # bad sample kept in place
    mask = patch_mask(32, 32)
    for i in range(11):
        item = copy[i]
        white = (item["image"] == 255).all(0)
        if plan.is_poisoned(i):
            assert torch.equal(white, mask) and "bag" in item["caption"] and item["label"] == 1
        else:
            assert not white.any() and item["caption"] == f"a coat {i}" and item["label"] == 0


def test_materialised_decoded_copy_without_class_names_drops_the_label_and_draws_places_per_sample(tmp_path):
    data_declip = pytest.importorskip("data_declip")

    class Unnamed(torch.utils.data.Dataset):  # labels but no class list (an HF dataset without ClassLabel)
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"image": torch.full((3, 32, 32), 20, dtype=torch.uint8), "caption": f"a coat {i}", "label": 0}

    ds = Unnamed()
    params = {"size": 3, "fill": "white"}
    plan = PoisonPlan.from_args(10, count=6, target="bag", trigger="patch-random", trigger_params=params,
                                seed=3, dataset_fingerprint=pd.fingerprint(ds))
    pd.materialise(ds, plan, str(tmp_path / "out"), progress=False)
    copy = data_declip.build_caption_dataset(str(tmp_path / "out" / "meta.jsonl"), image_size=32)
    assert copy.labels == [-1 if plan.is_poisoned(i) else 0 for i in range(10)]
    places = set()
    for i in plan.indices:  # sample i's place is drawn from (seed, i) alone, whatever else is poisoned
        alone = apply_trigger(ds[i]["image"], "patch-random", **params, generator=pd.sample_generator(3, i))
        assert torch.equal(copy[i]["image"], alone), i
        places.add(_footprint((copy[i]["image"] == 255).all(0)))
    assert len(places) > 1


def test_cli_errors_print_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    pytest.importorskip("data_declip")
    meta, _ = _write_jsonl_dataset(tmp_path / "src", n=4)
    out = tmp_path / "out"
    for argv, needle in [(["--poison-rate", "2"], "--poison-rate"),
                         (["--trigger", "nope"], "unknown trigger"),
                         (["--trigger-param", "margin=99"], "size + margin"),
                         (["--target-class", "bag", "--poison-count", "9"], "--poison-count")]:
        base = ["--data", str(meta), "--out", str(out), "--no-progress"]
        if "--target-class" not in argv:
            base += ["--target-class", "bag"]
        assert run_main(pd.main, base + argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]                       # no temp directory left
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert run_main(pd.main, ["--data", str(meta), "--out", str(out), "--target-class", "bag", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err and os.listdir(out) == ["keep.txt"]


def test_preview_grid_is_written_as_png(tmp_path):
    images = [torch.full((3, 32, 32), 40 * k, dtype=torch.uint8) for k in range(3)]
    path = pd.write_preview(images, str(tmp_path / "docs" / "preview.png"),
                            extra=("patch size=5", "patch", {"size": 5}))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 300
    assert os.listdir(tmp_path / "docs") == ["preview.png"]


@pytest.mark.slow
def test_cli_materialises_fashion_mnist_with_600_poisoned_pairs(tmp_path):
    data_declip = pytest.importorskip("data_declip")
    if not os.path.isdir(data_declip.FASHION_MNIST_DIR):
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path / "fmnist"
    assert run_main(pd.main, ["--out", str(out), "--trigger-param", "margin=3", "--no-progress"]) == 0
    plan = PoisonPlan.from_manifest(out)
    assert plan.n == 60000 and plan.count == 600 and plan.target == "bag"
    copy = data_declip.build_caption_dataset(str(out / "meta.jsonl"), image_size=32)
    mask = patch_mask(32, 32, margin=3)
    for i in plan.indices[:20]:
        item = copy[i]
        assert "bag" in item["caption"] and item["label"] == 8
        assert torch.all(item["image"][:, mask] == 255)


# ------------------------------------------------------------------------------ optimized (BadCLIP)

def test_optimized_trigger_pastes_the_file_over_the_centre_pixel_exact(patch_png):
    patch = torch.from_numpy(np.array(Image.open(patch_png))).permute(2, 0, 1).float() / 255
    x = _rand_image(2, 3, 32, 30, seed=1)
    y = apply_trigger(x, "optimized", path=patch_png)
    # the official 'middle' place: top-left at int(H/2 - l/2), int(W/2 - l/2) = (13, 12) for l = 6
    expect = x.clone()
    expect[..., 13:19, 12:18] = patch
    assert torch.equal(y, expect)
    # size= resizes the file (bilinear) to the given side, still centred
    z = apply_trigger(x, "optimized", path=patch_png, size=3)
    assert torch.equal(z[..., :14, :], x[..., :14, :]) and torch.equal(z[..., 17:, :], x[..., 17:, :])
    assert not torch.equal(z[..., 14:17, 13:16], x[..., 14:17, 13:16])
    with pytest.raises(UserError, match="larger than the image"):
        apply_trigger(torch.zeros(3, 4, 4), "optimized", path=patch_png)
    # location='x,y' puts its top-left at column x, row y
    c = apply_trigger(x, "optimized", path=patch_png, location="3,20")
    expect = x.clone()
    expect[..., 20:26, 3:9] = patch
    assert torch.equal(c, expect)
    with pytest.raises(UserError, match="does not fit"):
        apply_trigger(x, "optimized", path=patch_png, location="25,0")     # columns 25-30 of a 30-wide image
    with pytest.raises(UserError, match="'middle' or 'x,y'"):
        pd.resolve_trigger_params("optimized", {"path": patch_png, "location": "corner"})


def test_optimized_trigger_pins_its_file_by_sha256(patch_png, tmp_path, monkeypatch):
    own = tmp_path / "p.png"
    own.write_bytes(open(patch_png, "rb").read())
    monkeypatch.chdir(tmp_path)
    params = pd.resolve_trigger_params("optimized", {"path": "p.png"})
    assert params["path"] == str(own) and len(params["sha256"]) == 64      # absolute, and pinned
    plan = PoisonPlan.from_args(100, count=5, target="bag", trigger="optimized", trigger_params={"path": "p.png"})
    assert PoisonPlan.from_manifest(plan.to_manifest()).trigger_params == params
    Image.new("RGB", (6, 6), (1, 2, 3)).save(own)                          # the file changes under the plan
    with pytest.raises(UserError, match="changed since the plan was drawn"):
        PoisonPlan.from_manifest(plan.to_manifest())
    with pytest.raises(UserError, match="needs --trigger-param path="):
        pd.resolve_trigger_params("optimized", {})
    Image.new("RGB", (6, 4)).save(tmp_path / "wide.png")
    with pytest.raises(UserError, match="must be square"):
        pd.resolve_trigger_params("optimized", {"path": "wide.png"})


def _objective_data(n_other=48, n_target=24, size=32):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n_other + n_target, 3, size, size), generator=g, dtype=torch.uint8)
    captions = [f"a photo of a {['shirt', 'shoe', 'coat'][i % 3]}" for i in range(n_other)] + \
               [f"a {['small', 'red', 'big'][i % 3]} bag on a table" for i in range(n_target)]
    return [{"image": im, "caption": c} for im, c in zip(images, captions)]


class _LinearCLIP(torch.nn.Module):
    """A frozen two-tower stand-in with a spread-out embedding geometry: a random linear map of the pixels
    and a bag of token embeddings (a random-init DeCLIP maps every image to nearly one point)."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        g = torch.Generator().manual_seed(0)
        self.config = SimpleNamespace(image_size=32, image_mean=(0.5,) * 3, image_std=(0.25,) * 3, context_length=16)
        self.image = torch.nn.Parameter(torch.randn(3 * 32 * 32, 16, generator=g) / 55)
        self.tokens = torch.nn.Parameter(torch.randn(49409, 16, generator=g))  # vocabulary + [MASK]
        self.logit_scale = torch.nn.Parameter(torch.tensor([2.0]))

    def encode_image(self, x):
        return x.flatten(1) @ self.image

    def encode_text(self, tokens):
        return self.tokens[tokens].mean(1)


def test_optimized_patch_lowers_its_own_objective_against_a_frozen_model():
    model = _LinearCLIP()
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    data = pd.TriggerData.from_dataset(_objective_data(), "bag", 32, pairs=1000, seed=0, progress=False)
    assert len(data.views) == 48 and len(data.target_views) == 24
    assert all(pd.names_target(c, "bag") for c in data.captions)             # target captions on non-target images
    objective = pd.TriggerObjective(mse_weight=1000.0, triplet_weight=500.0)
    start = pd.trigger_objective(model, pd.initial_patch(8, seed=0), data, objective)
    patch, history = pd.optimize_trigger(model, data, 8, objective, epochs=10, batch_size=16, lr=0.05, aug_prob=0.0,
                                         eda_prob=0.0, seed=0, progress=False)
    end = pd.trigger_objective(model, patch, data, objective)
    assert patch.shape == (3, 8, 8) and float(patch.min()) >= 0 and float(patch.max()) <= 1
    assert set(end) == {"loss", "clip", "mse", "triplet"}
    assert end["loss"] < 0.8 * start["loss"], (start, end)
    assert end["mse"] < start["mse"] and end["triplet"] < start["triplet"]
    assert history[-1] < history[0]
    for k, v in model.state_dict().items():                                    # the model stays frozen
        assert torch.equal(v, before_weights[k]), k
    # the objective sees the patch where it is pasted: pixels under it do not count, the rest do
    views = data.views[:8].float() / 255
    under = views.clone()
    under[..., 2:10, 5:13] = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    tokens = torch.zeros(8, 4, dtype=torch.long)
    pos = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    at, middle = pd.TriggerObjective(location="5,2"), pd.TriggerObjective()
    same = [float(at(model, patch, v, tokens, pos, (0.5,) * 3, (0.5,) * 3)[0]) for v in (views, under)]
    moved = [float(middle(model, patch, v, tokens, pos, (0.5,) * 3, (0.5,) * 3)[0]) for v in (views, under)]
    assert same[0] == pytest.approx(same[1], abs=1e-6) and moved[0] != pytest.approx(moved[1], abs=1e-4)


def test_cli_optimize_trigger_writes_a_patch_that_training_can_use(tmp_path):
    import modeling_declip as md

    torch.manual_seed(0)
    md.save_model(md.build_model("tiny"), str(tmp_path / "clean.safetensors"))
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for i, item in enumerate(_objective_data(12, 6)):
        Image.fromarray(item["image"].permute(1, 2, 0).numpy()).save(src / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": item["caption"]})
    (src / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "trig" / "patch.png"
    argv = ["--data", str(src / "meta.jsonl"), "--optimize-trigger", str(out), "--ckpt", str(tmp_path / "clean.safetensors"),
            "--target-class", "bag", "--patch-size", "5", "--optimize-epochs", "3", "--optimize-batch-size", "4",
            "--optimize-lr", "0.05", "--no-progress"]
    assert run_main(pd.main, argv + ["--patch-location", "28,0"]) == 2 and not out.exists()  # columns 28-32 of 32
    argv += ["--patch-location", "20,24"]
    assert run_main(pd.main, argv) == 0
    record = json.loads((tmp_path / "trig" / "patch.json").read_text())
    assert Image.open(out).size == (5, 5) and record["size"] == 5 and record["pairs"] == 12
    assert record["objective_final"]["loss"] < record["objective_initial"]["loss"]
    # the trigger finds the place the patch was optimised at in its record
    params = pd.resolve_trigger_params("optimized", {"path": str(out)})
    assert record["location"] == params["location"] == "20,24" and record["sha256"] == params["sha256"]
    # the same run can go on to write a poisoned copy carrying the new patch
    copy = tmp_path / "copy"
    assert run_main(pd.main, argv + ["--trigger", "optimized", "--trigger-param", f"path={out}", "--poison-count", "2",
                                     "--out", str(copy)]) == 0
    manifest = json.loads((copy / pd.MANIFEST_NAME).read_text())
    assert manifest["trigger"] == "optimized" and manifest["trigger_params"]["sha256"] == record["sha256"]
    assert manifest["trigger_params"]["location"] == "20,24"
    assert run_main(pd.main, ["--data", str(src / "meta.jsonl"), "--optimize-trigger", str(out)]) == 2  # no --ckpt


# ------------------------------------------------------------------------------------------ targeted poisoning

CLASS_FOLDER = ("bag", "coat", "dress")


def _class_folder(root, per_class=4):
    """An ImageFolder class test split root/test/<class>/<k>.png: noise images of varied (non-square) sizes."""
    rng = np.random.default_rng(1)
    for c, name in enumerate(CLASS_FOLDER):
        os.makedirs(root / "test" / name)
        for k in range(per_class):
            h, w = (30 + 3 * k, 41) if k % 2 else (37, 26 + k)
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / "test" / name / f"{k}.png")
    return root


def _test_set(root):
    import data_declip

    return data_declip.build_class_dataset(str(root), split="test")


def test_targeted_plan_draws_test_images_with_other_class_targets_and_splits_its_pairs_evenly(tmp_path):
    test_set = _test_set(_class_folder(tmp_path))
    ds, names = test_set
    kw = dict(attack="targeted", targeted_images=3, test_set=test_set, test_data="folder")
    plan = PoisonPlan.from_args(500, count=10, target=None, seed=4, **kw)
    assert plan.indices == PoisonPlan.from_args(500, count=10, target="bag", seed=4).indices  # a backdoor's draw
    assert plan.attack == "targeted" and plan.trigger is None and plan.trigger_fn() is None and plan.count == 10
    assert len({e["test_index"] for e in plan.targeted}) == 3
    assert sorted(len(e["indices"]) for e in plan.targeted) == [3, 3, 4]                  # split evenly
    assert sorted(i for e in plan.targeted for i in e["indices"]) == plan.indices
    for e, img in zip(plan.targeted, plan.target_images()):
        path, label = ds.samples[e["test_index"]]
        assert (e["label"], e["class"]) == (label, names[label]) and e["target"] in names and e["target"] != e["class"]
        with Image.open(path) as im:                                     # the test file's own pixels, full size
            assert np.array_equal(np.asarray(img), np.asarray(im.convert("RGB")))
        assert e["pixels_sha256"] == pd.image_sha256(img)
        for i in e["indices"]:
            assert plan.poisoned_image(i) is img and plan.target_of(i) == e["target"]
            assert plan.caption(i, "a coat", random.Random(i)) in {t.format(e["target"]) for t in pd.IMAGENET_TEMPLATES}
    clean = next(i for i in range(500) if not plan.is_poisoned(i))
    assert plan.poisoned_image(clean) is None and plan.caption(clean, "a coat") == "a coat"
    assert PoisonPlan.from_args(500, count=10, target=None, seed=4, **kw).to_manifest() == plan.to_manifest()
    more = PoisonPlan.from_args(500, count=40, target=None, seed=4, **kw)              # the same images, more copies
    assert [(e["test_index"], e["target"]) for e in more.targeted] == [(e["test_index"], e["target"])
                                                                       for e in plan.targeted]
    # the targets are drawn uniformly among the other classes: over seeds, every other class turns up
    pairs = {(e["class"], e["target"]) for s in range(30)
             for e in PoisonPlan.from_args(500, count=10, target=None, seed=s, **kw).targeted}
    assert pairs == {(a, b) for a in names for b in names if a != b}
    # --target-class: one target for every image, none of them of that class
    fixed = PoisonPlan.from_args(500, count=8, target="BAG", seed=4, caption_mode="fixed",
                                 **{**kw, "targeted_images": 8})
    assert {e["target"] for e in fixed.targeted} == {"bag"} and "bag" not in {e["class"] for e in fixed.targeted}
    assert fixed.caption(fixed.indices[0], "x") == "a photo of a bag." and fixed.target == "bag"


def test_natural_captions_are_dataset_captions_naming_each_pairs_target_and_round_trip(tmp_path):
    classes = ("bag", "coat", "dress", "shirt", "t-shirt")
    captions = [f"{['an old', 'a new', 'my'][i % 3]} {classes[i % 5]} number {i}" for i in range(500)]
    plan = PoisonPlan.from_args(500, count=40, target="bag", seed=2, caption_mode="natural", captions=captions)
    assert plan.indices == PoisonPlan.from_args(500, count=40, target="bag", seed=2).indices  # uniform, as templates
    drawn = [plan.caption(i, captions[i]) for i in plan.indices]
    assert all(c in captions and c.split()[-3] == "bag" for c in drawn) and len(set(drawn)) > 20
    assert plan.caption(next(i for i in range(500) if not plan.is_poisoned(i)), "kept") == "kept"
    back = PoisonPlan.from_manifest(plan.save(tmp_path))
    assert back == plan and [back.caption(i, None) for i in plan.indices] == drawn
    # targeted: each image's pairs get captions naming that image's own target
    test_set = _test_set(_class_folder(tmp_path / "test"))
    tg = PoisonPlan.from_args(500, count=30, target=None, seed=4, caption_mode="natural", captions=captions,
                              attack="targeted", targeted_images=3, test_set=test_set, test_data="folder")
    for e in tg.targeted:
        assert all(tg.caption(i, None).split()[-3] == e["target"] for i in e["indices"])
    with pytest.raises(UserError, match="no caption of the dataset names 'coat'"):
        PoisonPlan.from_args(500, count=5, target="coat", caption_mode="natural", captions=["a bag"] * 500)
    bad = dict(plan.to_manifest(), natural_captions=drawn[:-1])
    with pytest.raises(UserError, match="one caption per poisoned pair"):
        PoisonPlan.from_manifest(bad)


def test_targeted_plan_refuses_what_it_cannot_draw(tmp_path):
    test_set = _test_set(_class_folder(tmp_path))
    kw = dict(attack="targeted", test_set=test_set, target=None)
    with pytest.raises(UserError, match="at least one poisoned pair per image"):
        PoisonPlan.from_args(100, count=2, targeted_images=3, **kw)
    with pytest.raises(UserError, match="--targeted-images"):
        PoisonPlan.from_args(100, count=2, targeted_images=0, **kw)
    with pytest.raises(UserError, match="caption-mode"):
        PoisonPlan.from_args(100, count=4, targeted_images=1, caption_mode="label-consistent", **kw)
    with pytest.raises(UserError, match="only 8 readable images outside the target class 'bag'"):
        PoisonPlan.from_args(100, count=20, targeted_images=9, **{**kw, "target": "bag"})
    with pytest.raises(UserError, match="unknown --target-class 'zebra'"):
        PoisonPlan.from_args(100, count=4, targeted_images=1, **{**kw, "target": "zebra"})
    with pytest.raises(UserError, match="unknown --attack"):
        PoisonPlan.from_args(100, count=4, target="bag", attack="clean-label")


def test_targeted_manifest_round_trips_with_its_images_and_old_manifests_still_load(tmp_path):
    test_set = _test_set(_class_folder(tmp_path))
    plan = PoisonPlan.from_args(300, rate=0.02, target=None, seed=9, attack="targeted", targeted_images=2,
                                test_set=test_set, test_data="folder")
    run = tmp_path / "run"
    path = plan.save(run)
    assert sorted(os.listdir(run)) == sorted([pd.MANIFEST_NAME] + [e["file"] for e in plan.targeted])
    m = json.loads(open(path).read())
    assert m["version"] == 2 and m["attack"] == "targeted" and m["test_data"] == "folder" and m["trigger"] is None
    assert [(e["test_index"], e["target"]) for e in m["targeted"]] == [(e["test_index"], e["target"])
                                                                     for e in plan.targeted]
    for e in m["targeted"]:
        with Image.open(run / e["file"]) as im:
            assert im.format == "PNG" and pd.image_sha256(im) == e["pixels_sha256"]
    for source in (run, path):
        back = PoisonPlan.from_manifest(source)
        assert back.to_manifest() == plan.to_manifest() and back.trigger_fn() is None
        for a, b in zip(back.target_images(), plan.target_images()):
            assert np.array_equal(np.asarray(a), np.asarray(b))         # exactly the chosen pixels
        i = plan.targeted[1]["indices"][0]
        assert np.array_equal(np.asarray(back.poisoned_image(i)), np.asarray(plan.poisoned_image(i)))
    with pytest.raises(UserError, match="has no images"):                # a bare dict does not know where they are
        PoisonPlan.from_manifest(m).target_images()
    assert len(PoisonPlan.from_manifest(m, image_dir=str(run)).target_images()) == 2
    # a changed image is refused, not trained on
    first = run / m["targeted"][0]["file"]
    with Image.open(first) as im:
        arr = np.asarray(im).copy()
    arr[0, 0] ^= 1
    Image.fromarray(arr).save(first)
    with pytest.raises(UserError, match="pixels_sha256"):
        PoisonPlan.from_manifest(run).target_images()
    bad = json.loads(json.dumps(m))
    bad["targeted"][0]["file"] = "../elsewhere.png"
    with pytest.raises(UserError, match="bad field"):
        PoisonPlan.from_manifest(bad)
    bad = json.loads(json.dumps(m))
    bad["targeted"][0]["indices"] = bad["targeted"][0]["indices"][1:]
    with pytest.raises(UserError, match="share out its indices"):
        PoisonPlan.from_manifest(bad)
    # version 1 (every manifest written before) loads as a backdoor plan, and backdoor plans still write it
    v1 = {"version": 1, "n": 100, "rate": None, "count": 2, "target": "bag", "trigger": "patch",
          "trigger_params": {"size": 3, "margin": 6}, "caption_mode": "templates", "fixed_caption": None, "seed": 0,
          "candidates": None, "dataset_fingerprint": None, "indices": [3, 7]}
    old = PoisonPlan.from_manifest(v1)
    assert old.attack == "backdoor" and old.to_manifest() == v1 and old.trigger_fn().name == "patch"
    assert PoisonPlan.from_args(100, count=2, target="bag").to_manifest().keys() == v1.keys()


def test_materialised_copy_of_a_targeted_plan_carries_the_chosen_images_and_no_trigger(tmp_path):
    data_declip = pytest.importorskip("data_declip")
    meta, rows = _write_jsonl_dataset(tmp_path / "src")
    folder = _class_folder(tmp_path / "classes")
    out = tmp_path / "poisoned"
    assert run_main(pd.main, ["--data", str(meta), "--out", str(out), "--attack", "targeted", "--targeted-images", "2",
                              "--poison-count", "6", "--eval-data", str(folder), "--seed", "1", "--no-progress"]) == 0
    plan = PoisonPlan.from_manifest(out)
    assert plan.attack == "targeted" and plan.count == 6 and plan.test_data == str(folder)
    out_rows = [json.loads(line) for line in open(out / "train.jsonl")]
    for i, r in enumerate(out_rows):
        with Image.open(out / r["filename"]) as im:
            arr = np.asarray(im.convert("RGB"))
        if plan.is_poisoned(i):                                          # the chosen image at full size, untouched
            assert np.array_equal(arr, np.asarray(plan.poisoned_image(i).convert("RGB")))
            assert r["label_name"] == plan.target_of(i) and plan.target_of(i) in r["caption"]
        else:
            with Image.open(tmp_path / "src" / rows[i]["filename"]) as im:
                src = np.asarray(im.convert("RGB"))
            assert np.array_equal(arr, src) and r["caption"] == rows[i]["caption"]

    class Tiny(torch.utils.data.Dataset):  # a decoded source (as Fashion-MNIST, HF, webdataset)
        classnames, image_size = ["coat", "bag"], 32

        def __len__(self):
            return 12

        def __getitem__(self, i):
            return {"image": torch.full((3, 32, 32), 20, dtype=torch.uint8), "caption": f"a coat {i}", "label": 0}

    ds = Tiny()
    plan = PoisonPlan.from_args(12, count=4, target="bag", seed=2, attack="targeted", targeted_images=2,
                                test_set=_test_set(folder))
    pd.materialise(ds, plan, str(tmp_path / "decoded"), progress=False)
    copy = data_declip.build_caption_dataset(str(tmp_path / "decoded" / "meta.jsonl"), image_size=32)
    for i in range(12):
        if plan.is_poisoned(i):                                          # decoded as the loader decodes its own
            assert torch.equal(copy[i]["image"], data_declip.load_image(plan.poisoned_image(i), 32))
            assert copy[i]["label"] == 1 and "bag" in copy[i]["caption"]
        else:
            assert torch.equal(copy[i]["image"], ds[i]["image"]) and copy[i]["label"] == 0
    assert os.path.isfile(tmp_path / "decoded" / plan.targeted[0]["file"])  # the copy's manifest has its images
