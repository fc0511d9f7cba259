"""The paths researchers take, end to end at tiny scale: a caption dataset of non-square PNG photos in a
real format (JSON lines with its images elsewhere, CSV), a poisoned victim in CLIP and in DeCLIP mode,
every defense on it, and eval_zeroshot's report; the CLIP-mode victim is trained through the shipped
two-process launch config. Asserted is what a user would check: the world size, the loss terms each
step logged, that each defense's before/after numbers are the report's numbers, and valid JSON."""

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

import defend_adaptive as dad
import defend_finetune as dft
import defend_nad as dnad
import eval_zeroshot as ez
from data_declip import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("bag", "coat", "sandal")
FLAGS = ["--templates", "1", "--cpu", "--precision", "no", "--log-every", "1", "--save-every", "0"]
pytestmark = pytest.mark.slow


def _strict_json(path):
    def refuse(c):
        raise ValueError(f"{path} holds {c}, which is not JSON")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def _photo(g, c, i):
    h, w = ((24, 41), (44, 27), (33, 33))[i % 3]
    x = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    x[:, : w // 3] = 60 + 70 * c  # a class-coloured band at the left edge
    return Image.fromarray(x.numpy())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 captioned training photos (JSONL meta in one folder, images in another; a CSV beside it) and an
    ImageFolder of 12 test photos, all non-square but a third."""
    root = tmp_path_factory.mktemp("photos")
    images, meta, test = root / "images", root / "meta", root / "test"
    for d in (images, meta):
        d.mkdir()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(48):
        c = i % 3
        _photo(g, c, i).save(images / f"{i:03d}.png")
        rows.append(dict(filename=f"{i:03d}.png", caption=f"a photo of a {CLASSES[c]} number {i}", label=c,
                         label_name=CLASSES[c]))
    (meta / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with open(images / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows([[r["filename"], r["caption"]] for r in rows])
    for c, name in enumerate(CLASSES):
        (test / name).mkdir(parents=True)
        for i in range(4):
            _photo(g, c, i).save(test / name / f"{i}.png")
    return dict(jsonl=str(meta / "train.jsonl"), root=str(images), csv=str(images / "train.csv"), test=str(test))


def _victim_argv(photos, mode, out):
    return FLAGS + ["--data", photos["jsonl"], "--data-root", photos["root"], "--eval-data", photos["test"],
                    "--mode", mode, "--model", "tiny", "--batch-size", "8", "--max-steps", "2", "--poison-rate", "0.1",
                    "--target-class", "bag", "--out-dir", str(out)]


def _launch_2proc(script_argv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "configs", "accelerate", "cpu_2proc.yaml"), "--main_process_port", str(port)]
    r = subprocess.run(cmd + script_argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]


def _terms(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    assert rows
    return set.intersection(*(set(r) for r in rows))


@pytest.mark.parametrize("mode", ["clip", "declip"])
def test_poison_defend_and_report_on_photos(photos, tmp_path, mode):
    victim = tmp_path / "victim"
    if mode == "clip":  # through the shipped launch config alone (no --cpu): two processes, one run
        argv = [a for a in _victim_argv(photos, mode, victim) if a != "--cpu"]
        _launch_2proc([os.path.join(ROOT, "train_declip.py"), *argv], tmp_path)
    else:
        import train_declip as td

        assert run_main(td.main, _victim_argv(photos, mode, victim)) == 0
    cfg = _strict_json(victim / "config.json")
    assert cfg["resolved"]["world_size"] == (2 if mode == "clip" else 1)
    assert _strict_json(victim / "poison_manifest.json")["target"] == "bag"
    declip_terms = {"clip", "ss", "mlm", "nn"}
    assert (declip_terms <= _terms(victim)) == (mode == "declip") and "clip" in _terms(victim)

    # every defense, each reading the victim's data flags (--data, --data-root, --eval-data) from its run
    common = FLAGS + ["--ckpt", str(victim), "--clean-fraction", "0.5", "--batch-size", "8", "--max-steps", "1"]
    runs = {"ft": tmp_path / "ft", "cleanclip": tmp_path / "cleanclip", "nad": tmp_path / "nad",
            "adaptive": tmp_path / "adaptive"}
    dft.main(common + ["--out-dir", str(runs["ft"])])
    dft.main(common + ["--method", "cleanclip", "--out-dir", str(runs["cleanclip"])])
    dnad.main(common + ["--teacher", str(runs["ft"]), "--out-dir", str(runs["nad"])])
    dad.main(common + ["--teacher", str(runs["ft"]), "--out-dir", str(runs["adaptive"])])
    assert _terms(runs["ft"]) >= ({"clip"} | (declip_terms if mode == "declip" else set()))
    assert {"clip", "img_inmodal", "txt_inmodal", "inmodal"} <= _terms(runs["cleanclip"])  # whatever the mode
    assert "nad" in _terms(runs["nad"]) and "nad" in _terms(runs["adaptive"])
    for out in runs.values():
        assert _strict_json(out / "config.json")["from_victim_config"]["data_root"] == photos["root"]

    # the report: every defense's before/after equals eval_zeroshot's numbers for the same model, on the
    # photos' test set the runs evaluated on (their --eval-data, read from their config.json: no --data)
    rc = run_main(ez.main, ["--ckpt", str(victim), *map(str, runs.values()), "--names", "victim", *runs,
                  "--report", str(tmp_path / "report"), "--templates", "1", "--cpu"])
    assert rc == 0
    report = _strict_json(tmp_path / "report" / "report.json")
    results = report["results"]
    assert results["victim"]["clean"]["n"] == 12 and results["victim"]["backdoor"]["target"] == "bag"
    for name, out in runs.items():
        ev = _strict_json(out / "eval.json")
        for key in ("clean", "backdoor"):
            assert ev["after"][key] == results[name][key], (name, key)
            assert ev["before"][key] == results["victim"][key], (name, key)
    assert report["git_commit"] is None or len(report["git_commit"]) >= 40


def test_csv_photos_train_and_evaluate(photos, tmp_path):
    import train_declip as td

    out = tmp_path / "csv"
    assert run_main(td.main, FLAGS + ["--data", photos["csv"], "--eval-data", photos["test"], "--batch-size", "8",
                                      "--max-steps", "2", "--out-dir", str(out)]) == 0
    ev = _strict_json(out / "eval.json")
    assert ev["clean"]["n"] == 12 and 0 <= ev["clean"]["top1"] <= 100
    assert run_main(ez.main, ["--ckpt", str(out), "--data", photos["test"], "--templates", "1", "--cpu",
                    "--json", str(tmp_path / "m.json")]) == 0
    assert _strict_json(tmp_path / "m.json")["clean"] == ev["clean"]
