"""step3_rl.evaluate_policy: held-out figures of trained policies, checked against float64 recomputations."""

import json
import math
import os
import statistics

import torch

from conftest import ROOT, TOK512, run_cli
from llama_mp import distributed, lora
from llama_mp.checkpoint import load_model, load_state, save_checkpoint, split_state
from llama_mp.tokenizer import Tokenizer
from step2_reward_model.reward_model import PromptBuilder, load_reward_model

JUDGE_TEMPLATE = ("Q: {UserInstruction}\nA: {OutputA}\nB: {OutputB}\n{Definition}\n"
                  "I think the more {Dimension} output is Output (")
RM_TEMPLATE = "Response: {Output}\nInstruction: {Input}\nPrinciples:\n{Dimensions}\nScore:"
PRINCIPLES = [{"dimension": "Concise", "definition": "Be brief.", "weight": 1},
              {"dimension": "Honest", "definition": "Be truthful.", "weight": 2},
              {"dimension": "Kind", "definition": "Be kind.", "weight": 1}]


def setup(tmp_path, stories_dir):
    """The initial policy (stories260K), a perturbed copy of it as the 'trained' one, a reward model (stories260K
    with a random head), prompts and principle files."""
    args, state = load_state(stories_dir, 1, 0)
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.02 * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v for k, v in state.items()}
    save_checkpoint(str(tmp_path / "trained"), args, split_state(perturbed, args, 1))
    save_checkpoint(str(tmp_path / "rm"), args, split_state(state, args, 1))
    torch.save({"head.weight": torch.randn(1, args.dim, generator=gen), "head.bias": torch.zeros(1)},
               tmp_path / "rm" / "head.pth")
    prompts = ["Tell me a story about a cat.", "What is a dog?", "Say hello.", "Why is the sky blue?",
               "Write a poem.", "Name a color."]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"instruction": p}) + "\n" for p in prompts))
    (tmp_path / "principles.json").write_text(json.dumps(PRINCIPLES))
    (tmp_path / "judge.txt").write_text(JUDGE_TEMPLATE)
    (tmp_path / "rm.txt").write_text(RM_TEMPLATE)
    return prompts


def evaluate(tmp_path, stories_dir, *extra):
    out = tmp_path / "eval.json"
    result = run_cli("-m", "step3_rl.evaluate_policy", "--initial_ckpt", stories_dir, "--tokenizer_path", TOK512,
                     "--policy", f"same={stories_dir}", "--policy", f"trained={tmp_path / 'trained'}",
                     "--reward_ckpt", str(tmp_path / "rm"), "--prompts_file", str(tmp_path / "prompts.jsonl"),
                     "--chat_format", "dromedary", "--max_gen_len", "16", "--max_prompt_len", "320",
                     "--principle_file", str(tmp_path / "principles.json"), "--num_principles", "2",
                     "--rm_prompt_template", str(tmp_path / "rm.txt"), "--rm_query_len", "64", "--rm_response_len", "64",
                     "--judge_principle_file", str(tmp_path / "principles.json"),
                     "--judge_prompt_template", str(tmp_path / "judge.txt"), "--judge_max_seq_len", "512",
                     "--output_file", str(out), *extra, timeout=300)
    return result, out


