/* The common device frame judged in C: one call per frame instead of a Python loop over
 * its messages and their fields.
 *
 * accept_frame(doc, device_id, received_ns, max_batch, max_id_len, max_data_keys,
 *              max_key_len, max_str_len, dumps) -> (ids, readings) | None
 *
 * ``doc`` is a decoded JSON frame: one message or a list of them. When every message is
 * valid in the common forms (an "id" that is a string or an integer, no "ts" or a numeric
 * one, "device" absent or the authenticated device, "data" a map of scalars), this
 * returns the ids as the device sent them and the encoded readings, byte for byte what
 * frames.parse_frame's Python path gives (wire.encode_reading: msgpack [device, id, ts_ns,
 * data_json, received_ns]). For anything else, valid or not (an RFC 3339 "ts", any
 * refusal), it returns None and parse_frame judges the whole frame in Python, so every
 * refusal is named in one place. The tests compare both paths on generated frames.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "msgpack_put.h"

/* The accepted 'ts' range (frames.py: _TS_MIN_NS, _TS_MAX_NS), in seconds and in ns. */
#define TS_MIN_S 946684800LL
#define TS_MAX_S 4102444800LL
#define NS 1000000000LL

static PyObject *str_id, *str_ts, *str_data, *str_device;

/* frames.parse_ts for an int or a float; 0 with *ns set, 1 when Python must judge it. */
static int numeric_ts(PyObject *ts, long long *ns) {
    if (PyLong_CheckExact(ts)) {
        int overflow = 0;
        long long s = PyLong_AsLongLongAndOverflow(ts, &overflow);
        if (overflow || (s == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 1;
        }
        if (s < TS_MIN_S || s >= TS_MAX_S)
            return 1;
        *ns = s * NS;
        return 0;
    }
    if (PyFloat_CheckExact(ts)) {
        double v = PyFloat_AS_DOUBLE(ts);
        if (!isfinite(v))
            return 1;
        double whole = floor(v);
        if (whole < (double)(TS_MIN_S - 1) || whole > (double)TS_MAX_S)
            return 1;
        /* Python's round() on a float: ties to even, as nearbyint in the default mode. */
        double micros = nearbyint((v - whole) * 1e6);
        long long total = (long long)whole * NS + (long long)micros * 1000LL;
        if (total < TS_MIN_S * NS || total >= TS_MAX_S * NS)
            return 1;
        *ns = total;
        return 0;
    }
    return 1;
}

/* frames._check_data, accepting only: 1 when Python must judge it. */
static int data_is_plain(PyObject *data, Py_ssize_t max_keys, Py_ssize_t max_key_len,
                         Py_ssize_t max_str_len) {
    if (!PyDict_CheckExact(data))
        return 1;
    Py_ssize_t n = PyDict_GET_SIZE(data);
    if (n == 0 || n > max_keys)
        return 1;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(data, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key))
            return 1;
        Py_ssize_t key_len = PyUnicode_GET_LENGTH(key);
        if (key_len == 0 || key_len > max_key_len)
            return 1;
        if (PyUnicode_CheckExact(value)) {
            if (PyUnicode_GET_LENGTH(value) > max_str_len)
                return 1;
        } else if (!(PyLong_CheckExact(value) || PyFloat_CheckExact(value) ||
                     PyBool_Check(value) || value == Py_None)) {
            return 1;
        }
    }
    return 0;
}

/* A str's UTF-8; -1 (no exception) when it cannot be encoded or is too long for msgpack. */
static int utf8_of(PyObject *s, const char **bytes, Py_ssize_t *len) {
    *bytes = PyUnicode_AsUTF8AndSize(s, len);
    if (*bytes == NULL) {
        PyErr_Clear();  /* e.g. a lone surrogate: Python names the problem */
        return -1;
    }
    return (uint64_t)*len > 0xFFFFFFFFu ? -1 : 0;
}

typedef struct {
    PyObject *device_id, *dumps;
    long long received_ns;
    Py_ssize_t max_id_len, max_data_keys, max_key_len, max_str_len;
} Judge;

