"""What the SALMON steps share about prompts: the policy's format (Dromedary) and the principle files.

  query    = "{meta prompt}\\n{instruction}\\n\\n### Dromedary"   (or "...{instruction}\\n\\n{input}\\n\\n### Dromedary")
  response = "\\n" + answer, ended by the stop string "\\n\\n### User"
"""

import os

from llama_mp.jsonl import read_json

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_META_PROMPT = os.path.join(DATA, "salmon/dromedary_inference_prompt.txt")
STOP = "\n\n### User"


def dromedary_query(meta_prompt: str, instruction: str, input_text: str = "") -> str:
    body = f"{instruction}\n\n{input_text}" if input_text else instruction
    return f"{meta_prompt}\n{body}\n\n### Dromedary"


def split_tokens(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids with BOS, response ids) such that together they are the tokenization of prompt + response.

    Encoding the two parts separately would add a leading-space piece to the response and can split differently at
    the join (a known DPO/SFT pitfall); the whole text is encoded once and cut where the prompt's tokens end."""
    whole = tokenizer.encode(prompt + response, bos=True, eos=False)
    alone = tokenizer.encode(prompt, bos=True, eos=False)
    cut = 0
    while cut < min(len(whole), len(alone)) and whole[cut] == alone[cut]:
        cut += 1
    cut = min(cut, len(alone))
    return whole[:cut], whole[cut:]


def load_principles(path: str, fields: tuple[str, ...] = ("dimension", "definition")) -> list[dict]:
    principles = read_json(path)
    if not isinstance(principles, list) or not principles:
        raise ValueError(f"{path}: expected a non-empty JSON list of principles")
    for number, principle in enumerate(principles, start=1):
        missing = [k for k in fields if not isinstance(principle, dict) or not isinstance(principle.get(k), str)]
        if missing:
            raise ValueError(f"{path}: principle {number} has no {missing[0]!r} string")
    return principles
