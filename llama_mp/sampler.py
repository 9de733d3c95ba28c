"""The KV-cache sampler every step uses: batched generation, teacher-forced scoring, next-token logits.

All ranks of a model-parallel group must make the same calls with the same arguments: their logits are gathered, so
they sample identical tokens from identically seeded generators. Data parallelism (which prompts a group gets) is the
caller's business.

Prompts are strings (encoded with BOS) or lists of token ids (used as given). Prompt lists of any size are processed in
micro-batches of at most `max_batch_size`, sorted by length, with a progress line on rank 0; results come back in the
input order.

Generation follows Meta's scheme: decoding starts at the shortest prompt's end; positions still inside a longer prompt
are teacher-forced, so a ragged batch computes exactly what each prompt alone would. Each row finishes on its own:
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
from llama_mp.logprobs import chosen_logprobs
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


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                uniform: Optional[torch.Tensor]) -> torch.Tensor:
    """One token per row from softmax(logits / T) restricted to top-k and the top-p nucleus; argmax when T == 0.

    `uniform` [B] holds one U(0, 1) number per row: the draw is the inverse CDF at it (torch.multinomial is an order of
    magnitude slower here), so a row's token depends only on its logits and its own number."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    order = None
    if top_k > 0 or top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        if top_k > 0:
            probs[:, top_k:] = 0.0
        if top_p < 1.0:
            mass_before = probs.cumsum(dim=-1) - probs
            probs[mass_before > top_p] = 0.0
    cdf = probs.cumsum(dim=-1)
    u = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)[:, 0]
    return choice if order is None else order.gather(-1, choice[:, None])[:, 0]


def derive_seed(*parts) -> int:
    """A seed for one item (a prompt, a rollout, a sample) from the run's seed and the item's key: samples of a job then
    do not depend on its batching, its world size or the order in which it is resumed."""
    return int(hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:15], 16)


class RowRandom:
    """The uniform numbers a batch draws per step: from one generator for the whole call (fast), or from one generator
    per prompt, drawn only once the row generates, so that a prompt's sample does not depend on its batch-mates."""

    def __init__(self, seed, n: int, device):
        self.device = device
        self.shared, self.per_row = None, None  # seed None: torch's global generator (seeded by distributed.init)
        if isinstance(seed, numbers.Integral):
            self.shared = torch.Generator(device=device).manual_seed(seed)
        elif seed is not None:
            if len(seed) != n:
                raise ValueError(f"{len(seed)} seeds for {n} prompts")
            self.per_row = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]

    def draw(self, rows: list[int], prompt_lengths: list[int], position: int) -> torch.Tensor:
        """One number per row for the token at `position`; a per-prompt generator draws only once its row is past
        its prompt."""
        if self.per_row is None:
            return torch.rand(len(rows), generator=self.shared, device=self.device)
        return torch.tensor([float(torch.rand(1, generator=self.per_row[r], device=self.device)) if n <= position
                             else 0.0 for r, n in zip(rows, prompt_lengths)], device=self.device)


