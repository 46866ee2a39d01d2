"""Timing a per-document function on pathological input against normal text of the same size.

A regex that backtracks is fine on ordinary text and quadratic on one long run (the trailing-space
pattern took 55 s on 100,000 spaces, an hour by extrapolation on 1 MB). So each stage's
per-document function is timed on 1 MiB inputs built to provoke that (runs of spaces, NBSP, one
repeated character, no newlines, deeply nested brackets, ...) and must finish within ``ratio`` times
its time on real demo text of the same size, plus a small floor for timer noise. A ratio, not an
absolute time: the bound moves with the machine. Each pathological call runs in a forked child that
is killed at the bound, so a quadratic function fails the test in seconds instead of hanging it.

Sizes: 1 MiB where regexes do the work (normalisation, ingest); less where the per-document work is
vectorised numpy or where every filter runs (a quadratic step still shows at 256 KiB: 100,000
spaces took 55 s), to keep all of these tests to about ten seconds together.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

SIZE = 1 << 20  # characters
REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "workflow" / "resources" / "demo" / "corpus"
NORMAL_FILES = {"en": DEMO / "en_replay" / "devils_dictionary.jsonl", "zh": DEMO / "zh_web" / "cmrc2018_dev.jsonl"}


def pathological(size: int = SIZE) -> dict[str, str]:
    half = size // 2
    return {
        "spaces": "a" + " " * size + "b",
        "nbsp": "a" + "\xa0" * size + "b",  # NFKC makes these spaces
        "ideographic_spaces": "好" + "\u3000" * size + "好",
        "tabs_and_spaces": "a" + " \t" * half + "b",
        "one_letter": "a" * size,
        "one_han": "好" * size,
        "no_newlines": "word " * (size // 5),
        "newlines": "a" + "\n" * size + "b",
        "space_newline": " \n" * half,
        "nested_brackets": "(" * half + ")" * half,
        "nested_mixed": "([{<" * (size // 8) + ">}])" * (size // 8),
        "digits": "1" * size,
        "phone_like": "+1111111111111111111111111 " * (size // 27),
        "email_like": "a@" + "a." * half,
        "stars": "*" * size,
    }


def normal(lang: str, size: int = SIZE) -> str:
    """``size`` characters of real demo text in ``lang`` (documents repeated, one per line)."""
    texts = [json.loads(line)["text"] for line in NORMAL_FILES[lang].read_text(encoding="utf-8").splitlines()]
    out, n = [], 0
    while n < size:
        for t in texts:
            out.append(t)
            n += len(t) + 1
            if n >= size:
                break
    return "\n".join(out)[:size]


def _seconds(fn: Callable[[str], object], text: str) -> float:
    start = time.perf_counter()
    fn(text)
    return time.perf_counter() - start


def _child(fn: Callable[[str], object], text: str, conn) -> None:  # noqa: ANN001
    conn.send(_seconds(fn, text))
    conn.close()


def assert_linear(fn: Callable[[str], object], size: int = SIZE, only: tuple[str, ...] = (),
                  langs: tuple[str, ...] = ("en", "zh"), ratio: float = 10.0, floor_s: float = 0.5) -> dict[str, float]:
    """Fail naming the input if ``fn`` takes over ``ratio`` x its time on normal text (+ ``floor_s``).

    ``only`` restricts the pathological inputs to those names; the times are returned per input."""
    fn(normal(langs[0], 1000))  # warm caches (lru tables, lazy imports) before anything is timed
    t_normal = max(_seconds(fn, normal(lang, size)) for lang in langs)
    bound = ratio * t_normal + floor_s
    ctx = multiprocessing.get_context("fork")
    times = {}
    for name, text in pathological(size).items():
        if only and name not in only:
            continue
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(fn, text, send))
        proc.start()
        send.close()
        got = recv.poll(bound + 1.0)  # +1 s for the fork itself
        if not got:
            proc.kill()
            proc.join()
            raise AssertionError(f"{name}: still running after {bound:.2f} s = {ratio} x {t_normal:.3f} s "
                                 f"(normal text of the same size) + {floor_s} s: super-linear?")
        times[name] = recv.recv()
        proc.join()
        assert times[name] <= bound, f"{name}: {times[name]:.2f} s > {bound:.2f} s ({ratio} x {t_normal:.3f} s + {floor_s} s)"
    return times
