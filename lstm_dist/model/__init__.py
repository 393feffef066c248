"""The model: the LSTM cell and the character model around it.

    cell.py       the equations once (`cell_update`, `lstm_cell`) and the reference path (`lstm_layer_reference`)
    fast.py       the fast layer: one autograd Function per layer and window, hand-derived backward
    loops.py      the fast layer's time loops: recurrent product, pointwise steps (eager, compiled, C++)
    cpu_loops.py  building and loading the C++ loops (csrc/lstm_loops.cpp)
    buffers.py    the pool of big per-window buffers
    kernels.py    the table of paths (`KERNELS`), the `Kernels` in force, and `choose_kernels`
    char_lstm.py  `CharLSTM`: embedding, layers, head; `step()` for sampling
    flops.py      the model's FLOPs per token (matrix products): the count behind every MFU

Nothing is imported here: import the module you need (`from lstm_dist.model.kernels import choose_kernels`).
"""
