/* The middle's per-record work in C: log records and live-event frames of a group, and
 * the decoding of a v2 batch. A group's readings and log records travel as PayloadRuns
 * (payload_run.h): spans of one buffer, not a bytes object each.
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
#include "payload_run.h"

/* iotpipe.queue._framing.PayloadRun, taken at import (see payload_run.h). */
static PyTypeObject *run_type = NULL;

static int read_first(PyObject *arg, uint64_t *first) {
    unsigned long long v = PyLong_AsUnsignedLongLong(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *first = v;
    return 0;
}

/* A sequence of payloads the functions below read: a list of bytes or a PayloadRun. */
typedef struct {
    PyObject *list;        /* or NULL */
    const PayloadRun *run; /* or NULL */
    Py_ssize_t n;
} items_t;

static int items_open(PyObject *obj, items_t *it) {
    if (Py_TYPE(obj) == run_type) {
        it->list = NULL;
        it->run = (const PayloadRun *)obj;
        it->n = it->run->n;
        return 0;
    }
    if (PyList_CheckExact(obj)) {
        it->list = obj;
        it->run = NULL;
        it->n = PyList_GET_SIZE(obj);
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "expected a list of bytes or a PayloadRun, got %.100s",
                 Py_TYPE(obj)->tp_name);
    return -1;
}

/* Item i's bytes; for a list, NULL with TypeError when it is not bytes. */
static inline const unsigned char *item_at(const items_t *it, Py_ssize_t i, Py_ssize_t *len) {
    if (it->run != NULL) {
        const uint32_t *span = it->run->spans + 2 * i;
        *len = (Py_ssize_t)(span[1] - span[0]);
        return payload_run_base(it->run) + span[0];
    }
    PyObject *item = PyList_GET_ITEM(it->list, i);
    if (!PyBytes_CheckExact(item)) {
        PyErr_Format(PyExc_TypeError, "items must be bytes, got %.100s", Py_TYPE(item)->tp_name);
        return NULL;
    }
    *len = PyBytes_GET_SIZE(item);
    return (const unsigned char *)PyBytes_AS_STRING(item);
}

/* Every item checked; their total length through *total. */
static int items_total(const items_t *it, size_t *total) {
    if (it->run != NULL) {
        *total = (size_t)it->run->nbytes;
        return 0;
    }
    size_t sum = 0;
    for (Py_ssize_t i = 0; i < it->n; i++) {
        Py_ssize_t len;
        if (item_at(it, i, &len) == NULL)
            return -1;
        sum += (size_t)len;
    }
    *total = sum;
    return 0;
}

/* A new run over owner (a new reference) with spans, which it takes over (freed on failure). */
static PyObject *new_run(PyObject *owner, uint32_t *spans, Py_ssize_t n, Py_ssize_t nbytes) {
    PayloadRun *run = (PayloadRun *)run_type->tp_alloc(run_type, 0);
    if (run == NULL) {
        PyMem_Free(spans);
        return NULL;
    }
    Py_INCREF(owner);
    run->owner = owner;
    run->spans_owner = NULL;
    run->spans = spans;
    run->n = n;
    run->nbytes = nbytes;
    return (PyObject *)run;
}

/* The items of a list argument of `function` as a tuple, whose references keep every item
 * alive even if the list changes meanwhile; TypeError for anything but a list. */
static PyObject *list_as_tuple(const char *function, PyObject *list) {
    if (!PyList_CheckExact(list)) {
        PyErr_Format(PyExc_TypeError, "%s() takes a list, got %.100s", function,
                     Py_TYPE(list)->tp_name);
        return NULL;
    }
    return PyList_AsTuple(list);
}

/* log_run(parts: list[tuple[str, int, list[bytes] | PayloadRun]]) -> PayloadRun
 * The log records (msgpack [node, seq, reading], as wire.encode_log_records makes them) of
 * every part (node, first node seq, readings), in order, in ONE buffer: no Python object
 * per record. */
static PyObject *log_run(PyObject *self, PyObject *parts_list) {
    (void)self;
    PyObject *parts = list_as_tuple("log_run", parts_list);
    if (parts == NULL)
        return NULL;
    Py_ssize_t nparts = PyTuple_GET_SIZE(parts);
    typedef struct {
        const char *node;
        Py_ssize_t node_len;
        uint64_t first;
        items_t items;
    } part_t;
    part_t *ps = PyMem_Calloc(nparts ? (size_t)nparts : 1, sizeof(part_t));
    uint32_t *spans = NULL;
    PyObject *buffer = NULL, *result = NULL;
    if (ps == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    size_t total = 0;
    Py_ssize_t count = 0;
    for (Py_ssize_t k = 0; k < nparts; k++) {
        PyObject *part = PyTuple_GET_ITEM(parts, k);
        if (!PyTuple_CheckExact(part) || PyTuple_GET_SIZE(part) != 3 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(part, 0))) {
            PyErr_SetString(PyExc_TypeError, "log_run() parts are (node: str, first: int, "
                                             "readings) tuples");
            goto done;
        }
        part_t *pt = &ps[k];
        pt->node = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(part, 0), &pt->node_len);
        if (pt->node == NULL || read_first(PyTuple_GET_ITEM(part, 1), &pt->first) < 0 ||
            items_open(PyTuple_GET_ITEM(part, 2), &pt->items) < 0)
            goto done;
        if ((uint64_t)pt->node_len > 0xFFFFFFFFu) {
            PyErr_SetString(PyExc_ValueError, "node name too long");
            goto done;
        }
        unsigned char hdr[5];
        size_t prefix = 1 + (size_t)put_raw_header(hdr, (size_t)pt->node_len, 0) +
                        (size_t)pt->node_len;
        for (Py_ssize_t i = 0; i < pt->items.n; i++) {
            Py_ssize_t len;
            if (item_at(&pt->items, i, &len) == NULL)
                goto done;
            unsigned char seq_buf[9];
            total += prefix + (size_t)put_uint(seq_buf, pt->first + (uint64_t)i) +
                     (size_t)put_raw_header(hdr, (size_t)len, 1) + (size_t)len;
        }
        count += pt->items.n;
    }
    if (total > 0xFFFFFFFFu) {
        /* spans are 32-bit: hot.py makes a list of such a group instead */
        PyErr_SetString(PyExc_OverflowError, "a run's payloads must total under 4 GiB");
        goto done;
    }
    buffer = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    spans = PyMem_Malloc(count ? 2 * (size_t)count * sizeof(uint32_t) : 1);
    if (buffer == NULL || spans == NULL) {
        if (spans == NULL)
            PyErr_NoMemory();
        goto done;
    }
    unsigned char *start = (unsigned char *)PyBytes_AS_STRING(buffer), *p = start;
    uint32_t *span = spans;
    for (Py_ssize_t k = 0; k < nparts; k++) {
        part_t *pt = &ps[k];
        for (Py_ssize_t i = 0; i < pt->items.n; i++) {
            Py_ssize_t len = 0;
            const unsigned char *reading = item_at(&pt->items, i, &len);
            *span++ = (uint32_t)(p - start);
            *p++ = 0x93;
            p += put_raw_header(p, (size_t)pt->node_len, 0);
            p = put_bytes(p, pt->node, pt->node_len);
            p += put_uint(p, pt->first + (uint64_t)i);
            p += put_raw_header(p, (size_t)len, 1);
            p = put_bytes(p, reading, len);
            *span++ = (uint32_t)(p - start);
        }
    }
    result = new_run(buffer, spans, count, (Py_ssize_t)total);
    spans = NULL; /* new_run took them */
done:
    PyMem_Free(spans);
    Py_XDECREF(buffer);
    PyMem_Free(ps);
    Py_DECREF(parts);
    return result;
}

