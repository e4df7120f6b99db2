/* PayloadRun: a run of payloads held in one bytes object, each a span of it.
 *
 * The type lives in iotpipe.queue._framing (the queue frames a run without a Python object
 * per payload); iotpipe.middle._hot builds runs (a batch's readings as spans of its body,
 * a group's log records in one buffer) and reads them. Both include this layout; _hot
 * takes the type object from _framing at import and checks it matches by size.
 *
 * From Python a run is a read-only sequence of bytes: len, indexing (a new bytes), slicing
 * (a run sharing the buffer) and iteration.
 */
#ifndef IOTPIPE_PAYLOAD_RUN_H
#define IOTPIPE_PAYLOAD_RUN_H

#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject_HEAD
    PyObject *owner;       /* the bytes object the spans point into */
    PyObject *spans_owner; /* the run whose spans array this one shares, or NULL: owned */
    uint32_t *spans;       /* 2 * n offsets into owner: start, end of each payload */
    Py_ssize_t n;
    Py_ssize_t nbytes;     /* the sum of the payloads' lengths */
} PayloadRun;

static inline const unsigned char *payload_run_base(const PayloadRun *run) {
    return (const unsigned char *)PyBytes_AS_STRING(run->owner);
}

#endif
