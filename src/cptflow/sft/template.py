"""Chat templates, and a conversation turned into token ids with a loss mask on every assistant turn.

The template is a Jinja chat template as Hugging Face tokenizers carry it (``chat_template``): the base
tokenizer's own when it has one, else Firefly's layout, which Firefly trains its LLaMA-family models
with (``<s>`` once, then every user and every assistant text followed by ``</s>``; a system prompt, which
Firefly's data does not have, goes before the first user text, separated by a blank line)::

    <s>{system}\\n\\n{user 1}</s>{assistant 1}</s>{user 2}</s>{assistant 2}</s>

Encoding renders the whole conversation once and tokenizes it once — exactly what
``apply_chat_template(..., tokenize=True)`` gives at inference — and takes the loss positions from
character spans: assistant turn i covers the characters between the rendering of the turns before it
with the generation prompt (``add_generation_prompt=True``) and the rendering including it. So the loss
covers the reply and whatever the template closes it with (the ``</s>`` the model must learn to stop
with), never the role header the template writes before it; a token belongs to the turn its first
character does. This needs a template whose earlier turns render the same when later turns are added
(true of Firefly's, ChatML, LLaMA-2/Mistral without a system prompt); a conversation for which it does
not hold is dropped and counted (``sft_pack_template_not_incremental``), never masked wrongly.

A conversation's text must not contain the tokenizer's special-token strings (a literal ``</s>`` in a
reply would end the turn early); such conversations are dropped and counted
(``sft_pack_special_token_in_text``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FIREFLY_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"  # a tokenizer without BOS (Qwen) starts with the first text
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


class Unencodable(ValueError):
    """A conversation this template/tokenizer cannot encode with a correct mask: dropped, counted by reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def own_template(tokenizer: Any) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is the chat template
        own = own.get("default")
    return own if isinstance(own, str) and own.strip() else None


def resolve_template(setting: str, tokenizer: Any, base_tokenizer: Any = None) -> tuple[str, str]:
    """(template text, where it came from) for ``sft.sft_pack.chat_template``.

    ``auto`` takes the start model's tokenizer's template, else the base model's (a tokenizer expanded
    from it keeps the base's special tokens, and so its template, even where its files lost the
    template), else Firefly's layout.
    """
    if setting == "auto":
        for name, tok in (("tokenizer", tokenizer), ("base tokenizer", base_tokenizer)):
            if tok is not None and own_template(tok):
                return own_template(tok), name
        return FIREFLY_TEMPLATE, "firefly"
    if setting == "firefly":
        return FIREFLY_TEMPLATE, "firefly"
    path = Path(setting)
    if not path.is_file():
        raise ValueError(f"sft.sft_pack.chat_template: {setting!r} is neither auto, firefly nor an existing file")
    return path.read_text(encoding="utf-8"), str(path)


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """One regex over every string the tokenizer turns into an added/special token."""
    words = {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
    words = sorted((w for w in words if w), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, words))) if words else None


@dataclass
class Encoded:
    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n]: 1 = this token is a target (part of an assistant turn)
    turn_ends: list[int]  # tokens up to the end of each assistant turn (where a cut keeps whole turns)
    prompt_end: int  # tokens before the first assistant reply: the part a cut never enters


def assistant_spans(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn."""
    text = render(tokenizer, template, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(tokenizer, template, messages[:i], generation_prompt=True)
        upto = render(tokenizer, template, messages[: i + 1])
        if not (upto.startswith(head) and text.startswith(upto)):
            raise Unencodable("sft_pack_template_not_incremental",
                              f"turn {i}: the template renders earlier turns differently once later ones are added")
        spans.append((len(head), len(upto)))
    return text, spans


def encode(tokenizer: Any, template: str, messages: list[dict[str, str]],
           special: re.Pattern[str] | None = None) -> Encoded:
    """Token ids and loss mask of one conversation (the module doc says which tokens are targets)."""
    if special is not None:
        for i, m in enumerate(messages):
            hit = special.search(m["content"])
            if hit:
                raise Unencodable("sft_pack_special_token_in_text", f"turn {i} contains {hit.group()!r}")
    text, spans = assistant_spans(tokenizer, template, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:
        mask[(starts >= a) & (starts < b)] = 1
    # Offsets never decrease, so "tokens starting before character c" is a searchsorted.
    turn_ends = [int(np.searchsorted(starts, b, side="left")) for _, b in spans]
    prompt_end = int(np.searchsorted(starts, spans[0][0], side="left"))
    return Encoded(ids, mask, turn_ends, prompt_end)


def fit(enc: Encoded, max_length: int) -> tuple[int, str]:
    """(tokens kept, how): the whole conversation, whole turns up to the last that fits, or — when even the
    first reply does not fit — the first prompt whole and its reply cut; a prompt alone too long is dropped."""
    n = len(enc.input_ids)
    if n <= max_length:
        return n, "whole"
    whole_turns = [k for k in enc.turn_ends if k <= max_length]
    if whole_turns:
        return whole_turns[-1], "turns_dropped"
    if enc.prompt_end < max_length:
        return max_length, "reply_cut"
    raise Unencodable("sft_pack_prompt_too_long", f"the first user turn alone takes {enc.prompt_end} tokens "
                                                  f"(max_length {max_length})")


def install_template(model_dir: str | Path, template: str) -> None:
    """Make ``template`` the chat template of the tokenizer in ``model_dir`` (tokenizer_config.json, and
    chat_template.jinja where transformers 5 keeps it), so the released model is used as it was trained."""
    d = Path(model_dir)
    conf_path = d / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    conf["chat_template"] = template
    conf_path.write_text(json.dumps(conf, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (d / "chat_template.jinja").is_file():
        (d / "chat_template.jinja").write_text(template, encoding="utf-8")
