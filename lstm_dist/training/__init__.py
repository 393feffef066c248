"""The distributed training loop and everything it owns.

The one training step (used by `train`, `lr_find` and `bench --train`), the loop around it, the
checkpoint (state from the objects that own it, gathered to rank 0, written atomically), the
optimizer and the learning-rate rule and schedule, when a run stops (signals, failed steps), the run
directory's lock, and the metrics (console, `metrics.jsonl`, Weights & Biases). Entry point:
`python -m lstm_dist.train`.
"""
