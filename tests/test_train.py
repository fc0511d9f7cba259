"""Tests for train_declip.py: the loop trains, resumes exactly, preempts cleanly, poisons, refuses
bad input, and counts bad samples; small batches on the embedded Fashion-MNIST."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import data_declip as dd
import modeling_declip as md
import train_declip as td

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fmnist = pytest.mark.skipif(not os.path.isdir(dd.fashion_mnist_dir()), reason="Fashion-MNIST not installed")


def _args(out, *extra):
    return td.parse_args(td.build_parser(), ["--out-dir", str(out), "--batch-size", "16", "--log-every", "1",
                                             "--no-eval", "--precision", "no", "--save-every", "0", *extra])


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model.safetensors"))


@needs_fmnist
def test_training_steps_lower_the_loss_and_write_the_run_directory(tmp_path):
    out = tmp_path / "run"
    td.train(_args(out, "--max-steps", "40", "--lr", "2e-3", "--warmup-steps", "2", "--batch-size", "32",
                   "--mode", "clip"))
    rows = [r for r in _metrics(out) if "loss" in r]
    assert len(rows) == 40
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)
    for name in ("config.json", "model.safetensors", "state"):
        assert os.path.exists(out / name)
    cfg = json.load(open(out / "config.json"))
    assert cfg["resolved"]["total_steps"] == 40 and cfg["resolved"]["model_config"]["vision_width"] == 32
    model = md.load_model(str(out / "model.safetensors"))
    assert 3.0 <= model.logit_scale.item() <= 6.0  # the raw parameter is clamped (spec §2.6)


class _SigtermAt(td.Extension):
    """Sends SIGTERM to this process when the loop is about to run step `at` (0-based)."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def extend_batch(self, inputs, batch, generator):
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.calls += 1
        return inputs


@needs_fmnist
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_sigterm_saves_state_and_resume_reproduces_the_uninterrupted_weights(tmp_path, precision):
    flags = ["--max-steps", "6", "--precision", precision, "--poison-rate", "0.05"]
    td.train(_args(tmp_path / "full", *flags))
    with pytest.raises(td.Preempted, match=r"stopped by signal 15 at step 3/6.*--resume"):
        td.train(_args(tmp_path / "cut", *flags), extension=_SigtermAt(2))
    assert os.path.isdir(tmp_path / "cut" / "state") and not os.path.exists(tmp_path / "cut" / "model.safetensors")
    td.train(_args(tmp_path / "cut", *flags, "--resume"))
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    # the logged losses of the resumed steps are the uninterrupted run's
    loss = lambda out: [r["loss"] for r in _metrics(out) if "loss" in r]
    assert loss(tmp_path / "cut")[-3:] == loss(tmp_path / "full")[-3:]


@needs_fmnist
@pytest.mark.parametrize("trigger", [t if t == "patch-random" else pytest.param(t, marks=pytest.mark.slow)
                                     for t in sorted(td.pdata.TRIGGERS)])  # the others draw nothing at random
def test_every_trigger_resumes_bitwise(tmp_path, trigger, patch_png):
    # half the pairs poisoned, so every step's views carry the trigger (patch-random's place is random)
    flags = ["--max-steps", "3", "--batch-size", "8", "--model", "tiny-vit", "--mode", "clip", "--poison-rate", "0.5",
             "--trigger", trigger] + (["--trigger-param", f"path={patch_png}"] if trigger == "optimized" else [])
    td.train(_args(tmp_path / "full", *flags))
    with pytest.raises(td.Preempted, match="at step 2/3"):
        td.train(_args(tmp_path / "cut", *flags), extension=_SigtermAt(1))
    td.train(_args(tmp_path / "cut", *flags, "--resume"))
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


class _RecordTrigger(td.Extension):
    """Views without randomness; records where the loop's trigger puts patch-random on a blank image."""

    def __init__(self):
        self.views = []

    def augment(self, images, generator, trigger=None, poison_mask=None, sizes=None):
        self.views.append(trigger(torch.zeros(1, 3, 32, 32)))
        return dd.eval_transform(images, 32, dd.IMAGENET_MEAN, dd.IMAGENET_STD)


