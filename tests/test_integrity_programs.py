"""Issue 13, program tasks: nothing a user types can destroy or falsify data.

Each test names the mistaken or hostile input it reproduces. They run on the local
backend (the code under test, ``backends/command_runner.py`` and
``pilotfish.runtime.programs``, is shared by every backend).
"""

from __future__ import annotations

import math
import pickle
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pilotfish
from pilotfish import Category
from pilotfish.backends.fake import FakeBackend
from pilotfish.runtime.program_attempt import run_command_attempt
from pilotfish.runtime.programs import CommandSpec, run_command, safe_dirname, spec_problem
from pilotfish.wire import messages as _wire

Make = Callable[..., pilotfish.Session]


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Make]:
    """Local sessions (one worker) on ``tmp_path/run`` unless told otherwise; all closed."""
    made: list[pilotfish.Session] = []

    def make(fake: bool = False, **kw: Any) -> pilotfish.Session:
        """``fake``: a FakeBackend session, for checks that never reach a worker."""
        kw.setdefault("rundir", str(tmp_path / "run"))
        if fake:
            kw.update(backend=FakeBackend(rundir=kw["rundir"]), journal=None)
        kw.setdefault("workers", 1)
        kw.setdefault("backoff", pilotfish.Backoff(base=0.01))
        s = pilotfish.Session(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.shutdown(wait=True, cancel_futures=True)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ----------------------------------------------------------------- 1. keys never paths


def test_key_dotdot_does_not_delete_the_run_directory(local: Make, tmp_path: Path) -> None:
    """``key=".."``: the results folder was named from the key and removed first, which
    deleted the whole run directory, journal included, while the session ran."""
    run = tmp_path / "run"
    s = local()
    other = s.executable(["sh", "-c", "echo mine > o"], outputs=["o"], key="other")
    mine = other.result(timeout=30).outputs["o"]
    r = s.executable(["sh", "-c", "echo x > o"], outputs=["o"], key="..").result(timeout=30)
    assert (run / "journal.db").exists()
    assert mine.read_text() == "mine\n"
    assert run in r.outputs["o"].parents and r.outputs["o"].read_text() == "x\n"
    assert {p.name for p in tmp_path.iterdir()} == {"run"}  # nothing created beside it


def test_key_dot_keeps_other_tasks_outputs(local: Make, tmp_path: Path) -> None:
    """``key="."``: its results folder was the results root itself, so every other
    task's outputs were deleted and the run reported success."""
    s = local()
    first = s.executable(["sh", "-c", "echo A > o"], outputs=["o"], key="A").result(timeout=30)
    s.executable(["sh", "-c", "echo dot > o"], outputs=["o"], key=".").result(timeout=30)
    assert first.outputs["o"].read_text() == "A\n"
    assert first.stdout.exists()


def test_keys_a_slash_b_and_a_underscore_b_do_not_share_results(local: Make) -> None:
    """Keys ``"a/b"`` then ``"a_b"`` mapped to one folder: the first task's ``out.txt``
    then held the second task's data."""
    s = local()
    ab = s.executable(["sh", "-c", "echo one > out.txt"], outputs=["out.txt"], key="a/b")
    r1 = ab.result(timeout=30)
    a_b = s.executable(["sh", "-c", "echo two > out.txt"], outputs=["out.txt"], key="a_b")
    r2 = a_b.result(timeout=30)
    assert r1.outputs["out.txt"] != r2.outputs["out.txt"]
    assert r1.outputs["out.txt"].read_text() == "one\n"
    assert r2.outputs["out.txt"].read_text() == "two\n"


def test_long_keys_sharing_a_prefix_do_not_collide(local: Make) -> None:
    """Two 300-character keys with the same first 120 characters shared a folder."""
    s = local()
    k1, k2 = "k" * 299 + "1", "k" * 299 + "2"
    r1 = s.executable(["sh", "-c", "echo 1 > o"], outputs=["o"], key=k1).result(timeout=30)
    r2 = s.executable(["sh", "-c", "echo 2 > o"], outputs=["o"], key=k2).result(timeout=30)
    assert r1.outputs["o"].read_text() == "1\n" and r2.outputs["o"].read_text() == "2\n"
    for r in (r1, r2):
        assert len(r.stdout.parent.name) < 100


def test_hostile_keys_stay_inside_the_run_directory(local: Make, tmp_path: Path) -> None:
    """Keys ``"/"``, ``"../../escape"``, ``"/tmp/abs"``, a NUL byte and ``"."`` must not
    name a directory outside (or at the top of) the results directory."""
    run = tmp_path / "run"
    s = local()
    for key in ("/", "../../escape", "/tmp/abs", "..\\..", "a\0b", "."):
        r = s.executable(["sh", "-c", "echo k > o"], outputs=["o"], key=key).result(timeout=30)
        assert r.outputs["o"].parent.parent == run / "results", key
    assert {p.name for p in tmp_path.iterdir()} == {"run"}
    assert not Path("/tmp/abs").exists()


def test_safe_dirname_is_short_safe_and_collision_free() -> None:
    """Keys with '..', '.', '/', NUL, a lone surrogate or 300 characters become short,
    distinct names of safe characters that are never '.' or '..'."""
    keys = [
        "..",
        ".",
        "a/b",
        "a_b",
        "a\0b",
        "/",
        "bad\udc80",
        "k" * 299 + "1",
        "k" * 299 + "2",
        "",
        "ü",
    ]
    names = [safe_dirname(k) for k in keys]
    assert len(set(names)) == len(keys)
    for n in names:
        assert n not in (".", "..") and not n.startswith(".") and len(n) <= 60
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in n), n


