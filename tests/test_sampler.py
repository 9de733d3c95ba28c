"""The KV-cache sampler: ragged batches, stopping, log-probs, scoring, truncation, sampling distribution."""

import pytest
import torch

from conftest import STORIES_REFERENCE
from llama_mp.checkpoint import load_model
from llama_mp.sampler import PromptTooLongError, Sampler, sample_next

PROMPTS = ["Once upon a time", "Tom had a big red", "The", "Lily and her mom went to the park to play. They saw"]


@pytest.fixture
def sampler(world1, stories_dir, tokenizer):
    return Sampler(load_model(stories_dir), tokenizer, max_batch_size=8)


def test_ragged_batch_equals_each_prompt_alone(sampler):
    batched = sampler.generate(PROMPTS, 40, temperature=0.0)
    for prompt, together in zip(PROMPTS, batched):
        alone = sampler.generate([prompt], 40, temperature=0.0)[0]
        assert together.tokens == alone.tokens and together.text == alone.text
        torch.testing.assert_close(torch.tensor(together.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)


def test_micro_batches_keep_input_order(sampler, world1):
    small = Sampler(sampler.model, sampler.tokenizer, max_batch_size=2)
    many = PROMPTS + ["A cat", "Sam"]
    assert [c.tokens for c in small.generate(many, 12)] == [c.tokens for c in sampler.generate(many, 12)]


def test_stop_string_ends_its_row_only(sampler):
    # The greedy story says "...a little girl named Lily."; only the first prompt reaches "Lily" within 20 tokens.
    first, second = sampler.generate(["Once upon a time", "The sun"], 20, temperature=0.0, stop=["Lily"])
    assert first.finish_reason == "stop"
    assert first.text == ", there was a little girl named "
    assert sampler.tokenizer.decode_continuation(first.tokens).endswith("Lily")  # the stop's tokens are kept
    assert len(first.logprobs) == len(first.tokens)
    assert second.finish_reason == "length" and len(second.tokens) == 20 and "Lily" not in second.text


def test_stop_string_with_a_leading_space_right_at_the_start(sampler):
    # greedy after "Once upon a time," the story goes on " there was a little girl"
    out = sampler.generate(["Once upon a time,"], 20, temperature=0.0, stop=[" there"])[0]
    assert out.finish_reason == "stop" and out.text == ""


def test_eos_rows_finish_independently(sampler):
    prompts = ["Once upon a time", "Tom had a big red"]
    references = sampler.generate(prompts, 30, temperature=0.0)
    eos_token = references[0].tokens[5]  # pretend this token is EOS: row 0 meets it at step 6
    assert eos_token not in references[1].tokens
    sampler.tokenizer.eos_id = eos_token
    try:
        out = sampler.generate(prompts, 30, temperature=0.0)
    finally:
        sampler.tokenizer.eos_id = 2
    assert out[0].finish_reason == "eos" and out[0].tokens == references[0].tokens[:6]
    assert out[1].finish_reason == "length" and out[1].tokens == references[1].tokens


def test_eos_ends_its_row_and_all_finished_exits_early(sampler):
    reference = sampler.generate(["Once upon a time"], 60, temperature=0.0)[0]
    eos_token = reference.tokens[9]  # pretend the 10th greedy token is EOS
    assert eos_token not in reference.tokens[:9]
    sampler.tokenizer.eos_id = eos_token
    calls = []
    forward = sampler.model.forward
    sampler.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        out = sampler.generate(["Once upon a time", "Once upon a time"], 60, temperature=0.0)
    finally:
        sampler.tokenizer.eos_id = 2
        del sampler.model.forward
    for c in out:
        assert c.finish_reason == "eos" and c.tokens == reference.tokens[:10]
        assert c.text == sampler.tokenizer.decode_continuation(reference.tokens[:9])
    assert len(calls) == 10  # stopped when both rows finished, not after 60 steps


def test_teacher_forced_scores_equal_sampling_logprobs(sampler):
    samples = sampler.generate(PROMPTS, 30, temperature=0.7, top_p=0.9, seed=5)
    scores = sampler.score(PROMPTS, [c.tokens for c in samples], temperature=0.7)
    # float32 by two kernel orders (one full forward vs prefill + decode): the scaled logits reach |18 / 0.7| < 32,
    # whose float32 spacing is 2^-23 * 32 = 3.8e-6; allow 32 such steps (a wrong position moves a log-prob by ~0.1)
    for c, s in zip(samples, scores):
        torch.testing.assert_close(torch.tensor(s), torch.tensor(c.logprobs), atol=32 * 2 ** -23 * 32, rtol=0)


def test_score_and_next_token_logits_match_a_full_forward(sampler):
    ids = sampler.tokenizer.encode(STORIES_REFERENCE, bos=True, eos=False)
    with torch.no_grad():
        logp = torch.log_softmax(sampler.model(torch.tensor([ids]))[0], dim=-1)
    expected = [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]
    got = sampler.score([[ids[0]]], [ids[1:]])[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)
    prefixes = [ids[:5], ids[:17], ids[:9]]  # ragged: right padding must not leak into any row
    logits = sampler.next_token_logits(prefixes)
    for row, prefix in enumerate(prefixes):
        with torch.no_grad():
            alone = sampler.model(torch.tensor([prefix]))[0, -1]
        torch.testing.assert_close(logits[row], alone, atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible_and_varies_with_seed(sampler):
    a = sampler.generate(PROMPTS, 20, temperature=1.0, seed=11)
    b = sampler.generate(PROMPTS, 20, temperature=1.0, seed=11)
    c = sampler.generate(PROMPTS, 20, temperature=1.0, seed=12)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_too_long_prompt_is_refused_or_left_truncated(world1, stories_dir, tokenizer):
    sampler = Sampler(load_model(stories_dir, max_seq_len=32), tokenizer)
    long_prompt = list(range(3, 40))  # 37 tokens, no BOS
    with pytest.raises(PromptTooLongError, match="prompt 0 has 37 tokens, more than the 22"):
        sampler.generate([long_prompt], 10)
    ids = [1] + long_prompt
    out = sampler.generate([ids], 10, truncate="left")[0]
    assert out.truncated_prompt and out.prompt_tokens == 22
    expected = sampler.generate([[1] + ids[-21:]], 10)[0]  # BOS kept, then the last tokens that fit
    assert out.tokens == expected.tokens


def test_sample_next_follows_the_distribution_and_truncations():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, 1.0, 0, torch.rand(20000, generator=gen)), minlength=4) / 20000
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)
    # T = 0.5 squares and renormalises: [.25, .0625, .0225, .01] / .345
    counts = torch.bincount(sample_next(logits, 0.5, 1.0, 0, torch.rand(20000, generator=gen)), minlength=4) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.7246, 0.1812, 0.0652, 0.0290]), atol=0.015, rtol=0)
    # top-k 2 keeps {0, 1} -> [2/3, 1/3]; top-p 0.6 keeps {0, 1} too (mass before token 2 is 0.75 > 0.6)
    for k, p in [(2, 1.0), (0, 0.6)]:
        counts = torch.bincount(sample_next(logits, 1.0, p, k, torch.rand(20000, generator=gen)), minlength=4) / 20000
        torch.testing.assert_close(counts, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.015, rtol=0)
    assert sample_next(logits[:3], 0.0, 1.0, 0, None).tolist() == [0, 0, 0]


