/* The queue's record encoder in C: the append path's one per-record loop.
 *
 * Byte-for-byte the same output as iotpipe.queue.framing's pure-Python encoder (the tests
 * compare them), which stays the fallback when this module is not built. In Python the
 * loop costs about 0.5 us per record (two struct packs, a concatenation, a CRC call, a
 * join); here the whole batch is one call.
 *
 * CRC32C: SSE4.2's crc32 instruction when the CPU has it (chosen at import), else a
 * slicing-by-8 table. Debian has no packaged CRC32C C library and google-crc32c exposes no
 * C API, so the ~40 lines live here; both paths are tested against google-crc32c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

static PyMethodDef methods[] = {
    {"encode_records", (PyCFunction)(void (*)(void))encode_records, METH_FASTCALL,
     encode_records_doc},
    {"crc32c", (PyCFunction)(void (*)(void))py_crc32c, METH_VARARGS | METH_KEYWORDS,
     crc32c_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "iotpipe.queue._framing",
    "The queue's record encoder and CRC32C in C (see framing.py for the format).",
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
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddStringConstant(module, "CRC32C_IMPLEMENTATION", implementation) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
