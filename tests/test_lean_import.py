import subprocess
import sys

CODE = """
import sys
sys.modules["transformers"] = None  # any import of transformers now fails
import importlib
for name in {modules!r}:
    importlib.import_module(name)
print("ok")
"""


def test_math_modules_import_without_transformers():
    modules = ["optimum_fair.ops", "optimum_fair.nn", "optimum_fair.calib", "optimum_fair.scoring"]
    # import the modules as files of the package without running optimum_fair/__init__ registration
    code = "import types, sys, pathlib\n" \
        "import importlib.util\n" \
        "spec = importlib.util.find_spec('optimum_fair')\n" \
        "pkg = types.ModuleType('optimum_fair'); pkg.__path__ = list(spec.submodule_search_locations)\n" \
        "sys.modules['optimum_fair'] = pkg\n" + CODE.format(modules=modules)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_package_import_registers_method():
    code = ("import optimum_fair\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
            "assert AUTO_QUANTIZER_MAPPING['fair_calib'].__name__ == 'FairCalibHfQuantizer'\n"
            "assert AUTO_QUANTIZATION_CONFIG_MAPPING['fair_calib'] is optimum_fair.FairCalibConfig\n"
            "optimum_fair.registration.register()  # second call is harmless\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
