"""Guided tabular sampling (r1_s1, `guided: true`): each row kept in its KV-cache row from column to column, against
recomputing the whole in-context prompt for every column (what guided sampling did before; the same rows in float32),
on the same prompts and seeds, in one run.

  python scripts/bench_guided.py --model smollm2 [--rows 8] [--repeats 1] [--quick]
  python scripts/bench_guided.py                      (stories260K, converted on the fly)

The rows are abalone's (the quickstart's held-out set): --rows in-context prompts built as step0_coldstart.sft_generator
builds them (--num_examples training rows each, cut to fit --max_seq_len), sampled once per prompt with SmolLM2's
tabular settings (configs/syn_addprompt_smollm2.yaml: T 0.8, top_p 0.9, at most 8 tokens a number), one sampler call per
column for the whole batch (each way's first call, untimed, counts the tokens it feeds the model and warms up). The
model is the embedded base, not a fine-tuned generator: the weights change the time only through how many digits each
value takes, and the row-identity check holds for any weights. The two ways alternate within each repeat.

Prints one JSON object: {"rows", "prompt_tokens_mean", "columns", "precisions": {precision (bf16 where the CPU computes
it natively, and fp32): {"seconds": {"reuse", "recompute"}, "rows_per_s": {...}, "speedup": recompute / reuse,
"tokens_computed": {"reuse", "recompute"} (the tokens fed to the model, padding included), "token_ratio",
"identical_rows": how many rows the two ways wrote alike}}, "targets": the float32 rows identical (the reuse changes
what is computed, never what is sampled), "reason" when missed}. --quick: 2 rows, one repeat (a smoke test).
"""

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (DTYPES, MODELS, SMOLLM2_NAME, CallTimer, alternate, default_checkpoint, emit,  # noqa: E402
                          precisions, release_memory, smollm2_checkpoint, target, with_reason)
from llama_mp import distributed  # noqa: E402
from llama_mp.checkpoint import load_model  # noqa: E402
from llama_mp.jsonl import read_yaml  # noqa: E402
from llama_mp.sampler import Sampler, derive_seed  # noqa: E402
from llama_mp.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from step0_coldstart.sft_generator import dataset_prompts  # noqa: E402
from step0_coldstart.syn_addprompt import SynConfig, guided_rows  # noqa: E402
from step0_coldstart.tabular import known_categories, load_rows, load_schema, splits  # noqa: E402

DATASET = os.path.join(ROOT, "configs/tabular/abalone.yaml")
SYN_CONFIG = os.path.join(ROOT, "configs/syn_addprompt_smollm2.yaml")


def tokens_fed(timer: CallTimer) -> int:
    """Tokens the model computed over the timed calls ([batch, time] token inputs, padding included)."""
    return sum(shape[0] * shape[1] for _, shape in timer.calls if len(shape) == 2)


def bench(opts) -> dict:
    if opts.quick:
        opts.rows, opts.repeats = 2, 1
    torch.set_num_threads(opts.threads)
    if opts.model == "smollm2":
        ckpt_dir, name = smollm2_checkpoint(), SMOLLM2_NAME
        tokenizer = load_tokenizer("", ckpt_dir)
        max_seq_len = opts.max_seq_len or 1536
    else:
        ckpt_dir, name = default_checkpoint(), "stories260K"
        tokenizer = Tokenizer(os.path.join(ROOT, "data/llama2c/tok512.model"))
        max_seq_len = opts.max_seq_len or 512
    schema = load_schema(DATASET)
    rows = load_rows(schema)
    with tempfile.TemporaryDirectory() as split_dir:
        train = [rows[i] for i in splits(schema, len(rows), split_dir)["train"]]
    records, lengths = dataset_prompts(schema, train, opts.rows, opts.num_examples, tokenizer, max_seq_len, seed=0,
                                       with_answers=False)
    prompts = [r["prompt"] for r in records]
    seeds = [derive_seed(42, r["prompt_id"]) for r in records]
    config = SynConfig(**{k: v for k, v in read_yaml(SYN_CONFIG).items() if k in SynConfig.__dataclass_fields__})
    categories = known_categories(schema, train)
    result = {"model": name, "threads": opts.threads, "dataset": schema.name, "rows": len(prompts),
              "columns": len(schema.columns), "prompt_tokens_mean": lengths["mean_tokens"],
              "sampling": {"temperature": config.temperature, "top_p": config.top_p,
                           "max_value_tokens": config.max_value_tokens}, "precisions": {}}
    for precision in precisions():
        model = load_model(ckpt_dir, max_seq_len=max_seq_len, dtype=DTYPES[precision])
        sampler = Sampler(model, tokenizer, max_batch_size=len(prompts), progress_every=1e9)
        written = {}

        def way(reuse: bool):
            def run():
                written[reuse] = guided_rows(sampler, schema, prompts, seeds, config, categories, reuse_cache=reuse)
            return run

        with torch.inference_mode():
            counts = {}
            for key, reuse in (("reuse", True), ("recompute", False)):  # the warm-up call of each counts its tokens
                print(f"[bench_guided] {precision}: warm-up, {key}", file=sys.stderr, flush=True)
                timer = CallTimer(model)
                way(reuse)()
                timer.remove()
                counts[key] = tokens_fed(timer)
            print(f"[bench_guided] {precision}: {opts.repeats} timed repeat(s) of both", file=sys.stderr, flush=True)
            best = alternate({"reuse": way(True), "recompute": way(False)}, opts.repeats, warmup=False)
        same = sum(a == b for a, b in zip(written[True], written[False]))
        result["precisions"][precision] = {
            "seconds": {k: round(v, 2) for k, v in best.items()},
            "rows_per_s": {k: round(len(prompts) / v, 3) for k, v in best.items()},
            "speedup": round(best["recompute"] / best["reuse"], 2),
            "tokens_computed": counts, "token_ratio": round(counts["recompute"] / max(counts["reuse"], 1), 2),
            "identical_rows": same, "example_row": written[True][0]}
        del model, sampler
        release_memory()
    same = result["precisions"]["fp32"]["identical_rows"]
    targets = [target("float32 rows identical with and without the cache reuse (share)", same / len(prompts), 1.0,
                      why=f"{same} of {len(prompts)} alike: the reuse changed what was sampled")]
    return with_reason(result, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="stories260K")
    parser.add_argument("--rows", type=int, default=8, help="prompts, one row each, sampled as one batch")
    parser.add_argument("--num_examples", type=int, default=3, help="training rows in each prompt (as synfed_smollm2)")
    parser.add_argument("--max_seq_len", type=int, default=None, help="default: 1536 (smollm2), 512 (stories260K)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    distributed.init(1)
    try:
        emit(bench(opts))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
