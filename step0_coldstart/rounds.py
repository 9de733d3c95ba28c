"""The round driver: round 0 (cold start), then N rounds of synthetic preference + DPO, then ML efficiency.

  python -m step0_coldstart.rounds --config configs/synfed_tiny.yaml [--rounds 1] [--workdir runs/tabular] \
      [--ckpt_dir D] [--tokenizer_path T] [--dtype bfloat16] [--sft_lr 1e-3] ...

The options are RoundsConfig's: every one a key of the YAML file and a flag over it (llama_mp/config.py); an unknown
key or a value of the wrong type is a one-line error naming the file.

Stages, each a command of this step run as a subprocess and a step of llama_mp.stages (recorded in
<workdir>/stages.json once its outputs are written; an unfinished one is rerun and resumes), so a rerun after a kill
at any instant continues where it stopped:
  r0_s1 sft_generator -> r0 SFT (train_sft) -> r0_s2 sft_federated (real training rows) -> r0_s3 synscore_anchors ->
  for round k = 1..N: r1_s1 syn_addprompt with generator k-1 -> r1_s2 convert_raw_to_csv -> r1_s3 sft_federated
  (synthetic rows) -> r1_s4 syn_addscore (`scorer`: sklearn, or llm with the generator itself as the scoring model
  unless `scorer_ckpt` names one) -> r1_s5 convert_score_to_prefer -> DPO (step3_rl.train_dpo) -> generator k;
  finally the last generator is sampled once more, and step0_coldstart.evaluate reports every
  generator (SFT = generator 0, then each DPO round) beside the naive generator and real rows:
  <workdir>/report.json {dataset: {generator: {...}}} and report.md.
The stages that load a model (SFT, sampling, the llm scorer, DPO) go through scripts/launch.sh: torchrun with
NPROC_PER_NODE processes on one machine, or the tasks of an srun step.
A round whose samples give no preference pair keeps its generator (the DPO step is skipped, and the report says so).
"""

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from llama_mp import cli
from llama_mp.output_dir import latest_checkpoint, resume_args
from llama_mp.config import Arg, PositiveInt, parse_config
from llama_mp.jsonl import write_json_atomic, write_text_atomic
from llama_mp.stages import RunDir
from step0_coldstart.tabular import load_schema

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "launch.sh")


@dataclass
class RoundsConfig:
    """The round driver's options: keys of --config's YAML and flags (llama_mp/config.py)."""
    datasets: list[str] = field(default_factory=lambda: ["configs/tabular/adult.yaml", "configs/tabular/buddy.yaml",
                                                         "configs/tabular/california.yaml"])  # the SFT sources
    heldout: str = "configs/tabular/abalone.yaml"
    rounds: PositiveInt = 1  # of synthetic preference + DPO after the cold start
    ckpt_dir: str = "runs/stories260K"  # the starting checkpoint
    tokenizer_path: str = "data/llama2c/tok512.model"
    max_seq_len: int = 1536
    prompts_per_dataset: int = 100
    num_examples: int = 5
    heldout_examples: Optional[PositiveInt] = None  # in-context rows of the held-out prompts (default: num_examples)
    heldout_prompts: int = 16
    sample_batch_size: PositiveInt = 8  # rows sampled at once per process (in float32 the same rows at any size)
    sft_lr: float = 2e-3  # the cold-start SFT learning rate (scripts/r0_s1_gen_synsft.sh reads it from here)
    sft_epochs: float = 3  # TrainConfig.epochs is a float: 0.5 is half an epoch
    dpo_lr: float = 1e-4
    dpo_epochs: float = 1
    micro_batch_size: int = 4
    max_pairs: int = 1000
    eval_rows: int = 1000
    num_clusters: int = 32
    syn_config: str = "configs/syn_addprompt.yaml"
    scorer: Literal["sklearn", "llm"] = "sklearn"
    scorer_ckpt: Optional[str] = None  # the llm scorer's model (default: the generator itself)
    dtype: str = "auto"  # of the sampling stages
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # of the SFT and DPO trainings (auto: bf16 where native)
    model_parallel_size: Optional[int] = None  # of the model stages (default: the world size)
    sft_flags: list[Arg] = field(default_factory=list)  # more train_sft arguments, e.g. [--lora_rank, 16]
    dpo_flags: list[Arg] = field(default_factory=list)  # more train_dpo arguments
    fed_clients: int = 1
    fed_split_method: str = "none"
    sft_max_steps: int = 0


