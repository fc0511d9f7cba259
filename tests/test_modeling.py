"""Tests for modeling_declip.py: shapes, sizes, loss terms against independent computations,
the memory bank, feature taps, data-parallel equivalence and every checkpoint format."""

import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import modeling_declip as md
from modeling_declip import (EOT_ID, MASK_ID, SOT_ID, CheckpointError, LossWeights, build_model,
                             count_parameters, info_nce, load_model, save_model)


def _tokens(b, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, n - 1, (b,), generator=g)
    tok = torch.zeros(b, n, dtype=torch.long)
    for i, l in enumerate(lengths):
        tok[i, 0] = SOT_ID
        tok[i, 1:l] = torch.randint(1, 49406, (int(l) - 1,), generator=g)
        tok[i, l] = EOT_ID
    return tok


def _small_rn(**kw):
    cfg = dict(vision="resnet", vision_layers=(1, 1, 1, 1), vision_width=16, vision_heads=8, image_size=64,
               embed_dim=32, context_length=16, text_width=64, text_layers=2, text_heads=1, nn_size=64)
    cfg.update(kw)
    return build_model(cfg)


# ---------------------------------------------------------------- shapes and sizes

@pytest.mark.parametrize("preset,sizes", [("tiny", (32, 64, 96)), ("tiny-vit", (32, 48))])
def test_encoders_give_embed_dim_at_several_resolutions(preset, sizes):
    model = build_model(preset).eval()
    for s in sizes:
        assert model.encode_image(torch.randn(2, 3, s, s)).shape == (2, 256)
    assert model.encode_text(_tokens(3, 20)).shape == (3, 256)


def test_attention_pool_interpolates_instead_of_falling_back():
    model = _small_rn().eval()
    pos = model.visual.attnpool.positional_embedding
    assert pos.shape[0] == 2 * 2 + 1  # 64 px -> 2x2 grid
    # at 128 px the grid is 4x4: the embedding is interpolated, and there is no `fc` head at all
    assert model.encode_image(torch.randn(2, 3, 128, 128)).shape == (2, 32)
    assert not any(k.startswith("visual.fc") for k in model.state_dict())
    # at the native grid, interpolation is the identity
    assert torch.equal(md.resize_pos_embed(pos, 2), pos)


def test_rn50_parameter_counts_match_the_spec():
    counts = count_parameters(build_model("rn50"))
    assert counts["visual"] == 38_316_896  # spec §3.2, visual without the dead fc head
    assert counts["text"] == 63_691_776
    assert counts["heads"] == 29_552_897
    assert counts["logit_scale"] == 1


def test_text_pooling_reads_the_end_token_and_is_causal():
    model = _small_rn().eval()
    tok = _tokens(2, 16)
    emb = model.encode_text(tok)
    tok2 = tok.clone()
    eot = tok2.argmax(1)
    tok2[0, eot[0] + 1:] = 7  # tokens after EOT (padding) cannot change the causal EOT feature
    assert torch.allclose(model.encode_text(tok2)[0], emb[0], atol=1e-6)


# ---------------------------------------------------------------- loss terms

def test_info_nce_matches_a_loop_over_rows():
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    y = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    s = torch.tensor(20.0)
    rows = []
    for i in range(5):
        li = s * (x[i] @ y.t())
        rows.append(-li[i] + torch.logsumexp(li, 0))
    cols = []
    for i in range(5):
        li = s * (y[i] @ x.t())
        cols.append(-li[i] + torch.logsumexp(li, 0))
    expect = 0.5 * (torch.stack(rows).mean() + torch.stack(cols).mean())
    assert torch.allclose(info_nce(x, y, s), expect, atol=1e-5)


def test_false_negative_mask_removes_exactly_the_duplicate_columns():
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    y = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    ids = torch.tensor([0, 1, 0, 2])  # rows 0 and 2 are the same sample
    s = torch.tensor(10.0)
    got = info_nce(x, y, s, ids, symmetric=False)
    logits = s * x @ y.t()
    logits[0, 2] = logits[2, 0] = float("-inf")
    assert torch.allclose(got, F.cross_entropy(logits, torch.arange(4)), atol=1e-6)


