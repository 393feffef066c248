"""Using a trained model: bits per byte or character over a split (`scoring`, also the trainer's evaluation),
drawing text one character at a time (`sampling`), and a model loaded from its checkpoint (`load`).
Entry points: `python -m lstm_dist.evaluate`, `python -m lstm_dist.generate`."""
