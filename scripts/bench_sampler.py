"""Sampler throughput: the KV-cache sampler vs a no-cache baseline vs Hugging Face `generate`, same weights, one run.

  python scripts/bench_sampler.py [--ckpt_dir D --tokenizer_path T] [--batch_sizes 1 16 64] [--new_tokens 256]

Prints one JSON object:
  kv_cache / no_cache / hf: {batch size: new tokens per second}  (sampling, T 0.7, top-p 1, top-k off, EOS ignored so
      that every row makes exactly --new_tokens tokens; best of --repeats after a warm-up, the two samplers
      alternating within each repeat)
  hf_ratio: kv_cache / hf per batch size
  ms_per_step: {batch size: {"step": ms per decode step, "forward": ms of it inside the model, "overhead": the rest
      (sampling, stopping, bookkeeping)}}, from one further timed run
`hf` is null when transformers is not installed (it is optional; not in requirements.txt).
Defaults: stories260K converted from data/llama2c on the fly, 2 threads.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_mp import distributed  # noqa: E402
from llama_mp.checkpoint import load_model  # noqa: E402
from llama_mp.sampler import Sampler, sample_next  # noqa: E402
from llama_mp.tokenizer import Tokenizer  # noqa: E402
from bench_common import default_checkpoint, hf_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Once upon a time"
TEMPERATURE = 0.7


def best_of(repeats: int, fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def no_cache_generate(model, prompt_ids: list[int], batch: int, new_tokens: int, generator) -> None:
    """The baseline: recompute the whole sequence every step (no KV cache), same sampling."""
    tokens = torch.tensor([prompt_ids] * batch)
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(tokens, last_only=True)[:, -1]
            tokens = torch.cat([tokens, sample_next(logits, TEMPERATURE, 1.0, 0, torch.rand(batch, generator=generator))[:, None]], dim=1)


class ForwardTimer:
    """Wraps model.forward to add up the time spent in it: the rest of a decode step is the sampler's overhead."""

    def __init__(self, model):
        self.model, self.inner, self.seconds = model, model.forward, 0.0
        model.forward = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out

    def remove(self):
        del self.model.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", default=None, help="Meta-layout checkpoint (default: stories260K converted)")
    parser.add_argument("--tokenizer_path", default=os.path.join(ROOT, "data/llama2c/tok512.model"))
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no_hf", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    distributed.init(1)
    ckpt_dir = opts.ckpt_dir
    if ckpt_dir is None:
        ckpt_dir = default_checkpoint()
    model = load_model(ckpt_dir)
    tokenizer = Tokenizer(opts.tokenizer_path)
    sampler = Sampler(model, tokenizer, max_batch_size=max(opts.batch_sizes), progress_every=1e9)
    prompt_ids = tokenizer.encode(PROMPT, bos=True, eos=False)
    hf = None if opts.no_hf else hf_model(model)
    if hf is not None:  # the comparison is only fair if both compute the same function
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids])
            diff = (hf(ids).logits - model(ids)).abs().max().item()
        assert diff < 1e-4, f"Hugging Face model disagrees with llama_mp by {diff}"

    result = {"kv_cache": {}, "no_cache": {}, "hf": {} if hf is not None else None, "hf_ratio": {},
              "ms_per_step": {}, "threads": opts.threads, "new_tokens": opts.new_tokens,
              "model": {"dim": model.args.dim, "n_layers": model.args.n_layers, "vocab": model.args.vocab_size}}
    n = opts.new_tokens
    for batch in opts.batch_sizes:
        key = str(batch)
        prompts = [PROMPT] * batch
        ids = torch.tensor([prompt_ids] * batch)

        def ours():
            sampler.generate(prompts, n, temperature=TEMPERATURE, seed=0, stop_at_eos=False)

        def theirs():
            with torch.inference_mode():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=TEMPERATURE,
                            top_p=1.0, top_k=0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

        # Alternate the two within each repeat, so that a change in machine load hits both alike.
        contenders = {"kv_cache": ours, **({"hf": theirs} if hf is not None else {})}
        best = {name: float("inf") for name in contenders}
        for fn in contenders.values():
            fn()  # warm-up
        for _ in range(opts.repeats):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        for name, seconds in best.items():
            result[name][key] = round(batch * n / seconds, 1)
        if hf is not None:
            result["hf_ratio"][key] = round(result["kv_cache"][key] / result["hf"][key], 2)
        timer = ForwardTimer(model)  # one more run, timing the model calls inside it
        start = time.perf_counter()
        ours()
        total = time.perf_counter() - start
        timer.remove()
        result["ms_per_step"][key] = {"step": round(total / n * 1e3, 3), "forward": round(timer.seconds / n * 1e3, 3),
                                      "overhead": round((total - timer.seconds) / n * 1e3, 3)}
        gen = torch.Generator().manual_seed(0)
        seconds = best_of(1, lambda: no_cache_generate(model, prompt_ids, batch, n, gen))
        result["no_cache"][key] = round(batch * n / seconds, 1)
    print(json.dumps(result))
    distributed.teardown()


if __name__ == "__main__":
    main()
