"""The reward model and the shared training loop: loss, fitting, read position, model parallel, resume, bad input."""

import json
import math
import os

import pytest
import torch

from conftest import ROOT, TOK512, run_cli, run_distributed
from llama_mp import distributed
from llama_mp.checkpoint import load_model
from llama_mp.tokenizer import Tokenizer
from llama_mp.train import TrainConfig, Trainer
from step2_reward_model.human_pairs import pmp_pairs
from step2_reward_model.reward_model import PromptBuilder, RewardModel, load_reward_model, pad_batch, pairwise_loss

TEMPLATE = "Response: {Output}\nQuestion: {Input}\nRules:\n{Dimensions}\nThe quality of the output is"


def test_pairwise_loss_equals_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, -1.0])
    loss, metrics = pairwise_loss(chosen, rejected)
    # -log sigmoid(d) = log(1 + e^-d) for d = 1, -0.5, 0
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(0.5)) + math.log(2)) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["margin"] == pytest.approx(0.5 / 3)
    with_margin, _ = pairwise_loss(chosen, rejected, torch.tensor([1.0, 0.0, 0.0]))  # first pair: d - m = 0
    assert float(with_margin) == pytest.approx((math.log(2) + math.log(1 + math.exp(0.5)) + math.log(2)) / 3)


def test_prompt_builder_truncates_instruction_left_and_response_right(tokenizer):
    builder = PromptBuilder(tokenizer, TEMPLATE, query_len=4, response_len=3)
    text = builder.text("one two three four five six seven", "alpha beta gamma delta epsilon", ["Be kind.", "Be {x}."])
    ids = lambda s: tokenizer.encode(s, bos=False, eos=False)  # noqa: E731
    question = text.split("Question: ")[1].split("\n")[0]
    response = text.split("Response: ")[1].split("\n")[0]
    assert question == tokenizer.decode(ids("one two three four five six seven")[-4:])
    assert response == tokenizer.decode(ids("alpha beta gamma delta epsilon")[:3])
    assert text.endswith("Rules:\n- Be kind.\n- Be {x}.\nThe quality of the output is")


def test_reward_is_read_at_the_last_real_token_under_any_padding(world1, stories_dir, tokenizer):
    rm = RewardModel(load_model(stories_dir))
    seqs = [tokenizer.encode(t, bos=True, eos=False) for t in ("Once upon a time", "Tom ran", "A very long story about"
                                                              " a dog and a cat who went to the park one day")]
    with torch.no_grad():
        tokens, positions = pad_batch(seqs, "cpu")
        batched = rm(tokens, positions)
        for row, seq in enumerate(seqs):
            alone = rm(torch.tensor([seq]), torch.tensor([len(seq) - 1]))
            hidden = rm.model(torch.tensor([seq]), return_hidden=True)[0, -1]  # independent: the last hidden state
            torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alone[0], rm.head(hidden).squeeze(-1), atol=1e-5, rtol=1e-5)


def toy_pairs(tokenizer, n=16):
    builder = PromptBuilder(tokenizer, TEMPLATE, query_len=16, response_len=16)
    words = ["cat", "dog", "sun", "tree", "ball", "bird", "cake", "park"]
    pairs = []
    for i in range(n):
        question = f"Tell me about the {words[i % 8]}."
        good, bad = f"The {words[i % 8]} is happy and kind.", f"No. {words[(i + 3) % 8]} bad bad."
        pairs.append({"chosen": builder.encode(question, good, ["Be helpful."]),
                      "rejected": builder.encode(question, bad, ["Be helpful."]), "margin": 0.0})
    return pairs


def rm_task(rm, device="cpu"):
    def collate(batch):
        tokens, positions = pad_batch([e["chosen"] for e in batch] + [e["rejected"] for e in batch], device)
        return {"tokens": tokens, "positions": positions, "num_tokens": int(positions.sum()) + len(positions)}

    def loss(module, batch):
        rewards = module(batch["tokens"], batch["positions"])
        n = len(rewards) // 2
        return pairwise_loss(rewards[:n], rewards[n:])

    return collate, loss


