"""r1_s1: sample synthetic rows from the generator, parse them, and attach the ds0/ds1 scoring prompts.

  python -m step0_coldstart.syn_addprompt --dataset configs/tabular/abalone.yaml --ckpt_dir runs/tabular/sft/checkpoint-N \
      --tokenizer_path data/llama2c/tok512.model --prompt_file runs/tabular/r0/abalone_prompts.jsonl \
      --anchor_file runs/tabular/score_anchors/abalone_anchors.csv --output_dir runs/tabular/r1 \
      [--config configs/syn_addprompt.yaml] [--num_repeat 8 ...]

The options are SynConfig's and cli.ModelOptions' (ckpt_dir, tokenizer_path, max_seq_len, max_batch_size,
model_parallel_size, dtype): every one a key of --config's YAML (default configs/syn_addprompt.yaml) and a flag over
it (llama_mp/config.py).

Every held-out prompt is sampled `num_repeat` times with the llama_mp sampler (temperature, top_p, max_gen_len and seed
from syn_addprompt.yaml; one seed per sample, so a sample is the same in any batch or world size). Prompts are shared
across data-parallel ranks; finished samples are appended as they go and a rerun resumes. With `guided: true` the keys
are not left to the model: the schema's keys are written in order and the model writes each value restricted to the
column's type (a known category or label, scored as a whole; a number from digit tokens, null if they spell none), which a small generator needs
to produce rows of a table it never saw; the answer has the same text form either way. Each answer is parsed (status + typed values). For the parsed (SUCCESS) rows the ds0/ds1 prompts are
attached (see scorers.py: contrast rows picked once per anchor from the training split). Outputs:
  <output_dir>/<name>.raw.jsonl       {"syn_pmt_id", "syn_id", "prompt", "answer", "status", "result",
                                       "reward_ds0", "reward_ds1"}  (the reference's contract)
  <output_dir>/<name>.contrast.jsonl  {"anchor": row, "contrast": [rows]} per anchor, read by syn_addscore
"""

import argparse
import functools
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from llama_mp import cli, jobs
from llama_mp.config import parse_config, require
from llama_mp.jsonl import iter_jsonl, write_jsonl_atomic
from llama_mp.sampler import derive_seed
from step0_coldstart.scorers import contrast_rows, scoring_prompts
from step0_coldstart.tabular import (ANSWER_LEAD, SUCCESS, Schema, known_categories, load_rows, load_schema,
                                     parse_row, read_rows_csv, splits, target_text)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class SynConfig:
    """Which prompts are sampled, how, and where to: keys of --config's YAML (configs/syn_addprompt.yaml) and flags
    (the model's keys are cli.ModelOptions')."""
    dataset: Optional[str] = field(default=None, metadata={"help": "the held-out data set YAML"})
    prompt_file: Optional[str] = field(default=None, metadata={"help": "sft_generator's <name>_prompts.jsonl"})
    anchor_file: Optional[str] = field(default=None, metadata={"help": "synscore_anchors' <name>_anchors.csv"})
    output_dir: Optional[str] = None
    splits_dir: str = "runs/tabular/splits"
    num_repeat: int = field(default=4, metadata={"help": "samples per prompt"})
    temperature: float = 1.0
    top_p: float = 1.0
    max_gen_len: int = 256
    seed: int = field(default=42, metadata={
        "help": "of every sample (derive_seed) and of the contrast rows' clusters; also seeds torch"})
    guided: bool = field(default=False, metadata={"help": "keys from the schema, values sampled under the column's type"})
    max_value_tokens: int = field(default=16, metadata={"help": "per value, when guided"})
    contrast_clusters: int = field(default=4, metadata={
        "help": "KMeans clusters over the training rows for the ds0/ds1 contrast rows"})


def free_rows(sampler, prompts: list[str], seeds: list[int], config: SynConfig) -> list[str]:
    outs = sampler.generate(prompts, config.max_gen_len, config.temperature, config.top_p,
                            seed=seeds, truncate="left", desc="samples")
    return [out.text for out in outs]


@functools.lru_cache(maxsize=8)
def number_tokens(tokenizer, integer: bool) -> list[int]:
    """Token ids a number value may use: tokens whose text is digits, '-' (and '.' for floats), with or without leading
    spaces, a lone space, and the tokens that end a value (starting with ',' or '}', which the stop strings then cut).
    Checked on each token's text (tokenizer.token_texts), so SentencePiece and byte-level BPE alike."""
    chars = set("0123456789-" if integer else "0123456789.-")
    allowed = []
    for token_id, text in enumerate(tokenizer.token_texts()):
        body = text.lstrip(" ")
        if (body and set(body) <= chars) or text == " " or text[:1] in (",", "}"):
            allowed.append(token_id)
    return allowed


def choose(sampler, texts: list[str], candidates: list[str], temperature: float, seeds: list[int],
           reuse_cache: bool = False) -> list[str]:
    """One candidate per text, drawn from the model's probability of each candidate as the text's continuation
    (sum of its tokens' log-probs; argmax at temperature 0). Texts and candidates are encoded together, as in training."""
    if not candidates:  # a column with no known value (empty in every training row)
        return ["null"] * len(texts)
    logp = sampler.candidate_logprobs(texts, candidates, truncate="left", reuse_cache=reuse_cache)
    picks = []
    for scores, seed in zip(logp, seeds):
        scores = np.array(scores)
        if temperature <= 0:
            picks.append(candidates[int(scores.argmax())])
            continue
        probs = np.exp((scores - scores.max()) / temperature)
        u = random.Random(seed).random() * probs.sum()
        picks.append(candidates[min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(candidates) - 1)])
    return picks


