"""Device profiles: the built-ins load and carry sourced figures; bad files fail with one line naming
the key; user folders override built-ins."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.errors import InputError
from edgekit.targets import get_profile, load_profile, load_profiles, profile_dirs
from edgekit.targets.profiles import ALLOWED_UNITS, ENV_VAR, builtin_dir
from tests.conftest import REPO

REQUIRED_DEVICES = ("raspberry-pi-5", "jetson-orin-nano", "iphone-15-pro", "apple-m2", "snapdragon-8-gen-3",
                    "pixel-8", "x86-laptop", "cloud-a100", "cloud-h100")

GOOD = """\
name = "{name}"
kind = "cpu"
description = "test board"
runtimes = ["llamacpp"]
formats = ["gguf"]

[figures.memory_bandwidth]
value = 10
unit = "GB/s"
source = "test"

[figures.compute_f32]
value = 100
unit = "GFLOPS"
source = "test"

[figures.ram]
value = 4
unit = "GB"
source = "test"

[figures.memory_budget]
value = 0.5
unit = "fraction"
source = "assumption: test"

[figures.storage_read]
value = 50
unit = "MB/s"
source = "test"
"""


def write(folder: Path, name: str, text: str | None = None, stem: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem or name}.toml"
    path.write_text(text if text is not None else GOOD.format(name=name))
    return path


@pytest.fixture(autouse=True)
def _no_user_profiles(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_builtin_dir_is_repository_profiles():
    assert builtin_dir() == REPO / "profiles"
    assert profile_dirs()[0] == builtin_dir()


def test_all_builtin_profiles_load_and_required_devices_present():
    profiles = load_profiles()
    assert len(profiles) == len(list((REPO / "profiles").glob("*.toml")))
    for name in REQUIRED_DEVICES:
        assert name in profiles, name


@pytest.mark.parametrize("name", REQUIRED_DEVICES)
def test_builtin_figures_are_sourced_and_sane(name):
    p = get_profile(name)
    assert p.name == name and Path(p.path).stem == name
    for key, fig in p.figures.items():
        assert fig.unit in ALLOWED_UNITS[key], (name, key)
        assert fig.source.strip(), (name, key)
        assert fig.value >= 0
    for key in ("memory_bandwidth", "ram", "memory_budget", "storage_read"):
        assert p.get(key) is not None, (name, key)
    assert p.get("compute_f32") or p.get("compute_f16")
    if p.is_cloud():
        for key in ("network_rtt", "price_input", "price_output", "server_ttft"):
            assert p.get(key) is not None, (name, key)
    # SI conversions land in physically plausible ranges
    assert 1e9 < p.peak_bandwidth_bytes_s() < 1e13
    assert p.bandwidth_bytes_s() <= p.peak_bandwidth_bytes_s()
    assert 1e10 < p.compute_flops() < 1e16
    assert 1e9 <= p.ram_bytes() <= 1e12
    assert 0 < p.memory_budget_bytes() <= p.ram_bytes()
    assert 1e7 < p.storage_read_bytes_s() < 1e11
    # every runtime listed has a format listed that it takes
    takes = {"llamacpp": "gguf", "onnxruntime": "onnx", "coreml": "coreml"}
    assert all(takes[r] in p.formats for r in p.runtimes)


def test_si_conversions():
    pi = get_profile("raspberry-pi-5")
    assert pi.bandwidth_bytes_s() == pytest.approx(pi.get("copy_bandwidth").value * 1e9)  # copy beats peak
    assert pi.peak_bandwidth_bytes_s() == pytest.approx(17.1e9)
    assert pi.compute_flops("int8") == pytest.approx(pi.get("compute_int8").value * 1e12)  # TOPS
    assert pi.memory_budget_bytes() == pytest.approx(8e9 * 0.8)
    assert pi.storage_read_bytes_s() == pytest.approx(90e6)
    laptop = get_profile("x86-laptop")
    assert laptop.get("compute_f16") is None
    assert laptop.compute_flops("f16") == laptop.compute_flops("f32")  # falls back
    assert laptop.bandwidth_bytes_s() == laptop.peak_bandwidth_bytes_s()  # no copy figure
    assert get_profile("cloud-h100").is_cloud() and not laptop.is_cloud()


def test_good_test_profile_loads(tmp_path):
    p = load_profile(write(tmp_path, "board"))
    assert p.runtimes == ("llamacpp",) and p.figures["ram"].value == 4.0


def _error(path: Path) -> str:
    with pytest.raises(InputError) as info:
        load_profile(path)
    msg = info.value.one_line()
    assert "\n" not in msg and str(path) in msg
    return msg


def test_unknown_top_level_key(tmp_path):
    msg = _error(write(tmp_path, "board", GOOD.format(name="board") + 'vendor = "x"\n'))
    assert "vendor" in msg and "unknown key" in msg


def test_unknown_figure(tmp_path):
    text = GOOD.format(name="board") + '[figures.tdp]\nvalue = 5\nunit = "W"\nsource = "x"\n'
    msg = _error(write(tmp_path, "board", text))
    assert "figures.tdp" in msg and "unknown figure" in msg


def test_unknown_key_inside_figure(tmp_path):
    text = GOOD.format(name="board").replace('unit = "GB"\n', 'unit = "GB"\nnote = "x"\n')
    msg = _error(write(tmp_path, "board", text))
    assert "figures.ram.note" in msg and "unknown key" in msg


def test_missing_unit(tmp_path):
    text = GOOD.format(name="board").replace('unit = "MB/s"\n', "")
    msg = _error(write(tmp_path, "board", text))
    assert "figures.storage_read.unit" in msg and "missing" in msg


def test_wrong_unit(tmp_path):
    text = GOOD.format(name="board").replace('unit = "GB/s"', 'unit = "TB/s"')
    msg = _error(write(tmp_path, "board", text))
    assert "figures.memory_bandwidth.unit" in msg and "TB/s" in msg and "GB/s" in msg


def test_missing_source(tmp_path):
    text = GOOD.format(name="board").replace('source = "assumption: test"', 'source = "  "')
    msg = _error(write(tmp_path, "board", text))
    assert "figures.memory_budget.source" in msg


def test_name_differs_from_file_stem(tmp_path):
    msg = _error(write(tmp_path, "board", stem="other-board"))
    assert "name" in msg and "'board'" in msg and "'other-board'" in msg


def test_bad_kind(tmp_path):
    msg = _error(write(tmp_path, "board", GOOD.format(name="board").replace('kind = "cpu"', 'kind = "fpga"')))
    assert "kind" in msg and "fpga" in msg


def test_missing_required_figure(tmp_path):
    text = GOOD.format(name="board").replace("[figures.ram]", "[figures.copy_bandwidth]").replace('"GB"', '"GB/s"')
    msg = _error(write(tmp_path, "board", text))
    assert "figures.ram" in msg and "missing required figure" in msg


def test_cloud_requires_network_and_price(tmp_path):
    msg = _error(write(tmp_path, "board", GOOD.format(name="board").replace('kind = "cpu"', 'kind = "cloud"')))
    assert "figures.network_rtt" in msg


def test_bad_values(tmp_path):
    budget = GOOD.format(name="board").replace("value = 0.5", "value = 1.5")
    assert "figures.memory_budget.value" in _error(write(tmp_path, "board", budget))
    text = GOOD.format(name="board").replace("value = 4\n", 'value = "4"\n')
    assert "figures.ram.value" in _error(write(tmp_path, "board", text))
    runtime = GOOD.format(name="board").replace('["llamacpp"]', '["llama.cpp"]')
    assert "runtimes" in _error(write(tmp_path, "board", runtime))


def test_invalid_toml(tmp_path):
    msg = _error(write(tmp_path, "board", "name = \n"))
    assert "not valid TOML" in msg


def test_extra_dir_overrides_and_extends(tmp_path):
    user = tmp_path / "mine"
    text = GOOD.format(name="raspberry-pi-5").replace("value = 10\n", "value = 6.5\n")
    write(user, "raspberry-pi-5", text)
    write(user, "my-board")
    profiles = load_profiles([user])
    assert profiles["raspberry-pi-5"].get("memory_bandwidth").value == 6.5
    assert profiles["raspberry-pi-5"].path == str(user / "raspberry-pi-5.toml")
    assert "my-board" in profiles and "cloud-h100" in profiles
    assert get_profile("my-board", extra_dirs=[str(user)]).description == "test board"


def test_env_var_dirs_override_builtins_and_extra_overrides_env(tmp_path, monkeypatch):
    env_a, env_b, extra = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write(env_a, "pixel-8", GOOD.format(name="pixel-8").replace("value = 4\n", "value = 1\n"))
    write(env_b, "pixel-8", GOOD.format(name="pixel-8").replace("value = 4\n", "value = 2\n"))
    write(env_b, "env-board")
    monkeypatch.setenv(ENV_VAR, f"{env_a}{__import__('os').pathsep}{env_b}")
    assert profile_dirs([extra]) == [builtin_dir(), env_a, env_b, extra]
    assert get_profile("pixel-8").get("ram").value == 2  # later env folder wins
    assert "env-board" in load_profiles()
    write(extra, "pixel-8", GOOD.format(name="pixel-8").replace("value = 4\n", "value = 3\n"))
    assert get_profile("pixel-8", extra_dirs=[extra]).get("ram").value == 3


def test_missing_user_dir_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nope"))
    with pytest.raises(InputError, match="does not exist"):
        load_profiles()


def test_bad_user_profile_is_reported(tmp_path):
    write(tmp_path, "board", GOOD.format(name="board").replace('unit = "GB"', 'unit = "GiB"'))
    with pytest.raises(InputError, match="figures.ram.unit"):
        load_profiles([tmp_path])


def test_unknown_name_lists_known_names():
    with pytest.raises(InputError) as info:
        get_profile("raspberry-pi-9")
    msg = info.value.one_line()
    assert "raspberry-pi-9" in msg
    for name in REQUIRED_DEVICES:
        assert name in msg


def test_get_profile_accepts_a_toml_path(tmp_path):
    path = write(tmp_path, "board")
    assert get_profile(str(path)).name == "board"
