"""The built wheel: what it contains, and that it installs and runs for an unprivileged user.

The wheel is built from this tree and installed, without its dependencies, into a fresh
virtual environment that borrows the dependencies of the environment running the tests (a
``.pth`` line), so nothing is downloaded. The installed entry point then runs as ``nobody``
when the tests run as root, as it would in the image (uid 10001).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "service" / "backpack_vault" / "vault" / "policies"
NOBODY = 65534


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    home: Path

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


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    """The wheel built from this tree, installed into a fresh venv readable by anyone."""
    root = Path(tempfile.mkdtemp(prefix="bv-wheel-"))
    root.chmod(0o755)  # nobody must reach the venv
    try:
        dist, venv, home = root / "dist", root / "venv", root / "home"
        home.mkdir(mode=0o777)
        home.chmod(0o777)
        isolation = (
            [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
        )
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
        subprocess.run(
            [*pip, "wheel", "--no-deps", *isolation, "--wheel-dir", str(dist), str(REPO)],
            check=True,
            timeout=240,
        )
        (wheel,) = dist.glob("backpack_vault-*.whl")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = venv / "bin" / "python"
        subprocess.run(
            [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
            check=True,
            timeout=120,
        )
        # Dependencies come from the environment running the tests, found after the wheel.
        target = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (Path(target) / "zz_test_dependencies.pth").write_text(
            sysconfig.get_paths()["purelib"] + "\n"
        )
        yield Installed(wheel, venv, home)
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
