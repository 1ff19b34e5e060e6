"""Every example in README.md and docs/*.md runs: docs that are true, checked like doctests.

The convention (the README's "Development" section says it in short):

- Every fenced block names its language. ``sh``/``bash``/``shell``/``console`` and
  ``python``/``py`` blocks are examples and run; ``hcl`` blocks are written to Vault as
  policies and ``toml`` blocks are loaded as backpack-vault config files; ``text`` and
  ``mermaid`` blocks are not examples. A fence with no language or another one fails
  :func:`test_every_block_runs_or_says_why_not`.
- A block that cannot run here (it needs a Kubernetes cluster, Docker, or serves until
  Ctrl-C) has a marker with the reason on a line before it, blank lines between allowed::

      <!-- example: skip (serves until Ctrl-C) -->

  An unmarked block that fails fails its file's test, with the file, the line, the
  block and what it printed.
- The blocks of one file run in order as one terminal session, as a reader would paste
  them: one ``bash`` (``set -euo pipefail``) on a pseudo-terminal, each shell block
  sourced into it, each Python block run as ``python`` in it, so variables and the
  working directory carry over. ``console`` blocks run their ``$ `` lines; their output
  lines are not compared.

What a session has, as an operator's or a worker's host would:

- A fresh OpenBao dev server (each file starts from an empty Vault, since the docs use
  the default mount, prefixes and policy names), the daemon on it (in-process, real
  HTTP), and the suite's sandbox exchange, reset for each file.
- The addresses the docs use point at those servers: ``https://vault.internal:8200`` and
  ``https://vault:8200`` at OpenBao, ``http://backpack-vault:8280`` at the daemon,
  ``https://api.backpack.exchange`` and ``localhost:8300``/``127.0.0.1:8300`` at the
  sandbox (Python blocks that use ccxt get its Backpack URLs pointed there too).
- Placeholders filled in: ``VAULT_TOKEN=...`` is the dev server's root token (an
  administrator's); an API key like ``'zDIJ...Y0A='`` and ``<public key>`` are one key
  "made in the web UI", registered at the sandbox. Its secret is typed at the hidden
  prompt of ``keys add``, is in ``./secret.txt``, and in ``BACKPACK_API_KEY`` /
  ``BACKPACK_API_SECRET``.
- The environment: ``VAULT_ADDR``, ``VAULT_TOKEN`` (root), ``WORKER_TOKEN`` (a token with
  ``policy worker scalper --copy`` and the read-only, order and cancel instructions),
  ``BACKPACK_VAULT_DAEMON_URL``, ``BACKPACK_VAULT_BACKPACK_URL`` (the sandbox); ``HOME``
  in a temporary directory whose ``.curlrc`` makes ``curl`` fail on an HTTP error.
- ``/run/...`` and ``/var/run/...`` paths are under a temporary directory;
  ``/var/run/secrets/vault-token`` holds the worker token.
- Stand-ins for the programs a bot would be: ``freqtrade`` on PATH and ``my_bot.py`` in
  the working directory check that the pair they get is a working one (the secret derives
  the key), and ``vault`` is OpenBao's ``bao``.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from backpack_vault.config import BrokerSettings, CheckSettings, Settings, VaultSettings, load
from backpack_vault.core.keys import KeyPair, generate_pair
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault, bao_binary
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.vault.setup import READ_ONLY_INSTRUCTIONS, render_worker_policy

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent
SESSION_TIMEOUT_S = 90.0

SHELL = frozenset({"sh", "bash", "shell", "console"})
PYTHON = frozenset({"python", "py"})
POLICY = frozenset({"hcl"})
CONFIG = frozenset({"toml"})
INERT = frozenset({"text", "mermaid"})
RUNNABLE = SHELL | PYTHON | POLICY | CONFIG

FENCE = re.compile(r"^(?P<indent> {0,12})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")
MARKER = re.compile(r"^\s*<!--\s*example:(?P<body>.*?)-->\s*$")
SKIP = re.compile(r"^skip \((?P<reason>.*\S.*)\)$")
PROMPT = b"API secret (input hidden):"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
DONE = "@@example {} done@@"


# -- reading the blocks ----------------------------------------------------------------------


def shown(doc: Path) -> str:
    """A doc's path as messages name it: relative to the repository."""
    return str(doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc)


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None = None  # the reason, when marked

    @property
    def where(self) -> str:
        return f"{shown(self.doc)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in RUNNABLE and self.skip is None


