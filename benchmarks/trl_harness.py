"""Runs TRL's ``GRPOTrainer`` / ``DrGRPOTrainer`` for real on the tiny model, and the independent oracle.

Shared by the TRL tests (``tests/integrations/``, which find it through pyproject.toml's pytest ``pythonpath``) and
``benchmarks/trl_split.py``, so the benchmark runs on its own from a clone.

What a run records (``Recorder``, a mixin placed in front of the trainer class):

- every generation batch as TRL produced it, before its rows are shuffled: the raw examples (one per
  row, groups of G contiguous) and ``prompt_ids``, ``completion_ids``, ``completion_mask``;
- every training micro-batch ``compute_loss`` received and the loss it returned;
- the gradient and the weights of every optimizer step, read just before the optimizer steps
  (``BeforeEachStep``, a callback: the Trainer has accumulated every micro-batch's backward and DDP has
  averaged them, and the weights are those the step's forward passes used).

The oracle (:func:`whole_batch_gradient`) uses none of TRL: it decodes the completions itself, scores
them with the same reward function, computes advantages with :func:`drgrpo.group_advantages` per
generation batch (groups of G), runs the tiny model once over every row of the optimizer step (plain
logits and ``log_softmax``) and takes the gradient of :func:`drgrpo.policy_loss` of the whole batch (its
own counts, no normaliser).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: TRL's telemetry ping and hub lookups stay off
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig

from drgrpo import LossConfig, group_advantages, policy_loss
from drgrpo.entropy import entropy_threshold
from drgrpo.normalizer import StepNormalizer
from drgrpo.train.loop.task import TaskConfig, make_splits
from drgrpo.train.loop.tiny import TinyModelConfig, build_model, build_tokenizer

logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

G = 4  # completions per prompt
MAX_NEW = 8  # max_completion_length: L of dr_grpo


def save_tiny_model(path: Path, seed: int = 0, vocab_extra: int = 0, hidden: int = 64, tied: bool = True) -> Path:
    """The project's tiny Llama and tokenizer, saved as a local model directory.

    ``tied=False``: ``lm_head`` gets a weight of its own (a copy of the embedding's), as larger models have.
    """
    tokenizer = build_tokenizer()
    model = build_model(TinyModelConfig(hidden_size=hidden), tokenizer, seed=seed)
    if vocab_extra:
        model.resize_token_embeddings(len(tokenizer) + vocab_extra)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_dataset(n: int = 96) -> Dataset:
    """Addition prompts (unique operand pairs) with their answers."""
    train, _ = make_splits(TaskConfig())
    return Dataset.from_list([{"prompt": e["prompt"], "answer": e["answer"]} for e in train[:n]])


def digit_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A dense reward an untrained model already varies on: the number of digit tokens, minus a third of the rest."""
    out = []
    for text in completions:
        tokens = text.split()
        digits = sum(t.isdigit() for t in tokens)
        out.append(digits - (len(tokens) - digits) / 3)
    return out


def grpo_args(out_dir: Path, k: int, spg: int, *, per_device: int = 4, **overrides: Any) -> GRPOConfig:
    """GRPOConfig for a one-step float32 CPU run: K = k, steps_per_generation = spg, no gradient clipping."""
    fields: dict[str, Any] = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=k,
        steps_per_generation=spg,
        num_generations=G,
        max_completion_length=MAX_NEW,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=False,  # GRPOConfig turns bf16 autocast on by default where the CPU supports it; these tests are float32
    )
    fields.update(overrides)
    return GRPOConfig(**fields)