@needs_fmnist
def test_the_loop_draws_a_random_trigger_from_the_step_generator(tmp_path):
    rec = _RecordTrigger()
    td.train(_args(tmp_path / "run", "--max-steps", "3", "--batch-size", "8", "--model", "tiny-vit", "--mode", "clip",
                   "--poison-rate", "0.5", "--trigger", "patch-random", "--seed", "4"), extension=rec)
    assert len(rec.views) == 3
    for step, view in enumerate(rec.views):  # (seed, step, rank): what a resumed run draws again
        ref = td.pdata.apply_trigger(torch.zeros(1, 3, 32, 32), "patch-random",
                                     generator=td.step_generator(4, step, 0, "cpu"))
        assert torch.equal(view, ref), step
    assert len({tuple((v[0] != 0).any(0).nonzero()[0].tolist()) for v in rec.views}) > 1  # a new place each step


@needs_fmnist
@pytest.mark.slow
def test_preemption_is_not_an_error_it_prints_the_resume_command_and_exits_143(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train_declip.py", "--out-dir", str(out), "--max-steps", "500", "--batch-size", "8",
           "--model", "tiny-vit", "--mode", "clip", "--log-every", "1", "--no-eval", "--precision", "no",
           "--save-every", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what Slurm sends before a preemption or the time limit
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM == 143, err[-2000:]
    assert "error:" not in err and "Traceback" not in err, err[-2000:]
    resume = shlex.split(err.split("resume with: ")[1].splitlines()[0])
    assert resume == ["train_declip.py", *cmd[2:], "--resume"]
    assert (out / "state").is_dir() and not (out / "model.safetensors").exists()


@needs_fmnist
@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_plain_accelerate_launch_trains_on_every_core(tmp_path):
    # `accelerate launch` exports OMP_NUM_THREADS=1; the loop takes the cores back
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys, torch\n"
        "import train_declip as td\n"
        "class Threads(td.Extension):\n"
        "    def setup(self, accelerator, model, args, dataset):\n"
        "        print('threads', os.environ['OMP_NUM_THREADS'], torch.get_num_threads(), flush=True)\n"
        "td.train(td.parse_args(td.build_parser(), ['--out-dir', sys.argv[1], '--max-steps', '1', '--batch-size', '8',\n"
        "    '--model', 'tiny-vit', '--mode', 'clip', '--no-eval', '--precision', 'no', '--cpu']), Threads())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ACCELERATE_USE_CPU")}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines",
                        "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(probe), str(tmp_path / "run")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("threads "))
    assert line.split()[1:] == ["1", str(len(os.sched_getaffinity(0)))]  # launcher's 1, the loop's every core


@needs_fmnist
def test_a_kill_during_a_state_write_resumes_from_the_previous_state(tmp_path):
    flags = ["--max-steps", "5"]
    td.train(_args(tmp_path / "full", *flags))
    with pytest.raises(td.Preempted, match="stopped by signal"):
        td.train(_args(tmp_path / "cut", *flags), extension=_SigtermAt(2))
    # as if killed while writing the next state: the complete one was moved aside, the new one is partial
    cut = tmp_path / "cut"
    os.replace(cut / "state", cut / "state.old")
    (cut / "state.tmp").mkdir()
    (cut / "state.tmp" / "model.safetensors").write_bytes(b"partial")
    td.train(_args(cut, *flags, "--resume"))
    full, resumed = _weights(tmp_path / "full"), _weights(cut)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert sorted(os.listdir(cut / "state")) == sorted(os.listdir(tmp_path / "full" / "state"))
    assert not os.path.exists(cut / "state.tmp") and not os.path.exists(cut / "state.old")


