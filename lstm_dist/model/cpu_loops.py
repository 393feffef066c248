"""The fast LSTM's time loops compiled for the CPU (`csrc/lstm_loops.cpp`), built on first use.

The `cpp_loops` entry of the kernel table (`lstm_dist.model.kernels`); its Python side is
`loops.cpp_forward` / `loops.cpp_backward`. Per time step the eager loops (`lstm_dist.model.loops`) make 7 (forward) or 6 (backward) ATen calls for the
cell update, each with Python and dispatch overhead and each too small for a second core; the C++
loops do the step's recurrent product through ATen (MKL's packed GEMM where the eager loops use it,
else addmm) and the whole cell update in one vectorised pass over the rows, with no Python between
steps. Measured on 2 cores with `python -m lstm_dist.bench --train --shape 2,256,64,32` (a whole
training step against the same model on torch.nn.LSTM): 0.937-0.944 with these loops, 1.072-1.095
with the eager ones, three paired runs.

One build per version. The build is named by a hash of everything that goes into the binary
(`build_inputs()`: the source text, the compiler flags and compiler, the torch version and install,
the Python ABI and headers), ``lstm_dist_loops_<hash>``, in a directory of that name in torch's
extension cache (`TORCH_EXTENSIONS_DIR`, by default ``~/.cache/torch_extensions``), and it
compiles a copy of the source kept in that directory. So two checkouts or versions on one machine
each build once (about 30 s on 2 cores) and then import their own module directly (no build tool
runs); checkouts with the same source share one build. A process never runs another version's
loops: it imports only from the directory of its own hash, a module compiled under that name
(``PyInit_lstm_dist_loops_<hash>``), and waits only on a build of that same version.

What a first start shows: one line on stderr (local rank 0 only under torchrun) while this process
builds, ``building the C++ LSTM loops (once per source version, ~30 s; LSTM_DIST_CPU_LOOPS=0 skips
it) in DIR``, or while it waits for another process building it (torch's builder holds a ``lock``
file in DIR), ``waiting for another process building the C++ LSTM loops (...) in DIR; if none is,
remove DIR/lock`` (a build that was killed leaves its lock behind; torch would wait for ever). A lock
over a module already built (a rebuild of one a killed build cut short, or a lock left behind) is said
only past `QUIET_WAIT_S`. Nothing is said once the build is there.

Used for fp32 on CPUs with AVX2 (where torch itself dispatches to AVX2 or AVX-512). Where it cannot
be built (no AVX2, no C++ compiler, no Python headers) `get()` returns None once with the reason in
`failure()`, and the eager loops run: the same numbers to ~5e-7. `LSTM_DIST_CPU_LOOPS=0` is read by
`kernels.choose_kernels`, which then chooses the eager loops without calling `get()` (nothing is built).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Optional

import torch

from lstm_dist.common.errors import first_line

SOURCE = Path(__file__).with_name("csrc") / "lstm_loops.cpp"
CFLAGS = ("-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2")
NAME = "lstm_dist_loops"
QUIET_WAIT_S = 5.0  # a lock over a built module (a rebuild, a lock left by a killed build): said after this
RECIPE = 1  # bump when the way the build is made changes (not its inputs below): a new name for every version
_lock = threading.Lock()
_module: Optional[ModuleType] = None
_failure: Optional[str] = None
_tried = False


def build_inputs(source: Optional[bytes] = None) -> dict[str, Any]:
    """Everything this process would put into the binary: the source text (`source`, by default the
    file `SOURCE`, as its SHA-256), the flags and the compiler (torch's builder uses ``$CXX``, else
    ``c++``), the torch version, build and install (headers and libraries it compiles and links
    against), the Python ABI and headers, and the platform. A JSON-able dict; `build_name` hashes it."""
    text = SOURCE.read_bytes() if source is None else source
    return {
        "recipe": RECIPE,
        "source_sha256": hashlib.sha256(text).hexdigest(),
        "cflags": list(CFLAGS),
        "cxx": os.environ.get("CXX", "c++"),
        "torch": [torch.__version__, str(torch.version.git_version), str(torch.version.cuda),
                  str(torch.version.hip), os.path.dirname(os.path.realpath(torch.__file__))],
        "python": [sys.implementation.cache_tag, getattr(sys, "abiflags", ""),
                   str(sysconfig.get_config_var("EXT_SUFFIX")), sysconfig.get_paths()["include"]],
        "platform": [sys.platform, platform.machine()],
    }


def build_name(inputs: Mapping[str, Any]) -> str:
    """The module's name for these `build_inputs`: ``lstm_dist_loops_`` and 16 hex digits of the
    SHA-256 of the inputs (the same inputs give the same name, any change another)."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()
    return f"{NAME}_{digest[:16]}"


