"""The KV-cache sampler every step uses: batched generation, teacher-forced scoring, next-token logits.

All ranks of a model-parallel group must make the same calls with the same arguments: their logits are gathered, so
they sample identical tokens from identically seeded generators. Data parallelism (which prompts a group gets) is the
caller's business.

Prompts are strings (encoded with BOS) or lists of token ids (used as given). Prompt lists of any size are processed in
micro-batches of at most `max_batch_size` (sorted by length when there are several), with a progress line on rank 0;
results come back in the input order.

Generation: the right-padded prompts are prefilled in one forward, then every row decodes at its own position (the KV
cache takes per-row positions), so a ragged batch computes exactly what each prompt alone would and a long prompt
costs no decode steps. Each row finishes on its own:
  - "eos": the model produced EOS or another of the tokenizer's stop ids (ChatML's <|im_end|>, <|endoftext|>, ...);
  - "stop": the generated text contains one of `stop` (the text is cut before it);
  - "length": max_gen_len new tokens.
`tokens` and `logprobs` hold everything the model produced, including a final EOS or the tokens of a stop string;
`text` is the decoded generation without them. Log-probs are log_softmax(logits / T) of the chosen token (T = 1 for
greedy), before any top-p/top-k truncation, so `score(..., temperature=T)` reproduces them.

Prompt too long for `max_seq_len - max_gen_len`: truncate="error" raises PromptTooLongError; truncate="left" keeps BOS
and the last tokens that fit.
"""

import hashlib
import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region

from llama_mp.batching import last_positions, right_pad
from llama_mp.logprobs import chosen_logprobs, head_weight
from llama_mp.model import KVCache, Transformer
from llama_mp.progress import Progress
from llama_mp.tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]


class PromptTooLongError(ValueError):
    pass


@dataclass
class Completion:
    text: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int = 0
    truncated_prompt: bool = False
    extra: dict = field(default_factory=dict)


NUCLEUS_CANDIDATES = 256  # top-p looks among the most likely tokens first (see sample_next)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                uniform: Optional[torch.Tensor]) -> torch.Tensor:
    """One token per row from softmax(logits / T) restricted to top-k and the top-p nucleus; argmax when T == 0.

    `uniform` [B] holds one U(0, 1) number per row: the draw is the inverse CDF at it (torch.multinomial is an order of
    magnitude slower here), so a row's token depends only on its logits and its own number.

    The nucleus is the shortest run of tokens, most likely first, whose probability before each token is at most top_p.
    It is looked for among the NUCLEUS_CANDIDATES most likely tokens (torch.topk), then 4x as many, and so on, until
    every row's candidates hold more than top_p: then no token beyond them can be in its nucleus, and the draw equals
    one over the whole sorted vocabulary (the same cumulative sums), at a fraction of its cost (sorting SmolLM2's
    49,152 probabilities took 59 ms a step at batch 32 on 2 cores, top-256 2.7 ms). Tokens of exactly equal
    probability may come in another order than a full sort's: the same distribution."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    order = None
    if top_k > 0 or top_p < 1.0:
        vocab = probs.shape[-1]
        k = min(top_k, vocab) if top_k > 0 else min(NUCLEUS_CANDIDATES, vocab)
        while True:
            candidates, order = probs.topk(k, dim=-1)  # sorted, most likely first
            total = candidates.cumsum(dim=-1)  # (a prefix of the whole sorted vocabulary's cumulative sums)
            # done with top-k (its candidates are all there is to keep), or once every row holds more than top_p
            if top_k > 0 or k == vocab or top_p >= 1.0 or bool((total[:, -1] > top_p).all()):
                break
            k = min(4 * k, vocab)
        probs = candidates
        if top_p < 1.0:
            probs[total - candidates > top_p] = 0.0  # the probability before a token over top_p: not in the nucleus
    cdf = probs.cumsum(dim=-1)
    u = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    # the last kept token at most (u * total rounds to the total itself once in ~2^24 draws)
    kept = (probs > 0).sum(dim=-1, keepdim=True) - 1 if order is not None else cdf.shape[-1] - 1
    choice = torch.minimum(torch.searchsorted(cdf, u, right=True), torch.as_tensor(kept))[:, 0]
    return choice if order is None else order.gather(-1, choice[:, None])[:, 0]


def derive_seed(*parts) -> int:
    """A seed for one item (a prompt, a rollout, a sample) from the run's seed and the item's key: samples of a job then
    do not depend on its batching, its world size or the order in which it is resumed."""
    return int(hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:15], 16)


class RowRandom:
    """The uniform numbers a batch draws per step: from one generator for the whole call (fast), or from one generator
    per prompt, so that a prompt's sample does not depend on its batch-mates."""

    def __init__(self, seed, n: int, device):
        self.device = device
        self.shared, self.per_row = None, None  # seed None: torch's global generator (seeded by distributed.init)
        if isinstance(seed, numbers.Integral):
            self.shared = torch.Generator(device=device).manual_seed(seed)
        elif seed is not None:
            if len(seed) != n:
                raise ValueError(f"{len(seed)} seeds for {n} prompts")
            self.per_row = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]

    def draw(self, rows: list[int]) -> torch.Tensor:
        """One number per row for its next token."""
        if self.per_row is None:
            return torch.rand(len(rows), generator=self.shared, device=self.device)
        return torch.tensor([float(torch.rand(1, generator=self.per_row[r], device=self.device)) for r in rows],
                            device=self.device)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = (torch.tensor(a[:n]) != torch.tensor(b[:n])).nonzero()
    return int(differ[0, 0]) if len(differ) else n


