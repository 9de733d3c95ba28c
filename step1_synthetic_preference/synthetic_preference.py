"""Self-judging: the policy compares its two responses to every prompt under every principle, in both orders.

  python -m step1_synthetic_preference.synthetic_preference --ckpt_dir D --tokenizer_path T \
      --response_files runs/step1/oasst1_response0.jsonl runs/step1/oasst1_response1.jsonl \
      --output_file runs/step1/oasst1_preference.jsonl

Responses are joined by prompt id (output_1 from the first file, output_2 from the second), cut at the first "###"
and stripped; a pair is dropped when either text is shorter than --min_response_chars. For each pair and principle
the judge prompt (`synthetic_preference_prompt.txt`) is read in the order (1, 2) and (2, 1), and the next-token logits
of "a" and "b" after "... is Output (" give r12 = La - Lb and r21 = Lb - La (both > 0: output 1 is preferred).
One record per (pair, principle):
  {"id", "example_idx", "principle_index", "dimension", "relative_score": [r12, r21], "prompt_preference"}
where prompt_preference is 1 (both orders prefer output 1), 2 (both prefer output 2) or 0 (the orders disagree).

The instruction and both responses form a prefix shared by all principles of a pair, and the part before Output (a)
is shared by both orders: their keys/values are computed once (--no_prefix_reuse recomputes every prompt). Sharded
over data-parallel replicas and resumable like generate_responses.
"""

import argparse
import os

from llama_mp import cli, jobs
from llama_mp.tokenizer import Tokenizer
from llama_mp.chat import FORMATS, chat_format, load_principles
from step1_synthetic_preference.common import (DEFAULT_JUDGE_PROMPT, DEFAULT_PRINCIPLES, instruction_text,
                                               judge_prompt, load_pairs, read_text, response_files)

ANSWER_CONTEXT = "I think the more Concise output is Output ("


def answer_token_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """The ids of "a" and "b" as the token right after "Output (", found by encoding: any tokenizer kind."""
    context = tokenizer.encode(ANSWER_CONTEXT, bos=False, eos=False)
    ids = []
    for letter in "ab":
        extended = tokenizer.encode(ANSWER_CONTEXT + letter, bos=False, eos=False)
        if extended[:len(context)] != context or len(extended) != len(context) + 1:
            raise ValueError(f"{tokenizer.path}: {letter!r} after 'Output (' is not a single separate token, so the "
                             f"judge's answer cannot be read from one next-token logit")
        ids.append(extended[-1])
    if ids[0] == ids[1]:
        raise ValueError(f"{tokenizer.path}: 'a' and 'b' map to the same token")
    return ids[0], ids[1]


def order_label(r12: float, r21: float) -> int:
    """1: both orders prefer output 1; 2: both prefer output 2; 0: they disagree (or tie)."""
    if r12 > 0 and r21 > 0:
        return 1
    if r12 < 0 and r21 < 0:
        return 2
    return 0


def judgments(pair: dict, principles: list[dict], logits, id_a: int, id_b: int) -> list[dict]:
    """One record per principle from the next-token logits of both orders ([order (1,2), order (2,1)], each
    [principles, vocab]; None when the prompt did not fit): r12 = La - Lb in order (1, 2), r21 = Lb - La in order
    (2, 1), so both are positive when output 1 is preferred."""
    records = []
    for index, principle in enumerate(principles):
        record = {"id": pair["id"], "example_idx": pair["example_idx"], "principle_index": index,
                  "dimension": principle["dimension"]}
        if logits is None:
            records.append({**record, "relative_score": None, "prompt_preference": None,
                            "skipped": "judge prompt longer than max_seq_len"})
            continue
        r12 = float(logits[0][index, id_a] - logits[0][index, id_b])
        r21 = float(logits[1][index, id_b] - logits[1][index, id_a])
        records.append({**record, "relative_score": [r12, r21], "prompt_preference": order_label(r12, r21)})
    return records


