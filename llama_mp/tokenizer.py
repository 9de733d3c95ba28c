"""Tokenizers behind one interface: SentencePiece (`.model`) and Hugging Face `tokenizer.json` (byte-level BPE).

  load_tokenizer(path)   a .model file, a tokenizer.json, a .gguf file, or a checkpoint directory carrying
                         tokenizer.json or tokenizer.model (tokenizer.json first)
  tokenizer_files_from_gguf(gguf_path) -> {"tokenizer.json": text, "tokenizer_config.json": text}

What every kind offers (the steps use nothing else, so none depends on SentencePiece's "▁" or "<0x..>" pieces):
  encode(text, bos, eos) -> ids     BOS only where the tokenizer wants one (add_bos) and never twice
  decode(ids), decode_continuation(ids), token_texts()
  n_words, bos_id, eos_id, pad_id (-1: none), stop_ids (every end-of-turn id, eos first), add_bos,
  chat_template (None, or the checkpoint's jinja template), bos_token, eos_token (their text), path

A tokenizer.json is read with the files Hugging Face puts beside it: tokenizer_config.json (bos/eos/pad tokens,
add_bos_token, chat_template), chat_template.jinja, generation_config.json and config.json (eos ids that also end a
turn). Control tokens such as <|im_start|> are added tokens: always one id, never split by BPE.
"""

import json
import os
from typing import Optional

from sentencepiece import SentencePieceProcessor

# Added tokens that end a turn or a text in the tokenizers this project meets (ChatML, Llama 3, GPT-2, Gemma).
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>", "<end_of_turn>",
              "<|end|>")


