r"""The Dr. GRPO trainer: :func:`train` is :func:`set_up`, then :func:`run_steps`, each read top to bottom.

Per step: rollout -> reward -> advantages ``A_i = r_i - mean_group(r)`` -> policy update (the loss over
``G * L``, ``L = max_new_tokens``) -> log -> evaluate -> checkpoint, each a call into the module that holds it.
An error of :func:`set_up` is a configuration error (before any work); an error of a step first saves the last
completed step, then propagates; a signal saves the last completed step and returns. The objective, the module of
each section and what a crash or a signal keeps: docs/design.md, section 9.12.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drgrpo.distributed import any_process, global_outcome_advantages
from drgrpo.loss import compute_dtype
from drgrpo.train.loop.data import prompts_for_step
from drgrpo.train.loop.evaluation import held_out_metrics
from drgrpo.train.loop.metrics import step_metrics
from drgrpo.train.loop.model import initial_policy_dir, load_train_state
from drgrpo.train.loop.progress import ProgressBar, announcer
from drgrpo.train.loop.rollout import generate, prompt_texts
from drgrpo.train.loop.seeds import seed_step
from drgrpo.train.loop.setup import RunPlan, check_run
from drgrpo.train.loop.update import TrainState, policy_update
from drgrpo.train.loop.warmstart import warm_start
from drgrpo.train.run.checkpoint import CheckpointWriteFailed, clean_stale, config_state, save_run_checkpoint
from drgrpo.train.run.disk import WriteFailed
from drgrpo.train.run.identity import write_config
from drgrpo.train.run.metrics_log import MetricsLog, warn_line
from drgrpo.train.run.processes import Processes, init_processes, shutdown
from drgrpo.train.run.resume import check_processes, check_run_dir, start_lines
from drgrpo.train.run.runlock import hold_run_dir
from drgrpo.train.run.stopping import Interrupted, StopOnSignal, agreed, is_agreed
from drgrpo.train.train_config import TrainConfig

COLLECTIVE_FAILURES = (FloatingPointError,)
"""Errors every process raises at the same point (gradient norms and weights are shared); failures of the rollout,
the rewards and the evaluation are agreed on (:func:`~drgrpo.train.run.stopping.agreed`)."""


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    output_dir: Path
    """The run directory (config.yaml, metrics.jsonl, checkpoints/, plots/)."""
    step: int
    """The last completed RL step."""
    checkpoint: Path | None
    """The last checkpoint written or resumed from (None if none; written ones are known on rank 0 only)."""
    checkpoint_step: int = 0
    """The step of the last checkpoint written or resumed from, on every process (0: none, the initial model)."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Every held-out evaluation of this invocation, in order (each has 'step' and 'eval/...' keys)."""
    last_metrics: dict[str, Any] = field(default_factory=dict)
    """The metrics line of the last step."""
    interrupted: bool = False
    """True when SIGINT/SIGTERM stopped the run (after saving a checkpoint)."""
    seconds: float = 0.0
    """Wall time of this invocation, warm start included."""


def train(config: TrainConfig) -> TrainResult:
    """Run Dr. GRPO (or any GRPO-family loss) as configured: :func:`set_up`, then :func:`run_steps`.

    An error raised by :func:`set_up` is a configuration error, found before any work; one raised by
    :func:`run_steps` is a failed step, raised after the last completed step was saved.
    """
    run = set_up(config)  # every check, the run directory, the warm start, the model
    with run:  # then: the process group ended, the metrics file closed, the run directory released
        return run_steps(run)  # rollout -> reward -> advantages -> update -> log -> evaluate -> checkpoint


