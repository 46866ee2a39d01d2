"""PII masking: what must be masked, what must not (years, prices, hex, ids, scp targets), and how
much is masked on the real demo corpus."""

from __future__ import annotations

import json

import pytest

from conftest import schema_section, DEMO

from cptflow.core.config import to_dict
from cptflow.data.pii import PiiConfig, main, mask_pii, valid_id_card

CFG = PiiConfig()


def _id_with_check(first17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return first17 + "10X98765432"[sum(int(d) * w for d, w in zip(first17, weights)) % 11]


VALID_ID = _id_with_check("11010519491231002")  # Beijing, born 1949-12-31; check character X
BAD_DATE_ID = _id_with_check("44030420010229123")  # wrong: 2001-02-29 does not exist
LEAP_DAY_ID = _id_with_check("44030420000229123")  # 2000 is a leap year


@pytest.mark.parametrize(
    "text, masked, kind",
    [
        ("联系邮箱someone@example.com。", "联系邮箱<EMAIL>。", "email"),
        ("write to John.Smith+news@mail.example.co.uk today", "write to <EMAIL> today", "email"),
        ("电话13812345678联系", "电话<PHONE>联系", "phone"),
        ("手机：138 1234 5678。", "手机：<PHONE>。", "phone"),
        ("+86 138-1234-5678", "<PHONE>", "phone"),
        ("0086 13812345678", "<PHONE>", "phone"),
        ("总机010-12345678转", "总机<PHONE>转", "phone"),
        ("(0755)1234567", "<PHONE>", "phone"),
        ("call +1 (555) 123-4567 now", "call <PHONE> now", "phone"),
        ("London +44 20 7946 0958.", "London <PHONE>.", "phone"),
        ("+8613812345678", "<PHONE>", "phone"),
        (f"身份证号{VALID_ID}。", "身份证号<ID_CARD>。", "id_card"),
        (f"id {VALID_ID.lower()}", "id <ID_CARD>", "id_card"),
        (f"{LEAP_DAY_ID}", "<ID_CARD>", "id_card"),
    ],
)
def test_masks(text, masked, kind):
    out, counts = mask_pii(text, CFG)
    assert out == masked
    assert counts == {"email": 0, "phone": 0, "id_card": 0} | {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "公元1998年，唐玄宗开元二十九年（741年）",
        "价格15000000000元",  # eleven digits starting 15, but a round amount
        "let key = 0x13812345678; let h = 0xdeadbeef13812345678;",
        "id=213812345678 and 3.13812345678 and v1.2.13812345678",
        "timestamp 1638316800123, 2018-09-10-11:09:51, UTC+0800, +10000000",
        "random 123456789012345678 and " + VALID_ID[:-1] + ("1" if VALID_ID[-1] != "1" else "2"),  # bad checksum
        BAD_DATE_ID,  # 29 February 2001
        "scp user1@host1.com:/files/file.txt user2@host2.com:/files",  # scp targets, not mail
        "ssh www-data@adnan.local -p2222; icon@2x.png; http://user:passwd@www.example.com:4097/",
        "US 555-456-1414 (no country code); ISBN 957-9684-11-1; phone 012 3456789",
    ],
)
def test_does_not_mask(text):
    assert mask_pii(text, CFG) == (text, {"email": 0, "phone": 0, "id_card": 0})


def test_valid_id_card_checks_province_date_and_checksum():
    assert valid_id_card(VALID_ID) and VALID_ID.endswith("X")
    assert not valid_id_card("99" + VALID_ID[2:])  # no province 99
    assert not valid_id_card(BAD_DATE_ID)


def test_each_kind_can_be_turned_off_and_tokens_changed():
    text = f"mail a.b@example.org, tel 13912345678, id {VALID_ID}"
    assert mask_pii(text, PiiConfig(mask_phone=False))[0] == "mail <EMAIL>, tel 13912345678, id <ID_CARD>"
    assert mask_pii(text, PiiConfig(mask_email=False, mask_id_card=False, phone_token="[电话]"))[0] == (
        f"mail a.b@example.org, tel [电话], id {VALID_ID}")


def test_demo_corpus_is_not_over_masked():
    """Every mask on the demo corpus, checked by eye: only real-looking e-mail addresses."""
    found = {}
    for path in sorted((DEMO / "corpus").glob("*/*.jsonl")):
        totals = {"email": 0, "phone": 0, "id_card": 0}
        for line in path.read_text(encoding="utf-8").splitlines():
            _, counts = mask_pii(json.loads(line)["text"], CFG)
            for k, v in counts.items():
                totals[k] += v
        found[path.name] = totals
    masked = {name: t for name, t in found.items() if any(t.values())}
    assert masked == {
        "news_from_nowhere.jsonl": {"email": 1, "phone": 0, "id_card": 0},  # transcriber's address
        "news_from_nowhere_old.jsonl": {"email": 6, "phone": 0, "id_card": 0},  # Gutenberg contacts
        "rust_book_cn.jsonl": {"email": 1, "phone": 0, "id_card": 0},  # email: "someone@example.com"
    }


def test_cli_masks_without_dropping_and_counts(tmp_path):
    src = tmp_path / "in.jsonl"
    recs = [{"id": "s/p:1", "text": "电话13812345678，邮箱a@example.com", "source": "s", "category": "c", "lang": "zh"},
            {"id": "s/p:2", "text": "没有个人信息 1998年", "source": "s", "category": "c", "lang": "zh"}]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    argv = ["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--stats", str(tmp_path / "s.json")]
    assert main(argv) == 0
    out = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in out] == ["电话<PHONE>，邮箱<EMAIL>", "没有个人信息 1998年"]
    assert [list(r) for r in out] == [list(recs[0])] * 2
    c = json.loads((tmp_path / "s.json").read_text())["counts"]
    assert (c["docs_in"], c["docs_out"], c["docs_with_pii"]) == (2, 2, 1)
    assert (c["masked/email"], c["masked/phone"], c["masked/id_card"]) == (1, 1, 0)


def test_schema_fragment_matches_dataclass():
    schema = schema_section("pii")
    assert {k: v["default"] for k, v in schema["properties"].items()} == to_dict(PiiConfig())


def test_pii_is_linear_time_on_pathological_text():
    """1 MiB of "+1111...1 " took 6 s (the phone pattern retried every split of each digit run); now
    every pathological input (512 KiB) stays within 10x the time of real text of the same size."""
    from support.linear_time import assert_linear

    times = assert_linear(lambda t: mask_pii(t, PiiConfig()), size=1 << 19)
    assert "phone_like" in times
