"""Training throughput of the shared training loop vs Hugging Face's Llama, same weights, same step, one run.

  python scripts/bench_train.py [--batch 8 --seq_len 256 --steps 10 --threads 2]
  .venv-bench/bin/python scripts/bench_train.py --model smollm2 [--batch 8 --seq_len 512 --steps 1] [--quick]

--model stories260K (the default): one optimizer step = forward, backward and AdamW on a [batch, seq_len] next-token
batch (the objective both can run), through llama_mp.train.Trainer.train_step (what SFT/RM/DPO/PPO use) and through
transformers' LlamaForCausalLM with torch.optim.AdamW (transformers is optional; hf_tokens_per_s is null without it).
The two alternate step by step; each reports its best --steps-long window. Prints one JSON object:
  {"tokens_per_s", "hf_tokens_per_s", "ratio", "mfu", "hf_mfu", "matmul_gflops", ...}
MFU = achieved FLOP/s / the best rate of a large fp32 matmul measured here on the same threads, with
FLOPs per token = 6 N + 12 L d T (nanoGPT's estimate; N = parameters, L layers, d dim, T sequence length).

--model smollm2: an SFT step on SmolLM2-135M-Instruct at [batch, seq_len] (half prompt, half response, random token
ids; the loss on response tokens only), in every precision the CPU has (bf16 autocast with float32 weights where it
computes bf16 natively, and fp32), for two pairs of contenders:
  full: step0_coldstart.train_sft's loss through the shared Trainer vs transformers' LlamaForCausalLM (the same
        weights, exported by `python -m llama_mp.convert to_hf`) with labels masked to the response, backward,
        gradient clipping and torch.optim.AdamW, under the same autocast;
  lora: the Trainer with LoRA rank 16 on every projection (the frozen base held in the compute dtype) vs PEFT's LoRA of
        the same rank and targets on the HF model (its base in the same dtype); without peft, the full HF step again.
Each contender lives in its own fresh process (spawned), so that its memory is its own; the parent tells the two of a
pair to step in turn (a warm-up step each, then --repeats rounds of --steps steps), and each reports its best round.
Between rounds each keeps its heap, as a training loop does: a heap given back to the OS (malloc_trim) faults its pages
in again in the next step (at 8 x 512 in bf16 that cost the peer's LoRA step 4.5 s of its 19.6 and ours 1.4 s of 11.0,
and made the ratio 1.78x where the steady state is 1.56x). Only where the machine runs short of memory (under a quarter
available) does a process give back what its step freed; "trimmed_rounds" counts those rounds.
Memory: the kernel's resident high-water mark (VmHWM, reset once the model is built) over the process's size after its
imports: weights, gradients, optimizer state and activations at their worst. Prints one JSON object:
  precisions: {precision: {"full" / "lora": {"ours" / "hf": {tokens_per_s, ms_per_step, phases_ms (forward /
      backward / clip: the gradient norm and clipping / optimizer), peak_mb, weights_mb, mfu}, "ratio": tokens/s
      ours / hf, "memory_ratio": peak ours / hf}}, plus the matmul peak MFU is against ("matmul_gflops": the best
      bf16 or fp32 rate of SmolLM2's own matmul shapes on these threads; FLOPs per token 6 N + 12 L d T, 4 N + 12 L d T
      for LoRA, whose frozen weights get no gradient)}
  targets: ratio >= 2 and memory_ratio <= 0.5 for both pairs in every precision; "reason" gives each missed one's
      measured cause (the phase with the largest gap, the memory of each side).
--quick: batch 2 x 32 tokens, one step per round, one round (a smoke test).
"""

import argparse
import multiprocessing
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (HF_LORA_TARGETS, LORA_ALPHA, LORA_RANK, MODELS, SMOLLM2_NAME, StepPhases,  # noqa: E402
                          default_checkpoint, emit, export_hf, hf_model, matmul_peak_gflops, memory_short,
                          missing_peers, peak_rss_mb, precisions, r, release_memory, reset_peak_rss, rss_mb,
                          scratch_dir, smollm2_checkpoint, target, with_reason)
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


