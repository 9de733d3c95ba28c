"""DPO: the losses by hand, log 2 at initialisation, response-only log-probs, pair formats, the margin rises."""

import json
import math

import pytest
import torch

from conftest import TOK512, run_cli
from llama_mp.chat import ChatFormat, split_tokens
from llama_mp.checkpoint import load_model
from llama_mp.sampler import Sampler
from llama_mp.train import TrainConfig, Trainer
from step3_rl.dpo import dpo_loss
from step3_rl.train_dpo import DPOOptions, add_reference_logprobs, collate, encode_pair, read_pairs, sequence_logprobs


def test_dpo_losses_equal_hand_computation():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    z = (-3 + 5) - (-4 + 4.5)  # 1.5
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(0.1) and m["rewards/rejected"] == pytest.approx(-0.05)
    assert m["rewards/margin"] == pytest.approx(0.15) and m["rewards/accuracy"] == 1.0
    smoothed, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    expected = 0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15))
    assert float(smoothed) == pytest.approx(expected, rel=1e-6)
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert float(ipo) == pytest.approx((z - 5.0) ** 2)


PAIRS = [{"prompt": "Tell me a story.", "chosen": "Once upon a time, there was a happy cat.", "rejected": "No."},
         {"prompt": "What is a dog?", "chosen": "A dog is a friendly animal.", "rejected": "Blue."},
         {"prompt": "Say hi.", "chosen": "Hi! How are you today?", "rejected": "Go away now."},
         {"prompt": "Name a color.", "chosen": "Red is a nice color.", "rejected": "Seven."}]


def encoded(tokenizer, opts=None):
    chat = ChatFormat("dromedary", meta_prompt="# Meta\n\n### User")  # DPOOptions' default for a base model
    return [encode_pair(p, tokenizer, opts or DPOOptions(), chat) for p in PAIRS]


def test_response_logprobs_equal_teacher_forced_scores(world1, stories_dir, tokenizer):
    model = load_model(stories_dir)
    examples = encoded(tokenizer)
    batch = collate(examples, "cpu")
    with torch.no_grad():
        got = sequence_logprobs(model, batch)
    sampler = Sampler(model, tokenizer)
    seqs = [e[side] for side in ("chosen", "rejected") for e in examples]
    expected = [sum(s) for s in sampler.score([p for p, _ in seqs], [r for _, r in seqs])]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-5)


def test_split_tokens_reassembles_the_whole_text(tokenizer):
    prompt, response = split_tokens(tokenizer, "# Meta\nSay hi.\n\n### Dromedary", "\nHi there!")
    assert prompt + response == tokenizer.encode("# Meta\nSay hi.\n\n### Dromedary\nHi there!", bos=True, eos=False)
    assert prompt[0] == tokenizer.bos_id and response


def test_loss_is_log2_at_initialisation_and_the_margin_rises(world1, stories_dir, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = load_model(stories_dir)
    examples = encoded(tokenizer)
    add_reference_logprobs(model, examples, 2, world1)
    batch = collate(examples, "cpu")
    opts = DPOOptions()

    def loss(module, b):
        logps = sequence_logprobs(module, b)
        n = len(logps) // 2
        return dpo_loss(logps[:n], logps[n:], b["ref"][:n], b["ref"][n:], opts.beta)

    with torch.no_grad():
        initial, metrics = loss(model, batch)
    assert float(initial) == pytest.approx(math.log(2), abs=1e-5) and metrics["rewards/margin"] == pytest.approx(0, abs=1e-4)
    config = TrainConfig(output_dir=str(tmp_path), lr=3e-4, micro_batch_size=4, epochs=8, warmup_ratio=0.0, log_every=0)
    Trainer(model, model, examples, lambda b: collate(b, "cpu"), loss, config, world1, task="dpo").fit()
    with torch.no_grad():
        final, metrics = loss(model, batch)
    assert float(final) < 0.6 and metrics["rewards/margin"] > 0.1 and metrics["rewards/accuracy"] == 1.0


def test_pair_formats_and_bad_input(tmp_path):
    opts = DPOOptions(rejected_key="reject")
    path = tmp_path / "pairs.jsonl"
    lines = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
              "reject": [{"role": "assistant", "content": "Bye"}]},
             {"prompt": "Hi", "chosen": "Hello", "reject": "Bye"},
             {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
              "reject": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye"}]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_pairs(str(path), opts) == [{"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}] * 3
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: no 'reject' field"):
        read_pairs(str(path), opts)


def test_dpo_cli_runs_and_reports(stories_dir, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "dpo"
    result = run_cli("-m", "step3_rl.train_dpo", "--ckpt_dir", stories_dir, "--tokenizer_path", TOK512,
                     "--train_file", str(path), "--output_dir", str(out), "--micro_batch_size", "2", "--epochs", "1",
                     "--max_seq_len", "512")
    assert result.returncode == 0, result.stderr
    first = json.loads(open(out / "metrics.jsonl").readline())
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "checkpoint-2" / "consolidated.00.pth").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi", "chosen": " ", "rejected": "Bye"}) + "\n")
    result = run_cli("-m", "step3_rl.train_dpo", "--ckpt_dir", stories_dir, "--tokenizer_path", TOK512,
                     "--train_file", str(bad), "--output_dir", str(out))
    assert result.returncode == 2 and "bad.jsonl:1: empty chosen or rejected response" in result.stderr
