"""The three conversation formats, read into one form: ``[{"role": system|user|assistant, "content": str}]``.

* Firefly: ``{"conversation": [{"human": ..., "assistant": ...}, ...]}`` (optional top-level ``"system"``);
* ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``;
* OpenAI messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.

A conversation is good when it is an optional system message followed by user/assistant turns that
alternate, starting with the user and ending with the assistant, with no empty user or assistant
text. Anything else is rejected with a ``<why>`` reason the conversations stage quarantines, plus a
detail naming the turn, so a person can fix the line. Reasons (prefixed ``sft_``): ``bad_utf8``,
``bad_json``, ``not_object``, ``unknown_format`` (none of the three keys, or not a list),
``no_turns``, ``bad_turn`` (not an object, missing key, text not a string), ``unknown_role``,
``empty_user``, ``empty_assistant``, ``not_alternating``.
"""

from __future__ import annotations

import json
import re
from typing import Any

ROLES = ("system", "user", "assistant")
# ShareGPT dumps name the speakers in several ways; anything else (tool calls, observations) is not a
# chat turn this branch can train on, and is rejected rather than guessed.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant"}
FORMAT_KEYS = {"firefly": "conversation", "sharegpt": "conversations", "messages": "messages"}
_SURROGATE_RE = re.compile("[\ud800-\udfff]")

Messages = list[dict[str, str]]


class BadConversation(ValueError):
    """A conversation that cannot be trained on: ``reason`` for counting, the message for a person."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def detect_format(obj: dict[str, Any]) -> str:
    for fmt, key in FORMAT_KEYS.items():
        if key in obj:
            return fmt
    raise BadConversation("sft_unknown_format", f"none of the keys {sorted(FORMAT_KEYS.values())} "
                                                f"(has {sorted(obj)[:8]})")


def _text(turn: dict[str, Any], key: str, i: int) -> str:
    if key not in turn:
        raise BadConversation("sft_bad_turn", f"turn {i}: no {key!r}")
    value = turn[key]
    if not isinstance(value, str):
        raise BadConversation("sft_bad_turn", f"turn {i}: {key!r} is {type(value).__name__}, not a string")
    if _SURROGATE_RE.search(value):
        raise BadConversation("sft_bad_utf8", f"turn {i}: {key!r} holds an unpaired surrogate")
    return value


def _turns(obj: dict[str, Any], fmt: str) -> list[Any]:
    turns = obj.get(FORMAT_KEYS[fmt])
    if not isinstance(turns, list):
        raise BadConversation("sft_unknown_format", f"{FORMAT_KEYS[fmt]!r} is {type(turns).__name__}, not a list")
    if not turns:
        raise BadConversation("sft_no_turns", f"{FORMAT_KEYS[fmt]!r} is empty")
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise BadConversation("sft_bad_turn", f"turn {i}: {type(t).__name__}, not an object")
    return turns


def to_messages(obj: dict[str, Any], fmt: str = "auto") -> Messages:
    """The conversation of one parsed line as role/content messages (not yet checked: see ``check``)."""
    fmt = detect_format(obj) if fmt == "auto" else fmt
    turns = _turns(obj, fmt)
    out: Messages = []
    if fmt == "firefly":
        if obj.get("system") is not None and _text(obj, "system", -1).strip():  # "" = no system prompt
            out.append({"role": "system", "content": obj["system"]})
        for i, t in enumerate(turns):
            out += [{"role": "user", "content": _text(t, "human", i)},
                    {"role": "assistant", "content": _text(t, "assistant", i)}]
        return out
    role_key, text_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    for i, t in enumerate(turns):
        role = _text(t, role_key, i)
        canonical = SHAREGPT_ROLES.get(role) if fmt == "sharegpt" else (role if role in ROLES else None)
        if canonical is None:
            raise BadConversation("sft_unknown_role", f"turn {i}: role {role!r}")
        out.append({"role": canonical, "content": _text(t, text_key, i)})
    return out


def check(messages: Messages) -> Messages:
    """Raise BadConversation unless: [system], then user/assistant alternating, user first, assistant last."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise BadConversation("sft_no_turns", "only a system message")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            where = "after the system message" if m["role"] == "system" else f"turn {i}"
            raise BadConversation("sft_not_alternating", f"{where}: {m['role']} where {want} was expected")
        if not m["content"].strip():
            raise BadConversation(f"sft_empty_{want}", f"turn {i}: empty {want} text")
    if body[-1]["role"] != "assistant":
        raise BadConversation("sft_not_alternating", "ends with a user turn that has no answer")
    return messages


def parse_line(raw: bytes, fmt: str = "auto") -> Messages:
    """One raw JSONL line → checked messages, or BadConversation."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadConversation("sft_bad_utf8", f"byte {e.start} is not UTF-8") from None
    try:
        obj = json.loads(line.lstrip("\ufeff"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise BadConversation("sft_bad_json", str(e)[:120]) from None
    if not isinstance(obj, dict):
        raise BadConversation("sft_not_object", f"a JSON {type(obj).__name__}, not an object")
    return check(to_messages(obj, fmt))


def plain_text(messages: Messages) -> str:
    """All message texts, one per line: what decontamination matches against benchmark questions."""
    return "\n".join(m["content"] for m in messages)
