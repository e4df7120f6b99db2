/* The queue's record encoder and parser in C: the per-record loops of appends and reads.
 *
 * Byte-for-byte the same output as iotpipe.queue.framing's pure-Python encoder, and the same
 * results as its pure-Python parser (the tests compare them), which stay the fallback when
 * this module is not built. In Python each loop costs about 0.5 us per record (struct
 * packs or unpacks, slices, a CRC call, a Record); here a whole batch is one call.
 *
 * CRC32C: SSE4.2's crc32 instruction when the CPU has it (chosen at import), else a
 * slicing-by-8 table. Debian has no packaged CRC32C C library and google-crc32c exposes no
 * C API, so the ~40 lines live here; both paths are tested against google-crc32c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "payload_run.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define IOTPIPE_HAVE_SSE42_CODE 1
#endif

#define RECORD_HEADER_BYTES 16
#define FIRST_IN_WRITE 0x80000000u
#define LENGTH_MASK 0x7FFFFFFFu
#define CASTAGNOLI_REFLECTED 0x82F63B78u

/* ------------------------------------------------------------------ CRC32C */

static uint32_t crc_table[8][256];

static void crc_table_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (CASTAGNOLI_REFLECTED & (0u - (crc & 1u)));
        crc_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            crc_table[k][n] = (crc_table[k - 1][n] >> 8) ^ crc_table[0][crc_table[k - 1][n] & 0xFF];
}

static inline uint64_t load64le(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Raw CRC update (no pre/post inversion): crc = state. */
static uint32_t crc_update_table(uint32_t crc, const unsigned char *p, size_t n) {
    while (n >= 8) {
        uint64_t w = load64le(p) ^ crc;
        crc = crc_table[7][w & 0xFF] ^ crc_table[6][(w >> 8) & 0xFF] ^
              crc_table[5][(w >> 16) & 0xFF] ^ crc_table[4][(w >> 24) & 0xFF] ^
              crc_table[3][(w >> 32) & 0xFF] ^ crc_table[2][(w >> 40) & 0xFF] ^
              crc_table[1][(w >> 48) & 0xFF] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

#ifdef IOTPIPE_HAVE_SSE42_CODE
__attribute__((target("sse4.2")))
static uint32_t crc_update_sse42(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t state = crc;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        state = _mm_crc32_u64(state, w);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)state;
    while (n--)
        crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

typedef uint32_t (*crc_update_fn)(uint32_t, const unsigned char *, size_t);
static crc_update_fn crc_update = crc_update_table;

static inline uint32_t crc32c(const unsigned char *p, size_t n) {
    return ~crc_update(0xFFFFFFFFu, p, n);
}

/* ------------------------------------------------------------------ encoder */

static inline void store32le(unsigned char *p, uint32_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    memcpy(p, &v, 4);
}

static inline void store64le(unsigned char *p, uint64_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

static const char PAYLOAD_TYPE_ERROR[] =
    "payloads must be bytes (or bytes-like with 1-byte items), got %.100s";

/* Release the views taken (bytes objects and failed exports leave obj NULL). */
static void release_views(Py_buffer *views, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++)
        if (views[i].obj != NULL)
            PyBuffer_Release(&views[i]);
}

/* ------------------------------------------------------------------ PayloadRun */

/* See payload_run.h. Built from Python as PayloadRun(data, bounds): bounds a flat sequence
 * of ints, start and end of each payload in data (tests and the fallback-free callers); the
 * middle's C builds runs directly. */
static PyTypeObject PayloadRunType;

static void payload_run_dealloc(PayloadRun *self) {
    if (self->spans_owner == NULL)
        PyMem_Free(self->spans);
    Py_XDECREF(self->spans_owner);
    Py_XDECREF(self->owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *payload_run_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"data", "bounds", NULL};
    PyObject *data, *bounds;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "SO:PayloadRun", keywords, &data, &bounds))
        return NULL;
    if (PyBytes_GET_SIZE(data) > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "PayloadRun data must be under 4 GiB");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(bounds, "PayloadRun bounds must be a sequence of ints");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    if (count % 2) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "PayloadRun bounds must be start, end pairs");
        return NULL;
    }
    PayloadRun *self = (PayloadRun *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    self->spans = PyMem_Malloc(count ? (size_t)count * sizeof(uint32_t) : 1);
    if (self->spans == NULL) {
        Py_DECREF(seq);
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    Py_INCREF(data);
    self->owner = data;
    self->n = count / 2;
    Py_ssize_t size = PyBytes_GET_SIZE(data), total = 0;
    for (Py_ssize_t i = 0; i < self->n; i++) {
        Py_ssize_t start = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, 2 * i));
        Py_ssize_t end = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, 2 * i + 1));
        if ((start == -1 || end == -1) && PyErr_Occurred())
            goto fail;
        if (start < 0 || end < start || end > size) {
            PyErr_Format(PyExc_ValueError, "PayloadRun span %zd (%zd, %zd) is outside data "
                         "of %zd bytes", i, start, end, size);
            goto fail;
        }
        self->spans[2 * i] = (uint32_t)start;
        self->spans[2 * i + 1] = (uint32_t)end;
        total += end - start;
    }
    self->nbytes = total;
    Py_DECREF(seq);
    return (PyObject *)self;
