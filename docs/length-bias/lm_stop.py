"""Does the language model's stop decision see its own mistake? Measured on a ``drgrpo compare`` output.

    python docs/length-bias/lm_stop.py RUNS_DIR --out-dir OUT [--prompts 200] [--samples 8] [--name attempt6]

For the warm start and every checkpoint of every run under RUNS_DIR (``runs/<loss>/seed<k>/checkpoints``), on
the held-out prompts, put an answer in the prefix and read off the model's own probability of ending (EOS) at
each later position, teacher-forcing working tokens ``.`` in between. That gives, without sampling noise, the
expected number of working tokens W after that answer (``a`` answer tokens, budget ``T``)::

    h_j  = P(EOS | prompt, answer, j working tokens) / (P(EOS) + P("."))
    W    = sum_{j < T-a} (prod_{i<j} (1 - h_i)) h_j j  +  (prod_{i<T-a} (1 - h_i)) (T - a)     (last term: cut off)

Working tokens rather than the length, so that one- and two-digit answers compare. The answers:

- *forced*, the same for every checkpoint: on every prompt the right answer, the right answer with a random
  other last digit ("wrong digit"), and the right answer with the symbol ``-`` as its last digit ("symbol");
- *sampled*: ``--samples`` answers per prompt drawn at temperature 1 from the checkpoint itself, split into
  right and wrong: the answers RL actually trains on.

W after a wrong answer minus W after a right one is the language model's counterpart of the controlled policy's
two stop logits. Also a linear probe (logistic regression on the hidden state at the answer's last token, where
the first stop decision is made; sampled right vs wrong-digit answers to train-split prompts, trained on the
first half, tested on the second): can a wrong digit be read there at all?

Writes NAME-stop.png and NAME-stop.md into OUT (created; the shipped reports are in docs/length-bias/).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drgrpo.train.loop.rollout import generate
from drgrpo.train.loop.task import NOISE_SYMBOL, TaskConfig, corrupt_last_digit, make_splits

KINDS = ("right", "wrong digit", "symbol")


def kind_of(tokens: tuple[str, ...], answer: str) -> str:
    if "".join(tokens) == answer:
        return "right"
    return "symbol" if NOISE_SYMBOL in tokens else "wrong digit"


def forced_answers(examples, symbol: bool, seed: int = 0):
    """(example, answer tokens) for the forced kinds on every prompt (the symbol only if the model was trained on
    it: ``noise_kind="symbol"``), the wrong digit drawn with ``seed``."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        answers = [ex["answer"], corrupt_last_digit(ex["answer"], rng)]
        if symbol:
            answers.append(corrupt_last_digit(ex["answer"], rng, "symbol"))
        out += [(ex, tuple(answer)) for answer in answers]
    return out


def sampled_answers(model, tok, examples, samples: int, budget: int, seed: int, max_answer: int):
    """Sample completions at temperature 1; keep (example, answer tokens) where the answer is the leading run of
    digits or symbols (1..max_answer tokens) before the first working token or the end."""
    torch.manual_seed(seed)
    batch = generate(model, tok, [e["prompt"] for e in examples], samples, max_new_tokens=budget, temperature=1.0)
    out = []
    for k, text in enumerate(batch.texts):
        tokens = text.split()
        head = tuple(tokens[: tokens.index(".")] if "." in tokens else tokens)
        if 1 <= len(head) <= max_answer and all(t.isdigit() or t == NOISE_SYMBOL for t in head):
            out.append((examples[k // samples], head))
    return out


@torch.no_grad()
def stop_profile(model, tok, pairs, budget: int):
    """Per (example, answer tokens): (kind, expected working tokens W, hidden state at the answer's last token)."""
    eos, dot = tok.eos_token_id, tok.convert_tokens_to_ids(".")
    rows, starts = [], []
    for ex, answer in pairs:
        prompt = tok(ex["prompt"], add_special_tokens=False)["input_ids"]
        tokens = tok(" ".join(answer), add_special_tokens=False)["input_ids"]
        rows.append(prompt + tokens + [dot] * (budget - len(tokens) - 1))
        starts.append(len(prompt) + len(tokens) - 1)  # logits here: the first token after the answer
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], attn[i, : len(r)] = torch.tensor(r), 1
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    probs = out.logits.float().softmax(-1)
    last = out.hidden_states[-1]  # after the final norm: what the output layer (the stop decision) reads
    result = []
    for i, (ex, answer) in enumerate(pairs):
        a = len(answer)
        survive, work = 1.0, 0.0
        for j in range(budget - a):
            pe, pd = probs[i, starts[i] + j, eos].item(), probs[i, starts[i] + j, dot].item()
            h = pe / (pe + pd)
            work += survive * h * j  # stop after j working tokens
            survive *= 1 - h
        work += survive * (budget - a)  # cut off: every position after the answer is a working token
        result.append((kind_of(answer, ex["answer"]), work, last[i, starts[i]].clone()))
    return result


def mean_work(profile, kind: str) -> tuple[float, int]:
    values = [w for k, w, _ in profile if k == kind]
    return (statistics.fmean(values) if values else math.nan), len(values)


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, split: int) -> float:
    """Balanced test accuracy of an L2-regularised logistic regression trained on the first ``split`` rows."""
    x = features.double()
    mu, sd = x[:split].mean(0), x[:split].std(0) + 1e-6
    x = (x - mu) / sd
    y = labels.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    pos = y[:split].mean()
    weight = torch.where(y[:split] > 0, 0.5 / pos, 0.5 / (1 - pos))  # balanced classes

    def closure():
        opt.zero_grad()
        logits = x[:split] @ w + b
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[:split], reduction="none")
        loss = (weight * bce).mean() + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (x[split:] @ w + b) > 0
    truth = y[split:] > 0
    return 0.5 * ((pred & truth).sum() / truth.sum() + (~pred & ~truth).sum() / (~truth).sum()).item()


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def measure(path: Path, examples, forced, args, budget: int, max_answer: int) -> dict[str, float]:
    model, tok = load(path)
    row: dict[str, float] = {}
    prof = stop_profile(model, tok, forced, budget)
    for kind in KINDS:
        row[f"forced {kind}"] = mean_work(prof, kind)[0]
    pairs = sampled_answers(model, tok, examples, args.samples, budget, 0, max_answer)
    sampled = stop_profile(model, tok, pairs, budget)
    for kind in ("right", "wrong digit", "symbol"):
        row[f"sampled {kind}"], row[f"n {kind}"] = mean_work(sampled, kind)
        tokens = [len(answer) for (ex, answer) in pairs if kind_of(answer, ex["answer"]) == kind]
        row[f"answer tokens {kind}"] = statistics.fmean(tokens) if tokens else math.nan
    return row


