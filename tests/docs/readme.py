"""Every command the docs show, read from README.md and bench/README.md as a user copies it.

Commands come from fenced ```bash blocks and 4-space indented blocks: continuation lines
(`\\`) are joined, comments dropped, and `a && b` split into its parts. Each part gets a
kind; a command of no known kind is an error, so a new README line is covered (or refused)
the day it is written.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

DOCS = ("README.md", "bench/README.md")
PIPELINES = {"ssl/run.py": "ssl", "product-matching/run.py": "matching"}
# Commands of other tools, shown for the user's convenience; nothing of ours to run.
EXTERNAL = ("mlflow", "wandb", "jupyter", "tensorboard", "pip", ".", "python3.11")


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    argv: tuple[str, ...]  # without leading VAR=value assignments
    env: tuple[tuple[str, str], ...] = ()

    @property
    def text(self) -> str:
        return " ".join(self.argv)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"

    @property
    def kind(self) -> str:
        a = self.argv
        if a[0] == "python" and len(a) > 1 and a[1] in PIPELINES:
            return "pipeline"
        if a[:3] == ("python", "-m", "pytest"):
            return "pytest"
        if a[:2] == ("python", "-m") and len(a) > 2:
            return {
                "shared.export.onnx": "export",
                "shared.tracking.lr_find": "lr_find",
                "shared.linear_probe": "linear_probe",
                "shared.tracking.wandb_offline": "wandb_offline",
            }.get(a[2], "unknown")
        if a[0] == "python" and len(a) > 1:
            if a[1] == "product-matching/infer.py":
                return "infer"
            if a[1] == "product-matching/serve.py":
                return "serve"
            if re.fullmatch(r"bench/\w+\.py", a[1]):
                return "bench"
        if a[0] in EXTERNAL:
            return "external"
        return "unknown"

    @property
    def pipeline(self) -> str:
        return PIPELINES[self.argv[1]]

    @property
    def overrides(self) -> list[str]:
        """A pipeline command's arguments after the script, `-m` excluded."""
        return [a for a in self.argv[2:] if a not in ("-m", "--multirun")]

    @property
    def multirun(self) -> bool:
        return "-m" in self.argv or any(a.startswith("hparams_search=") for a in self.argv)


def _blocks(text: str):
    """(first line number, lines) of each fenced bash block and each indented block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip().startswith("```bash"):
            start, body = i + 2, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            yield start, body
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            start, body = i + 1, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            yield start, body
            continue
        i += 1


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` after whitespace, outside quotes)."""
    quote = None
    for j, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (j == 0 or line[j - 1].isspace()):
            return line[:j].rstrip()
    return line.rstrip()


def commands(doc: str) -> list[Command]:
    found = []
    for start, body in _blocks((REPO / doc).read_text()):
        joined: list[tuple[int, str]] = []
        for offset, raw in enumerate(body):
            line = _strip_comment(raw)
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
            elif line.strip():
                joined.append((start + offset, line.strip()))
        for number, line in joined:
            if not re.match(r"^([A-Z_]+=\S+\s+)*(python|pip|mlflow|wandb|jupyter|\.\s)", line):
                continue  # output, a file tree or code, not a shell command
            for part in line.split("&&"):
                words = shlex.split(part)
                env = []
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    env.append(tuple(words.pop(0).split("=", 1)))
                if words:
                    found.append(Command(doc, number, tuple(words), tuple(env)))
    return found


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in commands(doc)]


def substitute(argv, values: dict[str, str]) -> list[str]:
    """`argv` with the docs' placeholders (`<time>`, example paths) replaced by `values`:
    a user types their own paths there; nothing else changes."""
    out = []
    for arg in argv:
        for placeholder, value in values.items():
            arg = arg.replace(placeholder, value)
        out.append(arg)
    return out


def script_flags(path: Path) -> set[str]:
    """The `--flags` an argparse script defines (read from its source and from the private
    helper modules beside it that it imports, e.g. bench/_quality.py; not by running it)."""
    text = path.read_text()
    for helper in re.findall(r"^\s*(?:from|import) (_\w+)", text, re.M):
        if (path.parent / f"{helper}.py").is_file():
            text += (path.parent / f"{helper}.py").read_text()
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", text))
