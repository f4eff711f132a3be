"""How hard do GRPO and Dr. GRPO pull on a language model's stop-after-a-mistake in one step? (first order)

    python docs/length-bias/lm_pull.py RUNS_DIR --out-dir OUT [--batches 40] [--name attempt7]

At the warm start of a ``drgrpo compare`` output (the initial policy of every run) take

    D(weights) = mean W(after a wrong answer) - mean W(after the right answer)
    S(weights) = mean W(after the right answer)

over the forced prefixes of ``lm_stop.py`` (W: the expected number of working tokens the model writes after that
answer, differentiable in the weights; the wrong answer is the symbol ``-`` for a ``noise_kind="symbol"`` task,
else a random wrong last digit). D is what GRPO's length bias should raise (the controlled policy's stop logits
after a wrong and a right answer pulled apart) and Dr. GRPO should leave alone; S is the stop tendency both share.

For ``--batches`` rollout batches of the trainer's size (64 train-split prompts x G = 8 at temperature 1), the
gradient g of GRPO's and of Dr. GRPO's loss (``policy_loss``, beta = 0) on the same completions, and the first-
order change of D and S in one optimizer step, ``grad D . delta``, with ``delta = -lr g`` (SGD) or
``delta = -lr g / (sqrt(v) + 1e-8)`` (Adam's step once its second moment v has settled: v = mean of g^2 over the
batches). Mean over batches: the pull; std: one step's noise. Writes NAME-pull.md into OUT (created).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drgrpo.advantages import group_advantages
from drgrpo.config import LossConfig
from drgrpo.loss import policy_loss
from drgrpo.train.loop.rollout import generate, token_logp
from drgrpo.train.loop.task import TaskConfig, corrupt_last_digit, exact_match, make_splits

LR = 5e-4  # the trainer's default learning rate, used by every compare run


def expected_work(model, tok, prefixes: list[tuple[str, str]], budget: int) -> torch.Tensor:
    """``(N,)`` expected working tokens after each (prompt, answer) prefix; differentiable in the weights."""
    eos, dot = tok.eos_token_id, tok.convert_tokens_to_ids(".")
    rows, starts, lengths = [], [], []
    for prompt, answer in prefixes:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(" ".join(answer), add_special_tokens=False)["input_ids"]
        rows.append(p + a + [dot] * (budget - len(a) - 1))
        starts.append(len(p) + len(a) - 1)
        lengths.append(len(a))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], attn[i, : len(r)] = torch.tensor(r), 1
    probs = model(input_ids=ids, attention_mask=attn).logits.float().softmax(-1)
    out = []
    for i, a in enumerate(lengths):
        span = probs[i, starts[i] : starts[i] + budget - a]  # (budget - a, V)
        h = span[:, eos] / (span[:, eos] + span[:, dot])  # hazard of stopping after j working tokens
        survive = torch.cat([h.new_ones(1), torch.cumprod(1 - h, 0)])  # (budget - a + 1,)
        j = torch.arange(budget - a, dtype=h.dtype)
        out.append((survive[:-1] * h * j).sum() + survive[-1] * (budget - a))
    return torch.stack(out)


def flat_grad(value: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)  # graphs are shared
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts in D and S")
    parser.add_argument("--out-dir", type=Path, required=True, help="directory for NAME-pull.md")
    parser.add_argument("--name", default="attempt7")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    spec = json.loads((args.runs_dir / "warm_start" / "warm_start.json").read_text())["spec"]
    task = TaskConfig(**spec["task"])
    state = json.loads(next((args.runs_dir / "runs").glob("*/seed0/checkpoints/step_*/trainer_state.json")).read_text())
    train_cfg = state["train_config"]
    budget, group, prompts_per_step = (
        train_cfg["max_new_tokens"],
        train_cfg["group_size"],
        train_cfg["prompts_per_step"],
    )
    train_split, held_out = make_splits(task)
    model = AutoModelForCausalLM.from_pretrained(args.runs_dir / "warm_start")
    tok = AutoTokenizer.from_pretrained(args.runs_dir / "warm_start")
    model.eval()  # no dropout in the tiny model; eval only to be explicit
    params = [p for p in model.parameters() if p.requires_grad]

    # ---- D and S and their gradients at the warm start
    rng = random.Random(0)
    kind = "symbol" if task.noise_kind == "symbol" else "digit"
    examples = held_out[: args.prompts]
    right = expected_work(model, tok, [(e["prompt"], e["answer"]) for e in examples], budget)
    wrong = expected_work(
        model, tok, [(e["prompt"], corrupt_last_digit(e["answer"], rng, kind)) for e in examples], budget
    )
    d_value, s_value = (wrong.mean() - right.mean()).item(), right.mean().item()
    grad_s = flat_grad(right.mean(), params)
    grad_w = flat_grad(wrong.mean(), params)
    grad_d = grad_w - grad_s

    # ---- loss gradients on the same rollout batches
    configs = {
        "grpo": LossConfig.preset("grpo", beta=0.0),
        "dr_grpo": LossConfig.preset("dr_grpo", max_completion_length=budget),
    }
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in configs}
    sampler = random.Random(1)
    torch.manual_seed(1)
    for _ in range(args.batches):
        batch_examples = sampler.sample(train_split, prompts_per_step)
        batch = generate(
            model, tok, [e["prompt"] for e in batch_examples], group, max_new_tokens=budget, temperature=1.0
        )
        rewards = torch.tensor(
            [exact_match(t, batch_examples[k // group]) for k, t in enumerate(batch.texts)], dtype=torch.float32
        )
        logp = token_logp(model, batch)
        for name, config in configs.items():
            advantages = group_advantages(rewards, group, config)
            loss = policy_loss(logp, None, advantages, batch.completion_mask, config).loss
            grads[name].append(flat_grad(loss, params))

    # ---- first-order change of D and S per step
    lines = [
        f"# {args.name}: one optimizer step's first-order pull on the stop after a mistake (at the warm start)",
        "",
        f"Generated by `python docs/length-bias/lm_pull.py {args.runs_dir} --batches {args.batches} "
        f"--prompts {args.prompts} --name {args.name} --out-dir OUT` in {time.time() - started:.0f} s.",
        f"At the warm start: D = W(after a wrong answer: {kind}) - W(after the right answer) = {d_value:+.4f} tokens,",
        f"S = W(after the right answer) = {s_value:.3f} tokens ({args.prompts} held-out prompts, budget {budget}).",
        f"{args.batches} rollout batches of {prompts_per_step} x G = {group}; lr = {LR}. Per step: mean and std over",
        "batches of the first-order change; 'mean / std' is the pull in units of one step's noise.",
        "",
        "| loss | optimizer | dD per step: mean | std | mean / std | dS per step: mean | std |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, gs in grads.items():
        stacked = torch.stack(gs)  # (batches, P)
        v = (stacked**2).mean(0)
        for optimizer, steps in (("SGD", -LR * stacked), ("Adam", -LR * stacked / (v.sqrt() + 1e-8))):
            dd, ds = (steps @ grad_d).tolist(), (steps @ grad_s).tolist()
            mean_d, std_d = statistics.fmean(dd), statistics.stdev(dd)
            ratio = f"{mean_d / std_d:+.2f}" if std_d else "n/a"  # no spread: every batch's gradient was 0
            lines.append(
                f"| `{name}` | {optimizer} | {mean_d:+.2e} | {std_d:.2e} | {ratio} "
                f"| {statistics.fmean(ds):+.2e} | {statistics.stdev(ds):.2e} |"
            )
    # ---- how separate are the two stop decisions in weight space? cos = 1: one shared decision (blind)
    v_adam = (torch.stack(grads["grpo"]) ** 2).mean(0).sqrt() + 1e-8

    def cos(a: torch.Tensor, b: torch.Tensor, metric: torch.Tensor) -> float:
        a, b, metric = a.double(), b.double(), metric.double()
        return ((a * b / metric).sum() / ((a * a / metric).sum() * (b * b / metric).sum()).sqrt()).item()

    lines += [
        "",
        "Cosine between the weight gradients of W after the wrong answer and W after the right answer (1: the two",
        "stop decisions move as one, a blind policy; 0: separate parameters, the controlled policy that sees",
        "correctness). A pull of +P on one and -P on the other changes their gap by 1 - cos of what separate",
        "parameters of the same gradient norm would give.",
        "",
        f"- plain: 1 - cos = {1 - cos(grad_w, grad_s, torch.ones_like(v_adam)):.1e}",
        f"- in Adam's metric (1 / sqrt(v), v from GRPO's batches): 1 - cos = {1 - cos(grad_w, grad_s, v_adam):.1e}",
        "",
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}-pull.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
