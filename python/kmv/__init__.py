"""kmv: fast Gaussian-kernel matrix-vector products and transformer attention.

    y = K x,   K_ij = exp(-||q_i - k_j||^2 / (2 sigma^2))
    O = softmax(s Q K^T) V,   s = 1/sqrt(d) unless given

sigma is the Gaussian's standard deviation: code written for
exp(-||q-k||^2 / h^2) passes sigma = h / sqrt(2).

GUARANTEE (exact=False): ||Kx - y||_2 <= eps ||x||_2 with probability at
least 1 - delta (Frobenius norms for several columns); an attention row is
within eps sqrt(1 + R^2) / (1 - eps) of the exact one, R = max ||v_j||.
Where approximating would cost more, the exact engine answers, and the
stats say why. The same inputs and seed give the same output, bit for bit,
whatever the thread count.

Arrays: any real dtype and memory order; float32 C-contiguous arrays (and
CPU torch tensors of float32, through numpy) are read in place, anything
else is converted once. Outputs are new float32 arrays. The GIL is released
while the library computes.

Errors raise subclasses of kmv.Error named after the C library's codes
(kmv.EDIM, kmv.ENONFINITE, ...); those about bad input (and a damaged
snapshot, kmv.EFORMAT) are also ValueError, the memory ones MemoryError,
kmv.EIO OSError.

Costs: the exact engine is O(m n (d + c)) for m queries, n keys, d
dimensions and c columns; the approximate one is sublinear in n per row
where the kernel is sparse enough (docs/bounds.md, docs/stream.md).

This is the Python package over libkmv (a CPython extension, kmv._kmv).
"""

import collections.abc
import json
import os
import types

import numpy as np

from . import _kmv

__all__ = [
    "matvec", "attention", "Stream", "Stats", "Error", "__version__",
] + [name for name in ("EINVAL", "ENOMEM", "EDIM", "ENONFINITE", "EOVERFLOW", "EEMPTY", "EIO",
                       "EFORMAT", "EUNSUPPORTED", "ELIMIT")]

__version__ = _kmv.version


# ------------------------------------------------------------------ errors

class Error(Exception):
    """A kmv call failed; .code is the C library's code (a negative int),
    and the message carries kmv_strerror's text for it."""
    code = None

    def __init__(self, detail=""):
        text = _kmv.strerror(self.code)[1] if self.code is not None else ""
        if text and text not in detail:
            detail = f"{detail} ({text})" if detail else text
        super().__init__(detail)


def _error_class(name, bases, doc):
    code = getattr(_kmv, name)
    cls = type(name, (Error,) + bases, {"__doc__": f"{doc} (KMV_{name}, code {code}).",
                                         "code": code, "__module__": __name__})
    return cls


EINVAL = _error_class("EINVAL", (ValueError,), "Invalid argument")
ENOMEM = _error_class("ENOMEM", (MemoryError,), "Out of memory")
EDIM = _error_class("EDIM", (ValueError,), "Dimension mismatch")
ENONFINITE = _error_class("ENONFINITE", (ValueError,), "Input contains NaN or infinity")
EOVERFLOW = _error_class("EOVERFLOW", (ValueError, OverflowError),
                         "Size or value beyond the representable range")
EEMPTY = _error_class("EEMPTY", (ValueError,), "Empty input where at least one row is required")
EIO = _error_class("EIO", (OSError,), "Input/output error")
EFORMAT = _error_class("EFORMAT", (ValueError,), "Malformed or unsupported file")
EUNSUPPORTED = _error_class("EUNSUPPORTED", (NotImplementedError,),
                            "Not supported by this version")
ELIMIT = _error_class("ELIMIT", (MemoryError,), "Memory cap (max_bytes) reached")

_kmv._set_errors({cls.code: cls for cls in (EINVAL, ENOMEM, EDIM, ENONFINITE, EOVERFLOW, EEMPTY,
                                            EIO, EFORMAT, EUNSUPPORTED, ELIMIT)})


# ------------------------------------------------------------------- stats