def test_reward_model_fits_16_pairs(world1, stories_dir, tokenizer, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(load_model(stories_dir))
    pairs = toy_pairs(tokenizer)
    collate, loss = rm_task(rm)
    config = TrainConfig(output_dir=str(tmp_path), lr=3e-3, micro_batch_size=8, epochs=15, warmup_ratio=0.0,
                         log_every=0)
    Trainer(rm, rm.model, pairs, collate, loss, config, world1).fit()
    with torch.no_grad():
        batch = collate(pairs)
        rewards = rm(batch["tokens"], batch["positions"])
    assert bool((rewards[:16] > rewards[16:]).all())  # 100% training accuracy


def one_update(ckpt_dir: str, model_parallel_size: int):
    """Loss and full gradients (wq of layer 0, the head) of one training step at this model-parallel size."""
    info = distributed.init(model_parallel_size)
    torch.manual_seed(0)
    rm = RewardModel(load_model(ckpt_dir, info.model_parallel_size, info.model_parallel_rank))
    pairs = toy_pairs(Tokenizer(TOK512), n=4)
    collate, loss_fn = rm_task(rm)
    loss, _ = loss_fn(rm, collate(pairs))
    loss.backward()
    grad = rm.model.layers[0].attention.wq.weight.grad
    if info.model_parallel_size > 1:
        parts = [torch.empty_like(grad) for _ in range(info.model_parallel_size)]
        torch.distributed.all_gather(parts, grad)
        grad = torch.cat(parts)
    return {"loss": loss.detach(), "wq_grad": grad, "head_grad": rm.head.weight.grad.clone()}


def test_model_parallel_2_gives_the_same_loss_and_gradients(stories_dir, tmp_path):
    single = one_update(stories_dir, 1)
    distributed.teardown()
    for rank in run_distributed(one_update, 2, stories_dir, 2, tmp_dir=str(tmp_path)):
        torch.testing.assert_close(rank["loss"], single["loss"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rank["wq_grad"], single["wq_grad"], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(rank["head_grad"], single["head_grad"], atol=1e-6, rtol=1e-4)


def test_resume_equals_an_uninterrupted_run(world1, stories_dir, tokenizer, tmp_path):
    pairs = toy_pairs(tokenizer, n=12)

    def trainer_for(output_dir):
        torch.manual_seed(0)
        rm = RewardModel(load_model(stories_dir))
        collate, loss = rm_task(rm)
        config = TrainConfig(output_dir=output_dir, lr=1e-3, micro_batch_size=2, grad_accum=2, epochs=3,
                             warmup_ratio=0.2, save_every=2, log_every=1)
        return rm, Trainer(rm, rm.model, pairs, collate, loss, config, world1)

    whole, trainer = trainer_for(str(tmp_path / "whole"))
    trainer.fit()
    assert trainer.step == 9

    _, crashing = trainer_for(str(tmp_path / "cut"))
    step = crashing.train_step

    def crash_at_6():
        if crashing.step == 5:
            raise RuntimeError("killed")  # the process dies in step 6; the last checkpoint is step 4
        return step()

    crashing.train_step = crash_at_6
    with pytest.raises(RuntimeError, match="killed"):
        crashing.fit()
    assert open(tmp_path / "cut" / "latest").read().strip() == "checkpoint-4"
    resumed, trainer = trainer_for(str(tmp_path / "cut"))  # a fresh process: same command with --resume
    trainer.fit(resume=True)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    rm = load_reward_model(str(tmp_path / "cut" / "checkpoint-9"))  # the saved checkpoint loads with its head
    assert torch.equal(rm.head.weight, resumed.head.weight)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "whole" / "metrics.jsonl")]
    assert steps == list(range(1, 10))
    # the resumed run's metrics read as the uninterrupted run's: step 5, logged before the crash, is not repeated
    cut = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    whole_metrics = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
    assert [r["step"] for r in cut] == steps
    assert [r["loss"] for r in cut] == [r["loss"] for r in whole_metrics]


def test_bad_training_input_fails_with_one_line(stories_dir, tmp_path):
    def train(records, *extra):
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps(records))
        return run_cli("-m", "step2_reward_model.train_reward_model", "--config",
                       os.path.join(os.path.dirname(TOK512), "../../configs/reward_model_tiny.yaml"), "--ckpt_dir",
                       stories_dir, "--tokenizer_path", TOK512, "--train_file", str(path), "--output_dir",
                       str(tmp_path / "out"), *extra)

    good = {"instruction": "Hi", "input": "", "output_1": "Hello!", "output_2": "Go away.", "preference": 1}
    result = train([good, {**good, "preference": 0}])
    assert result.returncode == 2 and "pairs.json:2: \"preference\" must be 1 or 2, got 0" in result.stderr
    result = train([{**good, "output_2": "  "}])
    assert result.returncode == 2 and "pairs.json:1: 'output_2' is missing or empty" in result.stderr
    result = train([{**good, "dimensions": "('Concise', 'Nonexistent')", "negative_definitions": "(0, 1)"}])
    assert result.returncode == 2 and "principle 'Nonexistent' is not in" in result.stderr
    assert "Traceback" not in result.stderr
    first_human_pair = pmp_pairs(os.path.join(ROOT, "data/oasst1/oasst1_en_validation_messages.jsonl"), 0, 1)
    result = train(first_human_pair + [good], "--human_eval_against", "worst", "--human_eval_max_pairs", "1")
    assert result.returncode == 2 and "pairs.json: holds 1 prompts of the human check" in result.stderr
    by_text = [{k: v for k, v in first_human_pair[0].items() if k != "id"}, good]  # another id scheme
    result = train(by_text, "--human_eval_against", "worst", "--human_eval_max_pairs", "1")
    assert result.returncode == 2 and "pairs.json: holds 1 prompts of the human check" in result.stderr