@dataclass
class Run:
    """A run between its set-up and its end: what :func:`set_up` made and :func:`run_steps` uses.

    ``state`` is None until the model is loaded (and stays None when a signal stopped the set-up: then
    ``result.interrupted`` is True and there are no steps to run). Leaving ``with run:`` ends the process group,
    closes the metrics file and the progress line, releases the signal handlers and the run directory, and sets
    ``result.seconds``.
    """

    config: TrainConfig
    """The run's configuration."""
    plan: RunPlan
    """What the checks found: the loss, the rewards, the start (new, resumed, branched), the datasets."""
    procs: Processes
    """This process's rank, the number of processes and its device."""
    out_dir: Path
    """``--output-dir`` made absolute (whatever changes the working directory later)."""
    stop: StopOnSignal
    """SIGINT/SIGTERM and the reward time limit (:mod:`drgrpo.train.run.stopping`)."""
    result: TrainResult
    """What :func:`train` returns, brought up to date as the run goes."""
    resources: contextlib.ExitStack
    """The run directory's lock and the signal handlers, released last."""
    started: float
    """``time.perf_counter()`` when :func:`train` began."""
    state: TrainState | None = None
    """The policy, its optimizer, tokenizer and reference model, and the step they hold (None until loaded)."""
    log: MetricsLog | None = None
    """``metrics.jsonl`` (written by rank 0)."""
    init_dir: Path | None = None
    """The initial policy: the model, or the warm start."""
    progress: ProgressBar = field(default_factory=lambda: ProgressBar(False, 0, 0))
    """The progress line (off until the steps start)."""
    doing: str = "the set-up"
    """What the run is doing, for the message of a failure or a signal."""

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.close()
        if self.log is not None:
            self.log.close()
        if self.state is not None:
            self.state.policy = None  # the DDP wrapper holds the process group: free it before ending the group
        try:
            shutdown(self.procs)
        finally:
            self.resources.close()
            self.result.seconds = time.perf_counter() - self.started

    def evaluate(self, step: int) -> None:
        """Held-out metrics of the policy at ``step``, logged and printed (when evaluation is on)."""
        assert self.state is not None and self.log is not None
        eval_examples, result = self.plan.eval_examples, self.result
        if eval_examples and self.config.eval_every:
            self.doing = f"the evaluation of step {step}"
            metrics = held_out_metrics(self.state.model, self.state.tokenizer, eval_examples, self.plan.rewards,
                                       self.config, self.stop)  # fmt: skip
            result.evals.append({"step": step, **metrics})
            self.log(result.evals[-1])
            acc = metrics["eval/accuracy"]  # None when the first reward is no 0/1 correctness reward
            self.progress.print(f"step {step}: held-out " + (f"accuracy {acc:.3f}" if acc is not None else "reward "
                                                             f"{metrics['eval/reward']:.4g}"))  # fmt: skip
            self.doing = f"the end of step {step}"

    def save(self, step: int, barrier: bool = True) -> None:
        """Checkpoint ``step`` with the run's state (its metrics lines too, restored should they be lost)."""
        assert self.state is not None and self.init_dir is not None
        result, start = self.result, self.plan.start
        lines = [m for m in (result.last_metrics, *result.evals[-1:]) if m.get("step") == step]
        extra = {"init_model": str(self.init_dir.resolve()), "world_size": self.procs.world,
                 "history": list(start.history), "metrics": lines, "run_id": start.run_id, "parent_run": start.parent,
                 "run_dir": str(self.out_dir.resolve())}  # fmt: skip
        state = config_state(self.config, self.plan.loss_config, **extra)
        result.checkpoint = save_run_checkpoint(self.out_dir, step, self.state, state, self.procs.rank, barrier,
                                                self.config.keep_checkpoints, self.stop)  # fmt: skip
        result.checkpoint_step = step


