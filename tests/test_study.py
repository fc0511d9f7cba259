"""study.py: the YAML is checked key by key (one-line errors), the demo study plans the Makefile's commands,
the statistics are scipy's, a SIGTERM reaches the running cell, and a tiny 2 attacks x 2 defenses matrix
runs end to end, skips every done cell on a second run and completes after a simulated kill."""

import json
import os
import shlex
import subprocess
import sys
import threading
import time

import pytest
import yaml
from scipy import stats

import eval_zeroshot as ez
import study
from data_declip import Preempted, UserError, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "studies", "demo.yaml")
FULL = os.path.join(ROOT, "configs", "studies", "full.yaml")
REDUCED = os.path.join(ROOT, "configs", "studies", "reduced.yaml")
ATTACKS = os.path.join(ROOT, "configs", "studies", "attacks.yaml")


def _yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def _plan(data, out):
    s = study.parse_study(data, "test.yaml")
    cells = study.plan_cells(s, study._out(s, str(out)))
    return s, cells


# ------------------------------------------------------------------------------------------------
# the study file


def _mutate(path, value):
    """demo.yaml's mapping with the key at `path` (a tuple) set to value (study.DROP: removed)."""
    data = _yaml(DEMO)
    d = data
    for k in path[:-1]:
        d = d[k]
    if value is DROP:
        del d[path[-1]]
    else:
        d[path[-1]] = value
    return data


DROP = object()
BAD = [
    (("colour",), "blue", "unknown key colour"),
    (("attacks",), DROP, "missing attacks"),
    (("recipes", "victim", "flagz"), "--lr 1", "recipes.victim: unknown key flagz"),
    (("recipes", "clean", "config"), "configs/nope.yaml", "recipes.clean.config"),
    (("recipes", "test"), {"flags": ""}, "recipes: unknown key test"),
    (("defenses", "ft", "scrip"), "defend_finetune.py", "defenses.ft: unknown key scrip"),
    (("defenses", "ft", "script"), "defend_nothing.py", "defenses.ft.script"),
    (("defenses", "nad", "teacher"), "fx", "defenses.nad.teacher"),
    (("defenses", "ft", "teacher"), "nad", "cycle"),
    (("defenses", "ft", "from"), "scratch", "defenses.ft.from"),
    (("defenses", "ft", "detect"), "", "defenses.ft.detect"),
    (("defenses", "none"), {"script": "defend_finetune.py"}, "defenses.none"),
    (("defenses", "victim"), {"script": "defend_finetune.py"}, "defenses.victim"),
    (("attacks", "bad/name"), "--poison-rate 0.1", "attacks: 'bad/name'"),
    (("attacks", "badnets"), "--trigger 'patch", "attacks.badnets: cannot split"),
    (("objectives",), {}, "objectives: declare at least one"),
    (("seeds",), [0, 0], "seeds"),
    (("seeds",), "0 1", "seeds"),
]


@pytest.mark.parametrize("path,value,match", BAD, ids=[m for _, _, m in BAD])
def test_a_bad_study_file_is_one_line_naming_the_key(path, value, match):
    with pytest.raises(UserError) as e:
        study.parse_study(_mutate(path, value), "demo.yaml")
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


FLAG_BAD = [
    (("attacks", "badnets"), "--poison-rat 0.01", "attacks.badnets: train_declip.py has no flag --poison-rat"),
    (("recipes", "defense", "flags"), "--seed 3", "recipes.defense.flags: --seed is set by the study"),
    (("objectives", "declip"), "--w-zz 0", "objectives.declip"),
    (("defenses", "ft", "flags"), "--method sometimes --nad-power 2", "defenses.ft.flags: defend_finetune.py has no "
                                                                        "flag --nad-power"),
    (("recipes", "eval", "flags"), "--show-exampels 3", "recipes.eval.flags: eval_zeroshot.py has no flag"),
    (("bar",), "--bar-asr 10 --templates 1", "bar: --templates is not a bar flag"),
    (("bar",), "--bar-asr ten", "bar: --bar-asr needs a number, got 'ten'"),
    (("bar",), "--bar-asr=200", "--bar-asr 200 must be a percentage"),
    (("defenses", "ft", "script"), "eval_zeroshot.py", "defenses.ft: eval_zeroshot.py takes no --out-dir"),
]