class Stats(collections.abc.Mapping):
    """What one call did: a read-only mapping with the fields of the CLI's
    --stats JSON (docs/stats.md): mode ("exact", "approx" or "fallback"),
    error_bound, kernel_evals, seconds, phases, and under "approx" the
    engine's counters. Read lazily, so a decoding step pays only for a copy;
    to_dict() gives a plain dict (for json.dumps)."""

    __slots__ = ("_raw", "_dict")

    def __init__(self, raw):
        self._raw = raw
        self._dict = None

    def _d(self):
        if self._dict is None:
            self._dict = json.loads(self._raw.json())
        return self._dict

    def __getitem__(self, key):
        v = self._d()[key]
        return types.MappingProxyType(v) if isinstance(v, dict) else v

    def __reduce__(self):
        return (_stats_from_dict, (self.to_dict(),))

    def __iter__(self):
        return iter(self._d())

    def __len__(self):
        return len(self._d())

    def to_dict(self):
        """A plain dict (nested dicts for phases and approx), a copy."""
        return json.loads(json.dumps(self._d()))

    def __repr__(self):
        return f"kmv.Stats({self._d()!r})"


def _stats_from_dict(d):
    st = Stats(None)
    st._dict = d
    return st


# ------------------------------------------------------------------ arrays

def _floats(a, name, ndims):
    """a as an aligned float32 C-contiguous array with a number of
    dimensions in ndims, read in place when it already is one."""
    if hasattr(a, "numpy") and not isinstance(a, np.ndarray) and hasattr(a, "detach"):
        a = a.detach().numpy()  # a CPU torch tensor: shares its memory
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise EINVAL(f"{name}: expected real numbers, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        want = " or ".join(f"{k}-D" for k in ndims)
        raise EDIM(f"{name}: expected a {want} array, got shape {arr.shape}")
    if arr.dtype != np.float32 or not (arr.flags.c_contiguous and arr.flags.aligned):
        with np.errstate(over="ignore"):  # past float32's range: named below
            out = np.require(arr, np.float32, ["C", "A"])
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:
            bad = np.isfinite(arr) & ~np.isfinite(out)
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ENONFINITE(f"{name}{list(where)} = {arr[where]!r} is past float32's range")
        arr = out
    return arr


def _nonfinite(err, named):
    """The ENONFINITE err, re-raised naming the first NaN or infinity among
    the (name, array) pairs."""
    for name, arr in named:
        if arr is None:
            continue
        bad = ~np.isfinite(arr)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            return ENONFINITE(f"{name}{list(where)} is {arr[where]!r}: kmv needs finite input")
    return err


_INT_MAX = 2**31 - 1


def _int_in(value, name, lo, hi):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not lo <= value <= hi:
        raise EINVAL(f"{name}: expected an int in [{lo}, {hi}], got {value!r}")
    return int(value)


def _positive_or_none(value, name, hi):
    """An int in [1, hi], or None as 0: the library's "unset"."""
    return 0 if value is None else _int_in(value, name, 1, hi)


def _threads(threads):
    return _positive_or_none(threads, "threads", _INT_MAX)


def _max_bytes(max_bytes):
    return _positive_or_none(max_bytes, "max_bytes", 2**64 - 1)


def _seed(seed):
    return _int_in(seed, "seed", 0, 2**64 - 1)


def _flag(value, name):
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer))
                                               and value in (0, 1)):
        return bool(value)
    raise EINVAL(f"{name}: expected True or False, got {value!r}")


