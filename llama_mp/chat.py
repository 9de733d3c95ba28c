"""How a policy is prompted, and the principle files the SALMON steps share.

Two formats, chosen by the checkpoint (chat_format(tokenizer, "auto")) and overridable by a flag:
  dromedary  for base models (SALMON's, and stories260K's):
               query    = "{meta prompt}\\n{instruction}\\n\\n### Dromedary"
                          (or "{meta prompt}\\n{instruction}\\n\\n{input}\\n\\n### Dromedary")
               response = "\\n" + answer, ended by the stop string "\\n\\n### User"
  template   for instruction models: the checkpoint's own chat template (tokenizer_config.json's chat_template, e.g.
             ChatML for SmolLM2), rendered with jinja2 in a sandbox; the query is one user turn and the generation
             prompt, the answer ends with the template's end-of-turn token, which is one of the tokenizer's stop ids
"auto" is "template" when the tokenizer carries a chat template, else "dromedary".
"""

import datetime
import functools
import json
import os
from dataclasses import dataclass

from llama_mp.jsonl import read_json

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_META_PROMPT = os.path.join(DATA, "salmon/dromedary_inference_prompt.txt")
STOP = "\n\n### User"
FORMATS = ("auto", "dromedary", "template")


def dromedary_query(meta_prompt: str, instruction: str, input_text: str = "") -> str:
    body = f"{instruction}\n\n{input_text}" if input_text else instruction
    return f"{meta_prompt}\n{body}\n\n### Dromedary"


class TemplateError(ValueError):
    pass


def _raise_exception(message):
    raise TemplateError(f"chat template: {message}")


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """The template compiled in jinja2's immutable sandbox (no attribute access to Python internals, no mutation of
    the inputs), with the settings and helpers Hugging Face templates expect."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False, separators=None, sort_keys=False: \
        json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as err:
        raise TemplateError(f"chat template does not compile ({err})") from None


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "",
                    eos_token: str = "") -> str:
    """A Hugging Face chat template rendered with its standard variables."""
    import jinja2

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as err:
        raise TemplateError(f"chat template failed to render ({err})") from None


@dataclass
class ChatFormat:
    name: str  # "dromedary" | "template"
    meta_prompt: str = ""  # dromedary: the system text before the first "### User"
    template: str = ""  # template: the checkpoint's jinja chat template
    bos_token: str = ""
    eos_token: str = ""

    @property
    def stop(self) -> list[str]:
        """Stop strings a generation needs: a template's turn ends with a stop id instead (<|im_end|>)."""
        return [STOP] if self.name == "dromedary" else []

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_template(self.template, messages, add_generation_prompt, self.bos_token, self.eos_token)

    def query(self, instruction: str, input_text: str = "") -> str:
        """The prompt for one instruction, ending where the answer starts."""
        if self.name == "dromedary":
            return dromedary_query(self.meta_prompt, instruction, input_text)
        content = f"{instruction}\n\n{input_text}" if input_text else instruction
        return self.render([{"role": "user", "content": content}], add_generation_prompt=True)

    def conversation(self, text: str) -> str:
        """A prompt written as one Dromedary conversation (SALMON's judge prompt: a system text, then "### User\\n"
        with the request, then "### Dromedary\\n" and the start of the answer) in this format. Dromedary: unchanged.
        Template: the system text and the request become the template's system and user turns, and the answer's
        start follows the generation prompt, so an instruction model reads it as its own conversation."""
        if self.name == "dromedary":
            return text
        head, user_marker, rest = text.rpartition("### User\n")
        request, answer_marker, answer_start = rest.rpartition("### Dromedary\n")
        if not user_marker or not answer_marker:
            raise ValueError("a Dromedary conversation needs a '### User' turn followed by '### Dromedary'")
        messages = [{"role": "system", "content": head.strip()}] if head.strip() else []
        messages.append({"role": "user", "content": request.strip()})
        return self.render(messages, add_generation_prompt=True) + answer_start

    def response(self, answer: str, instruction: str = "x") -> str:
        """The text that follows query() in a training target: "\\n" + answer for Dromedary (its end is the EOS id or
        the stop string, as the step decides); for a template, the answer and the turn's end as the template writes it
        (for ChatML: answer + "<|im_end|>")."""
        if self.name == "dromedary":
            return "\n" + answer
        user = [{"role": "user", "content": instruction}]
        prompt = self.render(user, add_generation_prompt=True)
        full = self.render(user + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        if not full.startswith(prompt) or answer not in full[len(prompt):]:
            return answer + self.eos_token  # a template that rewrites earlier turns: close with EOS
        rest = full[len(prompt):]
        end = rest.index(answer) + len(answer)
        if self.eos_token and rest[end:].find(self.eos_token) >= 0:  # through the end-of-turn token, not past it
            end += rest[end:].find(self.eos_token) + len(self.eos_token)
        return rest[:end]


def chat_format(tokenizer, choice: str = "auto", meta_prompt_file: str = DEFAULT_META_PROMPT) -> ChatFormat:
    """The format a step prompts its policy with: the checkpoint's template when its tokenizer carries one ("auto"),
    else Dromedary's; `choice` ("dromedary" | "template") overrides."""
    if choice not in FORMATS:
        raise ValueError(f"chat format {choice!r} is not one of {', '.join(FORMATS)}")
    template = getattr(tokenizer, "chat_template", None)
    if choice == "auto":
        choice = "template" if template else "dromedary"
    if choice == "template":
        if not template:
            raise ValueError(f"{tokenizer.path}: no chat_template beside this tokenizer (tokenizer_config.json), so "
                             f"the template format cannot be used")
        return ChatFormat("template", template=template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    with open(meta_prompt_file, encoding="utf-8") as f:
        return ChatFormat("dromedary", meta_prompt=f.read())


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