# ---- stories260K (the default) -----------------------------------------------------------------------------------
def bench_stories(opts) -> dict:
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

    config = TrainConfig(output_dir=scratch_dir("bench_train_out_"), lr=1e-4, micro_batch_size=opts.batch,
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
    return {"tokens_per_s": round(ours, 1), "hf_tokens_per_s": round(theirs, 1) if theirs else None,
            "ratio": round(ours / theirs, 2) if theirs else None,
            "mfu": round(ours * flops_per_token / peak, 5),
            "hf_mfu": round(theirs * flops_per_token / peak, 5) if theirs else None,
            "matmul_gflops": round(peak / 1e9, 1), "ms_per_step": round(best["ours"] * 1e3, 2),
            "hf_ms_per_step": round(best["hf"] * 1e3, 2) if theirs else None,
            "batch": opts.batch, "seq_len": opts.seq_len, "threads": opts.threads,
            "params": n_params}


# ---- SmolLM2: one contender per process --------------------------------------------------------------------------
def sft_examples(vocab_size: int, batch: int, seq_len: int) -> list[dict]:
    """batch x 4 examples of seq_len random tokens, half prompt and half response (no special ids: those are < 100)."""
    gen = torch.Generator().manual_seed(0)
    half = seq_len // 2
    return [{"prompt": torch.randint(100, vocab_size, (half,), generator=gen).tolist(),
             "response": torch.randint(100, vocab_size, (seq_len - half,), generator=gen).tolist()}
            for _ in range(batch * 4)]


def build_ours(spec: dict, phases: StepPhases):
    """The shared Trainer on step0's SFT loss: what `python -m step0_coldstart.train_sft` runs for one step (with the
    allocator setting of every command's entry, llama_mp.cli.run)."""
    from llama_mp.cli import keep_freed_memory
    from llama_mp.lora import load_model as load_trained
    from llama_mp.train import add_lora, backbone_dtype
    from step0_coldstart.train_sft import collate, response_loss
    keep_freed_memory()
    info = distributed.init(1)
    config = TrainConfig(output_dir=scratch_dir("bench_train_out_"), lr=1e-5, warmup_ratio=0.0,
                         micro_batch_size=spec["batch"], epochs=1e6, log_every=0, precision=spec["precision"],
                         lora_rank=LORA_RANK if spec["lora"] else 0, lora_alpha=LORA_ALPHA,
                         activation_checkpointing=spec["activation_checkpointing"] in ("ours", "both"))
    model = load_trained(spec["ckpt_dir"], max_seq_len=spec["seq_len"],
                         dtype=backbone_dtype(config, torch.device("cpu")))
    add_lora(model, config, spec["ckpt_dir"])
    examples = sft_examples(model.args.vocab_size, spec["batch"], spec["seq_len"])
    trainer = Trainer(model, model, examples, lambda b: collate(b, "cpu"), phases.timed(response_loss, "forward"),
                      config, info)
    trainer._clip_gradients = phases.timed(trainer._clip_gradients, "clip")
    phases.watch(trainer.optimizer)
    return trainer.train_step


def build_hf(spec: dict, phases: StepPhases):
    """transformers' LlamaForCausalLM (PEFT LoRA for the lora pair) on the same batch: forward with the prompt labels
    masked, backward, clipping, AdamW, under the same autocast."""
    from transformers import LlamaForCausalLM
    from bench_common import autocast
    from llama_mp.batching import prompt_response_batch
    bf16 = spec["precision"] == "bf16"
    lora = spec["lora"] and spec["peft"]
    hf = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.bfloat16 if lora and bf16 else torch.float32)
    with torch.no_grad():  # transformers maps the safetensors file: hold the weights in memory, as ours are
        for param in hf.parameters():
            param.data = param.data.clone()
    if lora:  # adapters in float32 (PEFT's autocast_adapter_dtype), the base frozen: as ours
        from peft import LoraConfig, get_peft_model
        hf = get_peft_model(hf, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                           target_modules=HF_LORA_TARGETS))
    hf.train()
    if spec["activation_checkpointing"] == "both":
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    phases.watch(opt)
    examples = sft_examples(hf.config.vocab_size, spec["batch"], spec["seq_len"])
    batch = prompt_response_batch([(e["prompt"], e["response"]) for e in examples[:spec["batch"]]], "cpu")
    labels = batch["tokens"].masked_fill(batch["mask"] == 0, -100)

    def forward():
        with autocast(spec["precision"]):
            return hf(input_ids=batch["tokens"], labels=labels).loss

    forward = phases.timed(forward, "forward")
    clip = phases.timed(torch.nn.utils.clip_grad_norm_, "clip")

    def step():
        loss = forward()
        loss.backward()
        clip(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def worker(conn, spec: dict) -> None:
    """A contender's process: build it, then run the parent's commands ("steps", n) / ("reset") / ("report") /
    ("stop")."""
    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "hf":  # the peer's imports are not its step's memory
        import transformers  # noqa: F401
        if spec["lora"] and spec["peft"]:
            import peft  # noqa: F401
    release_memory()
    base = rss_mb()
    phases = StepPhases()
    step = (build_ours if spec["kind"] == "ours" else build_hf)(spec, phases)
    release_memory()
    built = rss_mb()
    peak_ok = reset_peak_rss()
    conn.send("ready")
    seconds, steps, trimmed = 0.0, 0, 0
    while True:
        command, arg = conn.recv()
        if command == "steps":
            start = time.perf_counter()
            for _ in range(arg):
                step()
            elapsed = time.perf_counter() - start
            seconds, steps = seconds + elapsed, steps + arg
            if memory_short():  # (untimed) the pair's other process needs room: what the step freed goes back
                release_memory()
                trimmed += 1
            conn.send(elapsed)
        elif command == "reset":  # after the warm-up: phases of the timed rounds only
            phases.reset()
            seconds, steps, trimmed = 0.0, 0, 0
            conn.send("reset")
        elif command == "report":
            peak = peak_rss_mb() if peak_ok else None
            conn.send({"weights_mb": round(built - base, 1), "peak_mb": r(peak - base if peak else None),
                       "phases_ms": phases.split_ms(seconds, steps), "trimmed_rounds": trimmed})
        else:
            conn.close()
            return


class Contender:
    """A spawned worker process and its end of the pipe."""

    def __init__(self, spec: dict):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker, args=(child, spec), daemon=True)
        self.process.start()

    def ask(self, command: str, arg=None):
        try:
            self.conn.send((command, arg))
            return self.conn.recv()
        except (EOFError, BrokenPipeError):
            self.died()

    def ready(self) -> None:
        try:
            assert self.conn.recv() == "ready"
        except EOFError:
            self.died()

    def died(self):
        self.process.join(timeout=10)
        raise RuntimeError(f"a contender's process died (exit code {self.process.exitcode}); its error is above")

    def stop(self):
        try:
            self.conn.send(("stop", None))
        except BrokenPipeError:
            pass
        self.process.join(timeout=60)


