"""Self-judging throughput with and without shared-prefix KV reuse, on the same pairs in one run.

  python scripts/bench_judge.py [--ckpt_dir D --tokenizer_path T] [--pairs 8] [--threads 2]
  python scripts/bench_judge.py --model smollm2 [--pairs 4] [--quick]

A judgment is one (pair, principle, order) next-token read. The pairs are the first --pairs OASST1 prompts with two
sampled responses each (--response_tokens tokens, seeds 42 and 43), judged under the 11 RM principles with the SALMON
judge prompt, exactly as step1_synthetic_preference.synthetic_preference builds them.

--model stories260K (the default; or --ckpt_dir, or --random_llama2_vocab) prints one JSON object:
  {"judgments_per_s": {"prefix_reuse": x, "recompute": y}, "speedup": x / y, "max_abs_diff": ..., ...}

--model smollm2: SmolLM2-135M-Instruct, its responses to the prompts in its chat template, and every judge prompt
in its chat template too (llama_mp.chat.chat_format(tokenizer).conversation(judge_prompt(...)), through
llama_mp.judge.judge_sequences: what the step runs on this model), in every precision the CPU has (bf16 weights
where it computes bf16 natively, and fp32); the two ways alternate within each repeat, after a warm-up on the first
pair. Prints one JSON object: {"precisions": {precision: {"judgments_per_s", "speedup", "max_abs_diff",
"tokens_computed": {"prefix_reuse", "recompute", each with "padded": what the batches really hold},
"token_ratio": recompute padded / prefix_reuse padded (the speedup the token counts alone allow),
"prefix_reuse_seconds": {"shared": the prefix and middle calls, "suffixes": the principle-suffix batches, "rest": the
LM head and bookkeeping}}}, "targets": speedup >= 3 in every precision, "reason" when missed}. --quick: one pair,
16-token responses, 3 principles, one repeat (a smoke test).
"""

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_mp import distributed  # noqa: E402
from bench_common import (DTYPES, MODELS, SMOLLM2_NAME, CallTimer, default_checkpoint, emit, precisions,  # noqa: E402
                          release_memory, scratch_dir, smollm2_checkpoint, target, with_reason)
from llama_mp.checkpoint import load_model, save_checkpoint  # noqa: E402
from llama_mp.model import ModelArgs, Transformer  # noqa: E402
from llama_mp.sampler import Sampler  # noqa: E402
from llama_mp.tokenizer import Tokenizer  # noqa: E402
from llama_mp.chat import DEFAULT_META_PROMPT, dromedary_query, load_principles  # noqa: E402
from llama_mp.prompts import load_prompts  # noqa: E402
from llama_mp.judge import (DEFAULT_JUDGE_PRINCIPLES, DEFAULT_JUDGE_PROMPT, judge_prompt, judge_sequences,  # noqa: E402
                            split_shared, truncate_tokens)
from llama_mp.jsonl import read_text  # noqa: E402
from step1_synthetic_preference.common import DEFAULT_PROMPTS  # noqa: E402


def prefix_reuse(sampler, pairs):
    return [torch.cat(sampler.next_token_logits_shared(*split_shared(orders))) for orders in pairs]


def recompute(sampler, pairs):
    flat = [s for orders in pairs for order in orders for s in order]
    logits = sampler.next_token_logits(flat)
    return list(logits.split(sum(len(order) for order in pairs[0])))


def tokens_computed(sampler, pairs) -> dict:
    """Tokens each way feeds the model, and with the padding of its batches (right-padded to the longest row)."""
    flat = [len(s) for orders in pairs for order in orders for s in order]
    padded = sum(len(b) * max(flat[i] for i in b) for b in sampler._micro_batches(flat))
    shared = shared_padded = 0
    for prefix, branches in (split_shared(orders) for orders in pairs):
        shared += len(prefix) + sum(len(m) + sum(len(x) for x in sfx) for m, sfx in branches)
        shared_padded += len(prefix) + sum(len(m) for m, _ in branches)
        for _, sfx in branches:
            for first in range(0, len(sfx), sampler.max_batch_size):
                chunk = sfx[first:first + sampler.max_batch_size]
                shared_padded += len(chunk) * max(len(x) for x in chunk)
    return {"prefix_reuse": shared, "recompute": sum(flat),
            "padded": {"prefix_reuse": shared_padded, "recompute": padded}}


