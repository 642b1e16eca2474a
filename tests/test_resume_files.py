"""Checkpoint-aware retry (issue 17): a retried program starts from the files its lost,
timed-out or retry-asking attempt left (``resume_files``, ``resume_argv``); a Python task
reads its earlier attempt's scratch directory (``pilotfish.previous_attempt_files()``).

Each program below counts to 10, writing its position to ``ckpt`` (write, then rename:
never partial) and, on its first attempt only (a marker outside the sandbox), is lost at
5: a long run lost at 55 minutes that must not start from zero."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

import pilotfish
from conftest import FAKE_NO_WORKER, skip_on
from pilotfish import Category
from pilotfish.runtime.programs import (
    attempt_tags,
    find_sandbox,
    make_lineage,
    make_sandbox,
    newest_sandbox,
    previous_attempt,
    restore_files,
    sandbox_index,
)

COUNT = (
    'mode=$1; start=0; if [ "$mode" = resume ]; then start=$(cat ckpt); fi\n'
    "i=$start\n"
    "while [ $i -lt 10 ]; do\n"
    "  i=$((i+1)); echo $i > ckpt.tmp && mv ckpt.tmp ckpt\n"
    '  if [ $i -eq 5 ] && [ ! -e "$MARK" ]; then touch "$MARK"; LOSE; fi\n'
    "done\n"
    'echo "$mode from $start to $i" > result.txt\n'
)


def _count(tmp_path: Path, lose: str) -> dict[str, Any]:
    script = COUNT.replace("LOSE", lose)
    return {
        "argv": ["sh", "-c", script, "sh", "fresh"],
        "resume_argv": ["sh", "-c", script, "sh", "resume"],
        "resume_files": ["ckpt"],
        "outputs": ["result.txt"],
        "env": {"MARK": str(tmp_path / "lost-once")},
    }


def _exit_75_once(script: str) -> dict[str, Any]:
    """``sh -c script sh fresh`` (``resume`` on the retry) carrying ckpt and md.log; exit
    75 is retried once."""
    return {
        "argv": ["sh", "-c", script, "sh", "fresh"],
        "resume_argv": ["sh", "-c", script, "sh", "resume"],
        "resume_files": ["ckpt", "md.log"],
        "outputs": ["result.txt"],
        "retry_exit_codes": [75],
        "retries": 1,
    }


def test_resume_after_worker_sigkill(make_session: Any, backend: str, tmp_path: Path) -> None:
    """A member's node dies mid-run (its worker SIGKILLed): the retry starts with the
    checkpoint of the lost attempt and resume_argv, and continues from step 5."""
    skip_on(
        backend,
        "dask",
        reason="a SIGKILLed Dask worker cannot take the program's process group with it",
    )
    skip_on(backend, "fake", reason=FAKE_NO_WORKER)
    kw = _count(tmp_path, "kill -9 $PPID; sleep 20")
    with make_session(workers=1) as s:
        t = s.executable(kw.pop("argv"), retries=2, **kw)
        r = t.result(timeout=60)
    assert r.outputs["result.txt"].read_text() == "resume from 5 to 10\n"
    first, second = t.attempts
    assert first.outcome == Category.WORKER_LOST.value
    assert second.note == "resumed from attempt 1: ckpt, 2 B"
    assert r.note == second.note


def test_resume_after_timeout(make_session: Any, tmp_path: Path) -> None:
    """An attempt hits its walltime (TIMEOUT): the retry continues from its checkpoint."""
    kw = _count(tmp_path, "sleep 30")
    with make_session(workers=1) as s:
        t = s.executable(kw.pop("argv"), timeout=3, retries=1, **kw)
        r = t.result(timeout=90)
    assert r.outputs["result.txt"].read_text() == "resume from 5 to 10\n"
    assert [a.outcome for a in t.attempts] == [Category.TIMEOUT.value, "done"]
    assert t.attempts[1].note == "resumed from attempt 1: ckpt, 2 B"


def test_resume_after_retry_exit_code(make_session: Any, tmp_path: Path) -> None:
    """A program that stops itself with a 'try again' code (as mdrun does at -maxh in
    a wrapper script) continues on retry; its COMMAND_FAILED attempt is resumable."""
    kw = _count(tmp_path, "exit 75")
    with make_session(workers=1) as s:
        t = s.executable(kw.pop("argv"), retry_exit_codes=[75], retries=1, **kw)
        r = t.result(timeout=60)
    assert r.outputs["result.txt"].read_text() == "resume from 5 to 10\n"
    assert t.attempts[0].outcome == Category.COMMAND_FAILED.value
    assert t.attempts[1].note == "resumed from attempt 1: ckpt, 2 B"


def test_missing_checkpoint_is_a_fresh_start(make_session: Any, tmp_path: Path) -> None:
    """The lost attempt wrote no checkpoint (lost before its first one): the retry runs
    argv, not resume_argv, from zero, and says why."""
    mark = tmp_path / "once"
    script = f'if [ ! -e {mark} ]; then touch {mark}; exit 75; fi; echo "$1" > result.txt'
    with make_session(workers=1) as s:
        kw = _exit_75_once(script)
        t = s.executable(kw.pop("argv"), **kw)
        r = t.result(timeout=60)
    assert r.outputs["result.txt"].read_text() == "fresh\n"
    assert t.attempts[1].note == "fresh start: ckpt missing, md.log missing (in attempt 1)"


def test_partial_checkpoint_is_a_fresh_start(make_session: Any, tmp_path: Path) -> None:
    """An empty checkpoint (the node died while writing it) is partial: nothing is copied
    (all or none: md.log alone would be a half-restored run), argv runs."""
    mark = tmp_path / "once"
    script = (
        f"if [ ! -e {mark} ]; then touch {mark}; : > ckpt; echo log > md.log; exit 75; fi\n"
        'ls > result.txt; echo "$1" >> result.txt'
    )
    with make_session(workers=1) as s:
        kw = _exit_75_once(script)
        t = s.executable(kw.pop("argv"), **kw)
        r = t.result(timeout=60)
    listing = r.outputs["result.txt"].read_text().split()
    assert listing[-1] == "fresh" and "ckpt" not in listing and "md.log" not in listing
    assert t.attempts[1].note == "fresh start: ckpt empty (partial) (in attempt 1)"


def test_permanent_failure_is_not_resumed(make_session: Any, tmp_path: Path) -> None:
    """A plain failure (exit 1, not in retry_exit_codes) is not retried: no note."""
    with make_session(workers=1) as s:
        t = s.executable(["sh", "-c", "echo 5 > ckpt; exit 1"], resume_files=["ckpt"])
        with pytest.raises(pilotfish.CommandFailed):
            t.result(timeout=30)
    assert len(t.attempts) == 1 and t.attempts[0].note is None


def _python_member(marker: str) -> tuple[int, str | None]:
    """Counts to 10 in its scratch dir, dies with its worker at 5 on the first try."""
    prev = pilotfish.previous_attempt_files()
    start = 0
    if prev is not None and (prev / "state").exists():
        start = int((prev / "state").read_text())
    here = pilotfish.scratch_dir()
    for i in range(start + 1, 11):
        (here / "state.tmp").write_text(str(i))
        os.replace(here / "state.tmp", here / "state")
        if i == 5 and not os.path.exists(marker):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return start, None if prev is None else prev.name


def test_python_task_reads_previous_attempt_files(
    make_session: Any, backend: str, tmp_path: Path
) -> None:
    """A Python member killed with its worker at step 5 continues there on retry, from
    the lost attempt's scratch directory."""
    skip_on(backend, "dask", reason="a Dask worker killed by its task is restarted by its nanny")
    skip_on(backend, "fake", reason=FAKE_NO_WORKER)
    with make_session(workers=1) as s:
        t = s.submit(_python_member, str(tmp_path / "marker"))
        start, prev = t.result(timeout=60)
    assert start == 5 and prev is not None
    assert [a.outcome for a in t.attempts] == [Category.WORKER_LOST.value, "done"]


