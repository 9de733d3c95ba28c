"""Direct preference optimisation: the losses and the summed response log-probs they compare.

With z = (log pi(y_c|x) - log pi(y_r|x)) - (log ref(y_c|x) - log ref(y_r|x)), log-probs summed over response tokens:
  sigmoid (DPO):          -log sigmoid(beta z)
  cDPO (label_smoothing): -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)
  IPO:                    (z - 1 / (2 beta))^2
Implicit rewards: beta (log pi - log ref) for the chosen and the rejected response.
"""

import torch
import torch.nn.functional as F

from llama_mp import logprobs


def response_logprobs(model, tokens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum over response tokens of log p(token | prefix), per row [B]: tokens [B, T]; response_mask [B, T] marks the
    response tokens. Only the positions that predict them reach the LM head (llama_mp/logprobs.py)."""
    rows, logp = logprobs.response_logprobs(model, tokens, response_mask)
    return torch.zeros(tokens.shape[0], device=logp.device).index_add(0, rows, logp)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict]:
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (sigmoid or ipo)")
    chosen_reward = (beta * (policy_chosen - ref_chosen)).detach()
    rejected_reward = (beta * (policy_rejected - ref_rejected)).detach()
    loss = losses.mean()
    return loss, {"loss": float(loss.detach()), "rewards/chosen": float(chosen_reward.mean()),
                  "rewards/rejected": float(rejected_reward.mean()),
                  "rewards/accuracy": float((chosen_reward > rejected_reward).float().mean()),
                  "rewards/margin": float((chosen_reward - rejected_reward).mean())}