def test_declip_loss_terms_equal_independent_formulas():
    torch.manual_seed(0)
    model = _small_rn(nn_size=16).train()
    b = 6
    im1, im2 = torch.randn(b, 3, 64, 64), torch.randn(b, 3, 64, 64)
    tok, tok_aug = _tokens(b, 16, 1), _tokens(b, 16, 2)
    labels = torch.full_like(tok, -100)
    labels[:, 1] = tok[:, 1]
    masked = tok.clone()
    masked[:, 1] = MASK_ID
    bank_before = model.nn_bank.bank.clone()
    out = model(im1, masked, im2, tok_aug, labels)

    # recompute every term by hand with the same (train-mode) modules
    f1, f2 = model.visual(im1), model.visual(im2)
    t, words = model.text(masked, return_words=True)
    ta = model.text(tok_aug)
    n = lambda v: v / v.norm(dim=1, keepdim=True)
    s = min(math.exp(model.logit_scale.item()), 100.0)
    sym = lambda a, c: 0.5 * (F.cross_entropy(s * a @ c.t(), torch.arange(b)) +
                              F.cross_entropy(s * c @ a.t(), torch.arange(b)))
    clip = (sym(n(f1), n(t)) + sym(n(f2), n(t)) + sym(n(f1), n(ta)) + sym(n(f2), n(ta))) / 4
    z1, z2 = model.projector(f1), model.projector(f2)
    p1, p2 = model.predictor(z1), model.predictor(z2)
    ss = -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
    mlm = F.cross_entropy(model.text_label_predictor(words[:, 1]), tok[:, 1])
    nn_of = lambda q: bank_before[(n(q) @ bank_before.t()).argmax(1)]
    nn_t, nn_a = nn_of(t), nn_of(ta)
    nn_term = sum(0.5 * (F.cross_entropy(s * n(f) @ nn_t.t(), torch.arange(b)) +
                         F.cross_entropy(s * n(f) @ nn_a.t(), torch.arange(b))) for f in (f1, f2)) / 2
    for name, ref in [("clip", clip), ("ss", ss), ("mlm", mlm), ("nn", nn_term)]:
        assert torch.allclose(out[name], ref, atol=1e-4), name
    total = 0.4 * clip + 0.2 * ss + 0.2 * mlm + 0.2 * nn_term
    assert torch.allclose(out["loss"], total, atol=1e-4)
    # the bank now holds this batch: EDA view first, then the MLM view (spec §1.6)
    assert torch.allclose(model.nn_bank.bank[:b], n(ta).detach(), atol=1e-5)
    assert torch.allclose(model.nn_bank.bank[b:2 * b], n(t).detach(), atol=1e-5)
    assert int(model.nn_bank.ptr) == 2 * b


def test_batch_without_masked_tokens_gives_finite_loss_and_gradients():
    model = _small_rn().train()
    tok = _tokens(4, 16)
    out = model(torch.randn(4, 3, 64, 64), tok, torch.randn(4, 3, 64, 64), tok, torch.full_like(tok, -100))
    assert torch.isfinite(out["loss"]) and out["mlm"].item() == 0.0
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_clip_mode_is_one_symmetric_infonce():
    model = _small_rn().train()
    im, tok = torch.randn(4, 3, 64, 64), _tokens(4, 16)
    out = model(im, tok, weights=LossWeights.clip_only())
    assert set(out) == {"clip", "loss", "logit_scale"}
    n = lambda v: F.normalize(v, dim=1)
    ref = info_nce(n(model.visual(im)), n(model.text(tok)), md.clamp_scale(model.logit_scale).squeeze())
    assert torch.allclose(out["loss"], ref, atol=1e-5)


def test_logit_scale_clamp_is_straight_through():
    p = torch.nn.Parameter(torch.tensor([math.log(200.0)]))
    s = md.clamp_scale(p)
    assert torch.allclose(s, torch.tensor([100.0]))
    s.sum().backward()
    assert torch.allclose(p.grad, torch.tensor([200.0]), rtol=1e-4)  # d exp(p)/dp, unclamped