def test_first_attempt_has_no_previous_files(make_session: Any) -> None:
    with make_session(workers=1) as s:
        assert s.submit(pilotfish.previous_attempt_files).result(timeout=30) is None
        d = s.submit(pilotfish.scratch_dir).result(timeout=30)
    assert d.parent.name == "sandboxes"


def _scratch_then(fail: bool) -> str:
    """Writes a checkpoint in its scratch directory, then returns its path or raises
    with it."""
    here = pilotfish.scratch_dir()
    (here / "ckpt").write_text("1")
    if fail:
        raise ValueError(str(here))
    return str(here)


@pytest.mark.parametrize("keep", ["failed", "all"])
def test_scratch_of_a_successful_attempt_is_removed_unless_kept(
    make_session: Any, backend: str, keep: str
) -> None:
    """Issue 22 item 14: every Python task's scratch directory of a successful attempt was
    kept forever (a million-member ensemble fills the run directory), while a program's
    sandbox is removed. One rule now: a successful attempt's goes unless
    keep_sandboxes="all"; a failed one's stays (its retry and the user read it)."""
    with make_session(workers=1, keep_sandboxes=keep) as s:
        ok = Path(s.submit(_scratch_then, False).result(timeout=30))
        bad = s.submit(_scratch_then, True)
        with pytest.raises(ValueError) as err:
            bad.result(timeout=30)
    assert ok.parent.name == "sandboxes"
    assert ok.is_dir() is (keep == "all")
    assert (Path(str(err.value)) / "ckpt").read_text() == "1"  # failed: kept


