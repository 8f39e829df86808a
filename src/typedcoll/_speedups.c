/* The steady state of typed collectives, in C: allgather (and the flush), and through
 * ``collective`` gather, bcast, barrier and allreduce of Python numbers.
 *
 * Exactly the protocol of Protocol.allgather / Protocol.phase1 in _protocol.py (read its
 * docstring and _wire.py's header layout): encode, write the 56-byte header and the inline
 * payload into the slot, record the flight-recorder entry, one allgather of the slots, compare
 * every header's first 48 bytes with ours, decode the payloads this rank needs (every rank's for
 * allgather, the root's for bcast, every rank's on the gather root, none for a barrier). The
 * interpreter executes ~340 bytecodes for an allgather in Python (~25k instructions at 2 ranks,
 * measured with callgrind), the general path several times that; here it is a few thousand,
 * which is what keeps a checked allgather within 1.5x of a raw one.
 *
 * It handles only the common case and never raises for protocol reasons:
 *   - returns TAKE_PY before touching any state when the call is unusual (no cached schema, an
 *     array schema, a timeout, an overflowing or unencodable payload, a pending slot resize);
 *   - returns a (code, lasti, seq) tuple after the exchange when the headers disagree, a flag is
 *     set, a length is corrupt or a payload does not decode: Python then finishes the collective
 *     on the general path from the received slots, which produces the exact error every rank
 *     agrees on;
 *   - otherwise returns the list of decoded values (allgather), or a 1-item list holding the
 *     result (the other kinds: a bcast may deliver any object, a tuple included).
 * Errors of the backend itself (an MPI exception) propagate unchanged.
 *
 * Over MPI the exchange itself may skip mpi4py's Python binding: ``direct(...)`` (below) wraps
 * MPI_Allgather as the MPI library mpi4py loaded exports it, and the call here hands it the two
 * byte arrays and the communicator's handle, read at every call from the mpi4py object (a freed
 * communicator, MPI_COMM_NULL, goes through mpi4py's binding instead, which reports it as it
 * always does: Open MPI itself crashes on a null communicator). That binding's argument parsing
 * was ~0.9 us of a ~3.4 us allgather at 2 ranks. The call is MPI_Allgather with int counts (a
 * slot is at most 4 KiB) where mpi4py 4 calls the large-count MPI_Allgather_c where the library
 * has it; the buffers are exported and the GIL released around it, as mpi4py does. PMPI tools
 * see it when loaded into the global symbol scope (LD_PRELOAD); TYPEDCOLL_DIRECT_MPI=0 routes
 * the exchange through mpi4py for tools that interpose only there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define HAVE_DIRECT 1
#endif

#define HEADER_SIZE 56
#define CHECKED 48
#define FLAGS_OFFSET 48
#define LENGTH_OFFSET 52
#define FLAG_NONE_VALUE 1
#define FLAG_LOCAL_ERROR 2
#define FLAG_NO_PAYLOAD 8
#define MAGIC 0xC1
#define NO_ROOT (-1)

static PyObject *SCHEMAS, *SCHEMAS_BY_ID, *OPS, *ENCODE, *INTERNAL, *SITE_FP, *TAKE_PY;
static PyObject *EMPTY_INFO, *EMPTY_FINGERPRINT; /* the schema of collectives without payload */
static PyObject *s_seq, *s_policy, *s_size, *s_observe, *s_fast;
/* (address of code, lasti) -> (code, site fingerprint): hashing a code object walks its bytecode
 * (~0.8 us per flush for _callsite.site_fingerprint's own cache), its address does not; holding
 * the code object keeps the address from being reused. */
static PyObject *SITE_CACHE;

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

/* An attribute read as a C integer; -1 with an exception set on failure. */
static Py_ssize_t attr_ssize(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    Py_ssize_t out = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    return out;
}

static PyObject *take_py(void) {
    Py_INCREF(TAKE_PY);
    return TAKE_PY;
}

/* After a failure the general path will report to every rank (an unencodable value, say):
 * TAKE_PY with the error dropped, but KeyboardInterrupt and other non-Exception errors (user
 * code runs in a Struct's __post_init__) propagate, as the general path's ``except Exception``
 * lets them. */
static PyObject *take_py_after_error(void) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
    PyErr_Clear();
    return take_py();
}

/* configure(schemas, schemas_by_id, ops, encode, internal_files, site_fingerprint, take_py,
 *           empty_info, empty_fingerprint) */
