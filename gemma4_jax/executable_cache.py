"""Compiled programs kept on disk beside JAX's persistent compilation cache, so that a warm
process skips tracing and lowering as well as compiling.

JAX's persistent cache is keyed by the lowered module: every new process still traces the model
and lowers it (Pallas kernels to Triton included) before it can look the executable up. For
E4B's prefill on the H100 host that is ~1.5-2 s, most of a warm first token (RESULTS.md run v).
This cache keys a serialized executable (`jax.experimental.serialize_executable`) by what
determines the program instead:

- the program's name and static arguments;
- the arguments' tree structure (the model config is part of it), shapes, dtypes, shardings;
- a hash of the source files of `gemma4_jax` and `pallas_kernels`;
- jax and jaxlib versions, the backend and its devices (their topology fingerprint, and for
  the CPU backend the host CPU's feature flags), XLA_FLAGS, every GEMMA4_JAX_* variable and
  JAX's configuration values.

Anything the key does not see must not change the program: module globals patched at run time
(tests do that) are such a thing, which is why the test suite turns this cache off. It is on
only where JAX's persistent cache is configured (a local directory; the entries live in its
`gemma4_jax_executables/` subdirectory), and GEMMA4_JAX_EXECUTABLE_CACHE=0 turns it off.
Whatever fails (an unreadable entry, a program that cannot be serialized) falls back to the
plain jitted call.

An executable that JAX served from its own persistent cache is not stored: XLA:CPU serializes
such an executable without its compiled functions, and the next process to load it fails when
it runs ("Function slice_bitcast_fusion not found"). Whether GPU executables survive the round
trip has not been checked on a GPU yet (`test_served_executables_round_trip` does), so they are
not stored either (`STORE_SERVED_ON` lists the platforms where they would be). So that JAX
does not serve them in the first place, a program is compiled for this cache under a name
made of its key (JAX keys its cache by the module, name included): after the sources or
settings change, the program is new to JAX's cache too, even where its code is the same.
JAX can then serve one only if our entry was removed and its own kept; JAX's cache serves
that program as it did before this cache existed, and clearing JAX's cache directory lets
ours fill again.

Entries are pickles, like JAX's own serialized executables: keep the cache directory as
private as any other code you run.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import jax
from jax.experimental import serialize_executable

ENV = "GEMMA4_JAX_EXECUTABLE_CACHE"
SUBDIR = "gemma4_jax_executables"
STATS: dict[str, int] = {"hits": 0, "misses": 0, "bypassed": 0, "not_stored": 0}
_JAX_CACHE_HIT = "/jax/compilation_cache/cache_hits"
# Platforms on which an executable that JAX served from its cache is stored all the same
# (see the module docstring): none until the round trip is shown to work there.
STORE_SERVED_ON: set[str] = set()
_COMPILED: dict[Any, Any] = {}  # (name, call signature, environment) -> compiled program
_LOCKS: dict[Any, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def cache_dir() -> Path | None:
    """Where entries go, or None when the cache is off."""
    mode = os.environ.get(ENV, "1").strip()
    if mode not in ("0", "1"):  # "false" must not silently mean on
        raise ValueError(f"{ENV}={mode!r}: use 1 (on where JAX's cache is configured) or 0")
    if mode == "0":
        return None
    base = jax.config.jax_compilation_cache_dir
    if not base or "://" in str(base):
        return None
    return Path(base) / SUBDIR


class CachedProgram:
    """`jax.jit(fn, **jit_options)` called through compiled executables kept per argument
    signature, in memory and (see the module docstring) on disk. Static arguments are passed
    by keyword."""

    def __init__(self, name: str, fn, **jit_options):
        self.name, self.fn, self.jit_options = name, fn, jit_options
        self.jitted = jax.jit(fn, **jit_options)

    def __call__(self, *args, **static):
        where = cache_dir()
        sig = _signature(args, static) if where is not None else None
        if sig is None:
            STATS["bypassed"] += 1
            return self.jitted(*args, **static)
        sig = (self.name, sig, _environment())
        compiled = _COMPILED.get(sig)
        if compiled is None:
            # The loader's threads share programs (and may race to build two equal
            # CachedPrograms): one build per program and signature, process-wide.
            with _LOCKS_LOCK:
                lock = _LOCKS.setdefault(sig, threading.Lock())
            with lock:
                compiled = _COMPILED.get(sig)
                if compiled is None:
                    compiled = _COMPILED[sig] = self._load_or_compile(where, sig, args, static)
        return compiled(*args)

    def _load_or_compile(self, where: Path, sig, args, static):
        key = hashlib.sha256(repr(sig).encode()).hexdigest()[:32]
        path = where / f"{self.name}-{key}.bin"
        if path.exists():
            try:
                blob, in_tree, out_tree = pickle.loads(path.read_bytes())
                compiled = serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
                STATS["hits"] += 1
                return compiled
            except Exception as e:  # a damaged or foreign entry: rebuild it
                msg = f"executable cache entry {path} unusable ({e}); recompiling"
                warnings.warn(msg, stacklevel=3)
        STATS["misses"] += 1
        hits_before = _jax_cache_hits()
        # Compiled under a name made of the key: JAX's cache holds no executable of an earlier
        # version of the sources (or settings) under it, so this compile is fresh and can be
        # stored (see the module docstring for what JAX's cache would hand back).
        fresh = jax.jit(_named(self.fn, f"{self.name}_{key}"), **self.jit_options)
        compiled = fresh.lower(*args, **static).compile()
        if _jax_cache_hits() > hits_before and jax.default_backend() not in STORE_SERVED_ON:
            STATS["not_stored"] += 1  # see the module docstring: it may not run
            return compiled
        try:
            entry = pickle.dumps(serialize_executable.serialize(compiled))
            where.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=where, delete=False, suffix=".tmp") as f:
                f.write(entry)
            os.replace(f.name, path)  # atomic: a reader never sees half an entry
        except Exception as e:  # not serializable here: the in-memory entry still serves
            warnings.warn(f"executable cache: cannot store {self.name} ({e})", stacklevel=3)
        return compiled


def _named(fn, name: str):
    """`fn` under another `__name__` (JAX names the module, and keys its cache, by it)."""

    @functools.wraps(fn)  # the signature stays fn's: static and donated arguments by name
    def program(*args, **kwargs):
        return fn(*args, **kwargs)

    program.__name__ = program.__qualname__ = name
    return program


_THREAD = threading.local()  # JAX records cache hits in the thread that compiles


def _count_jax_cache_hits(event: str, **_metadata) -> None:
    if event == _JAX_CACHE_HIT:
        _THREAD.jax_cache_hits = _jax_cache_hits() + 1


def _jax_cache_hits() -> int:
    return getattr(_THREAD, "jax_cache_hits", 0)


jax.monitoring.register_event_listener(_count_jax_cache_hits)


def _signature(args, static) -> tuple | None:
    """A hashable description of the call, or None if an argument is not a concrete jax.Array
    (numpy, Python scalars, or tracers when the caller is itself being traced: the plain jitted
    call handles those)."""
    leaves, treedef = jax.tree.flatten(args)
    avals = []
    for x in leaves:
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            return None
        # Objects, not strings, in the in-memory key (their repr, used for the file name, is
        # deterministic): building reprs per leaf cost ~4 us each on every call.
        avals.append((x.shape, x.dtype, x.aval.weak_type, x.sharding, x.committed))
    return (str(treedef), tuple(avals), tuple(sorted((k, repr(v)) for k, v in static.items())))


def _environment() -> tuple:
    """What, besides the call, decides the compiled program. Variables and JAX's settings are
    read on every call (tests and users change them at run time); the sources once."""
    return (
        _sources_and_platform(),
        os.environ.get("XLA_FLAGS", ""),
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("GEMMA4_JAX_"))),
        tuple(sorted((k, repr(v)) for k, v in jax.config.values.items())),
    )


@functools.cache
def _sources_and_platform() -> tuple:
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for package in ("gemma4_jax", "pallas_kernels"):
        for f in sorted((root / package).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    import jaxlib

    devices = jax.devices()
    return (
        h.hexdigest(),
        jax.__version__,
        jaxlib.__version__,
        sys.version,
        jax.default_backend(),
        getattr(devices[0].client, "platform_version", ""),
        tuple((d.id, d.device_kind) for d in devices),
        _host_code_target(devices),
    )


def _host_code_target(devices) -> tuple:
    """What the compiled code was built for beyond the device kind: the devices' topology
    fingerprint (what JAX's own cache key hashes) and, for XLA:CPU, which compiles for the
    host's instruction set, the CPU's feature flags (a cache directory copied to another
    machine must not hand it code its CPU cannot run)."""
    try:
        from jax._src.lib import xla_client

        fingerprint = xla_client.get_topology_for_devices(list(devices)).fingerprint()
    except Exception:  # not every backend serializes its topology; the rest of the key stands
        fingerprint = None
    flags = ""
    if devices[0].platform == "cpu":
        try:
            text = Path("/proc/cpuinfo").read_text()
            flags = next((x for x in text.splitlines() if x.startswith(("flags", "Features"))), "")
        except OSError:
            import platform

            flags = f"{platform.machine()} {platform.processor()}"
    return fingerprint, hashlib.sha256(flags.encode()).hexdigest()[:16]
