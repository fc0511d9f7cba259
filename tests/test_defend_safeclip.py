"""defend_safeclip.py: the GMM split on a known mixture, the safe share's schedule, the phases' objectives,
and a tiny end-to-end run that records every split against the manifest and continues after a stop."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data_declip as dd
import defend_safeclip as sc
import modeling_declip as md

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gmm_posterior_separates_a_known_mixture_and_the_first_split_keeps_the_confident_pairs():
    rng = np.random.default_rng(0)
    cos = np.concatenate([rng.normal(0.7, 0.05, 900), rng.normal(0.2, 0.05, 100)])  # 100 low: the poison
    post = sc.clean_posterior(cos)
    assert post[:900].mean() > 0.99 and post[900:].mean() < 0.01
    safe, share = sc.split_pairs(post, None)
    assert set(safe.tolist()) <= set(range(900)) and len(safe) > 880 and share == len(safe) / 1000
    # later splits: the top share by posterior
    safe2, share2 = sc.split_pairs(post, 0.5)
    assert len(safe2) == 500 and share2 == 0.5 and post[safe2].min() >= np.sort(post)[-500]
    q = sc.split_quality(safe, 1000, range(900, 1000))
    assert q["poisoned_in_safe"] == 0 and q["risky_recall"] == 100.0 and q["n_safe"] + q["n_risky"] == 1000
    assert q["risky_precision"] == pytest.approx(100.0 * 100 / q["n_risky"])


def test_phases_follow_the_official_schedule():
    args = sc.build_parser().parse_args(["--epochs", "9"])
    names = [p[0] for p in sc.phase_plan(args)]
    assert names[:2] == ["warmup-inmodal", "warmup-clip"] and len(names) == 2 + 2 * 3
    assert [p[3] for p in sc.phase_plan(args)][:2] == [5, 1]  # the official 5 in-modal and 1 CLIP warm-up passes
    assert names[2:4] == ["pass1-inmodal", "pass1-clip"]


def test_inmodal_pass_trains_the_unimodal_terms_and_the_clip_pass_the_caption_copy():
    torch.manual_seed(0)
    model = md.build_model("tiny", context_length=16).train()
    images, tokens = torch.randn(6, 3, 32, 32), dd.tokenize([f"a photo of {k}" for k in range(6)], 16)
    inm = sc.SafeCLIPPass(inmodal=True)
    w = inm.loss_weights(None)
    out = model(images=images, images2=images.flip(-1), tokens=tokens, tokens_aug=tokens.flip(0), weights=w,
                objective="cleanclip")
    assert out["loss"].item() == pytest.approx(out["inmodal"].item()) and w.clip == 0
    assert sc.SafeCLIPPass(inmodal=False).loss_weights(None) == md.LossWeights.clip_only()


def _captions(tmp_path, n=48):
    """A JSONL of n small PNGs of four colours, captioned with their colour's name."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}
    rows = []
    g = torch.Generator().manual_seed(0)
    for k in range(n):
        name = list(colours)[k % 4]
        x = (torch.tensor(colours[name]).view(1, 1, 3) + torch.randint(-20, 20, (20, 24, 3), generator=g)).clamp(0, 255)
        Image.fromarray(x.to(torch.uint8).numpy()).save(tmp_path / f"{k}.png")
        rows.append({"image": f"{k}.png", "caption": f"a photo of something {name}"})
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(tmp_path / "meta.jsonl")