def guided_rows(sampler, schema: Schema, prompts: list[str], seeds: list[int], config: SynConfig,
                categories: dict[str, list[str]], reuse_cache: bool = True) -> list[str]:
    """Keys written from the schema, each value drawn from the model restricted to the column's type: a category (or
    a class label) among `categories` (those of the training split: no value seen only in test rows); a number from
    digit tokens (the first number they spell, null if none). One sampler call per column for up to max_batch_size
    rows, each row kept in its KV-cache row from column to column: the prompt is computed once, not once per column
    (reuse_cache False: once per column, the same rows in float32; scripts/bench_guided.py times the two)."""
    if len(prompts) > sampler.max_batch_size:
        size = sampler.max_batch_size
        return [row for first in range(0, len(prompts), size)
                for row in guided_rows(sampler, schema, prompts[first:first + size], seeds[first:first + size],
                                       config, categories, reuse_cache)]
    temperature, answers = config.temperature, [ANSWER_LEAD + "{"] * len(prompts)
    for j, (column, kind) in enumerate(schema.columns.items()):
        answers = [a + (", " if j else "") + json.dumps(column) + ": " for a in answers]
        texts, column_seeds = [p + a for p, a in zip(prompts, answers)], [s + j for s in seeds]
        # column 0 starts from an empty cache row (the model may have changed since the last batch)
        reuse = reuse_cache and j > 0
        if kind == "category":
            known = categories.get(column, [])
            if column == schema.target and schema.task == "classification":
                known = [target_text(schema, c) for c in known]
            values = choose(sampler, texts, [json.dumps(c) for c in known], temperature, column_seeds, reuse)
        else:
            outs = sampler.generate(texts, config.max_value_tokens, temperature, config.top_p,
                                    stop=[",", "}"], seed=column_seeds, truncate="left",
                                    allowed_tokens=number_tokens(sampler.tokenizer, kind == "int"),
                                    reuse_cache=reuse, desc=f"values of {column}")
            numbers = [re.search(r"-?\d+(\.\d+)?" if kind == "float" else r"-?\d+", out.text) for out in outs]
            to_number = int if kind == "int" else float  # written back as JSON: "-0112" is not a JSON number
            values = [json.dumps(to_number(m.group(0))) if m else "null" for m in numbers]
        answers = [a + v for a, v in zip(answers, values)]
    return [a + "}" for a in answers]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.syn_addprompt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/syn_addprompt.yaml"),
                        help="YAML of SynConfig and model keys (every key is also a flag, over the file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing raw file (start over)")
    args, config, model = parse_config(parser, SynConfig, cli.ModelOptions)
    require(config, "dataset", "prompt_file", "anchor_file", "output_dir")
    require(model, "ckpt_dir")
    schema = load_schema(config.dataset)
    rows = load_rows(schema)
    train = [rows[i] for i in splits(schema, len(rows), config.splits_dir)["train"]]
    prompts = []
    for line, p in iter_jsonl(config.prompt_file):
        if not isinstance(p.get("prompt"), str) or "prompt_id" not in p:
            raise ValueError(f"{config.prompt_file}:{line}: needs \"prompt_id\" and \"prompt\" (from sft_generator)")
        prompts.append(p)
    if not prompts:
        raise ValueError(f"{config.prompt_file}: no prompt records (sft_generator writes them)")
    anchors = read_rows_csv(config.anchor_file, schema, "anchor")
    # the process group's torch seed is config.seed (every sample has its own, from derive_seed)
    info, sampler = cli.build(model, config.seed)
    raw_file = os.path.join(config.output_dir, f"{schema.name}.raw.jsonl")
    settings = {k: v for k, v in asdict(config).items() if k != "output_dir"}  # the outputs' place is not a setting
    jobs.prepare(raw_file, {"ckpt_dir": model.ckpt_dir, "tokenizer_path": model.tokenizer_path,
                            "max_seq_len": model.max_seq_len, **settings}, args.overwrite, info)
    items = [{"syn_pmt_id": p["prompt_id"], "syn_id": f"{p['prompt_id']}-{r}", "prompt": p["prompt"]}
             for p in prompts for r in range(config.num_repeat)]
    contrasts = contrast_rows(schema, train, anchors, config.contrast_clusters, config.seed)
    if info.is_main:  # deterministic; written first, so that a raw file never exists without it
        write_jsonl_atomic(os.path.join(config.output_dir, f"{schema.name}.contrast.jsonl"),
                           [{"anchor": a, "contrast": c} for a, c in zip(anchors, contrasts)])
    categories = known_categories(schema, train)  # of the training split only: no value seen only in test rows

    def process(chunk: list[dict]) -> list[dict]:
        texts, seeds = [x["prompt"] for x in chunk], [derive_seed(config.seed, x["syn_id"]) for x in chunk]
        answers = (guided_rows(sampler, schema, texts, seeds, config, categories) if config.guided
                   else free_rows(sampler, texts, seeds, config))
        records = []
        for x, answer in zip(chunk, answers):
            status, result = parse_row(answer, schema)
            record = {**x, "answer": answer, "status": status, "result": result}
            if status == SUCCESS:
                record["reward_ds0"] = scoring_prompts(schema, anchors, contrasts)
                record["reward_ds1"] = scoring_prompts(schema, anchors, contrasts, result)
            records.append(record)
        return records

    jobs.run(raw_file, items, lambda x: x["syn_id"], sampler.max_batch_size, process, info, "syn_addprompt")
    samples = jobs.merge(raw_file, lambda r: r["syn_id"], info)
    if info.is_main:
        counts = {}
        for s in samples:
            counts[s["status"]] = counts.get(s["status"], 0) + 1
        print(f"{len(samples)} samples of {schema.name} in {raw_file}: {json.dumps(counts)}", flush=True)


if __name__ == "__main__":
    cli.run(main)