def run_pair(specs: dict[str, dict], opts) -> dict:
    """Both contenders of a pair alive, stepping in turn; their best round and memory."""
    contenders = {name: Contender(spec) for name, spec in specs.items()}
    try:
        for c in contenders.values():
            c.ready()
        for c in contenders.values():
            c.ask("steps", 1)  # warm-up (AdamW's state is made here: it counts in the peak, not in the times)
            c.ask("reset")
        best = {name: float("inf") for name in contenders}
        for _ in range(opts.repeats):
            for name, c in contenders.items():
                best[name] = min(best[name], c.ask("steps", opts.steps) / opts.steps)
        reports = {name: c.ask("report") for name, c in contenders.items()}
    finally:
        for c in contenders.values():
            c.stop()
    tokens = opts.batch * opts.seq_len
    return {name: {"tokens_per_s": round(tokens / best[name], 1), "ms_per_step": round(best[name] * 1e3, 1),
                   **reports[name]} for name in contenders}


def gap_reason(pair: dict, goal: float = 2.0) -> str:
    """Where the step's time goes on both sides, and what the goal asks: at the same FLOPs per token, a ratio r needs
    our MFU at r times the peer's (beyond 100% of the measured matmul peak, no kernel reaches it)."""
    ours, hf = pair["ours"], pair["hf"]
    gaps = {k: hf["phases_ms"][k] - ours["phases_ms"][k] for k in ours["phases_ms"]}
    worst = min(gaps, key=gaps.get)  # where ours gains least (or loses most)
    split = ", ".join(f"{k} {ours['phases_ms'][k]} vs {hf['phases_ms'][k]}" for k in ours["phases_ms"])
    return (f"ms per step ours vs hf: {split}; the {worst} phase gains least ({-gaps[worst]:+.1f} ms, "
            f"{ours['phases_ms'][worst] / max(ours['ms_per_step'], 1e-9):.0%} of our step); {goal:g}x needs our MFU "
            f"at {goal * hf['mfu']:.0%} of the measured matmul peak (the peer's {hf['mfu']:.0%} times {goal:g}; "
            f"ours {ours['mfu']:.0%})")


def memory_reason(pair: dict) -> str:
    ours, hf = pair["ours"], pair["hf"]
    return (f"peak ours {ours['peak_mb']} MB (weights {ours['weights_mb']}) vs hf {hf['peak_mb']} MB (weights "
            f"{hf['weights_mb']}): step memory beyond the weights {r(ours['peak_mb'] - ours['weights_mb'])} vs "
            f"{r(hf['peak_mb'] - hf['weights_mb'])} MB; 0.5x needs our peak at {r(hf['peak_mb'] / 2)} MB")


