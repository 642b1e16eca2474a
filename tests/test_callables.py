"""Python callables on every backend: values, dependencies and lossless errors (conformance)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import pilotfish
from conftest import FAKE_NO_PROCESS, environment_attempts, skip_on, wait_for
from pilotfish import Category, State

# ---------------------------------------------------------------- task functions


def add(a: int, b: int) -> int:
    return a + b


def inc(x: int) -> int:
    return x + 1


def total(xs: list[int], extra: dict[str, int] | None = None) -> int:
    return sum(xs) + sum((extra or {}).values())


def fail_with(msg: str) -> None:
    raise ValueError(msg)


def low_level() -> None:
    {}["missing"]


def chained() -> None:
    try:
        low_level()
    except KeyError as e:
        raise RuntimeError("could not read the configuration") from e


class TwoArgError(Exception):
    def __init__(self, path: str, code: int) -> None:
        super().__init__(f"{path} failed with {code}")
        self.path = path
        self.code = code


def raise_two_arg() -> None:
    raise TwoArgError("/data/run1", 7)


class LockedError(Exception):
    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_locked() -> None:
    raise LockedError("holds a lock")


def return_lock() -> threading.Lock:
    return threading.Lock()


def flaky(marker: str, failures: int) -> str:
    """Fails with OSError the first `failures` times (counted in a file)."""
    p = Path(marker)
    n = int(p.read_text()) if p.exists() else 0
    p.write_text(str(n + 1))
    if n < failures:
        raise OSError(f"transient I/O problem {n + 1}")
    return f"ok after {n + 1}"


def sleep_then(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


def divide(a: float, b: float) -> float:
    return a / b


# ---------------------------------------------------------------- values and graphs


def test_values_dependencies_and_map(session: pilotfish.Session) -> None:
    """The issue's first example: values, futures nested in arguments, map."""
    a = session.submit(add, 1, 2)
    b = session.submit(total, [a, session.submit(add, 3, 4)], extra={"x": a})
    assert b.result(timeout=30) == 3 + 7 + 3
    assert b.dependencies and all(d.state is State.DONE for d in b.dependencies)
    assert list(session.map(abs, range(-5, 5))) == [abs(i) for i in range(-5, 5)]
    assert a.state is State.DONE and a.failure is None
    assert len(a.attempts) == 1
    att = a.attempts[0]
    assert att.number == 1 and att.outcome == "done" and att.pid and att.worker
    assert att.started is not None and att.ended is not None and att.ended >= att.started


def test_chain_of_dependencies(session: pilotfish.Session) -> None:
    """A 50-step chain: each task waits for the previous value."""
    t = session.submit(inc, 0)
    for _ in range(49):
        t = session.submit(inc, t)
    assert t.result(timeout=30) == 50


def test_keys_are_stable_and_unique(session: pilotfish.Session) -> None:
    """Same call -> same base key; a duplicate gets a suffix; user keys must be unique."""
    a = session.submit(add, 1, 2)
    b = session.submit(add, 1, 2)
    c = session.submit(add, 2, 1)
    assert a.key.startswith("add-") and a.key != b.key and b.key.startswith(a.key)
    assert c.key != a.key
    k = session.submit(pilotfish.task(add, key="sum-1-2"), 1, 2)
    assert k.key == "sum-1-2"
    with pytest.raises(pilotfish.InvalidTask, match="sum-1-2"):
        session.submit(pilotfish.task(add, key="sum-1-2"), 5, 6)
    assert k.result(timeout=30) == 3


def test_wait_and_as_completed(session: pilotfish.Session) -> None:
    """pilotfish.wait / as_completed mirror concurrent.futures."""
    fs = [session.submit(sleep_then, i, 0.01 * i) for i in range(6)]
    done, not_done = pilotfish.wait(fs, timeout=30)
    assert len(done) == 6 and not not_done
    assert sorted(f.result() for f in pilotfish.as_completed(fs, timeout=30)) == list(range(6))


# ---------------------------------------------------------------- lossless exceptions


