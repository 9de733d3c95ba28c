"""Human preference pairs from OASST1's ranked sibling answers: what the reward model's human check and step 1's
judge-agreement report both read; and the split's first user turns, step 3's held-out prompts (data/oasst1/oasst1_en_validation_messages.jsonl: 355 best-vs-lower pairs, 186
best-vs-worst, over 186 first-turn prompts with at least two ranked answers).

Each pair: {"id": the prompt's message id, "instruction": the prompt, "chosen": the best-ranked answer (rank 0),
"rejected": a lower-ranked sibling, "rejected_rank", "principles", "margin": 0.0}. Deleted messages are left out.
"""

from llama_mp.jsonl import iter_jsonl

AGAINST = ("all", "worst")


def oasst_human_pairs(messages_file: str, principles: list[str], against: str = "all") -> list[dict]:
    """For each first-turn prompt, its best-ranked answer against each lower-ranked sibling (`all`) or against the
    lowest-ranked one only (`worst`). In the file's order of prompts."""
    if against not in AGAINST:
        raise ValueError(f"against must be one of {AGAINST}, got {against!r}")
    prompts, answers = {}, {}
    for line, m in iter_jsonl(messages_file):
        if m.get("deleted"):
            continue
        if not isinstance(m.get("message_id"), str) or not isinstance(m.get("text"), str):
            raise ValueError(f"{messages_file}:{line}: an OASST1 message needs \"message_id\" and \"text\" strings")
        rank = m.get("rank")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
            raise ValueError(f"{messages_file}:{line}: \"rank\" must be an integer or null, got {rank!r}")
        if m.get("role") == "prompter" and m.get("parent_id") is None:
            prompts[m["message_id"]] = m["text"]
        elif m.get("role") == "assistant" and m.get("rank") is not None:
            answers.setdefault(m["parent_id"], []).append((m["rank"], m["text"]))
    pairs = []
    for pid, text in prompts.items():
        ranked = sorted(answers.get(pid, []))
        for rank, worse in ranked[1:] if against == "all" else ranked[-1:] if len(ranked) > 1 else []:
            pairs.append({"id": pid, "instruction": text, "chosen": ranked[0][1], "rejected": worse,
                          "rejected_rank": rank, "principles": principles, "margin": 0.0})
    return pairs


def first_turn_prompts(messages_file: str) -> list[tuple[str, str]]:
    """(message id, text) of every first user turn (a prompter message without parent), in the file's order."""
    prompts = []
    for line, m in iter_jsonl(messages_file):
        if m.get("deleted") or m.get("role") != "prompter" or m.get("parent_id") is not None:
            continue
        if not isinstance(m.get("message_id"), str) or not isinstance(m.get("text"), str):
            raise ValueError(f"{messages_file}:{line}: an OASST1 message needs \"message_id\" and \"text\" strings")
        prompts.append((m["message_id"], m["text"]))
    return prompts
