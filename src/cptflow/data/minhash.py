"""The pure core of deduplication: normalisation, exact hashes, shingles, MinHash signatures.

Everything here is a function of (text, language, config), so the per-file ``signature`` jobs, the
band jobs and decontamination agree on what "the same text" means:

* ``normalise_for_hash`` — NFKC, lower case, every Unicode punctuation mark removed (NFKC turns
  "，" into "," and "…" into "...", but leaves "。", “”‘’, 《》, 【】, 、 and — alone; removing all
  of category P makes width and style of punctuation irrelevant),
  format characters (zero-width space, BOM) removed, whitespace collapsed; in languages written
  without spaces between words (Chinese, Japanese, Thai, ...) whitespace is removed altogether,
  because a line break inside a Chinese poem is layout, not content.
* shingles — character n-grams for those languages (a Chinese "word" needs a segmenter; characters
  don't), word n-grams for the others. A text shorter than one shingle becomes ONE shingle (the whole
  normalised text): an empty shingle set would give every short document the same all-maximum
  signature, and all of them would collide (a bug peer tools have).
* signatures — shingles are hashed with xxhash (words) or a vectorised 64-bit hash of the code points
  (characters), then ``num_perm`` universal hashes ``(a*x + b) mod p`` with p = 2^31 - 1 are applied
  by numpy broadcasting and the minimum kept per document and permutation.
"""

from __future__ import annotations

import functools
import json
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import xxhash

VERSION = 1  # bump with any change to normalisation, shingles or hashing (signatures change)

# Languages written without spaces between words: shingles are characters, whitespace is dropped.
# A language tag is matched on its primary subtag ("zh-Hant", "zh_TW" → "zh").
CHAR_LANGS = frozenset({"zh", "lzh", "yue", "wuu", "ja", "th", "lo", "km", "my", "bo"})

MERSENNE_31 = np.uint64((1 << 31) - 1)  # p: a*x + b < 2^63 for x, a, b < p, so uint64 never overflows
_CHUNK_SHINGLES = 8192  # shingles per broadcast block: 128 x 8192 x 8 B = 8 MB, stays in cache


@dataclass(frozen=True)
class DedupConfig:
    """Settings shared by the four dedup stages (the ``dedup:`` config section)."""

    exact: bool = True  # also group documents whose normalised text is identical (xxhash64)
    num_perm: int = 120  # MinHash permutations = bands * rows; estimate std at J=0.7 is ~0.04
    # 20 x 6: a pair at Jaccard 0.7 becomes a candidate with p = 1-(1-0.7^6)^20 = 0.92, at 0.8 with 0.998;
    # the S-curve sits below min_jaccard on purpose and verification removes the extra candidates.
    bands: int = 20  # LSH bands
    rows: int = 6  # signature rows per band
    # A candidate pair is a near duplicate only if its estimated Jaccard >= this. 0.65, not 0.7: the
    # estimate's spread (~0.04 at 120 permutations) otherwise loses ~15% of true pairs at J 0.7-0.8
    # (bench/RESULTS.md: recall 0.949 -> 0.992 on planted pairs at J >= 0.7, no pair below 0.5 removed).
    min_jaccard: float = 0.65
    shingle_chars: int = 5  # character n-gram size for CHAR_LANGS (Chinese, Japanese, Thai, ...)
    shingle_words: int = 5  # word n-gram size for every other language
    seed: int = 1  # seeds the shingle hashes and the permutations
    band_groups: int = 4  # Snakemake jobs the bands are split into (group k gets bands b % groups == k)
    # ... and each band group into this many jobs by hash range (range r gets the documents whose band
    # key is in the r-th slice of the key space): bands jobs need ~150 bytes x documents / hash_ranges.
    hash_ranges: int = 1
    max_bucket_all_pairs: int = 50  # larger buckets compare each member with the first and its neighbour only

    def __post_init__(self) -> None:
        for name in ("num_perm", "bands", "rows", "shingle_chars", "shingle_words", "band_groups", "hash_ranges",
                     "max_bucket_all_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"dedup.{name} must be >= 1, got {getattr(self, name)}")
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"dedup: bands * rows must equal num_perm ({self.bands} * {self.rows} != {self.num_perm})")
        if not 0.0 < self.min_jaccard <= 1.0:
            raise ValueError(f"dedup.min_jaccard must be in (0, 1], got {self.min_jaccard}")
        if self.band_groups > self.bands:
            raise ValueError(f"dedup.band_groups ({self.band_groups}) cannot exceed dedup.bands ({self.bands})")

    def signature_params(self) -> dict[str, int]:
        """The fields a signature depends on (stored in every signature file and checked by bands)."""
        return {k: v for k, v in asdict(self).items() if k in ("num_perm", "shingle_chars", "shingle_words", "seed")}

    def signature_params_json(self) -> str:
        return json.dumps(self.signature_params(), sort_keys=True)


