"""The failure digest (issue 16, item 1): pure, on synthetic failure records.

A scientist with 5,000 members and 400 failures reads the shape of the failures first:
failures that differ only in data (a seed, a path, a hex id, the task's own key) fall
into one group; different causes stay apart; the largest group comes first."""

from __future__ import annotations

import json
import time

import pytest

from pilotfish.digest import (
    distinctive_line,
    exit_label,
    failure_digest,
    format_digest,
    headline,
    mask,
    signature,
)
from pilotfish.errors import Category, FailureRecord

GROMACS_TAIL = """\
Reading file topol.tpr, VERSION 2023.3 (single precision)

-------------------------------------------------------
Program:     gmx grompp, version 2023.3
Source file: src/gromacs/gmxpreprocess/readir.cpp (line 3245)

Error in user input:
Invalid enum '{value}' for variable integrator, using 'md'
Next time, use one of: 'md' 'md-vv' 'md-vv-avek' 'sd' 'bd' 'steep' 'cg' 'l-bfgs'

For more information and tips for troubleshooting, please check the GROMACS
website at https://manual.gromacs.org/current/user-guide/run-time-errors.html
-------------------------------------------------------
"""


def command_failure(key: str, value: str, code: int = 1) -> FailureRecord:
    sandbox = f"/scratch/me/run/sandboxes/{key}-4034cd368f4d5392.a{code}.0xloyjzq"
    return FailureRecord(
        key=key,
        category=Category.COMMAND_FAILED,
        message=(
            f"task {key!r}: program 'gmx' exited with code {code} after 1.{code} s on host "
            f"node{code}\n  complete stderr: {sandbox}/stderr.txt\nlast lines of stderr:\n"
            + GROMACS_TAIL.format(value=value)
        ),
        exc_type="pilotfish.CommandFailed",
        returncode=code,
        stderr_path=f"{sandbox}/stderr.txt",
        sandbox=sandbox,
        worker=f"w{code}",
        host="node17",
    )


def user_error(key: str, seed: int, exc: str = "ValueError") -> FailureRecord:
    msg = f"{exc}: seed {seed}: unstable parameters at /home/me/runs/{seed}/in.dat (dt=0.{seed})"
    return FailureRecord(
        key=key, category=Category.USER_ERROR, message=msg, exc_type=f"builtins.{exc}"
    )


def dependency(key: str, root: str) -> FailureRecord:
    return FailureRecord(
        key=key,
        category=Category.DEPENDENCY_FAILED,
        message=f"task {key!r} did not run: its input {root!r} failed",
        upstream=root,
        root=root,
    )


def test_big_ensemble_groups_largest_first() -> None:
    """412 command failures with different enum values, exit codes equal, and 3,100
    dependency failures from 31 roots read as two lines, as the issue shows them."""
    records: list[FailureRecord] = []
    for i in range(412):
        records.append(command_failure(f"member-{i:04d}", value=f"leap{i % 7}frog"))
    for i in range(3100):
        records.append(dependency(f"analysis-{i:05d}", root=f"member-{i % 31:04d}"))
    digest = failure_digest(records)
    assert digest["failed"] == 3512
    dep, cmd = digest["groups"]
    assert dep["category"] == "dependency_failed" and dep["count"] == 3100
    assert dep["signature"] == "from 31 roots" and dep["root_count"] == 31
    assert len(dep["roots"]) == 10 and dep["roots"][0] == {"key": "member-0000", "count": 100}
    assert cmd == {
        "category": "command_failed",
        "signature": "exit 1 'Invalid enum <...> for variable integrator, using <...>'",
        "count": 412,
        "examples": ["member-0000", "member-0001", "member-0002"],
        "example": "program 'gmx' exited with code 1 after 1.1 s on host node1",
        "took_down": 3100,  # every root is one of these members
        "roots": [],
        "root_count": 0,
    }
    lines = format_digest(digest)
    assert lines[1] == "3,100 tasks: DEPENDENCY_FAILED from 31 roots"
    assert lines[2].startswith("    roots: member-0000 (100), member-0001 (100)")
    assert lines[2].endswith("and 21 more")
    assert lines[3] == (
        "412 tasks: COMMAND_FAILED exit 1 'Invalid enum <...> for variable integrator, using <...>'"
    )
    assert lines[4] == "    e.g. member-0000, member-0001, member-0002"
    assert lines[5] == "    root of 3,100 dependency failures"
    json.dumps(digest)  # plain data


