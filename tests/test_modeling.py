"""Tests for modeling_declip.py: shapes, sizes, loss terms against independent computations,
the memory bank, feature taps, data-parallel equivalence and every checkpoint format."""

import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import data_declip as dd
import modeling_declip as md
from data_declip import run_main
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


def _open_clip_cfg(vision, quick_gelu=True):
    """An open_clip model_cfg (what open_clip_config.json holds) of a tiny CLIP."""
    if vision == "resnet":
        vcfg = dict(layers=[1, 2, 1, 1], width=16, image_size=64)
    else:
        vcfg = dict(layers=2, width=128, patch_size=8, image_size=32)
    tcfg = dict(context_length=20, vocab_size=49408, width=64, heads=1, layers=2)
    return dict(embed_dim=32, vision_cfg=vcfg, text_cfg=tcfg, quick_gelu=quick_gelu)


def _open_clip_model(vision, quick_gelu=True):
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP

    torch.manual_seed(0)
    cfg = _open_clip_cfg(vision, quick_gelu)
    model = CLIP(**cfg).eval()
    with torch.no_grad():  # open_clip zero-inits some tensors; randomise everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, cfg["vision_cfg"]["image_size"]


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


# ---------------------------------------------------------------- activations, transformers, export

def _close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol


def _embeddings_match_open_clip(model, ref, size, tol=1e-4):
    im = torch.randn(3, 3, size, size)
    with torch.no_grad():
        return (_close(model.encode_image(im), ref.encode_image(im), tol) and
                _close(model.encode_text(_tokens(3, 20)), ref.encode_text(_openai_tokens(3, 20)), tol))


@pytest.mark.parametrize("vision", ["resnet", "vit"])
def test_open_clip_gelu_model_loads_with_gelu_from_its_config_or_the_flag(tmp_path, vision, capsys):
    """open_clip's default is exact GELU: its HF-hub layout says so in open_clip_config.json; a bare
    state dict cannot, so the loader says what it assumed and which flag chooses the other."""
    import json
    from safetensors.torch import save_file

    ref, size = _open_clip_model(vision, quick_gelu=False)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(sd, str(hub / "open_clip_model.safetensors"))
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": _open_clip_cfg(vision, False)}))
    model, info = load_model(str(hub), return_info=True)
    assert model.config.act == "gelu" and info["notes"] == []
    assert _embeddings_match_open_clip(model, ref, size)
    assert "note:" not in capsys.readouterr().err

    bare = str(tmp_path / "bare.pt")
    torch.save(sd, bare)
    guessed, info = load_model(bare, return_info=True)
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "assumed QuickGELU" in err and "--activation gelu" in err
    assert info["activation"] == "quick_gelu" and not _embeddings_match_open_clip(guessed, ref, size, 1e-3)
    load_model(bare)
    assert "note:" not in capsys.readouterr().err  # once per file, however often it is loaded
    chosen = load_model(bare, activation="gelu")
    assert _embeddings_match_open_clip(chosen, ref, size)
    with pytest.raises(CheckpointError, match="contradicts"):
        load_model(str(hub), activation="quick_gelu")


def test_activation_is_saved_in_our_metadata_and_old_files_mean_quick_gelu(tmp_path):
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = build_model("tiny-vit", act="gelu")
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    path = str(tmp_path / "m.safetensors")
    save_model(model, path)
    assert load_model(path).config.act == "gelu"
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["config"])
    del cfg["act"]  # a file written before the field existed
    old = str(tmp_path / "old.safetensors")
    save_file(md.load_model(path).state_dict(), old, metadata=dict(meta, config=json.dumps(cfg)))
    assert load_model(old).config.act == "quick_gelu"


def _hf_clip(tmp_path, act, eos=49407):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tower = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, hidden_act=act)
    cfg = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=20, eos_token_id=eos),
        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=48)
    ref = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = tmp_path / f"hf-{act}"
    ref.save_pretrained(str(out))
    return ref, out


def _hf_features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object


def _matches_transformers(model, ref, tol=1e-4):
    im, tok = torch.randn(3, 3, 32, 32), _openai_tokens(3, 20)
    with torch.no_grad():
        return (_close(model.encode_image(im), _hf_features(ref.get_image_features(pixel_values=im)), tol) and
                _close(model.encode_text(_tokens(3, 20)), _hf_features(ref.get_text_features(input_ids=tok)), tol))


@pytest.mark.parametrize("act,eos", [("quick_gelu", 49407), ("gelu", 49407), ("quick_gelu", 2)])
def test_transformers_directory_loads_to_identical_embeddings(tmp_path, act, eos):
    ref, out = _hf_clip(tmp_path, act, eos)
    model, info = load_model(str(out), return_info=True)
    assert info["format"] == "transformers" and model.config.act == act and info["notes"] == []
    assert model.config.text_heads == 2 and model.config.vision_heads == 2
    assert _matches_transformers(model, ref)
    # the weights file alone finds its config.json; the pickle variant of the layout loads too
    assert _matches_transformers(load_model(str(out / "model.safetensors")), ref)
    torch.save(ref.state_dict(), str(out / "pytorch_model.bin"))
    os.remove(out / "model.safetensors")
    assert _matches_transformers(load_model(str(out)), ref)


def _vit_model(act, embed_dim=32):
    torch.manual_seed(1)
    model = build_model(dict(vision="vit", vision_layers=(2,), vision_width=64, vision_heads=2, patch_size=8,
                             image_size=32, embed_dim=embed_dim, context_length=20, text_width=64, text_layers=2,
                             text_heads=2, nn_size=64, act=act)).eval()
    assert model.text.text_projection.bias.abs().max() > 0  # a real bias for the export to carry
    return model


