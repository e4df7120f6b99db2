/* The middle's per-record work in C: log records and live-event frames of a group, and
 * the decoding of a v2 batch.
 *
 * Byte-for-byte the output of iotpipe.wire's encode_log_records, live_metas and
 * reading_topic, and decode_batch's result (the tests compare them); those stay the
 * fallback when this module is not built. In Python each costs a call per record; here a
 * whole group is one call.
 *
 * msgpack as msgpack-python's Packer writes it: the shortest header for each str, bin and
 * non-negative int (log seqs and node seqs are >= 1).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "msgpack_put.h"

static int read_first(PyObject *arg, uint64_t *first) {
    unsigned long long v = PyLong_AsUnsignedLongLong(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *first = v;
    return 0;
}

/* log_records(node: str, first: int, readings: list[bytes]) -> list[bytes] */
static PyObject *log_records(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *node_obj, *first_obj, *readings;
    if (!PyArg_ParseTuple(args, "UOO!", &node_obj, &first_obj, &PyList_Type, &readings))
        return NULL;
    uint64_t seq;
    if (read_first(first_obj, &seq) < 0)
        return NULL;
    Py_ssize_t node_len;
    const char *node = PyUnicode_AsUTF8AndSize(node_obj, &node_len);
    if (node == NULL)
        return NULL;
    if ((uint64_t)node_len > 0xFFFFFFFFu) {
        PyErr_SetString(PyExc_ValueError, "node name too long");
        return NULL;
    }
    unsigned char prefix[6 + 1];
    prefix[0] = 0x93;
    Py_ssize_t prefix_len = 1 + put_raw_header(prefix + 1, (size_t)node_len, 0);
    Py_ssize_t n = PyList_GET_SIZE(readings);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++, seq++) {
        PyObject *reading = PyList_GET_ITEM(readings, i);
        if (!PyBytes_CheckExact(reading)) {
            PyErr_SetString(PyExc_TypeError, "readings must be bytes");
            Py_DECREF(out);
            return NULL;
        }
        Py_ssize_t r_len = PyBytes_GET_SIZE(reading);
        if ((uint64_t)r_len > 0xFFFFFFFFu) {
            PyErr_SetString(PyExc_ValueError, "reading too long");
            Py_DECREF(out);
            return NULL;
        }
        unsigned char seq_buf[9], bin_buf[5];
        Py_ssize_t seq_len = put_uint(seq_buf, seq);
        Py_ssize_t bin_len = put_raw_header(bin_buf, (size_t)r_len, 1);
        PyObject *record = PyBytes_FromStringAndSize(
            NULL, prefix_len + node_len + seq_len + bin_len + r_len);
        if (record == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(record);
        p = put_bytes(p, prefix, prefix_len);
        p = put_bytes(p, node, node_len);
        p = put_bytes(p, seq_buf, seq_len);
        p = put_bytes(p, bin_buf, bin_len);
        put_bytes(p, PyBytes_AS_STRING(reading), r_len);
        PyList_SET_ITEM(out, i, record);
    }
    return out;
}

/* Every item of a list of bytes, checked; its total length through *total. */
static int bytes_total(PyObject *items, size_t *total) {
    size_t sum = 0;
    Py_ssize_t n = PyList_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        if (!PyBytes_CheckExact(item)) {
            PyErr_Format(PyExc_TypeError, "items must be bytes, got %.100s",
                         Py_TYPE(item)->tp_name);
            return -1;
        }
        sum += (size_t)PyBytes_GET_SIZE(item);
    }
    *total = sum;
    return 0;
}

/* pack_bins(items: list[bytes]) -> bytes
 * msgpack of the list as an array of bins, as msgpack-python's Packer(use_bin_type=True)
 * packs it: the body of a v2 live group and of a v2 feed delivery. */
