"""SentencePiece tokenizers: the shipped tok512 and Llama-2's tokenizer.model, BOS/EOS only when asked."""

import os

import pytest

from conftest import TOK512
from llama_mp.tokenizer import Tokenizer

LLAMA2 = os.path.join(os.path.dirname(TOK512), "tokenizer.model")


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
