"""Round 1 sampling and scoring: r1_s1 (syn_addprompt) and r1_s4 (syn_addscore, `sklearn` back-end).

  python -m step0_coldstart.syn_round --dataset configs/tabular/abalone.yaml --ckpt_dir runs/tabular/sft/checkpoint-N \
      --tokenizer_path data/llama2c/tok512.model --prompt_file runs/tabular/r0/abalone_prompts.jsonl \
      --anchor_file runs/tabular/score_anchors/abalone_anchors.csv --output_dir runs/tabular/r1 \
      [--config configs/syn_addprompt.yaml]

For each held-out prompt the generator writes `num_repeat` rows with the llama_mp sampler (temperature / top_p / max
new tokens from syn_addprompt.yaml; one seed per sample); each output is parsed (status and typed values). Samples are
appended as they finish and a rerun resumes. Raw records (the reference's contract):
  <output_dir>/<name>.raw.jsonl    {"syn_pmt_id", "syn_id", "prompt", "answer", "status", "result"}
then every parsed sample is scored by how much it helps a nearest-neighbour model predict the anchors when added to the
real rows its prompt showed (gain_score), and every sample gets the reference's status_score:
  <output_dir>/<name>.score.jsonl  raw fields + {"ds0", "ds1", "gain_score", "status_score"}
which convert_score_to_prefer turns into DPO pairs; <output_dir>/<name>.syn.csv holds the parsed rows.
"""

import argparse
import csv
import hashlib
import json
import os

import yaml

from llama_mp import cli, jobs
from llama_mp.jsonl import read_jsonl, write_jsonl_atomic
from step0_coldstart.evaluate import Encoder
from step0_coldstart.scorers import sklearn_gain
from step0_coldstart.synscore_anchors import write_csv
from step0_coldstart.tabular import STATUS_SCORE, SUCCESS, Schema, cast, load_rows, load_schema, parse_row, splits

DEFAULTS = {"num_repeat": 4, "temperature": 1.0, "top_p": 1.0, "max_gen_len": 256, "seed": 42}


def read_anchors(path: str, schema: Schema) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: anchor CSV not found (run step0_coldstart.synscore_anchors)")
    with open(path, newline="", encoding="utf-8") as f:
        anchors = []
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                anchors.append({c: None if row[c] == "" else cast(row[c], k) for c, k in schema.columns.items()})
            except (KeyError, ValueError):
                raise ValueError(f"{path}:{line}: not a row of {schema.name} ({schema.path})") from None
    return anchors


def score_samples(schema: Schema, encoder: Encoder, samples: list[dict], contexts: dict[str, list[dict]],
                  anchors: list[dict], metric: str) -> list[dict]:
    scored = []
    for s in samples:
        record = {**s, "status_score": STATUS_SCORE[s["status"]], "gain_score": None}
        if s["status"] == SUCCESS:
            record.update(sklearn_gain(schema, encoder, s["result"], contexts[s["syn_pmt_id"]], anchors, metric))
        scored.append(record)
    return scored


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.syn_round", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from llama_mp.cli import add_model_args
    add_model_args(parser)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--prompt_file", required=True)
    parser.add_argument("--anchor_file", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--config", default="configs/syn_addprompt.yaml")
    parser.add_argument("--splits_dir", default="runs/tabular/splits")
    parser.add_argument("--metric", choices=["f1", "mcc"], default="f1", help="classification metric on the anchors")
    parser.add_argument("--overwrite", action="store_true")
    opts = parser.parse_args()
    config = dict(DEFAULTS)
    if os.path.exists(opts.config):
        with open(opts.config, encoding="utf-8") as f:
            config.update(yaml.safe_load(f) or {})
    schema = load_schema(opts.dataset)
    rows = load_rows(schema)
    train = [rows[i] for i in splits(schema, len(rows), opts.splits_dir)["train"]]
    prompts = read_jsonl(opts.prompt_file)
    for number, p in enumerate(prompts, start=1):
        if not isinstance(p.get("prompt"), str) or not isinstance(p.get("context"), list):
            raise ValueError(f"{opts.prompt_file}:{number}: needs \"prompt\" and \"context\" (from sft_generator)")
    anchors = read_anchors(opts.anchor_file, schema)
    info, sampler = cli.build(opts)
    raw_file = os.path.join(opts.output_dir, f"{schema.name}.raw.jsonl")
    jobs.prepare(raw_file, {"ckpt_dir": opts.ckpt_dir, "prompt_file": opts.prompt_file, **config},
                 opts.overwrite, info)
    items = [{"syn_pmt_id": p["prompt_id"], "syn_id": f"{p['prompt_id']}-{r}", "prompt": p["prompt"]}
             for p in prompts for r in range(int(config["num_repeat"]))]

    def process(chunk: list[dict]) -> list[dict]:
        seeds = [int(hashlib.sha256(f"{config['seed']}:{x['syn_id']}".encode()).hexdigest()[:15], 16) for x in chunk]
        outs = sampler.generate([x["prompt"] for x in chunk], int(config["max_gen_len"]), float(config["temperature"]),
                                float(config["top_p"]), seed=seeds, truncate="left", desc="samples")
        records = []
        for x, out in zip(chunk, outs):
            status, result = parse_row(out.text, schema)
            records.append({**x, "answer": out.text, "status": status, "result": result})
        return records

    jobs.run(raw_file, items, lambda x: x["syn_id"], sampler.max_batch_size, process, info, "syn_addprompt")
    samples = jobs.merge(raw_file, lambda r: r["syn_id"], info)
    if not info.is_main:
        return
    contexts = {p["prompt_id"]: p["context"] for p in prompts}
    scored = score_samples(schema, Encoder(schema, train), samples, contexts, anchors, opts.metric)
    write_jsonl_atomic(os.path.join(opts.output_dir, f"{schema.name}.score.jsonl"), scored)
    write_csv(os.path.join(opts.output_dir, f"{schema.name}.syn.csv"), schema,
              [s["result"] for s in samples if s["status"] == SUCCESS])
    counts = {status: sum(s["status"] == status for s in samples) for status in STATUS_SCORE}
    print(f"{len(samples)} samples of {schema.name}: {json.dumps(counts)}", flush=True)


if __name__ == "__main__":
    cli.run(main)