def is_char_lang(lang: str) -> bool:
    """True for languages whose shingles are characters (written without spaces between words)."""
    primary = (lang or "").replace("_", "-").split("-")[0].lower()
    return primary in CHAR_LANGS


@functools.lru_cache(maxsize=1)
def _strip_table() -> dict[int, str | None]:
    """str.translate table: punctuation (P*) → space; format (Cf) and control characters → deleted.

    Built once per process (~0.1 s over all code points) instead of at import time. Punctuation
    becomes a space (not nothing) so "end.Start" keeps two words; in unspaced languages the
    whitespace is removed afterwards anyway.
    """
    table: dict[int, str | None] = {}
    for cp in range(sys.maxunicode + 1):
        cat = unicodedata.category(chr(cp))
        if cat[0] == "P":
            table[cp] = " "
        elif cat == "Cf" or (cat == "Cc" and not chr(cp).isspace()):
            table[cp] = None  # zero-width space, BOM, soft hyphen, control bytes: invisible anyway
    return table


def normalise_for_hash(text: str, lang: str) -> str:
    """The text as compared for duplicates and contamination (see the module docstring)."""
    char_form, word_form = normalised_forms(text)
    return char_form if is_char_lang(lang) else word_form


def normalised_forms(text: str) -> tuple[str, str]:
    """(form for unspaced languages, form for spaced ones) in one pass; decontamination needs both."""
    parts = unicodedata.normalize("NFKC", text).lower().translate(_strip_table()).split()
    return "".join(parts), " ".join(parts)


def exact_hash(text: str, lang: str) -> int:
    """xxhash64 of the normalised text: equal for texts that differ only in width/punctuation/spacing."""
    return xxhash.xxh64_intdigest(normalise_for_hash(text, lang).encode("utf-8"))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (SplitMix64): spreads structured inputs (code points, sums) over all bits."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def unit_hashes(norm: str, char_units: bool, seed: int) -> np.ndarray:
    """A 64-bit hash per unit of a normalised text: per code point, or per space-separated word."""
    if char_units:
        cps = np.frombuffer(norm.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
        return _splitmix64(cps ^ np.uint64(seed & 0xFFFFFFFF) << np.uint64(32))
    words = norm.split(" ") if norm else []
    return np.fromiter((xxhash.xxh64_intdigest(w.encode("utf-8"), seed) for w in words), dtype=np.uint64, count=len(words))


def multipliers(seed: int, n: int) -> np.ndarray:
    """Random odd 64-bit multipliers, one per position in a window (the window hash is linear in them)."""
    rng = np.random.default_rng([seed, 0x5EED])
    return rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True) | np.uint64(1)


def window_hashes(units: np.ndarray, lengths: Sequence[int], mult: np.ndarray) -> dict[int, np.ndarray]:
    """Hash of every window of each length in ``lengths`` (a window longer than the text gives none).

    hash(u[i:i+L]) = splitmix(sum_j u[i+j] * mult[j] + L): built one length at a time, so all
    lengths up to max(lengths) cost max(lengths) vector operations in total.
    """
    out: dict[int, np.ndarray] = {}
    want = set(lengths)
    n = len(units)
    acc = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for L in range(1, min(max(want, default=0), n) + 1):
            acc = acc[: n - L + 1] + units[L - 1:] * mult[L - 1]
            if L in want:
                out[L] = _splitmix64(acc + np.uint64(L))
    return out