@dataclass(frozen=True)
class Parsed:
    blocks: list[Block]
    problems: list[str]


def parse(doc: Path, text: str | None = None) -> Parsed:
    """The fenced blocks of ``doc`` with their markers, and what breaks the convention."""
    lines = (doc.read_text(encoding="utf-8") if text is None else text).splitlines()
    where = shown(doc)
    blocks: list[Block] = []
    problems: list[str] = []
    marker: tuple[int, str] | None = None  # (its line, its body), waiting for a block
    numbered = iter(enumerate(lines, start=1))
    for number, line in numbered:
        found, opening = MARKER.match(line), FENCE.match(line)
        if marker and (found or (line.strip() and not opening)):
            problems.append(f"{where}:{marker[0]}: marker is not followed by a block")
            marker = None
        if found:
            marker = (number, found["body"].strip())
        if not opening:
            continue
        lang = opening["info"].split(maxsplit=1)[0].lower() if opening["info"] else ""
        indent, body = len(opening["indent"]), []
        for _, inner in numbered:
            if _closes(inner, opening["fence"]):
                break
            body.append(inner[indent:] if not inner[:indent].strip() else inner.lstrip())
        else:
            problems.append(f"{where}:{number}: a fence that never closes")
        if lang not in RUNNABLE | INERT:
            named = f"language {lang!r}" if lang else "no language"
            known = ", ".join(sorted(RUNNABLE | INERT))
            problems.append(f"{where}:{number}: a block with {named}: name one of {known}")
        skip = _skip_reason(f"{where}:{marker[0]}", marker[1], lang, problems) if marker else None
        marker = None
        blocks.append(Block(doc, number, lang, "\n".join(body) + "\n", skip))
    if marker:
        problems.append(f"{where}:{marker[0]}: marker is not followed by a block")
    return Parsed(blocks, problems)


def _skip_reason(where: str, marker: str, lang: str, problems: list[str]) -> str | None:
    """The reason a marker gives, or None (and a problem) when it is not a proper one."""
    reason = SKIP.match(marker)
    if reason is None:
        problems.append(
            f"{where}: unknown marker {marker!r}: write <!-- example: skip (the reason) -->"
        )
        return None
    if lang not in RUNNABLE:
        problems.append(f"{where}: a skip marker on a {lang!r} block, which never runs")
        return None
    return reason["reason"].strip()


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def console_commands(text: str) -> str:
    """A ``console`` block's commands: ``$ `` lines and their continuations, no output."""
    commands: list[str] = []
    continued = False
    for line in text.splitlines():
        if continued or line.startswith("$ "):
            commands.append(line if continued else line[2:])
            continued = line.endswith("\\")
    return "\n".join(commands) + "\n"


# -- the servers a session talks to -----------------------------------------------------------


@dataclass(frozen=True)
class Servers:
    vault_addr: str
    root_token: str
    daemon_url: str
    sandbox_url: str
    worker_token: str
    pair: KeyPair  # the key "made in the web UI": registered at the sandbox


def _worker_token(addr: str, root: str) -> str:
    instructions = (*READ_ONLY_INSTRUCTIONS, "orderExecute", "orderCancel")
    policy = render_worker_policy("backpack-broker", "scalper", None, instructions, copy=True)
    headers = {"X-Vault-Token": root}
    httpx.put(
        f"{addr}/v1/sys/policies/acl/docs-worker", headers=headers, json={"policy": policy}
    ).raise_for_status()
    answer = httpx.post(
        f"{addr}/v1/auth/token/create",
        headers=headers,
        json={"policies": ["docs-worker"], "ttl": "1h"},
    )
    answer.raise_for_status()
    return str(answer.json()["auth"]["client_token"])


@contextmanager
def servers_for_one_file(sandbox: SandboxAdmin) -> Iterator[Servers]:
    """A fresh OpenBao dev server and a daemon on it, next to the (reset) sandbox."""
    pair = generate_pair()
    sandbox.register(pair.api_key)
    with DevVault() as vault:
        root = vault.root_token.reveal()
        worker = _worker_token(vault.addr, root)
        settings = Settings(
            VaultSettings(addr=vault.addr, token=vault.root_token),
            BrokerSettings(),
            CheckSettings(backpack_url=sandbox.url, interval=3600.0),
        )
        daemon = Daemon(settings)
        with daemon, ServerThread(daemon.app) as server:
            yield Servers(vault.addr, root, server.url, sandbox.url, worker, pair)