static PyObject *configure(PyObject *mod, PyObject *args) {
    PyObject *schemas, *by_id, *ops, *encode, *internal, *site_fp, *take, *empty, *empty_fp;
    if (!PyArg_ParseTuple(args, "O!O!O!OO!OOOO!", &PyDict_Type, &schemas, &PyDict_Type, &by_id,
                          &PyDict_Type, &ops, &encode, &PySet_Type, &internal, &site_fp, &take,
                          &empty, &PyBytes_Type, &empty_fp))
        return NULL;
    Py_XSETREF(EMPTY_INFO, Py_NewRef(empty));
    Py_XSETREF(EMPTY_FINGERPRINT, Py_NewRef(empty_fp));
    Py_XSETREF(SCHEMAS, Py_NewRef(schemas));
    Py_XSETREF(SCHEMAS_BY_ID, Py_NewRef(by_id));
    Py_XSETREF(OPS, Py_NewRef(ops));
    Py_XSETREF(ENCODE, Py_NewRef(encode));
    Py_XSETREF(INTERNAL, Py_NewRef(internal));
    Py_XSETREF(SITE_FP, Py_NewRef(site_fp));
    Py_XSETREF(TAKE_PY, Py_NewRef(take));
    Py_RETURN_NONE;
}

/* The user's frame: the first one whose file is not registered as typedcoll plumbing.
 * Returns new references to its code object, and its lasti. */
static int user_site(PyCodeObject **code_out, int *lasti_out) {
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed */
    Py_XINCREF(frame);
    while (frame != NULL) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        int internal = PySet_Contains(INTERNAL, code->co_filename);
        if (internal < 0) {
            Py_DECREF(code);
            Py_DECREF(frame);
            return -1;
        }
        if (!internal) {
            *code_out = code;
            *lasti_out = PyFrame_GetLasti(frame);
            Py_DECREF(frame);
            return 0;
        }
        Py_DECREF(code);
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
    }
    *code_out = NULL;
    *lasti_out = 0;
    return 0;
}

/* The flight-recorder entry, as FlightRecorder.start writes it (_recorder.ENTRY): the numbers in
 * place in a preallocated byte array, the schema info and code object into a preallocated list.
 * No allocation beyond the count's int. */
#define ENTRY_SIZE 40
static int record(PyObject *numbers, PyObject *objects, PyObject *state, Py_ssize_t capacity,
                  long long seq, long opcode, PyObject *info, PyCodeObject *code, int lasti,
                  long long step, Py_ssize_t n) {
    if (numbers == Py_None) return 0;
    Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(state, 0));
    if (count < 0 && PyErr_Occurred()) return -1;
    Py_ssize_t index = count % capacity;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    unsigned char *e = (unsigned char *)PyByteArray_AS_STRING(numbers) + index * ENTRY_SIZE;
    put_u64(e, (uint64_t)seq);
    put_u64(e + 8, (uint64_t)step);
    put_u64(e + 16, (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec);
    put_u32(e + 24, (uint32_t)n);
    put_u32(e + 28, (uint32_t)lasti);
    e[32] = (unsigned char)opcode;
    memset(e + 33, 0, 7);
    if (PyList_SetItem(objects, 2 * index, Py_NewRef(info)) < 0 ||
        PyList_SetItem(objects, 2 * index + 1,
                       Py_NewRef(code ? (PyObject *)code : Py_None)) < 0)
        return -1;
    PyObject *next = PyLong_FromSsize_t(count + 1);
    if (next == NULL || PyList_SetItem(state, 0, next) < 0) return -1;
    return PyList_SetItem(state, 1, Py_NewRef(Py_True));
}

/* --- the direct MPI_Allgather --- */
#ifdef HAVE_DIRECT
/* MPI handles are ints (MPICH's ABI) or pointers (Open MPI's, the MPI-5 standard ABI): the two
 * prototypes, chosen by the handle size mpi4py reports (MPI._sizeof). */
typedef int (*allgather_int_handles)(const void *, int, int32_t, void *, int, int32_t, int32_t);
typedef int (*allgather_ptr_handles)(const void *, int, void *, void *, int, void *, void *);

typedef struct {
    void *fn;
    const void *comm_handle; /* where the mpi4py Comm object keeps its handle (MPI._addressof) */
    intptr_t byte_type;      /* MPI_BYTE */
    intptr_t null_comm;      /* MPI_COMM_NULL: left to mpi4py (Open MPI crashes on it) */
    Py_ssize_t size;         /* ranks: the receive buffer holds one slot per rank */
    int handle_size;
    PyObject *comm;          /* keeps comm_handle valid */
    PyObject *error_type;    /* MPI.Exception, raised with the error code */
} Direct;

