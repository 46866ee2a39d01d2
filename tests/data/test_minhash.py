"""The pure dedup core: normalisation, exact hashes, shingles, MinHash signatures (cptflow.data.minhash)."""

from __future__ import annotations

import dataclasses
import unicodedata

import numpy as np
import pytest
from conftest import schema_section, read_texts

from cptflow.core.config import ConfigError, from_dict
from cptflow.data.bands import find_pairs
from cptflow.data.minhash import (
    MERSENNE_31,
    DedupConfig,
    estimate_jaccard,
    exact_hash,
    minhash,
    normalise_for_hash,
    permutations,
    shingle_hashes,
)

CFG = DedupConfig()


@pytest.fixture(scope="module")
def zh_docs(demo_dir):
    return read_texts(demo_dir / "corpus" / "zh_web" / "cmrc2018_dev.jsonl", 40)


@pytest.fixture(scope="module")
def en_docs(demo_dir):
    return read_texts(demo_dir / "corpus" / "en_replay" / "devils_dictionary.jsonl", 10)


def test_nfkc_alone_does_not_unify_chinese_punctuation():
    # Why normalise_for_hash removes punctuation instead of trusting NFKC: these stay different
    # ("…" is one NFKC does map, to "...").
    assert unicodedata.normalize("NFKC", "…") == "..."
    for full, half in [("。", "."), ("“", '"'), ("”", '"'), ("‘", "'"), ("《", "<"), ("【", "["), ("—", "-"), ("、", ",")]:
        assert unicodedata.normalize("NFKC", full) != half


def test_normalise_unifies_width_punctuation_and_spacing(zh_docs):
    text = zh_docs[0]
    assert "，" in text and "。" in text
    half = (text.replace("，", ",").replace("。", ".").replace("“", '"').replace("”", '"')
            .replace("（", "(").replace("）", ")").replace("：", ":").replace("《", "「").replace("》", "」"))
    spaced = " \n".join(half[i:i + 17] for i in range(0, len(half), 17)) + "\u200b\ufeff"
    assert half != text and spaced != text
    assert normalise_for_hash(spaced, "zh") == normalise_for_hash(text, "zh")
    assert exact_hash(spaced, "zh") == exact_hash(text, "zh")
    # the characters themselves survive: only punctuation and layout went
    norm = normalise_for_hash(text, "zh")
    assert "，" not in norm and "。" not in norm and " " not in norm
    assert sum(unicodedata.category(c) == "Lo" for c in norm) == sum(unicodedata.category(c) == "Lo" for c in text)
    for a, b in [("【注意】《书名》……“引号”——破折号、顿号", "[注意]「书名」... \"引号\" -- 破折号,顿号"),
                 ("ＡＢＣ１２３，全角", "abc123, 全角"), ("第一行\n\n第二行", "第一行 第二行")]:
        assert normalise_for_hash(a, "zh") == normalise_for_hash(b, "zh"), (a, b)


def test_normalise_english_keeps_word_boundaries(en_docs):
    text = en_docs[3]
    variant = text.upper().replace("\n", "  \n ").replace(",", "，").replace('"', "“")
    assert exact_hash(variant, "en") == exact_hash(text, "en")
    assert normalise_for_hash("Don't  stop,\tnow.", "en") == "don t stop now"
    assert normalise_for_hash("a b", "en") != normalise_for_hash("ab", "en")
    # a changed word is a different text
    assert exact_hash(text.replace("Harmony", "Discord"), "en") != exact_hash(text, "en")


def test_exact_hash_tells_different_documents_apart(zh_docs, en_docs):
    hashes = {exact_hash(t, "zh") for t in zh_docs} | {exact_hash(t, "en") for t in en_docs}
    assert len(hashes) == len(zh_docs) + len(en_docs)


def test_short_document_is_one_shingle_not_none(demo_dir):
    # Poem titles like "行宮 元稹" normalise to 4 characters, fewer than one 5-character shingle.
    titles = sorted({t.split("\n")[0] for t in read_texts(demo_dir / "corpus" / "zh_books" / "mengxue_tang300.jsonl")})
    short = [t for t in titles if len(normalise_for_hash(t, "zh")) < CFG.shingle_chars][:40]
    assert len(short) >= 20
    for t in short:
        assert len(shingle_hashes(t, "zh", CFG)) == 1
    words = ["Harmony.", "The mother of caution.", "An instrument", "Yes, yes"]
    sig = minhash(short + words, ["zh"] * len(short) + ["en"] * len(words), CFG)
    # an empty shingle set would leave every entry at its maximum and all of these would collide
    assert len({row.tobytes() for row in sig}) == len(short) + len(words)
    assert (sig < np.uint32(MERSENNE_31)).all()
    assert len(find_pairs(sig, None, CFG, range(CFG.bands))) == 0