def float64_figures(tmp_path, stories_dir, rows, name, policy_dir):
    """Per row (KL of policy `name` to the initial one on its own response, {"initial", name: reward}) by full
    teacher-forced float64 forwards, one sequence at a time."""
    tokenizer = Tokenizer(TOK512)
    meta = open("data/salmon/dromedary_inference_prompt.txt").read()
    builder = PromptBuilder(tokenizer, RM_TEMPLATE, 64, 64)
    out = []
    distributed.init(1)
    try:
        initial = load_model(stories_dir, dtype=torch.float64)
        policy = load_model(str(policy_dir), dtype=torch.float64)
        rm = load_reward_model(str(tmp_path / "rm"), dtype=torch.float64)
        for r in rows:
            query = tokenizer.encode(f"{meta}\n{r['instruction']}\n\n### Dromedary", bos=True, eos=False)
            response = r[name]["token_ids"]
            seq = torch.tensor([query + response])
            with torch.no_grad():
                logp = [torch.log_softmax(m(seq)[0].double() / 0.7, -1) for m in (policy, initial)]
            positions = torch.arange(len(query) - 1, len(query) + len(response) - 1)
            targets = torch.tensor(response)
            kl = float((logp[0][positions, targets] - logp[1][positions, targets]).sum())
            rewards = {}
            for who in ("initial", name):
                ids = builder.encode(r["instruction"], r[who]["response"], r["principles"])
                with torch.no_grad():
                    rewards[who] = float(rm(torch.tensor([ids]), torch.tensor([len(ids) - 1]))[0])
            out.append((kl, rewards))
    finally:
        distributed.teardown()
    return out


def test_policy_evaluation_against_float64_recomputation(tmp_path, stories_dir):
    setup(tmp_path, stories_dir)
    result, out = evaluate(tmp_path, stories_dir, "--precision", "fp32")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = [json.loads(line) for line in open(str(out).replace(".json", ".samples.jsonl"))]
    assert report["prompts"] == len(rows) == 6
    same, trained = report["policies"]["same"], report["policies"]["trained"]
    # the initial policy evaluated as a trained one: the same samples (same seeds), so no KL, no reward change, and
    # both judge orders read the same prompt, so r12 = -r21: every judgment a tie (win rate 1/2, no order agreement)
    assert all(r["same"]["token_ids"] == r["initial"]["token_ids"] for r in rows)
    assert same["kl"] == 0.0 and same["reward_gain"] == 0.0
    assert same["win_rate"] == 0.5 and same["both_orders_agree"] == 0.0 and same["judgments"] == 6 * 3
    assert any(r["trained"]["token_ids"] != r["initial"]["token_ids"] for r in rows)  # the perturbation shows
    assert 0.0 <= trained["win_rate"] <= 1.0 and trained["judgments"] + trained["judgments_skipped"] == 18

    for r, (kl, rewards) in zip(rows, float64_figures(tmp_path, stories_dir, rows, "trained", tmp_path / "trained")):
        # float32 log-softmax of logits of magnitude ~10: ~1e-5 per token, 16 tokens
        assert math.isclose(r["trained"]["kl"], kl, abs_tol=1e-3), (r["trained"]["kl"], kl)
        for name in ("initial", "trained"):
            # float32 backbone vs float64, a head of norm ~sqrt(dim) on hidden states of magnitude ~1
            assert math.isclose(r[name]["reward"], rewards[name], abs_tol=1e-3), (name, r[name]["reward"], rewards)
    assert len({tuple(r["principles"]) for r in rows}) > 1  # drawn per prompt
    expected_kl = sum(r["trained"]["kl"] for r in rows) / 6
    assert math.isclose(trained["kl"], expected_kl, abs_tol=1e-4)
    # the gain's standard error from the per-prompt differences (rounded to 4 places in the report)
    gains = [r["trained"]["reward"] - r["initial"]["reward"] for r in rows]
    assert math.isclose(trained["reward_gain_se"], statistics.stdev(gains) / math.sqrt(6), abs_tol=1e-4)
    assert trained["reward_gain_se"] > 0 and same["reward_gain_se"] == 0.0

    # a finished evaluation is not replaced without --overwrite
    again, _ = evaluate(tmp_path, stories_dir, "--precision", "fp32")
    assert again.returncode == 2 and "already exists" in again.stderr and json.loads(out.read_text()) == report


