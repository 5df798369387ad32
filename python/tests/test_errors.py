"""Bad input: every case of the C tests' hostile table (tests/hostile_test.c,
tests/api_test.c) raises its kmv.Error subclass with kmv_strerror's text,
never crashes, and leaves no output behind."""
import numpy as np
import pytest

import kmv

M, N, D = 12, 40, 5


def operands(rng):
    return (rng.normal(size=(M, D)).astype(np.float32), rng.normal(size=(N, D)).astype(np.float32),
            rng.normal(size=(N, 2)).astype(np.float32))


def stream_with(q, k, x, attention=False):
    s = kmv.Stream(D, cols=2, attention=attention)
    s.append(k, x)
    return s


ENTRY_POINTS = {
    "matvec": lambda q, k, x: kmv.matvec(q, k, x, 1.0),
    "matvec-approx": lambda q, k, x: kmv.matvec(q, k, x, 1.0, force_approx=True),
    "attention": lambda q, k, x: kmv.attention(q, k, x),
    "stream-append": lambda q, k, x: kmv.Stream(D, cols=2).append(k, x),
    "stream-queries": lambda q, k, x: kmv.Stream(D, cols=2).append_queries(q),
    "stream-decode": lambda q, k, x: stream_with(q, np.zeros_like(k), np.zeros_like(x)).decode(q[0]),
    "attention-stream-append": lambda q, k, x: kmv.Stream(D, cols=2, attention=True).append(k, x),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("which", ["queries", "keys", "x"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_operands(rng, entry, which, bad):
    q, k, x = operands(rng)
    victim = {"queries": q, "keys": k, "x": x}[which]
    victim.flat[3] = bad
    uses = {"stream-queries": ("queries",), "stream-decode": ("queries",),
            "stream-append": ("keys", "x"), "attention-stream-append": ("keys", "x")}
    if which not in uses.get(entry, ("queries", "keys", "x")):
        return  # this entry point does not read that operand
    with pytest.raises(kmv.ENONFINITE) as e:
        ENTRY_POINTS[entry](q, k, x)
    assert isinstance(e.value, ValueError) and e.value.code == kmv._kmv.ENONFINITE
    assert "nan" in str(e.value).lower() or "inf" in str(e.value).lower()


def test_fresh_x_nonfinite(rng):
    q, k, x = operands(rng)
    s = stream_with(q, k, x)
    s.append_queries(q)
    x[0, 0] = np.nan
    with pytest.raises(kmv.ENONFINITE, match=r"x\[0, 0\]"):
        s.matvec(x)


def test_float64_past_float32_range_is_named(rng):
    q, k, x = operands(rng)
    x64 = x.astype(np.float64)
    x64[2, 1] = 1e300
    with pytest.raises(kmv.ENONFINITE, match=r"x\[2, 1\].*past float32"):
        kmv.matvec(q, k, x64, 1.0)


@pytest.mark.parametrize("field,value", [
    ("sigma", 0.0), ("sigma", -1.0), ("sigma", np.nan), ("sigma", np.inf), ("sigma", 1e-200),
    ("eps", 0.0), ("eps", 1.0), ("eps", -0.1), ("eps", np.nan),
    ("delta", 0.0), ("delta", 1.0), ("delta", -0.1), ("delta", np.nan),
])
def test_bad_params(rng, field, value):
    q, k, x = operands(rng)
    args = dict(sigma=1.0)
    args[field] = value
    sigma = args.pop("sigma")
    with pytest.raises(kmv.EINVAL, match="invalid argument"):
        kmv.matvec(q, k, x, sigma, **args)
    with pytest.raises(kmv.EINVAL):
        kmv.Stream(D, sigma=sigma, **args)


@pytest.mark.parametrize("kw", [
    dict(scale=-1.0), dict(scale=np.nan), dict(scale=0.0), dict(threads=0), dict(threads=-2),
    dict(threads=1.5), dict(seed=-1), dict(seed=2**64), dict(budget="fast"),
    dict(max_bytes=0), dict(max_bytes=-5), dict(verify_every=-1),
])
def test_bad_knobs(rng, kw):
    q, k, x = operands(rng)
    with pytest.raises(kmv.EINVAL):
        kmv.attention(q, k, x, **kw)


def test_bad_backend_and_stream_args(rng):
    q, k, x = operands(rng)
    with pytest.raises(kmv.EINVAL):
        kmv.matvec(q, k, x, 1.0, backend="gpu")
    for bad in (0, -1, 2.5, "3"):
        with pytest.raises(kmv.EINVAL):
            kmv.Stream(bad)
        with pytest.raises(kmv.EINVAL):
            kmv.Stream(3, cols=bad)
    with pytest.raises(kmv.EINVAL, match="causal"):
        kmv.Stream(3, attention=True, causal=True)


def test_shapes(rng):
    q, k, x = operands(rng)
    with pytest.raises(kmv.EDIM, match="columns"):
        kmv.matvec(q, k[:, :3], x, 1.0)
    with pytest.raises(kmv.EDIM, match="rows"):
        kmv.matvec(q, k, x[:-1], 1.0)
    with pytest.raises(kmv.EDIM):
        kmv.matvec(q[0], k, x, 1.0)  # 1-D queries
    with pytest.raises(kmv.EDIM):
        kmv.matvec(q, k, x[None], 1.0)  # 3-D x
    with pytest.raises(kmv.EINVAL):
        kmv.matvec(np.zeros((3, 0)), np.zeros((4, 0)), np.ones(4), 1.0)  # dim 0
    s = kmv.Stream(D, cols=2)
    with pytest.raises(kmv.EDIM):
        s.append(k[:, :3], x)
    with pytest.raises(kmv.EDIM):
        s.append(k, x[:, :1])
    with pytest.raises(kmv.EDIM):
        s.append(k, x[:-1])
    with pytest.raises(kmv.EDIM):
        s.append(k, x[:, 0])  # 1-D values for 2 columns
    with pytest.raises(kmv.EDIM):
        s.append_queries(q[:, :2])
    with pytest.raises(kmv.EDIM):
        s.decode(q[0, :3])
    s.append(k, x)
    s.append_queries(q)
    with pytest.raises(kmv.EDIM):
        s.matvec(x[:-1])
    assert len(s) == N  # the refused calls changed nothing


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array([1 + 2j, 3j]),
                                 np.array([object(), object()]), np.array([True, False]),
                                 "text", None])
def test_not_real_numbers(rng, bad):
    q, k, x = operands(rng)
    with pytest.raises((kmv.EINVAL, kmv.EDIM, ValueError, TypeError)):
        kmv.matvec(q, k, bad, 1.0)
    with pytest.raises((kmv.EINVAL, kmv.EDIM, ValueError, TypeError)):
        kmv.Stream(2).decode(bad)


def test_empty_attention(rng):
    q, _, _ = operands(rng)
    with pytest.raises(kmv.EEMPTY, match="at least one row"):
        kmv.attention(q, np.zeros((0, D)), np.zeros((0, 2)))
    s = kmv.Stream(D, attention=True, cols=2)
    with pytest.raises(kmv.EEMPTY):
        s.decode(q[0])
    s.append_queries(q)
    with pytest.raises(kmv.EEMPTY):
        s.matvec()


def test_overflow(rng):
    q, k, x = operands(rng)
    # a sum past float's range (fuzz find regress-sum-overflow)
    with pytest.raises(kmv.EOVERFLOW):
        kmv.matvec(np.zeros((M, D)), np.zeros((N, D)), np.full((N, 2), 3e38), 1.0)
    with pytest.raises(kmv.EOVERFLOW):
        kmv.matvec(np.zeros((M, D)), np.zeros((N, D)), np.full((N, 2), 3e38), 1.0, exact=True)
    # logits that could pass float's range
    with pytest.raises(kmv.EOVERFLOW) as e:
        kmv.attention(q * 1e19, k * 1e19, x)
    assert isinstance(e.value, OverflowError)
    s = kmv.Stream(D, attention=True, cols=2)
    big = (k / np.abs(k).max() * np.float32(3e38)).astype(np.float32)
    assert np.isfinite(big).all()
    with pytest.raises(kmv.EOVERFLOW):
        s.append(big, x)
    # huge but finite coordinates: a clean answer or a clean code
    qn, kn = q / np.abs(q).max(), k / np.abs(k).max()
    for scale in (1e12, 1e18, 1e19, 3e38):
        for exact in (False, True):
            try:
                y, _ = kmv.matvec((qn * scale).astype(np.float32), (kn * scale).astype(np.float32),
                                  x, 1.0, exact=exact, force_approx=True)
                assert np.isfinite(y).all()
            except kmv.EOVERFLOW:
                pass


def test_memory_cap(rng):
    q, k, x = operands(rng)
    with pytest.raises(kmv.ELIMIT) as e:
        s = kmv.Stream(D, cols=2, max_bytes=64)
        s.append(k, x)
    assert isinstance(e.value, MemoryError)


def test_raw_extension_never_crashes(rng):
    """The extension checks every buffer itself, whatever the Python layer
    passes: wrong formats, lengths, read-only outputs, bad shapes."""
    q, k, x = operands(rng)
    out = np.empty((M, 2), np.float32)
    raw = kmv._kmv
    with pytest.raises(TypeError):
        raw.matvec(q.astype(np.float64), M, k, N, D, x, 2, out)
    with pytest.raises(ValueError):
        raw.matvec(q[:-1], M, k, N, D, x, 2, out)
    with pytest.raises(ValueError):
        raw.matvec(q, M, k, N, D, x, 2, out[:-1])
    ro = np.empty((M, 2), np.float32)
    ro.flags.writeable = False
    with pytest.raises((BufferError, ValueError, TypeError)):
        raw.matvec(q, M, k, N, D, x, 2, ro)
    with pytest.raises(TypeError):
        raw.matvec(b"abc", M, k, N, D, x, 2, out)
    with pytest.raises((TypeError, ValueError)):
        raw.matvec(np.asfortranarray(q), M, k, N, D, x, 2, out)  # not C-contiguous
    with pytest.raises(kmv.EINVAL):
        raw.matvec(q, -1, k, N, D, x, 2, out)
    with pytest.raises(kmv.EINVAL):
        raw.matvec(q, 2**62, k, N, D, x, 2, out)
    with pytest.raises(kmv.EINVAL):
        raw.matvec(q, M, k, N, 0, x, 2, out)
    s = raw.stream_create(D, 2, False)
    with pytest.raises(ValueError):
        s.append_keys(k, x, N + 1)
    with pytest.raises(kmv.EINVAL):
        s.append_keys(k, x, -1)
    with pytest.raises(ValueError):
        s.decode(q[0, :2], np.empty(2, np.float32))
    with pytest.raises(TypeError):
        raw._set_errors([])
    assert raw.strerror(-1) == ("KMV_EINVAL", "invalid argument")
    assert raw.strerror(-999)[0] == "KMV_UNKNOWN"


def test_every_code_has_its_class():
    for name in ("EINVAL", "ENOMEM", "EDIM", "ENONFINITE", "EOVERFLOW", "EEMPTY", "EIO",
                 "EFORMAT", "EUNSUPPORTED", "ELIMIT"):
        cls = getattr(kmv, name)
        assert issubclass(cls, kmv.Error) and cls.code == getattr(kmv._kmv, name)
        assert cls.__name__ == name
    assert issubclass(kmv.EIO, OSError) and issubclass(kmv.ENOMEM, MemoryError)
    assert issubclass(kmv.EDIM, ValueError) and issubclass(kmv.ENONFINITE, ValueError)


def test_knob_types_and_ranges_are_named(rng):
    q, k, x = operands(rng)
    for kw, name in ((dict(max_bytes=2**64), "max_bytes"), (dict(threads=2**40), "threads"),
                     (dict(verify_every=2**31), "verify_every"),
                     (dict(verify_every=2.7), "verify_every"), (dict(exact="False"), "exact"),
                     (dict(causal=2), "causal"), (dict(seed=True), "seed"),
                     (dict(eps="0.1x"), "eps")):
        with pytest.raises(kmv.EINVAL, match=name):
            kmv.matvec(q, k, x, 1.0, **kw)
    with pytest.raises(kmv.EINVAL, match="sigma"):
        kmv.matvec(q, k, x, 0.0)
    with pytest.raises(kmv.EINVAL, match="scale"):
        kmv.attention(q, k, x, scale=np.inf)
    with pytest.raises(kmv.EINVAL, match="force_approx"):
        kmv.Stream(D, force_approx="yes")


def test_decode_wants_one_query(rng):
    s = kmv.Stream(4)
    s.append(rng.normal(size=(3, 4)), np.ones(3))
    for bad in (np.ones((2, 2)), np.ones((4, 1)), np.float32(1.0), np.ones((2, 4))):
        with pytest.raises(kmv.EDIM):
            s.decode(bad)
    a, _ = s.decode(np.ones(4))
    b, _ = s.decode(np.ones((1, 4)))
    assert np.array_equal(a, b)


def test_misaligned_float32_is_copied_not_passed(rng):
    buf = np.zeros(4 * 12 + 1, np.uint8)
    a = np.frombuffer(buf.data, np.float32, count=12, offset=1).reshape(3, 4)
    assert not a.flags.aligned and a.flags.c_contiguous
    b = kmv._floats(a, "a", (2,))
    assert b.flags.aligned and b is not a
    k = rng.normal(size=(5, 4)).astype(np.float32)
    y, _ = kmv.matvec(a, k, np.ones(5), 1.0, exact=True)
    ref, _ = kmv.matvec(np.zeros((3, 4)), k, np.ones(5), 1.0, exact=True)
    assert np.array_equal(y, ref)
    with pytest.raises(ValueError, match="aligned"):
        kmv._kmv.matvec(a, 3, k, 5, 4, np.ones((5, 1), np.float32), 1,
                        np.empty((3, 1), np.float32))


def test_raw_output_may_not_overlap_an_input(rng):
    q, k, x = operands(rng)
    with pytest.raises(kmv.EINVAL, match="overlaps"):
        kmv._kmv.matvec(q, M, k, N, D, x, 2, x[:M])  # out is inside x
    s = kmv._kmv.stream_create(D, 2, False)
    s.append_keys(k, x, N)
    buf = np.zeros(D, np.float32)
    with pytest.raises(kmv.EINVAL, match="overlaps"):
        s.decode(buf, buf[:2])
