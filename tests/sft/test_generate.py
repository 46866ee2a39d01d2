"""generate: greedy answers of each model to fixed prompts in the SFT chat template, equal to an argmax loop written
out here, and a report section that shows every prompt and every model's answer."""

import json

import torch

from cptflow.model.hf import load_tokenizer
from cptflow.model.loader import load_causal_lm
from cptflow.sft import generate
from cptflow.sft.template import FIREFLY_TEMPLATE, render
from support.sft import make_chat_model

PROMPTS = ["请用三句话介绍一下长城。", "Write a short poem about the sea."]


def greedy_reference(model_dir, prompt: str, n: int) -> list[int]:
    """Full forward, argmax, append: no cache, no generate()."""
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir, "float32")
    ids = tok(render(tok, FIREFLY_TEMPLATE, [{"role": "user", "content": prompt}], True),
              add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == tok.eos_token_id:
            break
    return out


def test_answers_are_greedy_and_reported_per_prompt_and_model(tmp_path):
    a, b = make_chat_model(tmp_path / "a", layers=1), make_chat_model(tmp_path / "b", layers=2)
    template = tmp_path / "t.jinja"
    template.write_text(FIREFLY_TEMPLATE, encoding="utf-8")
    args = ["--model", f"before={a}", "--model", f"after={b}", "--template", str(template),
            "--output-json", str(tmp_path / "g.json"), "--output-md", str(tmp_path / "g.md"),
            "--stats", str(tmp_path / "s.json"), "--params", json.dumps({"prompts": PROMPTS, "max_new_tokens": 6})]
    assert generate.main(args) == 0
    table = json.loads((tmp_path / "g.json").read_text())
    assert [m["name"] for m in table["models"]] == ["before", "after"]
    tok = load_tokenizer(a)
    for name, d in (("before", a), ("after", b)):
        for prompt, got in zip(PROMPTS, table["answers"][name]):
            ref = greedy_reference(d, prompt, 6)
            assert got["prompt"] == prompt and got["new_tokens"] == len(ref)
            assert got["stopped"] == (ref[-1] == tok.eos_token_id)
            assert got["answer"] == tok.decode(ref[:-1] if got["stopped"] else ref).strip()
    md = (tmp_path / "g.md").read_text(encoding="utf-8")
    assert md.startswith("## Supervised fine-tuning: answers before and after")
    assert all(f"### {i + 1}. {p}" in md for i, p in enumerate(PROMPTS))
    assert md.count("**before**") == md.count("**after**") == len(PROMPTS)
    first = (tmp_path / "g.json").read_bytes()
    assert generate.main(args) == 0 and (tmp_path / "g.json").read_bytes() == first  # greedy: the same text again
