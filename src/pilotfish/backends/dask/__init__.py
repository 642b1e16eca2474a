"""The Dask distributed backend: pilotfish's semantics on any Dask cluster.

``Session(backend="dask", address="tcp://host:8786")`` (or ``client=`` an
existing ``distributed.Client``) runs every attempt as one Dask task on a
cluster that the user started (``LocalCluster``, ``dask_jobqueue.SLURMCluster``,
``dask scheduler`` + ``dask worker``). pilotfish never starts, restarts or
shuts down that cluster, and needs none of its settings changed. The workflow
core, the retry and poison policy, fencing and the journal stay on the client,
as with the local backend; Dask only places and runs attempts.

Each attempt is submitted with a unique key
(``pilotfish-KEY-aATTEMPT-TOKEN``), ``pure=False`` and ``retries=0``; on the
worker it calls :func:`pilotfish.runtime.execute.run_attempt`, which never
raises, and returns its ``Result``. Where each attempt is, and what Dask's
signals mean for it, is kept by the shared attempt ledger
(:class:`pilotfish.core.ledger.Ledger`): this backend only turns Dask's signals
into ledger events and carries out the ledger's commands.

**Start fence.** Before running user code the worker asks a scheduler plugin
(:mod:`.fence`, registered by the session, shipped by
value) with one synchronous call (the one round trip per attempt the worker made
anyway to report ``Started``). The first request for a Dask key, from the worker
the scheduler has it processing on, is granted and published to the client as
``Started``; any other is refused, and the task returns without running user
code. So Dask's own rerun of a task whose worker died (its
``allowed-failures``, 3 by default) never runs an attempt's user code twice:
pilotfish's policy decides about a retry. A refusal is logged (``pilotfish.dask``,
INFO, naming attempt, Dask key (it holds the task key) and worker) and counted in
``Session.processes()["refused_starts"]``. A worker that died holding an attempt
it had *not* started leaves no grant behind: Dask's rerun elsewhere is granted.
A worker on the scheduler's host makes no call: the fence reserves the start for it
when the scheduler hands it the task (on the scheduler's stream to it, ahead of the
task), and the worker sends ``started`` on its own stream to the scheduler, in the
socket before user code runs, so the scheduler still hears the start before it hears of
that worker's end (see :mod:`.fence`, *Reservations*; workers on other hosts ask).

**Linked chains** (``links=True``, the default; see :mod:`pilotfish.backends.base`).
A task whose inputs are still running is handed to Dask at once, as a Dask task that
depends on its inputs' Dask tasks: Dask's scheduler runs it where their values are once
they are done (worker to worker; the client still gets every value), so a chain costs no
round trip through the client per link. The worker takes each input's value from the
``Result`` its task returned; an input that failed, or whose rerun the fence refused,
leaves no value, and the task returns without asking the fence. That, a linked task
cancelled or erred by Dask because a task it depends on was (pilotfish withdrew or lost
that input), or an input attempt with no Dask future any more when the task is handed
over, is ``Unlinked``: nothing ran, not charged, and the session sends it again once its
inputs are DONE. The session's core drops what was linked to an input attempt that did
not succeed on its own (:attr:`pilotfish.core.workflow.Workflow.links`).

Cost (see benchmarks/bench_dask.py): ``submit`` only registers an attempt; a
submitter thread hands everything pending to Dask with one ``Client.map``
(one graph update on the scheduler per batch, not per attempt). An attempt
cancelled, lost or stopped before its Dask future exists is skipped, or its
late future cancelled. The Dask task is a coroutine: the worker awaits the start
fence on its event loop (no thread hand-offs on the path every attempt waits for)
and runs the attempt in its thread pool. A small result (up to 1 KB pickled) comes
with the task's end on the session's event topic, before Dask says the task
finished, and is never fetched. Larger values are gathered in batches, straight
from the worker the fence granted the attempt to when it is on the client's host
(no ``who_has`` round trip to the scheduler first), else through Dask's
``Client.gather`` (also for keys that worker no longer has). Each batch's futures
are watched from the client's event loop (one hand-over per batch). With
``LocalCluster`` the scheduler shares the client's process and GIL, so work
kept off the scheduler is throughput.

How Dask's signals become ledger events, and what pilotfish then reports and does:

===============================================  ===============  ===============================
Dask                                             ledger event     pilotfish
===============================================  ===============  ===============================
``Session.submit`` (a retry too)                 ``Enqueue``      handed to Dask in a batch
the start fence granted a worker's request       ``Start``        ``Started``
(or a worker started by its reservation)
the start fence refused it (Dask's own rerun, a  --               logged and counted; the task
task cancelled or moved meanwhile)                                returns, user code not run
future finished (or its small result's event)    ``Finish``       ``Result`` (value or error)
scheduler ``remove-worker`` event                ``WorkerLost``   ``WorkerReport("lost")`` and
                                                                  ``Lost(worker_lost)`` for the
                                                                  attempts that started there;
                                                                  their futures are cancelled
... of a worker in a SLURM job                   ``WorkerLost``   the same, naming the job and
                                                                  how it ended (``SLURM job 12
                                                                  CANCELLED``, ``TIMEOUT`` and
                                                                  its walltime) or that it runs
                                                                  on (the worker process died)
... of the last worker                           --               ``WorkerReport("gone")`` at
                                                                  once, naming the jobs; an
                                                                  adaptive cluster made by
                                                                  ``pilotfish.cluster.slurm`` is
                                                                  asked for replacements
no worker joins within ``no_workers_timeout``    ``Unrunnable``   ``Lost(runtime_lost)`` for
                                                                  every attempt in flight or
                                                                  queued, and for new ones until
                                                                  a worker joins
future erred with ``KilledWorker``, a cancel we  ``Bounce``       ``Lost(worker_lost)`` if it had
did not ask for, a result lost with its worker                    started, else resubmitted
before the client fetched it                                      unblamed under a new Dask key
future erred otherwise (e.g. pilotfish not       --               ``Result`` with an ENVIRONMENT
importable on the worker)                                         error
attempt running longer than its ``timeout``      ``TimePassed``   ``Lost(timeout)``; ``Expired``:
                                                                  future cancelled, worker
                                                                  restarted (see below)
the session cancels an attempt                   ``Revoke``       ``Withdraw``: future cancelled
                                                                  (a started one runs on; its
                                                                  result is fenced)
connection to the scheduler lost                 --               ``MasterReport("lost")``
... and back within ``heartbeat_timeout``        ``RuntimeLost``  started attempts
                                                                  ``Lost(runtime_lost)``; the
                                                                  others ``Resend``: resubmitted
                                                                  unblamed, new Dask keys;
                                                                  ``MasterReport("restarted")``
... not back, or ``max_master_restarts=0``       ``RuntimeLost``  started attempts
                                                                  ``Lost(runtime_lost)``, then
                                                                  ``Fatal(runtime_lost)``
===============================================  ===============  ===============================

``KilledWorker`` never reaches the user.

**Workers' names, and draining.** An attempt's ``worker`` (in ``Started``, results and
failure records) is the worker's *place*: its nanny's address when it has a nanny (a
nanny restarts a dead worker process under a new address, so failures there keep
counting against one place), else the worker's own address; a message that names a
worker process names both. ``drain(place)`` (the session's bad-node draining, see
:mod:`pilotfish.core.drain`) tells the start fence, which refuses every later start
there (the attempt is given back and sent again under a new Dask key, unblamed: user
code never ran there) and retires those workers (``retire_workers(close_workers=True)``:
no new Dask tasks, data moved off, worker and nanny closed; a worker that runs attempts
then gets no new Dask tasks at once and is retired when they end, so they are not
killed with it); ``drain(host, kind="host")`` does that for every worker that runs on
``host``. The client's ledger takes ``Drain`` when the fence says it drained (after
every grant made before it). A start refused because the worker is drained is given
back unblamed and never counts toward giving the attempt up (it never ran). While every
worker left is drained, attempts are held back on the client (``WorkerReport("gone")``
says why) and sent when a worker that is not drained joins; after
``no_workers_timeout`` they fail ``RUNTIME_LOST`` naming the drains and the tasks that
showed them. WorkerEvents still name worker processes by address.

**Batch jobs.** A worker plugin makes every Dask worker report its ``SLURM_JOB_ID``
(with its pid and host) on the session's topic as it joins. When it leaves, the client
asks ``scontrol show job`` (:func:`pilotfish.cluster.slurm_job`, waiting up to 3 s while
the job is ``COMPLETING``) and the attempts it had started are ``WORKER_LOST`` with
``SLURM job N CANCELLED (...)``, ``TIMEOUT (killed by SLURM at its walltime of 00:01:00
...)``, ``PREEMPTED``, ... When SLURM still calls the job ``RUNNING``, the client tries
a TCP connect to the worker's nanny (up to 1 s): if it answers, the worker process ended
inside the job (the nanny starts a new one); if not, the node stopped answering (dead or
cut off), which SLURM itself reports only after ``SlurmdTimeout``. Once a job's walltime
is known (from the cluster made by :func:`pilotfish.cluster.slurm`, else from the first
job's ``scontrol``), an attempt whose ``timeout`` is longer is warned about at submit
(``pilotfish.dask``, WARNING, once per timeout value). When the last worker leaves,
``WorkerReport("gone")`` says so at once; after ``no_workers_timeout`` seconds (a
backend keyword, default ``heartbeat_timeout``; ``float("inf")`` waits forever) without
a worker, the attempts in flight and queued are ``RUNTIME_LOST`` naming the jobs and how
they ended, and so are attempts submitted later, until a worker joins. Before the first
worker ever joined (jobs still queued in SLURM) nothing times out.

Limits (honest ones):

* Timeouts are enforced from the client (measured from ``Started``). Dask
  cannot stop a running thread, so pilotfish ends the timed-out attempt's
  worker process and its nanny starts a fresh one (``timeout_restart=True``,
  the default); any other task running on that worker is lost with it
  (reported ``worker_lost`` and retried by policy). A worker without a nanny
  is never ended: the call runs on in its thread until it returns, and its
  result is dropped.
  Program tasks are stopped by their own worker-side timeout (the whole
  process group is killed); the client-side limit is only a backstop.
* A value stays on its Dask worker until the client fetches it (at once, in
  batches). A worker lost in that window loses the value: the attempt is
  reported ``Lost(worker_lost)`` and retried by policy, never silently re-run.
  (A small result also travels on the event topic, through the scheduler, which
  keeps the topic's last ``distributed.admin.low-level-log-length`` events, 1000
  by default; once it has reached the client, the attempt is finished.)
* A hung worker (SIGSTOP) is noticed only when Dask's scheduler removes it
  (``distributed.scheduler.worker-ttl``). Dask does not report a dead
  worker's exit status or signal, so ``WorkerLost`` names the worker's
  address, pid and host and Dask's cause instead.
* Files: a program's sandbox, its stdout/stderr and declared outputs live on
  the *worker's* filesystem under ``rundir`` (resolved to an absolute path on
  the client); paths in results and failure records are the worker's, and the
  host is recorded with them. Use a shared filesystem for ``rundir`` on a
  multi-node cluster. Workers keep their own working directory.
* A Dask worker killed while it runs a program (SIGKILL, OOM) cannot take the
  program's process group with it: no pilotfish master watches Dask workers,
  so the program may run on as an orphan until it ends. (Locally the master
  kills the group.) The attempt is still reported lost and retried.
* Worker start-up pre-flight (versions, sandbox root, disk) is not run on Dask
  workers yet; task-level ``requires``/``requires_programs`` are checked, as
  everywhere, and ``Session.preflight()`` runs the full set on one worker.
* Imports: by default (``ship_sys_path=True``) a worker plugin appends the
  client's ``sys.path`` entries that a worker lacks, so modules next to the
  user's script import there too (when the filesystem is shared); pilotfish
  itself must be installed in the workers' (and scheduler's) environment.
* The start fence lives on the scheduler: it is registered when the session
  starts and again after a reconnect, shipped by value (so it needs the
  client's Python version there), else by reference (pilotfish installed
  there); if neither works the session fails at once, saying so. Dask itself
  unpickles task graphs on the scheduler, so pilotfish must be importable on
  the scheduler as well as on the workers (with ``LocalCluster`` and
  dask-jobqueue the scheduler runs in the client's process).
* A grant whose ``started`` message is lost with the scheduler connection is
  not known to the client: that attempt is then resent as never started.

**Layout.** :mod:`.backend` (:class:`DaskBackend`: the backend protocol, the event
thread, and who owns what), :mod:`.flight` (the attempt ledger, the queues to Dask, the
ledger's commands carried out), :mod:`.connection` (the client, the start fence and the
plugins on the cluster), :mod:`.submit` (the submitter thread: batches to Dask),
:mod:`.results` (futures and result events into results), :mod:`.workers` (workers
joining, leaving, drained, none left), :mod:`.jobs` (batch jobs), :mod:`.scheduler`
(losing the scheduler), :mod:`.timeouts`; worker side: :mod:`.worker` (the Dask task,
the worker plugins) and :mod:`.fence` (the scheduler plugin).
"""

from .backend import DaskBackend, DaskHooks

__all__ = ["DaskBackend", "DaskHooks"]
