r"""The Dr. GRPO trainer: one loop, top to bottom.

Set-up, then one iteration per RL step, each section a call into the module that holds it:

1. **rollout**         G sampled completions per prompt (:mod:`drgrpo.train.loop.rollout`)
2. **reward**          every completion scored by the reward callables (:mod:`drgrpo.train.loop.data`)
3. **advantages**      ``A_i = r_i - mean_group(r)``, one per completion (:func:`drgrpo.global_group_advantages`)
4. **policy update**   the loss per micro-batch with one step normaliser, then the optimizer step
                       (:mod:`drgrpo.train.loop.update`)
5. **log**             one JSON line per step in ``metrics.jsonl`` (:mod:`drgrpo.train.loop.metrics`)
6. **evaluate**        held-out accuracy every ``eval_every`` steps (:mod:`drgrpo.train.loop.evaluation`)
7. **checkpoint**      weights, optimizer and step, atomically (:mod:`drgrpo.train.run.checkpoint`)

The objective (Liu et al. 2025, arXiv 2503.20783), for the G completions ``o_i`` of a prompt::

    J = (1 / (G * L)) * sum_i sum_t min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps, 1 + eps) A_i),
    A_i = R(q, o_i) - mean_j R(q, o_j),      rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(...)

with the constant ``L = max_new_tokens`` (the generation budget): no ``1/|o_i|`` (Modification 1) and no
std division of the advantage (Modification 2). Every GRPO-family loss is a ``--loss`` preset.

Every random draw of a step comes from ``(seed, step, rank)`` (:mod:`drgrpo.train.loop.seeds`), so a run
resumed from a checkpoint ends bit for bit where an uninterrupted run ends. Nothing is lost on a crash:
an exception inside a step first saves the last completed step, then propagates; SIGINT/SIGTERM abandon a
step's rollout and rewards at once and save the last completed step (:mod:`drgrpo.train.run.stopping`). One run
owns its output directory (:mod:`drgrpo.train.run.runlock`); resume and branch rules: :mod:`drgrpo.train.run.resume`.
"""

from __future__ import annotations

import contextlib
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
from drgrpo.train.loop.setup import check_run
from drgrpo.train.loop.update import TrainState, policy_update
from drgrpo.train.loop.warmstart import warm_start
from drgrpo.train.run.checkpoint import CheckpointWriteFailed, clean_stale, config_state, save_run_checkpoint
from drgrpo.train.run.disk import WriteFailed
from drgrpo.train.run.identity import write_config
from drgrpo.train.run.metrics_log import MetricsLog, warn_line
from drgrpo.train.run.processes import init_processes, shutdown
from drgrpo.train.run.resume import check_processes, check_run_dir, start_lines
from drgrpo.train.run.runlock import hold_run_dir
from drgrpo.train.run.stopping import Interrupted, StopOnSignal, agreed, is_agreed
from drgrpo.train.train_config import TrainConfig

COLLECTIVE_FAILURES = (FloatingPointError,)
"""Errors every process raises at the same point (gradient norms and weights are shared); failures of the rollout,
the rewards and the evaluation are agreed on (:func:`~drgrpo.train.run.stopping.agreed`)."""