static PyObject *pack_bins(PyObject *self, PyObject *items) {
    (void)self;
    if (!PyList_CheckExact(items)) {
        PyErr_Format(PyExc_TypeError, "pack_bins() takes a list, got %.100s",
                     Py_TYPE(items)->tp_name);
        return NULL;
    }
    size_t payload;
    if (bytes_total(items, &payload) < 0)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(items);
    if ((uint64_t)n > 0xFFFFFFFFu) {
        PyErr_SetString(PyExc_ValueError, "too many items for a msgpack array");
        return NULL;
    }
    /* at most 5 header bytes for the array and for each bin */
    size_t bound = 5 + 5 * (size_t)n + payload;
    if (bound > (size_t)PY_SSIZE_T_MAX)
        return PyErr_NoMemory();
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bound);
    if (out == NULL)
        return NULL;
    unsigned char *start = (unsigned char *)PyBytes_AS_STRING(out), *p = start;
    if (n < 16) {
        *p++ = (unsigned char)(0x90 | n);
    } else if (n < 65536) {
        *p++ = 0xdc;
        *p++ = (unsigned char)(n >> 8);
        *p++ = (unsigned char)n;
    } else {
        *p++ = 0xdd;
        for (int i = 0; i < 4; i++)
            *p++ = (unsigned char)((uint64_t)n >> (24 - 8 * i));
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        Py_ssize_t len = PyBytes_GET_SIZE(item);
        if ((uint64_t)len > 0xFFFFFFFFu) {
            Py_DECREF(out);
            PyErr_SetString(PyExc_ValueError, "an item is too long for a msgpack bin");
            return NULL;
        }
        p += put_raw_header(p, (size_t)len, 1);
        p = put_bytes(p, PyBytes_AS_STRING(item), len);
    }
    if (_PyBytes_Resize(&out, p - start) < 0)
        return NULL;
    return out;
}

/* total_bytes(items: list[bytes]) -> int: the sum of their lengths. */
static PyObject *total_bytes(PyObject *self, PyObject *items) {
    (void)self;
    if (!PyList_CheckExact(items)) {
        PyErr_Format(PyExc_TypeError, "total_bytes() takes a list, got %.100s",
                     Py_TYPE(items)->tp_name);
        return NULL;
    }
    size_t total;
    if (bytes_total(items, &total) < 0)
        return NULL;
    return PyLong_FromSize_t(total);
}

/* The device id of a reading (msgpack array of 5 starting with a str), as in
 * wire.reading_topic; NULL without an exception when the bytes do not start like one. */
static PyObject *topic_of(const unsigned char *r, Py_ssize_t len) {
    if (len < 2 || r[0] != 0x95)
        return NULL;
    unsigned char head = r[1];
    Py_ssize_t start, n;
    if (head >= 0xa0 && head <= 0xbf) {
        start = 2;
        n = head & 0x1f;
    } else if (head == 0xd9 && len >= 3) {
        start = 3;
        n = r[2];
    } else if (head == 0xda && len >= 4) {
        start = 4;
        n = ((Py_ssize_t)r[2] << 8) | r[3];
    } else if (head == 0xdb && len >= 6) {
        start = 6;
        n = ((Py_ssize_t)r[2] << 24) | ((Py_ssize_t)r[3] << 16) | ((Py_ssize_t)r[4] << 8) | r[5];
    } else {
        return NULL;
    }
    if (start + n > len)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)r + start, n);
}

/* live_frames(prefix: bytes, first: int, readings: list[bytes])
 *     -> list[tuple[bytes, bytes, bytes]]
 * (topic, meta, reading) per publishable reading, meta = prefix + packed seq; readings
 * without a device id are left out (their seq is skipped, as the Python loop does). */
