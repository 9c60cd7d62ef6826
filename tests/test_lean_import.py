import subprocess
import sys

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
