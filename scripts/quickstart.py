"""The main job: both pipelines end to end on an embedded model, stage by stage, with a report.

  python scripts/quickstart.py [--model smollm2|stories260K] [--config YAML] [--run_dir DIR] [--fresh]
      [--salmon.max_prompts N ...]   (every key of the config is also a flag: llama_mp/config.py)
  (bash scripts/quickstart.sh does the same after the set-up)

--model picks the config: smollm2 (the default: SmolLM2-135M-Instruct, converted by the set-up, in bf16 where the CPU
computes it natively) -> configs/quickstart.yaml; stories260K (the fast mechanics run) -> configs/quickstart_stories260K.yaml.
A config names its `model`. Stages (each runs the project's own scripts, under torchrun with `nproc` processes where
the step is distributed):
  llama_mp         stories260K: convert to the Meta layout (1 and 2 shards), sample with 2-way tensor parallelism;
                   smollm2: sample a few prompts in its chat template (tokens/s)
  salmon_responses two responses per OASST1 prompt (seeds 42 and 43), in the policy's chat format
  salmon_judge     self-judging under the principles, both orders; aggregation into reward-model data and DPO pairs;
                   with salmon.judge_eval_pairs > 0, first the judge's agreement with OASST1 human rankings
  reward_model     the principle-following reward model, evaluated on held-out synthetic and OASST1 human pairs;
                   with salmon.pmp_pairs > 0, first preference-model pre-training on OASST1 human pairs
  dpo              DPO of the policy on the step-1 pairs
  ppo              PPO of the policy against the reward model with the RL-time principles
  policy_eval      the DPO and PPO policies against the initial one on held-out prompts (OASST1 validation first
                   turns): reward-model score, KL, length, self-judge win rate (salmon.eval_prompts; 0 skips it)
  tabular          round 0 (SFT generator, anchors), one round of synthetic preference + DPO, ML efficiency
Each command of a stage is a step of llama_mp.stages: recorded in <run_dir>/stages.json once its outputs are
written, with the stage's status, seconds, peak memory and figures; a rerun skips finished steps and continues an
unfinished one where it stopped (jobs from their last chunk, trainers from their last checkpoint), so after a crash or
kill -9 at any instant the same command ends with the same outputs as an uninterrupted run. The run directory is
locked while a run (or any command of a killed one) uses it. --fresh starts over. At the end <run_dir>/report.json and report.md are written, with PNG pictures
(scripts/quickstart_report.py).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llama_mp import cli  # noqa: E402
from llama_mp.config import Arg, add_config_flags, load_config  # noqa: E402
from llama_mp.stages import RunDir  # noqa: E402
from llama_mp.jsonl import read_jsonl  # noqa: E402
from llama_mp.output_dir import latest_checkpoint, resume_args  # noqa: E402
from quickstart_report import write_report  # noqa: E402

MODELS = {  # model -> (the policy checkpoint, relative to the run directory or absolute; its tokenizer)
    "stories260K": ("stories260K_mp1", os.path.join(ROOT, "data/llama2c/tok512.model")),
    "smollm2": (os.path.join(ROOT, "checkpoints/smollm2-135m-instruct"), os.path.join(ROOT, "checkpoints/smollm2-135m-instruct")),
}
CONFIGS = {"smollm2": os.path.join(ROOT, "configs/quickstart.yaml"),
           "stories260K": os.path.join(ROOT, "configs/quickstart_stories260K.yaml")}
STAGES = ["llama_mp", "salmon_responses", "salmon_judge", "reward_model", "dpo", "ppo", "policy_eval", "tabular"]


@dataclass
class Salmon:
    """The SALMON stages' sizes; the *_flags lists go to the step scripts unchanged (any option of the command)."""
    max_prompts: int = 32  # OASST1 prompts answered twice and self-judged under every principle
    max_gen_len: int = 128  # response tokens
    max_response_tokens: int = 128  # judge prompt budget per response
    max_instruction_tokens: int = 64
    judge_eval_pairs: int = 0  # > 0: OASST1 best-vs-worst human pairs judged before any training
    judge_max_seq_len: int = 1536
    eval_prompts: int = 0  # > 0: held-out prompts of the DPO/PPO evaluation (policy_eval)
    # > 0: preference-model pre-training (SALMON's first reward-model stage) on this many OASST1 human pairs (best vs
    # worst answer) of the prompts after the file's first pmp_skip_prompts, which the judge agreement and the held-out
    # evaluation read; the reward model then trains on the synthetic pairs from it
    pmp_pairs: int = 0
    pmp_skip_prompts: int = 80
    rm_flags: list[Arg] = field(default_factory=list)
    pmp_flags: list[Arg] = field(default_factory=list)  # the PMP run's: after rm_flags (a later flag wins)
    dpo_flags: list[Arg] = field(default_factory=list)
    ppo_flags: list[Arg] = field(default_factory=list)
    eval_flags: list[Arg] = field(default_factory=list)


