/*
 * _kmv: the CPython extension under the kmv package (python/kmv/__init__.py).
 *
 * A plain C extension over the public API rather than cffi: it needs
 * nothing beyond python3-dev, it releases the GIL around each call and
 * takes the stream's lock without it, and it reads arrays through the
 * buffer protocol, so NumPy's C API (and its ABI) is not needed at build
 * time. The Python layer turns arrays into float32 C-contiguous ones (no
 * copy when they already are), checks shapes and names the culprit of an
 * error; this file trusts none of that and checks every buffer's type and
 * length again, so no argument can crash the interpreter.
 *
 * The library is linked in whole (the kmv_core archive, hidden symbols):
 * the extension is one file that loads without a library path and cannot
 * meet a libkmv.so of another version.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define KMV_STATIC_LINKING_ONLY
#include "cli/stats.h"
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"

/* code -> exception class, registered by the Python layer (_set_errors). */
static PyObject *errors_by_code;

/* Raise the class registered for rc with kmv_strerror's text, and the
 * detail (a file's message) when there is one. NULL, for returning. */
static PyObject *raise_code(int rc, const char *what, const char *detail) {
    PyObject *key = PyLong_FromLong(rc);
    PyObject *cls = key && errors_by_code ? PyDict_GetItemWithError(errors_by_code, key) : NULL;
    Py_XDECREF(key);
    if (PyErr_Occurred()) return NULL;
    if (cls == NULL) cls = PyExc_RuntimeError;
    if (detail != NULL && detail[0] != '\0')
        PyErr_Format(cls, "%s: %s (%s)", what, kmv_strerror(rc), detail);
    else
        PyErr_Format(cls, "%s: %s", what, kmv_strerror(rc));
    return NULL;
}

/* ----------------------------------------------------------------- buffers */

/* A float32 C-contiguous buffer of exactly count floats; writable when
 * asked. 0 with an exception set otherwise. */
static int get_floats(PyObject *obj, size_t count, int writable, const char *name, Py_buffer *view) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) return 0;
    const char *f = view->format ? view->format : "B";
    if (f[0] == '=' || f[0] == '@' || (f[0] == '<' && PY_LITTLE_ENDIAN) ||
        (f[0] == '>' && PY_BIG_ENDIAN))
        f++; /* native order */
    if (view->itemsize != (Py_ssize_t)sizeof(float) || strcmp(f, "f") != 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected float32 data, got format '%s'", name,
                     view->format ? view->format : "B");
        PyBuffer_Release(view);
        return 0;
    }
    if ((uintptr_t)view->buf % _Alignof(float) != 0) {
        PyErr_Format(PyExc_ValueError, "%s: float32 data not aligned to 4 bytes", name);
        PyBuffer_Release(view);
        return 0;
    }
    if ((size_t)view->len != count * sizeof(float) || count > (size_t)PY_SSIZE_T_MAX / sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zu floats, got %zd", name, count,
                     view->len / (Py_ssize_t)sizeof(float));
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

/* Whether two views share a byte (kmv.h: outputs never overlap inputs). */
static int overlaps(const Py_buffer *a, const Py_buffer *b) {
    uintptr_t a0 = (uintptr_t)a->buf, b0 = (uintptr_t)b->buf;
    return a->len > 0 && b->len > 0 && a0 < b0 + (uintptr_t)b->len && b0 < a0 + (uintptr_t)a->len;
}

/* ------------------------------------------------------------------ params */

typedef struct {
    double sigma, scale, eps, delta;
    unsigned long long seed;
    int exact, causal, threads, measure_error, budget, verify_every, backend, force_approx;
    unsigned long long max_bytes;
} py_params;

#define PARAM_FMT "ddddKppiiiiKip"
#define PARAM_ARGS(pp)                                                                         \
    &(pp).sigma, &(pp).scale, &(pp).eps, &(pp).delta, &(pp).seed, &(pp).exact, &(pp).causal,   \
        &(pp).threads, &(pp).measure_error, &(pp).budget, &(pp).verify_every, &(pp).max_bytes, \
        &(pp).backend, &(pp).force_approx