/* 1: accepted (*id_out: borrowed, *reading_out: new reference); 0: Python must judge the
 * message; -1: an exception. */
static int accept_one(const Judge *j, PyObject *msg, PyObject **id_out,
                      PyObject **reading_out) {
    PyObject *device_id = j->device_id, *dumps = j->dumps;
    long long received_ns = j->received_ns;
    Py_ssize_t max_id_len = j->max_id_len, max_data_keys = j->max_data_keys;
    Py_ssize_t max_key_len = j->max_key_len, max_str_len = j->max_str_len;
    if (!PyDict_CheckExact(msg))
        return 0;

    /* "id": a str of 1..max_id_len characters or an int in 0..2^63-1 (never a bool). */
    PyObject *msg_id = PyDict_GetItemWithError(msg, str_id);
    if (msg_id == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *id_text;  /* new reference: the id as the reading carries it */
    if (PyUnicode_CheckExact(msg_id)) {
        Py_ssize_t len = PyUnicode_GET_LENGTH(msg_id);
        if (len == 0 || len > max_id_len)
            return 0;
        Py_INCREF(msg_id);
        id_text = msg_id;
    } else if (PyLong_CheckExact(msg_id)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(msg_id, &overflow);
        if (overflow || v < 0) {
            PyErr_Clear();
            return 0;
        }
        id_text = PyObject_Str(msg_id);
        if (id_text == NULL)
            return -1;
    } else {
        return 0;
    }

    int result = -1;
    PyObject *data_json = NULL;
    /* "device": absent (the authenticated device owns it) or that device; without an
     * authenticated device, a non-empty str names the owner. */
    PyObject *owner = device_id;
    PyObject *claimed = PyDict_GetItemWithError(msg, str_device);
    if (claimed == NULL && PyErr_Occurred())
        goto done;
    if (claimed == Py_None)
        claimed = NULL;
    if (device_id == Py_None) {
        if (claimed == NULL || !PyUnicode_CheckExact(claimed) ||
            PyUnicode_GET_LENGTH(claimed) == 0)
            goto fallback;
        owner = claimed;
    } else if (!PyUnicode_CheckExact(device_id)) {
        goto fallback;
    } else if (claimed != NULL) {
        int same = PyObject_RichCompareBool(claimed, device_id, Py_EQ);
        if (same < 0)
            goto done;
        if (!same)
            goto fallback;
    }

    long long ts_ns = received_ns;
    PyObject *ts = PyDict_GetItemWithError(msg, str_ts);
    if (ts == NULL && PyErr_Occurred())
        goto done;
    if (ts != NULL && ts != Py_None && numeric_ts(ts, &ts_ns))
        goto fallback;

    PyObject *data = PyDict_GetItemWithError(msg, str_data);
    if (data == NULL && PyErr_Occurred())
        goto done;
    if (data == NULL || data_is_plain(data, max_data_keys, max_key_len, max_str_len))
        goto fallback;
    data_json = PyObject_CallOneArg(dumps, data);
    if (data_json == NULL)
        goto done;
    if (!PyBytes_CheckExact(data_json) || (uint64_t)PyBytes_GET_SIZE(data_json) > 0xFFFFFFFFu)
        goto fallback;

    const char *owner_b, *id_b;
    Py_ssize_t owner_len, id_len;
    if (utf8_of(owner, &owner_b, &owner_len) < 0 || utf8_of(id_text, &id_b, &id_len) < 0)
        goto fallback;
    Py_ssize_t json_len = PyBytes_GET_SIZE(data_json);
    unsigned char owner_h[5], id_h[5], ts_h[9], json_h[5], recv_h[9];
    Py_ssize_t owner_hl = put_raw_header(owner_h, (size_t)owner_len, 0);
    Py_ssize_t id_hl = put_raw_header(id_h, (size_t)id_len, 0);
    Py_ssize_t ts_hl = put_uint(ts_h, (uint64_t)ts_ns);
    Py_ssize_t json_hl = put_raw_header(json_h, (size_t)json_len, 1);
    Py_ssize_t recv_hl = put_uint(recv_h, (uint64_t)received_ns);
    PyObject *reading = PyBytes_FromStringAndSize(
        NULL, 1 + owner_hl + owner_len + id_hl + id_len + ts_hl + json_hl + json_len + recv_hl);
    if (reading == NULL)
        goto done;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(reading);
    *p++ = 0x95;  /* an array of 5 */
    p = put_bytes(p, owner_h, owner_hl);
    p = put_bytes(p, owner_b, owner_len);
    p = put_bytes(p, id_h, id_hl);
    p = put_bytes(p, id_b, id_len);
    p = put_bytes(p, ts_h, ts_hl);
    p = put_bytes(p, json_h, json_hl);
    p = put_bytes(p, PyBytes_AS_STRING(data_json), json_len);
    put_bytes(p, recv_h, recv_hl);
    *id_out = msg_id;
    *reading_out = reading;
    result = 1;
    goto done;

fallback:
    result = 0;
done:
    Py_XDECREF(data_json);
    Py_DECREF(id_text);
    return result;
}

/* accept_frame(doc, device_id, received_ns, max_batch, max_id_len, max_data_keys,
 *              max_key_len, max_str_len, dumps) -> (ids, readings) | None */
static PyObject *accept_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "accept_frame takes 9 arguments");
        return NULL;
    }
    Judge j;
    PyObject *doc = args[0];
    j.device_id = args[1];
    j.received_ns = PyLong_AsLongLong(args[2]);
    Py_ssize_t max_batch = PyLong_AsSsize_t(args[3]);
    j.max_id_len = PyLong_AsSsize_t(args[4]);
    j.max_data_keys = PyLong_AsSsize_t(args[5]);
    j.max_key_len = PyLong_AsSsize_t(args[6]);
    j.max_str_len = PyLong_AsSsize_t(args[7]);
    j.dumps = args[8];
    if (PyErr_Occurred())
        return NULL;
    if (j.received_ns < 0)
        Py_RETURN_NONE;
    PyObject *const *messages = &doc;
    Py_ssize_t count = 1;
    if (PyList_CheckExact(doc)) {
        count = PyList_GET_SIZE(doc);
        if (count == 0 || count > max_batch)
            Py_RETURN_NONE;
        messages = ((PyListObject *)doc)->ob_item;
    }
    PyObject *ids = PyList_New(count), *readings = PyList_New(count);
    if (ids == NULL || readings == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        /* The list cannot change here: accept_one runs no Python code but orjson.dumps. */
        PyObject *msg_id = NULL, *reading = NULL;
        int ok = accept_one(&j, messages[i], &msg_id, &reading);
        if (ok < 0)
            goto fail;
        if (ok == 0) {
            Py_DECREF(ids);
            Py_DECREF(readings);
            Py_RETURN_NONE;
        }
        Py_INCREF(msg_id);
        PyList_SET_ITEM(ids, i, msg_id);
        PyList_SET_ITEM(readings, i, reading);
    }
    PyObject *result = PyTuple_Pack(2, ids, readings);
    Py_DECREF(ids);
    Py_DECREF(readings);
    return result;
fail:
    Py_XDECREF(ids);
    Py_XDECREF(readings);
    return NULL;
}

static PyMethodDef methods[] = {
    {"accept_frame", (PyCFunction)(void (*)(void))accept_frame, METH_FASTCALL,
     "(ids, readings) when every message of the decoded frame is valid in the common "
     "forms, else None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_frames",
    "The common device message judged in C (see frames.parse_frame).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__frames(void) {
    str_id = PyUnicode_InternFromString("id");
    str_ts = PyUnicode_InternFromString("ts");
    str_data = PyUnicode_InternFromString("data");
    str_device = PyUnicode_InternFromString("device");
    if (str_id == NULL || str_ts == NULL || str_data == NULL || str_device == NULL)
        return NULL;
    return PyModule_Create(&module);
}
