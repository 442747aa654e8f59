"""The folder mapping of pyproject.toml: every package folder installs under
``bastionmq.*``, and nothing else becomes a top-level module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP = "bastionmq"
#: Folders at the root that never install: tests, benchmarks, and build output.
NOT_INSTALLED = {"tests", "benchmarks", "docs", "etc", "build", "dist"}
#: Root folders that must not be importable on their own.
FOLDER_NAMES = ("broker", "listeners", "auth", "acl", "ops")
TIMEOUT = 300


def setuptools_config() -> dict:
    with open(REPO / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["tool"]["setuptools"]


def package_folders() -> dict[str, Path]:
    """Every folder at the root holding an __init__.py, recursively, by the
    package name it installs as: ``broker/store`` -> ``bastionmq.broker.store``."""
    found = {}
    for root in sorted(REPO.iterdir()):
        if not root.is_dir() or root.name.startswith((".", "_")) or root.name in NOT_INSTALLED \
                or root.name.endswith(".egg-info"):
            continue
        for init in sorted(root.rglob("__init__.py")):
            folder = init.parent
            parts = folder.relative_to(REPO).parts
            if any(part.startswith((".", "_")) for part in parts):
                continue
            name = TOP if parts[0] == TOP else f"{TOP}.{parts[0]}"
            found[".".join((name, *parts[1:]))] = folder
    return found


def folder_of(package: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools looks for ``package``: the longest mapped prefix, then the rest."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dir:
            return REPO / package_dir[prefix] / Path(*parts[cut:])
    root = package_dir.get("", "")
    return REPO / root / Path(*parts)


def source_tree_copy(destination: Path) -> Path:
    """The checkout without its build output, so that building writes nothing into it."""
    ignore = shutil.ignore_patterns(".git", ".pytest_cache", ".benchmarks", "__pycache__",
                                    "*.egg-info", "build", "dist", ".venv")
    return Path(shutil.copytree(REPO, destination / "src", ignore=ignore))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    work = tmp_path_factory.mktemp("wheel")
    source = source_tree_copy(work)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(work / "out"),
         str(source)], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    [built] = (work / "out").glob("bastionmq-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


# ------------------------------------------------------------------ pyproject.toml


def test_the_folder_scan_sees_the_architecture():
    # Guards the scan itself: if it found nothing, the tests below would prove nothing.
    assert {TOP, f"{TOP}.broker", f"{TOP}.listeners", f"{TOP}.auth"} <= set(package_folders())


def test_every_package_folder_is_listed_in_pyproject():
    config = setuptools_config()
    listed = set(config["packages"])
    package_dir = config["package-dir"]
    for package, folder in package_folders().items():
        assert package in listed, \
            f"{folder.relative_to(REPO)}/ holds an __init__.py but {package} is not in " \
            "[tool.setuptools] packages: it would be missing from the wheel"
        assert folder_of(package, package_dir) == folder, \
            f"[tool.setuptools.package-dir] does not map {package} to {folder.relative_to(REPO)}/"
    for folder in {package.split(".")[1] for package in package_folders() if package != TOP}:
        assert package_dir.get(f"{TOP}.{folder}") == folder


def test_every_listed_package_is_an_existing_folder():
    config = setuptools_config()
    for package in config["packages"]:
        folder = folder_of(package, config["package-dir"])
        assert (folder / "__init__.py").is_file(), \
            f"{package} is listed in pyproject.toml but {folder.relative_to(REPO)}/ " \
            "has no __init__.py"
    for package, folder in config["package-dir"].items():
        assert package == TOP or package.startswith(f"{TOP}."), package
        assert (REPO / folder).is_dir(), f"package-dir maps {package} to a missing {folder}/"


# ------------------------------------------------------------------ top-level names


def test_folder_names_are_not_importable_top_level_modules(tmp_path):
    probe = (
        "import importlib.util, sys\n"
        "import bastionmq, bastionmq.broker.codec, bastionmq.listeners.base, bastionmq.auth.chain\n"
        f"names = {FOLDER_NAMES!r}\n"
        "found = [name for name in names if importlib.util.find_spec(name) is not None]\n"
        "loaded = [name for name in names if name in sys.modules]\n"
        "print(found, loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


def test_the_installed_distribution_exposes_only_bastionmq():
    top_level = distribution("bastionmq").read_text("top_level.txt")
    if top_level is not None:  # written by setuptools; absent from some installers
        assert top_level.split() == [TOP]


def test_the_wheel_holds_only_the_bastionmq_package(wheel):
    top_level = {name.split("/", 1)[0] for name in wheel.namelist()}
    dist_info = {name for name in top_level if name.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top_level - dist_info == {TOP}
    [info] = dist_info
    assert wheel.read(f"{info}/top_level.txt").decode().split() == [TOP]


def test_the_wheel_contains_every_module_and_the_type_marker(wheel):
    names = set(wheel.namelist())
    for required in ("bastionmq/broker/codec.py", "bastionmq/listeners/base.py",
                     "bastionmq/auth/chain.py", "bastionmq/py.typed"):
        assert required in names
    # Every source file of every package folder, at its installed place.
    for package, folder in package_folders().items():
        for module in folder.glob("*.py"):
            installed = "/".join((*package.split("."), module.name))
            assert installed in names, \
                f"{folder.relative_to(REPO)}/{module.name} is not in the wheel"


def test_the_wheel_carries_the_shipped_config_as_package_data(wheel):
    # bastionmq/bastionmq.conf is a symbolic link to etc/bastionmq.conf, the
    # one file to edit; the wheel holds its contents (config show-default).
    assert wheel.read("bastionmq/bastionmq.conf") == (REPO / "etc" / "bastionmq.conf").read_bytes()
    assert "bastionmq/builtin.conf" in wheel.namelist()


def test_the_packaged_config_is_the_shipped_file():
    from importlib import resources
    packaged = resources.files("bastionmq").joinpath("bastionmq.conf")
    assert packaged.read_bytes() == (REPO / "etc" / "bastionmq.conf").read_bytes()


def test_the_wheel_installs_the_console_script(wheel):
    [entry_points] = [name for name in wheel.namelist()
                      if name.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "[console_scripts]" in text
    assert "bastionmq = bastionmq.cli:main" in text


@pytest.mark.parametrize("ci, outcome", [("true", "fail"), ("", "skip")])
def test_a_missing_outside_tool_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path, ci,
                                                                outcome):
    from mosquitto_peer import tool
    monkeypatch.setenv("PATH", str(tmp_path))  # no mosquitto_pub on it
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected) as info:
        tool("mosquitto_pub")
    assert "apt-get install mosquitto-clients" in str(info.value)