@dataclass
class Tabular:
    config: str = "configs/synfed_tiny.yaml"  # the round driver's own config (step0_coldstart.rounds)
    rounds: int = 1


@dataclass
class QuickstartConfig:
    model: str = "stories260K"  # smollm2 | stories260K
    # of every stage: the sampling commands' --dtype and the trainers' --precision (bf16 compute over float32 weights);
    # auto: bfloat16 where the CPU (or GPU) computes it natively. The held-out evaluation samples and rewards in it too
    # and takes its KL's log-probs in float32 (evaluate_policy --kl_precision).
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    run_dir: str = "runs/quickstart"
    nproc: int = 2  # processes per stage (torchrun on this machine)
    model_parallel_size: Optional[int] = None  # of every model stage (default: the stage's world size)
    salmon: Salmon = field(default_factory=Salmon)
    tabular: Tabular = field(default_factory=Tabular)


def check_pmp(cfg, config_file: str) -> None:
    """PMP trains on human pairs: the reward model's human check must read other prompts. Checked before any stage
    runs (the trainer refuses the overlap too, but only when its turn comes)."""
    s = cfg.salmon
    if not s.pmp_pairs or flag_value(s.rm_flags + s.pmp_flags, "--human_eval_file") == "":  # no human check
        return
    if not s.judge_eval_pairs:  # the trainer's default human check reads every OASST1 pair, PMP's among them
        raise ValueError(f"{config_file}: salmon.pmp_pairs needs salmon.judge_eval_pairs > 0 (the reward model's "
                         f"human check then reads those pairs only) or --human_eval_file \"\" in salmon.rm_flags")
    from llama_mp.prompts import prompt_keys, shares_prompt
    from step2_reward_model.human_pairs import MESSAGES, oasst_human_pairs, pmp_pairs
    trained = prompt_keys(pmp_pairs(MESSAGES, s.pmp_skip_prompts, s.pmp_pairs))  # the trainer's own rule
    shared = [p for p in oasst_human_pairs(MESSAGES, [], "worst")[:s.judge_eval_pairs] if shares_prompt(p, trained)]
    if shared:
        raise ValueError(f"{config_file}: PMP would train on {len(shared)} of the {s.judge_eval_pairs} prompts the "
                         f"human check reads; raise salmon.pmp_skip_prompts ({s.pmp_skip_prompts}) or lower "
                         f"salmon.judge_eval_pairs")


def flag_value(flags: list, name: str):
    """The value of the last `name` among a command's flags (a later flag wins), or None."""
    at = [i for i, f in enumerate(flags) if f == name]
    return flags[at[-1] + 1] if at and at[-1] + 1 < len(flags) else None


def kl_target(cfg: dict):
    """PPO's --kl_target among the config's ppo_flags (None when PPO runs with a fixed coefficient)."""
    value = flag_value(cfg.salmon.ppo_flags, "--kl_target")
    return None if value is None else float(value)


def sampling_dtype(choice: str) -> str:
    """The --dtype of the sampling commands: auto is bfloat16 where the CPU (or GPU) computes it natively."""
    if choice != "auto":
        return choice
    import torch
    from llama_mp.train import bf16_native
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bfloat16" if bf16_native(device) else "float32"