/* record_readings(records: PayloadRun) -> PayloadRun
 * The reading inside each log record (msgpack [node, seq, reading]) as a run over the
 * same buffer: no copy. ValueError for a payload that is not such a record. */
static PyObject *record_readings(PyObject *self, PyObject *arg);

/* msgpack of the items of every part, in order, as ONE array of bins. */
static PyObject *pack_parts(PyObject *const *parts, Py_ssize_t nparts) {
    items_t stack_items[4];
    items_t *its = nparts <= 4 ? stack_items : PyMem_Malloc((size_t)nparts * sizeof(items_t));
    if (its == NULL)
        return PyErr_NoMemory();
    PyObject *out = NULL;
    size_t payload = 0;
    uint64_t n = 0;
    for (Py_ssize_t k = 0; k < nparts; k++) {
        size_t part_bytes;
        if (items_open(parts[k], &its[k]) < 0 || items_total(&its[k], &part_bytes) < 0)
            goto done;
        payload += part_bytes;
        n += (uint64_t)its[k].n;
    }
    if (n > 0xFFFFFFFFu) {
        PyErr_SetString(PyExc_ValueError, "too many items for a msgpack array");
        goto done;
    }
    /* at most 5 header bytes for the array and for each bin */
    size_t bound = 5 + 5 * (size_t)n + payload;
    if (bound > (size_t)PY_SSIZE_T_MAX) {
        PyErr_NoMemory();
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bound);
    if (out == NULL)
        goto done;
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
            *p++ = (unsigned char)(n >> (24 - 8 * i));
    }
    for (Py_ssize_t k = 0; k < nparts; k++) {
        for (Py_ssize_t i = 0; i < its[k].n; i++) {
            Py_ssize_t len = 0;
            const unsigned char *item = item_at(&its[k], i, &len);
            if ((uint64_t)len > 0xFFFFFFFFu) {
                Py_CLEAR(out);
                PyErr_SetString(PyExc_ValueError, "an item is too long for a msgpack bin");
                goto done;
            }
            p += put_raw_header(p, (size_t)len, 1);
            p = put_bytes(p, item, len);
        }
    }
    if (_PyBytes_Resize(&out, p - start) < 0)
        out = NULL;
