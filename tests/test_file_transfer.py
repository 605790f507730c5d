"""`file_transfer.FileTransfers`: pieces of a memory-mapped file reach the device intact."""

import numpy as np
import pytest

from gemma4_jax.errors import GGUFError
from gemma4_jax.file_transfer import FileTransfers


def _mapped(tmp_path, n=3 << 20):
    path = tmp_path / "blob.bin"
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    data.tofile(path)
    return path, np.memmap(path, mode="r"), data


@pytest.mark.parametrize("reuse,dma", [(False, False), (True, False), (True, True)])
def test_views_arrive_intact(tmp_path, reuse, dma):
    """Views of the map (odd offsets and sizes, other dtypes, several per thread) and arrays
    that are not views all arrive equal to the file's bytes; with `reuse`, each thread's buffer
    is reused (safe because it waits for each transfer), registered with `dma_map` if `dma`."""
    import jax

    path, mm, data = _mapped(tmp_path)
    base = mm.__array_interface__["data"][0]
    cuts = [(0, 1000), (1000, 1 << 20), (12345, 12345 + 40000), ((1 << 20) + 3, 3 << 20)]
    views = [mm[a:b] for a, b in cuts] * 3
    views.append(mm[8 : 8 + 4096].view(np.float32).reshape(16, 64))  # another dtype and shape
    views.append(np.array(mm[100:200]))  # a copy, not a view: sent as it is
    with FileTransfers(path, base, data.size, workers=4, dma_map=dma) as transfers:
        if reuse and jax.default_backend() == "cpu":
            pytest.skip("the CPU backend may alias host buffers: FileTransfers never reuses there")
        transfers.reuse_buffers = reuse
        futures = [transfers(v) for v in views]
        got = [np.asarray(f.result()) for f in futures]
        assert transfers.dma_map == dma  # registration worked where asked for
    for v, g in zip(views, got, strict=True):
        assert g.dtype == v.dtype and g.shape == v.shape
        np.testing.assert_array_equal(g.view(np.uint8), np.asarray(v).view(np.uint8))


def test_short_read_is_a_clear_error(tmp_path):
    path, mm, data = _mapped(tmp_path)
    base = mm.__array_interface__["data"][0]
    # Claim the file is longer than it is, then ask for bytes past its end.
    with FileTransfers(path, base, data.size + (1 << 20), workers=1) as transfers:
        fake = np.lib.stride_tricks.as_strided(mm[-10:], shape=(4096,), strides=(1,))
        with pytest.raises(GGUFError, match="truncated"):
            transfers(fake).result()
