"""The main job at a tiny size: killed (SIGKILL, whole process group) at several points and rerun, it ends with the same
outputs as an uninterrupted run; and its report holds every stage."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT

CONFIG = os.path.join(ROOT, "tests/data/quickstart_tiny.yaml")


def quickstart(run_dir, kill_after=None):
    """Run the quickstart; with kill_after (seconds) SIGKILL its whole process group then. True if it was killed."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    with open(os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".out"), "a") as out:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts/quickstart.py"), "--config", CONFIG,
                                    "--run_dir", run_dir], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=kill_after if kill_after else 900)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
    assert process.returncode == 0, open(out.name).read()[-3000:]
    return False


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def final_checkpoint(directory):
    with open(os.path.join(directory, "latest")) as f:
        return os.path.join(directory, f.read().strip())


def test_killed_quickstart_ends_like_an_uninterrupted_one(tmp_path):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    start = time.perf_counter()
    quickstart(whole)
    full_seconds = time.perf_counter() - start
    kills = 0
    for fraction in (0.2, 0.35, 0.35):  # each rerun continues; the kills land in different stages
        kills += quickstart(cut, kill_after=max(3.0, fraction * full_seconds))
    quickstart(cut)
    assert kills >= 3  # it really was interrupted, mid-stage
    report = {name: json.load(open(os.path.join(d, "report.json"))) for name, d in (("whole", whole), ("cut", cut))}
    assert [s["status"] for s in report["whole"]["stages"].values()] == ["done"] * 7
    assert set(report["whole"]["stages"]) == set(report["cut"]["stages"])
    for name, stage in report["whole"]["stages"].items():
        figures = {k: v for k, v in stage["figures"].items() if k != "outputs"}
        other = {k: v for k, v in report["cut"]["stages"][name]["figures"].items() if k != "outputs"}
        assert json.dumps(figures, sort_keys=True) == json.dumps(other, sort_keys=True), name
    # final files identical byte for byte, final weights bit for bit
    for rel in ("step1/oasst1_response0.jsonl", "step1/oasst1_response1.jsonl", "step1/oasst1_preference.jsonl",
                "step1/synthetic_preference.json", "step1/synthetic_preference_pairs.jsonl", "rm/eval.json",
                "tabular/r1/abalone.raw.jsonl", "tabular/r1/abalone.score.jsonl", "tabular/report.json"):
        assert open(os.path.join(whole, rel), "rb").read() == open(os.path.join(cut, rel), "rb").read(), rel
    for sub in ("rm", "dpo", "ppo", "tabular/sft", "tabular/dpo1"):
        a, b = final_checkpoint(os.path.join(whole, sub)), final_checkpoint(os.path.join(cut, sub))
        assert same_weights(os.path.join(a, "consolidated.00.pth"), os.path.join(b, "consolidated.00.pth")), sub
    for sub in ("rm", "dpo", "ppo"):  # curves read as if never stopped
        steps = [[json.loads(line)["step"] for line in open(os.path.join(d, sub, "metrics.jsonl"))] for d in (whole, cut)]
        assert steps[0] == steps[1], sub
    markdown = open(os.path.join(whole, "report.md")).read()
    assert "| reward_model | done |" in markdown and "ML efficiency" in markdown
    # the tabular round's files: guided rows parse, parsed rows carry one ds1 prompt per anchor and a gain
    tabular = os.path.join(whole, "tabular")
    raw = [json.loads(line) for line in open(os.path.join(tabular, "r1", "abalone.raw.jsonl"))]
    assert len(raw) == 2 * 2  # 2 held-out prompts x num_repeat 2
    parsed = [r for r in raw if r["status"] == "SUCCESS"]
    assert parsed and all(len(r["reward_ds1"]) == 4 for r in parsed)
    scored = [json.loads(line) for line in open(os.path.join(tabular, "r1", "abalone.score.jsonl"))]
    assert all((r["gain_score"] is None) == (r["status"] != "SUCCESS") for r in scored)
    with open(os.path.join(tabular, "r1", "abalone.syn.csv")) as f:
        assert sum(1 for _ in f) == 1 + len(parsed)
    fed = [json.loads(line) for line in open(os.path.join(tabular, "r1", "fed", "abalone_client_0.train.jsonl"))]
    assert len(fed) == sum(r["result"]["Rings"] is not None for r in parsed)
    assert set(report["whole"]["stages"]["tabular"]["figures"]["ml_efficiency"]["abalone"]) == {"real", "naive", "sft",
                                                                                                 "dpo1"}