static void py_params_defaults(py_params *pp) {
    memset(pp, 0, sizeof *pp);
    pp->sigma = 1.0;
    pp->eps = 0.1;
    pp->delta = 0.01;
    pp->seed = 1;
}

/* pp into a kmv_params; 0 with kmv.EINVAL otherwise (the Python layer
 * names the field first; this is the last line). */
static int make_params(const py_params *pp, kmv_params *p) {
    kmv_params_init(p);
    if (pp->max_bytes > SIZE_MAX) {
        raise_code(KMV_EINVAL, "params", "max_bytes past size_t");
        return 0;
    }
    p->sigma = pp->sigma;
    p->attn_scale = pp->scale;
    p->eps = pp->eps;
    p->delta = pp->delta;
    p->seed = (uint64_t)pp->seed;
    p->exact = pp->exact;
    p->causal = pp->causal;
    p->n_threads = pp->threads;
    p->measure_error = pp->measure_error;
    p->max_bytes = (size_t)pp->max_bytes;
    kmv_params_x px;
    kmv_params_get_x(p, &px);
    px.attn_budget = pp->budget;
    px.verify_every = pp->verify_every;
    px.backend = pp->backend;
    px.force_approx = pp->force_approx;
    if (kmv_params_set_x(p, &px) != KMV_OK) {
        raise_code(KMV_EINVAL, "params", "budget, verify_every or backend out of range");
        return 0;
    }
    if (kmv_params_check(p) != KMV_OK) {
        raise_code(KMV_EINVAL, "params",
                   "sigma in [1e-150, 1e150], eps and delta in (0, 1), threads >= 0, scale >= 0");
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------- stats */

/* One call's kmv_stats with what its JSON needs; the Python layer reads it
 * through json() only when asked, so a decoding step pays for a copy. */
typedef struct {
    PyObject_HEAD
    kmv_stats st;
    kmv_params p;
    int attn;
    const char *cmd;
} StatsObject;

static PyObject *stats_json_text(PyObject *self, PyObject *unused) {
    (void)unused;
    StatsObject *so = (StatsObject *)self;
    text t = {0};
    stats_json(&t, so->cmd, &so->p, so->attn, &so->st, 0.0);
    if (t.failed || t.s == NULL) {
        text_free(&t);
        return PyErr_NoMemory();
    }
    PyObject *r = PyUnicode_FromStringAndSize(t.s, (Py_ssize_t)t.len);
    text_free(&t);
    return r;
}

static PyMethodDef stats_methods[] = {
    {"json", stats_json_text, METH_NOARGS, "The call's statistics as the CLI's --stats JSON."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StatsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kmv._kmv.RawStats",
    .tp_basicsize = sizeof(StatsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One call's statistics, read through json().",
    .tp_methods = stats_methods,
};

static PyObject *new_stats(const kmv_stats *st, const kmv_params *p, int attn, const char *cmd) {
    StatsObject *so = PyObject_New(StatsObject, &StatsType);
    if (so == NULL) return NULL;
    so->st = *st;
    so->p = *p;
    so->attn = attn;
    so->cmd = cmd;
    return (PyObject *)so;
}

/* ---------------------------------------------------- one-shot operations */

/* matvec / attention(q, m, k, n, dim, x, c, out, **params) -> RawStats */
static PyObject *product(PyObject *args, PyObject *kw, int attn) {
    static char *kwlist[] = {"q", "m", "k", "n", "dim", "x", "c", "out", "sigma", "scale", "eps",
                             "delta", "seed", "exact", "causal", "threads", "measure_error",
                             "budget", "verify_every", "max_bytes", "backend", "force_approx", NULL};
    PyObject *qo, *ko, *xo, *oo;
    Py_ssize_t m, n, dim, c;
    py_params pp;
    py_params_defaults(&pp);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OnOnnOnO|" PARAM_FMT, kwlist, &qo, &m, &ko, &n,
                                     &dim, &xo, &c, &oo, PARAM_ARGS(pp)))
        return NULL;
    if (m < 0 || n < 0 || dim < 1 || c < 0 || (m > 0 && (size_t)m > SIZE_MAX / (size_t)dim) ||
        (n > 0 && (size_t)n > SIZE_MAX / (size_t)dim) || (c > 0 && (size_t)n > SIZE_MAX / (size_t)c) ||
        (c > 0 && (size_t)m > SIZE_MAX / (size_t)c))
        return raise_code(KMV_EINVAL, attn ? "attention" : "matvec", "bad shape");
    kmv_params p;
    if (!make_params(&pp, &p)) return NULL;
    Py_buffer qb, kb, xb, ob;
    if (!get_floats(qo, (size_t)m * (size_t)dim, 0, "queries", &qb)) return NULL;
    if (!get_floats(ko, (size_t)n * (size_t)dim, 0, "keys", &kb)) goto q;
    if (!get_floats(xo, (size_t)n * (size_t)c, 0, attn ? "values" : "x", &xb)) goto k;
    if (!get_floats(oo, (size_t)m * (size_t)c, 1, "out", &ob)) goto x;
    if (overlaps(&ob, &qb) || overlaps(&ob, &kb) || overlaps(&ob, &xb)) {
        PyBuffer_Release(&ob);
        raise_code(KMV_EINVAL, attn ? "attention" : "matvec", "out overlaps an input");
        goto x;
    }
    kmv_ctx *ctx = NULL;
    kmv_stats st;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kmv_ctx_create(&p, &ctx);
    if (rc == KMV_OK && attn)
        rc = kmv_attention(ctx, qb.buf, (size_t)m, kb.buf, (size_t)n, (size_t)dim, xb.buf,
                           (size_t)c, ob.buf, &st);
    else if (rc == KMV_OK)
        rc = kmv_matvec(ctx, qb.buf, (size_t)m, kb.buf, (size_t)n, (size_t)dim, xb.buf, (size_t)c,
                        ob.buf, &st);
    kmv_ctx_free(ctx);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ob);
    PyBuffer_Release(&xb);
    PyBuffer_Release(&kb);
    PyBuffer_Release(&qb);
    if (rc != KMV_OK) return raise_code(rc, attn ? "attention" : "matvec", NULL);
    return new_stats(&st, &p, attn, attn ? "attention" : "matvec");
x:
    PyBuffer_Release(&xb);
k:
    PyBuffer_Release(&kb);
q:
    PyBuffer_Release(&qb);
    return NULL;
}

static PyObject *py_matvec(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    return product(args, kw, 0);
}

static PyObject *py_attention(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    return product(args, kw, 1);
}

/* ------------------------------------------------------------------ stream */

/* A kmv_stream behind a read-write lock: decoding steps share it (kmv.h
 * lets them run at once), every other call holds it alone. The lock is
 * taken with the GIL released, so a thread waiting for it never blocks
 * the interpreter, and a step in one thread runs beside Python in others. */
typedef struct {
    PyObject_HEAD
    kmv_ctx *ctx;
    kmv_stream *s;
    pthread_rwlock_t lock;
    int lock_made;
    kmv_params p; /* kmv_stream_get_params(): what each step's stats report */
    size_t dim, cols;
    int attn;
} StreamObject;

static void stream_dealloc(PyObject *self) {
    StreamObject *so = (StreamObject *)self;
    /* Nobody else holds a reference, so no call runs on it. */
    kmv_stream_free(so->s);
    kmv_ctx_free(so->ctx);
    if (so->lock_made) pthread_rwlock_destroy(&so->lock);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *closed_error(void) {
    PyErr_SetString(PyExc_ValueError, "operation on a closed kmv.Stream");
    return NULL;
}

/* A block of count keys with their values (xo), or of queries (xo NULL):
 * the first id of the block. */
static PyObject *append_block(StreamObject *so, PyObject *ko, PyObject *xo, Py_ssize_t count) {
    int keys = xo != NULL;
    const char *what = keys ? "append" : "append_queries";
    if (count < 0 || (size_t)count > SIZE_MAX / (so->dim + so->cols + 1))
        return raise_code(KMV_EINVAL, what, "bad count");
    Py_buffer kb, xb;
    if (!get_floats(ko, (size_t)count * so->dim, 0, keys ? "keys" : "queries", &kb)) return NULL;
    if (keys && !get_floats(xo, (size_t)count * so->cols, 0, "values", &xb)) {
        PyBuffer_Release(&kb);
        return NULL;
    }
    int rc = KMV_OK, closed;
    size_t first = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&so->lock);
    closed = so->s == NULL;
    if (!closed) {
        kmv_stream_info info;
        kmv_stream_get_info(so->s, &info);
        first = keys ? info.n_keys : info.n_queries;
        rc = keys ? kmv_stream_append_keys(so->s, kb.buf, xb.buf, (size_t)count)
                  : kmv_stream_append_queries(so->s, kb.buf, (size_t)count);
    }
    pthread_rwlock_unlock(&so->lock);
    Py_END_ALLOW_THREADS
    if (keys) PyBuffer_Release(&xb);
    PyBuffer_Release(&kb);
    if (closed) return closed_error();
    if (rc != KMV_OK) return raise_code(rc, what, NULL);
    return PyLong_FromSize_t(first);
}

static PyObject *stream_append_keys(PyObject *self, PyObject *args) {
    PyObject *ko, *xo;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "OOn", &ko, &xo, &count)) return NULL;
    return append_block((StreamObject *)self, ko, xo, count);
}

