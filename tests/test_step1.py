"""SALMON step 1: prompts, resumable sampling, self-judging, aggregation, bad input."""

import argparse
import json
import os

import pytest
import torch

from conftest import ROOT, TOK512, run_cli, run_clis
from llama_mp.tokenizer import Tokenizer
from step1_synthetic_preference.aggregate_synthetic_preference import aggregate, script_of
from llama_mp.judge import DEFAULT_JUDGE_PROMPT, answer_token_ids, judge_prompt, judgments, order_label, split_shared
from llama_mp.jsonl import read_text

LLAMA2 = os.path.join(ROOT, "data/llama2c/tokenizer.model")
MESSAGES = os.path.join(ROOT, "data/oasst1/oasst1_en_validation_messages.jsonl")


def test_judge_prompt_is_the_template_filled_in():
    template = read_text(DEFAULT_JUDGE_PROMPT)
    text = judge_prompt(template, "Say hi {Dimension}", "Hi!", "Hello {OutputB}", "Concise", "Be brief.")
    start = template.index("#### Instruction")
    assert text.startswith(template[:start])
    assert ("#### Instruction\nSay hi {Dimension}\n\n#### Output (a)\nHi!\n\n#### Output (b)\nHello {OutputB}\n\n"
            "#### Annotation Guide") in text  # texts with braces are inserted verbatim
    assert "one aspect to consider this time is as follows:\n\nConcise: Be brief.\n\n" in text
    assert text.endswith("the definition of Concise, I think the more Concise output is Output (")


@pytest.mark.parametrize("path", [TOK512, LLAMA2])
def test_answer_token_ids_for_any_sentencepiece_model(path):
    tok = Tokenizer(path)
    id_a, id_b = answer_token_ids(tok)
    assert tok.decode([id_a]) == "a" and tok.decode([id_b]) == "b"
    prompt = judge_prompt(read_text(DEFAULT_JUDGE_PROMPT), "Q", "A", "B", "Ethical", "Be good.")
    assert tok.encode(prompt + "b", bos=True, eos=False)[-1] == id_b  # the token that would follow "Output ("
    assert tok.encode(prompt + "a", bos=True, eos=False)[:-1] == tok.encode(prompt, bos=True, eos=False)


def test_order_consistency_labels():
    assert order_label(0.5, 0.1) == 1  # both orders prefer output 1
    assert order_label(-0.5, -2.0) == 2
    assert order_label(0.5, -0.1) == 0 and order_label(-0.5, 0.3) == 0  # the order decided: a tie
    assert order_label(0.0, 1.0) == 0


def test_split_shared_reassembles_every_prompt():
    orders = [[[1, 5, 6, 7, 8, 9], [1, 5, 6, 7, 8, 4, 4]], [[1, 5, 3, 7, 8, 9], [1, 5, 3, 7, 2]]]
    prefix, branches = split_shared(orders)
    assert prefix == [1, 5]
    for (middle, suffixes), seqs in zip(branches, orders):
        assert [prefix + middle + s for s in suffixes] == seqs and all(suffixes)


def agg_opts(**overrides):
    base = dict(seed=0, num_passes=1, geometric_p=1.0, negation_p=0.0, ai_rule_p=0.0, language_rule=True,
                label_noise=0.0, rule_label_noise=0.0, swap_p=0.0)
    return argparse.Namespace(**{**base, **overrides})


PRINCIPLES = {"Concise": {"definition": "Be brief.", "negative_definition": "Ramble."},
              "Ethical": {"definition": "Be good.", "negative_definition": "Be bad."}}


def pair(pid, out1="The answer is four.", out2="Four, I believe it is."):
    return {"id": pid, "instruction": "What is two plus two?", "input": "", "output_1": out1, "output_2": out2}