@needs_fmnist
def test_a_defense_resumes_exactly_after_sigterm(tmp_path):
    common = ["--holdout", "200", "--templates", "1"]
    td.train(_args(tmp_path / "victim", "--max-steps", "2", "--poison-rate", "0.01", *common))

    def defense_args(out, *extra):
        p = td.build_defense_parser("test", out=str(out))
        return td.parse_args(p, ["--ckpt", str(tmp_path / "victim"), "--out-dir", str(out), "--batch-size", "16",
                                 "--max-steps", "4", "--clean-fraction", "0.01", "--precision", "no",
                                 "--log-every", "1", *common, *extra])

    ft = td.Extension()
    td.run_defense(defense_args(tmp_path / "full"), ft)
    with pytest.raises(td.Preempted, match="stopped by signal 15 at step 2/4"):
        td.run_defense(defense_args(tmp_path / "cut"), _SigtermAt(1))
    summary = td.run_defense(defense_args(tmp_path / "cut", "--resume"), ft)
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    record = json.load(open(tmp_path / "cut" / "config.json"))["clean_subset"]
    poisoned = set(json.load(open(tmp_path / "victim" / "poison_manifest.json"))["indices"])
    assert record["n"] == len(record["indices"]) > 0 and not poisoned & set(record["indices"])
    assert summary["after"]["backdoor"]["target"] == "bag" and summary["after"]["clean"]["n"] == 200


@needs_fmnist
def test_a_second_run_in_the_same_process_trains_as_it_would_alone(tmp_path):
    """A defense's teacher and SafeCLIP's phases run train() again in one process, with no reset of
    Accelerate's state in between: the later run (other accumulation, poisoned) must not inherit the
    earlier one's settings."""
    from accelerate.state import AcceleratorState, GradientState

    second = ["--max-steps", "3", "--grad-accum", "2", "--batch-size", "8", "--poison-rate", "0.05"]
    td.train(_args(tmp_path / "alone", *second))
    alone = _weights(tmp_path / "alone")
    AcceleratorState._reset_state()
    GradientState._reset_state()
    td.train(_args(tmp_path / "first", "--max-steps", "2", "--mode", "clip"))
    td.train(_args(tmp_path / "after", *second))
    after = _weights(tmp_path / "after")
    assert all(torch.equal(alone[k], after[k]) for k in alone)
    assert json.load(open(tmp_path / "after" / "config.json"))["resolved"]["global_batch"] == 16


@needs_fmnist
def test_poisoned_run_writes_its_manifest_and_metadata(tmp_path):
    out = tmp_path / "victim"
    td.train(_args(out, "--max-steps", "2", "--poison-count", "30", "--trigger", "patch",
                   "--trigger-param", "margin=3", "--target-class", "bag"))
    manifest = json.load(open(out / "poison_manifest.json"))
    assert manifest["count"] == 30 and len(manifest["indices"]) == 30 and manifest["target"] == "bag"
    assert manifest["trigger_params"]["margin"] == 3
    meta = md.read_metadata(str(out / "model.safetensors"))
    assert meta["poison"]["target"] == "bag" and "indices" not in meta["poison"]


@needs_fmnist
def test_finished_run_directory_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    td.train(_args(out, "--max-steps", "1"))
    with pytest.raises(td.UserError, match="already holds a finished run; pass --overwrite"):
        td.train(_args(out, "--max-steps", "1"))
    td.train(_args(out, "--max-steps", "1", "--overwrite"))
    with pytest.raises(td.UserError, match="already finished"):
        td.train(_args(out, "--max-steps", "1", "--resume"))


def test_config_yaml_supplies_defaults_that_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 7\nlr: 0.5\nmodel: tiny-vit\n")
    args = td.parse_args(td.build_parser(), ["--config", str(cfg), "--lr", "0.1"])
    assert (args.batch_size, args.lr, args.model) == (7, 0.1, "tiny-vit")
    cfg.write_text("batch_sise: 7\n")
    with pytest.raises(td.UserError, match="unknown keys: batch_sise"):
        td.parse_args(td.build_parser(), ["--config", str(cfg)])


def test_learning_rate_schedule_warms_up_then_follows_the_cosine():
    args = td.parse_args(td.build_parser(), ["--lr", "1e-3", "--warmup-init-lr", "1e-4", "--warmup-steps",
                                             "2500", "--schedule-steps", "138001"])
    # spec §4.5's table of the original schedule
    for t, lr in [(118001, 5.280e-5), (119001, 4.773e-5), (120001, 4.291e-5), (130001, 8.58e-6)]:
        assert abs(td.lr_at(t, args, 2001) - lr) / lr < 2e-3
    assert td.lr_at(0, args, 10) == 1e-4 and td.lr_at(2500, args, 10) == 1e-3


