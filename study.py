"""The study command: one YAML file declares a matrix of attacks x defenses x objectives x seeds with its
recipes; this runs every cell of it (each a command of the other scripts) and writes one report.

    python study.py configs/studies/demo.yaml                 # the demo's cells, as `make demo` runs them
    python study.py configs/studies/reduced.yaml --dry-run    # print the commands, run nothing
    python study.py configs/studies/full.yaml --launcher "accelerate launch --config_file configs/accelerate/8gpu.yaml"
    python study.py configs/studies/full.yaml --attacks badnets --seeds 0 --keep-going

Cells (as the Makefile's demo targets, same commands, same dependencies):
  clean    per (objective, seed):         train_declip.py --config RECIPE ... --seed S --out-dir OUT/OBJ/clean/seedS
  victim   per (attack, objective, seed): continues the clean model on the attack's poisoned pairs
  defense  per (attack, objective, seed) and defense: from the victim (--ckpt victim, the defense recipe; a
           `teacher:` defense's model as --teacher), or `from: clean` (the victim's own command with the
           defense's script: RoCLIP, SafeCLIP; with `detect:`, detect_poison.py first, then --exclude-indices)
  report   per (attack, objective, seed): eval_zeroshot.py --report over clean, victim and the defenses
Then the study report: OUT/report.md, report.json and heatmap_OBJ.png (mean ± 95 % t-interval over the seeds,
paired t-tests of ASR between defenses, and of CA and ASR between every two objectives and every two attacks),
and OUT/OBJ/ATTACK/report.* (eval_zeroshot's mean ± std over seeds).

Every cell is a file target (a run directory's model.safetensors, detect's flagged.txt, the report.json): it is
skipped when that file exists, is newer than the files of the cells it needs and came from the same command
(OUT/cells.json records each cell's command and minutes); a run directory holding a stopped run's state/ is
continued with the script's --resume. Each cell runs through --launcher (default: accelerate launch, one
process with every core, as the Makefile's ACCEL) with its output teed to OUT/logs/. SIGTERM or Ctrl-C is passed
to the running cell as SIGTERM (it saves its state and stops); the study then exits 143 and the same command
continues it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_declip import Preempted, UserError, atomic_write, read_config, run_main

ROOT = Path(__file__).resolve().parent
MODEL_FILE = "model.safetensors"
REPORT_FILE = "report.json"
FLAGGED_FILE = "flagged.txt"  # detect_poison.FLAGGED_FILE (not imported: it would import torch for one name)
CELLS_FILE = "cells.json"
NONE = "none"  # the defense that is the victim itself
RESERVED = ("clean", "victim")  # the eval report's own row names
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

TOP_KEYS = {"name", "out", "launcher", "recipes", "attacks", "objectives", "defenses", "seeds", "bar"}
RECIPES = {"clean": "train_declip.py", "victim": "train_declip.py", "defense": None, "eval": "eval_zeroshot.py"}
RECIPE_KEYS = {"config", "flags"}
DEFENSE_KEYS = {"script", "flags", "from", "teacher", "detect"}
# flags the study writes into the commands itself; a recipe, attack, objective or defense giving one is refused
OWN_FLAGS = {"--seed", "--out-dir", "--overwrite", "--resume", "--config", "--init-from", "--ckpt", "--teacher",
             "--exclude-indices", "--report", "--names", "--aggregate", "--bar-asr", "--bar-ca-drop",
             "--optimize-trigger"}
ATTACK_KEYS = {"flags", "optimize"}
BAR_FLAGS = ("--bar-asr", "--bar-ca-drop")


# --------------------------------------------------------------------------------------------------------
# the study file


@dataclass
class Defense:
    name: str
    script: str | None = None  # None: the victim itself (`none`)
    flags: list = field(default_factory=list)
    start: str = "victim"  # "victim" (fine-tune it with the defense recipe) or "clean" (retrain the victim's command)
    teacher: str | None = None
    detect: list | None = None  # detect_poison.py flags (from: clean only); None = no detection step


@dataclass
class Study:
    name: str
    out: str
    launcher: list | None
    recipes: dict  # name -> {"config": path or None, "flags": [...]}
    attacks: dict  # name -> [flags]
    optimize: dict  # attack name -> poison_data.py flags of its optimised trigger (BadCLIP), or None
    objectives: dict  # name -> [flags]
    defenses: dict  # name -> Defense, in file order
    seeds: list
    bar: list


def _flags(value, key: str) -> list:
    """A flag list from YAML: a string (split as a shell would), a list of scalars, or null / '' = none."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as e:
            raise UserError(f"{key}: cannot split {value!r} into flags ({e}).") from None
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return [str(v) for v in value]
    raise UserError(f"{key}: expected flags as a string or a list of strings, got {value!r}.")


