"""A tokenizer folder's chat template(s), wherever the folder keeps them.

Published LLaMA-2 / Mistral repositories keep the template as the ``chat_template`` key of
``tokenizer_config.json``; transformers 5's ``save_pretrained`` writes it to ``chat_template.jinja``
instead (and named templates, e.g. ``tool_use``, to ``additional_chat_templates/<name>.jinja``), and
on load those files win over the key. A stage that rebuilds a tokenizer from the base's
``tokenizer_config.json`` alone therefore loses the template of any base that transformers 5 wrote —
such as the output of the ``base_tokenizer`` stage — while keeping the special tokens the template
uses (Mistral's ``[INST]``): the model would be fine-tuned and released with no chat template, or with
another one, beside the same control ids. These helpers read and copy the template the way
transformers loads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cptflow.core.io import PathLike

TEMPLATE_FILE = "chat_template.jinja"  # transformers 5: the default template
TEMPLATE_DIR = "additional_chat_templates"  # transformers 5: named templates, one <name>.jinja each


def read_chat_template(tok_dir: PathLike) -> str | dict[str, str] | None:
    """The template transformers would load from ``tok_dir``: the files if any, else the config key.

    One template is a string; several (a default and named ones) a name -> template dict, as
    ``tokenizer.chat_template`` holds them.
    """
    d = Path(tok_dir)
    found: dict[str, str] = {}
    if (d / TEMPLATE_FILE).is_file():
        found["default"] = (d / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (d / TEMPLATE_DIR).is_dir():
        for f in sorted((d / TEMPLATE_DIR).glob("*.jinja")):
            found[f.stem] = f.read_text(encoding="utf-8")
    if found:
        return found["default"] if list(found) == ["default"] else found
    conf = d / "tokenizer_config.json"
    value = json.loads(conf.read_text(encoding="utf-8")).get("chat_template") if conf.is_file() else None
    if isinstance(value, list):  # the older list form: [{"name": ..., "template": ...}]
        value = {t["name"]: t["template"] for t in value}
    return value if isinstance(value, (str, dict)) and value else None


def tokenizer_config(tok_dir: PathLike) -> dict[str, Any]:
    """``tokenizer_config.json`` of ``tok_dir`` ({} if absent) with ``chat_template`` as transformers loads it."""
    path = Path(tok_dir) / "tokenizer_config.json"
    conf = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    template = read_chat_template(tok_dir)
    if template is not None:
        conf["chat_template"] = template
    return conf


def copy_chat_templates(src_dir: PathLike, dst_dir: PathLike) -> list[str]:
    """Copy the template files of ``src_dir`` (``chat_template.jinja``, ``additional_chat_templates/``);
    returns the names copied. The config key, if any, travels with ``tokenizer_config.json``."""
    src, dst = Path(src_dir), Path(dst_dir)
    copied = []
    if (src / TEMPLATE_FILE).is_file():
        shutil.copyfile(src / TEMPLATE_FILE, dst / TEMPLATE_FILE)
        copied.append(TEMPLATE_FILE)
    if (src / TEMPLATE_DIR).is_dir():
        shutil.copytree(src / TEMPLATE_DIR, dst / TEMPLATE_DIR, dirs_exist_ok=True)
        copied.append(TEMPLATE_DIR)
    return copied