class Tokenizer:
    """SentencePiece with explicit BOS/EOS (tok512.model, Llama-2's tokenizer.model, ...)."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: tokenizer model not found")
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except Exception as err:  # sentencepiece raises OSError/RuntimeError with C++ detail
            raise ValueError(f"{model_path}: not a SentencePiece model ({str(err).splitlines()[0]})") from None
        self.path = model_path
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()  # -1 for the llama tokenizers: there is no pad token
        self.add_bos = self.bos_id >= 0
        self.bos_token = self.sp.IdToPiece(self.bos_id) if self.bos_id >= 0 else ""
        self.eos_token = self.sp.IdToPiece(self.eos_id) if self.eos_id >= 0 else ""
        config = read_optional_json(os.path.join(os.path.dirname(model_path), "tokenizer_config.json"))
        self.chat_template = chat_template_of(config, os.path.dirname(model_path))
        self._texts = None

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_id]  # a property: tests (and callers) may repoint eos_id

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(list(ids))

    def decode_continuation(self, ids: list[int]) -> str:
        """Decode tokens that continue a text: SentencePiece drops the space of a leading "▁" piece, which is only right
        at the start of a text, so it is put back here (prompt + continuation then reads as the whole sequence)."""
        text = self.sp.DecodeIds(list(ids))
        if ids and self.sp.IdToPiece(ids[0]).startswith("\u2581"):
            text = " " + text
        return text

    def token_texts(self) -> list[str]:
        """Each id's text as it reads inside a text ("▁" is a space; a byte piece is its character when it is one;
        control pieces read as nothing): what value grammars such as "digits only" are checked against."""
        if self._texts is None:
            texts = []
            for token_id in range(self.n_words):
                piece = self.sp.IdToPiece(token_id)
                if self.sp.IsControl(token_id) or self.sp.IsUnknown(token_id):
                    texts.append("")
                elif self.sp.IsByte(token_id):
                    value = int(piece[3:5], 16)
                    texts.append(chr(value) if value < 0x80 else "\ufffd")  # a lone high byte is no character
                else:
                    texts.append(piece.replace("\u2581", " "))
            self._texts = texts
        return self._texts

    def piece_id(self, piece: str) -> int:
        return self.sp.PieceToId(piece)

    def piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(token_id)


SentencePieceTokenizer = Tokenizer


class HFTokenizer:
    """A Hugging Face tokenizer.json (BPE: byte-level as SmolLM2's and Llama 3's, or with byte fallback) through the
    `tokenizers` library, with the bos/eos/chat settings of the files beside it."""

    def __init__(self, path: str, json_text: Optional[str] = None, config: Optional[dict] = None,
                 generation_config: Optional[dict] = None):
        """`path`: a tokenizer.json; or, with json_text and config given, the file they were built from (a GGUF)."""
        from tokenizers import Tokenizer as Backend

        self.path = path
        folder = os.path.dirname(path)
        if json_text is None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: tokenizer file not found")
            with open(path, encoding="utf-8") as f:
                json_text = f.read()
            config = read_optional_json(os.path.join(folder, "tokenizer_config.json"))
            generation_config = {**read_optional_json(os.path.join(folder, "config.json")),
                                 **read_optional_json(os.path.join(folder, "generation_config.json"))}
        config, generation_config = config or {}, generation_config or {}
        try:
            spec = json.loads(json_text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        kind = spec.get("model", {}).get("type") if isinstance(spec, dict) and isinstance(spec.get("model"), dict) \
            else None
        if kind != "BPE":
            raise ValueError(f"{path}: tokenizer model type {kind!r} is not supported (BPE tokenizer.json, e.g. "
                             f"byte-level BPE, or a SentencePiece .model)")
        try:
            self.hf = Backend.from_str(json_text)
        except Exception as err:  # the Rust side raises a bare Exception with its own message
            raise ValueError(f"{path}: not a loadable tokenizer.json ({str(err).splitlines()[0][:200]})") from None
        self.n_words = self.hf.get_vocab_size(with_added_tokens=True)
        self.special = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

        self.bos_id = self.token_id_of(config.get("bos_token"), generation_config.get("bos_token_id"))
        self.eos_id = self.token_id_of(config.get("eos_token"), first_id(generation_config.get("eos_token_id")))
        if self.eos_id < 0:
            self.eos_id = next((self.special[t] for t in END_TOKENS if t in self.special), -1)
        if self.eos_id < 0:
            raise ValueError(f"{path}: no EOS token (put a tokenizer_config.json with eos_token beside it)")
        self.pad_id = self.token_id_of(config.get("pad_token"), generation_config.get("pad_token_id"))
        self.bos_token = self.hf.id_to_token(self.bos_id) if self.bos_id >= 0 else ""
        self.eos_token = self.hf.id_to_token(self.eos_id)
        if isinstance(config.get("add_bos_token"), bool):
            self.add_bos = config["add_bos_token"] and self.bos_id >= 0
        else:  # no setting: do what the tokenizer.json's post-processor does (Llama 3 adds <|begin_of_text|>)
            self.add_bos = self.bos_id >= 0 and self.hf.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        ends = [i for i in as_list(generation_config.get("eos_token_id")) if isinstance(i, int)]
        ends += [self.special[t] for t in END_TOKENS if t in self.special]
        self._ends = [i for i in dict.fromkeys(ends) if 0 <= i < self.n_words]
        self.chat_template = chat_template_of(config, folder)
        # decode_continuation decodes after this anchor and cuts its text: decoders that strip a leading space
        # (Metaspace, Llama-2 style) then keep the continuation's own, and byte-level ones are unaffected
        self._anchor = self.hf.encode("a", add_special_tokens=False).ids
        self._anchor_text = self.decode(self._anchor)
        self._texts = None

    def token_id_of(self, token, token_id=None) -> int:
        """The id of a token given as text (tokenizer_config's "<|im_end|>" or {"content": ...}) or as an id."""
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            found = self.hf.token_to_id(token)
            if found is None:
                raise ValueError(f"{self.path}: the configured token {token!r} is not in the vocabulary")
            return found
        if isinstance(token_id, int) and 0 <= token_id < self.n_words:
            return token_id
        return -1

    @property
    def stop_ids(self) -> list[int]:
        return list(dict.fromkeys([self.eos_id] + self._ends))

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if bos and self.add_bos and ids[:1] != [self.bos_id]:  # a chat template may already spell out BOS
            ids = [self.bos_id] + ids
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """Every token's text, control tokens included (so ChatML turns read back as written)."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def decode_continuation(self, ids: list[int]) -> str:
        text = self.decode(self._anchor + list(ids))
        return text[len(self._anchor_text):] if text.startswith(self._anchor_text) else self.decode(ids)

    def token_texts(self) -> list[str]:
        """Each id's text as it reads inside a text (a partial UTF-8 byte reads as U+FFFD, a control token as its
        text): what value grammars such as "digits only" are checked against."""
        if self._texts is None:
            texts = self.hf.decode_batch([self._anchor + [i] for i in range(self.n_words)], skip_special_tokens=False)
            cut = len(self._anchor_text)
            self._texts = [t[cut:] if t.startswith(self._anchor_text) else self.decode([i])
                           for i, t in enumerate(texts)]
        return self._texts

    def piece_id(self, piece: str) -> int:
        found = self.hf.token_to_id(piece)
        return -1 if found is None else found

    def piece(self, token_id: int) -> str:
        return self.hf.id_to_token(token_id)


def load_tokenizer(path: str, ckpt_dir: str = ""):
    """The tokenizer at `path` (a .model, a tokenizer.json, a .gguf, or a directory carrying tokenizer.json or
    tokenizer.model); with no path, the one the checkpoint directory `ckpt_dir` carries."""
    if not path and not ckpt_dir:
        raise ValueError("no tokenizer: pass --tokenizer_path (or a --ckpt_dir that carries tokenizer.json)")
    if not path or os.path.isdir(path):
        folder = path or ckpt_dir
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(folder, name)):
                return load_tokenizer(os.path.join(folder, name))
        raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model in this directory (pass "
                                f"--tokenizer_path)")
    if path.endswith(".json"):
        return HFTokenizer(path)
    if path.endswith(".gguf"):
        files = tokenizer_files_from_gguf(path)
        return HFTokenizer(path, files["tokenizer.json"], json.loads(files["tokenizer_config.json"]), {})
    return Tokenizer(path)


def read_optional_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def chat_template_of(config: dict, folder: str) -> Optional[str]:
    """tokenizer_config.json's chat_template (a string, or a list of named templates: "default"), else the
    chat_template.jinja file newer Hugging Face versions write beside it."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template:
        return template
    jinja_file = os.path.join(folder, "chat_template.jinja") if folder else ""
    if jinja_file and os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    return None