def _mapping(value, key: str, allowed=None, required=()) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{key}: expected a mapping, got {type(value).__name__}.")
    if allowed is not None:
        unknown = sorted(map(str, set(value) - set(allowed)))
        if unknown:
            raise UserError(f"{key}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"allowed: {', '.join(sorted(allowed))}.")
    missing = [k for k in required if k not in value]
    if missing:
        raise UserError(f"{key}: missing {', '.join(missing)}.")
    return value


def _names(value, key: str) -> dict:
    m = _mapping(value, key)
    if not m:
        raise UserError(f"{key}: declare at least one.")
    for name in m:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise UserError(f"{key}: {name!r} is not a usable name (letters, digits, '-', '_', '.'; it names "
                            "run directories).")
    return m


def parse_study(data, source: str = "the study") -> Study:
    """A Study from the YAML's mapping; every mistake is one UserError naming the key (flags themselves are
    checked against the scripts by check_flags)."""
    top = _mapping(data, source, TOP_KEYS, ("recipes", "attacks", "objectives", "defenses", "seeds"))
    recipes = {}
    for rname, rv in _mapping(top["recipes"], "recipes", RECIPES, ("clean", "victim")).items():
        r = _mapping(rv or {}, f"recipes.{rname}", RECIPE_KEYS)
        config = r.get("config")
        if config is not None:
            if not isinstance(config, str) or not (ROOT / config).is_file():
                raise UserError(f"recipes.{rname}.config: {config!r} is not a file (paths are relative to {ROOT}).")
        recipes[rname] = {"config": config, "flags": _flags(r.get("flags"), f"recipes.{rname}.flags")}
    recipes.setdefault("eval", {"config": None, "flags": []})
    attacks, optimize = {}, {}
    for k, v in _names(top["attacks"], "attacks").items():
        # flags, or {flags, optimize}: an optimised trigger (BadCLIP) is first optimised against the clean
        # model by poison_data.py --optimize-trigger with the `optimize` flags, then trained on
        a = _mapping(v, f"attacks.{k}", ATTACK_KEYS, ("flags", "optimize")) if isinstance(v, dict) else {"flags": v}
        attacks[k] = _flags(a["flags"], f"attacks.{k}.flags" if isinstance(v, dict) else f"attacks.{k}")
        optimize[k] = _flags(a["optimize"], f"attacks.{k}.optimize") if "optimize" in a else None
        if optimize[k] is not None and any(f in ("--trigger", "--trigger-param") for f in _flag_names(attacks[k])):
            raise UserError(f"attacks.{k}.flags: an attack with `optimize` trains on its optimised patch; "
                            "drop --trigger / --trigger-param.")
    objectives = {k: _flags(v, f"objectives.{k}") for k, v in _names(top["objectives"], "objectives").items()}
    defenses = {}
    for name, dv in _names(top["defenses"], "defenses").items():
        key = f"defenses.{name}"
        if name in RESERVED:
            raise UserError(f"{key}: '{name}' names the report's own row; call the defense something else.")
        if name == NONE:
            if dv:
                raise UserError(f"{key}: '{NONE}' is the victim itself and takes no settings; leave it empty.")
            defenses[name] = Defense(name)
            continue
        d = _mapping(dv or {}, key, DEFENSE_KEYS)
        start = d.get("from", "victim")
        if start not in ("victim", "clean"):
            raise UserError(f"{key}.from: {start!r}; use victim (fine-tune the victim) or clean (retrain the "
                            "victim's command from the clean model).")
        script = d.get("script", "train_declip.py" if "detect" in d else None)
        if not isinstance(script, str) or not script.endswith(".py") or not (ROOT / script).is_file():
            raise UserError(f"{key}.script: {script!r} is not a script of {ROOT} (e.g. defend_finetune.py).")
        detect = None
        if "detect" in d:
            if start != "clean":
                raise UserError(f"{key}.detect: detection retrains the victim's command without the flagged pairs; "
                                "it needs from: clean.")
            detect = [] if d["detect"] is True else _flags(d["detect"], f"{key}.detect")
        teacher = d.get("teacher")
        if teacher is not None and (not isinstance(teacher, str) or teacher == name):
            raise UserError(f"{key}.teacher: {teacher!r}; name another defense (e.g. ft).")
        defenses[name] = Defense(name, script, _flags(d.get("flags"), f"{key}.flags"), start, teacher, detect)
    for d in defenses.values():
        if d.teacher is not None:
            t = defenses.get(d.teacher)
            if t is None or t.script is None:
                raise UserError(f"defenses.{d.name}.teacher: {d.teacher!r} is not a trained defense of this study "
                                f"({', '.join(k for k, v in defenses.items() if v.script) or 'none'}).")
    _teacher_order(defenses)  # refuses cycles
    if any(d.script and d.start == "victim" for d in defenses.values()) and "defense" not in recipes:
        raise UserError("recipes.defense: the defenses that start from the victim need a defense recipe.")
    seeds = top["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds: expected a list of distinct integers, got {top['seeds']!r}.")
    bar = _flags(top.get("bar"), "bar")
    name = top.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise UserError(f"name: expected a string, got {name!r}.")
    out = top.get("out", f"runs/study/{name}")
    if not isinstance(out, str) or not out:
        raise UserError(f"out: expected a directory path, got {out!r}.")
    launcher = top.get("launcher")
    launcher = _flags(launcher, "launcher") if launcher is not None else None
    return Study(name, out, launcher, recipes, attacks, optimize, objectives, defenses, seeds, bar)


def load_study(path) -> Study:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}).") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]}).") from None
    try:
        return parse_study(data, str(path))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _teacher_order(defenses: dict) -> list:
    """The defenses in file order, each after its teacher (make's order for the demo's); refuses cycles."""
    order, busy = [], set()

    def visit(name):
        if name in order:
            return
        if name in busy:
            raise UserError(f"defenses.{name}.teacher: the teachers form a cycle.")
        busy.add(name)
        if defenses[name].teacher:
            visit(defenses[name].teacher)
        order.append(name)

    for name in defenses:
        visit(name)
    return order


def _options(script: str) -> set:
    """The option strings of a script's argparse parser (its module's build_parser())."""
    mod = importlib.import_module(Path(script).stem)
    if not hasattr(mod, "build_parser"):
        raise UserError(f"{script} has no build_parser(); the study runs the toolkit's scripts only.")
    return {s for a in mod.build_parser()._actions for s in a.option_strings}


def _flag_names(flags: list) -> list:
    return [f.split("=", 1)[0] for f in flags if f.startswith("-") and not re.match(r"^-\d", f)]