# -- one file's session -------------------------------------------------------------------------


def rewrites(servers: Servers, root: Path) -> list[tuple[re.Pattern[str], Callable[..., str]]]:
    """The documented addresses, placeholders and paths, and what they mean in a session."""
    host_port = servers.sandbox_url.removeprefix("http://")
    table: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
        (r"https?://vault(?:\.internal)?:8200", servers.vault_addr),
        (r"https?://backpack-vault:8280", servers.daemon_url),
        (r"https://api\.backpack\.exchange", servers.sandbox_url),
        (r"\b(?:localhost|127\.0\.0\.1):8300\b", host_port),
        (r"\bVAULT_TOKEN=\.\.\.", f"VAULT_TOKEN={servers.root_token}"),
        (r"'zDIJ[A-Za-z0-9+/]*\.\.\.[A-Za-z0-9+/]*='", f"'{servers.pair.api_key}'"),
        (r"<public key>", servers.pair.api_key),
        (r"(?<![\w.~$/-])/(?:var/)?run/", lambda m: f"{root}{m.group(0)}"),
    ]
    compiled: list[tuple[re.Pattern[str], Callable[..., str]]] = []
    for pattern, replacement in table:
        fill = replacement if callable(replacement) else (lambda _m, text=replacement: text)
        compiled.append((re.compile(pattern), fill))
    return compiled


def rewrite(text: str, table: list[tuple[re.Pattern[str], Callable[..., str]]]) -> str:
    for pattern, fill in table:
        text = pattern.sub(fill, text)
    return text


PYTHON_DRIVER = """\
import os, runpy, sys

path = sys.argv[1]
if "ccxt" in open(path, encoding="utf-8").read():  # ccxt's own Backpack URLs: the sandbox
    import ccxt, ccxt.async_support

    url = os.environ["BACKPACK_VAULT_BACKPACK_URL"]
    for cls in (ccxt.backpack, ccxt.async_support.backpack):
        def describe(self, _original=cls.describe):
            described = _original(self)
            described["urls"]["api"] = {"public": url, "private": url}
            return described
        cls.describe = describe
runpy.run_path(path, run_name="__main__")
"""

STAND_IN = f"""\
#!{sys.executable}
import json, os, stat, sys
from backpack_vault.config import Secret
from backpack_vault.core.keys import parse_key_pair

if os.environ.get("BACKPACK_VAULT_KEY_FILE"):
    path = os.environ["BACKPACK_VAULT_KEY_FILE"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, oct(os.stat(path).st_mode)
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    key, secret = data["api_key"], data["api_secret"]
elif os.path.basename(sys.argv[0]) == "freqtrade":
    key = os.environ["FREQTRADE__EXCHANGE__KEY"]
    secret = os.environ["FREQTRADE__EXCHANGE__SECRET"]
else:
    key, secret = os.environ["BACKPACK_API_KEY"], os.environ["BACKPACK_API_SECRET"]
assert "VAULT_TOKEN" not in os.environ, "a bot never sees the worker's Vault token"
parse_key_pair(key, Secret(secret))
print(os.path.basename(sys.argv[0]), "got a working pair for", key)
"""


@dataclass(frozen=True)
class Outcome:
    ran: list[Block]
    failed: Block | None = None
    returncode: int | None = None
    output: str = ""

    def report(self) -> str:
        if self.failed is None:
            return "every block ran"
        return (
            f"{self.failed.where}: this {self.failed.lang} block failed "
            f"(exit {self.returncode}):\n{textwrap.indent(self.failed.text, '    ')}\n"
            f"it printed:\n{textwrap.indent(self.output[-6000:], '    ')}"
        )


def check_policy(block: Block, servers: Servers) -> str | None:
    """An ``hcl`` block is a Vault policy: it must be accepted as one."""
    answer = httpx.put(
        f"{servers.vault_addr}/v1/sys/policies/acl/docs-example-{block.line}",
        headers={"X-Vault-Token": servers.root_token},
        json={"policy": block.text},
    )
    return None if answer.is_success else f"{answer.status_code} {answer.text}"


def check_config(block: Block, tmp: Path) -> str | None:
    """A ``toml`` block is a config file: it must load."""
    path = tmp / f"config-{block.line}.toml"
    path.write_text(block.text, encoding="utf-8")
    try:
        load({}, path)
    except Exception as exc:  # a ConfigError names the setting
        return f"{type(exc).__name__}: {exc}"
    return None


