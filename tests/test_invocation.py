"""Every command runs in the three forms users type: `python -m MODULE`, `python path/to/script.py` from any
directory, and `torchrun ... path/to/script.py` (the project is an installed package: no PYTHONPATH needed)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, STORIES_BIN, TOK512


def run(argv, cwd, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # found by the installation, not by a path
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def forms(module: str, elsewhere: str, nproc: int = 2):
    """(name, argv prefix, cwd) of the three forms of one command; the script forms run from another directory."""
    script = os.path.join(ROOT, *module.split(".")) + ".py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [("python -m", [sys.executable, "-m", module], ROOT),
            ("script path", [sys.executable, script], elsewhere),
            ("torchrun script path", [*torchrun, script], elsewhere)]


@pytest.fixture(scope="module")
def stories_mp1(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("inv") / "stories")
    result = run([sys.executable, os.path.join(ROOT, "llama_mp/convert.py"), "llama2c", "--input", STORIES_BIN,
                  "--output_dir", out], cwd="/")
    assert result.returncode == 0, result.stderr
    return out


def test_a_command_of_each_step_runs_in_each_form(tmp_path, stories_mp1):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Once upon a time"}\n')
    commands = {  # module -> arguments (given an output path); each does real work, not just --help
        "llama_mp.generate": lambda out: ["--ckpt_dir", stories_mp1, "--tokenizer_path", TOK512, "--prompts_file",
                                          str(prompts), "--output_file", out, "--max_gen_len", "8",
                                          "--temperature", "0"],
        "step1_synthetic_preference.clean_oasst1_prompts": lambda out: ["--output_file", out],
        "step0_coldstart.synscore_anchors": lambda out: ["--dataset", os.path.join(ROOT, "configs/tabular/abalone.yaml"),
                                                         "--num_clusters", "4", "--output_dir", out,
                                                         "--splits_dir", str(tmp_path / "splits")],
    }
    results = {}
    for module, arguments in commands.items():
        for name, prefix, cwd in forms(module, str(tmp_path)):
            if name.startswith("torchrun") and module != "llama_mp.generate":
                continue  # CPU-only commands: one process; torchrun is for the model-loading ones (below too)
            out = str(tmp_path / f"{module}-{name.replace(' ', '_')}")
            result = run([*prefix, *arguments(out)], cwd)
            assert result.returncode == 0, (module, name, result.stderr[-2000:])
            results.setdefault(module, []).append(out)
    # the forms do the same work: identical outputs
    greedy = [[json.loads(line)["generation"] for line in open(p)] for p in results["llama_mp.generate"]]
    assert greedy[0] == greedy[1] == greedy[2] and greedy[0][0]
    prompts_files = [open(p).read() for p in results["step1_synthetic_preference.clean_oasst1_prompts"]]
    assert prompts_files[0] == prompts_files[1] and json.loads(prompts_files[0])
    anchors = [open(os.path.join(p, "abalone_anchors.csv")).read()
               for p in results["step0_coldstart.synscore_anchors"]]
    assert anchors[0] == anchors[1] and anchors[0].count("\n") == 5


@pytest.mark.parametrize("module", ["step2_reward_model.train_reward_model", "step3_rl.train_dpo"])
def test_trainers_start_in_each_form(tmp_path, module):
    for name, prefix, cwd in forms(module, str(tmp_path), nproc=1):
        result = run([*prefix, "--help"], cwd)
        assert result.returncode == 0 and "--output_dir" in result.stdout, (module, name, result.stderr[-2000:])
