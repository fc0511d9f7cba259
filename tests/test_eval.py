"""Tests of eval_zeroshot.py: zero-shot accuracy, ASR / asr_all / RA, prompt ensemble, sharding across
processes, retrieval, DER and the report files. Small fake models (encode_image / encode_text / config)
and tiny in-memory datasets; one smoke test with the real tiny DeCLIP model when modeling_declip exists."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval_zeroshot as ez  # noqa: E402
import poison_data as pdata  # noqa: E402
from data_declip import run_main, tokenize  # noqa: E402

CLASSES = [f"class{k}" for k in range(10)]
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
CTX = 24


# ---------------------------------------------------------------------------------------------------------
# fakes


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, captions=None):
        self.images, self.labels, self.captions = images, labels, captions

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        item = {"image": self.images[i], "label": int(self.labels[i])}
        if self.captions is not None:
            item["caption"] = self.captions[i]
        return item


def intensity_dataset(per_class=10, n_classes=10, size=32):
    """Class k = constant grey image of value 20 + 20 k (so a model can read the label off the pixels)."""
    labels = [k for k in range(n_classes) for _ in range(per_class)]
    images = [torch.full((3, size, size), 20 + 20 * k, dtype=torch.uint8) for k in labels]
    return ListDataset(images, labels)


def random_dataset(n, n_classes=10, size=16, seed=0, captions=False):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = [i % n_classes for i in range(n)]
    caps = [f"a photo of item {i}" for i in range(n)] if captions else None
    return ListDataset(list(images), labels, caps)


class FakeTextModel(nn.Module):
    """Bag-of-token-embeddings text encoder: deterministic, prompt-dependent."""

    def __init__(self, dim=16, image_size=32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok = nn.Parameter(torch.randn(49409, dim, generator=g))
        self.config = SimpleNamespace(image_size=image_size, context_length=CTX, image_mean=MEAN, image_std=STD,
                                      embed_dim=dim)

    def encode_text(self, tokens):
        return (self.tok[tokens] * (tokens != 0).float()[..., None]).sum(1)

    def unnormalise(self, x):
        m = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
        return x * s + m


class ConstImageModel(FakeTextModel):
    """Every image embeds to the same vector (set to a class embedding)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.register_buffer("vec", torch.zeros(self.tok.shape[1]))

    def encode_image(self, x):
        return self.vec.expand(x.shape[0], -1) * 3.0  # scale must not matter (cosine)


class RandomImageModel(FakeTextModel):
    def __init__(self, image_size=16, **kw):
        super().__init__(image_size=image_size, **kw)
        g = torch.Generator().manual_seed(1)
        self.proj = nn.Parameter(torch.randn(3 * image_size * image_size, self.tok.shape[1], generator=g))

    def encode_image(self, x):
        return x.flatten(1) @ self.proj


class OracleModel(FakeTextModel):
    """Reads the class off an intensity image. A pure-white 3-channel pixel (values exactly 1.0 before
    normalisation) marks a triggered image: classes in `vulnerable` then embed as the target. Classes in
    `confused` are misread as the next class on clean images."""

    def __init__(self, target=0, vulnerable=(), confused=(), **kw):
        super().__init__(**kw)
        self.target, self.vulnerable, self.confused = target, set(vulnerable), set(confused)
        self.register_buffer("table", torch.zeros(10, self.tok.shape[1]))
        self.seen_white = 0

    def encode_image(self, x):
        u = self.unnormalise(x)
        white = (u > 0.999).all(dim=1)  # [N,H,W]
        out = []
        for i in range(x.shape[0]):
            grey = u[i][:, ~white[i]].mean() * 255.0
            k = int(round((float(grey) - 20.0) / 20.0))
            trig = bool(white[i].any())
            self.seen_white += trig
            if trig and k in self.vulnerable:
                k = self.target
            elif not trig and k in self.confused:
                k = (k + 1) % 10
            out.append(self.table[k])
        return torch.stack(out)


def corner_patch(x):
    """Trigger callable: a 3x3 white square in the bottom-right corner of float images in [0,1]."""
    x = x.clone()
    x[..., -4:-1, -4:-1] = 1.0
    return x


def with_table(model, templates="1"):
    model.table.copy_(ez.class_embeddings(model, CLASSES, templates))
    return model


# ---------------------------------------------------------------------------------------------------------
# templates and the prompt ensemble


def test_templates_specs_and_file(tmp_path):
    assert ez.get_templates("1") == ["a photo of a {}."]
    t80 = ez.get_templates("80")
    assert len(t80) == 80 and t80[0] == "a bad photo of a {}." and len(set(t80)) == 80
    assert len(ez.get_templates("7")) == 7 and ez.get_templates("8")[-1] == "a photo of a {}."
    f = tmp_path / "t.txt"
    f.write_text("a {0} on a table.\n\n# comment\nan image of {}\n")
    assert ez.get_templates(str(f)) == ["a {} on a table.", "an image of {}"]
    f.write_text("no placeholder here\n")
    with pytest.raises(ez.UserError):
        ez.get_templates(str(f))
    with pytest.raises(ez.UserError):
        ez.get_templates("13")