def _chunk_member(x: int, marker: str, kill: bool) -> int:
    """The README's checkpoint pattern: continue from the previous attempt's checkpoint,
    else compute and checkpoint; the first attempt dies after item 3 checkpointed."""
    prev = pilotfish.previous_attempt_files()
    if prev is not None and (prev / "ckpt").exists():
        return int((prev / "ckpt").read_text())
    here = pilotfish.scratch_dir()
    (here / "ckpt.tmp").write_text(str(x * 100))
    os.replace(here / "ckpt.tmp", here / "ckpt")
    if x == 3 and not os.path.exists(marker):
        Path(marker).touch()
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("asks for a retry")
    return x * 100


@pytest.mark.parametrize("kill", [True, False], ids=["worker-killed", "retry-asked"])
def test_each_call_of_a_chunk_has_its_own_scratch(
    make_session: Any, backend: str, tmp_path: Path, kill: bool
) -> None:
    """Issue 22 item 5: map(f, [1, 2, 3], chunksize=3), worker killed after item 3
    checkpointed: the three calls of the chunk shared one scratch directory, so the retry
    gave [300, 300, 300]. Each call has its own, and finds its own in the retry."""
    if kill:
        skip_on(backend, "dask", reason="a Dask worker killed by its task is restarted")
        skip_on(backend, "fake", reason=FAKE_NO_WORKER)
    fn = pilotfish.task(_chunk_member, retries=2, retry_on=[RuntimeError])
    with make_session(workers=1) as s:
        out = list(s.map(fn, [1, 2, 3], [str(tmp_path / "m")] * 3, [kill] * 3, chunksize=3))
    assert out == [100, 200, 300]