# ----------------------------------------------------------------- 2. outputs from the sandbox


def test_output_inside_a_staged_input_directory_is_rejected(local: Make, tmp_path: Path) -> None:
    """``inputs={"d": indir}, outputs=["d/orig.txt"]``: the user's original input file
    was moved into results. It is now rejected at submit and the file stays put."""
    indir = tmp_path / "indir"
    indir.mkdir()
    (indir / "orig.txt").write_text("precious")
    s = local()
    with pytest.raises(pilotfish.InvalidTask, match=r"d/orig\.txt"):
        s.executable(["true"], inputs={"d": indir}, outputs=["d/orig.txt"])
    with pytest.raises(pilotfish.InvalidTask, match=r"'x'"):
        s.executable(["true"], inputs={"x": indir / "orig.txt"}, outputs=["x"])
    assert (indir / "orig.txt").read_text() == "precious"


def test_output_resolving_into_a_staged_input_fails_naming_it(local: Make, tmp_path: Path) -> None:
    """A program makes its declared output a symlink into a staged input directory (the
    user's): it was moved out of the user's folder; now MissingOutput names it."""
    indir = tmp_path / "indir"
    indir.mkdir()
    (indir / "orig.txt").write_text("precious")
    s = local()
    t = s.executable(
        ["sh", "-c", "ln -s d/orig.txt result.txt"],
        inputs={"d": indir},
        outputs=["result.txt"],
    )
    with pytest.raises(pilotfish.MissingOutput, match=r"result\.txt.*outside the sandbox"):
        t.result(timeout=30)
    assert (indir / "orig.txt").read_text() == "precious"


def test_output_symlink_to_an_outside_file_is_an_error(local: Make, tmp_path: Path) -> None:
    """An output that is itself a symlink to a file outside was "moved" as a link to that
    file; now it is MissingOutput naming the output, and the file is untouched."""
    target = tmp_path / "secret.txt"
    target.write_text("user data")
    s = local()
    t = s.executable(["ln", "-s", str(target), "out.txt"], outputs=["out.txt"])
    with pytest.raises(pilotfish.MissingOutput, match=r"'out\.txt'") as info:
        t.result(timeout=30)
    assert "outside the sandbox" in str(info.value)
    assert target.read_text() == "user data" and not target.is_symlink()


def test_output_symlink_inside_the_sandbox_is_copied(local: Make) -> None:
    """An output that is a symlink to another file of the sandbox is collected as a copy
    of its content (both outputs keep their data)."""
    s = local()
    t = s.executable(
        ["sh", "-c", "echo data > real.txt; ln -s real.txt alias.txt"],
        outputs=["alias.txt", "real.txt"],
    )
    r = t.result(timeout=30)
    assert (
        r.outputs["alias.txt"].read_text() == "data\n" and not r.outputs["alias.txt"].is_symlink()
    )
    assert r.outputs["real.txt"].read_text() == "data\n"