def test_bf16_evaluation_computes_lora_policies_as_their_training_did(tmp_path, stories_dir):
    """--precision bf16: a LoRA policy's adapters stay unmerged (float32) on a bfloat16 base under autocast, the
    arithmetic of a bf16 LoRA run; its rewards agree with float64 recomputations of the merged model to bfloat16's
    precision, and its KL to float32's (the default --kl_precision fp32: the policies reloaded in float32 score the
    bf16 samples; a KL left in bf16 would miss by up to ~0.06 nats a token); the unchanged policy still gives the
    initial policy's samples exactly. (The fp32 test covers log-probs taken by the sampling model itself.)"""
    setup(tmp_path, stories_dir)
    distributed.init(1)
    try:  # an adapter checkpoint with a visible update: B ~ N(0, 0.05^2), scale alpha / r = 2
        model = load_model(stories_dir)
        lora.apply_lora(model, rank=4, alpha=8, base_dir=stories_dir)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if key.endswith(".lora.B"):
                    param.copy_(0.05 * torch.randn(param.shape, generator=gen))
        lora.save_adapters(str(tmp_path / "lora"), 0, model)
        lora.merge_lora(str(tmp_path / "lora"), str(tmp_path / "lora_merged"))
    finally:
        distributed.teardown()
    result, out = evaluate(tmp_path, stories_dir, "--precision", "bf16", "--policy", f"lora={tmp_path / 'lora'}")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = [json.loads(line) for line in open(str(out).replace(".json", ".samples.jsonl"))]
    assert all(r["same"]["token_ids"] == r["initial"]["token_ids"] for r in rows)
    assert report["policies"]["same"]["kl"] == 0.0 and report["policies"]["same"]["reward_gain"] == 0.0
    assert any(r["lora"]["token_ids"] != r["initial"]["token_ids"] for r in rows)  # the adapters act
    for r, (kl, rewards) in zip(rows, float64_figures(tmp_path, stories_dir, rows, "lora", tmp_path / "lora_merged")):
        # float32 log-probs of the merged float32 model: as in the fp32 test (~1e-5 per token, 1e-3 for 16 tokens);
        # an adapter left out would give KL 0 against the reference's 9-31 nats
        assert math.isclose(r["lora"]["kl"], kl, abs_tol=1e-3), (r["lora"]["kl"], kl)
        for name in ("initial", "lora"):
            # a head of norm ~8 (dim 64) on final-norm states of norm ~8 with a relative error of ~1%: ~0.6
            # (measured: at most 0.22)
            assert math.isclose(r[name]["reward"], rewards[name], abs_tol=0.6), (name, r[name]["reward"], rewards)


def test_held_out_prompts_leave_out_the_prompts_a_model_trained_on(tmp_path):
    from step2_reward_model.human_pairs import MESSAGES, first_turn_prompts, pmp_pairs
    from step3_rl.evaluate_policy import EvaluateOptions, heldout_prompts

    every = [pid for pid, _ in first_turn_prompts(MESSAGES)]
    assert [p["id"] for p in heldout_prompts(EvaluateOptions())[0]] == every
    # step 1's and PPO's prompts: two validation first turns repeat one of them word for word
    train_file = os.path.join(ROOT, "data/oasst1/oasst1_prompts.json")
    train = {p["instruction"].strip() for p in json.load(open(train_file))}
    repeated = [pid for pid, text in first_turn_prompts(MESSAGES) if text.strip() in train]
    assert len(repeated) == 2
    kept = heldout_prompts(EvaluateOptions(exclude_prompts=[train_file]))[0]
    assert [p["id"] for p in kept] == [pid for pid in every if pid not in repeated]
    trained = pmp_pairs(MESSAGES, 2, 3)  # after the first 2 prompts, the next 3 with a ranked pair (message ids)
    by_id, by_text = tmp_path / "by_id.json", tmp_path / "by_text.json"
    by_id.write_text(json.dumps(trained))
    by_text.write_text(json.dumps([{"instruction": r["instruction"]} for r in trained]))  # another id scheme
    for path in (by_id, by_text):
        prompts, source = heldout_prompts(EvaluateOptions(exclude_prompts=[str(path)]))
        assert [p["id"] for p in prompts] == [pid for pid in every if pid not in {r["id"] for r in trained}]
        assert len(prompts) == len(every) - 3 and str(path) in source
    prompts, _ = heldout_prompts(EvaluateOptions(exclude_prompts=[train_file, str(by_id)]))
    assert len(prompts) == len(every) - 5
