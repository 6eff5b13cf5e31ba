"""Every code block of README.md runs as written, on this machine (a CPU one included).

Blocks are found generically (any fenced block, in the order of the README), so sections added later are
covered without touching this file:

- each ```python block runs as a script in a fresh Python process, in an empty directory, as a user would
  run it (no Triton interpreter: ops on CPU tensors take their PyTorch references). Its prerequisite is the
  trained runs it loads, named as ``runs/<name>/model``: each is trained first in that directory by the
  bundled trainer, shortened to two steps on seqmix's own source files (the README's own training command
  is a bash block, run below). A block that imports a module that is not installed (an optional extra,
  e.g. ``transformers``) is skipped with that reason.
- the ``python -m seqmix...`` commands of the ```bash blocks run in README order in one directory, as a
  user following the README from the top would (slow: they train for real). A command the README repeats
  runs once. Other commands (``pip install``, ``torchrun``, other modules) are not run.
- a block preceded by ``<!-- readme-test: skip: REASON -->`` is skipped with REASON (e.g. a GPU-sized run).
"""

import ast
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip:\s*(.+?)\s*-->")
RUN_MODEL = re.compile(r"runs/([\w.-]+)/model\b")
TIMEOUT_S = 1200


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the README's stated reason not to run it


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{i + 1}: code block never closed"
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = SKIP_MARK.search(before)
        blocks.append(Block(fence.group(1), i + 1, "\n".join(lines[i + 1:end]) + "\n", mark and mark.group(1)))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def _env(workdir: Path) -> dict:
    """The user's environment: no Triton interpreter, nothing from the network, transformers' cache in ``workdir``
    (seqmix's token cache is the user's own, as for the trainer's tests)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEQMIX_POISON_EMPTY")}
    return {**env, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(workdir / ".hf")}


def _run(args: list[str], cwd: Path, what: str) -> None:
    result = subprocess.run(args, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=TIMEOUT_S,
                            check=False)
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-6000:]}"


def _missing_modules(code: str) -> list[str]:
    tree = ast.parse(code)
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run of the bundled tiny config, two steps on seqmix's own sources: a run directory with model/."""
    work = tmp_path_factory.mktemp("prerequisite")
    _run([sys.executable, "-m", "seqmix.train", "--config", "tiny", "--out-dir", "runs/prerequisite",
          "--data", str(ROOT / "seqmix"), "--steps", "2", "--warmup-steps", "1", "--eval-every", "2",
          "--save-every", "2", "--eval-tokens", "1024"], work, "training the prerequisite run")
    return work / "runs" / "prerequisite"


PYTHON_BLOCKS = [b for b in BLOCKS if b.lang == "python"]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"README.md:{b.line}" for b in PYTHON_BLOCKS])
def test_python_block_runs(block, tmp_path, request):
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    missing = _missing_modules(block.code)
    if missing:
        pytest.skip(f"README.md:{block.line} imports {missing}, not installed here")
    for name in sorted(set(RUN_MODEL.findall(block.code))):
        shutil.copytree(request.getfixturevalue("trained_run"), tmp_path / "runs" / name)
    script = tmp_path / "readme_block.py"
    script.write_text(block.code)
    _run([sys.executable, str(script)], tmp_path, f"README.md:{block.line} (python block)")


def _joined_lines(block: Block):
    """(README line, text) of each line of ``block``, a backslash continuation joined to its first line."""
    start, pending = None, ""
    for offset, line in enumerate(block.code.splitlines()):
        start = block.line + 1 + offset if start is None else start
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        start, pending = None, ""


def bash_commands(blocks: list[Block]) -> list[tuple[int, list[str]]]:
    """The ``python -m seqmix...`` commands of the bash blocks not marked to skip, in order, as argument
    lists (line continuations joined, comments dropped, ``a && b`` split), each once."""
    commands, seen = [], set()
    for block in blocks:
        if block.lang not in ("bash", "sh", "shell", "console") or block.skip:
            continue
        for line_no, line in _joined_lines(block):
            words = shlex.split(line, comments=True)
            parts = [[]]
            for word in words:
                parts.append([]) if word == "&&" else parts[-1].append(word)
            for args in parts:
                is_seqmix = args[:2] == ["python", "-m"] and len(args) > 2 and args[2].split(".")[0] == "seqmix"
                if is_seqmix and tuple(args) not in seen:
                    seen.add(tuple(args))
                    commands.append((line_no, args))
    return commands


def test_bash_commands_parse():
    """The extraction finds the README's trainer command (a guard against a silently empty slow test)."""
    assert any(args[2] == "seqmix.train" for _, args in bash_commands(BLOCKS))


@pytest.mark.slow
def test_bash_seqmix_commands_run_in_order(tmp_path):
    for line, args in bash_commands(BLOCKS):
        _run([sys.executable, *args[1:]], tmp_path, f"README.md:{line}: {shlex.join(args)}")
