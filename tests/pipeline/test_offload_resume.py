"""Stage II under accelerate's disk offload, and resuming a killed run from its block cache."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModel

from optimum_fair import FairCalibConfig, FairLinear
from tests.conftest import char_tokenizer, tiny_llada

SMALL = dict(num_probes=8, num_samples=8, seq_len=32, window=16, block_length=8, batch_size=4, epochs=2,
             dataset="lee", rounding="gptq", transform="hadamard")
X = torch.randint(4, 90, (2, 32), generator=torch.Generator().manual_seed(5))


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _save(path, n_layers=2):
    tok = char_tokenizer()
    tiny_llada(len(tok), tok.mask_token_id, n_layers=n_layers).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_disk_offloaded_calibration_equals_in_memory(tmp_path):
    path = _save(tmp_path / "m")
    ref = AutoModel.from_pretrained(path, quantization_config=FairCalibConfig(**SMALL))
    device_map = {"model.transformer.wte": "cpu", "model.transformer.blocks.0": "disk",
                  "model.transformer.blocks.1": "disk", "model.transformer.ln_f": "cpu",
                  "model.transformer.ff_out": "cpu"}
    off = AutoModel.from_pretrained(path, quantization_config=FairCalibConfig(**SMALL), device_map=device_map,
                                    offload_folder=str(tmp_path / "offload"))
    assert isinstance(off.model.transformer.blocks[1].ff_out, FairLinear)
    assert torch.equal(_logits(off), _logits(ref))


def _spawn(path, cache, config=None):
    config = config or dict(SMALL, transform="flatquant", epochs=30)
    code = ("import optimum_fair, torch\n"
            "torch.set_num_threads(1)\n"
            "from transformers import AutoModel\n"
            f"cfg = optimum_fair.FairCalibConfig(**{config!r}, "
            f"cache_dir={str(cache)!r})\n"
            f"AutoModel.from_pretrained({str(path)!r}, quantization_config=cfg)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def test_killed_run_resumes_to_the_same_model(tmp_path):
    path = _save(tmp_path / "m", n_layers=4)
    cache = tmp_path / "cache"
    proc = _spawn(path, cache)
    deadline = time.time() + 240
    while not (cache / "block_0000.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the first block never finished"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in cache.glob("block_*.safetensors"))
    assert "block_0003.safetensors" not in done  # killed mid-calibration
    assert not list(cache.glob("*.tmp"))  # nothing half-written looks finished
    cfg = dict(SMALL, transform="flatquant", epochs=30)
    resumed = AutoModel.from_pretrained(path, quantization_config=FairCalibConfig(**cfg, cache_dir=str(cache)))
    fresh = AutoModel.from_pretrained(path, quantization_config=FairCalibConfig(**cfg))
    assert torch.equal(_logits(resumed), _logits(fresh))
    assert len(list(cache.glob("block_*.safetensors"))) == 4


def _stderr_of(proc) -> bytearray:
    """The child's stderr as it arrives (read by a thread, so the pipe never fills)."""
    buf = bytearray()

    def pump():
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            buf.extend(chunk)

    threading.Thread(target=pump, daemon=True).start()
    return buf