fail:
    Py_DECREF(seq);
    Py_DECREF(self);
    return NULL;
}

static Py_ssize_t payload_run_len(PayloadRun *self) { return self->n; }

static PyObject *payload_run_item(PayloadRun *self, Py_ssize_t i) {
    if (i < 0 || i >= self->n) {
        PyErr_SetString(PyExc_IndexError, "PayloadRun index out of range");
        return NULL;
    }
    const unsigned char *base = payload_run_base(self);
    return PyBytes_FromStringAndSize((const char *)base + self->spans[2 * i],
                                     self->spans[2 * i + 1] - self->spans[2 * i]);
}

static PyObject *payload_run_subscript(PayloadRun *self, PyObject *key) {
    if (!PySlice_Check(key)) {
        Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred())
            return NULL;
        if (i < 0)
            i += self->n;
        return payload_run_item(self, i);
    }
    Py_ssize_t start, stop, step;
    if (PySlice_Unpack(key, &start, &stop, &step) < 0)
        return NULL;
    Py_ssize_t length = PySlice_AdjustIndices(self->n, &start, &stop, step);
    if (step != 1) {
        PyObject *out = PyList_New(length);
        for (Py_ssize_t k = 0; out != NULL && k < length; k++) {
            PyObject *item = payload_run_item(self, start + k * step);
            if (item == NULL)
                Py_CLEAR(out);
            else
                PyList_SET_ITEM(out, k, item);
        }
        return out;
    }
    PayloadRun *run = (PayloadRun *)PayloadRunType.tp_alloc(&PayloadRunType, 0);
    if (run == NULL)
        return NULL;
    PyObject *spans_owner = self->spans_owner ? self->spans_owner : (PyObject *)self;
    Py_INCREF(spans_owner);
    run->spans_owner = spans_owner;
    Py_INCREF(self->owner);
    run->owner = self->owner;
    run->spans = self->spans + 2 * start;
    run->n = length;
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < length; i++)
        total += run->spans[2 * i + 1] - run->spans[2 * i];
    run->nbytes = total;
    return (PyObject *)run;
}

static PyObject *payload_run_get_nbytes(PayloadRun *self, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(self->nbytes);
}

static PyObject *payload_run_repr(PayloadRun *self) {
    return PyUnicode_FromFormat("<PayloadRun of %zd payloads, %zd bytes>", self->n,
                                self->nbytes);
}

static PySequenceMethods payload_run_as_sequence = {
    .sq_length = (lenfunc)payload_run_len,
    .sq_item = (ssizeargfunc)payload_run_item,
};

static PyMappingMethods payload_run_as_mapping = {
    .mp_length = (lenfunc)payload_run_len,
    .mp_subscript = (binaryfunc)payload_run_subscript,
};

