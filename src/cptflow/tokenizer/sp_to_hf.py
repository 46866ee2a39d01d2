"""The Hugging Face form of a SentencePiece BPE model: ``tokenizer.json`` that gives sentencepiece's own ids.

transformers 5 converts a bare ``tokenizer.model`` with merges ranked by id and a ``Metaspace``
pre-tokenizer, which on the Mistral base splits runs of spaces unlike sentencepiece and would rank
appended pieces by id whatever their score. ``build_hf_tokenizer`` builds it from the proto itself
(merges ranked by score, a Llama-2-style normaliser), ``save_hf_tokenizer`` writes the folder
``AutoTokenizer`` loads, and ``verify_hf`` reloads it and compares ids with sentencepiece.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as pb

from cptflow.core.io import PathLike, dumps_json
from cptflow.tokenizer.sp_merge import CONTROL, NORMAL, PROBES, UNKNOWN, USER_DEFINED, WS, processor


def bpe_merges(proto: pb.ModelProto) -> list[tuple[str, str]]:
    """Merge rules for a fast (``tokenizers``) BPE that reproduces SentencePiece BPE exactly.

    SentencePiece merges by the *score* of the resulting piece; ``tokenizers`` by merge rank. So the
    rank order is score descending (ties: lower id first, then longer left part). transformers 5
    converts a bare ``tokenizer.model`` with merges ranked by *id*, which on the Mistral base splits
    runs of spaces unlike sentencepiece (10 of the 11 Python files of this repo when measured) and
    would rank appended pieces by id whatever their score. Only NORMAL pieces take part:
    SentencePiece never produces control, byte or user-defined pieces by merging.
    """
    normal = {p.piece: (i, p.score) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = []
    for piece, (i, score) in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, -len(left), left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _added_token(content: str, special: bool):  # -> tokenizers.AddedToken
    from tokenizers import AddedToken

    return AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)


def build_hf_tokenizer(proto: pb.ModelProto, *, add_bos: bool = True, add_eos: bool = False) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes every text to SentencePiece's own ids.

    Built directly from the proto rather than by transformers' converter, whose transformers 5
    version ranks merges by id (see ``bpe_merges``) and uses a ``Metaspace`` pre-tokenizer that adds
    no dummy prefix when a text already starts with a space (" lead" -> [▁lead] where sentencepiece
    gives [▁, ▁lead]). Here, as in the published Llama-2 ``tokenizer.json``: a normaliser that
    prepends "▁" (if the model adds a dummy prefix) and turns spaces into "▁", no pre-tokeniser, BPE
    with byte fallback, and a decoder that undoes exactly that.
    """
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise ValueError("only SentencePiece BPE models can be expanded by appending pieces")
    if proto.normalizer_spec.name not in ("identity", "") or proto.normalizer_spec.precompiled_charsmap:
        raise ValueError(f"SentencePiece normaliser {proto.normalizer_spec.name!r} is not supported (only identity)")
    if proto.normalizer_spec.remove_extra_whitespaces or proto.trainer_spec.treat_whitespace_as_suffix:
        raise ValueError("remove_extra_whitespaces / treat_whitespace_as_suffix models are not supported")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    if len(vocab) != len(proto.pieces):
        raise ValueError("duplicate pieces in the SentencePiece model")
    ts = proto.trainer_spec
    bpe = BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=ts.unk_piece, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    dummy = proto.normalizer_spec.add_dummy_prefix
    norm = [normalizers.Prepend(WS)] if dummy else []
    tok.normalizer = normalizers.Sequence([*norm, normalizers.Replace(" ", WS)])
    tok.pre_tokenizer = None
    dec = [decoders.Replace(WS, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if dummy else []))
    # Control and unknown pieces are special (never produced from text by sentencepiece); user-defined
    # pieces are matched in the text as sentencepiece does. Both keep their ids (they are in the vocab).
    tok.add_tokens([_added_token(p.piece, False) for p in proto.pieces if p.type == USER_DEFINED])
    tok.add_special_tokens([_added_token(p.piece, True) for p in proto.pieces if p.type in (UNKNOWN, CONTROL)])
    bos, eos = ts.bos_piece, ts.eos_piece
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