def check_flags(study: Study, plan: list) -> None:
    """Every flag of the YAML is one its script knows and none is one the study sets itself; every recipe
    --config has only keys of its script (train_declip's strict rule); the bar parses. Reads the scripts'
    parsers, so a flag another script gained is accepted as soon as it exists."""
    cache = {}

    def opts(script):
        if script not in cache:
            cache[script] = _options(script)
        return cache[script]

    def check(key, flags, scripts):
        for flag in _flag_names(flags):
            if flag in OWN_FLAGS:
                raise UserError(f"{key}: {flag} is set by the study itself; remove it.")
            for s in scripts:
                if flag not in opts(s):
                    raise UserError(f"{key}: {s} has no flag {flag} (see python {s} --help).")

    scripts = {k: sorted({c.cmd[0] for c in plan if c.recipe == k}) for k in RECIPES}
    for rname, r in study.recipes.items():
        check(f"recipes.{rname}.flags", r["flags"], scripts.get(rname, []))
        for s in scripts.get(rname, []):
            if r["config"] is not None:
                mod = importlib.import_module(Path(s).stem)
                try:
                    read_config(str(ROOT / r["config"]), mod.build_parser(), strict=s != "eval_zeroshot.py")
                except UserError as e:
                    raise UserError(f"recipes.{rname}.config: {e} (for {s})") from None
    poisoned = sorted({c.cmd[0] for c in plan if c.kind in ("victim", "defense") and c.recipe == "victim"})
    for name, flags in study.attacks.items():
        check(f"attacks.{name}", flags, poisoned)
        if study.optimize[name] is not None:
            check(f"attacks.{name}.optimize", study.optimize[name], ["poison_data.py"])
    trained = sorted({c.cmd[0] for c in plan if c.kind in ("clean", "victim", "defense")})
    for name, flags in study.objectives.items():
        check(f"objectives.{name}", flags, trained)
    for d in study.defenses.values():
        if d.script:
            check(f"defenses.{d.name}.flags", d.flags, [d.script])
        if d.detect is not None:
            check(f"defenses.{d.name}.detect", d.detect, ["detect_poison.py"])
    bar_of(study)
    for c in plan:  # the flags the study itself passes
        for flag in _flag_names(c.own):
            if flag not in opts(c.cmd[0]):
                raise UserError(f"{c.key}: {c.cmd[0]} takes no {flag}, which its cell needs; use a script that "
                                "does (or from: clean / victim as fits it).")


def bar_of(study: Study):
    """(max ASR, max CA drop) of the study's bar flags (--bar-asr / --bar-ca-drop, as eval_zeroshot.py takes
    them, checked by its _bar_args); None without a bar."""
    import eval_zeroshot as ez

    values, words = {}, list(study.bar)
    while words:
        flag, _, value = words.pop(0).partition("=")
        if flag not in BAR_FLAGS:
            raise UserError(f"bar: {flag} is not a bar flag; use {' and '.join(BAR_FLAGS)}.")
        value = value or (words.pop(0) if words else "")
        try:
            values[flag] = float(value)
        except ValueError:
            raise UserError(f"bar: {flag} needs a number, got {value!r}.") from None
    bar = argparse.Namespace(bar_asr=values.get("--bar-asr"), bar_ca_drop=values.get("--bar-ca-drop"))
    return ez._bar_args(bar)


# --------------------------------------------------------------------------------------------------------
# the cells


@dataclass
class Cell:
    kind: str  # clean | trigger | victim | defense | detect | report
    label: str  # what the progress line names
    cmd: list  # script + flags, without the launcher
    target: str  # the file whose existence means done
    deps: list  # targets of the cells it needs
    recipe: str | None = None  # which recipe's flags it carries (for check_flags)
    own: list = field(default_factory=list)  # the flags the study adds (checked against the script)
    key: str = ""  # the YAML key that declared it (for messages)

    @property
    def run_dir(self) -> str:
        return os.path.dirname(self.target)


def _out(study: Study, out: str | None) -> str:
    """The study directory as the commands name it: relative to the repository (cells run there) when inside it."""
    p = Path(out if out is not None else ROOT / study.out)
    p = p if p.is_absolute() else Path.cwd() / p
    p = Path(os.path.normpath(p))
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def paths(out: str, objective: str, attack: str | None, seed: int) -> dict:
    """Run directories of one (objective, seed) [and attack]: clean, and the attack's seed directory (victim/,
    each defense's directory, detect/, report.json), as the Makefile's $(D) = runs/demo/seedS."""
    p = {"clean": f"{out}/{objective}/clean/seed{seed}"}
    if attack is not None:
        p["cell"] = f"{out}/{objective}/{attack}/seed{seed}"
    return p


