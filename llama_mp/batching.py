"""Right-padded token batches, the one way every step builds them, and the log-probs read from them.

Right padding is exact under causal attention: a real token never attends to the pads after it, so a row's results do
not depend on its batch-mates."""

import torch
import torch.nn.functional as F


def right_pad(sequences: list[list[int]], device, width: int = 0) -> torch.Tensor:
    """Token ids [B, max(width, longest)], each row left-aligned, padded with 0."""
    width = max(width, max(len(s) for s in sequences))
    tokens = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
    return tokens


def last_positions(sequences: list[list[int]], device) -> torch.Tensor:
    """Each row's last real position (where a scalar head reads)."""
    return torch.tensor([len(s) - 1 for s in sequences], device=device)


def prompt_response_batch(pairs: list[tuple[list[int], list[int]]], device) -> dict:
    """{"tokens" [B, T], "mask" [B, T] = 1 on response tokens, "num_tokens"} for (prompt ids, response ids) rows."""
    tokens = right_pad([list(p) + list(r) for p, r in pairs], device)
    mask = torch.zeros(tokens.shape, device=device)
    for row, (prompt, response) in enumerate(pairs):
        mask[row, len(prompt):len(prompt) + len(response)] = 1.0
    return {"tokens": tokens, "mask": mask, "num_tokens": sum(len(p) + len(r) for p, r in pairs)}


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1: [B, T - 1], from logits [B, T, V] (position t - 1 predicts t)."""
    logp = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return logp.view(tokens.shape[0], -1)
