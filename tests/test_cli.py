"""The command-line tools as a user runs them: results, and one-line errors for bad input."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, STORIES_BIN, STORIES_REFERENCE, TOK512, run_cli, run_clis


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "stories_mp2")
    result = run_cli("-m", "llama_mp.convert", "llama2c", "--input", STORIES_BIN, "--output_dir", out,
                     "--model_parallel_size", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    return out


def test_generate_from_a_two_shard_checkpoint_in_one_process(converted):
    result = run_cli("-m", "llama_mp.generate", "--ckpt_dir", converted, "--tokenizer_path", TOK512,
                     "--prompt", "Once upon a time", "--max_gen_len", "60", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(STORIES_REFERENCE + "\n[length]")


def test_generate_prompts_file_writes_records_in_order(converted, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Once upon a time"}\n{"id": "b", "prompt": "Tom"}\n')
    out = tmp_path / "out.jsonl"
    argv = ["-m", "llama_mp.generate", "--ckpt_dir", converted, "--tokenizer_path", TOK512, "--prompts_file",
            str(prompts), "--output_file", str(out), "--max_gen_len", "60", "--temperature", "0",
            "--stop", "\\n"]
    assert run_cli(*argv).returncode == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b"]
    assert records[0]["generation"] == STORIES_REFERENCE[len("Once upon a time"):].split("\n")[0]
    assert records[0]["finish_reason"] == "stop" and len(records[0]["logprobs"]) == len(records[0]["tokens"])
    assert_one_line_error(run_cli(*argv), "out.jsonl: already exists")


def test_score_prints_token_logprobs_and_mean_nll(converted):
    result = run_cli("-m", "llama_mp.score", "--ckpt_dir", converted, "--tokenizer_path", TOK512,
                     "--text", STORIES_REFERENCE, "--text", "Tom")
    assert result.returncode == 0, result.stderr
    story, tom = json.loads(result.stdout)
    assert len(story["token_logprobs"]) == len(story["tokens"]) > 40
    assert story["mean_nll"] == pytest.approx(-sum(story["token_logprobs"]) / len(story["tokens"]))
    assert story["mean_nll"] < 0.6  # the model's own greedy story is likely under it
    assert tom["tokens"] and tom["mean_nll"] > 0


def test_reshard_cli_refuses_to_overwrite(converted, tmp_path):
    out = str(tmp_path / "mp1")
    assert run_cli("-m", "llama_mp.convert", "reshard", "--input_dir", converted, "--output_dir", out,
                   "--model_parallel_size", "1").returncode == 0
    again = run_cli("-m", "llama_mp.convert", "reshard", "--input_dir", converted, "--output_dir", out,
                    "--model_parallel_size", "1")
    assert_one_line_error(again, "already holds a checkpoint", "--overwrite")


def test_bad_inputs_give_one_line_errors(converted, tmp_path):
    cases = []  # (argv, the error's fragment); each broken checkpoint in a directory of its own, run two at a time

    def broken(name, params=None, drop_shard=False):
        path = str(tmp_path / name)
        shutil.copytree(converted, path)
        if drop_shard:
            os.remove(os.path.join(path, "consolidated.00.pth"))
        if params is not None:
            with open(os.path.join(path, "params.json"), "w") as f:
                f.write(params if isinstance(params, str) else json.dumps(params))
        return path

    generate = ["-m", "llama_mp.generate", "--tokenizer_path", TOK512, "--prompt", "Hi", "--ckpt_dir"]
    cases.append(([*generate, broken("no_shard", drop_shard=True)], "consolidated.00.pth is missing"))
    cases.append(([*generate, broken("torn", '{"dim": 64, "n_layers": ')], "params.json: not valid JSON"))
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes(open(STORIES_BIN, "rb").read()[:5000])
    cases.append((["-m", "llama_mp.convert", "llama2c", "--input", str(truncated), "--output_dir", str(tmp_path / "x")],
                  "cut.bin: truncated"))
    params = json.load(open(os.path.join(converted, "params.json")))
    for i, (bad, message) in enumerate([({"dim": "64"}, "dim must be int, got '64'"),
                                        ({"n_heads": 0}, "n_heads must be positive"),
                                        ({"vocab_size": None}, "vocab_size must be int, got None")]):
        cases.append(([*generate, broken(f"bad{i}", {**params, **bad})], "params.json: " + message))
    cases.append(([*generate, broken("no_dim", {k: v for k, v in params.items() if k != "dim"})],
                  "params.json: missing key 'dim'"))
    cases.append((["-m", "llama_mp.generate", "--ckpt_dir", converted, "--tokenizer_path", str(tmp_path / "nope.model"),
                   "--prompt", "Hi"], "nope.model: tokenizer model not found"))
    cases.append((["-m", "llama_mp.generate", "--ckpt_dir", converted, "--tokenizer_path",
                   os.path.join(os.path.dirname(TOK512), "tokenizer.model"), "--prompt", "Hi"],
                  "tokenizer has 32000 pieces but the model's vocabulary is 512"))
    for (argv, fragment), result in zip(cases, run_clis(*(argv for argv, _ in cases))):
        assert_one_line_error(result, fragment)


def test_convert_under_torchrun_writes_once(tmp_path):
    out = str(tmp_path / "mp2")
    result = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llama_mp.convert",
                     "llama2c", "--input", STORIES_BIN, "--output_dir", out, "--model_parallel_size", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]


def test_launcher_reports_a_worker_of_bad_input_in_its_own_lines(converted, tmp_path):
    """scripts/launch.sh with two processes (torchrun): the workers' `error:` lines are the whole report (torchrun's
    own answer to a failed worker is a traceback and log lines)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "LLAMA_MP_DEBUG"}
    env.update(NPROC_PER_NODE="2", OMP_NUM_THREADS="1", PYTHON_BIN=sys.executable)  # one node, torchrun
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts/launch.sh"), "llama_mp.generate", "--ckpt_dir",
                             converted, "--tokenizer_path", TOK512, "--prompts_file", str(prompts), "--output_file",
                             str(tmp_path / "out.jsonl")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("error") and str(prompts) in line for line in lines), result.stderr


@pytest.mark.parametrize("script, code, lines", [
    ("exit 2", 2, []),  # bad input: the workers said it
    ("[ $RANK = 1 ] && exit 2; sleep 30", 2, []),  # (rank 0 then ended by torchrun's SIGTERM: a consequence)
    ("[ $RANK = 1 ] && exit 2; sleep 0.5; exit 1", 2, []),  # (rank 0 failing after its peer left: a consequence)
    ("exit $(( RANK == 1 ? 3 : 0 ))", 3, ["error: bash: rank 1 on HOST ended with exit code 3"]),
    ("[ $RANK = 1 ] && kill -9 $BASHPID; sleep 30", 137, ["error: bash: rank 1 on HOST ended with signal 9 (SIGKILL)"]),
])
def test_launcher_reports_any_other_worker_failure_in_one_line_a_rank(script, code, lines):
    result = run_cli("-m", "llama_mp.torchrun", "--standalone", "--nproc_per_node", "2", "--no_python", "bash", "-c",
                     script, timeout=60)
    assert result.returncode == code, result.stderr
    assert result.stderr.splitlines() == [line.replace("HOST", socket.gethostname()) for line in lines], result.stderr
