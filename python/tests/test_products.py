"""kmv.matvec and kmv.attention against float64 NumPy references, the
guarantee over seeds, array handling and the stats' fields."""
import numpy as np
import pytest

import kmv
from conftest import attn_ref, clustered, gauss_ref


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cols", [None, 1, 3])
def test_matvec_exact_matches_float64(rng, causal, cols, check_stats):
    q = rng.normal(size=(40, 6))
    k = rng.normal(size=(50, 6))
    x = rng.normal(size=50 if cols is None else (50, cols))
    y, st = kmv.matvec(q, k, x, 1.3, exact=True, causal=causal)
    ref = gauss_ref(q.astype(np.float32), k.astype(np.float32), x.astype(np.float32), 1.3, causal)
    assert y.dtype == np.float32 and y.shape == ref.shape
    # kmv.h: within 1e-5 relative to sum_j |K_ij x_j|
    scale = gauss_ref(q, k, np.abs(x), 1.3, causal) + 1e-30
    assert np.all(np.abs(y - ref) <= 1e-5 * scale + 1e-7)
    doc = check_stats(st)
    assert doc["mode"] == "exact" and doc["command"] == "matvec" and doc["causal"] == causal
    assert doc["n_keys"] == 50 and doc["n_queries"] == 40 and doc["error_bound"] == 0


@pytest.mark.parametrize("causal", [False, True])
def test_attention_exact_matches_float64(rng, causal, check_stats):
    q = rng.normal(size=(30, 8))
    k = rng.normal(size=(30, 8))
    v = rng.normal(size=(30, 4))
    o, st = kmv.attention(q, k, v, causal=causal, exact=True)
    ref = attn_ref(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), None, causal)
    np.testing.assert_allclose(o, ref, atol=2e-5)
    o2, _ = kmv.attention(q, k, v, scale=0.7, exact=True)
    np.testing.assert_allclose(o2, attn_ref(q, k, v, 0.7), atol=2e-5)
    doc = check_stats(st)
    assert doc["kernel"] == "attention" and doc["scale"] == pytest.approx(1 / np.sqrt(8))


def test_attention_vector_values(rng):
    q, k, v = rng.normal(size=(5, 3)), rng.normal(size=(9, 3)), rng.normal(size=9)
    o, _ = kmv.attention(q, k, v, exact=True)
    assert o.shape == (5,)
    np.testing.assert_allclose(o, attn_ref(q, k, v[:, None])[:, 0], atol=2e-5)


def test_approximate_attention_within_its_bound(glove, check_stats):
    q, k = glove[:512], glove[512:4096]
    v = np.random.default_rng(3).normal(size=(k.shape[0], 2)).astype(np.float32)
    o, st = kmv.attention(q, k, v)
    doc = check_stats(st)
    err = np.abs(o - attn_ref(q, k, v)).max()
    assert err <= doc["error_bound"]


def test_guarantee_over_seeds(check_stats):
    """||Kx - y|| <= eps ||x|| for every seed, with the approximate engine
    answering (LSH: the probabilistic bound; tree: the certificate)."""
    rng = np.random.default_rng(7)
    q, k = clustered(rng, 8192, 512, 8)
    x = rng.normal(size=8192).astype(np.float32)
    exact = gauss_ref(q, k, x, 0.3)
    norm = np.linalg.norm(x)
    for backend in ("lsh", "tree"):
        for seed in range(1, 9):
            y, st = kmv.matvec(q, k, x, 0.3, eps=0.1, seed=seed, backend=backend,
                               force_approx=True)
            doc = check_stats(st)
            assert doc["mode"] == "approx" and doc["approx"]["backend"] == backend
            assert np.linalg.norm(y - exact) <= 0.1 * norm
            if backend == "tree":
                assert doc["approx"]["deterministic"] is True


def test_auto_picks_an_approximate_engine_and_measures(rng):
    q, k = clustered(rng, 16384, 2048, 2, spread=0.3)
    x = rng.normal(size=16384)
    y, st = kmv.matvec(q, k, x, 0.05, measure_error=True)
    assert st["mode"] == "approx"
    err = np.linalg.norm(y - gauss_ref(q, k, x.astype(np.float32), 0.05)) / np.linalg.norm(x)
    assert st["error_measured"] == pytest.approx(err, rel=1e-3, abs=1e-6)
    assert err <= 0.1


