"""The documentation cannot drift from the code.

README.md and every ``docs/**/*.md`` are read as a user reads them:

- every ``python <script>.py ...``, ``python -m dino_locat... ...`` and ``torchrun ...
  <script>.py ...`` command (and a bare ``eval/knn.py --flags`` in inline code), in a fenced
  shell block or in inline code, names a script that
  exists and exposes ``get_args_parser()``, and that parser accepts the documented flags. The
  flags are parsed, never run. Placeholders (CKPT, /path/to/...) are ordinary values.
  ``python -m`` of other packages (pip, pytest) is not ours to check and is left alone;
  ``bash <file>`` commands only have to name an existing file;
- every relative link and image resolves to a file or folder inside the repository, and a
  ``#anchor`` into a markdown file names one of its headings (GitHub's heading ids);
- every ``docs/...md#section`` that a module of the package or a CLI cites exists;
- every repository path quoted on its own in inline code (``dino_locat/...``, ``eval/...``,
  ``launch/...``, ``tests/...``, ``docs/...``, ``.ci/...``) exists.

Each check lists every broken item it found, with the file and line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&"}
WRAPPERS = {"nice", "nohup", "time", "env", "srun"}
# torchrun options that take no value; every other option takes one (or is --opt=value).
TORCHRUN_SWITCHES = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path"}
PATH_PREFIXES = ("dino_locat/", "eval/", "launch/", "tests/", "docs/", ".ci/")
FENCE = re.compile(r"^\s{0,3}(```|~~~)\s*([\w+-]*)")
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def doc_files(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def where(path: Path, line: int, root: Path) -> str:
    return f"{path.relative_to(root)}:{line}"


def split_markdown(text: str) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
    """(fenced blocks as (first body line, language, body), prose lines as (line, text))."""
    blocks, prose = [], []
    fence, language, start, body = None, "", 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, language, start, body = match.group(1), match.group(2).lower(), number + 1, []
        elif fence is not None and line.strip().startswith(fence):
            blocks.append((start, language, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append((number, line))
    return blocks, prose


def joined(prose: list[tuple[int, str]]) -> tuple[str, list[int]]:
    """The prose as one text (inline code and links may wrap lines) and each line's number."""
    return "\n".join(line for _, line in prose), [number for number, _ in prose]


