import gzip
import os

import pytest

from cptflow.core.io import atomic_path, iter_jsonl, sha256_path, write_json, write_jsonl


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("stage crashed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]  # no temporary left behind


def test_atomic_path_replaces_directory(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "stale").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "fresh").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["fresh"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_jsonl_round_trip_and_gzip_is_byte_stable(tmp_path):
    recs = [{"id": "a:1", "text": "中文，标点"}, {"id": "a:2", "text": "English"}]
    for name in ("x.jsonl", "x.jsonl.gz"):
        p = tmp_path / name
        assert write_jsonl(p, recs) == 2
        first = p.read_bytes()
        write_jsonl(p, recs)
        assert p.read_bytes() == first  # gzip header carries no timestamp
        assert list(iter_jsonl(p)) == recs
    assert gzip.decompress((tmp_path / "x.jsonl.gz").read_bytes()).decode().count("\n") == 2


def test_iter_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(iter_jsonl(p))


def test_write_json_is_canonical_and_dir_hash_sees_content(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("1")
    h1 = sha256_path(d)
    (d / "f").write_text("2")
    assert sha256_path(d) != h1


def _dead_pid() -> int:
    """The pid of a process that has exited (reaped), so no process of this host has it right now."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_killed_jobs_are_swept_at_the_next_write(tmp_path):
    """Issue 14: `.*.tmp-*` files of killed jobs stayed forever. The next job writing the same output
    removes them, and only them: a live writer's temporary (this host: its pid runs; another host:
    touched within the hour) and temporaries of other outputs survive."""
    import socket
    import subprocess
    import sys
    import time

    from cptflow.core import io

    host = io._HOST
    assert host == io.re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    target = tmp_path / "out.jsonl"
    dead = tmp_path / f".out.jsonl.tmp-{host}-{_dead_pid()}"
    dead_dir = tmp_path / f".out.jsonl.tmp-{host}-{_dead_pid()}"
    dead_dir.mkdir()
    (dead_dir / "part").write_text("x")
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    live = tmp_path / f".out.jsonl.tmp-{host}-{live_proc.pid}"
    other_host_old = tmp_path / ".out.jsonl.tmp-node17-4242"
    other_host_new = tmp_path / ".out.jsonl.tmp-node18-4242"
    old_style = tmp_path / ".out.jsonl.tmp-4242"  # names of earlier versions: pid only
    other_output = tmp_path / f".out.jsonl.gz.tmp-{host}-{_dead_pid()}"  # another output's: never ours
    try:
        for p in (dead, live, other_host_old, other_host_new, old_style, other_output):
            p.write_text("partial")
        hour_ago = time.time() - io.STALE_AFTER_S - 60
        for p in (other_host_old, old_style):
            os.utime(p, (hour_ago, hour_ago))
        with atomic_path(target) as tmp:
            tmp.write_text("new")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["out.jsonl", live.name, other_host_new.name, other_output.name]), left
        assert target.read_text() == "new"
    finally:
        live_proc.kill()
        live_proc.wait()
    assert io.sweep_stale_temps(target) == [live]  # its writer is gone now