def _kill_when(proc, ready, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it was killed at {what}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_runs_killed_at_seeded_points_resume_to_the_same_model(tmp_path):
    """SIGKILL during Stage I, after a seeded block, and a seeded delay into a later block (inside its
    calibration or its cache write), each restart continuing the same cache; a half-written cache file
    (what a kill inside `save_file` leaves) is ignored; the last run equals an uninterrupted one."""
    rng = random.Random(20)
    cfg = dict(SMALL, transform="flatquant", epochs=30, num_probes=32)
    path, cache = _save(tmp_path / "m", n_layers=4), tmp_path / "cache"
    blocks = lambda: sorted(p.name for p in cache.glob("block_*.safetensors"))  # noqa: E731

    proc = _spawn(path, cache, cfg)
    err = _stderr_of(proc)
    _kill_when(proc, lambda: b"Stage I: probe rollouts" in err, "Stage I")
    assert blocks() == []  # killed before any block was calibrated
    k = rng.randrange(1, 3)  # after block k (0-based) landed
    proc = _spawn(path, cache, cfg)
    _kill_when(proc, lambda: (cache / f"block_{k:04d}.safetensors").exists(), f"block {k}")
    assert f"block_{k:04d}.safetensors" in blocks() and "block_0003.safetensors" not in blocks()
    delay = rng.uniform(0.0, 0.5)
    proc = _spawn(path, cache, cfg)
    landed = len(blocks())
    _kill_when(proc, lambda: len(blocks()) > landed and not time.sleep(delay), f"{delay:.2f} s after a block")
    stale = cache / ".block_0003.safetensors.killed.tmp"
    stale.write_bytes((cache / "block_0000.safetensors").read_bytes()[:100])  # cut inside save_file
    resumed = AutoModel.from_pretrained(path, quantization_config=FairCalibConfig(**cfg, cache_dir=str(cache)))
    fresh = AutoModel.from_pretrained(path, quantization_config=FairCalibConfig(**cfg))
    assert torch.equal(_logits(resumed), _logits(fresh))
    assert blocks() == [f"block_{i:04d}.safetensors" for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), fresh.state_dict().values(),
                                                 strict=True))


def test_cache_of_another_run_is_refused(tmp_path):
    path = _save(tmp_path / "m")
    cache = str(tmp_path / "cache")
    AutoModel.from_pretrained(path, quantization_config=FairCalibConfig(**SMALL, cache_dir=cache))
    with pytest.raises(ValueError, match="different config; refusing to resume"):
        AutoModel.from_pretrained(path, quantization_config=FairCalibConfig(**dict(SMALL, w_bits=8), cache_dir=cache))