static PyGetSetDef payload_run_getset[] = {
    {"nbytes", (getter)payload_run_get_nbytes, NULL, "the sum of the payloads' lengths", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PayloadRunType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "iotpipe.queue._framing.PayloadRun",
    .tp_doc = "PayloadRun(data, bounds): payloads held in one bytes object, each a span of\n"
              "it (bounds: start, end, start, end, ...). A read-only sequence of bytes that\n"
              "encode_records frames without a Python object per payload.",
    .tp_basicsize = sizeof(PayloadRun),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_SEQUENCE,
    .tp_new = payload_run_new,
    .tp_dealloc = (destructor)payload_run_dealloc,
    .tp_repr = (reprfunc)payload_run_repr,
    .tp_as_sequence = &payload_run_as_sequence,
    .tp_as_mapping = &payload_run_as_mapping,
    .tp_getset = payload_run_getset,
};

/* encode_records for a PayloadRun: no tuple, no buffer views. */
static PyObject *encode_run(PayloadRun *run, unsigned long long first_seq) {
    Py_ssize_t count = run->n;
    if (count > 0 && (unsigned long long)(count - 1) > UINT64_MAX - first_seq) {
        PyErr_SetString(PyExc_ValueError, "seqs would pass 2**64-1");
        return NULL;
    }
    const unsigned char *base = payload_run_base(run);
    const uint32_t *spans = run->spans;
    size_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        size_t size = spans[2 * i + 1] - spans[2 * i];
        if (size > LENGTH_MASK - RECORD_HEADER_BYTES) {
            PyErr_Format(PyExc_ValueError, "a record of %zu bytes is too large to frame", size);
            return NULL;
        }
        total += (size + RECORD_HEADER_BYTES + 7) & ~(size_t)7;
    }
    if (total > (size_t)PY_SSIZE_T_MAX)
        return PyErr_NoMemory();
    PyObject *result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (result == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    uint32_t flag = FIRST_IN_WRITE;
    for (Py_ssize_t i = 0; i < count; i++) {
        size_t size = spans[2 * i + 1] - spans[2 * i];
        size_t length = RECORD_HEADER_BYTES + size;
        size_t padded = (length + 7) & ~(size_t)7;
        store32le(out + 4, (uint32_t)length | flag);
        store64le(out + 8, first_seq + (uint64_t)i);
        if (size)
            memcpy(out + RECORD_HEADER_BYTES, base + spans[2 * i], size);
        memset(out + length, 0, padded - length);
        store32le(out, crc32c(out + 4, length - 4));
        out += padded;
        flag = 0;
    }
    return result;
}

PyDoc_STRVAR(encode_records_doc,
"encode_records(payloads, first_seq, /) -> bytes\n\n"
"Frame payloads with consecutive seqs from first_seq as ONE write (the first record\n"
"flagged FIRST_IN_WRITE). Raises TypeError for a payload that is not bytes-like with\n"
"1-byte items, ValueError for a record too large to frame or a seq out of range.");

static PyObject *encode_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "encode_records() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    unsigned long long first_seq = PyLong_AsUnsignedLongLong(args[1]);
    if (first_seq == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError) || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "first_seq must be an int in 0..2**64-1");
        }
        return NULL;
    }
    if (Py_TYPE(args[0]) == &PayloadRunType)
        return encode_run((PayloadRun *)args[0], first_seq);
    /* A tuple of the payloads (a copy unless one was passed): its references keep every
     * payload alive and in place even if a buffer export ran code that changed the list. */
    PyObject *seq = PyList_CheckExact(args[0]) ? PyList_AsTuple(args[0])
                                               : PySequence_Tuple(args[0]);
    if (seq == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "payloads must be a sequence of bytes, got %.100s",
                         Py_TYPE(args[0])->tp_name);
        }
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(seq);
    if (count > 0 && (unsigned long long)(count - 1) > UINT64_MAX - first_seq) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "seqs would pass 2**64-1");
        return NULL;
    }
    PyObject **items = &PyTuple_GET_ITEM(seq, 0);
    Py_buffer *views = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Py_buffer));
    if (views == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    size_t total = 0;
    /* Pass 1: find every payload's bytes and the batch's size. */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = items[i];
        Py_buffer *view = &views[i];
        if (PyBytes_CheckExact(item)) {
            view->buf = PyBytes_AS_STRING(item);
            view->len = PyBytes_GET_SIZE(item);
        } else {
            if (!PyObject_CheckBuffer(item)) {
                PyErr_Format(PyExc_TypeError, PAYLOAD_TYPE_ERROR, Py_TYPE(item)->tp_name);
                goto done;
            }
            if (PyObject_GetBuffer(item, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError,
                             "payloads must be contiguous bytes-like objects, got %.100s",
                             Py_TYPE(item)->tp_name);
                goto done;
            }
            if (view->itemsize != 1 || view->ndim != 1) { /* else len() != byte count */
                PyErr_Format(PyExc_TypeError, PAYLOAD_TYPE_ERROR, Py_TYPE(item)->tp_name);
                goto done;
            }
        }
        if ((size_t)view->len > LENGTH_MASK - RECORD_HEADER_BYTES) {
            PyErr_Format(PyExc_ValueError, "a record of %zd bytes is too large to frame",
                         view->len);
            goto done;
        }
        total += ((size_t)view->len + RECORD_HEADER_BYTES + 7) & ~(size_t)7;
    }
    if (total > (size_t)PY_SSIZE_T_MAX) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (result == NULL)
        goto done;
    /* Pass 2: frame. */
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    uint32_t flag = FIRST_IN_WRITE;
    for (Py_ssize_t i = 0; i < count; i++) {
        size_t size = (size_t)views[i].len;
        size_t length = RECORD_HEADER_BYTES + size;
        size_t padded = (length + 7) & ~(size_t)7;
        store32le(out + 4, (uint32_t)length | flag);
        store64le(out + 8, first_seq + (uint64_t)i);
        if (size)
            memcpy(out + RECORD_HEADER_BYTES, views[i].buf, size);
        memset(out + length, 0, padded - length);
        store32le(out, crc32c(out + 4, length - 4));
        out += padded;
        flag = 0;
    }
