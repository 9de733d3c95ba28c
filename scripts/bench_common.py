"""What the benchmark scripts share: the two embedded models, the same weights as a Hugging Face model, the peers'
availability, precisions, alternating timers, memory and hardware measurements, targets, and the one JSON line.

The peers (transformers, TRL, PEFT, llama-cpp-python) are optional and never imported by the product: they live in
.venv-bench, made by `bash scripts/bench_env.sh` over the product venv (same torch). A benchmark run by an interpreter
without a peer still runs, and its JSON names the missing peer and how to install it.
"""

import atexit
import ctypes
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import torch

from llama_mp.checkpoint import save_checkpoint, split_state
from llama_mp.convert import read_llama2c

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("stories260K", "smollm2")
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
BENCH_PYTHON = os.path.join(ROOT, ".venv-bench", "bin", "python")
INSTALL_HINT = "bash scripts/bench_env.sh (makes .venv-bench), then run this script with .venv-bench/bin/python"
PEER_PACKAGES = {"transformers": "transformers>=5,<6", "trl": "trl==1.16.0", "datasets": "datasets",
                 "accelerate": "accelerate", "peft": "peft", "llama_cpp": "llama-cpp-python"}


# ---- models ------------------------------------------------------------------------------------------------------
def scratch_dir(prefix: str) -> str:
    """A temporary directory removed when the process exits (a SmolLM2 export is 0.5 GB, a PPO checkpoint 3 GB)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def default_checkpoint() -> str:
    """stories260K converted to the Meta layout in a temporary directory."""
    ckpt_dir = scratch_dir("bench_stories260K_")
    args, state = read_llama2c(os.path.join(ROOT, "data/llama2c/stories260K.bin"))
    save_checkpoint(ckpt_dir, args, split_state(state, args, 1))
    return ckpt_dir


def smollm2_checkpoint() -> str:
    """checkpoints/smollm2-135m-instruct (Meta layout + tokenizer.json + chat template), converted by the set-up."""
    from llama_mp.embedded import SMOLLM2_DIR, smollm2_ready
    if not smollm2_ready():
        sys.exit(f"{SMOLLM2_DIR}: not converted yet; run `.venv/bin/python -m llama_mp.embedded` (or source "
                 f"scripts/setup_env.sh) first")
    return SMOLLM2_DIR


def export_hf(ckpt_dir: str) -> str:
    """The checkpoint as a Hugging Face Llama directory, through the project's own exporter
    (`python -m llama_mp.convert to_hf`), in a temporary directory: the peers load exactly these weights."""
    out = os.path.join(scratch_dir("bench_hf_"), "hf")
    subprocess.run([sys.executable, "-m", "llama_mp.convert", "to_hf", "--input_dir", ckpt_dir, "--output_dir", out],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": ROOT})
    return out


def hf_from_export(hf_dir: str, dtype: torch.dtype = torch.float32):
    """transformers' LlamaForCausalLM from an exported directory (None when transformers is missing)."""
    if missing_peers("transformers"):
        return None
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()


