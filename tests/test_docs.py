"""Every code block of README.md and docs/*.md runs, page by page, in order, against a live server.

Each page gets a fresh working directory holding what a clone has at the same relative paths (``tests``,
``scripts``, ``Makefile`` and ``.venv``, as symlinks), ``PATH`` starting with this venv's ``bin``,
``HF_HUB_OFFLINE=1`` and the suite's shared cache (``STELLA_SEARCH_CACHE_DIR``: models are exported once per
suite, never per page). Then its fenced blocks run in order:

- ``bash``/``sh``: run with ``bash -euo pipefail``, one process per block. A line ``stella-search serve ...`` (the
  command the page tells the reader to leave running) is started in the background on a free port instead, and
  the page goes on once ``GET /ready`` answers 200; from then on ``127.0.0.1:8000`` and ``localhost:8000`` in the
  page's blocks are rewritten to that port. The server stops at the end of the page. ``make run`` runs as
  ``make -o VENV/.installed run VENV=... DEMO_DATA=... PORT=... DEMO_FLAGS=--exit``: the install it depends on
  is the environment this suite runs in, and ``--exit`` stops the demo after its sample queries.
- ``python``: run with this venv's python, one process per block.
- ``console``: ``$ stella-search ... --help`` lines, each followed by its exact output (click's help, rendered at 80
  columns as ``CliRunner`` renders it); regenerate them with ``python tests/test_docs.py``.
- ``yaml``: a settings file, loaded with ``indexer.settings.load_settings`` (it must validate).
- ``json``: must parse. ``text``: output or a layout, never a command.

Lines that are not run are listed in ``NOT_RUN`` with the reason; a listed entry that no page uses any more fails
``test_every_not_run_entry_is_used``, and the options of a listed ``stella-search`` or ``scripts/*.py`` command
are checked against its ``--help``, so these lines cannot rot either.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers.data import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV = Path(sys.prefix)
BLOCK_TIMEOUT_S = 600
READY_TIMEOUT_S = 180

# (pattern of a command line, why it is not run here)
NOT_RUN: list[tuple[str, str]] = [
    (r"^make test\b", "it is this test suite"),
    (r"^pip install\b", "it changes the environment the suite runs in"),
    (
        r"(^|\s)--ray\b|^ray (start|up)\b",
        "it needs a Ray cluster (tests/search_api/test_ray.py runs these paths on a local one)",
    ),
    (
        r"^python scripts/(bench_\w+|crasher|faults|quality_backends|plot_performance)\.py\b",
        "a benchmark or its plot: it rewrites a results file under scripts/results (benchmarks take minutes to hours)",
    ),
    (r"^bash scripts/gpu_wheels\.sh\b", "it downloads wheels for a GPU machine"),
    (
        r"^stella-search eval tests/data/\w+ --model minilm\b",
        "an evaluation over a whole carried corpus: minutes on a CPU (scripts/quality_backends.py records them)",
    ),
    (r"^hf download\b", "it downloads model weights"),
]

DOCS_ADDRESS = re.compile(r"\b(127\.0\.0\.1|localhost):8000\b")
SERVE = re.compile(r"^(?P<env>(?:[A-Z_][A-Z0-9_]*=\S*\s+)*)(?:\S*/)?stella-search\s+serve\b")
MAKE_RUN = re.compile(r"^make run\b")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
COMMAND_LIKE = re.compile(r"^(\$ |stella-search |curl |python |make |pip )")
RUN_LANGUAGES = {"bash", "sh"}
LANGUAGES = RUN_LANGUAGES | {"python", "console", "yaml", "json", "text"}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str

    @property
    def where(self) -> str:
        first = next((line.strip() for line in self.text.splitlines() if line.strip()), "")
        return f"{self.page.relative_to(ROOT)}:{self.line} ({first!r})"


def read_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order (a fence may be indented, as in a list item)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, number = [], 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        number += 1
        if not opening:
            continue
        indent, language, start, body = opening.group(1), opening.group(2), number, []
        while number < len(lines) and lines[number].strip() != "```":
            body.append(lines[number][len(indent) :] if lines[number].startswith(indent) else lines[number])
            number += 1
        assert number < len(lines), f"{page.relative_to(ROOT)}:{start}: the code block is never closed"
        number += 1
        blocks.append(Block(page, start, language, "\n".join(body) + "\n"))
    return blocks


def logical_lines(script: str) -> list[tuple[str, str]]:
    """(command, text) per logical line of a shell script: continuation lines joined into the command, a heredoc's
    body kept in the text of the line that opens it."""
    lines, out, number = script.splitlines(), [], 0
    while number < len(lines):
        text = command = lines[number]
        number += 1
        while command.endswith("\\") and number < len(lines):
            command = command[:-1] + " " + lines[number].strip()
            text += "\n" + lines[number]
            number += 1
        heredoc = HEREDOC.search(command)
        if heredoc:
            while number < len(lines):
                text += "\n" + lines[number]
                number += 1
                if lines[number - 1].strip() == heredoc.group(1):
                    break
        out.append((command.strip(), text))
    return out


def not_run_reason(command: str) -> str | None:
    return next((reason for pattern, reason in NOT_RUN if re.search(pattern, command)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text: str, chars: int = 4000) -> str:
    return text if len(text) <= chars else "...\n" + text[-chars:]


class DocServer:
    """A ``stella-search serve`` line of a page, run in the background on a free port until the page ends."""

    def __init__(self, command: str, cwd: Path, env: dict, where: str):
        words = shlex.split(command, comments=True)
        assignments = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            assignments[name] = value
        self.port = free_port()
        if "--port" in words:
            words[words.index("--port") + 1] = str(self.port)
        else:
            words += ["--port", str(self.port)]
        self.where, self.log = where, cwd / f"server-{self.port}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                words, cwd=cwd, env={**env, **assignments}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"{where}: the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{where}: /ready did not answer 200 within {READY_TIMEOUT_S} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        return tail(self.log.read_text(encoding="utf-8", errors="replace"))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class PageRun:
    """One page's working directory, environment and server, and how each kind of block runs in it."""

    def __init__(self, page: Path, workdir: Path, cache_dir: Path):
        self.page, self.workdir = page, workdir
        for name in ("tests", "scripts", "Makefile"):
            (workdir / name).symlink_to(ROOT / name)
        (workdir / ".venv").symlink_to(VENV)
        self.env = {name: value for name, value in os.environ.items() if not name.startswith("STELLA_SEARCH_")}
        self.env.pop("VIRTUAL_ENV", None)
        self.env.update(
            PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONPATH=str(ROOT),  # the code of this checkout, whichever one the venv was installed from
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            STELLA_SEARCH_CACHE_DIR=str(cache_dir),
            COLUMNS="80",
        )
        self.server: DocServer | None = None
        self.blocks_run = 0

    def address(self, text: str, block: Block) -> str:
        """The page's ``127.0.0.1:8000`` / ``localhost:8000`` pointed at the page's running server."""
        if not DOCS_ADDRESS.search(text):
            return text
        if self.server is None:
            pytest.fail(f"{block.where}: addresses a server on port 8000, but no 'stella-search serve' ran before it")
        return DOCS_ADDRESS.sub(lambda m: f"{m.group(1)}:{self.server.port}", text)

    def run_process(self, argv: list[str], block: Block, what: str) -> None:
        started = time.monotonic()
        try:
            done = subprocess.run(
                argv, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{block.where}: did not finish within {BLOCK_TIMEOUT_S} s")
        if done.returncode != 0:
            server = f"\n--- server log ---\n{self.server.log_tail()}" if self.server else ""
            script = f"\n--- script ---\n{argv[-1]}" if what == "bash" else ""
            pytest.fail(
                f"{block.where}: {what} exited with {done.returncode}{script}"
                f"\n--- stdout ---\n{tail(done.stdout)}\n--- stderr ---\n{tail(done.stderr)}{server}"
            )
        # shown by pytest -rP: where a page's time goes, and what its examples print
        print(f"{block.where}: {time.monotonic() - started:.1f} s\n{tail(done.stdout, 1500)}")
        self.blocks_run += 1

    def bash(self, block: Block) -> None:
        segment: list[str] = []
        for command, text in logical_lines(block.text):
            reason = not_run_reason(command)
            if reason:
                segment.append(f"# not run: {reason}")
            elif SERVE.match(command):
                self.flush(segment, block)
                segment = []
                if self.server:
                    self.server.stop()
                self.server = DocServer(command, self.workdir, self.env, block.where)
            elif MAKE_RUN.match(command):
                make = (
                    f"make -o {shlex.quote(str(VENV / '.installed'))} run VENV={shlex.quote(str(VENV))} "
                    f"DEMO_DATA={shlex.quote(str(self.workdir / 'data'))} PORT={free_port()} DEMO_FLAGS=--exit"
                )
                segment.append(MAKE_RUN.sub(make, command))
            else:
                segment.append(text)
        self.flush(segment, block)

    def flush(self, segment: list[str], block: Block) -> None:
        if any(line.strip() and not line.lstrip().startswith("#") for line in segment):
            script = self.address("\n".join(segment) + "\n", block)
            self.run_process(["bash", "-euo", "pipefail", "-c", script], block, "bash")

    def python(self, block: Block) -> None:
        path = self.workdir / f"block_{block.line}.py"
        path.write_text(self.address(block.text, block), encoding="utf-8")
        self.run_process([sys.executable, str(path)], block, "python")

    def yaml(self, block: Block) -> None:
        from indexer.settings import load_settings

        path = self.workdir / f"block_{block.line}.yaml"
        path.write_text(block.text, encoding="utf-8")
        try:
            load_settings(path, environ={})
        except Exception as exc:  # noqa: BLE001 (the message names the block)
            pytest.fail(f"{block.where}: these settings do not load: {exc}")
        self.blocks_run += 1

    def json(self, block: Block) -> None:
        try:
            json.loads(block.text)
        except ValueError as exc:
            pytest.fail(f"{block.where}: not JSON: {exc}")
        self.blocks_run += 1

    def text(self, block: Block) -> None:
        commands = [line for line in block.text.splitlines() if COMMAND_LIKE.match(line)]
        assert not commands, f"{block.where}: a text block is never run; put commands in a bash block: {commands}"

    def console(self, block: Block, rendered: dict[str, str]) -> None:
        for command, shown in console_commands(block):
            expected = normalised(rendered[command])
            assert normalised(shown) == expected, (
                f"{block.where}: '$ {command}' prints something else now; regenerate with "
                f"'python tests/test_docs.py'. It prints:\n{expected}"
            )
        self.blocks_run += 1

    def close(self) -> None:
        if self.server:
            self.server.stop()


def console_commands(block: Block) -> list[tuple[str, str]]:
    """(command, output shown) for each ``$ stella-search ... --help`` line of a console block."""
    pairs: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            command = line[2:].strip()
            assert re.fullmatch(r"stella-search( [\w-]+)? --help", command), (
                f"{block.where}: console blocks show 'stella-search [COMMAND] --help' and its output only; "
                f"run other commands in a bash block: {command!r}"
            )
            pairs.append((command, []))
        else:
            assert pairs, f"{block.where}: a console block starts with a '$ ' line"
            pairs[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in pairs]


def normalised(output: str) -> str:
    return "\n".join(line.rstrip() for line in output.strip("\n").splitlines())


RENDER_HELP = """
import json, sys
from click.testing import CliRunner
from search_api.cli import main
out = {}
for command in json.loads(sys.argv[1]):
    result = CliRunner().invoke(main, command.split()[1:], prog_name="stella-search", terminal_width=80)
    assert result.exit_code == 0, (command, result.output)
    out[command] = result.output
print(json.dumps(out))
"""


def render_help(commands: list[str]) -> dict[str, str]:
    """Each ``stella-search ... --help`` as click prints it at 80 columns (in a child process: the CLI's group
    callback configures logging and warnings for the process it runs in)."""
    if not commands:
        return {}
    done = subprocess.run(
        [sys.executable, "-c", RENDER_HELP, json.dumps(sorted(set(commands)))],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_block_of_the_page_runs(page: Path, tmp_path: Path, cache_dir: Path):
    blocks = read_blocks(page)
    unknown = [f"{b.where}: {b.language or 'no language'}" for b in blocks if b.language not in LANGUAGES]
    assert not unknown, f"blocks this test cannot run (use one of {sorted(LANGUAGES)}): {unknown}"
    rendered = render_help([c for b in blocks if b.language == "console" for c, _ in console_commands(b)])
    run = PageRun(page, tmp_path, cache_dir)
    try:
        for block in blocks:
            if block.language in RUN_LANGUAGES:
                run.bash(block)
            elif block.language == "console":
                run.console(block, rendered)
            else:
                getattr(run, block.language)(block)
    finally:
        run.close()


def all_command_lines() -> list[tuple[Block, str]]:
    return [
        (b, command)
        for page in PAGES
        for b in read_blocks(page)
        if b.language in RUN_LANGUAGES
        for command, _ in logical_lines(b.text)
    ]


def test_every_not_run_entry_is_used():
    commands = [command for _, command in all_command_lines()]
    unused = [pattern for pattern, _ in NOT_RUN if not any(re.search(pattern, c) for c in commands)]
    assert not unused, f"NOT_RUN entries no page uses any more (remove them): {unused}"


def help_command(command: str) -> str | None:
    """What prints the --help of a command that is not run: ``stella-search CMD --help`` or ``python
    scripts/X.py --help``; None for programs not of this project (ray, pip, make, hf, bash)."""
    words = shlex.split(command, comments=True)
    if words[0] == "stella-search" and len(words) > 1:
        return f"stella-search {words[1]} --help"
    if words[0] == "python" and len(words) > 1 and words[1].startswith("scripts/"):
        return f"python {words[1]} --help"
    return None


def help_texts(commands: set[str]) -> dict[str, str]:
    """The output of each ``help_command``: the CLI's through click, each script's from a run of its own."""
    texts = render_help([c for c in commands if c.startswith("stella-search ")])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    for command in commands - set(texts):
        argv = [sys.executable, *command.split()[1:]]
        texts[command] = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return texts


def test_the_lines_not_run_name_real_options():
    """A command shown but not run (a benchmark, a cluster deployment) still names options its program has."""
    not_run = [(block, command) for block, command in all_command_lines() if not_run_reason(command)]
    helps = help_texts({help_command(c) for _, c in not_run} - {None})
    wrong = []
    for block, command in not_run:
        if help_command(command) is None:
            continue
        options = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", command.split(" #")[0])
        wrong += [f"{block.where}: {o} in {command!r}" for o in options if o not in helps[help_command(command)]]
    assert not wrong, "options the command does not have:\n" + "\n".join(wrong)


def setting_rows() -> dict[str, str]:
    """``{key: default cell}`` of the tables on docs/settings.md whose first cell is a backquoted key."""
    rows = {}
    for line in (ROOT / "docs" / "settings.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            rows[cells[0].strip("`")] = cells[1]
    return rows


def setting_fields(model, prefix: str = "") -> dict[str, object]:
    """Every setting of ``model`` by its dotted key, with its default (``...`` where a factory makes it)."""
    from pydantic import BaseModel

    out = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(setting_fields(field.annotation, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = ... if field.default_factory else field.default
    return out


def as_yaml(value: object) -> str:
    import yaml

    return yaml.safe_dump(str(value) if isinstance(value, Path) else value, default_flow_style=True).split("\n")[0]


def test_the_settings_page_lists_every_setting_with_its_default():
    from indexer.settings import Settings

    rows = setting_rows()
    missing = [key for key in setting_fields(Settings) if key not in rows]
    assert not missing, f"settings missing from docs/settings.md: {missing}"
    wrong = [
        f"{key}: the page says {rows[key]}, the code {as_yaml(default)}"
        for key, default in setting_fields(Settings).items()
        if default is not ... and rows[key].strip("`'\"") != as_yaml(default).strip("'\"")
    ]
    assert not wrong, "defaults on docs/settings.md that differ from indexer/settings.py:\n" + "\n".join(wrong)


def test_the_http_page_lists_every_route():
    from indexer.settings import load_settings
    from search_api.app import create_app

    paths = create_app(load_settings(environ={})).openapi()["paths"]
    page = (ROOT / "docs" / "http-api.md").read_text(encoding="utf-8")
    routes = {
        f"{method.upper()} {path.replace('{collection}', '{c}').replace('{document_id}', '{id}')}"
        for path, operations in paths.items()
        for method in operations
    }
    assert len(routes) > 10, routes  # the read and write routers are in the schema too
    routes |= {"GET /", "GET /docs", "GET /redoc", "GET /openapi.json"}  # pages outside the schema
    missing = sorted(route for route in routes if f"`{route}`" not in page)
    assert not missing, f"routes missing from docs/http-api.md: {missing}"


def test_the_client_page_shows_every_call():
    import inspect

    from search_api.client import AsyncSearchClient, SearchClient

    page = (ROOT / "docs" / "python-client.md").read_text(encoding="utf-8")
    calls = {
        name
        for cls in (SearchClient, AsyncSearchClient)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }
    missing = sorted(name for name in calls if f"{name}(" not in page)
    assert not missing, f"client calls missing from docs/python-client.md: {missing}"


def test_the_cli_page_shows_every_command_help():
    from search_api.cli import main

    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = [name for name in main.commands if f"$ stella-search {name} --help" not in page]
    assert not missing, f"commands without their --help on docs/cli.md: {missing}"


LINK = re.compile(r"\]\((?!https?://)([^)#\s]*)(?:#([^)\s]*))?\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_link_between_the_pages_resolves():
    broken = []
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for target, anchor in LINK.findall(line):
                path = (page.parent / target).resolve() if target else page
                if not path.exists():
                    broken.append(f"{page.relative_to(ROOT)}:{number}: {target} does not exist")
                elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                    broken.append(f"{page.relative_to(ROOT)}:{number}: {target}#{anchor} has no such heading")
    assert not broken, "broken links:\n" + "\n".join(broken)


# The documentation is for a user: no account of how it was written.
DEVELOPMENT_LOG = re.compile(
    r"\b(this|that|each) session\b|\bwas lent\b|\bthe issues? asks?\b|\bitem \d|\bhistory of this\b|\bmeasured here\b",
    re.IGNORECASE,
)


def test_the_pages_tell_no_development_story():
    found = [
        f"{page.relative_to(ROOT)}:{number}: {line.strip()}"
        for page in PAGES
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if DEVELOPMENT_LOG.search(line)
    ]
    assert not found, "development-log wording in the documentation:\n" + "\n".join(found)


def write_cli_help() -> None:
    """Rewrite the output under every ``$ stella-search ... --help`` line of the docs with what it prints now."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        blocks = [b for b in read_blocks(page) if b.language == "console"]
        rendered = render_help([c for b in blocks for c, _ in console_commands(b)])

        def replace(match: re.Match, rendered: dict[str, str] = rendered) -> str:
            commands = re.findall(r"^\$ (.+)$", match.group(2), flags=re.M)
            body = "".join(f"$ {c}\n{normalised(rendered[c.strip()])}\n" for c in commands)
            return f"{match.group(1)}{body}```"

        updated = re.sub(r"(^```console\n)(.*?)^```", replace, text, flags=re.M | re.S)
        if updated != text:
            page.write_text(updated, encoding="utf-8")
            print(f"rewrote {page.relative_to(ROOT)}")


if __name__ == "__main__":
    write_cli_help()
