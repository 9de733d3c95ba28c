"""Right-padded token batches, the one way every step builds them (their log-probs: llama_mp/logprobs.py).

Right padding is exact under causal attention: a real token never attends to the pads after it, so a row's results do
not depend on its batch-mates (in float32; under bf16 autocast the padded width changes some roundings)."""

import torch


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
