"""What every layer shares, and nothing else: the one-line user error and its exit status
(`errors`), atomic file writes (`atomic`), the process group and its small collectives (`distributed`:
torchrun's environment, the device of a rank, `on_every_rank`), and the faults the tests place on
purpose (`faults`, `LSTM_DIST_FAULT`). Imports nothing else of lstm_dist."""
