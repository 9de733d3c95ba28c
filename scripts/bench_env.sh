# The benchmarks' peers in their own venv, .venv-bench (gitignored): transformers, TRL (+ datasets, accelerate), PEFT
# and psutil, layered over the product venv .venv (its torch 2.13.0, llama_mp and the embedded model are seen through a
# .pth file, so nothing is downloaded twice and both contenders run on the very same torch). The product never
# imports any of these.
#
#   bash scripts/bench_env.sh                 # creates or updates .venv-bench (a no-op when up to date)
#   LLAMA_CPP=1 bash scripts/bench_env.sh     # also llama-cpp-python (compiles llama.cpp: ~10-20 min on 2 cores)
#   .venv-bench/bin/python scripts/bench_sampler.py --model smollm2 [--quick]
#
# torch is pinned in the same pip command, so that no peer can pull a different (CUDA) torch.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRODUCT="${VENV:-$REPO_ROOT/.venv}"
BENCH="${BENCH_VENV:-$REPO_ROOT/.venv-bench}"
PEERS=(torch==2.13.0 "transformers>=5,<6" trl==1.16.0 datasets accelerate peft psutil)
if [ ! -x "$PRODUCT/bin/python" ]; then
  echo "[bench_env] $PRODUCT is missing: run the project's set-up first (source scripts/setup_env.sh)" >&2
  exit 1
fi
if [ ! -x "$BENCH/bin/python" ]; then
  echo "[bench_env] creating $BENCH over $PRODUCT"
  "$PRODUCT/bin/python" -m venv "$BENCH"
fi
product_site="$("$PRODUCT/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
bench_site="$("$BENCH/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# an "import" line of a .pth file runs at start-up: addsitedir also reads the product's own .pth files (the editable
# llama_mp install); it comes after the bench venv's own site-packages, so a peer installed here wins
echo "import site; site.addsitedir('$product_site')" > "$bench_site/_product_venv.pth"
if [ -n "${LLAMA_CPP:-}" ]; then
  PEERS+=(llama-cpp-python)
  # llama.cpp's native build (-march=native, AMX kernels) crashed at its first evaluation on an AMX machine here; an
  # AVX2 build runs on every x86-64 machine this project has seen (CMAKE_ARGS set by the caller wins)
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF}"
fi
want="$(printf '%s\n' "${PEERS[@]}" | sha256sum | cut -d' ' -f1)"
if [ "$want" != "$(cat "$BENCH/.peers.sha256" 2>/dev/null || true)" ]; then
  echo "[bench_env] installing ${PEERS[*]} into $BENCH"
  "$BENCH/bin/python" -m pip install --quiet --disable-pip-version-check "${PEERS[@]}"
  echo "$want" > "$BENCH/.peers.sha256"
fi
"$BENCH/bin/python" - <<'EOF'
import importlib
for name in ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "psutil", "llama_cpp", "llama_mp"):
    try:
        print(f"[bench_env] {name} {getattr(importlib.import_module(name), '__version__', 'ok')}")
    except ImportError as err:
        print(f"[bench_env] {name}: not installed ({err})")
EOF