@pytest.mark.parametrize("path,value,match", FLAG_BAD, ids=[m[:40] for _, _, m in FLAG_BAD])
def test_a_flag_its_script_does_not_know_is_refused_before_anything_runs(path, value, match, tmp_path):
    s, cells = _plan(_mutate(path, value), tmp_path)
    with pytest.raises(UserError) as e:
        study.check_flags(s, cells)
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_cli_prints_one_error_line_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_mutate(("defenses", "ft", "scrip"), "x")))
    assert run_main(study.main, [str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: defenses.ft: unknown key scrip") and "\n" not in err
    assert run_main(study.main, [DEMO, "--dry-run", "--attacks", "wanet"]) == 2
    assert "--attacks wanet: not in the study's attacks (badnets)" in capsys.readouterr().err


def test_the_shipped_studies_validate_and_have_their_cells(tmp_path):
    for path, n_cells in ((DEMO, 7), (REDUCED, 105), (FULL, 1185), (ATTACKS, 30)):
        s = study.load_study(path)
        cells = study.plan_cells(s, study._out(s, str(tmp_path / s.name)))
        study.check_flags(s, cells)
        assert len(cells) == n_cells, path
        assert study.bar_of(s) == (10.0, 3.0)
    # the reduced study's cells per (objective, seed): clean, victim, 4 defenses, report
    s = study.load_study(REDUCED)
    kinds = [c.kind for c in study.plan_cells(s, "x")]
    assert kinds[:7] == ["clean", "victim", "defense", "defense", "defense", "defense", "report"]


def test_an_optimised_trigger_attack_plans_its_patch_before_the_victim_that_trains_on_it(tmp_path):
    data = _yaml(DEMO)
    data["attacks"] = {"badclip": {"flags": "--poison-rate 0.005 --target-class bag",
                                   "optimize": "--target-class bag --patch-size 4"}}
    s, cells = _plan(data, tmp_path)
    study.check_flags(s, cells)
    trig, victim = cells[1], cells[2]
    assert (trig.kind, victim.kind) == ("trigger", "victim")
    patch = trig.target
    assert patch.endswith("declip/badclip/seed0/trigger/patch.png")
    assert trig.cmd[0] == "poison_data.py" and trig.cmd[trig.cmd.index("--optimize-trigger") + 1] == patch
    assert trig.cmd[trig.cmd.index("--ckpt") + 1] == cells[0].run_dir and trig.deps == [cells[0].target]
    i = victim.cmd.index("--trigger")
    assert victim.cmd[i:i + 4] == ["--trigger", "optimized", "--trigger-param", f"path={patch}"]
    assert patch in victim.deps
    data["attacks"]["badclip"]["flags"] += " --trigger patch"
    with pytest.raises(UserError, match="attacks.badclip.flags: an attack with `optimize`"):
        _plan(data, tmp_path)
    data["attacks"]["badclip"] = {"flags": "--poison-rate 0.005", "optimize": "--optimise-epochs 3"}
    with pytest.raises(UserError, match="attacks.badclip.optimize: poison_data.py has no flag --optimise-epochs"):
        study.check_flags(*_plan(data, tmp_path))


# ------------------------------------------------------------------------------------------------
# the Makefile's commands


def _make_n(target, demo_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}  # nproc reads OMP_NUM_THREADS
    r = subprocess.run(["make", "-n", "--no-print-directory", target, f"DEMO={demo_dir}", "SEED=0"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.replace("\\\n", " ").splitlines() if line.strip()]


def _as_makefile(cells, out, demo_dir):
    """The cells' commands with the study's run directories written as the Makefile's runs/demo/seed0/*."""
    clean, cell = f"{out}/declip/clean/seed0", f"{out}/declip/badnets/seed0"
    d = f"{demo_dir}/seed0"

    def path(a):
        if a.startswith(clean):
            return f"{d}/clean" + a[len(clean):]
        return d + a[len(cell):] if a.startswith(cell) else a

    return [[path(a) for a in c.cmd] for c in cells]


@pytest.mark.skipif(not os.path.exists("/usr/bin/make"), reason="no make")
def test_the_demo_study_plans_the_commands_of_make_demo(tmp_path):
    make = _make_n("demo-seed", tmp_path / "demo")
    n = make[0].index("train_declip.py")
    accel, launcher = make[0][:n], study.default_launcher()
    assert launcher[-(n - 2):] == accel[2:]  # the Makefile's ACCEL: `accelerate launch` with its flags
    if os.path.dirname(sys.executable) == os.path.join(ROOT, ".venv", "bin"):  # make's $(VENV)/bin/accelerate
        assert launcher[:2] == [os.path.join(ROOT, accel[0]), "launch"]
    s, cells = _plan(_yaml(DEMO), tmp_path / "study")
    assert [c.kind for c in cells] == ["clean", "victim", "defense", "defense", "defense", "defense", "report"]
    assert _as_makefile(cells, str(tmp_path / "study"), str(tmp_path / "demo")) == [m[n:] for m in make]


@pytest.mark.skipif(not os.path.exists("/usr/bin/make"), reason="no make")
def test_the_data_side_defenses_plan_the_commands_of_make_demo_data_defenses(tmp_path):
    make = _make_n("demo-data-defenses-seed", tmp_path / "demo")
    n = make[0].index("train_declip.py")
    data = _yaml(DEMO)
    full = _yaml(FULL)["defenses"]
    data["defenses"] = {k: full[k] for k in ("detect-clean", "roclip", "safeclip", "par")}
    s, cells = _plan(data, tmp_path / "study")
    study.check_flags(s, cells)
    assert [c.kind for c in cells][:3] == ["clean", "victim", "detect"]
    mine = _as_makefile(cells, str(tmp_path / "study"), str(tmp_path / "demo"))
    assert mine[:-1] == [m[n:] for m in make][:-1]  # every training and the detection (the report differs:
    assert mine[-1][0] == "eval_zeroshot.py"        # the Makefile's writes its own data-defenses/ report)


# ------------------------------------------------------------------------------------------------
# statistics on hand-made per-seed reports


def _results(ca, asr):
    return {"clean": {"top1": ca, "top5": 99.0, "n": 100},
            "backdoor": {"trigger": "patch", "target": "bag", "asr": asr, "asr_all": asr, "ra": 100 - asr, "n": 100}}


NUMBERS = {  # method -> per seed (CA, ASR)
    "clean": [(88.0, 0.5), (87.5, 0.4), (88.4, 0.6)],
    "victim": [(87.0, 99.5), (86.6, 98.9), (87.3, 99.8)],
    "ft": [(87.6, 2.4), (86.9, 9.1), (87.8, 5.5)],
    "cleanclip": [(83.5, 1.2), (85.7, 1.9), (83.9, 1.1)],
}


def _hand_made(tmp_path, seeds, objectives=None, attacks=None):
    """per-seed reports of NUMBERS under each objective and attack; objectives, attacks: name -> function
    (method, seed, (CA, ASR)) -> the numbers written for it, the attack's applied after the objective's
    (default: one objective, declip, and one attack, badnets, NUMBERS as they are)"""
    objectives = objectives or {"declip": lambda m, seed, v: v}
    attacks = attacks or {"badnets": lambda m, seed, v: v}
    data = {"recipes": {"clean": {}, "victim": {}, "defense": {}},
            "attacks": {name: "" for name in attacks}, "objectives": {name: "" for name in objectives},
            "defenses": {"none": None, "ft": {"script": "defend_finetune.py"},
                         "cleanclip": {"script": "defend_finetune.py", "flags": "--method cleanclip"}},
            "seeds": seeds, "bar": "--bar-asr 10 --bar-ca-drop 3"}
    s = study.parse_study(data, "stats.yaml")
    out = study._out(s, str(tmp_path))
    for name, numbers in objectives.items():
        for att, attack_numbers in attacks.items():
            for seed in seeds:
                d = study.paths(out, name, att, seed)["cell"]
                ez.write_report(d, {m: _results(*attack_numbers(m, seed, numbers(m, seed, NUMBERS[m][seed])))
                                    for m in NUMBERS}, victim="victim", bar=(10.0, 3.0))
    return s, out, study.plan_cells(s, out)


def test_intervals_and_paired_tests_are_scipys(tmp_path):
    s, out, cells = _hand_made(tmp_path, [0, 1, 2])
    rep = study.write_report(s, out, cells, ["stats.yaml"], time.time())
    saved = json.load(open(tmp_path / "report.json"))
    assert saved["tables"] == json.loads(json.dumps(rep["tables"]))
    rows = {r["defense"]: r for r in saved["tables"]["declip"]["rows"]}
    assert set(rows) == {"clean", "none", "ft", "cleanclip"}

    def interval(xs):
        lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / len(xs), scale=stats.sem(xs))
        return (lo + hi) / 2, (hi - lo) / 2

    for name, method in (("clean", "clean"), ("none", "victim"), ("ft", "ft"), ("cleanclip", "cleanclip")):
        for key, col in (("ca_top1", 0), ("asr", 1)):
            mean, half = interval([v[col] for v in NUMBERS[method]])
            assert rows[name][key]["n"] == 3
            assert rows[name][key]["mean"] == pytest.approx(mean) and rows[name][key]["ci95"] == pytest.approx(half)
    drop = [v[0] - d[0] for v, d in zip(NUMBERS["victim"], NUMBERS["ft"])]
    assert rows["ft"]["ca_drop_vs_victim"]["ci95"] == pytest.approx(interval(drop)[1])
    drop = [c[0] - d[0] for c, d in zip(NUMBERS["clean"], NUMBERS["cleanclip"])]
    assert rows["cleanclip"]["ca_drop_vs_clean"]["mean"] == pytest.approx(interval(drop)[0])
    assert rows["none"]["ca_drop_vs_victim"]["mean"] is None
    assert rows["ft"]["meets_bar_seeds"] == [3, 3] and rows["cleanclip"]["meets_bar_seeds"] == [1, 3]

    tests = {(t["a"], t["b"]): t for t in saved["tables"]["declip"]["paired_tests"]}
    assert set(tests) == {("none", "ft"), ("none", "cleanclip"), ("ft", "cleanclip")}
    for (a, b), t in tests.items():
        ref = stats.ttest_rel([v[1] for v in NUMBERS["victim" if a == "none" else a]], [v[1] for v in NUMBERS[b]])
        assert t["n"] == 3 and t["p"] == pytest.approx(ref.pvalue) and t["t"] == pytest.approx(ref.statistic)
        assert t["verdict"].startswith("differs beyond seed noise" if ref.pvalue < 0.05 else "within seed noise")
    assert tests[("none", "ft")]["verdict"].startswith("differs beyond")
    assert tests[("ft", "cleanclip")]["verdict"].startswith("within seed noise")

    md = (tmp_path / "report.md").read_text()
    m, h = interval([v[1] for v in NUMBERS["ft"]])
    assert "| badnets | ft | " in md and f"{m:.2f} ± {h:.2f}" in md and "scipy.stats.ttest_rel" in md
    assert (tmp_path / "heatmap_declip.png").stat().st_size > 1000
    agg = json.load(open(tmp_path / "declip" / "badnets" / "report.json"))  # eval_zeroshot's --aggregate
    assert agg["n_seeds"] == 3 and [r["method"] for r in agg["rows"]] == list(NUMBERS)


def test_objectives_are_compared_seed_by_seed_with_scipys_paired_test(tmp_path):
    # clip: a weaker victim (ASR 30 points lower on every seed, give or take) and ft's ASR shuffled across seeds,
    # so that only pairing by seed gives scipy's p; seed 2 of clip missing for cleanclip's comparison
    shift = {0: -31.0, 1: -25.0, 2: -36.0}
    clip_ft = {0: 9.1, 1: 5.5, 2: 2.4}

    def clip(m, seed, v):
        ca, asr = v
        return (ca - 1.0, asr + shift[seed]) if m == "victim" else (ca, clip_ft[seed]) if m == "ft" else v

    s, out, cells = _hand_made(tmp_path, [0, 1, 2], {"clip": clip, "declip": lambda m, seed, v: v})
    os.remove(os.path.join(study.paths(out, "clip", "badnets", 2)["cell"], "report.json"))
    rep = study.write_report(s, out, cells, ["stats.yaml"], time.time())
    got = {(t["defense"], t["metric"]): t for t in rep["objective_tests"]}
    assert {(t["a"], t["b"]) for t in rep["objective_tests"]} == {("clip", "declip")}
    assert set(got) == {("clean", "ca_top1"), ("none", "ca_top1"), ("none", "asr"), ("ft", "asr"), ("cleanclip", "asr")}
    assert all(t["seeds"] == [0, 1] and t["n"] == 2 and t["p"] is None for t in got.values())

    ez.write_report(study.paths(out, "clip", "badnets", 2)["cell"],
                    {m: _results(*clip(m, 2, NUMBERS[m][2])) for m in NUMBERS}, victim="victim", bar=(10.0, 3.0))
    rep = study.write_report(s, out, cells, ["stats.yaml"], time.time())
    got = {(t["defense"], t["metric"]): t for t in rep["objective_tests"]}
    victim_asr = stats.ttest_rel([NUMBERS["victim"][k][1] + shift[k] for k in range(3)],
                                 [NUMBERS["victim"][k][1] for k in range(3)])
    ft_asr = stats.ttest_rel([clip_ft[k] for k in range(3)], [NUMBERS["ft"][k][1] for k in range(3)])
    assert got[("none", "asr")]["p"] == pytest.approx(victim_asr.pvalue) and victim_asr.pvalue < 0.05
    assert got[("none", "asr")]["mean_diff"] == pytest.approx(sum(shift.values()) / 3)
    assert got[("ft", "asr")]["p"] == pytest.approx(ft_asr.pvalue) and got[("ft", "asr")]["mean_diff"] == pytest.approx(0)
    assert got[("none", "ca_top1")]["verdict"].startswith("not testable (the differences are identical")
    assert got[("clean", "ca_top1")]["mean_diff"] == 0
    md = (tmp_path / "report.md").read_text().split("## Objectives compared")[1]
    row = next(line for line in md.splitlines() if line.startswith("| clip − declip |"))
    assert row.startswith("| clip − declip | +0.00 (no spread) | -1.00 (no spread) | ")
    assert f"{sum(shift.values()) / 3:+.2f} (p {victim_asr.pvalue:.3f}) *" in row and "| victim ASR |" in md
    assert json.load(open(tmp_path / "report.json"))["objective_tests"] == json.loads(json.dumps(rep["objective_tests"]))


def test_attacks_are_compared_seed_by_seed_under_each_objective(tmp_path):
    # badclip: a victim as strong, FT's ASR 6 points higher on seeds 0 and 1 and 9 on seed 2 (so it survives FT
    # better, beyond seed noise), CleanCLIP's shuffled across seeds, so that only pairing by seed gives scipy's p
    ft_up = {0: 6.0, 1: 6.0, 2: 9.0}
    cc = {0: 3.3, 1: 0.2, 2: 1.9}

    def badclip(m, seed, v):
        ca, asr = v
        return (ca, asr + ft_up[seed]) if m == "ft" else (ca, cc[seed]) if m == "cleanclip" else v

    s, out, cells = _hand_made(tmp_path, [0, 1, 2], attacks={"badnets": lambda m, seed, v: v, "badclip": badclip})
    rep = study.write_report(s, out, cells, ["stats.yaml"], time.time())
    assert rep["objective_tests"] == []
    got = {(t["defense"], t["metric"]): t for t in rep["attack_tests"]}
    assert {(t["objective"], t["a"], t["b"]) for t in rep["attack_tests"]} == {("declip", "badnets", "badclip")}
    assert set(got) == {("none", "ca_top1"), ("none", "asr"), ("ft", "asr"), ("cleanclip", "asr")}  # no clean: shared
    ft = stats.ttest_rel([NUMBERS["ft"][k][1] for k in range(3)], [NUMBERS["ft"][k][1] + ft_up[k] for k in range(3)])
    ref = stats.ttest_rel([NUMBERS["cleanclip"][k][1] for k in range(3)], [cc[k] for k in range(3)])
    assert got[("ft", "asr")]["p"] == pytest.approx(ft.pvalue) and ft.pvalue < 0.05
    assert got[("ft", "asr")]["mean_diff"] == pytest.approx(-7.0) and got[("ft", "asr")]["seeds"] == [0, 1, 2]
    assert got[("cleanclip", "asr")]["p"] == pytest.approx(ref.pvalue)
    assert got[("none", "asr")]["mean_diff"] == 0 and got[("none", "asr")]["p"] is None
    md = (tmp_path / "report.md").read_text()
    assert "## Objectives compared" not in md
    part = md.split("## Attacks compared")[1]
    assert "### Objective `declip`" in part and "| A − B | victim CA | victim ASR | ft ASR | cleanclip ASR |" in part
    row = next(line for line in part.splitlines() if line.startswith("| badnets − badclip |"))
    assert f"| -7.00 (p {ft.pvalue:.3f}) * |" in row
    assert json.load(open(tmp_path / "report.json"))["attack_tests"] == json.loads(json.dumps(rep["attack_tests"]))


def test_one_seed_says_n1_and_tests_nothing(tmp_path):
    s, out, cells = _hand_made(tmp_path, [0])
    rep = study.write_report(s, out, cells, ["stats.yaml"], time.time())
    rows = {r["defense"]: r for r in rep["tables"]["declip"]["rows"]}
    assert rows["ft"]["asr"] == {"mean": 2.4, "std": None, "n": 1, "ci95": None, "values": [2.4]}
    assert all(t["verdict"] == "not testable (n=1 < 3)" and t["p"] is None
               for t in rep["tables"]["declip"]["paired_tests"])
    md = (tmp_path / "report.md").read_text()
    assert "2.40 (n=1)" in md and "±" not in md.split("## Objective")[1].split("Paired")[0]


# ------------------------------------------------------------------------------------------------
# running cells


def test_sigterm_reaches_the_running_cell_which_saves_and_the_study_exits_143(tmp_path):
    """The cell runs in a process group of its own; the study's SIGTERM is passed to it, the study waits
    for it to finish saving and stops with 128 + 15."""
    ready, saved = tmp_path / "ready", tmp_path / "saved"
    code = (f"import signal, sys, time, pathlib\n"
            f"def term(*a):\n    time.sleep(0.5); pathlib.Path({str(saved)!r}).write_text('state'); sys.exit(143)\n"
            f"signal.signal(signal.SIGTERM, term)\npathlib.Path({str(ready)!r}).write_text('')\ntime.sleep(60)\n")
    cell = study.Cell("victim", "victim  x", ["-c", code], str(tmp_path / "victim" / "model.safetensors"), [])

    def kill_when_ready():
        for _ in range(600):
            if ready.exists():
                os.kill(os.getpid(), 15)
                return
            time.sleep(0.05)

    threading.Thread(target=kill_when_ready, daemon=True).start()
    with pytest.raises(Preempted) as e:
        study.run_study(str(tmp_path), [cell], [sys.executable], quiet=True)
    assert e.value.exit_code == 143 and saved.read_text() == "state"  # the cell finished saving first
    assert "the same command continues the study" in str(e.value)


def test_a_failed_cell_stops_the_study_with_one_line_and_keep_going_runs_the_rest(tmp_path, capsys):
    out = tmp_path
    fail = study.Cell("clean", "clean   a", ["-c", "raise SystemExit(3)"], str(out / "a" / "model.safetensors"), [])
    after = study.Cell("victim", "victim  a", ["-c", "pass"], str(out / "b" / "model.safetensors"), [fail.target])
    other = study.Cell("clean", "clean   c", ["-c", f"open({str(out / 'c.txt')!r}, 'w')"], str(out / "c.txt"), [])
    with pytest.raises(UserError, match=r"clean .*a failed \(exit 3\).*its output is in") as e:
        study.run_study(str(out), [fail, after, other], [sys.executable], quiet=True)
    assert "\n" not in str(e.value) and not (out / "c.txt").exists()
    with pytest.raises(UserError, match="failed"):
        study.run_study(str(out), [fail, after, other], [sys.executable], quiet=True, keep_going=True)
    printed = capsys.readouterr().out
    assert "victim  a: skipped, it needs" in printed and (out / "c.txt").exists()


def _touch(path, t):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "a").close()
    os.utime(path, (t, t))


def test_a_stopped_run_is_resumed_and_a_stale_or_changed_one_run_again(tmp_path):
    """cell_status: done / resume (--resume instead of --overwrite; SafeCLIP keeps its phases) / run, from the
    files alone, as make decides from mtimes, plus the command each cell was last run with."""
    dep, run = str(tmp_path / "victim" / "model.safetensors"), tmp_path / "ft"
    cmd = ["defend_finetune.py", "--ckpt", "v", "--out-dir", str(run), "--overwrite"]
    cell = study.Cell("defense", "ft x", cmd, str(run / "model.safetensors"), [dep])
    _touch(dep, 1000)
    assert study.cell_status(cell, {}) == ("run", "", cmd)  # nothing there
    _touch(str(run / "config.json"), 1100)  # killed before its first save: trained again
    assert study.cell_status(cell, {})[0] == "run"
    os.makedirs(run / "state")
    os.utime(run / "state", (1200, 1200))
    assert study.cell_status(cell, {}) == ("resume", "a stopped run", cmd[:-1] + ["--resume"])
    _touch(dep, 1300)  # the victim was trained again after the state was saved: start over
    assert study.cell_status(cell, {}) == ("run", "", cmd)
    _touch(cell.target, 1400)
    assert study.cell_status(cell, {})[0] == "done"
    assert study.cell_status(cell, {cell.target: {"cmd": cmd}})[0] == "done"
    assert study.cell_status(cell, {cell.target: {"cmd": cmd + ["--lr", "1"]}})[:2] == ("run", "its command changed")
    _touch(dep, 1500)
    assert study.cell_status(cell, {})[:2] == ("run", "a cell it needs is newer")
    safe = tmp_path / "safeclip"
    scmd = ["defend_safeclip.py", "--out-dir", str(safe), "--overwrite"]
    scell = study.Cell("defense", "safeclip x", scmd, str(safe / "model.safetensors"), [dep])
    _touch(str(safe / "phases" / "warmup-inmodal" / "model.safetensors"), 1600)
    os.utime(safe / "phases", (1600, 1600))
    assert study.cell_status(scell, {}) == ("resume", "a stopped run", scmd[:-1])  # its finished phases are kept


# ------------------------------------------------------------------------------------------------
# end to end at tiny scale


CLASSES = ("bag", "coat", "sandal")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 captioned training photos (JSONL) and an ImageFolder of 12 test photos (as test_user_paths)."""
    import torch
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    images, test = root / "images", root / "test"
    images.mkdir()
    g = torch.Generator().manual_seed(0)

    def photo(c):
        x = torch.randint(0, 256, (34, 30, 3), generator=g, dtype=torch.uint8)
        x[:, :10] = 60 + 70 * c
        return Image.fromarray(x.numpy())

    rows = []
    for i in range(48):
        photo(i % 3).save(images / f"{i:03d}.png")
        rows.append(dict(filename=f"{i:03d}.png", caption=f"a photo of a {CLASSES[i % 3]} number {i}", label=i % 3,
                         label_name=CLASSES[i % 3]))
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for c, name in enumerate(CLASSES):
        (test / name).mkdir(parents=True)
        for i in range(4):
            photo(c).save(test / name / f"{i}.png")
    return dict(jsonl=str(root / "train.jsonl"), root=str(images), test=str(test))


def _tiny_study(photos):
    small = "--templates 1 --cpu --log-every 1 --save-every 0 --no-eval"
    data = f"--data {photos['jsonl']} --data-root {photos['root']}"
    return {
        "name": "tiny",
        "recipes": {"clean": {"config": "configs/tiny.yaml", "flags": f"{data} --batch-size 8 --max-steps 2 {small}"},
                    "victim": {"config": "configs/tiny_victim.yaml",
                               "flags": f"{data} --batch-size 8 --max-steps 2 {small}"},
                    "defense": {"config": "configs/tiny_defense.yaml",
                                "flags": f"--clean-fraction 0.5 --batch-size 8 --max-steps 1 {small}"},
                    "eval": {"flags": f"--data {photos['test']} --templates 1 --cpu"}},
        "attacks": {"badnets": "--poison-rate 0.1 --trigger patch --target-class bag",
                    "blended": "--poison-rate 0.1 --trigger blended --target-class bag"},
        "objectives": {"clip": "--mode clip"},
        "defenses": {"none": None, "ft": {"script": "defend_finetune.py"},
                     "nad": {"script": "defend_nad.py", "teacher": "ft"}},
        "seeds": [0],
        "bar": "--bar-asr 10 --bar-ca-drop 3",
    }


def _progress(text):
    return {line.split("] ", 1)[1].split(":")[0].split()[0] + " " + line.split("] ", 1)[1].split(":")[0].split()[1]:
            line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("[study ")}


@pytest.mark.slow
def test_a_tiny_matrix_runs_skips_what_is_done_and_completes_after_a_kill(photos, tmp_path, capfd, monkeypatch):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(_tiny_study(photos), sort_keys=False))
    out = tmp_path / "out"
    argv = [str(spec), "--out", str(out), "--launcher", "none", "--quiet"]
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert run_main(study.main, argv) == 0
    first = _progress(capfd.readouterr().out)
    cells = ["clean clip/seed0"] + [f"{k} clip/{a}/seed0" for a in ("badnets", "blended")
                                    for k in ("victim", "ft", "nad", "report")]
    assert sorted(first) == sorted(cells) and all(v.startswith("done in") for v in first.values()), first
    rep = json.load(open(out / "report.json"))
    rows = rep["tables"]["clip"]["rows"]
    assert [(r["attack"], r["defense"]) for r in rows] == [(a, d) for a in ("badnets", "blended")
                                                           for d in ("clean", "none", "ft", "nad")]
    assert all(r["ca_top1"]["n"] == 1 and 0 <= r["ca_top1"]["mean"] <= 100 and r["asr"]["mean"] is not None
               for r in rows)
    assert all(t["verdict"].startswith("not testable") for t in rep["tables"]["clip"]["paired_tests"])
    assert rep["cell_minutes"] > 0 and rep["wall_minutes"] >= rep["cell_minutes"] * 0.5
    assert (out / "heatmap_clip.png").is_file() and (out / "clip" / "blended" / "report.md").is_file()
    assert (out / "logs" / "clip__badnets__seed0__nad.log").is_file()
    assert json.load(open(out / "clip" / "badnets" / "seed0" / "nad" / "config.json"))["teacher"].endswith(
        "clip/badnets/seed0/ft/model.safetensors")

    # a second run: every cell skipped, no process started, no file touched
    targets = [c.target for c in study.plan_cells(study.load_study(spec), str(out))]
    mtimes = {t: os.stat(t).st_mtime_ns for t in targets}
    monkeypatch.setattr(study, "run_cell", lambda *a, **k: pytest.fail("a done cell ran again"))
    assert run_main(study.main, argv) == 0
    second = _progress(capfd.readouterr().out)
    assert sorted(second) == sorted(cells) and all(v.startswith("skipped (done, it took") for v in second.values())
    assert {t: os.stat(t).st_mtime_ns for t in targets} == mtimes
    monkeypatch.undo()
    monkeypatch.setenv("TMPDIR", str(tmp_path))

    # killed mid-run after its last save: blended's NAD lost its model, its state/ is there; it is resumed
    # (test_a_stopped_run_is_resumed_... covers the other cases without processes)
    os.remove(out / "clip" / "blended" / "seed0" / "nad" / "model.safetensors")
    assert run_main(study.main, argv) == 0
    third = _progress(capfd.readouterr().out)
    assert third.pop("nad clip/blended/seed0").startswith("done in")
    assert third.pop("report clip/blended/seed0").startswith("done in")
    assert all(v.startswith("skipped (done") for v in third.values()), third
    log = (out / "logs" / "clip__blended__seed0__nad.log").read_text()
    assert log.count("\n$ ") == 2
    resumed = log.rsplit("\n$ ", 1)[1].split("\n")[0]
    assert resumed.endswith("--resume") and "--overwrite" not in resumed
    assert (out / "clip" / "blended" / "seed0" / "nad" / "model.safetensors").is_file()
    rows = json.load(open(out / "report.json"))["tables"]["clip"]["rows"]
    assert rows[7]["defense"] == "nad" and rows[7]["ca_top1"]["n"] == 1