def hf_model(model):
    """The same weights as a transformers LlamaForCausalLM (q/k rows permuted to its rotate-half RoPE layout)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    a = model.args
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads,
                         max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                         tie_word_embeddings=a.tie_embeddings, hidden_act="silu", attention_bias=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = LlamaForCausalLM(config).eval()

    def permute(w, heads):  # interleaved pairs -> first half / second half per head
        return w.view(heads, a.head_dim // 2, 2, a.dim).transpose(1, 2).reshape(heads * a.head_dim, a.dim)

    sd = model.state_dict()
    new = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(a.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        new[q + "self_attn.q_proj.weight"] = permute(sd[p + "attention.wq.weight"], a.n_heads)
        new[q + "self_attn.k_proj.weight"] = permute(sd[p + "attention.wk.weight"], a.kv_heads)
        new[q + "self_attn.v_proj.weight"] = sd[p + "attention.wv.weight"]
        new[q + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        new[q + "mlp.gate_proj.weight"] = sd[p + "feed_forward.w1.weight"]
        new[q + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        new[q + "mlp.up_proj.weight"] = sd[p + "feed_forward.w3.weight"]
        new[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        new[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    hf.load_state_dict(new, strict=False)
    return hf


# ---- peers -------------------------------------------------------------------------------------------------------
def missing_peers(*modules: str) -> Optional[str]:
    """None when every module is importable here; else why not and how to install it (the JSON's skip reason)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    packages = " ".join(PEER_PACKAGES.get(m, m) for m in missing)
    return (f"{', '.join(missing)} not importable by {sys.executable}: {INSTALL_HINT} (it runs pip install "
            f"torch==2.13.0 {packages} there)")


# ---- precision ---------------------------------------------------------------------------------------------------
def precisions() -> list[str]:
    """The best precision this CPU computes natively first (bf16 with AVX512-BF16 / AMX), fp32 beside it."""
    from llama_mp.train import bf16_native
    return ["bf16", "fp32"] if bf16_native(torch.device("cpu")) else ["fp32"]


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LORA_RANK, LORA_ALPHA = 16, 16.0  # the LoRA benchmarks' adapters: every projection, ours and PEFT's
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # = ours, all 7


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


# ---- timing ------------------------------------------------------------------------------------------------------
def alternate(contenders: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, float]:
    """Best seconds of each contender over `repeats` rounds, the contenders taking turns within every round (so that a
    change in the machine's load hits all alike), after one warm-up call each."""
    if warmup:
        for fn in contenders.values():
            fn()
    best = {name: float("inf") for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


class CallTimer:
    """Wraps obj.<attr> (a method) to log (seconds, first argument's shape) per call; remove() restores it."""

    def __init__(self, obj, attr: str = "forward"):
        self.obj, self.attr, self.inner, self.calls = obj, attr, getattr(obj, attr), []
        setattr(obj, attr, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
        self.calls.append((time.perf_counter() - start, shape))
        return out

    @property
    def seconds(self) -> float:
        return sum(s for s, _ in self.calls)

    def remove(self):
        if self.attr in vars(self.obj):
            delattr(self.obj, self.attr)
        else:
            setattr(self.obj, self.attr, self.inner)


class StepPhases:
    """Seconds of the forward pass, the gradient clipping (timed(fn, phase) wraps them) and the optimizer step
    (watch(optimizer): its step hooks); the rest of a step is the backward pass."""

    def __init__(self, phases: tuple[str, ...] = ("forward", "clip", "optimizer")):
        self.seconds = dict.fromkeys(phases, 0.0)
        self.started = 0.0

    def timed(self, fn, phase: str):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[phase] += time.perf_counter() - start
            return out
        return run

    def watch(self, optimizer) -> None:
        """Time every optimizer.step (llama_mp's AdamW or a torch.optim one)."""
        step = optimizer.step

        def timed(*args, **kwargs):
            started = time.perf_counter()
            out = step(*args, **kwargs)
            self.seconds["optimizer"] += time.perf_counter() - started
            return out
        optimizer.step = timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def split_ms(self, total: float, steps: int, rest: str = "backward") -> dict:
        """ms per step of each phase, `rest` being the step's time outside the timed ones."""
        ms = {**self.seconds, rest: total - sum(self.seconds.values())}
        order = ["forward", rest] + [k for k in self.seconds if k != "forward"]
        return {k: round(ms[k] / max(steps, 1) * 1e3, 1) for k in order}


# ---- hardware ----------------------------------------------------------------------------------------------------
def memory_bandwidth_gbps(threads: int, gib: float = 1.0, repeats: int = 5) -> dict:
    """This machine's memory read bandwidth: the best rate of summing a float32 tensor far larger than the caches
    (and of copying it: read + write counted), on `threads` threads."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2 ** 30) // 4)
    y = torch.empty_like(x)
    read = copy = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        read = min(read, time.perf_counter() - start)
        start = time.perf_counter()
        y.copy_(x)
        copy = min(copy, time.perf_counter() - start)
    nbytes = x.numel() * 4
    del x, y
    return {"read": round(nbytes / read / 1e9, 1), "copy": round(2 * nbytes / copy / 1e9, 1), "tensor_gib": gib}


def matmul_peak_gflops(shapes: list[tuple[int, int, int]], dtype: torch.dtype, threads: int,
                       repeats: int = 5) -> dict:
    """Best GFLOP/s of [m, k] @ [k, n] in `dtype` for each (m, k, n), and the best of them ("peak")."""
    torch.set_num_threads(threads)
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        rates[f"{m}x{k}x{n}"] = round(2 * m * k * n / best / 1e9, 1)
    return {"peak": max(rates.values()), "shapes": rates}


# ---- memory ------------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """This process's resident memory now (psutil where installed, else /proc/self/status)."""
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:
        return (_status_kb("VmRSS") or 0) / 1024


def release_memory() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise), so a process's resident size is what it holds."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_short(share: float = 0.25) -> bool:
    """Less than `share` of the machine's memory available (/proc/meminfo's MemAvailable; False where it is not
    readable)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[1:2]}
        return info["MemAvailable"] < share * info["MemTotal"]
    except (OSError, KeyError, ValueError):
        return False


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) to the current size: Linux's /proc/self/clear_refs "5"."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> Optional[float]:
    """The resident high-water mark since the last reset_peak_rss (VmHWM), None where the kernel does not say."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


# ---- results -----------------------------------------------------------------------------------------------------
def target(name: str, measured: Optional[float], goal: float, higher_is_better: bool = True,
           why: str = "") -> dict:
    """One target's record; `why` (the measured cause) is kept only when the target is not met."""
    met = None if measured is None else (measured >= goal if higher_is_better else measured <= goal)
    record = {"name": name, "target": (">= " if higher_is_better else "<= ") + f"{goal}",
              "measured": None if measured is None else round(measured, 3), "met": met}
    if met is not True:
        record["reason"] = why if measured is not None else (why or "not measured")
    return record


def with_reason(result: dict, targets: list[dict]) -> dict:
    """result + "targets" + (when any is not met) "reason": every unmet target's name and measured cause."""
    result["targets"] = targets
    unmet = [t for t in targets if t["met"] is not True]
    if unmet:
        result["reason"] = "; ".join(f"{t['name']}: {t['reason']}" for t in unmet)
    return result


def emit(result: dict) -> None:
    """The benchmark's one JSON object, last on stdout."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def r(x: Optional[float], digits: int = 1) -> Optional[float]:
    return None if x is None else round(x, digits)
