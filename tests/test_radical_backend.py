"""The RADICAL-Pilot raptor backend on a real ``local.localhost`` pilot (no mocks).

Skipped unless radical.pilot is importable (``pip install 'pilotfish[radical]'``). One
pilot (conftest's ``rp_pilot``) is shared by the test run; every test starts its own
pilotfish raptor master and workers on it and must end them. These are the failures
RADICAL-Pilot alone loses or truncates; the conformance suite (test_callables.py,
test_commands.py with ``--backends radical``) covers the common semantics.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import pilotfish
from pilotfish.core.policy import Backoff

rp = pytest.importorskip("radical.pilot")

from conftest import TOKEN_VAR, pid_alive, wait_for, with_env  # noqa: E402
from faulty_chain import chain_once  # noqa: E402
from pilotfish.backends.radical.backend import RadicalBackend  # noqa: E402

pytestmark = [
    pytest.mark.timeout(240),
    # RP's zmq sockets/contexts are garbage-collected unclosed in RP's own threads
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture
def make(rp_pilot: Any, tmp_path: Path) -> Iterator[Any]:
    made: list[tuple[pilotfish.Session, RadicalBackend]] = []

    def mk(workers: int = 2, backend_class: Any = RadicalBackend, **kw: Any) -> pilotfish.Session:
        rundir = str(tmp_path / f"run{len(made)}")
        b = backend_class(
            workers,
            pilot=rp_pilot[0],
            task_manager=rp_pilot[1],
            rundir=rundir,
            max_master_restarts=kw.pop("max_master_restarts", 3),
            heartbeat_timeout=kw.pop("heartbeat_timeout", 10.0),
        )
        kw.setdefault("backoff", Backoff(base=0.01))
        s = pilotfish.Session(backend=b, rundir=rundir, **kw)
        made.append((s, b))
        return s

    yield mk
    for s, b in made:
        procs = b.processes()
        s.shutdown(wait=True, cancel_futures=True)
        pids = [p for p in [procs["master"], *procs["workers"]] if p]
        wait_for(lambda pids=pids: not [p for p in pids if pid_alive(p)], timeout=15, interval=0.1)


# ---------------------------------------------------------------- task functions


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


class Oops(Exception):
    pass


def raise_oops(x: int) -> None:
    def inner() -> None:
        raise Oops(f"bad value {x}")

    inner()


def return_lock() -> Any:
    return threading.Lock()


def slow_once(marker: str) -> int:
    if not os.path.exists(marker):
        Path(marker).write_text("x")
        time.sleep(120)
    return 42


def sleep_long() -> None:
    time.sleep(120)


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def exit_hard(code: int) -> None:
    os._exit(code)


# ---------------------------------------------------------------- tests


def test_values_and_dependencies(make: Any) -> None:
    with make() as s:
        a = s.submit(square, 3)
        b = s.submit(square, 4)
        c = s.submit(add, a, b)
        assert c.result(timeout=120) == 25
        assert list(s.map(square, range(5), timeout=120)) == [0, 1, 4, 9, 16]


def test_user_exception_type_and_traceback(make: Any) -> None:
    with make() as s:
        t = s.submit(raise_oops, 7)
        with pytest.raises(Oops, match="bad value 7"):
            t.result(timeout=120)
        f = t.failure
        assert f is not None and f.category == pilotfish.Category.USER_ERROR
        assert "inner" in (f.traceback or "") and "raise_oops" in (f.traceback or "")


def test_unpicklable_result_is_user_error(make: Any) -> None:
    # RP alone loses this task forever (it stays AGENT_SCHEDULING)
    with make() as s:
        t = s.submit(return_lock)
        with pytest.raises(TypeError, match="lock"):
            t.result(timeout=120)
        assert t.failure is not None and t.failure.category == pilotfish.Category.USER_ERROR
        assert "could not be pickled" in t.failure.message
        assert len(t.attempts) == 1  # not retried, no worker lost
        assert s.submit(square, 6).result(timeout=120) == 36  # the worker is fine


def test_program_exit_3_full_stderr(make: Any) -> None:
    with make() as s:
        t = s.executable(
            [
                "sh",
                "-c",
                "i=0; while [ $i -lt 300 ]; do echo line-$i-xxxxxxxx >&2; i=$((i+1)); done; exit 3",
            ],
        )
        with pytest.raises(pilotfish.CommandFailed):
            t.result(timeout=120)
        f = t.failure
        assert f is not None and f.returncode == 3 and f.stderr_path
        err = Path(f.stderr_path).read_text()
        assert len(err) > 1024 and err.startswith("line-0-") and "line-299-" in err
        assert f.sandbox and Path(f.sandbox).is_dir()  # failed sandboxes are kept


def test_worker_sigkill_mid_task_is_lost_then_retried(make: Any, tmp_path: Path) -> None:
    # RP alone never fails the in-flight task of a killed worker
    marker = str(tmp_path / "marker")
    events: list[Any] = []
    with make(on_event=events.append) as s:
        t = s.submit(slow_once, marker)
        wait_for(lambda: os.path.exists(marker), timeout=120, interval=0.05)
        held = wait_for(lambda: s.processes()["held"], timeout=30, interval=0.05)
        (pid,) = held.values()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        assert t.result(timeout=120) == 42
        took = time.monotonic() - t0
        first = t.attempts[0]
        assert first.failure is not None
        assert first.failure.category == pilotfish.Category.WORKER_LOST
        # the worker's exit status, from RP's state update (its shell reports 128+9)
        assert first.failure.signal == "SIGKILL", first.failure
        assert "SIGKILL" in first.failure.message and "stderr" in first.failure.message
        assert first.worker and first.worker != t.attempts[1].worker  # a replacement ran it
        assert len(t.attempts) == 2
        print(f"worker SIGKILL -> done on retry in {took:.2f} s")


def test_master_killed_is_runtime_lost_quickly(make: Any) -> None:
    with make(max_master_restarts=0) as s:
        t = s.submit(sleep_long)
        wait_for(lambda: s.processes()["held"], timeout=120, interval=0.05)
        master = s.processes()["master"]
        t0 = time.monotonic()
        os.kill(master, signal.SIGKILL)
        with pytest.raises(pilotfish.RuntimeLost) as ei:
            t.result(timeout=60)
        took = time.monotonic() - t0
        assert took < 15, took
        assert "master" in str(ei.value) and "sandbox" in str(ei.value)
        print(f"master SIGKILL -> RuntimeLost in {took:.2f} s")


def test_end_pids_spares_a_recycled_pid(tmp_path: Path) -> None:
    """The backend ends a remembered worker pid only while it is the process remembered:
    a live process (standing for the user's shell on a recycled pid) with another
    creation time is not ended, nor its children (``end_pids`` returns once what it
    ended has exited). No pilot needed."""
    import subprocess

    import psutil

    from pilotfish.backends.radical.plumbing import end_pids

    shell = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
    try:
        wait_for(lambda: psutil.Process(shell.pid).children(), timeout=10, interval=0.02)
        child = psutil.Process(shell.pid).children()[0].pid
        created = psutil.Process(shell.pid).create_time()
        end_pids({shell.pid: created - 30.0}, grace=0.0)  # another process's time
        assert shell.poll() is None and pid_alive(child)
        end_pids({shell.pid: created + 30.0}, grace=0.0)  # learned before the pid was reused
        assert shell.poll() is None and pid_alive(child)
        end_pids({shell.pid: created}, grace=0.0)
        assert shell.wait(5) is not None
        wait_for(lambda: not pid_alive(child), timeout=5, interval=0.02)
    finally:
        if shell.poll() is None:
            for p in psutil.Process(shell.pid).children(recursive=True):
                p.kill()
            shell.kill()
        shell.wait()


def test_token_is_in_os_environ_only_around_the_spawn(tmp_path: Path) -> None:
    """``with_token`` holds the token in os.environ only during the call it wraps (the
    one that starts RP's pilot launcher) and restores what was there; a process another
    thread started in that window inherits it, but ``token_pids`` (what stop() ends)
    leaves it out as it is of no RP session (here a made-up session id: no RP session
    is started)."""
    import subprocess

    from pilotfish.backends.radical.plumbing import TOKEN_VAR as var
    from pilotfish.backends.radical.plumbing import token_pids, with_token

    token = "t0ken123"
    os.environ.pop(var, None)
    seen: list[str | None] = []
    stray: list[subprocess.Popen[bytes]] = []

    def spawn() -> str:
        seen.append(os.environ.get(var))
        # what another thread's spawn in this window gets: the token
        stray.append(subprocess.Popen(["sleep", "60"], cwd=tmp_path))
        return "made"

    try:
        assert with_token(token, spawn) == "made"
        assert seen == [token] and var not in os.environ
        os.environ[var] = "outer"
        with_token(token, lambda: seen.append(os.environ.get(var)))
        assert seen[-1] == token and os.environ[var] == "outer"
        del os.environ[var]
        wait_for(lambda: with_env(var, token), timeout=5, interval=0.02)
        assert stray[0].pid not in token_pids(token, "rp.session.pilotfish.test.0000")
    finally:
        os.environ.pop(var, None)
        for p in stray:
            p.kill()
            p.wait()


@pytest.mark.timeout(300)
def test_own_pilot_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend's own RP session and pilot: a pilot that ends (as at the end of its
    walltime) turns the running attempt into RuntimeLost at once, naming the pilot and
    its sandbox; nothing survives the Session."""
    monkeypatch.delenv(TOKEN_VAR)  # our own check below is stricter: the backend's token
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    b = RadicalBackend(1, rundir=str(tmp_path / "run"), cores=4)
    # meanwhile another thread of the client starts processes (a local Session's
    # workers would): they must not carry the backend's token, or at least not be ended
    import subprocess

    others: list[subprocess.Popen[bytes]] = []
    token_seen: list[float] = []
    starting = threading.Event()

    def other_thread() -> None:
        while not starting.is_set():
            if os.environ.get("PILOTFISH_RP_TOKEN"):
                token_seen.append(time.monotonic())
            if len(others) < 200:
                others.append(subprocess.Popen(["sleep", "300"], cwd=tmp_path))
            time.sleep(0.1)

    th = threading.Thread(target=other_thread)
    th.start()
    t0 = time.monotonic()
    try:
        s = pilotfish.Session(backend=b, rundir=str(tmp_path / "run"))
    finally:
        starting.set()
        th.join()
    with s:
        started = time.monotonic() - t0
        assert "PILOTFISH_RP_TOKEN" not in os.environ
        # the token was in os.environ for the PilotManager's start only, not the start
        assert len(token_seen) * 0.1 < min(10.0, started / 2), (len(token_seen), started)
        assert s.submit(square, 5).result(timeout=120) == 25
        wait_for(lambda: b.processes()["master"] and b.processes()["workers"], timeout=30)
        pids = [p for p in [b.processes()["master"], *b.processes()["workers"]] if p]
        t = s.submit(sleep_long)
        wait_for(t.running, timeout=60)
        t1 = time.monotonic()
        b.pilot.cancel()
        with pytest.raises(pilotfish.RuntimeLost) as ei:
            t.result(timeout=60)
        lost_in = time.monotonic() - t1
        msg = str(ei.value)
        assert b.processes()["pilot"] in msg and "pilot sandbox" in msg, msg
        with pytest.raises(pilotfish.RuntimeLost):  # nothing runs any more, nothing waits
            s.submit(square, 2).result(timeout=30)
    closed = time.monotonic() - t0
    try:
        # the client's other processes live on, those that inherited the token too
        assert all(p.poll() is None for p in others)
        left = with_env("PILOTFISH_RP_TOKEN", b.token)
        inherited = {p.pid for p in others}
        left = [p for p in left if p.pid not in inherited]
        assert not left, [" ".join(p.cmdline()) for p in left]
        assert not [p for p in pids if pid_alive(p)]
    finally:
        for p in others:
            p.kill()
            p.wait()
    print(f"own pilot: start {started:.1f} s, pilot cancelled -> RuntimeLost {lost_in:.1f} s")
    print(f"own pilot: start+tasks+close {closed:.1f} s")


def test_task_process_death_is_worker_lost_then_poison(make: Any) -> None:
    """The process running a call dies (segfault, os._exit): RP's own worker reports
    nothing and the task waits forever; pilotfish reports WORKER_LOST with the signal,
    retries, and declares the task poison after ``poison_after`` deaths."""
    with make(poison_after=2) as s:
        bad = s.submit(segfault)
        gone = s.submit(exit_hard, 7)
        ok = s.submit(square, 9)
        with pytest.raises(pilotfish.WorkerLost) as ei:
            bad.result(timeout=120)
        assert ok.result(timeout=120) == 81  # independent work keeps going
        f = ei.value.failure
        assert f.signal == "SIGSEGV", f
        assert {a.outcome for a in bad.attempts} == {"worker_lost"}, bad.attempts
        if len({a.worker for a in bad.attempts}) == 1:
            # workers pull tasks: every retry went to the same worker, restarted under
            # its name; one worker's deaths never make a task poison: retries used up
            assert len(bad.attempts) == 4 and "poison" not in f.message, f
        else:  # two deaths on two different workers (the same one may have died twice)
            assert "poison" in f.message and len({a.worker for a in bad.attempts}) == 2
        with pytest.raises(pilotfish.WorkerLost) as ei2:
            gone.result(timeout=120)
        assert ei2.value.failure.returncode == 7
        # the poison record says "exit code 7", the last attempt's "exited with code 7"
        assert "code 7" in ei2.value.failure.message


def test_call_timeout_is_timeout(make: Any) -> None:
    with make() as s:
        t = s.submit(pilotfish.task(timeout=1, retries=0)(sleep_long))
        with pytest.raises(pilotfish.TaskTimeout):
            t.result(timeout=60)
        assert s.submit(square, 3).result(timeout=60) == 9


def _read_chain(path: Path) -> dict[str, int]:
    """The pids chain_once published: the call's process, the per-task fork, the worker."""
    wait_for(path.exists, timeout=120, interval=0.05)
    chain: dict[str, int] = json.loads(path.read_text())
    return chain


def _assert_fork_lost_then_retried(t: Any, chain: dict[str, int], value: int) -> float:
    t0 = time.monotonic()
    assert t.result(timeout=60) == value
    took = time.monotonic() - t0
    assert took < 30, took  # noticed within seconds, not after a heartbeat timeout
    first = t.attempts[0]
    f = first.failure
    assert f is not None and f.category == pilotfish.Category.WORKER_LOST, f
    # the exit status of the per-task process (the highest link of the chain that died)
    assert f.signal == "SIGKILL" and f.returncode == -9, f
    assert "per-task process" in f.message and str(chain["fork"]) in f.message, f.message
    assert first.pid == chain["fork"]
    assert [a.outcome for a in t.attempts] == ["worker_lost", "done"]
    assert pid_alive(chain["worker"])  # the worker was not touched and lives on
    return took


def test_call_and_fork_sigkill_is_worker_lost_then_retried(make: Any, tmp_path: Path) -> None:
    """Both the process running a call and the per-task process the raptor worker forked
    for it are SIGKILLed (the OOM killer, ``kill -9`` on a process tree) while the worker
    lives on: nobody above them reported, the task waited forever (> 400 s) and so did
    ``Session.__exit__``. The worker now watches its per-task processes: WORKER_LOST with
    that process's SIGKILL within seconds, a retry that succeeds, a session that closes."""
    path = tmp_path / "chain.json"
    with make() as s:
        t = s.submit(chain_once, str(path), 7)
        chain = _read_chain(path)
        wait_for(lambda: chain["worker"] in s.processes()["workers"], timeout=30, interval=0.1)
        # the fork first: dead, it cannot report the death of the call's process
        os.kill(chain["fork"], signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # maybe gone already (PDEATHSIG)
            os.kill(chain["call"], signal.SIGKILL)
        took = _assert_fork_lost_then_retried(t, chain, 7)
        t_close = time.monotonic()
    closed = time.monotonic() - t_close
    assert closed < 60, closed
    print(f"call+fork SIGKILL -> done on retry in {took:.2f} s, closed in {closed:.1f} s")


def test_fork_sigkill_is_worker_lost_then_retried(make: Any, tmp_path: Path) -> None:
    """Only the per-task process between the worker and the call's process is SIGKILLed:
    the call's process must not run on as an orphan (it dies with its parent,
    PR_SET_PDEATHSIG), and the worker reports the per-task process's SIGKILL: WORKER_LOST,
    then a successful retry."""
    path = tmp_path / "chain.json"
    with make() as s:
        t = s.submit(chain_once, str(path), 8)
        chain = _read_chain(path)
        os.kill(chain["fork"], signal.SIGKILL)
        wait_for(lambda: not pid_alive(chain["call"]), timeout=5, interval=0.05)
        took = _assert_fork_lost_then_retried(t, chain, 8)
    print(f"fork SIGKILL -> done on retry in {took:.2f} s")


class _OldPilotfishOnThePilot(RadicalBackend):
    """The client claims a pilotfish version the pilot's environment does not have."""

    def master_config(self) -> dict[str, Any]:
        cfg = super().master_config()
        cfg["versions"] = dict(cfg["versions"], pilotfish="0.0.1")
        return cfg


def test_preflight_in_master_fails_tasks_with_environment(make: Any) -> None:
    with make(backend_class=_OldPilotfishOnThePilot) as s:
        t = s.submit(square, 2)
        with pytest.raises(pilotfish.EnvironmentMismatch) as ei:
            t.result(timeout=120)
        msg = str(ei.value)
        assert "pilotfish raptor master" in msg and "0.0.1" in msg, msg
        assert s.processes()["workers"] == []  # no worker was started


class _Clock:
    """A monotonic clock a test moves on."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _RecordingPort:
    """What a MasterBook asks RADICAL-Pilot to do, recorded: tasks put on RP's queue
    (``pushed``), cancelled or failed (``advanced``), starts published, log lines."""

    def __init__(self) -> None:
        self.pushed: list[dict[str, Any]] = []
        self.advanced: list[tuple[str, str]] = []
        self.published: list[str] = []
        self.logged: list[str] = []

    def push(self, tasks: list[dict[str, Any]]) -> None:
        self.pushed.extend(tasks)

    def cancel(self, tasks: list[dict[str, Any]]) -> None:
        self.advanced.extend((t["uid"], "CANCELED") for t in tasks)

    def fail(self, task: dict[str, Any], info: dict[str, Any], code: int) -> None:
        self.advanced.append((task["uid"], "FAILED"))

    def publish_start(self, uid: str, info: dict[str, Any]) -> None:
        self.published.append(uid)

    def kill_groups(self, pgids: tuple[int, ...]) -> None:
        pass

    def log(self, msg: str) -> None:
        self.logged.append(msg)


def _book(token: str = "tok", uid: str = "raptor.0001") -> Any:
    """A raptor master's bookkeeping (no RP component), up, with a recording port
    (``book.port``) and a clock of its own (``book.clock``)."""
    from pilotfish.backends.radical.master_book import MasterBook

    book = MasterBook(_RecordingPort(), token=token, uid=uid, clock=_Clock())
    book.mark_up()
    return book


def _rp_task(uid: str, raptor_id: str = "raptor.0001") -> dict[str, Any]:
    return {"uid": uid, "description": {"raptor_id": raptor_id, "mode": "function"}}


_MASTER = (4242, "here")  # the master's pid and host, published with a start


def test_master_takes_only_its_own_tasks() -> None:
    """What hung ``test_values_and_dependencies`` once in three CI runs, replayed on the
    master's bookkeeping. Another test had killed a master (raptor.0045) while its tasks
    pf.<theirs>.2.2 .. 7.7 were on their way: RP's agent scheduler keeps its push socket
    to a dead master's queue, RP binds every new queue on the lowest free port, so a
    later master (raptor.0049) got those tasks. The ledger key is the number at the end
    of the uid: our pf.<ours>.2.2 replaced the foreign 2.2, a worker claimed the foreign
    one (held our entry), ran it and finished it, and our task 2 was then dropped as "not
    in flight": ``c = add(a, b)`` waited forever. The master now takes only its own
    tasks (raptor_id and client token) and fences claims, starts and results by uid."""

    book = _book("ours", "raptor.0049")
    foreign = [_rp_task(f"pf.theirs.{i}.{i}", "raptor.0045") for i in range(2, 8)]
    stray = _rp_task("pf.theirs.9.9", "raptor.0049")  # right master, another client
    own = [_rp_task(f"pf.ours.{i}.{i}", "raptor.0049") for i in (1, 2)]
    assert book.request([*foreign, stray]) == []  # nothing of theirs is run here...
    assert {u for u, _ in book.port.advanced} == {t["uid"] for t in [*foreign, stray]}
    assert {st for _, st in book.port.advanced} == {"CANCELED"}  # ...RP forgets them
    assert book.request(own) == own
    # a foreign task delivered straight to a worker: not claimed, not started, no result
    assert book.claim("w1", ["pf.theirs.2.2"]) == []
    assert book.start("w1", "pf.theirs.2.2", _MASTER) is False
    assert book.results([dict(foreign[0], worker="w1", exit_code=0)]) == []
    assert book.entry("pf.ours.2.2").where == "queued"
    # our task 2 is still there for the worker that takes it
    assert book.claim("w2", ["pf.ours.2.2"]) == ["pf.ours.2.2"]
    assert book.claim("w1", ["pf.ours.2.2"]) == []  # a copy on the queue: the fence
    assert book.claim("w2", ["pf.ours.2.2"]) == []  # also for the holder itself
    assert book.start("w2", "pf.ours.2.2", _MASTER) is True
    assert book.start("w2", "pf.ours.2.2", _MASTER) is False  # never twice
    assert book.port.published == ["pf.ours.2.2"]  # the client is told once
    assert book.request([own[1]]) == []  # delivered twice: the first copy is in flight
    assert book.request([_rp_task("pf.ours.7.2", "raptor.0049")]) == []  # number taken
    assert book.entry("pf.ours.2.2").where == "started"
    # its result is accepted from its worker only, once
    done = dict(own[1], worker="w2", exit_code=0)
    assert book.results([dict(done, worker="w1")]) == []
    assert book.results([done]) == [done]
    assert book.results([done]) == []
    assert book.entry("pf.ours.2.2") is None


def test_master_drains_a_worker_and_a_host() -> None:
    """The client drains worker w1 while it runs task 1 and holds task 2: 2 goes back on
    RP's queue unblamed, w1 may neither claim (what it takes is pushed again) nor start
    anything; it is stopped once task 1 ends, and replaced. A drained host: its idle
    worker is stopped at once and not replaced, and a worker that joins there later is
    drained as it says hello."""
    book = _book("ours", "raptor.0049")
    book.add_workers(["w1", "w2", "w3"], 0.0)
    book.hello("w1", 11, "node1", [])
    book.hello("w2", 12, "node2", [])
    book.hello("w3", 13, "node3", [])
    tasks = [_rp_task(f"pf.ours.{i}.{i}", "raptor.0049") for i in (1, 2, 3)]
    assert book.request(tasks) == tasks
    assert book.claim("w1", ["pf.ours.1.1", "pf.ours.2.2"]) == ["pf.ours.1.1", "pf.ours.2.2"]
    assert book.start("w1", "pf.ours.1.1", _MASTER) is True
    book.port.pushed.clear()
    assert book.drain("worker", "w1", "3 different tasks failed there") == []  # it runs 1
    assert [t["uid"] for t in book.port.pushed] == ["pf.ours.2.2"]
    assert book.claim("w1", ["pf.ours.2.2", "pf.ours.3.3"]) == []  # drained: pushed back
    assert book.start("w1", "pf.ours.2.2", _MASTER) is False
    assert book.claim("w2", ["pf.ours.2.2"]) == ["pf.ours.2.2"]
    assert book.idle_drained() == []
    done = dict(tasks[0], worker="w1", exit_code=0)
    assert book.results([done]) == [done]  # its running task ends normally...
    assert book.idle_drained() == ["w1"]  # ...then the master stops it, once
    assert book.idle_drained() == []
    assert book.replace_lost(book.workers["w1"]) is True  # a drained worker is replaced
    assert book.drain("host", "node3", "a broken image") == ["w3"]  # idle: stop it now
    assert book.replace_lost(book.workers["w3"]) is False  # not on a drained host
    book.add_workers(["w4"], 1.0)
    book.hello("w4", 14, "node3", [])  # joins on the drained host
    assert book.workers["w4"]["drained"] == ("host", "a broken image")
    assert book.idle_drained() == ["w4"]
    assert book.claim("w4", ["pf.ours.3.3"]) == []


def _break_first_worker(marker: str) -> None:
    """The session's initializer (it runs in each task's process, forked from its raptor
    worker): every task of the first worker to run one fails, as on a node whose image
    lacks a library. The worker is the task process's ancestor whose RP_TASK_ID names a
    raptor worker."""
    parent, p = "", psutil.Process()
    while p is not None and not parent:
        with contextlib.suppress(psutil.Error):
            if ".worker." in p.environ().get("RP_TASK_ID", ""):
                parent = p.environ()["RP_TASK_ID"]
        p = p.parent()
    with contextlib.suppress(FileExistsError):
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, parent.encode())
        os.close(fd)
    if Path(marker).read_text() == parent:
        raise ImportError("libcuda.so.1: cannot open shared object file (this node is broken)")


def test_a_broken_worker_is_drained_stopped_and_replaced(make: Any, tmp_path: Path) -> None:
    """Draining is on by default on RADICAL-Pilot: a raptor worker on which every task
    fails ENVIRONMENT is drained after two different tasks (drain_after=(2, 60)), the
    HostDrained event names it, its master stops it and starts another, and every task
    succeeds; the drained worker's failures were not charged."""
    events: list[Any] = []
    marker = tmp_path / "broken"
    with make(
        workers=2,
        initializer=_break_first_worker,
        initargs=(str(marker),),
        drain_after=(2, 60),
        on_event=events.append,
    ) as s:
        tasks = [s.submit(square, i) for i in range(8)]
        assert [t.result(timeout=180) for t in tasks] == [i * i for i in range(8)]
        env = [a for t in tasks for a in t.attempts if a.outcome == "environment"]
        if len({a.failure.key for a in env if a.failure}) < 2:
            pytest.skip("the broken worker was given fewer than two different tasks this time")
        drained = [e for e in events if isinstance(e, pilotfish.HostDrained)]
        assert len(drained) == 1 and drained[0].kind == "worker", drained
        bad = drained[0].name
        assert all(a.worker == bad for a in env), env
        assert all(a.note and a.note.startswith("not charged") for a in env), env
        # stopped by the master (nothing ran there any more) and replaced
        wait_for(
            lambda: any(
                getattr(e, "kind", "") == "lost" and getattr(e, "worker", "") == bad for e in events
            ),
            timeout=60,
        )
        stopped = [e for e in events if getattr(e, "worker", "") == bad and e.kind == "lost"]
        assert "drained" in stopped[0].message and "stopped by pilotfish" in stopped[0].message
        assert s.submit(square, 9).result(timeout=120) == 81


def test_master_sweep_withdraws_what_it_never_received() -> None:
    """The client asks about tasks it sent a while ago and has not seen start: the master
    names those it has, and withdraws at once those it takes as lost (a task sent later
    came the task's grace period ago, or nothing came for that long), so one that
    arrives after all is cancelled and never runs (the client has sent it again under a
    new uid). A task that may still be on its way through a busy RP is neither."""
    from pilotfish.backends.radical.master_book import MasterBook

    book = MasterBook(_RecordingPort(), token="ours", uid="raptor.0001", clock=_Clock())
    got = _rp_task("pf.ours.1.1")
    assert book.request([got]) == [got]
    assert book.sweep(["pf.ours.1.1", "pf.ours.2.2"], [5.0, 5.0]) is None  # not registered
    book.mark_up()
    book.request([_rp_task("pf.ours.3.3")])  # just now: 2 may be on its way behind it
    ans = book.sweep(["pf.ours.1.1", "pf.ours.2.2"], [5.0, 5.0])
    assert ans == {"known": ["pf.ours.1.1"], "gone": []}
    # 3 came 10 s ago (and something else 2 s ago): 2 is lost, 4 may be on its way, and
    # 2 asked with a longer grace (sent again before) may be on its way too
    book.clock.t += 8
    book.request([_rp_task("pf.ours.0.0")])
    book.clock.t += 2
    ans = book.sweep(["pf.ours.2.2", "pf.ours.4.4"], [20.0, 5.0])
    assert ans == {"known": [], "gone": []}
    ans = book.sweep(["pf.ours.2.2", "pf.ours.4.4"], [5.0, 5.0])
    assert ans == {"known": [], "gone": ["pf.ours.2.2"]}
    book.clock.t += 8  # nothing came for 10 s: 4 is lost too
    ans = book.sweep(["pf.ours.2.2", "pf.ours.4.4"], [5.0, 5.0])
    assert ans == {"known": [], "gone": ["pf.ours.2.2", "pf.ours.4.4"]}
    late = _rp_task("pf.ours.2.2")
    assert book.request([late]) == []
    assert book.port.advanced == [("pf.ours.2.2", "CANCELED")]
    assert book.claim("w1", ["pf.ours.2.2"]) == []  # and if a worker got it anyway
    again = _rp_task("pf.ours.2.5")  # the client's new uid for the same attempt
    assert book.request([again]) == [again]
    assert book.claim("w1", ["pf.ours.2.5"]) == ["pf.ours.2.5"]


def test_master_pushes_again_what_idle_workers_never_claimed() -> None:
    """A task that waits unclaimed on RP's queue while a ready worker holds nothing (a
    worker took it and died before its claim, with no later task to show the gap) is
    pushed again after ``IDLE_GRACE``, then after twice as long; only one copy runs. A
    worker declared lost that still claims puts what it took back on the queue."""
    from pilotfish.backends.radical.master_book import IDLE_GRACE

    book = _book()
    t = _rp_task("pf.tok.1.1")
    book.request([t])
    assert book.hello("w1", 11, "here", []) is True  # ready, idle from now on
    assert book.unclaimed_while_idle(book.clock() + 1) == []  # not for long enough
    book.clock.t += 10
    now = book.clock()
    assert book.unclaimed_while_idle(now) == [t]
    assert book.unclaimed_while_idle(now + IDLE_GRACE) == []  # next after 2x
    assert book.unclaimed_while_idle(now + 2 * IDLE_GRACE + 0.1) == [t]
    assert book.claim("w1", ["pf.tok.1.1"]) == ["pf.tok.1.1"]
    assert book.unclaimed_while_idle(now + 60) == []  # held: nothing to push
    assert book.claim("w2", ["pf.tok.1.1"]) == []  # the other copy
    # a lost worker's claim: refused, and the task goes back on the queue at once
    t2 = _rp_task("pf.tok.2.2")
    book.request([t2])
    book.hello("w3", 33, "here", [])
    assert book.lose_worker("w3") == ("ready", book.workers["w3"])
    assert book.claim("w3", ["pf.tok.2.2"]) == []
    assert book.port.pushed == [t2] and "pf.tok.2.2" in book.on_queue()


def test_lost_in_transit_bookkeeping() -> None:
    """The master's record of tasks on RP's FIFO queue: a task still unclaimed after a
    task pushed later was claimed (a grace period ago) is pushed again, once."""
    book = _book()
    uid = [f"pf.tok.{i}.{i}" for i in range(4)]  # the client's uids: pf.TOKEN.ATTEMPT.N
    book.request([_rp_task(u) for u in uid])
    assert book.claim("w1", [uid[0]]) == [uid[0]]
    assert book.claim("w2", [uid[0], uid[2]]) == [uid[2]]  # held by w1: the fence
    assert book.lost_in_transit() == []  # within the grace period
    book.clock.t += 10
    assert [t["uid"] for t in book.lost_in_transit()] == [uid[1]]  # uid[3] may be on its way
    assert book.lost_in_transit() == []  # pushed again: at the back of the queue
    assert book.on_queue() == [uid[3], uid[1]]


def test_worker_lost_fails_what_it_ran_and_requeues_what_it_held() -> None:
    """The ledger's worker-loss rule, carried out by the master: the task the worker ran
    fails (worker_lost, with how it ended), its program groups are killed, the task it
    only held goes back on RP's queue, unblamed; a second loss report changes nothing."""
    killed: list[tuple[int, ...]] = []
    book = _book()
    book.port.kill_groups = killed.append
    a, b = _rp_task("pf.tok.1.1"), _rp_task("pf.tok.2.2")
    book.request([a, b])
    book.hello("w1", 11, "here", [])
    assert book.claim("w1", ["pf.tok.1.1", "pf.tok.2.2"]) == ["pf.tok.1.1", "pf.tok.2.2"]
    assert book.start("w1", "pf.tok.1.1", _MASTER) is True
    book.group("pf.tok.1.1", 777)
    assert book.lose_worker("w1") is not None
    book.worker_gone("w1", "worker w1 was lost", -9, "SIGKILL", "tail", "/sbox/w1.err")
    assert book.port.advanced == [("pf.tok.1.1", "FAILED")]
    assert killed == [(777,)]
    assert book.port.pushed == [b] and book.entry("pf.tok.2.2").where == "queued"
    assert book.lose_worker("w1") is None


def test_only_executing_and_final_task_states_wake_the_event_thread() -> None:
    """RP calls the TaskManager callback for every state a task passes (~15 per task);
    only AGENT_EXECUTING and the final states mean anything to the backend's event
    thread, so only those wake it (``task_events.wakes``, the callback's filter)."""
    from pilotfish.backends.radical.task_events import wakes

    states = [getattr(rp.states, n) for n in dir(rp.states) if n.isupper()]
    # RP's own list of task states: it has no public one
    states = sorted({s for s in states if isinstance(s, str) and s in rp.states._task_state_values})
    assert {st for st in states if wakes(st)} == {rp.AGENT_EXECUTING, *rp.FINAL}


class _Prof:
    def prof(self, *a: Any, **kw: Any) -> None:
        pass


def _bare_worker(answers: list[Any]) -> Any:
    """A PilotfishWorker's own logic only (no RP component): one core, its requests to
    the master answered from ``answers`` and recorded in ``asked``."""
    import logging

    from pilotfish.backends.radical import worker as w

    pw = object.__new__(w.PilotfishWorker)
    # no RP component here: RP's DefaultWorker attributes its _alloc/_dealloc read, and
    # pilotfish's _pf_ hooks on it (RP's API has no seam for a worker without a master)
    pw._uid, pw._n_cores, pw._n_gpus = "w1", 1, 0
    pw._rlock, pw._resources = threading.Lock(), {"cores": [0], "gpus": []}
    pw._res_evt, pw._pf_alloc_wait = threading.Event(), 0.2
    pw._prof, pw._log = _Prof(), logging.getLogger("test.pilotfish.worker")
    pw.asked = []

    def request(cmd: str, *args: Any) -> Any:
        pw.asked.append((cmd, *args))
        return answers.pop(0)

    pw._pf_request = request
    return pw


def test_worker_asks_the_start_fence_once_the_core_is_its_before_the_fork() -> None:
    """The start fence is asked by the worker itself (its one connection to the master),
    right after RP's allocation gave the task its core and before RP forks the task's
    process: granted, the task runs; refused, its process runs nothing (withdrawn); no
    core free, nothing is asked yet."""
    pw = _bare_worker([True, False])
    # _alloc/_dealloc: RP DefaultWorker's own allocation methods, which pilotfish overrides
    t1 = {"uid": "pf.tok.1.1", "description": {}}
    assert pw._alloc(t1) is True
    assert pw.asked == [("pilotfish_start", "w1", "pf.tok.1.1", os.getpid())]
    assert "pf_withdrawn" not in t1
    t2 = {"uid": "pf.tok.2.2", "description": {}}
    assert pw._alloc(t2) is False  # the one core is t1's: not asked
    assert len(pw.asked) == 1
    # a core freed while it waits is taken at once, woken by _dealloc (not after RP's
    # 10 ms sleep): it would wait an hour otherwise
    pw._pf_alloc_wait = 3600.0
    threading.Timer(0.05, pw._dealloc, (t1,)).start()
    assert pw._alloc(t2) is True
    assert pw.asked[-1][:3] == ("pilotfish_start", "w1", "pf.tok.2.2")
    assert t2["pf_withdrawn"] is True  # refused: the fork reports it, runs nothing


def test_worker_calls_pilotfish_run_as_rp_dispatcher_does() -> None:
    """The call's process calls ``pilotfish_run`` directly (no asyncio event loop per
    task): the same (stdout, stderr, exit code, value, exception) as RP's dispatcher."""
    import asyncio

    pw = _bare_worker([])

    def run_ok(blob: str) -> str:
        print("out", blob)
        print("err", file=__import__("sys").stderr)
        return blob.upper()

    def run_bad(blob: str) -> str:
        raise ValueError(blob)

    task = {"uid": "pf.tok.1.1", "description": {"function": "pilotfish_run", "args": ["ab"]}}
    # _dispatch_func: RP's own dispatcher, the reference _pf_call is compared with
    pw.pilotfish_run = run_ok
    mine = pw._pf_call(dict(task))
    theirs = asyncio.run(pw._dispatch_func(dict(task, description=dict(task["description"]))))
    assert mine == tuple(theirs) == ("out ab\n", "err\n", 0, "AB", (None, None))
    pw.pilotfish_run = run_bad
    out, err, ret, val, exc = pw._pf_call(dict(task))
    t_out, t_err, t_ret, t_val, t_exc = asyncio.run(
        pw._dispatch_func(dict(task, description=dict(task["description"])))
    )
    assert (out, err, ret, val, exc[0]) == (t_out, t_err, t_ret, t_val, t_exc[0])
    assert ret == 1 and exc[0] == "ValueError('ab')" and "ValueError: ab" in exc[1]


def count_run(path: str, x: int) -> int:
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x * x


_TESTS = Path(__file__).resolve().parent


class _Lossy(RadicalBackend):
    """A backend whose raptor master or workers lose tasks (a subclass loaded from a
    file under tests/, see ``worker_file``); the client sweeps after 2 s."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, resend_after=2.0, **kw)


class _MasterDrops(_Lossy):
    master_file = str(_TESTS / "rp_lossy_master.py")  # RP tasks 1 and 2 never arrive


class _WorkerDrops(_Lossy):
    worker_file = str(_TESTS / "rp_lossy_worker.py")  # each worker drops task 1 unclaimed


def test_request_lost_before_the_master_is_sent_again(
    make: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A request RP delivers nowhere (the master drops it silently: rp_lossy_master) was a
    task that waited forever, and so did the session's shutdown. The client's sweep
    finds that the master never received it and sends it again; every task runs once."""
    import logging

    runs = tmp_path / "runs.txt"
    caplog.set_level(logging.WARNING, logger="pilotfish.radical")
    with make(backend_class=_MasterDrops) as s:
        t0 = time.monotonic()
        ts = [s.submit(count_run, str(runs), i) for i in range(4)]
        assert [t.result(timeout=90) for t in ts] == [0, 1, 4, 9]
        took = time.monotonic() - t0
    assert sorted(runs.read_text().split()) == ["0", "1", "2", "3"]  # each ran once
    assert all(len(t.attempts) == 1 for t in ts)  # unblamed: no retry used
    assert "never received" in caplog.text, caplog.text
    print(f"requests lost before the master -> sent again, done in {took:.1f} s")


def test_task_lost_before_a_claim_is_pushed_again(make: Any, rp_pilot: Any, tmp_path: Path) -> None:
    """A worker takes a task off RP's queue and drops it before its claim (rp_lossy_worker;
    as a worker that dies there would), and no later task shows the gap: the master sees
    the task wait unclaimed while a worker is idle, pushes it again, and it runs once."""
    runs = tmp_path / "runs.txt"
    with make(backend_class=_WorkerDrops) as s:
        t0 = time.monotonic()
        assert s.submit(count_run, str(runs), 5).result(timeout=90) == 25
        took = time.monotonic() - t0
        import radical.utils as ru

        sbox = Path(ru.Url(str(rp_pilot[0].pilot_sandbox)).path, s.processes()["master_task"])
        log = (sbox / "pilotfish-master.log").read_text()
    assert runs.read_text().split() == ["5"]
    assert "unclaimed while a worker was idle" in log, log
    print(f"task dropped before its claim -> pushed again, done in {took:.1f} s")


def _client_script(tmp: Path) -> Path:
    script = tmp / "client.py"
    script.write_text(
        "import sys, time, pilotfish\n"
        "from pilotfish.backends.radical.backend import RadicalBackend\n"
        "def nap():\n"
        "    time.sleep(300)\n"
        "if __name__ == '__main__':\n"
        "    b = RadicalBackend(1, rundir=sys.argv[1], cores=3)\n"
        "    s = pilotfish.Session(backend=b, rundir=sys.argv[1])\n"
        "    t = s.submit(nap)\n"
        "    while not t.running():\n"
        "        time.sleep(0.1)\n"
        "    print(b.token, b.pilot.session.uid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    return script


def _session_procs(sid: str) -> list[Any]:
    """Live processes of RP session ``sid``. RP's bridges and components (``rp.<name>``)
    set their process title over their environment, so the backend's token does not show
    in them; their working directory (the client's session directory, or the pilot
    sandbox) names the session."""
    import psutil

    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):  # gone while we looked
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if sid in Path(p.cwd()).parts or any(sid in a for a in p.cmdline()):
                out.append(p)
    return out


def _describe(procs: list[Any]) -> list[str]:
    import psutil

    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {' '.join(p.cmdline()).strip()[:100]}")
    return out


def _client_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals) -> None:
    import subprocess
    import sys

    import psutil

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # set by pytest itself (>= 8.2); RP's process watchers then send SIGTERM only, never
    # SIGKILL: the case a pilotfish session started from a user's pytest suite is in
    monkeypatch.setenv("PYTEST_VERSION", os.environ.get("PYTEST_VERSION") or pytest.__version__)
    (tmp_path / "home").mkdir()
    script = _client_script(tmp_path)
    p = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    sid = ""
    try:
        assert p.stdout is not None
        token, _, sid = p.stdout.readline().strip().partition(" ")
        assert token and sid, "the client did not start its task"
        assert len(with_env("PILOTFISH_RP_TOKEN", token)) > 5
        titles = _describe(_session_procs(sid))  # one may end while we look
        titles = [t.partition(" ")[2] for t in titles]
        assert any(t.startswith("rp.agent_executing") for t in titles), titles
        t0 = time.monotonic()
        p.send_signal(sig)
        p.wait()
        deadline = t0 + 30
        left = with_env("PILOTFISH_RP_TOKEN", token) + _session_procs(sid)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = with_env("PILOTFISH_RP_TOKEN", token) + _session_procs(sid)
        assert not left, f"left {time.monotonic() - t0:.0f} s after {sig.name}: {_describe(left)}"
        print(f"client {sig.name} -> every RP process gone in {time.monotonic() - t0:.1f} s")
        # and the reaper itself ends (it carries this test's token, not the backend's)
        wait_for(lambda: not with_env(TOKEN_VAR, os.environ[TOKEN_VAR]), 15, 0.2)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if sid:  # the token's processes are the autouse fixture's; these are not found by it
            for q in _session_procs(sid):
                with contextlib.suppress(psutil.Error):
                    q.kill()


@pytest.mark.timeout(300)
def test_client_sigkill_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client dies without stopping anything (kill -9): pilotfish's reaper ends the
    agent, bridges, master, workers and the running task (RP alone keeps ~30 processes
    for its 600 s heartbeat timeout)."""
    _client_dies(tmp_path, monkeypatch, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_client_sigterm_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client is terminated (SIGTERM: a batch system's or a user's ``kill``): RP's
    agent executor (``rp.agent_executing``) catches SIGTERM and lives on, and neither its
    environment (overwritten by its process title) nor its parent (init) leads to the
    client: it ran on 50 s later and more. Within 30 s no process of the session is left."""
    _client_dies(tmp_path, monkeypatch, signal.SIGTERM)