def common_prefix_length(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def split_shared(orders: list[list[list[int]]]) -> tuple[list[int], list[tuple[list[int], list[list[int]]]]]:
    """Token sequences per order and principle -> (prefix common to all, [(the order's middle, principle suffixes)]).

    Split on tokens, not text, so the pieces concatenate to exactly the tokenized full prompts; every suffix keeps at
    least one token."""
    everything = [s for seqs in orders for s in seqs]
    prefix_len = min(common_prefix_length(everything), min(len(s) for s in everything) - 1)
    branches = []
    for seqs in orders:
        shared = max(prefix_len, min(common_prefix_length(seqs), min(len(s) for s in seqs) - 1))
        branches.append((seqs[0][prefix_len:shared], [s[shared:] for s in seqs]))
    return everything[0][:prefix_len], branches


def truncate_tokens(tokenizer: Tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer.encode(text, bos=False, eos=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def judge_sequences(tokenizer: Tokenizer, chat, template: str, principles: list[dict], pair: dict,
                    max_instruction_tokens: int, max_response_tokens: int) -> list[list[list[int]]]:
    """The judge prompts of a pair as tokens, in the chat format `chat`: [order (1, 2), order (2, 1)], each one per
    principle."""
    instruction = truncate_tokens(tokenizer, instruction_text(pair), max_instruction_tokens)
    out1 = truncate_tokens(tokenizer, pair["output_1"], max_response_tokens)
    out2 = truncate_tokens(tokenizer, pair["output_2"], max_response_tokens)
    return [[tokenizer.encode(chat.conversation(judge_prompt(template, instruction, a, b, p["dimension"],
                                                               p["definition"])),
                              bos=True, eos=False) for p in principles] for a, b in ((out1, out2), (out2, out1))]


def judge_chunk(sampler, chat, chunk: list[dict], principles: list[dict], template: str, id_a: int, id_b: int,
                max_instruction_tokens: int, max_response_tokens: int, prefix_reuse: bool = True) -> list[dict]:
    """Judgment records of a chunk of pairs (every principle, both orders): what this command and judge_agreement
    run. A pair whose longest judge prompt exceeds the sampler's max_seq_len is recorded as skipped."""
    seqs = [judge_sequences(sampler.tokenizer, chat, template, principles, pair, max_instruction_tokens,
                            max_response_tokens) for pair in chunk]
    fits = [max(len(s) for order in pair_seqs for s in order) <= sampler.max_seq_len for pair_seqs in seqs]
    if not prefix_reuse:
        flat = [s for pair_seqs, ok in zip(seqs, fits) if ok for order in pair_seqs for s in order]
        logits = sampler.next_token_logits(flat, desc="judge") if flat else None
        per_pair, at = [], 0
        for ok in fits:
            n = 2 * len(principles) if ok else 0
            per_pair.append(logits[at:at + n].view(2, len(principles), -1) if ok else None)
            at += n
    else:
        per_pair = []
        for pair_seqs, ok in zip(seqs, fits):
            if ok:
                prefix, branches = split_shared(pair_seqs)
                per_pair.append(sampler.next_token_logits_shared(prefix, branches))
            else:
                per_pair.append(None)
    return [r for pair, logits in zip(chunk, per_pair) for r in judgments(pair, principles, logits, id_a, id_b)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step1_synthetic_preference.synthetic_preference",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--response_files", nargs=2, metavar=("RESPONSES_1", "RESPONSES_2"))
    source.add_argument("--response_pattern", help="a glob matching exactly two response files (sorted)")
    parser.add_argument("--principle_file", default=DEFAULT_PRINCIPLES)
    parser.add_argument("--prompt_template", default=DEFAULT_JUDGE_PROMPT)
    parser.add_argument("--chat_format", choices=FORMATS, default="auto",
                        help="auto: the judge prompt inside the checkpoint's chat template when it has one")
    parser.add_argument("--output_file", required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--min_response_chars", type=int, default=16)
    parser.add_argument("--max_instruction_tokens", type=int, default=256, help="longer instructions are cut")
    parser.add_argument("--max_response_tokens", type=int, default=640, help="longer responses are cut")
    parser.add_argument("--pairs_per_chunk", type=int, default=4, help="pairs judged between two appends")
    parser.add_argument("--no_prefix_reuse", action="store_true", help="recompute every judge prompt in full")
    opts = parser.parse_args()

    files = response_files(opts.response_files, opts.response_pattern)
    pairs, dropped = load_pairs(files, opts.min_response_chars)
    principles = load_principles(opts.principle_file)
    template = read_text(opts.prompt_template)
    info, sampler = cli.build(opts)
    tokenizer = sampler.tokenizer
    id_a, id_b = answer_token_ids(tokenizer)
    chat = chat_format(tokenizer, opts.chat_format)
    settings = {"ckpt_dir": opts.ckpt_dir, "response_files": [os.path.abspath(f) for f in files],
                **{k: getattr(opts, k) for k in ("principle_file", "prompt_template", "chat_format",
                                                 "min_response_chars", "max_instruction_tokens", "max_response_tokens",
                                                 "pairs_per_chunk", "max_seq_len")}}
    jobs.prepare(opts.output_file, settings, opts.overwrite, info)
    if info.is_main:
        print(f"[judge] {len(pairs)} pairs x {len(principles)} principles x 2 orders"
              + (f"; {dropped} pairs dropped (a response shorter than {opts.min_response_chars} chars)"
                 if dropped else ""), flush=True)

    def process(chunk: list[dict]) -> list[dict]:
        return judge_chunk(sampler, chat, chunk, principles, template, id_a, id_b, opts.max_instruction_tokens,
                           opts.max_response_tokens, prefix_reuse=not opts.no_prefix_reuse)

    jobs.run(opts.output_file, pairs, lambda p: p["id"], opts.pairs_per_chunk, process, info, "judge")
    records = jobs.merge(opts.output_file, lambda r: (r["id"], r["principle_index"]), info)
    if info.is_main:
        skipped = sum(1 for r in records if r.get("skipped"))
        print(f"wrote {len(records)} judgments to {opts.output_file}"
              + (f" ({skipped} skipped: judge prompt too long)" if skipped else ""), flush=True)


if __name__ == "__main__":
    cli.run(main)
