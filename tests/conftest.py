"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

# The executable cache (gemma4_jax/executable_cache.py) keys programs by sources, arguments and
# settings, not by module globals, which tests patch: off for the suite (its own test turns it
# on in subprocesses).
os.environ.setdefault("GEMMA4_JAX_EXECUTABLE_CACHE", "0")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after every test module. XLA:CPU maps memory for each
    executable it compiles (several regions each), and the whole suite in one process reached
    Linux's default limit of 65,530 mappings (`vm.max_map_count`): the next compile's mmap
    failed inside LLVM and the process died with a segmentation fault (measured from
    /proc/PID/maps: 64,079 mappings just before the crash, ~70% through the suite)."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The shared GGUF golden fixtures: $GEMMA4_JAX_FIXTURES or the repo's sibling
    `shared/fixtures`. Skips the test when neither exists."""
    env = os.environ.get("GEMMA4_JAX_FIXTURES")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    if not path.is_dir():
        pytest.skip(f"GGUF fixtures not found at {path} (set GEMMA4_JAX_FIXTURES)")
    return path


MODEL_FIXTURES = ("e4b_tiny", "e2b_tiny", "dense_tiny", "moe_tiny")
QUANT_FILES = ("BF16", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")

_MODELS: dict = {}


def load_fixture(fixtures_dir: Path, name: str, file: str = "model.gguf", dtype="float32"):
    """Load (once per session) a fixture model; returns (Model, reference npz)."""
    import numpy as np

    from gemma4_jax import load

    key = (name, file, dtype)
    if not (fixtures_dir / name / file).exists():
        pytest.skip(f"fixture {name}/{file} not present")
    if key not in _MODELS:
        ref_name = (
            "reference.npz"
            if file == "model.gguf"
            else file.replace("model-", "reference-").replace(".gguf", ".npz")
        )
        _MODELS[key] = (
            load(fixtures_dir / name / file, dtype=dtype),
            np.load(fixtures_dir / name / ref_name),
        )
    return _MODELS[key]


@pytest.fixture(scope="module")
def g4_cache(tmp_path_factory):
    """One builtin-model cache folder per session ($GEMMA4_JAX_CACHE) for the CLI and example
    tests, so builtin:tiny is written once. Test modules opt in with `autouse` wrappers or by
    asking for it (or for `tiny`)."""
    path = tmp_path_factory.getbasetemp() / "g4cache"
    path.mkdir(exist_ok=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("GEMMA4_JAX_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def tiny(g4_cache):
    """builtin:tiny loaded in float32."""
    from gemma4_jax import load
    from gemma4_jax.builtin import resolve_model

    return load(resolve_model("builtin:tiny"), dtype="float32")


def lower_for_h100(fn, *args):
    """Lower ``fn`` for CUDA with an abstract H100 on the CPU: runs every Triton lowering rule
    of the Pallas kernels inside (the compiled kernels themselves need a GPU)."""
    import jax

    device = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
    )
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton_kernel_call" in text or "__gpu$xla.gpu.triton" in text, text[:2000]
    return text
