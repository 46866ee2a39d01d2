"""Dedup stage 1, one job per input file: exact hash and MinHash signature of every document.

Signatures are kept per input file (keyed by file name, not by task rank) so adding a file to the
corpus computes only that file's signatures. Output: an .npz with

* ``ids``    unicode (n,)      document ids, in file order;
* ``exact``  uint64 (n,)       xxhash64 of the normalised text (``minhash.exact_hash``);
* ``sig``    uint32 (P, n)     MinHash signatures, P = num_perm, stored permutation-major: the rows of
  one LSH band are contiguous, so a bands job memory-maps and reads only its own bands' rows;
* ``chars``  int64 (n,)        characters of the original text (for dropped-character counts);
* ``params`` unicode scalar    JSON of the settings a signature depends on, checked by ``bands``.

The file is byte-identical across runs on the same input (``npzio.write_npz``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from cptflow.core import cli
from cptflow.core.config import from_dict, to_dict
from cptflow.data.minhash import DedupConfig, exact_hash, minhash
from cptflow.data.npzio import write_npz
from cptflow.core.io import PathLike, iter_records
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest

VERSION = 2  # bump when signatures would change (this file or minhash.py)
log = logging.getLogger("cptflow.data.signature")

REQUIRED = ("id", "text", "lang")


def iter_documents(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of an intermediate-format JSONL file; malformed lines name file:line."""
    for lineno, rec in iter_records(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        for key in REQUIRED:
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{path}:{lineno}: field {key!r} missing or not a string")
        yield lineno, rec


def signatures(ids: Sequence[str], texts: Sequence[str], langs: Sequence[str], cfg: DedupConfig) -> dict[str, np.ndarray]:
    """The arrays of one signature file (pure: no I/O)."""
    return {
        "ids": np.array(list(ids), dtype=str),
        "exact": np.fromiter((exact_hash(t, lg) for t, lg in zip(texts, langs)), dtype=np.uint64, count=len(texts)),
        "sig": np.ascontiguousarray(minhash(texts, langs, cfg).T),
        "chars": np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)),
        "params": np.array(cfg.signature_params_json()),
    }


def run(cfg: DedupConfig, input_path: PathLike, output: PathLike, stats_path: PathLike) -> Stats:
    stats = Stats()
    with Timer() as t:
        ids: list[str] = []
        texts: list[str] = []
        langs: list[str] = []
        for _, rec in iter_documents(input_path):
            ids.append(rec["id"])
            texts.append(rec["text"])
            langs.append(rec["lang"])
        arrays = signatures(ids, texts, langs, cfg)
        write_npz(output, arrays)
        stats.update("docs_in", len(ids))
        stats.update("chars_in", int(arrays["chars"].sum()))
    rate = len(ids) / t.seconds if t.seconds > 0 else 0.0
    log.info("%s: %d documents signed in %.2f s (%.0f docs/s)", input_path, len(ids), t.seconds, rate)
    write_manifest(stats_path, stage="dedup_signature", version=VERSION, params=to_dict(cfg),
                   inputs=[input_path], stats=stats, seconds=t.seconds, outputs=[output],
                   extra={"docs_per_second": round(rate, 1)})
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    def build(p):
        p.add_argument("--input", required=True, help="documents (intermediate JSONL)")
        p.add_argument("--output", required=True, help="signature file (.npz)")
        p.add_argument("--stats", required=True, help="provenance manifest (.json)")

    def go(args, params):
        verify_inputs([args.input])
        run(from_dict(DedupConfig, params, "dedup"), args.input, args.output, args.stats)

    return cli.stage_main("dedup_signature", argv, build, go)


if __name__ == "__main__":
    sys.exit(main())