def inline_code(prose: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Inline code spans of the prose, whitespace collapsed, with the line they start on."""
    text, numbers = joined(prose)
    for match in INLINE_CODE.finditer(text):
        yield numbers[text.count("\n", 0, match.start())], " ".join(match.group(1).split())


def shell_commands(snippet: str) -> Iterator[tuple[int, list[str]]]:
    """The simple commands of a shell snippet as (line offset, tokens): continuations joined,
    comments dropped, split at ``&&``, ``;`` and pipes; ValueError where shlex cannot read."""
    lines = snippet.splitlines()
    offset = 0
    while offset < len(lines):
        first, logical = offset, lines[offset]
        while logical.rstrip().endswith("\\") and offset + 1 < len(lines):
            offset += 1
            logical = logical.rstrip()[:-1] + " " + lines[offset]
        offset += 1
        logical = logical.strip().removeprefix("$ ")
        if not re.search(r"\b(python3?|torchrun|bash)\b|^\S+\.py(\s|$)", logical):
            continue
        lexer = shlex.shlex(logical, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        command: list[str] = []
        for token in lexer:
            if token in SHELL_SEPARATORS:
                yield first, command
                command = []
            else:
                command.append(token)
        yield first, command


@dataclass(frozen=True)
class Invocation:
    """One documented command: a script file or a module, and the flags it is given."""

    where: str
    text: str
    script: Path | None
    module: str | None
    argv: list[str]
    partial: bool = False  # a bare `eval/knn.py --flag` quotes flags, not a whole command


def invocation(tokens: list[str], at: str) -> Invocation | None:
    """What ``tokens`` runs, if it is a python or torchrun command of ours; else None."""
    text = " ".join(tokens)
    while tokens and (ENV_ASSIGNMENT.match(tokens[0]) or tokens[0] in WRAPPERS):
        tokens = tokens[1:]
        while tokens and tokens[0].startswith("-"):  # a wrapper's own options: nice -n 19
            tokens = tokens[2:] if len(tokens) > 1 and tokens[1].isdigit() else tokens[1:]
    if len(tokens) > 1 and tokens[0].endswith(".py") and tokens[1].startswith("-"):
        return Invocation(at, text, Path(tokens[0]), None, tokens[1:], partial=True)
    if not tokens or tokens[0] not in {"python", "python3", "torchrun"}:
        return None
    runner, rest = tokens[0], tokens[1:]
    valued = {"-X", "-W"} if runner != "torchrun" else None
    while rest and rest[0].startswith("-"):
        option = rest.pop(0)
        if option in {"-m", "--module"}:  # the next word is the module, for both runners
            module = rest.pop(0) if rest else ""
            if not module.startswith("dino_locat"):
                return None  # pip, pytest, ...: not ours to check
            return Invocation(at, text, None, module, rest)
        if option == "-c":
            return None
        takes_value = (
            option in valued
            if valued is not None
            else option not in TORCHRUN_SWITCHES and "=" not in option
        )
        if takes_value and rest:
            rest.pop(0)
    if not rest:
        return None  # an interactive interpreter
    return Invocation(at, text, Path(rest[0]), None, rest[1:])


def documented(files: list[Path], root: Path) -> tuple[list[Invocation], list, list[str]]:
    """(python/torchrun commands, (place, file) of bash commands, unreadable command lines)."""
    commands, scripts, problems = [], [], []
    for path in files:
        blocks, prose = split_markdown(path.read_text())
        snippets = [(start, body) for start, lang, body in blocks if lang in SHELL_FENCES]
        snippets += list(inline_code(prose))
        for line, snippet in snippets:
            try:
                for offset, tokens in shell_commands(snippet):
                    at = where(path, line + offset, root)
                    found = invocation(tokens, at)
                    if found is not None:
                        commands.append(found)
                    elif len(tokens) > 1 and tokens[0] == "bash":
                        scripts.append((at, tokens[1]))
            except ValueError as error:
                at = where(path, line, root)
                problems.append(f"{at}: cannot read the command {snippet!r} ({error})")
    return commands, scripts, problems


_MODULES: dict[Path, ModuleType] = {}


def load_script(script: Path) -> ModuleType:
    """Import a CLI file as its own module, its folder first on sys.path as when it runs."""
    if script not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"_documented_{len(_MODULES)}", script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as for a running script (dataclasses look it up)
        sys.path.insert(0, str(script.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(script.parent))
        _MODULES[script] = module
    return _MODULES[script]


def parser_of(command: Invocation, root: Path) -> argparse.ArgumentParser:
    """The command's argparse parser; LookupError says what is missing."""
    if command.module is not None:
        module, name = importlib.import_module(command.module), command.module
    else:
        script = (root / command.script).resolve()
        if not script.is_file():
            raise LookupError(f"no such script {command.script}")
        module, name = load_script(script), str(command.script)
    if not hasattr(module, "get_args_parser"):
        raise LookupError(f"{name} has no get_args_parser(), so its flags cannot be checked")
    return module.get_args_parser()


def parse_problem(command: Invocation, root: Path) -> str | None:
    """Why the command's flags do not parse, or None when they do (``--help`` included)."""
    try:
        parser = parser_of(command, root)
    except (LookupError, ImportError) as error:
        return str(error)
    if command.partial:  # its flags must exist and take their values; others may be missing
        for action in parser._actions:
            if action.option_strings:
                action.required = False
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(command.argv)
    except SystemExit as stop:
        if stop.code not in (0, None):
            lines = err.getvalue().strip().splitlines()
            return lines[-1] if lines else f"exit status {stop.code}"
    return None


def command_problems(files: list[Path], root: Path = REPO) -> list[str]:
    commands, scripts, problems = documented(files, root)
    for command in commands:
        problem = parse_problem(command, root)
        if problem:
            problems.append(f"{command.where}: `{command.text}`: {problem}")
    for at, script in scripts:
        if not (root / script).is_file():
            problems.append(f"{at}: `bash {script}`: no such file")
    return problems


def slug(heading: str) -> str:
    """GitHub's id of a heading: link text kept, lower case, punctuation dropped, - for spaces."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading ids of a markdown file, with GitHub's -1, -2 for repeated headings."""
    seen: dict[str, int] = {}
    ids = set()
    for _, line in split_markdown(path.read_text())[1]:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            ids.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return ids


def link_problems(files: list[Path], root: Path = REPO) -> list[str]:
    problems = []
    for path in files:
        text, numbers = joined(split_markdown(path.read_text())[1])
        # Code spans hide what looks like a link; their line breaks are kept for the numbers.
        text = INLINE_CODE.sub(lambda m: "code" + "\n" * m.group(0).count("\n"), text)
        for match in LINK.finditer(text):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            at = where(path, numbers[text.count("\n", 0, match.start(1))], root)
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if not resolved.is_relative_to(root.resolve()):
                problems.append(f"{at}: {target} leaves the repository")
            elif not resolved.exists():
                problems.append(f"{at}: {target} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{at}: {target}: no heading with the id #{anchor}")
    return problems


def path_problems(files: list[Path], root: Path = REPO) -> list[str]:
    problems = []
    for path in files:
        for number, code in inline_code(split_markdown(path.read_text())[1]):
            if not code.startswith(PATH_PREFIXES) or re.search(r"[\s<>*{}\[\]]|NNNN", code):
                continue
            file_part, _, anchor = code.partition("#")
            at = where(path, number, root)
            if not (root / file_part).exists():
                problems.append(f"{at}: `{code}` does not exist")
            elif anchor and file_part.endswith(".md") and anchor not in anchors(root / file_part):
                problems.append(f"{at}: `{code}`: no heading with the id #{anchor}")
    return problems


def source_reference_problems(root: Path = REPO) -> list[str]:
    """Citations of a docs page (and its section) in the code: ``docs/architecture.md#data``."""
    problems = []
    sources = [
        p for folder in ("dino_locat", "eval", "launch") for p in (root / folder).rglob("*.py")
    ]
    for path in sorted(sources):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for page, anchor in re.findall(r"\b(docs/[\w/.-]+\.md)(?:#([\w-]+))?", line):
                at = where(path, number, root)
                if not (root / page).is_file():
                    problems.append(f"{at}: {page} does not exist")
                elif anchor and anchor not in anchors(root / page):
                    problems.append(f"{at}: {page} has no heading with the id #{anchor}")
    return problems


def report(problems: list[str]) -> str:
    return f"{len(problems)} broken item(s) in the docs:\n" + "\n".join(problems)


# -- the checks on this repository --------------------------------------------------------


def test_documented_commands_parse():
    commands, _, _ = documented(doc_files(), REPO)
    # The extraction itself is checked: the README's main command is among those found.
    assert "python launch/dino.py --arch locatvit_s" in {c.text for c in commands}
    assert len(commands) > 40
    problems = command_problems(doc_files())
    assert not problems, report(problems)


def test_relative_links_and_images_resolve():
    problems = link_problems(doc_files())
    assert not problems, report(problems)


def test_code_cites_existing_doc_sections():
    problems = source_reference_problems()
    assert not problems, report(problems)


def test_quoted_repository_paths_exist():
    problems = path_problems(doc_files())
    assert not problems, report(problems)


# -- the checker finds what it is meant to find ------------------------------------------


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "tool.py").write_text(
        "import argparse\n\n\ndef get_args_parser():\n"
        "    parser = argparse.ArgumentParser()\n"
        "    parser.add_argument('--good', type=int)\n"
        "    parser.add_argument('--name')\n"
        "    return parser\n"
    )
    (tmp_path / "bare.py").write_text("VALUE = 1\n")
    return tmp_path


