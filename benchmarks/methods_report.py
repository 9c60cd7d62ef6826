"""Merge `benchmarks/methods.py` results into the README table, paired bootstrap intervals and plots.

    python benchmarks/methods_report.py benchmarks/results/methods_a.json benchmarks/results/methods_b.json \
        --out benchmarks/results/methods

Writes `<out>.md` (the table: mean ± half-range over seeds, and the paired differences), `<out>_pairs.json`,
`<out>_flip_rate.png` (frontier flip rate by method, W4A4), `<out>_lag_ccdf.png` (δ_lag CCDF of the
FP teacher's own decodes against each quantized model's own decodes, W4A4) and `<out>_pairs.png` (the
paired differences with their intervals).

Paired difference of method A against its uniform-weighting base B (same base calibration, same seeds,
same calibration samples, same teacher trajectories): per prompt p and seed s, the flip rate of A minus
that of B; its mean over seeds and prompts, with a 95 % percentile interval from resampling the prompts
(the same resampled prompts for every seed, 2,000 resamples). At margin >= 0.1 the rate is the ratio of
summed confident flips to summed confident decisions over the resampled prompts. The same way, where
the runs kept them (`evaluate(details=True)`): the frontier-set disagreement per prompt, the post-commit
mean-disagree per post-commit prompt and the masked NLL per held-out window (the windows resampled).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from optimum_fair.eval.evaluate import table

HEADLINE = ["flip_rate", "flip_rate_m0.1", "set_disagreement", "mean_disagree", "never_agree",
            "wiki-val/nll", "lee/nll", "agreement", "calib_seconds"]
TEXTS = ("wiki-val", "lee")
# the study's variants of the paper's prior on Hadamard + GPTQ: cells "fair-quarot-gptq-<variant>"
PRIOR_VARIANTS = ("margin", "negent", "lambda0", "lambda1", "beta0", "beta3", "block16", "window96", "floor1", "flat")
# (method, base): the base is the uniform-weighting cell with the same base calibration, or (for the
# decode-like inputs) the same cell on text; the masked fair cells are also compared with uniform on text
PAIRS: list[tuple[str, str]] = [
    ("fair-gptq", "gptq"), ("fair-quarot-gptq", "quarot-gptq"), ("fair-flatquant", "flatquant"),
    ("frontier-flatquant", "flatquant"), ("reliability-flatquant", "flatquant"),
    *((f"fair-quarot-gptq-{v}", "quarot-gptq") for v in PRIOR_VARIANTS), ("fair-flatquant-beta3", "flatquant"),
    ("fair-flatquant-beta3", "fair-flatquant"),
    ("quarot-gptq-masked", "quarot-gptq"), ("fair-quarot-gptq-masked", "quarot-gptq-masked"),
    ("fair-quarot-gptq-masked", "quarot-gptq"),
    ("flatquant-masked", "flatquant"), ("fair-flatquant-masked", "flatquant-masked"),
    ("fair-flatquant-masked", "flatquant"),
    ("quarot-gptq-n128", "quarot-gptq"), ("fair-quarot-gptq-n128", "quarot-gptq-n128"),
]


def load_runs(paths: list[str]) -> list[dict]:
    """All runs of the given files, each (method, bits, seed) once: the FP row and a cell run again with
    the same flip counts (a reproduction) are kept once; a cell seen twice with other results is an error."""
    runs, seen = [], {}
    for path in paths:
        for run in json.loads(Path(path).read_text())["runs"]:
            key = (run["method"], run["bits"], run["seed"])
            if key in seen:
                if run["method"] == "fp" or _same_flips(seen[key], run["metrics"]):
                    continue
                raise ValueError(f"{path}: {key} is already in an earlier file, with other results")
            seen[key] = run["metrics"]
            runs.append(run)
    return runs


def _same_flips(a: dict, b: dict) -> bool:
    keys = [f"{t}/{k}" for t in TEXTS for k in ("flips_per_prompt", "confident_flips_per_prompt")]
    return all(k in a and a.get(k) == b.get(k) for k in keys)


def summarise(runs: list[dict]) -> dict[str, dict[str, str]]:
    """'method bits' -> metric -> 'mean ± half-range' over seeds."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(f"{r['method']} {r['bits']}", []).append(r["metrics"])
    out = {}
    for name, rows in groups.items():
        out[name] = {}
        for key in HEADLINE:
            vals = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
            if vals:
                half = (max(vals) - min(vals)) / 2
                out[name][key] = f"{statistics.fmean(vals):.4f} ± {half:.4f}" if len(vals) > 1 else f"{vals[0]:.4f}"
    return out


