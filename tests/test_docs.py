"""Every code block of README.md and docs/ runs as a real file in a subprocess.

How a page's fenced blocks are treated, by info string:

- ``python``: written to a ``.py`` file and run with this venv's python;
- ``bash``: written to a ``.sh`` file and run with ``bash -e -o pipefail``;
- ``text``: a picture or printed output, not code.

Blocks of one page run in page order in one temporary directory (the files one block writes
are there for the next), two pages side by side, with ``WF_DATA_CACHE`` pointing at the
prepared demo corpus and this venv's ``bin`` first on ``PATH`` (``wf-data`` is the installed
command). An HTML comment on the line right above a block changes what happens to it:

- ``<!-- docs-test: file NAME -->``: the block is written to ``NAME`` for later blocks (a
  config, an input file); any info string;
- ``<!-- docs-test: skip REASON -->``: not run here (a cluster, the whole test suite);
- ``<!-- docs-test: xfail "TEXT" REASON -->``: run, and must fail with TEXT in its output: a
  known library bug that the snippet, written as a user would write it, runs into. Once the bug
  is fixed the block passes and the test fails until the marker goes.

Skipped and failing blocks are counted per page in ``SKIPPED`` and ``XFAIL``, so that they
cannot grow silently.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 200
# A block takes under 25 s on an idle 2-core machine, and several minutes when other jobs
# load it (up to 169 s seen at a load average of 15); this bound only catches a hang.
BLOCK_TIMEOUT_S = 600
PARALLEL_PAGES = 2  # pages run side by side, one per core
RUNNERS = {"python": [sys.executable], "bash": ["bash", "-e", "-o", "pipefail"]}
SUFFIXES = {"python": ".py", "bash": ".sh"}

# Blocks marked `docs-test: skip`, per page. Change a count only with the block it counts.
SKIPPED = {
    "README.md": 2,  # pip install from the package index; the demo and the whole test suite
    "docs/benchmarks.md": 1,  # the benchmark run itself (minutes)
    "docs/mixing.md": 2,  # the mixing study and the demo's comparison (minutes)
    "docs/prepare.md": 1,  # Beam on a Dataflow cluster
    "docs/scaling.md": 2,  # the planning benchmark (minutes); torchrun on 2 processes
}

# Blocks marked `docs-test: xfail`, per page: known bugs, each named in its marker.
XFAIL = {}

FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(\S+)\s*(.*?)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its info string, its text and its marker."""

    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str = ""  # "", "file", "skip" or "xfail"
    argument: str = ""  # the file name, or the reason

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def is_code(self) -> bool:
        """python or bash to run (not a file written for later blocks)."""
        return self.lang in RUNNERS and self.marker != "file"


def parse(path: pathlib.Path) -> list[Block]:
    """The fenced blocks of a markdown page, with the marker of the line above each."""
    page = path.relative_to(REPO_ROOT).as_posix()
    lines = path.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, info = opening[1], opening[2].strip()
        end = index + 1
        while end < len(lines) and not (
            lines[end].startswith(fence) and not lines[end].strip(fence[0]).strip()
        ):
            end += 1
        assert end < len(lines), f"{page}:{index + 1}: the block is never closed"
        marker = MARKER.match(lines[index - 1]) if index else None
        blocks.append(
            Block(
                page=page,
                line=index + 1,
                lang=info.split()[0] if info else "",
                code="\n".join(lines[index + 1 : end]) + "\n",
                marker=marker[1] if marker else "",
                argument=marker[2] if marker else "",
            )
        )
        index = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in parse(page)]
CODE_BLOCKS = [block for block in BLOCKS if block.is_code]


def test_every_block_is_code_to_run_a_file_or_text():
    for block in BLOCKS:
        where = f"{block.name} ({block.lang or 'no info string'})"
        assert block.marker in ("", "file", "skip", "xfail"), f"{where}: marker {block.marker!r}"
        if block.marker:
            assert block.argument, f"{where}: `docs-test: {block.marker}` needs a name or reason"
        if block.marker == "file":
            assert "/" not in block.argument and block.argument not in ("", ".", "..")
        elif block.marker:
            assert block.is_code, f"{where}: only python and bash blocks are skipped or xfail"
        else:
            assert block.lang in (*RUNNERS, "text"), (
                f"{where}: a block is python or bash (run), text (a picture or output), or "
                "marked `<!-- docs-test: file NAME -->` on the line above it"
            )


def test_no_fence_is_indented():
    # An indented fence (inside a list item) would escape this test: keep blocks at column 0.
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            assert not re.match(r"\s+(```|~~~)", line), f"{page.name}:{number}: indented fence"


