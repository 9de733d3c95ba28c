"""r1_s4: score every synthetic sample by how much it helps predict the anchors (gain_score) and by its status.

  python -m step0_coldstart.syn_addscore --dataset configs/tabular/abalone.yaml --raw_file runs/tabular/r1/abalone.raw.jsonl \
      --output_file runs/tabular/r1/abalone.score.jsonl --backend sklearn
  python -m step0_coldstart.syn_addscore ... --backend llm --ckpt_dir CKPT --tokenizer_path TOK [--model_parallel_size N]

Reads the raw samples and the contrast rows r1_s1 wrote beside them (<name>.contrast.jsonl). For every SUCCESS sample:
ds0 (the anchors predicted from their contrast rows, computed once), ds1 (the same with the sample as the first
example), each {"pairs", "missing", "score"}, and gain_score = ds1.score - ds0.score (see scorers.py for the metrics and
the two back-ends). Every sample gets status_score (SUCCESS 5, REDUNDANT_KEY 3, MISSING_KEY 2, CONVERSION_ERROR 1,
INVALID_ANSWER 0); a MISSING_KEY answer is rewritten from its parsed values, as the reference does. With `llm`, the
questions are answered with the llama_mp sampler (temperature 0.5, top_p 0.7, 64 new tokens by default; one seed per
question), sharded over data-parallel ranks and resumable: answers are appended as they finish and merged into
<output_file>.answers.jsonl, which a rerun reuses. The options are AddScoreOptions' (cli.ModelOptions' model keys
among them): every one also a key of a --config YAML file (flags over the file; llama_mp/config.py).
"""

import argparse
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from llama_mp import cli, distributed, jobs, outputs
from llama_mp.config import PositiveInt, parse_config, require
from llama_mp.jsonl import iter_jsonl, read_jsonl, write_jsonl_atomic
from llama_mp.prompts import prompt_id
from llama_mp.sampler import derive_seed
from step0_coldstart.scorers import LLMBackend, SklearnBackend, baseline, gain, scoring_prompts
from step0_coldstart.tabular import (ANSWER_LEAD, MISSING_KEY, STATUS_SCORE, SUCCESS, check_row, load_rows,
                                     load_schema, row_to_text, splits)


@dataclass
class AddScoreOptions(cli.ModelOptions):
    """r1_s4's options (the model keys: the llm back-end's scoring LLaMA): keys of --config's YAML and flags."""
    dataset: Optional[str] = field(default=None, metadata={"help": "data set YAML"})
    raw_file: Optional[str] = field(default=None, metadata={"help": "r1_s1's <name>.raw.jsonl"})
    contrast_file: Optional[str] = field(default=None, metadata={
        "help": "default: <name>.contrast.jsonl beside --raw_file"})
    output_file: Optional[str] = field(default=None, metadata={"help": "JSONL of the scored samples"})
    backend: Literal["sklearn", "llm"] = "sklearn"
    metric: Literal["f1", "mcc"] = field(default="f1", metadata={
        "help": "classification metric on the anchors' answers (llm; sklearn scores the gold label's probability)"})
    temperature: float = 0.5
    top_p: float = 0.7
    max_gen_len: PositiveInt = 64
    seed: int = field(default=1, metadata={"help": "of every llm answer (derive_seed); also seeds torch"})
    splits_dir: str = "runs/tabular/splits"


def question_id(question: str) -> str:
    return prompt_id(question)


