"""Moving pieces of a memory-mapped file to the device, fast, from many threads.

The loader's tensors are views of one `np.memmap` of the GGUF file. Handing such a view to
`jax.device_put` is correct but slow in a fresh process: the runtime copies it into pinned
staging memory on its own threads, and the first touch of every mapped 4 KiB page is a page
fault. Measured on the H100 host (benchmarks/transfer_probe.py, RESULTS.md run v): 8 GB of
views reached the device at 2.1-2.9 GB/s whatever the number of calling threads; the same
bytes, once their pages were mapped, at 26 GB/s.

`FileTransfers` reads each piece with `os.preadv` (the kernel copies from the page cache, no
faults) into a buffer owned by the calling thread and reused, then `device_put`s that buffer.
On a GPU the buffers are registered with the runtime (`Client.dma_map`, i.e. pinned): the
runtime then copies straight from them instead of through staging memory it would first have
to allocate and pin. `device_put` may read the host buffer after it returns (JAX passes numpy
memory without a copy where it can), so each thread waits for its transfer before reusing the
buffer; on the CPU backend the device array may alias host memory for good, so there every
piece gets a fresh buffer.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from pathlib import Path

import jax
import numpy as np

from .errors import GGUFError


class FileTransfers:
    """`transfers(view)` -> a future of `view` on the default device, where `view` is a
    contiguous numpy view of `mmap_base` (the first byte of the file's mapping) inside `path`.
    Views that are not (copies, other arrays) go to `jax.device_put` as they are.

    Use as a context manager: it owns its thread pool and file descriptor.
    """

    BUFFER_BYTES = 64 << 20  # per thread; a larger piece gets a buffer of its own size

    def __init__(
        self,
        path: str | os.PathLike,
        mmap_base: int,
        size: int,
        workers: int,
        *,
        dma_map: bool = True,
    ):
        self.path, self.base, self.size = Path(path), mmap_base, size
        self.reuse_buffers = jax.default_backend() != "cpu"
        self.dma_map = dma_map and self.reuse_buffers
        # (address, buffer) registered with dma_map: the buffers stay alive (the threads that
        # own them end first) until they are unmapped on exit.
        self._mapped: list[tuple[int, np.ndarray]] = []
        self._mapped_lock = threading.Lock()
        self._local = threading.local()
        self._fd = os.open(self.path, os.O_RDONLY) if hasattr(os, "preadv") else None
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="g4-h2d")

    @classmethod
    def for_gguf(cls, reader, workers: int, *, dma_map: bool = True) -> FileTransfers:
        """Transfers of the tensors of `reader` (a `gguf_file.GGUFFile`, which has at least one
        tensor): its tensors' data are views of one mapping of the whole file."""
        t = reader.tensors[0]
        base = t.data.__array_interface__["data"][0] - t.data_offset
        size = reader.path.stat().st_size
        return cls(reader.path, base, size, workers, dma_map=dma_map)

    def __enter__(self) -> FileTransfers:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
        if self._fd is not None:
            os.close(self._fd)
        client = jax.devices()[0].client
        for address, _ in self._mapped:  # every transfer from them has completed
            client.dma_unmap(address)
        self._mapped.clear()

    def __call__(self, view: np.ndarray) -> concurrent.futures.Future:
        return self._pool.submit(self._send, view)

    def _offset(self, view: np.ndarray) -> int | None:
        """`view`'s byte offset in the file, or None if it is not a contiguous view of it."""
        if self._fd is None or not view.flags.c_contiguous:
            return None
        offset = view.__array_interface__["data"][0] - self.base
        return offset if 0 <= offset and offset + view.nbytes <= self.size else None

    def _send(self, view: np.ndarray) -> jax.Array:
        offset = self._offset(view)
        if offset is None:
            return jax.device_put(view)
        n = view.nbytes
        buf = self._buffer(n)
        got, mem = 0, memoryview(buf)
        while got < n:
            k = os.preadv(self._fd, [mem[got:n]], offset + got)
            if k <= 0:
                raise GGUFError(f"{self.path}: truncated: no bytes at offset {offset + got}")
            got += k
        out = jax.device_put(buf[:n].view(view.dtype).reshape(view.shape))
        if self.reuse_buffers:
            out.block_until_ready()  # the runtime may still read `buf`
        return out

    def _buffer(self, n: int) -> np.ndarray:
        if not self.reuse_buffers:
            return np.empty(n, np.uint8)
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < n:
            buf = self._local.buf = self._new_buffer(max(n, self.BUFFER_BYTES))
        return buf

    def _new_buffer(self, n: int) -> np.ndarray:
        """n bytes, page-aligned, registered with the runtime where that works."""
        page = 4096
        raw = np.empty(n + page, np.uint8)
        start = -raw.__array_interface__["data"][0] % page
        buf = raw[start : start + n]
        if self.dma_map:
            address = buf.__array_interface__["data"][0]
            try:
                jax.devices()[0].client.dma_map(address, n)
            except Exception:  # not supported by this runtime: staged transfers, still correct
                self.dma_map = False
            else:
                with self._mapped_lock:
                    self._mapped.append((address, raw))
        return buf