def bench_smollm2(opts) -> dict:
    from llama_mp.checkpoint import read_params
    from llama_mp.model import ModelArgs
    ckpt_dir = smollm2_checkpoint()
    a = ModelArgs.from_dict(read_params(ckpt_dir))
    skipped = missing_peers("transformers")
    peft_missing = missing_peers("peft")
    hf_dir = None if skipped else export_hf(ckpt_dir)
    per_layer = (a.dim * (a.n_heads + 2 * a.kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim +
                 3 * a.dim * a.ffn_hidden_dim + 2 * a.dim)  # q k v, o, w1 w2 w3, two norms
    n_params = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) + a.n_layers * per_layer + a.dim
    attention = 12 * a.n_layers * a.dim * opts.seq_len
    flops_per_token = {"full": 6 * n_params + attention, "lora": 4 * n_params + attention}  # frozen: no weight grads
    m = min(opts.batch * opts.seq_len, 2048)
    shapes = [(m, a.dim, a.ffn_hidden_dim), (m, a.ffn_hidden_dim, a.dim), (m, a.dim, a.n_heads * a.head_dim),
              (m, a.dim, a.vocab_size)]
    result = {"model": SMOLLM2_NAME, "threads": opts.threads, "batch": opts.batch, "seq_len": opts.seq_len,
              "steps": opts.steps, "repeats": opts.repeats, "params": n_params, "flops_per_token": flops_per_token,
              "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": "all 7 projections"},
              "activation_checkpointing": opts.activation_checkpointing, "precisions": {}}
    if skipped:
        result["hf_skipped"] = skipped
    if peft_missing:
        result["peft_skipped"] = peft_missing + "; the lora pair's peer is the full HF step"
    targets = []
    for precision in precisions():
        peak = matmul_peak_gflops(shapes, torch.bfloat16 if precision == "bf16" else torch.float32, opts.threads)
        fig = {"matmul_gflops": peak}
        for variant in ("full", "lora"):
            common = {"precision": precision, "lora": variant == "lora", "ckpt_dir": ckpt_dir, "hf_dir": hf_dir,
                      "batch": opts.batch, "seq_len": opts.seq_len, "threads": opts.threads,
                      "activation_checkpointing": opts.activation_checkpointing, "peft": not peft_missing}
            specs = {"ours": {**common, "kind": "ours"}}
            if not skipped:
                specs["hf"] = {**common, "kind": "hf"}
            pair = run_pair(specs, opts)
            for side in pair.values():
                side["mfu"] = round(side["tokens_per_s"] * flops_per_token[variant] / (peak["peak"] * 1e9), 4)
            if "hf" in pair:
                pair["hf"]["kind"] = "peft lora" if variant == "lora" and not peft_missing else "full"
                pair["ratio"] = round(pair["ours"]["tokens_per_s"] / pair["hf"]["tokens_per_s"], 2)
                both = pair["ours"]["peak_mb"] and pair["hf"]["peak_mb"]
                pair["memory_ratio"] = round(pair["ours"]["peak_mb"] / pair["hf"]["peak_mb"], 2) if both else None
            fig[variant] = pair
            name = f"{variant} ({precision})"
            targets.append(target(f"tokens/s ours/hf {name}", pair.get("ratio"), 2.0,
                                  why=gap_reason(pair) if "hf" in pair else skipped))
            targets.append(target(f"peak memory ours/hf {name}", pair.get("memory_ratio"), 0.5, higher_is_better=False,
                                  why=memory_reason(pair) if pair.get("memory_ratio") else skipped))
        result["precisions"][precision] = fig
    return with_reason(result, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="stories260K")
    parser.add_argument("--ckpt_dir", default=None, help="stories260K only: a Meta-layout checkpoint instead")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=None, help="default: 256 (stories260K), 512 (smollm2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per round; default: 10 (stories260K), 1")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activation_checkpointing", choices=["none", "ours", "both"], default="none",
                        help="smollm2: recompute each block in the backward pass (ours: the Trainer's option; both: "
                             "also transformers' gradient checkpointing)")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 2 x 32 tokens, one step, one round")
    opts = parser.parse_args()
    smollm2 = opts.model == "smollm2"
    if opts.quick:
        opts.batch, opts.seq_len, opts.steps, opts.repeats = 2, 32, 1, 1
    opts.seq_len = opts.seq_len or (512 if smollm2 else 256)
    opts.steps = opts.steps or (1 if smollm2 else 10)
    opts.repeats = opts.repeats or 3
    torch.set_num_threads(opts.threads)
    if smollm2:
        emit(bench_smollm2(opts))
    else:
        emit(bench_stories(opts))
        distributed.teardown()


if __name__ == "__main__":
    main()
