"""The documentation cannot rot: every ```python block of README.md and docs/*.md runs as
written, relative links point at files and headings that exist, and the README's commands
are the ones CI runs.

The blocks run in one subprocess (importing JAX once keeps this to seconds), each in a fresh
namespace and a temporary working directory, so a block must define everything it uses.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
LINKED = [*DOCS, "results/README.md"]  # files whose relative links are checked

# Runs each block in a fresh namespace; prints one JSON line per block (None = passed).
_RUNNER = """
import json, sys, traceback
failures = []
for where, code in json.load(sys.stdin):
    try:
        exec(compile(code, where, "exec"), {"__name__": "__main__"})
        failures.append(None)
    except BaseException:
        failures.append(traceback.format_exc())
print(json.dumps(failures))
"""


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def python_blocks(path: str) -> list[tuple[str, str]]:
    """``(where, code)`` of every ```python block in ``path``; ``where`` is ``file:line`` of
    the block's first code line, so a traceback points into the Markdown file."""
    blocks, lines = [], _read(path).splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise AssertionError(f"{path}:{i + 1}: unclosed ```python block")
            # blank lines in front keep the line numbers of tracebacks right
            code = "\n" * start + "\n".join(lines[start:end]) + "\n"
            blocks.append((f"{path}:{start + 1}", code))
            i = end
        i += 1
    return blocks


def test_readme_has_a_quickstart_to_run():
    assert len(python_blocks("README.md")) >= 2


def test_every_python_block_runs_as_written(tmp_path):
    blocks = [b for path in DOCS for b in python_blocks(path)]
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    failures = json.loads(run.stdout.strip().splitlines()[-1])
    failed = [f"{where}:\n{tb}" for (where, _), tb in zip(blocks, failures, strict=True) if tb]
    assert not failed, "\n".join(failed)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)  # no headings inside code
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("path", LINKED)
def test_relative_links_point_at_existing_files_and_headings(path):
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(os.path.join(ROOT, resolved)):
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved})")
    assert not broken, f"{path}: broken links: {broken}"


# the project's internal design notes and the data folder outside the repository, which
# readers do not have (spelled in pieces so this file does not cite them either)
_UNREACHABLE = ("DESIGN" + ".md", "../" + "shared")


@pytest.mark.parametrize("path", LINKED)
def test_docs_cite_nothing_readers_cannot_reach(path):
    text = _read(path)
    assert not [name for name in _UNREACHABLE if name in text]


def test_readme_commands_are_what_ci_runs():
    readme, ci = _read("README.md"), _read(".ci/run")
    install = "pip install -r requirements.txt -e ."
    for command in ("python -m pytest -q", "python -m pytest -q -m slow"):
        assert command in readme and command in ci
    assert install in readme and "pip install --quiet -r requirements.txt -e ." in ci
    main = "python -m experiments.main --config=experiments/configs/synthetic.py"
    assert main in readme
