import subprocess
import sys
from pathlib import Path

LEAN = ["optimum_fair.ops", "optimum_fair.nn", "optimum_fair.calib", "optimum_fair.calib.gptq",
        "optimum_fair.calib.transforms", "optimum_fair.calib.rotation", "optimum_fair.scoring",
        "optimum_fair.scoring.sampler", "optimum_fair.scoring.prior", "optimum_fair.eval.metrics",
        "optimum_fair.enums"]


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_math_modules_import_without_transformers():
    code = ("import sys, importlib\n"
            "sys.modules['transformers'] = None  # any import of transformers now fails\n"
            f"for name in {LEAN!r}:\n"
            "    importlib.import_module(name)\n"
            "assert 'torch.cuda' not in sys.modules or not __import__('torch').cuda.is_initialized()\n"
            "print('ok')")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_math_modules_really_lack_transformers():
    # the check above must be able to fail: a module that needs transformers does fail under it
    out = _run("import sys; sys.modules['transformers'] = None; import optimum_fair.integrations.transformers")
    assert out.returncode != 0 and "transformers" in out.stderr


def test_package_import_registers_method():
    code = ("import optimum_fair\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
            "from transformers import AutoConfig\n"
            "assert AUTO_QUANTIZER_MAPPING['fair_calib'].__name__ == 'FairCalibHfQuantizer'\n"
            "assert AUTO_QUANTIZATION_CONFIG_MAPPING['fair_calib'] is optimum_fair.FairCalibConfig\n"
            "assert AutoConfig.for_model('llada').model_type == 'llada'\n"
            "optimum_fair.integrations.transformers.register()  # second call is harmless\n"
            "print('ok')")
    out = _run(code)
    assert out.returncode == 0, out.stderr


def test_a_failing_registration_raises_at_import():
    # importing the native models fails (as when a local file shadows a package transformers needs):
    # `import optimum_fair` must say so, not succeed and leave "unknown architecture" errors for later
    out = _run("import sys; sys.modules['optimum_fair.modeling'] = None; import optimum_fair")
    assert out.returncode != 0
    assert "optimum_fair.modeling" in out.stderr


# what `import optimum_fair` (registration) and loading a saved checkpoint must not import: the calibration
# path (its text data: datasets, pyarrow), the evaluation harness and the exporters
HEAVY = ["datasets", "pyarrow", "lm_eval", "gguf", "compressed_tensors", "optimum_fair.data",
         "optimum_fair.pipeline.calibration", "optimum_fair.pipeline.stage1", "optimum_fair.pipeline.stage2",
         "optimum_fair.export", "optimum_fair.eval.evaluate", "optimum_fair.integrations.harness",
         "optimum_fair.cli"]
V1_CHECKPOINT = str(Path(__file__).parent / "fixtures" / "v1_w4a4_flatquant")


def _loaded_heavy(code):
    out = _run(code + f"\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_package_import_leaves_the_heavy_modules_out():
    assert _loaded_heavy("import optimum_fair") == "[]"


def test_loading_a_checkpoint_leaves_the_heavy_modules_out():
    code = ("import optimum_fair\nfrom transformers import AutoModel\n"
            f"model = AutoModel.from_pretrained({V1_CHECKPOINT!r})\n"
            "assert optimum_fair.calibration_result(model).reloaded")
    assert _loaded_heavy(code) == "[]"


def test_the_heavy_check_can_fail():
    # the calibration entry point does import the data path (the two checks above could see it)
    assert "'optimum_fair.data'" in _loaded_heavy("from optimum_fair.pipeline import calibrate")
