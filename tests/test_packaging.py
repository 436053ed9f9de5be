"""Layout and packaging: edgekit.converters / edgekit.runtimes import from an editable install and from
a built wheel in a fresh venv; the CLI's --help and the runtime wrapper never import torch."""

from __future__ import annotations

import subprocess
import sys
import venv
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
