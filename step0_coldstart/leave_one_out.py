"""Leave one out: the round driver once per data set, that set held out, the others as SFT sources; one table.

  python -m step0_coldstart.leave_one_out --config configs/synfed_loo.yaml --workdir runs/loo \
      [--ckpt_dir D] [--tokenizer_path T] [--sft_lr 1e-5 ...] [--only med] [--dry_run]

The config (LeaveOneOutConfig, llama_mp/config.py: every key also a flag) lists `datasets` (every one is held out in
turn), `never_sft` (sets that are only ever held out: SynFed's `med`), `rounds`, `fold_overrides` ({data set name:
{RoundsConfig key: value}}, e.g. the site split for med) and any key of the round driver (step0_coldstart/rounds.py
RoundsConfig), given to every fold (ckpt_dir on the fold's command line, the others in its fold.yaml). Fold <name> runs
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
from dataclasses import dataclass, field, fields
from typing import Optional

import yaml

from llama_mp import cli
from llama_mp.config import PositiveInt, add_config_flags, build, config_values, flag_values, read_config
from llama_mp.jsonl import write_json_atomic, write_text_atomic
from step0_coldstart.evaluate import table
from step0_coldstart.rounds import RoundsConfig
from step0_coldstart.tabular import load_schema


@dataclass
class LeaveOneOutConfig:
    """The config's own keys; its other keys are RoundsConfig's, given to every fold."""
    datasets: list[str] = field(default_factory=list)  # every one is held out in turn (the others: SFT sources)
    never_sft: list[str] = field(default_factory=list)  # only ever held out (SynFed's med)
    rounds: PositiveInt = 1
    fold_overrides: dict[str, dict] = field(default_factory=dict)  # {data set name: {RoundsConfig key: value}}


OWN_KEYS = {f.name for f in fields(LeaveOneOutConfig)}
ROUNDS_KEYS = {f.name for f in fields(RoundsConfig)}


def load_config(path: str, opts: Optional[argparse.Namespace] = None) -> tuple[LeaveOneOutConfig, dict]:
    """(the config's own keys, the round driver's keys it gives every fold) from the YAML file, then the flags given
    (opts); every key known to LeaveOneOutConfig or RoundsConfig and of its type."""
    given = read_config(path, LeaveOneOutConfig, RoundsConfig)
    flags = flag_values(opts, LeaveOneOutConfig, RoundsConfig) if opts is not None else {}
    for where, values in ((path, given), ("--heldout", flags)):
        if "heldout" in values:
            raise ValueError(f"{where}: heldout is set per fold; list every data set under datasets")
    cfg = build(LeaveOneOutConfig, given, flags)
    if len(cfg.datasets) < 2 or len(set(cfg.datasets)) != len(cfg.datasets):
        raise ValueError(f"{path}: datasets must list at least two distinct data set YAMLs")
    stray = [d for d in cfg.never_sft if d not in cfg.datasets]
    if stray:
        raise ValueError(f"{path}: never_sft names {stray[0]!r}, which is not among datasets")
    return cfg, {k: v for k, v in {**given, **flags}.items() if k not in OWN_KEYS}


def fold_plan(cfg: LeaveOneOutConfig, shared: dict, workdir: str, ckpt_dir: str = None, tokenizer_path: str = None,
              config_path: str = "the config") -> list[dict]:
    """One fold per data set: {name, dir, config (the round driver's keys: `shared`, the fold's overrides, heldout and
    datasets), cmd (argv after the python executable)}."""
    names = [load_schema(path).name for path in cfg.datasets]
    shared = dict(shared)
    if tokenizer_path:
        shared["tokenizer_path"] = tokenizer_path
    overrides = {}
    for name, extra in cfg.fold_overrides.items():
        if name not in names:
            raise ValueError(f"{config_path}: fold_overrides.{name}: no data set of that name ({', '.join(names)})")
        bad = sorted(k for k in extra if k not in ROUNDS_KEYS or k in ("heldout", "datasets"))
        if bad:
            raise ValueError(f"{config_path}: fold_overrides.{name}: not a per-fold key of rounds.py: {bad}")
        overrides[name] = config_values(extra, f"{config_path}: fold_overrides.{name}", RoundsConfig)
    folds = []
    for heldout, name in zip(cfg.datasets, names):
        sources = [d for d in cfg.datasets if d != heldout and d not in cfg.never_sft]
        directory = os.path.join(workdir, name)
        config = {**shared, **overrides.get(name, {}), "heldout": heldout, "datasets": sources}
        cmd = ["-m", "step0_coldstart.rounds", "--config", os.path.join(directory, "fold.yaml"), "--workdir",
               directory, "--rounds", str(cfg.rounds)] + (["--ckpt_dir", ckpt_dir] if ckpt_dir else [])
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
    parser.add_argument("--config", required=True, help="YAML of LeaveOneOutConfig and RoundsConfig keys (every key "
                                                        "is also a flag, over the file)")
    parser.add_argument("--workdir", default="runs/loo")
    parser.add_argument("--only", action="append", default=[], help="run only this fold (a data set name; repeatable)")
    parser.add_argument("--dry_run", action="store_true", help="print each fold's command, run nothing")
    add_config_flags(parser, LeaveOneOutConfig, RoundsConfig)
    opts = parser.parse_args()
    cfg, shared = load_config(opts.config, opts)
    ckpt_dir = shared.pop("ckpt_dir", None)  # on each fold's command line, as printed
    folds = fold_plan(cfg, shared, opts.workdir, ckpt_dir=ckpt_dir, config_path=opts.config)
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