def test_checker_reports_bad_flags_missing_scripts_and_parsers(fake_repo: Path):
    (fake_repo / "README.md").write_text(
        "Run `OMP_NUM_THREADS=1 python tool.py --good 3` or\n\n"
        "```bash\n"
        "python tool.py --good 1 \\\n    --name CKPT   # a comment\n"
        "nice -n 19 python tool.py --bad 1\n"
        "torchrun --nproc_per_node 2 --standalone tool.py --good x\n"
        "python missing.py --good 1 && python bare.py\n"
        "python -m pip install -r requirements.txt\n"
        "bash run.sh\n"
        "```\n"
        "and inline, wrapped: `python tool.py\n--name x --oops`; bare: `./tool.py --good y`.\n"
    )
    problems = command_problems(doc_files(fake_repo), fake_repo)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "README.md:6: `nice -n 19 python tool.py --bad 1`: " in text
    assert "unrecognized arguments: --bad 1" in text
    assert "README.md:7: `torchrun --nproc_per_node 2 --standalone tool.py --good x`" in text
    assert "--good: invalid int value: 'x'" in text
    assert "README.md:8: `python missing.py --good 1`: no such script missing.py" in text
    assert "README.md:8: `python bare.py`: bare.py has no get_args_parser()" in text
    assert "README.md:10: `bash run.sh`: no such file" in text
    assert "README.md:12: `python tool.py --name x --oops`: " in text
    assert "README.md:13: `./tool.py --good y`: " in text


def test_checker_reports_broken_links_anchors_and_paths(fake_repo: Path):
    (fake_repo / "docs" / "page.md").write_text(
        "# A page\n\n## Round 2: held-out, `train` queries\n\n```bash\n# not a heading\n```\n"
    )
    (fake_repo / "README.md").write_text(
        "[ok](docs/page.md#round-2-held-out-train-queries) [ok](docs/) [web](https://x.org)\n"
        "[bad anchor](docs/page.md#not-a-heading) ![img](docs/none.png)\n"
        "[up](../outside.md) [self](#a-title) [`code` text](docs/page.md#a-page)\n"
        "# A title\n"
        "Paths: `docs/page.md`, `docs/gone.md`, `output/x/checkpoint.pth`, `docs/*.md`,\n"
        "`docs/page.md#a-page`, `docs/page.md#gone`.\n"
    )
    problems = link_problems(doc_files(fake_repo), fake_repo)
    text = "\n".join(problems)
    assert len(problems) == 3, text
    assert "README.md:2: docs/page.md#not-a-heading: no heading with the id #not-a-heading" in text
    assert "README.md:2: docs/none.png does not exist" in text
    assert "README.md:3: ../outside.md leaves the repository" in text
    assert path_problems(doc_files(fake_repo), fake_repo) == [
        "README.md:5: `docs/gone.md` does not exist",
        "README.md:6: `docs/page.md#gone`: no heading with the id #gone",
    ]
    (fake_repo / "dino_locat").mkdir()
    (fake_repo / "dino_locat" / "m.py").write_text(
        '"""Design: docs/page.md#a-page, docs/page.md#gone and docs/none.md."""\n'
    )
    assert source_reference_problems(fake_repo) == [
        "dino_locat/m.py:1: docs/page.md has no heading with the id #gone",
        "dino_locat/m.py:1: docs/none.md does not exist",
    ]