static PyObject *stream_append_queries(PyObject *self, PyObject *args) {
    PyObject *qo;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "On", &qo, &count)) return NULL;
    return append_block((StreamObject *)self, qo, NULL, count);
}

/* decode(query, out) -> RawStats */
static PyObject *stream_decode(PyObject *self, PyObject *args) {
    StreamObject *so = (StreamObject *)self;
    PyObject *qo, *oo;
    if (!PyArg_ParseTuple(args, "OO", &qo, &oo)) return NULL;
    Py_buffer qb, ob;
    if (!get_floats(qo, so->dim, 0, "query", &qb)) return NULL;
    if (!get_floats(oo, so->cols, 1, "out", &ob)) {
        PyBuffer_Release(&qb);
        return NULL;
    }
    if (overlaps(&ob, &qb)) {
        PyBuffer_Release(&ob);
        PyBuffer_Release(&qb);
        return raise_code(KMV_EINVAL, "decode", "out overlaps the query");
    }
    kmv_stats st;
    int rc = KMV_OK, closed;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&so->lock);
    closed = so->s == NULL;
    if (!closed) rc = kmv_stream_decode(so->s, qb.buf, ob.buf, &st);
    pthread_rwlock_unlock(&so->lock);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ob);
    PyBuffer_Release(&qb);
    if (closed) return closed_error();
    if (rc != KMV_OK) return raise_code(rc, "decode", NULL);
    return new_stats(&st, &so->p, so->attn, "decode");
}