def test_outside_a_task_the_helpers_say_so() -> None:
    with pytest.raises(RuntimeError, match="outside"):
        pilotfish.previous_attempt_files()
    with pytest.raises(RuntimeError, match="outside"):
        pilotfish.scratch_dir()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"resume_files": "md.cpt"}, "resume_files"),
        ({"resume_files": ["../md.cpt"]}, "resume_files"),
        ({"resume_files": ["/tmp/md.cpt"]}, "resume_files"),
        ({"resume_argv": ["x"]}, "needs resume_files"),
        ({"resume_files": ["a"], "resume_argv": "gmx mdrun"}, "resume_argv"),
        ({"resume_files": ["topol.tpr"], "inputs": {"topol.tpr": __file__}}, "the input"),
        ({"resume_files": ["stdout.txt"]}, "reserved"),
    ],
)
def test_bad_resume_arguments_rejected_at_submit(
    make_session: Any, kw: dict[str, Any], match: str
) -> None:
    with make_session(workers=1) as s, pytest.raises(pilotfish.InvalidTask, match=match):
        s.executable(["true"], **kw)


HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize(
    ("names", "extra"),
    [
        (["/tmp/ckpt"], {}),
        (["../ckpt"], {}),
        (["a/../../ckpt"], {}),
        (["ckpt", "./ckpt"], {}),
        (["ckpt", "sub/../ckpt"], {}),
        (["data/ckpt"], {"inputs": {"data": HERE}}),
        (["data"], {"inputs": {"data": HERE}}),
        (["x/ckpt"], {"inputs": {"x/": HERE}}),
        (["stdout.txt"], {}),
        (["run/../stderr.txt"], {}),
        (["."], {}),
        (["c\0kpt"], {}),
        ([""], {}),
        ([3], {}),
        (["ckpt"], {"cwd": "/tmp"}),
    ],
)
def test_resume_files_obey_the_rules_of_outputs(
    make_session: Any, names: list[Any], extra: dict[str, Any]
) -> None:
    """Issue 22 item 13: resume_files=["data/ckpt"], where data is a staged input
    directory, was accepted and every retry silently started fresh (the file is the
    user's, staged afresh in every attempt), while outputs inside inputs were refused.
    Whatever outputs refuse at submit, resume_files refuse too, naming the argument."""
    with make_session(workers=1) as s:
        with pytest.raises(pilotfish.InvalidTask, match="output"):
            s.executable(["true"], outputs=names, **extra)
        with pytest.raises(pilotfish.InvalidTask, match="resume_files"):
            s.executable(["true"], resume_files=names, **extra)


def test_the_worker_refuses_a_resume_file_inside_an_input(tmp_path: Path) -> None:
    """The same rule on the worker, on the resolved call (a template that did not come
    through executable(): an older client, a hand-made payload): INVALID_TASK, and
    nothing is copied from the earlier sandbox into the input directory."""
    import pickle

    from pilotfish.runtime.program_attempt import run_command_attempt
    from pilotfish.wire import messages as _wire

    data = tmp_path / "data"
    data.mkdir()
    template = {
        "argv": ["true"],
        "inputs": {"data": str(data)},
        "outputs": [],
        "env": None,
        "stdin": None,
        "cwd": None,
        "timeout": None,
        "retry_exit_codes": [],
        "keep_sandboxes": "failed",
        "resume_files": ["data/ckpt"],
    }
    m = _wire.RunAttempt(2, "k", "command", pickle.dumps(template), (), None, lineage=("n", 1, 1))
    ok, out = run_command_attempt(m, str(tmp_path / "run"))
    env = pickle.loads(out)
    assert not ok and env.category == "invalid_task"
    assert "resume file 'data/ckpt' is (inside) the input 'data'" in env.message
    assert list(data.iterdir()) == []


