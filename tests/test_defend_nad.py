"""defend_nad.py: attention maps and the NAD term by hand, the frozen teacher, and an end-to-end run
on a tiny poisoned victim (a few steps on Fashion-MNIST)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import data_declip as dd
import defend_nad as nad
import modeling_declip as md
import train_declip as td
from data_declip import UserError, run_main


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = ["--batch-size", "32", "--holdout", "100", "--templates", "1", "--precision", "no", "--cpu",
         "--log-every", "1", "--save-every", "0"]


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    """A tiny DeCLIP trained 2 steps on Fashion-MNIST with 5% of the pairs poisoned."""
    out = tmp_path_factory.mktemp("victim")
    args = td.parse_args(td.build_parser(), SMALL + ["--max-steps", "2", "--poison-rate", "0.05", "--no-eval",
                                                     "--out-dir", str(out)])
    td.train(args)
    return out


def defense_args(victim, out, *extra):
    return td.parse_args(nad.build_parser(), SMALL + ["--ckpt", str(victim), "--clean-fraction", "0.01",
                                                      "--no-eval", "--out-dir", str(out), *extra])


# ----------------------------------------------------------------------------------------------
# Attention maps and the loss


def test_attention_map_equals_hand_computation_for_resnet_and_vit_features():
    f = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[2.0, 0.0], [-1.0, 1.0]]]])  # (1, 2, 2, 2)
    a = torch.tensor([1.0 + 4, 4 + 0, 0 + 1, 9 + 1])  # sum_c F^2 per position
    want = a / (a.norm() + 1e-6)
    assert torch.allclose(nad.attention_map(f), want[None])
    # p = 1: sum of absolute values
    a1 = torch.tensor([3.0, 2.0, 1.0, 4.0])
    assert torch.allclose(nad.attention_map(f, p=1), (a1 / (a1.norm() + 1e-6))[None])
    # ViT (B, N, C): the class token (row 0) is dropped, the tokens are the positions
    tokens = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [0.0, 2.0]]])
    v = torch.tensor([5.0, 4.0])
    assert torch.allclose(nad.attention_map(tokens), (v / (v.norm() + 1e-6))[None])
    assert nad.attention_map(f).dtype == torch.float32 and nad.attention_map(f.bfloat16()).dtype == torch.float32


def test_attention_maps_have_unit_norm_per_sample_and_loss_is_zero_for_identical_features():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 8, 4, 4, generator=g)
    a = nad.attention_map(f)
    assert a.shape == (3, 16)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(nad.at_loss(f, f.clone())) == 0.0
    # scaling the features does not change the normalised map
    assert float(nad.at_loss(f, 5 * f)) < 1e-12


def test_at_loss_is_mse_over_batch_and_positions():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    ms, mt = [], []
    for x, out in ((s, ms), (t, mt)):
        for b in range(2):
            a = (x[b] ** 2).sum(0).flatten()
            out.append(a / (a.norm() + 1e-6))
    want = sum(((ms[b] - mt[b]) ** 2).sum() for b in range(2)) / 8
    assert torch.allclose(nad.at_loss(s, t), want)


def test_nad_loss_sums_betas_times_views():
    g = torch.Generator().manual_seed(2)
    feats = lambda *shape: [torch.randn(*shape, generator=g) for _ in range(2)]  # two views
    student = {"l1": feats(2, 4, 4, 4), "l2": feats(2, 8, 2, 2)}
    teacher = {"l1": feats(2, 4, 4, 4), "l2": feats(2, 8, 2, 2)}
    betas = {"l1": 500.0, "l2": 1000.0}
    want = sum(b * sum(nad.at_loss(s, t) for s, t in zip(student[n], teacher[n])) for n, b in betas.items())
    assert torch.allclose(nad.nad_loss(student, teacher, betas), want)
    assert float(nad.nad_loss(student, student, betas)) == 0.0


def test_betas_defaults_original_broadcast_and_errors():
    layers = [f"visual.layer{i}" for i in range(1, 5)]
    assert list(nad.resolve_betas(layers, None).values()) == [500.0, 1000.0, 1000.0, 1000.0]
    assert list(nad.resolve_betas(layers, None, original=True).values()) == [4.0] * 4
    assert list(nad.resolve_betas(layers, [7.0]).values()) == [7.0] * 4
    assert nad.resolve_betas(layers, nad.parse_betas("1,2,3,4")) == dict(zip(layers, [1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(UserError, match="--nad-betas"):
        nad.resolve_betas(layers, [1.0, 2.0])
    with pytest.raises(UserError, match="--nad-betas"):
        nad.parse_betas("1,x")
    with pytest.raises(UserError, match="--betas-original"):
        nad.check_args(td.parse_args(nad.build_parser(), ["--nad-betas", "1", "--betas-original"]))


def test_layer_names_resolve_for_resnet_and_vit():
    rn, vit = md.build_model("tiny"), md.build_model("tiny-vit")
    assert nad.resolve_layers(rn, None) == [f"visual.layer{i}" for i in range(1, 5)]
    assert nad.resolve_layers(rn, ["layer2,layer4"]) == ["visual.layer2", "visual.layer4"]
    assert nad.resolve_layers(vit, ["1", "3"]) == ["visual.transformer.resblocks.1", "visual.transformer.resblocks.3"]
    with pytest.raises(UserError, match="--nad-layers"):
        nad.resolve_layers(rn, ["layer9"])


# ----------------------------------------------------------------------------------------------
# The extension inside a forward pass


class _Acc:
    device = torch.device("cpu")


def _inputs(model, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = model.config.image_size
    tokens = dd.tokenize([f"a photo of a {c}" for c in dd.FASHION_MNIST_CLASSES[:b]], model.config.context_length)
    masked, labels = dd.mask_tokens(tokens, g)
    return dict(images=torch.randn(b, 3, s, s, generator=g), images2=torch.randn(b, 3, s, s, generator=g),
                tokens=masked, tokens_aug=tokens, mlm_labels=labels, weights=md.LossWeights())


@pytest.mark.parametrize("preset", ["tiny", "tiny-vit"])
def test_extension_term_is_the_nad_loss_of_student_and_teacher_taps(tmp_path, preset):
    torch.manual_seed(0)
    student, other = md.build_model(preset), md.build_model(preset)
    path = str(tmp_path / "teacher.safetensors")
    md.save_model(other, path)
    ext = nad.NADExtension(path)
    ext.setup(_Acc(), student, td.parse_args(nad.build_parser(), []), None)
    assert ext.tap_names(student) == student.default_tap_names()
    inputs = _inputs(student)
    student.train()
    with student.tap(ext.tap_names(student)) as taps:
        out = student(**inputs)
        term = ext.extra_loss(student, inputs, taps)["nad"]
    assert all(len(v) == 2 for v in taps.values())  # one activation per image view
    teacher = md.load_model(path).eval()
    with torch.no_grad(), teacher.tap(ext.tap_names(student)) as tt:
        teacher.encode_image(inputs["images"])
        teacher.encode_image(inputs["images2"])
    assert torch.allclose(term, nad.nad_loss(taps, tt, ext.betas), rtol=1e-5)
    assert float(term.detach()) > 0
    term.add(out["loss"]).backward()  # the gradient reaches the student only
    assert all(p.grad is None for p in ext.teacher.parameters())
    assert student.visual.conv1.weight.grad is not None


def test_extension_term_is_zero_when_the_teacher_is_the_student_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    student = md.build_model("tiny").eval()
    path = str(tmp_path / "same.safetensors")
    md.save_model(student, path)
    ext = nad.NADExtension(path)
    ext.setup(_Acc(), student, td.parse_args(nad.build_parser(), []), None)
    inputs = _inputs(student)
    with student.tap(ext.tap_names(student)) as taps:
        student(**inputs)
        assert float(ext.extra_loss(student, inputs, taps)["nad"].detach()) == 0.0


def test_betas_original_gives_four_per_layer_and_scales_the_term(tmp_path):
    torch.manual_seed(0)
    student, other = md.build_model("tiny"), md.build_model("tiny")
    path = str(tmp_path / "t.safetensors")
    md.save_model(other, path)
    terms = {}
    for key, kw in (("orig", dict(betas_original=True)), ("one", dict(betas=[1.0]))):
        ext = nad.NADExtension(path, **kw)
        ext.setup(_Acc(), student, td.parse_args(nad.build_parser(), []), None)
        inputs = _inputs(student)
        with torch.no_grad(), student.tap(ext.tap_names(student)) as taps:
            student(**inputs)
            terms[key] = ext.extra_loss(student, inputs, taps)["nad"]
    assert list(nad.resolve_betas(["a", "b"], None, original=True).values()) == [4.0, 4.0]
    assert torch.allclose(terms["orig"], 4 * terms["one"])


# ----------------------------------------------------------------------------------------------
# End to end


def test_nad_run_writes_its_run_directory_with_a_frozen_inline_teacher(victim, tmp_path):
    out = tmp_path / "nad"
    args = defense_args(victim, out, "--max-steps", "2", "--teacher-steps", "1")
    nad.check_args(args)
    teacher_path = nad.prepare_teacher(args)
    assert teacher_path == str(out / "teacher" / "model.safetensors") and os.path.isfile(teacher_path)
    assert json.load(open(out / "teacher" / "config.json"))["resolved"]["total_steps"] == 1
    ext = nad.NADExtension(teacher_path)
    td.run_defense(args, ext)

    for name in ("config.json", "metrics.jsonl", "model.safetensors"):
        assert (out / name).is_file()
    assert not (out / "eval.json").exists() and not (out / "teacher" / "eval.json").exists()  # --no-eval
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["nad"] > 0 for r in steps)
    cfg = json.load(open(out / "config.json"))
    assert cfg["resolved"]["defense"] == "nad"
    assert cfg["resolved"]["defense_settings"]["betas"] == {f"visual.layer{i}": b for i, b in zip(range(1, 5), (500, 1000, 1000, 1000))}

    # the teacher never changed: frozen, eval mode, the weights of its file
    assert not ext.teacher.training and not any(p.requires_grad for p in ext.teacher.parameters())
    saved = load_file(teacher_path)
    now = ext.teacher.state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())
    # ... while the student did
    student, start = load_file(str(out / "model.safetensors")), load_file(str(victim / "model.safetensors"))
    assert not torch.equal(student["visual.conv1.weight"], start["visual.conv1.weight"])

    # the clean subset never contains a poisoned index of the victim
    poisoned = set(json.load(open(victim / "poison_manifest.json"))["indices"])
    subset = cfg["clean_subset"]["indices"]
    assert len(poisoned) == round(0.05 * (60000 - 100)) and len(subset) == round(0.01 * (60000 - 100))
    assert not poisoned & set(subset)


def test_cli_reuses_a_given_teacher_and_rejects_a_missing_one(victim, tmp_path, capsys):
    out = tmp_path / "nad2"
    with pytest.raises(UserError, match="--teacher"):
        nad.main(SMALL + ["--ckpt", str(victim), "--teacher", str(tmp_path / "nope"), "--out-dir", str(out)])
    summary = nad.main(SMALL + ["--ckpt", str(victim), "--teacher", str(victim), "--clean-fraction", "0.01",
                                "--max-steps", "1", "--betas-original", "--out-dir", str(out)])
    assert summary["steps"] == 1 and summary["after"]["clean"]["n"] == 100
    assert not (out / "teacher").exists()
    cfg = json.load(open(out / "config.json"))
    assert set(cfg["resolved"]["defense_settings"]["betas"].values()) == {4.0}
    assert "nad" in json.loads(open(out / "metrics.jsonl").readline())


def test_user_errors_exit_2_with_one_line_before_any_work(victim, tmp_path, capsys):
    out = tmp_path / "bad"
    for flags, match in ((["--teacher", str(victim), "--teacher-steps", "3"], "--teacher-steps"),
                         (["--nad-layers", "layer1", "layer2", "--nad-betas", "1,2,3"], "--nad-betas"),
                         (["--nad-power", "0"], "--nad-power")):
        assert run_main(nad.main, ["--ckpt", str(victim), "--out-dir", str(out), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and match in err and "\n" not in err
    assert not (out / "teacher").exists()
