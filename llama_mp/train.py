"""The one training loop that SFT, reward-model, DPO and PPO updates share.

A task supplies the trainable module (the LLaMA backbone plus any heads), a list of examples, `collate(examples)`
that makes one micro-batch, and `loss(module, batch) -> (loss, metrics)`. The loop owns everything else:
  - data order: a seeded permutation per epoch; each optimizer step takes micro_batch_size x grad_accum examples per
    data-parallel replica, replicas taking disjoint slices (the last partial step of an epoch is kept);
  - AdamW (llama_mp/adamw.py), linear warmup then cosine decay to min_lr_ratio x lr (a function of the step),
    gradient clipping on the global norm (tensor-parallel shards counted once), gradients averaged over the
    data-parallel group;
  - checkpoints in the Meta layout (one shard per model-parallel rank) plus the heads and the trainer state (optimizer,
    step: also the schedule's and the data's position, RNG), written to `checkpoint-N.tmp` and renamed when complete;
    `resume=True` continues from the latest complete one and ends with the same weights as an uninterrupted run;
  - metrics as JSONL on rank 0 (`metrics.jsonl`) with a progress line.
Precision (`precision`): the weights the optimizer updates, their gradients and its state are float32; "bf16" runs the
forward and backward under torch.autocast (bfloat16 matmuls and attention; the residual stream, RMSNorm, softmax and
every loss reduction in float32), "auto" picks bf16 where the device computes it natively (CUDA with bf16, a CPU with
AVX512-BF16 or AMX) and fp32 elsewhere; the choice is logged with every metrics record. With LoRA (`lora_rank` > 0)
only the adapters (and a task's heads) are trained, the frozen base may be held in the compute dtype, and checkpoints
hold the adapters and a pointer to the base (llama_mp/lora.py). `activation_checkpointing` recomputes each transformer
block in the backward pass instead of keeping its activations.
"""

import glob
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from llama_mp import cli, lora
from llama_mp.adamw import AdamW
from llama_mp.checkpoint import (copy_tokenizer_files, latest_checkpoint, load_weights, save_params, save_shard,
                                 split_dim, tokenizer_home, write_latest)
from llama_mp.config import parse_config
from llama_mp.distributed import DistInfo, barrier
from llama_mp.jsonl import append_jsonl, keep_steps_upto, read_jsonl, write_json_atomic
from llama_mp.model import Transformer, cpu_flags
from llama_mp.progress import Progress


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    lr: float = 1e-5
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0  # > 0: stop after this many optimizer steps
    seed: int = 42
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    eval_every: int = 0
    keep_checkpoints: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the device computes it natively
    activation_checkpointing: bool = False  # recompute each transformer block in the backward pass
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on lora_targets; the base stays frozen
    lora_alpha: float = 16.0  # adapter output scale alpha / rank
    lora_dropout: float = 0.0
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"


def bf16_native(device: torch.device) -> bool:
    """Whether this device computes bfloat16 natively (elsewhere it is emulated, slower than float32)."""
    if device.type == "cuda":  # Ampere and later (older GPUs only emulate it)
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (RuntimeError, AttributeError):
        return False
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512-BF16 / AMX, Arm's BF16 extension


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if name not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {name!r}")
    return name


def compute_context(precision: str, device: torch.device):
    """Where forward passes run: autocast to bfloat16 for "bf16" (the weights stay float32), nothing for "fp32"."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def backbone_dtype(config: "TrainConfig", device: torch.device) -> torch.dtype:
    """The dtype to load a trained backbone in: float32 (the weights the optimizer updates), or under LoRA, where the
    base is frozen, the compute dtype (half the memory; autocast would round it to bfloat16 for every matmul anyway)."""
    if config.lora_rank > 0 and resolve_precision(config.precision, device) == "bf16":
        return torch.bfloat16
    return torch.float32


def add_lora(model: Transformer, config: "TrainConfig", base_dir: str) -> Transformer:
    """The training config's LoRA adapters on `model` (nothing when lora_rank is 0)."""
    if config.lora_rank > 0:
        lora.apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets,
                        seed=config.seed, base_dir=base_dir)
    return model