def test_absolute_cwd_with_outputs_is_rejected(local: Make, tmp_path: Path) -> None:
    """``cwd="/abs/userdir", outputs=["precious.txt"]`` moved the file out of the
    user's directory. Outputs are never collected outside the sandbox: rejected at
    submit. Without outputs, an absolute cwd still runs there."""
    userdir = tmp_path / "userdir"
    userdir.mkdir()
    (userdir / "precious.txt").write_text("keep me")
    s = local()
    with pytest.raises(pilotfish.InvalidTask, match="cwd"):
        s.executable(["true"], cwd=str(userdir), outputs=["precious.txt"])
    r = s.executable(["sh", "-c", "cat precious.txt"], cwd=str(userdir)).result(timeout=30)
    assert r.stdout.read_text() == "keep me"
    assert (userdir / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("cwd", ["../..", "..", "sub/../../x"])
def test_cwd_escaping_the_sandbox_is_rejected(local: Make, cwd: str) -> None:
    """``cwd="../.."`` was accepted and the program ran inside the run directory."""
    s = local(fake=True)
    with pytest.raises(pilotfish.InvalidTask, match="cwd"):
        s.executable(["true"], cwd=cwd)


# ----------------------------------------------------------------- 3. fresh sandboxes


def test_rerun_does_not_succeed_on_a_stale_output(local: Make, tmp_path: Path) -> None:
    """Run 1 (key K) writes o.txt then fails; run 2 (key K, a new session on the same
    rundir) creates nothing. Sandboxes were named ``K.aN`` and reused: run 2 succeeded on
    run 1's stale o.txt, and run 1's kept sandbox was gone."""
    s1 = local(journal=None)
    t1 = s1.executable(["sh", "-c", "echo STALE > o.txt; exit 1"], key="K", retries=0)
    with pytest.raises(pilotfish.CommandFailed) as info:
        t1.result(timeout=30)
    box1 = info.value.sandbox
    assert box1 is not None
    s1.shutdown()
    s2 = local(journal=None)
    t2 = s2.executable(["sh", "-c", "exit 0"], key="K", outputs=["o.txt"], retries=0)
    with pytest.raises(pilotfish.MissingOutput):
        t2.result(timeout=30)
    assert info.value.sandbox != t2.failure.sandbox  # type: ignore[union-attr]
    assert Path(box1, "o.txt").read_text() == "STALE\n"  # failed sandbox kept
    assert Path(box1, "stderr.txt").exists()


def test_same_key_and_attempt_never_share_a_sandbox(tmp_path: Path) -> None:
    """The same (key, attempt) run twice, as by two sessions on one rundir, gets two
    sandboxes, each created fresh (mode 0700), and the first is left alone."""
    template: dict[str, Any] = {
        "argv": ["sh", "-c", "test ! -e o && echo new > o"],
        "inputs": {},
        "outputs": ["o"],
        "env": None,
        "stdin": None,
        "cwd": None,
        "timeout": None,
        "retry_exit_codes": [],
        "keep_sandboxes": "all",
    }
    payload = _wire.dumps_call(template, lambda obj: None)
    m = _wire.RunAttempt(1, "K", "command", payload, (), None)
    boxes = []
    for _ in range(2):
        ok, data = run_command_attempt(m, str(tmp_path))
        assert ok, pickle.loads(data)
        boxes.append(pickle.loads(data).sandbox)
    assert boxes[0] != boxes[1] and all(b.is_dir() for b in boxes)
    assert all(stat.S_IMODE(b.stat().st_mode) == 0o700 for b in boxes)


# ----------------------------------------------------------------- 6. signal dispositions


def ignore_sigchld() -> str:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    return "ignored"


def test_task_ignoring_sigchld_does_not_make_a_failing_program_succeed(local: Make) -> None:
    """A Python task sets ``signal.signal(SIGCHLD, SIG_IGN)``; a later ``sh -c "exit 3"``
    on the same worker came back SUCCESS with return code 0."""
    s = local(workers=1)
    assert s.submit(ignore_sigchld).result(timeout=30) == "ignored"
    t = s.executable(["sh", "-c", "exit 3"], retries=0)
    with pytest.raises(pilotfish.CommandFailed) as info:
        t.result(timeout=30)
    assert info.value.returncode == 3


def test_lost_exit_status_is_never_success(tmp_path: Path) -> None:
    """With SIGCHLD ignored in the runner's own process the kernel reaps the child and
    ``wait`` fails with ECHILD, which subprocess reads as exit 0: reported, not "ok"."""
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        out = run_command(CommandSpec(argv=("sh", "-c", "exit 3")), tmp_path / "box")
    finally:
        signal.signal(signal.SIGCHLD, old)
    assert out.kind == "environment" and not out.ok
    assert "SIGCHLD" in out.message


# ----------------------------------------------------------------- 8. bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"argv": ["echo", "a\0b"]}, r"argv\[1\]"),
        ({"env": {"K": "v\0w"}}, "env"),
        ({"env": {"A=B": "v"}}, "env name"),
        ({"env": {"": "v"}}, "env name"),
        ({"cwd": 5}, "cwd"),
        ({"cwd": "a\0b"}, "cwd"),
        ({"timeout": float("inf")}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"outputs": ["."]}, r"'\.'"),
        ({"outputs": ["stdout.txt"]}, "stdout.txt"),
        ({"outputs": ["stderr.txt"]}, "stderr.txt"),
        ({"outputs": ["o", "./o"]}, "same file"),
        ({"outputs": ["o\0"]}, "NUL"),
        ({"retry_exit_codes": 5}, "retry_exit_codes"),
        ({"inherit_env": "PATH"}, "inherit_env"),
        ({"inherit_env": [5]}, "inherit_env"),
    ],
)
def test_bad_program_arguments_rejected_at_submit(
    local: Make, kwargs: dict[str, Any], match: str
) -> None:
    """Each of these crashed the worker (retried as WORKER_LOST, three worker deaths) or
    raised a raw TypeError; now ``executable`` raises InvalidTask naming the argument."""
    s = local(fake=True)
    argv = kwargs.pop("argv", ["true"])
    with pytest.raises(pilotfish.InvalidTask, match=match):
        s.executable(argv, **kwargs)
    assert s.tasks == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rundir": 3}, "rundir"),
        ({"rundir": "a\0b"}, "rundir"),
        ({"heartbeat_interval": math.nan}, r"Session\(heartbeat_interval="),
        ({"heartbeat_interval": math.inf}, r"Session\(heartbeat_interval="),
        ({"heartbeat_timeout": math.nan}, r"Session\(heartbeat_timeout="),
    ],
)
def test_bad_session_arguments_rejected(kwargs: dict[str, Any], match: str) -> None:
    """``Session(rundir=3)`` raised a raw TypeError; ``heartbeat_interval=nan`` was
    accepted and killed the heartbeat thread."""
    with pytest.raises(pilotfish.InvalidTask, match=match):
        pilotfish.Session(**kwargs)