done:
    release_views(views, count);
    PyMem_Free(views);
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(crc32c_doc,
"crc32c(data, /, *, table=False) -> int\n\n"
"CRC32C (Castagnoli) of a bytes-like object, as the encoder computes it. table=True\n"
"forces the portable table path (for tests on CPUs with the hardware instruction).");

static PyObject *py_crc32c(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *keywords[] = {"", "table", NULL};
    Py_buffer data;
    int table = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|$p:crc32c", keywords, &data, &table))
        return NULL;
    crc_update_fn update = table ? crc_update_table : crc_update;
    uint32_t crc = ~update(0xFFFFFFFFu, (const unsigned char *)data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

/* ------------------------------------------------------------------ parser */

/* framing.py hands over its Record / ParseResult classes and the Stop strings once at import,
 * so results are the very types and string objects the Python parser returns. */
static PyTypeObject *record_type = NULL;
static PyTypeObject *result_type = NULL;
enum { STOP_LIMIT, STOP_END, STOP_ZERO, STOP_SHORT, STOP_BAD_LENGTH, STOP_CRC, STOP_SEQ, STOP_COUNT };
static PyObject *stop_values[STOP_COUNT];
static PyObject *append_name = NULL; /* "append", for an `out` that is not a list */

static inline uint32_t load32le(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

/* An instance of a namedtuple class (a tuple subclass without slots) from owned references,
 * built the way tuple.__new__ builds one, without calling the class's Python __new__. */
static PyObject *new_tuple_of(PyTypeObject *type, Py_ssize_t n, PyObject **owned) {
    PyObject *tuple = type->tp_alloc(type, n);
    if (tuple == NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            Py_XDECREF(owned[i]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (owned[i] == NULL) { /* a failed allocation: drop the tuple and the rest */
            for (Py_ssize_t j = i + 1; j < n; j++)
                Py_XDECREF(owned[j]);
            Py_DECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, i, owned[i]);
    }
    return tuple;
}

static int check_namedtuple(PyObject *type, const char *name) {
    if (!PyType_Check(type) || !PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type) ||
        ((PyTypeObject *)type)->tp_basicsize != PyTuple_Type.tp_basicsize) {
        PyErr_Format(PyExc_TypeError, "%s must be a namedtuple class", name);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(set_parse_types_doc,
"set_parse_types(record, parse_result, stops, /)\n\n"
"Register framing.py's Record and ParseResult classes and the Stop values (LIMIT, END,\n"
"ZERO, SHORT, BAD_LENGTH, CRC, SEQ) that parse_records returns.");

static PyObject *set_parse_types(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "set_parse_types() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (check_namedtuple(args[0], "record") < 0 || check_namedtuple(args[1], "parse_result") < 0)
        return NULL;
    if (!PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != STOP_COUNT) {
        PyErr_Format(PyExc_TypeError, "stops must be a tuple of %d values", STOP_COUNT);
        return NULL;
    }
    Py_XSETREF(record_type, (PyTypeObject *)Py_NewRef(args[0]));
    Py_XSETREF(result_type, (PyTypeObject *)Py_NewRef(args[1]));
    for (int i = 0; i < STOP_COUNT; i++)
        Py_XSETREF(stop_values[i], Py_NewRef(PyTuple_GET_ITEM(args[2], i)));
    Py_RETURN_NONE;
}

/* A Python int argument clamped to int64 (the limits are only ever compared). */
static int clamped_int64(PyObject *value, const char *name, long long *out) {
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %.100s", name,
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = overflow > 0 ? LLONG_MAX : overflow < 0 ? LLONG_MIN : v;
    return 0;
}

PyDoc_STRVAR(parse_records_doc,
"parse_records(buf, offset, end, seq, out, /, *, max_records=1<<62, max_bytes=1<<62,\n"
"              at_least_one=True) -> ParseResult\n\n"
"The C twin of framing.parse_records_python: the same results, records and stop reasons.");

static PyObject *parse_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames) {
    (void)module;
    if (record_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "set_parse_types() was not called");
        return NULL;
    }
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "parse_records() takes 5 positional arguments (%zd given)",
                     nargs);
        return NULL;
    }
    long long max_records = 1LL << 62, max_bytes = 1LL << 62;
    int at_least_one = 1;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i), *value = args[nargs + i];
        if (PyUnicode_CompareWithASCIIString(name, "max_records") == 0) {
            if (clamped_int64(value, "max_records", &max_records) < 0)
                return NULL;
        } else if (PyUnicode_CompareWithASCIIString(name, "max_bytes") == 0) {
            if (clamped_int64(value, "max_bytes", &max_bytes) < 0)
                return NULL;
        } else if (PyUnicode_CompareWithASCIIString(name, "at_least_one") == 0) {
            if ((at_least_one = PyObject_IsTrue(value)) < 0)
                return NULL;
        } else {
            PyErr_Format(PyExc_TypeError, "parse_records() got an unexpected keyword argument '%U'",
                         name);
            return NULL;
        }
    }
    Py_ssize_t offset = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    long long end_arg;
    if (clamped_int64(args[2], "end", &end_arg) < 0)
        return NULL;
    PyObject *seq_arg = args[3], *out = args[4];
    if (!PyLong_Check(seq_arg)) {
        PyErr_Format(PyExc_TypeError, "seq must be an int, got %.100s", Py_TYPE(seq_arg)->tp_name);
        return NULL;
    }
    /* A seq outside 0..2**64-1 matches no record: the walk can only stop before or at SEQ. */
    int seq_in_range = 1;
    uint64_t seq = PyLong_AsUnsignedLongLong(seq_arg);
    if (seq == (uint64_t)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        seq_in_range = 0;
    }
    int list_out = PyList_CheckExact(out), have_out = out != Py_None;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (offset < 0 || end_arg > (long long)view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "need 0 <= offset and end <= len(buf)");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    long long end = end_arg;
    long long count = 0, payload_bytes = 0;
    int stop = STOP_LIMIT, passed_last_seq = 0;
    long long frame_length = 0;
    while (count < max_records) {
        if ((long long)offset + RECORD_HEADER_BYTES > end) { stop = STOP_END; break; }
        const unsigned char *p = buf + offset;
        uint32_t crc = load32le(p), length = load32le(p + 4) & LENGTH_MASK;
        if (length == 0) { stop = STOP_ZERO; break; }
        if (length < RECORD_HEADER_BYTES) { stop = STOP_BAD_LENGTH; break; }
        if ((long long)offset + length > end) { stop = STOP_SHORT; frame_length = length; break; }
        if (crc32c(p + 4, length - 4) != crc) { stop = STOP_CRC; break; }
        if (!seq_in_range || load64le(p + 8) != seq) { stop = STOP_SEQ; break; }
        long long size = (long long)length - RECORD_HEADER_BYTES;
        if (payload_bytes + size > max_bytes && (count || !at_least_one)) { stop = STOP_LIMIT; break; }
        if (have_out) {
            PyObject *items[2] = {PyLong_FromUnsignedLongLong(seq),
                                  PyBytes_FromStringAndSize((const char *)p + RECORD_HEADER_BYTES,
                                                            (Py_ssize_t)size)};
            PyObject *record = new_tuple_of(record_type, 2, items);
            if (record == NULL)
                goto error;
            int failed;
            if (list_out) {
                failed = PyList_Append(out, record);
            } else {
                PyObject *returned = PyObject_CallMethodOneArg(out, append_name, record);
                failed = returned == NULL;
                Py_XDECREF(returned);
            }
            Py_DECREF(record);
            if (failed)
                goto error;
        }
        payload_bytes += size;
        count++;
        if (seq == UINT64_MAX) { /* the next seq is 2**64: no record can carry it */
            seq_in_range = 0;
            passed_last_seq = 1;
        } else {
            seq++;
        }
        offset += (Py_ssize_t)((length + 7) & ~7u);
    }
    PyBuffer_Release(&view);
    PyObject *next_seq;
    if (count == 0)
        next_seq = Py_NewRef(seq_arg);
    else if (passed_last_seq) {
        PyObject *last = PyLong_FromUnsignedLongLong(UINT64_MAX), *one = PyLong_FromLong(1);
        next_seq = last && one ? PyNumber_Add(last, one) : NULL;
        Py_XDECREF(last);
        Py_XDECREF(one);
    } else
        next_seq = PyLong_FromUnsignedLongLong(seq);
    PyObject *fields[4] = {PyLong_FromSsize_t(offset), next_seq, Py_NewRef(stop_values[stop]),
                           PyLong_FromLongLong(frame_length)};
    return new_tuple_of(result_type, 4, fields);
