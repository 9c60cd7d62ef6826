"""Scale benchmark: calibrate an LLaDA-8B-shaped model block by block with disk offload on a CPU box.

What it does (GitHub issues 6 and 8):

1. writes a random LLaDA model with the released 8B shapes (d_model 4096, 32 layers, 32 heads,
   MLP 12288, vocab 126464, mask 126336) to ``--path`` in bf16, one safetensors shard per block plus
   one each for the embedding and the LM head, never holding more than one shard in RAM;
2. loads it with ``from_pretrained(device_map=...)`` putting every block, the embedding and the head on
   ``"disk"`` (accelerate then reads them straight from the shards; nothing is copied);
3. Stage I: times probe steps (one teacher forward over a probe batch, through accelerate's hooks) with
   the library's own ``probe_rollouts`` on random token ids, and builds the prior from them;
4. Stage II: ``calibrate_blocks`` (GPTQ + Hadamard, W4A4) on the first ``--num-blocks`` blocks only;
   the rest stay on disk. Per block: wall time, and the part spent inside the block's forward calls
   (this scales with calibration tokens; the rest, GPTQ and weight transforms, does not);
5. projects a full run (32 blocks; N_probe = 512, T = K = 256, N = 1024, 128 samples) from those numbers.

Peak memory is sampled from /proc/self/status every 20 ms: ``VmRSS`` (anonymous + file-backed pages;
safetensors shards are memory-mapped, so file pages show up here but are reclaimable page cache) and
``RssAnon`` (what the process really owns), plus ``ru_maxrss``.

Text is bypassed: probe prompts and calibration samples are random token ids in [0, 126000), so no
tokenizer is needed (costs do not depend on which ids are fed).

Usage (the full measurement; one-off write of a 16 GB model under runs/, deleted with --delete)::

    OMP_NUM_THREADS=2 python benchmarks/scale_8b.py --threads 2 --num-blocks 2 --delete

Smoke test at small scale::

    OMP_NUM_THREADS=1 python benchmarks/scale_8b.py --threads 1 --layers 2 --d-model 512 --mlp 1536 \\
        --path runs/bench/tiny --out benchmarks/results/scale_smoke.json --delete
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import threading
import time
from pathlib import Path

import torch

GiB = 1024**3
logger = logging.getLogger("benchmarks.scale_8b")
ROOT = Path(__file__).resolve().parents[1]

# The paper's defaults (arXiv 2606.06547, sections 2-3) used for the projection.
PAPER = {"num_probes": 512, "steps": 256, "window": 256, "seq_len": 1024, "num_samples": 128}


# -- memory ---------------------------------------------------------------------------------------
def _status() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class RssMonitor:
    """Samples this process's RSS in a thread; `phase(name)` records the peak inside a `with` block."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = {"VmRSS": 0, "RssAnon": 0}
        self.phases: dict[str, dict] = {}
        self._phase_peak = {"VmRSS": 0, "RssAnon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        s = _status()
        for k in self.peak:
            self.peak[k] = max(self.peak[k], s[k])
            self._phase_peak[k] = max(self._phase_peak[k], s[k])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def phase(self, name: str):
        self._sample()
        self._phase_peak = dict(_status())
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sample()
            end = _status()
            self.phases[name] = {
                "seconds": time.perf_counter() - start,
                "peak_rss_gib": self._phase_peak["VmRSS"] / GiB,
                "peak_anon_gib": self._phase_peak["RssAnon"] / GiB,
                "end_rss_gib": end["VmRSS"] / GiB,
                "end_anon_gib": end["RssAnon"] / GiB,
            }
            logger.info("%s: %.1f s, peak RSS %.2f GiB (anon %.2f), end RSS %.2f GiB", name,
                         self.phases[name]["seconds"], self.phases[name]["peak_rss_gib"],
                         self.phases[name]["peak_anon_gib"], self.phases[name]["end_rss_gib"])

    def summary(self) -> dict:
        self._sample()
        return {"peak_rss_gib": self.peak["VmRSS"] / GiB, "peak_anon_gib": self.peak["RssAnon"] / GiB,
                "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB}


# -- a random model on disk, shard by shard -------------------------------------------------------
def llada_config(layers: int, d_model: int, n_heads: int, mlp: int, vocab: int, mask_id: int = 126336):
    from optimum_fair.modeling import LLaDAConfig

    return LLaDAConfig(d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, n_layers=layers,
                       mlp_hidden_size=mlp, vocab_size=vocab, embedding_size=vocab,
                       mask_token_id=mask_id, weight_tying=False, dtype="bfloat16",
                       eos_token_id=126081 if vocab > 126081 else None, pad_token_id=126081 if vocab > 126081 else None)


def _shard_of(name: str) -> str:
    """One shard per block; the embedding, the head and the final norm get their own."""
    parts = name.split(".")
    if "blocks" in parts:
        return f"block-{int(parts[parts.index('blocks') + 1]):03d}"
    return parts[-2]  # wte | ff_out | ln_f


@torch.no_grad()
def write_random_model(path: Path, config, seed: int = 0) -> int:
    """Write `config`'s model with N(0, init_std) weights (unit norm gains) in bf16; returns bytes written.

    The model is built on the meta device only to list names and shapes; each shard's tensors are
    generated, saved with safetensors and freed before the next shard.
    """
    from safetensors.torch import save_file

    from optimum_fair.modeling import LLaDAModelLM

    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LLaDAModelLM(config).state_dict().items()}
    shards: dict[str, list[str]] = {}
    for name in shapes:
        shards.setdefault(_shard_of(name), []).append(name)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, (shard, names) in enumerate(shards.items()):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            t = torch.empty(shapes[name], dtype=torch.bfloat16)
            if len(shapes[name]) == 1:
                t.fill_(1.0)  # RMS norm gain
            else:
                t.normal_(0.0, config.init_std, generator=gen)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
        logger.info("wrote %s (%s)", fname, shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(path)
    return total


def disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def offload_map(config, embed: str) -> dict[str, str]:
    """Every block on disk; embedding and head on `embed` ("disk" or "cpu"); the final norm on CPU."""
    dm = {"model.transformer.wte": embed}
    dm.update({f"model.transformer.blocks.{i}": "disk" for i in range(config.n_layers)})
    dm.update({"model.transformer.ln_f": "cpu", "model.transformer.ff_out": embed})
    return dm


def live_tensor_gib() -> float:
    """Bytes of the CPU tensor storages Python can still reach (to tell held memory from allocator slack)."""
    import gc

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.device.type == "cpu":
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values()) / GiB


def random_ids(n: int, seq: int, seed: int, high: int = 126000) -> torch.Tensor:
    return torch.randint(0, high, (n, seq), generator=torch.Generator().manual_seed(seed))


# -- the measurement ------------------------------------------------------------------------------
def stage_two_settings(args):
    from optimum_fair.config import FairCalibConfig
    from optimum_fair.pipeline.plan import stage_two_settings as plan_stage_two

    c = FairCalibConfig(rounding="gptq", transform="hadamard", w_bits=4, a_bits=4,
                        batch_size=args.batch_size, num_samples=args.samples, seq_len=args.seq_len)
    return c, plan_stage_two(c)


def stage_one(model, config, args, mon: RssMonitor) -> tuple[torch.Tensor, list[float], float]:
    """Probe rollouts on random prompts.

    Returns the prior's weights (seq_len,), each step's seconds, and the seconds of a 16-token forward
    (streaming every offloaded weight from disk with almost no compute: the per-step fixed cost).
    """
    from optimum_fair.devices import execution_device
    from optimum_fair.scoring.prior import prior_from_rollouts, probe_rollouts

    device = execution_device(model)
    step_seconds: list[float] = []

    def logits_fn(x, **kw):
        t0 = time.perf_counter()
        out = model(x.to(device), **kw).logits.float().cpu()
        step_seconds.append(time.perf_counter() - t0)
        logger.info("  probe step %d: %.1f s", len(step_seconds), step_seconds[-1])
        return out

    prompts = random_ids(args.probes, args.seq_len - args.window, seed=1)
    with mon.phase("stage1"), torch.no_grad():
        commit, reliab = probe_rollouts(logits_fn, prompts, args.window, args.window, args.probe_steps,
                                        config.mask_token_id, 0, "prob", batch_size=args.probes,
                                        generator=torch.Generator().manual_seed(0))
        prior = prior_from_rollouts(commit, reliab, seq_len=args.seq_len, steps=args.probe_steps, beta=1.0,
                                    schedule="early", lambda1=1.0 / args.probe_steps, floor=0.05)
    with mon.phase("weight_streaming"), torch.no_grad():
        t0 = time.perf_counter()
        model(random_ids(1, 16, seed=3).to(device))
        stream = time.perf_counter() - t0
    return prior.weights, step_seconds, stream


@contextlib.contextmanager
def forward_timers(blocks) -> dict[int, float]:
    """Seconds spent inside each block's forward calls (copies made by deepcopy report to the same slot)."""
    spent: dict[int, float] = {}
    starts: dict[int, list[float]] = {}
    handles = []
    for l, block in enumerate(blocks):
        def pre(module, args, l=l):
            starts.setdefault(l, []).append(time.perf_counter())

        def post(module, args, out, l=l):
            spent[l] = spent.get(l, 0.0) + time.perf_counter() - starts[l].pop()

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        yield spent
    finally:
        for h in handles:
            h.remove()


class BlockEnds(logging.Handler):
    """Timestamps of calibrate.py's per-block 'block %d: ...' log line (logged when a block is done)."""

    def __init__(self, mon: RssMonitor):
        super().__init__(logging.INFO)
        self.mon = mon
        self.ends: list[float] = []
        self.peak_anon: list[float] = []  # the stage's running peak when each block finished
        self.anon: list[float] = []

    def emit(self, record):
        if record.getMessage().startswith("block "):
            self.ends.append(time.perf_counter())
            self.mon._sample()
            self.peak_anon.append(self.mon._phase_peak["RssAnon"] / GiB)
            self.anon.append(_status()["RssAnon"] / GiB)


def stage_two(model, weights, args, mon: RssMonitor) -> dict:
    from torch import nn

    from optimum_fair.arch import get_adapter
    from optimum_fair.devices import execution_device, model_float_dtype
    from optimum_fair.nn import FairLinear
    from optimum_fair.pipeline.plan import block_groups, resolve_skip
    from optimum_fair.pipeline.stage2 import calibrate_blocks, capture_block_inputs

    adapter = get_adapter(model)
    blocks = adapter.block_list(model)
    cfg, settings = stage_two_settings(args)
    skip = resolve_skip(model, cfg)  # as calibrate(): the LM head stays float

    def groups(l, block):
        return block_groups(adapter, l, block, skip)

    ids = random_ids(args.samples, args.seq_len, seed=2)
    device = execution_device(model)
    with mon.phase("capture_inputs"):
        hidden, extras = capture_block_inputs(model, blocks, ids, settings.batch_size)
    assert torch.isfinite(hidden).all()
    subset = nn.ModuleList(list(blocks)[: args.num_blocks])
    ends = BlockEnds(mon)
    log = logging.getLogger("optimum_fair.pipeline.stage2")
    log.addHandler(ends)
    try:
        with mon.phase("stage2"), forward_timers(subset) as fwd:
            start = time.perf_counter()
            records = calibrate_blocks(subset, groups, hidden, extras, weights, settings, model_float_dtype(model),
                                       device)
    finally:
        log.removeHandler(ends)
    bounds = [start] + ends.ends
    per_block = []
    for l, rec in enumerate(records):
        block = blocks[l]
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        fair = [m for m in block.modules() if isinstance(m, FairLinear)]
        resident = sum(t.numel() * t.element_size() for t in block.state_dict().values())
        per_block.append({**rec, "seconds": bounds[l + 1] - bounds[l], "forward_seconds": fwd.get(l, 0.0),
                          "fair_linears": len(fair), "float_linears": len(linears),
                          "stage_peak_anon_gib_so_far": ends.peak_anon[l], "anon_gib_at_end": ends.anon[l],
                          "resident_bytes": resident})
    out = {"blocks": per_block, "tokens": args.samples * args.seq_len, "live_tensor_gib_after": live_tensor_gib(),
           "anon_gib_after": _status()["RssAnon"] / GiB}
    with contextlib.suppress(OSError, AttributeError):  # glibc only: hand free heap pages back, then re-read
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["anon_gib_after_malloc_trim"] = _status()["RssAnon"] / GiB
    return out


def project(res: dict, args, config) -> dict:
    """Full-model time from the measured costs; forward work scales with tokens, GPTQ/transform work does not.

    On a shared box other jobs slow some steps and blocks down several-fold (thread oversubscription), so
    the projection takes the fastest Stage I step and the fastest block after block 0 (the least
    disturbed measurement); `stage2_block_seconds_mean` keeps the average for comparison.
    """
    p = PAPER
    step, fixed1 = res["stage1"]["step_seconds_min"], res["stage1"]["weight_streaming_seconds"]
    per_token1 = max(step - fixed1, 0.0) / (args.probes * args.seq_len)
    probe_batch = 16  # run.stage_one rolls out max(batch_size, 16) probes at once
    steps1 = -(-p["num_probes"] // probe_batch) * p["steps"]
    stage1 = steps1 * (fixed1 + probe_batch * p["seq_len"] * per_token1)
    blocks = res["stage2"]["blocks"][1:] or res["stage2"]["blocks"]  # block 0 pays one-off warm-up
    fastest = min(blocks, key=lambda b: b["seconds"])
    fwd, fixed = fastest["forward_seconds"], fastest["seconds"] - fastest["forward_seconds"]
    mean = sum(b["seconds"] for b in blocks) / len(blocks)
    scale = p["num_samples"] * p["seq_len"] / res["stage2"]["tokens"]
    block_here = fwd + fixed
    block_paper = fwd * scale + fixed
    stream_gib = p["num_samples"] * p["seq_len"] * config.d_model * 4 / GiB
    stream_here = res["stage2"]["tokens"] * config.d_model * 4 / GiB
    resident = sum(b["resident_bytes"] for b in blocks) / len(blocks) / GiB
    peak_all = res["memory"]["peak_anon_gib"] + (config.n_layers - args.num_blocks) * resident
    peaks = [b["stage_peak_anon_gib_so_far"] for b in res["stage2"]["blocks"]]
    growth = (peaks[-1] - peaks[0]) / (len(peaks) - 1)  # what each block added to the peak here
    peak_trend = res["memory"]["peak_anon_gib"] + (config.n_layers - args.num_blocks) * max(growth, resident)
    return {
        "stage1_seconds_per_token": per_token1,
        "stage1_paper_forwards": steps1,
        "stage1_paper_seconds_per_forward": fixed1 + probe_batch * p["seq_len"] * per_token1,
        "stage1_paper_hours": stage1 / 3600,
        "stage2_block_seconds_measured_setting": block_here,
        "stage2_block_seconds_mean": mean,
        "stage2_block_forward_seconds": fwd,
        "stage2_block_fixed_seconds": fixed,
        "stage2_full_measured_setting_hours": config.n_layers * block_here / 3600,
        "stage2_full_paper_samples_hours": config.n_layers * block_paper / 3600,
        "total_paper_hours": (stage1 + config.n_layers * block_paper) / 3600,
        "resident_quantized_gib_all_blocks": config.n_layers * resident,
        "peak_anon_gib_all_blocks_this_setting": peak_all,
        "stage2_peak_growth_gib_per_block": growth,
        "peak_anon_gib_all_blocks_measured_growth": peak_trend,
        "stage2_one_stream_gib_paper_samples": stream_gib,
        "peak_anon_gib_all_blocks_paper_samples_estimate": peak_all + 4 * (stream_gib - stream_here),
        "note": "Stage I: 512/16 probe batches x 256 steps, each a forward over 16 x 1024 tokens costing the "
                "measured weight-streaming time plus tokens x the measured per-token time; Stage II linear in "
                "tokens (attention's seq^2 share ignored, ~4% at N=1024, d=4096); paper setting: "
                f"{p}; Stage II keeps ~4 (n, N, d) fp32 streams in RAM "
                "(hidden/fp/q stream, targets, quantized output), hence the +4 streams in the paper-samples "
                "peak estimate.",
    }


def table(res: dict) -> str:
    cfg, s1, pr = res["model"], res["stage1"], res["projection"]
    rows = [
        ("model", f"{cfg['n_layers']} x d{cfg['d_model']}, MLP {cfg['mlp']}, vocab {cfg['vocab']}"),
        ("size on disk (bf16)", f"{res['disk_gib']:.2f} GiB"),
        ("peak RSS (VmRSS, incl. mmapped file pages)", f"{res['memory']['peak_rss_gib']:.2f} GiB"),
        ("peak anonymous RSS", f"{res['memory']['peak_anon_gib']:.2f} GiB"),
        ("RSS after imports", f"{res['import_rss_gib']:.2f} GiB"),
        ("peak RSS / size on disk", f"{res['memory']['peak_rss_gib'] / res['disk_gib']:.3f}"),
        ("load (from_pretrained, all on disk)", f"{res['phases']['load']['seconds']:.1f} s"),
        ("load average at start / end (2 cores; others' jobs)",
         f"{res['host']['loadavg_start'][0]:.1f} / {res['host']['loadavg_end'][0]:.1f}"),
        (f"Stage I step ({s1['probes']} x {s1['seq_len']} tokens; fastest / median of {s1['steps_run']})",
         f"{s1['step_seconds_min']:.1f} / {s1['step_seconds_median']:.1f} s"),
        ("Stage I fixed cost per forward (16 tokens: weight streaming)", f"{s1['weight_streaming_seconds']:.1f} s"),
    ]
    for b in res["stage2"]["blocks"]:
        rows.append((f"Stage II block {b['block']} ({res['stage2']['tokens']} tokens)",
                     f"{b['seconds']:.1f} s (forward {b['forward_seconds']:.1f} s)"))
    rows += [
        ("Stage II block used for projection (fastest after block 0): forward / rest",
         f"{pr['stage2_block_forward_seconds']:.1f} / {pr['stage2_block_fixed_seconds']:.1f} s"),
        (f"projected Stage II, {cfg['n_layers']} blocks, this setting",
         f"{pr['stage2_full_measured_setting_hours']:.2f} h"),
        (f"projected Stage II, {cfg['n_layers']} blocks, 128 x 1024 samples",
         f"{pr['stage2_full_paper_samples_hours']:.1f} h"),
        ("projected Stage I, 512 probes x 256 steps x 1024", (f"{pr['stage1_paper_hours']:.0f} h "
         f"({pr['stage1_paper_forwards']} forwards of {pr['stage1_paper_seconds_per_forward']:.0f} s)")),
        (f"resident W4 blocks after all {cfg['n_layers']}", f"{pr['resident_quantized_gib_all_blocks']:.3f} GiB"),
        ("Stage II peak growth per block (measured)", f"{pr['stage2_peak_growth_gib_per_block']:.2f} GiB"),
        ("projected peak anon RSS, all blocks, if that growth continues",
         f"{pr['peak_anon_gib_all_blocks_measured_growth']:.1f} GiB"),
        ("projected peak anon RSS, all blocks, growth = resident W4 only",
         f"{pr['peak_anon_gib_all_blocks_this_setting']:.2f} GiB"),
        ("projected peak anon RSS, all blocks, 128 x 1024 samples (estimate)",
         f"{pr['peak_anon_gib_all_blocks_paper_samples_estimate']:.1f} GiB"),
    ]
    return "| quantity | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default=str(ROOT / "runs/bench/llada8b"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/scale_8b.json"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--n-heads", type=int, default=32)
    ap.add_argument("--mlp", type=int, default=12288)
    ap.add_argument("--vocab", type=int, default=126464)
    ap.add_argument("--num-blocks", type=int, default=2, help="blocks actually calibrated (>= 2)")
    ap.add_argument("--samples", type=int, default=8, help="Stage II calibration sequences")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--probes", type=int, default=1, help="Stage I probe batch")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--probe-steps", type=int, default=2, help="Stage I steps actually run")
    ap.add_argument("--embed", choices=["disk", "cpu"], default="disk", help="where wte and the head live")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--from-json", help="recompute the projection and table of an earlier result (no model needed)")
    ap.add_argument("--rewrite", action="store_true", help="write the model even if --path exists")
    ap.add_argument("--delete", action="store_true", help="delete --path at the end")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        for key, value in res["settings"].items():
            setattr(args, key, value)
        m = res["model"]
        res["projection"] = project(res, args, llada_config(m["n_layers"], m["d_model"], m["n_heads"], m["mlp"],
                                                            m["vocab"]))
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(table(res))
        return
    if args.num_blocks < 2:
        ap.error("--num-blocks must be at least 2")
    from transformers import AutoModel

    import optimum_fair  # noqa: F401  (registers the native LLaDA model)

    path = Path(args.path)
    config = llada_config(args.layers, args.d_model, args.n_heads, args.mlp, args.vocab)
    res: dict = {"model": {"n_layers": args.layers, "d_model": args.d_model, "n_heads": args.n_heads,
                           "mlp": args.mlp, "vocab": args.vocab},
                 "settings": {k: v for k, v in vars(args).items() if k not in ("path", "out")},
                 "host": {"cpus": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine(),
                          "loadavg_start": os.getloadavg()}}
    with RssMonitor() as mon:
        if args.rewrite or not (path / "model.safetensors.index.json").exists():
            with mon.phase("write"):
                write_random_model(path, config)
        res["disk_gib"] = disk_size(path) / GiB
        res["import_rss_gib"] = _status()["VmRSS"] / GiB
        with mon.phase("load"):
            model = AutoModel.from_pretrained(path, device_map=offload_map(config, args.embed),
                                              offload_folder=str(path.parent / (path.name + "-offload")),
                                              dtype=torch.bfloat16).eval()
        weights, steps, stream = stage_one(model, config, args, mon)
        res["stage1"] = {"probes": args.probes, "seq_len": args.seq_len, "window": args.window,
                         "steps_run": len(steps), "step_seconds": steps, "weight_streaming_seconds": stream,
                         "step_seconds_median": sorted(steps)[len(steps) // 2], "step_seconds_min": min(steps)}
        res["stage2"] = stage_two(model, weights, args, mon)
        res["phases"] = mon.phases
        res["memory"] = mon.summary()
    res["host"]["loadavg_end"] = os.getloadavg()  # other jobs on the box slow the timings down
    res["projection"] = project(res, args, config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(table(res))
    if args.delete:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path.parent / (path.name + "-offload"), ignore_errors=True)


if __name__ == "__main__":
    main()
