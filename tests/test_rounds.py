"""The tabular round driver end to end on a tiny budget, and its resumption."""

import json
import os

from conftest import ROOT, TOK512, run_cli


def test_round_driver_end_to_end_and_rerun(stories_dir, tmp_path):
    syn = tmp_path / "syn.yaml"
    syn.write_text("num_repeat: 2\ntemperature: 1.0\ntop_p: 1.0\nmax_gen_len: 48\nseed: 1\nguided: true\n"
                   "max_value_tokens: 6\n")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"ckpt_dir: {stories_dir}\ntokenizer_path: {TOK512}\nprompts_per_dataset: 4\nheldout_prompts: 2\n"
                      f"sft_epochs: 1\nnum_clusters: 4\neval_rows: 100\nsyn_config: {syn}\n"
                      f"datasets: [{ROOT}/configs/tabular/buddy.yaml]\nheldout: {ROOT}/configs/tabular/abalone.yaml\n")
    work = tmp_path / "work"
    result = run_cli("-m", "step0_coldstart.rounds", "--config", str(config), "--workdir", str(work), timeout=600)
    assert result.returncode == 0, result.stderr + open(work / "rounds.log").read()[-2000:]
    report = json.load(open(work / "report.json"))["abalone"]
    assert set(report) == {"real", "naive", "sft", "dpo1"}
    assert report["naive"]["ratio"] < report["real"]["ratio"]
    for generator in ("sft", "dpo1"):
        assert 0.0 <= report[generator]["valid_share"] <= 1.0
    raw = [json.loads(line) for line in open(work / "r1" / "abalone.raw.jsonl")]
    assert len(raw) == 2 * 2 and all(r["status"] for r in raw)  # 2 prompts x num_repeat 2, each parsed
    parsed = [r for r in raw if r["status"] == "SUCCESS"]
    assert parsed and all(len(r["reward_ds1"]) == 4 for r in parsed)  # guided rows parse; one ds1 prompt per anchor
    scored = [json.loads(line) for line in open(work / "r1" / "abalone.score.jsonl")]
    assert all((r["gain_score"] is None) == (r["status"] != "SUCCESS") for r in scored)
    with open(work / "r1" / "abalone.syn.csv") as f:
        assert sum(1 for _ in f) == 1 + len(parsed)
    fed = [json.loads(line) for line in open(work / "r1" / "fed" / "abalone_client_0.train.jsonl")]
    assert len(fed) == len(parsed) and all(set(r) == {"input", "output"} for r in fed)
    stamp = os.path.getmtime(work / "sft" / "latest")
    again = run_cli("-m", "step0_coldstart.rounds", "--config", str(config), "--workdir", str(work), timeout=600)
    assert again.returncode == 0 and os.path.getmtime(work / "sft" / "latest") == stamp  # finished stages skipped