def set_up(config: TrainConfig) -> Run:
    """Everything before the first step: every check (errors before any work), the processes, the run directory
    (its lock, ``config.yaml``, ``metrics.jsonl``), the warm start and the model.

    An error here is a configuration error (``drgrpo train`` exits with code 2); a signal stops the set-up with
    nothing to save (the returned run has ``result.interrupted`` set and no state).
    """
    started = time.perf_counter()
    plan = check_run(config)  # flags, loss, rewards, resume, model, datasets, device, output directory
    start = plan.start
    config.apply_torch_settings()  # deterministic algorithms, threads
    procs = init_processes(config.device)  # rank, world size, device; starts the process group under torchrun
    config.check_world_size(procs.world)
    start = check_processes(start, procs.world)  # a resume on another number of processes samples otherwise
    plan = dataclasses.replace(plan, start=start)
    given = Path(config.output_dir)  # as the user wrote it, for messages
    result = TrainResult(output_dir=given, step=start.step, checkpoint=start.checkpoint, checkpoint_step=start.step)
    stop = StopOnSignal(config.reward_timeout, escalate=procs.world == 1)  # SIGINT/SIGTERM: stopping.py
    out_dir = Path(os.path.abspath(given))  # where --output-dir said, whatever changes the working directory later
    run = Run(config, plan, procs, out_dir, stop, result, contextlib.ExitStack(), started)
    with contextlib.ExitStack() as on_error:
        on_error.push(run.__exit__)  # a failed set-up ends the processes and releases what it took
        run.resources.enter_context(hold_run_dir(given, procs, lambda: check_run_dir(given, start, config=config)))
        run.resources.enter_context(stop)
        try:
            if procs.rank == 0:
                if start.note:
                    warn_line(start.note)  # a checkpoint from before run ids: taken as the run's
                write_config(run.out_dir, config, start.run_id, start.notes())  # `drgrpo train --config` reruns it
                clean_stale(run.out_dir / "checkpoints")  # what a killed checkpoint write left behind
            lines = start_lines(run.out_dir, start) if procs.rank == 0 else []  # the run's history on resume
            run.log = MetricsLog(run.out_dir, procs.rank, lines, config.tensorboard, run.stop)
            with agreed(run.stop, procs.device):  # rank 0 makes the warm start, the others wait; a signal abandons it
                run.init_dir = initial_policy_dir(
                    plan.model_dir, start.checkpoint, run.out_dir,
                    lambda p: warm_start(p, config.warm_start, config.task, log=announcer(config.progress)),
                )  # fmt: skip
            needs_ref = plan.loss_config.beta > 0 or config.ref_kl
            run.state = load_train_state(start.checkpoint or run.init_dir, run.init_dir, config, procs.device,
                                         needs_ref, start.checkpoint)  # fmt: skip
        except Interrupted as exc:  # a signal before the first step: nothing to save
            save_after_failure(exc, None, result, run.save)
            result.interrupted = True
        on_error.pop_all()
    return run


def run_steps(run: Run) -> TrainResult:
    """The RL steps of a set-up run, from the step after ``run.result.step`` to ``config.steps``.

    An exception inside a step first saves the last completed step, then propagates (a failed step); a signal
    abandons the step in progress, saves the last completed one and returns with ``interrupted`` set.
    """
    config, plan, procs, stop, result, state = run.config, run.plan, run.procs, run.stop, run.result, run.state
    if state is None:  # a signal stopped the set-up
        return result
    assert run.log is not None
    loss_config, rewards, G = plan.loss_config, plan.rewards, config.group_size
    adv_dtype = compute_dtype(getattr(torch, config.dtype))  # the loss's arithmetic: float32
    # a reward up to half the dtype's largest value keeps every advantage (at most max - min) finite in it
    reward_limit = torch.finfo(adv_dtype).max / 2
    adv_device = procs.device if procs.device.type != "mps" else torch.device("cpu")  # mps has no float64
    run.progress = ProgressBar(config.progress and procs.rank == 0, config.steps, result.step)
    try:
        if result.step == 0 or plan.start.eval_pending:  # the evaluation of the resumed step, if a signal cut it
            run.evaluate(result.step)
        for step in range(result.step + 1, config.steps + 1):
            run.doing, step_started = f"step {step}", time.perf_counter()
            seed_step(config.seed, step, procs.rank)

            # -------------------------------------------------------------------- rollout and reward
            # this process's own work: a signal abandons it at once (the step is redone on resume), then every
            # process learns whether any failed or was stopped, and all stop alike (stopping.py)
            with agreed(stop, procs.device):
                examples, idx = prompts_for_step(plan.train_examples, config.prompts_per_step, config.seed, step,
                                                procs.rank, procs.world)  # fmt: skip
                prompts = prompt_texts([e[config.prompt_field] for e in examples], state.tokenizer)
                batch = generate(state.model, state.tokenizer, prompts, G, max_new_tokens=config.max_new_tokens,
                                 temperature=config.temperature, top_p=config.top_p)  # fmt: skip
                # (B = len(prompts) * G rows, prompt j's completions in rows j*G .. j*G + G - 1)
                totals, firsts = rewards(batch.texts, repeat(examples, G), repeat(idx, G), reward_limit, step,
                                         stop.watchdog)  # fmt: skip

            # -------------------------------------------------------------------- advantages
            # Dr. GRPO: A_i = r_i - mean_group(r), no std division (the preset's advantage_std = "none"),
            # from the float64 rewards (1e8 + r has the advantages of r), then in the loss's dtype
            rewards64 = torch.tensor(totals, dtype=torch.float64, device=adv_device)  # (B,)
            lengths = batch.lengths.to(adv_device)  # (B,) opo and reinforce_plus_plus_baseline weigh by them
            advantages = global_outcome_advantages(rewards64, G, loss_config, config.advantage, lengths=lengths)
            advantages = advantages.to(procs.device, adv_dtype)  # (B,)

            # -------------------------------------------------------------------- policy update
            update = policy_update(state, batch, advantages, loss_config, config, step, stop)

            # -------------------------------------------------------------------- log
            result.last_metrics = step_metrics(
                step, batch, totals, firsts, advantages, update, G, rewards.names[0], procs,
                state.ref_model is not None, seconds=time.perf_counter() - step_started,
                elapsed=time.perf_counter() - run.started,
            )  # fmt: skip
            run.log(result.last_metrics)  # (saved with the step's checkpoint too, should the write fail)
            result.step = step

            # -------------------------------------------------------------------- evaluate
            if config.eval_due(step):
                run.evaluate(step)
            run.progress.update(result.last_metrics, result.evals[-1]["eval/accuracy"] if result.evals else None)

            # -------------------------------------------------------------------- checkpoint
            stopping = any_process(stop.stopped, procs.device)  # every process stops at the same step
            if stopping or config.checkpoint_due(step):
                run.save(step)
            if stopping:
                result.interrupted = True
                run.progress.print(f"stopped by a signal at step {step}; checkpoint {result.checkpoint}")
                break
    except Interrupted as exc:  # a signal inside a step: the step is abandoned, the last completed one saved
        save_after_failure(exc, state, result, run.save, run.doing)
        result.interrupted = True
    except Exception as exc:  # a failed step: the last completed one saved, then the error propagates
        save_after_failure(exc, state, result, run.save, run.doing)
        raise
    return result