/* matvec(x or None, out, m, n) -> RawStats; out holds m x cols and x n x
 * cols, the counts the caller saw. None when another thread appended
 * queries (or keys, with x) since: nothing was written. */
static PyObject *stream_matvec(PyObject *self, PyObject *args) {
    StreamObject *so = (StreamObject *)self;
    PyObject *xo, *oo;
    Py_ssize_t m, n;
    if (!PyArg_ParseTuple(args, "OOnn", &xo, &oo, &m, &n)) return NULL;
    if (m < 0 || n < 0 || (size_t)m > SIZE_MAX / (so->cols + 1) || (size_t)n > SIZE_MAX / (so->cols + 1))
        return raise_code(KMV_EINVAL, "matvec", "bad shape");
    Py_buffer xb = {0}, ob;
    int have_x = xo != Py_None;
    if (have_x && !get_floats(xo, (size_t)n * so->cols, 0, "x", &xb)) return NULL;
    if (!get_floats(oo, (size_t)m * so->cols, 1, "out", &ob)) {
        if (have_x) PyBuffer_Release(&xb);
        return NULL;
    }
    if (have_x && overlaps(&ob, &xb)) {
        PyBuffer_Release(&ob);
        PyBuffer_Release(&xb);
        return raise_code(KMV_EINVAL, "matvec", "out overlaps x");
    }
    kmv_stats st;
    int rc = KMV_OK, closed, moved = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&so->lock);
    closed = so->s == NULL;
    if (!closed) {
        kmv_stream_info info;
        kmv_stream_get_info(so->s, &info);
        moved = info.n_queries != (size_t)m || (have_x && info.n_keys != (size_t)n);
        if (!moved) rc = kmv_stream_matvec(so->s, have_x ? xb.buf : NULL, ob.buf, &st);
    }
    pthread_rwlock_unlock(&so->lock);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ob);
    if (have_x) PyBuffer_Release(&xb);
    if (closed) return closed_error();
    if (moved) return Py_NewRef(Py_None); /* grown meanwhile: the caller sizes again */
    if (rc != KMV_OK) return raise_code(rc, "matvec", NULL);
    return new_stats(&st, &so->p, so->attn, "stream");
}