def full_sort_draw(logits, temperature, top_p, top_k, uniform):
    """The draw over the whole vocabulary sorted (what sample_next computes from its candidates): the nucleus
    and top-k truncation on the sorted probabilities, the inverse CDF at `uniform`."""
    probs, order = torch.softmax(logits / temperature, dim=-1).sort(dim=-1, descending=True)
    if top_k > 0:
        probs[:, top_k:] = 0.0
    if top_p < 1.0:
        probs[probs.cumsum(dim=-1) - probs > top_p] = 0.0
    cdf = probs.cumsum(dim=-1)
    choice = torch.searchsorted(cdf, uniform.to(cdf.dtype)[:, None] * cdf[:, -1:], right=True)[:, 0]
    return order.gather(-1, choice.clamp(max=cdf.shape[-1] - 1)[:, None])[:, 0], probs


@pytest.mark.parametrize("top_p, top_k", [(0.9, 0), (0.5, 0), (0.999, 0), (0.9, 1000), (1.0, 40)])
def test_sample_next_draws_what_the_whole_sorted_vocabulary_gives(top_p, top_k):
    """A 49,152-token vocabulary, rows from peaked (a nucleus of a few tokens) to flat (thousands: beyond the first
    candidates, so sample_next widens them), in float64 (no ties): the same token as the draw over the whole sorted
    vocabulary for every row and number; a number next to 1 still picks a kept token."""
    gen = torch.Generator().manual_seed(7)
    scale = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.01, 3.0] * 4, dtype=torch.float64)[:, None]
    logits = torch.randn(32, 49152, generator=gen, dtype=torch.float64) * scale
    for uniform in [torch.rand(32, generator=gen, dtype=torch.float64) for _ in range(3)]:
        expected, _ = full_sort_draw(logits, 0.7, top_p, top_k, uniform)
        assert torch.equal(sample_next(logits, 0.7, top_p, top_k, uniform), expected)
    # float32: a number within 2^-25 of 1 rounds to 1, and 1 x the kept mass is the last cumulative sum itself
    logits32, near_one = logits.float(), torch.full((32,), 1 - 2 ** -30, dtype=torch.float64)
    _, kept = full_sort_draw(logits32, 0.7, top_p, top_k, near_one)
    chosen = sample_next(logits32, 0.7, top_p, top_k, near_one)
    probs = torch.softmax(logits32 / 0.7, dim=-1).gather(-1, chosen[:, None])[:, 0]
    assert (probs >= kept.masked_fill(kept == 0, float("inf")).min(dim=-1).values).all()  # within the nucleus