def test_user_exception_type_message_traceback_and_note(session: pilotfish.Session) -> None:
    """A user error comes back as its own type, with the remote traceback and a note."""
    t = session.submit(fail_with, "bad parameter 42")
    with pytest.raises(ValueError, match="bad parameter 42") as info:
        t.result(timeout=30)
    exc = info.value
    assert any("fail_with" in line for line in __import__("traceback").format_tb(exc.__traceback__))
    notes = getattr(exc, "__notes__", [])
    assert any(t.key in n and "attempt 1" in n and "worker" in n and "host" in n for n in notes)
    f = t.failure
    assert f is not None and f.category is Category.USER_ERROR and not f.transient
    assert f.exc_type == "ValueError"
    assert "fail_with" in (f.traceback or "") and "bad parameter 42" in (f.traceback or "")
    assert t.state is State.FAILED
    assert session.submit(add, 1, 1).result(timeout=30) == 2  # still works


def test_cause_chain_is_kept(session: pilotfish.Session) -> None:
    """`raise ... from e` on the worker keeps __cause__ (and its traceback) on the client."""
    t = session.submit(chained)
    with pytest.raises(RuntimeError, match="configuration") as info:
        t.result(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, KeyError) and cause.args == ("missing",)
    assert cause.__traceback__ is not None
    text = t.failure.traceback if t.failure else ""
    assert "low_level" in text and "direct cause" in text and "chained" in text


def test_exception_with_two_required_init_args(session: pilotfish.Session) -> None:
    """Exceptions whose __init__ takes several required arguments cannot be unpickled
    the usual way (pickle calls cls(*args)); pilotfish rebuilds them as their own type."""
    t = session.submit(raise_two_arg)
    with pytest.raises(TwoArgError) as info:
        t.result(timeout=30)
    assert info.value.path == "/data/run1" and info.value.code == 7
    assert str(info.value) == "/data/run1 failed with 7"
    assert session.submit(add, 2, 2).result(timeout=30) == 4


def test_unpicklable_exception_becomes_remote_error(session: pilotfish.Session) -> None:
    """An exception holding a lock cannot travel: RemoteError keeps name, message, traceback."""
    t = session.submit(raise_locked)
    with pytest.raises(pilotfish.RemoteError) as info:
        t.result(timeout=30)
    e = info.value
    assert e.type_name.endswith("LockedError") and "holds a lock" in str(e)
    assert "raise_locked" in e.remote_traceback
    assert e.failure is not None and e.failure.category is Category.USER_ERROR
    assert session.submit(add, 3, 3).result(timeout=30) == 6


def test_unpicklable_result_fails_that_task_only(session: pilotfish.Session) -> None:
    """A result that cannot be pickled is a USER_ERROR of that task, not a worker crash;
    what result() raises says so, for which task, and what to do (issue 25 item 14: it
    was a bare "cannot pickle '_thread.lock' object"), still a TypeError."""
    t = session.submit(return_lock)
    with pytest.raises(TypeError, match="lock") as info:
        t.result(timeout=30)
    assert "could not be pickled" in str(info.value) and t.key in str(info.value)
    assert "return plain data" in str(info.value)
    assert t.failure is not None and t.failure.category is Category.USER_ERROR
    assert "could not be pickled" in t.failure.message and t.key in t.failure.message
    assert len(t.attempts) == 1  # not retried, no worker lost
    assert info.value is not None
    assert session.submit(add, 4, 4).result(timeout=30) == 8


def test_unpicklable_argument_rejected_at_submit(session: pilotfish.Session) -> None:
    """An argument that cannot be pickled is an error from submit() itself, naming it."""
    with pytest.raises(pilotfish.InvalidTask, match=r"argument 1 \(lock\)"):
        session.submit(add, 1, threading.Lock())
    with pytest.raises(pilotfish.InvalidTask, match="keyword argument 'extra'"):
        session.submit(total, [1], extra=threading.Lock())
    assert session.submit(add, 5, 5).result(timeout=30) == 10


def test_task_of_another_session_is_invalid(
    make_session: Any, session: pilotfish.Session, tmp_path: Path
) -> None:
    """A future from another session cannot be a dependency."""
    with make_session(workers=1) as other:
        foreign = other.submit(add, 1, 1)
        with pytest.raises(pilotfish.InvalidTask, match="another Session"):
            session.submit(inc, foreign)
        foreign.result(timeout=30)


def test_submit_after_shutdown(make_session: Any, tmp_path: Path) -> None:
    """Executor semantics: submit after shutdown raises RuntimeError."""
    s = make_session(workers=1)
    s.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        s.submit(add, 1, 2)


# ---------------------------------------------------------------- dependency failure


