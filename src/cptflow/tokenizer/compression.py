"""Compression of held-out text: tokens per character, per language, one tokenizer beside another.

Tokens per character is what vocabulary expansion buys: LLaMA's tokenizer spends ~1.2 tokens per
Chinese character, Colossal-LLaMA-2's ~0.66 (fewer tokens = longer effective context, faster
training and inference). Characters are Unicode code points of the text (``len(text)``), the same
unit as bits per character in the eval stage. Tokens never include BOS/EOS, and a literal "<s>" in
the text counts as the characters it is made of, as sentencepiece itself would encode it.

``compression(tokenizer, texts)`` accepts a ``sentencepiece.SentencePieceProcessor``, a Hugging Face
tokenizer, or any function from a string to ids, so the vocab and eval stages measure the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptflow.core.io import PathLike, atomic_path, iter_records, write_json

if TYPE_CHECKING:
    from cptflow.core.stats import Stats

VERSION = 1
Encode = Callable[[list[str]], list[list[int]]]


def encoder(tokenizer: Any) -> Encode:
    """A batch encoder (texts -> ids, no special tokens added) for any supported tokenizer."""
    import sentencepiece as spm

    if isinstance(tokenizer, spm.SentencePieceProcessor):
        return lambda texts: tokenizer.encode(list(texts))
    if hasattr(tokenizer, "convert_ids_to_tokens") and callable(tokenizer):  # Hugging Face
        def hf(texts: list[str]) -> list[list[int]]:
            if not texts:
                return []
            return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return hf
    if callable(tokenizer):
        return lambda texts: [list(tokenizer(t)) for t in texts]
    raise TypeError(f"cannot encode with {type(tokenizer).__name__}")


def vocab_size(tokenizer: Any) -> int | None:
    if hasattr(tokenizer, "get_piece_size"):
        return int(tokenizer.get_piece_size())
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return len(tokenizer)
    return None


def compression(tokenizer: Any, texts: Sequence[str], batch: int = 256) -> dict[str, Any]:
    """Tokens and characters of ``texts`` under ``tokenizer``, and their ratios."""
    enc = encoder(tokenizer)
    tokens = 0
    for i in range(0, len(texts), batch):
        tokens += sum(len(ids) for ids in enc(list(texts[i : i + batch])))
    chars = sum(len(t) for t in texts)
    return {
        "texts": len(texts),
        "chars": chars,
        "tokens": tokens,
        "tokens_per_char": tokens / chars if chars else None,
        "chars_per_token": chars / tokens if tokens else None,
    }


def compare(tokenizers: Mapping[str, Any], heldout: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """``compression`` of every tokenizer on every language; ``order`` keeps the table's row order."""
    return {
        "order": list(tokenizers),
        "languages": list(heldout),
        "tokenizers": {
            name: {"vocab_size": vocab_size(tok), **{lang: compression(tok, t) for lang, t in heldout.items()}}
            for name, tok in tokenizers.items()
        },
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown_table(report: Mapping[str, Any]) -> str:
    """The report as a markdown table (one row per tokenizer), as in the Colossal-LLaMA-2 README."""
    langs = report["languages"]
    units = ("tokens/char", "chars/token")
    head = ["tokenizer", "vocab size"] + [f"{lang} {unit}" for lang in langs for unit in units]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in report["order"]:
        row = report["tokenizers"][name]
        cells = [name, str(row["vocab_size"])]
        for lang in langs:
            cells += [_fmt(row[lang]["tokens_per_char"]), _fmt(row[lang]["chars_per_token"])]
        lines.append("| " + " | ".join(cells) + " |")
    first = report["tokenizers"][report["order"][0]] if report["order"] else {}
    sizes = ", ".join(f"{x} {first[x]['texts']} texts / {first[x]['chars']} characters" for x in langs if x in first)
    text = "\n".join(lines) + f"\n\nHeld-out text: {sizes}. Characters are Unicode code points; no BOS/EOS counted.\n"
    return text + (audit_markdown(report["audit"]) if report.get("audit") else "")


def audit_markdown(audit: Mapping[str, Any]) -> str:
    """One paragraph on the new tokens: how many, reachable, and how many held-out text uses."""
    n = audit["new_tokens"]
    used = "; ".join(
        f"held-out {lang} uses {row['new_tokens_used']} of them ({row['new_tokens_used_share']:.1%}), "
        f"{row['new_token_occurrences']} of its {row['tokens']} tokens"
        for lang, row in audit["heldout"].items()
    )
    return (f"\nNew tokens: {n}, {audit['reachable']} reachable on their own (encoding a token's own bytes "
            f"gives it alone), {audit['fragment_tokens']} of them start or end inside a character; {used}.\n")


def iter_texts(path: PathLike, lang: str = "", stats: Stats | None = None) -> Iterator[str]:
    """Texts of a JSONL (``.jsonl``/``.jsonl.gz``, field "text") or parquet (column "text") file.

    Records whose "lang" is present and differs from ``lang`` are skipped (counted in ``stats`` as
    ``docs_skipped/other_lang``); a missing or non-string text is an error naming the file and line.
    """
    def keep(rec_lang: Any) -> bool:
        if not lang or rec_lang in (None, lang):
            return True
        if stats is not None:
            stats.update("docs_skipped/other_lang")
        return False

    p = str(path)
    if p.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        names = pf.schema_arrow.names
        if "text" not in names:
            raise ValueError(f"{p}: no 'text' column (columns: {', '.join(names)})")
        cols = ["text"] + (["lang"] if "lang" in names else [])
        row = 0
        for batch in pf.iter_batches(columns=cols, batch_size=4096):
            data = batch.to_pydict()
            for i, text in enumerate(data["text"]):
                row += 1
                if not isinstance(text, str):
                    raise ValueError(f"{p}:row {row}: 'text' is {type(text).__name__}, not a string")
                if keep(data["lang"][i] if "lang" in data else None):
                    yield text
        return
    for lineno, rec in iter_records(p):
        text = rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{p}:{lineno}: no string field 'text'")
        if keep(rec.get("lang")):
            yield text


def read_texts(path: PathLike) -> list[str]:
    """All texts of a held-out file (JSONL with "text", or parquet with a "text" column)."""
    return list(iter_texts(path))


def sp_tokenizer(model: Any) -> Any:
    """A SentencePiece processor from a ModelProto, serialized bytes or a .model path."""
    import sentencepiece as spm

    if hasattr(model, "SerializeToString"):
        return spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    if isinstance(model, bytes):
        return spm.SentencePieceProcessor(model_proto=model)
    return spm.SentencePieceProcessor(model_file=str(model))


def load_tokenizer(path: PathLike) -> Any:
    """A ``.model`` file as sentencepiece, a folder as ``AutoTokenizer.from_pretrained``."""
    if str(path).endswith(".model"):
        return sp_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} expects NAME=PATH, got {item!r}")
        out[name] = value
    return out


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", action="append", required=True, help="NAME=PATH (.model file or HF folder); repeat")
    p.add_argument("--heldout", action="append", required=True, help="LANG=PATH of a JSONL with 'text'; repeat")
    p.add_argument("--report-json", required=True)
    p.add_argument("--report-md", default=None)


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    toks = {name: load_tokenizer(path) for name, path in _pairs(args.tokenizer, "--tokenizer").items()}
    heldout = {lang: read_texts(path) for lang, path in _pairs(args.heldout, "--heldout").items()}
    report = compare(toks, heldout)
    write_json(args.report_json, report)
    if args.report_md:
        with atomic_path(args.report_md) as tmp:
            Path(tmp).write_text(markdown_table(report), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    from cptflow.core.cli import stage_main

    return stage_main("compression", argv, _build, _run, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
