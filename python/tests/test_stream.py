"""kmv.Stream: decoding steps and products against the batch calls and
float64, snapshots, and its life cycle."""
import os
import stat

import numpy as np
import pytest

import kmv
from conftest import attn_ref, clustered, gauss_ref


def test_gaussian_stream_products(rng, check_stats):
    q, k = clustered(rng, 3000, 200, 6)
    x = rng.normal(size=(3000, 2)).astype(np.float32)
    with kmv.Stream(6, sigma=0.5, cols=2, seed=3) as s:
        ids = []
        for a in range(0, 3000, 700):  # blocks of any size
            ids.extend(s.append(k[a:a + 700], x[a:a + 700]))
        assert ids == list(range(3000)) and len(s) == 3000
        assert s.append_queries(q) == range(0, 200)
        y, st = s.matvec()
        ref = gauss_ref(q, k, x, 0.5)
        assert np.linalg.norm(y - ref) <= 0.1 * np.linalg.norm(x)
        doc = check_stats(st)
        assert doc["command"] == "stream" and doc["n_keys"] == 3000
        # fresh x
        x2 = rng.normal(size=(3000, 2)).astype(np.float32)
        y2, _ = s.matvec(x2)
        np.testing.assert_allclose(y2, gauss_ref(q, k, x2, 0.5), atol=0.1 * np.linalg.norm(x2))


def test_causal_stream(rng):
    q = rng.normal(size=(64, 4)).astype(np.float32)
    k = rng.normal(size=(64, 4)).astype(np.float32)
    x = rng.normal(size=64).astype(np.float32)
    s = kmv.Stream(4, sigma=1.0, causal=True, exact=True)
    s.append(k, x)
    s.append_queries(q)
    y, _ = s.matvec()
    np.testing.assert_allclose(y[:, 0], gauss_ref(q, k, x, 1.0, causal=True), atol=1e-5)
    with pytest.raises(kmv.EUNSUPPORTED):
        s.matvec(causal=False)
    s.matvec(causal=True)


def test_decode_steps_against_float64(rng, check_stats):
    q, k = clustered(rng, 4096, 64, 8)
    x = rng.normal(size=4096).astype(np.float32)
    s = kmv.Stream(8, sigma=0.3)
    s.append(k, x)
    for i in range(64):
        row, st = s.decode(q[i])
        assert row.shape == (1,)
        ref = gauss_ref(q[i:i + 1], k, x, 0.3)[0, ]
        assert abs(row[0] - ref) <= 0.1 * np.linalg.norm(x)
    doc = check_stats(st)
    assert doc["command"] == "decode" and doc["n_queries"] == 1
    assert s.info()["n_queries"] == 0  # a step's query is not stored


def test_attention_stream_token_by_token(glove, check_stats):
    d = glove.shape[1]
    v = np.random.default_rng(2).normal(size=(2048, 3)).astype(np.float32)
    s = kmv.Stream(d, attention=True, cols=3, seed=9)
    worst = 0.0
    for t in range(2048):
        s.append(glove[t:t + 1], v[t:t + 1])
        if t % 97 == 0 or t > 2000:
            row, st = s.decode(glove[2048 + t % 1000])
            ref = attn_ref(glove[2048 + t % 1000][None], glove[:t + 1], v[:t + 1])[0]
            err = np.abs(row - ref).max()
            bound = st["error_bound"]
            assert bound is None or err <= bound
            worst = max(worst, err)
    check_stats(st)
    # the stream's product is kmv.attention's, bit for bit
    s.append_queries(glove[2048:2100])
    o, st = s.matvec()
    b, _ = kmv.attention(glove[2048:2100], glove[:2048], v, seed=9)
    assert np.array_equal(o, b)
    with pytest.raises(kmv.EUNSUPPORTED):
        s.matvec(np.zeros((2048, 3)))
    info = s.info()
    assert info["attention"] and info["n_keys"] == 2048 and info["dim"] == d


def test_save_and_load_continue_identically(rng, tmp_path):
    q, k = clustered(rng, 5000, 50, 6)
    x = rng.normal(size=5000).astype(np.float32)
    s = kmv.Stream(6, sigma=0.4, seed=11)
    s.append(k[:4000], x[:4000])
    path = tmp_path / "s.kmvs"
    s.save(path)  # a pathlib.Path
    t = kmv.Stream.load(str(path))
    assert t.params["sigma"] == 0.4 and t.params["seed"] == 11 and len(t) == 4000
    for u in (s, t):
        u.append(k[4000:], x[4000:])
    for i in range(50):
        a, _ = s.decode(q[i])
        b, _ = t.decode(q[i])
        assert np.array_equal(a, b)
    # over an existing file: replaced whole, its mode kept, no temporaries
    os.chmod(path, 0o640)
    t.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["s.kmvs"]
    u = kmv.Stream.load(path)
    assert len(u) == 5000


def test_attention_snapshot(glove, tmp_path):
    v = np.ones((100, 2), np.float32)
    s = kmv.Stream(100, attention=True, cols=2, scale=0.05)
    s.append(glove[:100], v)
    s.save(tmp_path / "a")
    t = kmv.Stream.load(tmp_path / "a")
    assert t.attention and t.dim == 100 and t.cols == 2
    assert t.params["scale"] == pytest.approx(0.05)
    assert np.array_equal(s.decode(glove[200])[0], t.decode(glove[200])[0])


