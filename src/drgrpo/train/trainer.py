r"""The Dr. GRPO trainer: one readable loop, top to bottom.

Each RL step does, in this order (banner comments below mark each section):

1. **rollout**     sample G completions for each of the step's prompts (HF ``generate``)
2. **reward**      score every completion with the reward callables ``(completion, example) -> float``
3. **advantages**  ``A_i = r_i - mean_group(r)`` (Dr. GRPO: no std division), one per completion
4. **loss**        log-probs under the policy, then :func:`drgrpo.policy_loss` per micro-batch with
                   ONE :class:`~drgrpo.normalizer.StepNormalizer` for the whole step, so the sum of
                   the micro-batch gradients (DDP-averaged across processes) is exactly the gradient
                   of the whole batch's objective (Dr. GRPO: ``sum_t A_i l_{i,t} / (N_seq * L)``)
5. **step**        clip the gradient norm, AdamW step (``ppo_epochs`` times per rollout)
6. **log**         one JSON line per step in ``metrics.jsonl``; held-out evaluation every ``eval_every``
7. **checkpoint**  safetensors weights + optimizer + RNG + step + config, atomically

The objective (Liu et al. 2025, arXiv 2503.20783), per token of completion ``o_i`` of a group of G:

    J = (1 / (G * L)) * sum_i sum_t min(rho_{i,t} A_i, clip(rho_{i,t}, 1-eps, 1+eps) A_i),
    A_i = R(q, o_i) - mean_j R(q, o_j),   rho_{i,t} = pi_theta(o_{i,t} | ...) / pi_old(o_{i,t} | ...)

with the constant ``L = max_new_tokens`` (the generation budget). Every loss of the GRPO family is
available through ``TrainConfig.loss`` and ``loss_overrides``.

Without ``--model`` the run builds a tiny Llama-style model and tokenizer locally, warm-starts it
with a short supervised run on the built-in addition task (:mod:`drgrpo.train.task`), and then runs
RL on it: the very same code path as a real local Hugging Face model.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from drgrpo.distributed import global_group_advantages
from drgrpo.loss import policy_loss
from drgrpo.normalizer import StepNormalizer
from drgrpo.train.checkpoint import (
    derive_seed,
    find_checkpoint,
    load_rng,
    read_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from drgrpo.train.config import TrainConfig
from drgrpo.train.data import Rewards, load_jsonl
from drgrpo.train.evaluation import evaluate
from drgrpo.train.metrics import length_stats, mean_or_none, sum_across_processes
from drgrpo.train.model import check_model_dir, load_model, load_tokenizer
from drgrpo.train.rollout import Rollout, completion_hidden, generate, prompt_texts, token_logp
from drgrpo.train.task import make_splits
from drgrpo.train.warmstart import warm_start


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    output_dir: Path
    """The run directory (metrics.jsonl, checkpoints/, plots/)."""
    step: int
    """The last completed RL step."""
    checkpoint: Path | None
    """The last checkpoint written (None if none was)."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Every held-out evaluation of this invocation, in order (each has 'step' and 'eval/...' keys)."""
    last_metrics: dict[str, Any] = field(default_factory=dict)
    """The metrics line of the last step."""
    interrupted: bool = False
    """True when SIGINT/SIGTERM stopped the run (after saving a checkpoint)."""
    seconds: float = 0.0
    """Wall time of this invocation, warm start included."""


# ----------------------------------------------------------------------------- helpers


def _seed_everything(*parts: int) -> None:
    """Reseed python, numpy and torch from ``parts`` (each step reseeds, so resume is exact)."""
    seed = derive_seed(*parts)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves a checkpoint at the end of the step and returns.

    A second SIGINT raises KeyboardInterrupt at once (the last checkpoint on disk stays intact).
    """

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Progress:
    """A rich progress bar on rank 0 (a no-op elsewhere or when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]drgrpo"),
                BarColumn(bar_width=16),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self.task = self.bar.add_task("", total=total, completed=start)
            self.bar.start()

    def update(self, m: dict[str, Any], acc: float | None) -> None:
        if self.bar is None:
            return

        def f(x: float | None, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)

        self.bar.update(
            self.task,
            advance=1,
            description=(
                f"reward {f(m['reward'], '.2f')} acc {f(acc, '.2f')} "
                f"len right/wrong {f(m['length_correct'], '.1f')}/{f(m['length_incorrect'], '.1f')} "
                f"kl {f(m['kl'], '.3f')} {m['tokens_per_s'] / 1000:.1f}k tok/s"
            ),
        )

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------- the trainer


