"""Self-judging throughput with and without shared-prefix KV reuse, on the same pairs in one run.

  python scripts/bench_judge.py [--ckpt_dir D --tokenizer_path T] [--pairs 8] [--threads 2]

A judgment is one (pair, principle, order) next-token read. The pairs are the first --pairs OASST1 prompts with two
sampled responses each (stories260K by default, 96 tokens, seeds 42 and 43), judged under the 11 RM principles with
the SALMON judge prompt, exactly as step1_synthetic_preference.synthetic_preference builds them. Prints one JSON object:
  {"judgments_per_s": {"prefix_reuse": x, "recompute": y}, "speedup": x / y, "max_abs_diff": ..., ...}
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_mp import distributed  # noqa: E402
from bench_common import default_checkpoint  # noqa: E402
from llama_mp.checkpoint import load_model, save_checkpoint  # noqa: E402
from llama_mp.model import ModelArgs, Transformer  # noqa: E402
from llama_mp.sampler import Sampler  # noqa: E402
from llama_mp.tokenizer import Tokenizer  # noqa: E402
from llama_mp.chat import DEFAULT_META_PROMPT, dromedary_query, load_principles  # noqa: E402
from step1_synthetic_preference.common import (DEFAULT_JUDGE_PROMPT, DEFAULT_PRINCIPLES, DEFAULT_PROMPTS,  # noqa: E402
                                               judge_prompt, load_prompts, read_text)
from step1_synthetic_preference.synthetic_preference import split_shared, truncate_tokens  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", default=None, help="Meta-layout checkpoint (default: stories260K converted)")
    parser.add_argument("--tokenizer_path", default=os.path.join(ROOT, "data/llama2c/tok512.model"))
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--response_tokens", type=int, default=96)
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--random_llama2_vocab", action="store_true",
                        help="instead: a random dim-256, 4-layer model on Llama-2's tokenizer (its 32k vocabulary "
                             "makes judge suffixes short, as with real checkpoints)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    distributed.init(1)
    ckpt_dir = opts.ckpt_dir
    if opts.random_llama2_vocab:
        ckpt_dir = tempfile.mkdtemp(prefix="bench_judge_random_")
        opts.tokenizer_path = os.path.join(ROOT, "data/llama2c/tokenizer.model")
        args = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=32000, multiple_of=32,
                         max_seq_len=2048)
        torch.manual_seed(0)
        model = Transformer(args, init_method=lambda w: torch.nn.init.normal_(w, std=0.02))
        save_checkpoint(ckpt_dir, args, [model.state_dict()])
    elif ckpt_dir is None:
        ckpt_dir = default_checkpoint()
    tokenizer = Tokenizer(opts.tokenizer_path)
    sampler = Sampler(load_model(ckpt_dir, max_seq_len=2048), tokenizer, max_batch_size=opts.max_batch_size,
                      progress_every=1e9)
    meta, template = read_text(DEFAULT_META_PROMPT), read_text(DEFAULT_JUDGE_PROMPT)
    principles = load_principles(DEFAULT_PRINCIPLES)
    prompts = [p for p in load_prompts(DEFAULT_PROMPTS) if len(p["instruction"]) < 300][:opts.pairs]
    queries = [dromedary_query(meta, p["instruction"]) for p in prompts]
    out1, out2 = (sampler.generate(queries, opts.response_tokens, temperature=0.7, seed=seed) for seed in (42, 43))
    pairs = []
    for p, a, b in zip(prompts, out1, out2):
        instruction = truncate_tokens(tokenizer, p["instruction"], 128)
        orders = [[tokenizer.encode(judge_prompt(template, instruction, x, y, q["dimension"], q["definition"]),
                                    bos=True, eos=False) for q in principles] for x, y in ((a.text, b.text),
                                                                                           (b.text, a.text))]
        pairs.append(orders)
    n_judgments = len(pairs) * 2 * len(principles)

    def prefix_reuse():
        return [torch.cat(sampler.next_token_logits_shared(*split_shared(orders))) for orders in pairs]

    def recompute():
        flat = [s for orders in pairs for order in orders for s in order]
        logits = sampler.next_token_logits(flat)
        return list(logits.split(2 * len(principles)))

    def best(fn):
        fn()
        times = []
        for _ in range(opts.repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    t_shared, shared = best(prefix_reuse)
    t_full, full = best(recompute)
    lengths = [len(s) for orders in pairs for order in orders for s in order]
    shared_tokens = sum(len(prefix) + sum(len(m) + sum(len(x) for x in sfx) for m, sfx in branches)
                        for prefix, branches in (split_shared(orders) for orders in pairs))
    result = {"judgments_per_s": {"prefix_reuse": round(n_judgments / t_shared, 1),
                                  "recompute": round(n_judgments / t_full, 1)},
              "speedup": round(t_full / t_shared, 2),
              "max_abs_diff": float(max((a - b).abs().max() for a, b in zip(shared, full))),
              "judgments": n_judgments, "mean_prompt_tokens": round(sum(lengths) / len(lengths), 1),
              "tokens_computed": {"prefix_reuse": shared_tokens, "recompute": sum(lengths)},
              "threads": opts.threads, "model": "random dim-256 x 4 layers, Llama-2 tokenizer"
              if opts.random_llama2_vocab else ckpt_dir if opts.ckpt_dir else "stories260K"}
    print(json.dumps(result))
    distributed.teardown()


if __name__ == "__main__":
    main()
