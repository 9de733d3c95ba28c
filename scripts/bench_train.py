"""Training throughput of the shared training loop vs Hugging Face's Llama, same weights, same step, one run.

  python scripts/bench_train.py [--batch 8 --seq_len 256 --steps 10 --threads 2]

One optimizer step = forward, backward and AdamW on a [batch, seq_len] next-token batch (the objective both can run),
through llama_mp.train.Trainer.train_step (what SFT/RM/DPO/PPO use) and through transformers' LlamaForCausalLM with
torch.optim.AdamW (transformers is optional; hf_tokens_per_s is null without it). The two alternate step by step; each
reports its best --steps-long window. Prints one JSON object:
  {"tokens_per_s", "hf_tokens_per_s", "ratio", "mfu", "hf_mfu", "matmul_gflops", ...}
MFU = achieved FLOP/s / the best rate of a large fp32 matmul measured here on the same threads, with
FLOPs per token = 6 N + 12 L d T (nanoGPT's estimate; N = parameters, L layers, d dim, T sequence length).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import default_checkpoint, hf_model  # noqa: E402
from llama_mp import distributed  # noqa: E402
from llama_mp.checkpoint import load_model  # noqa: E402
from llama_mp.train import TrainConfig, Trainer  # noqa: E402


def matmul_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 ** 3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", default=None, help="Meta-layout checkpoint (default: stories260K converted)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    info = distributed.init(1)
    ckpt_dir = opts.ckpt_dir
    if ckpt_dir is None:
        ckpt_dir = default_checkpoint()
    model = load_model(ckpt_dir)
    hf = hf_model(model)
    a = model.args
    gen = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, a.vocab_size, (opts.seq_len + 1,), generator=gen) for _ in range(opts.batch * 4)]

    def collate(batch):
        tokens = torch.stack(batch)
        return {"tokens": tokens, "num_tokens": tokens.shape[0] * (tokens.shape[1] - 1)}

    def next_token_loss(module, batch):
        logits = module(batch["tokens"][:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["tokens"][:, 1:].reshape(-1))
        return loss, {"loss": float(loss.detach())}

    config = TrainConfig(output_dir=tempfile.mkdtemp(prefix="bench_train_out_"), lr=1e-4, micro_batch_size=opts.batch,
                         warmup_ratio=0.0, epochs=1e6, log_every=0)
    trainer = Trainer(model, model, examples, collate, next_token_loss, config, info)

    contenders = {"ours": trainer.train_step}
    if hf is not None:
        hf.train()
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        hf_batch = torch.stack(examples[:opts.batch])

        def hf_step():
            loss = hf(input_ids=hf_batch[:, :-1], labels=hf_batch[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)

        contenders["hf"] = hf_step
    for step in contenders.values():
        step()  # warm-up
    best = {name: float("inf") for name in contenders}
    for _ in range(opts.repeats):
        for name, step in contenders.items():
            start = time.perf_counter()
            for _ in range(opts.steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / opts.steps)
    tokens = opts.batch * opts.seq_len
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * a.n_layers * a.dim * opts.seq_len
    peak = matmul_gflops(opts.threads) * 1e9
    ours = tokens / best["ours"]
    theirs = tokens / best["hf"] if "hf" in best else None
    print(json.dumps({"tokens_per_s": round(ours, 1), "hf_tokens_per_s": round(theirs, 1) if theirs else None,
                      "ratio": round(ours / theirs, 2) if theirs else None,
                      "mfu": round(ours * flops_per_token / peak, 5),
                      "hf_mfu": round(theirs * flops_per_token / peak, 5) if theirs else None,
                      "matmul_gflops": round(peak / 1e9, 1), "ms_per_step": round(best["ours"] * 1e3, 2),
                      "hf_ms_per_step": round(best["hf"] * 1e3, 2) if theirs else None,
                      "batch": opts.batch, "seq_len": opts.seq_len, "threads": opts.threads,
                      "params": n_params}))
    distributed.teardown()


if __name__ == "__main__":
    main()