class Runner:
    """Runs commands with the stage's log, environment and peak-memory accounting."""

    def __init__(self, rd: RunDir, nproc: int, env: dict):
        self.rd, self.nproc, self.env = rd, nproc, env
        self.log = os.path.join(rd.path, "quickstart.log")
        self.peak_kb = 0

    def step(self, name: str, cmd: Callable[[], list[str]], env: dict = None, outputs: list[str] = None) -> None:
        """One command as a step of the run directory (skipped once recorded); cmd is built when it runs."""
        self.rd.step(name, lambda: self(cmd(), env), outputs)

    def __call__(self, cmd: list[str], env: dict = None) -> None:
        full_env = {**os.environ, "PYTHONPATH": ROOT, "NPROC_PER_NODE": str(self.nproc), **self.env, **(env or {})}
        if "OMP_NUM_THREADS" not in {**self.env, **(env or {})}:  # this machine's cores, shared by the processes
            full_env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // int(full_env["NPROC_PER_NODE"])))
        with open(self.log, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            process = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                       pass_fds=(self.rd.lock_fd,))
            _, status, usage = os.wait4(process.pid, 0)  # usage covers the command and every process it waited for
            process.returncode = os.waitstatus_to_exitcode(status)
        self.peak_kb = max(self.peak_kb, usage.ru_maxrss)
        if process.returncode != 0:
            raise ValueError(f"{self.log}: `{' '.join(cmd[:3])} ...` failed (exit {process.returncode}); "
                               f"see the log")


def python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def script(name: str, *args: str) -> list[str]:
    return ["bash", os.path.join(ROOT, "scripts", name), *args]


def metrics(path: str) -> list[dict]:
    return read_jsonl(path) if os.path.exists(path) else []


def count_lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def count_json(path: str) -> int:
    with open(path) as f:
        return len(json.load(f))


# ---- the stages: each runs its commands and returns its figures ---------------------------------------------------------
def stage_llama_mp(run: Runner, d: dict, cfg: dict) -> dict:
    if cfg.model == "smollm2":
        return sample_smollm2(run, d, cfg)
    for mp in (1, 2):  # deterministic: a step killed midway is redone whole (--overwrite of its own output)
        out = os.path.join(d["run"], f"stories260K_mp{mp}")
        run.step(f"convert_mp{mp}", lambda out=out, mp=mp: python(
            "llama_mp.convert", "llama2c", "--input", os.path.join(ROOT, "data/llama2c/stories260K.bin"),
            "--output_dir", out, "--model_parallel_size", str(mp), "--overwrite"))
    samples = os.path.join(d["run"], "samples.jsonl")
    run.step("generate", lambda: script(
        "launch.sh", "llama_mp.generate", "--ckpt_dir", d["mp2"], "--tokenizer_path", d["tokenizer"],
        "--prompts_file", os.path.join(ROOT, "data/prompts/stories_prompts.jsonl"), "--output_file", samples,
        "--max_gen_len", "96", "--temperature", "0.7", "--top_p", "0.9", "--seed", "42", "--overwrite"),
        {"NPROC_PER_NODE": "2"})
    records = read_jsonl(samples)
    tokens = sum(len(r["tokens"]) for r in records)
    return {"outputs": [d["policy"], d["mp2"], samples], "samples": len(records), "tokens": tokens,
            "mean_logprob": round(sum(sum(r["logprobs"]) for r in records) / max(tokens, 1), 4),
            "example": records[0]["prompt"] + records[0]["generation"]}


def sample_smollm2(run: Runner, d: dict, cfg: dict) -> dict:
    """The real model as the set-up converted it: a few prompts in its chat template, greedy, in the run's dtype."""
    if not os.path.isfile(os.path.join(d["policy"], "params.json")):
        run.step("convert_smollm2", lambda: python("llama_mp.embedded"))
    samples = os.path.join(d["run"], "samples.jsonl")
    start = time.perf_counter()
    run.step("generate", lambda: script(
        "launch.sh", "llama_mp.generate", "--ckpt_dir", d["policy"], "--prompts_file",
        os.path.join(ROOT, "data/prompts/chat_prompts.jsonl"), "--output_file", samples, "--max_gen_len", "64",
        "--temperature", "0", "--dtype", d["dtype"], "--max_seq_len", "512", "--overwrite"), {"NPROC_PER_NODE": "1"})
    seconds = time.perf_counter() - start
    records = read_jsonl(samples)
    tokens = sum(len(r["tokens"]) for r in records)
    return {"outputs": [samples], "samples": len(records), "tokens": tokens, "dtype": d["dtype"],
            "tokens_per_s_with_start": round(tokens / max(seconds, 1e-9), 1),
            "example": records[0]["prompt"] + " -> " + records[0]["generation"]}