error:
    PyBuffer_Release(&view);
    return NULL;
}

/* A file descriptor from a Python int; -1 with an exception when it is not one. */
static int fd_of(PyObject *obj) {
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "a file descriptor must be in 0..INT_MAX");
        return -1;
    }
    return (int)v;
}

/* pwritev all of iov[0..count) at `at` (iov is consumed), then fdatasync: 0, or the errno
 * of the failure. Runs without the GIL (it touches no Python object). */
static int write_all_and_sync(int fd, struct iovec *iov, int count, off_t at) {
    while (count > 0) {
        if (iov->iov_len == 0) {
            iov++;
            count--;
            continue;
        }
        ssize_t n = pwritev(fd, iov, count > IOV_MAX ? IOV_MAX : count, at);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)  /* no progress and no error: never loop on it */
            return EIO;
        at += n;
        while (count > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    while (fdatasync(fd) < 0) {
        if (errno != EINTR)
            return errno;
    }
    return 0;
}

/* Checked fd and offset of (fd, data, offset) arguments of `name`; 0, or -1 with an
 * exception set. */
static int write_args(const char *name, PyObject *const *args, Py_ssize_t nargs, int *fd,
                      off_t *offset) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s(fd, data, offset) takes 3 arguments", name);
        return -1;
    }
    *fd = fd_of(args[0]);
    if (*fd < 0)
        return -1;
    long long at = PyLong_AsLongLong(args[2]);
    if (at == -1 && PyErr_Occurred())
        return -1;
    if (at < 0) {
        PyErr_SetString(PyExc_ValueError, "offset must be >= 0");
        return -1;
    }
    *offset = (off_t)at;
    return 0;
}