def _same_embeddings(a, b, size=32, tol=1e-4):
    im, tok = torch.randn(3, 3, size, size), _tokens(3, 20)
    with torch.no_grad():
        return _close(a.encode_image(im), b.encode_image(im), tol) and _close(a.encode_text(tok), b.encode_text(tok), tol)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_export_to_transformers_loads_in_transformers_and_round_trips(tmp_path, act):
    transformers = pytest.importorskip("transformers")
    model = _vit_model(act)
    out = tmp_path / "hf"
    md.export_transformers(model, str(out))
    ref = transformers.CLIPModel.from_pretrained(str(out), local_files_only=True).eval()
    assert ref.config.text_config.hidden_act == act
    assert _matches_transformers(model, ref)
    assert _same_embeddings(load_model(str(out)), model)
    assert list(transformers.CLIPImageProcessor.from_pretrained(str(out)).image_mean) == list(model.config.image_mean)


def test_export_to_transformers_refuses_what_clipmodel_cannot_hold(tmp_path):
    with pytest.raises(CheckpointError, match="only has ViT image towers"):
        md.export_transformers(_small_rn(), str(tmp_path / "rn"))
    with pytest.raises(CheckpointError, match="no text projection bias"):
        md.export_transformers(_vit_model("gelu", embed_dim=96), str(tmp_path / "wide"))


@pytest.mark.parametrize("kind", ["resnet", "vit", "vit-wide"])
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_export_to_open_clip_loads_in_open_clip_and_round_trips(tmp_path, kind, act):
    """open_clip's own factory builds the exported directory; a ResNet (embed 32 < text width 64) and
    a ViT fold the text projection bias into the classic layout, a wide ViT needs `proj_bias`."""
    open_clip = pytest.importorskip("open_clip")
    model = _small_rn(act=act, context_length=20).eval() if kind == "resnet" else _vit_model(act, 96 if kind == "vit-wide" else 32)
    size = model.config.image_size
    out = tmp_path / "oc"
    md.export_open_clip(model, str(out))
    ref = open_clip.create_model(f"local-dir:{out}").eval()
    assert isinstance(ref.text_projection, torch.nn.Linear) == (kind == "vit-wide")
    assert _embeddings_match_open_clip(model, ref, size)
    assert _same_embeddings(load_model(str(out)), model, size)


def test_export_cli_writes_a_transformers_directory_and_refuses_a_full_one(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    ckpt = str(tmp_path / "m.safetensors")
    save_model(_vit_model("gelu"), ckpt)
    out = str(tmp_path / "hf")
    md.main(["export", ckpt, "--to", "transformers", out])
    assert isinstance(transformers.CLIPModel.from_pretrained(out, local_files_only=True), transformers.CLIPModel)
    assert run_main(md.main, ["export", ckpt, "--to", "transformers", out]) == 2
    assert "not empty" in capsys.readouterr().err


# ---------------------------------------------------------------- untrusted files

def test_foreign_pickles_are_refused_on_torch_with_weights_only_bypasses(tmp_path, monkeypatch):
    path = str(tmp_path / "oc.pt")
    torch.save(_small_rn().state_dict(), path)
    good = str(tmp_path / "ours.safetensors")
    save_model(_small_rn(), good)
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    with pytest.raises(CheckpointError, match=r"torch 2\.9\.1.*CVE-2025-32434.*torch>=2\.10"):
        load_model(path)
    load_model(good)  # safetensors runs no pickle: still fine


def test_requirements_floor_is_past_the_known_weights_only_bypasses():
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "requirements.txt")) as f:
        floor = re.search(r"^torch>=(\d+)\.(\d+)", f.read(), re.M)
    assert floor and (int(floor.group(1)), int(floor.group(2))) >= md.SAFE_TORCH_LOAD >= (2, 10)


def test_random_bytes_are_not_a_checkpoint_and_zip_pickles_with_code_are_refused(tmp_path):
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(CheckpointError, match="not a checkpoint in any supported format"):
        load_model(str(rnd))
    evil = str(tmp_path / "evil_zip.pt")
    torch.save({"state_dict": _Evil()}, evil)  # torch's own zip format, code in data.pkl
    with pytest.raises(CheckpointError, match=r"arbitrary code.*posix\.system|arbitrary code.*os\.system"):
        load_model(evil)


def test_model_file_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = str(tmp_path / "model.safetensors")
        save_model(_small_rn(), path)
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == os.stat(tmp_path / "plain.txt").st_mode & 0o777 == 0o640


def test_unknown_preset_is_one_line_user_error(capsys):
    import train_declip

    assert run_main(train_declip.main, ["--model", "rn49"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "--model" in err and "rn49" in err and all(p in err for p in md.PRESETS)


def test_foreign_directories_are_accepted_where_run_directories_are(tmp_path):
    import eval_zeroshot

    model = _vit_model("gelu")
    out = tmp_path / "oc"
    md.export_open_clip(model, str(out))
    weights, _ = eval_zeroshot.resolve_ckpt(str(out))  # what every script's --ckpt reads
    assert os.path.basename(weights) == "open_clip_model.safetensors"
    assert _same_embeddings(load_model(weights), model)
    with pytest.raises(CheckpointError, match="directory without a checkpoint"):
        load_model(str(tmp_path))


def test_gradient_checkpointing_gives_the_same_gradients_in_both_towers():
    torch.manual_seed(0)
    model = md.build_model("tiny-vit", context_length=16).train()
    images, tokens = torch.randn(4, 3, 32, 32), dd.tokenize(["a", "b c", "d e f", "g"], 16)
    w = md.LossWeights.clip_only()

    def grads():
        model.zero_grad()
        model.nn_bank.ptr.zero_()
        model(images, tokens, weights=w, update_bank=False)["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.config.grad_checkpointing and model.visual.transformer.grad_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)
