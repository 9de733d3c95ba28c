"""The principle-following reward model: a LLaMA backbone and a scalar head read at the prompt's last real token.

The input is `salmon_reward_model_prompt_v0.txt` (v1 at RL time) filled with the response, the instruction and the
principles as `- {definition}` lines; the reward is the head applied to the final hidden state of the last token (the
"is" of "The quality of the output is"). Sequences are right-padded, so the read position never moves with padding.
The instruction is cut from the left to `query_len` tokens and the response from the right to `response_len`.
"""

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama_mp.batching import last_positions, right_pad
from llama_mp.lora import load_model
from llama_mp.model import Transformer
from llama_mp.tokenizer import Tokenizer

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_RM_PROMPT = os.path.join(DATA, "salmon/salmon_reward_model_prompt_v0.txt")


class RewardModel(nn.Module):
    def __init__(self, model: Transformer, head_std: Optional[float] = None, head_seed: int = 0):
        super().__init__()
        self.model = model
        dim = model.args.dim
        self.head = nn.Linear(dim, 1, device=next(model.parameters()).device, dtype=torch.float32)
        # N(0, 1/sqrt(d + 1)), bias 0 (the "implementation details" reward-head init), from a fixed generator: every
        # rank, data-parallel replicas included, must start from the same head
        generator = torch.Generator().manual_seed(head_seed)
        std = head_std if head_std is not None else 1 / (dim + 1) ** 0.5
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, dim, generator=generator) * std)
            self.head.bias.zero_()

    def forward(self, tokens: torch.Tensor, read_positions: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] right-padded, read_positions [B] (index of each row's last real token) -> rewards [B].
        The backbone's final hidden states only: the LM head never runs."""
        hidden = self.model(tokens, return_hidden=True)
        return self.scalar(hidden[torch.arange(tokens.shape[0], device=tokens.device), read_positions])

    def scalar(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on final hidden states [..., dim] -> [...], in float32 even under autocast (a reward is one number
        per sequence, and the losses compare small differences of them)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden.float()).squeeze(-1)


def load_reward_model(ckpt_dir: str, model_parallel_size: int = 1, model_parallel_rank: int = 0,
                      max_seq_len: Optional[int] = None, device="cpu", dtype=torch.float32,
                      head_file: Optional[str] = None) -> RewardModel:
    """A backbone from a Meta-layout (or LoRA adapter) checkpoint; the head from `head_file` (default:
    ckpt_dir/head.pth, if present)."""
    model = load_model(ckpt_dir, model_parallel_size, model_parallel_rank, max_seq_len, device=device, dtype=dtype)
    rm = RewardModel(model)
    head_file = head_file or os.path.join(ckpt_dir, "head.pth")
    if os.path.exists(head_file):
        load_head(rm, head_file)
    return rm


HEAD_KEYS = {"head.weight", "head.bias"}


def save_head(rm: RewardModel, head_file: str) -> None:
    torch.save({k: v.detach() for k, v in rm.state_dict().items() if k in HEAD_KEYS}, head_file)


def load_head(rm: RewardModel, head_file: str) -> None:
    """A scalar head (a reward model's, or PPO's value model's) from head.pth, its keys and shapes checked."""
    state = torch.load(head_file, map_location=next(rm.parameters()).device, weights_only=True)
    if set(state) != HEAD_KEYS:
        raise ValueError(f"{head_file}: expected head.weight and head.bias, got {sorted(state)}")
    try:
        rm.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{head_file}: not a reward head for this model ({str(err).splitlines()[0]})") from None


PLACEHOLDERS = ("{Output}", "{Input}", "{Dimensions}")


def read_template(path: str) -> str:
    """A reward-model prompt template file, checked: a missing file or placeholder is an error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: reward-model prompt template not found")
    with open(path, encoding="utf-8") as f:
        template = f.read()
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise ValueError(f"{path}: reward-model prompt template lacks {missing[0]}")
    return template


@dataclass
class PromptBuilder:
    """Token sequences for (instruction, response, principles), with the reference's truncation."""

    tokenizer: Tokenizer
    template: str
    query_len: int = 128
    response_len: int = 768

    def __post_init__(self):
        for placeholder in PLACEHOLDERS:
            if placeholder not in self.template:
                raise ValueError(f"reward-model prompt template lacks {placeholder}")

    def text(self, instruction: str, response: str, principles: list[str]) -> str:
        ids = self.tokenizer.encode(instruction, bos=False, eos=False)
        if len(ids) > self.query_len:  # keep the end of the instruction: that is where the question is
            instruction = self.tokenizer.decode(ids[-self.query_len:])
        ids = self.tokenizer.encode(response, bos=False, eos=False)
        if len(ids) > self.response_len:
            response = self.tokenizer.decode(ids[:self.response_len])
        dimensions = "\n".join(f"- {p}" for p in principles)
        head, rest = self.template.split("{Output}", 1)  # plain replacement in order: texts may contain braces
        middle, tail = rest.split("{Input}", 1)
        before, after = tail.split("{Dimensions}", 1)
        return head + response + middle + instruction + before + dimensions + after

    def encode(self, instruction: str, response: str, principles: list[str]) -> list[int]:
        return self.tokenizer.encode(self.text(instruction, response, principles), bos=True, eos=False)


def pad_batch(sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T] and each row's last real position [B] (where the head reads)."""
    return right_pad(sequences, device), last_positions(sequences, device)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None):
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin), averaged; plus accuracy and mean margin."""
    diff = chosen - rejected
    loss = -F.logsigmoid(diff - (margin if margin is not None else 0.0)).mean()
    diff = diff.detach()
    return loss, {"loss": float(loss.detach()), "accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}


class RewardScorer:
    def __init__(self, rm: RewardModel, builder: PromptBuilder, batch_size: int = 8):
        self.rm, self.builder, self.batch_size = rm.eval(), builder, batch_size

    @torch.no_grad()
    def score(self, instructions: list[str], responses: list[str], principles: list[list[str]]) -> torch.Tensor:
        """Rewards [N] (float32, CPU), read at each prompt's last token."""
        seqs = [self.builder.encode(i, r, p) for i, r, p in zip(instructions, responses, principles)]
        device = next(self.rm.parameters()).device
        out = []
        for start in range(0, len(seqs), self.batch_size):
            tokens, positions = pad_batch(seqs[start:start + self.batch_size], device)
            out.append(self.rm(tokens, positions).float().cpu())
        return torch.cat(out) if out else torch.empty(0)