def stage_salmon_responses(run: Runner, d: dict, cfg: dict) -> dict:
    s = cfg.salmon
    env = {"CKPT_DIR": d["policy"], "OUT_DIR": d["step1"], "MODEL_PARALLEL_SIZE": "1"}
    sizes = ["--max_prompts", str(s.max_prompts), "--max_gen_len", str(s.max_gen_len)]
    for i in (0, 1):  # resumable: a rerun of the same command continues from the last chunk
        run.step(f"response{i}", lambda i=i: script(f"generate_oasst1_response{i}.sh", *sizes, *d["sampling_flags"]), env,
                 [os.path.join(d["step1"], f"oasst1_response{i}.jsonl")])
    responses = [read_jsonl(os.path.join(d["step1"], f"oasst1_response{i}.jsonl")) for i in (0, 1)]
    texts = [r["output"] for rs in responses for r in rs if r.get("output") is not None]
    return {"outputs": [os.path.join(d["step1"], f"oasst1_response{i}.jsonl") for i in (0, 1)],
            "prompts": len(responses[0]), "responses": len(texts),
            "skipped": sum(len(rs) for rs in responses) - len(texts),
            "mean_response_chars": round(sum(map(len, texts)) / max(len(texts), 1), 1)}


def stage_salmon_judge(run: Runner, d: dict, cfg: dict) -> dict:
    s = cfg.salmon
    env = {"CKPT_DIR": d["policy"], "OUT_DIR": d["step1"], "MODEL_PARALLEL_SIZE": "1"}
    sizes = ["--max_response_tokens", str(s.max_response_tokens), "--max_instruction_tokens", str(s.max_instruction_tokens)]
    figures = {}
    if s.judge_eval_pairs:  # the judge's quality before anything is trained on its judgments
        agreement = os.path.join(d["step1"], "judge_agreement.json")
        run.step("judge_agreement", lambda: script(
            "launch.sh", "step1_synthetic_preference.judge_agreement", "--ckpt_dir", d["policy"], "--tokenizer_path",
            d["tokenizer"], "--max_pairs", str(s.judge_eval_pairs), "--output_file", agreement,
            "--max_response_tokens", str(s.max_response_tokens), "--max_instruction_tokens",
            str(s.max_instruction_tokens), "--max_seq_len", str(s.judge_max_seq_len),
            *d["sampling_flags"], "--model_parallel_size", str(cfg.model_parallel_size or cfg.nproc)),
            None, [agreement])
        with open(agreement) as f:
            figures["judge_agreement"] = json.load(f)["overall"]
    # the script judges, then aggregates; each part skips itself once complete
    run.step("judge", lambda: script("generate_synthetic_preference.sh", *sizes, *d["sampling_flags"]), env,
             [os.path.join(d["step1"], "oasst1_preference.jsonl")])
    run.step("aggregate", lambda: script("generate_synthetic_preference.sh"), env,
             [os.path.join(d["step1"], n) for n in ("synthetic_preference.json", "synthetic_preference_pairs.jsonl")])
    judgments = read_jsonl(os.path.join(d["step1"], "oasst1_preference.jsonl"))
    with open(os.path.join(d["step1"], "synthetic_preference.json")) as f:
        pairs = json.load(f)
    return {**figures, "outputs": [os.path.join(d["step1"], n) for n in (
                "oasst1_preference.jsonl", "synthetic_preference.json", "synthetic_preference_pairs.jsonl")],
            "judged_pairs": len(judgments), "reward_model_pairs": len(pairs),
            "dpo_pairs": count_lines(os.path.join(d["step1"], "synthetic_preference_pairs.jsonl"))}


