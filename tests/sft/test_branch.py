"""branch: what the workflow plans for SFT from the validated sft: section (cptflow.sft.branch.SftBranch).

The section is the schema's own defaults filled in around a few keys, as the Snakefile gets it; the files are
real files in a temporary working directory and the repository's shipped Firefly slice.
"""

import json

import pytest

from conftest import REPO
from cptflow.core.config import ConfigError
from cptflow.core.schema import validate_with_defaults
from cptflow.sft.branch import SftBranch

STAGES = ["embed_align", "full"]


def section(sft: dict) -> dict:
    filled = validate_with_defaults({"sources": [{"name": "s", "category": "c", "paths": ["x/*.jsonl"]}],
                                     "benchmarks": [], "heldout": {}, "sft": sft})
    return filled["sft"]


def plan(sft: dict, workdir, locate=str) -> SftBranch:
    return SftBranch.plan(section(sft), STAGES, str(workdir), REPO, locate)


def test_off_unless_sources_name_files(tmp_path):
    branch = plan({}, tmp_path)
    assert not branch.enabled and branch.inputs == [] and branch.start_stage == "full"


def test_files_are_found_in_the_working_directory_else_the_repository(tmp_path):
    (tmp_path / "mine").mkdir()
    for name in ("a.jsonl", "b.jsonl.gz"):
        (tmp_path / "mine" / name).write_bytes(b"")
    mine = plan({"sources": [{"name": "mine", "paths": ["mine/*"], "format": "sharegpt"}]}, tmp_path)
    assert [(f.source, f.part) for f in mine.inputs] == [("mine", "a"), ("mine", "b")]
    assert mine.formats == {"mine": "sharegpt"} and set(mine.by_key) == {"mine/a", "mine/b"}
    shipped = plan({"sources": [{"name": "firefly", "paths": ["workflow/resources/demo/sft/*.jsonl"]}]}, tmp_path)
    assert [f.key for f in shipped.inputs] == ["firefly/firefly_dummy_data"]
    assert shipped.formats == {"firefly": "auto"}


def test_bad_settings_name_their_key(tmp_path):
    with pytest.raises(ConfigError, match=r"sft\.start_from: 'nope' is not a train stage"):
        plan({"start_from": "nope"}, tmp_path)
    with pytest.raises(ConfigError, match=r"^sft\.sources"):
        plan({"sources": [{"name": "x", "paths": ["missing/*.jsonl"]}]}, tmp_path)
    (tmp_path / "c.csv").write_text("")
    with pytest.raises(ConfigError, match=r"^sft\.sources: .*c\.csv: unsupported"):
        plan({"sources": [{"name": "x", "paths": ["c.csv"]}]}, tmp_path)
    (tmp_path / "c.parquet").write_text("")  # a corpus format, not a conversation one
    with pytest.raises(ConfigError, match=r"must be JSON Lines .*c\.parquet"):
        plan({"sources": [{"name": "x", "paths": ["c.parquet"]}]}, tmp_path)


def test_params_carry_one_stage_with_the_run_seed_and_resolved_paths(tmp_path):
    (tmp_path / "c.jsonl").write_text("")
    branch = plan({"sources": [{"name": "x", "paths": ["c.jsonl"]}], "start_from": "embed_align",
                   "sft_pack": {"chat_template": "my.jinja"},
                   "finetune": {"method": "full", "deepspeed": "config/deepspeed/zero2.json"}},
                  tmp_path, locate=lambda p: f"/abs/{p}")
    assert branch.start_stage == "embed_align" and branch.template_file == "/abs/my.jinja" and not branch.lora
    pack = json.loads(branch.params("sft_pack", seed=7))
    assert pack["chat_template"] == "/abs/my.jinja" and pack == {**section({})["sft_pack"], **pack}
    fine = json.loads(branch.params("finetune", seed=7, locate=lambda p: f"/abs/{p}"))
    assert fine["seed"] == 7 and fine["deepspeed"] == "/abs/config/deepspeed/zero2.json" and fine["method"] == "full"
    assert json.loads(branch.params("finetune"))["seed"] == section({})["finetune"]["seed"]
    with pytest.raises(ValueError, match="no stage 'release'"):
        branch.params("release")
    assert plan({"sources": [{"name": "x", "paths": ["c.jsonl"]}]}, tmp_path).lora  # lora by default
