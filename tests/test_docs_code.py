"""Every ```python block in README.md and docs/ runs, as a reader would run it.

Each block is a complete program, run in a process of its own (a fresh `__main__`, one thread, a temporary
working directory, a time limit) that can import `unroll` from this checkout and nothing else of the repository.
The processes are forked from one runner that has imported torch and unroll already: nothing a block does (its
names, `torch.set_default_dtype`, its seed) reaches another, but `import torch` is paid once, not once per block.
Two HTML comments, invisible on the rendered page, change what a program is:

- `<!-- fragment: why -->` on the line before a block: the block is deliberately incomplete (a sketch whose
  names the surrounding text defines); it is only compiled. The reason is required, to keep such blocks rare.
- `<!-- one program: why -->` anywhere in a page: its (non-fragment) blocks are one program split into
  consecutive blocks, as a tutorial reads; they are run together, in order.

The program is written so that its line numbers are the page's (blank lines stand for the prose between blocks),
so a traceback or a SyntaxError points at the Markdown line that failed.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60  # per program; every block is meant to finish in a few seconds
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
FRAGMENT = re.compile(r"^\s*<!--\s*fragment\b:?\s*(?P<why>.*?)\s*-->\s*$")
ONE_PROGRAM = re.compile(r"<!--\s*one program\b")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the block's first code line
    code: str
    fragment: bool
    fragment_reason: str


def python_blocks(page: str, text: str) -> List[Block]:
    """The ```python fenced blocks of a Markdown page (CommonMark fences; a fence's indentation is removed from
    its lines), each with the line it starts on and whether the line before it marks it as a fragment."""
    lines = text.splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        language = opening["info"].split()[0].lower() if opening["info"].split() else ""
        end = i + 1
        while end < len(lines):
            closing = FENCE.match(lines[end])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence) \
                    and not closing["info"].strip():
                break
            end += 1
        if language in ("python", "py", "python3"):
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = FRAGMENT.match(previous)
            code = "\n".join(line[indent:] if line[:indent].strip() == "" else line.lstrip()
                             for line in lines[i + 1:end])
            blocks.append(Block(page, i + 2, code + "\n", marker is not None, marker["why"] if marker else ""))
        i = end + 1
    return blocks


def pages() -> List[Path]:
    """README.md and every Markdown page under docs/ (results pages count only if they hold python blocks)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def programs() -> List[Tuple[str, List[Block]]]:
    """(test id, blocks run as one program): one per block, or one per page marked `one program`."""
    found: List[Tuple[str, List[Block]]] = []
    for path in pages():
        text = path.read_text(encoding="utf-8")
        page = path.relative_to(ROOT).as_posix()
        runnable = [block for block in python_blocks(page, text) if not block.fragment]
        if ONE_PROGRAM.search(text) and runnable:
            found.append((f"{page} (one program, {len(runnable)} blocks)", runnable))
        else:
            found.extend((f"{page}:{block.line}", [block]) for block in runnable)
    return found


def all_blocks() -> List[Block]:
    return [block for path in pages()
            for block in python_blocks(path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8"))]


def as_program(blocks: List[Block]) -> str:
    """The blocks' code at their own page lines, blank lines in between."""
    lines: List[str] = []
    for block in blocks:
        lines.extend([""] * (block.line - 1 - len(lines)))
        lines.extend(block.code.splitlines())
    return "\n".join(lines) + "\n"


# Runs in the runner process: imports what (nearly) every block imports once, then runs each script that the test
# names in a child forked from it (a fresh process and __main__, its own working directory, a time limit). Paying
# `import torch` (2 to 5 s on a loaded 2-core machine) once instead of once per block keeps this file fast.
RUNNER = """
import os, runpy, signal, sys, traceback
import torch, unroll
for request in sys.stdin:
    script, stdout, stderr, timeout = request.rstrip("\\n").split("\\t")
    pid = os.fork()
    if pid == 0:
        signal.alarm(int(timeout))  # SIGALRM ends a block that runs too long
        for fd, path in ((1, stdout), (2, stderr)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.chdir(os.path.dirname(script))
        sys.argv, sys.path[0] = [script], os.path.dirname(script)
        code = 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@dataclass(frozen=True)
class Result:
    returncode: int  # negative: ended by that signal (-14: the time limit)
    stdout: str
    stderr: str


class Runner:
    """A python process with only this checkout's `unroll` importable (a link to it on PYTHONPATH: not the
    repository root, so the examples and tests are not), one thread, that runs programs on request."""

    def __init__(self, home: Path) -> None:
        (home / "site").mkdir()
        (home / "site" / "unroll").symlink_to(ROOT / "unroll", target_is_directory=True)
        env = {**os.environ, "PYTHONPATH": str(home / "site"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"}
        self.process = subprocess.Popen([sys.executable, "-c", RUNNER], cwd=home, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, blocks: List[Block], workdir: Path, timeout_s: int = TIMEOUT_S) -> Result:
        """Run the blocks as one file named after their page, with `workdir` as the working directory."""
        script = workdir / (blocks[0].page.replace("/", "__") + ".py")
        script.write_text(as_program(blocks), encoding="utf-8")
        stdout, stderr = workdir / "stdout.txt", workdir / "stderr.txt"
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{script}\t{stdout}\t{stderr}\t{timeout_s}\n")
        self.process.stdin.flush()
        # The child's alarm ends it after timeout_s; this only guards against a runner that stops answering.
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s + 30)
        assert ready, "the runner stopped answering"
        reply = self.process.stdout.readline()
        assert reply, f"the runner died; its exit code: {self.process.poll()}"
        return Result(int(reply), stdout.read_text(encoding="utf-8"), stderr.read_text(encoding="utf-8"))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    started = Runner(tmp_path_factory.mktemp("runner"))
    yield started
    started.close()


def failure(blocks: List[Block], result: Result) -> str:
    where = ", ".join(f"{block.page}:{block.line}" for block in blocks)
    return (f"the python block at {where} exited with {result.returncode} (line numbers below are the page's):\n"
            f"{result.stderr[-4000:]}")


PROGRAMS = programs()


@pytest.mark.parametrize("blocks", [blocks for _, blocks in PROGRAMS], ids=[name for name, _ in PROGRAMS])
def test_docs_python_block_runs(blocks: List[Block], runner: Runner, tmp_path: Path) -> None:
    result = runner.run(blocks, tmp_path)
    assert result.returncode == 0, failure(blocks, result)


def test_docs_python_blocks_compile_and_fragments_say_why() -> None:
    blocks = all_blocks()
    pages_with_code = {block.page for block in blocks}
    # The pages this test exists for; a parser that finds nothing would pass every other test vacuously.
    assert {"README.md", "docs/api.md", "docs/tutorial.md", "docs/tutorial_games.md"} <= pages_with_code
    for block in blocks:
        compile(as_program([block]), f"{block.page}", "exec")  # a SyntaxError names the page's line
        if block.fragment:
            assert len(block.fragment_reason) >= 10, f"{block.page}:{block.line}: say why the block is a fragment"


def test_a_failing_block_is_reported_at_its_page_line(runner: Runner, tmp_path: Path) -> None:
    page = ("# Title\n\nSome prose.\n\n```python\nimport json\n\nx = [1]\n```\n\n<!-- fragment: needs `y` -->\n"
            "```python\nprint(y)\n```\n\n```py\nprint(json.dumps(x))\nraise ValueError('on line 18')\n"
            "```\n\n```bash\nfalse\n```\n")
    blocks = python_blocks("docs/page.md", page)
    assert [(block.line, block.fragment) for block in blocks] == [(6, False), (13, True), (17, False)]
    assert blocks[1].fragment_reason == "needs `y`"
    ok = runner.run(blocks[:1], tmp_path)
    assert ok.returncode == 0, ok.stderr
    # One program: the third block sees the first's names, and fails at its own page line.
    failed = runner.run(blocks[:1] + blocks[2:], tmp_path)
    assert failed.returncode != 0 and failed.stdout == "[1]\n"
    assert 'page.md.py", line 18' in failed.stderr and "ValueError: on line 18" in failed.stderr
    assert "docs/page.md:6, docs/page.md:17" in failure(blocks[:1] + blocks[2:], failed)
    # Run on its own, the fragment's missing name is what fails.
    alone = runner.run(blocks[1:2], tmp_path)
    assert alone.returncode != 0 and "NameError" in alone.stderr


def test_a_block_that_runs_too_long_is_stopped(runner: Runner, tmp_path: Path) -> None:
    (endless,) = python_blocks("docs/page.md", "```python\nwhile True:\n    pass\n```\n")
    result = runner.run([endless], tmp_path, timeout_s=1)
    assert result.returncode == -14  # SIGALRM