def per_prompt(metrics: dict, key: str) -> torch.Tensor:
    """(prompts,) counts of one per-prompt list, the held-out texts concatenated."""
    return torch.tensor([v for text in TEXTS for v in metrics[f"{text}/{key}"]], dtype=torch.float64)


# metric -> its per-unit list in the runs (units: prompts, post-commit prompts, NLL windows)
MIN_UNITS = 8  # fewer units per seed (e.g. 2 post-commit prompts) give no bootstrap interval
UNIT_METRICS = {"set_disagreement": "set_disagreement_per_prompt",
                "mean_disagree": "post_commit_disagree_per_prompt", "nll": "nll_per_window"}


def bootstrap(stat, units: int, resamples: int, seed: int,
              samples: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """stat(unit indices) -> (m,) tensor; its value on all units and the 2.5 / 97.5 % bootstrap quantiles
    (``samples``, when given, receives the (resamples, m) bootstrap draws)."""
    gen = torch.Generator().manual_seed(seed)
    boot = torch.stack([stat(torch.randint(0, units, (units,), generator=gen)) for _ in range(resamples)])
    if samples is not None:
        samples.append(boot)
    return stat(torch.arange(units)), torch.quantile(boot, 0.025, dim=0), torch.quantile(boot, 0.975, dim=0)


def bootstrap_p(boot: torch.Tensor) -> float:
    """Two-sided bootstrap p-value of a difference being 0: twice the smaller tail share at 0 (at most 1)."""
    below, above = float((boot <= 0).double().mean()), float((boot >= 0).double().mean())
    return min(1.0, 2 * min(below, above))


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (same order): step-down, monotone, capped at 1."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(pvalues) - rank) * pvalues[i])
        adjusted[i] = min(1.0, running)
    return adjusted


def unit_differences(a_runs: dict[int, dict], b_runs: dict[int, dict], resamples: int = 2000,
                     seed: int = 0) -> dict[str, float | list[float]]:
    """Per-unit metrics (UNIT_METRICS) A - B: mean over seeds and units, units resampled; skips absent ones."""
    seeds, out = sorted(set(a_runs) & set(b_runs)), {}
    for name, key in UNIT_METRICS.items():
        if not all(f"{t}/{key}" in r[s] for r in (a_runs, b_runs) for s in seeds for t in TEXTS):
            continue
        diff = torch.stack([per_prompt(a_runs[s], key) - per_prompt(b_runs[s], key) for s in seeds])  # (seeds, units)
        full, lo, hi = bootstrap(lambda idx, d=diff: d[:, idx].mean().view(1), diff.shape[1], resamples, seed)
        ci = [float(lo), float(hi)] if diff.shape[1] >= MIN_UNITS else None  # a handful of units: no interval
        out.update({f"{name}_diff": float(full), f"{name}_ci": ci, f"{name}_units": diff.shape[1]})
    return out


def paired_difference(a_runs: dict[int, dict], b_runs: dict[int, dict], resamples: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """Flip-rate differences A - B (all decisions and margin >= 0.1), mean and bootstrap 95 % interval,
    and the `unit_differences` where both sides kept them."""
    seeds = sorted(set(a_runs) & set(b_runs))
    if not seeds:
        raise ValueError("no seed in common")
    flips = torch.stack([per_prompt(a_runs[s], "flips_per_prompt") - per_prompt(b_runs[s], "flips_per_prompt")
                         for s in seeds])  # (seeds, prompts)
    conf = torch.stack([per_prompt(a_runs[s], "confident_flips_per_prompt")
                        - per_prompt(b_runs[s], "confident_flips_per_prompt") for s in seeds])  # (seeds, prompts)
    n_conf = per_prompt(a_runs[seeds[0]], "confident_per_prompt")  # (prompts,): the teacher's, same for all
    gen = sum(a_runs[seeds[0]][f"{t}/decisions"] for t in TEXTS) / flips.shape[1]  # decisions per prompt

    def stats(idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([flips[:, idx].mean() / gen, conf[:, idx].sum() / (n_conf[idx].sum() * len(seeds))])

    draws: list = []
    full, lo, hi = bootstrap(stats, flips.shape[1], resamples, seed, samples=draws)
    return {"seeds": seeds, "prompts": int(flips.shape[1]),
            "flip_rate_diff": float(full[0]), "flip_rate_ci": [float(lo[0]), float(hi[0])],
            "flip_rate_p": bootstrap_p(draws[0][:, 0]),
            "flip_rate_m0.1_diff": float(full[1]), "flip_rate_m0.1_ci": [float(lo[1]), float(hi[1])],
            **unit_differences(a_runs, b_runs, resamples, seed)}


def _ci_cell(d: dict, name: str, scale: float, unit: str, digits: int) -> str:
    if f"{name}_diff" not in d:
        return "-"
    if d[f"{name}_ci"] is None:
        return f"{scale * d[f'{name}_diff']:+.{digits}f}{unit} ({d[f'{name}_units']} prompts, no CI)"
    lo, hi = (scale * v for v in d[f"{name}_ci"])
    return f"{scale * d[f'{name}_diff']:+.{digits}f}{unit} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


# (column, metric, scale, unit, digits) of the pairs table
PAIR_COLUMNS = [("Δ flip rate", "flip_rate", 100, " pts", 2), ("Δ flip rate m≥0.1", "flip_rate_m0.1", 100, " pts", 2),
                ("Δ set disagreement", "set_disagreement", 100, " pts", 2),
                ("Δ post-commit mean-disagree", "mean_disagree", 100, " pts", 2), ("Δ masked NLL", "nll", 1, "", 4)]


def pairs_table(runs: list[dict]) -> tuple[list[dict], str]:
    by: dict[tuple[str, str], dict[int, dict]] = {}
    for r in runs:
        by.setdefault((r["method"], r["bits"]), {})[r["seed"]] = r["metrics"]
    """Every pair of one study, labelled exploratory, with Holm–Bonferroni adjusted p-values of the flip-rate
    difference over all the pairs present (a p-value below 0.05 after adjustment is still exploratory:
    only `benchmarks/confirm.py` on unseen text makes a claim)."""
    header = ["method − base", "bits", "seeds", "prompts", *(f"{c} [95 % CI]" for c, *_ in PAIR_COLUMNS),
              "p (Holm)", "status"]
    rows = []
    for method, base in PAIRS:
        for bits in sorted({b for m, b in by if m == method}):
            if (base, bits) in by:
                rows.append({"method": method, "base": base, "bits": bits,
                             **paired_difference(by[(method, bits)], by[(base, bits)])})
    for row, p in zip(rows, holm([r["flip_rate_p"] for r in rows]), strict=True):
        row["flip_rate_p_holm"], row["status"] = p, "exploratory"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for d in rows:
        cells = [f"{d['method']} − {d['base']}", d["bits"], str(len(d["seeds"])), str(d["prompts"]),
                 *(_ci_cell(d, *col[1:]) for col in PAIR_COLUMNS), f"{d['flip_rate_p_holm']:.3f}", d["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


def plots(runs: list[dict], out: str, bits: str = "w4a4") -> list[str]:
    """Flip rate by method (bars: seed mean, whiskers: seed range) and the δ_lag CCDF, FP vs quantized."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from optimum_fair.eval.metrics import lag_ccdf

    cells: dict[str, list[dict]] = {}
    for r in runs:
        if r["bits"] == bits:
            cells.setdefault(r["method"], []).append(r["metrics"])
    names = list(cells)
    rates = [[100 * m["flip_rate"] for m in cells[n]] for n in names]
    means = [statistics.fmean(v) for v in rates]
    pairs = list(zip(means, rates, strict=True))
    err = [[m - min(v) for m, v in pairs], [max(v) - m for m, v in pairs]]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.45 * len(names)), 3.8))
    fair = [n.startswith(("fair-", "frontier-", "reliability-")) for n in names]  # prior-weighted cells
    ax.bar(range(len(names)), means, yerr=err, capsize=3, color=["#c44" if f else "#888" for f in fair])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"frontier flip rate, % ({bits.upper()})")
    ax.set_title("Teacher-forced frontier flips on the FP teacher's greedy decodes (lower is better)")
    fig.tight_layout()
    paths = [f"{out}_flip_rate.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    fp = next(r["metrics"] for r in runs if r["method"] == "fp")
    series = {"FP": fp} | {n: {k: [x for m in cells[n] for x in m.get(k, [])] for k in
                               (f"{t}/lags" for t in TEXTS)} for n in names}
    for name, metrics in series.items():
        lags = torch.tensor([x for t in TEXTS for x in metrics.get(f"{t}/lags", [])])
        if lags.numel() == 0:
            continue
        values, ccdf = lag_ccdf(lags.clamp_min(0))
        ax.step(values.numpy(), ccdf.numpy(), where="post", label=name, lw=2.2 if name == "FP" else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("δ_lag = t_align − t_commit (steps; ≤ 0 shown at 0)")
    ax.set_ylabel("P(δ_lag ≥ x)")
    ax.set_title(f"Stability lag of each model's own greedy decodes ({bits.upper()})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(f"{out}_lag_ccdf.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def pairs_plot(rows: list[dict], out: str) -> str:
    """Forest plot: each method's paired flip-rate difference against its uniform base, with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (r["bits"], r["flip_rate_diff"]))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.4))
    for y, r in enumerate(rows):
        lo, hi = (100 * v for v in r["flip_rate_ci"])
        color = "#2a7" if hi < 0 else "#c44" if lo > 0 else "#666"  # interval excludes zero: better / worse
        ax.plot([lo, hi], [y, y], color=color, lw=2)
        ax.plot(100 * r["flip_rate_diff"], y, "o", color=color)
    ax.axvline(0, color="k", lw=0.8)
    labels = [f"{r['method']} − {r['base']} ({r['bits']}, {len(r['seeds'])} seeds)" for r in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlabel("Δ flip rate vs the uniform base, points (95 % CI; < 0: fewer flips)")
    ax.set_title("Paired differences (green / red: interval excludes zero)", fontsize=9)
    fig.tight_layout()
    path = f"{out}_pairs.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON files written by benchmarks/methods.py")
    p.add_argument("--out", default="benchmarks/results/methods")
    args = p.parse_args(argv)
    runs = load_runs(args.results)
    main_table = table(summarise(runs), columns=HEADLINE)
    rows, diff_table = pairs_table(runs)
    Path(f"{args.out}_pairs.json").write_text(json.dumps(rows, indent=1) + "\n")
    Path(f"{args.out}.md").write_text(main_table + "\n\n" + diff_table + "\n")
    print(main_table + "\n\n" + diff_table)
    print("\n".join([*plots(runs, args.out), pairs_plot(rows, args.out)]))


if __name__ == "__main__":
    main()