def stage_reward_model(run: Runner, d: dict, cfg: dict) -> dict:
    out = os.path.join(d["run"], "rm")
    same_pairs = []  # the human check on the pairs the judge's agreement was measured on: the figures compare
    if cfg.salmon.judge_eval_pairs:
        same_pairs = ["--human_eval_against", "worst", "--human_eval_max_pairs", str(cfg.salmon.judge_eval_pairs)]
    s, start, figures = cfg.salmon, d["policy"], {}
    if s.pmp_pairs:  # preference-model pre-training on human pairs, then the synthetic pairs from its checkpoint
        pairs, pmp = os.path.join(d["step1"], "pmp_pairs.json"), os.path.join(d["run"], "rm_pmp")
        run.step("pmp_pairs", lambda: python(
            "step2_reward_model.human_pairs", "--output_file", pairs, "--skip_prompts", str(s.pmp_skip_prompts),
            "--max_pairs", str(s.pmp_pairs), "--overwrite"), None, [pairs])
        run.step("reward_model_pmp", lambda: script("train_reward_model.sh", *same_pairs, *d["precision"], *s.rm_flags,
                                                    *s.pmp_flags, *resume_args(pmp)),
                 {"CKPT_DIR": d["policy"], "TRAIN_FILE": pairs, "OUTPUT_DIR": pmp})
        start = latest_checkpoint(pmp)
        with open(os.path.join(pmp, "eval.json")) as f:
            figures["pmp"] = {"pairs": count_json(pairs), **json.load(f)}
    run.step("reward_model", lambda: script("train_reward_model.sh", *same_pairs, *d["precision"], *s.rm_flags,
                                            *resume_args(out)),
             {"CKPT_DIR": start, "TRAIN_FILE": os.path.join(d["step1"], "synthetic_preference.json"),
              "OUTPUT_DIR": out})
    with open(os.path.join(out, "eval.json")) as f:
        evaluation = json.load(f)
    curve = metrics(os.path.join(out, "metrics.jsonl"))
    return {"outputs": [out] + ([os.path.join(d["step1"], "pmp_pairs.json"), os.path.join(d["run"], "rm_pmp")]
                                if s.pmp_pairs else []), "steps": len(curve),
            "loss_first": curve[0]["loss"], "loss_last": curve[-1]["loss"], "eval": evaluation, **figures}


def stage_dpo(run: Runner, d: dict, cfg: dict) -> dict:
    out = os.path.join(d["run"], "dpo")
    run.step("dpo", lambda: script("train_dpo.sh", *d["precision"], *cfg.salmon.dpo_flags, *resume_args(out)),
             {"CKPT_DIR": d["policy"], "TRAIN_FILE": os.path.join(d["step1"], "synthetic_preference_pairs.jsonl"),
              "OUTPUT_DIR": out})
    curve = metrics(os.path.join(out, "metrics.jsonl"))
    keys = ("loss", "rewards/margin", "rewards/accuracy")
    return {"outputs": [out], "steps": len(curve), "first": {k: curve[0].get(k) for k in keys},
            "last": {k: curve[-1].get(k) for k in keys}}


def stage_ppo(run: Runner, d: dict, cfg: dict) -> dict:
    out = os.path.join(d["run"], "ppo")
    run.step("ppo", lambda: script("train_ppo.sh", *d["precision"], *cfg.salmon.ppo_flags, *resume_args(out)),
             {"CKPT_DIR": d["policy"], "RM_DIR": os.path.join(d["run"], "rm"), "OUTPUT_DIR": out})
    curve = metrics(os.path.join(out, "metrics.jsonl"))
    keys = ("reward/mean", "kl", "response_length")
    return {"outputs": [out], "steps": len(curve), "first": {k: curve[0].get(k) for k in keys},
            "last": {k: curve[-1].get(k) for k in keys}}


def stage_policy_eval(run: Runner, d: dict, cfg: dict) -> dict:
    s = cfg.salmon
    if not s.eval_prompts:
        return {"skipped": "salmon.eval_prompts is 0"}
    out = os.path.join(d["run"], "policy_eval.json")
    # one process with every thread: a short job, and data parallelism would split its few prompts; redone whole if
    # killed (complete: skipped)
    run.step("policy_eval", lambda: script(
        "launch.sh", "step3_rl.evaluate_policy", "--initial_ckpt", d["policy"], "--tokenizer_path", d["tokenizer"],
        "--policy", "dpo=" + os.path.join(d["run"], "dpo"), "--policy", "ppo=" + os.path.join(d["run"], "ppo"),
        "--reward_ckpt", os.path.join(d["run"], "rm"), "--output_file", out, "--num_prompts", str(s.eval_prompts),
        "--judge_dtype", d["dtype"], *d["precision"], "--overwrite", *s.eval_flags,
        "--exclude_prompts", os.path.join(ROOT, "data/oasst1/oasst1_prompts.json"),  # step 1's and PPO's prompts
        *([os.path.join(d["step1"], "pmp_pairs.json")] if s.pmp_pairs else [])),  # and PMP's
        {"NPROC_PER_NODE": "1"}, [out, os.path.splitext(out)[0] + ".samples.jsonl"])
    with open(out) as f:
        report = json.load(f)
    return {"outputs": [out, os.path.splitext(out)[0] + ".samples.jsonl"], "prompts": report["prompts"],
            "policies": report["policies"]}


