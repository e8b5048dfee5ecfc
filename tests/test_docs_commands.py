"""Every command line the README and the scripts' docstrings show is parsed by that script's own argument parser, so
that an example cannot name a flag that does not exist, a deprecated spelling, or a value of the wrong type.

A command is a `python X.py ...` or `torchrun ... X.py ...` line (backslash continuations joined, `&&` chains
split, a trailing `&` and `# comments` dropped) in a README code block or inline code span, or at the start of a
line of a script's docstring. X.py's main(argv) runs until its parser has parsed argv, and stops there: nothing is
trained or read."""
import argparse
import importlib
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("benchmark.py", "demo.py", "evaluate.py", "finetune_qkv.py", "plots.py", "synthetic_world.py",
           "train_clip.py", "train_nights.py")
LAUNCHERS = ("python", "python3", "torchrun")


def commands_in(text):
    """[(script, argv)] of every command line in `text` (one line each, continuations already joined)."""
    out = []
    for part in (p for line in text.splitlines() for p in re.split(r"\s&&\s", line)):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:  # not shell (e.g. prose with an apostrophe)
            continue
        if words[:1] == ["srun"]:  # srun torchrun ...
            words = words[1:]
        if words[-1:] == ["&"]:  # started in the background
            words = words[:-1]
        if not words or words[0] not in LAUNCHERS:
            continue
        scripts = [i for i, w in enumerate(words) if os.path.basename(w) in SCRIPTS]
        if scripts and not {"-c", "-m"} & set(words[:scripts[0]]):
            out.append((os.path.basename(words[scripts[0]]), words[scripts[0] + 1:]))
    return out


def readme_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.S | re.M)
    spans = [" ".join(s.split()) for s in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose)]  # may wrap across lines
    lines = [block.replace("\\\n", " ") for block in blocks] + spans
    return [("README.md", script, argv) for script, argv in commands_in("\n".join(lines))]


def docstring_commands():
    """The examples at the top of each script, as --help shows them. A bare `...` right after the script name
    stands for a whole command line and is not an example to parse."""
    out = []
    for script in SCRIPTS:
        doc = importlib.import_module(script[:-3]).__doc__ or ""
        doc = doc.replace("\\\n", " ")
        for name, argv in commands_in("\n".join(line.strip() for line in doc.splitlines())):
            if argv[:1] != ["..."]:
                out.append((script, name, argv))
    return out


class Parsed(Exception):
    """Raised by the patched parse_args once argv is parsed: main() stops there."""


def parse_only(self, args=None, namespace=None):
    namespace, unknown = self.parse_known_args(args, namespace)
    if unknown:
        self.error(f"unrecognized arguments: {' '.join(unknown)}")
    raise Parsed(namespace)


def test_the_readme_and_the_docstrings_show_commands():
    found = readme_commands()
    assert len(found) >= 15 and {s for _, s, _ in found} >= {"demo.py", "train_clip.py", "train_nights.py",
                                                            "finetune_qkv.py", "evaluate.py", "plots.py"}
    assert any(s == "evaluate.py" and "--scaling" in argv for _, s, argv in found)  # an inline span
    assert {s for _, s, _ in docstring_commands()} >= {"demo.py", "train_clip.py", "finetune_qkv.py", "plots.py"}


@pytest.mark.parametrize("where, script, argv", readme_commands() + docstring_commands(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_command_parses(where, script, argv, monkeypatch, capsys):
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    main = importlib.import_module(script[:-3]).main
    try:
        main(argv)
    except Parsed:
        pass
    except SystemExit as e:  # argparse's error exit: its message names the flag
        pytest.fail(f"{where}: python {script} {shlex.join(argv)}\n{capsys.readouterr().err.strip()} (exit {e.code})")
    else:
        pytest.fail(f"{script}: main() returned without calling parse_args")
    err = capsys.readouterr().err
    assert "deprecated" not in err, f"{where}: python {script} {shlex.join(argv)}: {err.strip()}"