def plan_cells(study: Study, out: str) -> list:
    """Every cell in the order they run: per seed, per objective, the clean model, then per attack the victim,
    the defenses (each after its teacher; a detection before the first defense that needs it) and the report.
    Two cells with one target must have one command (then they are one cell)."""
    cells, by_target = [], {}

    def add(cell):
        have = by_target.get(cell.target)
        if have is not None:
            if have.cmd != cell.cmd:
                raise UserError(f"{cell.key} and {have.key} both write {cell.target} with different commands; "
                                "give them different names.")
            return have
        by_target[cell.target] = cell
        cells.append(cell)
        return cell

    rc, rv, rd, re_ = (study.recipes.get(k) for k in ("clean", "victim", "defense", "eval"))

    def config(r):
        return ["--config", r["config"]] if r and r["config"] is not None else []

    order = _teacher_order(study.defenses)
    w = max(7, *map(len, study.defenses))

    def label(what, where):
        return f"{what:<{w}} {where}"

    for seed in study.seeds:
        for obj, obj_flags in study.objectives.items():
            p = paths(out, obj, None, seed)
            clean_model = f"{p['clean']}/{MODEL_FILE}"
            own = ["--seed", str(seed), "--out-dir", p["clean"], "--overwrite"]
            add(Cell("clean", label("clean", f"{obj}/seed{seed}"),
                     ["train_declip.py", *config(rc), *rc["flags"], *obj_flags, *own], clean_model, [],
                     "clean", own, "recipes.clean"))
            for att, att_flags in study.attacks.items():
                d = paths(out, obj, att, seed)["cell"]
                victim_dir, victim_model = f"{d}/victim", f"{d}/victim/{MODEL_FILE}"
                poison_deps = [clean_model]
                if study.optimize[att] is not None:
                    patch = f"{d}/trigger/patch.png"
                    own = ["--optimize-trigger", patch, "--ckpt", p["clean"], "--seed", str(seed)]
                    add(Cell("trigger", label("trigger", f"{obj}/{att}/seed{seed}"),
                             ["poison_data.py", *study.optimize[att], *own], patch, [clean_model], None, own,
                             f"attacks.{att}.optimize"))
                    att_flags = [*att_flags, "--trigger", "optimized", "--trigger-param", f"path={patch}"]
                    poison_deps = [clean_model, patch]
                base = [*config(rv), *rv["flags"], *obj_flags, "--init-from", clean_model, *att_flags]
                own = ["--init-from", clean_model, "--seed", str(seed), "--out-dir", victim_dir, "--overwrite"]
                add(Cell("victim", label("victim", f"{obj}/{att}/seed{seed}"),
                         ["train_declip.py", *base, "--seed", str(seed), "--out-dir", victim_dir, "--overwrite"],
                         victim_model, poison_deps, "victim", own, f"attacks.{att}"))
                models = []
                for name in order:
                    df = study.defenses[name]
                    if df.script is None:
                        continue
                    run_dir = f"{d}/{name}"
                    key = f"defenses.{name}"
                    if df.start == "victim":
                        teach = ["--teacher", f"{d}/{df.teacher}/{MODEL_FILE}"] if df.teacher else []
                        own = ["--ckpt", victim_dir, *teach, "--seed", str(seed), "--out-dir", run_dir, "--overwrite"]
                        cmd = [df.script, *df.flags, *config(rd), *rd["flags"], *obj_flags, *own]
                        deps = [victim_model] + ([teach[1]] if teach else [])
                        cell = Cell("defense", label(name, f"{obj}/{att}/seed{seed}"), cmd, f"{run_dir}/{MODEL_FILE}",
                                    deps, "defense", own, key)
                    else:
                        deps, extra = list(poison_deps), []
                        if df.detect is not None:
                            detect_dir = f"{d}/detect"
                            dcmd = ["detect_poison.py", *df.detect, "--ckpt", victim_dir, "--out-dir", detect_dir]
                            det = add(Cell("detect", label("detect", f"{obj}/{att}/seed{seed}"), dcmd,
                                           f"{detect_dir}/{FLAGGED_FILE}", [victim_model], None,
                                           ["--ckpt", victim_dir, "--out-dir", detect_dir], f"{key}.detect"))
                            deps, extra = [*poison_deps, det.target], ["--exclude-indices", det.target]
                        own = ["--init-from", clean_model, "--seed", str(seed), "--overwrite", *extra,
                               "--out-dir", run_dir]
                        cmd = [df.script, *base, "--seed", str(seed), "--overwrite", *df.flags, *extra,
                               "--out-dir", run_dir]
                        cell = Cell("defense", label(name, f"{obj}/{att}/seed{seed}"), cmd, f"{run_dir}/{MODEL_FILE}",
                                    deps, "victim", own, key)
                    add(cell)
                    models.append((name, run_dir, cell.target))
                names = ["clean", "victim"] + [m[0] for m in models]
                own = ["--ckpt", p["clean"], victim_dir, *[m[1] for m in models], "--names", *names, "--report", d]
                cmd = ["eval_zeroshot.py", *own, *config(re_), *re_["flags"], *study.bar]
                add(Cell("report", label("report", f"{obj}/{att}/seed{seed}"), cmd, f"{d}/{REPORT_FILE}",
                         [clean_model, victim_model] + [m[2] for m in models], "eval", own, "recipes.eval"))
    return cells


# --------------------------------------------------------------------------------------------------------
# running them


def default_launcher() -> list:
    """The Makefile's ACCEL: accelerate launch, one process, every core this process may use."""
    exe = Path(sys.executable).parent / "accelerate"
    head = [str(exe), "launch"] if exe.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return head + ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                   "no", "--num_cpu_threads_per_process", str(cores)]


def launcher_of(spec) -> list:
    """--launcher / the YAML's launcher: a command prefix; 'none' (or '') = this Python, one process."""
    if spec is None:
        return default_launcher()
    words = shlex.split(spec) if isinstance(spec, str) else list(spec)
    if words in ([], ["none"]):
        return [sys.executable]
    return words


def _mtime(path) -> float | None:
    try:
        return os.stat(ROOT / path).st_mtime
    except OSError:
        return None