def test_every_marker_sits_right_above_a_block():
    for page in PAGES:
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if MARKER.match(line):
                below = lines[number] if number < len(lines) else ""
                assert FENCE.match(below), f"{page.name}:{number}: marker with no block below"


@pytest.mark.parametrize("marker, expected", [("skip", SKIPPED), ("xfail", XFAIL)])
def test_marked_blocks_are_counted(marker, expected):
    marked = [block for block in CODE_BLOCKS if block.marker == marker]
    listing = "\n".join(f"  {block.name}: {block.argument}" for block in marked)
    counts = {}
    for block in marked:
        counts[block.page] = counts.get(block.page, 0) + 1
    assert counts == expected, f"{marker} blocks changed; now:\n{listing}"
    print(f"{len(CODE_BLOCKS)} blocks to run, {len(marked)} marked {marker}:\n{listing}")


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.relative_to(REPO_ROOT).as_posix())
def test_relative_links_exist(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: link to {target}: no such file"


def test_mkdocs_builds_strictly(tmp_path):
    # The default theme needs no network at build time; --strict fails on any warning.
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert (tmp_path / "index.html").is_file()


class PageRun:
    """The blocks of one page, run in page order in one directory (in a thread of its own)."""

    def __init__(self, page: str, workdir: pathlib.Path, env: dict[str, str]):
        self.blocks = [block for block in BLOCKS if block.page == page]
        self.workdir, self.env = workdir, env
        self.results = {block: Future() for block in self.blocks if runs_here(block)}
        self.stopped = threading.Event()

    def run(self) -> None:
        for block in self.blocks:
            if self.stopped.is_set():
                break
            if block.marker == "file":
                (self.workdir / block.argument).write_text(block.code)
            elif block in self.results:
                try:
                    self.results[block].set_result(self._run(block))
                except BaseException as error:  # the test of this block reports it
                    self.results[block].set_exception(error)
        for future in self.results.values():
            future.cancel()  # those left by a stop: their tests are not running

    def _run(self, block: Block) -> subprocess.CompletedProcess:
        stem = re.sub(r"\W", "_", block.page.removesuffix(".md"))
        script = self.workdir / f"{stem}_L{block.line}{SUFFIXES[block.lang]}"
        script.write_text(block.code)
        try:
            return subprocess.run(
                [*RUNNERS[block.lang], script.name],
                cwd=self.workdir,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as error:
            stdout = error.stdout.decode() if isinstance(error.stdout, bytes) else error.stdout
            return subprocess.CompletedProcess(
                error.cmd, -1, stdout or "", f"timed out after {BLOCK_TIMEOUT_S} s"
            )


def runs_here(block: Block) -> bool:
    return block.is_code and block.marker != "skip"


@pytest.fixture(scope="session")
def block_results(request, demo_cache, tmp_path_factory):
    """`result(block)`: the finished subprocess of a block. The pages of the selected blocks
    start at once, `PARALLEL_PAGES` at a time (each page's blocks in order)."""
    env = {
        **os.environ,
        "WF_DATA_CACHE": str(demo_cache),
        "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",  # nothing in the docs may reach the network
    }
    selected = [
        item.callspec.params["block"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_block_runs"
    ]
    # In the order the tests ask for them, so that each test waits for about one block.
    pages = dict.fromkeys(block.page for block in selected if runs_here(block))
    runs = {
        page: PageRun(page, tmp_path_factory.mktemp(re.sub(r"\W", "_", page)), env)
        for page in pages
    }
    with ThreadPoolExecutor(PARALLEL_PAGES) as pool:
        for run in runs.values():
            pool.submit(run.run)
        yield lambda block: runs[block.page].results[block].result()
        for run in runs.values():
            run.stopped.set()  # after a failure with -x: finish the running blocks only


@pytest.mark.slow
@pytest.mark.timeout(BLOCK_TIMEOUT_S + 60)
@pytest.mark.parametrize("block", CODE_BLOCKS, ids=lambda block: block.name)
def test_block_runs(block, block_results):
    if block.marker == "skip":
        pytest.skip(f"not run here: {block.argument}")
    result = block_results(block)
    output = (result.stdout + result.stderr)[-4000:]
    if block.marker == "xfail":
        assert result.returncode != 0, f"{block.name} passes now: remove its xfail marker"
        expected = re.match(r'"([^"]+)"', block.argument)
        assert expected and expected[1] in output, f"{block.name} fails otherwise:\n{output}"
        pytest.xfail(block.argument)
    assert result.returncode == 0, f"{block.name} exit {result.returncode}:\n{output}"