def test_offloaded_float_linears_are_freed_without_the_cyclic_gc(tmp_path):
    """Each block's float linears go when its FairLinears arrive (no reference cycle left by accelerate)."""
    import gc
    import weakref

    from optimum_fair import quantize

    path = _save(tmp_path / "m")
    device_map = {"model.transformer.wte": "cpu", "model.transformer.blocks.0": "disk",
                  "model.transformer.blocks.1": "disk", "model.transformer.ln_f": "cpu",
                  "model.transformer.ff_out": "cpu"}
    model = AutoModel.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    floats = [weakref.ref(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "blocks" in n]
    assert len(floats) == 14
    texts = [" ".join(f"word{i}" for i in range(400))]
    gc.collect()
    gc.disable()
    try:
        quantize(model, FairCalibConfig(**SMALL), texts, tokenizer=char_tokenizer())
        alive = sum(r() is not None for r in floats)
    finally:
        gc.enable()
    assert alive == 0
    assert isinstance(model.model.transformer.blocks[1].ff_out, FairLinear)


def _cached_run(path, cache):
    return AutoModel.from_pretrained(path, quantization_config=FairCalibConfig(**SMALL, cache_dir=str(cache)))


def test_corrupted_or_non_finite_cache_files_are_recalibrated_never_loaded(tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = _save(tmp_path / "m")
    cache = tmp_path / "cache"
    ref = _logits(_cached_run(path, cache))
    block0, block1 = cache / "block_0000.safetensors", cache / "block_0001.safetensors"
    raw = bytearray(block0.read_bytes())
    raw[-5] ^= 0xFF  # a flipped byte in the tensor data: safetensors itself cannot tell
    block0.write_bytes(bytes(raw))
    state = load_file(str(block1))
    name = next(k for k in state if k.endswith("weight_scale"))
    state[name][0, 0] = float("nan")
    with safe_open(str(block1), framework="pt") as f:  # keep the recorded digests: only the finite check
        meta = f.metadata()                               # can catch this one
    save_file(state, str(block1), metadata=meta)
    with caplog.at_level("WARNING", logger="optimum_fair.pipeline.cache"):
        again = _cached_run(path, cache)
    assert "digest" in caplog.text and "block_0000" in caplog.text
    assert "block_0001" in caplog.text
    assert torch.equal(_logits(again), ref)  # both blocks recalibrated, bit-identical


def test_cache_of_a_model_with_other_weights_is_refused(tmp_path):
    path = _save(tmp_path / "m")
    cache = tmp_path / "cache"
    _cached_run(path, cache)
    other = AutoModel.from_pretrained(path)
    with torch.no_grad():
        other.model.transformer.blocks[1].ff_out.weight[0, 0] += 1.0  # not the first parameter
    other.save_pretrained(path)  # same folder, same config: only the weights of block 1 differ
    with pytest.raises(ValueError, match="block 1 was calibrated from other full-precision weights"):
        _cached_run(path, cache)


def test_blocks_of_another_run_are_refused_when_the_manifest_is_gone(tmp_path):
    """Each block carries the run's fingerprint: deleting manifest.json does not let another config reuse it,
    while the same config still resumes (issue 32 S4)."""
    path, cache = _save(tmp_path / "m"), tmp_path / "cache"
    ref = _logits(_cached_run(path, cache))
    (cache / "manifest.json").unlink()
    other = FairCalibConfig(**dict(SMALL, seed=7, damp=0.5), cache_dir=str(cache))
    with pytest.raises(ValueError, match="block_0000.safetensors: block 0 was written by a run with another config"):
        AutoModel.from_pretrained(path, quantization_config=other)
    (cache / "manifest.json").unlink()
    assert torch.equal(_logits(_cached_run(path, cache)), ref)  # same run: the blocks are its own


def test_unreadable_manifest_and_forged_blocks_name_the_file_and_the_fix(tmp_path):
    """Invalid manifest JSON, and a block whose digest was forged to match edited tensors (issue 32 W3)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from optimum_fair.pipeline.cache import state_digest

    path, cache = _save(tmp_path / "m"), tmp_path / "cache"
    _cached_run(path, cache)
    manifest = cache / "manifest.json"
    good = manifest.read_text()
    manifest.write_text('{"fingerprint": ')
    with pytest.raises(ValueError, match=f"{manifest} cannot be read as the cache manifest.*delete {cache}"):
        _cached_run(path, cache)
    manifest.write_text(good)
    block = cache / "block_0001.safetensors"
    state = load_file(str(block))
    state.pop(next(k for k in state if k.endswith("q_proj.weight_scale")))
    with safe_open(str(block), framework="pt") as f:
        meta = dict(f.metadata(), state=state_digest(state))
    save_file(state, str(block), metadata=meta)
    with pytest.raises(ValueError, match=f"{block}: block 1 does not fit this model's block.*delete {cache}"):
        _cached_run(path, cache)


def test_cache_files_follow_the_umask_and_one_this_user_cannot_read_is_named_before_work(tmp_path, monkeypatch):
    """issue 32 W21: safetensors' save_file made the blocks 0600, so another user of a shared cache got
    "block_0000.safetensors cannot be read (No such file or directory)", then a PermissionError on rewrite."""
    import stat
    from pathlib import Path

    path, cache = _save(tmp_path / "m"), tmp_path / "cache"
    old = os.umask(0o027)
    try:
        _cached_run(path, cache)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in cache.iterdir()}
    assert modes == {"manifest.json": 0o640, "block_0000.safetensors": 0o640, "block_0001.safetensors": 0o640}
    # as root (CI) any file is readable: another user's view of the block is os.access's answer
    block, real = cache / "block_0001.safetensors", os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != block and real(p, mode, **kw))
    named = rf"{block} cannot be read by this user \(mode 0640, owner uid {os.getuid()}\)"
    with pytest.raises(PermissionError, match=named):
        _cached_run(path, cache)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != cache and real(p, mode, **kw))
    with pytest.raises(PermissionError, match=rf"cache_dir {cache} is not writable by this user"):
        _cached_run(path, cache)


def test_a_cache_dir_that_is_a_file_or_under_one_says_a_folder_was_expected(tmp_path):
    """issue 32 W9: cache_dir=<a file> gave a raw "[Errno 17] File exists" that did not say a folder was
    expected (and a path under a file "[Errno 20] Not a directory")."""
    path, afile = _save(tmp_path / "m"), tmp_path / "afile"
    afile.write_text("mine")
    for cache in (afile, afile / "sub" / "cache"):
        with pytest.raises(NotADirectoryError, match=rf"cache_dir {cache}: {afile} is a file, a folder was expected"):
            _cached_run(path, cache)
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "m"]
