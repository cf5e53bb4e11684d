"""README.md runs as written: every fenced ``python`` and ``bash``/``sh`` block is executed.

Markers, each an HTML comment on its own line directly above the fence (several may stack):

* ``<!-- readme-test: skip: REASON -->``  the block cannot run here; skipped with REASON;
* ``<!-- readme-test: torchrun N -->``    a python script run on N processes (CPU, gloo);
* ``<!-- readme-test: expect: REGEX -->`` stdout must match REGEX (``re.search``, multiline).

Unmarked python blocks run in a fresh interpreter whose working directory is a temporary
folder (not the repository), so they prove that the installed package imports from anywhere;
shell blocks run with ``bash -euo pipefail`` from the repository root with ``.venv/bin`` first
on ``PATH``. Every runnable python block must carry an ``expect`` marker, so each test checks
what its snippet prints, not only its exit status.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_BIN = ROOT / ".venv" / "bin"
RUNNABLE = {"python": "python", "bash": "bash", "sh": "bash"}
PYTHON_TIMEOUT_S = 120
TORCHRUN_TIMEOUT_S = 240
SHELL_TIMEOUT_S = 240

_MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,})\s*(?P<lang>[\w+-]*)[^`]*$")


@dataclass
class Block:
    kind: str            # "python" or "bash"
    line: int            # 1-based line of the opening fence
    code: str
    skip: str | None = None
    nproc: int | None = None
    expect: list[str] = field(default_factory=list)
    id: str = ""


def parse_readme(text: str) -> tuple[list[Block], list[str]]:
    """The runnable fenced blocks of ``text`` in order, and the problems found (a marker that
    is not directly above a fence, an unknown directive, a marker on a block that never runs)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: list[tuple[int, str]] = []   # markers waiting for their fence
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        if marker:
            pending.append((i + 1, marker.group("body")))
            i += 1
            continue
        fence = _FENCE.match(line)
        if not fence:
            for lineno, body in pending:
                problems.append(f"line {lineno}: marker {body!r} is not directly above a fence")
            pending = []
            i += 1
            continue
        # A fenced block: collect until the closing fence of at least as many backticks.
        ticks, lang, start = fence.group("ticks"), fence.group("lang").lower(), i + 1
        indent = len(fence.group("indent"))
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{ticks}`*\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        if i == len(lines):
            problems.append(f"line {start}: fenced block is never closed")
        i += 1  # past the closing fence
        markers, pending = pending, []
        if lang not in RUNNABLE:
            for lineno, m in markers:
                problems.append(f"line {lineno}: marker {m!r} on a {lang or 'plain'} block "
                                "that is never run")
            continue
        block = Block(RUNNABLE[lang], start, "\n".join(body) + "\n")
        for lineno, m in markers:
            if m.startswith("skip:") and m[len("skip:"):].strip():
                block.skip = m[len("skip:"):].strip()
            elif m.startswith("expect:") and m[len("expect:"):].strip():
                rx = m[len("expect:"):].strip()
                try:
                    re.compile(rx)
                except re.error as e:
                    problems.append(f"line {lineno}: bad expect regex {rx!r}: {e}")
                block.expect.append(rx)
            elif re.fullmatch(r"torchrun [1-9]\d*", m):
                block.nproc = int(m.split()[1])
            else:
                problems.append(f"line {lineno}: unknown readme-test directive {m!r}")
        if block.nproc is not None and block.kind != "python":
            problems.append(f"line {start}: a torchrun marker needs a python block")
        blocks.append(block)
    for lineno, body in pending:
        problems.append(f"line {lineno}: marker {body!r} is not directly above a fence")
    counts: dict[str, int] = {}
    for b in blocks:
        counts[b.kind] = counts.get(b.kind, 0) + 1
        b.id = f"{b.kind}-{counts[b.kind]}"
    return blocks, problems


BLOCKS, PROBLEMS = parse_readme(README.read_text(encoding="utf-8"))


def _env(**extra: str) -> dict[str, str]:
    """The test's environment with one thread per process, the venv first on PATH, and no
    PYTHONPATH entry pointing into the repository (snippets must use the installed package)."""
    env = dict(os.environ)
    # DeepSpeed's JIT-built CPU op: built once per checkout, where
    # tests/integrations/test_deepspeed.py and launch/deepspeed.sh build it too
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != ROOT]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    bin_dir = VENV_BIN if VENV_BIN.is_dir() else Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _tail(text: str, n: int = 6000) -> str:
    """The last ``n`` characters of ``text`` with repeated lines (each rank's copy of the same
    warning) left out, so one rank's own error stays in view."""
    text = "\n".join(dict.fromkeys(text.splitlines()))
    return text if len(text) <= n else "...\n" + text[-n:]


def _run(block: Block, cmd: list[str], cwd: Path, timeout_s: float) -> str:
    """Run ``cmd`` in its own process group (a timeout kills every process it started);
    assert exit status 0 and the block's expectations; return stdout."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"README {block.id} (line {block.line}) still running after {timeout_s}s\n"
                    f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}")
    report = (f"README {block.id} (line {block.line}): {' '.join(map(str, cmd))}\n"
              f"--- code ---\n{block.code}--- stdout ---\n{_tail(out)}\n"
              f"--- stderr ---\n{_tail(err)}")
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{report}"
    for rx in block.expect:
        assert re.search(rx, out, re.MULTILINE), f"stdout does not match {rx!r}\n{report}"
    return out


def test_readme_markers_and_blocks():
    assert not PROBLEMS, "README.md markers:\n" + "\n".join(PROBLEMS)
    python = [b for b in BLOCKS if b.kind == "python"]
    assert python, "README.md has no ```python block"
    torchrun = [b for b in BLOCKS if b.nproc is not None]
    assert torchrun, "expected a `readme-test: torchrun N` block"
    assert all(b.skip is None for b in torchrun), "a torchrun block must run, not be skipped"
    unchecked = [b.id for b in python if b.skip is None and not b.expect]
    assert not unchecked, f"python blocks without an `expect` marker: {unchecked}"
    assert any(b.kind == "bash" and b.skip is None for b in BLOCKS), "no runnable shell block"


@pytest.fixture(scope="module", autouse=True)
def _no_idle_pools():
    """The snippets start their own processes: the suite's idle gloo pools would compete with
    them for the CPUs."""
    from tests.helpers.dist_harness import close_all

    close_all()


@pytest.mark.distributed
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, tmp_path: Path):
    if block.skip is not None:
        pytest.skip(f"README {block.id} (line {block.line}): {block.skip}")
    if block.kind == "bash":
        _run(block, ["bash", "-euo", "pipefail", "-c", block.code], ROOT, SHELL_TIMEOUT_S)
        return
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    if block.nproc is None:
        _run(block, [sys.executable, str(script)], tmp_path, PYTHON_TIMEOUT_S)
    else:
        _run(block, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc-per-node", str(block.nproc), str(script)],
             tmp_path, TORCHRUN_TIMEOUT_S)
