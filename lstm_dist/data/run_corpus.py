"""The corpus a run trains on: opened on every rank, prepared by rank 0 when a built-in source's
default location is missing, and refused before training when a split has nothing to score.

Used by the trainer (`lstm_dist.training.loop`) and the LR range test (`lstm_dist.lr_find`). A run on
a prepared corpus imports nothing of preparation (`prepare`, `sources`): that import happens only
where rank 0 prepares one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lstm_dist.common.distributed import DistEnv, on_every_rank
from lstm_dist.common.errors import UserError
from lstm_dist.config import Config
from lstm_dist.data.corpus import Corpus, builtin_source_for


def open_corpus(cfg: Config, env: DistEnv, say: Callable[[str], None]) -> Corpus:
    """The prepared corpus at `data.path`; a built-in source's default location is prepared by rank 0
    on first use (`say` tells what happens; the other ranks wait). Collective: every rank checks the
    same things, and a UserError any of them meets (a missing path, an empty split) stops all of them
    together."""
    path = Path(cfg.data.path)

    def prepare_if_missing() -> None:
        if path.exists():
            return
        source = builtin_source_for(path)
        if source is None:
            raise UserError(f"data.path {path} does not exist; prepare a corpus there first "
                            f"(python -m lstm_dist.data prepare --source ... --out {path}) or point data.path at one")
        if env.is_main:
            say(f"data.path {path} does not exist: preparing the built-in '{source}' corpus there "
                f"({cfg.data.vocab} vocabulary); the other ranks wait")
            from lstm_dist.data.prepare import prepare  # only here: a run on a prepared corpus imports nothing of preparation

            prepare(source, path, vocab=cfg.data.vocab)

    on_every_rank(prepare_if_missing)  # the other ranks wait here for rank 0's preparation
    return on_every_rank(lambda: scorable(Corpus(path)))


def scorable(corpus: Corpus) -> Corpus:
    """The corpus, if its valid and test splits have something to score: the first character of a
    split is only context, so a split of one character would score nothing, and a run on it would
    end with a perfect 0 bits per character from no evidence. Raises UserError (before training)."""
    for split in ("valid", "test"):
        n = corpus.sizes[split]
        if n < 2:
            raise UserError(f"the {split} split of {corpus.path} has {n} token(s), so there is nothing to score in it "
                            "(the first is only context); re-prepare the corpus with a longer "
                            f"{split} text (python -m lstm_dist.data prepare ... --force)")
    return corpus