def stage_tabular(run: Runner, d: dict, cfg: dict) -> dict:
    t, work = cfg.tabular, os.path.join(d["run"], "tabular")
    run.step("tabular", lambda: python("step0_coldstart.rounds", "--config", os.path.join(ROOT, t.config),
                                       "--workdir", work, "--ckpt_dir", d["policy"], "--tokenizer_path", d["tokenizer"],
                                       "--dtype", d["dtype"], "--precision", d["precision"][1],
                                       "--rounds", str(t.rounds),
                                       *(["--model_parallel_size", str(cfg.model_parallel_size)]
                                         if cfg.model_parallel_size else [])))
    with open(os.path.join(work, "report.json")) as f:
        report = json.load(f)
    notes = os.path.join(work, "notes.json")
    return {"outputs": [work], "ml_efficiency": report,
            "notes": json.load(open(notes)) if os.path.exists(notes) else {}}


RUNNERS = {"llama_mp": stage_llama_mp, "salmon_responses": stage_salmon_responses, "salmon_judge": stage_salmon_judge,
           "reward_model": stage_reward_model, "dpo": stage_dpo, "ppo": stage_ppo, "policy_eval": stage_policy_eval,
           "tabular": stage_tabular}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python scripts/quickstart.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="default: configs/quickstart.yaml (--model smollm2, the "
                                                         "default) or configs/quickstart_stories260K.yaml")
    parser.add_argument("--fresh", action="store_true", help="delete the run directory and start over")
    add_config_flags(parser, QuickstartConfig)  # every config key is also a flag: --run_dir, --salmon.max_prompts 8
    opts = parser.parse_args()
    if opts.model is not None and opts.model not in MODELS:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {opts.model!r}")
    config_file = opts.config or CONFIGS[opts.model or "smollm2"]
    cfg = load_config(QuickstartConfig, opts, config_file)
    if cfg.model not in MODELS:
        raise ValueError(f"{config_file}: model {cfg.model!r} is not one of {', '.join(MODELS)}")
    check_pmp(cfg, config_file)
    run_dir = os.path.abspath(os.path.join(ROOT, cfg.run_dir))
    rd = RunDir(run_dir, fresh=opts.fresh)
    policy, tokenizer = MODELS[cfg.model]
    dtype = sampling_dtype(cfg.dtype)
    d = {"run": run_dir, "policy": os.path.join(run_dir, policy), "tokenizer": tokenizer, "dtype": dtype,
         "sampling_flags": ["--dtype", dtype], "env": {"TOKENIZER": tokenizer},
         "precision": ["--precision", "bf16" if dtype == "bfloat16" else "fp32"],  # the trainers follow the dtype
         "mp2": os.path.join(run_dir, "stories260K_mp2"),
         "step1": os.path.join(run_dir, "step1")}
    if cfg.model_parallel_size:  # every model stage (the step scripts read MODEL_PARALLEL_SIZE)
        d["env"]["MODEL_PARALLEL_SIZE"] = str(cfg.model_parallel_size)
    for number, name in enumerate(STAGES, start=1):
        prefix = f"[quickstart {number}/{len(STAGES)} {name}]"
        if rd.stage(name):
            print(f"{prefix} done in an earlier run ({rd.stage(name)['seconds']} s), skipped", flush=True)
            continue
        print(f"{prefix} {time.strftime('%H:%M:%S')} started (log: {run_dir}/quickstart.log)", flush=True)
        run = Runner(rd, cfg.nproc, d["env"])
        start = time.perf_counter()
        try:
            figures = RUNNERS[name](run, d, cfg)
        except Exception:
            rd.record_stage(name, {"status": "failed", "seconds": round(time.perf_counter() - start, 1)})
            raise
        seconds = round(time.perf_counter() - start, 1)  # of the run that finished it
        rd.record_stage(name, {"status": "done", "seconds": seconds, "peak_rss_mib": round(run.peak_kb / 1024, 1),
                               "figures": figures})
        shown = {k: v for k, v in figures.items() if k not in ("outputs", "ml_efficiency", "example")}
        print(f"{prefix} done in {seconds} s: {json.dumps(shown)[:300]}", flush=True)
    stages = rd.state["stages"]
    report = {"model": cfg.model, "config": os.path.relpath(config_file, ROOT), "run_dir": run_dir,
              "stages": stages, "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1),
              "peak_rss_mib": max(s["peak_rss_mib"] for s in stages.values())}
    print(write_report(run_dir, report, kl_target(cfg)))


if __name__ == "__main__":
    cli.run(main)
