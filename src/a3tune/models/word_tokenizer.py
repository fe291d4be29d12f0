"""A word-level tokenizer built from a corpus, for the tiny demo and test models.

Built with the ``tokenizers`` library (a ``WordLevel`` model, a lower-casing normaliser, a
whitespace + punctuation pre-tokenizer) and wrapped as a ``PreTrainedTokenizerFast``, so it saves
with ``save_pretrained``, loads with ``AutoTokenizer`` and gives offset mappings like any real
tokenizer. Ids are deterministic: the special tokens first, in ``SPECIALS`` order, then the
corpus's words sorted. Decoding (no decoder set) rejoins tokens with single spaces, enough for a
demo.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIALS = (PAD, UNK, BOS, EOS, IMAGE)

# Words are runs of letters/digits; every other non-space character is a token of its own.
_PRE_TOKENIZER = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")


def corpus_words(corpus: Iterable[str]) -> list[str]:
    """The sorted set of (lower-cased) words and punctuation marks in ``corpus``."""
    normaliser = normalizers.Lowercase()
    words: set[str] = set()
    for text in corpus:
        pieces = _PRE_TOKENIZER.pre_tokenize_str(normaliser.normalize_str(text))
        words.update(piece for piece, _ in pieces if piece.strip())
    return sorted(words - set(SPECIALS))


def build_word_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is ``SPECIALS`` + the words of ``corpus``.

    Unknown words map to ``<unk>``. No BOS is added automatically: chat templates write ``<s>``.
    """
    vocab = {token: i for i, token in enumerate([*SPECIALS, *corpus_words(corpus)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), _PRE_TOKENIZER])
    backend.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
    )
