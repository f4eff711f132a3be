r"""The Dr. GRPO trainer: one loop, top to bottom.

Set-up, then one iteration per RL step, each section a call into the module that holds it:

1. **rollout**         G sampled completions per prompt (:mod:`drgrpo.train.rollout`)
2. **reward**          every completion scored by the reward callables (:mod:`drgrpo.train.data`)
3. **advantages**      ``A_i = r_i - mean_group(r)``, one per completion (:func:`drgrpo.global_group_advantages`)
4. **policy update**   the loss per micro-batch with one step normaliser, then the optimizer step
                       (:mod:`drgrpo.train.update`)
5. **log**             one JSON line per step in ``metrics.jsonl`` (:mod:`drgrpo.train.metrics`)
6. **evaluate**        held-out accuracy every ``eval_every`` steps (:mod:`drgrpo.train.evaluation`)
7. **checkpoint**      weights, optimizer and step, atomically (:mod:`drgrpo.train.checkpoint`)

The objective (Liu et al. 2025, arXiv 2503.20783), for the G completions ``o_i`` of a prompt::

    J = (1 / (G * L)) * sum_i sum_t min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps, 1 + eps) A_i),
    A_i = R(q, o_i) - mean_j R(q, o_j),      rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(...)

with the constant ``L = max_new_tokens`` (the generation budget): no ``1/|o_i|`` (Modification 1) and no
std division of the advantage (Modification 2). Every GRPO-family loss is a ``--loss`` preset.

Every random draw of a step comes from ``(seed, step, rank)`` (:mod:`drgrpo.train.seeds`), so a run
resumed from a checkpoint ends bit for bit where an uninterrupted run ends. Nothing is lost on a crash:
an exception inside a step first saves the last completed step, then propagates.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drgrpo.distributed import any_process, global_group_advantages, init_processes, shutdown
from drgrpo.loss import compute_dtype
from drgrpo.train.checkpoint import (
    clean_stale,
    config_state,
    find_checkpoint,
    resolve_model_dir,
    save_run_checkpoint,
)
from drgrpo.train.config import TrainConfig
from drgrpo.train.data import RewardError, Rewards, load_examples, prompts_for_step, score
from drgrpo.train.evaluation import held_out_metrics
from drgrpo.train.metrics import MetricsLog, step_metrics
from drgrpo.train.model import check_local_code, initial_policy_dir, load_train_state
from drgrpo.train.preflight import check_device, check_output_dir, check_tensorboard, prompt_check
from drgrpo.train.progress import ProgressBar, StopOnSignal
from drgrpo.train.rollout import generate, prompt_texts
from drgrpo.train.seeds import seed_step
from drgrpo.train.update import TrainState, policy_update
from drgrpo.train.warmstart import warm_start

COLLECTIVE_FAILURES = (RewardError, FloatingPointError)
"""Errors every process raises at the same point (rewards are agreed on, gradient norms and weights are shared)."""

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
    config.check_trainable()  # --dtype float16
    loss_config = config.loss_config()  # unknown preset or bad override: a ValueError listing the valid ones
    rewards = Rewards.from_specs(config.rewards, config.reward_weights)  # import errors now, not at step 1
    resume_from = find_checkpoint(config.resume) if config.resume else None
    model_dir = resolve_model_dir(config.model) if config.model else None
    weights_dir = resume_from or model_dir
    if weights_dir is not None:
        check_local_code(weights_dir)  # a model that needs its own Python code is refused, never run
    check = prompt_check(weights_dir, config) if config.dataset or config.eval_dataset else None  # empty, too long
    train_examples, eval_examples = load_examples(
        config.dataset, config.eval_dataset, config.prompt_field, config.task, check
    )
    check_device(config.device)
    check_tensorboard(config.tensorboard)
    check_output_dir(config.output_dir)  # a file, or not writable
    config.apply_torch_settings()  # deterministic algorithms, threads
    procs = init_processes(config.device)  # rank, world size, device; starts the process group under torchrun
    config.check_world_size(procs.world)
    out_dir = Path(config.output_dir)
    if procs.rank == 0:
        config.write(out_dir)  # OUTPUT_DIR/config.yaml: `drgrpo train --config` reruns this run
        clean_stale(out_dir / "checkpoints")  # what a killed checkpoint write left behind
    init_dir = initial_policy_dir(
        model_dir, resume_from, out_dir, lambda p: warm_start(p, config.warm_start, config.task)
    )
    needs_ref = loss_config.beta > 0 or config.ref_kl
    state = load_train_state(resume_from or init_dir, init_dir, config, procs.device, needs_ref, resume_from)
    result = TrainResult(
        output_dir=out_dir, step=state.step or 0, checkpoint=resume_from, checkpoint_step=state.step or 0
    )
    log = MetricsLog(out_dir, procs.rank, result.step if resume_from else None, config.tensorboard)
    progress = ProgressBar(config.progress and procs.rank == 0, config.steps, result.step)
    G = config.group_size
    adv_dtype = compute_dtype(getattr(torch, config.dtype))  # the loss's arithmetic: float32
    # a reward up to half the dtype's largest value keeps every advantage (at most max - min) finite in it
    reward_limit = torch.finfo(adv_dtype).max / 2
    adv_device = procs.device if procs.device.type != "mps" else torch.device("cpu")  # mps has no float64

    def evaluate(step: int) -> None:
        if eval_examples and config.eval_every:
            metrics = held_out_metrics(state.model, state.tokenizer, eval_examples, rewards, config)
            result.evals.append({"step": step, **metrics})
            log(result.evals[-1])
            progress.print(f"step {step}: held-out accuracy {metrics['eval/accuracy']:.3f}")

    def save(step: int, barrier: bool = True) -> None:
        extra = {"init_model": str(init_dir.resolve()), "world_size": procs.world}
        result.checkpoint = save_run_checkpoint(out_dir, step, state, config_state(config, loss_config, **extra),
                                                procs.rank, barrier)  # fmt: skip
        result.checkpoint_step = step

    try:
        with StopOnSignal() as stop:
            if result.step == 0:
                evaluate(0)
            for step in range(result.step + 1, config.steps + 1):
                step_started = time.perf_counter()
                seed_step(config.seed, step, procs.rank)

                # ---------------------------------------------------------------- rollout: G completions per prompt
                examples, idx = prompts_for_step(train_examples, config, step, procs.rank, procs.world)
                prompts = prompt_texts([e[config.prompt_field] for e in examples], state.tokenizer)
                batch = generate(state.model, state.tokenizer, prompts, G, max_new_tokens=config.max_new_tokens,
                                 temperature=config.temperature, top_p=config.top_p)  # fmt: skip
                # (B = len(prompts) * G rows, prompt j's completions in rows j*G .. j*G + G - 1)

                # ---------------------------------------------------------------- reward
                totals, firsts = score(rewards, batch.texts, repeat(examples, G), repeat(idx, G), reward_limit)

                # ---------------------------------------------------------------- advantages
                # Dr. GRPO: A_i = r_i - mean_group(r), no std division (the preset's advantage_std = "none"),
                # from the float64 rewards (1e8 + r has the advantages of r), then in the loss's dtype
                rewards64 = torch.tensor(totals, dtype=torch.float64, device=adv_device)  # (B,)
                advantages = global_group_advantages(rewards64, G, loss_config).to(procs.device, adv_dtype)  # (B,)

                # ---------------------------------------------------------------- policy update
                update = policy_update(state, batch, advantages, loss_config, config, step)

                # ---------------------------------------------------------------- log
                result.step, result.last_metrics = step, step_metrics(
                    step, batch, totals, firsts, advantages, update, config, procs, state.ref_model is not None,
                    seconds=time.perf_counter() - step_started, elapsed=time.perf_counter() - started,
                )  # fmt: skip
                log(result.last_metrics)

                # ---------------------------------------------------------------- evaluate
                if config.eval_due(step):
                    evaluate(step)
                progress.update(result.last_metrics, result.evals[-1]["eval/accuracy"] if result.evals else None)

                # ---------------------------------------------------------------- checkpoint
                stopping = any_process(stop.stopped)  # every process stops at the same step
                if stopping or config.checkpoint_due(step):
                    save(step)
                if stopping:
                    result.interrupted = True
                    progress.print(f"stopped by a signal at step {step}; checkpoint {result.checkpoint}")
                    break
    except Exception as exc:
        with contextlib.suppress(AttributeError):  # (an exception class with __slots__ takes no attribute)
            setattr(exc, FAILED_STEP, result.step + 1)  # a failure during the work, not a configuration error
        save_after_failure(exc, state, result, save)
        raise
    finally:
        progress.close()
        log.close()
        state.policy = None  # the DDP wrapper holds the process group: free it before ending the group
        shutdown(procs)
    result.seconds = time.perf_counter() - started
    return result


def repeat(items: list[Any], times: int) -> list[Any]:
    """Each item ``times`` times in a row: a prompt's values for its G completions."""
    return [x for x in items for _ in range(times)]


def save_after_failure(exc: Exception, state: TrainState, result: TrainResult, save: Any) -> None:
    """Nothing lost: save the last completed step (unless it is on disk already) before an error propagates.

    The parameters hold a completed step unless the error came while the optimizer was changing them
    (``state.step`` is None). Under several processes every process saves collectively after an error they
    all raised (:data:`COLLECTIVE_FAILURES`); after an error of one process only, rank 0 writes alone.
    """
    where = f"step {result.step + 1} failed ({type(exc).__name__})"
    if state.step is None:  # the weights may be half-updated or non-finite: never saved
        last = f"the last checkpoint is {result.checkpoint}" if result.checkpoint else "no checkpoint was written yet"
        print(f"drgrpo: {where} while updating the weights (not saved); {last}", file=sys.stderr)
        return
    if state.step > result.checkpoint_step:  # the same decision on every process: all save, or none
        # after an error of one process only, the others may wait elsewhere: rank 0 writes, no barrier
        save(state.step, barrier=isinstance(exc, COLLECTIVE_FAILURES))
    if result.checkpoint is not None:
        print(f"drgrpo: {where}; the last completed step is saved in {result.checkpoint}", file=sys.stderr)