def repeat(items: list[Any], times: int) -> list[Any]:
    """Each item ``times`` times in a row: a prompt's values for its G completions."""
    return [x for x in items for _ in range(times)]


def save_after_failure(
    exc: BaseException, state: TrainState | None, result: TrainResult, save: Any, doing: str = "the step"
) -> None:
    """Nothing lost: save the last completed step (unless it is on disk already) before an error propagates, or
    after a signal abandoned the step in progress (:class:`~drgrpo.train.run.stopping.Interrupted`).

    The parameters hold a completed step unless the error came while the optimizer was changing them
    (``state.step`` is None; signals wait for the end of that). Under several processes every process saves
    collectively after an error they all raised at the same point (agreed on, or :data:`COLLECTIVE_FAILURES`);
    after an error of one process only, rank 0 writes alone. A checkpoint write that failed is not tried again.
    ``doing`` names what failed or was stopped ('step 4', 'the evaluation of step 4').
    """
    if isinstance(exc, Interrupted):
        where = f"{exc} during {doing} (abandoned: a resume does it again)"
    else:
        where = f"{doing} failed ({type(exc).__name__})"
    if state is None:  # before the first step: the warm start, or loading the model
        if isinstance(exc, Interrupted):
            print(f"drgrpo: {exc} before the first step; nothing to save", file=sys.stderr)
        return
    if state.step is None:  # the weights may be half-updated or non-finite: never saved
        last = f"the last checkpoint is {result.checkpoint}" if result.checkpoint else "no checkpoint was written yet"
        print(f"drgrpo: {where} while updating the weights (not saved); {last}", file=sys.stderr)
        return
    if isinstance(exc, CheckpointWriteFailed):
        return  # its message names the last intact checkpoint
    if state.step > result.checkpoint_step:  # the same decision on every process: all save, or none
        # after an error of one process only, the others may wait elsewhere: rank 0 writes, no barrier
        try:
            save(state.step, barrier=isinstance(exc, COLLECTIVE_FAILURES) or is_agreed(exc))
        except WriteFailed as write_failed:
            print(f"drgrpo: {where}; could not save the last completed step: {write_failed}", file=sys.stderr)
            return
    if result.checkpoint is not None:
        print(f"drgrpo: {where}; the last completed step is saved in {result.checkpoint}", file=sys.stderr)
    elif result.checkpoint_step:  # another process than the first: process 0 wrote it
        print(f"drgrpo: {where}; process 0 saves the last completed step ({result.checkpoint_step})", file=sys.stderr)
