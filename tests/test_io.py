"""Atomic writes clean up after writers that were killed mid-write, and never touch a live writer's files."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from vlkit.io import atomic_directory, atomic_write_text, remove_stale_temporaries


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "last"
    dead, alive = _dead_pid(), os.getpid()
    left = tmp_path / f".last.tmp-{dead}-abcd1234"  # what kill -9 during a checkpoint write leaves
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "model.safetensors").write_bytes(b"half")
    old_swap = tmp_path / f".last.old-{dead}-beef"
    old_swap.mkdir()
    busy = tmp_path / f".last.tmp-{alive}-live0000"  # a write in progress elsewhere in this process
    busy.mkdir()
    legacy_old, legacy_new = tmp_path / ".last.tmp-k3j2h1g0", tmp_path / ".last.tmp-z9y8x7w6"
    legacy_old.mkdir()
    legacy_new.mkdir()
    hours_ago = time.time() - 7200
    os.utime(legacy_old, (hours_ago, hours_ago))
    other = tmp_path / f".lastly.tmp-{dead}-abcd"  # another target's temporary: not ours to judge
    other.mkdir()
    with atomic_directory(target) as tmp:
        assert tmp.name.startswith(f".last.tmp-{alive}-")
        (tmp / "state.json").write_text("{}")
    assert (target / "state.json").read_text() == "{}"
    assert not left.exists() and not old_swap.exists() and not legacy_old.exists()
    assert busy.is_dir() and legacy_new.is_dir() and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".last.")) == sorted(
        [busy.name, legacy_new.name])


def test_file_writes_clean_their_own_leftovers_too(tmp_path):
    path = tmp_path / "config.yaml"
    stale = tmp_path / f".config.yaml.tmp-{_dead_pid()}-x1"
    stale.write_text("partial")
    atomic_write_text(path, "a: 1\n")
    assert path.read_text() == "a: 1\n" and not stale.exists()
    assert remove_stale_temporaries(path) == []