class Sampler:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int = 32,
                 max_seq_len: Optional[int] = None, progress_every: float = 10.0):
        self.model = model.eval()
        model.fuse_projections()  # one matmul for q/k/v and one for w1/w3 at inference
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        self.progress_every = progress_every
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._cache: Optional[KVCache] = None
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
        logits = F.linear(hidden.float(), weight.float())
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
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i:i + self.max_batch_size] for i in range(0, len(order), self.max_batch_size)]

    def _kv_cache(self, batch_size: int, length: int) -> KVCache:
        """The cache, reused by every call (stale entries are never attended). It holds the longest sequence asked
        for so far, rounded up to 256 positions, not max_seq_len: a model with an 8k context that samples 1k tokens
        would otherwise zero and hold eight times the memory (12 GB for SmolLM2 at batch 32)."""
        if self._cache is None or self._cache.max_len < length:
            rounded = min(self.max_seq_len, -(-length // 256) * 256)
            self._cache = None  # free the old one before allocating the new one
            self._cache = KVCache(self.model.args, self.max_batch_size, rounded, self.device, self.dtype)
        assert batch_size <= self._cache.batch_size
        return self._cache

    # ---- generation ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], max_gen_len: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop: Sequence[str] = (), seed: Union[None, int, Sequence[int]] = None,
                 truncate: str = "error", stop_at_eos: bool = True, allowed_tokens: Optional[Sequence[int]] = None,
                 desc: str = "generate") -> list[Completion]:
        """Complete every prompt. `seed`: one int for the call, or one per prompt (a prompt's sample is then the same in
        any batch: resumable jobs use this); `stop_at_eos=False` goes on past EOS (benchmarks need fixed lengths);
        `allowed_tokens`: generate only these token ids (a value grammar, e.g. digits; log-probs are then those of
        the restricted distribution)."""
        if max_gen_len < 1 or max_gen_len >= self.max_seq_len:
            raise ValueError(f"max_gen_len {max_gen_len} must be in [1, max_seq_len {self.max_seq_len})")
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
                                               top_k, list(stop), rng, stop_at_eos, mask)
            for i, completion in zip(batch, completions):
                completion.truncated_prompt = fitted[i][1]
                results[i] = completion
            progress.update(len(batch), tokens=sum(len(c.tokens) for c in completions))
        return results

    def _generate_batch(self, prompts: list[list[int]], rows: list[int], max_gen_len: int, temperature: float,
                        top_p: float, top_k: int, stop: list[str], rng: RowRandom, stop_at_eos: bool,
                        mask: Optional[torch.Tensor] = None) -> list[Completion]:
        bsz = len(prompts)
        prompt_lengths = [len(p) for p in prompts]
        lengths = torch.tensor(prompt_lengths, device=self.device)
        min_len, max_len = int(lengths.min()), int(lengths.max())
        total_len = max_len + max_gen_len  # <= max_seq_len: prompts were fitted to leave room
        tokens = right_pad(prompts, self.device, width=total_len)
        logprobs = torch.zeros(bsz, total_len, device=self.device)
        end = lengths + max_gen_len  # exclusive end of each row's output
        finish, out_end = [""] * bsz, [0] * bsz
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        cache = self._kv_cache(bsz, total_len)
        stop_ids = torch.tensor(self.tokenizer.stop_ids if stop_at_eos else [], dtype=torch.long, device=self.device)
        window = max((len(s.encode()) for s in stop), default=0) + 2  # tokens to decode for a stop-string check
        prev = 0
        for cur in range(min_len, total_len):
            logits = self.model(tokens[:, prev:cur], prev, cache, last_only=True)[:, -1]
            if mask is not None:
                logits = logits + mask
            uniform = rng.draw(rows, prompt_lengths, cur) if temperature > 0 else None
            next_token = sample_next(logits, temperature, top_p, top_k, uniform)
            if cur < max_len:  # rows still inside their prompt are teacher-forced
                in_prompt = lengths > cur
                next_token = torch.where(in_prompt, tokens[:, cur], next_token)
                generating = ~in_prompt & ~done
            else:
                generating = ~done
            tokens[:, cur] = next_token
            scaled = logits / temperature if temperature > 0 else logits
            logprobs[:, cur] = torch.log_softmax(scaled, dim=-1).gather(-1, next_token[:, None])[:, 0]
            prev = cur
            hit_eos = generating & torch.isin(next_token, stop_ids)
            hit_length = generating & (cur + 1 >= end)
            newly = hit_eos | hit_length
            if stop:
                for row in (generating & ~hit_eos).nonzero()[:, 0].tolist():
                    start = max(int(lengths[row]), cur + 1 - window)
                    tail = self.tokenizer.decode_continuation(tokens[row, start:cur + 1].tolist())
                    if any(s in tail for s in stop):
                        finish[row], newly[row] = "stop", True
            if newly.any():
                for row in newly.nonzero()[:, 0].tolist():
                    finish[row] = finish[row] or ("eos" if hit_eos[row] else "length")
                    out_end[row] = cur + 1
            done |= newly
            if bool(done.all()):
                break

        completions = []
        for row, ids in enumerate(prompts):
            start, stop_end = len(ids), out_end[row]
            out = tokens[row, start:stop_end].tolist()
            text = self.tokenizer.decode_continuation(out[:-1] if finish[row] == "eos" else out)
            hits = [text.find(s) for s in stop if s in text] if finish[row] == "stop" else []
            if hits:
                text = text[:min(hits)]
            completions.append(Completion(text=text, tokens=out, logprobs=logprobs[row, start:stop_end].tolist(),
                                          finish_reason=finish[row], prompt_tokens=start))
        return completions

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