class BeforeEachStep(TrainerCallback):
    """Copies every parameter's ``.grad`` and value just before each optimizer step (the step's forward weights)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.params: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        module = model.module if hasattr(model, "module") else model
        named = list(module.named_parameters())
        self.grads.append({n: _full(p.grad) if p.grad is not None else torch.zeros_like(_full(p)) for n, p in named})
        self.params.append({n: _full(p) for n, p in named})


# --------------------------------------------------------------------------- a stand-in for vLLM


class StandInVLLM:
    """Stands in for TRL's vLLM generation object (``trl.trainer.grpo_trainer.VLLMGeneration``), on a CPU.

    TRL's contract: ``generate(prompts, images, num_generations, profiler)`` gets one list of prompt token ids per
    row (each prompt repeated ``num_generations`` times) and returns ``(prompt_ids, completion_ids, logprobs,
    logprob_token_ids)``, one completion per row, ``logprobs[i][t] = [log-prob of the sampled token]`` (``None``
    where the sampler could not score it), after temperature. This one samples with the policy itself (the
    trainer's model: ``sync_weights`` has nothing to do), stopping after EOS or ``max_completion_length`` tokens,
    and reports each token's true log-prob plus the known error :meth:`sampling_error` (``None`` at position
    ``unscored_position``), so TRL builds its importance-sampling ratio ``exp(old - sampling)`` exactly as with
    vLLM, and a test knows it: ``exp(-error)`` per token.

    Set it up with :func:`stand_in_vllm`; draws come from its own generator (seeded with ``seed`` plus the process
    index), so two trainers built alike draw the same completions.
    """

    amplitude = 0.3
    unscored_position: int | None = None
    seed = 1234

    def __init__(self, *, model: Any, accelerator: Any, processing_class: Any, **kwargs: Any) -> None:
        for name, neutral in (("top_p", 1.0), ("top_k", 0), ("min_p", None), ("repetition_penalty", 1.0)):
            if kwargs.get(name) not in (neutral, None):
                raise ValueError(f"StandInVLLM samples plainly: {name}={kwargs[name]!r} is not supported")
        self.model, self.accelerator = model, accelerator
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.temperature = float(kwargs["temperature"])
        self.max_completion_length = int(kwargs["max_completion_length"])
        self.generator = torch.Generator().manual_seed(self.seed + accelerator.process_index)
        self.vllm_client = _StandInClient()  # server mode asks it for the log-prob mode
        self.calls = 0

    def sync_weights(self) -> None:
        """Nothing to copy: the sampler is the training model."""

    @classmethod
    def sampling_error(cls, completion_ids: torch.Tensor) -> torch.Tensor:
        """The error added to each sampled token's log-prob ``(B, T)`` float64: a fixed function of the token id and
        its position, in ``[-amplitude, amplitude]``."""
        t = torch.arange(completion_ids.shape[-1], dtype=torch.float64)
        return cls.amplitude * torch.sin(1.7 * completion_ids.to(torch.float64) + 2.3 * t + 0.5)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], images: Any, num_generations: int, profiler: Any = None) -> tuple:
        if images is not None and any(i is not None for i in images):
            raise ValueError("StandInVLLM is text-only")
        self.calls += 1
        model = self.accelerator.unwrap_model(self.model)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        device = next(model.parameters()).device
        done = torch.zeros(len(prompts), dtype=torch.bool)
        tokens, logps = [], []
        for _ in range(self.max_completion_length):
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, -1].cpu()
            log_probs = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            token = torch.multinomial(log_probs.exp(), 1, generator=self.generator).squeeze(-1)
            token = token.masked_fill(done, pad)
            tokens.append(token)
            logps.append(log_probs.gather(-1, token[:, None]).squeeze(-1))
            ids = torch.cat([ids, token[:, None]], dim=1)
            attention = torch.cat([attention, (~done).long()[:, None]], dim=1)
            done = done | (token == eos)
            if bool(done.all()):
                break
        sampled, true_logp = torch.stack(tokens, dim=1), torch.stack(logps, dim=1).double()  # (B, T)
        reported = true_logp + self.sampling_error(sampled)
        completion_ids, logprobs, logprob_ids = [], [], []
        for i in range(len(prompts)):
            row = sampled[i].tolist()
            n = row.index(eos) + 1 if eos in row else len(row)  # vLLM returns the EOS it stopped at
            completion_ids.append(row[:n])
            values = [float(v) for v in reported[i, :n]]
            if self.unscored_position is not None and self.unscored_position < n:
                values[self.unscored_position] = None  # type: ignore[call-overload]
            logprobs.append([[v] for v in values])
            logprob_ids.append([[tok] for tok in row[:n]])
        return [list(p) for p in prompts], completion_ids, logprobs, logprob_ids


class _StandInClient:
    def get_server_info(self) -> dict[str, Any]:
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}


@contextmanager
def stand_in_vllm(amplitude: float = 0.3, unscored_position: int | None = None) -> Iterator[type[StandInVLLM]]:
    """Within the block, TRL trainers built with ``use_vllm=True`` generate with a :class:`StandInVLLM` whose
    log-prob error has this ``amplitude`` (and ``None`` at ``unscored_position``); yields the class used."""
    import trl.trainer.grpo_trainer as grpo_module

    stand_in = type("StandIn", (StandInVLLM,), {"amplitude": amplitude, "unscored_position": unscored_position})
    original = grpo_module.VLLMGeneration
    grpo_module.VLLMGeneration = stand_in  # type: ignore[misc]
    try:
        yield stand_in
    finally:
        grpo_module.VLLMGeneration = original  # type: ignore[misc]


def _full(x: torch.Tensor) -> torch.Tensor:
    """A detached copy; an FSDP2 ``DTensor`` (one shard per process) is gathered whole (a collective)."""
    from torch.distributed.tensor import DTensor

    x = x.detach()
    return x.full_tensor() if isinstance(x, DTensor) else x.clone()


VLLM_KEYS = ("old_per_token_logps", "sampling_per_token_logps", "importance_sampling_ratio")
"""What TRL adds to a generation batch generated with vLLM (recorded when present)."""


class Recorder:
    """Mixin recording generation batches (unshuffled) and training micro-batches with their losses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.generations: list[tuple[list[dict], dict[str, torch.Tensor]]] = []
        self.micro: list[dict[str, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs: Any) -> Any:
        out = super()._generate_and_score_completions(inputs)  # type: ignore[misc]
        keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", *VLLM_KEYS)
        tensors = {k: out[k].detach().clone() for k in keep if out.get(k) is not None}
        self.generations.append(([dict(x) for x in inputs], tensors))
        return out

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        if model.training:
            keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", *VLLM_KEYS)
            self.micro.append({k: inputs[k].detach().clone() for k in keep if inputs.get(k) is not None})
            self.losses.append(loss.detach().clone())
        return loss


def run(trainer_cls: type, model_dir: Path, args: GRPOConfig, **kwargs: Any) -> Any:
    """Build ``Recorder + trainer_cls``, train (``args.max_steps`` steps) and return the trainer."""
    recording = type(f"Recording{trainer_cls.__name__}", (Recorder, trainer_cls), {})
    steps = BeforeEachStep()
    trainer = recording(
        model=kwargs.pop("model", None) or str(model_dir),
        reward_funcs=kwargs.pop("reward_funcs", digit_reward),
        args=args,
        train_dataset=kwargs.pop("dataset", None) or train_dataset(),
        processing_class=build_tokenizer(),
        callbacks=[steps],
        **kwargs,
    )
    trainer.train()
    trainer.step_grads, trainer.step_params = steps.grads, steps.params
    trainer.first_step_grads = steps.grads[0]
    return trainer


# --------------------------------------------------------------------------- the oracle


@dataclass
class Rollout:
    """The rows of one optimizer step, as the oracle sees them."""

    prompt_ids: torch.Tensor  # (N, P) no padding: every addition prompt has the same length
    completion_ids: torch.Tensor  # (N, T) right-padded
    mask: torch.Tensor  # (N, T) 1 on real completion tokens
    advantages: torch.Tensor  # (N,) from group_advantages of the test's own rewards
    sampling_logp: torch.Tensor | None = None  # (N, T) the sampler's log-probs (vLLM's), as TRL received them


def _key(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple:
    return tuple(prompt_ids[prompt_mask.bool()].tolist()), tuple(ids[mask.bool()].tolist())


def step_rollout(
    generations: list[tuple[list[dict], dict[str, torch.Tensor]]],
    micro: list[dict[str, torch.Tensor]],
    config: LossConfig,
    tokenizer: Any,
) -> Rollout:
    """The rows of the micro-batches ``micro`` (one optimizer step), with the oracle's advantages.

    Each micro-batch row is found in the (unshuffled) generation batches by its content; identical rows of one
    group are interchangeable (same reward, same advantage), and a prompt appearing in two groups is refused.
    """
    table: dict[tuple, list[float]] = {}
    for examples, out in generations:
        texts = [
            tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
            for ids, m in zip(out["completion_ids"], out["completion_mask"])
        ]
        rewards = torch.tensor(digit_reward(texts), dtype=torch.float32)
        advantages = group_advantages(rewards, G, config)
        prompts = [e["prompt"] for e in examples]
        assert len(set(prompts)) == len(prompts) // G, "a prompt in two groups would make rows ambiguous"
        for i in range(len(examples)):
            key = _key(out["prompt_ids"][i], out["prompt_mask"][i], out["completion_ids"][i], out["completion_mask"][i])
            table.setdefault(key, []).append(float(advantages[i]))
    prompt_rows, completion_rows, advantages, sampling_rows = [], [], [], []
    for mb in micro:
        for i in range(mb["completion_ids"].shape[0]):
            key = _key(mb["prompt_ids"][i], mb["prompt_mask"][i], mb["completion_ids"][i], mb["completion_mask"][i])
            candidates = table[key]
            assert max(candidates) - min(candidates) <= 1e-6 * (1 + abs(candidates[0])), "ambiguous row"
            prompt_rows.append(torch.tensor(key[0]))
            completion_rows.append(torch.tensor(key[1], dtype=torch.long))
            advantages.append(candidates[0])
            if "sampling_per_token_logps" in mb:
                sampling_rows.append(mb["sampling_per_token_logps"][i][mb["completion_mask"][i].bool()])
    width = max(len(c) for c in completion_rows)
    n = len(completion_rows)
    ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, c in enumerate(completion_rows):
        ids[i, : len(c)] = c
        mask[i, : len(c)] = 1
    assert len({len(p) for p in prompt_rows}) == 1
    sampling = None
    if sampling_rows:
        sampling = torch.zeros((n, width), dtype=sampling_rows[0].dtype)
        for i, row in enumerate(sampling_rows):
            sampling[i, : len(row)] = row
    return Rollout(torch.stack(prompt_rows), ids, mask, torch.tensor(advantages, dtype=torch.float32), sampling)


def whole_batch_gradient(
    model_dir: Path,
    rollout: Rollout,
    config: LossConfig,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    off_policy: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss, gradient and metrics of ``policy_loss`` over the whole step in one batch.

    The policy has the saved initial weights, or ``weights``; with ``off_policy`` the sampling policy (old
    log-probs) is the initial model, else the ratio is 1. The reference model (``beta > 0``) is the initial model.
    The sampler's log-probs (vLLM's) are the rollout's, as TRL received them. The high-entropy mask and the entropy
    bonus (``config.top_entropy_quantile``, ``entropy_coef``) get the entropies ``-sum_v p log p`` of the plain logits,
    the mask's threshold over the whole step, and the step's counts.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if weights is not None:
        model.load_state_dict(weights, strict=False)
    model.train()
    with torch.no_grad():
        initial_logp = token_logp(initial, rollout)
    logp, entropy = token_logp(model, rollout, with_entropy=True)
    old = initial_logp if off_policy else None
    ref = initial_logp if config.beta > 0 else None
    entropic = config.top_entropy_quantile < 1 or config.entropy_coef != 0
    out = policy_loss(
        logp,
        old,
        rollout.advantages,
        rollout.mask,
        config,
        ref_logp=ref,
        sampling_logp=rollout.sampling_logp,
        entropy=entropy if entropic else None,
        entropy_threshold=entropy_threshold(entropy, rollout.mask, config.top_entropy_quantile) if entropic else None,
        normalizer=StepNormalizer.from_masks([rollout.mask], config) if entropic else None,
    )
    loss = out.loss
    loss.backward()
    grads = {n: q.grad.detach().clone() for n, q in model.named_parameters()}
    return loss.detach(), grads, out.metrics


def token_logp(model: Any, rollout: Rollout, temperature: float = 1.0, with_entropy: bool = False) -> Any:
    """``(N, T)`` log-probs of the completion tokens under ``model``: plain logits, log_softmax, gather; with
    ``with_entropy`` also the ``(N, T)`` entropies ``-sum_v p log p`` of the same distributions."""
    p, t = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention = torch.cat([torch.ones_like(rollout.prompt_ids), rollout.mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, p - 1 : p + t - 1] / temperature
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    logp = log_probs.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp
    return logp, -(log_probs.exp() * log_probs).sum(-1)


def relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """``max |got - want| / max |want|`` over every parameter (tied weights appear once per name)."""
    scale = max(float(w.abs().max()) for w in want.values())
    assert scale > 0
    return max(float((got[n] - want[n]).abs().max()) for n in want) / scale


def merge_ranks(per_rank: list[list[tuple[list[dict], dict[str, torch.Tensor]]]], pad_id: int) -> list[tuple]:
    """The generation batches of P processes as one global batch each (rank 0's rows first, as TRL orders them).

    TRL deals a generation batch's rows to the processes in contiguous slices, so a group may straddle two
    processes; concatenating the slices in rank order restores the global batch with its groups contiguous.
    """
    merged = []
    for parts in zip(*per_rank):
        width = max(out["completion_ids"].shape[1] for _, out in parts)
        examples = [e for ex, _ in parts for e in ex]
        tensors: dict[str, torch.Tensor] = {}
        for key in parts[0][1]:
            pieces = []
            for _, out in parts:
                x = out[key]
                if key in ("completion_ids", "completion_mask") and x.shape[1] < width:
                    fill = pad_id if key == "completion_ids" else 0
                    x = torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), fill)], dim=1)
                pieces.append(x)
            tensors[key] = torch.cat(pieces)
        merged.append((examples, tensors))
    return merged