def test_same_seed_same_answer_any_threads(rng):
    q, k = clustered(rng, 8192, 256, 8)
    x = rng.normal(size=(8192, 2))
    a, _ = kmv.matvec(q, k, x, 0.3, seed=5, threads=1, force_approx=True, backend="lsh")
    b, _ = kmv.matvec(q, k, x, 0.3, seed=5, threads=2, force_approx=True, backend="lsh")
    c, _ = kmv.matvec(q, k, x, 0.3, seed=6, threads=2, force_approx=True, backend="lsh")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dtypes_and_orders_give_the_same_answer(rng):
    q = rng.normal(size=(20, 5))
    k = rng.normal(size=(30, 5))
    x = rng.normal(size=(30, 2))
    base, _ = kmv.matvec(q.astype(np.float32), k.astype(np.float32), x.astype(np.float32), 1.0,
                         exact=True)
    for conv in (lambda a: a,                                  # float64
                 lambda a: np.asfortranarray(a.astype(np.float32)),
                 lambda a: a.astype(np.float32)[::1],
                 lambda a: a.astype(">f4"),                    # big-endian
                 lambda a: np.asarray(a.astype(np.float16), np.float16)):
        y, _ = kmv.matvec(conv(q), conv(k), conv(x), 1.0, exact=True)
        tol = 2e-2 if conv(q).dtype == np.float16 else 1e-6
        np.testing.assert_allclose(y, base, atol=tol)
    # strided views and plain lists
    big = np.zeros((40, 10), np.float32)
    big[::2, ::2] = q
    y, _ = kmv.matvec(big[::2, ::2], k, x, 1.0, exact=True)
    np.testing.assert_allclose(y, base, atol=1e-6)
    y, _ = kmv.matvec(q.tolist(), k.tolist(), x.tolist(), 1.0, exact=True)
    np.testing.assert_allclose(y, base, atol=1e-6)
    # integers are real numbers too
    y, _ = kmv.matvec(np.ones((2, 3), np.int64), np.ones((4, 3), np.int32), np.ones(4), 1.0,
                      exact=True)
    np.testing.assert_allclose(y, [4.0, 4.0])


def test_float32_c_contiguous_is_read_in_place(rng):
    a = rng.normal(size=(4, 3)).astype(np.float32)
    assert kmv._floats(a, "a", (2,)) is a
    f = np.asfortranarray(a)
    assert kmv._floats(f, "f", (2,)) is not f


class FakeTensor:
    """What kmv needs of a CPU torch tensor: detach().numpy() sharing memory
    (python3-torch is not a dependency; examples/ uses the real one where
    installed)."""

    def __init__(self, arr):
        self.arr = arr

    def detach(self):
        return self

    def numpy(self):
        return self.arr


def test_tensor_like_inputs_are_read_without_a_copy(rng):
    a = rng.normal(size=(6, 4)).astype(np.float32)
    assert kmv._floats(FakeTensor(a), "t", (2,)) is a
    k = rng.normal(size=(8, 4)).astype(np.float32)
    v = rng.normal(size=(8, 2)).astype(np.float32)
    o, _ = kmv.attention(FakeTensor(a), FakeTensor(k), FakeTensor(v), exact=True)
    np.testing.assert_allclose(o, attn_ref(a, k, v), atol=2e-5)


def test_empty_shapes(rng):
    k = rng.normal(size=(5, 3))
    y, st = kmv.matvec(np.zeros((0, 3)), k, np.ones(5), 1.0)
    assert y.shape == (0,)
    y, st = kmv.matvec(np.ones((2, 3)), np.zeros((0, 3)), np.zeros(0), 1.0)
    assert np.array_equal(y, np.zeros(2, np.float32))
    y, st = kmv.matvec(np.ones((2, 3)), k, np.zeros((5, 0)), 1.0)
    assert y.shape == (2, 0)


def test_version():
    assert kmv.__version__.count(".") == 2
    assert kmv._kmv.version_number == sum(
        int(p) * w for p, w in zip(kmv.__version__.split("."), (10000, 100, 1)))


def test_stats_is_a_read_only_mapping(rng):
    import collections.abc
    import json
    _, st = kmv.matvec(rng.normal(size=(3, 2)), rng.normal(size=(4, 2)), np.ones(4), 1.0)
    assert isinstance(st, collections.abc.Mapping)
    assert "mode" in st and st.get("nope") is None
    json.dumps(st.to_dict())
    with pytest.raises(TypeError):
        st["mode"] = "x"
    assert "kmv.Stats" in repr(st)
