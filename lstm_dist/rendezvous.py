"""The rendezvous of a multi-node job, where its port is taken said in one line.

`python -m lstm_dist.rendezvous HOST PORT` hosts a job's rendezvous store for as long as the job runs
(slurm/train.sh). torchrun's c10d rendezvous keeps its store inside the torchrun of whichever node hosts
the endpoint. That torchrun leaves as soon as its own workers are done and it has passed the exit barrier,
and it takes the store with it, while the torchrun of another node may still be waiting in that barrier or
shutting the rendezvous down. That one then loses its connection and prints a C++ traceback
(`recvValueWithTimeout failed ... Failed to recv, got 0 bytes`) and "Error waiting on exit barrier", although
the run succeeded. So slurm/train.sh starts this server on the first node before any torchrun, waits until
it listens (it prints `rendezvous store listening on port PORT` within a fraction of a second, or exits 2
with one line when the port is taken), points every torchrun at it as a client (`--rdzv-conf=is_host=0`),
and stops it after every node's torchrun has exited. The server ignores SIGTERM and SIGUSR1, which Slurm
and slurm/train.sh send to stop training: the store must outlive the training processes that checkpoint on
them. SIGINT or SIGHUP stop it.

`python -m lstm_dist.rendezvous torchrun [torchrun's arguments]` is torchrun itself (launch/multinode.sh):
the same arguments, the same behaviour, except that when node 0 cannot listen on the rendezvous port
(`--master_port`, taken by another job or program) it ends with one line naming the port and MASTER_PORT,
status 2, instead of torchrun's traceback. Only the process that binds can tell that without a race: a
check before torchrun starts could find the port free and another job take it in the seconds torchrun
needs to start.
"""

from __future__ import annotations

import datetime
import errno
import re
import signal
import socket
import sys

from lstm_dist.common.errors import UserError, first_line, run_cli

# torch (and with it .distributed) is imported only when needed, so that a usage error is said at once.
USAGE = ("usage: python -m lstm_dist.rendezvous HOST PORT (this node's address for the other nodes, and a TCP "
         "port number, 1-65535)")


def listen(port: int) -> socket.socket:
    """A TCP socket listening on `port` on every address of this node: IPv6 and IPv4 (dual stack), or IPv4
    alone where IPv6 is missing, as torch's TCPStore binds its own (SO_REUSEADDR too), so that it is refused
    exactly when the store would be. Raises OSError (errno EADDRINUSE for a port in use).
    """
    error: OSError | None = None
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # this family is missing here
            error = exc
            continue
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(1024)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise
            error = exc
    assert error is not None
    raise error


def serve(host: str, port: int) -> int:
    """Host a TCPStore on `port` (every address of this node) until SIGINT or SIGHUP; returns 0.

    The port is taken first, with a plain socket and before torch is imported, and `rendezvous store
    listening on port PORT` is printed at once: a script waiting for that line learns within a fraction of
    a second that the port is this job's, and clients that connect before the store serves (torch takes a
    second or two to import) wait in the socket's backlog. The store then serves on that same socket.
    Raises UserError when the port cannot be listened on (in use, or not this user's to take).
    """
    stop = {signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the store's threads exist, so they inherit it
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    fix = "set MASTER_PORT to a free port for this job"
    try:
        sock = listen(port)
    except OSError as exc:
        from lstm_dist.common.distributed import listen_failure

        raise (listen_failure(exc, port, "the rendezvous store", fix) or UserError(
            f"the rendezvous store cannot listen on port {port} (MASTER_PORT): {exc}; {fix}")) from None
    print(f"rendezvous store listening on port {port}", flush=True)
    from torch.distributed import TCPStore

    try:
        # The store owns the socket from here on (and closes it). HOST is where the store's own client
        # connects; the clients' requests are served by the store's own thread.
        store = TCPStore(host, port, is_master=True, wait_for_workers=False, multi_tenant=True,
                         master_listen_fd=sock.detach(), timeout=datetime.timedelta(seconds=60))
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"cannot start the rendezvous store on port {port} ({first_line(exc)}); {fix}") from None
    signal.sigwait(stop)
    del store
    return 0


def torchrun(argv: list[str]) -> int:
    """Run torchrun (torch.distributed.run) with `argv`; returns 0 when it ends in order.

    A failure of this node to listen on the rendezvous port raises UserError; any other failure is
    torchrun's own (its exception and traceback, exit status 1), as with the `torchrun` command.
    """
    from torch.distributed import DistNetworkError
    from torch.distributed.run import main as torchrun_main

    from lstm_dist.common.distributed import listen_failure

    sys.argv = ["torchrun", *argv]
    try:
        torchrun_main(argv)
    except DistNetworkError as exc:
        found = re.search(r"\bport: (\d+)", str(exc)) or re.search(r"--master[_-]port[= ](\d+)", " ".join(argv))
        port = int(found.group(1)) if found else 29500  # torchrun's default
        failure = listen_failure(exc, port, "the rendezvous (node 0)",
                                 "set MASTER_PORT to a free port, the same on every node")
        if failure is None:
            raise
        raise failure from None
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["torchrun"]:
        return torchrun(args[1:])
    if len(args) != 2 or not args[1].isdigit() or not 0 < int(args[1]) < 65536:
        raise UserError(USAGE)
    return serve(args[0], int(args[1]))


if __name__ == "__main__":
    run_cli(main)
