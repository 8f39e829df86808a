/* A msgpack array of integers decoded to a list of ints, the result msgspec gives for
 * ``list[int]`` and ``Any``, without msgspec's per-item work (about 2.5x fewer cycles for a list
 * of 2,048 token ids, where creating the ints is most of what is left).
 *
 * ``int_list_decoder(fallback)`` returns a callable ``decode(buffer)``: it parses the buffer
 * when it is exactly one msgpack array whose items are all integers, and otherwise calls
 * ``fallback(buffer)`` (msgspec's decoder of the same schema), which decodes it or raises its
 * own error. Nothing is judged here: a short buffer, trailing bytes, a float or a nested item
 * all go to the fallback, so errors and every other result are msgspec's own.
 *
 * msgpack integers: positive fixint 0x00-0x7f, negative fixint 0xe0-0xff, uint 8/16/32/64
 * (0xcc-0xcf) and int 8/16/32/64 (0xd0-0xd3), big endian; arrays: fixarray 0x90-0x9f, array
 * 16 (0xdc) and array 32 (0xdd) with a big-endian count.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static uint64_t big_endian(const unsigned char *p, int width) {
    uint64_t v = 0;
    for (int i = 0; i < width; i++) v = (v << 8) | p[i];
    return v;
}

/* Width of the integer that follows a type byte, or -1: not an integer type. */
static int int_width(unsigned char b) {
    switch (b) {
    case 0xcc: case 0xd0: return 1;
    case 0xcd: case 0xd1: return 2;
    case 0xce: case 0xd2: return 4;
    case 0xcf: case 0xd3: return 8;
    default: return -1;
    }
}

/* One integer item at ``*at`` (advanced past it): a new reference; NULL and no exception: not an
 * integer or cut short; NULL with one: out of memory. */
static PyObject *read_int(const unsigned char **at, const unsigned char *end) {
    unsigned char b = *(*at)++;
    if (b <= 0x7f) return PyLong_FromLong(b);
    if (b >= 0xe0) return PyLong_FromLong((long)(signed char)b);
    int width = int_width(b);
    if (width < 0 || end - *at < width) return NULL;
    uint64_t v = big_endian(*at, width);
    *at += width;
    if (b <= 0xcf) return PyLong_FromUnsignedLongLong(v);
    /* signed: sign-extend from the item's own width */
    int shift = 64 - 8 * width;
    return PyLong_FromLongLong((long long)(int64_t)(v << shift) >> shift);
}

/* The list, or NULL and no exception where the buffer is not one array of integers. */
static PyObject *parse(const unsigned char *p, Py_ssize_t len) {
    const unsigned char *end = p + len;
    if (len < 1) return NULL;
    unsigned char b = *p++;
    uint64_t count;
    if (b >= 0x90 && b <= 0x9f) count = b & 0x0f;
    else if ((b == 0xdc || b == 0xdd) && end - p >= (b == 0xdc ? 2 : 4)) {
        int width = b == 0xdc ? 2 : 4;
        count = big_endian(p, width);
        p += width;
    } else return NULL;
    /* every item takes at least one byte; compared unsigned, before any cast can wrap */
    if (count > (uint64_t)(end - p)) return NULL;
    Py_ssize_t n = (Py_ssize_t)count;
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p >= end) goto not_mine;
        PyObject *item = read_int(&p, end);
        if (item == NULL) goto not_mine;
        PyList_SET_ITEM(list, i, item);
    }
    if (p == end) return list;
not_mine:
    Py_DECREF(list); /* items not yet set are NULL, which list's dealloc skips */
    return NULL;
}

static PyObject *decode(PyObject *fallback, PyObject *buffer) {
    Py_buffer view;
    if (PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* not a buffer: the fallback says what it expected */
        return PyObject_CallOneArg(fallback, buffer);
    }
    PyObject *list = parse((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    if (list != NULL || PyErr_Occurred()) return list;
    return PyObject_CallOneArg(fallback, buffer);
}

static PyMethodDef decode_def = {"decode_int_list", decode, METH_O,
                                 "Decode a msgpack array of integers, else call the fallback."};

static PyObject *int_list_decoder(PyObject *module, PyObject *fallback) {
    (void)module;
    if (!PyCallable_Check(fallback)) {
        PyErr_Format(PyExc_TypeError, "expected a callable fallback, got %R", fallback);
        return NULL;
    }
    return PyCFunction_New(&decode_def, fallback);
}

static PyMethodDef methods[] = {
    {"int_list_decoder", int_list_decoder, METH_O,
     "A decoder of msgpack arrays of integers that hands anything else to ``fallback``."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_ints", NULL, 0, methods,
                                        NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__ints(void) { return PyModule_Create(&module_def); }