done:
    if (its != stack_items)
        PyMem_Free(its);
    return out;
}

/* pack_bins(items: list[bytes] | PayloadRun) -> bytes
 * msgpack of the items as an array of bins, as msgpack-python's Packer(use_bin_type=True)
 * packs a list of them: the body of a v2 live group and of a v2 feed delivery. */
static PyObject *pack_bins(PyObject *self, PyObject *items) {
    (void)self;
    return pack_parts(&items, 1);
}

/* pack_runs(parts: list[list[bytes] | PayloadRun]) -> bytes
 * pack_bins of all the parts' items in order, without joining them first. */
static PyObject *pack_runs(PyObject *self, PyObject *parts) {
    (void)self;
    PyObject *tuple = list_as_tuple("pack_runs", parts);
    if (tuple == NULL)
        return NULL;
    PyObject *out = pack_parts(&PyTuple_GET_ITEM(tuple, 0), PyTuple_GET_SIZE(tuple));
    Py_DECREF(tuple);
    return out;
}

/* total_bytes(items: list[bytes] | PayloadRun) -> int: the sum of their lengths. */
static PyObject *total_bytes(PyObject *self, PyObject *items) {
    (void)self;
    items_t it;
    size_t total;
    if (items_open(items, &it) < 0 || items_total(&it, &total) < 0)
        return NULL;
    return PyLong_FromSize_t(total);
}

/* count_within(items: list[bytes] | PayloadRun, max_bytes: int) -> int
 * How many leading items fit in max_bytes together. */
