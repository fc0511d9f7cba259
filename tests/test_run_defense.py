"""What every defense shares (train_declip.run_defense): the before/after evaluation
is eval_zeroshot.py's, number for number, on non-square photos; it runs through the accelerator (each
process its share); --no-eval and --trigger mean what they say; every flag is checked before the first
evaluation; the victim's data flags come from its config.json unless given."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

import data_declip as dd
import defend_finetune as dft
import eval_zeroshot as ez
import modeling_declip as md
import poison_data as pdata
import train_declip as td
from data_declip import UserError, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.skipif(not os.path.isdir(dd.fashion_mnist_dir()), reason="Fashion-MNIST not installed"),
              pytest.mark.usefixtures("one_thread")]

CLASSES = ("bag", "coat", "sandal")  # 'bag': the default target on Fashion-MNIST, so the victim's
SMALL = ["--templates", "1", "--cpu", "--log-every", "1", "--save-every", "0"]




@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An ImageFolder of 12 non-square PNGs (landscape and portrait, 3 classes): the centre crop matters."""
    root = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i in range(4):
            h, w = (30, 53) if i % 2 else (47, 29)
            x = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
            x[: h // 3] = 40 + 80 * c  # a band across the top that the crop cuts into
            Image.fromarray(x.numpy()).save(root / name / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def victim(tmp_path_factory, photos):
    """A tiny DeCLIP trained 2 steps on Fashion-MNIST with 5 % poisoned pairs, its --eval-data the photos."""
    out = tmp_path_factory.mktemp("victim")
    td.train(td.parse_args(td.build_parser(), SMALL + [
        "--batch-size", "32", "--max-steps", "2", "--poison-rate", "0.05", "--precision", "no", "--no-eval",
        "--eval-data", photos, "--out-dir", str(out)]))
    return out


def defense_argv(victim, out, *extra):
    return SMALL + ["--ckpt", str(victim), "--clean-fraction", "0.001", "--batch-size", "16", "--max-steps", "1",
                    "--out-dir", str(out), *extra]


@pytest.fixture
def eval_mode_inputs(monkeypatch):
    """Every image batch the towers see in eval mode (i.e. during evaluation): (input, autocast on?)."""
    seen = []
    encode = md.DeCLIP.encode_image

    def spy(self, x, *a, **kw):
        if not self.training:
            seen.append((x.detach().clone(), torch.is_autocast_enabled(x.device.type)))
        return encode(self, x, *a, **kw)

    monkeypatch.setattr(md.DeCLIP, "encode_image", spy)
    return seen


def test_defense_after_equals_eval_zeroshot_json_on_non_square_photos(victim, photos, tmp_path, eval_mode_inputs):
    out = tmp_path / "ft"
    shutil.rmtree(victim / ez.EVAL_CACHE_DIR, ignore_errors=True)  # the victim's "before" is evaluated here
    # bf16 training: the evaluation stays fp32 (the precision rule), as eval_zeroshot.py's default
    summary = dft.main(defense_argv(victim, out, "--precision", "bf16"))
    defense_inputs = list(eval_mode_inputs)
    result = json.load(open(out / "eval.json"))
    assert summary["after"] == result["after"]
    assert result["after"]["clean"]["n"] == 12  # the victim's --eval-data, from its config.json
    cfg = json.load(open(out / "config.json"))
    assert cfg["from_victim_config"]["eval_data"] == photos and cfg["eval_data"] == photos

    ez_argv = ["--ckpt", str(out), "--data", photos, "--templates", "1", "--manifest",
               str(victim / "poison_manifest.json"), "--json", str(tmp_path / "m.json"), "--cpu"]
    del eval_mode_inputs[:]
    assert run_main(ez.main, ez_argv) == 0  # the defense's evaluation, cached beside its weights: read
    assert eval_mode_inputs == [] and len(list((out / ez.EVAL_CACHE_DIR).iterdir())) == 1
    assert json.load(open(tmp_path / "m.json"))["backdoor"] == result["after"]["backdoor"]
    shutil.rmtree(out / ez.EVAL_CACHE_DIR)
    assert run_main(ez.main, ez_argv) == 0  # evaluated anew
    m = json.load(open(tmp_path / "m.json"))
    assert m["clean"] == result["after"]["clean"] and m["backdoor"] == result["after"]["backdoor"]
    assert m["backdoor"]["target"] == "bag" and m["backdoor"]["trigger"] == "patch"
    # the same tensors into the same towers: before (victim) and after (defended) saw eval_zeroshot's inputs
    assert len(defense_inputs) == 4 and len(eval_mode_inputs) == 2  # clean + triggered batch per evaluation
    for (x, amp), (y, amp_ez) in zip(defense_inputs[:2] + defense_inputs[2:], eval_mode_inputs * 2):
        assert x.shape == (12, 3, 32, 32) and torch.equal(x, y) and not amp and not amp_ez
    # and those are spec 7's, by torchvision on the PIL image: shorter side to 32 / 0.875 = 37 px (bilinear),
    # centre crop 37, centre crop 32, normalise (a 30 x 53 photo: no rounding differences in the offsets)
    import torchvision.transforms.v2.functional as TF

    mc = md.load_model(str(out / "model.safetensors")).config
    pil = Image.open(os.path.join(photos, "bag", "1.png")).convert("RGB")
    ref = TF.center_crop(TF.pil_to_tensor(TF.center_crop(TF.resize(pil, 37), 37)), 32).float() / 255.0
    ref = TF.normalize(ref, list(mc.image_mean), list(mc.image_std))
    torch.testing.assert_close(eval_mode_inputs[0][0][1], ref, atol=1e-5, rtol=0)


def test_no_eval_runs_neither_evaluation_and_writes_no_numbers(victim, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ez, "evaluate", lambda *a, **kw: calls.append(1) or {})
    out = tmp_path / "ft"
    summary = dft.main(defense_argv(victim, out, "--precision", "no", "--no-eval"))
    assert calls == [] and summary["before"] is None and summary["after"] is None
    assert not (out / "eval.json").exists() and (out / "model.safetensors").is_file()
    assert json.load(open(out / "summary.json"))["after"] is None


def test_an_explicit_trigger_wins_over_the_manifest_and_the_default_comes_from_it():
    p = dft.build_parser()
    plan = pdata.PoisonPlan(n=10, indices=[1], target="bag", trigger="blended", trigger_params={"alpha": 0.3})

    def resolve(*argv, plan=plan):
        return td._eval_plan(td.parse_args(p, list(argv)), plan)

    assert vars(resolve("--trigger", "patch")) == {"trigger": "patch", "trigger_params": {}, "target": "bag"}
    assert vars(resolve()) == {"trigger": "blended", "trigger_params": {"alpha": 0.3}, "target": "bag"}
    assert resolve("--trigger-param", "alpha=0.5").trigger_params == {"alpha": 0.5}
    assert vars(resolve("--target-class", "coat", plan=None)) == {"trigger": "patch", "trigger_params": {},
                                                                  "target": "coat"}
    assert resolve(plan=None) is None  # no trigger, no target: clean accuracy only
    with pytest.raises(UserError, match="--target-class"):
        resolve("--trigger", "sig", plan=None)


def test_flag_errors_come_before_any_evaluation(victim, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ez, "evaluate", lambda *a, **kw: calls.append(1) or {})
    done = tmp_path / "done"
    done.mkdir()
    (done / "model.safetensors").write_bytes(b"a finished run")
    cases = [(defense_argv(victim, done), "--overwrite"),  # train()'s run-directory check
             (defense_argv(victim, tmp_path / "a", "--batch-size", "4096"), "--batch-size"),
             (defense_argv(victim, tmp_path / "b", "--target-class", "zebra"), "--target-class"),
             (defense_argv(victim, tmp_path / "c", "--trigger", "no-such"), "--trigger"),
             (defense_argv(victim, tmp_path / "d", "--eval-data", str(tmp_path / "nope")), "nope")]
    for argv, match in cases:
        assert run_main(dft.main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and match in err and "\n" not in err, err
        assert calls == [], argv
    assert not (tmp_path / "b" / "model.safetensors").exists()


def test_the_victims_data_flags_fill_only_what_was_not_given(tmp_path):
    run = tmp_path / "victim"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "data": "pairs.jsonl", "data_root": "/imgs", "image_column": "path", "caption_column": None,
        "csv_separator": None, "eval_data": "val/", "eval_data_root": "/val", "holdout": 7, "resolved": {}}))
    p = dft.build_parser()
    args = td.parse_args(p, [])
    taken = td.take_victim_flags(args, str(run))
    assert (args.data, args.data_root, args.image_column, args.eval_data, args.eval_data_root, args.holdout) == \
        ("pairs.jsonl", "/imgs", "path", "val/", "/val", 7)
    assert taken == {"data": "pairs.jsonl", "data_root": "/imgs", "image_column": "path", "eval_data": "val/",
                     "eval_data_root": "/val", "holdout": 7}
    # given flags win, also at the training default (--holdout 0); --data brings no victim format flags
    args = td.parse_args(p, ["--data", "mine.csv", "--holdout", "0", "--eval-data-root", "/other"])
    td.take_victim_flags(args, str(run))
    assert (args.data, args.data_root, args.image_column, args.holdout) == ("mine.csv", None, None, 0)
    assert (args.eval_data, args.eval_data_root) == ("val/", "/other")
    # a directory without our config.json (e.g. a transformers checkpoint's): defaults
    (run / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"], "holdout": 3}))
    args = td.parse_args(p, [])
    assert td.take_victim_flags(args, str(run)) == {} and args.holdout == 0 and args.data is None


TWO_PROC = textwrap.dedent("""
    import json, os, sys
    sys.path[:0] = [{root!r}]
    import torch
    import defend_finetune as dft
    import modeling_declip as md
    torch.set_num_threads(1)
    rows = [0]
    encode = md.DeCLIP.encode_image

    def spy(self, x, *a, **kw):
        if not self.training:
            rows[0] += x.shape[0]
        return encode(self, x, *a, **kw)

    md.DeCLIP.encode_image = spy
    dft.main({argv!r})
    rank = int(os.environ["RANK"])
    with open(os.path.join({out!r}, f"rows{{rank}}.json"), "w") as f:
        json.dump(rows[0], f)
    torch.distributed.barrier()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
""")


@pytest.mark.slow
def test_two_processes_each_evaluate_their_share_and_agree_with_eval_zeroshot(victim, photos, tmp_path):
    out = tmp_path / "ft2"
    shutil.rmtree(victim / ez.EVAL_CACHE_DIR, ignore_errors=True)  # both evaluations run, each process its share
    script = tmp_path / "two.py"
    script.write_text(TWO_PROC.format(root=ROOT, argv=defense_argv(victim, out, "--precision", "no"),
                                      out=str(tmp_path)))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    proc = subprocess.run(launcher + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                      "--main_process_port", str(port), str(script)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(out / "config.json"))["resolved"]["world_size"] == 2
    # 12 photos, clean + triggered, before + after: 48 rows in all, each process half of them
    assert [json.load(open(tmp_path / f"rows{r}.json")) for r in (0, 1)] == [24, 24]
    result = json.load(open(out / "eval.json"))
    assert result["after"]["clean"]["n"] == result["before"]["clean"]["n"] == 12
    shutil.rmtree(out / ez.EVAL_CACHE_DIR)  # eval_zeroshot.py evaluates anew
    assert run_main(ez.main, ["--ckpt", str(out), "--data", photos, "--templates", "1", "--manifest",
                    str(victim / "poison_manifest.json"), "--json", str(tmp_path / "m.json"), "--cpu"]) == 0
    m = json.load(open(tmp_path / "m.json"))
    assert m["clean"] == result["after"]["clean"] and m["backdoor"] == result["after"]["backdoor"]


def test_run_defense_leaves_the_callers_flags_as_they_were(victim, tmp_path):
    """The victim's weights, data and the defense's own no-poison/no-eval settings reach train() through
    a namespace of run_defense's own, never through the caller's."""
    args = td.parse_args(dft.build_parser(), defense_argv(victim, tmp_path / "ft", "--no-eval", "--precision", "no"))
    given = dict(vars(args))
    td.run_defense(args, dft.FineTune())
    assert vars(args) == given
    cfg = json.load(open(tmp_path / "ft" / "config.json"))
    assert cfg["init_from"] == str(victim / "model.safetensors") and cfg["poison_rate"] is None and cfg["no_eval"]


def test_the_victims_evaluation_runs_once_for_all_its_defenses(victim, photos, tmp_path, monkeypatch):
    """Every defense of a victim evaluates the same victim "before": a later defense reads the earlier one's
    result; other templates, a touched test image or other weights evaluate again."""
    shutil.rmtree(victim / ez.EVAL_CACHE_DIR, ignore_errors=True)
    calls = []
    evaluate = td.EvalHook.__call__
    monkeypatch.setattr(td.EvalHook, "__call__",
                        lambda self, model, acc=None: calls.append(1) or evaluate(self, model, acc))
    first = dft.main(defense_argv(victim, tmp_path / "ft", "--precision", "no"))
    assert len(calls) == 2  # before and after
    second = dft.main(defense_argv(victim, tmp_path / "cc", "--precision", "no", "--method", "cleanclip"))
    assert len(calls) == 3 and second["before"] == first["before"]
    dft.main(defense_argv(victim, tmp_path / "t7", "--precision", "no", "--templates", "7"))
    assert len(calls) == 5
    image = os.path.join(photos, "bag", "0.png")
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    third = dft.main(defense_argv(victim, tmp_path / "touched", "--precision", "no"))
    assert len(calls) == 7 and third["before"] == first["before"]  # evaluated again: same numbers
    dft.main(defense_argv(tmp_path / "ft", tmp_path / "of-ft", "--precision", "no"))  # another victim
    assert len(calls) == 9


def test_a_victims_own_evaluation_is_its_defenses_before_and_a_reports_row(photos, tmp_path, monkeypatch):
    """Training evaluates its saved weights file as eval_zeroshot.py does and caches the result beside it: the
    first defense reads it as its "before", and a report over victim and defense evaluates neither again.
    Without the caches eval_zeroshot.py computes the same numbers."""
    vic = tmp_path / "victim"
    td.train(td.parse_args(td.build_parser(), SMALL + [
        "--batch-size", "32", "--max-steps", "2", "--poison-rate", "0.05", "--precision", "no",
        "--eval-data", photos, "--out-dir", str(vic)]))
    trained = json.load(open(vic / "eval.json"))
    assert trained["backdoor"]["target"] == "bag" and trained["clean"]["n"] == 12
    calls = []
    evaluate = ez.evaluate
    monkeypatch.setattr(ez, "evaluate", lambda *a, **kw: calls.append(1) or evaluate(*a, **kw))
    summary = dft.main(defense_argv(vic, tmp_path / "ft", "--precision", "no"))
    assert len(calls) == 1 and summary["before"] == trained  # the "after" alone was computed
    argv = ["--ckpt", str(vic), str(tmp_path / "ft"), "--names", "victim", "ft", "--templates", "1", "--json",
            str(tmp_path / "m.json"), "--cpu"]
    assert run_main(ez.main, argv) == 0 and len(calls) == 1
    cached = json.load(open(tmp_path / "m.json"))
    assert cached["victim"]["backdoor"] == trained["backdoor"] and cached["ft"]["clean"] == summary["after"]["clean"]
    for run in ("victim", "ft"):
        shutil.rmtree(tmp_path / run / ez.EVAL_CACHE_DIR)
    assert run_main(ez.main, argv) == 0 and len(calls) == 3  # both evaluated anew: the same numbers
    fresh = json.load(open(tmp_path / "m.json"))
    for run in ("victim", "ft"):
        assert {k: fresh[run][k] for k in ("clean", "backdoor")} == {k: cached[run][k] for k in ("clean", "backdoor")}