def test_dependency_failure_three_levels_deep(session: pilotfish.Session) -> None:
    """A failure deep in a graph fails everything downstream at once, naming the root,
    while an independent task still runs to completion."""
    root = session.submit(divide, 1, 0)
    l1 = session.submit(inc, root)
    l2 = session.submit(add, l1, 1)
    l3 = session.submit(total, [l2, 5])
    independent = session.submit(sleep_then, 99, 0.2)
    with pytest.raises(pilotfish.DependencyFailed) as info:
        l3.result(timeout=10)
    e = info.value
    assert e.root == root.key and e.upstream == l2.key
    assert root.key in str(e)
    assert isinstance(e.__cause__, ZeroDivisionError)
    assert l1.failure is not None and l1.failure.upstream == root.key
    assert l1.failure.category is Category.DEPENDENCY_FAILED
    assert {f.key for f in session.failures()} == {root.key, l1.key, l2.key, l3.key}
    assert independent.result(timeout=30) == 99
    late = session.submit(inc, l3)  # submitted after the failure: fails at once
    with pytest.raises(pilotfish.DependencyFailed):
        late.result(timeout=5)


# ---------------------------------------------------------------- retries and policy


def test_retry_on_retries_a_flaky_task(session: pilotfish.Session, tmp_path: Path) -> None:
    """retry_on=(OSError,) retries a user exception; the same task sees all attempts."""
    marker = tmp_path / "count"
    fn = pilotfish.task(flaky, retries=3, retry_on=(OSError,))
    t = session.submit(fn, str(marker), 2)
    assert t.result(timeout=30) == "ok after 3"
    assert [a.outcome for a in t.attempts] == ["user_error", "user_error", "done"]
    assert [a.number for a in t.attempts] == [1, 2, 3]
    assert t.attempts[0].failure is not None and "transient I/O" in t.attempts[0].failure.message


def test_no_retry_without_retry_on(session: pilotfish.Session, tmp_path: Path) -> None:
    """A user exception is never retried unless asked for, whatever `retries` says."""
    marker = tmp_path / "count"
    t = session.submit(pilotfish.task(flaky, retries=5), str(marker), 1)
    with pytest.raises(OSError, match="transient I/O problem 1"):
        t.result(timeout=30)
    assert len(t.attempts) == 1 and marker.read_text() == "1"


def test_retry_on_not_matching_is_not_retried(session: pilotfish.Session, tmp_path: Path) -> None:
    """retry_on=(KeyError,) does not retry an OSError."""
    marker = tmp_path / "count"
    t = session.submit(pilotfish.task(flaky, retry_on=KeyError), str(marker), 1)
    with pytest.raises(OSError):
        t.result(timeout=30)
    assert len(t.attempts) == 1


def test_retry_budget_is_respected(session: pilotfish.Session, tmp_path: Path) -> None:
    """retries=1 with a task that fails 3 times: 2 attempts, then the last error."""
    marker = tmp_path / "count"
    t = session.submit(pilotfish.task(flaky, retries=1, retry_on=True), str(marker), 3)
    with pytest.raises(OSError, match="problem 2"):
        t.result(timeout=30)
    assert len(t.attempts) == 2


def test_keep_going_false_cancels_what_has_not_started(make_session: Any, tmp_path: Path) -> None:
    """keep_going=False: after the first failure nothing new starts; running work ends."""
    with make_session(workers=1, keep_going=False) as s:
        bad = s.submit(fail_with, "stop here")
        queued = [s.submit(sleep_then, i, 0.05) for i in range(20)]
        with pytest.raises(ValueError):
            bad.result(timeout=30)
        pilotfish.wait(queued, timeout=30)
        cancelled = [q for q in queued if q.cancelled()]
        assert cancelled, "tasks that had not started must be cancelled"
        for q in cancelled:
            assert q.state is State.CANCELLED
            with pytest.raises(pilotfish.CancelledError):
                q.result()
        assert all(q.result() == i for i, q in enumerate(queued) if not q.cancelled())