/* write_synced(fd, data, offset): pwrite all of data at offset, then fdatasync, in ONE
 * release of the GIL. Through os.pwrite and os.fdatasync each call releases and takes back
 * the GIL: on a busy server each take-back waits for the event loop's thread to yield it
 * (up to the switch interval), which held every commit group's acks. */
PyDoc_STRVAR(write_synced_doc,
"write_synced(fd, data, offset) -> None\n\n"
"pwrite all of data at offset, then fdatasync fd; OSError as os.pwrite/os.fdatasync.");

static PyObject *write_synced(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int fd;
    off_t offset;
    Py_buffer view;
    if (write_args("write_synced", args, nargs, &fd, &offset) < 0
            || PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int failed_errno;
    struct iovec one = {view.buf, (size_t)view.len};
    Py_BEGIN_ALLOW_THREADS
    failed_errno = write_all_and_sync(fd, &one, 1, offset);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (failed_errno != 0) {
        errno = failed_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ SyncWorker
 *
 * One write + fdatasync at a time on a thread of its own that never takes the GIL: the
 * caller's buffer is held (PyObject_GetBuffer) from submit to collect, so the thread only
 * reads plain memory. Completion is signalled on an eventfd the owner polls with its
 * sockets, so the owner keeps working (receiving, encoding the next group) while the disk
 * syncs, and no thread waits for the GIL to report it. */

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mutex;
    pthread_cond_t cond;  /* a job was posted, the job finished, or stop was asked */
    pthread_t thread;
    int thread_started;
    int efd;              /* eventfd: readable once a job finished; -1 once closed */
    /* the job, guarded by mutex */
    int outstanding;      /* submitted and not yet collected (the buffer is held) */
    int posted;           /* submitted and not yet taken by the thread */
    int finished;         /* the thread is done with it */
    int stopping;
    int fd;
    off_t offset;
    int error;            /* errno of the job, 0 when it succeeded */
    Py_ssize_t count;     /* the job's parts: held buffers and their iovecs */
    Py_buffer *views;
    struct iovec *iov;
} SyncWorker;

/* Release the job's buffers (with the GIL; the thread no longer reads them). */
static void sync_worker_release(SyncWorker *w) {
    for (Py_ssize_t i = 0; i < w->count; i++)
        PyBuffer_Release(&w->views[i]);
    PyMem_Free(w->views);
    PyMem_Free(w->iov);
    w->views = NULL;
    w->iov = NULL;
    w->count = 0;
}

static void *sync_worker_main(void *arg) {
    SyncWorker *w = (SyncWorker *)arg;
    pthread_mutex_lock(&w->mutex);
    for (;;) {
        while (!w->posted && !w->stopping)
            pthread_cond_wait(&w->cond, &w->mutex);
        if (!w->posted)
            break;  /* stopping with nothing to do */
        w->posted = 0;
        int fd = w->fd;
        struct iovec *iov = w->iov;
        int count = (int)w->count;
        off_t offset = w->offset;
        pthread_mutex_unlock(&w->mutex);
        int error = write_all_and_sync(fd, iov, count, offset);
        pthread_mutex_lock(&w->mutex);
        w->error = error;
        w->finished = 1;
        pthread_cond_broadcast(&w->cond);
        /* Under the mutex: close() cannot close the eventfd in between. */
        uint64_t one = 1;
        ssize_t n;
        do {
            n = write(w->efd, &one, sizeof one);
        } while (n < 0 && errno == EINTR);
    }
    pthread_mutex_unlock(&w->mutex);
    return NULL;
}

static PyObject *sync_worker_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "SyncWorker() takes no arguments");
        return NULL;
    }
    SyncWorker *w = (SyncWorker *)type->tp_alloc(type, 0);
    if (w == NULL)
        return NULL;
    w->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(w);
        return NULL;
    }
    pthread_mutex_init(&w->mutex, NULL);
    pthread_cond_init(&w->cond, NULL);
    return (PyObject *)w;
}