@pytest.mark.parametrize("timeout", [math.inf, math.nan])
def test_non_finite_timeout_rejected_for_python_tasks(local: Make, timeout: float) -> None:
    """``timeout=inf``/``nan`` on a Python task is a mistake, rejected naming it."""
    s = local(fake=True)
    with pytest.raises(pilotfish.InvalidTask, match="timeout"):
        s.submit(pilotfish.task(abs, timeout=timeout), 1)


def nul_argument() -> str:
    return "a\0b"


def test_bad_argument_known_only_on_the_worker_is_invalid_task(local: Make) -> None:
    """A dependency's value with a NUL byte becomes argv: the worker crashed in Popen and
    the attempt was retried as WORKER_LOST; now the task fails INVALID_TASK, once."""
    s = local(workers=1)
    dep = s.submit(nul_argument)
    t = s.executable(["echo", dep], retries=3)
    with pytest.raises(pilotfish.InvalidTask, match=r"argv\[1\]"):
        t.result(timeout=30)
    assert t.failure is not None and t.failure.category is Category.INVALID_TASK
    assert len(t.attempts) == 1
    assert s.executable(["true"]).result(timeout=30).returncode == 0  # worker fine


def test_spec_problem_rules() -> None:
    """The one rule list the client and the worker share (unit level)."""
    ok = CommandSpec(argv=("prog",), outputs=("o",), cwd="sub", inputs={"in": "/x"})
    assert spec_problem(ok) is None
    bad = [
        CommandSpec(argv=()),
        CommandSpec(argv=("p", "a\0")),
        CommandSpec(argv=("p",), env={"A=B": "1"}),
        CommandSpec(argv=("p",), cwd="../x"),
        CommandSpec(argv=("p",), cwd="/abs", outputs=("o",)),
        CommandSpec(argv=("p",), timeout=math.inf),
        CommandSpec(argv=("p",), outputs=("sub/../stdout.txt",)),
        CommandSpec(argv=("p",), cwd="sub", outputs=("../o",)),
        CommandSpec(argv=("p",), inputs={"d": "/x"}, outputs=("d/o",)),
    ]
    for spec in bad:
        assert spec_problem(spec) is not None, spec
        assert run_command(spec, "/nonexistent-never-created").kind == "invalid"
    assert not Path("/nonexistent-never-created").exists()


# ----------------------------------------------------------------- environment


def test_inherit_env_restricts_what_a_program_sees(
    local: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret in the client's environment reaches every program by default;
    ``inherit_env=False`` or a list of names keeps it out."""
    monkeypatch.setenv("PF_TEST_SECRET", "hunter2")
    s = local()
    line = 'echo "${PF_TEST_SECRET-unset} ${PF_TEST_OTHER-unset}"'
    default = s.executable(["sh", "-c", line]).result(timeout=30)
    none = s.executable(
        ["sh", "-c", line], inherit_env=False, env={"PF_TEST_OTHER": "given"}
    ).result(timeout=30)
    some = s.executable(["sh", "-c", line], inherit_env=["PATH"]).result(timeout=30)
    assert default.stdout.read_text() == "hunter2 unset\n"
    assert none.stdout.read_text() == "unset given\n"
    assert some.stdout.read_text() == "unset unset\n"