def _shard_flags(module: torch.nn.Module) -> dict[str, bool]:
    """name -> whether the parameter is split across model-parallel ranks (False: replicated on every rank), for the
    parameters of every Transformer inside the module (a task's heads are replicated)."""
    flags = {name: False for name, _ in module.named_parameters()}
    for prefix, sub in module.named_modules():
        if isinstance(sub, Transformer):
            for name, _ in sub.named_parameters():
                dim = lora.split_dim(name) if lora.is_adapter_key(name) else split_dim(name, sub.args)
                flags[f"{prefix}.{name}" if prefix else name] = dim is not None
    return flags


def parse_task_args(parser, task_options) -> tuple:
    """The command line every trainer shares: --config YAML, --resume, and one flag per option of the layout
    (model_parallel_size; dtype: of the frozen models besides the trained one, such as PPO's reward model; the trained
    weights are float32, computed in `precision`), of TrainConfig and of the task's options.
    Returns (args, Layout, TrainConfig, task options)."""
    parser.add_argument("--config", help="YAML with training and task options (every key is also a flag)")
    parser.add_argument("--resume", action="store_true", help="continue from <output_dir>/latest")
    return parse_config(parser, cli.Layout, TrainConfig, task_options)


class Trainer:
    def __init__(self, module: torch.nn.Module, backbone: Transformer, examples: Optional[list],
                 collate: Optional[Callable], loss: Callable, config: TrainConfig, info: DistInfo,
                 evaluate: Optional[Callable[[], dict]] = None, task: str = "train",
                 save_extra: Optional[Callable[[str], None]] = None, load_extra: Optional[Callable[[str], None]] = None,
                 head_prefixes: Optional[tuple[str, ...]] = None, tokenizer=None):
        """The backbone is `module.model` (or `module` itself); the other parameters of `module` are its heads, saved
        in head.pth (or only those under `head_prefixes`). save_extra(dir) / load_extra(dir): a task's own state
        (PPO: the value model, the KL controller), written into the checkpoint directory by every rank before it is
        made final, and read back on resume. `tokenizer`: a checkpoint's own tokenizer is copied into every checkpoint
        (so that a trained checkpoint directory is all the next command needs). A task that makes its own data as it
        trains (PPO) passes no examples or collate and runs its own iterations (see fit)."""
        examples = examples if examples is not None else []
        self.head_prefixes = head_prefixes
        self.tokenizer_dir = tokenizer_home(tokenizer) if tokenizer is not None else None
        self.module, self.backbone, self.examples, self.collate, self.loss_fn = module, backbone, examples, collate, loss
        self.cfg, self.info, self.evaluate, self.task = config, info, evaluate, task
        self.save_extra, self.load_extra = save_extra, load_extra
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = AdamW([(decay, config.weight_decay), (no_decay, 0.0)],
                               betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
        per_step = config.micro_batch_size * config.grad_accum * info.data_parallel_size
        self.steps_per_epoch = max(1, math.ceil(len(examples) / per_step))
        total = math.ceil(self.steps_per_epoch * config.epochs)
        self.total_steps = min(total, config.max_steps) if config.max_steps > 0 else total
        self.warmup_steps = int(config.warmup_ratio * self.total_steps)
        self.step = 0  # optimizer steps taken
        self.iteration = 0  # logged iterations: one optimizer step each, or one of a task's own iterations (fit)
        self.records: list[dict] = []  # the metrics records of this process's fit
        self.sharded = _shard_flags(module)
        self.precision = resolve_precision(config.precision, info.device)
        for sub in module.modules():
            if isinstance(sub, Transformer):
                sub.activation_checkpointing = config.activation_checkpointing

    def autocast(self):
        """The compute context of this run's precision (tasks use it for forward passes outside `update` too, e.g.
        PPO's rollout log-probs, so that they match the ones the loss recomputes)."""
        return compute_context(self.precision, self.info.device)

    def set_total_steps(self, total: int) -> None:
        """For tasks that count their own optimizer steps (PPO): the schedule's length, warmup included."""
        self.total_steps, self.warmup_steps = total, int(self.cfg.warmup_ratio * total)

    def lr_factor(self, step: int) -> float:
        """Linear warmup to 1, then cosine decay to min_lr_ratio at the last step."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.cfg.min_lr_ratio + (1 - self.cfg.min_lr_ratio) * cosine

    # ---- data ---------------------------------------------------------------------------------------------------
    def step_examples(self, step: int) -> list[list]:
        """This replica's micro-batches for optimizer step `step` (a pure function of the step: resume needs no
        iterator state)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng(self.cfg.seed + epoch).permutation(len(self.examples))
        per_step = self.cfg.micro_batch_size * self.cfg.grad_accum * self.info.data_parallel_size
        chunk = order[index * per_step:(index + 1) * per_step]
        mine = chunk[self.info.data_parallel_rank::self.info.data_parallel_size]
        mb = self.cfg.micro_batch_size
        return [[self.examples[i] for i in mine[j:j + mb]] for j in range(0, len(mine), mb)]

    # ---- one optimizer step ---------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        return self.update(self.step_examples(self.step))

    def update(self, micro_batches: list[list], collate: Optional[Callable] = None) -> dict:
        """One optimizer step over this replica's micro-batches, each made into a batch by `collate` (default: the
        task's). PPO calls it once per minibatch of its rollouts, collating rows of the rollout batch."""
        collate = collate or self.collate
        self.module.train()
        n_local = sum(len(b) for b in micro_batches)
        n_global = self._all_sum(float(n_local))
        totals: dict[str, float] = {"tokens": 0.0}
        for examples in micro_batches:
            batch = collate(examples)
            with self.autocast():
                loss, metrics = self.loss_fn(self.module, batch)
            # each example weighs the same however the step is split into replicas and micro-batches: the replicas'
            # gradients are summed, so each scales its share by its examples over the global count
            (loss * len(examples) / n_global).backward()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value) * len(examples)
            totals["tokens"] += batch.get("num_tokens", 0)
        self._average_gradients()
        grad_norm = self._clip_gradients()
        lr = self.cfg.lr * self.lr_factor(self.step)  # the schedule is a function of the step
        self.optimizer.step(lr)
        self.optimizer.zero_grad()
        self.step += 1
        sums = self._sum_metrics(totals)  # one gather for every metric and the token count
        tokens = sums.pop("tokens")
        out = {key: value / n_global for key, value in sums.items()}
        out.update(grad_norm=grad_norm, lr=lr, tokens=tokens)
        return out

    def _all_sum(self, value: float) -> float:
        if self.info.data_parallel_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.info.device)
        dist.all_reduce(t, group=fs_init.get_data_parallel_group())
        return float(t)

    def _sum_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Metric sums over the replicas (a replica without examples this step has no keys, so gather the dicts)."""
        if self.info.data_parallel_size == 1:
            return totals
        gathered = [None] * self.info.data_parallel_size
        dist.all_gather_object(gathered, totals, group=fs_init.get_data_parallel_group())
        summed: dict[str, float] = {}
        for part in gathered:
            for key, value in part.items():
                summed[key] = summed.get(key, 0.0) + value
        return summed

    def _average_gradients(self) -> None:
        if self.info.data_parallel_size == 1:
            return
        group = fs_init.get_data_parallel_group()
        for param in self.module.parameters():
            if param.requires_grad:
                if param.grad is None:  # a replica with no examples this step still joins every all-reduce
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad, group=group)  # losses were pre-scaled: the sum is the average

    def _clip_gradients(self) -> float:
        """Clip to cfg.grad_clip on the norm of the whole (unsharded) gradient; returns that norm.

        Each tensor's norm in one fused pass (float32 accumulation, as torch's clip_grad_norm_), their squares summed
        in float64: a float64 copy of every gradient cost 1-2 s a step at SmolLM2's size (bench_train)."""
        grads = {True: [], False: []}
        for name, param in self.module.named_parameters():
            if param.grad is not None:
                grads[self.sharded[name]].append(param.grad.detach())
        sharded_sq, replicated_sq = (torch.stack(torch._foreach_norm(g)).double().pow(2).sum() if g else
                                     torch.zeros((), dtype=torch.float64, device=self.info.device)
                                     for g in (grads[True], grads[False]))
        if self.info.model_parallel_size > 1:
            dist.all_reduce(sharded_sq, group=fs_init.get_model_parallel_group())
        norm = float((sharded_sq + replicated_sq).sqrt())
        if self.cfg.grad_clip > 0 and norm > self.cfg.grad_clip:
            torch._foreach_mul_(grads[True] + grads[False], self.cfg.grad_clip / (norm + 1e-6))
        return norm

    # ---- the loop -------------------------------------------------------------------------------------------------
    def run(self, options: dict, what: str, resume: bool = False, iteration: Optional[Callable[[], dict]] = None,
            iterations: Optional[int] = None) -> dict:
        """What every trainer's command does: record the run's options in <output_dir>/config.json, announce it, fit,
        and report the last step's metrics (rank 0 prints)."""
        if self.info.is_main:
            write_json_atomic(os.path.join(self.cfg.output_dir, "config.json"),
                              {"train": asdict(self.cfg), "precision": self.precision, **options})
            count = f"{iterations} iterations of {self.total_steps} optimizer steps" if iteration else \
                f"{self.total_steps} steps"
            print(f"[{self.task}] {what}; {count}, precision {self.precision}", flush=True)
        final = self.fit(resume=resume, iteration=iteration, iterations=iterations)
        if self.info.is_main:
            print(f"[{self.task}] done: {json.dumps(final)}", flush=True)
        return final

    def fit(self, resume: bool = False, iteration: Optional[Callable[[], dict]] = None,
            iterations: Optional[int] = None) -> dict:
        """Run iterations to the end, logging, evaluating and saving on their count; resume from the latest checkpoint.

        An iteration is one optimizer step on the task's examples, or, with `iteration`, a task's own unit run
        `iterations` times (PPO: rollouts, scores, advantages, then its optimizer steps through `update`); it
        returns the metrics of its record (a "tokens" count gives tokens_per_s). What it must carry over a resume
        beyond the weights, optimizer and iteration count goes through save_extra/load_extra."""
        if resume:
            self.load_latest()
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        metrics_file = os.path.join(self.cfg.output_dir, "metrics.jsonl")
        if self.info.is_main:
            keep_steps_upto(metrics_file, self.iteration)
        barrier()  # every rank reads the file as rank 0 left it
        total = iterations if iteration else self.total_steps
        progress = Progress(total - self.iteration, self.task, "steps", every=10.0)
        # a run resumed from its final checkpoint has nothing left to do: its last record is the one logged
        last = next((r for r in reversed(read_jsonl(metrics_file)) if r.get("step") == self.iteration), {}) \
            if self.iteration >= total and os.path.exists(metrics_file) else {}
        window_tokens, window_start = 0.0, time.perf_counter()
        while self.iteration < total:
            last = iteration() if iteration else self.train_step()
            self.iteration += 1
            window_tokens += last.pop("tokens", 0)
            progress.update(1)
            record = {"step": self.iteration, **({} if iteration else {
                "epoch": round(self.step / self.steps_per_epoch, 4)}), **last, "precision": self.precision}
            if self.cfg.log_every and self.iteration % self.cfg.log_every == 0:
                now = time.perf_counter()
                record["tokens_per_s"] = round(window_tokens / max(now - window_start, 1e-9), 1)
                window_tokens, window_start = 0.0, now
            if self.evaluate and self.cfg.eval_every and self.iteration % self.cfg.eval_every == 0:
                record.update({f"eval/{k}": v for k, v in self.evaluate().items()})
            if self.info.is_main and (self.cfg.log_every and self.iteration % self.cfg.log_every == 0 or
                                      self.iteration == total):
                append_jsonl(metrics_file, [record])
            self.records.append(record)
            if self.cfg.save_every and self.iteration % self.cfg.save_every == 0 and self.iteration < total:
                self.save()
            last = record
        self.save()
        return last

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def heads(self, state: dict) -> dict:
        if self.module is self.backbone:
            return {}
        if self.head_prefixes is not None:
            return {k: v for k, v in state.items() if k.startswith(self.head_prefixes)}
        return {k: v for k, v in state.items() if not k.startswith("model.")}

    def save(self) -> str:
        """checkpoint-<step>/: Meta-layout shards + params.json (with LoRA: the adapters + adapter_config.json, see
        llama_mp/lora.py), head.pth, trainer_state.NN.pth (per model-parallel rank). Written under a .tmp name and
        renamed by rank 0 once every rank has written."""
        final = os.path.join(self.cfg.output_dir, f"checkpoint-{self.step}")
        if os.path.isdir(final):  # this step is saved already (e.g. a finished run resumed): keep the complete one
            return final
        tmp = final + ".tmp"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        mp_rank = self.info.model_parallel_rank
        if self.info.data_parallel_rank == 0:
            if lora.has_adapters(self.backbone):  # the base is frozen: its checkpoint is the pointer
                lora.save_adapters(tmp, mp_rank, self.backbone)
            else:
                save_shard(tmp, mp_rank, self.backbone.state_dict(), self.backbone.args)
            head = self.heads(self.module.state_dict())
            # Data order is a function of (seed, step), so the step is the data position; torch's RNG covers the rest.
            state = {"step": self.step, "iteration": self.iteration, "optimizer": self.optimizer.state_dict(),
                     "torch_rng": torch.get_rng_state(), "config": asdict(self.cfg),
                     "data_parallel_size": self.info.data_parallel_size, "num_examples": len(self.examples)}
            torch.save(state, os.path.join(tmp, f"trainer_state.{mp_rank:02d}.pth"))
            if mp_rank == 0:
                torch.save(head, os.path.join(tmp, "head.pth"))
                if self.tokenizer_dir:
                    copy_tokenizer_files(self.tokenizer_dir, tmp)
                if not lora.has_adapters(self.backbone):
                    save_params(tmp, self.backbone.args)
        if self.save_extra:
            self.save_extra(tmp)
        barrier()
        if self.info.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_latest(self.cfg.output_dir, final)
            if self.cfg.keep_checkpoints > 0:  # 0 keeps every checkpoint
                for old in sorted(glob.glob(os.path.join(self.cfg.output_dir, "checkpoint-*[0-9]")),
                                  key=lambda p: int(p.rsplit("-", 1)[1]))[:-self.cfg.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load_latest(self) -> bool:
        ckpt = latest_checkpoint(self.cfg.output_dir)
        if ckpt is None:
            return False
        if lora.has_adapters(self.backbone):
            lora.load_adapters(self.backbone, ckpt, self.info.model_parallel_size, self.info.model_parallel_rank)
        else:
            load_weights(self.backbone, ckpt, self.info.model_parallel_size, self.info.model_parallel_rank)
        head = torch.load(os.path.join(ckpt, "head.pth"), map_location=self.info.device, weights_only=True)
        result = self.module.load_state_dict(head, strict=False)
        missing = sorted(set(self.heads(self.module.state_dict())) - set(head))
        if missing or result.unexpected_keys:
            raise ValueError(f"{ckpt}/head.pth: does not match this task's heads "
                             f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        state_file = os.path.join(ckpt, f"trainer_state.{self.info.model_parallel_rank:02d}.pth")
        if not os.path.exists(state_file):
            raise ValueError(f"{ckpt}: no trainer state for model-parallel rank {self.info.model_parallel_rank} "
                             f"(resuming needs the model-parallel size the run was saved with)")
        state = torch.load(state_file, map_location=self.info.device, weights_only=True)
        # The data position is the step number: it only means the same examples under the same batching and order.
        now = {**asdict(self.cfg), "data_parallel_size": self.info.data_parallel_size,
               "num_examples": len(self.examples)}
        then = {**asdict(TrainConfig()), **state["config"],  # (older checkpoints lack the newer keys: defaults)
                "data_parallel_size": state["data_parallel_size"], "num_examples": state["num_examples"]}
        changed = [k for k in ("micro_batch_size", "grad_accum", "seed", "epochs", "max_steps", "data_parallel_size",
                               "num_examples", "lora_rank", "lora_targets") if now[k] != then[k]]
        if changed:
            raise ValueError(f"{ckpt}: cannot resume with different {', '.join(changed)} "
                             f"({', '.join(f'{then[k]} -> {now[k]}' for k in changed)})")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:
            raise ValueError(f"{state_file}: {err}") from None
        self.step = state["step"]
        self.iteration = state.get("iteration", state["step"])  # (checkpoints before iterations: one per step)
        torch.set_rng_state(state["torch_rng"])
        if self.load_extra:
            self.load_extra(ckpt)
        if self.info.is_main:
            print(f"[{self.task}] resumed from {ckpt} at step {self.iteration}", flush=True)
        return True