def test_memory_bank_is_a_fifo_ring_and_answers_top1_cosine():
    bank = md.NNMemoryBank(4, 3)
    rows = F.normalize(torch.randn(6, 3), dim=1)
    bank.enqueue(rows[:3])
    bank.enqueue(rows[3:])  # wraps: slots 3, 0, 1 get rows 3, 4, 5
    assert torch.allclose(bank.bank[0], rows[4]) and torch.allclose(bank.bank[2], rows[2])
    assert int(bank.ptr) == 2
    got = bank.query(rows[5:6] * 3.0)
    assert torch.allclose(got, rows[5:6], atol=1e-6)
    state = bank.bank_state()
    other = md.NNMemoryBank(4, 3, seed=9)
    other.load_bank_state(state)
    assert torch.equal(other.bank, bank.bank) and int(other.ptr) == 2


# ---------------------------------------------------------------- feature taps

def test_taps_record_each_stage_with_gradients_and_leave_state_dict_alone():
    model = _small_rn().train()
    keys = set(model.state_dict())
    with model.tap(model.default_tap_names()) as feats:
        model.encode_image(torch.randn(2, 3, 64, 64))
        model.encode_image(torch.randn(2, 3, 64, 64))
    assert [f[0].shape[1] for f in feats.values()] == [64, 128, 256, 512]
    assert all(len(v) == 2 for v in feats.values())
    feats["visual.layer2"][0].pow(2).mean().backward()
    assert model.visual.layer1[0].conv1.weight.grad is not None
    assert set(model.state_dict()) == keys
    model.encode_image(torch.randn(1, 3, 64, 64))  # hooks removed: nothing more is recorded
    assert len(feats["visual.layer1"]) == 2


def test_vit_taps_default_to_every_block():
    model = build_model("tiny-vit")
    assert model.default_tap_names() == [f"visual.transformer.resblocks.{i}" for i in range(4)]


# ---------------------------------------------------------------- checkpoints

def test_our_safetensors_round_trip_with_metadata(tmp_path):
    model = _small_rn()
    path = str(tmp_path / "m.safetensors")
    save_model(model, path, metadata={"parent": "x", "poison": {"rate": 0.01}})
    loaded, info = load_model(path, return_info=True)
    assert info["format"] == "ours" and info["metadata"]["poison"]["rate"] == 0.01
    assert loaded.config == model.config and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path))


def test_official_declip_pth_tar_loads_with_prefix_fc_and_feature_buffers(tmp_path):
    model = _small_rn().eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # optional in the official file
        sd["module." + ("encode_text." + k[5:] if k.startswith("text.") else k)] = v
    sd["module.visual.fc.weight"] = torch.randn(32, 512)
    sd["module.visual.fc.bias"] = torch.randn(32)
    sd["module.visual.img_1_feat_1"] = torch.randn(2, 64, 16, 16)
    path = str(tmp_path / "declip.pth.tar")
    torch.save({"model": sd, "optimizer": {}, "last_iter": 128000}, path)
    loaded, info = load_model(path, return_info=True)
    assert info["format"] == "declip" and info["fresh"] == []
    assert info["dropped"] == ["visual.fc.weight", "visual.fc.bias"]
    assert loaded.config.image_mean == md.IMAGENET_MEAN
    im, tok = torch.randn(2, 3, 64, 64), _tokens(2, 16)
    assert torch.allclose(loaded.encode_image(im), model.encode_image(im), atol=1e-5)
    assert torch.allclose(loaded.encode_text(tok), model.encode_text(tok), atol=1e-5)


def _open_clip_model(vision):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    if vision == "resnet":
        vcfg = CLIPVisionCfg(layers=(1, 2, 1, 1), width=16, image_size=64)
    else:
        vcfg = CLIPVisionCfg(layers=2, width=128, patch_size=8, image_size=32)
    tcfg = CLIPTextCfg(context_length=20, vocab_size=49408, width=64, heads=1, layers=2)
    model = CLIP(embed_dim=32, vision_cfg=vcfg, text_cfg=tcfg, quick_gelu=True).eval()
    with torch.no_grad():  # open_clip zero-inits some tensors; randomise everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, vcfg.image_size


def _openai_tokens(b, n):
    tok = _tokens(b, n)
    tok[tok == SOT_ID] = md.OPENAI_SOT_ID
    tok[tok == EOT_ID] = md.OPENAI_EOT_ID
    return tok


