"""The reward model and the shared training loop: loss, fitting, read position, model parallel, resume, bad input."""

import json
import math
import os

import pytest
import torch

from conftest import TOK512, run_cli, run_distributed
from llama_mp import distributed
from llama_mp.checkpoint import load_model
from llama_mp.tokenizer import Tokenizer
from llama_mp.train import TrainConfig, Trainer
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