def test_shingle_counts():
    assert len(shingle_hashes("一二三四五六七八九十", "zh", CFG)) == 10 - 5 + 1
    assert len(shingle_hashes("one two three four five six seven", "en", CFG)) == 7 - 5 + 1
    # whitespace and punctuation inside Chinese do not create or break shingles
    assert np.array_equal(shingle_hashes("一二三，四五\n六七八九十", "zh", CFG), shingle_hashes("一二三四五六七八九十", "zh", CFG))
    assert len(shingle_hashes("", "zh", CFG)) == 1


def _reference_minhash(texts, langs, cfg):
    """Plain Python: min over shingles of (a*x + b) mod p, one permutation at a time."""
    a, b = permutations(cfg)
    p = int(MERSENNE_31)
    out = []
    for t, lg in zip(texts, langs):
        xs = [int(x) for x in shingle_hashes(t, lg, cfg)]
        out.append([min((int(ai) * x + int(bi)) % p for x in xs) for ai, bi in zip(a, b)])
    return np.array(out, dtype=np.uint32)


def test_vectorised_minhash_equals_reference(zh_docs, en_docs):
    cfg = DedupConfig(num_perm=12, bands=4, rows=3)
    long_doc = "\n".join(en_docs) * 2  # > 8192 shingles: the block-by-block path
    texts = zh_docs[:6] + [long_doc] + en_docs[:3] + ["短"]
    langs = ["zh"] * 6 + ["en"] * 4 + ["zh"]
    assert len(shingle_hashes(long_doc, "en", cfg)) > 8192
    assert np.array_equal(minhash(texts, langs, cfg), _reference_minhash(texts, langs, cfg))


def _edit(text: str, n_edits: int, rng: np.random.Generator) -> str:
    chars = list(text)
    for _ in range(n_edits):
        i = int(rng.integers(0, len(chars)))
        chars[i] = "的" if chars[i] != "的" else "了"
    return "".join(chars)


def test_estimated_jaccard_is_close_to_true(zh_docs):
    rng = np.random.default_rng(0)
    texts, truth = [], []
    for t in zh_docs[:20]:
        e = _edit(t, int(rng.integers(1, 30)), rng)
        a, b = set(shingle_hashes(t, "zh", CFG).tolist()), set(shingle_hashes(e, "zh", CFG).tolist())
        truth.append(len(a & b) / len(a | b))
        texts += [t, e]
    sig = minhash(texts, ["zh"] * len(texts), CFG)
    est = estimate_jaccard(sig[0::2], sig[1::2])
    err = np.abs(est - np.array(truth))
    assert min(truth) < 0.6 < 0.9 < max(truth)  # the pairs span the range around the threshold
    assert err.mean() < 0.04 and err.max() < 0.12  # std of the estimate is sqrt(J(1-J)/120) <= 0.046


def test_signatures_depend_on_seed_only_through_config(zh_docs):
    a = minhash(zh_docs[:5], ["zh"] * 5, CFG)
    assert np.array_equal(a, minhash(zh_docs[:5], ["zh"] * 5, DedupConfig()))
    assert not np.array_equal(a, minhash(zh_docs[:5], ["zh"] * 5, DedupConfig(seed=2)))


def test_config_checks():
    with pytest.raises(ValueError, match="bands \\* rows"):
        DedupConfig(num_perm=128, bands=20, rows=6)
    with pytest.raises(ValueError, match="band_groups"):
        DedupConfig(band_groups=21)
    with pytest.raises(ValueError, match="min_jaccard"):
        DedupConfig(min_jaccard=0)
    with pytest.raises(ConfigError, match="threshold"):
        from_dict(DedupConfig, {"threshold": 0.8}, "dedup")


def test_schema_fragment_matches_config(repo):
    schema = schema_section("dedup")
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    fields = {f.name: f.default for f in dataclasses.fields(DedupConfig)}
    assert set(props) == set(fields)
    for name, default in fields.items():
        assert props[name]["default"] == default, name
        assert props[name]["description"]


def test_signature_is_linear_time_on_pathological_text():
    """The signature stage's per-document work (normalisation for hashing, character shingles, MinHash,
    exact hash) on 256 KiB pathological inputs: within 10x the time of real text of the same size."""
    from support.linear_time import assert_linear

    cfg = DedupConfig()
    assert_linear(lambda t: (minhash([t], ["zh"], cfg), exact_hash(t, "en")), size=1 << 18)