def _read_cells(out: str) -> dict:
    try:
        data = json.loads((ROOT / out / CELLS_FILE).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cells(out: str, records: dict) -> None:
    atomic_write(ROOT / out / CELLS_FILE, lambda p: p.write_text(json.dumps(records, indent=1) + "\n"))


def cell_status(cell: Cell, records: dict) -> tuple:
    """(state, why, command to run): state 'done', 'resume' or 'run'. Done = the target exists, is at least as
    new as every dependency's and (when the study ran it) came from this command. A training cell with a
    stopped run's state (SafeCLIP: its phases/) newer than its dependencies is continued: --resume (SafeCLIP: no
    --overwrite, which keeps its finished phases)."""
    t = _mtime(cell.target)
    deps = [_mtime(d) for d in cell.deps]
    newest_dep = max((m for m in deps if m is not None), default=None)
    rec = records.get(cell.target)
    changed = rec is not None and rec.get("cmd") != cell.cmd
    if t is not None and not changed and (newest_dep is None or t >= newest_dep):
        return "done", "", cell.cmd
    why = "its command changed" if t is not None and changed else (
        "a cell it needs is newer" if t is not None else "")
    if t is None and cell.kind in ("clean", "victim", "defense") and not changed:
        run_dir = ROOT / cell.run_dir
        safeclip = Path(cell.cmd[0]).name == "defend_safeclip.py"
        marks = [run_dir / "phases"] if safeclip else [run_dir / "state", run_dir / "state.old"]
        started = [m for m in marks if m.is_dir() and (not safeclip or any(m.iterdir()))]
        if started and (newest_dep is None or max(m.stat().st_mtime for m in started) >= newest_dep):
            cmd = [a for a in cell.cmd if a != "--overwrite"] + ([] if safeclip else ["--resume"])
            return "resume", "a stopped run", cmd
    return "run", why, cell.cmd


class _Stop:
    """SIGTERM / SIGINT while a cell runs: SIGTERM to the cell's process group (every process of a launch
    saves its state and stops), then the study stops with 128 + the signal."""

    def __init__(self):
        self.signum, self.proc = None, None

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False

    def _handle(self, signum, _frame):
        self.signum = self.signum or signum
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def run_cell(argv: list, log_path: Path, quiet: bool, stop: _Stop) -> int:
    """Run argv in the repository in a process group of its own, its output teed to log_path (and the
    terminal unless quiet); returns its exit status once every process holding its output has ended."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shlex.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            raise UserError(f"--launcher: cannot start {argv[0]} ({e.strerror}).") from None
        stop.proc = proc
        if stop.signum is not None:  # the signal came while the cell was starting
            stop._handle(stop.signum, None)
        out = sys.stdout.buffer
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            log.write(chunk)
            if not quiet:
                out.write(chunk)
                out.flush()
        rc = proc.wait()
        stop.proc = None
    return rc


def _fmt_min(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_study(out: str, cells: list, launcher: list, quiet=False, keep_going=False, on_report=None) -> dict:
    """Run the cells that are not done, in order; returns {target: status}."""
    import fcntl

    (ROOT / out).mkdir(parents=True, exist_ok=True)
    with open(ROOT / out / ".study.lock", "w") as lock, _Stop() as stop:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another study.py is running on {out}; wait for it or give another --out.") from None
        records = _read_cells(out)
        status, failed = {}, []
        width = len(str(len(cells)))
        for i, cell in enumerate(cells, 1):
            head = f"[study {i:>{width}}/{len(cells)}] {cell.label}"
            if stop.signum is not None:  # a signal between two cells
                raise Preempted(stop.signum, f"study: stopped by signal {stop.signum} before {cell.label.split()[0]} "
                                             f"({cell.run_dir}); the same command continues the study")
            missing = [d for d in cell.deps if status.get(d) in ("failed", "blocked")]
            if missing:
                status[cell.target] = "blocked"
                print(f"{head}: skipped, it needs {missing[0]}, which failed", flush=True)
                continue
            state, why, cmd = cell_status(cell, records)
            if state == "done":
                status[cell.target] = "skipped"
                rec = records.get(cell.target) or {}
                took = f", it took {rec['minutes']:.1f} min" if isinstance(rec.get("minutes"), (int, float)) else ""
                print(f"{head}: skipped (done{took})", flush=True)
                continue
            verb = "resuming" if state == "resume" else ("rerunning" if why else "running")
            print(f"{head}: {verb}{f' ({why})' if why else ''} ...", flush=True)
            t0 = time.time()
            log = ROOT / out / "logs" / (os.path.relpath(cell.run_dir, out).replace(os.sep, "__") + ".log")
            rc = run_cell(launcher + cmd, log, quiet, stop)
            took = time.time() - t0
            if stop.signum is not None or rc == 143:
                signum = stop.signum or signal.SIGTERM
                raise Preempted(signum, f"study: stopped by signal {signum} in {cell.label.split()[0]} "
                                        f"({cell.run_dir}) after {_fmt_min(took)}; a training cell saved its state; "
                                        "the same command continues the study")
            if rc != 0 or _mtime(cell.target) is None:
                status[cell.target] = "failed"
                what = f"exit {rc}" if rc != 0 else f"exit 0 but no {cell.target}"
                print(f"{head}: FAILED ({what}) after {_fmt_min(took)}; its output: {log}", flush=True)
                failed.append((cell, what, log))
                if not keep_going:
                    break
                continue
            status[cell.target] = "done"
            records[cell.target] = {"cmd": cell.cmd, "minutes": round(took / 60, 2),
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            _write_cells(out, records)
            print(f"{head}: done in {_fmt_min(took)}", flush=True)
            if cell.kind == "report" and on_report is not None:
                on_report(status)
    if failed:
        cell, what, log = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise UserError(f"{cell.label.split()[0]} {cell.run_dir} failed ({what}){more}; its output is in {log}; "
                        "fix it and rerun the same command (done cells are skipped).")
    return status


# --------------------------------------------------------------------------------------------------------
# the report


def t_interval(values) -> dict:
    """mean, sample std, n and the half-width of the two-sided 95 % t-interval of the mean (t_0.975,n-1 * s /
    sqrt(n), scipy.stats.t); ci95 None for n < 2. std and mean from eval_zeroshot's _mean_std."""
    import eval_zeroshot as ez
    from scipy import stats

    mean, std, n = ez._mean_std(values)
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n >= 2 and std is not None else None
    return {"mean": mean, "std": std, "n": n, "ci95": half,
            "values": [float(v) for v in values if ez._is_number(v)]}


def paired_test(a: list, b: list) -> dict:
    """Two-sided paired t-test (scipy.stats.ttest_rel) of two per-seed series (e.g. two defenses' ASR over the
    same seeds, in the same order); n < 3: not testable."""
    from scipy import stats

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    n = len(pairs)
    res = {"test": "paired t-test (scipy.stats.ttest_rel, two-sided)", "n": n, "t": None, "p": None,
           "mean_diff": (sum(x - y for x, y in pairs) / n) if n else None}
    if n < 3:
        res["verdict"] = f"not testable (n={n} < 3)"
        return res
    diffs = {round(x - y, 9) for x, y in pairs}
    if len(diffs) == 1:  # no spread in the differences: t is undefined (scipy gives nan)
        res["verdict"] = "not testable (the differences are identical on every seed)"
        return res
    r = stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs])
    res.update(t=float(r.statistic), p=float(r.pvalue))
    res["verdict"] = "differs beyond seed noise (p < 0.05)" if r.pvalue < 0.05 else "within seed noise (p ≥ 0.05)"
    return res


