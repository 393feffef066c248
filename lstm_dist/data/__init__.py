"""The data path: where text comes from, and the windows each rank reads.

- `sources`: WikiText-103 (download with resume and sha256, or a local zip/dir), the built-in
  `stdlib-docs` corpus, files of your own; `prepare`: text -> a corpus directory (train/valid/test
  `.bin`, `vocab.json`, `meta.json`), streamed in chunks, written atomically.
- `corpus`: reading a corpus directory (the vocabularies, the splits as memmaps, the one UTF-8 reader).
- `streams`: a split -> one rank's training windows (`TokenStream`, its cursor in `state_dict`) and the
  evaluation batches.
- `run_corpus`: the corpus a run opens, agreed by every rank (a built-in source prepared on first use).
- `python -m lstm_dist.data prepare|bench` (`__main__`).

A run on a prepared corpus imports nothing of `prepare` or `sources`.
"""