/* Wait (GIL released) until the outstanding job finished; the caller holds no mutex. */
static void sync_worker_wait(SyncWorker *w) {
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&w->mutex);
    while (!w->finished)
        pthread_cond_wait(&w->cond, &w->mutex);
    pthread_mutex_unlock(&w->mutex);
    Py_END_ALLOW_THREADS
}

PyDoc_STRVAR(sync_worker_submit_doc,
"submit(fd, parts, offset) -> None\n\n"
"Start writing the bytes-like parts (a list or tuple, one after the other, in one pwritev)\n"
"at offset of fd and fdatasync it on the worker's thread. The parts are held until\n"
"collect(). RuntimeError if the previous job was not collected.");

static PyObject *sync_worker_submit(SyncWorker *w, PyObject *const *args, Py_ssize_t nargs) {
    if (w->efd < 0) {
        PyErr_SetString(PyExc_ValueError, "the SyncWorker is closed");
        return NULL;
    }
    if (w->outstanding) {
        PyErr_SetString(PyExc_RuntimeError, "a write is outstanding: collect() it first");
        return NULL;
    }
    int fd;
    off_t offset;
    if (write_args("submit", args, nargs, &fd, &offset) < 0)
        return NULL;
    if (!PyList_Check(args[1]) && !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "submit() takes its parts as a list or tuple");
        return NULL;
    }
    PyObject *parts = args[1];
    Py_ssize_t count = PySequence_Fast_GET_SIZE(parts);
    if (count > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many parts");
        return NULL;
    }
    if (!w->thread_started) {
        int rc = pthread_create(&w->thread, NULL, sync_worker_main, w);
        if (rc != 0) {
            errno = rc;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        w->thread_started = 1;
    }
    w->views = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Py_buffer));
    w->iov = PyMem_Calloc(count ? (size_t)count : 1, sizeof(struct iovec));
    if (w->views == NULL || w->iov == NULL) {
        sync_worker_release(w);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        /* A list item may go away once we give up the GIL: the held buffer keeps it. */
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(parts, i), &w->views[i],
                               PyBUF_SIMPLE) < 0) {
            sync_worker_release(w);
            return NULL;
        }
        w->count = i + 1;
        w->iov[i].iov_base = w->views[i].buf;
        w->iov[i].iov_len = (size_t)w->views[i].len;
    }
    pthread_mutex_lock(&w->mutex);
    w->fd = fd;
    w->offset = offset;
    w->error = 0;
    w->finished = 0;
    w->posted = 1;
    w->outstanding = 1;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mutex);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(sync_worker_done_doc,
"done() -> bool\n\nTrue when the outstanding write finished (collect() will not wait).");

static PyObject *sync_worker_done(SyncWorker *w, PyObject *unused) {
    (void)unused;
    pthread_mutex_lock(&w->mutex);
    int done = w->outstanding && w->finished;
    pthread_mutex_unlock(&w->mutex);
    return PyBool_FromLong(done);
}

PyDoc_STRVAR(sync_worker_collect_doc,
"collect() -> None\n\n"
"Wait for the outstanding write (if it has not finished), release its data and reset the\n"
"eventfd; OSError as os.pwrite/os.fdatasync when it failed. RuntimeError if none.");

