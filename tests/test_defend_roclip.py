"""defend_roclip.py: the caption pool never returns the querying pair's caption, RoCLIP passes follow
the official epoch rule, the pool term equals InfoNCE against the nearest pool captions, and a run
resumes bitwise with its pool."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import data_declip as dd
import defend_roclip as rc
import modeling_declip as md
import train_declip as td
from test_train import _SigtermAt

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not os.path.isdir(dd.fashion_mnist_dir()), reason="Fashion-MNIST not installed")]

FLAGS = ["--batch-size", "8", "--model", "tiny-vit", "--log-every", "1", "--no-eval", "--precision", "no",
         "--save-every", "0", "--poison-rate", "0.05", "--warmup-steps", "0", "--cpu"]


def test_pool_returns_the_nearest_stored_caption_of_another_pair_in_fifo_order():
    g = torch.Generator().manual_seed(0)
    pool = rc.CaptionPool(6, 4)
    first, ids = torch.randn(4, 4, generator=g), torch.tensor([10, 11, 12, 13])
    pool.push(first, ids)
    assert pool.filled() == 4
    q = first.clone()  # each row's nearest stored caption is its own: it must be skipped
    got = pool.query(q, ids)
    sims = F.normalize(q, dim=1) @ F.normalize(first, dim=1).t()
    sims.fill_diagonal_(-2)
    assert torch.allclose(got, F.normalize(first, dim=1)[sims.argmax(1)])
    assert not any(torch.allclose(got[k], F.normalize(first[k], dim=0)) for k in range(4))
    # a query from a pair that is not stored gets its true nearest (empty slots never count)
    other = pool.query(q[:1], torch.tensor([99]))
    assert torch.allclose(other[0], F.normalize(first[0], dim=0))
    # FIFO: the next 4 overwrite slots 4, 5, 0, 1
    pool.push(torch.randn(4, 4, generator=g), torch.tensor([20, 21, 22, 23]))
    assert pool.ids.tolist() == [22, 23, 12, 13, 20, 21] and int(pool.ptr) == 2


def test_roclip_passes_follow_the_official_rule_passes_counted_from_one():
    assert [rc.is_roclip_pass(e, 2) for e in range(6)] == [False, True, False, True, False, True]
    assert all(rc.is_roclip_pass(e, 1) for e in range(3))
    assert rc.default_pool_size(1_000_000, 512) == 21845 and rc.default_pool_size(1000, 64) == 64


def test_pool_term_is_infonce_of_images_against_their_nearest_pool_captions():
    torch.manual_seed(0)
    model = md.build_model("tiny-vit", context_length=16).train()
    ext = rc.RoCLIP(break_epoch=1, pool_size=8)
    ext.setup(type("A", (), {"device": torch.device("cpu"), "num_processes": 1,
                             "register_for_checkpointing": lambda self, *o: None})(), model, None, range(100))
    stored = torch.randn(8, model.config.embed_dim)
    ext.pool.push(stored, torch.arange(100, 108))
    images, tokens = torch.randn(5, 3, 32, 32), dd.tokenize([f"a photo of {k}" for k in range(5)], 16)
    ext.ids, ext.roclip_step = torch.arange(5), True
    inputs = dict(images=images, tokens=tokens, weights=ext.off)
    with model.tap(ext.tap_names(model)) as taps:
        out = model(**inputs)
        term = ext.extra_loss(model, inputs, taps)["roclip"]
    assert out["loss"].item() == 0  # the plain CLIP term is weighted 0 on RoCLIP passes
    f = F.normalize(model.encode_image(images), dim=1)
    bank = F.normalize(stored, dim=1)
    nn_ = bank[(f @ bank.t()).argmax(1)]
    s, target = model.logit_scale.exp(), torch.arange(5)
    ref = (F.cross_entropy(s * f @ nn_.t(), target) + F.cross_entropy(s * nn_ @ f.t(), target)) / 2
    assert term.item() == pytest.approx(ref.item(), rel=1e-5)
    # the batch's captions were pushed after the query
    assert ext.pool.ids.tolist()[:5] == list(range(5)) and ext.pool.filled() == 8


def _train(out, *extra, extension=None):
    args = td.parse_args(rc.build_parser(), ["--out-dir", str(out), *FLAGS, *extra])
    return td.train(args, extension or rc.RoCLIP(args.break_epoch, args.pool_size))


def test_a_roclip_pass_trains_the_pool_term_once_the_pool_has_captions(tmp_path):
    rc.main(["--out-dir", str(tmp_path / "r"), *FLAGS, "--max-steps", "3", "--break-epoch", "1",
             "--pool-size", "16", "--mode", "declip"])
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl") if '"loss"' in line]
    # step 1: the pool is empty, so the plain CLIP loss; then the pool term alone
    assert rows[0]["roclip"] == 0 and rows[0]["loss"] == pytest.approx(rows[0]["clip"], rel=1e-6)
    for r in rows[1:]:
        assert r["roclip"] > 0 and r["loss"] == pytest.approx(r["roclip"], rel=1e-6)
    cfg = json.load(open(tmp_path / "r" / "config.json"))
    assert cfg["mode"] == "clip" and cfg["resolved"]["defense"] == "roclip"
    assert cfg["resolved"]["defense_settings"]["pool_size"] == 16
    # on a CLIP pass (the first of --break-epoch 2) the pool term is never used
    rc.main(["--out-dir", str(tmp_path / "c"), *FLAGS, "--max-steps", "2"])
    rows = [json.loads(line) for line in open(tmp_path / "c" / "metrics.jsonl") if '"loss"' in line]
    assert all(r["roclip"] == 0 and r["loss"] == pytest.approx(r["clip"], rel=1e-6) for r in rows)


class _CutAt(rc.RoCLIP):
    """RoCLIP that sends SIGTERM before step `at` (0-based), as test_train's _SigtermAt."""

    extend_batch = _SigtermAt.extend_batch

    def __init__(self, at):
        super().__init__(break_epoch=1, pool_size=16)
        self.at, self.calls = at, 0


