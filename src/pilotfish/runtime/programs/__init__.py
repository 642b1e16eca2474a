"""Program tasks on a worker: one attempt of a command-line program in a sandbox.

Each concern in its own module:

* :mod:`.spec`: :class:`CommandSpec` (the resolved call) and every rule on its
  arguments, written once (:func:`spec_problem`; the client checks them at submit);
* :mod:`.outcome`: :class:`CommandOutcome`, :class:`CommandResult`, quoting stderr;
* :mod:`.sandbox`: sandbox names, making, finding and keeping them, attempt tags;
* :mod:`.staging`: inputs staged in, outputs found, resume files restored;
* :mod:`.process`: the program's process group, its wait, timeout and kill;
* :mod:`.run`: :func:`run_command`, the attempt as a sequence of those steps.

The names below are the ones the rest of pilotfish imports from here.
"""

from .outcome import CommandOutcome, CommandResult, OutcomeKind, excerpt, tail_lines
from .run import run_command
from .sandbox import (
    KEEP_SANDBOXES,
    attempt_tags,
    call_tag,
    find_sandbox,
    from_earlier_run,
    keeps_sandbox,
    make_lineage,
    make_sandbox,
    newest_sandbox,
    previous_attempt,
    safe_dirname,
    sandbox_index,
)
from .spec import (
    STDERR_NAME,
    STDOUT_NAME,
    CommandSpec,
    env_problem,
    files_problem,
    inherit_from,
    output_problem,
    outside_cwd_problem,
    spec_problem,
    stays_inside,
)
from .staging import restore_files

__all__ = [
    "KEEP_SANDBOXES",
    "STDERR_NAME",
    "STDOUT_NAME",
    "CommandOutcome",
    "CommandResult",
    "CommandSpec",
    "OutcomeKind",
    "attempt_tags",
    "call_tag",
    "env_problem",
    "excerpt",
    "files_problem",
    "find_sandbox",
    "from_earlier_run",
    "inherit_from",
    "keeps_sandbox",
    "make_lineage",
    "make_sandbox",
    "newest_sandbox",
    "output_problem",
    "outside_cwd_problem",
    "previous_attempt",
    "restore_files",
    "run_command",
    "safe_dirname",
    "sandbox_index",
    "spec_problem",
    "stays_inside",
    "tail_lines",
]