def test_per_prompt_seeds_make_samples_independent_of_the_batch(sampler, world1):
    seeds = [101, 202, 303, 404]
    together = sampler.generate(PROMPTS, 25, temperature=1.0, seed=seeds)
    small = Sampler(sampler.model, sampler.tokenizer, max_batch_size=1)
    alone = [small.generate([p], 25, temperature=1.0, seed=[s])[0] for p, s in zip(PROMPTS, seeds)]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    reordered = sampler.generate(PROMPTS[::-1], 25, temperature=1.0, seed=seeds[::-1])
    assert [c.tokens for c in reordered[::-1]] == [c.tokens for c in together]


def test_shared_prefix_logits_equal_full_sequences(world1, stories_dir, tokenizer):
    # A float64 model: the two paths sum the same terms in different orders (a cached prefix vs one pass), which in
    # float32 differs by a few ulps of the ~15-magnitude logits (1.4e-5 seen once). In float64 the reorderings differ
    # by ~1e-13, far below a float32 ulp, so once both results are rounded to the float32 the sampler returns, they
    # differ by at most one float32 ulp of the value: |a - b| <= eps32 * |a|, whatever the rounding luck.
    sampler = Sampler(load_model(stories_dir, dtype=torch.float64), tokenizer, max_batch_size=2)  # 2 chunks per branch
    enc = lambda text: tokenizer.encode(text, bos=False, eos=False)  # noqa: E731
    prefix = [1] + enc("Once upon a time, there was a dog.")
    branches = [(enc(" The dog liked"), [enc(" to run"), enc(" cake and milk"), enc("!")]),
                ([], [enc(" A cat came by and said"), enc(" Tom")]),
                (enc(" Then it rained and the dog was very sad. It"), [enc(" cried")])]
    shared = sampler.next_token_logits_shared(prefix, branches)
    full = [prefix + middle + suffix for middle, suffixes in branches for suffix in suffixes]
    expected = sampler.next_token_logits(full)
    one_ulp = torch.finfo(torch.float32).eps * expected.abs() + 1e-12
    assert ((torch.cat(shared) - expected).abs() <= one_ulp).all()