def test_save_failures_leave_nothing(rng, tmp_path):
    s = kmv.Stream(3)
    s.append(rng.normal(size=(10, 3)), np.ones(10))
    with pytest.raises(kmv.EIO):
        s.save(tmp_path / "missing" / "s")
    with pytest.raises(kmv.Error):
        s.save(tmp_path)  # a directory
    assert os.listdir(tmp_path) == []
    (tmp_path / "damaged").write_bytes(b"\x00" * 100)
    with pytest.raises(kmv.EFORMAT):
        kmv.Stream.load(tmp_path / "damaged")
    with pytest.raises(kmv.EIO):
        kmv.Stream.load(tmp_path / "nothing")
    # one byte flipped anywhere: refused
    s.save(tmp_path / "good")
    data = bytearray((tmp_path / "good").read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(kmv.EFORMAT):
        kmv.Stream.load(tmp_path / "bad")


def test_save_to_a_fifo_keeps_it(rng, tmp_path):
    import threading
    s = kmv.Stream(3)
    s.append(rng.normal(size=(10, 3)), np.ones(10))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    s.save(fifo)
    reader.join()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    (tmp_path / "copy").write_bytes(got[0])
    t = kmv.Stream.load(tmp_path / "copy")
    assert len(t) == 10


def test_life_cycle(rng):
    s = kmv.Stream(2, cols=2)
    assert "gaussian" in repr(s) and s.dim == 2 and s.cols == 2 and not s.attention
    s.append([[0, 0]], [[1, 2]])
    row, _ = s.decode([0, 0])
    np.testing.assert_allclose(row, [1, 2])
    s.close()
    s.close()  # twice is fine
    assert s.closed and "closed" in repr(s)
    for call in (lambda: s.decode([0, 0]), lambda: s.append([[0, 0]], [[1, 1]]),
                 lambda: s.append_queries([[0, 0]]), lambda: s.matvec(), lambda: s.info(),
                 lambda: len(s), lambda: s.save("/nonexistent/x")):
        with pytest.raises(ValueError, match="closed"):
            call()
    with kmv.Stream(2) as t:
        pass
    assert t.closed


def test_verify_every_monitors_steps(rng):
    """Steps 0, 2, 4, ... are computed exactly too and report their error;
    the answers do not change."""
    q, k = clustered(rng, 4096, 8, 8)
    x = rng.normal(size=4096)
    s = kmv.Stream(8, sigma=0.3, verify_every=2)
    plain = kmv.Stream(8, sigma=0.3)
    s.append(k, x)
    plain.append(k, x)
    for i in range(6):
        row, st = s.decode(q[i])
        assert np.array_equal(row, plain.decode(q[i])[0])
        assert st["mode"] == "approx"
        assert st["approx"]["verified"] == (1 if i % 2 == 0 else 0)
        if i % 2 == 0:
            err = abs(row[0] - gauss_ref(q[i:i + 1], k, x.astype(np.float32), 0.3)[0])
            # per step, on eps's scale: sqrt(m) |y_i - (Kx)_i| / ||x||, m = 1
            assert st["approx"]["verify_max"] == pytest.approx(err / np.linalg.norm(x),
                                                               rel=1e-2, abs=1e-6)


def test_help_reads_well():
    import pydoc
    text = pydoc.render_doc(kmv.Stream, renderer=pydoc.plaintext)
    for word in ("decode", "append", "matvec", "save", "load", "Threads", "GUARANTEE"):
        assert word in text or word in kmv.__doc__
    assert "GUARANTEE" in kmv.__doc__


def test_exact_stream_matches_exact_batch(rng):
    q = rng.normal(size=(70, 5)).astype(np.float32)
    k = rng.normal(size=(90, 5)).astype(np.float32)
    x = rng.normal(size=(90, 3)).astype(np.float32)
    s = kmv.Stream(5, sigma=0.8, cols=3, exact=True)
    s.append(k[:45], x[:45])
    s.append(k[45:], x[45:])
    s.append_queries(q)
    y, st = s.matvec()
    b, _ = kmv.matvec(q, k, x, 0.8, exact=True)
    np.testing.assert_allclose(y, b, atol=1e-6)
    assert st["mode"] == "exact"
    for i in range(0, 70, 7):
        np.testing.assert_allclose(s.decode(q[i])[0], b[i], atol=1e-6)


def test_stats_are_read_only_and_pickle(rng):
    import pickle
    s = kmv.Stream(3)
    s.append(rng.normal(size=(5, 3)), np.ones(5))
    _, st = s.decode(np.zeros(3))
    with pytest.raises(TypeError):
        st["phases"]["kernel"] = 99.0
    back = pickle.loads(pickle.dumps(st))
    assert isinstance(back, kmv.Stats) and back.to_dict() == st.to_dict()
    d = st.to_dict()
    d["phases"]["kernel"] = -1
    assert st["phases"]["kernel"] != -1  # to_dict is a copy


def test_closed_stream_is_still_truthy():
    s = kmv.Stream(2)
    assert s and len(s) == 0
    s.close()
    assert s
