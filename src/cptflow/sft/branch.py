"""The SFT branch as the workflow plans it: which conversation files, which model it starts from, what each
rule passes its stage. ``workflow/rules/common.smk`` builds one ``SftBranch`` from the validated
``sft:`` section and ``sft.smk`` reads its attributes. The logic lives here, where it is tested
(tests/sft/test_branch.py), and imports no torch: the DAG is planned on a login node.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cptflow.core.config import ConfigError
from cptflow.data.sources import InputFile, resolve_sources

STAGES = ("conversations", "sft_pack", "finetune", "generate")  # the sub-sections, one per stage
BUILTIN_TEMPLATES = ("auto", "firefly")
CONVERSATION_FILES = (".jsonl", ".jsonl.gz")


def resolve_conversations(sources: Sequence[dict[str, Any]], workdir: str,
                          repo: str | os.PathLike[str]) -> list[InputFile]:
    """Conversation files, one per job, found like corpus files: globs from the working directory, else the
    repository (where the demo data lives); an error names ``sft.sources[i]``."""
    specs = [{"name": s["name"], "category": "sft", "paths": s["paths"]} for s in sources]
    try:
        try:
            files = resolve_sources(specs, workdir)
        except ConfigError as here:
            try:
                files = resolve_sources(specs, repo)
            except ConfigError:
                raise here from None  # the working directory is where a user's paths are meant
    except ConfigError as e:  # "sources[i]...: why" names the key under sft; other messages name a file
        msg = str(e)
        raise ConfigError(f"sft.{msg}" if msg.startswith("sources") else f"sft.sources: {msg}") from None
    bad = [f.path for f in files if not f.path.endswith(CONVERSATION_FILES)]
    if bad:
        raise ConfigError(f"sft.sources: conversations must be JSON Lines (.jsonl or .jsonl.gz), not {bad}")
    return files


@dataclass(frozen=True)
class SftBranch:
    section: dict[str, Any]  # the validated sft: section (defaults filled)
    inputs: list[InputFile] = field(default_factory=list)  # empty: the branch is off
    start_stage: str = ""  # the train stage whose model is fine-tuned
    template_file: str | None = None  # a chat template file (resolved path), else None (auto/firefly)

    @classmethod
    def plan(cls, section: dict[str, Any], train_stages: Sequence[str], workdir: str,
             repo: str | os.PathLike[str], locate: Callable[[str], str]) -> SftBranch:
        """``locate`` resolves a relative path as the rules do (working directory, else the repository)."""
        start = section.get("start_from") or train_stages[-1]
        if start not in train_stages:
            raise ConfigError(f"sft.start_from: {start!r} is not a train stage; the stages are {list(train_stages)}")
        setting = section["sft_pack"]["chat_template"]
        template = None if setting in BUILTIN_TEMPLATES else locate(setting)
        inputs = resolve_conversations(section["sources"], workdir, repo) if section["sources"] else []
        return cls(section, inputs, start, template)

    @property
    def enabled(self) -> bool:
        return bool(self.inputs)

    @property
    def by_key(self) -> dict[str, InputFile]:
        return {f.key: f for f in self.inputs}

    @property
    def formats(self) -> dict[str, str]:
        return {s["name"]: s.get("format", "auto") for s in self.section["sources"]}

    @property
    def lora(self) -> bool:
        """finetune writes an adapter (LoRA, QLoRA), not only a full model."""
        return self.section["finetune"]["method"] in ("lora", "qlora")

    @property
    def decontaminate(self) -> bool:
        return bool(self.section["conversations"]["decontaminate"])

    def params(self, stage: str, seed: int | None = None, locate: Callable[[str], str] = str) -> str:
        """JSON of one sub-section: a rule reruns when (and only when) its own sub-section changes.

        ``seed`` (the run's top-level seed) overrides the stage's own; paths become what the job opens.
        """
        if stage not in STAGES:
            raise ValueError(f"sft has no stage {stage!r}; stages: {STAGES}")
        value = dict(self.section[stage])
        if seed is not None and "seed" in value:
            value["seed"] = seed
        if stage == "sft_pack" and self.template_file:
            value["chat_template"] = self.template_file
        if stage == "finetune" and value.get("deepspeed"):
            value["deepspeed"] = locate(value["deepspeed"])
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
