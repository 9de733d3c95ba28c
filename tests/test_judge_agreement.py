"""Judge quality before training: OASST1 human pairs, synthetic_preference's judging code with scripted judges."""

import json
import os

import pytest
import torch

from conftest import ROOT, TOK512, run_cli
from llama_mp.chat import chat_format, load_principles
from llama_mp.tokenizer import Tokenizer
from llama_mp.jsonl import read_text
from step1_synthetic_preference.judge_agreement import agreement_report, judge_pairs
from llama_mp.judge import DEFAULT_JUDGE_PRINCIPLES, DEFAULT_JUDGE_PROMPT, answer_token_ids, judge_chunk
from step2_reward_model.human_pairs import first_turn_prompts, oasst_human_pairs, pmp_pairs

OASST = os.path.join(ROOT, "data/oasst1/oasst1_en_validation_messages.jsonl")


def message(mid, text, role="assistant", parent="p1", rank=None, deleted=False):
    return json.dumps({"message_id": mid, "parent_id": parent, "text": text, "role": role, "rank": rank,
                       "deleted": deleted}) + "\n"


@pytest.fixture
def messages_file(tmp_path):
    # 4 prompts with a pair each (worst): the best answer is the longer one in p1, p2 and p4, the shorter in p3;
    # p5 has one ranked answer (no pair), and a deleted answer never counts
    lines = [message("p1", "Name a colour.", "prompter", None), message("a1", "Blue, like the sky.", rank=0),
             message("a2", "Red.", rank=1), message("a3", "x", rank=2, deleted=True),
             message("p2", "Say hi.", "prompter", None), message("b1", "Hello there!", parent="p2", rank=0),
             message("b2", "Hi.", parent="p2", rank=2), message("b3", "Hi you", parent="p2", rank=1),
             message("p3", "Add 2 and 2.", "prompter", None), message("c1", "4", parent="p3", rank=0),
             message("c2", "It is five, I think.", parent="p3", rank=1),
             message("p4", "A fruit?", "prompter", None), message("d1", "An apple a day.", parent="p4", rank=0),
             message("d2", "Pear", parent="p4", rank=1),
             message("p5", "Alone?", "prompter", None), message("e1", "Yes, alone.", parent="p5", rank=0)]
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(lines))
    return str(path)


def test_human_pairs_best_against_worst_or_all(messages_file):
    worst = oasst_human_pairs(messages_file, [], "worst")
    assert [(p["id"], p["chosen"], p["rejected"]) for p in worst] == [
        ("p1", "Blue, like the sky.", "Red."), ("p2", "Hello there!", "Hi."), ("p3", "4", "It is five, I think."),
        ("p4", "An apple a day.", "Pear")]
    assert [p["rejected"] for p in oasst_human_pairs(messages_file, [], "all")] == [
        "Red.", "Hi you", "Hi.", "It is five, I think.", "Pear"]