class Session:
    """One file's blocks, in order, in one bash on a pseudo-terminal."""

    def __init__(self, tmp: Path, env: dict[str, str], answer: bytes) -> None:
        self.tmp = tmp
        self.work = tmp / "work"
        self.steps = tmp / "steps"
        for directory in (self.work, self.steps):
            directory.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.answer = answer  # typed at each hidden prompt
        (self.steps / "example.py").write_text(PYTHON_DRIVER, encoding="utf-8")

    def script(self, blocks: list[tuple[int, Block, str]]) -> Path:
        lines = ["set -euo pipefail", "shopt -s inherit_errexit"]
        for index, block, text in blocks:
            if block.lang in PYTHON:
                step = self.steps / f"{index}.py"
                step.write_text(text, encoding="utf-8")
                lines.append(f"python {self.steps / 'example.py'} {step}")
            else:
                step = self.steps / f"{index}.sh"
                step.write_text(console_commands(text) if block.lang == "console" else text)
                lines.append(f"source {step}")
            lines.append(f"printf '\\n%s\\n' '{DONE.format(index)}'")
        script = self.steps / "session.sh"
        script.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return script

    def run(self, blocks: list[tuple[int, Block, str]]) -> tuple[int, str]:
        """Run the blocks; the exit status and everything the terminal showed."""
        main, terminal = os.openpty()
        process = subprocess.Popen(
            ["bash", "--noprofile", "--norc", str(self.script(blocks))],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            cwd=self.work,
            env=self.env,
            start_new_session=True,  # no controlling terminal: getpass reads the pty
        )
        os.close(terminal)
        shown = bytearray()
        answered = 0
        deadline = time.monotonic() + SESSION_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([main], [], [], 0.5)
                if not ready:
                    if process.poll() is not None:  # bash is done, and nothing more to read
                        break
                    continue
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: every process that had the terminal is gone
                    break
                if not chunk:
                    break
                shown += chunk
                if shown.count(PROMPT) > answered:
                    self._type_secret(main)
                    answered += 1
            else:
                shown += f"\n[the session ran out of its {SESSION_TIMEOUT_S:g} s]\n".encode()
        finally:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the group this session started
                process.wait()
            os.close(main)
        text = shown.decode("utf-8", "replace").replace("\r\n", "\n")
        return process.returncode, ANSI.sub("", text)

    def _type_secret(self, main: int) -> None:
        """Type the secret once getpass has turned echo off (it flushes input before)."""
        deadline = time.monotonic() + 10
        while termios.tcgetattr(main)[3] & termios.ECHO and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(main, self.answer + b"\n")


def session_env(servers: Servers, tmp: Path) -> dict[str, str]:
    home, bin_dir = tmp / "home", tmp / "bin"
    for directory in (home, bin_dir, tmp / "run/bot", tmp / "run/secrets"):
        directory.mkdir(parents=True, exist_ok=True)
    (tmp / "var/run/secrets").mkdir(parents=True, exist_ok=True)
    (tmp / "var/run/secrets/vault-token").write_text(servers.worker_token, encoding="utf-8")
    (home / ".curlrc").write_text("fail-with-body\nshow-error\n", encoding="utf-8")
    (bin_dir / "vault").symlink_to(bao_binary())
    for stand_in in (bin_dir / "freqtrade", tmp / "work" / "my_bot.py"):
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text(STAND_IN, encoding="utf-8")
        stand_in.chmod(0o700)
    (tmp / "work" / "secret.txt").write_text(servers.pair.secret.reveal(), encoding="utf-8")
    return {
        "PATH": f"{bin_dir}:{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
        "VAULT_ADDR": servers.vault_addr,
        "VAULT_TOKEN": servers.root_token,
        "WORKER_TOKEN": servers.worker_token,
        "BACKPACK_VAULT_DAEMON_URL": servers.daemon_url,
        "BACKPACK_VAULT_BACKPACK_URL": servers.sandbox_url,
        "BACKPACK_API_KEY": servers.pair.api_key,
        "BACKPACK_API_SECRET": servers.pair.secret.reveal(),
    }