def test_on_failure_retry_with_changed_arguments(make_session: Any, tmp_path: Path) -> None:
    """The failure handler resubmits with a smaller time step; same task, two attempts."""
    seen = []

    def handler(failure: pilotfish.FailureRecord, call: pilotfish.Call) -> object:
        seen.append((failure.key, failure.category, call.args))
        if call.args[1] == 0:
            return pilotfish.Retry(args=(call.args[0], 4))
        return None

    with make_session(workers=2, on_failure=handler) as s:
        t = s.submit(divide, 8, 0)
        assert t.result(timeout=30) == 2.0
        assert len(t.attempts) == 2 and t.attempts[0].outcome == "user_error"
        assert seen == [(t.key, Category.USER_ERROR, (8, 0))]
        u = s.submit(divide, 1, "x")  # handler returns None -> default policy: fail
        with pytest.raises(TypeError):
            u.result(timeout=30)


def test_on_failure_fail_and_handler_errors(make_session: Any, tmp_path: Path) -> None:
    """Fail() stops retries; a handler that raises fails the task with that error."""

    def handler(failure: pilotfish.FailureRecord, call: pilotfish.Call) -> object:
        if call.args[0] == "boom":
            raise LookupError("handler bug")
        return pilotfish.Fail()

    with make_session(workers=1, on_failure=handler) as s:
        t = s.submit(pilotfish.task(fail_with, retry_on=True), "x")
        with pytest.raises(ValueError):
            t.result(timeout=30)
        assert len(t.attempts) == 1
        h = s.submit(fail_with, "boom")
        with pytest.raises(LookupError, match="handler bug") as info:
            h.result(timeout=30)
        assert isinstance(info.value.__cause__, ValueError)
        assert h.failure is not None and "on_failure handler raised" in h.failure.message
        assert s.submit(add, 1, 2).result(timeout=30) == 3


# ---------------------------------------------------------------- events and cancel


def test_events_and_done_callbacks(make_session: Any, tmp_path: Path) -> None:
    """on_event sees task transitions and worker starts; done callbacks fire."""
    events: list[object] = []
    with make_session(workers=2, on_event=events.append) as s:
        t = s.submit(add, 1, 2)
        called = threading.Event()
        t.add_done_callback(lambda f: called.set())
        t.result(timeout=30)
        assert called.wait(5)
    task_events = [e for e in events if isinstance(e, pilotfish.TaskEvent) and e.key == t.key]
    finishes = [e.finish for e in task_events]
    assert finishes[0] is State.PENDING and finishes[-1] is State.DONE
    assert State.RUNNING in finishes
    assert any(isinstance(e, pilotfish.WorkerEvent) and e.kind == "started" for e in events)
    assert any(isinstance(e, pilotfish.MasterEvent) and e.kind == "started" for e in events)


def test_cancel_queued_tasks(make_session: Any, tmp_path: Path) -> None:
    """Queued tasks can be cancelled; started ones cannot (concurrent.futures semantics)."""
    with make_session(workers=1) as s:
        first = s.submit(sleep_then, 1, 0.5)
        queued = [s.submit(sleep_then, i, 0.01) for i in range(10)]
        dependent = s.submit(inc, queued[-1])
        wait_for(first.running)
        assert not first.cancel()
        assert queued[-1].cancel() and queued[-1].cancelled()
        assert dependent.cancelled()
        assert first.result(timeout=30) == 1
        assert queued[0].result(timeout=30) == 0


def test_cancel_a_task_whose_input_is_running(make_session: Any, tmp_path: Path) -> None:
    """A task whose input is still running has not started, so it can be cancelled: on a
    backend that links chains it is already there, waiting for the input's value, and is
    withdrawn; elsewhere it waits in the session. Its body never runs, and the input and
    another task taking the same input are not affected."""
    import faulty_matrix as fm

    count = str(tmp_path / "count")
    with make_session(workers=2) as s:
        head = s.submit(sleep_then, 5, 2.0)
        doomed = s.submit(fm.plus, count, head, 1)
        wait_for(head.running, timeout=120)
        assert not doomed.running()
        assert doomed.cancel() and doomed.cancelled()
        other = s.submit(inc, head)
        assert other.result(timeout=60) == 6 and head.result(timeout=60) == 5
    assert not os.path.exists(count)  # the cancelled body never ran
    assert all(a.started is None for a in doomed.attempts), doomed.attempts


