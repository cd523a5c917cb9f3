"""BERT WordPiece tokenisation from local files only.

The released CXR-CLIP models use the Bio_ClinicalBERT vocabulary, whose Hugging Face directory holds
only ``vocab.txt`` and ``config.json``: no tokenizer config, so BERT's default ``do_lower_case=True``
applies. We build the tokenizer with the ``tokenizers`` library directly rather than
through ``AutoTokenizer`` so nothing can reach for the network and behaviour does not drift with
transformers releases; the tests compare it with transformers' own ``BertTokenizer``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from tokenizers.implementations import BertWordPieceTokenizer

from cxr_search.errors import TokenizerError

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BASIC_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def basic_vocab() -> List[str]:
    """A deterministic character-level WordPiece vocabulary (141 tokens) for tests and tiny models.

    Every lowercase ASCII word tokenises into characters, so no text maps to ``[UNK]`` wholesale.
    """
    return SPECIAL_TOKENS + list(_BASIC_CHARS) + ["##" + c for c in _BASIC_CHARS]


class TextTokenizer:
    """Lowercasing BERT WordPiece tokenizer producing padded ``input_ids`` / ``attention_mask``.

    Args:
        vocab: Ordered token list (index = id).
        lowercase: BERT ``do_lower_case`` (also strips accents, as BERT does).
        max_length: Truncation length including ``[CLS]`` and ``[SEP]``.
    """

    def __init__(self, vocab: Sequence[str], *, lowercase: bool = True, max_length: int = 256) -> None:
        missing = [t for t in SPECIAL_TOKENS[:4] if t not in vocab]
        if missing:
            raise TokenizerError(f"vocabulary lacks the special token(s) {', '.join(missing)}")
        self.vocab: List[str] = list(vocab)
        self.lowercase = lowercase
        self.max_length = max_length
        token_to_id = {tok: i for i, tok in enumerate(self.vocab)}
        self._tok = BertWordPieceTokenizer(
            token_to_id, clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        self.pad_id = token_to_id["[PAD]"]
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(pad_id=self.pad_id, pad_token="[PAD]")

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_dir(
        cls, path: Union[str, Path], *, lowercase: Optional[bool] = None, max_length: int = 256
    ) -> "TextTokenizer":
        """Load from a Hugging Face BERT tokenizer directory (needs ``vocab.txt``).

        ``do_lower_case`` is read from ``tokenizer_config.json`` when present; otherwise BERT's
        default (True) applies, as for Bio_ClinicalBERT.

        Raises:
            TokenizerError: The directory or its ``vocab.txt`` is missing or unreadable.
        """
        root = Path(path)
        vocab_file = root / "vocab.txt" if root.is_dir() else root
        if not vocab_file.is_file():
            raise TokenizerError(
                f"{root}: no vocab.txt found; pass --tokenizer with a BERT tokenizer directory "
                "(for the released CXR-CLIP models: a local copy of emilyalsentzer/Bio_ClinicalBERT)"
            )
        try:
            vocab = vocab_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{vocab_file}: cannot read vocabulary: {exc}") from exc
        if lowercase is None:
            lowercase = True
            cfg_file = vocab_file.parent / "tokenizer_config.json"
            if cfg_file.is_file():
                try:
                    lowercase = bool(json.loads(cfg_file.read_text(encoding="utf-8")).get("do_lower_case", True))
                except json.JSONDecodeError as exc:
                    raise TokenizerError(f"{cfg_file}: invalid JSON: {exc}") from exc
        return cls(vocab, lowercase=lowercase, max_length=max_length)

    @classmethod
    def basic(cls, *, max_length: int = 256) -> "TextTokenizer":
        """The built-in character-level tokenizer (see :func:`basic_vocab`)."""
        return cls(basic_vocab(), lowercase=True, max_length=max_length)

    @classmethod
    def train(
        cls, texts: Iterable[str], *, vocab_size: int, lowercase: bool = True, max_length: int = 256,
        min_frequency: int = 2,
    ) -> "TextTokenizer":
        """Learn a WordPiece vocabulary from a corpus (for models trained from scratch), deterministically.

        The vocabulary is: the special tokens, every character of the corpus as a word start and as a
        ``##`` continuation (so no word becomes ``[UNK]``), then whole words seen at least
        ``min_frequency`` times, most frequent first (ties alphabetical), up to ``vocab_size``. Words
        outside it split into characters by WordPiece's greedy longest match. ``tokenizers``' own
        WordPiece trainer is not used because it breaks frequency ties in hash-map order, which
        changes between processes: two runs with the same seed (or two ranks of one run) would get
        different vocabularies.

        Args:
            texts: The corpus (e.g. the training reports).
            vocab_size: Upper bound of the vocabulary size.
            lowercase: BERT ``do_lower_case`` (normalisation before counting, as when encoding).
            max_length: Truncation length of the resulting tokenizer.
            min_frequency: Minimum count of a whole word.

        Raises:
            TokenizerError: ``vocab_size`` too small for the special tokens and the alphabet.
        """
        from collections import Counter

        from tokenizers.normalizers import BertNormalizer
        from tokenizers.pre_tokenizers import BertPreTokenizer

        normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
        pre = BertPreTokenizer()
        counts: Counter = Counter()
        for text in texts:
            counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(str(text))))
        alphabet = sorted({ch for word in counts for ch in word})
        vocab = list(SPECIAL_TOKENS) + alphabet + ["##" + ch for ch in alphabet]
        if len(vocab) > vocab_size:
            raise TokenizerError(
                f"vocab_size {vocab_size} is smaller than the special tokens and the corpus alphabet ({len(vocab)}); "
                "raise it (init.vocab_size)"
            )
        known = set(vocab)
        for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(vocab) >= vocab_size or n < min_frequency:
                break
            if word not in known:
                vocab.append(word)
                known.add(word)
        logger.info("learnt a WordPiece vocabulary of %d tokens from %d distinct words", len(vocab), len(counts))
        return cls(vocab, lowercase=lowercase, max_length=max_length)

    # ----------------------------------------------------------------------------------- using
    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self.vocab)

    def __call__(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Tokenise a batch, padded to its longest member.

        Returns:
            ``input_ids`` and ``attention_mask``, both int64 ``[B, L]``.
        """
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)  # [B, L]
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)  # [B, L]
        return {"input_ids": ids, "attention_mask": mask}

    def encode(self, text: str) -> Any:
        """The ``tokenizers`` Encoding of one text, truncated at ``max_length`` as batches are.

        What truncation cut off is in its ``overflowing`` encodings (used to tell a user a query was cut).
        """
        return self._tok.encode(text)

    def tokenize(self, text: str) -> List[str]:
        """Token strings of one text, ``[CLS]``/``[SEP]`` included (for inspection)."""
        return self._tok.encode(text).tokens

    def sha256(self) -> str:
        """Hash of the vocabulary and settings, to tie an index to the exact tokenisation."""
        h = hashlib.sha256("\n".join(self.vocab).encode("utf-8"))
        h.update(f"|lower={self.lowercase}|max={self.max_length}".encode())
        return h.hexdigest()

    def save(self, directory: Union[str, Path]) -> None:
        """Write ``vocab.txt`` and a ``tokenizer_config.json`` readable by transformers too."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        (root / "vocab.txt").write_text("\n".join(self.vocab) + "\n", encoding="utf-8")
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase, "model_max_length": self.max_length}
        (root / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