def test_aggregation_matches_a_hand_worked_example():
    # One dimension, so k = 1 always. Its variance over all six scores {2, 4, -1, -3, 1, -1}: mean 1/3,
    # var = (25/9 + 121/9 + 16/9 + 100/9 + 4/9 + 16/9) / 6 = 282/54. Pair x: mean(2, 4) = 3 -> 3 / var.
    judgments = {"x": {"Concise": (2.0, 4.0)}, "y": {"Concise": (-1.0, -3.0)}, "z": {"Concise": (1.0, -1.0)}}
    pairs = [pair("x"), pair("y"), pair("z")]
    records, stats = aggregate(pairs, judgments, PRINCIPLES, ["Concise"], agg_opts())
    var = 282 / 54
    assert [r["id"] for r in records] == ["x", "y"]  # z: the orders disagree -> score 0 -> no label
    assert stats["skipped: no decisive dimension"] == 1
    assert records[0]["preference"] == 1 and records[0]["normalized_scores"] == pytest.approx([3 / var])
    assert records[1]["preference"] == 2 and records[1]["normalized_scores"] == pytest.approx([-2 / var])
    assert records[0]["principles"] == ["Be brief."] and records[0]["negative_definitions"] == "(0,)"
    # negating always: the negative definition is shown and the label flips
    negated, _ = aggregate(pairs, judgments, PRINCIPLES, ["Concise"], agg_opts(negation_p=1.0))
    assert [r["preference"] for r in negated] == [2, 1] and negated[0]["principles"] == ["Ramble."]
    # the "As an AI language model" rule (p = 1): the other output wins, whatever the judge said
    ai = [pair("x", out1="As an AI language model, I think it is four.")]
    ruled, _ = aggregate(ai, judgments, PRINCIPLES, ["Concise"], agg_opts(ai_rule_p=1.0))
    assert ruled[0]["preference"] == 2 and ruled[0]["rule_flag"]
    # a swap exchanges the outputs and the label together
    swapped, _ = aggregate(pairs[:1], judgments, PRINCIPLES, ["Concise"], agg_opts(swap_p=1.0))
    assert swapped[0]["output_1"] == pairs[0]["output_2"] and swapped[0]["preference"] == 2
    assert swapped[0]["dimension_scores"] == {"Concise": [-4.0, -2.0]}  # seen from the swapped outputs' side


def test_aggregation_is_deterministic_for_a_seed():
    gen = torch.Generator().manual_seed(0)
    judgments = {f"p{i}": {d: tuple(torch.randn(2, generator=gen).tolist()) for d in PRINCIPLES} for i in range(40)}
    pairs = [pair(f"p{i}") for i in range(40)]
    opts = agg_opts(num_passes=4, geometric_p=0.2, negation_p=0.5, label_noise=0.1, swap_p=0.5)
    first, _ = aggregate(pairs, judgments, PRINCIPLES, list(PRINCIPLES), opts)
    again, _ = aggregate(pairs, judgments, PRINCIPLES, list(PRINCIPLES), opts)
    other, _ = aggregate(pairs, judgments, PRINCIPLES, list(PRINCIPLES), agg_opts(**{**vars(opts), "seed": 1}))
    assert first == again and first != other
    assert {r["pass"] for r in first} == {0, 1, 2, 3}


def test_script_detection():
    assert script_of("What is the capital of France?") == "LATIN"
    assert script_of("Какая столица Франции?") == "CYRILLIC"
    assert script_of("法国的首都是哪里？") == "CJK"
    assert script_of("1234 !!") == "unknown"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("step1") / "prompts.json")
    result = run_cli("-m", "step1_synthetic_preference.clean_oasst1_prompts", "--output_file", out)
    assert result.returncode == 0, result.stderr
    prompts = json.load(open(out))
    assert len(prompts) == 188 and len({p["id"] for p in prompts}) == 188
    short = sorted(prompts, key=lambda p: len(p["instruction"]))[:8]  # short ones fit stories260K's context
    json.dump(short, open(out, "w"))
    return out


def responses_argv(ckpt, prompts_file, out, seed, *extra):
    return ["-m", "step1_synthetic_preference.generate_responses", "--ckpt_dir", ckpt, "--tokenizer_path", TOK512,
            "--prompt_file", prompts_file, "--output_file", out, "--seed", str(seed), "--max_gen_len", "48",
            "--max_batch_size", "2", *extra]


