"""Layout and packaging: edgekit.converters / edgekit.runtimes import from an editable install and from
a built wheel in a fresh venv; the CLI's --help and the runtime wrapper never import torch; every
third-party import of the code is declared in the extra of its path (pyproject.toml), every package folder
ships, and requirements.txt pins exactly the [dev] set. (`make wheel-check` installs the wheel with its
extras into fresh venvs and runs them: .ci/wheel_check.sh.)"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
import venv
from functools import lru_cache
from pathlib import Path

import pytest

from tests.conftest import REPO

CHECK = (
    "import importlib.metadata as md, edgekit, edgekit.converters, edgekit.runtimes;"
    "print(edgekit.converters.__file__);"
    "print(sorted(e.name for e in md.entry_points(group='edgekit.exporters')));"
    "print(sorted(e.name for e in md.entry_points(group='edgekit.runtimes')))"
)


def test_editable_install_maps_top_level_folders():
    import edgekit.converters
    import edgekit.runtimes

    assert Path(edgekit.converters.__file__).parent == REPO / "converters"
    assert Path(edgekit.runtimes.__file__).parent == REPO / "runtimes"


def test_no_generic_top_level_names():
    out = subprocess.run([sys.executable, "-c", "import converters"], capture_output=True, text=True, cwd="/")
    assert out.returncode != 0, "a top-level 'converters' module must not be installed"


def test_wheel_in_fresh_venv(tmp_path):
    import shutil

    # build from a copy: building in place rewrites edgekit_ml.egg-info in the repository, which then
    # shadows the editable install's entry points for everything run from the repository root
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "out", "*.egg-info", "__pycache__",
                                                              "build", "dist", "artifacts"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
                   check=True, capture_output=True)
    wheel = next(dist.glob("edgekit_ml-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    out = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, cwd=str(tmp_path), check=True).stdout.split("\n")
    assert "site-packages/edgekit/converters/__init__.py" in out[0]
    assert "gguf" in out[1] and "llamacpp" in out[2]
    listing = subprocess.run([str(py), "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True).stdout
    assert "edgekit/data/eval.txt" in listing and "edgekit/runtimes/llamacpp.py" in listing
    assert "edgekit/profiles_data/raspberry-pi-5.toml" in listing and "edgekit/targets/predict.py" in listing


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_help_does_not_import_torch():
    mods = _modules_after("import sys; sys.argv=['edgekit','--help']\nfrom edgekit.cli import main\ntry: main()\nexcept SystemExit: pass")
    assert "edgekit.cli" in mods
    assert "torch" not in mods and "transformers" not in mods


def test_runtime_wrapper_does_not_import_torch(tmp_path):
    from edgekit.converters.gguf import GGUFExporter
    from tests.conftest import tiny_model

    GGUFExporter().export(tiny_model(), tmp_path)
    mods = _modules_after(f"import edgekit\ns = edgekit.load({str(tmp_path / 'model.gguf')!r})\nprint(s.generate('Hi', max_tokens=3))")
    assert "llama_cpp" in mods
    assert "torch" not in mods


def test_registries_list_builtins_and_accept_plugins():
    from edgekit.errors import UnknownPluginError
    from edgekit.registry import EXPORTERS, PASSES, RUNTIMES, Registry

    assert {"f16", "q8_0", "q4_0", "int4"} <= set(PASSES.names())
    assert "gguf" in EXPORTERS.names() and "llamacpp" in RUNTIMES.names()
    reg = Registry("thing", "edgekit.test-group")

    @reg.register("mine")
    class Mine:
        pass

    assert reg.get("mine") is Mine and reg.names() == ["mine"]
    with pytest.raises(UnknownPluginError) as err:
        reg.get("other")
    assert "Known: mine" in err.value.one_line()



def test_runtime_wrapper_runs_onnx_without_torch(tmp_path):
    from edgekit.converters.onnx import ONNXExporter
    from tests.conftest import tiny_model

    ONNXExporter().export(tiny_model(), tmp_path)
    mods = _modules_after(f"import edgekit\ns = edgekit.load({str(tmp_path)!r})\nprint(s.generate('Hi', max_tokens=3))")
    assert "onnxruntime" in mods
    assert "torch" not in mods and "transformers" not in mods


# ------------------------------------------------------------------ declared dependencies vs. imports

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FIRST_PARTY = {"edgekit", "converters", "runtimes", "tests", "conftest", "tiny_archs", "tiny_tokenizers"}
# the runtime path: `import edgekit`, edgekit.load, the CLI; base dependencies only
BASE_ONLY = ["edgekit/__init__.py", "edgekit/errors.py", "edgekit/registry.py", "edgekit/session.py",
             "edgekit/manifest.py", "edgekit/contracts.py", "edgekit/formats/*.py", "edgekit/cli.py",
             "runtimes/__init__.py"]
# each runtime backend: base + its own extra, which [runtime] / [coreml] / [optimum] install. Another module
# of runtimes/ is a helper: covered by the extra of every backend that imports it (base alone if none does).
RUNTIME_EXTRA = {"llamacpp.py": "llamacpp", "onnxruntime.py": "onnx", "onnxruntime_encoder.py": "onnx",
                 "coreml.py": "coreml", "optimum_onnx.py": "optimum", "ort_genai.py": "genai"}
# library modules that drive foreign tools, outside [convert]: the extra that covers them
FOREIGN_EXTRA = {"runtimes/optimum_onnx.py": "optimum", "runtimes/ort_genai.py": "genai", "edgekit/hf_export.py": "all",
                 # the server: its own extra, so an app installs it without torch
                 **{f"edgekit/serve/{m}.py": "serve" for m in ("__init__", "app", "pool", "schemas", "metrics", "stops")},
                 "edgekit/httpbody.py": "serve",
                 "edgekit/sweep/executors.py": "sweep",  # Ray, only for --ray  # shared by serve and agent (both extras hold fastapi)
                 # the device side of `edgekit agent`: its own extra, no torch (client / devices / remote run on the host)
                 **{f"edgekit/agent/{m}.py": "agent" for m in ("__init__", "app", "jobs", "spec", "store", "worker", "auth",
                                                               "device", "energy")}}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@lru_cache(maxsize=None)
def _requirements(extra: str | None, seen: frozenset = frozenset()) -> set[str]:
    """Canonical distribution names that base + ``extra`` install directly (self-references resolved)."""
    from packaging.requirements import Requirement

    reqs = list(PYPROJECT["project"]["dependencies"])
    if extra is not None:
        reqs += PYPROJECT["project"]["optional-dependencies"][extra]
    names: set[str] = set()
    for r in map(Requirement, reqs):
        if _canon(r.name) == _canon(PYPROJECT["project"]["name"]):
            for inner in r.extras - seen:
                names |= _requirements(inner, seen | {inner})
        else:
            names.add(_canon(r.name))
    return names


def _third_party_imports(source: str) -> set[str]:
    """Top-level names of every absolute import in ``source``, lazy ones inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in FIRST_PARTY and m != "__future__"}