def test_different_causes_stay_apart() -> None:
    """Same message with another exception type, another exit code, or a signal: other
    groups; same cause with other numbers, paths and keys: one group."""
    records = [
        user_error("a", 13),
        user_error("b", 14),
        user_error("c", 15, exc="KeyError"),
        command_failure("d", "x", code=1),
        command_failure("e", "y", code=2),
        FailureRecord(
            key="f",
            category=Category.COMMAND_FAILED,
            message="task 'f': program 'md' was killed by signal SIGSEGV (-11)",
            returncode=-11,
            signal="SIGSEGV",
            stderr_tail="step 1\nstep 2\nSegmentation fault (core dumped)\n",
        ),
    ]
    groups = failure_digest(records)["groups"]
    sigs = {(g["category"], g["signature"]): g["count"] for g in groups}
    assert sigs == {
        ("user_error", "ValueError: seed <n>: unstable parameters at <path> (dt=<n>)"): 2,
        ("user_error", "KeyError: seed <n>: unstable parameters at <path> (dt=<n>)"): 1,
        ("command_failed", "exit 1 'Invalid enum <...> for variable integrator, using <...>'"): 1,
        ("command_failed", "exit 2 'Invalid enum <...> for variable integrator, using <...>'"): 1,
        ("command_failed", "signal SIGSEGV 'Segmentation fault (core dumped)'"): 1,
    }
    assert groups[0]["count"] == 2 and groups[0]["examples"] == ["a", "b"]


def test_worker_lost_and_other_categories() -> None:
    """A lost worker is grouped by how it died, its name and pid masked; a timeout by
    its message with the numbers masked."""
    lost = [
        FailureRecord(
            key=f"k{i}",
            category=Category.WORKER_LOST,
            message=f"task 'k{i}' attempt 3: worker w{i} (pid {1000 + i}) was killed by "
            f"signal SIGKILL (-9) on host node{i}",
            returncode=-9,
            signal="SIGKILL",
            worker=f"w{i}",
            host=f"node{i}",
        )
        for i in range(5)
    ]
    timeouts = [
        FailureRecord(
            key=f"t{i}",
            category=Category.TIMEOUT,
            message=f"task 't{i}': attempt {i} ran longer than its timeout of {i}.5 s",
        )
        for i in range(2)
    ]
    groups = failure_digest([*lost, *timeouts])["groups"]
    assert [(g["category"], g["count"]) for g in groups] == [("worker_lost", 5), ("timeout", 2)]
    assert groups[0]["signature"] == (
        "signal SIGKILL: attempt <n>: worker <worker> (pid <n>) was killed by signal SIGKILL "
        "(<n>) on host <host>"
    )
    assert groups[1]["signature"] == "attempt <n> ran longer than its timeout of <n> s"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("seed 13 at step 300", "seed <n> at step <n>"),
        ("dt=1.5e-3, T=-273.15 K, n=1,024", "dt=<n>, T=<n> K, n=<n>"),
        ("file /scratch/u/run-7/in.dat missing", "file <path> missing"),
        ("read inputs/topol.tpr and ~/x/y.cfg", "read <path> and <path>"),
        ("object at 0x7f3a2b1c and id 4034cd368f4d5392", "object at <hex> and id <hex>"),
        ("uuid 123e4567-e89b-12d3-a456-426614174000", "uuid <hex>"),
        ("Invalid enum 'leapfrog' for \"integrator\"", "Invalid enum <...> for <...>"),
        (
            "can't parse and/or read x86_64 float64 v1.2.3",
            "can't parse and/or read x86_64 float64 v1.2.3",
        ),
        ("  many   spaces\tand\nlines  ", "many spaces and lines"),
        # which program failed is what a group is about: its name stays
        ("program 'gmx' was not found on PATH", "program 'gmx' was not found on PATH"),
        ("program 'cp2k' exited 3 on 'in.inp'", "program 'cp2k' exited <n> on <...>"),
    ],
)
def test_mask(text: str, masked: str) -> None:
    assert mask(text) == masked


def test_mask_names_first() -> None:
    """The task's own key is masked before numbers and quotes could cut it apart."""
    assert mask("task sim-12 of 'sim-12'", {"sim-12": "<key>"}) == "task <key> of '<key>'"