static void direct_free(PyObject *capsule) {
    Direct *d = (Direct *)PyCapsule_GetPointer(capsule, "typedcoll.direct");
    if (d == NULL) return;
    Py_XDECREF(d->comm);
    Py_XDECREF(d->error_type);
    PyMem_Free(d);
}

/* A handle value as mpi4py reports it (unsigned 64-bit), narrowed to the handle's own width. */
static intptr_t narrow(unsigned long long value, int handle_size) {
    if (handle_size == 4) return (intptr_t)(int32_t)(uint32_t)value;
    return (intptr_t)value;
}

/* direct(library_path, comm, comm_handle_address, byte_handle, null_comm_handle, handle_size,
 *        comm_size, error_type) -> capsule, or None when MPI_Allgather cannot be found. */
static PyObject *direct(PyObject *mod, PyObject *args) {
    const char *path;
    PyObject *comm, *error_type;
    unsigned long long handle_addr, byte_type, null_comm;
    int handle_size;
    Py_ssize_t comm_size;
    if (!PyArg_ParseTuple(args, "sOKKKinO", &path, &comm, &handle_addr, &byte_type, &null_comm,
                          &handle_size, &comm_size, &error_type))
        return NULL;
    if ((handle_size != 4 && handle_size != (int)sizeof(void *)) || comm_size < 1)
        Py_RETURN_NONE;
    /* The symbol the dynamic linker gave mpi4py's module: the global scope first (LD_PRELOAD,
     * a PMPI profiler loaded RTLD_GLOBAL), then the module's own dependencies, where libmpi
     * lives (RTLD_NOLOAD: only the library mpi4py already loaded). */
    void *fn = dlsym(RTLD_DEFAULT, "MPI_Allgather");
    if (fn == NULL) {
        void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
        if (lib == NULL) Py_RETURN_NONE;
        fn = dlsym(lib, "MPI_Allgather");
        dlclose(lib); /* still loaded: mpi4py holds it */
    }
    if (fn == NULL) Py_RETURN_NONE;
    Direct *d = PyMem_Malloc(sizeof(Direct));
    if (d == NULL) return PyErr_NoMemory();
    d->fn = fn;
    d->comm_handle = (const void *)(uintptr_t)handle_addr;
    d->byte_type = narrow(byte_type, handle_size);
    d->null_comm = narrow(null_comm, handle_size);
    d->handle_size = handle_size;
    d->size = comm_size;
    d->comm = Py_NewRef(comm);
    d->error_type = Py_NewRef(error_type);
    PyObject *capsule = PyCapsule_New(d, "typedcoll.direct", direct_free);
    if (capsule == NULL) {
        Py_DECREF(d->comm);
        Py_DECREF(d->error_type);
        PyMem_Free(d);
    }
    return capsule;
}

/* The communicator's handle now, widened: what it is compared with MPI_COMM_NULL as. */
static intptr_t direct_handle(const Direct *d) {
    if (d->handle_size == 4) return (intptr_t)*(const int32_t *)d->comm_handle;
    return (intptr_t)*(void *const *)d->comm_handle;
}

/* 0; -1 with an exception set (MPI's error raised as mpi4py raises it); 1 when the communicator
 * is MPI_COMM_NULL (freed), which the caller hands to mpi4py's own binding to report.
 * ``send`` must hold one slot and ``recv`` one per rank. Both buffers are exported for the
 * duration of the call, as mpi4py does, so no other thread can resize them while MPI runs
 * without the GIL. */
