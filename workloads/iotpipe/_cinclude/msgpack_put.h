/* msgpack headers as msgpack-python's Packer writes them: the shortest form for each str,
 * bin and non-negative int. Shared by the C accelerators (iotpipe.middle._hot,
 * iotpipe.ingest.core._frames); header-only, each includes it once.
 */
#ifndef IOTPIPE_MSGPACK_PUT_H
#define IOTPIPE_MSGPACK_PUT_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Header of a non-negative int; returns its length (at most 9). */
static Py_ssize_t put_uint(unsigned char *out, uint64_t v) {
    if (v < 128) {
        out[0] = (unsigned char)v;
        return 1;
    }
    if (v < 256) {
        out[0] = 0xcc;
        out[1] = (unsigned char)v;
        return 2;
    }
    if (v < 65536) {
        out[0] = 0xcd;
        out[1] = (unsigned char)(v >> 8);
        out[2] = (unsigned char)v;
        return 3;
    }
    if (v < 4294967296ULL) {
        out[0] = 0xce;
        for (int i = 0; i < 4; i++)
            out[1 + i] = (unsigned char)(v >> (24 - 8 * i));
        return 5;
    }
    out[0] = 0xcf;
    for (int i = 0; i < 8; i++)
        out[1 + i] = (unsigned char)(v >> (56 - 8 * i));
    return 9;
}

/* Header of a str (is_bin 0) or bin (is_bin 1) of n bytes; returns its length. */
static Py_ssize_t put_raw_header(unsigned char *out, size_t n, int is_bin) {
    if (!is_bin && n < 32) {
        out[0] = (unsigned char)(0xa0 | n);
        return 1;
    }
    if (n < 256) {
        out[0] = is_bin ? 0xc4 : 0xd9;
        out[1] = (unsigned char)n;
        return 2;
    }
    if (n < 65536) {
        out[0] = is_bin ? 0xc5 : 0xda;
        out[1] = (unsigned char)(n >> 8);
        out[2] = (unsigned char)n;
        return 3;
    }
    out[0] = is_bin ? 0xc6 : 0xdb;
    for (int i = 0; i < 4; i++)
        out[1 + i] = (unsigned char)(n >> (24 - 8 * i));
    return 5;
}

/* Copy n bytes to out; returns the position after them (for building a message in order). */
static inline unsigned char *put_bytes(unsigned char *out, const void *src, Py_ssize_t n) {
    memcpy(out, src, (size_t)n);
    return out + n;
}

#endif