def probe(path: Path, train_split, budget: int, max_answer: int) -> tuple[float, int, int]:
    """Linear probe right vs wrong digit on sampled answers to train-split prompts."""
    model, tok = load(path)
    pairs = sampled_answers(model, tok, train_split[:1000], 4, budget, 1, max_answer)
    prof = [p for p in stop_profile(model, tok, pairs, budget) if p[0] != "symbol"]
    labels = torch.tensor([k == "right" for k, _, _ in prof])
    split = len(prof) // 2  # answers come in prompt order: the halves share at most one prompt
    acc = probe_accuracy(torch.stack([h for _, _, h in prof]), labels, split)
    return acc, int(labels.sum()), int((~labels).sum())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts per checkpoint")
    parser.add_argument("--samples", type=int, default=8, help="sampled answers per prompt")
    parser.add_argument("--out-dir", type=Path, required=True, help="directory for NAME-stop.md and NAME-stop.png")
    parser.add_argument("--name", default="attempt6")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec = json.loads((args.runs_dir / "warm_start" / "warm_start.json").read_text())["spec"]
    task = TaskConfig(**spec["task"])
    train_split, held_out = make_splits(task)
    state = json.loads(next((args.runs_dir / "runs").glob("*/seed0/checkpoints/step_*/trainer_state.json")).read_text())
    budget = int(state["train_config"]["max_new_tokens"])
    max_answer = task.max_answer_tokens
    examples = held_out[: args.prompts]
    forced = forced_answers(examples, symbol=task.noise_kind == "symbol" and task.answer_noise > 0)

    warm = measure(args.runs_dir / "warm_start", examples, forced, args, budget, max_answer)
    table: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for loss_dir in sorted((args.runs_dir / "runs").iterdir()):
        for seed_dir in sorted(loss_dir.iterdir()):
            rows = {0: warm}
            for ckpt in sorted((seed_dir / "checkpoints").glob("step_*")):
                rows[int(ckpt.name.split("_")[1])] = measure(ckpt, examples, forced, args, budget, max_answer)
            table[(loss_dir.name, seed_dir.name)] = rows
            print(loss_dir.name, seed_dir.name, flush=True)
    probes = {"warm start": probe(args.runs_dir / "warm_start", train_split, budget, max_answer)}
    for loss, seed in table:
        last = sorted((args.runs_dir / "runs" / loss / seed / "checkpoints").glob("step_*"))[-1]
        probes[f"{loss} {seed} {last.name}"] = probe(last, train_split, budget, max_answer)

    # ---- figure: W after a forced right answer (top) and the wrong-minus-right gaps (bottom), every seed
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted({loss for loss, _ in table})
    fig, axes = plt.subplots(2, len(losses), figsize=(5.5 * len(losses), 5.6), sharey="row", sharex=True, squeeze=False)
    gaps_drawn = (
        ("forced wrong digit", "forced right", "tab:red", "forced wrong digit - right"),
        ("forced symbol", "forced right", "tab:purple", "forced symbol - right"),
        ("sampled wrong digit", "sampled right", "tab:orange", "sampled wrong - right"),
    )
    for col, loss in enumerate(losses):
        seeds = [key for key in table if key[0] == loss]
        for k, key in enumerate(seeds):
            steps = sorted(table[key])
            axes[0][col].plot(
                steps, [table[key][s]["forced right"] for s in steps], color="tab:blue", marker=".", lw=0.8
            )
            for a, b, color, label in gaps_drawn:
                if all(math.isnan(table[key][s][a]) for s in steps):
                    continue  # no symbol answers: a digit-noise model never saw the symbol
                axes[1][col].plot(
                    steps,
                    [table[key][s][a] - table[key][s][b] for s in steps],
                    color=color,
                    marker=".",
                    lw=0.8,
                    label=label if k == 0 else None,
                )
        axes[0][col].set_title(f"{loss}: W after a right answer ({len(seeds)} seeds)", fontsize=9)
        axes[1][col].set_title(f"{loss}: W after a wrong answer minus W after a right one", fontsize=9)
        axes[1][col].axhline(0.0, color="black", lw=0.6)
        axes[1][col].set_xlabel("RL step")
        for row in axes:
            row[col].grid(alpha=0.3)
    axes[0][0].set_ylabel("expected working tokens W")
    axes[1][0].set_ylabel("gap in W (tokens)")
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out_dir / f"{args.name}-stop.png", dpi=80)
    plt.close(fig)

    # ---- tables
    def cell(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.2f}"

    lines = [
        f"# {args.name}: expected working tokens after a right and after a wrong answer",
        "",
        f"Generated by `python docs/length-bias/lm_stop.py {args.runs_dir} --prompts {args.prompts} "
        f"--samples {args.samples} --name {args.name} --out-dir OUT`. Budget {budget}. "
        f"Forced: the same {args.prompts} held-out "
        f"prompts with each kind of answer; sampled: {args.samples} answers per prompt at temperature 1.",
        "",
        "## Per loss and step: mean over seeds (min..max of the wrong-minus-right gaps over seeds)",
        "",
        "| loss | step | forced: W right | W wrong digit | W symbol | gap digit | gap symbol "
        "| sampled: W right | W wrong digit (n) | gap | answer tokens right / wrong digit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for loss in losses:
        keys = [key for key in table if key[0] == loss]
        for step in sorted(table[keys[0]]):
            rows = [table[key][step] for key in keys]

            def avg(name: str, rows=rows) -> float:
                values = [r[name] for r in rows if not math.isnan(r[name])]
                return statistics.fmean(values) if values else math.nan

            def gaps(a: str, b: str, rows=rows) -> str:
                values = [r[a] - r[b] for r in rows if not math.isnan(r[a] - r[b])]
                if not values:
                    return "n/a"
                return f"{statistics.fmean(values):+.2f} ({min(values):+.2f}..{max(values):+.2f})"

            lines.append(
                f"| {loss} | {step} | {cell(avg('forced right'))} | {cell(avg('forced wrong digit'))} "
                f"| {cell(avg('forced symbol'))} | {gaps('forced wrong digit', 'forced right')} "
                f"| {gaps('forced symbol', 'forced right')} | {cell(avg('sampled right'))} "
                f"| {cell(avg('sampled wrong digit'))} ({avg('n wrong digit'):.0f}) "
                f"| {gaps('sampled wrong digit', 'sampled right')} "
                f"| {cell(avg('answer tokens right'))} / {cell(avg('answer tokens wrong digit'))} |"
            )
    lines += [
        "",
        "## Per seed at the last checkpoint",
        "",
        "| loss | seed | step | forced: W right | gap digit | gap symbol | sampled gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for (loss, seed), rows in table.items():
        step = max(rows)
        r = rows[step]
        lines.append(
            f"| {loss} | {seed} | {step} | {cell(r['forced right'])} "
            f"| {cell(r['forced wrong digit'] - r['forced right'])} | {cell(r['forced symbol'] - r['forced right'])} "
            f"| {cell(r['sampled wrong digit'] - r['sampled right'])} |"
        )
    lines += [
        "",
        "## Linear probe: right vs wrong digit from the hidden state at the answer's last token",
        "",
        "Balanced test accuracy (chance 0.5); sampled answers to the first 1000 train-split prompts, 4 each.",
        "",
        "| model | probe accuracy | right / wrong-digit samples |",
        "|---|---|---|",
    ]
    for name, (acc, n_right, n_wrong) in probes.items():
        lines.append(f"| {name} | {acc:.3f} | {n_right} / {n_wrong} |")
    lines.append("")
    (args.out_dir / f"{args.name}-stop.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