def preset_config(name: str) -> LossConfig:
    """The loss config DrGRPOTrainer runs for a preset name here: ``L = max_completion_length`` where L is used."""
    if name in ("dr_grpo", "trl.dr_grpo"):
        return LossConfig.preset(name, max_completion_length=MAX_NEW)
    return LossConfig.preset(name)


def whole_batch_of_ranks(
    records: list[dict], config: LossConfig, model_dir: Path, k: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Rollout]:
    """The oracle for the first optimizer step of one job run on several processes (``records[rank]``).

    Returns the whole-batch loss and gradient (:func:`whole_batch_gradient`) over the step's rows from every
    rank (the first ``k`` micro-batches of each), and those rows.
    """
    pad = build_tokenizer().pad_token_id
    generations = merge_ranks([r["generations"] for r in records], pad)
    micro = [mb for r in records for mb in r["micro"][:k]]
    rollout = step_rollout(generations, micro, config, build_tokenizer())
    loss, grads, _ = whole_batch_gradient(model_dir, rollout, config)
    return loss, grads, rollout


# --------------------------------------------------------------------------- several processes

RANK_TIMEOUT_S = 240  # a stuck rank dumps its Python stacks after this long
TIMEOUT_S = 300  # and the parent gives up


def run_ranks(jobs: list[dict[str, Any]], model_dir: Path, world_size: int, out_dir: Path) -> list[list[dict]]:
    """Run ``jobs`` (``run`` arguments) on ``world_size`` gloo processes; returns ``[rank][job]`` records.

    A job is ``{"trainer": "drgrpo" or "stock", "k", "spg", "per_device", "loss_config", "fused", "advantage"}``
    plus any GRPOConfig field; ``"model_dir"`` replaces ``model_dir`` for that job, and ``"fsdp2": plan`` or
    ``"zero3": True`` shard the model (``sharding.py``; such a record also has ``head`` and ``layout``).

    Each rank is a fresh ``python`` interpreter (not a fork of pytest's, whose thread pools are running) with
    one thread, the loopback interface and a file rendezvous (no port to pick); it initialises the process
    group itself with a timeout, then accelerate adopts it (``MULTI_CPU``). A stuck rank dumps its stacks,
    and a failure carries every failed rank's log.
    """
    import json

    from gloo_ranks import launch

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "jobs.json").write_text(json.dumps(jobs))
    launch("trl_harness", "_rank_main", world_size, out_dir, [str(model_dir)], TIMEOUT_S)
    return [[torch.load(out_dir / f"rank{r}_job{j}.pt") for j in range(len(jobs))] for r in range(world_size)]