static int direct_allgather(PyObject *capsule, PyObject *send, PyObject *recv) {
    Direct *d = (Direct *)PyCapsule_GetPointer(capsule, "typedcoll.direct");
    if (d == NULL) return -1;
    if (direct_handle(d) == d->null_comm) return 1;
    Py_buffer sbuf, rbuf;
    if (PyObject_GetBuffer(send, &sbuf, PyBUF_SIMPLE) < 0) return -1;
    if (PyObject_GetBuffer(recv, &rbuf, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&sbuf);
        return -1;
    }
    int rc = 0;
    if (sbuf.len == 0 || sbuf.len > INT32_MAX || rbuf.len != sbuf.len * d->size) {
        PyErr_Format(PyExc_ValueError,
                     "typedcoll: expected a send slot of 1 to 2**31-1 bytes and a receive "
                     "buffer of %zd slots, got %zd and %zd bytes", d->size, sbuf.len, rbuf.len);
        rc = -1;
    } else {
        int count = (int)sbuf.len;
        if (d->handle_size == 4) {
            int32_t comm = *(const int32_t *)d->comm_handle, byte = (int32_t)d->byte_type;
            Py_BEGIN_ALLOW_THREADS
            rc = ((allgather_int_handles)d->fn)(sbuf.buf, count, byte, rbuf.buf, count, byte,
                                                comm);
            Py_END_ALLOW_THREADS
        } else {
            void *comm = *(void *const *)d->comm_handle, *byte = (void *)d->byte_type;
            Py_BEGIN_ALLOW_THREADS
            rc = ((allgather_ptr_handles)d->fn)(sbuf.buf, count, byte, rbuf.buf, count, byte,
                                                comm);
            Py_END_ALLOW_THREADS
        }
        if (rc != 0) {
            PyObject *code = PyLong_FromLong(rc);
            PyObject *exc = code ? PyObject_CallOneArg(d->error_type, code) : NULL;
            Py_XDECREF(code);
            if (exc != NULL) {
                PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
                Py_DECREF(exc);
            }
            rc = -1;
        }
    }
    PyBuffer_Release(&rbuf);
    PyBuffer_Release(&sbuf);
    return rc;
}

/* exchange(capsule, send, recv): the bare direct MPI_Allgather of two bytearrays, no envelope.
 * For benchmarks: the floor under typedcoll's own binding (bench/core_decompose.py). */
static PyObject *exchange(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyByteArray_Check(args[1]) || !PyByteArray_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "exchange expects (capsule, bytearray, bytearray)");
        return NULL;
    }
    int rc = direct_allgather(args[0], args[1], args[2]);
    if (rc < 0) return NULL;
    if (rc > 0) {
        PyErr_SetString(PyExc_ValueError, "exchange: the communicator is MPI_COMM_NULL");
        return NULL;
    }
    Py_RETURN_NONE;
}
#endif

/* The 8-byte fingerprint of a pinned call site (a new reference), as _callsite computes it. */
static PyObject *pinned_site(PyCodeObject *code, int lasti) {
    PyObject *code_obj = code ? (PyObject *)code : Py_None;
    PyObject *key = Py_BuildValue("(ni)", (Py_ssize_t)(uintptr_t)code, lasti);
    if (key == NULL) return NULL;
    PyObject *entry = PyDict_GetItemWithError(SITE_CACHE, key); /* borrowed */
    if (entry != NULL && PyTuple_GET_ITEM(entry, 0) == code_obj) {
        Py_DECREF(key);
        return Py_NewRef(PyTuple_GET_ITEM(entry, 1));
    }
    if (PyErr_Occurred()) {
        Py_DECREF(key);
        return NULL;
    }
    PyObject *site = PyObject_CallFunction(SITE_FP, "Oi", code_obj, lasti);
    if (site != NULL && (!PyBytes_Check(site) || PyBytes_GET_SIZE(site) != 8)) {
        Py_CLEAR(site);
        PyErr_SetString(PyExc_RuntimeError, "typedcoll: bad site fingerprint");
    }
    PyObject *value = site ? PyTuple_Pack(2, code_obj, site) : NULL;
    int failed = value == NULL || PyDict_SetItem(SITE_CACHE, key, value) < 0;
    Py_XDECREF(value);
    Py_DECREF(key);
    if (failed) Py_CLEAR(site);
    return site;
}

/* The schema cache's SchemaInfo for ``key`` (borrowed), or NULL: with an exception set on error,
 * without one when the schema is not resolved yet (or unhashable). */
static PyObject *lookup_info(PyObject *key) {
    /* By identity first: typing objects hash in Python code (see codecs._schema._BY_ID). */
    PyObject *id = PyLong_FromVoidPtr(key);
    if (id == NULL) return NULL;
    PyObject *entry = PyDict_GetItemWithError(SCHEMAS_BY_ID, id); /* borrowed */
    Py_DECREF(id);
    if (entry != NULL && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 2 &&
        PyTuple_GET_ITEM(entry, 0) == key)
        return PyTuple_GET_ITEM(entry, 1);
    if (PyErr_Occurred()) return NULL;
    PyObject *info = PyDict_GetItemWithError(SCHEMAS, key);
    if (info == NULL) PyErr_Clear();
    return info;
}