@lru_cache(maxsize=1)
def _import_names() -> dict[str, list[str]]:
    return md.packages_distributions()


def _undeclared(source: str, extra: str | None) -> list[str]:
    """The imports of ``source`` that no distribution of base + ``extra`` provides."""
    declared = _requirements(extra)
    dists = _import_names()
    missing = []
    for mod in sorted(_third_party_imports(source)):
        provided_by = {_canon(d) for d in dists.get(mod, [])} or {_canon(mod)}
        if not provided_by & declared:
            missing.append(f"{mod} (from {', '.join(sorted(provided_by))})")
    return missing


def _files(*patterns: str) -> list[Path]:
    files = [f for p in patterns for f in sorted(REPO.glob(p))]
    assert files, patterns
    return files


def _check(files: list[Path], extra: str | None) -> list[str]:
    return [f"{f.relative_to(REPO)}: {m} not in base + [{extra or ''}]"
            for f in files for m in _undeclared(f.read_text(encoding="utf-8"), extra)]


def test_undeclared_import_is_caught():
    # the check itself: an import no extra declares fails, a declared one passes
    assert _undeclared("def f():\n    import torch\n", None) == ["torch (from torch)"]
    assert _undeclared("import jinja2\nfrom llama_cpp import Llama\n", "llamacpp") == ["jinja2 (from jinja2)"]
    assert _undeclared("import jinja2, onnxruntime\nfrom tokenizers import Tokenizer\n", "onnx") == []
    assert _undeclared("import not_a_real_package_xyz\n", "dev") == ["not_a_real_package_xyz (from not-a-real-package-xyz)"]


def test_runtime_path_needs_base_only():
    assert _check(_files(*BASE_ONLY), None) == []


def _imports_module(source: str, module: str) -> bool:
    pkg, _, leaf = module.rpartition(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name == module for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module == module
                                                 or node.module == pkg and any(a.name == leaf for a in node.names)):
            return True
    return False