def run_examples(blocks: list[Block], servers: Servers, tmp: Path) -> Outcome:
    """Run every unmarked example of one file; stop at the first that fails."""
    table = rewrites(servers, tmp)
    checked: list[Block] = []
    steps: list[tuple[int, Block, str]] = []
    for index, block in enumerate(b for b in blocks if b.runs):
        if block.lang in POLICY | CONFIG:
            error = (
                check_policy(block, servers) if block.lang in POLICY else check_config(block, tmp)
            )
            if error:
                return Outcome(checked, block, 1, error)
            checked.append(block)
        else:
            steps.append((index, block, rewrite(block.text, table)))
    session = Session(tmp, session_env(servers, tmp), servers.pair.secret.reveal().encode())
    outcome = run_steps(session, steps)
    ran = {id(block) for block in [*checked, *outcome.ran]}
    return Outcome(
        [block for block in blocks if id(block) in ran],
        outcome.failed,
        outcome.returncode,
        outcome.output,
    )


def run_steps(session: Session, steps: list[tuple[int, Block, str]]) -> Outcome:
    """The session's outcome: the blocks that finished, and the first that did not."""
    if not steps:
        return Outcome([])
    returncode, output = session.run(steps)
    ran: list[Block] = []
    start = 0
    for index, block, _ in steps:
        done = output.find(DONE.format(index), start)
        if done < 0:
            return Outcome(ran, block, returncode, output[start:])
        ran.append(block)
        start = done + len(DONE.format(index))
    if returncode != 0:  # every block finished, then the shell failed
        return Outcome(ran, steps[-1][1], returncode, output[start:])
    return Outcome(ran)


# -- the tests ---------------------------------------------------------------------------------


PARSED = {doc: parse(doc) for doc in DOCS}
WITH_EXAMPLES = [doc for doc, parsed in PARSED.items() if any(b.runs for b in parsed.blocks)]


def test_every_block_runs_or_says_why_not() -> None:
    """Each fence names a language the runner knows; each marker is a skip with a reason,
    right before a block that would run."""
    problems = [problem for parsed in PARSED.values() for problem in parsed.problems]
    assert not problems, "\n".join(problems)
    assert WITH_EXAMPLES, "no examples found: is the parser broken?"


@pytest.mark.parametrize("doc", WITH_EXAMPLES, ids=shown)
def test_the_examples_run(doc: Path, sandbox: SandboxAdmin, tmp_path: Path) -> None:
    """Every unmarked example of the file, in order, against real servers: exit 0."""
    blocks = PARSED[doc].blocks
    with servers_for_one_file(sandbox) as servers:
        outcome = run_examples(blocks, servers, tmp_path)
    assert outcome.failed is None, outcome.report()
    assert outcome.ran == [block for block in blocks if block.runs]


class TestTheConvention:
    """The runner itself, on small made-up pages (no servers: shell blocks only)."""

    def test_markers_need_a_reason_and_a_block_and_fences_a_language(self) -> None:
        page = textwrap.dedent("""\
            <!-- example: skip -->
            ```sh
            echo marked without a reason
            ```
            <!-- example: skip (a reason) -->
            Some text, then the block.
            ```
            a fence with no language
            ```
            <!-- example: skip (serves until Ctrl-C) -->

            ```sh
            backpack-vault sandbox
            ```
            """)
        parsed = parse(ROOT / "page.md", page)
        assert parsed.problems == [
            "page.md:1: unknown marker 'skip': write <!-- example: skip (the reason) -->",
            "page.md:5: marker is not followed by a block",
            (
                "page.md:7: a block with no language: name one of "
                "bash, console, hcl, mermaid, py, python, sh, shell, text, toml"
            ),
        ]
        assert [(b.line, b.skip) for b in parsed.blocks] == [
            (2, None),
            (7, None),
            (12, "serves until Ctrl-C"),
        ]

    def test_an_unmarked_block_that_fails_fails_its_file(self, tmp_path: Path) -> None:
        """Blocks share one shell (a variable carries over); the first failure stops the file
        and is named with its line and what it printed."""
        page = textwrap.dedent("""\
            ```sh
            export GREETING=hello
            ```
            ```console
            $ echo "$GREETING from the second block"
            hello from the second block
            $ ls /no/such/dir
            ```
            ```sh
            echo never reached
            ```
            """)
        first, second, third = parse(ROOT / "page.md", page).blocks
        session = Session(tmp_path, {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, b"")
        outcome = run_steps(session, [(i, b, b.text) for i, b in enumerate([first, second, third])])
        assert outcome.ran == [first]
        assert outcome.failed == second
        assert outcome.returncode != 0
        assert "hello from the second block" in outcome.output
        assert "/no/such/dir" in outcome.output
        assert "never reached" not in outcome.output
        assert outcome.report().startswith("page.md:4: this console block failed")
