"""Expanding a byte-level BPE tokenizer (``vocab.method: continued_bpe``): merges learned on top of the base's.

The base's ``tokenizer.json`` is changed in exactly two places: new tokens are added to ``model.vocab``
with ids after every existing id (after added/special tokens too: SmolLM2 keeps its specials at ids
0-16 inside the vocabulary, LLaMA-3 its 256 reserved specials at 128000-128255 outside it, and both stay
where they are), and new merges are appended after ``model.merges``. Normaliser, pre-tokeniser,
decoder, post-processor and added tokens are untouched, so the learned merges are exactly what
``cptflow.tokenizer.bpe_merges`` simulated. The folder written holds only what
``AutoTokenizer.from_pretrained`` reads; ``cptflow.tokenizer.bpe_verify`` checks it before the stage
renames it into place.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptflow.core.io import PathLike, atomic_path, dumps_json
from cptflow.core.stats import Stats, Timer
from cptflow.tokenizer.bpe_merges import Learned, byte_alphabet, bytes_token, char_count, implies_cjk, learn_merges
from cptflow.tokenizer.bpe_merges import token_bytes
from cptflow.tokenizer.chat_templates import copy_chat_templates
from cptflow.tokenizer.bpe_verify import audit, verify_expansion
from cptflow.tokenizer.sp_merge import has_cjk
from cptflow.tokenizer.training_text import training_lines
from cptflow.tokenizer.vocab_config import VocabConfig

#: Files of a Hugging Face tokenizer folder carried over from the base besides tokenizer.json.
SIDE_FILES = ("special_tokens_map.json", "added_tokens.json")  # and the chat templates (copy_chat_templates)
#: Keys transformers writes into tokenizer_config.json that describe the machine it ran on.
_LEAKED = ("is_local", "local_files_only", "name_or_path", "_commit_hash")


@dataclass
class ByteBPE:
    """A byte-level BPE base: its ``tokenizer.json`` as data and as a ``tokenizers.Tokenizer``."""

    data: dict[str, Any]
    tok: Any  # tokenizers.Tokenizer
    first_id: int  # the first free id: above every vocabulary entry and every added token

    @property
    def vocab(self) -> dict[str, int]:
        return self.data["model"]["vocab"]

    def token_bytes_by_id(self) -> dict[int, bytes]:
        """Bytes of every vocabulary entry written in the byte alphabet (specials like <|x|> too)."""
        alphabet = byte_alphabet()[1]
        return {i: token_bytes(t) for t, i in self.vocab.items() if all(c in alphabet for c in t)}


def load_base(path: PathLike) -> ByteBPE:
    from tokenizers import Tokenizer

    p = Path(path) / "tokenizer.json"
    text = p.read_text(encoding="utf-8")
    data = json.loads(text)
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens") or []]
    return ByteBPE(data, Tokenizer.from_str(text), max(ids) + 1)


def count_words(base: ByteBPE, lines: Iterable[str], require_cjk: bool) -> Counter:
    """Frequencies of the base's pre-tokens (byte-level strings) in ``lines``.

    With ``require_cjk`` a pre-token without a CJK character is left out: none of its merges could be
    allowed, so it would only cost memory.
    """
    norm, pre = base.tok.normalizer, base.tok.pre_tokenizer
    words: Counter = Counter()
    for line in lines:
        text = norm.normalize_str(line) if norm is not None else line
        for piece, (start, end) in pre.pre_tokenize_str(text):
            if not require_cjk or has_cjk(text[start:end]):
                words[piece] += 1
    return words


def learn(base: ByteBPE, words: Counter, cfg: VocabConfig) -> Learned:
    """Segment each word with the base BPE and learn ``cfg.max_new_tokens`` merges on top."""
    model, norm, pre = base.tok.model, base.tok.normalizer, base.tok.pre_tokenizer

    def segment_alone(data: bytes) -> list[int] | None:
        piece = bytes_token(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # a fragment of a character: only the model can be asked
            return [t.id for t in model.tokenize(piece)]
        if norm is not None and norm.normalize_str(text) != text:
            return None
        parts = pre.pre_tokenize_str(text)
        if len(parts) != 1 or parts[0][0] != piece:
            return None
        return [t.id for t in model.tokenize(piece)]

    def allowed(data: bytes) -> bool:
        return char_count(data) <= cfg.max_piece_chars and (not cfg.require_cjk or implies_cjk(data))

    segmented = (([t.id for t in model.tokenize(w)], n) for w, n in sorted(words.items()))
    return learn_merges(segmented, base.token_bytes_by_id(), base.first_id, max_merges=cfg.max_new_tokens,
                        min_count=cfg.min_pair_count, allowed=allowed, segment_alone=segment_alone)


def expanded_json(base: ByteBPE, learned: Learned) -> dict[str, Any]:
    """The base ``tokenizer.json`` with the learned tokens and merges appended; nothing else changes."""
    data = copy.deepcopy(base.data)
    model = data["model"]
    names = {i: t for t, i in model["vocab"].items()}
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    for a, b, c in learned.merges:
        names[c] = names[a] + names[b]
        model["vocab"][names[c]] = c
        model["merges"].append(f"{names[a]} {names[b]}" if as_strings else [names[a], names[b]])
    return data


def write_folder(data: dict[str, Any], base_dir: PathLike, out_dir: PathLike) -> None:
    """Write ``tokenizer.json`` and the base's side files; the config names the generic fast class.

    ``PreTrainedTokenizerFast`` runs tokenizer.json as written. A model-specific class (GPT2Tokenizer,
    Qwen2Tokenizer, ...) may rebuild parts of the pipeline from its own defaults in transformers 5,
    which is what the base's own ids were checked against, not what the merges were learned with.
    """
    from tokenizers import Tokenizer

    base, out = Path(base_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    Tokenizer.from_str(json.dumps(data)).save(str(out / "tokenizer.json"))
    conf_path = base / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    for key in _LEAKED:
        conf.pop(key, None)
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(dumps_json(conf), encoding="utf-8")
    for name in SIDE_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    copy_chat_templates(base, out)


def code_texts() -> list[str]:
    """Python source as the code sample that must keep its ids: cptflow's own modules (any install has them)."""
    root = Path(__file__).resolve().parents[1]
    return [p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))]