def responses(ckpt, prompts_file, out, seed, *extra, env=None):
    return run_cli(*responses_argv(ckpt, prompts_file, out, seed, *extra), env=env)


def test_interrupted_sampling_resumes_to_the_same_file(stories_dir, prompts_file, tmp_path):
    whole = str(tmp_path / "whole.jsonl")
    assert responses(stories_dir, prompts_file, whole, 42).returncode == 0
    broken = str(tmp_path / "broken.jsonl")
    crashed = responses(stories_dir, prompts_file, broken, 42, env={"LLAMA_MP_CRASH_AFTER_CHUNKS": "2"})
    assert crashed.returncode == 137 and not os.path.exists(broken)
    part = os.path.join(broken + ".parts", "part-00000.jsonl")
    assert sum('"_chunk_done"' in line for line in open(part)) == 2
    with open(part, "a") as f:  # a record torn by the kill in the middle of the next append
        f.write('{"id": "x", "instruction": "torn')
    resumed = responses(stories_dir, prompts_file, broken, 42)
    assert resumed.returncode == 0, resumed.stderr
    assert open(broken).read() == open(whole).read()
    records = [json.loads(line) for line in open(whole)]
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)  # one per prompt, by id
    assert not os.path.exists(broken + ".parts")
    again = responses(stories_dir, prompts_file, broken, 42)
    assert again.returncode == 2 and "already exists" in again.stderr  # never overwritten unless asked
    changed = responses(stories_dir, prompts_file, str(tmp_path / "c.jsonl"), 42, env={"LLAMA_MP_CRASH_AFTER_CHUNKS": "1"})
    other = responses(stories_dir, prompts_file, str(tmp_path / "c.jsonl"), 43)
    assert changed.returncode == 137 and other.returncode == 2 and "other settings (seed)" in other.stderr


def judge(ckpt, r0, r1, out, *extra):
    return ["-m", "step1_synthetic_preference.synthetic_preference", "--ckpt_dir", ckpt, "--tokenizer_path", TOK512,
            "--response_files", r0, r1, "--output_file", out, "--max_seq_len", "1024", "--max_response_tokens", "40",
            "--max_instruction_tokens", "40", "--min_response_chars", "4", *extra]


def test_step1_end_to_end_prefix_reuse_and_model_parallel(stories_dir, prompts_file, tmp_path):
    r0, r1 = str(tmp_path / "r0.jsonl"), str(tmp_path / "r1.jsonl")
    sampled = run_clis(*(responses_argv(stories_dir, prompts_file, out, seed) for out, seed in ((r0, 42), (r1, 43))))
    assert [r.returncode for r in sampled] == [0, 0], [r.stderr for r in sampled]
    shared, recompute, mp2 = (str(tmp_path / f"{n}.jsonl") for n in ("shared", "recompute", "mp2"))
    judged = run_clis(judge(stories_dir, r0, r1, shared), judge(stories_dir, r0, r1, recompute, "--no_prefix_reuse"))
    assert [r.returncode for r in judged] == [0, 0], [r.stderr for r in judged]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_cli(*torchrun, *judge(stories_dir, r0, r1, mp2))
    assert result.returncode == 0, result.stderr
    a, b, c = ([json.loads(line) for line in open(f)] for f in (shared, recompute, mp2))
    assert len(a) == 8 * 11 and {r["dimension"] for r in a} == {p["dimension"] for p in
                                                                 json.load(open(os.path.join(ROOT, "data/salmon/principle_collection_rm.json")))}
    for other in (b, c):
        assert [(r["id"], r["dimension"]) for r in other] == [(r["id"], r["dimension"]) for r in a]
        scores = torch.tensor([r["relative_score"] for r in a])
        torch.testing.assert_close(torch.tensor([r["relative_score"] for r in other]), scores, atol=1e-4, rtol=0)
    for r in a:
        assert r["prompt_preference"] == order_label(*r["relative_score"])
    out = str(tmp_path / "agg.json")
    result = run_cli("-m", "step1_synthetic_preference.aggregate_synthetic_preference", "--response_files", r0, r1,
                     "--preference_file", shared, "--output_file", out, "--min_response_chars", "4",
                     "--no_language_rule")
    assert result.returncode == 0, result.stderr
    records = json.load(open(out))
    pairs = [json.loads(line) for line in open(str(tmp_path / "agg_pairs.jsonl"))]
    assert len(pairs) == len(records)
    for record, p in zip(records, pairs):
        winner = record["output_1"] if record["preference"] == 1 else record["output_2"]
        assert p["chosen"] == [{"role": "assistant", "content": winner}] and p["prompt"][0]["role"] == "user"


