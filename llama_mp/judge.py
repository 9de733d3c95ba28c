"""Self-judging: a policy compares two responses to a prompt under written principles, in both orders.

The judge prompt (SALMON's data/salmon/synthetic_preference_prompt.txt: the instruction, Output (a), Output (b), a
principle's dimension and definition) is read in the order (1, 2) and (2, 1) inside the policy's chat format, and
the next-token logits of "a" and "b" after "... is Output (" give r12 = La - Lb and r21 = Lb - La: both > 0 when
output 1 is preferred. The instruction and both responses form a prefix shared by every principle of a pair, and the
part before Output (a) is shared by both orders: the sampler computes their keys/values once
(Sampler.next_token_logits_shared). Step 1 judges its response pairs with this; its judge-agreement report, and step
3's evaluation of trained policies, use the same code.
"""

import os

from llama_mp.chat import DATA
from llama_mp.tokenizer import Tokenizer

DEFAULT_JUDGE_PROMPT = os.path.join(DATA, "salmon/synthetic_preference_prompt.txt")
DEFAULT_JUDGE_PRINCIPLES = os.path.join(DATA, "salmon/principle_collection_rm.json")
ANSWER_CONTEXT = "I think the more Concise output is Output ("


def instruction_text(record: dict) -> str:
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def judge_prompt(template: str, instruction: str, output_a: str, output_b: str, dimension: str,
                 definition: str) -> str:
    """The judge prompt filled in (plain replacement: texts may contain braces)."""
    for placeholder in ("{UserInstruction}", "{OutputA}", "{OutputB}", "{Dimension}", "{Definition}"):
        if placeholder not in template:
            raise ValueError(f"judge prompt template lacks {placeholder}")
    # Fill the placeholders in template order so that a response containing "{Dimension}" is left alone.
    text = template.replace("{Dimension}", dimension).replace("{Definition}", definition)
    head, rest = text.split("{UserInstruction}", 1)
    middle, tail = rest.split("{OutputA}", 1)
    between, end = tail.split("{OutputB}", 1)
    return head + instruction + middle + output_a + between + output_b + end


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


def half_credit(x: float) -> float:
    """A judgment read as a vote: r12 + r21 > 0 is 1 (output 1 preferred), < 0 is 0, a tie one half."""
    return 1.0 if x > 0 else 0.0 if x < 0 else 0.5


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