def check_base_config(config: dict, base: pb.ModelProto) -> None:
    """Refuse a base whose Hugging Face config adds tokens beyond (or over) the SentencePiece vocab.

    Such tokens (e.g. a ``<pad>`` at id 32000) would sit exactly where the new pieces go: appending
    would move them, breaking "base ids never move".
    """
    n = len(base.pieces)
    for key, tok in (config.get("added_tokens_decoder") or {}).items():
        i, content = int(key), tok["content"] if isinstance(tok, dict) else str(tok)
        if i >= n:
            raise ValueError(f"base tokenizer_config.json adds {content!r} at id {i} >= SentencePiece vocab size {n}")
        if base.pieces[i].piece != content:
            raise ValueError(f"base tokenizer_config.json maps id {i} to {content!r}, tokenizer.model to "
                             f"{base.pieces[i].piece!r}")


def save_hf_tokenizer(proto: pb.ModelProto, out_dir: PathLike, base_config: dict | None = None) -> None:
    """Write ``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``.

    ``tokenizer_class`` is ``PreTrainedTokenizerFast``: transformers 5's ``LlamaTokenizer`` rebuilds its
    normaliser from keyword arguments and ignores the one in ``tokenizer.json`` (and, on load from a
    bare ``tokenizer.model``, merges by id), so only the generic class reproduces sentencepiece (it
    exists in transformers 4 too; ``AutoTokenizer.from_pretrained`` loads it). BOS/EOS addition, the chat
    template(s) and ``model_max_length`` are taken from the base's ``tokenizer_config.json``, read with
    ``cptflow.tokenizer.chat_templates.tokenizer_config`` so that a template kept in ``chat_template.jinja``
    (transformers 5) is carried too; transformers 5 writes it to ``chat_template.jinja`` here.
    """
    from transformers import PreTrainedTokenizerFast

    cfg = dict(base_config or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    add_bos, add_eos = bool(cfg.get("add_bos_token", True)), bool(cfg.get("add_eos_token", False))
    ts = proto.trainer_spec
    names = {"bos_token": ts.bos_piece, "eos_token": ts.eos_piece, "unk_token": ts.unk_piece}
    pad = cfg.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if ts.pad_id >= 0:
        names["pad_token"] = ts.pad_piece
    elif isinstance(pad, str) and any(p.piece == pad for p in proto.pieces):
        names["pad_token"] = pad
    kwargs = {k: cfg[k] for k in ("chat_template", "model_max_length") if isinstance(cfg.get(k), (str, int, dict))}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_hf_tokenizer(proto, add_bos=add_bos, add_eos=add_eos),
        clean_up_tokenization_spaces=False, **names, **kwargs,
    )
    fast.save_pretrained(str(out))
    conf_path = out / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8"))
    for leaked in ("is_local", "local_files_only", "name_or_path"):
        conf.pop(leaked, None)
    conf.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos, add_eos_token=add_eos)
    conf_path.write_text(dumps_json(conf), encoding="utf-8")
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {k: {"content": v, **flags} for k, v in names.items()}
    (out / "special_tokens_map.json").write_text(dumps_json(special_map), encoding="utf-8")


def verify_hf(out_dir: PathLike, proto: pb.ModelProto, texts: Sequence[str]) -> None:
    """Reload the saved folder with ``AutoTokenizer`` and check it against sentencepiece itself.

    Same vocabulary and special ids; ids identical to ``sentencepiece.encode`` on every text (and on
    ``PROBES``) and the decode gives the text back. ``split_special_tokens=True``: sentencepiece never turns a literal
    "<s>" or "[INST]" in text into a control id, while a Hugging Face tokenizer does by default.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    n = len(proto.pieces)
    if len(tok) != n:
        raise ValueError(f"Hugging Face tokenizer has {len(tok)} tokens, the SentencePiece model {n}")
    pieces = tok.convert_ids_to_tokens(list(range(n)))
    bad = next((i for i in range(n) if pieces[i] != proto.pieces[i].piece), None)
    if bad is not None:
        raise ValueError(f"id {bad} is {pieces[bad]!r} in Hugging Face, {proto.pieces[bad].piece!r} in SentencePiece")
    ts = proto.trainer_spec
    for name, want in (("bos", ts.bos_id), ("eos", ts.eos_id), ("unk", ts.unk_id)):
        if want >= 0 and getattr(tok, f"{name}_token_id") != want:
            raise ValueError(f"Hugging Face {name}_token_id {getattr(tok, f'{name}_token_id')} != {want}")
    sp = processor(proto)
    texts = [*texts, *PROBES]
    got = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for k, (text, ids) in enumerate(zip(texts, got, strict=True)):
        if ids != sp.encode(text):
            raise ValueError(f"Hugging Face and sentencepiece ids differ on text {k}: {text[:60]!r}")
        back = tok.decode(ids)
        if back != text.replace(WS, " "):
            raise ValueError(f"Hugging Face round trip fails on text {k}: {text[:60]!r} -> {back[:60]!r}")
