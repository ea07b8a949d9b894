"""The release a user installs: `python -m build` makes an sdist and a wheel that `twine check --strict` accepts,
the wheel holds the package and nothing else, and, installed into a clean virtual environment, it imports from
outside the repository and runs the README's "Use" example with the same numbers as this checkout.

The build is `python -m build --no-isolation`: it uses this environment's setuptools (the `test` extra asks for one
that builds wheels by itself) instead of downloading one into an isolated environment, so the test needs no
package index. `pip install -e .` still builds in isolation and so checks `[build-system] requires`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = "https://github.com/unroll-dev/unroll"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def source_version() -> str:
    """`__version__` as unroll/__init__.py assigns it (read, not imported)."""
    tree = ast.parse((ROOT / "unroll" / "__init__.py").read_text(encoding="utf-8"))
    (version,) = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                  and [getattr(target, "id", None) for target in node.targets] == ["__version__"]
                  and isinstance(node.value, ast.Constant)]
    return str(version)


def readme_use_example() -> str:
    """The python block of the README's "Use" section."""
    use = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"^```python\n(.*?)^```$", use, flags=re.S | re.M)
    return str(block)


def run(command: List[str], cwd: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def clean_env(**extra: str) -> Dict[str, str]:
    """This environment without anything that would put the repository or a user site on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", **ONE_THREAD, **extra}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], out, clean_env())
    (sdist,), (wheel,) = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    return {"sdist": sdist, "wheel": wheel, "out": out}


def test_twine_check_strict_accepts_both(dist: Dict[str, Path]) -> None:
    result = run([sys.executable, "-m", "twine", "check", "--strict", str(dist["sdist"]), str(dist["wheel"])],
                 dist["out"], clean_env())
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_wheel_holds_the_package_and_nothing_else(dist: Dict[str, Path]) -> None:
    version = source_version()
    assert dist["wheel"].name == f"unroll-{version}-py3-none-any.whl"
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = HeaderParser().parsestr(wheel.read(f"unroll-{version}.dist-info/METADATA").decode())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "unroll").rglob("*.py")}
    assert modules and modules | {"unroll/py.typed"} == {name for name in names if name.startswith("unroll/")}
    assert all(name.startswith(("unroll/", f"unroll-{version}.dist-info/")) for name in names), names
    assert not any(part in name for name in names for part in ("tests/", "examples/", "benchmarks/", "__pycache__"))
    assert metadata["Version"] == version
    assert metadata.get_all("Project-URL") == [f"Source, {REPOSITORY}",
                                               f"Documentation, {REPOSITORY}/blob/main/docs/README.md",
                                               f"Changelog, {REPOSITORY}/blob/main/CHANGELOG.md"]
    # The index page shows the README as the project's description.
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert str(metadata.get_payload()).strip() == (ROOT / "README.md").read_text(encoding="utf-8").strip()


def test_sdist_holds_what_a_build_from_it_needs(dist: Dict[str, Path]) -> None:
    top = f"unroll-{source_version()}"
    assert dist["sdist"].name == f"{top}.tar.gz"
    with tarfile.open(dist["sdist"]) as sdist:
        names = set(sdist.getnames())
    assert {f"{top}/{name}" for name in ("LICENSE", "README.md", "pyproject.toml", "unroll/__init__.py",
                                         "unroll/py.typed")} <= names


def test_readme_links_work_on_the_index_page() -> None:
    """An index page has no repository around the README: every link must be absolute, and those into the
    repository must name files (and headings) that exist in this checkout."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert len(targets) >= 10
    for target in targets:
        assert target.startswith("https://"), f"README.md links to {target!r}: dead on an index page"
        if not target.startswith(REPOSITORY + "/"):
            continue
        parts = re.fullmatch(rf"{re.escape(REPOSITORY)}/(blob|tree)/(\w+)/([^#]+)(?:#.*)?", target)
        assert parts, f"README.md links to {target!r}: not a file or folder of the repository"
        kind, branch, path = parts.groups()
        assert branch == "main" and (ROOT / path).is_file() == (kind == "blob") and (ROOT / path).exists(), target
        if "#" in target:
            anchor = target.split("#", 1)[1]
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(encoding="utf-8"), flags=re.M)
            anchors = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
            assert anchor in anchors, f"{target}: no heading for #{anchor} in {path}"


def test_wheel_installs_and_runs_the_readme_example_outside_the_repository(dist: Dict[str, Path],
                                                                            tmp_path: Path) -> None:
    # A clean venv. Torch comes from this environment through a .pth file (which only appends its folders to
    # sys.path, after the venv's own site-packages, and runs none of its .pth files, so not the editable install
    # of this checkout); `--system-site-packages` would give the base interpreter's packages, not this venv's.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, clean_env())
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                    clean_env()).stdout.strip())
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "this_environment.pth").write_text("".join(f"{path}\n" for path in here))
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         str(dist["wheel"])], tmp_path, clean_env())

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([str(python), "-c", "import json, unroll; print(json.dumps([unroll.__file__, unroll.__version__]))"],
                work, clean_env())
    installed_file, installed_version = json.loads(where.stdout)
    assert Path(installed_file).resolve().is_relative_to(site.resolve()), installed_file
    assert not Path(installed_file).resolve().is_relative_to(ROOT)
    assert installed_version == source_version() == dist["wheel"].name.split("-")[1]

    (work / "use.py").write_text(readme_use_example(), encoding="utf-8")
    installed = run([str(python), "use.py"], work, clean_env()).stdout
    # The same example against this checkout (one thread both times: same seed, same numbers).
    checkout = run([sys.executable, "use.py"], work, clean_env(PYTHONPATH=str(ROOT))).stdout
    assert re.fullmatch(r"generator loss -?\d+\.\d{4}, generator gradient norm \d+\.\d{4}\n", installed), installed
    assert installed == checkout


def test_the_changelog_releases_the_source_version_with_a_date() -> None:
    """Keep a Changelog: an [Unreleased] section on top, then dated releases newest first, the newest being the
    version the package builds, each heading linked to its comparison at the bottom."""
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[([^\]]+)\](.*)$", text, flags=re.MULTILINE)
    assert headings[0] == ("Unreleased", "")
    releases = headings[1:]
    assert releases and releases[0][0] == source_version()
    dates = []
    for version, rest in releases:
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
        match = re.fullmatch(r" - (\d{4}-\d{2}-\d{2})", rest)
        assert match, f"release {version} has no date: {rest!r}"
        dates.append(match.group(1))
    versions = [tuple(int(part) for part in version.split(".")) for version, _ in releases]
    assert versions == sorted(versions, reverse=True) and dates == sorted(dates, reverse=True)
    links = dict(re.findall(r"^\[([^\]]+)\]: (\S+)$", text, flags=re.MULTILINE))
    assert set(links) == {name for name, _ in headings}
    assert all(url.startswith(REPOSITORY) for url in links.values())