static PyObject *stream_save(PyObject *self, PyObject *args) {
    StreamObject *so = (StreamObject *)self;
    PyObject *path;
    if (!PyArg_ParseTuple(args, "O&", PyUnicode_FSConverter, &path)) return NULL;
    char err[512] = "";
    int rc = KMV_OK, closed;
    Py_BEGIN_ALLOW_THREADS
    /* Alone (kmv.h): a step may re-plan the tables the snapshot records. */
    pthread_rwlock_wrlock(&so->lock);
    closed = so->s == NULL;
    if (!closed) rc = kmv_stream_save(so->s, PyBytes_AS_STRING(path), err, sizeof err);
    pthread_rwlock_unlock(&so->lock);
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (closed) return closed_error();
    if (rc != KMV_OK) return raise_code(rc, "save", err);
    return Py_NewRef(Py_None);
}

static PyObject *stream_info(PyObject *self, PyObject *unused) {
    (void)unused;
    StreamObject *so = (StreamObject *)self;
    kmv_stream_info in;
    int closed;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&so->lock); /* alone: a step may update the counts */
    closed = so->s == NULL;
    if (!closed) kmv_stream_get_info(so->s, &in);
    pthread_rwlock_unlock(&so->lock);
    Py_END_ALLOW_THREADS
    if (closed) return closed_error();
    typedef unsigned long long ull;
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:i,s:O,s:d,s:K,s:K,s:K,s:d,s:K,s:K}",
                         "n_keys", (ull)in.n_keys, "n_queries", (ull)in.n_queries, "dim",
                         (ull)in.dim, "n_cols", (ull)in.n_cols, "bytes", (ull)in.bytes,
                         "keys_hashed", (ull)in.keys_hashed, "table_inserts",
                         (ull)in.table_inserts, "table_builds", (ull)in.table_builds,
                         "sketch_inserts", (ull)in.sketch_inserts, "lsh_tables", in.lsh_tables,
                         "attention", in.attention ? Py_True : Py_False, "key_bound", in.key_bound,
                         "relifts", (ull)in.relifts, "tree_builds", (ull)in.tree_builds,
                         "tree_inserts", (ull)in.tree_inserts, "tree_seconds_insert",
                         in.tree_seconds_insert, "tree_keys", (ull)in.tree_keys, "tree_bytes",
                         (ull)in.tree_bytes);
}

static PyObject *stream_close(PyObject *self, PyObject *unused) {
    (void)unused;
    StreamObject *so = (StreamObject *)self;
    kmv_stream *s;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&so->lock); /* waits for running steps */
    s = so->s;
    so->s = NULL;
    pthread_rwlock_unlock(&so->lock);
    kmv_stream_free(s);
    Py_END_ALLOW_THREADS
    return Py_NewRef(Py_None);
}

static PyObject *stream_get_dim(PyObject *self, void *c) {
    (void)c;
    return PyLong_FromSize_t(((StreamObject *)self)->dim);
}

static PyObject *stream_get_cols(PyObject *self, void *c) {
    (void)c;
    return PyLong_FromSize_t(((StreamObject *)self)->cols);
}

static PyObject *stream_get_attention(PyObject *self, void *c) {
    (void)c;
    return PyBool_FromLong(((StreamObject *)self)->attn);
}