def take_chars(lines: list[str], max_chars: int) -> list[str]:
    """The first lines of the (seeded, shuffled) sample up to ``max_chars`` characters (0 = all)."""
    if max_chars <= 0:
        return lines
    total = 0
    for k, line in enumerate(lines):
        total += len(line)
        if total > max_chars:
            return lines[:k]
    return lines


def expand(
    cfg: VocabConfig, base_dir: Path, train_files: Sequence[PathLike], heldout: dict[str, list[str]],
    output_dir: PathLike, stats: Stats,
) -> tuple[dict[str, Any], Any, Any]:
    """Learn, build, save and verify the expanded tokenizer; returns (manifest facts, base, expanded).

    Everything is checked in the temporary folder before it is renamed to ``output_dir``.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    base = load_base(base_dir)
    sample, _ = training_lines(cfg, train_files, stats)
    lines = take_chars(sample, cfg.max_train_chars)
    if not lines:
        raise ValueError(f"no training lines in {', '.join(map(str, train_files)) or 'no files'} (empty, or no "
                         f"text of vocab.lang {cfg.lang!r}{' with a CJK character' if cfg.require_cjk else ''}?)")
    stats.update("lines_learned", len(lines))
    stats.update("chars_learned", sum(map(len, lines)))
    words = count_words(base, lines, cfg.require_cjk)
    del sample, lines
    stats.update("words_distinct", len(words))
    cpu = time.process_time()
    with Timer() as t_learn:
        learned = learn(base, words, cfg)
    cpu = time.process_time() - cpu
    for reason, n in learned.skipped.items():
        stats.update(f"merges_skipped/{reason}", n)
    data = expanded_json(base, learned)
    raw = Tokenizer.from_str(json.dumps(data))
    raw.encode_special_tokens = True  # as AutoTokenizer with split_special_tokens=True: "<|x|>" in text is text
    base_auto = AutoTokenizer.from_pretrained(str(base_dir))
    # Only text without CJK is guaranteed to keep its ids (and only with require_cjk).
    code = [t for t in code_texts() if not has_cjk(t)] if cfg.require_cjk else []
    same = heldout.get("en", []) + code if cfg.require_cjk else []
    with atomic_path(output_dir) as tmp:
        write_folder(data, base_dir, tmp)
        new_auto = AutoTokenizer.from_pretrained(str(tmp))
        verify_expansion(base_auto, new_auto, raw, base.data, data, base.first_id,
                         [t for rows in heldout.values() for t in rows], same, require_cjk=cfg.require_cjk)
        facts = audit(raw, new_auto, data, base.first_id, heldout)
    n = len(learned.merges)
    info = {"base_vocab_size": base.first_id, "vocab_size": base.first_id + n, "added": n,
            "first_new_id": base.first_id, "base_merges": len(base.data["model"]["merges"]),
            "last_pair_count": learned.last_count, "code_texts_same_ids": len(code),
            "learn_seconds": round(t_learn.seconds, 2), "learn_cpu_seconds": round(cpu, 2), "audit": facts}
    return info, base_auto, new_auto