class Sampler:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int = 32,
                 max_seq_len: Optional[int] = None, progress_every: float = 10.0, decode_weights: str = "model"):
        self.model = model.eval()
        model.fuse_projections()  # one matmul for q/k/v and one for w1/w3 at inference
        model.set_decode_weights(decode_weights)  # batch-1 steps: the weights or their Q8_0 copies (model.py)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        self.progress_every = progress_every
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._cache: Optional[KVCache] = None
        self._held: list[list[int]] = []  # the tokens each cache row holds after the last call (see reuse_cache)
        if tokenizer.n_words != model.args.vocab_size:
            raise ValueError(f"{tokenizer.path}: tokenizer has {tokenizer.n_words} pieces but the model's vocabulary "
                             f"is {model.args.vocab_size}")

    def float32_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head in float32 for the logits a caller compares (a judge's "a" against "b"): in a bfloat16 model
        the head's output is rounded to steps of 0.125-0.25 at logit magnitudes of 16-32, which turns close judgments
        into ties. The head runs on the last positions only, so the float32 matmul costs little."""
        weight = self.model.output.weight
        if torch.finfo(weight.dtype).bits >= 32:  # float32 / float64 heads are precise already
            return self.model.output(hidden).float()
        logits = F.linear(hidden.float(), head_weight(weight, torch.float32))
        if get_model_parallel_world_size() > 1:  # this rank's vocabulary columns -> all of them
            logits = gather_from_model_parallel_region(logits)
        return logits

    # ---- inputs -------------------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt, bos=True, eos=False) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("an empty prompt: give at least one token (e.g. BOS)")
        return ids

    def _fit(self, index: int, ids: list[int], limit: int, truncate: str) -> tuple[list[int], bool]:
        if len(ids) <= limit:
            return ids, False
        if truncate == "left" and limit >= 2:
            head = ids[:1] if ids[0] == self.tokenizer.bos_id else []
            return head + ids[len(ids) - (limit - len(head)):], True
        raise PromptTooLongError(f"prompt {index} has {len(ids)} tokens, more than the {limit} that fit "
                                 f"(max_seq_len {self.max_seq_len}); shorten it or truncate='left'")

    def _micro_batches(self, lengths: list[int]) -> list[list[int]]:
        """Batches of similar lengths (less padding); one batch in the input order when all fit (prompt i is then in
        cache row i, as reuse_cache expects)."""
        if len(lengths) <= self.max_batch_size:
            return [list(range(len(lengths)))]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i:i + self.max_batch_size] for i in range(0, len(order), self.max_batch_size)]

    def _kv_cache(self, batch_size: int, length: int) -> KVCache:
        """The cache, reused by every call (stale entries are never attended). It holds the longest sequence asked
        for so far, rounded up to 256 positions, not max_seq_len: a model with an 8k context that samples 1k tokens
        would otherwise zero and hold eight times the memory (12 GB for SmolLM2 at batch 32)."""
        if self._cache is None or self._cache.max_len < length:
            rounded = min(self.max_seq_len, -(-length // 256) * 256)
            self._cache, self._held = None, []  # free the old one before allocating the new one
            self._cache = KVCache(self.model.args, self.max_batch_size, rounded, self.device, self.dtype)
        assert batch_size <= self._cache.batch_size
        return self._cache

    def _prefill(self, prompts: list[list[int]], reuse_cache: bool, length: int) -> torch.Tensor:
        """Write the prompts into cache rows 0..B-1 (a cache of at least `length` positions) and return the final hidden
        state [B, dim] of each one's last token.

        reuse_cache: a row computes only the tokens after the prefix it shares with what the row held after the
        previous call (at least its last token, whose hidden state is returned).

        A prompt that comes several times (one prompt sampled num_repeat times) is computed once, when every row
        starts from scratch, and its cache row is copied to its repeats."""
        cache = self._kv_cache(len(prompts), length)  # first: a new cache holds nothing
        held = self._held if reuse_cache else []
        starts = [min(common_prefix(p, held[row]), len(p) - 1) if row < len(held) else 0
                  for row, p in enumerate(prompts)]
        slots: dict[tuple, int] = {}
        slot = [slots.setdefault(tuple(p), len(slots)) for p in prompts] if not any(starts) else []
        if slot and len(slots) < len(prompts):
            distinct = [list(p) for p in slots]  # in order of first appearance: slot[row] <= row
            hidden = self.model(right_pad(distinct, self.device), 0, cache, return_hidden=True)
            hidden = hidden[torch.arange(len(distinct), device=self.device), last_positions(distinct, self.device)]
            source, used = torch.tensor(slot, device=self.device), max(len(p) for p in distinct)
            for keys, values in zip(cache.keys, cache.values):  # gathered before written: no row is read after
                keys[:len(prompts), ..., :used] = keys[source, ..., :used]  # it was overwritten
                values[:len(prompts), :, :used] = values[source, :, :used]
            self._held = [list(p) for p in prompts]
            return hidden[source]
        tails = [p[start:] for p, start in zip(prompts, starts)]
        start_pos = starts[0] if len(set(starts)) == 1 else torch.tensor(starts, device=self.device)
        hidden = self.model(right_pad(tails, self.device), start_pos, cache, return_hidden=True)
        self._held = [list(p) for p in prompts]
        return hidden[torch.arange(len(tails), device=self.device), last_positions(tails, self.device)]

    # ---- generation ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], max_gen_len: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop: Sequence[str] = (), seed: Union[None, int, Sequence[int]] = None,
                 truncate: str = "error", stop_at_eos: bool = True, allowed_tokens: Optional[Sequence[int]] = None,
                 reuse_cache: bool = False, desc: str = "generate") -> list[Completion]:
        """Complete every prompt. `seed`: one int for the call, or one per prompt (a prompt's sample is then the same in
        any batch: resumable jobs use this); `stop_at_eos=False` goes on past EOS (benchmarks need fixed lengths);
        `allowed_tokens`: generate only these token ids (a value grammar, e.g. digits; log-probs are then those of
        the restricted distribution). `reuse_cache`: prompt i goes to cache row i (at most max_batch_size prompts, in
        their order) and only its tokens after the prefix that row still holds from the previous call are computed:
        a caller that grows the same prompts step by step pays for each token once. The model must not have changed
        since that call."""
        if max_gen_len < 1 or max_gen_len >= self.max_seq_len:
            raise ValueError(f"max_gen_len {max_gen_len} must be in [1, max_seq_len {self.max_seq_len})")
        if reuse_cache and len(prompts) > self.max_batch_size:
            raise ValueError(f"reuse_cache keeps one cache row per prompt: {len(prompts)} prompts, max_batch_size "
                             f"{self.max_batch_size}")
        encoded = [self.encode(p) for p in prompts]
        fitted = [self._fit(i, ids, self.max_seq_len - max_gen_len, truncate) for i, ids in enumerate(encoded)]
        rng = RowRandom(seed, len(prompts), self.device)
        mask = None
        if allowed_tokens is not None:
            mask = torch.full((self.model.args.vocab_size,), float("-inf"), device=self.device)
            mask[torch.tensor(sorted(set(allowed_tokens)), dtype=torch.long, device=self.device)] = 0.0
        results: list[Optional[Completion]] = [None] * len(prompts)
        progress = Progress(len(prompts), desc, "prompts", self.progress_every)
        for batch in self._micro_batches([len(ids) for ids, _ in fitted]):
            completions = self._generate_batch([fitted[i][0] for i in batch], batch, max_gen_len, temperature, top_p,
                                               top_k, list(stop), rng, stop_at_eos, mask, reuse_cache)
            for i, completion in zip(batch, completions):
                completion.truncated_prompt = fitted[i][1]
                results[i] = completion
            progress.update(len(batch), tokens=sum(len(c.tokens) for c in completions))
        return results

    def _generate_batch(self, prompts: list[list[int]], rows: list[int], max_gen_len: int, temperature: float,
                        top_p: float, top_k: int, stop: list[str], rng: RowRandom, stop_at_eos: bool,
                        mask: Optional[torch.Tensor], reuse_cache: bool) -> list[Completion]:
        bsz = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        uniform_length = len(set(len(p) for p in prompts)) == 1  # one int position per step: no per-row mask
        out = torch.zeros(bsz, max_gen_len, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(bsz, max_gen_len, device=self.device)
        finish, out_len = [""] * bsz, [0] * bsz
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        stop_ids = torch.tensor(self.tokenizer.stop_ids if stop_at_eos else [], dtype=torch.long, device=self.device)
        window = max((len(s.encode()) for s in stop), default=0) + 2  # tokens to decode for a stop-string check
        # prompts were fitted to leave room for max_gen_len
        logits = self.model.output(self._prefill(prompts, reuse_cache, int(lengths.max()) + max_gen_len)).float()
        cache = self._cache
        for step in range(max_gen_len):
            if step:  # the previous token goes in at each row's own position
                position = int(lengths[0]) + step - 1 if uniform_length else lengths + (step - 1)
                logits = self.model(out[:, step - 1:step], position, cache)[:, -1]
            if mask is not None:
                logits = logits + mask
            uniform = rng.draw(rows) if temperature > 0 else None
            next_token = sample_next(logits, temperature, top_p, top_k, uniform)
            out[:, step] = next_token
            scaled = logits / temperature if temperature > 0 else logits
            logprobs[:, step] = torch.log_softmax(scaled, dim=-1).gather(-1, next_token[:, None])[:, 0]
            generating = ~done
            hit_eos = generating & torch.isin(next_token, stop_ids)
            newly = hit_eos | (generating if step + 1 == max_gen_len else torch.zeros_like(done))
            if stop:
                for row in (generating & ~hit_eos).nonzero()[:, 0].tolist():
                    tail = self.tokenizer.decode_continuation(out[row, max(0, step + 1 - window):step + 1].tolist())
                    if any(s in tail for s in stop):
                        finish[row], newly[row] = "stop", True
            if newly.any():
                for row in newly.nonzero()[:, 0].tolist():
                    finish[row] = finish[row] or ("eos" if hit_eos[row] else "length")
                    out_len[row] = step + 1
            done |= newly
            if bool(done.all()):
                break
        # what the cache rows hold now: each prompt and the tokens fed after it (all but the last sampled one)
        self._held = [p + out[row, :step].tolist() for row, p in enumerate(prompts)]

        completions = []
        for row, ids in enumerate(prompts):
            tokens = out[row, :out_len[row]].tolist()
            text = self.tokenizer.decode_continuation(tokens[:-1] if finish[row] == "eos" else tokens)
            hits = [text.find(s) for s in stop if s in text] if finish[row] == "stop" else []
            if hits:
                text = text[:min(hits)]
            completions.append(Completion(text=text, tokens=tokens, logprobs=logprobs[row, :out_len[row]].tolist(),
                                          finish_reason=finish[row], prompt_tokens=len(ids)))
        return completions

    @torch.inference_mode()
    def candidate_logprobs(self, texts: Sequence[str], candidates: Sequence[str], truncate: str = "error",
                           reuse_cache: bool = False) -> list[list[float]]:
        """log p(candidate | text), summed over the candidate's tokens, for every candidate after every text:
        [len(texts)] lists of [len(candidates)] (a choice among known values). Text and candidate are encoded
        together, as the model saw such strings in training; the tokens all candidates share with their text go
        through the KV cache once (reuse_cache as in generate), then each candidate's own tokens on top of them. The
        head runs in float32, as in score()."""
        if len(texts) > self.max_batch_size:
            if reuse_cache:
                raise ValueError(f"reuse_cache keeps one cache row per text: {len(texts)} texts, max_batch_size "
                                 f"{self.max_batch_size}")
            return [row for first in range(0, len(texts), self.max_batch_size)
                    for row in self.candidate_logprobs(texts[first:first + self.max_batch_size], candidates, truncate)]
        seqs, shared = [], []  # per text: each candidate's tokens; how many of them all candidates share
        for i, text in enumerate(texts):
            row = [self.encode(text + c) for c in candidates]
            overflow = max(len(q) for q in row) - self.max_seq_len
            if overflow > 0:
                if truncate != "left" or row[0][0] != self.tokenizer.bos_id:
                    raise PromptTooLongError(f"text {i} with a candidate has {overflow + self.max_seq_len} tokens, "
                                             f"more than max_seq_len {self.max_seq_len}; shorten it or truncate='left'")
                row = [q[:1] + q[1 + overflow:] for q in row]
            n = 0  # every candidate keeps at least one token of its own
            while all(len(q) > n + 1 and q[n] == row[0][n] for q in row):
                n += 1
            if n == 0:
                raise ValueError(f"text {i}: the candidates share no first token (give the text a BOS)")
            seqs.append(row)
            shared.append(n)
        device = self.device
        longest = max(len(q) for r in seqs for q in r)
        last = self._prefill([r[0][:n] for r, n in zip(seqs, shared)], reuse_cache, longest)  # predicts token n
        starts = torch.tensor(shared, device=device)
        scores = torch.zeros(len(texts), len(candidates))
        for k in range(len(candidates)):
            own = [r[k][n:] for r, n in zip(seqs, shared)]  # >= 1 token each
            states = [last[i:i + 1] for i in range(len(own))]  # per row: the states that predict each own token
            if max(len(o) for o in own) > 1:  # the rest, at each row's own positions (written past the shared part)
                hidden = self.model(right_pad([o[:-1] or [0] for o in own], device), starts, self._cache,
                                    return_hidden=True)
                states = [torch.cat([s, hidden[i, :len(o) - 1]]) for i, (s, o) in enumerate(zip(states, own))]
            rows = torch.tensor([i for i, o in enumerate(own) for _ in o])
            targets = torch.tensor([t for o in own for t in o], device=device)
            logp = chosen_logprobs(self.model, torch.cat(states), targets, head_dtype=torch.float32).cpu()
            scores[:, k] = torch.zeros(len(texts)).index_add_(0, rows, logp)
        self._held = [r[0][:n] for r, n in zip(seqs, shared)]  # the candidates' own tokens are stale
        return scores.tolist()

    # ---- teacher forcing ----------------------------------------------------------------------------------------
    def _hidden_batches(self, seqs: list[list[int]], desc: str):
        """Per micro-batch: (indices into seqs, final hidden states [B, T, dim]) of the right-padded sequences.

        Right padding is exact under causal attention: a real token never attends to the pads after it."""
        progress = Progress(len(seqs), desc, "sequences", self.progress_every)
        for batch in self._micro_batches([len(s) for s in seqs]):
            yield batch, self.model(right_pad([seqs[i] for i in batch], self.device), return_hidden=True)
            progress.update(len(batch), tokens=sum(len(seqs[i]) for i in batch))

    @torch.inference_mode()
    def score(self, prompts: Sequence[Prompt], continuations: Sequence[Prompt], temperature: float = 1.0,
              truncate: str = "error", desc: str = "score") -> list[list[float]]:
        """log p(token | all before) / temperature-scaled, for each token of each continuation given its prompt. The
        head runs in float32 (see float32_logits: these are the log-probs callers compare, e.g. a KL between models).

        A string continuation is encoded without BOS/EOS; token-id lists are used as given. Too long: truncate="left"
        drops prompt tokens after BOS; a continuation that alone exceeds max_seq_len is always an error."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        seqs, starts = [], []
        for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
            cont_ids = self.tokenizer.encode(cont, bos=False, eos=False) if isinstance(cont, str) else list(cont)
            if not cont_ids:
                raise ValueError(f"continuation {i} is empty")
            if len(cont_ids) >= self.max_seq_len:
                raise PromptTooLongError(f"continuation {i} has {len(cont_ids)} tokens; with its prompt it cannot fit "
                                         f"max_seq_len {self.max_seq_len}")
            prompt_ids, _ = self._fit(i, self.encode(prompt), self.max_seq_len - len(cont_ids), truncate)
            if not prompt_ids:
                raise ValueError(f"prompt {i} is empty: the first continuation token needs a context (use BOS)")
            seqs.append(prompt_ids + cont_ids)
            starts.append(len(prompt_ids))
        results: list[Optional[list[float]]] = [None] * len(seqs)
        for batch, hidden in self._hidden_batches(seqs, desc):
            # only the positions that predict a continuation token reach the LM head, in chunks (no [B, T, vocab])
            rows = torch.cat([torch.full((len(seqs[i]) - starts[i],), row, device=self.device)
                              for row, i in enumerate(batch)])
            positions = torch.cat([torch.arange(starts[i] - 1, len(seqs[i]) - 1, device=self.device) for i in batch])
            targets = torch.tensor([t for i in batch for t in seqs[i][starts[i]:]], device=self.device)
            logp = chosen_logprobs(self.model, hidden[rows, positions], targets,
                                   temperature if temperature > 0 else 1.0, head_dtype=torch.float32).tolist()
            at = 0
            for i in batch:
                n = len(seqs[i]) - starts[i]
                results[i], at = logp[at:at + n], at + n
        return results

    @torch.inference_mode()
    def next_token_logits(self, prompts: Sequence[Prompt], truncate: str = "error",
                          desc: str = "next-token logits") -> torch.Tensor:
        """Logits [N, vocab] (float32, CPU) of the token after each prompt: what a self-judging step compares."""
        seqs = [self._fit(i, self.encode(p), self.max_seq_len, truncate)[0] for i, p in enumerate(prompts)]
        out = torch.empty(len(seqs), self.model.args.vocab_size)
        for batch, hidden in self._hidden_batches(seqs, desc):
            last = last_positions([seqs[i] for i in batch], self.device)
            h_last = hidden[torch.arange(len(batch), device=self.device), last]
            out[torch.tensor(batch)] = self.float32_logits(h_last).cpu()
        return out

    @torch.inference_mode()
    def next_token_logits_shared(self, prefix: Sequence[int],
                                 branches: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]) -> list[torch.Tensor]:
        """Next-token logits after prefix + middle + suffix, for every suffix of every (middle, suffixes) branch.

        Each shared part is computed once: the prefix, then each branch's middle on top of its cached keys/values,
        then the branch's suffixes as one batch whose cache rows are copies of that prefix + middle. Equals
        next_token_logits on the concatenated sequences (what a self-judge reading many principles for one pair
        needs). Returns one [len(suffixes), vocab] float32 CPU tensor per branch."""
        prefix = list(prefix)
        if not prefix:
            raise ValueError("the shared prefix is empty (it should at least hold BOS)")
        longest = max((len(m) + max((len(s) for s in sfx), default=0) for m, sfx in branches), default=0)
        if len(prefix) + longest > self.max_seq_len:
            raise PromptTooLongError(f"shared prefix of {len(prefix)} tokens plus a branch of {longest} exceeds "
                                     f"max_seq_len {self.max_seq_len}")
        cache = self._kv_cache(1, len(prefix) + longest)
        self._held = []  # the rows are about to hold copies of row 0's parts
        self.model(torch.tensor([prefix], device=self.device), 0, cache, last_only=True)
        results = []
        for middle, suffixes in branches:
            if any(len(s) == 0 for s in suffixes):
                raise ValueError("every suffix needs at least one token")
            start = len(prefix) + len(middle)
            if middle:  # row 0 of the cache now holds prefix + this middle
                self.model(torch.tensor([list(middle)], device=self.device), len(prefix), cache, last_only=True)
            out = torch.empty(len(suffixes), self.model.args.vocab_size)
            for first in range(0, len(suffixes), self.max_batch_size):
                chunk = suffixes[first:first + self.max_batch_size]
                for keys, values in zip(cache.keys, cache.values):  # copy row 0's shared part to the chunk's rows
                    keys[1:len(chunk), :, :, :start] = keys[:1, :, :, :start]
                    values[1:len(chunk), :, :start] = values[:1, :, :start]
                hidden = self.model(right_pad(chunk, self.device), start, cache, return_hidden=True)
                last = last_positions(chunk, self.device)
                h_last = hidden[torch.arange(len(chunk), device=self.device), last]
                out[first:first + len(chunk)] = self.float32_logits(h_last).cpu()
            results.append(out)
        return results
