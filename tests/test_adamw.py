"""llama_mp/adamw.py against torch.optim.AdamW, an independent implementation of the same update."""

import torch

from llama_mp.adamw import AdamW


def make_params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g, requires_grad=True), torch.randn(3, generator=g, requires_grad=True),
            torch.randn(2, 4, 4, generator=g, requires_grad=True)]


def test_updates_equal_torch_adamw_with_decay_groups_and_a_changing_rate():
    ours, theirs = make_params(0), make_params(0)
    mine = AdamW([(ours[::2], 0.1), (ours[1:2], 0.0)], betas=(0.9, 0.95), eps=1e-8)
    reference = torch.optim.AdamW([{"params": theirs[::2], "weight_decay": 0.1},
                                   {"params": theirs[1:2], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        lr = 1e-2 * (step + 1) / 6  # a schedule: the rate changes every step
        for group in reference.param_groups:
            group["lr"] = lr
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, grad in zip(ours, theirs, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        if step == 3:  # a parameter without a gradient this step is left alone by both
            ours[1].grad = theirs[1].grad = None
        mine.step(lr)
        reference.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q), step  # same arithmetic in the same order: equal, not merely close


def test_state_round_trips_and_a_torch_state_loads():
    params = make_params(2)
    opt = AdamW([(params, 0.01)])
    reference_params = make_params(2)
    reference = torch.optim.AdamW(reference_params, lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        for p, q in zip(params, reference_params):
            p.grad = q.grad = torch.ones_like(p)
        opt.step(1e-3)
        reference.step()
    copy = AdamW([(make_params(2), 0.01)])
    copy.load_state_dict(opt.state_dict())
    from_torch = AdamW([(make_params(2), 0.01)])
    from_torch.load_state_dict(reference.state_dict())  # a checkpoint written with torch.optim.AdamW resumes
    for other in (copy, from_torch):
        assert other.t == [3, 3, 3]
        assert all(torch.equal(a, b) for a, b in zip(other.m + other.v, opt.m + opt.v))