def extensions_root() -> Path:
    """torch's extension cache: `TORCH_EXTENSIONS_DIR`, else its default root (``~/.cache/torch_extensions``,
    XDG_CACHE_HOME respected). No per-Python or per-accelerator folder of our own: `build_name` already
    hashes both, so one version's builds never meet another's."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_directory(inputs: Mapping[str, Any]) -> Path:
    """Where the build for these `build_inputs` lives: ``extensions_root() / build_name(inputs)``
    (computed only; nothing is created)."""
    return extensions_root() / build_name(inputs)


def _capable() -> Optional[str]:
    """None if this machine can run the AVX2 build, else why not."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"this CPU's vector capability is {capability}, the C++ loops need AVX2"
    return None


def _place_source(directory: Path, text: bytes) -> Path:
    """The copy of the source the build compiles, ``directory/lstm_loops.cpp``: one path for every
    checkout of this version (so torch's ninja file, and ninja's view of what is up to date, are the
    same for all of them). Written once; left alone when it holds `text` (its time stamp is what
    ninja compares), replaced when it does not."""
    path = directory / SOURCE.name
    try:
        if path.read_bytes() == text:
            return path
    except FileNotFoundError:
        pass
    tmp = directory / f".{SOURCE.name}.tmp.{os.getpid()}"
    tmp.write_bytes(text)
    try:
        try:  # where it is absent: placed, never over a copy another process placed a moment ago
            os.link(tmp, path)
        except FileExistsError:
            if path.read_bytes() != text:
                os.replace(tmp, path)
        except OSError:  # a file system without hard links
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _say(line: str) -> bool:
    """Print `line` on stderr, on local rank 0 only (the other ranks of a node build in, or wait on,
    the same directory); True."""
    if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        print(line, file=sys.stderr, flush=True)
    return True


def _import(name: str, path: Path) -> ModuleType:
    """The built module at `path`, imported under its own `name` (its ``PyInit_<name>``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load() -> ModuleType:
    """This version's loops: imported where they are built (after waiting for a process that holds
    the directory's ``lock``), else built first (with torch's builder, which takes the lock). One
    line on stderr when it builds, or waits for a build that is not there yet (or waits longer than
    `QUIET_WAIT_S` on one that is: a rebuild, or a lock a killed build left). Raises what the build
    raises."""
    from torch.utils.cpp_extension import LIB_EXT, load

    text = SOURCE.read_bytes()
    inputs = build_inputs(text)
    name, directory = build_name(inputs), build_directory(inputs)
    directory.mkdir(parents=True, exist_ok=True)
    source = _place_source(directory, text)
    module_file, lock = directory / f"{name}{LIB_EXT}", directory / "lock"
    said, since = False, time.monotonic()
    while lock.exists():  # another process builds this version
        if not said and (not module_file.exists() or time.monotonic() - since > QUIET_WAIT_S):
            said = _say(f"waiting for another process building the C++ LSTM loops (once per source version, "
                        f"~30 s) in {directory}; if none is, remove {lock}")
        time.sleep(0.1)
    if module_file.exists():
        try:
            return _import(name, module_file)
        except ImportError:  # cut short by a killed build: build it again
            pass
    if not said:
        _say(f"building the C++ LSTM loops (once per source version, ~30 s; LSTM_DIST_CPU_LOOPS=0 skips it) "
             f"in {directory}")
    return load(name=name, sources=[str(source)], extra_cflags=list(CFLAGS), build_directory=str(directory),
                verbose=False)


def get() -> Optional[ModuleType]:
    """The compiled loops, built on the first call in this process (one line on stderr while it builds
    or waits for another process's build); None where they cannot be, with the reason in `failure()`."""
    global _module, _failure, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _failure = _capable()
        if _failure is None:
            try:
                _module = _load()
            except Exception as exc:  # no compiler, no headers, a failed build: the eager loops run
                why = first_line(exc)
                _failure = f"{type(exc).__name__}: {why[:160]}{'…' if len(why) > 160 else ''}"
        _tried = True
        return _module


def failure() -> Optional[str]:
    """Why `get()` returned None (None before the first call or when it works)."""
    return _failure