def _real(value, name, lo, hi, open_ends=True):
    """A float in (lo, hi) (or [lo, hi]), with a message naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise EINVAL(f"{name}: expected a number, got {value!r}") from None
    ok = lo < v < hi if open_ends else lo <= v <= hi
    if not ok:
        ends = f"({lo:g}, {hi:g})" if open_ends else f"[{lo:g}, {hi:g}]"
        raise EINVAL(f"{name}: expected a number in {ends}, got {value!r}")
    return v


def _scale(scale):
    return 0.0 if scale is None else _real(scale, "scale", 0.0, float("inf"))


def _budget(budget):
    if budget == "certified":
        return 0
    if budget == "empirical":
        return 1
    raise EINVAL(f"budget: expected 'certified' or 'empirical', got {budget!r}")


def _backend(backend):
    try:
        return ("auto", "lsh", "tree").index(backend)
    except ValueError:
        raise EINVAL(f"backend: expected 'auto', 'lsh' or 'tree', got {backend!r}") from None


def _common(eps, delta, seed, exact, threads, max_bytes, verify_every, measure_error=False):
    """The params every call takes, checked and named."""
    return dict(eps=_real(eps, "eps", 0.0, 1.0), delta=_real(delta, "delta", 0.0, 1.0),
                seed=_seed(seed), exact=_flag(exact, "exact"), threads=_threads(threads),
                max_bytes=_max_bytes(max_bytes),
                verify_every=_int_in(verify_every, "verify_every", 0, _INT_MAX),
                measure_error=int(_flag(measure_error, "measure_error")))


def _sigma(sigma):
    return _real(sigma, "sigma", 1e-150, 1e150, open_ends=False)


def _product(kind, q, k, x, params):
    """The shared body of matvec and attention."""
    names = ("queries", "keys", "x") if kind == "matvec" else ("q", "k", "v")
    qa = _floats(q, names[0], (2,))
    ka = _floats(k, names[1], (2,))
    xa = _floats(x, names[2], (1, 2))
    vec = xa.ndim == 1
    m, d = qa.shape
    n, dk = ka.shape
    if dk != d:
        raise EDIM(f"{names[1]} has {dk} columns, {names[0]} {d}")
    if d < 1:
        raise EINVAL(f"{names[0]}: dimension 0")
    if xa.shape[0] != n:
        raise EDIM(f"{names[2]} has {xa.shape[0]} rows, {names[1]} {n}")
    c = 1 if vec else xa.shape[1]
    out = np.empty((m,) if vec else (m, c), dtype=np.float32)
    call = _kmv.matvec if kind == "matvec" else _kmv.attention
    try:
        raw = call(qa, m, ka, n, d, xa, c, out, **params)
    except ENONFINITE as e:
        raise _nonfinite(e, ((names[0], qa), (names[1], ka), (names[2], xa))) from None
    return out, Stats(raw)


# --------------------------------------------------------------- one-shot

def matvec(queries, keys, x, sigma, eps=0.1, delta=0.01, seed=1, exact=False, causal=False,
           threads=None, measure_error=False, max_bytes=None, verify_every=0, backend="auto",
           force_approx=False):
    """y = K x with K_ij = exp(-||queries_i - keys_j||^2 / (2 sigma^2)).

    queries: (m, d); keys: (n, d); x: (n,) or (n, c). Returns (y, stats):
    y of shape (m,) or (m, c), float32, and a kmv.Stats.

    exact=True runs the exact engine (within 1e-5 of float64, relative to
    sum_j |K_ij x_j|; O(m n (d + c)) time, no m x n matrix held). Otherwise
    ||Kx - y|| <= eps ||x|| with probability >= 1 - delta, or exact where
    that is cheaper. causal: query i sees keys j <= i. measure_error also
    runs the exact product and reports stats["error_measured"].
    verify_every=N computes rows 0, N, 2N, ... exactly too (the monitor:
    stats["approx"]["verify_max"]). max_bytes caps the library's memory.
    backend (experimental): "auto" lets the cost model choose between the
    bounds tree (a deterministic certificate), the LSH tables (Algorithm 3)
    and exact; "lsh" or "tree" asks for one. force_approx (experimental)
    skips the cost model's fallbacks to exact, so the approximate engine
    runs even where exact is cheaper (the guarantee is unchanged).
    """
    params = dict(sigma=_sigma(sigma), causal=_flag(causal, "causal"), backend=_backend(backend),
                  force_approx=_flag(force_approx, "force_approx"),
                  **_common(eps, delta, seed, exact, threads, max_bytes, verify_every,
                            measure_error))
    return _product("matvec", queries, keys, x, params)


def attention(q, k, v, scale=None, causal=False, eps=0.1, exact=False, budget="certified",
              delta=0.01, seed=1, threads=None, measure_error=False, max_bytes=None,
              verify_every=0):
    """O = softmax(scale q k^T) v, row by row (causal: row i over keys j <= i).

    q: (m, d); k: (n, d), n >= 1; v: (n,) or (n, c). scale defaults to
    1/sqrt(d). Returns (O, stats), O of shape (m,) or (m, c), float32.

    Logits are shifted by their row maximum, so nothing overflows; inputs
    whose logits could pass float's range raise kmv.EOVERFLOW. exact=False:
    each row within eps sqrt(1 + R^2) / (1 - eps) of the exact one (R =
    max ||v_j||) with probability >= 1 - delta, under budget="certified";
    budget="empirical" sizes samples by their own variance, as the paper's
    experiments do, with no bound (stats["error_bound"] is None).
    """
    params = dict(scale=_scale(scale), causal=_flag(causal, "causal"), budget=_budget(budget),
                  **_common(eps, delta, seed, exact, threads, max_bytes, verify_every,
                            measure_error))
    return _product("attention", q, k, v, params)


# ------------------------------------------------------------------ stream

class Stream:
    """A growing context: keys with their values, and queries, arrive in
    blocks (ids 0, 1, 2, ... in arrival order, whatever the block sizes);
    products cover the current prefix with no rebuild (docs/stream.md).

    A decoding step costs O(n dim) while it runs exact (below 2048 keys, or
    where neither index would cost under a quarter of the exact row), and
    time independent of the n keys held once the stream's bounds tree or
    LSH tables serve it; they are planned at the first step after the keys
    double. Appends cost O(tables) per key.

    Threads: any number of decode() calls may run at once on one stream
    (they share a lock, with the GIL released); every other call waits for
    them and runs alone. A closed stream raises ValueError. Use it as a
    context manager, or call close().
    """

    def __init__(self, dim, sigma=1.0, eps=0.1, attention=False, seed=1, max_bytes=None, cols=1,
                 scale=None, delta=0.01, exact=False, causal=False, threads=None,
                 budget="certified", verify_every=0, backend="auto", force_approx=False):
        """dim: key and query dimension; cols: value columns (x's for a
        Gaussian stream, V's for attention).

        attention=False: K x under the Gaussian kernel of bandwidth sigma,
        with x given row by row at append. attention=True: softmax(scale
        q k^T) v over every key so far, scale 1/sqrt(dim) unless given.
        eps, delta: the GUARANTEE of help(kmv) per step and per product.
        exact: the exact engine always. causal (Gaussian only), fixed here:
        matvec's query i sees keys j <= i. seed: every random choice.
        threads: per call (None: OpenMP's default). max_bytes: a cap on
        the stream's memory (kmv.ELIMIT past it). budget ("certified" or
        "empirical"): attention's sample sizes (see kmv.attention).
        verify_every=N: steps 0, N, 2N, ... are computed exactly too and
        report their error in the step's stats (the monitor of a fast
        path). backend and force_approx (experimental): as kmv.matvec's.
        """
        if _flag(attention, "attention") and _flag(causal, "causal"):
            raise EINVAL("causal: an attention stream's steps see every key so far")
        size = 2**63 - 1
        self._s = _kmv.stream_create(_int_in(dim, "dim", 1, size), _int_in(cols, "cols", 1, size),
                                     bool(attention), sigma=_sigma(sigma), scale=_scale(scale),
                                     causal=bool(causal), budget=_budget(budget),
                                     backend=_backend(backend),
                                     force_approx=_flag(force_approx, "force_approx"),
                                     **_common(eps, delta, seed, exact, threads, max_bytes,
                                               verify_every))

    @classmethod
    def load(cls, path, threads=None, max_bytes=None):
        """A stream saved by save(): it answers and goes on exactly as the
        saved one. A file that is not a snapshot, or damaged anywhere,
        raises kmv.EFORMAT; a missing one kmv.EIO."""
        stream = cls.__new__(cls)
        stream._s = _kmv.stream_load(os.fspath(path), _threads(threads), _max_bytes(max_bytes))
        return stream

    # properties
    dim = property(lambda self: self._s.dim, doc="Key and query dimension.")
    cols = property(lambda self: self._s.cols, doc="Value columns.")
    attention = property(lambda self: self._s.attention, doc="True for an attention stream.")
    closed = property(lambda self: self._s.closed, doc="True once closed.")
    params = property(lambda self: self._s.params,
                      doc="The params it answers under (a loaded stream: the file's).")

    def __len__(self):
        """Keys held."""
        return self.info()["n_keys"]

    def __bool__(self):
        return True  # a stream, open or closed, empty or not

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        if self.closed:
            return "<kmv.Stream closed>"
        kind = "attention" if self.attention else "gaussian"
        return (f"<kmv.Stream {kind} dim={self.dim} cols={self.cols} keys={len(self)} "
                f"queries={self.info()['n_queries']}>")

    def close(self):
        """Free the stream (waits for running steps); later calls raise
        ValueError. Closing twice is fine."""
        self._s.close()

    def append(self, keys, values):
        """Append keys (count, dim) with their values (count, cols), or
        (count,) when cols is 1; returns the range of their ids. O(count)
        amortized (tables and tree updated in place, no rebuild)."""
        ka = _floats(keys, "keys", (2,))
        if ka.shape[1] != self.dim:
            raise EDIM(f"keys: expected {self.dim} columns, got shape {ka.shape}")
        va = _floats(values, "values", (1, 2))
        if va.ndim == 1:
            if self.cols != 1:
                raise EDIM(f"values: expected {self.cols} columns, got shape {va.shape}")
            va = va.reshape(-1, 1)
        if va.shape != (ka.shape[0], self.cols):
            raise EDIM(f"values: expected shape {(ka.shape[0], self.cols)}, got {va.shape}")
        try:
            first = self._s.append_keys(ka, va, ka.shape[0])
        except ENONFINITE as e:
            raise _nonfinite(e, (("keys", ka), ("values", va))) from None
        return range(first, first + ka.shape[0])

    def append_queries(self, q):
        """Append queries (count, dim) for matvec(); returns their ids."""
        qa = _floats(q, "queries", (2,))
        if qa.shape[1] != self.dim:
            raise EDIM(f"queries: expected {self.dim} columns, got shape {qa.shape}")
        try:
            first = self._s.append_queries(qa, qa.shape[0])
        except ENONFINITE as e:
            raise _nonfinite(e, (("queries", qa),)) from None
        return range(first, first + qa.shape[0])

    def decode(self, q_row):
        """One decoding step: the query q_row (dim,) against every key so far.
        Returns (row, stats), row of shape (cols,): K x's row (Gaussian) or
        softmax(scale k q) v (attention), within the GUARANTEE of help(kmv)
        (stats["error_bound"]). The query is not stored. Steps may run
        concurrently from several threads."""
        qa = _floats(q_row, "query", (1, 2))
        if qa.shape not in ((self.dim,), (1, self.dim)):
            raise EDIM(f"query: expected shape ({self.dim},), got {qa.shape}")
        out = np.empty(self.cols, dtype=np.float32)
        try:
            raw = self._s.decode(qa, out)
        except ENONFINITE as e:
            raise _nonfinite(e, (("query", qa),)) from None
        return out, Stats(raw)

    def matvec(self, x=None, causal=None):
        """Every stored query's row over every key so far: (n_queries, cols)
        float32 and stats. Gaussian: K x with the x given at append, or x
        (n_keys, cols) when given. Attention: softmax rows (x must be None).
        causal: None (the stream's own); it is fixed when the stream is
        made, and asking for the other raises kmv.EUNSUPPORTED."""
        if causal is not None and _flag(causal, "causal") != self.params["causal"]:
            raise EUNSUPPORTED("causal is fixed when the stream is made: "
                               f"kmv.Stream(..., causal={bool(causal)})")
        xa = None
        if x is not None:
            xa = _floats(x, "x", (1, 2))
            if xa.ndim == 1:
                xa = xa.reshape(-1, 1)
        while True:  # sized again if another thread appends meanwhile
            info = self.info()
            m, n = info["n_queries"], info["n_keys"]
            if xa is not None and xa.shape != (n, self.cols):
                raise EDIM(f"x: expected shape {(n, self.cols)}, got {xa.shape}")
            out = np.empty((m, self.cols), dtype=np.float32)
            try:
                raw = self._s.matvec(xa, out, m, n)
            except ENONFINITE as e:
                raise _nonfinite(e, (("x", xa),)) from None
            if raw is not None:
                return out, Stats(raw)

    def save(self, path):
        """Write a snapshot (checksummed) to path, whole or not at all:
        through a temporary renamed over the target; a FIFO or character
        device is streamed in place, a directory refused. Waits for running
        steps, as every call but decode() does."""
        self._s.save(os.fspath(path))

    def info(self):
        """What the stream holds and has done: n_keys, n_queries, bytes,
        lsh_tables, tree_keys, ... (kmv_stream_info's fields)."""
        return self._s.info()