/* What a collective sends and decodes. Every kind is one exchange of the slots with the same
 * header layout; they differ in who contributes a payload and whose payloads are decoded. */
enum {
    KIND_ALL = 0,    /* allgather, flush, allreduce: every rank sends, every rank decodes all */
    KIND_GATHER = 1, /* every rank sends (checked against the schema first), the root decodes */
    KIND_BCAST = 2,  /* the root sends, every rank decodes the root's payload */
    KIND_EMPTY = 3,  /* nobody sends (barrier): the envelopes alone */
};

/* The steady state of one collective; see the module comment for what it returns. Results of
 * kinds other than KIND_ALL come wrapped in a 1-item list (a bcast may deliver any object). */
static PyObject *steady(PyObject *proto, PyObject *value, PyObject *info, PyObject *step_obj,
                        PyObject *op, int pin_site, long root, long reduce_op, int kind) {
    long long step = INT64_MIN;
    if (step_obj != Py_None) {
        if (!PyLong_CheckExact(step_obj)) return take_py();
        int overflow = 0;
        step = PyLong_AsLongLongAndOverflow(step_obj, &overflow);
        if (overflow || step == INT64_MIN) {
            PyErr_Clear();
            return take_py();
        }
    }
    PyObject *opcode_obj = PyDict_GetItemWithError(OPS, op);
    if (opcode_obj == NULL) return PyErr_Occurred() ? NULL : take_py();
    long opcode = PyLong_AsLong(opcode_obj);
    /* info.fast, held for the whole call: user code (a decoder's __post_init__, the transport)
     * runs before its fingerprint and decoder are last used. */
    PyObject *info_fast = NULL, *fp = EMPTY_FINGERPRINT, *decode = NULL;
    if (kind != KIND_EMPTY) {
        info_fast = PyObject_GetAttr(info, s_fast); /* (fingerprint, decode) or None */
        if (info_fast == NULL) return NULL;
        if (!PyTuple_Check(info_fast) || PyTuple_GET_SIZE(info_fast) != 2) {
            Py_DECREF(info_fast);
            return take_py();
        }
        fp = PyTuple_GET_ITEM(info_fast, 0);
        decode = PyTuple_GET_ITEM(info_fast, 1);
    }
    /* Protocol.fast is None whenever this path must not run (timeout, broken, slot resize). */
    PyObject *state = PyObject_GetAttr(proto, s_fast);
    if (state == NULL) {
        Py_XDECREF(info_fast);
        return NULL;
    }
    if (!PyList_Check(state) || PyList_GET_SIZE(state) != 12 || !PyBytes_Check(fp) ||
        PyBytes_GET_SIZE(fp) != 8) {
        Py_DECREF(state);
        Py_XDECREF(info_fast);
        return take_py();
    }
    PyObject *send = PyList_GET_ITEM(state, 0), *recv = PyList_GET_ITEM(state, 1),
             *exchange = PyList_GET_ITEM(state, 4), *ring = PyList_GET_ITEM(state, 5),
             *rec_state = PyList_GET_ITEM(state, 6), *ring_objects = PyList_GET_ITEM(state, 9),
             *direct_call = PyList_GET_ITEM(state, 10);
    Py_ssize_t slot = PyLong_AsSsize_t(PyList_GET_ITEM(state, 2));
    Py_ssize_t size = PyLong_AsSsize_t(PyList_GET_ITEM(state, 3));
    Py_ssize_t capacity = PyLong_AsSsize_t(PyList_GET_ITEM(state, 7));
    Py_ssize_t min_slot = PyLong_AsSsize_t(PyList_GET_ITEM(state, 8));
    Py_ssize_t rank = PyLong_AsSsize_t(PyList_GET_ITEM(state, 11));
    if (PyErr_Occurred() || !PyByteArray_Check(send) || PyByteArray_GET_SIZE(send) != slot ||
        !PyByteArray_Check(recv) || PyByteArray_GET_SIZE(recv) != slot * size ||
        rank < 0 || rank >= size ||
        (ring != Py_None &&
         (!PyByteArray_Check(ring) || PyByteArray_GET_SIZE(ring) != capacity * ENTRY_SIZE ||
          !PyList_Check(ring_objects) || PyList_GET_SIZE(ring_objects) != 2 * capacity ||
          !PyList_Check(rec_state) || capacity <= 0))) {
        Py_DECREF(state);
        Py_XDECREF(info_fast);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "typedcoll: inconsistent fast-path state");
        return NULL;
    }
    if ((kind == KIND_GATHER || kind == KIND_BCAST) && (root < 0 || root >= size)) {
        Py_DECREF(state);
        Py_XDECREF(info_fast);
        return take_py();
    }
    int sends = kind == KIND_ALL || kind == KIND_GATHER || (kind == KIND_BCAST && rank == root);
    PyObject *payload = NULL;
    Py_ssize_t n = 0;
    if (sends) {
        payload = PyObject_CallOneArg(ENCODE, value);
        if (payload == NULL) {
            /* the general path flags the failure to every rank */
            Py_DECREF(state);
            Py_XDECREF(info_fast);
            return take_py_after_error();
        }
        if (!PyBytes_Check(payload) || PyBytes_GET_SIZE(payload) > slot - HEADER_SIZE) {
            Py_DECREF(payload);
            Py_DECREF(state);
            Py_XDECREF(info_fast);
            return take_py();
        }
        n = PyBytes_GET_SIZE(payload);
        if (kind == KIND_GATHER) {
            /* Only the root decodes a gather payload: a value that does not match the schema
             * must fail on its own rank, which the general path does (and flags to all). */
            PyObject *dargs[2] = {NULL, payload};
            PyObject *checked = PyObject_Vectorcall(decode, dargs + 1,
                                                    1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            if (checked == NULL) {
                Py_DECREF(payload);
                Py_DECREF(state);
                Py_XDECREF(info_fast);
                return take_py_after_error();
            }
            Py_DECREF(checked);
        }
    }

    /* --- from here on the collective is issued: no more TAKE_PY --- */
    PyObject *result = NULL, *site = NULL, *seq_obj = NULL, *out = NULL;
    PyCodeObject *code = NULL;
    int lasti = 0;
    if (user_site(&code, &lasti) < 0) goto error;
    long long seq = 0;
    {
        PyObject *cur = PyObject_GetAttr(proto, s_seq);
        if (cur == NULL) goto error;
        seq = PyLong_AsLongLong(cur);
        Py_DECREF(cur);
        if (PyErr_Occurred()) goto error;
        seq_obj = PyLong_FromLongLong(seq + 1);
        if (seq_obj == NULL || PyObject_SetAttr(proto, s_seq, seq_obj) < 0) goto error;
    }
    if (pin_site && (site = pinned_site(code, lasti)) == NULL) goto error;
    unsigned char *s = (unsigned char *)PyByteArray_AS_STRING(send);
    if (n) memcpy(s + HEADER_SIZE, PyBytes_AS_STRING(payload), (size_t)n);
    s[0] = MAGIC;
    s[1] = (unsigned char)opcode;
    s[2] = (unsigned char)reduce_op;
    s[3] = 0;
    put_u32(s + 4, (uint32_t)(int32_t)(kind == KIND_GATHER || kind == KIND_BCAST ? root
                                                                                 : NO_ROOT));
    put_u64(s + 8, (uint64_t)seq);
    put_u64(s + 16, (uint64_t)step);
    memcpy(s + 24, PyBytes_AS_STRING(fp), 8);
    memset(s + 32, 0, 8);
    if (site) memcpy(s + 40, PyBytes_AS_STRING(site), 8);
    else memset(s + 40, 0, 8);
    s[48] = !sends ? FLAG_NO_PAYLOAD : value == Py_None ? FLAG_NONE_VALUE : 0;
    s[49] = s[50] = s[51] = 0;
    put_u32(s + 52, (uint32_t)n);
    if (record(ring, ring_objects, rec_state, capacity, seq, opcode, info, code, lasti, step, n) <
        0)
        goto error;

#ifndef HAVE_DIRECT
    (void)direct_call;
#else
    int sent = 1;
    if (direct_call != Py_None && (sent = direct_allgather(direct_call, send, recv)) < 0)
        goto error;
    if (sent != 0)
#endif
    {
        PyObject *call_args[3] = {NULL, send, recv};
        PyObject *done = PyObject_Vectorcall(exchange, call_args + 1,
                                             2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (done == NULL) goto error;
        Py_DECREF(done);
    }

    /* --- check every header before decoding any payload --- */
    const unsigned char *r = (const unsigned char *)PyByteArray_AS_STRING(recv);
    Py_ssize_t cap = slot - HEADER_SIZE;
    uint32_t largest = 0;
    int agree = 1;
    for (Py_ssize_t i = 0; i < size && agree; i++) {
        const unsigned char *h = r + i * slot;
        uint32_t len = get_u32(h + LENGTH_OFFSET);
        unsigned char flags = h[FLAGS_OFFSET];
        int sent_nothing = kind == KIND_EMPTY || (kind == KIND_BCAST && i != root);
        if (memcmp(h, s, CHECKED) != 0 ||
            (sent_nothing ? flags != FLAG_NO_PAYLOAD || len != 0
                          : flags > FLAG_NONE_VALUE || (Py_ssize_t)len > cap))
            agree = 0;
        if (len > largest) largest = len;
    }
    if (agree) {
        Py_ssize_t first = 0, count = size; /* the slots to decode */
        if (kind == KIND_BCAST) {
            first = root;
            count = 1;
        } else if (kind == KIND_EMPTY || (kind == KIND_GATHER && rank != root)) {
            count = 0;
        }
        PyObject *values = PyList_New(count);
        if (values == NULL) goto error;
        for (Py_ssize_t k = 0; k < count; k++) {
            const unsigned char *h = r + (first + k) * slot;
            PyObject *view = PyMemoryView_FromMemory((char *)h + HEADER_SIZE,
                                                     get_u32(h + LENGTH_OFFSET), PyBUF_READ);
            if (view == NULL) {
                Py_DECREF(values);
                goto error;
            }
            PyObject *dargs[2] = {NULL, view};
            PyObject *item = PyObject_Vectorcall(decode, dargs + 1,
                                                 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            Py_DECREF(view);
            if (item == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                    Py_DECREF(values);
                    goto error;
                }
                /* The general path re-decodes and raises the error every rank agrees on. */
                PyErr_Clear();
                agree = 0;
                break;
            }
            PyList_SET_ITEM(values, k, item);
        }
        if (!agree) {
            Py_DECREF(values);
        } else if (kind == KIND_ALL) {
            out = values;
        } else {
            PyObject *one = kind == KIND_BCAST ? PyList_GET_ITEM(values, 0)
                            : kind == KIND_GATHER && rank == root ? values : Py_None;
            out = PyList_New(1);
            if (out == NULL) {
                Py_DECREF(values);
                goto error;
            }
            PyList_SET_ITEM(out, 0, Py_NewRef(one));
            Py_DECREF(values);
        }
    }
    if (!agree) {
        result = Py_BuildValue("(OiL)", code ? (PyObject *)code : Py_None, lasti, seq);
        goto cleanup;
    }
    if (slot != min_slot) {
        PyObject *pol = PyObject_GetAttr(proto, s_policy);
        if (pol == NULL) goto error;
        PyObject *len_obj = PyLong_FromUnsignedLong(largest);
        PyObject *observed = len_obj ? PyObject_CallMethodOneArg(pol, s_observe, len_obj) : NULL;
        Py_XDECREF(len_obj);
        Py_ssize_t new_size = observed ? attr_ssize(pol, s_size) : -1;
        Py_XDECREF(observed);
        Py_DECREF(pol);
        if (new_size < 0) goto error;
        /* A new slot size takes effect at the next call, on the general path. */
        if (new_size != slot && PyObject_SetAttr(proto, s_fast, Py_None) < 0) goto error;
    }
    if (ring != Py_None && PyList_SetItem(rec_state, 1, Py_NewRef(Py_False)) < 0) goto error;
    result = out;
    out = NULL;
    goto cleanup;
error:
    result = NULL;
cleanup:
    Py_XDECREF(out);
    Py_XDECREF(site);
    Py_XDECREF(seq_obj);
    Py_XDECREF(code);
    Py_XDECREF(payload);
    Py_DECREF(state);
    Py_XDECREF(info_fast);
    return result;
}

/* allgather(proto, value, schema, step, op, pin_site) */
static PyObject *allgather(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "allgather expects 6 arguments");
        return NULL;
    }
    PyObject *value = args[1], *schema = args[2];
    int pin_site = PyObject_IsTrue(args[5]);
    if (pin_site < 0) return NULL;
    PyObject *info = lookup_info(schema == Py_None ? (PyObject *)Py_TYPE(value) : schema);
    if (info == NULL) return PyErr_Occurred() ? NULL : take_py();
    return steady(args[0], value, info, args[3], args[4], pin_site, NO_ROOT, 0, KIND_ALL);
}

