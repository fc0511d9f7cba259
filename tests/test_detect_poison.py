"""detect_poison.py: each kNN detector against a hand computation (own pair left out), AUROC on a planted
poison geometry, an end-to-end run on a tiny poisoned victim, and train_declip.py --exclude-indices."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import data_declip as dd
import detect_poison as dp
import poison_data as pdata
import train_declip as td
from data_declip import run_main


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# The detectors by hand


def _naive(img, txt, k, lid_k):
    """Plain-Python statement of the source's formulas (backdoor_sample_detector/*.py), pair by pair."""
    m = len(img)
    ref = img + txt

    def dist(a, b):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

    def lid(ds, kk):  # ds sorted ascending
        return -kk / sum(math.log(ds[i] / ds[kk] + 1e-4) for i in range(kk))

    ref_sorted = [sorted(dist(r, s) for s in ref) for r in ref]  # each reference point, itself at 0
    out = {"kdist": [], "lid": [], "slof": [], "dao": []}
    for p in range(m):
        d = [(dist(img[p], r), j) for j, r in enumerate(ref) if j not in (p, m + p)]  # own image + caption out
        d.sort()
        ds = [x for x, _ in d]
        kd = ds[k]
        nb = [j for _, j in d[:k]]
        out["kdist"].append(kd)
        out["lid"].append(lid(ds, lid_k))
        out["slof"].append(sum(kd / ref_sorted[j][k] for j in nb) / k)
        out["dao"].append(sum(lid(ref_sorted[j], k) * math.log(kd / ref_sorted[j][k]) for j in nb) / k)
    return out


def test_knn_detectors_equal_hand_values_on_a_1d_set_with_the_own_pair_left_out():
    img = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    txt = torch.tensor([[0.5], [1.5], [2.2], [10.0]])
    s = dp.knn_scores(img, img, txt, torch.arange(4), k=2, lid_k=2)
    # pair 0 against img 1, 3, 7 and txt 1.5, 2.2, 10 (its own 0 and 0.5 left out): 1, 1.5, 2.2, 3, 7, 10
    assert s["kdist"][0].item() == pytest.approx(2.2)  # with its own caption kept it would be 1.5
    assert s["lid"][0].item() == pytest.approx(-2 / (math.log(1 / 2.2 + 1e-4) + math.log(1.5 / 2.2 + 1e-4)))
    # its 2 nearest references: img 1 (distances 0, .5, .5, 1, 1.2, 2, ...: 2-distance .5) and
    # txt 1.5 (0, .5, .7, 1, 1.5, 1.5, ...: 2-distance .7)
    assert s["slof"][0].item() == pytest.approx((2.2 / 0.5 + 2.2 / 0.7) / 2)
    lid1 = -2 / (math.log(1e-4) + math.log(0.5 / 0.5 + 1e-4))
    lid5 = -2 / (math.log(1e-4) + math.log(0.5 / 0.7 + 1e-4))
    assert s["dao"][0].item() == pytest.approx((lid1 * math.log(2.2 / 0.5) + lid5 * math.log(2.2 / 0.7)) / 2)
    ref = _naive(img.tolist(), txt.tolist(), 2, 2)
    for name in ref:
        assert torch.allclose(s[name].double(), torch.tensor(ref[name], dtype=torch.double), rtol=1e-5), name


def test_knn_detectors_equal_the_hand_loop_on_random_embeddings_and_query_subsets():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    ref = _naive(img.double().tolist(), txt.double().tolist(), 3, 6)
    s = dp.knn_scores(img.double(), img.double(), txt.double(), torch.arange(12), k=3, lid_k=6)
    for name in ref:
        assert torch.allclose(s[name], torch.tensor(ref[name], dtype=torch.double), rtol=1e-6), name
    # a process scores only its own rows of the gathered chunk: same values
    part = dp.knn_scores(img[4:9].double(), img.double(), txt.double(), torch.arange(4, 9), k=3, lid_k=6)
    for name in ref:
        assert torch.allclose(part[name], torch.tensor(ref[name][4:9], dtype=torch.double), rtol=1e-6), name


def test_isolation_forest_and_clipscore_follow_sklearn_and_the_cosine():
    from sklearn.ensemble import IsolationForest

    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(40, 4, generator=g), torch.randn(40, 4, generator=g)
    s = dp.score_chunk(img, txt, img, txt, torch.arange(40), detectors=("iforest", "clipscore"), seed=3)
    want = -IsolationForest(n_estimators=100, random_state=3).fit(torch.cat([img, txt]).numpy()).score_samples(img.numpy())
    assert np.allclose(s["iforest"].numpy(), want, atol=1e-6)
    cos = [float(torch.dot(a, b) / (a.norm() * b.norm())) for a, b in zip(img, txt)]
    assert np.allclose(s["clipscore"].numpy(), -np.array(cos), atol=1e-6)


def test_too_small_a_chunk_for_k_is_a_user_error():
    x = torch.randn(5, 3)
    with pytest.raises(dd.UserError, match="--chunk"):
        dp.knn_scores(x, x, x, torch.arange(5), k=16)


