"""Leave one out: the round driver once per data set, that set held out, the others as SFT sources; one table.

  python -m step0_coldstart.leave_one_out --config configs/synfed_loo.yaml --workdir runs/loo \
      [--ckpt_dir D] [--tokenizer_path T] [--only med] [--dry_run]

The config lists `datasets` (every one is held out in turn), `never_sft` (sets that are only ever held out: SynFed's
`med`), `rounds`, `fold_overrides` ({data set name: {rounds.py key: value}}, e.g. the site split for med) and any key
of the round driver (step0_coldstart/rounds.py DEFAULTS), given to every fold. Fold <name> runs
  python -m step0_coldstart.rounds --config <workdir>/<name>/fold.yaml --workdir <workdir>/<name> --rounds N
with fold.yaml = those keys + heldout: <name>'s YAML + datasets: the others (minus never_sft). Each fold resumes on its
own (its stages.json), so a rerun continues where a killed one stopped. Finally the folds' report.json files are
merged into <workdir>/loo_report.json {held-out set: {generator: figures}} and loo_report.md (evaluate's table, plus
each fold's SFT sources and notes). --dry_run prints the commands only.
"""

import argparse
import json
import os
import subprocess
import sys

import yaml

from llama_mp import cli
from llama_mp.jsonl import read_yaml, write_json_atomic, write_text_atomic
from step0_coldstart.evaluate import table
from step0_coldstart.rounds import DEFAULTS as ROUNDS_DEFAULTS
from step0_coldstart.tabular import load_schema

OWN_KEYS = {"datasets", "never_sft", "rounds", "fold_overrides"}


def load_config(path: str) -> dict:
    cfg = read_yaml(path, "leave-one-out config")
    unknown = sorted(set(cfg) - OWN_KEYS - set(ROUNDS_DEFAULTS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (its own: {sorted(OWN_KEYS)}; the rest: rounds.py's)")
    if "heldout" in cfg:
        raise ValueError(f"{path}: heldout is set per fold; list every data set under datasets")
    datasets = cfg.get("datasets")
    if not isinstance(datasets, list) or len(datasets) < 2 or len(set(datasets)) != len(datasets):
        raise ValueError(f"{path}: datasets must list at least two distinct data set YAMLs")
    never = cfg.get("never_sft") or []
    stray = [d for d in never if d not in datasets]
    if stray:
        raise ValueError(f"{path}: never_sft names {stray[0]!r}, which is not among datasets")
    if not isinstance(cfg.get("rounds", 1), int) or cfg.get("rounds", 1) < 1:
        raise ValueError(f"{path}: rounds must be a positive integer")
    return cfg


def fold_plan(cfg: dict, workdir: str, ckpt_dir: str = None, tokenizer_path: str = None,
              config_path: str = "the config") -> list[dict]:
    """One fold per data set: {name, dir, config (the round driver's keys), cmd (argv after the python executable)}."""
    names = [load_schema(path).name for path in cfg["datasets"]]
    shared = {k: v for k, v in cfg.items() if k not in OWN_KEYS}
    if tokenizer_path:
        shared["tokenizer_path"] = tokenizer_path
    overrides = cfg.get("fold_overrides") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ValueError(f"{config_path}: fold_overrides must map data set names to {{rounds.py key: value}}")
    for name, extra in overrides.items():
        if name not in names:
            raise ValueError(f"{config_path}: fold_overrides.{name}: no data set of that name ({', '.join(names)})")
        bad = sorted(k for k in extra if k not in ROUNDS_DEFAULTS or k in ("heldout", "datasets"))
        if bad:
            raise ValueError(f"{config_path}: fold_overrides.{name}: not a per-fold key of rounds.py: {bad}")
    folds = []
    for heldout, name in zip(cfg["datasets"], names):
        sources = [d for d in cfg["datasets"] if d != heldout and d not in (cfg.get("never_sft") or [])]
        directory = os.path.join(workdir, name)
        config = {**shared, **(overrides.get(name) or {}), "heldout": heldout, "datasets": sources}
        cmd = ["-m", "step0_coldstart.rounds", "--config", os.path.join(directory, "fold.yaml"), "--workdir",
               directory, "--rounds", str(cfg.get("rounds", 1))] + (["--ckpt_dir", ckpt_dir] if ckpt_dir else [])
        folds.append({"name": name, "dir": directory, "config": config, "cmd": cmd})
    return folds


def combine(folds: list[dict]) -> tuple[dict, str]:
    """The folds' reports as one {held-out set: {generator: figures}} and its markdown."""
    results, lines = {}, []
    for fold in folds:
        with open(os.path.join(fold["dir"], "report.json")) as f:
            results.update(json.load(f))
        notes_file = os.path.join(fold["dir"], "notes.json")
        notes = json.load(open(notes_file)) if os.path.exists(notes_file) else {}
        sources = ", ".join(load_schema(d).name for d in fold["config"]["datasets"])
        lines.append(f"- {fold['name']} held out; SFT on {sources}"
                     + "".join(f"; {k}: {v}" for k, v in notes.items()))
    return results, table(results) + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.leave_one_out", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", default="runs/loo")
    parser.add_argument("--ckpt_dir", default=None, help="the starting checkpoint (overrides the config's ckpt_dir)")
    parser.add_argument("--tokenizer_path", default=None, help="overrides the config's tokenizer_path")
    parser.add_argument("--only", action="append", default=[], help="run only this fold (a data set name; repeatable)")
    parser.add_argument("--dry_run", action="store_true", help="print each fold's command, run nothing")
    opts = parser.parse_args()
    cfg = load_config(opts.config)
    folds = fold_plan(cfg, opts.workdir, opts.ckpt_dir, opts.tokenizer_path, opts.config)
    unknown = sorted(set(opts.only) - {f["name"] for f in folds})
    if unknown:
        raise ValueError(f"--only {unknown[0]}: no fold of that name in {opts.config}")
    for fold in folds:
        if opts.only and fold["name"] not in opts.only:
            continue
        sources = ", ".join(load_schema(d).name for d in fold["config"]["datasets"])
        print(f"[loo] {fold['name']} held out, SFT on {sources}: {' '.join([sys.executable] + fold['cmd'])}",
              flush=True)
        if opts.dry_run:
            continue
        os.makedirs(fold["dir"], exist_ok=True)
        write_text_atomic(os.path.join(fold["dir"], "fold.yaml"), yaml.safe_dump(fold["config"], sort_keys=False))
        if subprocess.run([sys.executable, *fold["cmd"]]).returncode != 0:
            raise ValueError(f"{fold['dir']}: fold {fold['name']} failed; see {fold['dir']}/rounds.log")
    finished = [f for f in folds if os.path.exists(os.path.join(f["dir"], "report.json"))]
    if opts.dry_run or not finished:
        return
    results, markdown = combine(finished)
    write_json_atomic(os.path.join(opts.workdir, "loo_report.json"), results)
    write_text_atomic(os.path.join(opts.workdir, "loo_report.md"), markdown)
    print(markdown, end="")


if __name__ == "__main__":
    cli.run(main)
