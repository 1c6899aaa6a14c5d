"""benchmarks/RESULTS.md (and its PNGs) from the results JSON files of benchmarks/run.py.

python benchmarks/report.py   # re-render from benchmarks/results/ without re-running anything
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt  # noqa: E402

from peft_ila.app.compare import jaccard, spearman  # noqa: E402
from peft_ila.app.plots import heatmap, overlap_matrix  # noqa: E402
from peft_ila.tuner.selection import layer_of  # noqa: E402

BASELINE = "lora-all"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def random_jaccard(k: int, n: int) -> float:
    """Expected Jaccard overlap of two independent random k-subsets of n (from the expected intersection k^2/n)."""
    shared = k * k / n
    return shared / (2 * k - shared)


def floor_seconds(costs: dict, lowest: int | None, blocks: int) -> float | None:
    """Step-time floor: forward, plus the backward share of the blocks from the lowest adapted one to the top."""
    if lowest is None:
        return None
    backward = costs["forward_backward_s"] - costs["forward_s"]
    return costs["forward_s"] + backward * (blocks - lowest) / blocks


def rows(records: list[dict]) -> list[dict]:
    """One row per method; methods run with several seeds (random 25%) become mean and std."""
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["method"], []).append(record)
    out = []
    for group in grouped.values():
        row = dict(group[0])
        for key in ("loss_after", "median_step_seconds", "ppl_after"):
            row[key], row[key + "_std"] = mean_std([r[key] for r in group])
        row["rss_rise_mb"] = statistics.fmean(r["memory"].get("rss_rise_mb", float("nan")) for r in group)
        row["seeds"] = len(group)
        out.append(row)
    return out


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def dataset_table(name: str, data: dict, records: list[dict], costs: dict, blocks: int) -> list[str]:
    table = rows([r for r in records if r["dataset"] == name])
    base = next(r for r in table if r["family"] == BASELINE)
    lines = [
        f"### {name}: `{data['data']}`",
        "",
        f"{data['train_examples']} training examples, {data['held_out_examples']} held out "
        f"({'from ' + data['eval_data'] if data.get('eval_data') else 'split with seed ' + str(data['split_seed'])}), "
        f"max length {data['max_length']} ({data['truncated']} truncated, {data['dropped']} dropped). "
        f"Held-out loss before fine-tuning: {data['loss_before']:.4f} "
        f"(perplexity {math.exp(data['loss_before']):.2f}).",
        "",
        "| method | layers | trainable params | held-out loss (ppl) | Δ loss vs LoRA-all | step s (× LoRA-all) | "
        "floor s | memory rise MB (× LoRA-all) | identification cost |",
        "|---|---:|---:|---|---:|---|---:|---|---|",
    ]
    for row in table:
        seeds = f" ± {row['loss_after_std']:.4f} ({row['seeds']} seeds)" if row["seeds"] > 1 else ""
        floor = floor_seconds(costs, row["lowest_block"], blocks)
        cost = row.get("cost") or {}
        if "stage2_seconds" in cost:
            seconds = cost["stage1_seconds"] + cost["stage2_seconds"]
            spent = (
                f"{cost['stage1_steps']}+{cost['stage2_steps']} steps, {seconds:.0f} s "
                f"(× {seconds / base['seconds']:.2f} of the LoRA-all fine-tune)"
            )
        elif "stage1_seconds" in cost:
            spent = f"stage 1 only: {cost['stage1_steps']} steps, {cost['stage1_seconds']:.0f} s"
        elif "selection_seconds" in cost:
            spent = f"{cost['selection_seconds']:.1f} s"
        else:
            spent = "–"
        lines.append(
            f"| {row['method']} | {row['layers'] or '–'} | {row['trainable_params']:,} | "
            f"{row['loss_after']:.4f}{seeds} ({row['ppl_after']:.2f}) | "
            f"{row['loss_after'] - base['loss_after']:+.4f} | "
            f"{row['median_step_seconds']:.2f} (× {row['median_step_seconds'] / base['median_step_seconds']:.2f}) | "
            f"{fmt(floor)} | {row['rss_rise_mb']:.0f} (× {row['rss_rise_mb'] / base['rss_rise_mb']:.2f}) | {spent} |"
        )
    return [*lines, ""]


def overlaps(idents: list[dict], key: str) -> dict[str, float]:
    """Jaccard of the top-k sets (`key` = k_low or k_high) of each pair of identification runs."""
    out = {}
    for a, b in combinations(idents, 2):
        out[f"{a['label']} / {b['label']}"] = jaccard(set(a["ranking"][: a[key]]), set(b["ranking"][: b[key]]))
    return out


def render(output: dict, results_dir: Path, markdown_dir: Path) -> str:
    """The Markdown report; writes its PNGs beside the results JSON."""
    meta, records, idents = output["meta"], output["records"], output["identifications"]
    name = meta["name"]
    main = [i for i in idents if i["seed"] == 0 and i["stage1_length"] is None]
    for ident in idents:
        length = "" if ident["stage1_length"] is None else f" stage 1 x{ident['stage1_length']}"
        ident["label"] = f"{ident['dataset']} seed {ident['seed']}{length}"
    n = main[0]["candidates"]
    blocks = len({layer_of(layer, "block") for layer in main[0]["ranking"]})
    rel = lambda path: path.relative_to(markdown_dir) if path.is_relative_to(markdown_dir) else path  # noqa: E731
    m = meta["machine"]
    title = {"full": "the full run", "quick": "a quick run (smoke-sized budgets: checks the pipeline, not the paper)"}
    lines = [
        f"# Benchmarks, {title.get(name, f'run {name!r}')}: ILA against LoRA on all layers and other selectors",
        "",
        f"Made by `{meta['command']}` on {meta['date']} in {meta['seconds'] / 60:.1f} min; raw records: "
        f"`{rel(results_dir / (name + '.json'))}`. Machine: {m['platform']}, {m['cpu_count']} CPUs "
        f"({m['torch_threads']} torch threads), GPU: {m['gpu'] or 'none'}; peft-ila {m['peft-ila']}, peft {m['peft']}, "
        f"transformers {m['transformers']}, torch {m['torch']}, Python {m['python']}.",
        "",
        "Settings, the same for every method: " + ", ".join(f"{k}={v}" for k, v in meta["settings"].items()) + ". "
        "Every fine-tune sees the same batches in the same order (same token budget). Loss is per response token on "
        "the held-out set; Δ is against LoRA on all layers of the same dataset in this invocation, as are the × "
        "ratios. *Floor* is the step time if backward stopped at the lowest adapted block: forward + backward x "
        "(blocks from the lowest adapted one up) / blocks, from a forward and a forward+backward measurement of "
        "LoRA-all. *Memory rise* is the peak resident memory during the fine-tune minus the resident memory when it "
        "started (the process also holds the base model).",
        "",
    ]
    lines += verdicts(output, main, n)
    lines += ["## Results per dataset", ""]
    for dataset, data in output["datasets"].items():
        lines += dataset_table(dataset, data, records, output["step_costs"][dataset], blocks)
    lines += overlap_section(idents, main, n, results_dir, name, rel)
    lines += overhead_section(output["overhead"])
    for ident in main:
        path = results_dir / f"{name}-heatmap-{ident['dataset']}.png"
        heatmap(path, ident["scores"], ident["ranking"][: ident["k_low"]], f"ILA gates, {ident['dataset']}")
        lines += [f"![ILA gates on {ident['dataset']}]({rel(path)})", ""]
    lines += loss_plot(output, results_dir, name, rel)
    return "\n".join(lines)


def overlap_section(idents, main, n, results_dir, name, rel) -> list[str]:
    k_low, k_high = main[0]["k_low"], main[0]["k_high"]
    lines = [
        "## Overlap of the important layers",
        "",
        f"Jaccard overlap of the top-25% ({k_low} of {n}) and top-75% ({k_high}) sets; two random sets of those sizes "
        f"overlap by {random_jaccard(k_low, n):.2f} and {random_jaccard(k_high, n):.2f} on average.",
        "",
        "| runs | top-25% Jaccard | top-75% Jaccard | Spearman of gates |",
        "|---|---:|---:|---:|",
    ]
    primary = main[0]["dataset"]
    groups = {
        "across datasets": main,
        "across seeds": [i for i in idents if i["dataset"] == primary and i["stage1_length"] is None],
    }
    images = []
    for title, group in groups.items():
        low, high = overlaps(group, "k_low"), overlaps(group, "k_high")
        for pair in low:
            a, b = (next(i for i in group if i["label"] == label) for label in pair.split(" / "))
            rho = spearman([a["scores"][x] for x in a["ranking"]], [b["scores"][x] for x in a["ranking"]])
            lines.append(f"| {title}: {pair} | {low[pair]:.2f} | {high[pair]:.2f} | {rho:.2f} |")
        if len(group) > 1:
            matrix = [[jaccard(set(a["ranking"][:k_low]), set(b["ranking"][:k_low])) for b in group] for a in group]
            path = results_dir / f"{name}-overlap-{title.split()[-1]}.png"
            overlap_matrix(path, [i["label"] for i in group], matrix, f"top-25% overlap {title}")
            images.append(f"![top-25% overlap {title}]({rel(path)})")
    lines += ["", *images]
    lengths = sorted(
        (i for i in idents if i["dataset"] == primary and i["seed"] == 0 and i["stage1_length"]),
        key=lambda i: i["stage1_length"],
    )
    full = next(i for i in lengths if i["stage1_length"] == 1.0)
    lines += [
        "",
        "### Stability: are the important layers found early in stage 1?",
        "",
        "Stage 1 run for exactly a fraction of its step cap (no stability stop), then the same stage 2.",
        "",
        "| stage 1 length | steps | top-25% Jaccard vs 100% | top-75% Jaccard vs 100% |",
        "|---|---:|---:|---:|",
    ]
    for ident in lengths:
        low = jaccard(set(ident["ranking"][:k_low]), set(full["ranking"][:k_low]))
        high = jaccard(set(ident["ranking"][:k_high]), set(full["ranking"][:k_high]))
        lines.append(f"| {ident['stage1_length']:.0%} of the cap | {ident['stage1_steps']} | {low:.2f} | {high:.2f} |")
    return [*lines, ""]


def overhead_section(overhead: dict) -> list[str]:
    lora, base = overhead["lora_all"], overhead["base"]
    rows_ = [
        (
            "probe state, stage 1 (gates off) vs LoRA-all: forward+backward",
            overhead["probe_stage1"]["forward_backward_s"],
            lora["forward_backward_s"],
        ),
        (
            "probe state, stage 2 (gates learned) vs LoRA-all: forward+backward",
            overhead["probe_stage2"]["forward_backward_s"],
            lora["forward_backward_s"],
        ),
        ("ILA top-25%, unmerged, vs base: inference", overhead["ila_top25"]["inference_s"], base["inference_s"]),
        ("ILA top-25%, merged, vs base: inference", overhead["ila_top25_merged"]["inference_s"], base["inference_s"]),
    ]
    lines = ["## Overhead", "", "| comparison | seconds per batch | reference | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f} |" for label, a, b in rows_]
    return [*lines, ""]


def loss_plot(output: dict, results_dir: Path, name: str, rel) -> list[str]:
    datasets = list(output["datasets"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        table = rows([r for r in output["records"] if r["dataset"] == dataset])
        base = next(r for r in table if r["family"] == BASELINE)["loss_after"]
        ax.barh(
            [r["method"] for r in table],
            [r["loss_after"] - base for r in table],
            xerr=[r["loss_after_std"] for r in table],
            color=["C1" if r["family"].startswith("ila") else "C0" for r in table],
        )
        ax.axvline(0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_title(f"{dataset}: held-out loss minus LoRA-all (lower is better)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = results_dir / f"{name}-loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [f"![held-out loss against LoRA-all]({rel(path)})", ""]


def verdicts(output: dict, main: list[dict], n: int) -> list[str]:
    """What holds of the paper's findings here, each with its numbers and the rule that decides it."""
    table = {d: rows([r for r in output["records"] if r["dataset"] == d]) for d in output["datasets"]}

    def get(dataset, method):
        return next((r for r in table[dataset] if r["method"] == method), None)

    lines = ["## What holds here", ""]
    k_low = main[0]["k_low"]
    pairs = list(overlaps(main, "k_low").values())
    if pairs:
        mean = statistics.fmean(pairs)
        verdict = "holds" if mean >= 0.8 else "partly holds" if mean >= 0.5 else "does not hold"
        lines.append(
            f"1. **Important layers overlap about 90% across alignment datasets** — {verdict} here: mean "
            f"top-25% Jaccard across {len(main)} datasets {mean:.2f} (random sets: "
            f"{random_jaccard(k_low, n):.2f}). Rule: ≥ 0.80 holds, ≥ 0.50 partly."
        )
    gaps75, gaps25, vs_random, noise = [], [], [], []
    for dataset in table:
        lora, ila75, ila25 = (
            get(dataset, "LoRA on all layers"),
            get(dataset, "ILA top-75%"),
            get(dataset, "ILA top-25%"),
        )
        rand = get(dataset, "random 25%")
        gaps75.append(ila75["loss_after"] - lora["loss_after"])
        gaps25.append(ila25["loss_after"] - lora["loss_after"])
        vs_random.append(ila25["loss_after"] - rand["loss_after"])
        noise.append(rand["loss_after_std"])
    tol = max(noise) if noise else 0.0
    verdict = (
        "holds"
        if all(g < -tol for g in gaps75)
        else "does not hold"
        if any(g > tol for g in gaps75)
        else "within noise"
    )
    lines.append(
        f"2. **Freezing the least important 25% (ILA top-75%) improves on LoRA on all layers** — {verdict}: "
        f"Δ loss {', '.join(f'{g:+.4f}' for g in gaps75)} on {', '.join(table)}; noise scale (largest std of "
        f"random 25% over seeds) {tol:.4f}. Rule: better than −noise on every dataset holds, worse than "
        "+noise on any does not hold."
    )
    verdict = "holds" if all(g <= tol for g in gaps25) else "does not hold"
    base = [get(d, "LoRA on all layers") for d in table]
    steps = [
        get(d, "ILA top-25%")["median_step_seconds"] / b["median_step_seconds"]
        for d, b in zip(table, base, strict=True)
    ]
    lines.append(
        f"3. **Tuning only the top 25% keeps quality at lower cost** — quality {verdict}: Δ loss vs LoRA-all "
        f"{', '.join(f'{g:+.4f}' for g in gaps25)}; step time × {', '.join(f'{s:.2f}' for s in steps)} of "
        f"LoRA-all. Against random 25% layers: Δ {', '.join(f'{g:+.4f}' for g in vs_random)}. Rule: within "
        "+noise of LoRA-all holds."
    )
    primary = main[0]["dataset"]
    lengths = sorted(
        (i for i in output["identifications"] if i["dataset"] == primary and i["seed"] == 0 and i["stage1_length"]),
        key=lambda i: i["stage1_length"],
    )
    full = next(i for i in lengths if i["stage1_length"] == 1.0)
    early = [i for i in lengths if i["stage1_length"] < 1.0]
    if early:
        shortest = early[0]
        overlap = jaccard(set(shortest["ranking"][:k_low]), set(full["ranking"][:k_low]))
        verdict = "holds" if overlap >= 0.8 else "partly holds" if overlap >= 0.5 else "does not hold"
        lines.append(
            f"4. **Important layers are found early in stage 1** — {verdict}: top-25% Jaccard "
            f"{overlap:.2f} between {shortest['stage1_length']:.0%} and 100% of the stage-1 cap "
            f"({shortest['stage1_steps']} vs {full['stage1_steps']} steps). Rule: ≥ 0.80 holds, ≥ 0.50 partly."
        )
    ident = get(primary, "ILA top-25%")["cost"]
    lora = get(primary, "LoRA on all layers")
    cost = (ident["stage1_seconds"] + ident["stage2_seconds"]) / lora["seconds"]
    lines += [
        "",
        f"Identification cost on {primary}: {cost:.2f} × the LoRA-all fine-tune's seconds "
        f"({ident['stage1_steps']} + {ident['stage2_steps']} steps against {lora['steps']}).",
    ]
    proxy = get(primary, "||BA|| after stage 1 25% (no stage 2)")
    if proxy:
        lines.append(
            f"Does stage 2 earn its cost? ILA top-25% minus ||BA||-after-stage-1 top-25%: "
            f"{get(primary, 'ILA top-25%')['loss_after'] - proxy['loss_after']:+.4f} held-out loss."
        )
    return [*lines, ""]


def write_report(results_dir: Path, markdown: Path) -> None:
    """RESULTS.md from every results JSON in `results_dir`: the full run first, then any other (e.g. quick) run."""
    runs = sorted(results_dir.glob("*.json"), key=lambda p: (p.stem != "full", p.stem))
    parts = [render(json.loads(path.read_text()), results_dir, markdown.parent) for path in runs]
    markdown.write_text("\n\n---\n\n".join(parts))


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks" / "results"
    write_report(folder, ROOT / "benchmarks" / "RESULTS.md")
    print(f"wrote {ROOT / 'benchmarks' / 'RESULTS.md'} from {folder}")
