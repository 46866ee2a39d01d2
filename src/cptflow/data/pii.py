"""PII stage: mask e-mail addresses, phone numbers and Chinese resident ID-card numbers.

Documents are never dropped here; matches are replaced by a token (``<EMAIL>``, ``<PHONE>``,
``<ID_CARD>`` by default) so the model still sees that an address stood there, without learning
any real one.

Precision matters as much as recall: the corpus is full of digit runs that are not phones (years,
prices, sizes, timestamps, hex constants, ids in code). So every pattern is anchored on ASCII
boundaries (a match may not touch another letter, digit, ``_`` or ``.``; Han characters around a
number are fine because Chinese puts no space before one), and

* Chinese mobiles are exactly ``1[3-9]`` + 9 digits (separators ``-``/space as 3-4-4), optionally
  after ``+86``/``0086``;
* landlines need the area code set off (``010-12345678``, ``(0755)1234567``, ``0755 1234567``),
  since an unseparated ``0`` + 10 digits could be anything;
* international numbers need a leading ``+`` and 8-15 digits in total (E.164), and 10 or more when
  written without separators, so ``+10000000`` in a formula stays;
* ID cards must have a valid province code, a real birth date (1900-2099) and the ISO 7064
  MOD 11-2 check character, so a random 18-digit number passes with probability < 1/11/30.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import PathLike, atomic_path, dumps_record, iter_jsonl, open_text
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest

# 2: possessive phone groups (linear time)
VERSION = 3
log = logging.getLogger("cptflow.data.pii")

_L = r"(?<![0-9A-Za-z_.])"  # left boundary: no ASCII word character or dot before
_R = r"(?![0-9A-Za-z_])"  # right boundary: no ASCII word character after
# Not mail domains: file extensions (icon@2x.png) and LAN host suffixes (ssh www-data@box.local).
_NOT_TLDS = "local|localdomain|lan|png|jpe?g|gif|svg|webp|ico|css|js|ts|json|rs|py|md|html?|txt|pdf|zip|gz|exe"
EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
    rf"(?!(?:{_NOT_TLDS})\b)[A-Za-z]{{2,24}}(?![A-Za-z0-9_-]|\.[A-Za-z0-9])"  # the whole domain, no prefix of it
    r"(?!:[~/\w])",  # "user@host:path" is scp/ssh syntax (the zh_web bash tutorial has many), not mail
)
_CN_PREFIX = r"(?:(?:\+|00)86[ -]?)?"
MOBILE_RE = re.compile(rf"{_L}{_CN_PREFIX}1[3-9]\d(?:[ -]?\d{{4}}){{2}}{_R}")
_AREA = r"0(?:10|2\d|[3-9]\d\d)"  # 010 and 02x are the 3-digit area codes, the rest have 4 digits
LANDLINE_RE = re.compile(rf"{_L}{_CN_PREFIX}(?:\({_AREA}\)[ -]?|{_AREA}[ -])\d{{7,8}}{_R}")
# Possessive digit groups (`\d{1,4}+`, `{1,5}+`): after a failed match the engine would otherwise try
# every way of splitting a long digit run into groups (thousands per "+"; 6 s for 1 MB of
# "+1111...1 "). Greedy groups already take every digit, so no valid match needs the retries.
INTL_RE = re.compile(rf"(?<![0-9A-Za-z_.+])\+[1-9]\d{{0,2}}(?:[ -]?\(?\d{{1,4}}+\)?){{1,5}}+{_R}")
ID_CARD_RE = re.compile(rf"{_L}\d{{17}}[\dXx]{_R}")

_PROVINCES = frozenset(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 61 62 63 64 65 71 81 82 83".split()
)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


@dataclass(frozen=True)
class PiiConfig:
    """Settings of the pii stage (config section ``pii:``)."""

    mask_email: bool = True  # replace e-mail addresses
    email_token: str = "<EMAIL>"  # what replaces them
    mask_phone: bool = True  # Chinese mobiles and landlines, international +CC numbers
    phone_token: str = "<PHONE>"
    mask_id_card: bool = True  # Chinese resident ID-card numbers (18 characters, checksum-valid)
    id_card_token: str = "<ID_CARD>"


def valid_id_card(number: str) -> bool:
    """Province code, birth date and ISO 7064 MOD 11-2 check character of an 18-character ID."""
    if len(number) != 18 or not number[:17].isdigit() or number[:2] not in _PROVINCES:
        return False
    try:
        birth = datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    if not 1900 <= birth.year <= 2099:
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == number[17].upper()


def _intl_ok(m: re.Match[str]) -> bool:
    s = m.group(0)
    digits = sum(c.isdigit() for c in s)
    separated = any(c in " -()" for c in s)
    return 8 <= digits <= 15 and (separated or digits >= 10)


def mask_pii(text: str, cfg: PiiConfig) -> tuple[str, dict[str, int]]:
    """Mask PII in ``text``; return (masked text, {"email": n, "phone": n, "id_card": n}).

    Order: e-mails first (their local part may hold digits), then ID cards (18 digits, so no phone
    pattern can claim part of one), then phones. Tokens contain no digits or ``@``, so a later
    pattern never matches inside an earlier replacement.
    """
    counts = {"email": 0, "phone": 0, "id_card": 0}
    if cfg.mask_email and "@" in text:
        text, counts["email"] = EMAIL_RE.subn(cfg.email_token, text)
    if not any(c.isdigit() for c in text):
        return text, counts

    if cfg.mask_id_card:
        def id_sub(m: re.Match[str]) -> str:
            if valid_id_card(m.group(0)):
                counts["id_card"] += 1
                return cfg.id_card_token
            return m.group(0)

        text = ID_CARD_RE.sub(id_sub, text)
    if cfg.mask_phone:
        def mobile_sub(m: re.Match[str]) -> str:
            # 15000000000 is fifteen billion, not a phone: round amounts end in eight zeros
            if re.sub(r"\D", "", m.group(0)).endswith("00000000"):
                return m.group(0)
            counts["phone"] += 1
            return cfg.phone_token

        text = MOBILE_RE.sub(mobile_sub, text)
        text, n_land = LANDLINE_RE.subn(cfg.phone_token, text)

        def intl_sub(m: re.Match[str]) -> str:
            if _intl_ok(m):
                counts["phone"] += 1
                return cfg.phone_token
            return m.group(0)

        text = INTL_RE.sub(intl_sub, text)
        counts["phone"] += n_land
    return text, counts


def run(cfg: PiiConfig, input_path: PathLike, output: PathLike) -> Stats:
    """Mask PII in every document of an intermediate JSONL file (atomic output)."""
    stats = Stats()
    with atomic_path(output) as tmp, open_text(tmp, "w", like=output) as fo:
        for lineno, rec in enumerate(iter_jsonl(input_path), 1):
            text = rec.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{input_path}:{lineno}: record has no string 'text'")
            stats.update("docs_in")
            stats.update("chars_in", len(text))
            masked, counts = mask_pii(text, cfg)
            for kind, n in counts.items():
                stats.update(f"masked/{kind}", n)
            stats.update("docs_with_pii", int(any(counts.values())))
            out = dict(rec)
            out["text"] = masked
            fo.write(dumps_record(out) + "\n")
            stats.update("docs_out")
            stats.update("chars_out", len(masked))
    return stats


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="intermediate JSONL")
    p.add_argument("--output", required=True, help="same documents with PII masked (JSONL)")
    p.add_argument("--stats", required=True, help="provenance manifest (JSON)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(PiiConfig, params, "pii")
    verify_inputs([args.input])
    with Timer() as t:
        stats = run(cfg, args.input, args.output)
    write_manifest(
        args.stats, stage="pii", version=VERSION, params=to_dict(cfg), inputs=[args.input], stats=stats,
        seconds=t.seconds, outputs=[args.output],
    )
    log.info(
        "%s: %d docs, %d with PII; masked %d e-mail, %d phone, %d id card", args.input, stats["docs_in"],
        stats["docs_with_pii"], stats["masked/email"], stats["masked/phone"], stats["masked/id_card"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("pii", argv, _build, _run, "Mask e-mail addresses, phone numbers and ID-card numbers.")


if __name__ == "__main__":
    sys.exit(main())
