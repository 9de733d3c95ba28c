"""The batch-1 matrix-vector kernel (llama_mp/gemv.c, loaded by llama_mp/gemv.py) against float64 products, torch's
own rounding, and itself on other thread counts."""

import platform
import shutil

import pytest
import torch

from llama_mp import gemv

BUILDABLE = platform.machine() in ("x86_64", "AMD64") and bool(shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(gemv.library() is None, reason=f"no kernel here: {gemv.unavailable()}")
DTYPES = [torch.bfloat16, torch.float32]


def levels(dtype) -> list[int]:
    """Every kernel this CPU can run for the dtype (AVX2, and AVX512 where it has it)."""
    return list(range(1, gemv._state["levels"].get(dtype, 0) + 1)) if gemv.library() is not None else []


@pytest.mark.skipif(not BUILDABLE, reason="needs x86-64 and a C compiler")
def test_the_kernel_builds_and_loads_where_there_is_a_compiler():
    assert gemv.unavailable() is None, gemv.unavailable()
    assert gemv.kernels()["float32"] in ("avx2", "avx512")


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 7), (77, 93), (130, 576), (64, 1536), (260, 40)])
def test_matvec_equals_the_float64_product_within_float32_accumulation_and_one_rounding(dtype, rows, cols):
    """|y - w x| <= cols * 2^-24 * sum |w x| (float32 additions) + the output's one rounding (2^-8 relative in
    bfloat16, 2^-24 in float32), for every kernel this CPU runs; shapes with rows not a multiple of 4 or of the
    64-row blocks and cols not a multiple of the vector width exercise the tails."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    x = torch.randn(cols, generator=gen).to(dtype)
    exact = w.double() @ x.double()
    unit = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -24
    bound = unit * exact.abs() + (cols + 1) * 2 ** -24 * (w.double().abs() @ x.double().abs()) * (1 + unit)
    with torch.inference_mode():
        for level in levels(dtype):
            y = gemv.matvec(x, w, level)
            assert y.dtype == dtype and y.shape == (rows,)
            assert ((y.double() - exact).abs() <= bound).all(), (level, (y.double() - exact).abs().max())


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_single_product_is_rounded_as_torch_rounds_it(dtype):
    """With one column, y = w * x: the product is exact in float32, so y must be torch's own rounding of it, bit for
    bit: round to nearest even into bfloat16, overflow to infinity, infinities and NaN kept."""
    gen = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(200, generator=gen) * 10.0 ** torch.randint(-3, 4, (200,), generator=gen),
                   torch.tensor([3.0e38, -3.0e38, float("inf"), float("-inf"), float("nan"), 0.0, -0.0])])
    w = w.to(dtype)[:, None]
    x = torch.tensor([1.0e-3 if dtype == torch.float32 else 1.7]).to(dtype)
    expected = (w.float()[:, 0] * x.float()).to(dtype)
    with torch.inference_mode():
        for level in levels(dtype):
            y = gemv.matvec(x, w, level)
            assert torch.equal(y.isnan(), expected.isnan())
            assert torch.equal(y[~y.isnan()], expected[~expected.isnan()]), level


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_result_does_not_depend_on_the_thread_count(dtype):
    """Every row is one thread's fixed sequence of operations: 1 thread and 2 give the same bits."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 576, generator=gen).to(dtype)
    x = torch.randn(576, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(2)
            two = gemv.matvec(x, w)
            torch.set_num_threads(1)
            one = gemv.matvec(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_matvec_declines_what_it_does_not_compute():
    """None (the caller keeps torch's kernel) for autograd, a transposed weight, mixed or other dtypes, a wrong size."""
    w = torch.randn(8, 16)
    x = torch.randn(16)
    assert gemv.matvec(x, w) is None  # grad mode on
    with torch.inference_mode():
        assert gemv.matvec(x, w) is not None
        assert gemv.matvec(torch.randn(8), w.t()) is None
        assert gemv.matvec(x.to(torch.bfloat16), w) is None
        assert gemv.matvec(x.half(), w.half()) is None
        assert gemv.matvec(torch.randn(15), w) is None


def test_the_kernel_is_off_with_llama_mp_gemv_0(monkeypatch):
    monkeypatch.setattr(gemv, "_state", {})
    monkeypatch.setenv("LLAMA_MP_GEMV", "0")
    assert gemv.library() is None and gemv.unavailable() == "LLAMA_MP_GEMV=0"
    with torch.inference_mode():
        assert gemv.matvec(torch.randn(16), torch.randn(8, 16)) is None