def test_allowed_tokens_restrict_generation(sampler):
    digits = [sampler.tokenizer.piece_id(d) for d in "0123456789"]
    prompts = ["Once upon a time", "Tim had"]
    outs = sampler.generate(prompts, 12, temperature=1.0, seed=[3, 4], allowed_tokens=digits)
    assert all(t in digits for out in outs for t in out.tokens) and all(o.text.isdigit() for o in outs)
    # greedy under the restriction is the argmax over the allowed ids of an unrestricted forward pass
    greedy = sampler.generate(prompts[:1], 1, temperature=0.0, allowed_tokens=digits)[0].tokens[0]
    logits = sampler.next_token_logits(prompts[:1])[0]
    assert greedy == digits[int(logits[digits].argmax())]
    everything = list(range(sampler.tokenizer.n_words))
    free = sampler.generate(prompts, 12, temperature=1.0, seed=[3, 4])
    assert [o.tokens for o in sampler.generate(prompts, 12, temperature=1.0, seed=[3, 4], allowed_tokens=everything)] \
        == [o.tokens for o in free]


def test_judge_logits_of_a_bf16_model_come_from_a_float32_head(world1, stories_dir, tokenizer):
    # A bf16 head rounds logits to a few significant bits (steps of 0.125-0.25 at SmolLM2's magnitudes): a judge's
    # "a" against "b" would often tie. The head is applied in float32 to the bf16 model's hidden states.
    model = load_model(stories_dir, dtype=torch.bfloat16)
    sampler = Sampler(model, tokenizer, max_batch_size=2)
    heads = []  # the hidden states the sampler's head received, as the sampler computed them (a ragged batch)
    head = sampler.float32_logits
    sampler.float32_logits = lambda hidden: heads.append(hidden) or head(hidden)
    prompts = ["Once upon a time", "Tom had a big red"]
    logits = sampler.next_token_logits(prompts)
    assert logits.dtype == torch.float32 and len(heads) == 1 and heads[0].dtype == torch.bfloat16
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            hidden = heads[0][row].double()
            expected = hidden @ model.output.weight.double().T  # float64 head on the same hidden state
            # float32 products of bf16 numbers are exact; the 64-term float32 sums are off by ~1e-6 relative
            torch.testing.assert_close(logits[row].double(), expected, atol=1e-4, rtol=1e-5)
            bf16_head = model.output(hidden.to(torch.bfloat16)[None])[0].float()
            assert (bf16_head.double() - expected).abs().max() > 1e-3  # what the float32 head avoids
            # and those are the prompt's last hidden states: a plain forward of the prompt alone gives them up to
            # bf16 rounding (a batch of 2 may sum its bf16 matmuls in another order: on an AVX2 CPU, measured, one
            # unit in bf16's last place of the largest value, 2^-8 of it); allowed: 4 such units
            ids = torch.tensor([tokenizer.encode(prompt, bos=True, eos=False)])
            alone = model(ids, return_hidden=True)[0, -1].double()
            torch.testing.assert_close(hidden, alone, atol=4 * 2 ** -8 * float(alone.abs().max()), rtol=0)