@pytest.mark.parametrize("vision", ["resnet", "vit"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_state_dict_converts_to_identical_embeddings(tmp_path, vision, suffix):
    ref, size = _open_clip_model(vision)
    path = str(tmp_path / ("oc" + suffix))
    sd = {k: v for k, v in ref.state_dict().items()}
    if suffix == ".pt":
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    model, info = load_model(path, return_info=True)
    assert info["fresh"] == ["predictor", "projector", "text_label_predictor"]
    assert model.config.vision == vision and model.config.image_mean == md.CLIP_MEAN
    im = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert (model.encode_image(im) - ref.encode_image(im)).abs().max() <= 1e-4
        ours, theirs = _tokens(3, 20), _openai_tokens(3, 20)
        assert (model.encode_text(ours) - ref.encode_text(theirs)).abs().max() <= 1e-4


def test_openai_torchscript_archive_loads(tmp_path):
    ref, size = _open_clip_model("resnet")

    class Holder(torch.nn.Module):  # a scripted module carrying the OpenAI state dict layout
        def __init__(self, m):
            super().__init__()
            for name, child in m.named_children():
                self.add_module(name, child)
            self.positional_embedding = m.positional_embedding
            self.text_projection = m.text_projection
            self.logit_scale = m.logit_scale

        def forward(self, x):
            return x

    scripted = torch.jit.trace(Holder(ref), torch.zeros(1))
    path = str(tmp_path / "RN.pt")
    scripted.save(path)
    model, info = load_model(path, return_info=True)
    assert info["format"] == "openai"
    im = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert (model.encode_image(im) - ref.encode_image(im)).abs().max() <= 1e-4
        assert (model.encode_text(_tokens(2, 20)) - ref.encode_text(_openai_tokens(2, 20))).abs().max() <= 1e-4


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_model(path)


def test_unknown_format_and_wrong_preset_are_refused(tmp_path):
    path = str(tmp_path / "x.pt")
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_model(path)
    good = str(tmp_path / "tiny.safetensors")
    save_model(build_model("tiny"), good)
    with pytest.raises(CheckpointError, match="does not match preset 'rn50'"):
        load_model(good, preset="rn50")


def test_param_groups_decay_only_matrices():
    model = _small_rn()
    decay, no_decay = md.param_groups(model, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert any(p is model.logit_scale for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flop_estimate_matches_hand_counts():
    cfg = md.get_config("tiny")
    clip = md.estimate_flops(cfg, "clip", training=False)
    # text tower by hand: per layer qkv 6nw^2 + scores/values 4n^2w + out 2nw^2 + MLP 16nw^2,
    # plus the projection of the pooled token
    w, n, layers = cfg.text_width, cfg.context_length, cfg.text_layers
    assert clip["text"] == layers * (24 * n * w * w + 4 * n * n * w) + 2 * w * cfg.embed_dim
    # image stem by hand: three 3x3 convs at half resolution
    h = cfg.image_size // 2
    c = cfg.vision_width
    stem = 2 * h * h * 9 * (3 * c // 2 + (c // 2) ** 2 + (c // 2) * c)
    assert clip["image"] > stem
    declip = md.estimate_flops(cfg, "declip", training=True)
    assert declip["image"] == 6 * clip["image"] and declip["text"] == 6 * clip["text"]
    assert declip["total"] == declip["image"] + declip["text"] + declip["heads"]


def test_mlm_positions_given_by_the_caller_give_the_same_loss_and_gradients():
    """The training loop finds the masked positions on the host and passes them (no GPU sync);
    the result must equal the positions found from the labels."""
    import data_declip as dd

    torch.manual_seed(0)
    model = _small_rn().train()
    tok = _tokens(6, 16)
    masked, labels = dd.mask_tokens(tok, torch.Generator().manual_seed(3), 0.3)
    assert (labels != -100).sum() > 0
    images, images2 = torch.randn(6, 3, 64, 64), torch.randn(6, 3, 64, 64)
    runs = []
    for index in (None, (labels.flatten() != -100).nonzero()[:, 0]):
        model.zero_grad()
        bank = model.nn_bank.bank_state()
        out = model(images, masked, images2, tok, labels, mlm_index=index)
        out["loss"].backward()
        model.nn_bank.load_bank_state(bank)
        runs.append((out["mlm"].detach(), model.text_label_predictor.weight.grad.clone()))
    assert runs[0][0] > 0 and torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