def run_rank_groups(
    groups: dict[str, list[dict[str, Any]]], model_dir: Path, world_size: int, out_dir: Path
) -> dict[str, list[list[dict]]]:
    """Every group's jobs in one :func:`run_ranks` launch (a launch costs ``world_size`` interpreter starts);
    returns, per group, its ``[rank][job]`` records."""
    ranks = run_ranks([job for group in groups.values() for job in group], model_dir, world_size, out_dir)
    records, start = {}, 0
    for name, group in groups.items():
        records[name] = [r[start : start + len(group)] for r in ranks]
        start += len(group)
    return records


def _rank_main(argv: list[str]) -> None:
    """One rank: ``rank world_size rendezvous_file out_dir model_dir``; runs every job of ``out_dir/jobs.json``.

    Leaves through ``os._exit`` once its results are saved (gloo's threads can abort a finished interpreter
    at exit).
    """
    import faulthandler
    import gc
    import json
    from datetime import timedelta

    import torch.distributed as dist
    from trl import GRPOTrainer

    import sharding
    from drgrpo.integrations.trl import DrGRPOTrainer
    from gloo_ranks import leave

    rank, world_size, rendezvous, out_dir, model_dir = int(argv[0]), int(argv[1]), argv[2], Path(argv[3]), argv[4]
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()  # each job's Trainer.train() starts with a full collection: it skips what the imports made
    faulthandler.enable()
    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.update(LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=RANK_TIMEOUT_S // 2),
    )
    try:
        for j, job in enumerate(json.loads((out_dir / "jobs.json").read_text())):
            job = dict(job)
            cls = DrGRPOTrainer if job.pop("trainer") == "drgrpo" else GRPOTrainer
            k, spg, per_device = job.pop("k"), job.pop("spg"), job.pop("per_device")
            kwargs = (
                {
                    "loss_config": job.pop("loss_config"),
                    "fused": job.pop("fused", False),
                    "advantage": job.pop("advantage", "grpo"),
                }
                if cls is DrGRPOTrainer
                else {}
            )
            job_model = Path(job.pop("model_dir", model_dir))
            sharded = sharding.setup(job, job_model, world_size)  # FSDP2 or ZeRO-3: see sharding.py
            if sharded is not None:
                job.update(sharded.args)
                kwargs["model"] = sharded.model
            args = grpo_args(out_dir / f"run{j}", k, spg, per_device=per_device, **job)
            trainer = run(cls, job_model, args, **kwargs)
            assert trainer.accelerator.num_processes == world_size
            record = {
                "grads": sharded.grads if sharded is not None and sharded.grads else trainer.step_grads,
                "generations": trainer.generations,
                "micro": trainer.micro,
                "losses": trainer.losses,
            }
            if sharded is not None:
                record.update(head=sharded.head, layout=sharding.layout(trainer.model))
            torch.save(record, out_dir / f"rank{rank}_job{j}.pt")
        dist.barrier()  # both ranks saved everything
    finally:
        dist.destroy_process_group()
    leave()