def test_prompt_ensemble_matches_hand_computation():
    model = FakeTextModel()
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]
    names = ["cat", "tiger cat", "ankle boot"]
    got = ez.class_embeddings(model, names, templates, batch_size=2)  # batches straddle classes
    for c, name in enumerate(names):
        prompts = [t.format(name) for t in templates]
        z = model.encode_text(tokenize(prompts, context_length=CTX))
        z = z / z.norm(dim=-1, keepdim=True)
        mean = z.mean(0)
        want = mean / mean.norm()
        torch.testing.assert_close(got[c], want, rtol=1e-5, atol=1e-6)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    # not the same as averaging unnormalised embeddings
    raw = model.encode_text(tokenize([t.format("cat") for t in templates], context_length=CTX)).mean(0)
    assert not torch.allclose(got[0], raw / raw.norm(), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# zero-shot metrics


def test_constant_target_embedding_gives_asr_100_and_ca_10():
    model = ConstImageModel()
    target = 3
    model.vec.copy_(ez.class_embeddings(model, CLASSES, "8")[target])
    ds = intensity_dataset(per_class=20)
    m = ez.evaluate(model, ds, CLASSES, templates="8", trigger=corner_patch, target="class3", batch_size=32)
    assert m["clean"] == {"top1": pytest.approx(10.0), "top5": pytest.approx(50.0), "n": 200}
    bd = m["backdoor"]
    assert bd["asr"] == pytest.approx(100.0) and bd["asr_all"] == pytest.approx(100.0)
    assert bd["ra"] == pytest.approx(0.0) and bd["n"] == 200 and bd["n_nontarget"] == 180
    assert bd["target"] == "class3" and m["templates"] == 8


def test_random_model_is_near_chance():
    model = RandomImageModel()
    ds = random_dataset(3000)
    m = ez.evaluate(model, ds, CLASSES, templates="1", batch_size=500)
    assert m["clean"]["n"] == 3000
    assert abs(m["clean"]["top1"] - 10.0) < 3.0  # binomial sd 0.55 points
    assert abs(m["clean"]["top5"] - 50.0) < 5.0  # sd 0.9 points


def test_asr_excludes_target_class_and_asr_all_does_not():
    # target 2; triggered images of classes 0-4 flip to the target, 5-9 keep their class.
    model = with_table(OracleModel(target=2, vulnerable=range(5)))
    ds = intensity_dataset(per_class=10)
    m = ez.evaluate(model, ds, CLASSES, templates="1", trigger=corner_patch, target="class2", batch_size=16)
    bd = m["backdoor"]
    assert m["clean"]["top1"] == pytest.approx(100.0)
    assert bd["asr"] == pytest.approx(100 * 40 / 90)  # classes 0,1,3,4 of the 90 non-target images
    assert bd["asr_all"] == pytest.approx(100 * 50 / 100)  # + the 10 target images
    assert bd["ra"] == pytest.approx(100 * 50 / 90)  # classes 5-9 still correct
    assert bd["asr_top5"] == pytest.approx(100.0)
    assert bd["per_class_asr"]["class0"] == pytest.approx(100.0)
    assert bd["per_class_asr"]["class7"] == pytest.approx(0.0)
    assert "class2" not in bd["per_class_asr"]


def test_trigger_goes_in_after_resize_and_before_normalisation():
    # 32 px data, 64 px model: the trigger must act on the resized [0,1] image, so its pixels are exactly
    # white after un-normalising (it would not be after normalisation or be blurred by a later resize).
    model = with_table(OracleModel(target=0, vulnerable=range(10), image_size=64))
    ds = intensity_dataset(per_class=2)
    seen = {}

    def trig(x):
        seen["shape"], seen["range"] = tuple(x.shape[-2:]), (float(x.min()), float(x.max()))
        return corner_patch(x)

    m = ez.evaluate(model, ds, CLASSES, templates="1", trigger=trig, target=0)
    assert seen["shape"] == (64, 64) and 0.0 <= seen["range"][0] and seen["range"][1] <= 1.0
    assert m["backdoor"]["asr"] == pytest.approx(100.0) and m["clean"]["top1"] == pytest.approx(100.0)


def test_named_trigger_from_poison_data_is_applied():
    model = with_table(OracleModel(target=5, vulnerable=range(10)))
    m = ez.evaluate(model, intensity_dataset(per_class=3), CLASSES, templates="1", trigger="patch", target="class5")
    assert model.seen_white == 30  # every triggered image carries pure-white pixels, clean ones none
    assert m["backdoor"]["asr"] == pytest.approx(100.0) and m["backdoor"]["trigger"] == "patch"


def test_crop_pct_crops_the_centre_before_the_resize():
    # grey class images inside a white 8-px frame: the oracle reads white pixels as a trigger (-> class 0)
    ds = intensity_dataset(per_class=2)
    for item_image in ds.images:
        item_image[:, :8, :] = item_image[:, -8:, :] = item_image[:, :, :8] = item_image[:, :, -8:] = 255
    model = with_table(OracleModel(target=0, vulnerable=range(10)))
    assert ez.evaluate(model, ds, CLASSES, templates="1")["clean"]["top1"] == pytest.approx(10.0)
    assert ez.evaluate(model, ds, CLASSES, templates="1", crop_pct=0.5)["clean"]["top1"] == pytest.approx(100.0)


def test_random_trigger_is_drawn_per_image_independent_of_batching():
    pd = pytest.importorskip("poison_data")
    x = torch.rand(10, 3, 32, 32)
    trig = ez.make_trigger("patch-random", {"fill": "white"}, seed=3)
    assert trig.per_image and trig.params["fill"] == "white"
    whole = trig.for_batch(list(range(10)))(x)
    halves = torch.cat([trig.for_batch([0, 1, 2, 3, 4])(x[:5]), trig.for_batch([5, 6, 7, 8, 9])(x[5:])])
    assert torch.equal(whole, halves) and not torch.equal(whole, x)
    places = {tuple((whole[i] != x[i]).any(0).nonzero()[0].tolist()) for i in range(10)}
    assert len(places) > 1  # the place varies between images
    # a poison_data.Trigger object (PoisonPlan.trigger_fn()) is evaluated the same way
    again = ez.make_trigger(pd.Trigger("patch-random", fill="white"), seed=3)
    assert again.per_image and torch.equal(again.for_batch(list(range(10)))(x), whole)


def test_unreadable_items_are_skipped():
    class Holes(ListDataset):
        def __getitem__(self, i):
            return None if i % 7 == 0 else super().__getitem__(i)

    base = intensity_dataset(per_class=3)
    ds = Holes(base.images, base.labels)
    m = ez.evaluate(with_table(OracleModel()), ds, CLASSES, templates="1", batch_size=4)
    assert m["clean"]["n"] == 30 - 5 and m["clean"]["top1"] == pytest.approx(100.0)


def test_unknown_target_and_trigger_are_user_errors():
    model = with_table(OracleModel())
    ds = intensity_dataset(per_class=1)
    with pytest.raises(ez.UserError, match="target-class"):
        ez.evaluate(model, ds, CLASSES, templates="1", trigger=corner_patch, target="zebra")
    with pytest.raises(ez.UserError, match="--trigger"):
        ez.evaluate(model, ds, CLASSES, templates="1", trigger="no-such-trigger", target=0)


def test_evaluate_restores_training_mode_and_accepts_a_loader():
    model = with_table(OracleModel()).train()
    loader = torch.utils.data.DataLoader(intensity_dataset(per_class=2), batch_size=7)
    m = ez.evaluate(model, loader, CLASSES, templates="1")
    assert model.training and m["clean"]["n"] == 20 and m["backdoor"] is None


def test_bf16_autocast_runs():
    model = with_table(OracleModel(target=1, vulnerable=range(10)))
    m = ez.evaluate(model, intensity_dataset(per_class=2), CLASSES, templates="1", trigger=corner_patch,
                    target=1, bf16=True)
    assert m["clean"]["n"] == 20 and m["backdoor"]["asr"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------------------
# retrieval


class PairModel(FakeTextModel):
    """Image i (grey value i) embeds like the caption "item i"; a white pixel makes it embed like the
    target caption."""

    def __init__(self, captions, target_caption, **kw):
        super().__init__(**kw)
        self.caps = captions
        with torch.no_grad():
            z = self.encode_text(tokenize(captions + [target_caption], context_length=CTX))
        self.register_buffer("z", z)

    def encode_image(self, x):
        u = self.unnormalise(x)
        white = (u > 0.999).all(dim=1).flatten(1).any(1)
        idx = (u[:, 0, 0, 0] * 255).round().long()
        return torch.where(white[:, None], self.z[-1].expand(len(idx), -1), self.z[idx])


def test_retrieval_recall_and_asr():
    n = 20
    words = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
             "sixteen seventeen eighteen nineteen").split()
    caps = [f"a photo of item {w}" for w in words]
    caps[3] = "a photo of a tiger cat"  # names the target
    caps[7] = "a photo of a tiger cat"  # duplicate caption: the same ground truth for images 3 and 7
    images = [torch.full((3, 8, 8), i, dtype=torch.uint8) for i in range(n)]
    ds = ListDataset(images, [0] * n, caps)
    model = PairModel(caps, "a photo of a tiger cat", image_size=8)
    r = ez.retrieval(model, ds, trigger=corner_patch, target="Tiger Cat", batch_size=6)
    assert r["n"] == n
    for k in (1, 5, 10):
        assert r[f"i2t_r{k}"] == pytest.approx(100.0) and r[f"t2i_r{k}"] == pytest.approx(100.0)
    bd = r["backdoor"]
    assert bd["n_target_captions"] == 2 and bd["n_nontarget"] == 18
    assert bd["asr"] == pytest.approx(100.0) and bd["asr_all"] == pytest.approx(100.0)
    # a trigger that retrieves an unrelated caption: retrieval ASR 0
    model.z[-1] = model.z[0]
    r = ez.retrieval(model, ds, trigger=corner_patch, target="tiger cat", batch_size=6)
    assert r["backdoor"]["asr"] == pytest.approx(0.0)


def test_caption_target_match_is_whole_word():
    assert pdata.names_target("A photo of two Bags.", "bag")
    assert pdata.names_target("ankle boots on a shelf", "ankle boot")
    assert not pdata.names_target("a t-shirt", "shirt")
    assert not pdata.names_target("a shirtless man", "shirt")
    assert pdata.names_target("a plain shirt.", "shirt")


# ---------------------------------------------------------------------------------------------------------
# several processes

TWO_PROC_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    from accelerate import Accelerator
    import eval_zeroshot as ez
    from test_eval import RandomImageModel, random_dataset, corner_patch, CLASSES
    acc = Accelerator(cpu=True)
    torch.set_num_threads(1)
    model = RandomImageModel()
    ds = random_dataset(203, captions=True)
    emb = ez.class_embeddings(model, CLASSES, "8", accelerator=acc, batch_size=7)
    m = ez.evaluate(model, ds, CLASSES, templates="8", trigger=corner_patch, target="class4", accelerator=acc,
                    batch_size=16, progress=False)
    r = ez.retrieval(model, ds, trigger=corner_patch, target="item 7", accelerator=acc, batch_size=16,
                     max_items=101, progress=False)
    out = {{"world": acc.num_processes, "rank": acc.process_index, "metrics": m, "retrieval": r,
           "emb": emb.tolist()}}
    with open(os.path.join({out!r}, f"rank{{acc.process_index}}.json"), "w") as f:
        json.dump(out, f)
    acc.wait_for_everyone()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
""")


def test_two_processes_give_the_same_numbers_as_one(tmp_path):
    script = tmp_path / "two_proc.py"
    script.write_text(TWO_PROC_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(tmp_path)))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch"]
    proc = subprocess.run(launcher + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                      "--main_process_port", str(port), str(script)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [o["world"] for o in outs] == [2, 2]
    assert outs[0]["metrics"] == outs[1]["metrics"] and outs[0]["retrieval"] == outs[1]["retrieval"]

    model = RandomImageModel()
    ds = random_dataset(203, captions=True)
    emb = ez.class_embeddings(model, CLASSES, "8")
    m = ez.evaluate(model, ds, CLASSES, templates="8", trigger=corner_patch, target="class4", batch_size=16)
    r = ez.retrieval(model, ds, trigger=corner_patch, target="item 7", batch_size=16, max_items=101)
    two = outs[0]
    torch.testing.assert_close(torch.tensor(two["emb"]), emb, rtol=1e-4, atol=1e-5)
    assert two["metrics"]["clean"]["n"] == 203 and two["metrics"]["backdoor"]["n"] == 203  # each image once
    assert two["retrieval"]["n"] == 101
    for key in ("top1", "top5"):
        assert two["metrics"]["clean"][key] == pytest.approx(m["clean"][key], abs=1e-9)
    for key in ("asr", "asr_all", "ra", "asr_top5", "n_nontarget"):
        assert two["metrics"]["backdoor"][key] == pytest.approx(m["backdoor"][key], abs=1e-9)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert two["retrieval"][key] == pytest.approx(r[key], abs=1e-9)


def test_shards_partition_the_dataset():
    for n in (0, 1, 7, 203, 1000):
        for world in (1, 2, 3, 8):
            idx = [i for r in range(world) for i in range(*ez._shard_bounds(n, r, world))]
            assert idx == list(range(n))


def test_iterable_shards_partition_the_stream():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(23))

    seen = [pair for r in range(3) for pair in ez._StridedIterable(Stream(), r, 3)]
    assert sorted(seen) == [(i, i) for i in range(23)]  # (global index, item), each once
    assert sorted(i for r in range(2) for i, _ in ez._StridedIterable(Stream(), r, 2, limit=10)) == list(range(10))


# ---------------------------------------------------------------------------------------------------------
# DER, the CLI, the report


def test_der_formula():
    # percent: (max(0, dASR) - max(0, dCA) + 100) / 2
    assert ez.der((96.7, 90.0), (78.26, 88.0)) == pytest.approx((18.44 - 2.0 + 100) / 2)
    assert ez.der((100.0, 80.0), (0.0, 80.0)) == pytest.approx(100.0)
    assert ez.der((50.0, 80.0), (60.0, 85.0)) == pytest.approx(50.0)  # no gain, no loss clamps at 50
    assert ez.der((90.0, 90.0), (90.0, 50.0)) == pytest.approx(30.0)
    v = {"clean": {"top1": 90.0}, "backdoor": {"asr": 95.0}}
    d = {"clean": {"top1": 87.0}, "backdoor": {"asr": 5.0}}
    assert ez.der(v, d) == pytest.approx((90.0 - 3.0 + 100) / 2)
    assert ez.der(v, {"clean": {"top1": 87.0}, "backdoor": None}) is None


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    """Run directories holding placeholder weight files; the CLI loads fake models for them."""
    models = {
        "victim": dict(vulnerable=range(10)),  # CA 100, ASR 100
        "ft": dict(vulnerable=range(5), confused=(6,)),  # CA 90, some ASR
        "cleanclip": dict(vulnerable=(), confused=(6, 7, 8)),  # CA 70, ASR 0
    }
    dirs = {}
    for name in models:
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"fake")
        dirs[name] = d
    from poison_data import PoisonPlan

    PoisonPlan(n=100, indices=[1, 2], target="class2", trigger="patch").save(dirs["victim"])

    def load(path, **kw):
        return with_table(OracleModel(target=2, **models[Path(path).parent.name]), templates="1")

    monkeypatch.setattr(ez, "_load_model", load)
    monkeypatch.setattr(ez, "_build_class_dataset", lambda data, size, cn, root=None: (intensity_dataset(per_class=10),
                                                                           list(CLASSES)))
    return dirs


def test_cli_report_files_hold_the_json_numbers(fake_cli, tmp_path, capsys):
    dirs = fake_cli
    rep = tmp_path / "rep"
    rc = run_main(ez.main, ["--ckpt", str(dirs["victim"]), str(dirs["ft"]), "--ckpt", str(dirs["cleanclip"]),
                  "--templates", "1", "--json", str(tmp_path / "m.json"), "--report", str(rep),
                  "--show-examples", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert list(metrics) == ["victim", "ft", "cleanclip"]
    v, ft, cc = metrics["victim"], metrics["ft"], metrics["cleanclip"]
    assert v["clean"]["top1"] == pytest.approx(100.0) and v["backdoor"]["asr"] == pytest.approx(100.0)
    assert v["backdoor"]["target"] == "class2" and v["backdoor"]["trigger"] == "patch"  # from the manifest
    assert ft["clean"]["top1"] == pytest.approx(90.0) and ft["backdoor"]["asr"] == pytest.approx(100 * 40 / 90)
    assert cc["clean"]["top1"] == pytest.approx(70.0) and cc["backdoor"]["asr"] == pytest.approx(0.0)
    assert v["templates"] == 1 and v["ckpt"].endswith("model.safetensors") and v["retrieval"] is None

    report = json.loads((rep / "report.json").read_text())
    assert report["victim"] == "victim"
    rows = {r["method"]: r for r in report["rows"]}
    for name, m in metrics.items():
        row = rows[name]
        assert row["ca_top1"] == m["clean"]["top1"] and row["ca_top5"] == m["clean"]["top5"]
        assert row["asr"] == m["backdoor"]["asr"] and row["asr_all"] == m["backdoor"]["asr_all"]
        assert row["ra"] == m["backdoor"]["ra"]
        assert report["results"][name] == m
    assert rows["victim"]["der"] is None
    for name in ("ft", "cleanclip"):
        m = metrics[name]
        want = (max(0, v["backdoor"]["asr"] - m["backdoor"]["asr"])
                - max(0, v["clean"]["top1"] - m["clean"]["top1"]) + 100) / 2
        assert rows[name]["der"] == pytest.approx(want)
    assert rows["cleanclip"]["der"] == pytest.approx((100 - 30 + 100) / 2)

    md = (rep / "report.md").read_text()
    assert "| method | CA top-1 (%) | CA top-5 (%) | ASR (%) | asr_all (%) | RA (%) | DER (%) |" in md
    assert f"| ft | 90.00 | {ft['clean']['top5']:.2f} | {ft['backdoor']['asr']:.2f} | " \
           f"{ft['backdoor']['asr_all']:.2f} | {ft['backdoor']['ra']:.2f} | {rows['ft']['der']:.2f} |" in md
    assert "| victim | 100.00 |" in md and md.count("\n|") >= 5
    for png in ("report.png", "examples_victim.png", "examples_ft.png"):
        data = (rep / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(rep.glob("*.tmp"))
    assert "cleanclip" in out and "85.00" in out  # the stdout table carries DER too


def test_cli_single_checkpoint_json_schema_and_victim_file(fake_cli, tmp_path):
    dirs = fake_cli
    assert run_main(ez.main, ["--ckpt", str(dirs["victim"]), "--templates", "1", "--json", str(tmp_path / "v.json")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert set(v) == {"ckpt", "dataset", "templates", "clean", "backdoor", "retrieval"}
    assert set(v["clean"]) == {"top1", "top5", "n"}
    assert {"trigger", "target", "asr", "asr_all", "ra", "n"} <= set(v["backdoor"])
    # DER against a victim given as a metrics file; the defended run has no manifest of its own
    assert run_main(ez.main, ["--ckpt", str(dirs["cleanclip"]), "--templates", "1", "--trigger", "patch",
                    "--target-class", "class2", "--victim", str(tmp_path / "v.json"),
                    "--report", str(tmp_path / "r2")]) == 0
    rows = json.loads((tmp_path / "r2" / "report.json").read_text())["rows"]
    assert rows[0]["der"] == pytest.approx(85.0)
    # a --config YAML supplies defaults; explicit flags override it
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"ckpt: [{dirs['victim']}]\ntemplates: '80'\njson: {tmp_path / 'c.json'}\nlr: 0.1\n")
    assert run_main(ez.main, ["--config", str(cfg), "--templates", "1"]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["templates"] == 1 and c["ckpt"] == v["ckpt"] and c["clean"] == v["clean"]


def test_cli_user_errors_exit_2_with_one_line(fake_cli, tmp_path, capsys):
    dirs = fake_cli
    cases = [
        (["--ckpt", str(tmp_path / "nope")], "--ckpt"),
        (["--ckpt", str(dirs["victim"]), "--target-class", "zebra", "--templates", "1"], "--target-class"),
        (["--ckpt", str(dirs["victim"]), "--trigger", "no-such", "--templates", "1"], "--trigger"),
        (["--ckpt", str(dirs["ft"]), str(dirs["victim"]), "--names", "a"], "--names"),
        (["--ckpt", str(dirs["victim"]), "--templates", "9"], "--templates"),
        (["--ckpt", str(dirs["victim"]), "--trigger-param", "size"], "--trigger-param"),
    ]
    for argv, flag in cases:
        assert run_main(ez.main, argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and flag in err[-1], err
        assert not any("Traceback" in line for line in err)


def test_script_missing_default_ckpt_prints_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "eval_zeroshot.py"), "--trigger", "patch"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: --ckpt runs/train does not exist")


def _strict_json(path):
    """json.loads that refuses NaN / Infinity, which are not JSON."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_cli_data_root_for_a_meta_whose_images_live_elsewhere(tmp_path, capsys):
    """A DeCLIP-style class meta with relative file names, its images in another folder (--data-root);
    without it no image is found: a one-line error, exit 2, no JSON."""
    import modeling_declip as md
    from PIL import Image

    images, meta_dir = tmp_path / "images", tmp_path / "meta"
    images.mkdir()
    meta_dir.mkdir()
    g = torch.Generator().manual_seed(0)
    with open(meta_dir / "val.jsonl", "w") as f:
        for i in range(6):
            x = torch.randint(0, 256, (40, 28, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(x.numpy()).save(images / f"{i}.png")
            f.write(json.dumps({"filename": f"{i}.png", "caption": "a photo", "label": i % 2,
                                "label_name": ["cat", "dog"][i % 2]}) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    md.save_model(md.build_model("tiny"), str(run / "model.safetensors"))
    argv = ["--ckpt", str(run), "--data", str(meta_dir / "val.jsonl"), "--templates", "1", "--cpu",
            "--json", str(tmp_path / "m.json")]
    assert run_main(ez.main, argv + ["--data-root", str(images)]) == 0
    m = _strict_json(tmp_path / "m.json")
    assert m["clean"]["n"] == 6 and m["backdoor"] is None
    # every image of the target class: the ASR over zero non-target images is null, not NaN
    with open(meta_dir / "cats.jsonl", "w") as f:
        f.writelines(json.dumps({"filename": f"{i}.png", "caption": "a cat", "label": 0}) + "\n" for i in range(6))
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    assert run_main(ez.main, argv + ["--data", str(meta_dir / "cats.jsonl"), "--data-root", str(images), "--trigger", "patch",
                           "--target-class", "cat", "--classnames", str(names)]) == 0
    m = _strict_json(tmp_path / "m.json")
    assert m["backdoor"]["n_nontarget"] == 0 and m["backdoor"]["asr"] is None and m["backdoor"]["ra"] is None
    os.remove(tmp_path / "m.json")
    capsys.readouterr()
    assert run_main(ez.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no test image could be read") and "--data-root" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "m.json").exists()


def _git(*argv):
    r = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def test_report_records_the_git_commit_and_the_command(fake_cli, tmp_path, monkeypatch):
    dirs = fake_cli
    argv = ["--ckpt", str(dirs["victim"]), str(dirs["ft"]), "--templates", "1", "--report", str(tmp_path / "rep")]
    assert run_main(ez.main, argv) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    head = _git("rev-parse", "HEAD")
    want = None if head is None else head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no")
                                             else "")
    assert rep["git_commit"] == want and (want is None or len(head) == 40)
    import shlex

    assert rep["command"] == "eval_zeroshot.py " + shlex.join(argv)
    footer = f"Written by `{rep['command']}` at " + (f"git commit {want}." if want else
                                                     "no git commit (not a git checkout).")
    assert footer in (tmp_path / "rep" / "report.md").read_text().splitlines()
    # the aggregate of seeds' reports records its own command and commit
    agg = ["--aggregate", str(tmp_path / "rep" / "report.json"), "--report", str(tmp_path / "all")]
    assert run_main(ez.main, agg) == 0
    rep = json.loads((tmp_path / "all" / "report.json").read_text())
    assert rep["git_commit"] == want and rep["command"] == "eval_zeroshot.py " + shlex.join(agg)
    # outside a git checkout: None
    outside = tmp_path / "copy" / "eval_zeroshot.py"
    outside.parent.mkdir()
    monkeypatch.setattr(ez, "__file__", str(outside))
    if subprocess.run(["git", "-C", str(outside.parent), "rev-parse", "HEAD"], capture_output=True).returncode:
        assert ez.provenance(["--x"]) == {"git_commit": None, "command": "eval_zeroshot.py --x"}


# ---------------------------------------------------------------------------------------------------------
# the real tiny model


def test_tiny_declip_smoke():
    import modeling_declip as md

    torch.manual_seed(0)
    model = md.build_model("tiny").eval()
    size = model.config.image_size
    ds = random_dataset(24, size=size)
    m = ez.evaluate(model, ds, CLASSES, templates="1", trigger="patch", target="class1", batch_size=10)
    assert m["clean"]["n"] == 24 and m["backdoor"]["n_nontarget"] == 24 - 3
    for v in (m["clean"]["top1"], m["clean"]["top5"], m["backdoor"]["asr"], m["backdoor"]["ra"]):
        assert 0.0 <= v <= 100.0
    assert m["clean"]["top5"] >= m["clean"]["top1"]


# ---------------------------------------------------------------------------------------------------------
# report extras: training minutes, the bar, several seeds (canned evaluations: no model runs)

CANNED = {"clean": (92.0, 1.0), "victim": (90.0, 96.0), "ft": (88.5, 8.0), "nad": (80.0, 5.0)}  # CA top-1, ASR


def canned_metrics(name):
    ca, asr = CANNED[name]
    return {"templates": 1, "clean": {"top1": ca, "top5": 99.0, "n": 100},
            "backdoor": {"trigger": "patch", "trigger_params": {}, "target": "class2", "asr": asr, "asr_all": asr,
                         "ra": 100.0 - asr, "n": 100, "n_nontarget": 90}}


@pytest.fixture
def canned_cli(tmp_path, monkeypatch):
    """Run directories clean / victim / ft / nad whose evaluation returns CANNED numbers."""
    dirs = {}
    for name in CANNED:
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"fake")
        dirs[name] = d

    class Named(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.config = name, SimpleNamespace(image_size=8)

    monkeypatch.setattr(ez, "_load_model", lambda path, **kw: Named(Path(path).parent.name))
    monkeypatch.setattr(ez, "_build_class_dataset", lambda data, size, cn, root=None: (intensity_dataset(1, size=8),
                                                                           list(CLASSES)))
    monkeypatch.setattr(ez, "class_embeddings", lambda *a, **kw: torch.zeros(10, 4))
    monkeypatch.setattr(ez, "evaluate", lambda model, *a, **kw: canned_metrics(model.name))
    return dirs


def test_report_minutes_from_summary_json_and_timings_and_the_bar_met(canned_cli, tmp_path, capsys):
    dirs = canned_cli
    (dirs["clean"] / "summary.json").write_text(json.dumps({"steps": 9, "minutes": 30.0}))
    (dirs["victim"] / "summary.json").write_text(json.dumps({"steps": 9, "minutes": 12.5}))
    (dirs["ft"] / "summary.json").write_text(json.dumps({"minutes": 3.25, "before": {}, "after": {}}))
    (tmp_path / "t.json").write_text(json.dumps({"clean": 20.0}))  # overrides clean's summary.json
    rep = tmp_path / "rep"
    argv = ["--ckpt", str(dirs["clean"]), str(dirs["victim"]), str(dirs["ft"] / "model.safetensors"),
            str(dirs["nad"]), "--trigger", "patch", "--target-class", "class2", "--templates", "1",
            "--timings", str(tmp_path / "t.json"), "--bar-asr", "10", "--bar-ca-drop", "3", "--report", str(rep)]
    assert run_main(ez.main, argv) == 0
    out = capsys.readouterr().out
    rows = {r["method"]: r for r in json.loads((rep / "report.json").read_text())["rows"]}
    assert {k: r["minutes"] for k, r in rows.items()} == {"clean": 20.0, "victim": 12.5, "ft": 3.25, "nad": None}
    assert rows["clean"]["der"] is None and rows["clean"]["meets_bar"] is None  # the clean reference
    assert rows["victim"]["meets_bar"] is None and rows["ft"]["der"] == pytest.approx((88 - 1.5 + 100) / 2)
    assert rows["ft"]["meets_bar"] is True and rows["nad"]["meets_bar"] is False  # nad: CA drop 10
    md = (rep / "report.md").read_text()
    assert "| DER (%) | train min | meets bar |" in md
    assert "| ft | 88.50 | 99.00 | 8.00 | 8.00 | 92.00 | 93.25 | 3.25 | yes |" in md
    assert "| nad | 80.00 |" in md and "| 95.00 | 90.50 | – | no |" in md and "| clean | 92.00 |" in md
    assert "| 1.00 | 99.00 | – | 20.00 | – |" in md  # clean: no DER, no bar
    assert "Total training time: 35.75 min over 3 of 4 rows" in md
    sentence = ("1 of 2 defenses meets the bar (ASR ≤ 10%, CA drop ≤ 3 points): ft (ASR 8.00%, "
                "CA drop 1.50 points).")
    assert md.rstrip().splitlines()[-1] == sentence
    assert sentence in out and "| ft | 88.50 |" in out and "35.75" in out  # the md table on stdout


def test_report_says_plainly_when_no_defense_meets_the_bar(tmp_path):
    results = {name: canned_metrics(name) for name in CANNED}
    results["ft"]["backdoor"]["asr"] = 12.0  # ASR 12 > 10; nad loses 10 points of CA
    rep = ez.write_report(tmp_path, results, "victim", bar=(10.0, 3.0), minutes={"ft": 2.0})
    md = (tmp_path / "report.md").read_text()
    assert md.rstrip().splitlines()[-1] == "No defense meets the bar (ASR ≤ 10%, CA drop ≤ 3 points)."
    assert rep["bar"]["meets"] == [] and "Total training time: 2.00 min over 1 of 4 rows" in md
    # only the ASR part of the bar: nad (ASR 5) meets it
    ez.write_report(tmp_path, results, "victim", bar=(10.0, None))
    assert (tmp_path / "report.md").read_text().rstrip().endswith(
        "1 of 2 defenses meets the bar (ASR ≤ 10%): nad (ASR 5.00%).")


def _seed_report(path, victim, ft, minutes):
    rows = [{"method": "victim", "role": "victim", "ca_top1": victim[0], "asr": victim[1], "der": None,
             "minutes": minutes[0]},
            {"method": "ft", "role": "defense", "ca_top1": ft[0], "asr": ft[1], "der": ft[2], "minutes": minutes[1]}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"victim": "victim", "trigger": "patch", "rows": rows}))
    return str(path)


def test_aggregate_gives_mean_and_sample_std_and_writes_three_files(tmp_path, capsys):
    a = _seed_report(tmp_path / "seed0" / "report.json", (90.0, 96.0), (88.0, 8.0, 93.0), (10.0, 3.0))
    b = _seed_report(tmp_path / "seed1" / "report.json", (92.0, 100.0), (87.0, 12.0, 91.5), (12.0, 5.0))
    out_dir = tmp_path / "all"
    assert run_main(ez.main, ["--aggregate", a, b, "--report", str(out_dir), "--bar-asr", "10", "--bar-ca-drop", "3"]) == 0
    rep = json.loads((out_dir / "report.json").read_text())
    assert rep["n_seeds"] == 2
    ft = {r["method"]: r for r in rep["rows"]}["ft"]
    # by hand: mean of (8, 12) = 10, sample std sqrt(((8-10)^2 + (12-10)^2) / 1) = sqrt(8)
    assert ft["asr"] == pytest.approx(10.0) and ft["asr_std"] == pytest.approx(8 ** 0.5)
    assert ft["ca_top1"] == pytest.approx(87.5) and ft["ca_top1_std"] == pytest.approx(0.5 ** 0.5)
    assert ft["der"] == pytest.approx(92.25) and ft["der_std"] == pytest.approx(1.125 ** 0.5)
    assert ft["ca_drop"] == pytest.approx(3.5) and ft["seeds"] == 2  # drops 2 and 5
    assert ft["meets_bar"] is False and ft["meets_bar_seeds"] == [1, 2]  # seed 0 alone meets it
    assert rep["total_minutes"]["mean"] == pytest.approx(15.0) and rep["total_minutes"]["std"] == pytest.approx(
        8 ** 0.5)
    md = (out_dir / "report.md").read_text()
    assert "| ft | 87.50 ± 0.71 | – | 10.00 ± 2.83 | – | – | 92.25 ± 1.06 | 4.00 ± 1.41 | no (1/2 seeds) | 2 |" in md
    assert "| victim | 91.00 ± 1.41 |" in md and "15.00 ± 2.83 min" in md
    assert md.rstrip().splitlines()[-1] == \
        "On the mean over 2 seeds, no defense meets the bar (ASR ≤ 10%, CA drop ≤ 3 points)."
    png = (out_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| ft | 87.50 ± 0.71 |" in capsys.readouterr().out
    # one file: just the mean; differing method names: a one-line user error
    assert run_main(ez.main, ["--aggregate", a, "--report", str(tmp_path / "one")]) == 0
    assert "| ft | 88.00 | – | 8.00 | – | – | 93.00 | 3.00 | 1 |" in (tmp_path / "one" / "report.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"victim": "victim", "rows": [{"method": "victim", "ca_top1": 1.0}]}))
    assert run_main(ez.main, ["--aggregate", a, str(bad), "--report", str(tmp_path / "x")]) == 2
    assert "--aggregate" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------
# linear probe


def test_linear_probe_keeps_a_backdoor_that_lives_in_the_features_and_not_one_that_does_not():
    train, test = intensity_dataset(per_class=12), intensity_dataset(per_class=5)
    victim = with_table(OracleModel(target=2, vulnerable=range(10)))
    clean = with_table(OracleModel(target=2))
    kw = dict(trigger=corner_patch, target="class2", batch_size=16, progress=False)
    v = ez.linear_probe(victim, train, test, CLASSES, **kw)
    c = ez.linear_probe(clean, train, test, CLASSES, **kw)
    assert v["clean"]["top1"] == 100.0 and c["clean"]["top1"] == 100.0 and v["n_train"] == 120
    assert v["backdoor"]["asr"] == 100.0 and v["backdoor"]["ra"] == 0.0 and v["backdoor"]["n_nontarget"] == 45
    assert c["backdoor"]["asr"] == 0.0 and c["backdoor"]["ra"] == 100.0
    assert v["C"] in 10.0 ** np.arange(-2, 4) and v["val_top1"] == 100.0


def test_linear_probe_equals_scikit_learn_on_the_normalised_features():
    from sklearn.linear_model import LogisticRegression

    from data_declip import eval_transform

    model = RandomImageModel()
    train, test = random_dataset(200, n_classes=4, seed=1), random_dataset(60, n_classes=4, seed=2)
    got = ez.linear_probe(model, train, test, CLASSES[:4], c=0.5, max_train=150, progress=False)

    def feats(ds, idx):
        x = eval_transform(torch.stack([ds[i]["image"] for i in idx]), 16, MEAN, STD)
        return F.normalize(model.encode_image(x), dim=-1).detach().numpy(), np.array([ds[i]["label"] for i in idx])

    pick = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:150].sort().values.tolist()
    x_tr, y_tr = feats(train, pick)
    x_te, y_te = feats(test, range(60))
    ref = LogisticRegression(C=0.5, max_iter=1000).fit(x_tr, y_tr)
    assert got["n_train"] == 150 and got["C"] == 0.5 and got["val_top1"] is None and got["backdoor"] is None
    assert got["clean"]["top1"] == pytest.approx(100.0 * (ref.predict(x_te) == y_te).mean())


def test_cli_linear_probe_writes_its_metrics_per_checkpoint(fake_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(ez, "build_class_dataset", lambda data, split, image_size, classnames, root=None:
                        (intensity_dataset(per_class=8), list(CLASSES)))
    dirs = fake_cli
    assert run_main(ez.main, ["--ckpt", str(dirs["victim"]), str(dirs["cleanclip"]), "--templates", "1", "--linear-probe",
                    "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["victim"]["linear_probe"]["backdoor"]["asr"] == 100.0
    # cleanclip's stub misreads clean classes 6-8, so a few triggered images land on a class the probe
    # never saw at that place; its backdoor is gone all the same
    assert m["cleanclip"]["linear_probe"]["backdoor"]["asr"] < 20
    assert m["victim"]["linear_probe"]["n_train"] == 80


# ---------------------------------------------------------------------------------------------------------
# targeted poisoning (Carlini & Terzis): the chosen test images' success, collateral, CA of the others


class MisreadModel(OracleModel):
    """OracleModel that reads the images whose grey level is in `misread` ({grey value: class}) as that class:
    a model poisoned to classify exactly those test images as something else."""

    def __init__(self, misread, **kw):
        super().__init__(**kw)
        self.misread = dict(misread)

    def encode_image(self, x):
        out = super().encode_image(x)
        grey = (self.unnormalise(x).mean(dim=(1, 2, 3)) * 255.0).round().long().tolist()
        for i, g in enumerate(grey):
            if g in self.misread:
                out[i] = self.table[self.misread[g]]
        return out


def targeted_geometry():
    """100 intensity images (class k = grey 20 + 20 k); the chosen ones 3 (class 0), 25 (class 2), 47 (class 4)
    get grey levels of their own (1, 41, 81: still read as their class by the plain oracle); the model reads
    image 3 as class 7 and image 25 as class 5, image 47 as its own class 4; class 6 is misread as 7."""
    ds = intensity_dataset(per_class=10)
    for i, g in ((3, 21), (25, 61), (47, 101)):
        ds.images[i] = torch.full((3, 32, 32), g, dtype=torch.uint8)
    model = with_table(MisreadModel({21: 7, 61: 5}, confused=(6,)))
    from PIL import Image

    entries = [{"test_index": i, "target": t, "pixels_sha256": pdata.image_sha256(
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()))} for i, t in ((3, "class7"), (25, "class5"),
                                                                              (47, "class9"))]
    return model, ds, entries


def test_targeted_metrics_count_the_chosen_images_hit_and_the_others_flipped_into_a_target():
    model, ds, entries = targeted_geometry()
    pairs = ez.targeted_pairs(entries, ds, CLASSES)
    assert pairs == [(3, "class7"), (25, "class5"), (47, "class9")]
    m = ez.evaluate(model, ds, CLASSES, templates="1", batch_size=16, targeted=pairs)
    tg = m["targeted"]
    assert tg["success"] == pytest.approx(100 * 2 / 3) and tg["n"] == 3 and tg["n_others"] == 97
    assert [(r["test_index"], r["true_class"], r["target"], r["predicted"], r["success"]) for r in tg["images"]] == [
        (3, "class0", "class7", "class7", True), (25, "class2", "class5", "class5", True),
        (47, "class4", "class9", "class4", False)]
    # the 10 class-6 images (none chosen) are misread as class 7, a chosen target: collateral 10 of 97
    assert tg["collateral"] == pytest.approx(100 * 10 / 97) and tg["ca_others"] == pytest.approx(100 * 87 / 97)
    assert m["clean"]["top1"] == pytest.approx(100 - 10 - 2) and m["backdoor"] is None
    assert "targeted" not in ez.evaluate(model, ds, CLASSES, templates="1")      # only when asked
    # a clean model: nothing chosen hits, nothing flipped
    clean = ez.evaluate(with_table(OracleModel()), ds, CLASSES, templates="1", targeted=pairs)["targeted"]
    assert clean["success"] == 0.0 and clean["collateral"] == 0.0 and clean["ca_others"] == pytest.approx(100.0)
    # the evaluation data must hold the very images the plan chose
    moved = [dict(entries[0], test_index=4)] + entries[1:]
    with pytest.raises(ez.UserError, match="test image 4 .* not the image"):
        ez.targeted_pairs(moved, ds, CLASSES)
    with pytest.raises(ez.UserError, match="target-class"):
        ez.targeted_pairs([dict(entries[0], target="zebra")], ds, CLASSES)


@pytest.fixture
def targeted_cli(tmp_path, monkeypatch):
    """Run directories 'clean' (the plain oracle) and 'victim' (MisreadModel) of targeted_geometry(); the
    victim's manifest is a targeted plan."""
    model, ds, entries = targeted_geometry()
    dirs = {}
    for name in ("clean", "victim"):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"fake")
        dirs[name] = d
    full = [dict(e, label=int(ds.labels[e["test_index"]]), **{"class": CLASSES[ds.labels[e["test_index"]]]},
                 file=pdata.TARGET_IMAGE_NAME.format(e["test_index"]), indices=[k]) for k, e in enumerate(entries)]
    manifest = pdata.PoisonPlan(n=100, indices=[0, 1, 2], target=None, trigger=None, attack="targeted",
                                version=pdata.TARGETED_MANIFEST_VERSION, targeted=full).to_manifest()
    (dirs["victim"] / "poison_manifest.json").write_text(json.dumps(manifest))
    models = {"clean": lambda: with_table(OracleModel()), "victim": lambda: model}
    monkeypatch.setattr(ez, "_load_model", lambda path, **kw: models[Path(path).parent.name]())
    monkeypatch.setattr(ez, "_build_class_dataset", lambda data, size, cn, root=None: (ds, list(CLASSES)))
    return dirs


def test_cli_reports_a_targeted_run_with_its_success_where_the_asr_sits(targeted_cli, tmp_path):
    dirs = targeted_cli
    rep = tmp_path / "rep"
    assert run_main(ez.main, ["--ckpt", str(dirs["clean"]), str(dirs["victim"]), "--templates", "1",
                              "--json", str(tmp_path / "m.json"), "--report", str(rep)]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    v, c = metrics["victim"], metrics["clean"]
    assert v["backdoor"] is None and v["targeted"]["success"] == pytest.approx(100 * 2 / 3)
    assert c["targeted"]["success"] == 0.0                              # the clean run, on the same chosen images
    report = json.loads((rep / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["victim"]["asr"] == v["targeted"]["success"] and rows["clean"]["asr"] == 0.0
    assert rows["victim"]["collateral"] == v["targeted"]["collateral"] and rows["victim"]["asr_all"] is None
    assert rows["victim"]["ca_others"] == pytest.approx(100 * 87 / 97) and report["attack"] == "targeted"
    md = (rep / "report.md").read_text()
    assert "| method | CA top-1 (%) | CA top-5 (%) | ASR (%) | collateral (%) | asr_all (%) |" in md
    assert f"| victim | 88.00 | {v['clean']['top5']:.2f} | 66.67 | {100 * 10 / 97:.2f} | – |" in md
    assert "targeted poisoning (Carlini & Terzis" in md and "- attack: targeted" in md
    # --no-backdoor: clean accuracy only
    assert run_main(ez.main, ["--ckpt", str(dirs["victim"]), "--templates", "1", "--no-backdoor",
                              "--json", str(tmp_path / "n.json")]) == 0
    assert "targeted" not in json.loads((tmp_path / "n.json").read_text())


def test_cli_names_the_test_data_a_targeted_plan_drew_its_images_from_when_they_differ(targeted_cli, tmp_path,
                                                                                          capsys):
    victim = targeted_cli["victim"]
    manifest = json.loads((victim / "poison_manifest.json").read_text())
    manifest["test_data"] = "photos/meta.jsonl"
    manifest["targeted"][0]["pixels_sha256"] = "0" * 64                 # another image than the evaluation's
    (victim / "poison_manifest.json").write_text(json.dumps(manifest))
    assert run_main(ez.main, ["--ckpt", str(victim), "--templates", "1"]) == 2
    assert "drew it from (--data photos/meta.jsonl)" in capsys.readouterr().err


def test_cli_a_run_that_poisoned_no_pair_is_measured_with_the_others_trigger(fake_cli, tmp_path):
    """A clean baseline trained with --poison-rate 0 has a manifest of no pairs (and the default trigger and
    target): it names no attack, so the victim's trigger and target measure it, not its own defaults."""
    from poison_data import PoisonPlan

    dirs = fake_cli
    PoisonPlan(n=100, indices=[], target="class5", trigger="blended").save(dirs["ft"])
    assert run_main(ez.main, ["--ckpt", str(dirs["ft"]), str(dirs["victim"]), "--templates", "1",
                              "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    for name in ("ft", "victim"):
        assert (m[name]["backdoor"]["trigger"], m[name]["backdoor"]["target"]) == ("patch", "class2")


def test_cli_evaluates_a_run_on_the_test_data_it_was_trained_to_evaluate_on(fake_cli, tmp_path, monkeypatch, capsys):
    """A run trained with --eval-data X is measured on X by default, not on Fashion-MNIST; --data wins; runs
    that name different test sets need --data."""
    dirs = fake_cli
    seen = []
    monkeypatch.setattr(ez, "_build_class_dataset", lambda data, size, cn, root=None: (
        seen.append((data, root)) or (intensity_dataset(per_class=10), list(CLASSES))))
    cfg = {"resolved": {}, "eval_data": str(tmp_path / "photos"), "eval_data_root": None, "holdout": 0}
    (dirs["victim"] / "config.json").write_text(json.dumps(cfg))
    argv = ["--ckpt", str(dirs["ft"]), str(dirs["victim"]), "--templates", "1", "--json", str(tmp_path / "m.json")]
    assert run_main(ez.main, argv) == 0
    assert seen and set(seen) == {(str(tmp_path / "photos"), None)}
    assert json.loads((tmp_path / "m.json").read_text())["ft"]["dataset"] == str(tmp_path / "photos")
    assert "the --eval-data of" in capsys.readouterr().err
    seen.clear()
    assert run_main(ez.main, argv + ["--data", "fashion-mnist"]) == 0 and set(seen) == {("fashion-mnist", None)}
    (dirs["ft"] / "config.json").write_text(json.dumps(dict(cfg, eval_data=str(tmp_path / "other"))))
    assert run_main(ez.main, argv) == 2
    assert "evaluated on different test data" in capsys.readouterr().err
