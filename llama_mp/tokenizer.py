"""SentencePiece tokenizer with explicit BOS/EOS handling (tok512.model, Llama-2's tokenizer.model, ...)."""

import os

from sentencepiece import SentencePieceProcessor


class Tokenizer:
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

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(list(ids))

    def decode_continuation(self, ids: list[int]) -> str:
        """Decode tokens that continue a text: SentencePiece drops the space of a leading "▁" piece, which is only right
        at the start of a text, so it is put back here (prompt + continuation then reads as the whole sequence)."""
        text = self.sp.DecodeIds(list(ids))
        if ids and self.sp.IdToPiece(ids[0]).startswith("\u2581"):
            text = " " + text
        return text

    def piece_id(self, piece: str) -> int:
        return self.sp.PieceToId(piece)

    def piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(token_id)