def test_bad_inputs_fail_with_one_line_and_keep_outputs(stories_dir, tmp_path):
    good = tmp_path / "r0.jsonl"
    good.write_text('{"id": "a", "instruction": "Hi", "output": "Hello there, friend."}\n'
                    '{"id": "b", "instruction": "Yo", "output": "Hey, how are you?"}\n')
    lonely = tmp_path / "r1.jsonl"
    lonely.write_text('{"id": "a", "instruction": "Hi", "output": "Hi! Nice to meet you."}\n')
    out = tmp_path / "pref.jsonl"
    out.write_text("keep me\n")
    result = run_cli(*judge(stories_dir, str(good), str(lonely), str(out), "--overwrite"))
    assert result.returncode == 2 and "r0.jsonl:2: prompt id b has no response in" in result.stderr
    assert "Traceback" not in result.stderr and out.read_text() == "keep me\n"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "instruction": "Hi"}\n{"id": "b", "instr\n{"id": "c", "instruction": "x"}\n')
    result = run_cli(*judge(stories_dir, str(broken), str(good), str(tmp_path / "o.jsonl")))
    assert result.returncode == 2 and "broken.jsonl:2: not valid JSON" in result.stderr
    principles = tmp_path / "principles.json"
    principles.write_text('[{"dimension": "Concise", "definition": "Be brief."}]')
    result = run_cli("-m", "step1_synthetic_preference.aggregate_synthetic_preference", "--response_files",
                     str(good), str(good), "--preference_file", str(good), "--output_file", str(tmp_path / "a.json"),
                     "--principle_file", str(principles), "--dimensions", "Concise")
    assert result.returncode == 2 and "principle 1 has no 'negative_definition' string" in result.stderr
    prompts = tmp_path / "prompts.json"
    prompts.write_text('[{"instruction": "ok"}, {"input": "no instruction"}]')
    result = run_cli("-m", "step1_synthetic_preference.generate_responses", "--ckpt_dir", stories_dir,
                     "--tokenizer_path", TOK512, "--prompt_file", str(prompts), "--output_file", str(tmp_path / "g"))
    assert result.returncode == 2 and 'prompts.json:2: record has no "instruction" string' in result.stderr


def test_judgments_read_each_order_from_its_own_side():
    """Fake logits: in order (1, 2) "a" leads by 2 (output 1 wins); in order (2, 1) "b" leads by 3 (output 1 wins again);
    for the second principle both orders pick "a", i.e. the first-shown output: an order-inconsistent tie."""
    id_a, id_b, vocab = 5, 7, 10
    order_12, order_21 = torch.zeros(2, vocab), torch.zeros(2, vocab)
    order_12[0, id_a], order_21[0, id_b] = 2.0, 3.0
    order_12[1, id_a], order_21[1, id_a] = 1.0, 1.0
    principles = [{"dimension": "Concise"}, {"dimension": "Ethical"}]
    records = judgments({"id": "p", "example_idx": 0}, principles, [order_12, order_21], id_a, id_b)
    assert [r["relative_score"] for r in records] == [[2.0, 3.0], [1.0, -1.0]]
    assert [r["prompt_preference"] for r in records] == [1, 0]
    skipped = judgments({"id": "p", "example_idx": 0}, principles, None, id_a, id_b)
    assert all(r["skipped"] and r["relative_score"] is None for r in skipped)