def test_an_end_pilotfish_cannot_handle_fails_its_task_and_names_the_error(
    make_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the client while it takes an attempt's end (here: translating the result
    raises) must not lose the task: it fails RUNTIME_LOST, at once and not retried, with a
    message naming the error, and the session goes on."""
    from pilotfish.backends.base import Result

    with make_session(workers=1) as s:
        tr = s._driver.translate
        real = tr.event

        def broken(ev: Any) -> Any:
            if isinstance(ev, Result) and ev.ok:
                raise ZeroDivisionError("boom while translating")
            return real(ev)

        monkeypatch.setattr(tr, "event", broken)
        t = s.submit(inc, 1)
        exc = t.exception(timeout=60)
        f = t.failure
        assert f is not None and f.category is Category.RUNTIME_LOST, f
        assert "ZeroDivisionError: boom while translating" in f.message, f.message
        assert "bug in pilotfish" in f.message and "ZeroDivisionError" in (f.traceback or "")
        assert isinstance(exc, pilotfish.PilotfishError), repr(exc)
        assert [a.outcome for a in t.attempts] == ["runtime_lost"], t.attempts
        monkeypatch.undo()
        assert s.submit(inc, 2).result(timeout=60) == 3


def test_shutdown_cancel_futures(make_session: Any, tmp_path: Path) -> None:
    """shutdown(cancel_futures=True) cancels what has not started and returns promptly."""
    s = make_session(workers=1)
    fs = [s.submit(sleep_then, i, 0.2) for i in range(20)]
    time.sleep(0.1)
    t0 = time.monotonic()
    s.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - t0 < 5
    assert sum(f.cancelled() for f in fs) >= 15
    assert all(f.done() for f in fs)


# ---------------------------------------------------------------- __main__ scripts


def test_functions_from_main_travel_by_value(tmp_path: Path) -> None:
    """A workflow script's own functions (from __main__) run on workers, and a worker
    does not re-run the unguarded top level of the script."""
    script = tmp_path / "flow.py"
    marker = tmp_path / "toplevel-runs"
    script.write_text(
        textwrap.dedent(f"""
        import pilotfish
        with open({str(marker)!r}, "a") as f:
            f.write("x")

        def square(x):
            return x * x

        class MyError(Exception):
            pass

        def bad():
            raise MyError("from main")

        s = pilotfish.Session(workers=2, rundir={str(tmp_path / "r")!r})
        print(sum(s.map(square, range(10))))
        try:
            s.submit(bad).result()
        except MyError as e:
            import traceback
            print("caught", type(e).__name__, e)
            traceback.print_exception(e)
        s.shutdown()
    """)
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "285" in out.stdout and "caught MyError from main" in out.stdout
    assert f'File "{script}"' in out.stderr and 'raise MyError("from main")' in out.stderr
    assert marker.read_text() == "x"


def test_processes(session: pilotfish.Session, backend: str) -> None:
    """Session.processes() names the master (local, radical) or scheduler (Dask) and the
    workers (on radical a worker's pid is known once it has registered with the master)."""
    skip_on(backend, "fake", reason=FAKE_NO_PROCESS + ": there is no master or worker pid")
    session.submit(add, 1, 1).result(timeout=30)
    procs = wait_for(lambda: (p := session.processes()) and len(p["workers"]) == 2 and p, 30)
    assert os.getpid() not in procs["workers"]
    if backend in ("local", "radical"):
        assert procs["master"] and procs["master"] != os.getpid()
    else:  # Dask: the scheduler plays the master's part
        assert procs["master"] is None and procs["scheduler"].startswith("tcp://")


# --------------------------------------------------------------------------- Executor args


def test_initializer_state_is_seen_by_tasks(make_session: Any) -> None:
    """initializer/initargs (as ProcessPoolExecutor's) run in the worker before its
    tasks, on every backend; map(chunksize=) batches calls."""
    from executor_tasks import init, state

    s = make_session(workers=2, initializer=init, initargs=("loaded",))
    fs = [s.submit(state) for _ in range(6)]
    assert {f.result(timeout=120)[0] for f in fs} == {"loaded"}
    assert [v for v, _ in s.map(lambda _: state(), range(5), chunksize=2)] == ["loaded"] * 5


def test_failing_initializer_is_environment(make_session: Any, backend: str) -> None:
    from executor_tasks import init_fails, state

    s = make_session(workers=2, initializer=init_fails)
    f = s.submit(state)
    with pytest.raises(pilotfish.EnvironmentMismatch, match="initializer"):
        f.result(timeout=120)
    assert f.failure is not None and f.failure.category is Category.ENVIRONMENT
    assert "error in initializer" in (f.failure.traceback or "")
    environment_attempts(f, backend)