# ---- stories260K (the default) -----------------------------------------------------------------------------------
def bench_stories(opts) -> dict:
    ckpt_dir = opts.ckpt_dir
    if opts.random_llama2_vocab:
        ckpt_dir = scratch_dir("bench_judge_random_")
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
    principles = load_principles(DEFAULT_JUDGE_PRINCIPLES)[:opts.principles]
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

    def best(fn):
        fn(sampler, pairs)
        times = []
        for _ in range(opts.repeats):
            start = time.perf_counter()
            out = fn(sampler, pairs)
            times.append(time.perf_counter() - start)
        return min(times), out

    t_shared, shared = best(prefix_reuse)
    t_full, full = best(recompute)
    lengths = [len(s) for orders in pairs for order in orders for s in order]
    counts = tokens_computed(sampler, pairs)
    return {"judgments_per_s": {"prefix_reuse": round(n_judgments / t_shared, 1),
                                "recompute": round(n_judgments / t_full, 1)},
            "speedup": round(t_full / t_shared, 2),
            "max_abs_diff": float(max((a - b).abs().max() for a, b in zip(shared, full))),
            "judgments": n_judgments, "mean_prompt_tokens": round(sum(lengths) / len(lengths), 1),
            "tokens_computed": {"prefix_reuse": counts["prefix_reuse"], "recompute": counts["recompute"]},
            "threads": opts.threads, "model": "random dim-256 x 4 layers, Llama-2 tokenizer"
            if opts.random_llama2_vocab else ckpt_dir if opts.ckpt_dir else "stories260K"}


# ---- SmolLM2-135M-Instruct ---------------------------------------------------------------------------------------
def smollm2_pairs(ckpt_dir: str, tokenizer, chat, opts) -> list[dict]:
    """The first --pairs OASST1 prompts with two sampled answers each (fp32, in the chat template)."""
    sampler = Sampler(load_model(ckpt_dir, max_seq_len=2048), tokenizer, max_batch_size=opts.max_batch_size,
                      progress_every=1e9)
    prompts = [p for p in load_prompts(DEFAULT_PROMPTS) if len(p["instruction"]) < 300][:opts.pairs]
    queries = [chat.query(p["instruction"]) for p in prompts]
    out1, out2 = (sampler.generate(queries, opts.response_tokens, temperature=0.7, seed=seed) for seed in (42, 43))
    del sampler
    release_memory()
    return [{"instruction": p["instruction"], "output_1": a.text, "output_2": b.text}
            for p, a, b in zip(prompts, out1, out2)]


def judge_precision(precision: str, ckpt_dir: str, tokenizer, pairs: list, opts) -> dict:
    """Both ways on the same judge prompts, alternating; where the prefix-reuse time goes."""
    sampler = Sampler(load_model(ckpt_dir, max_seq_len=2048, dtype=DTYPES[precision]), tokenizer,
                      max_batch_size=opts.max_batch_size, progress_every=1e9)
    prefix_reuse(sampler, pairs[:1])  # warm-up on the first pair
    recompute(sampler, pairs[:1])
    best = {"prefix_reuse": float("inf"), "recompute": float("inf")}
    outputs = {}
    for _ in range(opts.repeats):
        for name, fn in (("prefix_reuse", prefix_reuse), ("recompute", recompute)):
            start = time.perf_counter()
            outputs[name] = fn(sampler, pairs)
            best[name] = min(best[name], time.perf_counter() - start)
    timer = CallTimer(sampler.model)  # one more prefix-reuse run, its model calls timed
    start = time.perf_counter()
    prefix_reuse(sampler, pairs)
    total = time.perf_counter() - start
    timer.remove()
    shared = sum(s for s, shape in timer.calls if shape[0] == 1)  # the prefix and the middles: one row each
    suffixes = sum(s for s, shape in timer.calls if shape[0] > 1)
    n_judgments = sum(len(order) for orders in pairs for order in orders)
    counts = tokens_computed(sampler, pairs)
    lengths = [len(s) for orders in pairs for order in orders for s in order]
    out = {"judgments_per_s": {k: round(n_judgments / v, 2) for k, v in best.items()},
           "speedup": round(best["recompute"] / best["prefix_reuse"], 2),
           "max_abs_diff": round(float(max((a - b).abs().max() for a, b in zip(outputs["prefix_reuse"],
                                                                              outputs["recompute"]))), 5),
           "judgments": n_judgments, "mean_prompt_tokens": round(sum(lengths) / len(lengths), 1),
           "tokens_computed": counts,
           "token_ratio": round(counts["padded"]["recompute"] / counts["padded"]["prefix_reuse"], 2),
           "prefix_reuse_seconds": {"shared": round(shared, 3), "suffixes": round(suffixes, 3),
                                    "rest": round(total - shared - suffixes, 3)}}
    del sampler
    release_memory()
    return out