def train(config: TrainConfig) -> TrainResult:
    """Run Dr. GRPO (or any GRPO-family loss) as configured; see the module docstring for the loop."""
    t_start = time.perf_counter()

    # ---------------------------------------------------------------- setup: fail before any work
    loss_config = config.loss_config()  # unknown preset / bad override: ValueError listing the valid ones
    rewards = Rewards.from_specs(config.rewards, config.reward_weights)  # import errors now, not at step 1
    if config.model is not None:
        check_model_dir(config.model)
    if config.dataset is not None:
        train_examples = load_jsonl(config.dataset, config.prompt_field)
        eval_examples = load_jsonl(config.eval_dataset, config.prompt_field) if config.eval_dataset else []
    else:
        train_examples, eval_examples = make_splits(config.task)
        if config.eval_dataset:
            eval_examples = load_jsonl(config.eval_dataset, config.prompt_field)
    eval_examples = eval_examples[: config.eval_size]
    ckpt = find_checkpoint(config.resume) if config.resume else None
    if config.fused:
        from drgrpo.fused import fused_policy_loss
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    if config.threads or config.model is None:
        torch.set_num_threads(config.threads or 1)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns_group = world > 1 and not dist.is_initialized()  # launched by torchrun: we start it, we end it
    if owns_group:
        dist.init_process_group("nccl" if config.device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if config.prompts_per_step % world:
        raise ValueError(f"prompts_per_step={config.prompts_per_step} must be divisible by the {world} processes")
    device = torch.device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out_dir = Path(config.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    # the initial policy: a checkpoint (resume), a local model, or the warm-started tiny model
    if ckpt is not None:
        state = read_state(ckpt)
        start_step, init_path = int(state["step"]), state["init_model"]
        if not Path(init_path).is_dir() and (ckpt.parent.parent / "warm_start").is_dir():  # the run dir moved
            init_path = str(ckpt.parent.parent / "warm_start")
    else:
        start_step = 0
        if config.model is not None:
            init_path = config.model
        else:
            init_path = str(out_dir / "warm_start")
            if rank == 0:
                warm_start(init_path, config.warm_start, config.task, log=print if config.progress else None)
            if dist.is_initialized():
                dist.barrier()
    tokenizer = load_tokenizer(ckpt or init_path)
    model = load_model(ckpt or init_path, config.dtype, device)
    model.train()
    needs_ref = loss_config.beta > 0 or config.ref_kl
    ref_model = load_model(init_path, config.dtype, device).eval().requires_grad_(False) if needs_ref else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
        rng = load_rng(ckpt, rank)
        if rng is not None:
            set_rng_state(rng)
    policy = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model  # forward/backward
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts_local = config.prompts_per_step // world
    G = config.group_size

    metrics_path = out_dir / "metrics.jsonl"
    if rank == 0 and ckpt is not None and metrics_path.exists():  # drop lines past the checkpoint
        kept = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
    log_file = open(metrics_path, "a") if rank == 0 else None  # noqa: SIM115  (closed in finally)
    writer = None
    if config.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(line: dict[str, Any]) -> None:
        if log_file is not None:
            log_file.write(json.dumps(line) + "\n")
            log_file.flush()
        if writer is not None:
            for k, v in line.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, line["step"])

    result = TrainResult(output_dir=out_dir, step=start_step, checkpoint=ckpt)
    progress = _Progress(config.progress and rank == 0, config.steps, start_step)

    def run_eval(step: int) -> None:
        if not eval_examples or config.eval_every == 0:
            return
        ev = {"step": step, **evaluate(model, tokenizer, eval_examples, rewards, config)}
        if config.eval_sampled:  # also at the rollout temperature: the expected reward RL maximises
            ev.update(
                evaluate(
                    model,
                    tokenizer,
                    eval_examples,
                    rewards,
                    config,
                    temperature=config.temperature,
                    prefix="eval_sampled/",
                )
            )
        log(ev)
        result.evals.append(ev)
        progress.print(f"step {step}: held-out accuracy {ev['eval/accuracy']:.3f} ({ev['eval/num_prompts']} prompts)")

    def save(step: int) -> None:
        states = [rng_state()]
        if dist.is_initialized():
            states = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(states, rng_state())
        if rank == 0:
            result.checkpoint = save_checkpoint(
                out_dir / "checkpoints",
                step,
                model,
                tokenizer,
                optimizer,
                config,
                loss_config,
                states,
                extra={"init_model": str(Path(init_path).resolve()), "world_size": world},
            )
        if dist.is_initialized():
            dist.barrier()

    stop = _StopFlag()
    try:
        with stop:
            if start_step == 0:
                run_eval(0)
            for step in range(start_step + 1, config.steps + 1):
                t0 = time.perf_counter()
                _seed_everything(config.seed, step, rank)

                # ---------------------------------------------------------------- rollout
                # the same prompt draw on every process; each takes its contiguous slice (whole groups)
                order = random.Random(config.seed * 1_000_003 + step).sample(
                    range(len(train_examples)), min(config.prompts_per_step, len(train_examples))
                )
                order = (order * config.prompts_per_step)[: config.prompts_per_step]  # tiny datasets: repeat
                mine = order[rank * prompts_local : (rank + 1) * prompts_local]
                examples = [train_examples[i] for i in mine]
                batch: Rollout = generate(
                    model,
                    tokenizer,
                    prompt_texts([e[config.prompt_field] for e in examples], tokenizer),
                    G,
                    max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    chat=chat,
                )  # B = prompts_local * G rows, prompt i's completions in rows i*G .. i*G+G-1

                # ---------------------------------------------------------------- reward
                rep_examples = [e for e in examples for _ in range(G)]
                rep_index = [i for i in mine for _ in range(G)]
                totals, firsts = rewards(batch.texts, rep_examples, rep_index)
                reward = torch.tensor(totals, dtype=torch.float32, device=device)  # (B,)

                # ---------------------------------------------------------------- advantages
                # Dr. GRPO: A_i = r_i - mean_group(r), no std division (config.advantage_std = "none")
                adv = global_group_advantages(reward, G, loss_config)  # (B,)

                # ---------------------------------------------------------------- loss
                B = len(totals)
                micro = [slice(i, min(i + config.micro_batch_size, B)) for i in range(0, B, config.micro_batch_size)]
                # ONE normaliser for the step: global token and sequence counts, all micro-batches, all processes.
                # Peer presets defined per micro-batch (trl.grpo, trl.bnpo, ...) keep their definition: no normaliser.
                normalizer = (
                    None
                    if loss_config.per_call_normalization
                    else StepNormalizer.from_masks([batch.completion_mask[s] for s in micro], loss_config)
                )
                with torch.no_grad():
                    # pi_old: the sampling policy. With one epoch it equals the current policy (ratio 1).
                    old: list[torch.Tensor | None] = [None] * len(micro)
                    ref: list[torch.Tensor | None] = [None] * len(micro)
                    if config.ppo_epochs > 1:
                        old = [token_logp(model, batch.rows(s), config.temperature) for s in micro]
                    if ref_model is not None:  # pi_ref: the initial policy (for beta * KL, or only to log KL)
                        ref = [token_logp(ref_model, batch.rows(s), config.temperature) for s in micro]
                loss_sum, grad_norm = 0.0, 0.0
                stats = {"clip_frac_low": 0.0, "clip_frac_high": 0.0, "ratio_mean": 0.0, "kl_mean": 0.0}
                for _epoch in range(config.ppo_epochs):
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum = 0.0
                    stats = dict.fromkeys(stats, 0.0)
                    for k, s in enumerate(micro):
                        mb = batch.rows(s)
                        sync = k == len(micro) - 1 or world == 1  # DDP all-reduces gradients once per step
                        with contextlib.nullcontext() if sync else policy.no_sync():
                            if config.fused:
                                out = _fused_loss(
                                    fused_policy_loss,
                                    policy,
                                    model,
                                    mb,
                                    old[k],
                                    adv[s],
                                    loss_config,
                                    ref[k],
                                    normalizer,
                                    config.temperature,
                                )
                            else:
                                logp = token_logp(policy, mb, config.temperature)  # (b, T)
                                out = policy_loss(
                                    logp,
                                    old[k],
                                    adv[s],
                                    mb.completion_mask,
                                    loss_config,
                                    ref_logp=ref[k],
                                    normalizer=normalizer,
                                )
                            out.loss.backward()
                        loss_sum += out.loss.item()
                        n_tok = float(out.metrics["num_tokens"])
                        for key in stats:
                            stats[key] += float(out.metrics[key]) * n_tok

                    # ------------------------------------------------------------ step
                    opt_step = (step - 1) * config.ppo_epochs + _epoch + 1
                    lr = config.lr * min(1.0, opt_step / config.warmup_steps) if config.warmup_steps else config.lr
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    clip = config.grad_clip if config.grad_clip > 0 else math.inf
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
                    optimizer.step()

                # ---------------------------------------------------------------- log
                # rollout metrics over the whole batch; loss, KL, ratio and clip fractions of the last epoch
                lengths = batch.lengths.tolist()
                correct = [r >= 0.5 for r in firsts]
                groups = reward.view(-1, G)
                flat = float((groups.max(-1).values == groups.min(-1).values).sum())  # groups with no signal
                sums = sum_across_processes(
                    [
                        sum(totals),
                        sum(t * t for t in totals),
                        sum(firsts),
                        float(B),
                        flat,
                        float(batch.truncated.sum()),
                        loss_sum,
                        *(stats.values()),
                        *length_stats(lengths, correct),
                    ],
                    device,
                )
                r_sum, r_sq, f_sum, n, flat, cut, l_sum, clo, chi, rat, kl, len_sum, len_n, lc, nc, li, ni = sums
                dt = time.perf_counter() - t0
                m = {
                    "step": step,
                    "reward": r_sum / n,
                    "reward_std": math.sqrt(max(r_sq / n - (r_sum / n) ** 2, 0.0)),
                    "accuracy": f_sum / n,
                    "frac_groups_no_signal": flat / (n / G),
                    "loss": l_sum / world,
                    "length": len_sum / len_n,
                    "length_correct": mean_or_none(lc, nc),
                    "length_incorrect": mean_or_none(li, ni),
                    "frac_truncated": cut / n,
                    "kl": kl / len_sum if ref_model is not None else None,
                    "clip_frac_low": clo / len_sum,
                    "clip_frac_high": chi / len_sum,
                    "ratio_mean": rat / len_sum,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "tokens_per_s": len_sum / dt,
                    "step_time": dt,
                    "time": time.perf_counter() - t_start,
                }
                log(m)
                result.step, result.last_metrics = step, m
                if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                    run_eval(step)
                progress.update(m, result.evals[-1]["eval/accuracy"] if result.evals else None)

                # ---------------------------------------------------------------- checkpoint
                stopping = stop.set
                if dist.is_initialized():  # every process must agree to stop at the same step
                    flag = torch.tensor([float(stopping)])
                    dist.all_reduce(flag)
                    stopping = bool(flag.item())
                every = config.checkpoint_every and step % config.checkpoint_every == 0
                if every or step == config.steps or stopping:
                    save(step)
                if stopping:
                    result.interrupted = True
                    progress.print(f"stopped by signal at step {step}; checkpoint {result.checkpoint}")
                    break
    finally:
        progress.close()
        if log_file is not None:
            log_file.close()
        if writer is not None:
            writer.close()
        if owns_group and dist.is_initialized():
            # DDP's reducer holds the group and sits in reference cycles: free it now, not at interpreter exit,
            # where gloo's threads releasing tensors can abort a finished run
            del policy
            gc.collect()
            dist.destroy_process_group()
    result.seconds = time.perf_counter() - t_start
    return result


def _fused_loss(
    fused_fn: Any,
    policy: Any,
    model: Any,
    mb: Rollout,
    old_logp: Any,
    adv: torch.Tensor,
    loss_config: Any,
    ref_logp: Any,
    normalizer: StepNormalizer | None,
    temperature: float,
) -> Any:
    """The policy loss from the last hidden states and the output layer, never holding (b, T, V) logits."""
    hidden = completion_hidden(policy, mb)  # (b, T, H), through DDP's forward
    head = model.get_output_embeddings()  # (V, H) weight (tied to the embedding in many models)
    return fused_fn(
        hidden,
        head.weight,
        mb.completion_ids,
        mb.completion_mask,
        adv,
        loss_config,
        old_logp=old_logp,
        ref_logp=ref_logp,
        bias=getattr(head, "bias", None),
        temperature=temperature,
        normalizer=normalizer,
    )