def run(cmd: list[str], log: str, launch: bool = False, lock_fd: int = None) -> None:
    """`python -m MODULE ARGS` (cmd = ["-m", MODULE, ARGS...]); launch=True: through scripts/launch.sh, i.e. torchrun
    with NPROC_PER_NODE processes (or srun tasks), for the stages that load a model."""
    print(f"[rounds] {' '.join(cmd[1:6])} ...", flush=True)
    argv = ["bash", LAUNCH, *cmd[1:]] if launch else [sys.executable, *cmd]
    with open(log, "a") as f:
        result = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, pass_fds=(lock_fd,) if lock_fd else ())
    if result.returncode != 0:
        raise ValueError(f"{log}: stage {' '.join(cmd[1:3])} failed (exit {result.returncode}); see the log")


def train(rd: RunDir, name: str, directory: str, cmd: list[str], log: str) -> None:
    """A training step: a killed one continues from its last checkpoint. <dir>/.done tells the r1_* scripts that the
    training is finished (they pick the generator by it)."""
    def finish():
        run(cmd + resume_args(directory), log, launch=True, lock_fd=rd.lock_fd)
        write_text_atomic(os.path.join(directory, ".done"), "")
    rd.step(name, finish)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.rounds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML of RoundsConfig keys over its defaults (every key is also a flag, e.g. --ckpt_dir)")
    parser.add_argument("--workdir", default="runs/tabular", help="where every stage writes (the run directory)")
    opts, cfg = parse_config(parser, RoundsConfig)
    if not os.path.exists(os.path.join(cfg.ckpt_dir, "params.json")):
        raise FileNotFoundError(f"{cfg.ckpt_dir}: no checkpoint (convert one: python -m llama_mp.convert llama2c ...)")
    work = opts.workdir
    rd = RunDir(work)

    def step(name: str, outputs: list[str], cmd: list[str], launch: bool = False) -> None:
        rd.step(name, lambda: run(cmd, log, launch, rd.lock_fd), outputs)

    log, splits_dir = os.path.join(work, "rounds.log"), os.path.join(work, "splits")
    name = load_schema(cfg.heldout).name  # every stage names its files after the data set
    common = ["--tokenizer_path", cfg.tokenizer_path, "--max_seq_len", str(cfg.max_seq_len)]
    # the stages that load a model (default model-parallel size: the world size, which must divide n_kv_heads)
    model_flags = ["--model_parallel_size", str(cfg.model_parallel_size)] if cfg.model_parallel_size else []
    r0 = os.path.join(work, "r0")
    step("r0_s1", [os.path.join(r0, n) for n in ("sft_train.jsonl", f"{name}_prompts.jsonl", "lengths.json")],
         ["-m", "step0_coldstart.sft_generator", "--datasets", *cfg.datasets, "--heldout", cfg.heldout,
             "--output_dir", r0, "--splits_dir", splits_dir, "--prompts_per_dataset", str(cfg.prompts_per_dataset),
             "--heldout_prompts", str(cfg.heldout_prompts), "--num_examples", str(cfg.num_examples),
             *(["--heldout_examples", str(cfg.heldout_examples)] if cfg.heldout_examples else []), *common])
    sft_dir = os.path.join(work, "sft")
    train(rd, "sft", sft_dir, ["-m", "step0_coldstart.train_sft", *model_flags, "--ckpt_dir", cfg.ckpt_dir,
                               "--train_file", os.path.join(r0, "sft_train.jsonl"), "--output_dir", sft_dir,
                               "--lr", str(cfg.sft_lr), "--epochs", str(cfg.sft_epochs),
                               "--max_steps", str(cfg.sft_max_steps),
                               "--micro_batch_size", str(cfg.micro_batch_size), *common, "--precision", cfg.precision,
                               *cfg.sft_flags], log)
    fed = ["--num_client", str(cfg.fed_clients), "--split_method", cfg.fed_split_method, "--splits_dir", splits_dir]
    clients = lambda d: [os.path.join(d, f"{name}_client_{i}.train.jsonl") for i in range(cfg.fed_clients)]  # noqa: E731
    step("r0_s2", clients(os.path.join(work, "fed")),
         ["-m", "step0_coldstart.sft_federated", "--dataset", cfg.heldout, "--output_dir", os.path.join(work, "fed"),
          *fed])
    anchors = os.path.join(work, "score_anchors", f"{name}_anchors.csv")
    step("r0_s3", [anchors], ["-m", "step0_coldstart.synscore_anchors", "--dataset", cfg.heldout, "--num_clusters",
             str(cfg.num_clusters), "--output_dir", os.path.dirname(anchors), "--splits_dir", splits_dir])
    generators = [("sft", latest_checkpoint(sft_dir))]
    notes = {}
    for k in range(1, cfg.rounds + 2):  # the last pass only samples, to evaluate the last generator
        label, ckpt = generators[-1]
        out = os.path.join(work, f"r{k}")
        raw, syn_csv, score = (os.path.join(out, f"{name}.{kind}") for kind in ("raw.jsonl", "syn.csv", "score.jsonl"))
        step(f"r{k}_s1", [raw], ["-m", "step0_coldstart.syn_addprompt", *model_flags, "--dataset", cfg.heldout, "--ckpt_dir", ckpt, "--prompt_file",
                 os.path.join(r0, f"{name}_prompts.jsonl"), "--anchor_file", anchors, "--output_dir", out,
                 "--splits_dir", splits_dir, "--max_batch_size", str(cfg.sample_batch_size),
                 "--config", cfg.syn_config, *common, "--dtype", cfg.dtype],
             launch=True)
        step(f"r{k}_s2", [syn_csv], ["-m", "step0_coldstart.convert_raw_to_csv", "--dataset", cfg.heldout,
                                     "--raw_file", raw, "--output_file", syn_csv])
        if k > cfg.rounds:
            break
        step(f"r{k}_s3", clients(os.path.join(out, "fed")),
             ["-m", "step0_coldstart.sft_federated", "--dataset", cfg.heldout, "--input_file", syn_csv,
              "--output_dir", os.path.join(out, "fed"), *fed])
        scorer = ["--backend", cfg.scorer]
        if cfg.scorer == "llm":
            scorer += [*model_flags, "--ckpt_dir", cfg.scorer_ckpt or ckpt, "--max_batch_size", "8", *common, "--dtype", cfg.dtype]
        step(f"r{k}_s4", [score], ["-m", "step0_coldstart.syn_addscore", "--dataset", cfg.heldout, "--raw_file", raw,
                                   "--output_file", score, "--splits_dir", splits_dir, *scorer],
             launch=cfg.scorer == "llm")
        pairs = os.path.join(out, f"{name}.pref.jsonl")
        step(f"r{k}_s5", [pairs], ["-m", "step0_coldstart.convert_score_to_prefer", "--score_file", score,
                                   "--output_file", pairs, "--max_pairs", str(cfg.max_pairs)])
        with open(pairs) as f:
            n_pairs = sum(1 for line in f if line.strip())
        if n_pairs == 0:
            notes[f"dpo{k}"] = "no preference pair: the generator is kept unchanged"
            generators.append((f"dpo{k}", ckpt))
            continue
        dpo_dir = os.path.join(work, f"dpo{k}")
        train(rd, f"dpo{k}", dpo_dir, ["-m", "step3_rl.train_dpo", *model_flags, "--ckpt_dir", ckpt,
                                       "--train_file", pairs, "--rejected_key", "rejected", "--prompt_format", "plain",
                                       "--output_dir", dpo_dir, "--lr", str(cfg.dpo_lr),
                                       "--epochs", str(cfg.dpo_epochs),
                                       "--micro_batch_size", str(cfg.micro_batch_size),
                                       "--max_prompt_len", str(cfg.max_seq_len),
                                       *common, "--precision", cfg.precision, *cfg.dpo_flags], log)
        generators.append((f"dpo{k}", latest_checkpoint(dpo_dir)))
    synthetic = []
    for k, (label, _) in enumerate(generators, start=1):
        raw_file = os.path.join(work, f"r{k}", f"{name}.raw.jsonl")  # every sample: the valid share is of them all
        synthetic += ["--synthetic", f"{label}={raw_file}"]
    report = os.path.join(work, "report.json")
    step("evaluate", [report], ["-m", "step0_coldstart.evaluate", "--dataset", cfg.heldout, "--n_rows",
                                str(cfg.eval_rows), "--splits_dir", splits_dir, "--output_file", report, *synthetic])
    with open(report) as f:
        results = json.load(f)
    from step0_coldstart.evaluate import table
    write_json_atomic(os.path.join(work, "notes.json"), notes)
    write_text_atomic(os.path.join(work, "report.md"),
                      table(results) + "\n" + "".join(f"\n- {k}: {v}" for k, v in notes.items()) + "\n")
    print(table(results))
    for k, v in notes.items():
        print(f"note: {k}: {v}")


if __name__ == "__main__":
    cli.run(main)