def judge_reason(fig: dict) -> str:
    t, p = fig["tokens_computed"], fig["prefix_reuse_seconds"]
    total = sum(p.values())
    return (f"recompute feeds {t['recompute']} tokens ({t['padded']['recompute']} padded), prefix reuse "
            f"{t['prefix_reuse']} ({t['padded']['prefix_reuse']} padded): the token counts alone allow "
            f"{fig['token_ratio']}x; of the prefix-reuse time {p['suffixes'] / total:.0%} is the principle-suffix "
            f"batches, {p['shared'] / total:.0%} the shared prefix and middles, {p['rest'] / total:.0%} head and rest")


def bench_smollm2(opts) -> dict:
    from llama_mp.chat import chat_format
    from llama_mp.tokenizer import load_tokenizer
    ckpt_dir = smollm2_checkpoint()
    tokenizer = load_tokenizer("", ckpt_dir)
    chat = chat_format(tokenizer)
    template = read_text(DEFAULT_JUDGE_PROMPT)
    principles = load_principles(DEFAULT_JUDGE_PRINCIPLES)[:opts.principles]
    pairs = [judge_sequences(tokenizer, chat, template, principles, pair, 128, opts.response_tokens)
             for pair in smollm2_pairs(ckpt_dir, tokenizer, chat, opts)]
    result = {"model": SMOLLM2_NAME, "chat_format": chat.name, "threads": opts.threads, "pairs": len(pairs),
              "principles": len(principles), "response_tokens": opts.response_tokens, "repeats": opts.repeats,
              "max_batch_size": opts.max_batch_size, "precisions": {}}
    targets = []
    for precision in precisions():
        fig = judge_precision(precision, ckpt_dir, tokenizer, pairs, opts)
        result["precisions"][precision] = fig
        targets.append(target(f"judgments/s prefix reuse / recompute ({precision})", fig["speedup"], 3.0,
                              why=judge_reason(fig)))
    return with_reason(result, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="stories260K")
    parser.add_argument("--ckpt_dir", default=None, help="stories260K only: a Meta-layout checkpoint instead")
    parser.add_argument("--tokenizer_path", default=os.path.join(ROOT, "data/llama2c/tok512.model"))
    parser.add_argument("--pairs", type=int, default=None, help="default: 8 (stories260K), 4 (smollm2)")
    parser.add_argument("--principles", type=int, default=None, help="the first N of the 11 RM principles")
    parser.add_argument("--response_tokens", type=int, default=96)
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="default: 2 (1 with --quick)")
    parser.add_argument("--random_llama2_vocab", action="store_true",
                        help="instead: a random dim-256, 4-layer model on Llama-2's tokenizer (its 32k vocabulary "
                             "makes judge suffixes short, as with real checkpoints)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 pair, 16-token responses, 3 principles")
    opts = parser.parse_args()
    smollm2 = opts.model == "smollm2"
    if opts.quick:
        opts.pairs, opts.response_tokens, opts.principles, opts.repeats = 1, 16, 3, 1
    opts.pairs = opts.pairs or (4 if smollm2 else 8)
    opts.repeats = opts.repeats or 2
    torch.set_num_threads(opts.threads)
    distributed.init(1)
    emit(bench_smollm2(opts) if smollm2 else bench_stories(opts))
    distributed.teardown()


if __name__ == "__main__":
    main()