static PyObject *stream_get_closed(PyObject *self, void *c) {
    (void)c;
    StreamObject *so = (StreamObject *)self;
    int closed;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&so->lock);
    closed = so->s == NULL;
    pthread_rwlock_unlock(&so->lock);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(closed);
}

static PyObject *stream_get_params(PyObject *self, void *c) {
    (void)c;
    const kmv_params *p = &((StreamObject *)self)->p;
    kmv_params_x px;
    kmv_params_get_x(p, &px);
    static const char *backends[] = {"auto", "lsh", "tree"};
    int b = px.backend >= 0 && px.backend <= 2 ? px.backend : 0;
    return Py_BuildValue("{s:d,s:d,s:d,s:d,s:K,s:O,s:O,s:i,s:s,s:i,s:K,s:s,s:O}", "sigma", p->sigma, "scale",
                         p->attn_scale, "eps", p->eps, "delta", p->delta, "seed",
                         (unsigned long long)p->seed, "exact", p->exact ? Py_True : Py_False, "causal",
                         p->causal ? Py_True : Py_False, "threads", p->n_threads, "budget",
                         px.attn_budget == KMV_BUDGET_EMPIRICAL ? "empirical" : "certified",
                         "verify_every", px.verify_every, "max_bytes", (unsigned long long)p->max_bytes,
                         "backend", backends[b], "force_approx",
                         px.force_approx ? Py_True : Py_False);
}

static PyMethodDef stream_methods[] = {
    {"append_keys", stream_append_keys, METH_VARARGS, "append_keys(keys, values, count) -> first id"},
    {"append_queries", stream_append_queries, METH_VARARGS, "append_queries(q, count) -> first id"},
    {"decode", stream_decode, METH_VARARGS, "decode(query, out) -> RawStats"},
    {"matvec", stream_matvec, METH_VARARGS, "matvec(x or None, out, n_queries, n_keys) -> RawStats"},
    {"save", stream_save, METH_VARARGS, "save(path)"},
    {"info", stream_info, METH_NOARGS, "info() -> dict"},
    {"close", stream_close, METH_NOARGS, "close()"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef stream_getset[] = {
    {"dim", stream_get_dim, NULL, "key and query dimension", NULL},
    {"cols", stream_get_cols, NULL, "value columns", NULL},
    {"attention", stream_get_attention, NULL, "an attention stream", NULL},
    {"closed", stream_get_closed, NULL, "closed or not", NULL},
    {"params", stream_get_params, NULL, "the params it answers under", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kmv._kmv.RawStream",
    .tp_basicsize = sizeof(StreamObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A kmv_stream; kmv.Stream is the interface.",
    .tp_dealloc = stream_dealloc,
    .tp_methods = stream_methods,
    .tp_getset = stream_getset,
};

static StreamObject *new_stream_object(void) {
    StreamObject *so = PyObject_New(StreamObject, &StreamType);
    if (so == NULL) return NULL;
    so->ctx = NULL;
    so->s = NULL;
    so->lock_made = pthread_rwlock_init(&so->lock, NULL) == 0;
    if (!so->lock_made) {
        Py_DECREF(so);
        PyErr_NoMemory();
        return NULL;
    }
    return so;
}

/* stream_create(dim, cols, attention, **params) -> RawStream */
static PyObject *py_stream_create(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"dim", "cols", "attention", "sigma", "scale", "eps", "delta", "seed",
                             "exact", "causal", "threads", "measure_error", "budget",
                             "verify_every", "max_bytes", "backend", "force_approx", NULL};
    Py_ssize_t dim, cols;
    int attn;
    py_params pp;
    py_params_defaults(&pp);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "nnp|" PARAM_FMT, kwlist, &dim, &cols, &attn,
                                     PARAM_ARGS(pp)))
        return NULL;
    if (dim < 1 || cols < 1) return raise_code(KMV_EINVAL, "Stream", "dim and cols must be >= 1");
    kmv_params p;
    if (!make_params(&pp, &p)) return NULL;
    StreamObject *so = new_stream_object();
    if (so == NULL) return NULL;
    so->dim = (size_t)dim;
    so->cols = (size_t)cols;
    so->attn = attn;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kmv_ctx_create(&p, &so->ctx);
    if (rc == KMV_OK)
        rc = (attn ? kmv_stream_attention_create : kmv_stream_create)(so->ctx, (size_t)dim,
                                                                     (size_t)cols, &so->s);
    Py_END_ALLOW_THREADS
    if (rc == KMV_OK) rc = kmv_stream_get_params(so->s, &so->p);
    if (rc != KMV_OK) {
        Py_DECREF(so);
        return raise_code(rc, "Stream", NULL);
    }
    return (PyObject *)so;
}

/* stream_load(path, threads, max_bytes) -> RawStream */
static PyObject *py_stream_load(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *path;
    int threads;
    unsigned long long max_bytes;
    if (!PyArg_ParseTuple(args, "O&iK", PyUnicode_FSConverter, &path, &threads, &max_bytes))
        return NULL;
    kmv_params p;
    kmv_params_init(&p);
    p.n_threads = threads;
    p.max_bytes = (size_t)max_bytes;
    StreamObject *so = new_stream_object();
    if (so == NULL) {
        Py_DECREF(path);
        return NULL;
    }
    char err[512] = "";
    int rc;
    kmv_stream_info in;
    Py_BEGIN_ALLOW_THREADS
    rc = kmv_ctx_create(&p, &so->ctx);
    if (rc == KMV_OK) rc = kmv_stream_load(so->ctx, PyBytes_AS_STRING(path), &so->s, err, sizeof err);
    if (rc == KMV_OK) rc = kmv_stream_get_info(so->s, &in);
    if (rc == KMV_OK) rc = kmv_stream_get_params(so->s, &so->p);
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (rc != KMV_OK) {
        Py_DECREF(so);
        return raise_code(rc, "Stream.load", err);
    }
    so->dim = in.dim;
    so->cols = in.n_cols;
    so->attn = in.attention;
    return (PyObject *)so;
}

static PyObject *py_set_errors(PyObject *self, PyObject *d) {
    (void)self;
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "_set_errors takes a dict");
        return NULL;
    }
    Py_INCREF(d);
    Py_XSETREF(errors_by_code, d);
    return Py_NewRef(Py_None);
}