def llm_answers(opts: AddScoreOptions, overwrite: bool, schema, anchors, contrasts,
                samples) -> Optional[dict[str, str]]:
    """Every distinct ds0/ds1 question answered once by the scoring LLaMA: {question_id: text} on rank 0, None on the
    other ranks. Answers already merged by a run that was stopped before writing its scores are reused."""
    questions = {question_id(p["question"]): p["question"] for p in scoring_prompts(schema, anchors, contrasts)}
    for s in samples:
        for p in scoring_prompts(schema, anchors, contrasts, s["result"]):
            questions[question_id(p["question"])] = p["question"]
    answer_file = opts.output_file + ".answers.jsonl"
    if outputs.is_complete([answer_file]) and not overwrite:
        answers = {r["id"]: r["text"] for r in read_jsonl(answer_file)}
        if set(questions) - set(answers):
            raise ValueError(f"{answer_file}: answers other questions than these samples ask (pass --overwrite)")
        return answers if distributed.global_rank() == 0 else None
    info, sampler = cli.build(opts, opts.seed)
    settings = {"ckpt_dir": opts.ckpt_dir, "tokenizer_path": opts.tokenizer_path, "max_seq_len": opts.max_seq_len,
                "raw_file": opts.raw_file, "contrast_file": opts.contrast_file, "temperature": opts.temperature,
                "top_p": opts.top_p, "max_gen_len": opts.max_gen_len, "seed": opts.seed}
    jobs.prepare(answer_file, settings, overwrite, info)
    items = [{"id": k, "question": q} for k, q in sorted(questions.items())]

    def process(chunk):
        seeds = [derive_seed(opts.seed, x["id"]) for x in chunk]
        outs = sampler.generate([x["question"] for x in chunk], opts.max_gen_len, opts.temperature, opts.top_p,
                                seed=seeds, truncate="left", desc="scoring answers")
        return [{"id": x["id"], "text": out.text} for x, out in zip(chunk, outs)]

    jobs.run(answer_file, items, lambda x: x["id"], sampler.max_batch_size, process, info, "syn_addscore")
    merged = jobs.merge(answer_file, lambda r: r["id"], info)
    return {r["id"]: r["text"] for r in merged} if info.is_main else None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.syn_addscore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_file (and its answers)")
    args, opts = parse_config(parser, AddScoreOptions)
    require(opts, "dataset", "raw_file", "output_file")
    if opts.backend == "llm" and not opts.ckpt_dir:  # --tokenizer_path defaults to the checkpoint's own
        raise ValueError("--backend llm needs --ckpt_dir (the scoring LLaMA; --tokenizer_path unless it carries one)")
    schema = load_schema(opts.dataset)
    rows = load_rows(schema)
    contrast_file = opts.contrast_file or os.path.join(os.path.dirname(opts.raw_file), f"{schema.name}.contrast.jsonl")
    opts.contrast_file = contrast_file
    anchors, contrasts = [], []
    for line, record in iter_jsonl(contrast_file):
        if not isinstance(record.get("anchor"), dict) or not isinstance(record.get("contrast"), list):
            raise ValueError(f"{contrast_file}:{line}: needs \"anchor\" and \"contrast\" (from syn_addprompt)")
        anchors.append(check_row(record["anchor"], schema, f"{contrast_file}:{line}"))
        contrasts.append([check_row(c, schema, f"{contrast_file}:{line}") for c in record["contrast"]])
    samples = []
    for line, record in iter_jsonl(opts.raw_file):
        if record.get("status") not in STATUS_SCORE or not isinstance(record.get("result"), dict):
            raise ValueError(f"{opts.raw_file}:{line}: a raw sample needs \"status\" and a \"result\" object")
        if record["status"] == SUCCESS:
            record["result"] = check_row(record["result"], schema, f"{opts.raw_file}:{line}", need_target=False)
        samples.append(record)
    if distributed.global_rank() == 0:
        outputs.claim([opts.output_file], outputs.command_settings(opts), args.overwrite)
    parsed = [s for s in samples if s["status"] == SUCCESS]
    if opts.backend == "llm":
        answers = llm_answers(opts, args.overwrite, schema, anchors, contrasts, parsed)
        if answers is None:
            return  # other ranks: rank 0 writes the scores
        backend = LLMBackend(lambda questions: [answers[question_id(q)] for q in questions])
    else:
        backend = SklearnBackend(schema, [rows[i] for i in splits(schema, len(rows), opts.splits_dir)["train"]])
    ds0 = baseline(backend, schema, anchors, contrasts, opts.metric)
    scored = []
    for s in samples:
        record = {k: v for k, v in s.items() if k not in ("reward_ds0", "reward_ds1")}
        record.update({"ds0": None, "ds1": None, "gain_score": None, "status_score": STATUS_SCORE[s["status"]]})
        if s["status"] == MISSING_KEY:
            record["answer"] = ANSWER_LEAD + row_to_text(s["result"], schema)
        if s["status"] == SUCCESS:
            record.update(gain(backend, schema, anchors, contrasts, s["result"], ds0, opts.metric))
        scored.append(record)
    write_jsonl_atomic(opts.output_file, scored)
    outputs.complete([opts.output_file])
    gains = [r["gain_score"] for r in scored if r["gain_score"] is not None]
    mean_gain = sum(gains) / len(gains) if gains else float("nan")
    print(f"scored {len(scored)} samples ({len(gains)} parsed) with {opts.backend}: ds0 score {ds0['score']:.3f}, "
          f"mean gain {mean_gain:+.3f} -> {opts.output_file}")


if __name__ == "__main__":
    cli.run(main)