def test_a_sampler_follows_the_weights_it_samples_while_they_train(world1, stories_dir, tokenizer):
    # Building a Sampler fuses q/k/v and w1/w3 into shared buffers (one matmul at inference) whose slices are the
    # weights themselves; PPO samples from the policy it trains. After optimizer steps (and a resume-style in-place
    # load), sampling must use the trained weights: compare with an unfused model holding the same state.
    # float64: the fused and the separate matmuls may sum in different orders; in float64 that stays ~1e-13
    model = load_model(stories_dir, dtype=torch.float64)
    sampler = Sampler(model, tokenizer, max_batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([tokenizer.encode("Once upon a time, there was a cat.", bos=True, eos=False)])
    for _ in range(2):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unfused = load_model(stories_dir, dtype=torch.float64)
    unfused.load_state_dict(model.state_dict())
    prompts = ["Once upon a time", "Tom had a big red"]
    expected = Sampler(unfused, tokenizer, max_batch_size=2).next_token_logits(prompts)
    untrained = Sampler(load_model(stories_dir, dtype=torch.float64), tokenizer).next_token_logits(prompts)
    moved = (expected - untrained).abs().max()
    assert moved > 1e-2  # the steps changed the model
    # both are rounded to the float32 the sampler returns: at most one float32 ulp apart
    assert ((sampler.next_token_logits(prompts) - expected).abs() <= torch.finfo(torch.float32).eps * expected.abs()
            + 1e-12).all()


def test_reuse_cache_computes_only_the_new_tokens_and_samples_what_a_fresh_call_does(sampler):
    first = sampler.generate(PROMPTS, 6, temperature=0.0)
    grown = [p + c.text + " and" for p, c in zip(PROMPTS, first)]
    widths = []
    forward = sampler.model.forward
    sampler.model.forward = lambda tokens, *a, **k: widths.append(tokens.shape[1]) or forward(tokens, *a, **k)
    try:
        reused = sampler.generate(grown, 12, temperature=0.8, seed=[5, 6, 7, 8], reuse_cache=True)
    finally:
        del sampler.model.forward
    fresh = sampler.generate(grown, 12, temperature=0.8, seed=[5, 6, 7, 8])
    longest = max(len(sampler.encode(g)) for g in grown)
    # the cache rows held each prompt and its 5 fed tokens: the prefill recomputes at most the re-encoded tail
    assert widths[0] <= 4 < longest
    for a, b in zip(reused, fresh):
        assert a.tokens == b.tokens and a.text == b.text
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=32 * 2 ** -23 * 32, rtol=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        sampler.generate(PROMPTS * 3, 4, reuse_cache=True)


def test_candidate_logprobs_follow_full_sequence_probabilities(sampler):
    candidates = [" cat", " dog", " big red ball", " b"]
    texts = PROMPTS[:3]

    def full_logprob(ids):
        with torch.no_grad():
            logp = torch.log_softmax(sampler.model(torch.tensor([ids]))[0].double(), dim=-1)
        return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)))

    got = sampler.candidate_logprobs(texts, candidates)
    for text, scores in zip(texts, got):
        full = [full_logprob(sampler.encode(text + c)) for c in candidates]
        # the part all candidates share cancels in differences: each score is its sequence's log-prob minus one constant
        for k in range(1, len(candidates)):
            assert abs((scores[k] - scores[0]) - (full[k] - full[0])) < 1e-4
        assert all(s < 0 for s in scores)
    sampler.generate(texts, 3, temperature=0.0)  # the cache rows now hold these texts and 2 tokens each
    reused = sampler.candidate_logprobs(texts, candidates, reuse_cache=True)
    torch.testing.assert_close(torch.tensor(reused), torch.tensor(got), atol=1e-4, rtol=0)
    with pytest.raises(PromptTooLongError):
        sampler.candidate_logprobs(["x " * 600], candidates)


def test_a_repeated_prompt_is_computed_once_and_each_repeat_samples_as_it_would_alone(sampler, world1):
    prompts = [PROMPTS[3], PROMPTS[0], PROMPTS[3], PROMPTS[3], PROMPTS[0]]  # a prompt drawn several times
    seeds = [11, 12, 13, 14, 15]
    rows = []
    forward = sampler.model.forward
    sampler.model.forward = lambda tokens, *a, **k: rows.append(tokens.shape[0]) or forward(tokens, *a, **k)
    try:
        together = sampler.generate(prompts, 20, temperature=1.0, seed=seeds)
    finally:
        del sampler.model.forward
    assert rows[0] == 2 and rows[1:] == [5] * (len(rows) - 1)  # the prefill: the two distinct prompts only
    small = Sampler(sampler.model, sampler.tokenizer, max_batch_size=1)
    for prompt, seed, got in zip(prompts, seeds, together):
        alone = small.generate([prompt], 20, temperature=1.0, seed=[seed])[0]
        assert got.tokens == alone.tokens  # each repeat decodes from its own copy of the prompt's keys and values
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)
    assert len({tuple(c.tokens) for c in together}) > 2  # the repeats drew different samples from one prompt
    candidates = [" cat", " dog", " big red ball"]
    repeated = sampler.candidate_logprobs(prompts, candidates)
    separately = [small.candidate_logprobs([p], candidates)[0] for p in prompts]
    torch.testing.assert_close(torch.tensor(repeated), torch.tensor(separately), atol=1e-4, rtol=0)