def _cell_text(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    if s["n"] == 1:
        return f"{s['mean']:.2f} (n=1)"
    return f"{s['mean']:.2f} ± {s['ci95']:.2f}"


def _seed_rows(path) -> dict:
    import eval_zeroshot as ez

    rep = ez._read_report(path)
    return {r["method"]: r for r in rep["rows"]}


def study_tables(study: Study, out: str, bar) -> dict:
    """Per objective: rows (attack, defense) with CA, ASR, CA drop vs victim / clean as t-interval dicts over
    the seeds whose report.json exists, the bar verdict (eval_zeroshot.aggregate_reports), and the paired
    ASR tests between every two defenses of each attack."""
    import eval_zeroshot as ez

    tables = {}
    for obj in study.objectives:
        rows, tests = [], []
        for att in study.attacks:
            reports = [(s, str(ROOT / paths(out, obj, att, s)["cell"] / REPORT_FILE)) for s in study.seeds]
            reports = [(s, p) for s, p in reports if os.path.isfile(p)]
            seeds = [s for s, _ in reports]
            per_seed = [_seed_rows(p) for _, p in reports]
            agg = {r["method"]: r for r in ez.aggregate_reports([p for _, p in reports], bar=bar)["rows"]} \
                if reports else {}
            asr_by = {}
            for name in ["clean"] + list(study.defenses):
                method = "victim" if name == NONE else name
                have = [(s, rs) for s, rs in zip(seeds, per_seed) if method in rs]
                ca = [rs[method].get("ca_top1") for _, rs in have]
                asr = [rs[method].get("asr") for _, rs in have]
                drop_v = [rs[method].get("ca_drop") for _, rs in have]  # eval_zeroshot's victim CA - CA
                drop_c = [rs["clean"]["ca_top1"] - rs[method]["ca_top1"] for _, rs in have
                          if method != "clean" and "clean" in rs]
                a = agg.get(method, {})
                by_seed = {s: {"ca_top1": rs[method].get("ca_top1"), "asr": rs[method].get("asr")} for s, rs in have}
                rows.append({"attack": att, "defense": name, "method": method, "seeds": [s for s, _ in have],
                             "per_seed": by_seed, "ca_top1": t_interval(ca), "asr": t_interval(asr),
                             "ca_drop_vs_victim": t_interval(drop_v), "ca_drop_vs_clean": t_interval(drop_c),
                             "meets_bar": a.get("meets_bar"), "meets_bar_seeds": a.get("meets_bar_seeds")})
                if name != "clean":
                    asr_by[name] = {s: v["asr"] for s, v in by_seed.items()}
            names = list(asr_by)
            for i, x in enumerate(names):
                for y in names[i + 1:]:
                    common = [s for s in seeds if s in asr_by[x] and s in asr_by[y]]
                    t = paired_test([asr_by[x][s] for s in common], [asr_by[y][s] for s in common])
                    tests.append({"attack": att, "a": x, "b": y, "seeds": common, **t})
        tables[obj] = {"rows": rows, "paired_tests": tests}
    return tables


AXES = {"objective": "attack", "attack": "objective"}   # the axis compared -> the one each table holds fixed


def axis_tests(study: Study, tables: dict, axis: str) -> list:
    """Paired t-tests over the common seeds between every two values A, B of `axis` ('objective': does the
    objective make the backdoor easier to plant or harder to remove? 'attack': does one attack plant more
    easily or survive the defenses better?), for each value of the other axis: of the victim's CA and of the
    victim's and each defense's ASR, and, between objectives, of the clean model's CA (attacks share it).
    Empty with one value of `axis`."""
    fixed = AXES[axis]
    values = {"objective": list(tables), "attack": list(study.attacks)}
    compared = values[axis]

    def per_seed(g, v):
        """{defense: per-seed CA and ASR} of value g of the fixed axis and value v of the compared one."""
        objective, attack = (v, g) if axis == "objective" else (g, v)
        return {r["defense"]: r["per_seed"] for r in tables[objective]["rows"] if r["attack"] == attack}

    quantities = ([("clean", "ca_top1")] if axis == "objective" else []) + [(NONE, "ca_top1")] + \
        [(d, "asr") for d in study.defenses]
    tests = []
    for g in values[fixed]:
        for i, a in enumerate(compared):
            for b in compared[i + 1:]:
                x, y = per_seed(g, a), per_seed(g, b)
                for defense, metric in quantities:
                    common = [s for s in study.seeds if s in x[defense] and s in y[defense]]
                    t = paired_test([x[defense][s][metric] for s in common], [y[defense][s][metric] for s in common])
                    tests.append({fixed: g, "a": a, "b": b, "defense": defense, "metric": metric, "seeds": common, **t})
    return tests


def _axis_tests_md(tests: list, axis: str) -> list:
    """One table per value of the other axis: a row per pair A, B of `axis`, a column per quantity, each cell
    mean(A − B) over the common seeds with the paired test's p (* = p < 0.05)."""
    fixed, names = AXES[axis], {"ca_top1": "CA", "asr": "ASR"}
    md = [f"## {axis.capitalize()}s compared", "",
          f"Per {fixed}, mean over the common seeds of {axis} A − {axis} B, in points, with the two-sided "
          "paired t-test's p over those seeds (scipy.stats.ttest_rel; * = p < 0.05, differs beyond seed noise; "
          "n < 3: not testable, n given instead; no spread: the same difference on every seed). The victim's ASR "
          "says how easily the backdoor is planted, each defense's how much of it survives.", ""]
    for g in dict.fromkeys(t[fixed] for t in tests):
        mine = [t for t in tests if t[fixed] == g]
        cols = list(dict.fromkeys((t["defense"], t["metric"]) for t in mine))
        md += [f"### {fixed.capitalize()} `{g}`", "",
               "| A − B | " + " | ".join(f"{'victim' if d == NONE else d} {names[m]}" for d, m in cols) + " |",
               "|---|" + "---:|" * len(cols)]
        for a, b in dict.fromkeys((t["a"], t["b"]) for t in mine):
            cells = []
            for d, m in cols:
                t = next(x for x in mine if (x["a"], x["b"], x["defense"], x["metric"]) == (a, b, d, m))
                if t["mean_diff"] is None:
                    cells.append("–")
                elif t["p"] is None:  # too few seeds, or the same difference on every seed
                    cells.append(f"{t['mean_diff']:+.2f} (" + (f"n={t['n']})" if t["n"] < 3 else "no spread)"))
                else:
                    p = format(t["p"], ".3f" if t["p"] >= 1e-3 else ".0e")
                    cells.append(f"{t['mean_diff']:+.2f} (p {p}){' *' if t['p'] < 0.05 else ''}")
            md.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
        md.append("")
    return md


def plot_heatmaps(study: Study, rows: list, path, objective: str) -> None:
    """ASR and CA drop vs the victim, attack x defense, means over the seeds (as eval_zeroshot's report.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks = list(study.attacks)
    defenses = [n for n in study.defenses]
    get = {(r["attack"], r["defense"]): r for r in rows}
    panels = [("asr", "ASR (%)", "Reds", (0, 100)), ("ca_drop_vs_victim", "CA drop vs victim (points)", "RdBu_r", None)]
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 2.2 + 1.5 * len(defenses)), 1.6 + 0.55 * len(attacks)),
                             dpi=120, squeeze=False)
    for ax, (key, title, cmap, lim) in zip(axes[0], panels):
        m = np.full((len(attacks), len(defenses)), np.nan)
        for i, a in enumerate(attacks):
            for j, d in enumerate(defenses):
                r = get.get((a, d))
                if r is not None and r[key]["mean"] is not None:
                    m[i, j] = r[key]["mean"]
        if lim is None:
            span = max(1.0, float(np.nanmax(np.abs(m)))) if np.isfinite(m).any() else 1.0
            lim = (-span, span)
        cm = plt.get_cmap(cmap).with_extremes(bad="#dddddd")
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cm, vmin=lim[0], vmax=lim[1], aspect="auto")
        for i in range(len(attacks)):
            for j in range(len(defenses)):
                v = m[i, j]
                x = (v - lim[0]) / (lim[1] - lim[0]) if np.isfinite(v) else 0.5  # where on the colour scale
                dark = x > 0.7 or (cmap == "RdBu_r" and x < 0.3)
                ax.text(j, i, "–" if np.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(defenses)))
        tilt = len(defenses) > 4
        ax.set_xticklabels(defenses, rotation=30 if tilt else 0, ha="right" if tilt else "center")
        ax.set_yticks(range(len(attacks)))
        ax.set_yticklabels(attacks)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    n = len(study.seeds)
    fig.suptitle(f"{study.name}: objective {objective}, mean over up to {n} seed{'s' if n != 1 else ''} "
                 "(none = the victim)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_report(study: Study, out: str, cells: list, argv: list, t_start: float, status=None) -> dict:
    """OUT/report.md, report.json, heatmap_OBJ.png, and OUT/OBJ/ATTACK/report.* (eval_zeroshot's mean ± std
    over the seeds' reports, its --aggregate) from the per-seed report.json files that exist."""
    import eval_zeroshot as ez

    bar = bar_of(study)
    od = ROOT / out
    for obj in study.objectives:
        for att in study.attacks:
            found = [str(ROOT / paths(out, obj, att, s)["cell"] / REPORT_FILE) for s in study.seeds]
            found = [p for p in found if os.path.isfile(p)]
            if found:
                ez.write_aggregate(od / obj / att, found, bar=bar)
    tables = study_tables(study, out, bar)
    records = _read_cells(out)
    minutes = {c.target: (records.get(c.target) or {}).get("minutes") for c in cells}
    known = [m for m in minutes.values() if isinstance(m, (int, float))]
    wall = (time.time() - t_start) / 60
    prov = {**ez.provenance(argv), "command": shlex.join(["study.py", *map(str, argv)])}
    n_reports = sum(1 for c in cells if c.kind == "report" and os.path.isfile(ROOT / c.target))
    total_reports = sum(1 for c in cells if c.kind == "report")
    md = [f"# Study `{study.name}`", "",
          f"- attacks: {', '.join(study.attacks)}; defenses: {', '.join(study.defenses)} (none = the victim); "
          f"objectives: {', '.join(study.objectives)}; seeds: {', '.join(map(str, study.seeds))}.",
          f"- per-seed reports: {n_reports} of {total_reports} (attack × objective × seed); cells: {len(cells)}.",
          "- each number: the mean over the seeds ± the half-width of its two-sided 95 % t-interval "
          "(t(0.975, n − 1) · s / √n, scipy.stats.t; s the sample standard deviation); n=1: the one value, no "
          "interval.",
          "- CA = clean zero-shot top-1 (%); ASR = triggered non-target test images classified as the target (%); "
          "CA drop vs victim / clean = that model's CA − the row's CA, per seed, in points.",
          ]
    if bar is not None:
        md.append(f"- bar ({ez._bar_terms(bar)}), checked on the means by eval_zeroshot; (k/n) = seeds meeting it "
                  "alone.")
    md.append(f"- wall time: {wall:.1f} min this invocation; the cells took {sum(known):.1f} min as last run "
              f"({len(known)} of {len(cells)} cells timed by the study, {CELLS_FILE}).")
    md.append("")
    for obj, t in tables.items():
        md += [f"## Objective `{obj}` ({shlex.join(study.objectives[obj]) or 'the recipes as they are'})", "",
               f"![ASR and CA drop, attack × defense](heatmap_{obj}.png)", "",
               "| attack | defense | CA top-1 (%) | ASR (%) | CA drop vs victim | CA drop vs clean |"
               + (" meets bar |" if bar else "") + " seeds |",
               "|---|---|---:|---:|---:|---:|" + ("---:|" if bar else "") + "---:|"]
        for r in t["rows"]:
            verdict = ""
            if bar:
                v = {True: "yes", False: "no", None: "–"}[r["meets_bar"]] if r["method"] not in ("clean", "victim") \
                    else "–"
                if r["method"] not in ("clean", "victim") and r["meets_bar_seeds"]:
                    v += " ({}/{})".format(*r["meets_bar_seeds"])
                verdict = f" {v} |"
            md.append(f"| {r['attack']} | {r['defense']} | {_cell_text(r['ca_top1'])} | {_cell_text(r['asr'])} | "
                      f"{_cell_text(r['ca_drop_vs_victim'])} | {_cell_text(r['ca_drop_vs_clean'])} |{verdict} "
                      f"{len(r['seeds'])} |")
        md += ["", "Paired tests of ASR between defenses over the seeds (scipy.stats.ttest_rel, two-sided; "
                   "differs beyond seed noise at p < 0.05; n < 3: not testable):", "",
               "| attack | A | B | n | mean ASR A − B | t | p | verdict |", "|---|---|---|---:|---:|---:|---:|---|"]
        for x in t["paired_tests"]:
            md.append(f"| {x['attack']} | {x['a']} | {x['b']} | {x['n']} | "
                      f"{'–' if x['mean_diff'] is None else format(x['mean_diff'], '.2f')} | "
                      f"{'–' if x['t'] is None else format(x['t'], '.3f')} | "
                      f"{'–' if x['p'] is None else format(x['p'], '.4f' if x['p'] >= 1e-4 else '.1e')} | "
                      f"{x['verdict']} |")
        md.append("")
        atomic_write(od / f"heatmap_{obj}.png", lambda p, rows=t["rows"], o=obj: plot_heatmaps(study, rows, p, o))
    across = {axis: axis_tests(study, tables, axis) for axis in AXES}
    for axis, tests in across.items():
        if tests:
            md += _axis_tests_md(tests, axis)
    md.append(ez.provenance_line(prov))
    rep = {"study": study.name, "attacks": list(study.attacks), "defenses": list(study.defenses),
           "objectives": {k: v for k, v in study.objectives.items()}, "seeds": study.seeds,
           "bar": {"asr": bar[0], "ca_drop": bar[1]} if bar else None,
           "interval": "two-sided 95 % t-interval of the mean (scipy.stats.t, n - 1 dof); ci95 = half-width",
           "tables": tables, "objective_tests": across["objective"],
           "attack_tests": across["attack"],
           "cells": [{"kind": c.kind, "target": c.target, "minutes": minutes[c.target],
                      "status": (status or {}).get(c.target, "done" if os.path.isfile(ROOT / c.target) else "missing")}
                     for c in cells],
           "wall_minutes": round(wall, 2), "cell_minutes": round(sum(known), 2), **prov}
    atomic_write(od / "report.md", lambda p: p.write_text("\n".join(md) + "\n", encoding="utf-8"))
    ez._write_json(od / "report.json", rep)
    return rep


# --------------------------------------------------------------------------------------------------------
# CLI


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="the study's YAML file (e.g. configs/studies/demo.yaml)")
    p.add_argument("--out", default=None, help="study directory (default: the YAML's out, else runs/study/NAME)")
    p.add_argument("--launcher", default=None,
                   help="command prefix of every cell, e.g. 'accelerate launch --num_processes 2 ...'; 'none' = "
                        "this Python, one process (default: the YAML's launcher, else the Makefile's ACCEL: "
                        "accelerate launch, one process with every core)")
    p.add_argument("--dry-run", action="store_true", help="print each cell's state and command; run nothing")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the study report from the "
                   "per-seed reports there are")
    p.add_argument("--keep-going", action="store_true", help="after a failed cell, run the cells that do not need it")
    p.add_argument("--quiet", action="store_true", help="cells' output to OUT/logs/ only, not the terminal")
    for axis in ("attacks", "objectives", "defenses"):
        p.add_argument(f"--{axis}", nargs="+", default=None, metavar="NAME",
                       help=f"only these {axis} of the YAML (cells they need run too)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="S", help="only these seeds of the YAML")
    return p


def _select(study: Study, args) -> Study:
    for axis in ("attacks", "objectives", "defenses", "seeds"):
        want = getattr(args, axis)
        if want is None:
            continue
        have = getattr(study, axis)
        bad = [w for w in want if w not in have]
        if bad:
            raise UserError(f"--{axis} {bad[0]}: not in the study's {axis} ({', '.join(map(str, have))}).")
        if isinstance(have, dict):
            keep = {k: v for k, v in have.items() if k in want}
            if axis == "defenses":  # a kept defense's teacher is kept too (as the Makefile's prerequisites)
                for name in list(keep):
                    t = have[name].teacher
                    while t and t not in keep:
                        keep[t] = have[t]
                        t = have[t].teacher
                keep = {k: v for k, v in have.items() if k in keep}
            setattr(study, axis, keep)
        else:
            setattr(study, axis, [s for s in have if s in want])
    return study


def main(argv=None):
    t_start = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    study = _select(load_study(args.study), args)
    out = _out(study, args.out)
    cells = plan_cells(study, out)
    check_flags(study, cells)
    launcher = launcher_of(args.launcher if args.launcher is not None else study.launcher)
    if args.dry_run:
        records = _read_cells(out)
        for i, c in enumerate(cells, 1):
            state, why, cmd = cell_status(c, records)
            note = {"done": "skip (done)", "resume": "resume", "run": f"run{f' ({why})' if why else ''}"}[state]
            print(f"# [{i}/{len(cells)}] {c.label}: {note}")
            if state != "done":
                print(shlex.join(launcher + cmd))
        print(f"# {len(cells)} cells; study directory {out}; nothing was run (--dry-run)")
        return None
    status = None
    if not args.report_only:
        status = run_study(out, cells, launcher, quiet=args.quiet, keep_going=args.keep_going,
                           on_report=lambda st: write_report(study, out, cells, argv, t_start, st))
    rep = write_report(study, out, cells, argv, t_start, status)
    print((ROOT / out / "report.md").read_text(encoding="utf-8"))
    print(f"study {study.name}: {len(cells)} cells in {rep['wall_minutes']:.1f} min this invocation "
          f"({rep['cell_minutes']:.1f} min of cells as last run) -> {out}/report.md", file=sys.stderr)
    return rep


if __name__ == "__main__":
    sys.exit(run_main(main))