/* collective(proto, value, schema, step, op, root, reduce_op, kind): gather, bcast, barrier and
 * allreduce of Python numbers, as ``allgather`` but for the kind's senders and decoders. The
 * schema is looked up as allgather's is (``schema`` or the type of ``value``); a barrier has
 * none (KIND_EMPTY). */
static PyObject *collective(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "collective expects 8 arguments");
        return NULL;
    }
    PyObject *value = args[1], *schema = args[2];
    int overflow = 0;
    long root = PyLong_AsLongAndOverflow(args[5], &overflow);
    if (overflow) return take_py(); /* out of range: the general path flags it to every rank */
    long reduce_op = PyLong_AsLong(args[6]), kind = PyLong_AsLong(args[7]);
    if (PyErr_Occurred()) return NULL;
    if (kind < KIND_ALL || kind > KIND_EMPTY || reduce_op < 0 || reduce_op > 255) {
        PyErr_SetString(PyExc_ValueError, "collective: bad kind or reduce op");
        return NULL;
    }
    /* A bcast non-root names the schema it expects; without one (and no value to take the type
     * of) the general path reports the missing schema to every rank. */
    if (kind == KIND_BCAST && schema == Py_None && value == Py_None) return take_py();
    PyObject *info = EMPTY_INFO;
    if (kind != KIND_EMPTY) {
        info = lookup_info(schema == Py_None ? (PyObject *)Py_TYPE(value) : schema);
        if (info == NULL) return PyErr_Occurred() ? NULL : take_py();
    }
    return steady(args[0], value, info, args[3], args[4], 0, root, reduce_op, (int)kind);
}

