"""README.md and docs/*.md stay true to the checkout, cheaply (no training, no subprocess):

- README stays short (under 15,000 bytes) and links every page of docs/;
- every relative Markdown link in README.md and docs/*.md names a file that exists, and a `#anchor`
  a heading of that file (GitHub's anchors);
- every command README shows is one the checkout takes: each `python -m lstm_dist.X` (plain or under
  torchrun) accepts the options written after it (its own `--help` lists each one), the launch and
  Slurm scripts it names exist and are executable, and every config file and `section.key=value` it
  passes exists in configs/ and the schema;
- every setting named in backticks (`train.steps`, `model.hidden=2048`) in README.md or docs/*.md is
  a key of the schema.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest

from lstm_dist.config import leaf_fields

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = ("run", "data", "model", "train", "log", "checkpoint")


def text_outside_code(md: str) -> str:
    """The Markdown without fenced blocks and inline code spans (a link written in code is not a link)."""
    md = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", md, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", md)


def links(md: str) -> list[str]:
    return re.findall(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text_outside_code(md))


def anchors(md: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped (hyphens and underscores kept), spaces
    turned into hyphens."""
    md = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", md, flags=re.S | re.M)
    heads = re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", md, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_readme_is_short():
    size = README.stat().st_size
    assert size < 15_000, f"README.md is {size:,} bytes; move reference material into docs/ (limit 15,000)"


def test_readme_links_every_docs_page():
    targets = {(README.parent / t.split("#")[0]).resolve() for t in links(README.read_text(encoding="utf-8"))}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in targets]
    assert not missing, f"README.md links no docs/ page named {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(page):
    md = page.read_text(encoding="utf-8")
    bad = []
    for target in links(md):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target}: no such file")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file.read_text(encoding="utf-8"))):
            bad.append(f"{target}: no heading with that anchor in {file.name}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_settings_named_in_backticks_exist(page):
    keys = set(leaf_fields())
    setting = re.compile(r"`((?:%s)\.[a-z_][a-z0-9_.]*)(?:=[^`]*)?`" % "|".join(SECTIONS))
    lines = [line for line in page.read_text(encoding="utf-8").splitlines()
             if "did you mean" not in line]  # a typo shown on purpose, with the error it gets (docs/faults.md)
    named = {k for line in lines for k in setting.findall(line)}
    unknown = sorted(k for k in named if k not in keys and not re.search(r"\.(py|sh|md|yaml|bin|json|jsonl|pt)$", k))
    assert not unknown, f"{page.relative_to(ROOT)} names settings the schema lacks: {unknown}"


# ------------------------------------------------------------------------------------------ README's commands


def readme_commands() -> list[list[str]]:
    """README's shell commands: each line of a ```bash block, comments dropped, split at && and |."""
    md = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", md, flags=re.S | re.M):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # NPROC_PER_NODE=2 launch/...
                    words = words[1:]
                if words:
                    commands.append(words)
    return commands


COMMANDS = readme_commands()


def help_text(module: str, sub: str | None) -> str:
    """`python -m MODULE [SUB] --help`, run in this process."""
    main = importlib.import_module(module if module != "lstm_dist.data" else "lstm_dist.data.__main__").main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([*([sub] if sub else []), "--help"])
    assert exit_info.value.code in (0, None)
    return out.getvalue()


def check_entry_point_args(module: str, args: list[str]) -> None:
    """Each option in `args` is one `python -m MODULE --help` lists; each `section.key=value` is a key of
    the schema; each `configs/*.yaml` exists."""
    sub = args[0] if module == "lstm_dist.data" and args and not args[0].startswith("-") else None
    usage = help_text(module, sub)
    for word in args:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", usage), f"{module} takes no {option}"
    check_settings_and_configs(args)


def check_settings_and_configs(args: list[str]) -> None:
    keys = set(leaf_fields())
    for word in args:
        if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+=.*", word):
            assert word.split("=", 1)[0] in keys, f"{word}: no such setting"
        if word.endswith(".yaml"):
            assert (ROOT / word).is_file(), f"{word} does not exist"


def test_readme_shows_the_main_commands():
    firsts = [" ".join(c[:3]) for c in COMMANDS]
    for expected in ("pip install -e", "torchrun --standalone --nproc_per_node=2", "python -m pytest",
                     "sbatch slurm/train.sh configs/wikitext103.yaml", "launch/torchrun.sh configs/wikitext103.yaml",
                     "python -m lstm_dist.generate", "python -m lstm_dist.evaluate"):
        assert any(f.startswith(expected) for f in firsts), f"README shows no `{expected} ...`"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c)[:60])
def test_readme_command_is_one_the_checkout_takes(command):
    words = command
    if words[0] in ("pip", "wandb") or words[:3] == ["python", "-m", "pytest"]:
        return  # not ours to check
    if words[0] == "sbatch":  # sbatch [its options] slurm/train.sh CONFIG [overrides]
        words = words[next(i for i, w in enumerate(words) if w.endswith(".sh")):]
    if words[0].endswith(".sh"):
        script = ROOT / words[0]
        assert script.is_file() and os.access(script, os.X_OK), f"{words[0]} is not an executable script"
        check_settings_and_configs(words[1:])
        return
    if words[0] == "torchrun":
        words = ["python", *words[words.index("-m"):]]
    assert words[:2] == ["python", "-m"] and words[2].startswith("lstm_dist"), f"unchecked command: {command}"
    check_entry_point_args(words[2], words[3:])


@pytest.mark.parametrize("config, world", [("configs/smoke.yaml", 2), ("configs/wikitext103.yaml", 16)])
def test_what_readme_says_of_a_config_is_what_it_gives(config, world):
    """The parameter count, the learning-rate line and the run directory README quotes for each config
    (the smoke run on 2 processes, the cluster run on 16) are the ones the config gives."""
    import torch

    from lstm_dist import config as C
    from lstm_dist.model.char_lstm import CharLSTM
    from lstm_dist.training import lr_rule
    from lstm_dist.training.optim import schedule_phrase

    readme = README.read_text(encoding="utf-8")
    cfg = C.load(ROOT / config, [])
    m = cfg.model
    with torch.device("meta"):  # the shapes only: no memory, no initialisation
        params = sum(p.numel() for p in CharLSTM(256, m.embedding, m.hidden, m.layers, m.dropout).parameters())
    assert f"training {params:,} parameters on {world} process(es)" in readme
    assert f"learning rate: {lr_rule.explain(cfg, world)}, {schedule_phrase(cfg.train)}\n" in readme
    assert f"run directory {cfg.run.dir}/{cfg.run.name}\n" in readme
    assert cfg.data.vocab == "bytes"  # README's outputs say bpb and bytes
