"""Pool runs of benchmarks/gguf_vs_llamacpp.py made with different --seed: flip rates and paired differences
over seeds and prompts, and the NLL of each file averaged over seeds.

    python benchmarks/gguf_pool.py benchmarks/results/gguf_vs_llamacpp_kquants.json \
        benchmarks/results/gguf_vs_llamacpp_kquants_seed1.json

For every file of ours, against llama-quantize of its type with and without the imatrix (stored the same
way: llama.cpp's mix or F32 ends): flip rate over all seeds, ratio to the better llama-quantize file, the
paired difference with its 95 % bootstrap interval over prompts (seeds averaged per prompt), and the NLL
difference per text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from methods_report import paired_difference  # benchmarks/ is this script's directory

TEXTS = ("wiki-val", "lee")


def runs(paths: list[str]) -> dict[str, dict[int, dict]]:
    """{file name: {seed: row}} over the result files."""
    out: dict[str, dict[int, dict]] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        for row in result["rows"]:
            out.setdefault(row["file"], {})[result["calibration"]["seed"]] = row
    return out


def pooled(a: dict[int, dict], b: dict[int, dict]) -> dict:
    seeds = sorted(set(a) & set(b))
    flips = lambda r: sum(r[s]["flip_rate"] for s in seeds) / len(seeds)  # noqa: E731
    diff = paired_difference({s: a[s] for s in seeds}, {s: b[s] for s in seeds})
    nll = {t: sum(a[s][f"{t}/nll"] - b[s][f"{t}/nll"] for s in seeds) / len(seeds) for t in TEXTS}
    return {"seeds": seeds, "ours": flips(a), "theirs": flips(b), "ratio": flips(a) / flips(b),
            "diff": diff["flip_rate_diff"], "ci": diff["flip_rate_ci"], "nll_diff": nll}


def main(paths: list[str]) -> None:
    rows = runs(paths)
    for name, ours in rows.items():
        first = next(iter(ours.values()))
        if first["source"] != "optimum-fair" or first["type"] == "F32":
            continue
        ends = ", emb/head F32" if first["float_ends"] else ""
        tool = f"llama-quantize {first['type']}"
        theirs = [n for n in (f"{tool}{ends}", f"{tool} + imatrix{ends}") if n in rows]
        best = min(theirs, key=lambda n: pooled(ours, rows[n])["theirs"])
        p = pooled(ours, rows[best])
        print(f"{name}: flip {p['ours']:.4f} vs {best} {p['theirs']:.4f} = {p['ratio']:.2f}x, "
              f"{100 * p['diff']:+.2f} pts [{100 * p['ci'][0]:+.2f}, {100 * p['ci'][1]:+.2f}], NLL "
              + " / ".join(f"{t} {p['nll_diff'][t]:+.4f}" for t in TEXTS) + f" (seeds {p['seeds']})")


if __name__ == "__main__":
    main(sys.argv[1:])
