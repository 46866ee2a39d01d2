"""Settings of the ``vocab`` stage (config section ``vocab:``)."""

from __future__ import annotations

from dataclasses import dataclass

from cptflow.core.config import ConfigError

#: Every vocab.method; which of them apply to a given base is cptflow.tokenizer.kind.METHODS.
METHODS = ("sentencepiece", "top_chars", "both", "continued_bpe", "none")


@dataclass(frozen=True)
class VocabConfig:
    # sentencepiece: train on the text and append its new pieces; top_chars: append the most frequent
    # missing Chinese characters (and user words) without training; both: the two, in that order (these
    # three need a SentencePiece BPE base). continued_bpe: learn merges on top of a byte-level BPE base's
    # own (cptflow.tokenizer.bpe_merges). none: the base tokenizer unchanged (cptflow.tokenizer.kind says
    # which methods apply to a base).
    method: str = "both"
    # SentencePiece algorithm. bpe gives the same pieces for any num_threads; unigram's EM sums depend
    # on the thread count (same num_threads -> same model), and its pieces are less often reachable
    # by the base's BPE merges.
    model_type: str = "bpe"
    # Size of the SentencePiece model trained on the target text (pieces, all kinds). Only its new,
    # CJK, reachable pieces are appended, so the expanded vocabulary grows by less than this.
    vocab_size: int = 32000
    # Share of the training characters the trained model must cover; the rarest fall to bytes.
    character_coverage: float = 0.9995
    # Longest training line in UTF-8 bytes; longer lines are cut at sentence ends (then hard).
    max_sentence_length: int = 4192
    # Lines to train on: a seeded uniform sample when there are more (0 = all). Bounds memory.
    input_sentence_size: int = 2000000
    # ... and at most this many characters of them (0 = no bound): the sample, and the trainer's memory
    # with it, stay flat however large the corpus grows (bench/RESULTS.md, section scale).
    max_sample_chars: int = 50000000
    # Shuffle the sampled lines (seeded) before training.
    shuffle: bool = True
    # Seeds the line sample, the shuffle and SentencePiece's own generator.
    seed: int = 1234
    # SentencePiece trainer threads; 1 by default so unigram is reproducible anywhere.
    num_threads: int = 1
    # Longest piece the trainer may make, in characters (SentencePiece's max_sentencepiece_length); for
    # continued_bpe the longest new token.
    max_piece_chars: int = 16
    # top_chars: at most this many missing Chinese characters, most frequent first (Ziya added ~7k).
    max_top_chars: int = 7000
    # top_chars: a character seen fewer times in the training text is not added.
    min_char_count: int = 2
    # Optional file, one word per line, appended with any method (with the prefixes BPE needs to
    # reach it); the rule should list it as an input.
    user_words_file: str = ""
    # Append only pieces holding a CJK character, so English and code encode exactly as before;
    # lines without CJK are then left out of training too. continued_bpe: only merges whose token can
    # occur in no text without a CJK character (bpe_merges.implies_cjk).
    require_cjk: bool = True
    # An existing expanded tokenizer folder (e.g. a previous run's <run>/tokenizer) to use instead of
    # training one: adding data then re-packs only new or changed files and never retrains the
    # vocabulary or re-initialises the model. It must extend the base (every base token keeps its id).
    # "" = train one with `method`.
    tokenizer: str = ""
    # Keep only records whose "lang" field is this (records without the field are kept; "" = all).
    lang: str = "zh"
    # Data categories whose shards train the new pieces (read by the workflow, which passes their
    # files). Empty: every category of lang `lang`. Pieces spent on text unlike the target (e.g.
    # classical poetry when the target is modern prose) are wasted: the demo trains on zh_web only.
    categories: tuple[str, ...] = ()
    # continued_bpe: at most this many new merges, each one new token. On SmolLM2 and 3 M characters of
    # modern Chinese, held-out Chinese goes 1.78 -> 0.82 / 0.75 / 0.72 tokens/char with 8k / 16k / 24k
    # (bench/RESULTS.md, section bpe_vocab): past 16k each token buys less.
    max_new_tokens: int = 16000
    # continued_bpe: a pair seen fewer times than this in the training sample is never merged (stops
    # learning early on small corpora instead of spending ids on one-off words).
    min_pair_count: int = 3
    # continued_bpe: learn from at most this many characters of the sampled lines (0 = all of the
    # sample). Bounds time and memory, which grow with the distinct words of the text (bench/RESULTS.md).
    max_train_chars: int = 10000000

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"vocab.method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.model_type not in ("bpe", "unigram"):
            raise ConfigError(f"vocab.model_type must be bpe or unigram, not {self.model_type!r}")
        if not 0 < self.character_coverage <= 1:
            raise ConfigError("vocab.character_coverage must be in (0, 1]")
        for name in ("vocab_size", "max_sentence_length", "num_threads", "max_piece_chars", "min_char_count",
                     "min_pair_count"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vocab.{name} must be >= 1")
        for name in ("input_sentence_size", "max_sample_chars", "max_top_chars", "max_new_tokens", "max_train_chars"):
            if getattr(self, name) < 0:
                raise ConfigError(f"vocab.{name} must be >= 0")
