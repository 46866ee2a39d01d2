"""Stage ``generate``: greedy answers of every model of the run to a fixed set of Chinese and English prompts.

Scores say how much a model knows; they do not show whether it follows an instruction. This stage
puts the answers of the base, the adapted (CPT) and the SFT model to the same prompts side by side,
for a person to read in the report. Every model gets the prompt in the chat template SFT trained with
(rendered by its own tokenizer), so the only difference is the model; answers are greedy (no
sampling), so a rerun gives the same text, and stop at the model's EOS or ``max_new_tokens``.

Output: ``--output-json`` (prompt, model, answer, tokens, whether it stopped by itself) and
``--output-md``, the report's section.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import atomic_path, write_json
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.model.hf import load_tokenizer
from cptflow.model.loader import load_causal_lm
from cptflow.sft.config import GenerateConfig
from cptflow.sft.template import render, template_sha256

VERSION = 1
log = logging.getLogger("cptflow.sft.generate")


def answers(model_dir: str, template: str, cfg: GenerateConfig) -> list[dict[str, Any]]:
    """Greedy answers of one model to every prompt."""
    tok = load_tokenizer(model_dir)
    # fp32 on CPU (bf16 matmuls are slow there); on a GPU the stored dtype.
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = load_causal_lm(model_dir, "auto" if device.type == "cuda" else "float32", device=device)
    from transformers import GenerationConfig

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                           pad_token_id=pad)
    out = []
    for prompt in cfg.prompts:
        text = render(tok, template, [{"role": "user", "content": prompt}], generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], device=device)
        with torch.no_grad():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0, ids.shape[1]:]
        stopped = bool(len(new) and int(new[-1]) == tok.eos_token_id)
        # Special tokens other than the final EOS stay visible: an answer of control tokens is worth seeing.
        answer = tok.decode(new[:-1] if stopped else new, skip_special_tokens=False).strip()
        out.append({"prompt": prompt, "answer": answer,
                    "new_tokens": int(len(new)), "stopped": stopped})
    return out


def markdown(results: dict[str, list[dict[str, Any]]], template_sha: str, max_new_tokens: int) -> str:
    names = list(results)
    lines = ["## Supervised fine-tuning: answers before and after", "",
             f"Greedy answers (at most {max_new_tokens} new tokens) of {', '.join(names)} to fixed prompts, each "
             f"in the SFT chat template (sha256 `{template_sha[:16]}`). \u2026 marks an answer cut at the limit.", ""]
    for i, prompt in enumerate(results[names[0]]):
        lines += [f"### {i + 1}. {prompt['prompt']}", ""]
        for name in names:
            r = results[name][i]
            empty = "(EOS at once)" if r["stopped"] and r["new_tokens"] == 1 else \
                f"(only whitespace, {r['new_tokens']} tokens)"
            body = (r["answer"] or empty) + ("" if r["stopped"] else " \u2026")
            lines += [f"**{name}**", ""] + [f"> {line}" if line else ">" for line in body.splitlines()] + [""]
    return "\n".join(lines)


def run(cfg: GenerateConfig, models: dict[str, str], template: str) -> tuple[dict[str, Any], str, Stats]:
    stats = Stats()
    results = {}
    for name, path in models.items():
        results[name] = answers(path, template, cfg)
        stats.update(f"stopped/{name}", sum(r["stopped"] for r in results[name]))
        log.info("%s: %d answers, %d ended with EOS", name, len(results[name]), stats[f"stopped/{name}"])
    sha = template_sha256(template)
    table = {"chat_template_sha256": sha, "max_new_tokens": cfg.max_new_tokens, "answers": results,
             "models": [{"name": n, "path": p} for n, p in models.items()]}  # a list: JSON keys get sorted
    return table, markdown(results, sha, cfg.max_new_tokens), stats


def parse_models(items: Sequence[str]) -> dict[str, str]:
    """NAME=PATH items (--model, --manifest) as a dict, in order."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{item!r} is not NAME=PATH")
        out[name] = path
    return out


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, action="append", metavar="NAME=DIR", help="a model (repeat, in order)")
    p.add_argument("--manifest", action="append", default=[], metavar="NAME=FILE",
                   help="the manifest of the stage that wrote model NAME: the model is checked against it (repeat)")
    p.add_argument("--template", required=True, help="chat template (.jinja), from sft_pack")
    p.add_argument("--template-manifest", default=None, help="sft_pack's manifest: --template is checked against it")
    p.add_argument("--output-json", required=True)
    p.add_argument("--output-md", required=True)
    p.add_argument("--stats", required=True)


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(GenerateConfig, params, "sft.generate")
    models = parse_models(args.model)
    manifests = parse_models(args.manifest)
    for name, path in models.items():
        verify_inputs([path], [manifests[name]] if name in manifests else [])
    verify_inputs([args.template], [args.template_manifest] if args.template_manifest else [])
    with open(args.template, encoding="utf-8") as f:
        template = f.read()
    with Timer() as t:
        table, md, stats = run(cfg, models, template)
    write_json(args.output_json, table)
    with atomic_path(args.output_md) as tmp:
        tmp.write_text(md, encoding="utf-8")
    write_manifest(args.stats, stage="generate", version=VERSION, params=to_dict(cfg), inputs=[args.template],
                   stats=stats, seconds=t.seconds, outputs=[args.output_json, args.output_md],
                   extra={"models": models})


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("generate", argv, _build, _run, "Greedy answers of each model to fixed prompts.")


if __name__ == "__main__":
    sys.exit(main())