def test_distinctive_line_skips_boilerplate() -> None:
    """The last line that reads like an error wins over rulers, "for more information"
    and "Aborted"; without one, the last line that is not boilerplate."""
    assert distinctive_line(GROMACS_TAIL.format(value="x")) == (
        "Invalid enum 'x' for variable integrator, using 'md'"
    )
    assert distinctive_line("step 1\nstep 2\n-----\nAborted (core dumped)\n") == "step 2"
    assert distinctive_line("\n\n") == ""


def test_headline_and_exit_label() -> None:
    assert headline({"key": "k", "message": "task 'k': boom\nmore"}) == "boom"
    assert headline({"key": "k", "message": "task 'k' did not run: x"}) == "did not run: x"
    assert headline({"key": "k", "message": "", "category": "timeout"}) == "timeout"
    assert exit_label(-9, "SIGKILL") == "signal SIGKILL"
    assert exit_label(-11, None) == "signal 11"
    assert exit_label(3, None) == "exit 3"
    assert exit_label(None, None) == "exit ?"


def test_records_as_journal_dicts() -> None:
    """The journal's dicts (category as its value) give the same digest as records."""
    records = [user_error("a", 1), command_failure("b", "v"), dependency("c", "a")]
    from_dicts = failure_digest([r.to_dict() for r in records])
    assert from_dicts == failure_digest(records)
    assert [g["category"] for g in from_dicts["groups"]] == [
        "command_failed",
        "dependency_failed",
        "user_error",
    ]
    assert from_dicts["groups"][2]["took_down"] == 1
    assert signature(records[2]) == "dependency failed"


def test_empty() -> None:
    assert failure_digest([]) == {"failed": 0, "groups": []}
    assert format_digest(failure_digest([])) == ["no failed tasks"]


@pytest.mark.timeout(30)
def test_fast_for_many_failures() -> None:
    """20,000 failures are digested in a few seconds (one pass, a few regexes each)."""
    records = [user_error(f"m{i}", i) for i in range(10_000)]
    records += [command_failure(f"c{i}", f"v{i}") for i in range(10_000)]
    t0 = time.perf_counter()
    digest = failure_digest(records)
    took = time.perf_counter() - t0
    assert [g["count"] for g in digest["groups"]] == [10_000, 10_000]
    assert took < 10, took


def test_sandbox_paths_and_measured_times_do_not_split_a_group() -> None:
    """Issue 25 item 1: two identical timeouts (and two identical missing outputs) were two
    groups each: the sandbox path holds the task's key and a random suffix, and masking
    the key first cut the path, leaving the suffix; "ran 0.5s" and "ran 0.7s" differed
    too. Now each pair is one group, and a different cause is still its own."""

    def timeout(key: str, ran: str, suffix: str) -> FailureRecord:
        box = f"/scratch/run/sandboxes/{key}-f93c60d5e1d1f82f.189a8045a1.{suffix}"
        return FailureRecord(
            key=key, category=Category.TIMEOUT, transient=False, time=time.time(),
            message=(
                f"task '{key}': 'sleep' on host node2 exceeded its time limit of 0.5s (ran "
                f"{ran}) and its process group was killed. stderr: {box}/stderr.txt; "
                f"sandbox kept at {box}"
            ),
        )  # fmt: skip

    def missing(key: str, suffix: str) -> FailureRecord:
        box = f"/scratch/run/sandboxes/{key}-2a04671f0bbc718d.960d83bca3.{suffix}"
        return FailureRecord(
            key=key, category=Category.COMMAND_FAILED, transient=False, time=time.time(),
            message=(
                f"task '{key}': 'sh' on host node1 exited 0 but did not create declared "
                f"output(s) 'traj.xtc' (looked in {box}; sandbox {box})"
            ),
        )  # fmt: skip

    records = [
        timeout("sim-045d88fd984e", "0.5s", "7_gen0ft"),
        timeout("sim-9a1b2c3d4e5f", "0.7s", "x0ldmstx"),
        missing("sim-367c7b7a2ff0", "40ohdoeu"),
        missing("sim-132af5165ff1", "g2sxzvvb"),
    ]
    assert signature(records[0]) == signature(records[1])
    assert signature(records[2]) == signature(records[3])
    assert "7_gen0ft" not in signature(records[0])
    groups = failure_digest(records)["groups"]
    assert sorted(g["count"] for g in groups) == [2, 2], groups
