"""Tensor parallelism over two gloo processes equals the single-process model; seeds and process groups behave."""

import os
import subprocess

import torch

from conftest import STORIES_REFERENCE, TOK512, free_port, run_distributed
from llama_mp import distributed
from llama_mp.checkpoint import load_model
from llama_mp.distributed import first_host
from llama_mp.sampler import Sampler
from llama_mp.tokenizer import Tokenizer

TOKENS = torch.tensor([[1, 7, 22, 13, 40, 5, 9, 31], [1, 50, 3, 3, 8, 61, 2, 17]])


def forward_greedy_and_grad(ckpt_dir: str, model_parallel_size: int):
    """Logits, greedy tokens, training loss and the full wq gradient of layer 0 at this model-parallel size."""
    info = distributed.init(model_parallel_size)
    model = load_model(ckpt_dir, info.model_parallel_size, info.model_parallel_rank)
    with torch.no_grad():
        logits = model(TOKENS)
    tokenizer = Tokenizer(TOK512)
    tokenizer.n_words = model.args.vocab_size  # random models use the first ids of this tokenizer only
    greedy = Sampler(model, tokenizer).generate([[1, 7, 22], [1, 50]], 12, temperature=0.0)
    logits_train = model(TOKENS)
    loss = torch.nn.functional.cross_entropy(logits_train[:, :-1].reshape(-1, model.args.vocab_size),
                                             TOKENS[:, 1:].reshape(-1))
    loss.backward()
    grad = model.layers[0].attention.wq.weight.grad
    if info.model_parallel_size > 1:  # column parallel: gather the output-dim shards
        parts = [torch.empty_like(grad) for _ in range(info.model_parallel_size)]
        torch.distributed.all_gather(parts, grad)
        grad = torch.cat(parts, dim=0)
    return {"logits": logits, "greedy": [c.tokens for c in greedy], "loss": loss.detach(), "grad": grad}


def two_rank_job(gqa_dir: str, stories_dir: str):
    out = {"gqa": forward_greedy_and_grad(gqa_dir, 2), "stories": forward_greedy_and_grad(stories_dir, 2)}
    sampler = Sampler(load_model(stories_dir, 2, torch.distributed.get_rank()), Tokenizer(TOK512))
    out["story"] = sampler.generate(["Once upon a time"], 60, temperature=0.0)[0].text
    out["sampled"] = sampler.generate(["Once upon a time"], 20, temperature=1.0, seed=3)[0].tokens
    out["mp_rand"] = torch.rand(4)  # one model-parallel group: the same seed on both ranks
    distributed.init(1)  # re-initialise as two data-parallel replicas in the same processes
    out["dp_rand"] = torch.rand(4)
    return out


def test_model_parallel_2_equals_1(tmp_path, gqa_dir, stories_dir):
    ranks = run_distributed(two_rank_job, 2, gqa_dir, stories_dir, tmp_dir=str(tmp_path))
    for name, path in [("gqa", gqa_dir), ("stories", stories_dir)]:
        single = forward_greedy_and_grad(path, 1)
        distributed.teardown()
        for rank in ranks:
            got = rank[name]
            torch.testing.assert_close(got["logits"], single["logits"], atol=1e-5, rtol=1e-5)
            assert got["greedy"] == single["greedy"]
            torch.testing.assert_close(got["loss"], single["loss"], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(got["grad"], single["grad"], atol=1e-6, rtol=1e-5)
    assert ranks[0]["story"] == ranks[1]["story"] == STORIES_REFERENCE[len("Once upon a time"):]
    assert ranks[0]["sampled"] == ranks[1]["sampled"]  # both ranks of the group drew the same tokens
    assert torch.equal(ranks[0]["mp_rand"], ranks[1]["mp_rand"])
    assert not torch.equal(ranks[0]["dp_rand"], ranks[1]["dp_rand"])


def test_first_host_parses_slurm_node_lists():
    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("node001") == "node001"
    assert first_host("a-b[3,5]") == "a-b3"
    assert first_host("rack[1-2]-node[01-04],x") == "rack1-node01"
    assert first_host("n[1-2]x") == "n1x"


def test_an_sbatch_script_is_a_world_of_one(monkeypatch):
    # sbatch sets SLURM_PROCID=0 and SLURM_NTASKS=N in the batch script, which is still one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    for var in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init()
    try:
        assert (info.world_size, info.rank, info.model_parallel_size) == (1, 0, 1)
    finally:
        distributed.teardown()


def test_launch_as_srun_tasks_and_as_torchrun_per_node(tmp_path, stories_dir):
    """scripts/launch.sh under a simulated srun: two tasks on one node, then one task running torchrun."""
    base = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "SLURM_NNODES": "1",
            "SLURM_JOB_NODELIST": "localhost", "PATH": os.environ["PATH"]}
    args = ["bash", "scripts/launch.sh", "llama_mp.generate", "--ckpt_dir", stories_dir, "--tokenizer_path", TOK512,
            "--max_gen_len", "8", "--temperature", "0", "--prompt", "Once upon a time"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = str(free_port())
    tasks = [subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NTASKS": "2",
                                   "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1",
                                   "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "1", "MASTER_PORT": port})
             for r in range(2)]
    outs = [t.communicate(timeout=120) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs
    assert "Once upon a time, there was a little girl\n" in outs[0][0]
    torchrun = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=120,
                              env={**base, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1",
                                   "SLURM_STEP_NUM_NODES": "1", "NPROC_PER_NODE": "2", "SLURM_JOB_ID": "2",
                                   "MASTER_PORT": str(free_port())})
    assert torchrun.returncode == 0, torchrun.stderr
    assert "Once upon a time, there was a little girl\n" in torchrun.stdout
