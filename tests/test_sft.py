"""The SFT trainer: the loss covers response tokens only (checked against teacher-forced scores), and it learns."""

import json

import pytest
import torch

from llama_mp.checkpoint import load_model
from llama_mp.sampler import Sampler
from llama_mp.train import TrainConfig, Trainer
from step0_coldstart.train_sft import SFTOptions, collate, encode_records, response_loss


def test_sft_loss_is_the_response_nll_and_falls(world1, stories_dir, tokenizer, tmp_path):
    path = tmp_path / "sft.jsonl"
    records = [{"prompt": f"Row {i}:\n", "response": '{"a": %d, "b": "x"}' % i} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = encode_records(str(path), SFTOptions(), tokenizer)
    assert all(e["response"][-1] == tokenizer.eos_id for e in examples)
    model = load_model(stories_dir)
    batch = collate(examples, "cpu")
    with torch.no_grad():
        loss, _ = response_loss(model, batch)
    scores = Sampler(model, tokenizer).score([e["prompt"] for e in examples], [e["response"] for e in examples])
    expected = -sum(sum(s) for s in scores) / sum(len(s) for s in scores)  # prompt tokens do not count
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    config = TrainConfig(output_dir=str(tmp_path / "out"), lr=3e-3, micro_batch_size=8, epochs=10, warmup_ratio=0.0,
                         log_every=0)
    Trainer(model, model, examples, lambda b: collate(b, "cpu"), response_loss, config, world1, task="sft").fit()
    with torch.no_grad():
        trained, _ = response_loss(model, batch)
    assert float(trained) < 0.5 * float(loss)
