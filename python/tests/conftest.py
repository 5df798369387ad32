"""Shared helpers: float64 references, data, and the stats schema."""
import importlib.util
import os

import numpy as np
import pytest

ROOT = os.getcwd()  # the runfiles root: Bazel runs tests there


def gauss_ref(q, k, x, sigma, causal=False):
    """K x in float64."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    d2 = (q * q).sum(1)[:, None] + (k * k).sum(1)[None, :] - 2.0 * q @ k.T
    K = np.exp(-np.maximum(d2, 0.0) / (2.0 * sigma * sigma))
    if causal:
        K = np.tril(K)
    return K @ np.asarray(x, np.float64)


def attn_ref(q, k, v, scale=None, causal=False):
    """softmax(scale q k^T) v in float64."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    s = 1.0 / np.sqrt(q.shape[1]) if scale is None else scale
    logits = s * q @ k.T
    if causal:
        logits = np.where(np.tril(np.ones_like(logits, dtype=bool)), logits, -np.inf)
    logits -= logits.max(1, keepdims=True)
    a = np.exp(logits)
    a /= a.sum(1, keepdims=True)
    return a @ np.asarray(v, np.float64)


def clustered(rng, n, m, d, centres=256, spread=0.3):
    """Keys and queries around shared centres: a sparse kernel at small
    sigma, where the approximate engines answer."""
    c = rng.normal(size=(centres, d)) * 4.0
    k = c[rng.integers(0, centres, n)] + rng.normal(size=(n, d)) * spread
    q = c[rng.integers(0, centres, m)] + rng.normal(size=(m, d)) * spread
    return q.astype(np.float32), k.astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def glove():
    """The shipped GloVe sample (4096 x 100, data/README.md), standardized."""
    a = np.load(os.path.join(ROOT, "data", "glove100d_first4096.npy")).astype(np.float64)
    return ((a - a.mean(0)) / a.std(0)).astype(np.float32)


def _schema_module():
    spec = importlib.util.spec_from_file_location(
        "stats_schema", os.path.join(ROOT, "tests", "stats_schema.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def check_stats():
    """check_stats(stats): the fields docs/stats.md documents for this call,
    each of its type, and no others."""
    mod = _schema_module()
    rows = mod.schema(os.path.join(ROOT, "docs", "stats.md"))

    def check(stats):
        doc = stats.to_dict()
        got = mod.flatten(doc)
        want = {n for n, (kind, when) in rows.items() if mod.applies(when, doc)}
        assert want - set(got) == set(), "documented fields missing"
        assert set(got) - want == set(), "fields not documented for this call"
        for n in want:
            assert mod.type_ok(rows[n][0], got[n]), f"{n} = {got[n]!r} not {rows[n][0]}"
        return doc

    return check