def test_roclip_resumes_bitwise_with_its_pool(tmp_path):
    flags = ["--max-steps", "4", "--break-epoch", "1", "--pool-size", "16"]
    _train(tmp_path / "full", *flags)
    with pytest.raises(td.Preempted, match="at step 3/4"):
        _train(tmp_path / "cut", *flags, extension=_CutAt(2))
    _train(tmp_path / "cut", *flags, "--resume")
    from safetensors.torch import load_file
    full, cut = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_pool_fill_count_is_kept_on_the_host_and_restored_with_the_state():
    pool = rc.CaptionPool(5, 3)
    pool.push(torch.randn(3, 3), torch.arange(3))
    pool.push(torch.randn(4, 3), torch.arange(3, 7))
    assert pool.filled() == 5 == int((pool.ids >= 0).sum())
    fresh = rc.CaptionPool(5, 3)
    fresh.load_state_dict(rc.CaptionPool(5, 3).state_dict())
    assert fresh.filled() == 0
    half = rc.CaptionPool(5, 3)
    half.push(torch.randn(2, 3), torch.arange(2))
    fresh.load_state_dict(half.state_dict())
    assert fresh.filled() == 2


def test_the_pass_rule_reads_the_collated_host_int_not_the_device_epoch_tensor():
    """batch["epoch"] is on the accelerator under Accelerate; reading it would sync every step. A meta tensor
    (which cannot be read) stands in for it; the collated first_epoch decides the pass."""
    model = md.build_model("tiny-vit", context_length=16)
    ext = rc.RoCLIP(break_epoch=2, pool_size=4)
    ext.setup(type("A", (), {"device": torch.device("cpu"), "num_processes": 1,
                             "register_for_checkpointing": lambda self, *o: None})(), model, None, range(100))
    ext.pool.push(torch.randn(4, model.config.embed_dim), torch.arange(4))
    items = [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "text": "a", "text_aug": "a", "index": i,
              "epoch": e, "poisoned": False} for i, e in ((7, 1), (8, 2))]
    batch = dd.collate_pairs(items, 16)
    assert batch["first_epoch"] == 1 and batch["epoch"].tolist() == [1, 2]
    for first, roclip in ((1, True), (0, False), (2, False)):
        batch = dict(batch, epoch=torch.empty(2, dtype=torch.long, device="meta"), first_epoch=first)
        inputs = ext.make_inputs(batch, 2, torch.Generator(), lambda b, n, g: {})
        assert ext.roclip_step is roclip and (inputs.get("weights") is ext.off) is roclip
