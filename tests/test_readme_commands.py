"""The README's commands are real: every ``python -m cervspine.<entry> key=value …`` in its shell blocks and
inline code composes the entry point's config with those overrides (unknown keys, groups and recipes fail
here), every ``make`` target exists, every run folder ``outputs/pipeline/<job>`` names a pipeline job, and
every synthetic demo folder is the Makefile's ``DEMO_DIR`` (the one place that names it)."""

from __future__ import annotations

import importlib.util
import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tests.helpers import REPO

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
PLACEHOLDERS = re.compile(r"…|\.\.\.|<\w+>")  # an elided value or <name>: the key is not checked either


def makefile_var(name: str) -> str:
    for line in (REPO / "Makefile").read_text().splitlines():
        found = re.match(rf"{name}\s*\??=\s*(\S+)", line)
        if found:
            return found.group(1)
    raise AssertionError(f"Makefile sets no {name}")


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-zA-Z][\w-]*)\s*:(?!=)", text, re.M))


def shell_blocks(text: str) -> list[str]:
    """The command lines of the ```bash blocks: continuations joined, here-document bodies dropped."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
        heredoc = None
        for line in block.replace("\\\n", " ").splitlines():
            if heredoc is not None:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            found = re.search(r"<<-?\s*'?(\w+)'?", line)
            heredoc = found.group(1) if found else None
            lines.append(line)
    return lines


def inline_spans(text: str) -> list[str]:
    """The inline code spans outside the fenced blocks (a span may wrap over an indented line)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`]+)`", re.sub(r"\n\s+", " ", prose))


def commands(text: str) -> list[list[str]]:
    """Each simple command (split at ``&&``, ``|``, ``;``, ``&``) of the blocks and the inline spans."""
    out = []
    for line in [*shell_blocks(text), *inline_spans(text)]:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:  # an unbalanced quote: prose, not a command
            continue
        current: list[str] = []
        for tok in [*tokens, ";"]:
            if tok in (";", "&", "&&", "|", "||"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(tok)
    return out


def entry_points(text: str) -> list[tuple[str, list[str]]]:
    """(module, arguments) of every ``python -m cervspine.…`` command."""
    found = []
    for cmd in commands(text):
        for i, tok in enumerate(cmd[:-2]):
            if (
                re.fullmatch(r"(\S*/)?python3?", tok)
                and cmd[i + 1] == "-m"
                and cmd[i + 2].startswith("cervspine")
            ):
                found.append((cmd[i + 2], cmd[i + 3 :]))
                break
    return found


def config_overrides(args: list[str], multirun: bool) -> list[str]:
    """The Hydra overrides of an entry point's arguments: flags and elided values dropped, ``[key=v]``
    (an optional one) unwrapped, and with ``-m`` each sweep at its first value (what one job composes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept = []
    for arg in args:
        if arg.startswith("-") or PLACEHOLDERS.search(arg) or "=" not in arg:
            continue
        if arg.startswith("[") and arg.endswith("]"):
            arg = arg[1:-1]
        kept.append(arg)
    if not multirun:
        return kept
    parsed = OverridesParser.create().parse_overrides(kept)
    return [
        f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line
        for o in parsed
    ]


ENTRIES = entry_points(README.read_text())


def test_the_readme_has_commands_to_check():
    modules = {m for m, _ in ENTRIES}
    assert {"cervspine.pipeline", "cervspine.train", "cervspine.predict", "cervspine.serve"} <= modules
    assert len(ENTRIES) >= 20


def check_command(module: str, args: list[str]) -> None:
    """``python -m <module> <args>`` names a module, and its Hydra config composes with the overrides, each
    of which lands where the entry point reads it (a group's choice or an existing key)."""
    assert importlib.util.find_spec(module) is not None, f"README runs {module}: no such module"
    config = REPO / "conf" / f"{module.rsplit('.', 1)[-1]}.yaml"
    if not config.is_file():  # not a Hydra entry point (cervspine.bundle.run: argparse)
        return
    overrides = config_overrides(args, multirun="-m" in args)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config.parent)):
            cfg = compose(config_name=config.stem, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    choices = cfg.hydra.runtime.choices
    for arg in overrides:
        key, value = arg.lstrip("+").split("=", 1)
        if key in choices:
            assert choices[key] == value, arg
        elif not key.startswith("hydra."):
            assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", arg


@pytest.mark.parametrize("module,args", ENTRIES, ids=[" ".join([m, *a])[:90] for m, a in ENTRIES])
def test_every_readme_command_composes_its_entry_points_config(module, args):
    check_command(module, args)


@pytest.mark.parametrize(
    "args", [["experiment=fracture_b5", "data.no_such_key=1"], ["experiment=no_such_recipe"]]
)
def test_a_command_with_an_unknown_key_or_recipe_fails_the_check(args):
    with pytest.raises(Exception):  # noqa: B017  (Hydra's ConfigCompositionException / MissingConfigException)
        check_command("cervspine.train", args)
    with pytest.raises(AssertionError):
        check_command("cervspine.no_such_entry", args)


def test_every_make_target_the_docs_name_exists():
    targets = makefile_targets()
    named = {cmd[1] for d in DOCS for cmd in commands(d.read_text()) if cmd[0] == "make" and len(cmd) > 1}
    assert named and named <= targets, sorted(named - targets)


def test_every_run_folder_the_readme_names_is_a_pipeline_job():
    jobs = {p.stem for p in (REPO / "conf" / "pipelines" / "experiment").glob("*.yaml")}
    named = set(re.findall(r"outputs/pipeline/([\w-]+)", README.read_text()))
    assert named and named <= jobs | {f"{j}_smoke" for j in jobs}, sorted(named - jobs)


def test_the_docs_name_the_makefiles_demo_folder():
    demo = makefile_var("DEMO_DIR")
    assert (REPO / "conf" / "pipelines" / "experiment" / "demo.yaml").is_file() and demo.startswith("data/")
    for doc in DOCS:
        for path in re.findall(r"data/synthetic_demo[\w-]*", doc.read_text()):
            assert path == demo, f"{doc.relative_to(REPO)} names {path}; the demo folder is {demo} (Makefile)"


def test_the_parsers_see_what_a_shell_would():
    text = "```bash\ncat > f <<'EOF'\npython -m cervspine.nope x=1\nEOF\n"
    text += "python -m cervspine.train a=1 \\\n  b=2 & # c=3\n```\n"
    text += "and `python -m cervspine.evaluate ... run_dir=R [fold=null]` inline"
    assert entry_points(text) == [("cervspine.train", ["a=1", "b=2"]),
                                  ("cervspine.evaluate", ["...", "run_dir=R", "[fold=null]"])]  # fmt: skip
    assert config_overrides(["-m", "data.fold=0,1,2", "x=…", "[fold=null]"], multirun=True) == [
        "data.fold=0",
        "fold=null",
    ]