static PyObject *py_strerror(PyObject *self, PyObject *arg) {
    (void)self;
    long code = PyLong_AsLong(arg);
    if (code == -1 && PyErr_Occurred()) return NULL;
    if (code < INT_MIN || code > INT_MAX) code = INT_MIN; /* no such code */
    return Py_BuildValue("(ss)", kmv_errname((int)code), kmv_strerror((int)code));
}

static PyMethodDef module_methods[] = {
    {"matvec", (PyCFunction)(void (*)(void))py_matvec, METH_VARARGS | METH_KEYWORDS,
     "matvec(q, m, k, n, dim, x, c, out, **params) -> RawStats"},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_VARARGS | METH_KEYWORDS,
     "attention(q, m, k, n, dim, v, c, out, **params) -> RawStats"},
    {"stream_create", (PyCFunction)(void (*)(void))py_stream_create, METH_VARARGS | METH_KEYWORDS,
     "stream_create(dim, cols, attention, **params) -> RawStream"},
    {"stream_load", py_stream_load, METH_VARARGS, "stream_load(path, threads, max_bytes) -> RawStream"},
    {"_set_errors", py_set_errors, METH_O, "Register {code: exception class}."},
    {"strerror", py_strerror, METH_O, "strerror(code) -> (name, message)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "kmv._kmv", "The C core of the kmv package.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kmv(void);

PyMODINIT_FUNC PyInit__kmv(void) {
    if (PyType_Ready(&StatsType) < 0 || PyType_Ready(&StreamType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    if (PyModule_AddStringConstant(m, "version", kmv_version_string()) < 0 ||
        PyModule_AddIntConstant(m, "version_number", (long)kmv_version_number()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#define KMV__ADD_CODE(name, value, msg)                                                       \
    if (PyModule_AddIntConstant(m, #name, value) < 0) {                                    \
        Py_DECREF(m);                                                                      \
        return NULL;                                                                       \
    }
    KMV_ERRNO_MAP(KMV__ADD_CODE)
#undef KMV__ADD_CODE
    return m;
}
