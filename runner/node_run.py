"""Run one elastic job on the whole node: the process adapter of scatter-gather.

:func:`run_job` puts the parts together for one run and reports it:

* :mod:`runner.workdir`: the work directory's layout, the journal (created,
  or replayed to resume) and the commit protocol of task outputs;
* :mod:`runner.confine`: the job's confinement (job user, memory cgroup or
  rlimit, ``PR_SET_PDEATHSIG`` so that a SIGKILLed gather takes its running
  tasks with it instead of leaving them to write into a directory a
  restarted gather owns), closed when the run ends;
* :mod:`runner.gather`: the event loop that runs the tasks, one worker slot
  per core, until the job is done, stopped, or out of lease;
* :mod:`runner.stop`: how a run is asked to stop (SIGTERM, the API, a
  shutdown probe) and its grace period.

Invariants: a run that returns has gathered every committed task's output,
in event order, into ``events.out`` and written ``report.json``; nothing the
job started outlives the run (the confinement's close); a command that
cannot be started at all fails the run at once instead of every task.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runner.confine import Confinement, JobConfinement
from runner.gather import Gather
from runner.job_user import command_path
from runner.scatter import Plan, ScatterGather
from runner.spec import JobSpec
from runner.stop import StopRequest
from runner.workdir import gather_output, open_journal
from trust.durable import write_file_atomic


@dataclass
class RunReport:
    """What one run of a job did.

    ``cpu_seconds`` is the CPU time of every task run (from ``wait4``),
    ``cpu_seconds_committed`` that of the runs whose output was committed.
    Costs of the gather itself, over ``task_runs`` started runs:
    ``dispatch_seconds`` is its busy time on the critical path, from a wakeup
    to the end of the dispatch it caused (reaping, taking outputs, scatter,
    bookkeeping) without starting the commands, whose time is
    ``spawn_seconds`` (``Popen``: vfork, exec); ``dispatch_cpu_seconds`` is
    the CPU time of that critical path (its wall time also counts being
    preempted by the tasks on a fully used node); ``commit_seconds`` is the
    deferred fsyncs of outputs and journal, off the critical path;
    ``gather_cpu_seconds`` is the CPU time of the gather's thread.
    """

    job: str
    events_planned: int
    events_done: int
    tasks: int
    tasks_committed: int
    failed_runs: int
    cut_runs: int
    abandoned: dict[int, list[str]]  # the first 100 abandoned tasks and why
    complete: bool
    stopped: str | None
    resumed_tasks: int
    wall_seconds: float
    cpu_seconds: float
    output: str
    failures: list[str] = field(default_factory=list)
    cpu_seconds_committed: float = 0.0
    task_runs: int = 0
    dispatch_seconds: float = 0.0
    dispatch_cpu_seconds: float = 0.0
    spawn_seconds: float = 0.0
    commit_seconds: float = 0.0
    gather_cpu_seconds: float = 0.0
    user: str = ""
    memory_limit: str = "none"
    memory_kills: int = 0
    seconds_per_event: float | None = None  # wall time of a task / its events, smoothed
    tasks_abandoned: int = 0

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["abandoned"] = {str(k): v for k, v in self.abandoned.items()}
        return d


def run_job(
    spec: JobSpec,
    events: int,
    workdir: str | Path,
    *,
    cores: int,
    stop: StopRequest | None = None,
    should_stop: Callable[[], str | None] | None = None,
    grace: float = 10.0,
    memory: int | None = None,
    confinement: Confinement | None = None,
    deadline: float | None = None,
    task_estimate: float | None = None,
    max_attempts: int = 3,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    poll_interval: float = 0.05,
) -> RunReport:
    """Run ``events`` events of ``spec`` with ``cores`` workers in ``workdir``.

    Resumes from ``workdir/journal.jsonl`` if present. ``should_stop`` is
    polled about once a second (e.g. a changed MJF shutdowntime) and returns a
    reason to stop this run or None (``stop`` is left alone: a pilot sharing
    it goes on with jobs that fit the new lease). ``memory`` limits the whole job (bytes), applied
    as ``confinement`` says (see :mod:`runner.confine`). ``deadline`` (a
    ``clock`` time) is when tasks must be done; ``task_estimate`` (seconds)
    is the expected duration of one task before any has been measured.
    ``poll_interval`` is used only when the kernel has no pidfd.

    Raises:
        JournalError: see :func:`runner.workdir.open_journal`.
        TaskError: the command cannot be started at all (missing, or not
            executable by the job user).
        ConfinementError: the job user cannot reach the work directory.
    """
    work = Path(workdir)
    tasks_dir = work / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    stop = stop or StopRequest()
    plan, committed = open_journal(
        work, Plan(spec.name, spec.first_event, events, spec.events_per_task)
    )
    t0 = clock()
    cpu0 = time.thread_time()
    with JobConfinement(confinement or Confinement(), spec.name, memory, cores) as conf:
        conf.prepare_dir(work / "parts")
        conf.prepare_dir(work / "scratch")
        for stale in [*tasks_dir.glob("*.part"), *(work / "parts").glob("*.part")]:
            stale.unlink(missing_ok=True)
        sg = ScatterGather(
            plan,
            cores,
            committed=committed,
            task_timeout=spec.task_timeout,
            max_attempts=max_attempts,
        )
        child_env = dict(os.environ if env is None else env)
        # A command that cannot run will not improve on retry: refuse at once.
        command_path(spec.argv(0, 0, "-")[0], child_env, conf.user)
        child_env.update(conf.environment())
        if conf.user is not None:
            child_env.update(
                HOME=str(work / "scratch"), USER=conf.user.name, LOGNAME=conf.user.name
            )
        gather = Gather(
            spec,
            work,
            sg,
            conf,
            child_env,
            stop,
            should_stop=should_stop,
            grace=grace,
            deadline=deadline,
            task_estimate=task_estimate,
            clock=clock,
            poll_interval=poll_interval,
        )
        try:
            gather.run()
        finally:
            gather.close()
            gather.count_memory_kills()  # before the cgroup goes, with its counter
        memory_limit = conf.memory_limit

    output = gather_output(work, plan, sg.committed)
    report = RunReport(
        job=spec.name,
        events_planned=plan.events,
        events_done=sg.events_done,
        tasks=plan.tasks,
        tasks_committed=len(sg.committed),
        failed_runs=sg.failed_runs,
        cut_runs=sg.cut_runs,
        abandoned=sg.abandoned,
        complete=sg.complete,
        stopped=gather.stopped or stop.reason,
        resumed_tasks=len(committed),
        wall_seconds=clock() - t0,
        cpu_seconds=gather.cpu,
        output=str(output),
        failures=sg.failures,
        cpu_seconds_committed=gather.cpu_committed,
        task_runs=gather.task_runs,
        dispatch_seconds=gather.busy,
        dispatch_cpu_seconds=gather.busy_cpu,
        spawn_seconds=gather.spawning,
        commit_seconds=gather.commits.seconds,
        gather_cpu_seconds=time.thread_time() - cpu0,
        user=str(conf.user) if conf.user is not None else f"uid {os.geteuid()} (the node's)",
        memory_limit=memory_limit,
        memory_kills=gather.memory_kills,
        seconds_per_event=gather.per_event if gather.paced else None,
        tasks_abandoned=sg.abandoned_count,
    )
    # Replaced atomically: the service and status readers may read it at any time.
    write_file_atomic(work / "report.json", json.dumps(report.to_json(), indent=1).encode())
    return report
