"""Stage ``sft_release``: the SFT model released as a delta against the public base, and the adapter alone.

* ``delta/``: exactly as CPT releases are (``cptflow.release.delta_make``): the merged SFT model XOR the
  base it was adapted from, vocabulary-aware, every file's sha256 in ``delta/manifest.json``. The stage
  applies it to the base (``delta_apply``) into a temporary directory and fails unless every file comes
  back bit for bit, as the CPT release's ``delta_apply`` rule does. A user runs
  ``cptflow delta apply --base BASE --delta release/sft/delta --output chat-model/``.
* ``adapter/`` (LoRA/QLoRA): ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's layout) and
  the chat template; it applies to the CPT model it was trained on (the one ``release/delta`` rebuilds).
* ``release.json``: what was released — method, the chat template and its sha256 (also in the model's
  ``tokenizer_config.json``, whose sha256 the delta manifest holds), and the sha256 of every released file.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import PathLike, atomic_path, read_json, sha256_file, write_json
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.release.delta_apply import apply_cptflow
from cptflow.release.delta_make import make
from cptflow.release.delta_scheme import DeltaConfig
from cptflow.sft.template import template_sha256

VERSION = 1
log = logging.getLogger("cptflow.sft.sft_release")


def release(cfg: DeltaConfig, base: PathLike, model: PathLike, out_dir: PathLike, template: str,
            adapter: PathLike | None = None, finetune_stats: PathLike | None = None) -> tuple[Stats, dict[str, Any]]:
    stats = Stats()
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        delta_stats, _, _ = make(cfg, base, model, tmp / "delta")
        stats.merge({f"delta/{k}": v for k, v in delta_stats.to_dict().items()})
        # The round trip a user makes, checked file by file against the manifest's sha256 (apply raises).
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".sft_roundtrip-") as rt:
            rt_stats, _, _ = apply_cptflow(cfg, base, tmp / "delta", Path(rt) / "model")
        stats.update("files_verified", rt_stats["files_verified"])
        if adapter is not None:
            shutil.copytree(adapter, tmp / "adapter")
        summary = read_json(finetune_stats)["summary"] if finetune_stats else {}
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"method": summary.get("method"), "start_model": summary.get("start_model"),
                    "chat_template": template, "chat_template_sha256": template_sha256(template),
                    "delta": "delta/ (cptflow delta apply --base BASE --delta delta --output MODEL)",
                    "adapter": "adapter/ (peft LoRA, applies to the CPT model)" if adapter is not None else None,
                    "files": files}
        write_json(tmp / "release.json", manifest)
    log.info("released %s: delta (%d files verified by a round trip)%s", out_dir, stats["files_verified"],
             " and adapter" if adapter is not None else "")
    return stats, manifest


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the public base model the release applies to")
    p.add_argument("--model", required=True, help="the merged SFT model (finetune output)")
    p.add_argument("--adapter", default=None, help="the adapter (finetune output, LoRA/QLoRA)")
    p.add_argument("--template", required=True, help="chat template (.jinja)")
    p.add_argument("--finetune-stats", default=None, help="finetune manifest (method, start model); --model and "
                   "--adapter are checked against it")
    p.add_argument("--template-manifest", default=None, help="sft_pack's manifest: --template is checked against it")
    p.add_argument("--output-dir", required=True, help="release directory: delta/, adapter/, release.json")
    p.add_argument("--stats", required=True)


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(DeltaConfig, params, "delta")
    verify_inputs([args.base])  # the bootstrapped base by its manifest beside it; a user's own base is read as is
    verify_inputs([args.model] + ([args.adapter] if args.adapter else []),
                  [args.finetune_stats] if args.finetune_stats else [])
    verify_inputs([args.template], [args.template_manifest] if args.template_manifest else [])
    template = Path(args.template).read_text(encoding="utf-8")
    with Timer() as t:
        stats, manifest = release(cfg, args.base, args.model, args.output_dir, template, args.adapter,
                                  args.finetune_stats)
    write_manifest(args.stats, stage="sft_release", version=VERSION, params=to_dict(cfg),
                   inputs=[args.template] + ([args.adapter] if args.adapter else []), stats=stats, seconds=t.seconds,
                   extra={"chat_template_sha256": manifest["chat_template_sha256"], "release_files": manifest["files"]})


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("sft_release", argv, _build, _run, "Release the SFT model: delta against the base + adapter.")


if __name__ == "__main__":
    sys.exit(main())
