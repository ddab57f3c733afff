"""A `tokenizer.json` (Hugging Face `tokenizers`) behind the few calls the pipeline makes.

The wrapper never adds special tokens on its own: the chat template places BOS/EOS and role markers
explicitly, so what is trained on is exactly what the template says.
"""

from typing import Sequence

import tokenizers

from data.errors import DataError


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, path: str = "<memory>"):
        self._backend = backend
        self.path = path

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)), str(path))
        except Exception as e:  # the backend raises a bare Exception for unreadable files
            raise DataError(
                path,
                f"cannot load the tokenizer named by config.data.tokenizer_path (or config.release_dir): {e}",
                reason="bad_tokenizer",
            ) from None

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included (callers cut at EOS themselves)."""
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        """The id of a token that must be a single vocabulary entry (e.g. a template marker)."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise DataError(
                self.path,
                f"token {token!r} is not in the vocabulary; the chat template and the tokenizer do not match",
                reason="template_mismatch",
            )
        return token_id
