"""Host a multi-node job's rendezvous store for as long as the job runs: `python -m lstm_dist.rendezvous HOST PORT`.

torchrun's c10d rendezvous keeps its store inside the torchrun of whichever node hosts the endpoint. That
torchrun leaves as soon as its own workers are done and it has passed the exit barrier, and it takes the
store with it, while the torchrun of another node may still be waiting in that barrier or shutting the
rendezvous down. That one then loses its connection and prints a C++ traceback (`recvValueWithTimeout
failed ... Failed to recv, got 0 bytes`) and "Error waiting on exit barrier", although the run succeeded.
So slurm/train.sh starts this server on the first node before any torchrun, points every torchrun at it as
a client (`--rdzv-conf=is_host=0`), and stops it after every node's torchrun has exited.

The server ignores SIGTERM and SIGUSR1, which Slurm and slurm/train.sh send to stop training: the store
must outlive the training processes that checkpoint on them. SIGINT or SIGHUP stop it.
"""

from __future__ import annotations

import datetime
import signal
import sys

from .errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit() or not 0 < int(args[1]) < 65536:
        raise UserError("usage: python -m lstm_dist.rendezvous HOST PORT (this node's address for the "
                        "other nodes, and a TCP port number, 1-65535)")
    host, port = args[0], int(args[1])
    stop = {signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the store's threads exist, so they inherit it
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    from torch.distributed import TCPStore

    try:
        # Listens on every address of this node (HOST is where its own client connects); the clients'
        # requests are served by the store's own thread.
        store = TCPStore(host, port, is_master=True, wait_for_workers=False, multi_tenant=True,
                         timeout=datetime.timedelta(seconds=60))
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot listen on port {port} for the rendezvous ({first}); "
                        "set MASTER_PORT to a free port") from None
    print(f"rendezvous store listening on port {port}", flush=True)
    signal.sigwait(stop)
    del store
    return 0


if __name__ == "__main__":
    run_cli(main)