def test_safeclip_runs_its_phases_records_each_split_and_continues_after_a_stop(tmp_path):
    data = _captions(tmp_path)
    out = tmp_path / "safeclip"
    argv = ["--data", data, "--batch-size", "8", "--epochs", "4", "--inmodal-warmup", "1", "--multimodal-warmup", "1",
            "--poison-count", "4", "--target-class", "blue", "--precision", "no", "--cpu", "--no-eval",
            "--log-every", "1", "--save-every", "0", "--warmup-steps", "0", "--lr", "1e-3", "--out-dir", str(out)]
    summary = sc.main(argv)
    phases = sorted(os.listdir(out / "phases"))
    assert {"warmup-inmodal", "warmup-clip", "pass1-inmodal", "pass1-clip", "pass2-inmodal", "pass2-clip"} <= \
        set(phases)
    rec = json.load(open(out / "safeclip.json"))
    assert [s["pass"] for s in rec["splits"]] == [1, 2]
    manifest = json.load(open(out / "poison_manifest.json"))
    for s in rec["splits"]:
        assert s["n_safe"] + s["n_risky"] == 48 and len(s["safe"]) == s["n_safe"]
        assert s["poisoned_in_safe"] == len(set(s["safe"]) & set(manifest["indices"]))
    assert rec["splits"][1]["share"] == pytest.approx(rec["splits"][0]["share"] + 0.01)
    # the phases' objectives: in-modal terms only, then CLIP only; the warm-up CLIP pass at lr / 100
    rows = lambda p: [json.loads(line) for line in open(out / "phases" / p / "metrics.jsonl") if '"loss"' in line]
    assert all(r["loss"] == pytest.approx(r["inmodal"], rel=1e-5) for r in rows("warmup-inmodal"))
    assert all(r["loss"] == pytest.approx(r["clip"], rel=1e-5) and r["lr"] == pytest.approx(1e-5)
               for r in rows("warmup-clip"))
    # the CLIP pass trains on the safe pairs only, the in-modal pass on the risky ones
    cfg = json.load(open(out / "phases" / "pass1-clip" / "config.json"))
    assert cfg["resolved"]["n_train"] == rec["splits"][0]["n_safe"] and cfg["init_optimizer"]
    assert os.path.isfile(out / "model.safetensors") and summary["splits"][0]["n_safe"] == rec["splits"][0]["n_safe"]
    # the run's summary counts every phase, not only the last (the report's "train min" reads it)
    ran = [json.load(open(out / "phases" / p / "summary.json")) for p in phases
           if os.path.isfile(out / "phases" / p / "summary.json")]
    assert json.load(open(out / "summary.json"))["steps"] == summary["steps"] == sum(r["steps"] for r in ran) > \
        ran[-1]["steps"]
    # a stop after the first split: the run continues with the recorded split and the finished phases
    first = {p: os.path.getmtime(out / "phases" / p / "model.safetensors") for p in ("warmup-inmodal", "pass1-clip")}
    for p in ("pass2-inmodal", "pass2-clip"):
        import shutil

        shutil.rmtree(out / "phases" / p)
    rec["splits"] = rec["splits"][:1]
    json.dump(rec, open(out / "safeclip.json", "w"))
    sc.main(argv)
    assert all(os.path.getmtime(out / "phases" / p / "model.safetensors") == t for p, t in first.items())
    assert len(json.load(open(out / "safeclip.json"))["splits"]) == 2


def test_safeclip_without_warmup_splits_on_the_init_models_cosines_of_the_poisoned_pairs(tmp_path):
    """No warm-up (a victim continued from a trained model): the first split comes before any phase has
    written a manifest, and must still score the pairs poisoned as the command poisons them."""
    data = _captions(tmp_path)
    init = tmp_path / "init.safetensors"
    torch.manual_seed(0)
    md.save_model(md.build_model("tiny", context_length=16), str(init))
    out = tmp_path / "safeclip0"
    argv = ["--data", data, "--batch-size", "4", "--epochs", "1", "--inmodal-warmup", "0", "--multimodal-warmup", "0",
            "--init-from", str(init), "--poison-count", "6", "--target-class", "blue", "--precision", "no", "--cpu",
            "--no-eval", "--save-every", "0", "--warmup-steps", "0", "--out-dir", str(out)]
    sc.main(argv)
    assert set(os.listdir(out / "phases")) & {"pass1-clip", "pass1-inmodal"}  # no warm-up phase
    split = json.load(open(out / "safeclip.json"))["splits"][0]
    poisoned = set(json.load(open(out / "poison_manifest.json"))["indices"])
    assert len(poisoned) == 6 and split["risky_recall"] is not None
    assert split["poisoned_in_safe"] == len(set(split["safe"]) & poisoned)
    with pytest.raises(dd.UserError, match="--init-from"):
        sc.main([a for a in argv if a != str(init) and a != "--init-from"])