def test_each_runtime_is_covered_by_its_extra():
    backends = {f: RUNTIME_EXTRA[f.name] for f in _files("runtimes/*.py") if f.name in RUNTIME_EXTRA}
    assert len(backends) == len(RUNTIME_EXTRA), "a backend of RUNTIME_EXTRA is gone: update the table"
    problems = []
    for f, extra in backends.items():
        problems += _check([f], extra)
    for helper in _files("runtimes/*.py"):
        if helper.name == "__init__.py" or helper in backends:
            continue
        module = f"edgekit.runtimes.{helper.stem}"
        users = [extra for f, extra in backends.items() if _imports_module(f.read_text(encoding="utf-8"), module)]
        for extra in users or [None]:
            problems += _check([helper], extra)
    assert problems == []


def test_runtime_extra_installs_gguf_and_onnx_backends():
    assert _requirements("runtime") == _requirements("llamacpp") | _requirements("onnx")
    assert not {"torch", "transformers", "safetensors", "onnx"} & _requirements("runtime")


def test_convert_covers_the_library():
    # conversion reaches every module of edgekit/ and converters/; the foreign tools have their own extras
    files = _files("edgekit/**/*.py", "converters/*.py", "runtimes/*.py")
    problems = [p for f in files if str(f.relative_to(REPO)) not in FOREIGN_EXTRA for p in _check([f], "convert")]
    for rel, extra in FOREIGN_EXTRA.items():
        problems += _check([REPO / rel], extra) if (REPO / rel).exists() else []
    assert problems == []


def test_dev_covers_tests_and_benchmarks():
    assert _check(_files("tests/**/*.py", "benchmarks/*.py", "examples/*.py", ".ci/*.py"), "dev") == []


def test_every_package_folder_ships():
    setup = PYPROJECT["tool"]["setuptools"]
    folder_of = {name: Path(folder) for name, folder in setup["package-dir"].items()}
    listed = set(setup["packages"])
    missing = []
    for init in _files("edgekit/**/__init__.py", "converters/**/__init__.py", "runtimes/**/__init__.py"):
        rel = init.parent.relative_to(REPO)
        # the longest package-dir mapping that contains the folder gives its import name
        pkg, folder = max(((n, f) for n, f in folder_of.items() if rel.is_relative_to(f)), key=lambda nf: len(nf[1].parts))
        name = ".".join([pkg, *rel.relative_to(folder).parts])
        if name not in listed:
            missing.append(name)
    assert missing == [], f"add to [tool.setuptools] packages: {missing}"


REQUIREMENTS = REPO / "requirements.txt"
# pinned although nothing imports them by name: their versions matter
TRANSITIVE_PINS = {
    "huggingface-hub": "transformers 4.57 needs < 1.0",
    "protobuf": "sentencepiece_model_pb2; onnx, onnxruntime and coremltools",
    "fastapi": "llama-cpp-python[server]", "uvicorn": "llama-cpp-python[server]",
    "sse-starlette": "llama-cpp-python[server]", "starlette-context": "llama-cpp-python[server]",
    "pydantic-settings": "llama-cpp-python[server]",
    "setuptools": "the build backend (editable install without isolation)", "wheel": "the build backend",
}
# installed by the Makefile, not from requirements.txt
MAKEFILE_INSTALLS = {"llama-cpp-python": "built once into a wheelhouse without AMX"}


def _pins() -> dict[str, str]:
    from packaging.requirements import Requirement

    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            r = Requirement(line)
            assert not r.extras and not r.url, f"requirements.txt is also a constraints file: {line}"
            pins[_canon(r.name)] = str(r.specifier)
    return pins


def test_requirements_pin_exactly_the_dev_set():
    from packaging.requirements import Requirement

    pins = _pins()
    dev = _requirements("dev")
    assert sorted(dev - set(pins) - set(MAKEFILE_INSTALLS)) == [], "add a pin to requirements.txt"
    assert sorted(set(pins) - dev - set(TRANSITIVE_PINS)) == [], "requirements.txt pins what nothing needs"
    # each == pin satisfies every bound pyproject.toml declares for it
    reqs = PYPROJECT["project"]["dependencies"] + [r for v in PYPROJECT["project"]["optional-dependencies"].values() for r in v]
    for r in map(Requirement, reqs):
        pin = pins.get(_canon(r.name), "")
        if pin.startswith("=="):
            assert r.specifier.contains(pin[2:], prereleases=True), f"requirements.txt {r.name}{pin} vs pyproject {r}"
    assert pins["torch"] == "==2.13.0", "an unpinned torch pulls a multi-GB CUDA build"