def test_pmp_pairs_skip_the_evaluations_prompts_and_hide_the_label_in_a_seeded_position(messages_file, tmp_path):
    records = pmp_pairs(messages_file, skip_prompts=1, max_pairs=0)  # p1 left to the evaluations; p5 has no pair
    better = {"p2": "Hello there!", "p3": "4", "p4": "An apple a day."}
    worse = {"p2": "Hi.", "p3": "It is five, I think.", "p4": "Pear"}
    assert [r["id"] for r in records] == ["p2", "p3", "p4"]
    for r in records:  # what the reward-model trainer reads: the human's better answer is the preferred output
        chosen, rejected = (r["output_1"], r["output_2"]) if r["preference"] == 1 else (r["output_2"], r["output_1"])
        assert (chosen, rejected) == (better[r["id"]], worse[r["id"]]) and r["input"] == ""
    assert [r["id"] for r in pmp_pairs(messages_file, skip_prompts=2, max_pairs=1)] == ["p3"]
    assert pmp_pairs(messages_file, 1, 0, seed=0) == records  # seeded
    positions = {seed: [r["preference"] for r in pmp_pairs(OASST, 80, 64, seed)] for seed in (0, 1)}
    assert positions[0] != positions[1] and 16 < sum(p == 1 for p in positions[0]) < 48  # ~half each way
    first = {pid for pid, _ in first_turn_prompts(OASST)[:80]}
    assert len(pmp_pairs(OASST, 80, 64)) == 64 and not first & {r["id"] for r in pmp_pairs(OASST, 80, 0)}
    out = tmp_path / "pmp.json"
    done = run_cli("-m", "step2_reward_model.human_pairs", "--messages_file", messages_file, "--output_file", str(out),
                   "--skip_prompts", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == records
    failed = run_cli("-m", "step2_reward_model.human_pairs", "--messages_file", messages_file, "--output_file",
                     str(tmp_path / "none.json"), "--skip_prompts", "4")
    assert failed.returncode != 0 and "no ranked pair after its first 4 prompts" in failed.stderr


def test_human_pairs_are_the_reward_models_355_on_the_shipped_file():
    principles = ["be good"]  # the reward model's evaluation reads the same pairs (one loader)
    ours = oasst_human_pairs(OASST, principles, "all")
    assert len(ours) == 355 and len(oasst_human_pairs(OASST, principles, "worst")) == 186
    assert all(p["principles"] == principles and p["rejected_rank"] > 0 for p in ours)


class ScriptedJudge:
    """A sampler whose next-token logits of "a" and "b" come from prefer(output_a, output_b, dimension), read back
    from the judge prompt text: a model with known preferences."""

    def __init__(self, tokenizer, prefer):
        self.tokenizer, self.prefer, self.max_seq_len = tokenizer, prefer, 1 << 20
        self.id_a, self.id_b = answer_token_ids(tokenizer)

    def logits_of(self, tokens) -> torch.Tensor:
        text = self.tokenizer.decode(list(tokens))
        a = text.split("#### Output (a)\n", 1)[1].split("\n\n#### Output (b)\n", 1)[0]
        b = text.split("#### Output (b)\n", 1)[1].split("\n\n#### Annotation Guide", 1)[0]
        dimension = text.rsplit("I think the more ", 1)[1].rsplit(" output is Output (", 1)[0]
        out = torch.zeros(self.tokenizer.n_words)
        out[self.id_a], out[self.id_b] = self.prefer(a, b, dimension)
        return out

    def next_token_logits_shared(self, prefix, branches):
        return [torch.stack([self.logits_of(list(prefix) + list(middle) + list(s)) for s in suffixes])
                for middle, suffixes in branches]

    def next_token_logits(self, seqs, desc=""):
        return torch.stack([self.logits_of(s) for s in seqs])


def judge(prefer, pairs, prefix_reuse=True):
    tokenizer = Tokenizer(TOK512)
    sampler = ScriptedJudge(tokenizer, prefer)
    principles = load_principles(DEFAULT_JUDGE_PRINCIPLES)
    records = judge_chunk(sampler, chat_format(tokenizer, "dromedary"), pairs, principles,
                          read_text(DEFAULT_JUDGE_PROMPT), sampler.id_a, sampler.id_b, 256, 640, prefix_reuse)
    return agreement_report(pairs, records, principles, "worst")


def test_a_judge_preferring_the_longer_answer_agrees_as_the_length_baseline(messages_file):
    pairs = judge_pairs(oasst_human_pairs(messages_file, [], "worst"))
    report = judge(lambda a, b, dim: (float(len(a)), float(len(b))), pairs)
    overall = report["overall"]
    assert overall["length_baseline"] == 0.75 and overall["agreement"] == 0.75  # 3 of 4: longer is the human's
    assert overall["both_orders_agree"] == 1.0 and overall["judged"] == 4 * 11 and overall["skipped"] == 0
    assert all(f["agreement"] == f["length_baseline"] == 0.75 for f in report["principles"].values())
    # the same with every prompt recomputed in full
    assert judge(lambda a, b, dim: (float(len(a)), float(len(b))), pairs, prefix_reuse=False) == report


def test_a_position_biased_judge_never_agrees_with_itself_across_orders(messages_file):
    pairs = judge_pairs(oasst_human_pairs(messages_file, [], "worst"))
    report = judge(lambda a, b, dim: (1.0, 0.0), pairs)  # always "a"
    assert report["overall"]["both_orders_agree"] == 0.0 and report["overall"]["agreement"] == 0.5  # all ties
    assert report["overall"]["agreement_when_consistent"] is None


def test_figures_per_principle(messages_file):
    pairs = judge_pairs(oasst_human_pairs(messages_file, [], "worst"))
    # shorter wins under Concise, longer under every other principle
    report = judge(lambda a, b, dim: (-len(a), -len(b)) if dim == "Concise" else (len(a), len(b)), pairs)
    assert report["principles"]["Concise"]["agreement"] == 0.25
    assert report["principles"]["Honest and Accurate"]["agreement"] == 0.75
    assert report["overall"]["agreement"] == pytest.approx((0.25 + 10 * 0.75) / 11, abs=1e-4)


def test_the_command_end_to_end_on_the_embedded_model(stories_dir, messages_file, tmp_path):
    out = tmp_path / "agreement.json"
    args = ("-m", "step1_synthetic_preference.judge_agreement", "--ckpt_dir", stories_dir, "--tokenizer_path", TOK512,
            "--pairs_file", messages_file, "--output_file", str(out), "--max_seq_len", "1536", "--max_pairs", "2")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["pairs"] == 2 and report["overall"]["judged"] + report["overall"]["skipped"] == 2 * 11
    assert report["overall"]["length_baseline"] == 1.0 and len(report["principles"]) == 11
    again = run_cli(*args)  # the complete judgments are reused, the report is the same
    assert again.returncode == 0 and "reusing" in again.stdout and json.loads(out.read_text()) == report
    bad = run_cli(*args[:-2], "--pairs_file", str(tmp_path / "none.jsonl"))
    assert bad.returncode == 2 and "none.jsonl" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_flip_rate_by_hand():
    from step2_reward_model.instructability import flip_rate
    principle = [(1.0, 0.0), (0.2, 0.5), (3.0, -1.0), (0.0, 2.0)]
    negation = [(0.0, 1.0), (0.9, 0.1), (-2.0, 4.0), (0.0, 5.0)]  # the first three flip, the last keeps b
    assert flip_rate(principle, negation) == {"pairs": 4, "flips": 3, "ties": 0, "flip_rate": 0.75,
                                              "flip_rate_untied": 0.75}
    # a tie under either prompt is no flip but stays in the denominator: 2 flips of 4 pairs, 2 of the 3 untied
    tied = flip_rate(principle, [(0.0, 1.0), (0.3, 0.3), (-2.0, 4.0), (0.0, 5.0)])
    assert tied == {"pairs": 4, "flips": 2, "ties": 1, "flip_rate": 0.5, "flip_rate_untied": pytest.approx(2 / 3)}
    assert flip_rate([(1.0, 1.0)], [(2.0, 2.0)])["flip_rate_untied"] is None
    with pytest.raises(ValueError, match="score the same pairs"):
        flip_rate(principle, negation[:3])
    with pytest.raises(ValueError, match="pair 1: expected two finite rewards"):
        flip_rate(principle, [(0.0, 1.0), (float("nan"), 0.0), (1.0, 2.0), (1.0, 2.0)])