def test_score_cli_equals_the_model_on_the_built_prompt(world1, stories_dir, tokenizer, tmp_path):
    import shutil
    ckpt = str(tmp_path / "rm")
    shutil.copytree(stories_dir, ckpt)
    torch.manual_seed(3)
    rm = RewardModel(load_model(stories_dir))
    torch.save({"head.weight": rm.head.weight.detach(), "head.bias": torch.tensor([0.25])}, os.path.join(ckpt, "head.pth"))
    rm.head.bias.data.fill_(0.25)
    template_file = tmp_path / "template.txt"
    template_file.write_text(TEMPLATE)
    result = run_cli("-m", "step2_reward_model.score", "--ckpt_dir", ckpt, "--tokenizer_path", TOK512,
                     "--instruction", "Tell me a story", "--response", "Once upon a time", "--response", "No.",
                     "--principle", "Be kind.", "--prompt_template", str(template_file))
    assert result.returncode == 0, result.stderr
    got = [r["reward"] for r in json.loads(result.stdout)]
    builder = PromptBuilder(tokenizer, TEMPLATE)
    with torch.no_grad():
        for response, reward in zip(["Once upon a time", "No."], got):
            seq = builder.encode("Tell me a story", response, ["Be kind."])
            expected = rm(torch.tensor([seq]), torch.tensor([len(seq) - 1]))[0]
            assert reward == pytest.approx(float(expected), abs=1e-5)


def train_two_steps(out_dir: str, stories_dir: str, micro: int, accum: int):
    """Two optimizer steps of the shared loop on 9 pairs: 8 then 1 (the last, partial step)."""
    info = distributed.init(1)  # model parallel 1: every process is a data-parallel replica
    torch.manual_seed(0)
    rm = RewardModel(load_model(stories_dir))
    collate, loss = rm_task(rm)
    # float32: the two splits are equal exactly; in bf16 a row's rounding depends on its micro-batch's padded width
    config = TrainConfig(output_dir=out_dir, lr=1e-3, micro_batch_size=micro, grad_accum=accum, epochs=1,
                         warmup_ratio=0.0, log_every=1, precision="fp32")
    trainer = Trainer(rm, rm.model, toy_pairs(Tokenizer(TOK512), n=9), collate, loss, config, info)
    history = [trainer.train_step() for _ in range(trainer.total_steps)]
    return {"grad_norms": torch.tensor([h["grad_norm"] for h in history]),
            "losses": torch.tensor([h["loss"] for h in history]),
            "wq": rm.model.layers[0].attention.wq.weight.detach().clone(), "head": rm.head.weight.detach().clone()}