FAILED_STEP = "drgrpo_failed_step"
"""Attribute :func:`train` sets on an exception raised after the set-up: the step that failed (the CLI exits with
code 1 for these, code 2 for a configuration error found before any work)."""


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
    """Run Dr. GRPO (or any GRPO-family loss) as configured; see the module docstring for the loop."""
    started = time.perf_counter()

    # ---------------------------------------------------------------------------- set-up: errors before any work
    plan = check_run(config)  # flags, loss, rewards, resume, model, datasets, device, output directory
    loss_config, rewards, start = plan.loss_config, plan.rewards, plan.start
    train_examples, eval_examples = plan.train_examples, plan.eval_examples
    config.apply_torch_settings()  # deterministic algorithms, threads
    procs = init_processes(config.device)  # rank, world size, device; starts the process group under torchrun
    config.check_world_size(procs.world)
    start = check_processes(start, procs.world)  # a resume on another number of processes samples otherwise
    given = Path(config.output_dir)  # as the user wrote it, for messages
    out_dir = Path(os.path.abspath(given))  # where --output-dir said, whatever changes the working directory later
    result = TrainResult(output_dir=given, step=start.step, checkpoint=start.checkpoint, checkpoint_step=start.step)
    state: TrainState | None = None
    log: MetricsLog | None = None
    progress = ProgressBar(False, 0, 0)  # replaced once the run is set up
    G = config.group_size
    doing = "the set-up"  # what the run is doing, for the message of a failure or a signal
    adv_dtype = compute_dtype(getattr(torch, config.dtype))  # the loss's arithmetic: float32
    # a reward up to half the dtype's largest value keeps every advantage (at most max - min) finite in it
    reward_limit = torch.finfo(adv_dtype).max / 2
    adv_device = procs.device if procs.device.type != "mps" else torch.device("cpu")  # mps has no float64

    def evaluate(step: int) -> None:
        nonlocal doing
        assert state is not None and log is not None
        if eval_examples and config.eval_every:
            doing = f"the evaluation of step {step}"
            metrics = held_out_metrics(state.model, state.tokenizer, eval_examples, rewards, config, stop)
            result.evals.append({"step": step, **metrics})
            log(result.evals[-1])
            acc = metrics["eval/accuracy"]  # None when the first reward is no 0/1 correctness reward
            progress.print(f"step {step}: held-out " + (f"accuracy {acc:.3f}" if acc is not None else "reward "
                                                        f"{metrics['eval/reward']:.4g}"))  # fmt: skip
            doing = f"the end of step {step}"

    def save(step: int, barrier: bool = True) -> None:
        assert state is not None
        lines = [m for m in (result.last_metrics, *result.evals[-1:]) if m.get("step") == step]  # restored if lost
        extra = {"init_model": str(init_dir.resolve()), "world_size": procs.world, "history": list(start.history),
                 "metrics": lines, "run_id": start.run_id, "parent_run": start.parent,
                 "run_dir": str(out_dir.resolve())}  # fmt: skip
        result.checkpoint = save_run_checkpoint(out_dir, step, state, config_state(config, loss_config, **extra),
                                                procs.rank, barrier, config.keep_checkpoints, stop)  # fmt: skip
        result.checkpoint_step = step

    owned = hold_run_dir(given, procs, lambda: check_run_dir(given, start, config=config))  # one run a directory
    stop = StopOnSignal(config.reward_timeout, escalate=procs.world == 1)  # SIGINT/SIGTERM: stopping.py
    with owned, stop:
        try:
            if procs.rank == 0:
                if start.note:
                    warn_line(start.note)  # a checkpoint from before run ids: taken as the run's
                write_config(out_dir, config, start.run_id, start.notes())  # `drgrpo train --config` reruns it
                clean_stale(out_dir / "checkpoints")  # what a killed checkpoint write left behind
            lines = start_lines(out_dir, start) if procs.rank == 0 else []  # the run's history on resume
            log = MetricsLog(out_dir, procs.rank, lines, config.tensorboard, stop)
            with agreed(stop, procs.device):  # rank 0 makes the warm start, the others wait; a signal abandons it
                init_dir = initial_policy_dir(
                    plan.model_dir, start.checkpoint, out_dir,
                    lambda p: warm_start(p, config.warm_start, config.task, log=announcer(config.progress)),
                )  # fmt: skip
            needs_ref = loss_config.beta > 0 or config.ref_kl
            state = load_train_state(start.checkpoint or init_dir, init_dir, config, procs.device, needs_ref,
                                     start.checkpoint)  # fmt: skip
            progress = ProgressBar(config.progress and procs.rank == 0, config.steps, result.step)

            if result.step == 0 or start.eval_pending:  # the evaluation of the resumed step, if a signal cut it
                evaluate(result.step)
            for step in range(result.step + 1, config.steps + 1):
                doing, step_started = f"step {step}", time.perf_counter()
                seed_step(config.seed, step, procs.rank)

                # ---------------------------------------------------------------- rollout and reward
                # this process's own work: a signal abandons it at once (the step is redone on resume), then every
                # process learns whether any failed or was stopped, and all stop alike (stopping.py)
                with agreed(stop, procs.device):
                    examples, idx = prompts_for_step(train_examples, config.prompts_per_step, config.seed, step,
                                                    procs.rank, procs.world)  # fmt: skip
                    prompts = prompt_texts([e[config.prompt_field] for e in examples], state.tokenizer)
                    batch = generate(state.model, state.tokenizer, prompts, G, max_new_tokens=config.max_new_tokens,
                                     temperature=config.temperature, top_p=config.top_p)  # fmt: skip
                    # (B = len(prompts) * G rows, prompt j's completions in rows j*G .. j*G + G - 1)
                    totals, firsts = rewards(batch.texts, repeat(examples, G), repeat(idx, G), reward_limit, step,
                                             stop.watchdog)  # fmt: skip

                # ---------------------------------------------------------------- advantages
                # Dr. GRPO: A_i = r_i - mean_group(r), no std division (the preset's advantage_std = "none"),
                # from the float64 rewards (1e8 + r has the advantages of r), then in the loss's dtype
                rewards64 = torch.tensor(totals, dtype=torch.float64, device=adv_device)  # (B,)
                lengths = batch.lengths.to(adv_device)  # (B,) opo and reinforce_plus_plus_baseline weigh by them
                advantages = global_outcome_advantages(rewards64, G, loss_config, config.advantage, lengths=lengths)
                advantages = advantages.to(procs.device, adv_dtype)  # (B,)

                # ---------------------------------------------------------------- policy update
                update = policy_update(state, batch, advantages, loss_config, config, step, stop)

                # ---------------------------------------------------------------- log
                result.last_metrics = step_metrics(
                    step, batch, totals, firsts, advantages, update, G, rewards.names[0], procs,
                    state.ref_model is not None, seconds=time.perf_counter() - step_started,
                    elapsed=time.perf_counter() - started,
                )  # fmt: skip
                log(result.last_metrics)  # (saved with the step's checkpoint too, should the write fail)
                result.step = step

                # ---------------------------------------------------------------- evaluate
                if config.eval_due(step):
                    evaluate(step)
                progress.update(result.last_metrics, result.evals[-1]["eval/accuracy"] if result.evals else None)

                # ---------------------------------------------------------------- checkpoint
                stopping = any_process(stop.stopped, procs.device)  # every process stops at the same step
                if stopping or config.checkpoint_due(step):
                    save(step)
                if stopping:
                    result.interrupted = True
                    progress.print(f"stopped by a signal at step {step}; checkpoint {result.checkpoint}")
                    break
        except Interrupted as exc:  # a signal inside a step: the step is abandoned, the last completed one saved
            save_after_failure(exc, state, result, save, doing)
            result.interrupted = True
        except Exception as exc:
            if state is not None:  # after the set-up: a failed step (exit 1), not a configuration error (exit 2)
                with contextlib.suppress(AttributeError):  # (an exception class with __slots__ takes no attribute)
                    setattr(exc, FAILED_STEP, result.step + 1)
            save_after_failure(exc, state, result, save, doing)
            raise
        finally:
            progress.close()
            if log is not None:
                log.close()
            if state is not None:
                state.policy = None  # the DDP wrapper holds the process group: free it before ending the group
            shutdown(procs)
    result.seconds = time.perf_counter() - started
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