static PyObject *sync_worker_collect(SyncWorker *w, PyObject *unused) {
    (void)unused;
    if (!w->outstanding) {
        PyErr_SetString(PyExc_RuntimeError, "no write is outstanding");
        return NULL;
    }
    sync_worker_wait(w);
    uint64_t count;
    ssize_t n;
    do {
        n = read(w->efd, &count, sizeof count);  /* non-blocking: resets the counter */
    } while (n < 0 && errno == EINTR);
    int error = w->error;  /* finished: the thread no longer writes it */
    w->outstanding = 0;
    sync_worker_release(w);
    if (error != 0) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(sync_worker_fileno_doc,
"fileno() -> int\n\nThe eventfd that is readable once the outstanding write finished.");

static PyObject *sync_worker_fileno(SyncWorker *w, PyObject *unused) {
    (void)unused;
    if (w->efd < 0) {
        PyErr_SetString(PyExc_ValueError, "the SyncWorker is closed");
        return NULL;
    }
    return PyLong_FromLong(w->efd);
}

/* Finish the outstanding job (its result is dropped), stop the thread, close the eventfd. */
static void sync_worker_shutdown(SyncWorker *w) {
    if (w->outstanding) {
        sync_worker_wait(w);
        w->outstanding = 0;
        sync_worker_release(w);
    }
    if (w->thread_started) {
        pthread_mutex_lock(&w->mutex);
        w->stopping = 1;
        pthread_cond_broadcast(&w->cond);
        pthread_mutex_unlock(&w->mutex);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(w->thread, NULL);
        Py_END_ALLOW_THREADS
        w->thread_started = 0;
    }
    if (w->efd >= 0) {
        close(w->efd);
        w->efd = -1;
    }
}

PyDoc_STRVAR(sync_worker_close_doc,
"close() -> None\n\n"
"Wait for an outstanding write (its result is dropped), stop the thread. Idempotent.");

static PyObject *sync_worker_close(SyncWorker *w, PyObject *unused) {
    (void)unused;
    sync_worker_shutdown(w);
    Py_RETURN_NONE;
}

static void sync_worker_dealloc(SyncWorker *w) {
    sync_worker_shutdown(w);
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->mutex);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMethodDef sync_worker_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))sync_worker_submit, METH_FASTCALL,
     sync_worker_submit_doc},
    {"done", (PyCFunction)sync_worker_done, METH_NOARGS, sync_worker_done_doc},
    {"collect", (PyCFunction)sync_worker_collect, METH_NOARGS, sync_worker_collect_doc},
    {"fileno", (PyCFunction)sync_worker_fileno, METH_NOARGS, sync_worker_fileno_doc},
    {"close", (PyCFunction)sync_worker_close, METH_NOARGS, sync_worker_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SyncWorkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "iotpipe.queue._framing.SyncWorker",
    .tp_basicsize = sizeof(SyncWorker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One pwrite + fdatasync at a time on a thread that never takes the GIL.",
    .tp_new = sync_worker_new,
    .tp_dealloc = (destructor)sync_worker_dealloc,
    .tp_methods = sync_worker_methods,
};

/* signal_eventfd(fd): add 1 to an eventfd's counter WITHOUT releasing the GIL. A
 * non-blocking eventfd write never waits; os.eventfd_write releases the GIL around it, and
 * taking it back cost the queue's writer thread another wait per group. */
PyDoc_STRVAR(signal_eventfd_doc,
"signal_eventfd(fd) -> None\n\n"
"Add 1 to a non-blocking eventfd's counter; a full counter (EAGAIN) is already signalled.");

static PyObject *signal_eventfd(PyObject *self, PyObject *arg) {
    (void)self;
    int fd = fd_of(arg);
    if (fd < 0)
        return NULL;
    uint64_t one = 1;
    ssize_t n;
    do {
        n = write(fd, &one, sizeof one);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"write_synced", (PyCFunction)(void (*)(void))write_synced, METH_FASTCALL,
     write_synced_doc},
    {"signal_eventfd", (PyCFunction)signal_eventfd, METH_O, signal_eventfd_doc},
    {"encode_records", (PyCFunction)(void (*)(void))encode_records, METH_FASTCALL,
     encode_records_doc},
    {"crc32c", (PyCFunction)(void (*)(void))py_crc32c, METH_VARARGS | METH_KEYWORDS,
     crc32c_doc},
    {"parse_records", (PyCFunction)(void (*)(void))parse_records, METH_FASTCALL | METH_KEYWORDS,
     parse_records_doc},
    {"set_parse_types", (PyCFunction)(void (*)(void))set_parse_types, METH_FASTCALL,
     set_parse_types_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "iotpipe.queue._framing",
    "The queue's record encoder, parser and CRC32C in C (see framing.py for the format).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__framing(void) {
    crc_table_init();
    const char *implementation = "table";
#ifdef IOTPIPE_HAVE_SSE42_CODE
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        crc_update = crc_update_sse42;
        implementation = "sse4.2";
    }
#endif
    if (append_name == NULL && (append_name = PyUnicode_InternFromString("append")) == NULL)
        return NULL;
    if (PyType_Ready(&SyncWorkerType) < 0 || PyType_Ready(&PayloadRunType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    Py_INCREF(&SyncWorkerType);
    if (PyModule_AddObject(module, "SyncWorker", (PyObject *)&SyncWorkerType) < 0) {
        Py_DECREF(&SyncWorkerType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&PayloadRunType);
    if (PyModule_AddObject(module, "PayloadRun", (PyObject *)&PayloadRunType) < 0) {
        Py_DECREF(&PayloadRunType);
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddStringConstant(module, "CRC32C_IMPLEMENTATION", implementation) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