def as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def first_id(value):
    values = as_list(value)
    return values[0] if values else None


# ---- GGUF -> tokenizer.json + tokenizer_config.json ---------------------------------------------------------------
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# tokenizer.ggml.pre (llama.cpp's names) -> (pre_tokenizer, ignore_merges)
PRE_TOKENIZERS = {
    "gpt-2": (BYTE_LEVEL, False),
    "gpt2": (BYTE_LEVEL, False),
    # every digit on its own, then GPT-2's regex
    "smollm": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
               False),
    # Llama 3: numbers in groups of up to 3 digits; a word in the vocabulary is taken whole
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {**BYTE_LEVEL, "use_regex": False}]}, True),
}
PRE_TOKENIZERS["llama3"] = PRE_TOKENIZERS["llama-v3"] = PRE_TOKENIZERS["llama-bpe"]
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def tokenizer_files_from_gguf(gguf_path: str, reader=None) -> dict[str, str]:
    """A Hugging Face tokenizer.json and tokenizer_config.json (file name -> JSON text) for a GGUF's byte-level BPE
    tokenizer (tokenizer.ggml.model "gpt2"), to write beside a checkpoint converted from it. `reader`: the file's
    gguf.GGUFReader when the caller has one open (opening parses every field and tensor: seconds for a large file)."""
    import gguf

    if reader is None:
        if not os.path.isfile(gguf_path):
            raise FileNotFoundError(f"{gguf_path}: file not found")
        try:
            reader = gguf.GGUFReader(gguf_path)
        except Exception as err:  # gguf raises ValueError/IndexError/... on a file that is not GGUF
            raise ValueError(f"{gguf_path}: not a readable GGUF file ({str(err).splitlines()[0][:200]})") from None

    def get(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    model = get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{gguf_path}: tokenizer.ggml.model {model!r} is not supported (only gpt2, byte-level BPE)")
    pre = get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{gguf_path}: tokenizer.ggml.pre {pre!r} is not supported "
                         f"(known: {', '.join(sorted(PRE_TOKENIZERS))})")
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    tokens = list(get("tokenizer.ggml.tokens", []))
    if not tokens:
        raise ValueError(f"{gguf_path}: GGUF metadata lacks tokenizer.ggml.tokens")
    types = list(get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = []
    for merge in get("tokenizer.ggml.merges", []):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{gguf_path}: merge {merge!r} is not two tokens separated by one space")
        merges.append(parts)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": kind == CONTROL} for i, (t, kind) in enumerate(zip(tokens, types))
             if kind in (CONTROL, USER_DEFINED)]

    def token(key):
        token_id = get(key)
        return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    add_bos = bool(get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:  # Hugging Face users of the file get BOS from the post-processor, as with Llama 3's own
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tokens.index(bos)], "tokens": [bos]}}}
    else:
        post = {**BYTE_LEVEL, "trim_offsets": False}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    arch = get("general.architecture", "llama")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": False,
              "bos_token": bos, "eos_token": eos, "unk_token": token("tokenizer.ggml.unknown_token_id"),
              "pad_token": token("tokenizer.ggml.padding_token_id"), "clean_up_tokenization_spaces": False,
              "model_max_length": int(get(f"{arch}.context_length", 0)) or None,
              "chat_template": get("tokenizer.chat_template")}
    config = {k: v for k, v in config.items() if v is not None}
    return {"tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2) + "\n"}
