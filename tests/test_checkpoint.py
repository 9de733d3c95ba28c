"""Meta-layout checkpoints: llama2c conversion, resharding round trips, weights-only loading, clear errors."""

import json
import os
import struct

import numpy as np
import pytest
import torch

from conftest import GQA4_ARGS, STORIES_BIN, make_random_checkpoint
from llama_mp.checkpoint import CheckpointError, load_model, load_shard, load_state, shard_paths
from llama_mp.convert import read_llama2c, reshard


def read_dir(path):
    return json.load(open(os.path.join(path, "params.json"))), [load_shard(p) for p in shard_paths(path)]


def assert_same_checkpoint(a, b):
    params_a, shards_a = read_dir(a)
    params_b, shards_b = read_dir(b)
    assert params_a == params_b and len(shards_a) == len(shards_b)
    for sa, sb in zip(shards_a, shards_b):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_llama2c_tensors_are_the_file_floats():
    raw = np.fromfile(STORIES_BIN, dtype="<f4", offset=28)
    args, state = read_llama2c(STORIES_BIN)
    dim, vocab, layers, hidden = 64, 512, 5, 172
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.vocab_size) == (64, 5, 8, 4, 512)
    assert args.ffn_hidden_dim == hidden and args.tie_embeddings
    assert np.array_equal(state["tok_embeddings.weight"].numpy().ravel(), raw[:vocab * dim])
    offset = vocab * dim + layers * dim  # after the embedding and rms_att: wq of layer 0, [out, in]
    assert np.array_equal(state["layers.0.attention.wq.weight"].numpy().ravel(), raw[offset:offset + dim * dim])
    assert "output.weight" not in state  # tied: the output reads the embedding


def test_reshard_1_2_1_is_bit_exact(tmp_path, stories_dir):
    reshard(stories_dir, str(tmp_path / "mp2"), 2)
    assert len(shard_paths(str(tmp_path / "mp2"))) == 2
    reshard(str(tmp_path / "mp2"), str(tmp_path / "mp1"), 1)
    assert_same_checkpoint(stories_dir, str(tmp_path / "mp1"))


def test_four_way_split_round_trips_and_loads_at_any_size(tmp_path, world1):
    one = str(tmp_path / "one")
    make_random_checkpoint(one, seed=1, **GQA4_ARGS)
    reshard(one, str(tmp_path / "four"), 4)
    _, four = read_dir(str(tmp_path / "four"))
    assert four[0]["layers.0.attention.wk.weight"].shape == (8, 64)  # 4 kv heads x 8 dims, split 4 ways
    assert four[3]["layers.1.feed_forward.w2.weight"].shape == (64, 48)  # row parallel: input dim split
    assert four[2]["tok_embeddings.weight"].shape == (96, 16)  # untied: embedding dim split
    reshard(str(tmp_path / "four"), str(tmp_path / "back"), 1)
    assert_same_checkpoint(one, str(tmp_path / "back"))
    # loading 4 shards as model-parallel rank 1 of 2 merges and re-splits in memory
    _, direct = load_state(str(tmp_path / "four"), 2, 1)
    reshard(one, str(tmp_path / "two"), 2)
    _, two = read_dir(str(tmp_path / "two"))
    assert direct.keys() == two[1].keys() and all(torch.equal(direct[k], two[1][k]) for k in direct)


def test_loading_never_unpickles_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    make_random_checkpoint(str(tmp_path))
    torch.save({"x": Payload()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_shard(str(tmp_path / "consolidated.00.pth"))
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_errors_name_the_file_and_problem(tmp_path, world1):
    ckpt = str(tmp_path / "c")
    make_random_checkpoint(ckpt, shards=2)
    os.remove(os.path.join(ckpt, "consolidated.00.pth"))
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth is missing"):
        load_model(ckpt)

    make_random_checkpoint(ckpt, shards=1)
    params = json.load(open(os.path.join(ckpt, "params.json")))
    json.dump({**params, "dim": 64}, open(os.path.join(ckpt, "params.json"), "w"))
    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight has shape \(64, 32\) but .* imply \(64, 64\)"):
        load_model(ckpt)
    json.dump({**params, "n_expertz": 3}, open(os.path.join(ckpt, "params.json"), "w"))
    with pytest.raises(CheckpointError, match=r"params.json: unknown keys \['n_expertz'\]"):
        load_model(ckpt)
    json.dump(params, open(os.path.join(ckpt, "params.json"), "w"))
    state = torch.load(os.path.join(ckpt, "consolidated.00.pth"), weights_only=True)
    torch.save({**state, "layers.0.extra.weight": torch.zeros(2)}, os.path.join(ckpt, "consolidated.00.pth"))
    with pytest.raises(CheckpointError, match=r"unknown key"):
        load_model(ckpt)
    with pytest.raises(CheckpointError, match="must divide n_kv_heads"):
        load_state(ckpt, 4, 0)


def test_truncated_llama2c_file_is_refused(tmp_path):
    data = open(STORIES_BIN, "rb").read()
    (tmp_path / "cut.bin").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.bin: truncated \(1056440 bytes, expected 1056540"):
        read_llama2c(str(tmp_path / "cut.bin"))
    (tmp_path / "tiny.bin").write_bytes(struct.pack("<3i", 1, 2, 3))
    with pytest.raises(CheckpointError, match="shorter than its header"):
        read_llama2c(str(tmp_path / "tiny.bin"))


def test_saving_fused_weights_writes_each_tensor_alone(tmp_path, world1, gqa_dir):
    from llama_mp.checkpoint import save_shard
    model = load_model(gqa_dir)
    model.fuse_projections()
    save_shard(str(tmp_path), 0, model.state_dict(), model.args)
    saved = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    wq = saved["layers.0.attention.wq.weight"]
    assert wq.untyped_storage().nbytes() == wq.numel() * 4  # not the whole wq|wk|wv buffer
    assert torch.equal(wq, load_shard(os.path.join(gqa_dir, "consolidated.00.pth"))["layers.0.attention.wq.weight"])


def test_a_reward_model_is_found_as_a_training_directory_full_or_lora(tmp_path):
    """train_ppo's --reward_ckpt: a checkpoint (full weights or LoRA adapters) as it is, a training directory as its
    latest checkpoint, a directory without either refused in one sentence naming it."""
    from llama_mp.checkpoint import check_reward_model, resolve_checkpoint
    head = {"head.weight": torch.zeros(1, 4), "head.bias": torch.zeros(1)}
    for marker in ("params.json", "adapter_config.json"):
        run = tmp_path / marker.split(".")[0]
        ckpt = run / "checkpoint-2"
        os.makedirs(ckpt)
        (ckpt / marker).write_text("{}")
        torch.save(head, ckpt / "head.pth")
        (run / "latest").write_text("checkpoint-2\n")
        assert resolve_checkpoint(str(run)) == str(ckpt) == resolve_checkpoint(str(ckpt))
        check_reward_model(resolve_checkpoint(str(run)))  # accepted
    empty = tmp_path / "not_trained"
    os.makedirs(empty)
    assert resolve_checkpoint(str(empty)) == str(empty)
    with pytest.raises(CheckpointError, match=f"{empty}: no checkpoint here"):
        check_reward_model(str(empty))
