"""PPO's formulas, named as in the papers (Schulman et al. 2017; Ziegler et al. 2019; "the N implementation details").

All tensors are [batch, response length] with `mask` = 1 on real response tokens.
"""

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, group=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (without the shift: only scaled, as for rewards). With a process
    `group` (the data-parallel replicas) the statistics are those of all replicas' entries together."""
    sums = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
    count = sums[2].clamp(min=1)
    mean = (sums[0] / count).to(x.dtype)
    var = (sums[1] / count - (sums[0] / count) ** 2).clamp(min=0).to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def shaped_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float, kl_clamp_min: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * kl_t with kl_t = log pi - log pi_ref (k1; clamped at 0 like the reference if asked), plus the
    sequence score at each row's last real token. Returns (rewards, kl)."""
    kl = (logp - ref_logp) * mask
    if kl_clamp_min:
        kl = kl.clamp(min=0.0)
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(score)), last] += score
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}
    (V and A are 0 past a row's last real token); returns R_t = A_t + V_t."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(log pi - log pi_old)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        approx_kl = 0.5 * masked_mean((logp - old_logp) ** 2, mask)
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, {"policy_loss": float(loss.detach()), "approx_kl": float(approx_kl), "clipfrac": float(clipfrac)}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict]:
    """0.5 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > plain).float(), mask)
    return loss, {"value_loss": float(loss.detach()), "value_clipfrac": float(clipfrac)}


class KLController:
    """Fixed beta, or Ziegler's adaptive one: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta (1 + e n / horizon)."""

    def __init__(self, init: float, target: float = 0.0, horizon: float = 10000.0):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