# ------------------------------------------------------------------ pure helpers
def test_tags_are_unique_per_session_and_name_the_previous_attempt() -> None:
    assert attempt_tags(7, ()) == ("a7", None, None)
    assert attempt_tags(7, ("beef",)) == ("beefa7", None, None)
    assert attempt_tags(7, ("be/ef", 3, 2)) == ("beefa7", "beefa3", 2)
    assert make_lineage("beef") == ("beef",)
    assert make_lineage("beef", (3, 2)) == ("beef", 3, 2)
    # an earlier session's attempt (resume after the client died): its own nonce
    lineage = make_lineage("beef", None, ("cafe", 4, 1, "of run 1 (interrupted)"))
    assert attempt_tags(7, lineage) == ("beefa7", "cafea4", 1)
    assert previous_attempt(7, lineage)[3] == "attempt 1 of run 1 (interrupted)"
    found = make_lineage("beef", None, ("cafe", 4, None, "of run 1 (found)"))
    assert previous_attempt(7, found)[1:] == ("cafea4", None, "an attempt of run 1 (found)")


def test_newest_sandbox_is_the_keys_own(tmp_path: Path) -> None:
    """Resume finds an attempt whose start the journal lost by the key's own prefix (a
    hash of the whole key): never another key's sandbox, a symlink, or a name that is
    not an attempt's tag."""
    root = tmp_path / "sandboxes"
    a = make_sandbox(root, "k", "0123abcda5c2")
    assert newest_sandbox(root, "k") == (a, "0123abcd", 5)
    make_sandbox(root, "k2", "0123abcda9")
    make_sandbox(root, "k", "nota")
    (root / (a.name + "x")).symlink_to(a)
    assert newest_sandbox(root, "k") == (a, "0123abcd", 5)
    assert newest_sandbox(root, "other") is None
    index = sandbox_index(root)  # one scan for many keys: the same answers
    assert newest_sandbox(root, "k", index) == (a, "0123abcd", 5)
    assert newest_sandbox(root, "k2", index)[1:] == ("0123abcd", 9)  # type: ignore[index]
    assert newest_sandbox(root, "other", index) is None


def test_restore_refuses_links_out_of_the_old_sandbox(tmp_path: Path) -> None:
    """A checkpoint name that is a symlink to a file elsewhere (the user's own file, or a
    planted one) is never copied: edges trust nothing."""
    root = tmp_path / "sandboxes"
    old = make_sandbox(root, "k", "na1")
    secret = tmp_path / "secret"
    secret.write_text("not a checkpoint")
    (old / "ckpt").symlink_to(secret)
    assert find_sandbox(root, "k", "na1") == old
    assert find_sandbox(root, "k", "na2") is None
    new = make_sandbox(root, "k", "na2")
    ok, note = restore_files(old, 1, new, ("ckpt",))
    assert not ok and note == "fresh start: ckpt is a link out of the sandbox (in attempt 1)"
    assert not (new / "ckpt").exists()
    (old / "ckpt").unlink()
    (old / "ckpt").write_bytes(b"x" * 48_000_000)
    ok, note = restore_files(old, 2, new, ("ckpt",))
    assert ok and note == "resumed from attempt 2: ckpt, 48 MB"
    assert restore_files(None, 2, new, ("ckpt",))[1].startswith(
        "fresh start: the sandbox of attempt 2 is not on host"
    )


def test_show_prints_the_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pilotfish show KEY` prints what each attempt resumed from (from the journal)."""
    from pilotfish.store import schema
    from pilotfish.tools import cli

    if "note" not in getattr(schema, "ATTEMPT_FIELDS", ()):
        pytest.skip("this journal does not store attempt notes yet (schema.ATTEMPT_FIELDS)")
    rundir = tmp_path / "run"
    kw = _count(tmp_path, "exit 75")
    with pilotfish.Session(workers=1, rundir=str(rundir)) as s:
        t = s.executable(kw.pop("argv"), retry_exit_codes=[75], retries=1, key="member-1", **kw)
        t.result(timeout=60)
    assert cli.main(["--rundir", str(rundir), "show", "member-1"]) == 0
    assert "attempt 2 (run 1): resumed from attempt 1: ckpt, 2 B" in capsys.readouterr().out