static PyObject *count_within(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "count_within(items, max_bytes)");
        return NULL;
    }
    items_t it;
    if (items_open(args[0], &it) < 0)
        return NULL;
    Py_ssize_t budget = PyLong_AsSsize_t(args[1]);
    if (budget == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t used = 0, i = 0;
    for (; i < it.n; i++) {
        Py_ssize_t len;
        if (item_at(&it, i, &len) == NULL)
            return NULL;
        if (len > budget - used)
            break;
        used += len;
    }
    return PyLong_FromSsize_t(i);
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

/* live_frames(prefix: bytes, first: int, readings: list[bytes] | PayloadRun)
 *     -> list[tuple[bytes, bytes, bytes]]
 * (topic, meta, reading) per publishable reading, meta = prefix + packed seq; readings
 * without a device id are left out (their seq is skipped, as the Python loop does). */
static PyObject *live_frames(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *prefix_obj, *first_obj, *readings_obj;
    items_t readings;
    if (!PyArg_ParseTuple(args, "SOO", &prefix_obj, &first_obj, &readings_obj) ||
        items_open(readings_obj, &readings) < 0)
        return NULL;
    uint64_t seq;
    if (read_first(first_obj, &seq) < 0)
        return NULL;
    const char *prefix = PyBytes_AS_STRING(prefix_obj);
    Py_ssize_t prefix_len = PyBytes_GET_SIZE(prefix_obj);
    Py_ssize_t n = readings.n;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++, seq++) {
        Py_ssize_t len;
        const unsigned char *bytes = item_at(&readings, i, &len);
        if (bytes == NULL)
            goto fail;
        PyObject *topic = topic_of(bytes, len);
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
        PyObject *reading;
        if (readings.list != NULL) {
            reading = PyList_GET_ITEM(readings.list, i);
            Py_INCREF(reading);
        } else {
            reading = PyBytes_FromStringAndSize((const char *)bytes, len);
        }
        PyObject *triple = reading ? PyTuple_New(3) : NULL;
        if (triple == NULL) {
            Py_DECREF(topic);
            Py_DECREF(meta);
            Py_XDECREF(reading);
            goto fail;
        }
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

static PyObject *record_readings(PyObject *self, PyObject *arg) {
    (void)self;
    if (Py_TYPE(arg) != run_type) {
        PyErr_Format(PyExc_TypeError, "record_readings() takes a PayloadRun, got %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    const PayloadRun *records = (const PayloadRun *)arg;
    const unsigned char *base = payload_run_base(records);
    uint32_t *spans = PyMem_Malloc(records->n ? 2 * (size_t)records->n * sizeof(uint32_t) : 1);
    if (spans == NULL)
        return PyErr_NoMemory();
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < records->n; i++) {
        reader r = {base + records->spans[2 * i], base + records->spans[2 * i + 1]};
        uint64_t node_len, seq, len;
        if (r.p >= r.end || *r.p++ != 0x93 || read_raw(&r, 0, &node_len) < 0 ||
            (r.p += node_len, read_uint(&r, &seq) < 0) || read_raw(&r, 1, &len) < 0 ||
            r.p + len != r.end) {
            PyMem_Free(spans);
            PyErr_Format(PyExc_ValueError, "payload %zd is not a log record", i);
            return NULL;
        }
        spans[2 * i] = (uint32_t)(r.p - base);
        spans[2 * i + 1] = (uint32_t)(r.end - base);
        total += (Py_ssize_t)len;
    }
    return new_run(records->owner, spans, records->n, total);
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
    /* The readings stay where they are: a run of spans over the body. A body that turns
     * out not to be n bins and nothing else falls back. */
    if (PyBytes_GET_SIZE(args[1]) > (Py_ssize_t)0xFFFFFFFFu) {
        Py_DECREF(node_obj);
        Py_RETURN_NONE;
    }
    const unsigned char *body = (const unsigned char *)PyBytes_AS_STRING(args[1]);
    uint32_t *spans = PyMem_Malloc(2 * (size_t)count * sizeof(uint32_t));
    if (spans == NULL) {
        Py_DECREF(node_obj);
        return PyErr_NoMemory();
    }
    Py_ssize_t total = 0;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t len;
        if (read_raw(&b, 1, &len) < 0) {
            PyMem_Free(spans);
            Py_DECREF(node_obj);
            Py_RETURN_NONE;
        }
        spans[2 * i] = (uint32_t)(b.p - body);
        b.p += len;
        spans[2 * i + 1] = (uint32_t)(b.p - body);
        total += (Py_ssize_t)len;
    }
    if (b.p != b.end) {
        PyMem_Free(spans);
        Py_DECREF(node_obj);
        Py_RETURN_NONE;
    }
    PyObject *readings = new_run(args[1], spans, (Py_ssize_t)count, total);
    if (readings == NULL) {
        Py_DECREF(node_obj);
        return NULL;
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
    {"live_frames", live_frames, METH_VARARGS,
     "live_frames(prefix, first, readings) -> list of (topic, meta, reading)"},
    {"log_run", log_run, METH_O,
     "log_run(parts) -> PayloadRun of the log records of (node, first, readings) parts"},
    {"record_readings", record_readings, METH_O,
     "record_readings(records) -> PayloadRun of the reading in each log record, no copy"},
    {"pack_bins", pack_bins, METH_O,
     "pack_bins(items) -> msgpack array of bins, as msgpack.packb(list(items), "
     "use_bin_type=True)"},
    {"pack_runs", pack_runs, METH_O,
     "pack_runs(parts) -> pack_bins of the items of every part, in order"},
    {"total_bytes", total_bytes, METH_O, "total_bytes(items) -> sum of len(item)"},
    {"count_within", (PyCFunction)(void (*)(void))count_within, METH_FASTCALL,
     "count_within(items, max_bytes) -> how many leading items fit in max_bytes"},
    {"decode_batch_v2", (PyCFunction)(void (*)(void))decode_batch_v2, METH_FASTCALL,
     "decode_batch_v2(header, body) -> (node, first, readings as a PayloadRun over body), "
     "or None: use Python's"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "iotpipe.middle._hot",
    "The middle's per-record encoding in C (see _hot.c).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__hot(void) {
    PyObject *framing = PyImport_ImportModule("iotpipe.queue._framing");
    if (framing == NULL)
        return NULL; /* ImportError: hot.py falls back to Python */
    PyObject *type = PyObject_GetAttrString(framing, "PayloadRun");
    Py_DECREF(framing);
    if (type == NULL)
        return NULL;
    if (!PyType_Check(type) ||
        ((PyTypeObject *)type)->tp_basicsize != (Py_ssize_t)sizeof(PayloadRun)) {
        Py_DECREF(type);
        PyErr_SetString(PyExc_ImportError, "iotpipe.queue._framing.PayloadRun does not match "
                                           "payload_run.h: rebuild both modules");
        return NULL;
    }
    run_type = (PyTypeObject *)type; /* held for the life of the process */
    return PyModule_Create(&module);
}