static PyObject *live_frames(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *prefix_obj, *first_obj, *readings;
    if (!PyArg_ParseTuple(args, "SOO!", &prefix_obj, &first_obj, &PyList_Type, &readings))
        return NULL;
    uint64_t seq;
    if (read_first(first_obj, &seq) < 0)
        return NULL;
    const char *prefix = PyBytes_AS_STRING(prefix_obj);
    Py_ssize_t prefix_len = PyBytes_GET_SIZE(prefix_obj);
    Py_ssize_t n = PyList_GET_SIZE(readings);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++, seq++) {
        PyObject *reading = PyList_GET_ITEM(readings, i);
        if (!PyBytes_CheckExact(reading)) {
            PyErr_SetString(PyExc_TypeError, "readings must be bytes");
            goto fail;
        }
        PyObject *topic = topic_of((const unsigned char *)PyBytes_AS_STRING(reading),
                                   PyBytes_GET_SIZE(reading));
        if (topic == NULL) {
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        unsigned char seq_buf[9];
        Py_ssize_t seq_len = put_uint(seq_buf, seq);
        PyObject *meta = PyBytes_FromStringAndSize(NULL, prefix_len + seq_len);
        if (meta == NULL) {
            Py_DECREF(topic);
            goto fail;
        }
        memcpy(PyBytes_AS_STRING(meta), prefix, (size_t)prefix_len);
        memcpy(PyBytes_AS_STRING(meta) + prefix_len, seq_buf, (size_t)seq_len);
        PyObject *triple = PyTuple_New(3);
        if (triple == NULL) {
            Py_DECREF(topic);
            Py_DECREF(meta);
            goto fail;
        }
        Py_INCREF(reading);
        PyTuple_SET_ITEM(triple, 0, topic);
        PyTuple_SET_ITEM(triple, 1, meta);
        PyTuple_SET_ITEM(triple, 2, reading);
        int rc = PyList_Append(out, triple);
        Py_DECREF(triple);
        if (rc < 0)
            goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* A bounded msgpack reader for decode_batch_v2: every read checks the remaining length. */
typedef struct {
    const unsigned char *p, *end;
} reader;

static int read_be(reader *r, int n, uint64_t *out) {
    if (r->end - r->p < n)
        return -1;
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | r->p[i];
    r->p += n;
    *out = v;
    return 0;
}

/* A non-negative int in any msgpack int form that holds one; -1 for anything else. */
static int read_uint(reader *r, uint64_t *out) {
    if (r->p >= r->end)
        return -1;
    unsigned char h = *r->p++;
    if (h < 0x80) {
        *out = h;
        return 0;
    }
    switch (h) {
    case 0xcc: return read_be(r, 1, out);
    case 0xcd: return read_be(r, 2, out);
    case 0xce: return read_be(r, 4, out);
    case 0xcf: return read_be(r, 8, out);
    default: return -1;
    }
}

/* A str (is_bin 0) or bin (is_bin 1) header: its length; -1 for anything else. */
static int read_raw(reader *r, int is_bin, uint64_t *len) {
    if (r->p >= r->end)
        return -1;
    unsigned char h = *r->p++;
    int rc;
    if (!is_bin && (h & 0xe0) == 0xa0) {
        *len = h & 0x1f;
        rc = 0;
    } else if (h == (is_bin ? 0xc4 : 0xd9)) {
        rc = read_be(r, 1, len);
    } else if (h == (is_bin ? 0xc5 : 0xda)) {
        rc = read_be(r, 2, len);
    } else if (h == (is_bin ? 0xc6 : 0xdb)) {
        rc = read_be(r, 4, len);
    } else {
        return -1;
    }
    if (rc < 0 || (uint64_t)(r->end - r->p) < *len)
        return -1;
    return 0;
}

/* decode_batch_v2(header: bytes, body: bytes) -> (node, first, readings) | None
 * A v2 batch in the form ingest writes it: header {"node": str, "first": uint, "n": uint}
 * (those three keys, any order), body an array of n > 0 bins and nothing after it, first
 * >= 1. None (no exception) for anything else, so the caller's Python decoder gives the
 * result or the exact error. */
static PyObject *decode_batch_v2(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyBytes_CheckExact(args[0]) || !PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "decode_batch_v2(header: bytes, body: bytes)");
        return NULL;
    }
    reader r = {(const unsigned char *)PyBytes_AS_STRING(args[0]), NULL};
    r.end = r.p + PyBytes_GET_SIZE(args[0]);
    if (r.p >= r.end || *r.p++ != 0x83)
        Py_RETURN_NONE;
    const unsigned char *node = NULL;
    uint64_t node_len = 0, first = 0, n = 0;
    int seen = 0;
    for (int i = 0; i < 3; i++) {
        uint64_t key_len;
        if (read_raw(&r, 0, &key_len) < 0)
            Py_RETURN_NONE;
        const unsigned char *key = r.p;
        r.p += key_len;
        if (key_len == 4 && memcmp(key, "node", 4) == 0 && !(seen & 1)) {
            seen |= 1;
            if (read_raw(&r, 0, &node_len) < 0)
                Py_RETURN_NONE;
            node = r.p;
            r.p += node_len;
        } else if (key_len == 5 && memcmp(key, "first", 5) == 0 && !(seen & 2)) {
            seen |= 2;
            if (read_uint(&r, &first) < 0)
                Py_RETURN_NONE;
        } else if (key_len == 1 && key[0] == 'n' && !(seen & 4)) {
            seen |= 4;
            if (read_uint(&r, &n) < 0)
                Py_RETURN_NONE;
        } else {
            Py_RETURN_NONE;
        }
    }
    if (r.p != r.end || first < 1 || n < 1)
        Py_RETURN_NONE;
    reader b = {(const unsigned char *)PyBytes_AS_STRING(args[1]), NULL};
    b.end = b.p + PyBytes_GET_SIZE(args[1]);
    uint64_t count;
    if (b.p >= b.end)
        Py_RETURN_NONE;
    unsigned char h = *b.p++;
    if ((h & 0xf0) == 0x90) {
        count = h & 0x0f;
    } else if (h == 0xdc) {
        if (read_be(&b, 2, &count) < 0)
            Py_RETURN_NONE;
    } else if (h == 0xdd) {
        if (read_be(&b, 4, &count) < 0)
            Py_RETURN_NONE;
    } else {
        Py_RETURN_NONE;
    }
    /* Every bin takes at least 2 bytes: a count the body cannot hold allocates nothing. */
    if (count != n || count > (uint64_t)(b.end - b.p) / 2)
        Py_RETURN_NONE;
    PyObject *node_obj = PyUnicode_DecodeUTF8((const char *)node, (Py_ssize_t)node_len,
                                              "strict");
    if (node_obj == NULL) {
        PyErr_Clear(); /* not UTF-8: the Python decoder names the error */
        Py_RETURN_NONE;
    }
    /* One pass (the body is read once, while it is still in cache); a body that turns out
     * not to be n bins and nothing else drops what was made and falls back. */
    PyObject *readings = PyList_New((Py_ssize_t)count);
    if (readings == NULL) {
        Py_DECREF(node_obj);
        return NULL;
    }
    for (uint64_t i = 0; i < count; i++) {
        uint64_t len;
        if (read_raw(&b, 1, &len) < 0) {
            Py_DECREF(node_obj);
            Py_DECREF(readings);
            Py_RETURN_NONE;
        }
        PyObject *reading = PyBytes_FromStringAndSize((const char *)b.p, (Py_ssize_t)len);
        if (reading == NULL) {
            Py_DECREF(node_obj);
            Py_DECREF(readings);
            return NULL;
        }
        PyList_SET_ITEM(readings, (Py_ssize_t)i, reading);
        b.p += len;
    }
    if (b.p != b.end) {
        Py_DECREF(node_obj);
        Py_DECREF(readings);
        Py_RETURN_NONE;
    }
    PyObject *first_obj = PyLong_FromUnsignedLongLong(first);
    if (first_obj == NULL) {
        Py_DECREF(node_obj);
        Py_DECREF(readings);
        return NULL;
    }
    PyObject *out = PyTuple_New(3);
    if (out == NULL) {
        Py_DECREF(node_obj);
        Py_DECREF(readings);
        Py_DECREF(first_obj);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, node_obj);
    PyTuple_SET_ITEM(out, 1, first_obj);
    PyTuple_SET_ITEM(out, 2, readings);
    return out;
}

static PyMethodDef methods[] = {
    {"log_records", log_records, METH_VARARGS,
     "log_records(node, first, readings) -> list of msgpack [node, seq, reading]"},
    {"live_frames", live_frames, METH_VARARGS,
     "live_frames(prefix, first, readings) -> list of (topic, meta, reading)"},
    {"pack_bins", pack_bins, METH_O,
     "pack_bins(items) -> msgpack array of bins, as msgpack.packb(items, use_bin_type=True)"},
    {"total_bytes", total_bytes, METH_O, "total_bytes(items) -> sum of len(item)"},
    {"decode_batch_v2", (PyCFunction)(void (*)(void))decode_batch_v2, METH_FASTCALL,
     "decode_batch_v2(header, body) -> (node, first, readings), or None: use Python's"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "iotpipe.middle._hot",
    "The middle's per-record encoding in C (see _hot.c).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__hot(void) { return PyModule_Create(&module); }
