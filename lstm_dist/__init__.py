"""lstm_dist: a character-level LSTM language model trained across many GPUs and machines."""

__version__ = "0.1.0"
