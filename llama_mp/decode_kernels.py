"""CPU kernels for decode steps, in C (llama_mp/decode_kernels.c), for what torch runs slowly at one token per row:
  - `matvec`: one row times a weight matrix (batch 1). A batch-1 step reads every weight once, and torch's kernels
    for a single row read them at about half of what the memory delivers (bfloat16 13-27 GB/s, float32 17-21 GB/s,
    against 52 GB/s of a plain sum on 2 threads of an AMD EPYC with AVX512-BF16; README "Benchmarks"). The kernel
    reads each thread's rows as one sequential stream, in AVX512 (AVX512-BF16's paired bfloat16 products) or AVX2 +
    FMA.
  - `attend_one`: one query per row against the KV cache (every decode step, any batch). torch runs it as two tiny
    batched matmuls and a softmax per layer, ~25 us each in bfloat16 whatever their size.
  - `rms_norm`: a decode step's RMSNorms, one pass a row where torch runs ~9 small ops (~18 us a call, 61 a step).
  - `decode_layers`: every transformer block of a batch-1 decode step in one call, made of the three and the blocks'
    small ops (rotary embedding, cache write, residual adds, SwiGLU), each rounded as the model's ops round: torch's
    ~40 small ops a block and the Python between them were ~40% of a SmolLM2 batch-1 step (README "Benchmarks").
  - Q8_0 weights (`quantize_q8_0`, `Q8Copies`, `matvec_q8`, decode_layers with Q8_0 matrices): int8 copies of the
    matrices, 32 weights to a float32 scale, which a batch-1 step reads in 1.125 bytes a weight instead of bfloat16's
    2 (the step's time is the weights' bytes over the memory's bandwidth); each product's input is quantized alike and
    the products are integer dot products. Opt-in (`--decode_weights q8_0`).
All of them accumulate in float32 (Q8_0: each block's dot product in integers), and each output element is one thread's fixed sequence of operations: the results
do not depend on the thread count.

The library is compiled once with the system's C compiler (`cc`, or $CC) into a cache directory ($LLAMA_MP_CACHE,
default ~/.cache/llama_mp; the file's name carries a hash of the source and flags) and loaded with ctypes: no torch
headers, about a second. Where there is no compiler, the build fails, the CPU has no AVX2, or LLAMA_MP_KERNELS=0 is
set, each returns None and the caller keeps torch's kernels. `python -m llama_mp.decode_kernels` builds it and says
which kernels run (the set-up does this).
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from typing import Optional

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_kernels.c")
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]

_state: dict = {}  # "lib": the loaded library or None, "why": why it is None, "levels": {dtype: gemv level},
#                   "cap": the level every call asks for (0: the best this CPU has)
LEVELS = {1: "avx2", 2: "avx512"}  # the kernels' instruction sets (level 0: none, torch's kernel is used)


def cache_dir() -> str:
    return os.environ.get("LLAMA_MP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llama_mp")


def build() -> str:
    """The compiled kernel's path, compiling it first if this source and these flags have not been built before.
    Concurrent builders (torchrun's ranks) each write their own temporary file and rename it into place."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join([compiler, platform.machine()] + FLAGS).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"decode_kernels-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, SOURCE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is None or done.returncode != 0:
        if os.path.exists(tmp):  # a failed build leaves nothing behind
            os.remove(tmp)
        if done is None:
            raise OSError(f"{compiler} could not be run to build {SOURCE}")
        raise OSError(f"{compiler} could not build {SOURCE}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    os.replace(tmp, path)
    return path


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, or None (the reason in `unavailable()`). Built and loaded once per process. LLAMA_MP_KERNELS=0
    keeps torch's kernels; LLAMA_MP_KERNELS=avx2 takes the AVX2 kernels on an AVX512 CPU (for comparisons)."""
    if "lib" not in _state:
        _state.update(lib=None, why=None, levels={torch.bfloat16: 0, torch.float32: 0}, cap=0)
        setting = os.environ.get("LLAMA_MP_KERNELS", "1")
        if setting == "0":
            _state["why"] = "LLAMA_MP_KERNELS=0"
        elif platform.machine() not in ("x86_64", "AMD64"):
            _state["why"] = f"no kernel for {platform.machine()}"
        else:
            try:
                lib = ctypes.CDLL(build())
            except (OSError, subprocess.SubprocessError) as err:
                _state["why"] = str(err)
            else:
                lib.gemv.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
                lib.attend_one.argtypes = ([ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5
                                           + [ctypes.c_int64] * 5 + [ctypes.c_float])
                lib.rms_norm.argtypes = ([ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
                                         + [ctypes.c_float])
                lib.gemv_q8.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
                lib.decode_layers.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64]
                                              + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 7 + [ctypes.c_float] * 2)
                for fn in (lib.gemv, lib.gemv_level, lib.gemv_q8, lib.q8_level, lib.attend_one, lib.rms_norm,
                           lib.decode_layers):
                    fn.restype = ctypes.c_int
                _state["cap"] = 1 if setting == "avx2" else 0
                _state["levels"] = {dtype: min(_state["cap"] or 2, lib.gemv_level(int(dtype == torch.bfloat16)))
                                    for dtype in (torch.bfloat16, torch.float32)}
                if _state["levels"][torch.float32]:
                    _state["lib"] = lib
                else:
                    _state["why"] = "this CPU has neither AVX512 nor AVX2 + FMA"
    return _state["lib"]


def unavailable() -> Optional[str]:
    library()
    return _state["why"]


def kernels() -> dict:
    """The instruction set of the kernel each dtype takes on this CPU (None: torch's kernel)."""
    library()
    return {str(dtype).split(".")[-1]: LEVELS.get(level) for dtype, level in _state["levels"].items()}


def _run(kernel: str, dtype: torch.dtype, level: Optional[int], *args) -> bool:
    """Call the library's `kernel` for bfloat16 or float32 data at `level` (default: LLAMA_MP_KERNELS's cap, else the
    best this CPU has); False where the CPU lacks that level (or attend_one could not get its buffer)."""
    return getattr(_state["lib"], kernel)(int(dtype == torch.bfloat16), level or _state["cap"], *args) == 0


def matvec(x: torch.Tensor, weight: torch.Tensor, level: Optional[int] = None) -> Optional[torch.Tensor]:
    """weight [rows, cols] @ x (cols numbers) -> [rows] in x's dtype, or None where the kernel does not apply (not a
    contiguous bfloat16 / float32 CPU pair, autograd wanted, or no kernel here): the caller then uses torch.
    level: a kernel's instruction set (1 AVX2, 2 AVX512) instead of the best this CPU has (tests compare them)."""
    if (x.dtype not in (torch.bfloat16, torch.float32) or weight.dtype != x.dtype or x.device.type != "cpu"
            or weight.device.type != "cpu" or weight.dim() != 2 or x.numel() != weight.shape[1]
            or not (x.is_contiguous() and weight.is_contiguous()) or torch.is_grad_enabled() or library() is None):
        return None
    y = torch.empty(weight.shape[0], dtype=x.dtype)
    ok = _run("gemv", x.dtype, level, weight.data_ptr(), x.data_ptr(), y.data_ptr(), weight.shape[0], weight.shape[1])
    return y if ok else None


def attend_one(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
               level: Optional[int] = None) -> Optional[torch.Tensor]:
    """One query per row against a KV cache: q [B, heads, dim]; keys_t [>= B, kv_heads, dim, max_len] and values
    [>= B, kv_heads, max_len, dim] (the cache's own buffers); lengths [B] int64 (contiguous, on the CPU): row b
    attends to its positions [0, lengths[b]) (the caller keeps them within 1..max_len; the kernel never reads past
    max_len). -> softmax(q k^T / sqrt(dim)) v, [B, heads, dim] in q's dtype, or None where the kernel does not
    apply (the caller then uses torch)."""
    bsz, heads, dim = q.shape
    kv_heads, max_len = keys_t.shape[1], keys_t.shape[-1]
    if (q.dtype not in (torch.bfloat16, torch.float32) or keys_t.dtype != q.dtype or values.dtype != q.dtype
            or q.device.type != "cpu" or torch.is_grad_enabled() or heads % kv_heads
            or not (q.is_contiguous() and keys_t.is_contiguous() and values.is_contiguous()) or keys_t.shape[2] != dim
            or values.shape[1:] != (kv_heads, max_len, dim) or keys_t.shape[0] < bsz or values.shape[0] < bsz
            or lengths.dtype != torch.int64 or not lengths.is_contiguous() or lengths.shape != (bsz,)
            or library() is None):
        return None
    out = torch.empty_like(q)
    ok = _run("attend_one", q.dtype, level, q.data_ptr(), keys_t.data_ptr(), values.data_ptr(), out.data_ptr(),
              lengths.data_ptr(), bsz, heads, kv_heads, dim, max_len, dim ** -0.5)
    return out if ok else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, level: Optional[int] = None) -> Optional[torch.Tensor]:
    """The model's RMSNorm of every row of x [..., dim]: x * rsqrt(mean(x^2) + eps) in float32, rounded to x's dtype,
    times weight [dim], rounded again; or None where the kernel does not apply (the caller then uses torch)."""
    if (x.dtype not in (torch.bfloat16, torch.float32) or weight.dtype != x.dtype or x.device.type != "cpu"
            or weight.shape != x.shape[-1:] or not (x.is_contiguous() and weight.is_contiguous())
            or torch.is_grad_enabled() or library() is None):
        return None
    out = torch.empty_like(x)
    ok = _run("rms_norm", x.dtype, level, x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
              x.shape[-1], eps)
    return out if ok else None


Q8_BLOCK = 32  # weights per Q8_0 scale


def quantize_q8_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 (llama.cpp's name) of a matrix [rows, cols]: each run of 32 consecutive weights of a row (the last one of a
    row may be shorter) as int8 numbers q and one float32 scale s = max |w| / 127, w ~ s q with q = round(w / s):
    -> (q int8 [rows, cols], scales float32 [rows, ceil(cols / 32)]). Each weight is off by at most s / 2 =
    max |w| / 254 over its block, bfloat16's rounding (2^-9 of a weight) in size."""
    rows, cols = weight.shape
    blocks = -(-cols // Q8_BLOCK)
    w = torch.nn.functional.pad(weight.detach().float(), (0, blocks * Q8_BLOCK - cols)).view(rows, blocks, Q8_BLOCK)
    scales = w.abs().amax(dim=-1) / 127
    inverse = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
    q = (w * inverse[..., None]).round_().clamp_(-127, 127).to(torch.int8).view(rows, blocks * Q8_BLOCK)
    return q[:, :cols].contiguous(), scales.contiguous()


class Q8Copies:
    """Q8_0 copies of a model's weights for its batch-1 decode steps, each made at its first use and made again once
    its weight has changed in place (torch's version counter: an optimizer step, a load into the weights)."""

    def __init__(self):
        self.held: dict = {}  # id(weight) -> (weight, its version, q, scales)

    def __call__(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.held.get(id(weight))
        if held is None or held[0] is not weight or held[1] != weight._version:
            held = self.held[id(weight)] = (weight, weight._version, *quantize_q8_0(weight))
        return held[2], held[3]


def _is_q8(q: torch.Tensor, scales: torch.Tensor, shape: tuple) -> bool:
    return (q.dtype == torch.int8 and q.shape == shape and scales.dtype == torch.float32 and q.is_cpu and scales.is_cpu
            and scales.shape == (shape[0], -(-shape[1] // Q8_BLOCK)) and q.is_contiguous() and scales.is_contiguous())


def matvec_q8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
              level: Optional[int] = None) -> Optional[torch.Tensor]:
    """(q, scales) (a Q8_0 matrix [rows, cols], quantize_q8_0's) @ x (cols numbers) -> [rows] in x's dtype: x quantized
    alike (per block of 32: xq = rint(x / t), t = max |x| / 127), per row the sum over its blocks of (scale t) (q . xq),
    the dot products in integers, the sum in float32 (llama_mp/decode_kernels.c); or None where the kernel does not
    apply (the caller then uses its own product)."""
    if (x.dtype not in (torch.bfloat16, torch.float32) or not x.is_cpu or not x.is_contiguous() or q.dim() != 2
            or x.numel() != q.shape[1] or not _is_q8(q, scales, tuple(q.shape)) or torch.is_grad_enabled()
            or library() is None):
        return None
    y = torch.empty(q.shape[0], dtype=x.dtype)
    ok = _state["lib"].gemv_q8(int(x.dtype == torch.bfloat16), level or _state["cap"], q.data_ptr(),
                               scales.data_ptr(), x.data_ptr(), y.data_ptr(), q.shape[0], q.shape[1]) == 0
    return y if ok else None


def decode_layers(x: torch.Tensor, layers: list, cos_sin: torch.Tensor, pos: int, heads: int, eps: float,
                  level: Optional[int] = None) -> Optional[torch.Tensor]:
    """Transformer blocks for one token of one row (a batch-1 decode step), all in one call; per block
        h = x + wo @ attention(q, cache), q|k|v = wqkv @ norm(x) rotated by cos_sin, k and v written at `pos`;
        x' = h + w2 @ (silu(g) * u), g|u = w13 @ norm(h).
    x [dim]; layers: per block (attention_norm [dim], ffn_norm [dim], wqkv [(heads + 2 kv_heads) head_dim, dim] (q's
    heads, k's, v's), wo [dim, heads head_dim], w13 [2 hidden, dim] (w1's rows, w3's), w2 [dim, hidden], keys_t
    [kv_heads, head_dim, max_len], values [kv_heads, max_len, head_dim]: the row's own cache buffers, written at pos
    and read at [0, pos]); cos_sin [head_dim / 2, 2] float32 (the position's rotation: torch.view_as_real of its
    freqs_cis row). The four matrices may instead each be a Q8_0 pair (q, scales) (quantize_q8_0's), in every block
    or in none. -> the last block's output [dim] in x's dtype, every op rounded as the model's ops round
    (llama_mp/decode_kernels.c); or None where the kernel does not apply (the caller then runs the blocks' own ops)."""
    dtype = x.dtype
    if (library() is None or torch.is_grad_enabled() or dtype not in (torch.bfloat16, torch.float32) or not layers
            or cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous() or not cos_sin.is_cpu):
        return None
    attention_norm, ffn_norm, wqkv, wo, w13, w2, keys_t, values = layers[0]
    q8 = isinstance(w2, tuple)
    if keys_t.dim() != 3 or (w2[0] if q8 else w2).dim() != 2:
        return None
    dim, (kv_heads, head_dim, max_len), hidden = x.shape[-1], keys_t.shape, (w2[0] if q8 else w2).shape[1]
    shapes = ((dim,), (dim,), ((heads + 2 * kv_heads) * head_dim, dim), (dim, heads * head_dim), (2 * hidden, dim),
              (dim, hidden), (kv_heads, head_dim, max_len), (kv_heads, max_len, head_dim))
    if (x.numel() != dim or not x.is_contiguous() or not x.is_cpu or heads % kv_heads or cos_sin.numel() != head_dim
            or not 0 <= pos < max_len):
        return None
    pointers = []
    for weights in layers:  # (plain loops: this runs at every batch-1 decode step)
        if len(weights) != len(shapes):
            return None
        scales = []
        for i, (t, shape) in enumerate(zip(weights, shapes)):
            if 2 <= i < 6 and q8:  # a matrix's Q8_0 pair: its numbers here, its scales after values
                if not (isinstance(t, tuple) and len(t) == 2 and _is_q8(t[0], t[1], shape)):
                    return None
                t, scale = t
                scales.append(scale.data_ptr())
            elif not isinstance(t, torch.Tensor) or t.dtype != dtype or t.shape != shape or not t.is_contiguous() \
                    or not t.is_cpu:
                return None
            pointers.append(t.data_ptr())
        pointers += scales
    out = torch.empty_like(x)
    ok = _run("decode_layers", dtype, level, int(q8), x.data_ptr(), out.data_ptr(), len(layers),
              (ctypes.c_void_p * len(pointers))(*pointers), cos_sin.data_ptr(), pos, max_len, dim, heads, kv_heads,
              head_dim, hidden, head_dim ** -0.5, eps)
    return out if ok else None


if __name__ == "__main__":
    lib = library()
    print(f"[decode_kernels] {SOURCE}: "
          + (f"kernels {kernels()}" if lib is not None else f"not used ({unavailable()})"))
    sys.exit(0)
