"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), the training loop's optimizer.

For each parameter theta with gradient g, at step t = 1, 2, ... and learning rate lr:

    theta <- theta * (1 - lr * lambda)                          decoupled weight decay (lambda: 0 for biases, norms)
    m     <- beta1 * m + (1 - beta1) * g                          first moment
    v     <- beta2 * v + (1 - beta2) * g^2                        second moment
    theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The same arithmetic, in the same order, as torch.optim.AdamW (tests/test_adamw.py compares them), written here so that the formulas are in view and a training process does not pay torch.optim's start-up
(its first step imports torch._dynamo: ~1.8 s per process on these CPUs). The learning rate is the caller's, per step.
"""

import torch


class AdamW:
    def __init__(self, groups: list[tuple[list[torch.Tensor], float]], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        """groups: (parameters, weight decay lambda) pairs."""
        self.groups = [(list(params), float(decay)) for params, decay in groups]
        self.params = [p for params, _ in self.groups for p in params]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.t = [0] * len(self.params)  # steps taken by each parameter (one without a gradient waits)
        self.m = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.v = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One update of every parameter that has a gradient (t counts each parameter's own updates)."""
        i = 0
        for params, decay in self.groups:
            index = [i + k for k, p in enumerate(params) if p.grad is not None]
            i += len(params)
            if not index:
                continue
            for j in index:
                self.t[j] += 1
            theta = [self.params[j] for j in index]
            grads = [p.grad for p in theta]
            m, v = [self.m[j] for j in index], [self.v[j] for j in index]
            if decay != 0.0:
                torch._foreach_mul_(theta, 1 - lr * decay)
            torch._foreach_lerp_(m, grads, 1 - self.beta1)
            torch._foreach_mul_(v, self.beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - self.beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [(1 - self.beta2 ** self.t[j]) ** 0.5 for j in index])
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(theta, m, denom, [-(lr / (1 - self.beta1 ** self.t[j])) for j in index])

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        if "state" in state and "param_groups" in state:  # a torch.optim.AdamW state (checkpoints before this file)
            moments = [state["state"].get(i, {}) for i in range(len(self.params))]
            state = {"t": [int(s.get("step", 0)) for s in moments],
                     "m": [s.get("exp_avg", torch.zeros_like(p)) for s, p in zip(moments, self.params)],
                     "v": [s.get("exp_avg_sq", torch.zeros_like(p)) for s, p in zip(moments, self.params)]}
        if len(state["m"]) != len(self.params) or any(a.shape != p.shape for a, p in zip(state["m"], self.params)):
            raise ValueError("optimizer state does not match the trained parameters")
        self.t = [int(t) for t in state["t"]]
        for mine, saved in zip(self.m + self.v, list(state["m"]) + list(state["v"])):
            mine.copy_(saved)