def ngram_hashes(units: np.ndarray, n: int, mult: np.ndarray) -> np.ndarray:
    """Hashes of all n-unit windows; fewer than n units give ONE hash of the whole text (never none)."""
    k = min(n, len(units))
    if k == 0:
        return _splitmix64(np.zeros(1, dtype=np.uint64))  # empty text: one (shared) shingle
    return window_hashes(units, [k], mult)[k]


def shingle_hashes(text: str, lang: str, cfg: DedupConfig, mult: np.ndarray | None = None) -> np.ndarray:
    """31-bit shingle hashes of one document (input to the permutations; at least one)."""
    char_units = is_char_lang(lang)
    n = cfg.shingle_chars if char_units else cfg.shingle_words
    if mult is None:  # always the same length, so a word and a character shingle use the same prefix
        mult = multipliers(cfg.seed, max(cfg.shingle_chars, cfg.shingle_words))
    units = unit_hashes(normalise_for_hash(text, lang), char_units, cfg.seed)
    return ngram_hashes(units, n, mult) >> np.uint64(33)


def permutations(cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of the ``num_perm`` hashes (a*x + b) mod p, a in [1, p), b in [0, p), from cfg.seed."""
    rng = np.random.default_rng([cfg.seed, 0xB1A5])
    p = int(MERSENNE_31)
    a = rng.integers(1, p, size=cfg.num_perm, dtype=np.uint64)
    b = rng.integers(0, p, size=cfg.num_perm, dtype=np.uint64)
    return a, b


def _min_permuted(x: np.ndarray, starts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min over each document's shingles of (a*x + b) mod p; ``starts`` are document offsets in x.

    Laid out permutation-major (num_perm x shingles) so each document's run is contiguous for
    ``reduceat``: measured 1.8x faster than shingle-major. ``%`` by a scalar beats a Mersenne fold
    in numpy (3x, measured), so the plain remainder stays.
    """
    y = a[:, None] * x[None, :]
    y += b[:, None]
    y %= MERSENNE_31
    return np.minimum.reduceat(y, starts, axis=1).T


def minhash(texts: Sequence[str], langs: Sequence[str], cfg: DedupConfig) -> np.ndarray:
    """MinHash signatures, shape (len(texts), cfg.num_perm), uint32 (values < 2^31)."""
    if len(texts) != len(langs):
        raise ValueError(f"minhash: {len(texts)} texts but {len(langs)} languages")
    a, b = permutations(cfg)
    mult = multipliers(cfg.seed, max(cfg.shingle_chars, cfg.shingle_words))
    sig = np.empty((len(texts), cfg.num_perm), dtype=np.uint32)
    pending: list[np.ndarray] = []
    first = 0  # index of the first document in ``pending``
    size = 0

    def flush() -> None:
        nonlocal pending, first, size
        counts = np.fromiter((len(s) for s in pending), dtype=np.int64, count=len(pending))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sig[first:first + len(pending)] = _min_permuted(np.concatenate(pending), starts, a, b)
        first += len(pending)
        pending, size = [], 0

    for i, (text, lang) in enumerate(zip(texts, langs)):
        sh = shingle_hashes(text, lang, cfg, mult)
        if size and size + len(sh) > _CHUNK_SHINGLES:
            flush()
        if len(sh) > _CHUNK_SHINGLES:  # a long document alone, block by block, bounding memory
            parts = [_min_permuted(sh[j:j + _CHUNK_SHINGLES], np.zeros(1, dtype=np.int64), a, b)
                     for j in range(0, len(sh), _CHUNK_SHINGLES)]
            sig[i] = np.minimum.reduce(parts)[0]
            first = i + 1
            continue
        pending.append(sh)
        size += len(sh)
    if pending:
        flush()
    return sig


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature entries, row by row: an unbiased estimate of Jaccard similarity."""
    return (sig_a == sig_b).mean(axis=-1)


def band_keys(part: np.ndarray, band: int) -> np.ndarray:
    """One 64-bit key per document from its ``rows`` values of ``band`` (``part``: (n, rows); equal rows → equal keys)."""
    part = np.ascontiguousarray(part).astype(np.uint64)
    mult = multipliers(0xBA4D + band, part.shape[1])
    with np.errstate(over="ignore"):
        return _splitmix64((part * mult).sum(axis=1, dtype=np.uint64))
