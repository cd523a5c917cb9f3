"""What a query's embedding cannot tell: words the tokenizer does not know, text cut at its length limit.

A text encoder embeds any string, so a query made only of unknown symbols (an emoji) still gets scores,
sometimes higher than a real description; and a query longer than the tokenizer's limit is embedded from
its beginning only. :func:`text_query_warnings` says so, from the model's own tokenizer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List

#: Share of a query's word pieces that are ``[UNK]`` from which the query is "mostly unknown".
UNKNOWN_SHARE = 0.5


@dataclass(frozen=True)
class QueryWarning:
    """Something about a query its results do not show.

    Attributes:
        code: Stable identifier for scripts: ``unknown_words``, ``truncated``, ``query_in_index``,
            ``no_match``.
        message: One sentence for people.
    """

    code: str
    message: str

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _content(encoding: Any) -> List[str]:
    """Token strings of one encoding without special and padding tokens."""
    return [tok for tok, special, attended in zip(encoding.tokens, encoding.special_tokens_mask,
                                                  encoding.attention_mask, strict=False)
            if attended and not special]


def text_query_warnings(tokenizer: Any, text: str) -> List[QueryWarning]:
    """Warnings about ``text`` as ``tokenizer`` (a :class:`cxr_search.tokenizer.TextTokenizer`) encodes it.

    Returns:
        ``unknown_words`` when at least :data:`UNKNOWN_SHARE` of the word pieces are ``[UNK]``;
        ``truncated`` when the text is longer than the tokenizer's ``max_length`` (with how many word
        pieces and characters were dropped). Empty when neither applies.
    """
    encoding = tokenizer.encode(text)  # truncated at max_length; the rest is in .overflowing
    kept = _content(encoding)
    dropped = [tok for extra in encoding.overflowing for tok in _content(extra)]
    pieces = kept + dropped
    out: List[QueryWarning] = []
    if pieces:
        unknown = sum(tok == "[UNK]" for tok in pieces)
        if unknown / len(pieces) >= UNKNOWN_SHARE:
            what = "none" if unknown == len(pieces) else f"only {len(pieces) - unknown} of {len(pieces)}"
            out.append(QueryWarning(
                "unknown_words",
                f"{what} of the query's word pieces are in the model's vocabulary; its scores say little "
                "(describe the finding in words, e.g. 'right pleural effusion')"))
    if dropped:
        ends = [end for (_, end), special in zip(encoding.offsets, encoding.special_tokens_mask, strict=False)
                if not special]
        used_chars = max(ends) if ends else 0
        out.append(QueryWarning(
            "truncated",
            f"the query is longer than the model reads ({tokenizer.max_length} tokens): only its first "
            f"{used_chars} of {len(text)} characters were used ({len(dropped)} of {len(pieces)} word pieces "
            "dropped)"))
    return out


__all__ = ["QueryWarning", "UNKNOWN_SHARE", "text_query_warnings"]
