"""`python -m lstm_dist.bench`: speed against torch.nn.LSTM, side by side in one process: the LSTM
layers over one window (`layers`), or a whole training step over a grid of shapes (`training`,
`--train`)."""