# ----------------------------------------------------------------------------------------------
# A planted poison: a tight cluster of triggered images and target captions, away from the clean ones


def _planted(n_clean=400, n_poison=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n_clean, dim, generator=g)
    clean_txt = clean + 0.3 * torch.randn(n_clean, dim, generator=g)
    centre = torch.zeros(dim)
    centre[0] = 10.0
    poison = centre + 0.05 * torch.randn(n_poison, dim, generator=g)
    poison_txt = centre + 0.05 * torch.randn(n_poison, dim, generator=g)
    img, txt = torch.cat([clean, poison]), torch.cat([clean_txt, poison_txt])
    perm = torch.randperm(len(img), generator=g)
    y = (perm >= n_clean).numpy()
    return img[perm], txt[perm], y


def test_planted_tight_cluster_is_found_by_the_local_density_detectors():
    # 1% poisoned: 4 triggered pairs per reference set, fewer than k / 2 (the low-rate regime of the paper;
    # with 6 of them SLOF and DAO fall to 0.89-0.99 on this geometry while k-distance stays at 1)
    img, txt, y = _planted()
    s = dp.score_chunk(img, txt, img, txt, torch.arange(len(img)), detectors=dp.DETECTORS, k=16, lid_k=64)
    auc = {name: roc_auc_score(y, v.numpy()) for name, v in s.items()}
    for name in ("kdist", "slof", "dao"):
        assert auc[name] > 0.99, auc
    # a tight cluster of 4 (8 near-duplicate references) inside the 64 LID neighbours lowers its LID
    # estimate: the source's sign (higher = suspicious) then ranks them last; recorded, not a pass mark
    assert auc["lid"] < 0.5, auc
    m = dp.detection_metrics(s["kdist"].numpy(), y)
    assert m["roc_auc"] == 1.0 and m["n_poisoned"] == 4 and m["pr_auc"] == 1.0 and m["fpr_at_95_tpr"] == 0.0


def test_an_isolated_poison_has_high_lid():
    # a poison whose neighbourhood is all far away (one per reference set): distances of similar size
    # give log-ratios near 0 and a high LID estimate, the case the source's sign is for
    g = torch.Generator().manual_seed(2)
    img = torch.randn(300, 8, generator=g)
    txt = img + 0.3 * torch.randn(300, 8, generator=g)
    img[0] = 0.0
    img[0, 0], txt[0, 0] = 30.0, 30.0
    s = dp.knn_scores(img, img, txt, torch.arange(300), k=16, lid_k=64)
    y = np.zeros(300, dtype=bool)
    y[0] = True
    assert roc_auc_score(y, s["lid"].numpy()) == 1.0 and roc_auc_score(y, s["kdist"].numpy()) == 1.0


def test_metrics_fpr_at_95_tpr_and_flagging():
    y = np.array([0, 0, 0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.95, 0.4, np.nan])  # the NaN pair was not scored
    m = dp.detection_metrics(s, y)
    assert m["n"] == 7 and m["n_poisoned"] == 2
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y[:7], s[:7]))
    assert m["fpr_at_95_tpr"] == pytest.approx(1 / 5)  # both poisons need the threshold at 0.8: 0.9 passes too
    assert dp.flag(s, fraction=2 / 7).tolist() == [2, 5]
    assert dp.flag(s, threshold=0.8).tolist() == [2, 4, 5]
    assert dp.detection_metrics(s, np.zeros(8))["roc_auc"] is None


# ----------------------------------------------------------------------------------------------
# End to end on a tiny poisoned victim (1,000 training pairs of Fashion-MNIST, 5% poisoned)


SMALL = ["--batch-size", "32", "--holdout", "59000", "--precision", "no", "--cpu", "--log-every", "1",
         "--save-every", "0", "--no-eval"]


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    out = tmp_path_factory.mktemp("victim")
    td.train(td.parse_args(td.build_parser(), SMALL + ["--max-steps", "2", "--poison-rate", "0.05",
                                                        "--out-dir", str(out)]))
    return out


DETECT = ["--cpu", "--chunk", "500", "--batch-size", "128", "--precision", "no", "--flag-fraction", "0.05"]


