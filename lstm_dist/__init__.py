"""lstm_dist: a character-level LSTM language model trained across many GPUs and machines.

The package is three layers and their entry points; imports flow downward only:

    train, evaluate, generate, lr_find, lr_sweep, rendezvous   entry points (`python -m lstm_dist.X`),
    data/__main__, config/__main__, bench/__main__              never imported by another module
    training/    the one training step, the loop, checkpoints, optimizer and schedule, stopping, metrics
    inference/   scoring a split, sampling, a model from its checkpoint
    model/       the cell's equations, the kernel table and the one kernel choice, CharLSTM
    data/        sources -> corpus directory -> memory-mapped windows per rank
    config/      every setting: its type, default, allowed values and rule, in one place
    common/      errors, atomic writes, the process group, injected faults
"""

__version__ = "0.1.0"