def test_data_parallel_2_equals_1_with_a_partial_last_step(stories_dir, tmp_path):
    single = train_two_steps(str(tmp_path / "dp1"), stories_dir, 2, 4)
    distributed.teardown()
    ranks = run_distributed(train_two_steps, 2, str(tmp_path / "dp2"), stories_dir, 2, 2, tmp_dir=str(tmp_path))
    assert len(single["losses"]) == 2
    for rank in ranks:
        torch.testing.assert_close(rank["grad_norms"], single["grad_norms"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rank["losses"], single["losses"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rank["wq"], single["wq"], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(rank["head"], single["head"], atol=1e-6, rtol=1e-4)


# Instructability in the evaluation: each held-out pair under its principles and under their negations.
PRINCIPLES = [
    {"dimension": "Kind", "definition": "The response should be kind and gentle.",
     "negative_definition": "The response should be rude and mean."},
    {"dimension": "Short", "definition": "The response should be short.",
     "negative_definition": "The response should be long and rambling."},
    {"dimension": "Odd", "definition": "The response should mention a cat."},  # no negative_definition
]
DEFINITION = {p["dimension"]: p["definition"] for p in PRINCIPLES}
NEGATION = {p["dimension"]: p.get("negative_definition") for p in PRINCIPLES}
WORDS = ["cat", "dog", "sun", "tree", "ball", "bird", "cake", "park", "boat", "girl", "frog", "hat"]


def flip_records(n: int) -> list[dict]:
    """Step-1-style records (two responses of the same words, so that the principles can tip the preference),
    preference 1 and 2 in turn, principles as dimensions + negative_definitions tuples (some negated by step 1); every
    fifth pair has an explicit principles list instead, every seventh a principle without a negative_definition."""
    records = []
    for i in range(n):
        a, b = WORDS[i % 12], WORDS[(i * 5 + 3) % 12]
        record = {"id": f"q{i}", "instruction": f"Tell me about the {a}.", "input": "",
                  "output_1": f"The {a} and the {b}.", "output_2": f"The {b} and the {a}.", "preference": 1 + i % 2}
        if i % 5 == 4:
            record["principles"] = ["Be helpful."]
        elif i % 7 == 6:
            record.update(dimensions="('Kind', 'Odd')", negative_definitions="(0, 0)")
        else:
            record.update(dimensions=["('Kind', 'Short')", "('Short',)", "('Kind',)"][i % 3],
                          negative_definitions=["(0, 1)", "(1,)", "(0,)"][i % 3])
        records.append(record)
    return records


def principles_by_hand(record: dict, negate: bool):
    """The principle texts of a record of flip_records, as given or negated (None: it cannot be negated), written out
    from PRINCIPLES without the trainer's code."""
    if "principles" in record:
        return None if negate else record["principles"]
    names = [n.strip(" '") for n in record["dimensions"].strip("(),").split(",") if n.strip(" '")]
    flags = [int(f) for f in record["negative_definitions"].strip("(),").split(",") if f.strip()]
    texts = [(DEFINITION[n] if f else NEGATION[n]) if negate else (NEGATION[n] if f else DEFINITION[n])
             for n, f in zip(names, flags)]
    return None if None in texts else texts


def chosen_and_rejected(record: dict) -> tuple[str, str]:
    return ((record["output_1"], record["output_2"]) if record["preference"] == 1 else
            (record["output_2"], record["output_1"]))


def rewards_by_hand(rm, builder, record: dict, principles: list[str]) -> tuple[float, float]:
    """(chosen, rejected) rewards of a record under these principles: one forward pass per prompt, no padding."""
    out = []
    with torch.no_grad():
        for response in chosen_and_rejected(record):
            seq = builder.encode(record["instruction"], response, principles)
            out.append(float(rm(torch.tensor([seq]), torch.tensor([len(seq) - 1]))[0]))
    return tuple(out)


def count_flips(before: list[tuple], after: list[tuple]) -> tuple[int, int]:
    """(flips, ties) from (chosen, rejected) rewards: the preference changes sign; a tie on either side is no flip."""
    sign = lambda a, b: (a > b) - (a < b)  # noqa: E731
    signs = [(sign(*x), sign(*y)) for x, y in zip(before, after)]
    return sum(s * t == -1 for s, t in signs), sum(s == 0 or t == 0 for s, t in signs)


def test_pair_examples_negate_each_principle_and_leave_out_what_has_no_negation(tmp_path):
    from step2_reward_model.train_reward_model import RewardModelOptions, pair_examples
    principle_file = tmp_path / "principles.json"
    principle_file.write_text(json.dumps(PRINCIPLES))
    records = flip_records(14) + [{"instruction": "Hi", "output_1": "Hello!", "output_2": "Go.", "preference": 2}]
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    for default_principles, default_negation in ((2, [NEGATION["Kind"], NEGATION["Short"]]), (3, None)):
        opts = RewardModelOptions(principle_file=str(principle_file), default_principles=default_principles)
        examples = pair_examples(str(tmp_path / "pairs.json"), opts)
        for record, example in zip(records[:-1], examples):
            assert example["principles"] == principles_by_hand(record, negate=False)
            assert example["negated_principles"] == principles_by_hand(record, negate=True)
        assert examples[0]["principles"] == ["The response should be kind and gentle.",  # ('Kind', 'Short'), (0, 1)
                                             "The response should be long and rambling."]
        assert examples[0]["negated_principles"] == ["The response should be rude and mean.",
                                                     "The response should be short."]
        assert examples[1]["negated_principles"] == ["The response should be short."]  # negated by step 1: back
        assert examples[4]["negated_principles"] is None  # an explicit principles list
        assert examples[6]["negated_principles"] is None  # 'Odd' has no negative_definition
        assert examples[-1]["negated_principles"] == default_negation  # the first N principles, when all have one
    assert [i for i, e in enumerate(examples[:-1]) if e["negated_principles"] is None] == [4, 6, 9, 13]


def test_eval_json_flip_counts_equal_a_count_from_direct_forward_passes(world1, stories_dir, tokenizer,
                                                                         tmp_path):
    from step2_reward_model.train_reward_model import held_out
    records = flip_records(40)
    for r in records[1::3]:
        r["flip"] = True  # step 1's deliberate label noise: held-out accuracy is against the label before it
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    (tmp_path / "principles.json").write_text(json.dumps(PRINCIPLES))
    (tmp_path / "template.txt").write_text(TEMPLATE)
    out = tmp_path / "out"
    # a small lr: the margins stay small enough for the negations to flip some pairs
    result = run_cli("-m", "step2_reward_model.train_reward_model", "--config",
                     os.path.join(os.path.dirname(TOK512), "../../configs/reward_model_tiny.yaml"),
                     "--ckpt_dir", stories_dir, "--tokenizer_path", TOK512, "--train_file", str(tmp_path / "pairs.json"),
                     "--principle_file", str(tmp_path / "principles.json"), "--prompt_template",
                     str(tmp_path / "template.txt"), "--human_eval_file", "", "--output_dir", str(out),
                     "--eval_fraction", "0.5", "--query_len", "16", "--response_len", "16", "--max_seq_len", "128",
                     "--micro_batch_size", "3", "--epochs", "1", "--lr", "1e-5", "--precision", "fp32",
                     "--log_every", "0")
    assert result.returncode == 0, result.stderr
    got = json.loads((out / "eval.json").read_text())

    held = [r for r in records if held_out(r["id"], 0.5)]
    rm = load_reward_model(str(out / open(out / "latest").read().strip()))  # the final weights, as evaluated
    builder = PromptBuilder(tokenizer, TEMPLATE, query_len=16, response_len=16)
    under = [rewards_by_hand(rm, builder, r, principles_by_hand(r, negate=False)) for r in held]
    negatable = [i for i, r in enumerate(held) if principles_by_hand(r, negate=True) is not None]
    before = [under[i] for i in negatable]
    after = [rewards_by_hand(rm, builder, held[i], principles_by_hand(held[i], negate=True)) for i in negatable]
    assert min(abs(a - b) for a, b in before + after) > 5e-5  # no pair so close that float noise could flip it
    flips, ties = count_flips(before, after)
    skipped = len(held) - len(negatable)
    assert 0 < flips < len(negatable) and skipped >= 2  # not trivially none or all; some pairs are left out
    assert got["heldout_pairs"] == len(held)
    judged = [{**r, "preference": 3 - r["preference"]} if r.get("flip") else r for r in held]
    # an odd number of flipped held-out pairs (7 of 23): undoing them must change the accuracy
    assert sum(r.get("flip", False) for r in held) % 2 == 1
    right = [rewards_by_hand(rm, builder, r, principles_by_hand(r, negate=False)) for r in judged]
    assert got["heldout_accuracy"] == pytest.approx(sum(a > b for a, b in right) / len(held))
    assert got["heldout_accuracy"] != pytest.approx(sum(a > b for a, b in under) / len(held))
    assert got["heldout_flip_pairs"] == len(negatable) and got["heldout_flip_skipped"] == skipped
    assert got["heldout_flip_rate"] == pytest.approx(flips / len(negatable))
    assert got["heldout_flip_rate_untied"] == pytest.approx(flips / (len(negatable) - ties))
    assert not any(k.startswith("human_") for k in got)  # --human_eval_file "": no human check


def flip_metrics(ckpt_dir: str, micro_batch_size: int):
    """accuracy_and_margin with flips on 7 encoded pairs (2 without a negation) at this world's data-parallel size."""
    from step2_reward_model.train_reward_model import accuracy_and_margin
    info = distributed.init(1)  # model parallel 1: every process is a data-parallel replica
    rm = RewardModel(load_model(ckpt_dir), head_std=0.5)
    builder = PromptBuilder(Tokenizer(TOK512), TEMPLATE, query_len=16, response_len=16)

    def encode(record, principles):
        chosen, rejected = chosen_and_rejected(record)
        return {"chosen": builder.encode(record["instruction"], chosen, principles),
                "rejected": builder.encode(record["instruction"], rejected, principles)}

    data = []
    for record in flip_records(7):
        negated = principles_by_hand(record, negate=True)
        data.append({**encode(record, principles_by_hand(record, negate=False)),
                     "negated": encode(record, negated) if negated is not None else None})
    return accuracy_and_margin(rm, data, micro_batch_size, "fp32", info, flips=True)


def test_flip_counts_are_summed_over_data_parallel_ranks(stories_dir, tokenizer, tmp_path):
    single = flip_metrics(stories_dir, 2)
    distributed.teardown()
    ranks = run_distributed(flip_metrics, 2, stories_dir, 2, tmp_dir=str(tmp_path))
    distributed.init(1)
    try:
        rm = RewardModel(load_model(stories_dir), head_std=0.5)
    finally:
        distributed.teardown()
    builder = PromptBuilder(tokenizer, TEMPLATE, query_len=16, response_len=16)
    negatable = [r for r in flip_records(7) if principles_by_hand(r, negate=True) is not None]
    before, after = ([rewards_by_hand(rm, builder, r, principles_by_hand(r, negate)) for r in negatable]
                     for negate in (False, True))
    assert min(abs(a - b) for a, b in before + after) > 5e-5
    flips, ties = count_flips(before, after)
    assert 0 < flips < 5
    assert single["flip_pairs"] == 5 and single["flip_skipped"] == 2 and single["pairs"] == 7
    assert single["flip_rate"] == pytest.approx(flips / 5)
    assert single["flip_rate_untied"] == pytest.approx(flips / (5 - ties))
    for rank in ranks:  # rank 0 scores pairs 0, 2, 4, 6 and rank 1 pairs 1, 3, 5: the sums are the whole figure
        assert rank["flip_pairs"] == 5 and rank["flip_skipped"] == 2 and rank["pairs"] == 7
        assert rank["flip_rate"] == pytest.approx(single["flip_rate"])
        assert rank["flip_rate_untied"] == pytest.approx(single["flip_rate_untied"])
        # accuracy and margin as before; the margin to float32 rounding (other rows share a rank's micro-batches)
        assert rank["accuracy"] == single["accuracy"] and rank["margin"] == pytest.approx(single["margin"], abs=1e-6)