/* scan(recv, slot, check) -> (agree, failed, largest)
 * The general path's envelope check over every slot: the first CHECKED bytes equal to ``check``,
 * any slot flagging a local error, and the largest payload length. At thousands of ranks the
 * per-slot work is what costs, so it is a memcmp loop here (numpy: ~60 ns per rank). */
static PyObject *scan(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "scan expects 3 arguments");
        return NULL;
    }
    Py_buffer recv, check;
    Py_ssize_t slot = PyLong_AsSsize_t(args[1]);
    if (slot == -1 && PyErr_Occurred()) return NULL;
    if (PyObject_GetBuffer(args[0], &recv, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[2], &check, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&recv);
        return NULL;
    }
    if (slot < HEADER_SIZE || recv.len % slot != 0 || check.len != CHECKED) {
        PyBuffer_Release(&recv);
        PyBuffer_Release(&check);
        PyErr_SetString(PyExc_ValueError, "scan: expected whole slots and a 48-byte check");
        return NULL;
    }
    const unsigned char *r = (const unsigned char *)recv.buf;
    int agree = 1, failed = 0;
    uint32_t largest = 0;
    for (Py_ssize_t off = 0; off < recv.len; off += slot) {
        const unsigned char *h = r + off;
        uint32_t len = get_u32(h + LENGTH_OFFSET);
        if (len > largest) largest = len;
        if (h[FLAGS_OFFSET] & FLAG_LOCAL_ERROR) failed = 1;
        if (agree && memcmp(h, check.buf, CHECKED) != 0) agree = 0;
    }
    PyBuffer_Release(&recv);
    PyBuffer_Release(&check);
    return Py_BuildValue("(OOk)", agree ? Py_True : Py_False, failed ? Py_True : Py_False,
                         (unsigned long)largest);
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "The envelope check over every slot: (agree, failed, largest)."},
    {"configure", configure, METH_VARARGS, "Bind the protocol's tables (once, at import)."},
#ifdef HAVE_DIRECT
    {"direct", direct, METH_VARARGS, "Wrap MPI_Allgather for the fast path; see the module comment."},
    {"exchange", (PyCFunction)(void (*)(void))exchange, METH_FASTCALL,
     "The bare direct MPI_Allgather of two bytearrays (benchmarks' floor)."},
#endif
    {"allgather", (PyCFunction)(void (*)(void))allgather, METH_FASTCALL,
     "The steady state of Protocol.allgather; see the module comment."},
    {"collective", (PyCFunction)(void (*)(void))collective, METH_FASTCALL,
     "The steady state of gather, bcast, barrier and allreduce; see the module comment."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC PyInit__speedups(void) {
    INTERN(s_seq, "seq");
    INTERN(s_policy, "policy");
    INTERN(s_size, "size");
    INTERN(s_observe, "observe");
    INTERN(s_fast, "fast");
    if ((SITE_CACHE = PyDict_New()) == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    /* What _protocol.py checks before binding: a stale build of older source is not used. */
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", 2) < 0) Py_CLEAR(m);
    return m;
}