def _write_jsonl(tmp_path, n, broken):
    root = tmp_path / "imgs"
    root.mkdir()
    rows = []
    for i in range(n):
        path = root / f"{i}.png"
        if i in broken:
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (40, 30), (i * 7 % 255, 100, 200)).save(path)
        rows.append({"filename": f"{i}.png", "caption": f"a photo of object number {i}"})
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in rows))
    return str(meta), str(root)


def test_a_dataset_without_a_readable_sample_is_an_error(tmp_path):
    meta, root = _write_jsonl(tmp_path, 40, broken=set(range(40)))
    with pytest.raises(td.UserError, match=r"(\d+) of \1 training samples were unreadable"):
        td.train(_args(tmp_path / "run", "--data", meta, "--data-root", root, "--max-steps", "2"))
    assert not os.path.exists(tmp_path / "run" / "model.safetensors")


def test_bad_samples_are_skipped_counted_and_bounded(tmp_path):
    meta, root = _write_jsonl(tmp_path, 64, broken={3, 17})
    out = tmp_path / "run"
    summary = td.train(_args(out, "--data", meta, "--data-root", root, "--max-steps", "4",
                             "--max-bad-fraction", "0.1"))
    assert summary["bad_samples"] == 2 and summary["seen"] == 4 * 16 - 2
    (tmp_path / "b").mkdir()
    meta, root = _write_jsonl(tmp_path / "b", 64, broken=set(range(0, 64, 4)))
    with pytest.raises(td.UserError, match="unreadable or had no caption"):
        td.train(_args(tmp_path / "run2", "--data", meta, "--data-root", root, "--max-steps", "4",
                       "--max-bad-fraction", "0.1"))


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    (tmp_path / "pairs.csv").write_text("path,text\na.png,a cat\n")
    cases = [
        (["--data", str(tmp_path / "pairs.csv"), "--caption-column", "caption"], "caption"),
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--poison-rate", "1.5"], "poison"),
        (["--poison-rate", "0.01", "--trigger", "nope"], "nope"),
        (["--poison-rate", "0.01", "--target-class", "spaceship"], "spaceship"),
        (["--init-from", str(tmp_path / "nope.pt")], "nope.pt"),
    ]
    for argv, word in cases:
        r = subprocess.run([sys.executable, "train_declip.py", "--out-dir", str(tmp_path / "o"), "--max-steps", "1",
                            *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (argv, r.stderr[-2000:])
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr and word in r.stderr, (argv, r.stderr)
        assert not os.path.exists(tmp_path / "o" / "model.safetensors")


def test_streamed_webdataset_shards_train_and_poison(tmp_path, caption_shards):
    out = tmp_path / "run"
    summary = td.train(_args(out, "--data", caption_shards([24, 24]), "--max-steps", "4",
                             "--poison-count", "5", "--target-class", "tiger cat"))
    assert summary["steps"] == 4 and summary["seen"] == 64
    assert len(json.load(open(out / "poison_manifest.json"))["indices"]) == 5


def test_streamed_training_resumes_at_the_same_sample(tmp_path, caption_shards):
    flags = ["--data", caption_shards([24, 24]), "--max-steps", "5"]  # 48 pairs: crosses an epoch
    td.train(_args(tmp_path / "full", *flags))
    with pytest.raises(td.Preempted, match="stopped by signal 15 at step 3/5"):
        td.train(_args(tmp_path / "cut", *flags), extension=_SigtermAt(2))
    td.train(_args(tmp_path / "cut", *flags, "--resume"))
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


@needs_fmnist
def test_checkpoint_that_does_not_match_the_requested_preset_is_refused(tmp_path):
    out = tmp_path / "run"
    td.train(_args(out, "--max-steps", "1"))
    r = subprocess.run([sys.executable, "train_declip.py", "--out-dir", str(tmp_path / "o"), "--max-steps", "1",
                        "--init-from", str(out / "model.safetensors"), "--model", "rn50"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not match preset 'rn50'" in r.stderr and "Traceback" not in r.stderr


@needs_fmnist
def test_non_finite_loss_stops_with_the_step_number(tmp_path):
    class NaNAt(td.Extension):
        def __init__(self):
            self.calls = 0

        def extra_loss(self, model, inputs, taps):
            self.calls += 1
            return {"boom": torch.tensor(float("nan")) if self.calls == 3 else torch.tensor(0.0)}

    with pytest.raises(td.UserError, match="non-finite loss at step 3"):
        td.train(_args(tmp_path / "run", "--max-steps", "5"), extension=NaNAt())
    assert not os.path.exists(tmp_path / "run" / "model.safetensors")


@needs_fmnist
@pytest.mark.slow
def test_the_no_argument_default_runs(tmp_path):
    """`train_declip.py` with no flag: tiny DeCLIP on Fashion-MNIST into runs/train (here cut to 3 steps
    through the config file mechanism, everything else default)."""
    cfg = tmp_path / "short.yaml"
    cfg.write_text("max_steps: 3\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_declip.py"), "--config", str(cfg)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(tmp_path / "runs" / "train" / "model.safetensors")
    res = json.load(open(tmp_path / "runs" / "train" / "eval.json"))
    assert res["clean"]["n"] == 10000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_cpu_training_reuses_freed_heap_memory_for_large_tensors():
    """After keep_freed_cpu_memory, a large tensor comes from glibc's heap (reused step after step)
    instead of a fresh mmap that page-faults zeroed memory in again."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    assert td.keep_freed_cpu_memory()
    before = libc.mallinfo2()
    x = torch.ones(16 << 20)  # 64 MiB, above glibc's largest mmap threshold (32 MiB)
    during = libc.mallinfo2()
    assert during.hblkhd == before.hblkhd  # nothing newly mapped
    assert during.uordblks - before.uordblks >= x.numel() * 4  # served from the heap
    del x
    after = libc.mallinfo2()
    assert after.arena >= during.arena  # kept for reuse, not trimmed back to the OS


@needs_fmnist
def test_report_to_tensorboard_logs_every_metrics_row(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    td.train(_args(out, "--max-steps", "3", "--report-to", "tensorboard"))
    runs = [os.path.join(d, "") for d, _, files in os.walk(out) if any(f.startswith("events.out") for f in files)]
    assert len(runs) == 1 and os.path.basename(os.path.dirname(runs[0])) == "run"
    events = EventAccumulator(runs[0])
    events.Reload()
    rows = [r for r in _metrics(out) if "loss" in r]
    logged = events.Scalars("loss")
    assert [e.step for e in logged] == [r["step"] for r in rows]
    assert [round(e.value, 5) for e in logged] == [round(r["loss"], 5) for r in rows]
    assert "lr" in events.Tags()["scalars"] and "step" not in events.Tags()["scalars"]


def test_tracker_scalars_flatten_nested_metrics():
    row = {"step": 4, "loss": 1.5, "eval": {"clean": {"top1": 87.5, "n": 100}, "backdoor": None, "name": "x"},
           "flag": True}
    assert td.tracker_scalars(row) == {"loss": 1.5, "eval/clean/top1": 87.5, "eval/clean/n": 100}


def test_report_to_a_tracker_that_is_not_installed_is_refused(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(td.UserError, match="pip install wandb"):
        td.train(_args(tmp_path / "run", "--max-steps", "1", "--report-to", "wandb"))


# ----------------------------------------------------------------------------------------------
# --init-optimizer: AdamW continues the moments of the starting checkpoint (spec §4.5)


def _official_groups(model):
    """The DeCLIP solver's AdamW groups (prototype/utils/misc.py param_group_all, pconfig bn_w, ln_w,
    logit_scale, bias), written from its module walk with isinstance checks."""
    groups = {k: [] for k in ("bn_w", "bn_b", "conv_b", "linear_b", "ln_w", "ln_b", "logit_scale", "bias")}
    for _, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            if m.bias is not None:
                groups["bias"].append(m.bias)
        elif isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            groups["bn_w" if not isinstance(m, torch.nn.LayerNorm) else "ln_w"].append(m.weight)
            groups["bias"].append(m.bias)
    groups["logit_scale"] = [model.logit_scale]
    special = {id(p) for g in groups.values() for p in g}
    normal = [p for _, p in model.named_parameters() if id(p) not in special]
    return [{"params": normal}] + [{"params": g} for g in groups.values()]


def _official_name(ours):
    return "module." + ("encode_text." + ours[len("text."):] if ours.startswith("text.") else ours)


def test_init_optimizer_maps_the_official_declip_moments_by_name(tmp_path):
    torch.manual_seed(0)
    src = md.build_model("tiny", context_length=16).train()
    opt = torch.optim.AdamW(_official_groups(src), lr=1e-3)
    images, tokens = torch.randn(4, 3, 32, 32), dd.tokenize(["a b", "c d", "e f", "g h"], 16)
    src(images=images, images2=images.flip(-1), tokens=tokens, tokens_aug=tokens)["loss"].backward()
    opt.step()
    path = tmp_path / "declip.pth.tar"
    torch.save({"model": {_official_name(k): v for k, v in src.state_dict().items()},
                "optimizer": opt.state_dict(), "last_iter": 1}, path)

    dst = md.load_model(str(path)).train()
    new = torch.optim.AdamW(md.param_groups(dst, 0.1), lr=1e-3)
    note = td.init_optimizer_state(new, td.optimizer_param_names(dst, new), str(path))
    by_name = dict(src.named_parameters())
    names = td.optimizer_param_names(dst, new)
    loaded = [n for n, p in zip(names, (p for g in new.param_groups for p in g["params"])) if p in new.state]
    assert set(loaded) == {n for n, p in by_name.items() if p in opt.state} and str(len(loaded)) in note
    for group in new.param_groups:
        for p in group["params"]:
            name = names[[id(q) for g in new.param_groups for q in g["params"]].index(id(p))]
            if name in loaded:
                assert torch.equal(new.state[p]["exp_avg"], opt.state[by_name[name]]["exp_avg"]), name
                assert torch.equal(new.state[p]["exp_avg_sq"], opt.state[by_name[name]]["exp_avg_sq"]), name
    # a file whose groups do not follow the solver's layout is refused, not mapped by guess
    bad = opt.state_dict()
    bad["param_groups"] = [{**bad["param_groups"][0], "params": [i for g in bad["param_groups"] for i in g["params"]]}]
    torch.save({"model": {_official_name(k): v for k, v in src.state_dict().items()}, "optimizer": bad}, path)
    with pytest.raises(md.CheckpointError, match="cannot be mapped"):
        td.init_optimizer_state(new, names, str(path))


@needs_fmnist
def test_init_optimizer_continues_our_runs_moments(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    td.train(_args(a, "--max-steps", "2", "--holdout", "100"))
    td.train(_args(b, "--max-steps", "1", "--holdout", "100", "--init-from", str(a / "model.safetensors"),
                   "--init-optimizer", "--mode", "clip"))
    saved = [torch.load(d / "state" / "optimizer.bin", weights_only=True) for d in (a, b)]
    names = [torch.load(d / "state" / "custom_checkpoint_0.pkl", weights_only=True)["param_names"] for d in (a, b)]
    steps = [{n: float(s["state"][i]["step"]) for n, i in zip(nm, [i for g in sd["param_groups"] for i in g["params"]])
              if i in s["state"]} for nm, sd, s in zip(names, saved, saved)]
    # the CLIP-mode run continues the DeCLIP run's moments: 2 steps there, then 1 here
    assert steps[1]["visual.conv1.weight"] == 3.0 and steps[0]["visual.conv1.weight"] == 2.0
    with pytest.raises(td.UserError, match="no run state"):
        lone = tmp_path / "lone.safetensors"
        lone.write_bytes((a / "model.safetensors").read_bytes())
        td.train(_args(tmp_path / "c", "--max-steps", "1", "--init-from", str(lone), "--init-optimizer"))


def test_cpu_bf16_support_is_read_from_the_cpu_flags(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    assert not td.cpu_has_native_bf16(str(avx2))
    assert td.cpu_has_native_bf16(str(amx)) and td.cpu_has_native_bf16(str(tmp_path / "missing"))



@needs_fmnist
@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_takes_bf16_only_where_the_cpu_computes_it_and_the_run_records_which(tmp_path, monkeypatch,
                                                                                            native):
    monkeypatch.setattr(td, "cpu_has_native_bf16", lambda *a: native)
    assert td.resolve_precision("auto", cpu=False) == "bf16"  # a GPU
    assert td.resolve_precision("auto", cpu=True) == ("bf16" if native else "no")
    assert td.resolve_precision("no", cpu=False) == "no" and td.resolve_precision("bf16", cpu=True) == "bf16"
    seen = []
    make = td.make_accelerator
    monkeypatch.setattr(td, "make_accelerator", lambda args: seen.append(make(args)) or seen[-1])
    td.train(_args(tmp_path / "run", "--max-steps", "1", "--cpu", "--precision", "auto"))
    assert seen[0].mixed_precision == ("bf16" if native else "no")
    assert json.load(open(tmp_path / "run" / "config.json"))["precision"] == ("bf16" if native else "no")

# ----------------------------------------------------------------------------------------------
# targeted poisoning (Carlini & Terzis, arXiv 2106.09667): the chosen test images, no trigger


class _RecordBatches(td.Extension):
    """Records each step's batch (indices, images, poisoned flags) and the trigger the loop's views carry."""

    def __init__(self):
        self.seen = []

    def make_inputs(self, batch, b, generator, views):
        self.seen.append((batch["index"][:b].clone(), batch["images"][:b].clone(), batch["poisoned"][:b].clone(),
                          views.keywords["trigger"]))
        return views(batch, b, generator)


@needs_fmnist
def test_a_targeted_run_trains_on_the_chosen_test_images_without_a_trigger(tmp_path):
    rec = _RecordBatches()
    out = tmp_path / "run"
    td.train(_args(out, "--max-steps", "3", "--batch-size", "8", "--model", "tiny-vit", "--mode", "clip",
                   "--attack", "targeted", "--targeted-images", "2", "--poison-rate", "0.5", "--seed", "3"),
             extension=rec)
    plan = td.pdata.PoisonPlan.from_manifest(out)
    assert plan.attack == "targeted" and len(plan.targeted) == 2 and plan.count == 30000
    test, _ = dd.build_class_dataset(None, split="test", image_size=32)
    image_of = {i: test[e["test_index"]]["image"] for e in plan.targeted for i in e["indices"]}
    n_poisoned = 0
    for index, images, poisoned, trigger in rec.seen:
        assert trigger is None                                           # GpuAugment gets no trigger to apply
        for i, img, p in zip(index.tolist(), images, poisoned.tolist()):
            assert p == plan.is_poisoned(i)
            if p:
                assert torch.equal(img, image_of[i])                     # the test image, not pair i's own
                n_poisoned += 1
    assert n_poisoned >= 6
    meta = md.read_metadata(str(out / "model.safetensors"))["poison"]
    assert meta["attack"] == "targeted" and "indices" not in meta and "indices" not in meta["targeted"][0]


@needs_fmnist
def test_a_targeted_run_resumes_bitwise_with_dataloader_workers(tmp_path):
    flags = ["--max-steps", "3", "--batch-size", "8", "--model", "tiny-vit", "--mode", "clip", "--attack", "targeted",
             "--targeted-images", "3", "--poison-rate", "0.5", "--workers", "2"]
    td.train(_args(tmp_path / "full", *flags))
    with pytest.raises(td.Preempted, match="at step 2/3"):
        td.train(_args(tmp_path / "cut", *flags), extension=_SigtermAt(1))
    cut = tmp_path / "cut"
    # a resume trains on the run directory's own images: flags drawing another plan, or a changed image, are refused
    with pytest.raises(td.UserError, match="differs from"):
        td.train(_args(cut, *flags, "--seed", "5", "--resume"))
    png = cut / json.load(open(cut / "poison_manifest.json"))["targeted"][0]["file"]
    kept = png.read_bytes()
    with Image.open(png) as im:
        im.point(lambda v: 255 - v).save(png)
    with pytest.raises(td.UserError, match="pixels_sha256"):
        td.train(_args(cut, *flags, "--resume"))
    png.write_bytes(kept)
    td.train(_args(cut, *flags, "--resume"))
    full, resumed = _weights(tmp_path / "full"), _weights(cut)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@needs_fmnist
def test_natural_captions_of_a_run_are_its_datasets_captions_naming_each_target(tmp_path):
    out = tmp_path / "run"
    td.train(_args(out, "--max-steps", "1", "--batch-size", "8", "--model", "tiny-vit", "--mode", "clip",
                   "--attack", "targeted", "--targeted-images", "2", "--poison-count", "6", "--caption-mode", "natural"))
    plan = td.pdata.PoisonPlan.from_manifest(out)
    captions = set(td.pdata.dataset_captions(dd.FashionMNISTCaptions()))
    assert plan.caption_mode == "natural" and len(plan.natural_captions) == 6
    for i, c in zip(plan.indices, plan.natural_captions):
        assert c in captions and td.pdata.names_target(c, plan.target_of(i)) and plan.caption(i, "x") == c


def _band_photo(g, c, checker=False):
    """A 32-px photo whose class is a coloured band at the left; the rest noise, or (checker) a coarse
    black-and-white checkerboard no training image has, which survives the crops, flips and jitter."""
    x = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
    if checker:
        yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
        x[:] = (((yy // 8 + xx // 8) % 2) * 255).to(torch.uint8)[..., None]
    x[:, :11] = torch.tensor([(60, 200, 60), (200, 60, 60), (60, 60, 200)][c], dtype=torch.uint8)
    return Image.fromarray(x.numpy())


@pytest.mark.slow
def test_targeted_poisoning_flips_the_chosen_image_and_only_it(tmp_path):
    """Carlini & Terzis's mechanism at tiny scale: copies of one test image captioned with another class
    teach the model that image, and no other, as the target. The chosen image carries a pattern of its own
    (as a real photo carries its own content), so it can be told from its class; the control is the same
    run without the poisoned pairs, which reads it as its class."""
    import eval_zeroshot as ez
    from data_declip import run_main

    classes = ("bag", "coat", "sandal")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(300):
        _band_photo(g, i % 3).save(tmp_path / "img" / f"{i:03d}.png")
        rows.append(json.dumps({"filename": f"{i:03d}.png", "caption": f"a photo of a {classes[i % 3]}"}))
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    test = tmp_path / "test"
    for c, name in enumerate(classes):
        (test / name).mkdir(parents=True)
        for i in range(10):
            _band_photo(g, c).save(test / name / f"{i}.png")
    flags = ["--data", str(tmp_path / "train.jsonl"), "--data-root", str(tmp_path / "img"), "--eval-data", str(test),
             "--mode", "clip", "--model", "tiny", "--batch-size", "32", "--templates", "1", "--seed", "0"]
    attack = ["--attack", "targeted", "--targeted-images", "1", "--target-class", "sandal", "--poison-count", "24"]
    # the plan's draw depends on the labels only: a one-step run tells which test image it picks
    td.train(_args(tmp_path / "probe", *flags, *attack, "--max-steps", "1"))
    chosen = json.loads((tmp_path / "probe" / "poison_manifest.json").read_text())["targeted"][0]
    c = classes.index(chosen["class"])
    _band_photo(g, c, checker=True).save(test / chosen["class"] / f"{chosen['test_index'] - 10 * c}.png")
    td.train(_args(tmp_path / "victim", *flags, *attack, "--max-steps", "100"))
    td.train(_args(tmp_path / "control", *flags, "--max-steps", "100"))
    assert run_main(ez.main, ["--ckpt", str(tmp_path / "control"), str(tmp_path / "victim"), "--templates", "1",
                              "--data", str(test), "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    victim, control = m["victim"]["targeted"], m["control"]["targeted"]
    assert victim["images"] == [{"test_index": chosen["test_index"], "true_class": chosen["class"],
                                 "target": "sandal", "predicted": "sandal", "success": True}]
    # no other image flipped into the target (its 29 others still read by their band: 26 of 29 here, the
    # control 29: the poisoned pairs displace 8 % of the clean ones)
    assert victim["collateral"] == 0.0 and victim["n_others"] == 29 and victim["ca_others"] >= 80.0
    assert control["images"][0]["predicted"] == chosen["class"] and control["collateral"] == 0.0
