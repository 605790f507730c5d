"""pallas_kernels/residual_norm.py against its jnp reference (the model's own arithmetic).

Interpret mode on the CPU (CI); the same cases compiled on a GPU (`-m gpu`). Fresh random rows
every case; widths that are not powers of two (the kernel pads D and masks); stacked weights
read at every layer index, traced as inside the model's layer scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_for_h100

from pallas_kernels import residual_norm as rn

F32, BF16 = jnp.float32, jnp.bfloat16
# (rows, D, stacked layers, branch dtype, seed)
CASES = [
    (1, 2560, 4, BF16, 1),
    (3, 640, 1, F32, 2),
    (32, 1536, 3, BF16, 3),
    (2, 96, 2, F32, 4),
]


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _inputs(rows, d, n_layers, dtype, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    h = 4.0 * jax.random.normal(ks[0], (rows, d), F32)
    a = (0.3 * jax.random.normal(ks[1], (rows, d), F32)).astype(dtype)
    w_a = 1.0 + 0.5 * jax.random.normal(ks[2], (n_layers, d), F32)
    w_n = 1.0 + 0.5 * jax.random.normal(ks[3], (n_layers, d), F32)
    return h, a, w_a, w_n


class TestResidualNorm:
    interpret = True

    @pytest.mark.parametrize("rows,d,n_layers,dtype,seed", CASES)
    def test_matches_reference_at_every_layer(self, rows, d, n_layers, dtype, seed):
        h, a, w_a, w_n = _inputs(rows, d, n_layers, dtype, seed)
        run = jax.jit(
            lambda layer: rn.residual_norm(
                h, a, w_a, w_n, layer, eps=1e-6, out_dtype=dtype, interpret=self.interpret
            )
        )
        for layer in range(n_layers):
            h2, x = run(jnp.int32(layer))
            ref_h, ref_x = rn.residual_norm_reference(
                h, a, w_a[layer], w_n[layer], eps=1e-6, out_dtype=dtype
            )
            assert h2.dtype == F32 and x.dtype == dtype and x.shape == (rows, d)
            # h2 differs from the reference only where the branch's rounding to `dtype` flips
            # (the kernel's sum of squares runs in another order): about one ulp of |h2|.
            ulp = 2.0**-8 if dtype == BF16 else 2.0**-23
            atol = 2 * ulp * float(jnp.abs(ref_h).max())
            np.testing.assert_allclose(np.asarray(h2), np.asarray(ref_h), rtol=0, atol=atol)
            if dtype == BF16:  # rounding the branch to bf16 absorbs r's last-bit differences
                assert np.mean(np.asarray(h2) != np.asarray(ref_h)) < 0.05
            tol = 1e-2 if dtype == BF16 else 2e-6
            np.testing.assert_allclose(
                np.asarray(x.astype(F32)), np.asarray(ref_x.astype(F32)), rtol=tol, atol=tol
            )

    def test_scale_and_next_layer_norm_from_another_stack(self):
        # The layer-end use: (h + norm(a)) * scale[layer], then the NEXT layer's attention
        # norm, whose weight is row `layer_next` of another stack (here of 4 rows vs 3).
        h, a, w_a, _ = _inputs(2, 640, 3, BF16, 7)
        w_next = 1.0 + 0.5 * jax.random.normal(jax.random.PRNGKey(8), (4, 640), F32)
        scale = jnp.asarray([0.5, 1.25, 2.0], F32)
        run = jax.jit(
            lambda layer, nxt: rn.residual_norm(
                h, a, w_a, w_next, layer, eps=1e-6, out_dtype=BF16, scale=scale,
                layer_next=nxt, interpret=self.interpret,
            )
        )  # fmt: skip
        for layer, nxt in ((0, 1), (2, 3), (1, 0)):
            h2, x = run(jnp.int32(layer), jnp.int32(nxt))
            ref_h, ref_x = rn.residual_norm_reference(
                h, a, w_a[layer], w_next[nxt], eps=1e-6, out_dtype=BF16, scale=scale[layer]
            )
            atol = 2 * 2.0**-8 * float(jnp.abs(ref_h).max())
            np.testing.assert_allclose(np.asarray(h2), np.asarray(ref_h), rtol=0, atol=atol)
            np.testing.assert_allclose(
                np.asarray(x.astype(F32)), np.asarray(ref_x.astype(F32)), rtol=1e-2, atol=1e-2
            )

    @pytest.mark.parametrize("split", [1, 2, 4])
    def test_split_k_partials(self, split):
        # `a` as split-K partials [S, R, D] (f32; S = 1 in a_dtype, as an unsplit launch
        # returns it): the kernel adds them and rounds to a_dtype, so the result equals the
        # kernel on the summed, rounded branch exactly.
        h, a, w_a, w_n = _inputs(1, 2560, 3, BF16, 9)
        if split == 1:
            parts = a[None]
        else:
            noise = jax.random.normal(jax.random.PRNGKey(10), (split - 1, *a.shape), F32)
            parts = jnp.concatenate([a.astype(F32)[None] - noise.sum(0)[None], noise])
        kw = dict(eps=1e-6, out_dtype=BF16, interpret=self.interpret, scale=jnp.ones(3) * 0.5)
        got = rn.residual_norm(h, parts, w_a, w_n, 2, a_dtype=BF16, **kw)
        want = rn.residual_norm(h, parts.sum(0).astype(BF16), w_a, w_n, 2, **kw)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        with pytest.raises(ValueError, match="partials"):
            rn.residual_norm(h, a, w_a, w_n, 0, a_dtype=BF16, **kw)

    def test_layer_index_is_clamped(self):
        h, a, w_a, w_n = _inputs(1, 128, 2, F32, 5)
        got = rn.residual_norm(h, a, w_a, w_n, 7, eps=1e-6, out_dtype=F32, interpret=True)
        want = rn.residual_norm(h, a, w_a, w_n, 1, eps=1e-6, out_dtype=F32, interpret=True)
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))

    def test_validation(self):
        h, a, w_a, w_n = _inputs(2, 64, 2, F32, 6)
        kw = dict(eps=1e-6, out_dtype=F32, interpret=True)
        with pytest.raises(ValueError, match="float32"):
            rn.residual_norm(h.astype(BF16), a, w_a, w_n, 0, **kw)
        with pytest.raises(ValueError, match="w_a"):
            rn.residual_norm(h, a, w_a[0], w_n, 0, **kw)
        with pytest.raises(ValueError, match="equal"):
            rn.residual_norm(h, a[:, :32], w_a, w_n, 0, **kw)
        with pytest.raises(ValueError, match="one integer"):
            rn.residual_norm(h, a, w_a, w_n, jnp.zeros(2, jnp.int32), **kw)
        with pytest.raises(ValueError, match="layer_next"):
            rn.residual_norm(h, a, w_a, w_n[:1], 0, **kw)
        with pytest.raises(ValueError, match="one per stacked layer"):
            rn.residual_norm(h, a, w_a, w_n, 0, scale=jnp.ones(3), **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU (compiled Pallas kernels)")
class TestResidualNormGpu(TestResidualNorm):
    interpret = False


@pytest.mark.parametrize("with_scale", [False, True])
def test_triton_lowering_for_h100(with_scale):
    # Both operand lists (the scale is an operand only when given) through the Triton lowering,
    # on the CPU: E4B decode shapes, stacks of 4 and 5 rows, bf16 branch and output. Without a
    # scale no broadcast may feed the kernel (it would be an XLA kernel per call).
    spec = jax.ShapeDtypeStruct
    fn = lambda h, a, w_a, w_n, layer, nxt, scale: rn.residual_norm(
        h, a, w_a, w_n, layer, layer_next=nxt, scale=scale if with_scale else None,
        eps=1e-6, out_dtype=BF16,
    )  # fmt: skip
    i32 = spec((), jnp.int32)
    text = lower_for_h100(
        fn, spec((1, 2560), F32), spec((1, 2560), BF16), spec((4, 2560), F32),
        spec((5, 2560), F32), i32, i32, spec((4,), F32),
    )  # fmt: skip
    call = next(ln for ln in text.splitlines() if "custom_call" in ln)
    assert call.count("%arg6") == with_scale, call[:300]  # the scale goes in only when given
    assert "broadcast_in_dim %cst" not in text, text[:3000]  # no ones vector built instead


@pytest.mark.parametrize("split", [2, 3, 5])
def test_split_k_partials_lower_for_h100(split):
    # Split-K partials of the attention output projection (E4B: 2 or, for a lone weight, 5
    # splits): the Triton lowering needs power-of-two shapes, so the partials load one by one.
    spec = jax.ShapeDtypeStruct
    fn = lambda h, a, w_a, w_n, layer: rn.residual_norm(
        h, a, w_a, w_n, layer, eps=1e-6, out_dtype=BF16, a_dtype=BF16
    )
    lower_for_h100(
        fn, spec((1, 2560), F32), spec((split, 1, 2560), F32), spec((4, 2560), F32),
        spec((4, 2560), F32), spec((), jnp.int32),
    )  # fmt: skip
