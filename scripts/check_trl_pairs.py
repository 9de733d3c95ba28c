"""Do this project's preference-pair files load in TRL as they are? One JSON line per file on stdout.

  .venv-bench/bin/python scripts/check_trl_pairs.py runs/quickstart/step1/synthetic_preference_pairs.jsonl \
      runs/quickstart/tabular/r1/abalone.pref.jsonl [--tokenizer checkpoints/smollm2-135m-instruct]

Each file goes through `datasets.load_dataset("json")` and TRL's own DPOTrainer data preparation (TRL decides whether
the rows are conversational and applies the tokenizer's chat template), with a two-layer random LlamaForCausalLM of the
tokenizer's vocabulary: nothing is trained. Passes when TRL keeps every row and the text TRL tokenized for each row's
chosen and rejected completions decodes back to this file's own completion text. Needs the benchmark venv
(scripts/bench_env.sh: transformers, TRL, datasets); the product never imports them.
"""

import argparse
import copy
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def completion_text(value) -> str:
    """A pair file's completion: a text, or a list of messages (the assistant's content)."""
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


def check(path: str, tokenizer, model) -> dict:
    import datasets
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in open(path) if line.strip()]
    data = datasets.load_dataset("json", data_files=path, split="train")
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, report_to=[], max_length=None, per_device_train_batch_size=1, use_cpu=True, bf16=False,
                           dataset_num_proc=None)
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=config, train_dataset=data,
                             processing_class=tokenizer)
    prepared = trainer.train_dataset
    names = prepared.column_names
    key = {side: next(n for n in (f"{side}_input_ids", f"{side}_ids") if n in names) for side in ("chosen", "rejected")}
    mismatched = []
    for i, (row, done) in enumerate(zip(rows, prepared)):
        for side in ("chosen", "rejected"):
            decoded = tokenizer.decode(done[key[side]], skip_special_tokens=True)
            if completion_text(row[side]).strip() not in decoded:
                mismatched.append((i, side))
    conversational = not isinstance(rows[0]["prompt"], str) if rows else None
    return {"file": path, "rows": len(rows), "trl_rows": len(prepared), "conversational": conversational,
            "trl_columns": names, "mismatched": len(mismatched), "first_mismatch": mismatched[:1],
            "ok": len(prepared) == len(rows) and not mismatched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "checkpoints/smollm2-135m-instruct"),
                        help="a directory with tokenizer.json and tokenizer_config.json (its chat template)")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    results = [check(path, tokenizer, model) for path in args.files]
    for result in results:
        print(json.dumps(result), flush=True)
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