@pytest.fixture(scope="module")
def detected(victim, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    args = td.parse_args(dp.build_parser(), ["--ckpt", str(victim), "--out-dir", str(out), *DETECT])
    return out, dp.detect(args)


@pytest.mark.slow
def test_detect_on_a_tiny_victim_writes_scores_metrics_and_flags(victim, detected):
    out, res = detected
    plan = pdata.PoisonPlan.from_manifest(str(victim))
    assert res["n_train"] == 1000 and res["poison_applied"] and res["n_poisoned"] == plan.count == 50
    scores = np.load(out / "scores.npy")
    assert scores.shape == (1000,) and set(scores.dtype.names) == set(dp.DETECTORS)
    assert all(np.isfinite(scores[d]).all() for d in dp.DETECTORS)
    det = json.loads((out / "detection.json").read_text())
    y = np.zeros(1000, dtype=bool)
    y[plan.indices] = True
    for d in dp.DETECTORS:
        auc = det["detectors"][d]["roc_auc"]
        assert 0 <= auc <= 1 and auc == pytest.approx(roc_auc_score(y, scores[d]))
    flagged = [int(x) for x in (out / dp.FLAGGED_FILE).read_text().split()]
    assert len(flagged) == 50 and flagged == sorted(flagged)
    assert min(scores["kdist"][flagged]) >= np.sort(scores["kdist"])[-50]  # the default --flag-detector
    assert det["flagged"]["poisoned"] == int(y[flagged].sum())


@pytest.mark.slow
def test_detect_scores_the_victims_view_trigger_and_target_caption(victim, detected, tmp_path):
    # CLIPScore of pair i is minus the cosine of the model's embeddings of its evaluation view and caption:
    # recompute two poisoned and one clean pair by hand from the plan
    import modeling_declip as md

    out, _ = detected
    scores = np.load(out / "scores.npy")
    plan = pdata.PoisonPlan.from_manifest(str(victim))
    model = md.load_model(str(victim / "model.safetensors"))
    cfg = model.config
    base = dd.build_caption_dataset(None, image_size=cfg.image_size)
    clean = next(i for i in range(1000) if not plan.is_poisoned(i))
    for i in plan.indices[:2] + [clean]:
        item = base[i]
        trig = plan.trigger_fn() if plan.is_poisoned(i) else None
        x = dd.eval_transform(item["image"][None], cfg.image_size, cfg.image_mean, cfg.image_std, trigger=trig)
        caption = plan.caption(i, item["caption"], dd.sample_rng(0, i))
        with torch.no_grad():
            a, b = model.encode_image(x), model.encode_text(dd.tokenize([caption], cfg.context_length))
        assert scores["clipscore"][i] == pytest.approx(-torch.cosine_similarity(a, b).item(), abs=1e-5)


@pytest.mark.slow
def test_two_processes_score_each_pair_once_with_the_same_scores_as_one(victim, detected, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(root, "configs", "accelerate", "cpu_2proc.yaml"), "--main_process_port", "29527",
           os.path.join(root, "tests", "ddp_detect.py"), "--ckpt", str(victim), "--out-dir", str(tmp_path / "d2"),
           *DETECT, "--batch-size", "96"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    one, two = np.load(detected[0] / "scores.npy"), np.load(tmp_path / "d2" / "scores.npy")
    for d in dp.DETECTORS:  # the chunks (and so each pair's references) do not depend on the processes
        assert np.isfinite(two[d]).all() and np.allclose(one[d], two[d], rtol=1e-4, atol=1e-5), d
    assert (tmp_path / "d2" / dp.FLAGGED_FILE).read_text() == (detected[0] / dp.FLAGGED_FILE).read_text()


@pytest.mark.slow
def test_exclude_indices_drops_the_flagged_pairs_and_keeps_the_plan_on_the_rest(victim, detected, tmp_path,
                                                                                   monkeypatch):
    out, _ = detected
    flagged = set(int(x) for x in (out / dp.FLAGGED_FILE).read_text().split())
    plan = pdata.PoisonPlan.from_manifest(str(victim))
    seen, built = [], []

    class Recording(dd.TrainPairs):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

        def __getitem__(self, v):
            item = super().__getitem__(v)
            seen.append((self.base.indices[int(v) % self.n], item["poisoned"]))
            return item

    monkeypatch.setattr(dd, "TrainPairs", Recording)
    run = tmp_path / "clean"
    td.train(td.parse_args(td.build_parser(), SMALL + ["--max-steps", "3", "--poison-rate", "0.05",
                                                        "--exclude-indices", str(out / dp.FLAGGED_FILE),
                                                        "--out-dir", str(run)]))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["resolved"]["n_train"] == 1000 - len(flagged) and cfg["excluded"]["n"] == len(flagged)
    # the dataset the loop draws every batch from holds exactly the pairs left ...
    (pairs,) = built
    assert len(pairs) == 1000 - len(flagged) and set(pairs.base.indices) == set(range(1000)) - flagged
    assert len(seen) >= 3 * 32 and not flagged & {i for i, _ in seen}
    # ... and they keep their dataset index: exactly the plan's ones are still poisoned
    assert [pairs.poison.is_poisoned(j) for j in range(len(pairs))] == [
        plan.is_poisoned(i) for i in pairs.base.indices]
    assert all(p == plan.is_poisoned(i) for i, p in seen)
    assert any(plan.is_poisoned(i) for i in pairs.base.indices)


def test_exclude_indices_out_of_range_is_a_one_line_user_error(tmp_path, capsys):
    bad = tmp_path / "flagged.txt"
    bad.write_text("3\n60000\n")
    assert run_main(td.main, SMALL + ["--max-steps", "1", "--exclude-indices", str(bad),
                                      "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--exclude-indices" in err and "60000" in err
    bad.write_text("3\nseven\n")
    with pytest.raises(dd.UserError, match="not a list of integer"):
        td.read_index_file(str(bad), 10)
