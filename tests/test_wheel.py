"""The built wheel: what it contains, and that it installs and runs for an unprivileged user.

The wheel is built from this tree and installed into a virtual environment of its own, in a
temporary directory every user can reach, wherever the checkout lives. Its dependencies are
copied into it, not downloaded and not borrowed: the installed files of every distribution
the wheel requires (and those require, transitively), taken from the environment running
the tests, so they are the versions the suite tested and nothing needs the network. pip
cannot build wheels back out of installed distributions, and an index would need the
network and could pick other versions; copying what pip installed, then ``pip check``, is
offline and exact. When the tests run as root, the installed package then runs as
``nobody`` (uid 65534), as it would in the image (uid 10001).
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "service" / "backpack_vault" / "vault" / "policies"
NOBODY = 65534
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    home: Path
    copied: tuple[str, ...]  # the distributions copied in as dependencies

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def as_unprivileged(argv: list[str]) -> list[str]:
    """The command line run as nobody when we are root; unchanged otherwise."""
    if os.geteuid() != 0:
        return argv
    if setpriv := shutil.which("setpriv"):
        ids = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        return [setpriv, *ids, *argv]
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", "nobody", "--", *argv]
    pytest.fail("running as root without setpriv or runuser: cannot drop privileges")


def run(argv: list[str], installed: Installed) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": f"{installed.bin}:/usr/bin:/bin",
        "HOME": str(installed.home),
        "LANG": "C.UTF-8",
    }
    return subprocess.run(
        as_unprivileged(argv),
        env=env,
        cwd=installed.home,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def reachable_by_others(directory: Path) -> bool:
    """Every directory from / down to ``directory`` lets other users through."""
    return all(d.stat().st_mode & stat.S_IXOTH for d in (directory, *directory.parents))


def temporary_root() -> Path:
    """A fresh directory that nobody can enter: under the temp dir, else /tmp or /var/tmp."""
    for base in (tempfile.gettempdir(), "/tmp", "/var/tmp"):  # noqa: S108 - fallbacks by name
        if Path(base).is_dir() and reachable_by_others(Path(base).resolve()):
            root = Path(tempfile.mkdtemp(prefix="bv-wheel-", dir=base))
            root.chmod(0o755)
            return root
    pytest.fail("no temporary directory that other users can enter")


def base_interpreter() -> str:
    """A Python of this version that runs with its own standard library as nobody too.

    The venv's interpreter is its base interpreter, which decides where the standard library
    comes from. The one running the tests may live where nobody cannot look (a pyenv build
    in a 0700 home), and then, if it starts at all, it runs another installation's library;
    so each candidate must report the same base prefix for nobody as for us.
    """
    probe = ["-c", "import sys; print(sys.base_prefix, 'python%d.%d' % sys.version_info[:2])"]
    candidates = [sys._base_executable, f"/usr/local/bin/{PYTHON}", f"/usr/bin/{PYTHON}"]
    for candidate in dict.fromkeys(candidates):
        if not Path(candidate).is_file():
            continue
        ours = subprocess.run([candidate, *probe], capture_output=True, text=True, check=False)
        theirs = subprocess.run(
            as_unprivileged([candidate, *probe]),
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
        same = ours.returncode == theirs.returncode == 0 and ours.stdout == theirs.stdout
        if same and ours.stdout.split()[-1] == PYTHON:
            return candidate
    pytest.fail(
        f"no {PYTHON} that uid {NOBODY} can run with its standard library: tried {candidates}"
    )


def dependencies(wheel: Path) -> list[importlib.metadata.Distribution]:
    """The installed distributions the wheel requires, transitively, with extras and markers.

    Versions are left to ``pip check`` in the new venv, which states any mismatch plainly.
    """
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    pending = [(Requirement(r), frozenset({""})) for r in metadata.get_all("Requires-Dist") or []]
    found: dict[str, tuple[importlib.metadata.Distribution, frozenset[str]]] = {}
    while pending:
        requirement, extras = pending.pop()  # extras: those asked of the requiring distribution
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": e}) for e in extras
        ):
            continue
        try:
            dist = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{requirement} is not installed here: pip install -e '.[dev]'")
        key = canonicalize_name(dist.name)
        known = found[key][1] if key in found else frozenset()
        wanted = known | {"", *requirement.extras}
        if key not in found or wanted != known:
            found[key] = (dist, wanted)
            pending += [(Requirement(r), wanted) for r in dist.requires or []]
    return [dist for dist, _ in found.values()]


def copy_installed(dist: importlib.metadata.Distribution, site: Path) -> None:
    """Copy a distribution's files (its RECORD) into ``site``; scripts outside it are left out."""
    root = Path(str(dist.locate_file(""))).resolve()
    if dist.files is None:
        pytest.fail(f"{dist.name} has no RECORD of its files: reinstall it with pip")
    for file in dist.files:
        source = Path(str(dist.locate_file(file))).resolve()
        if source.is_relative_to(root) and source.is_file():
            target = site / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    """The wheel built from this tree, in a venv of its own that anyone can read."""
    root = temporary_root()
    try:
        dist, venv, home = root / "dist", root / "venv", root / "home"
        home.mkdir()
        home.chmod(0o777)
        # The build backend is a dev dependency: build with it, offline, when it is here.
        isolation = (
            [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
        )
        subprocess.run(
            [*PIP, "wheel", "--no-deps", *isolation, "--wheel-dir", dist, REPO],
            check=True,
            timeout=240,
        )
        (wheel,) = dist.glob("backpack_vault-*.whl")
        subprocess.run([base_interpreter(), "-m", "venv", "--without-pip", venv], check=True)
        python = venv / "bin" / "python"
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        copied = dependencies(wheel)
        for dependency in copied:
            copy_installed(dependency, Path(site))
        subprocess.run(
            [*PIP, "--python", python, "install", "--no-deps", "--no-index", wheel],
            check=True,
            timeout=120,
        )
        # Every requirement of every distribution in the venv is met by what is in the venv.
        subprocess.run([*PIP, "--python", python, "check"], check=True, timeout=60)
        names = tuple(sorted(canonicalize_name(d.name) for d in copied))
        yield Installed(wheel, venv, home, names)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class TestWheel:
    def test_contains_the_package_its_policies_and_the_entry_point(
        self, installed: Installed
    ) -> None:
        """The wheel holds the package with its policy files, the console script, no tests."""
        with zipfile.ZipFile(installed.wheel) as wheel:
            names = set(wheel.namelist())
            shipped = {
                n.rsplit("/", 1)[1]: wheel.read(n)
                for n in names
                if n.startswith("backpack_vault/vault/policies/")
            }
            (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
            scripts = wheel.read(entry_points).decode()
        assert "backpack_vault/__init__.py" in names
        assert "backpack_vault/vault/setup.py" in names
        assert shipped == {p.name: p.read_bytes() for p in POLICIES.glob("*.hcl")}
        assert "backpack-vault = backpack_vault.cli:main" in scripts
        assert not [n for n in names if n.startswith(("tests/", "deploy/", "service/"))]

    def test_installed_package_runs_as_an_unprivileged_user(self, installed: Installed) -> None:
        """As nobody, the installed package imports from the venv and reads its policy files."""
        code = (
            "import backpack_vault, os, pathlib;"
            "print(os.geteuid());"
            "from backpack_vault.vault import setup as provision;"
            "from backpack_vault.config import Settings, VaultSettings, BrokerSettings,"
            " CheckSettings;"
            "s = Settings(VaultSettings(), BrokerSettings(), CheckSettings());"
            "print(pathlib.Path(backpack_vault.__file__).resolve());"
            "print(backpack_vault.__version__);"
            "print(sorted(provision.load_policy_files(s, approle_accessor='auth_approle_0')))"
        )
        result = run([str(installed.bin / "python"), "-c", code], installed)
        assert result.returncode == 0, result.stderr
        uid, where, version, policies = result.stdout.splitlines()
        assert int(uid) == (NOBODY if os.geteuid() == 0 else os.geteuid())
        assert Path(where).is_relative_to(installed.venv.resolve())
        assert version == "0.1.0"
        assert policies == str(
            sorted(
                [
                    "backpack-vault-daemon",
                    "backpack-vault-metadata-reader",
                    "backpack-vault-operator",
                    "backpack-vault-worker-templated",
                ]
            )
        )

    def test_console_script_runs_as_an_unprivileged_user(self, installed: Installed) -> None:
        """As nobody, the installed `backpack-vault --help` exits 0 and shows its commands."""
        result = run([str(installed.bin / "backpack-vault"), "--help"], installed)
        assert result.returncode == 0, result.stderr
        assert "Usage: backpack-vault" in result.stdout
        assert "keys" in result.stdout

    def test_dependencies_come_from_the_venv_alone(self, installed: Installed) -> None:
        """As nobody, the package and its dependencies load from the venv and the stdlib only."""
        code = (
            "import sys, backpack_vault.cli, httpx, hvac, nacl.signing, uvicorn, httptools,"
            " starlette.applications, apscheduler.schedulers.background, prometheus_client,"
            " structlog, stamina;"
            "roots = (sys.prefix + '/', sys.base_prefix + '/');"
            "print(sys.prefix);"
            "print(sorted({f for m in list(sys.modules.values())"
            " if (f := getattr(m, '__file__', None)) and not f.startswith(roots)}))"
        )
        result = run([str(installed.bin / "python"), "-c", code], installed)
        assert result.returncode == 0, result.stderr
        prefix, elsewhere = result.stdout.splitlines()
        assert Path(prefix) == installed.venv
        assert elsewhere == "[]"
        assert {"hvac", "pynacl", "httpx", "uvicorn", "apscheduler"} <= set(installed.copied)
        assert not {"pytest", "mypy", "ruff", "hatchling", "coverage"} & set(installed.copied)
