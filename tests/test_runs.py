"""A run directory's lock, as a command on Ray holds it for the job that trains the run, and a run
trained elsewhere written back whole or not at all, wherever the writer is killed. No TensorFlow:
fast."""

import os
from pathlib import Path

import pytest

from normtf.errors import RunLocked
from normtf.runs import INCOMING, OUTGOING, STAGING, RunDir

OLD = {"config.json": b"old config", "history.json": b"[1]", "history.csv": b"epoch\n1\n",
       "checkpoint/epoch-0001.weights.h5": b"old weights", "tensorboard/train/events": b"old events"}
NEW = {"config.json": b"new config", "history.json": b"[1, 2]", "history.csv": b"epoch\n1\n2\n",
       "metrics.json": b"{}", "model.keras": b"new model"}


def test_a_lock_held_under_a_token_is_its_commands_and_nobody_elses(tmp_path):
    run = RunDir(tmp_path / "group")
    with run.locked("c0ffee"):
        assert run.lock_file.read_text() == f"{os.getpid()} c0ffee"
        assert run.held_for("c0ffee") and not run.held_for("other")
        with run.locked("c0ffee"):  # the command's job: trains under the lock its command holds
            pass
        assert run.held_for("c0ffee")  # the job neither took nor released it
        for token in (None, "other"):  # anyone else is refused, told which process holds it
            with pytest.raises(RunLocked, match=rf"another normtf process \(pid {os.getpid()}\) is training into"):
                with run.locked(token):
                    pass
    assert not run.path.exists()  # released, and nothing written: no trace
    assert not RunDir(tmp_path / "none").held_for("c0ffee")  # no lock file: a worker that cannot see the disk


def write(run: RunDir, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (run.path / name).parent.mkdir(parents=True, exist_ok=True)
        (run.path / name).write_bytes(content)


def test_the_files_of_a_run_trained_elsewhere_replace_the_runs_whole(tmp_path):
    run = RunDir(tmp_path / "group")
    with run.locked("t"):
        write(run, OLD)
        assert run.files() == OLD  # what a worker that cannot see this disk is given: not the lock
        inode = os.stat(run.lock_file).st_ino
        run.replace(NEW)
        assert run.files() == NEW  # the stale checkpoint/ and tensorboard/ are gone
        assert os.stat(run.lock_file).st_ino == inode and run.held_for("t")  # the lock held throughout
        assert sorted(p.name for p in run.path.iterdir()) == sorted([".lock", *NEW])
        with pytest.raises(ValueError, match="not a file of a run"):
            run.replace({"../elsewhere": b"x"})
        assert run.files() == NEW
    assert run.files() == NEW and not run.lock_file.exists()


@pytest.mark.parametrize("crash_at", range(1, 13))
def test_a_write_back_killed_at_any_rename_leaves_the_old_run_or_the_new_one(tmp_path, monkeypatch, crash_at):
    """A driver killed between any two renames of RunDir.replace: the next process to lock the run
    (RunDir.finish_replacing) finds the old files if the new ones were not complete, else the new
    ones, never a mix, and nothing of the replacement left."""
    run = RunDir(tmp_path / "group")
    write(run, OLD)
    renames = []
    rename = Path.rename

    def killed(self, target):
        renames.append(self.name)
        if len(renames) == crash_at:
            raise SystemExit("killed")
        return rename(self, target)

    with run.locked():
        monkeypatch.setattr(Path, "rename", killed)
        with pytest.raises(SystemExit):
            run.replace(NEW)
        monkeypatch.setattr(Path, "rename", rename)
    if crash_at == 1:  # the new files never became complete: staging, dropped
        assert renames == [renames[0]] and renames[0].startswith(STAGING)
    with run.locked():  # the next command
        assert run.files() in (OLD, NEW)
        assert run.files() == (OLD if crash_at == 1 else NEW)
        assert not [p for p in run.path.iterdir() if p.name.startswith((STAGING, INCOMING, OUTGOING))]
    # Every rename of replace was a crash point: staging in, 5 old entries out, the outgoing
    # directory complete, 5 new entries in.
    assert len(renames) == crash_at
