/* The C fast path: the steady state of the hot collectives, and the MPI exchange itself.
 *
 * Exactly the protocol of core/protocol.py, core/ops.py and core/parts.py (read their
 * docstrings, and core/wire.py for the header and the agreement block): for allgather (and the
 * flush), gather and alltoall up to 16 ranks and allreduce of Python numbers (GATHER exchange),
 * bcast, scatter and barrier (REDUCE exchange), allgather of numpy arrays (their format written
 * and read by core/array_slots.py): encode (scatter's and alltoall's parts packed as
 * core/parts.py packs them), find the call's identity (name or site; a rooted call at a
 * site that proved a role branch sends the role identity learned there, core/roles.py),
 * write the 64-byte header and the inline payload, record the flight-recorder entry,
 * exchange, check the agreement block, decode what this rank needs (a receiver of bcast or
 * scatter that names no schema is served where it has a guess of the root's class,
 * core/guesses.py, sent as if named with FLAG_GUESSED). The interpreter would run a few
 * hundred bytecodes per call for that; here it is a few thousand instructions, which is what
 * keeps a checked collective near a raw one.
 *
 * It never raises for protocol reasons (core/fast.py documents the contract):
 *   - TAKE_PY before touching any state when the call is unusual (no cached schema, an array
 *     outside an allgather, a value that does not encode, is not an instance of its record
 *     class, nests too deep or does not fit the slot, a name or step of the wrong type, a
 *     thread already inside);
 *   - a tuple (code, lasti, seq, occurrence, deadline, timed_out) after the exchange when it was
 *     not the steady state (the block disagrees, a flag is set, a payload does not decode, the
 *     deadline passed): Python finishes from the same bytes and reaches the verdict every rank
 *     reaches;
 *   - otherwise the list of values (allgather), or a 1-item list holding the result.
 * Errors of the backend itself (an MPI error code) are raised as mpi4py raises them.
 *
 * The MPI exchange (transports/mpi.py has its Python twin and the message format): ceil(log2 N)
 * rounds; round k sends to rank - 2**k and receives from rank + 2**k, through MPI_Isend and
 * MPI_Irecv polled here (until the deadline, if any). The MPI symbols are the ones
 * mpi4py's own module resolves (the global scope first, so a PMPI tool preloaded there sees
 * the calls); handles are ints (MPICH's ABI) or pointers (Open MPI's), chosen by the handle size
 * mpi4py reports. The GIL is released around every MPI call, as mpi4py does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <pythread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define HAVE_ENGINE 1
#endif

/* --- the contract with core/wire.py, core/recorder.py and core/fast.py (checked at import) --- */
#define HEADER_SIZE 64
#define CHECKED 56
#define AGREE_SIZE 128
#define AGREE_FLAGS 112
#define AGREE_LENGTH 116
#define MAGIC 0xC2
#define FLAGS_OFFSET 56
#define LENGTH_OFFSET 60
#define SCHEMA_OFFSET 24
#define FLAG_LOCAL_ERROR 1
#define FLAG_OVERFLOW 2
#define FLAG_WILD_SCHEMA 4
#define FLAG_SPLIT_ARRAY 8
#define FLAG_GUESSED 16
#define FLAG_ROLE 32
#define FLAG_DECODE_HOOK 64
#define SHAPE_REDUCE 0
#define SHAPE_GATHER 1
#define NO_ROOT (-1)
#define MAX_NESTING 128
#define MAX_NAME 256
#define ENTRY_SIZE 56
#define OBJECTS_PER_ENTRY 4
#define PREFIX 8
/* What configure's ``forwarding`` answers (True, False, or pass-through offsets): its form. */
#define FORWARDING_FORM 3
#define CHAIN_MAX 8 /* site_walk.CHAIN_MAX: thin wrappers a call's via keeps */

enum { F_SEND, F_RECV, F_BLOCK, F_SLOT, F_SIZE, F_RANK, F_EXCHANGE, F_ENGINE, F_RING,
       F_RING_OBJECTS, F_RING_STATE, F_CAPACITY, F_MIN_SLOT, F_COUNTS, F_BUSY, F_ACQUIRE,
       F_RELEASE, F_INSTANCE, F_TIMEOUT, F_PROTOCOL, F_COUNT };
static const char *FAST_FIELDS[F_COUNT] = {
    "send", "recv", "block", "slot", "size", "rank", "exchange", "engine", "ring",
    "ring_objects", "ring_state", "capacity", "min_slot", "counts", "busy", "acquire",
    "release", "instance", "timeout", "protocol"};
/* The channel's busy marker (core/channel.py): who is inside, where, and two flags. */
enum { BUSY_IDENT, BUSY_CODE, BUSY_LASTI, BUSY_POISON, BUSY_BROKEN, BUSY_COUNT };

/* What a collective sends and decodes (one exchange each; they differ in shape, in who sends a
 * payload and whose payloads are decoded). KIND_ARRAYS: an allgather of numpy arrays, encoded
 * and decoded by core/array_slots.py around this path's protocol steps. */
enum { KIND_ALL, KIND_GATHER, KIND_BCAST, KIND_EMPTY, KIND_SCATTER, KIND_ALLTOALL, KIND_ARRAYS };

static PyObject *SCHEMAS, *SCHEMAS_BY_ID, *OPS, *ENCODE, *SKIP_FILES, *SKIP_CODES, *SITE_FP,
    *NAME_FP, *TAKE_PY, *FORWARDING, *ROLE_SITE, *COMBINED, *THIN_CHAIN;
/* name -> fingerprint (call sites have a table of their own, before site_identity). */
static PyObject *NAME_CACHE, *EMPTY_BYTES, *EMPTY_TUPLE;
static PyObject *s_seq, *s_step, *s_policy, *s_observe, *s_size, *s_fast, *s_exchange,
    *s_fingerprint, *s_failed, *s_guesses, *s_roles;
/* The op names of the entry points that are not given one, interned once at import. */
static PyObject *s_allgather, *s_allreduce, *s_reduce, *s_barrier;

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

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static PyObject *take_py(void) { return Py_NewRef(TAKE_PY); }

/* After a failure the Python steps will report to every rank (a value that does not encode):
 * TAKE_PY with the error dropped; KeyboardInterrupt and other non-Exception errors propagate. */
static PyObject *take_py_after_error(void) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
    PyErr_Clear();
    return take_py();
}

/* --- nesting: the twin of codecs/nesting.py --- */
static int fixed_size(unsigned char b) {
    switch (b) {
    case 0xC0: case 0xC2: case 0xC3: return 0;
    case 0xCC: case 0xD0: return 1;
    case 0xCD: case 0xD1: case 0xD4: return 2;
    case 0xD5: return 3;
    case 0xCA: case 0xCE: case 0xD2: return 4;
    case 0xD6: return 5;
    case 0xCB: case 0xCF: case 0xD3: return 8;
    case 0xD7: return 9;
    case 0xD8: return 17;
    default: return -1;
    }
}

static uint64_t read_be(const unsigned char *p, int width) {
    uint64_t v = 0;
    for (int i = 0; i < width; i++) v = (v << 8) | p[i];
    return v;
}

/* Walk the first msgpack object of p[0:n]: 1 when it is complete and nests at most ``limit``
 * deep (*end: where it ends), 0 when it nests deeper, -1 when the bytes are malformed or end
 * before the object does. */
static int msgpack_walk(const unsigned char *p, Py_ssize_t n, int limit, Py_ssize_t *end) {
    uint64_t remaining[MAX_NESTING + 1];
    int depth = 0;
    Py_ssize_t pos = 0;
    while (pos < n) {
        unsigned char b = p[pos++];
        int64_t items = -1;
        if (b <= 0x7F || b >= 0xE0) {
        } else if (b >= 0xA0 && b <= 0xBF) {
            pos += b & 0x1F;
        } else if (b <= 0x8F) {
            items = 2 * (b & 0x0F);
        } else if (b <= 0x9F) {
            items = b & 0x0F;
        } else if (fixed_size(b) >= 0) {
            pos += fixed_size(b);
        } else if (b == 0xC4 || b == 0xC5 || b == 0xC6 || b == 0xC7 || b == 0xC8 || b == 0xC9 ||
                   b == 0xD9 || b == 0xDA || b == 0xDB) {
            int width = (b == 0xC4 || b == 0xC7 || b == 0xD9) ? 1
                        : (b == 0xC5 || b == 0xC8 || b == 0xDA) ? 2 : 4;
            int extra = (b == 0xC7 || b == 0xC8 || b == 0xC9) ? 1 : 0;
            if (pos + width > n) return -1;
            pos += width + extra + (Py_ssize_t)read_be(p + pos, width);
        } else if (b >= 0xDC && b <= 0xDF) {
            int width = (b == 0xDC || b == 0xDE) ? 2 : 4;
            if (pos + width > n) return -1;
            items = (int64_t)read_be(p + pos, width) * (b >= 0xDE ? 2 : 1);
            pos += width;
        } else {
            return -1; /* 0xC1 */
        }
        if (items > 0) {
            if (depth >= limit) return 0;
            remaining[depth++] = (uint64_t)items;
            continue;
        }
        while (depth > 0) {
            if (--remaining[depth - 1]) break;
            depth--;
        }
        if (depth == 0) {
            if (pos > n) return -1;
            *end = pos;
            return 1;
        }
    }
    return -1;
}

/* 1 when the first msgpack object of p[0:n] nests at most ``limit`` deep, else 0. Malformed
 * bytes count as fine: the decoder rejects them at a depth already proved within the limit. */
static int nesting_within(const unsigned char *p, Py_ssize_t n, int limit) {
    if (n <= limit) return 1;
    Py_ssize_t end;
    return msgpack_walk(p, n, limit, &end) != 0;
}

static PyObject *py_nesting_ok(PyObject *mod, PyObject *args) {
    Py_buffer buf;
    int limit = MAX_NESTING;
    if (!PyArg_ParseTuple(args, "y*|i", &buf, &limit)) return NULL;
    if (limit < 0 || limit > MAX_NESTING) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "nesting_ok: limit out of range");
        return NULL;
    }
    int ok = nesting_within((const unsigned char *)buf.buf, buf.len, limit);
    PyBuffer_Release(&buf);
    return PyBool_FromLong(ok);
}

/* --- the agreement block --- */
static void own_block(const unsigned char *slot, unsigned char *block) {
    memcpy(block, slot, CHECKED);
    for (int i = 0; i < CHECKED; i++) block[CHECKED + i] = (unsigned char)~slot[i];
    memset(block + 2 * CHECKED, 0, AGREE_SIZE - 2 * CHECKED);
    if (slot[FLAGS_OFFSET] & FLAG_WILD_SCHEMA) {
        memset(block + SCHEMA_OFFSET, 0, 8);
        memset(block + CHECKED + SCHEMA_OFFSET, 0, 8);
    }
    block[AGREE_FLAGS] = slot[FLAGS_OFFSET];
    memcpy(block + AGREE_LENGTH, slot + LENGTH_OFFSET, 4);
}

static void or_bytes(unsigned char *dst, const unsigned char *src, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) dst[i] |= src[i];
}

static int block_agreed(const unsigned char *block) {
    for (int i = 0; i < CHECKED; i++)
        if (block[i] & block[CHECKED + i]) return 0;
    return 1;
}

/* --- configure --- */
/* configure(schemas, schemas_by_id, ops, encode, skip_files, skip_codes, site_fingerprint,
 *           name_fingerprint, take_py, forwarding, role_site, combined, thin_chain) */
static PyObject *configure(PyObject *mod, PyObject *args) {
    PyObject *schemas, *by_id, *ops, *encode, *files, *codes, *site_fp, *name_fp, *take, *fwd,
        *role_site, *combined, *thin_chain;
    if (!PyArg_ParseTuple(args, "O!O!O!OO!O!OOOOOOO", &PyDict_Type, &schemas, &PyDict_Type,
                          &by_id, &PyDict_Type, &ops, &encode, &PySet_Type, &files, &PySet_Type,
                          &codes, &site_fp, &name_fp, &take, &fwd, &role_site, &combined,
                          &thin_chain))
        return NULL;
    Py_XSETREF(THIN_CHAIN, Py_NewRef(thin_chain));
    Py_XSETREF(ROLE_SITE, Py_NewRef(role_site));
    Py_XSETREF(COMBINED, Py_NewRef(combined));
    Py_XSETREF(FORWARDING, Py_NewRef(fwd));
    Py_XSETREF(SCHEMAS, Py_NewRef(schemas));
    Py_XSETREF(SCHEMAS_BY_ID, Py_NewRef(by_id));
    Py_XSETREF(OPS, Py_NewRef(ops));
    Py_XSETREF(ENCODE, Py_NewRef(encode));
    Py_XSETREF(SKIP_FILES, Py_NewRef(files));
    Py_XSETREF(SKIP_CODES, Py_NewRef(codes));
    Py_XSETREF(SITE_FP, Py_NewRef(site_fp));
    Py_XSETREF(NAME_FP, Py_NewRef(name_fp));
    Py_XSETREF(TAKE_PY, Py_NewRef(take));
    Py_RETURN_NONE;
}

/* --- call identity --- */
/* What site_walk.forwarding says of a code object (a new reference; NULL on error): True for a
 * thin wrapper, a frozenset of the offsets of its pass-through calls for a function thin at
 * those calls alone, else False. A direct-mapped table keyed by the code's address, holding its
 * code objects, in front of the Python classifier, which reads the bytecode once. */
#define FORWARDER_SLOTS 256
static struct {
    PyObject *code;
    PyObject *answer;
} FORWARDER_TABLE[FORWARDER_SLOTS];

static PyObject *forwarding(PyCodeObject *code) {
    size_t h = (size_t)(uintptr_t)code >> 4;
    size_t i = (h ^ (h >> 8)) & (FORWARDER_SLOTS - 1);
    if (FORWARDER_TABLE[i].code == (PyObject *)code) return Py_NewRef(FORWARDER_TABLE[i].answer);
    PyObject *answer = PyObject_CallOneArg(FORWARDING, (PyObject *)code);
    if (answer == NULL) return NULL;
    PyObject *old = FORWARDER_TABLE[i].code, *old_answer = FORWARDER_TABLE[i].answer;
    FORWARDER_TABLE[i].code = Py_NewRef((PyObject *)code);
    FORWARDER_TABLE[i].answer = Py_NewRef(answer);
    Py_XDECREF(old_answer);
    Py_XDECREF(old); /* last: a code object's deallocation may run Python code */
    return answer;
}

/* Whether ``frame`` of ``code`` is passed over: 1 as a thin wrapper (kept in via), 2 as a
 * decorator's wrapper (left out: site_walk.forwarding's 1-tuple), 0 not; -1 on error. */
static int passes_over(PyFrameObject *frame, PyCodeObject *code) {
    PyObject *answer = forwarding(code);
    if (answer == NULL) return -1;
    int found = answer == Py_True;
    int decorator = PyTuple_CheckExact(answer) && PyTuple_GET_SIZE(answer) == 1;
    PyObject *offsets = decorator ? PyTuple_GET_ITEM(answer, 0) : answer;
    if (!found && PyFrozenSet_CheckExact(offsets)) {
        PyObject *at = PyLong_FromLong(PyFrame_GetLasti(frame));
        found = at == NULL ? -1 : PySet_Contains(offsets, at);
        Py_XDECREF(at);
        if (found == 1 && decorator) found = 2;
    }
    Py_DECREF(answer);
    return found;
}

/* ``via`` for the thin wrappers passed on the way to a site (``passed``, innermost first, new
 * references, consumed): none, the one wrapper's code, or their site_walk.ThinChain, outermost
 * first (a new reference; NULL on error with *failed set). A direct-mapped table keyed by the
 * codes' addresses, holding its codes and chains, in front of site_walk.thin_chain. */
#define CHAIN_SLOTS 64
static struct {
    int n;
    PyObject *codes[CHAIN_MAX];
    PyObject *chain;
} CHAIN_TABLE[CHAIN_SLOTS];

static PyObject *via_of(PyObject **passed, int n, int *failed) {
    *failed = 0;
    if (n < 2) return n ? passed[0] : NULL;
    size_t h = (size_t)n;
    for (int k = 0; k < n; k++) h = h * 1000003u ^ ((size_t)(uintptr_t)passed[k] >> 4);
    size_t i = (h ^ (h >> 7)) & (CHAIN_SLOTS - 1);
    int hit = CHAIN_TABLE[i].n == n;
    for (int k = 0; hit && k < n; k++) hit = CHAIN_TABLE[i].codes[k] == passed[k];
    PyObject *chain = NULL;
    if (hit) {
        chain = Py_NewRef(CHAIN_TABLE[i].chain);
    } else {
        PyObject *codes = PyTuple_New(n);
        if (codes != NULL) {
            for (int k = 0; k < n; k++) PyTuple_SET_ITEM(codes, k, Py_NewRef(passed[n - 1 - k]));
            chain = PyObject_CallOneArg(THIN_CHAIN, codes);
            Py_DECREF(codes);
        }
        if (chain != NULL) {
            PyObject *old[CHAIN_MAX + 1];
            int m = 0;
            for (int k = 0; k < CHAIN_TABLE[i].n; k++) old[m++] = CHAIN_TABLE[i].codes[k];
            old[m++] = CHAIN_TABLE[i].chain;
            CHAIN_TABLE[i].n = n;
            for (int k = 0; k < n; k++) CHAIN_TABLE[i].codes[k] = Py_NewRef(passed[k]);
            CHAIN_TABLE[i].chain = Py_NewRef(chain);
            for (int k = 0; k < m; k++) Py_XDECREF(old[k]); /* last: may run Python code */
        }
    }
    for (int k = 0; k < n; k++) Py_DECREF(passed[k]);
    if (chain == NULL) *failed = 1;
    return chain;
}

/* The call site at or above ``start`` (borrowed; NULL: none), as site_walk.site_from finds it:
 * the first frame whose file is not typedcoll's own plumbing and that is not passed over as a
 * thin wrapper (passes_over) or a function marked transparent, and the thin wrappers and marked
 * functions passed on the way, decorators' wrappers left out (``via``: via_of them, the
 * innermost seven and the outermost beyond CHAIN_MAX); where no such frame is above, the
 * outermost thin wrapper is the site (a thread's target, a test's program), with the others as
 * via. New references to the site's code object, to via (or NULL) and, where ``frame_out`` is
 * given, to the site's frame (or NULL); and the site's lasti. */
static int site_from(PyFrameObject *start, PyCodeObject **code_out, int *lasti_out,
                     PyObject **via_out, PyFrameObject **frame_out) {
    PyFrameObject *frame = start;
    Py_XINCREF(frame);
    PyObject *passed[CHAIN_MAX]; /* the codes of the thin wrappers passed, innermost first */
    int n = 0, failed = 0, kept = 0; /* kept: whether outer is passed[n - 1] */
    PyFrameObject *outer = NULL; /* the outermost: the site where no frame above is one */
    int check_codes = PySet_GET_SIZE(SKIP_CODES) > 0;
    *code_out = NULL;
    *via_out = NULL;
    *lasti_out = 0;
    if (frame_out != NULL) *frame_out = NULL;
    while (frame != NULL) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        /* a function marked transparent is passed over as a thin wrapper is, and kept in via */
        int marked = check_codes ? PySet_Contains(SKIP_CODES, (PyObject *)code) : 0;
        int skip = marked == 0 ? PySet_Contains(SKIP_FILES, code->co_filename) : 0;
        int forwards = marked ? marked : (skip == 0 ? passes_over(frame, code) : 0);
        if (skip < 0 || forwards < 0) {
            Py_DECREF(code);
            Py_DECREF(frame);
            for (int k = 0; k < n; k++) Py_DECREF(passed[k]);
            Py_XDECREF(outer);
            return -1;
        }
        if (!skip && !forwards) {
            *via_out = via_of(passed, n, &failed);
            if (failed) {
                Py_DECREF(code);
                Py_DECREF(frame);
                Py_XDECREF(outer);
                return -1;
            }
            *code_out = code;
            *lasti_out = PyFrame_GetLasti(frame);
            if (frame_out != NULL) *frame_out = frame;
            else Py_DECREF(frame);
            Py_XDECREF(outer);
            return 0;
        }
        if (forwards == 1) {
            if (n < CHAIN_MAX) passed[n++] = (PyObject *)code;
            else Py_SETREF(passed[CHAIN_MAX - 1], (PyObject *)code);
        } else {
            Py_DECREF(code); /* plumbing, or a decorator's wrapper: left out */
        }
        if (forwards) {
            Py_XSETREF(outer, (PyFrameObject *)Py_NewRef(frame));
            kept = forwards == 1;
        }
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
    }
    if (outer != NULL) {
        if (kept) Py_DECREF(passed[--n]); /* the outermost is the site */
        *via_out = via_of(passed, n, &failed);
        if (failed) {
            Py_DECREF(outer);
            return -1;
        }
        *code_out = PyFrame_GetCode(outer);
        *lasti_out = PyFrame_GetLasti(outer);
        if (frame_out != NULL) *frame_out = outer;
        else Py_DECREF(outer);
    }
    return 0;
}

/* The call site of the running collective (site_from the current frame). */
static int user_site(PyCodeObject **code_out, int *lasti_out, PyObject **via_out,
                     PyFrameObject **frame_out) {
    return site_from(PyEval_GetFrame(), code_out, lasti_out, via_out, frame_out);
}

/* The identity fingerprint of an unnamed call at (code, lasti) (a new reference). A
 * direct-mapped table in front of SITE_FP (which has its own cache), keyed by the code's address
 * (hashing a code object walks its bytecode): a hit compares two words and allocates nothing;
 * the table holds its code objects, so an address in it is never reused. */
#define SITE_SLOTS 512
static struct {
    PyObject *code;
    int lasti;
    PyObject *via;
    PyObject *fp;
} SITE_TABLE[SITE_SLOTS];

static PyObject *site_identity(PyCodeObject *code, int lasti, PyObject *via) {
    PyObject *code_obj = code ? (PyObject *)code : Py_None;
    PyObject *via_obj = via ? via : Py_None;
    size_t h = ((size_t)(uintptr_t)code_obj >> 4) ^ ((size_t)(unsigned)lasti * 2654435761u) ^
               ((size_t)(uintptr_t)via_obj >> 6);
    size_t i = (h ^ (h >> 9)) & (SITE_SLOTS - 1);
    if (SITE_TABLE[i].code == code_obj && SITE_TABLE[i].lasti == lasti &&
        SITE_TABLE[i].via == via_obj)
        return Py_NewRef(SITE_TABLE[i].fp);
    PyObject *fp = PyObject_CallFunction(SITE_FP, "OiO", code_obj, lasti, via_obj);
    if (fp != NULL && (!PyBytes_Check(fp) || PyBytes_GET_SIZE(fp) != 8)) {
        Py_CLEAR(fp);
        PyErr_SetString(PyExc_RuntimeError, "typedcoll: bad site fingerprint");
    }
    if (fp == NULL) return NULL;
    PyObject *old_code = SITE_TABLE[i].code, *old_via = SITE_TABLE[i].via,
             *old_fp = SITE_TABLE[i].fp;
    SITE_TABLE[i].code = Py_NewRef(code_obj);
    SITE_TABLE[i].lasti = lasti;
    SITE_TABLE[i].via = Py_NewRef(via_obj);
    SITE_TABLE[i].fp = Py_NewRef(fp);
    Py_XDECREF(old_code); /* last: a code object's deallocation may run Python code */
    Py_XDECREF(old_via);
    Py_XDECREF(old_fp);
    return fp;
}

/* --- the callers of a call in a role branch (core/callers.py) --- */
#define MAX_LEVELS 8
/* The names of comprehensions' code (callers.COMPREHENSIONS): before Python 3.12 one runs in a
 * frame of its own, and its role branch is its function's. */
static PyObject *s_comprehensions[4];

static int is_comprehension(PyCodeObject *code) {
    for (int k = 0; k < 4; k++)
        if (code->co_name == s_comprehensions[k] ||
            PyUnicode_Compare(code->co_name, s_comprehensions[k]) == 0)
            return 1;
    return 0;
}
#define ROLE_SLOTS 512
static struct {
    PyObject *code;
    int lasti;
    int role;
} ROLE_TABLE[ROLE_SLOTS];

/* What the call at (code, lasti) is made for (callers.role_site): ROLE_BIT where it is a role
 * branch's, PICKED_BIT where it is outside its function's loops (a helper's, a route
 * picker's), both, or 0; -1 on error. A direct-mapped table in front of the Python answer,
 * which parses the source once. */
#define ROLE_BIT 1
#define PICKED_BIT 2
#define AWAITS_BIT 4
static int role_site(PyCodeObject *code, int lasti) {
    size_t h = ((size_t)(uintptr_t)code >> 4) ^ ((size_t)(unsigned)lasti * 2654435761u);
    size_t i = (h ^ (h >> 9)) & (ROLE_SLOTS - 1);
    if (ROLE_TABLE[i].code == (PyObject *)code && ROLE_TABLE[i].lasti == lasti)
        return ROLE_TABLE[i].role;
    PyObject *answer = PyObject_CallFunction(ROLE_SITE, "Oi", (PyObject *)code, lasti);
    if (answer == NULL) return -1;
    long kind = PyLong_AsLong(answer);
    Py_DECREF(answer);
    if (kind == -1 && PyErr_Occurred()) return -1;
    int role = (int)(kind & (ROLE_BIT | PICKED_BIT | AWAITS_BIT));
    PyObject *old = ROLE_TABLE[i].code;
    ROLE_TABLE[i].code = Py_NewRef((PyObject *)code);
    ROLE_TABLE[i].lasti = lasti;
    ROLE_TABLE[i].role = role;
    Py_XDECREF(old); /* last: a code object's deallocation may run Python code */
    return role;
}

/* Whether each coroutine from ``from`` up to ``to`` (a frame above it; both borrowed) runs
 * for the frame above it, awaited by it (callers.awaited): 1 where so, 0 where one is its own
 * caller (stepped by the event loop, started eagerly inside create_task), -1 on error. */
static int awaited(PyFrameObject *from, PyFrameObject *to) {
    PyFrameObject *at = (PyFrameObject *)Py_NewRef(from);
    int answer = 1;
    while (at != NULL && at != to) {
        PyCodeObject *code = PyFrame_GetCode(at);
        int is_async = (code->co_flags & (CO_COROUTINE | CO_ITERABLE_COROUTINE |
                                          CO_ASYNC_GENERATOR)) != 0;
        Py_DECREF(code);
        PyFrameObject *back = PyFrame_GetBack(at);
        if (is_async) {
            int role = 0;
            if (back != NULL) {
                PyCodeObject *awaiter = PyFrame_GetCode(back);
                role = role_site(awaiter, PyFrame_GetLasti(back));
                Py_DECREF(awaiter);
            }
            if (role < 0 || !(role & AWAITS_BIT)) {
                answer = role < 0 ? -1 : 0;
                Py_XDECREF(back);
                break;
            }
        }
        Py_SETREF(at, back);
    }
    Py_XDECREF(at);
    return answer;
}

/* A call's callers as identified before: its site fingerprint's object and each caller's code,
 * lasti and via -> the identity and the callers' tuple handed to the Python steps. A
 * direct-mapped table that holds what it compares, so an address in it is never reused; a
 * hit spares the tuples and the digest. */
#define CALLERS_SLOTS 256
static struct {
    PyObject *site;
    int n;
    PyObject *codes[MAX_LEVELS + 1];
    int lastis[MAX_LEVELS + 1];
    PyObject *vias[MAX_LEVELS + 1];
    PyObject *identity;
    PyObject *levels;
} CALLERS_TABLE[CALLERS_SLOTS];

/* The identity and callers' tuple of callers not in CALLERS_TABLE: each caller's site
 * fingerprint joined to the site's, digested by callers.combined (new references; NULL on
 * error). */
static PyObject *combine_callers(PyObject *site, int n, PyCodeObject **codes, int *lastis,
                                 PyObject **vias, PyObject **levels_out) {
    unsigned char joined[8 * (MAX_LEVELS + 2)];
    PyObject *levels = PyTuple_New(n), *result = NULL;
    if (levels == NULL) return NULL;
    memcpy(joined, PyBytes_AS_STRING(site), 8);
    for (int k = 0; k < n; k++) {
        PyObject *fp = site_identity(codes[k], lastis[k], vias[k]);
        if (fp == NULL) goto done;
        memcpy(joined + 8 * (k + 1), PyBytes_AS_STRING(fp), 8);
        Py_DECREF(fp);
        PyObject *level = Py_BuildValue("(OiO)", codes[k] ? (PyObject *)codes[k] : Py_None,
                                        lastis[k], vias[k] ? vias[k] : Py_None);
        if (level == NULL) goto done;
        PyTuple_SET_ITEM(levels, k, level);
    }
    PyObject *key = PyBytes_FromStringAndSize((const char *)joined, 8 * (n + 1));
    if (key == NULL) goto done;
    result = PyObject_CallOneArg(COMBINED, key);
    Py_DECREF(key);
    if (result != NULL && (!PyBytes_Check(result) || PyBytes_GET_SIZE(result) != 8)) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_RuntimeError, "typedcoll: bad callers' fingerprint");
    }
done:
    if (result == NULL) Py_DECREF(levels);
    else *levels_out = levels;
    return result;
}

/* The identity of the unnamed call whose site frame is ``frame`` and whose site fingerprint
 * is ``site`` (both borrowed): with its callers where its site is a role branch's (``rooted``
 * calls) or one its function picks, walked as callers.callers_of walks them (a new reference;
 * NULL on error). ``levels_out``: a new reference to the callers' tuple of (code, lasti, via),
 * innermost first, for the Python steps and the flight recorder. */
static PyObject *with_callers(PyFrameObject *frame, PyObject *site, int rooted,
                              PyObject **levels_out) {
    /* One more than kept: the callers past MAX_LEVELS are one marker level (callers.too_deep),
     * their site fingerprints joined in ``deeper`` as the walk reads them into the spare slot. */
    PyCodeObject *codes[MAX_LEVELS + 1];
    PyObject *vias[MAX_LEVELS + 1];
    int lastis[MAX_LEVELS + 1];
    int n = 0;
    PyObject *result = NULL, *deeper = NULL;
    PyFrameObject *at = (PyFrameObject *)Py_NewRef(frame);
    *levels_out = NULL;
    while (at != NULL) {
        PyCodeObject *code = PyFrame_GetCode(at);
        int role = role_site(code, PyFrame_GetLasti(at));
        Py_DECREF(code);
        if (role < 0) goto done;
        if (!(role & PICKED_BIT) && !(rooted && (role & ROLE_BIT))) break;
        for (;;) { /* a comprehension's frame is its function's */
            PyCodeObject *own = PyFrame_GetCode(at);
            int inside = is_comprehension(own);
            Py_DECREF(own);
            PyFrameObject *outer = inside ? PyFrame_GetBack(at) : NULL;
            if (outer == NULL) break;
            Py_SETREF(at, outer);
        }
        PyFrameObject *back = PyFrame_GetBack(at), *up = NULL;
        int rc = site_from(back, &codes[n], &lastis[n], &vias[n], &up);
        Py_XDECREF(back);
        if (rc < 0) goto done;
        rc = codes[n] == NULL ? 0 : awaited(at, up);
        if (rc <= 0) {
            Py_CLEAR(codes[n]);
            Py_CLEAR(vias[n]);
            Py_XDECREF(up);
            if (rc < 0) goto done;
            break;
        }
        if (n == MAX_LEVELS) {
            PyObject *fp = site_identity(codes[n], lastis[n], vias[n]);
            Py_CLEAR(codes[n]);
            Py_CLEAR(vias[n]);
            if (fp != NULL && deeper == NULL) deeper = PyBytes_FromStringAndSize(NULL, 0);
            if (fp != NULL && deeper != NULL) PyBytes_Concat(&deeper, fp);
            Py_XDECREF(fp);
            if (fp == NULL || deeper == NULL) {
                Py_XDECREF(up);
                goto done;
            }
        } else {
            n++;
        }
        Py_XSETREF(at, up);
    }
    if (deeper != NULL) { /* callers.too_deep: the marker's lasti digests the callers past */
        PyObject *digest = PyObject_CallOneArg(COMBINED, deeper);
        if (digest == NULL) goto done;
        if (!PyBytes_Check(digest) || PyBytes_GET_SIZE(digest) != 8) {
            Py_DECREF(digest);
            PyErr_SetString(PyExc_RuntimeError, "typedcoll: bad callers' fingerprint");
            goto done;
        }
        const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(digest);
        codes[n] = NULL;
        vias[n] = NULL;
        lastis[n++] = (int)(((unsigned)d[0] | (unsigned)d[1] << 8 | (unsigned)d[2] << 16 |
                             (unsigned)d[3] << 24) & 0x7FFFFFFFu);
        Py_DECREF(digest);
    }
    if (n == 0) {
        result = Py_NewRef(site);
        *levels_out = Py_NewRef(EMPTY_TUPLE);
        goto done;
    }
    size_t h = ((size_t)(uintptr_t)site >> 4) ^ (size_t)n;
    for (int k = 0; k < n; k++)
        h = h * 1000003u ^ ((size_t)(uintptr_t)codes[k] >> 4) ^
            ((size_t)(unsigned)lastis[k] * 2654435761u) ^ ((size_t)(uintptr_t)vias[k] >> 6);
    size_t i = (h ^ (h >> 11)) & (CALLERS_SLOTS - 1);
    int hit = CALLERS_TABLE[i].site == site && CALLERS_TABLE[i].n == n;
    for (int k = 0; hit && k < n; k++)
        hit = CALLERS_TABLE[i].codes[k] == (codes[k] ? (PyObject *)codes[k] : Py_None) &&
              CALLERS_TABLE[i].lastis[k] == lastis[k] &&
              CALLERS_TABLE[i].vias[k] == (vias[k] ? vias[k] : Py_None);
    if (hit) {
        result = Py_NewRef(CALLERS_TABLE[i].identity);
        *levels_out = Py_NewRef(CALLERS_TABLE[i].levels);
        goto done;
    }
    result = combine_callers(site, n, codes, lastis, vias, levels_out);
    if (result == NULL) goto done;
    {
        /* Replace the entry; the old references go last (a code object's deallocation may run
         * Python code). */
        PyObject *old[3 + 2 * (MAX_LEVELS + 1)];
        int m = 0;
        old[m++] = CALLERS_TABLE[i].site;
        old[m++] = CALLERS_TABLE[i].identity;
        old[m++] = CALLERS_TABLE[i].levels;
        for (int k = 0; k < CALLERS_TABLE[i].n; k++) {
            old[m++] = CALLERS_TABLE[i].codes[k];
            old[m++] = CALLERS_TABLE[i].vias[k];
        }
        CALLERS_TABLE[i].site = Py_NewRef(site);
        CALLERS_TABLE[i].n = n;
        for (int k = 0; k < n; k++) {
            CALLERS_TABLE[i].codes[k] = Py_NewRef(codes[k] ? (PyObject *)codes[k] : Py_None);
            CALLERS_TABLE[i].lastis[k] = lastis[k];
            CALLERS_TABLE[i].vias[k] = Py_NewRef(vias[k] ? vias[k] : Py_None);
        }
        CALLERS_TABLE[i].identity = Py_NewRef(result);
        CALLERS_TABLE[i].levels = Py_NewRef(*levels_out);
        for (int k = 0; k < m; k++) Py_XDECREF(old[k]);
    }
done:
    for (int k = 0; k < n; k++) {
        Py_XDECREF(codes[k]);
        Py_XDECREF(vias[k]);
    }
    Py_XDECREF(deeper);
    Py_XDECREF(at);
    return result;
}

/* The identity of an unnamed call, found at its site (user_site): the site's fingerprint, with
 * the callers that with_callers finds (``levels``: their tuple, or NULL where none were
 * walked). New references in the outputs and the result; NULL on error. */
static PyObject *unnamed_identity(int rooted, PyCodeObject **code, int *lasti,
                                  PyObject **via, PyObject **levels) {
    PyFrameObject *frame = NULL;
    *levels = NULL;
    if (user_site(code, lasti, via, &frame) < 0) return NULL;
    PyObject *identity = site_identity(*code, *lasti, *via);
    if (identity != NULL && frame != NULL)
        Py_SETREF(identity, with_callers(frame, identity, rooted, levels));
    Py_XDECREF(frame);
    return identity;
}

/* The identity fingerprint of a call named ``name`` (a new reference). */
static PyObject *name_identity(PyObject *name) {
    PyObject *fp = PyDict_GetItemWithError(NAME_CACHE, name);
    if (fp != NULL) return Py_NewRef(fp);
    if (PyErr_Occurred()) return NULL;
    fp = PyObject_CallOneArg(NAME_FP, name);
    if (fp != NULL && (!PyBytes_Check(fp) || PyBytes_GET_SIZE(fp) != 8)) {
        Py_CLEAR(fp);
        PyErr_SetString(PyExc_RuntimeError, "typedcoll: bad name fingerprint");
    }
    if (fp != NULL && PyDict_GET_SIZE(NAME_CACHE) < 65536 &&
        PyDict_SetItem(NAME_CACHE, name, fp) < 0)
        Py_CLEAR(fp);
    return fp;
}

/* The schema cache's SchemaInfo for ``key`` (borrowed), or NULL: with an exception set on error,
 * without one when the schema is not resolved yet (or unhashable). A direct-mapped table of
 * schemas seen (the caches only ever add entries, and keep key and info alive) saves the id's
 * allocation and a dict lookup. */
#define SCHEMA_SLOTS 64
static struct {
    PyObject *key, *info;
} SCHEMA_TABLE[SCHEMA_SLOTS];

static PyObject *lookup_info(PyObject *key) {
    size_t h = (size_t)(uintptr_t)key >> 4;
    size_t slot = (h ^ (h >> 6)) & (SCHEMA_SLOTS - 1);
    if (SCHEMA_TABLE[slot].key == key) return SCHEMA_TABLE[slot].info;
    PyObject *id = PyLong_FromVoidPtr(key);
    if (id == NULL) return NULL;
    PyObject *entry = PyDict_GetItemWithError(SCHEMAS_BY_ID, id); /* borrowed */
    Py_DECREF(id);
    PyObject *info = NULL;
    if (entry != NULL && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 2 &&
        PyTuple_GET_ITEM(entry, 0) == key) {
        info = PyTuple_GET_ITEM(entry, 1);
    } else {
        if (PyErr_Occurred()) return NULL;
        info = PyDict_GetItemWithError(SCHEMAS, key);
        if (info == NULL) {
            PyErr_Clear();
            return NULL;
        }
    }
    PyObject *old_key = SCHEMA_TABLE[slot].key, *old_info = SCHEMA_TABLE[slot].info;
    SCHEMA_TABLE[slot].key = Py_NewRef(key);
    SCHEMA_TABLE[slot].info = Py_NewRef(info);
    Py_XDECREF(old_key); /* the caches still hold both */
    Py_XDECREF(old_info);
    return info;
}

/* --- the flight recorder: core/recorder.py's ENTRY, written in place --- */
static int record_start(PyObject *ring, PyObject *objects, PyObject *state, Py_ssize_t capacity,
                        long long seq, long opcode, PyObject *info, PyCodeObject *code, int lasti,
                        long long step, Py_ssize_t n, PyObject *name, Py_ssize_t occurrence,
                        PyObject *via, PyObject *callers, long root, long reduce_op) {
    if (ring == Py_None) return 0;
    Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(state, 0));
    if (count < 0 && PyErr_Occurred()) return -1;
    /* The ring doubles in place until it holds ``capacity`` entries (FlightRecorder._grow). */
    Py_ssize_t allocated = PyByteArray_GET_SIZE(ring) / ENTRY_SIZE;
    if (count == allocated && allocated < capacity) {
        Py_ssize_t more = allocated < capacity - allocated ? allocated : capacity - allocated;
        if (PyByteArray_Resize(ring, (allocated + more) * ENTRY_SIZE) < 0) return -1;
        memset(PyByteArray_AS_STRING(ring) + allocated * ENTRY_SIZE, 0,
               (size_t)(more * ENTRY_SIZE));
        for (Py_ssize_t i = 0; i < OBJECTS_PER_ENTRY * more; i++)
            if (PyList_Append(objects, Py_None) < 0) return -1;
        allocated += more;
    }
    Py_ssize_t index = count % allocated;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    unsigned char *e = (unsigned char *)PyByteArray_AS_STRING(ring) + index * ENTRY_SIZE;
    put_u64(e, (uint64_t)seq);
    put_u64(e + 8, (uint64_t)step);
    put_u64(e + 16, (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec);
    put_u64(e + 24, 0);
    put_u32(e + 32, (uint32_t)n);
    put_u32(e + 36, (uint32_t)lasti);
    put_u32(e + 40, (uint32_t)occurrence);
    e[44] = (unsigned char)opcode;
    e[45] = 0; /* started */
    e[46] = (unsigned char)reduce_op;
    e[47] = 0;
    put_u32(e + 48, (uint32_t)(int32_t)root);
    put_u32(e + 52, 0);
    Py_ssize_t base = OBJECTS_PER_ENTRY * index;
    /* A call made for its callers keeps them beside its wrapper (FlightRecorder.start). */
    PyObject *via_obj = via ? via : Py_None;
    PyObject *wrapper = callers != NULL && PyTuple_GET_SIZE(callers) > 0
                            ? PyTuple_Pack(2, via_obj, callers)
                            : Py_NewRef(via_obj);
    if (wrapper == NULL) return -1;
    if (PyList_SetItem(objects, base + 3, wrapper) < 0 || /* stolen, set or not */
        PyList_SetItem(objects, base, Py_NewRef(info)) < 0 ||
        PyList_SetItem(objects, base + 1, Py_NewRef(code ? (PyObject *)code : Py_None)) < 0 ||
        PyList_SetItem(objects, base + 2, Py_NewRef(name)) < 0)
        return -1;
    PyObject *next = PyLong_FromSsize_t(count + 1);
    if (next == NULL || PyList_SetItem(state, 0, next) < 0) return -1;
    return PyList_SetItem(state, 1, Py_NewRef(Py_True));
}

static int record_complete(PyObject *ring, PyObject *state, Py_ssize_t capacity) {
    if (ring == Py_None) return 0;
    Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(state, 0));
    if (count <= 0) return PyErr_Occurred() ? -1 : 0;
    Py_ssize_t allocated = PyByteArray_GET_SIZE(ring) / ENTRY_SIZE;
    unsigned char *e =
        (unsigned char *)PyByteArray_AS_STRING(ring) + ((count - 1) % allocated) * ENTRY_SIZE;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    put_u64(e + 24, (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec);
    e[45] = 1; /* completed */
    return PyList_SetItem(state, 1, Py_NewRef(Py_False));
}

/* --- the MPI exchange --- */
#ifdef HAVE_ENGINE
/* MPI handles are ints (MPICH's ABI) or pointers (Open MPI's): both prototypes of each call,
 * chosen by the handle size mpi4py reports. Requests have the handle size too. */
typedef int (*isend_i)(const void *, int, int32_t, int, int, int32_t, void *);
typedef int (*isend_p)(const void *, int, void *, int, int, void *, void *);
typedef int (*irecv_i)(void *, int, int32_t, int, int, int32_t, void *);
typedef int (*irecv_p)(void *, int, void *, int, int, void *, void *);
typedef int (*testall_t)(int, void *, int *, void *);
typedef int (*iprobe_i)(int, int, int32_t, int *, void *);
typedef int (*iprobe_p)(int, int, void *, int *, void *);
typedef int (*allgather_i)(const void *, int, int32_t, void *, int, int32_t, int32_t);
typedef int (*allgather_p)(const void *, int, void *, void *, int, void *, void *);

typedef struct {
    void *isend, *irecv, *testall;
    void *iprobe; /* NULL: peers' notices are not looked for (a timeout then ends the call) */
    void *allgather; /* phase 2 of equal split arrays; NULL: the Python steps run it */
    PyObject *spare; /* that phase's receive buffer, reused once no result refers to it */
    const void *comm_handle; /* where the mpi4py Comm object keeps its handle */
    intptr_t byte_type, null_comm;
    int handle_size, size, rank, tag;
    int notice_tag, any_source; /* a peer's notice that it gave up on a call (transports/mpi.py) */
    int notice_polls; /* how many times a completed exchange probes for one (at least 1) */
    PyObject *comm;       /* keeps comm_handle valid */
    PyObject *error_type; /* MPI.Exception, raised with an error code */
    unsigned char *out, *inbox, *held, *region;
    Py_ssize_t out_cap, inbox_cap, held_cap, region_cap;
    int broken; /* a timed-out exchange left requests pending on these buffers: never free */
} Engine;

static void engine_free(PyObject *capsule) {
    Engine *e = (Engine *)PyCapsule_GetPointer(capsule, "typedcoll.engine");
    if (e == NULL) return;
    Py_XDECREF(e->comm);
    Py_XDECREF(e->error_type);
    Py_XDECREF(e->spare);
    if (!e->broken) {
        PyMem_RawFree(e->out);
        PyMem_RawFree(e->inbox);
        PyMem_RawFree(e->held);
        PyMem_RawFree(e->region);
    }
    PyMem_Free(e);
}

static intptr_t narrow(unsigned long long value, int handle_size) {
    if (handle_size == 4) return (intptr_t)(int32_t)(uint32_t)value;
    return (intptr_t)value;
}

static void *find_symbol(const char *path, const char *name) {
    void *fn = dlsym(RTLD_DEFAULT, name);
    if (fn != NULL) return fn;
    void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL) return NULL;
    fn = dlsym(lib, name);
    dlclose(lib); /* still loaded: mpi4py holds it */
    return fn;
}

/* engine(library_path, comm, comm_handle_address, byte_handle, null_comm_handle, handle_size,
 *        size, rank, tag, notice_tag, any_source, error_type, notice_polls) -> capsule, or None
 *        when a symbol cannot be found. */
static PyObject *engine(PyObject *mod, PyObject *args) {
    const char *path;
    PyObject *comm, *error_type;
    unsigned long long handle_addr, byte_type, null_comm;
    int handle_size, size, rank, tag, notice_tag, any_source, notice_polls;
    if (!PyArg_ParseTuple(args, "sOKKKiiiiiiOi", &path, &comm, &handle_addr, &byte_type,
                          &null_comm, &handle_size, &size, &rank, &tag, &notice_tag,
                          &any_source, &error_type, &notice_polls))
        return NULL;
    if ((handle_size != 4 && handle_size != (int)sizeof(void *)) || size < 1 || rank < 0 ||
        rank >= size)
        Py_RETURN_NONE;
    void *fns[3];
    const char *names[3] = {"MPI_Isend", "MPI_Irecv", "MPI_Testall"};
    for (int i = 0; i < 3; i++)
        if ((fns[i] = find_symbol(path, names[i])) == NULL) Py_RETURN_NONE;
    Engine *e = PyMem_Calloc(1, sizeof(Engine));
    if (e == NULL) return PyErr_NoMemory();
    e->isend = fns[0];
    e->irecv = fns[1];
    e->testall = fns[2];
    e->allgather = find_symbol(path, "MPI_Allgather");
    e->iprobe = find_symbol(path, "MPI_Iprobe");
    e->notice_tag = notice_tag;
    e->notice_polls = notice_polls < 1 ? 1 : notice_polls;
    e->any_source = any_source;
    e->comm_handle = (const void *)(uintptr_t)handle_addr;
    e->byte_type = narrow(byte_type, handle_size);
    e->null_comm = narrow(null_comm, handle_size);
    e->handle_size = handle_size;
    e->size = size;
    e->rank = rank;
    e->tag = tag;
    e->comm = Py_NewRef(comm);
    e->error_type = Py_NewRef(error_type);
    PyObject *capsule = PyCapsule_New(e, "typedcoll.engine", engine_free);
    if (capsule == NULL) {
        Py_DECREF(e->comm);
        Py_DECREF(e->error_type);
        PyMem_Free(e);
    }
    return capsule;
}

static int grow(unsigned char **buf, Py_ssize_t *cap, Py_ssize_t need) {
    if (*cap >= need) return 0;
    unsigned char *p = PyMem_RawRealloc(*buf, (size_t)need);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *buf = p;
    *cap = need;
    return 0;
}

static intptr_t comm_now(const Engine *e) {
    if (e->handle_size == 4) return (intptr_t)*(const int32_t *)e->comm_handle;
    return (intptr_t)*(void *const *)e->comm_handle;
}

static int mpi_error(const Engine *e, int rc) {
    PyObject *code = PyLong_FromLong(rc);
    PyObject *exc = code ? PyObject_CallOneArg(e->error_type, code) : NULL;
    Py_XDECREF(code);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return -1;
}

/* Wait for ``count`` requests until ``deadline`` (< 0: none): 1 done, 0 deadline passed (the
 * engine is then broken: the requests stay pending on its buffers), -1 error. Spin first (an
 * operation about to complete should not pay a wake-up), then yield the core (oversubscribed
 * ranks need it to progress), then sleep with backoff, so a rank waiting for a late peer does
 * not burn a core. Polling from here measured within 3% of MPI's blocking point-to-point calls,
 * which poll too, or faster (docs/bench.md). Runs without the GIL. */
static int wait_requests(Engine *e, void *req, int count, double deadline, int *rc_out) {
    char statuses[512];
    int rc, done = 0;
    long pause_ns = 100000;
    double yield_until = -1;
    for (long tests = 0;; tests++) {
        rc = ((testall_t)e->testall)(count, req, &done, statuses);
        if (rc != 0) {
            *rc_out = rc;
            return -1;
        }
        if (done) return 1;
        if (tests < 200) continue;
        double now = monotonic();
        if (deadline >= 0 && now >= deadline) {
            e->broken = 1;
            return 0;
        }
        if (yield_until < 0) yield_until = now + 0.05;
        if (now < yield_until) {
            sched_yield();
            continue;
        }
        struct timespec ts = {0, pause_ns};
        nanosleep(&ts, NULL);
        if (pause_ns < 2000000) pause_ns *= 2;
    }
}

/* Whether a peer's notice that it gave up on a call waits for this rank: 1 yes, 0 no, -1 error
 * (rc_out set). Probed notice_polls times (transports/mpi.py says why). Runs without the GIL. */
static int notice_waiting(const Engine *e, int *rc_out) {
    if (e->iprobe == NULL) return 0;
    char status[512];
    int flag = 0, rc;
    intptr_t comm = comm_now(e);
    for (int poll = 0; poll < e->notice_polls && !flag; poll++) {
        if (e->handle_size == 4)
            rc = ((iprobe_i)e->iprobe)(e->any_source, e->notice_tag, (int32_t)comm, &flag,
                                       status);
        else
            rc = ((iprobe_p)e->iprobe)(e->any_source, e->notice_tag, (void *)comm, &flag,
                                       status);
        if (rc != 0) {
            *rc_out = rc;
            return -1;
        }
    }
    return flag != 0;
}

/* One round: send out[0:out_len] to dest, receive into inbox from source (deadline < 0: none).
 * 1 done, 0 deadline passed (requests left pending), -1 error. Runs without the GIL. */
static int round_trip(Engine *e, const unsigned char *out, Py_ssize_t out_len, int dest,
                      int source, double deadline, int *rc_out) {
    int rc;
    intptr_t comm = comm_now(e);
    /* Requests: two handles of handle_size bytes each. */
    union { int32_t i[2]; void *p[2]; } req;
    memset(&req, 0, sizeof(req));
    if (e->handle_size == 4) {
        rc = ((irecv_i)e->irecv)(e->inbox, (int)e->inbox_cap, (int32_t)e->byte_type, source,
                                 e->tag, (int32_t)comm, &req.i[0]);
        if (rc == 0)
            rc = ((isend_i)e->isend)(out, (int)out_len, (int32_t)e->byte_type, dest, e->tag,
                                     (int32_t)comm, &req.i[1]);
    } else {
        rc = ((irecv_p)e->irecv)(e->inbox, (int)e->inbox_cap, (void *)e->byte_type, source,
                                 e->tag, (void *)comm, &req.p[0]);
        if (rc == 0)
            rc = ((isend_p)e->isend)(out, (int)out_len, (void *)e->byte_type, dest, e->tag,
                                     (void *)comm, &req.p[1]);
    }
    if (rc != 0) {
        *rc_out = rc;
        return -1;
    }
    return wait_requests(e, &req, 2, deadline, rc_out);
}

/* Phase 2 of an allgather whose every rank split an array of ``len`` bytes, as
 * MPITransport.allgatherv runs it where the counts are equal and no deadline is set (a blocking
 * MPI_Allgather, which a Python rank's call matches), into the engine's receive buffer: a new
 * reference to it, or NULL with an exception set. */
static PyObject *engine_allgather(Engine *e, const void *data, Py_ssize_t len) {
    Py_ssize_t total = (Py_ssize_t)e->size * len;
    PyObject *buf = e->spare;
    if (buf == NULL || Py_REFCNT(buf) != 1 || PyByteArray_GET_SIZE(buf) != total) {
        buf = PyByteArray_FromStringAndSize(NULL, total);
        if (buf == NULL) return NULL;
        Py_XSETREF(e->spare, buf);
    }
    void *out = PyByteArray_AS_STRING(buf);
    intptr_t comm = comm_now(e);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    if (e->handle_size == 4)
        rc = ((allgather_i)e->allgather)(data, (int)len, (int32_t)e->byte_type, out, (int)len,
                                         (int32_t)e->byte_type, (int32_t)comm);
    else
        rc = ((allgather_p)e->allgather)(data, (int)len, (void *)e->byte_type, out, (int)len,
                                         (void *)e->byte_type, (void *)comm);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        mpi_error(e, rc);
        return NULL;
    }
    return Py_NewRef(buf);
}

/* The agreement block of ``n`` gathered slots (core/wire.py ``fold``). */
static void fold_slots(const unsigned char *recv, Py_ssize_t slot, Py_ssize_t n,
                       unsigned char *block) {
    unsigned char one[AGREE_SIZE];
    own_block(recv, block);
    for (Py_ssize_t i = 1; i < n; i++) {
        own_block(recv + i * slot, one);
        or_bytes(block, one, AGREE_SIZE);
    }
}

/* Ranks met in exchanges of both shapes: a block that shows disagreement on every rank. */
static void force_disagreement(unsigned char *block) {
    block[0] |= 1;
    block[CHECKED] |= 1;
    /* Each rank heard only part of the flags and lengths: every rank feeds the slot rule 0. */
    memset(block + 2 * CHECKED, 0, AGREE_SIZE - 2 * CHECKED);
}

/* The exchange of core/transport.py over MPI point to point; see transports/mpi.py for the
 * message format. 1 done, 0 the deadline passed, -1 error (exception set). Every round runs
 * without the GIL, released once: the buffers are this exchange's own while it runs (the
 * channel's lock keeps every other thread out). */
static int engine_exchange(Engine *e, const unsigned char *send, Py_ssize_t slot,
                           unsigned char *recv, unsigned char *block, int shape,
                           double deadline) {
    int n = e->size, r = e->rank;
    if (e->broken) {
        PyErr_SetString(PyExc_RuntimeError, "typedcoll: the exchange is unusable after a timeout");
        return -1;
    }
    own_block(send, block);
    Py_ssize_t region_len = 0;
    if (!(send[FLAGS_OFFSET] & FLAG_OVERFLOW)) {
        region_len = get_u32(send + LENGTH_OFFSET);
        if (region_len > slot - HEADER_SIZE) region_len = slot - HEADER_SIZE;
    }
    Py_ssize_t half = (n + 1) / 2;
    if (half < 1) half = 1;
    /* ``held``: the 8-byte message prefix, then the slots of ranks r, r+1, ... (a GATHER
     * message is its first bytes, sent in place). */
    if (grow(&e->inbox, &e->inbox_cap, PREFIX + AGREE_SIZE + half * slot) < 0 ||
        grow(&e->out, &e->out_cap, PREFIX + AGREE_SIZE + slot) < 0 ||
        grow(&e->region, &e->region_cap, slot) < 0 ||
        grow(&e->held, &e->held_cap, PREFIX + (Py_ssize_t)n * slot) < 0)
        return -1;
    unsigned char *held = e->held + PREFIX;
    Py_ssize_t have = 1;
    if (shape == SHAPE_GATHER) memcpy(held, send, (size_t)slot);
    else memcpy(e->region, send + HEADER_SIZE, (size_t)region_len);
    unsigned char seen = shape == SHAPE_GATHER ? 2 : 1; /* the shapes heard of: bit per shape */
    int rc = 0, status = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t dist = 1; dist < n; dist *= 2) {
        const unsigned char *out;
        Py_ssize_t count, out_len;
        unsigned char *o;
        if (shape == SHAPE_GATHER) {
            count = have < dist ? have : dist;
            if (count > n - dist) count = n - dist;
            o = e->held;
            out_len = PREFIX + count * slot;
        } else {
            count = region_len;
            o = e->out;
            memcpy(o + PREFIX, block, AGREE_SIZE);
            memcpy(o + PREFIX + AGREE_SIZE, e->region, (size_t)region_len);
            out_len = PREFIX + AGREE_SIZE + region_len;
        }
        o[0] = (unsigned char)shape;
        o[1] = seen;
        o[2] = o[3] = 0;
        put_u32(o + 4, (uint32_t)count);
        out = o;
        int dest = (int)((r - dist % n + n) % n), source = (int)((r + dist) % n);
        status = round_trip(e, out, out_len, dest, source, deadline, &rc);
        if (status <= 0) break;
        const unsigned char *in = e->inbox;
        int in_gather = in[0] == SHAPE_GATHER;
        seen |= (unsigned char)((in[1] & 3) | (in_gather ? 2 : 1));
        Py_ssize_t got = get_u32(in + 4);
        if (!in_gather) {
            or_bytes(block, in + PREFIX, AGREE_SIZE);
            if (shape != SHAPE_GATHER) {
                if (got > slot - HEADER_SIZE) got = slot - HEADER_SIZE;
                if (got > region_len) {
                    memset(e->region + region_len, 0, (size_t)(got - region_len));
                    region_len = got;
                }
                or_bytes(e->region, in + PREFIX + AGREE_SIZE, got);
            }
        } else if (shape == SHAPE_GATHER) {
            Py_ssize_t most = dist < n - dist ? dist : n - dist;
            if (got > most) got = most;
            if (got > n - have) got = n - have;
            memcpy(held + have * slot, in + PREFIX, (size_t)(got * slot));
            have += got;
        }
    }
    /* With a deadline, an exchange that completed still fails where a peer already gave up on
     * a call (it arrived after that peer's deadline: the peer's messages were sent before it
     * gave up): every rank then raises, none returns the call's data (transports/mpi.py). */
    if (status > 0 && deadline >= 0) {
        int noticed = notice_waiting(e, &rc);
        if (noticed != 0) status = noticed < 0 ? -1 : 0;
    }
    if (status > 0 && seen != 3) {
        if (shape == SHAPE_GATHER) {
            for (Py_ssize_t i = 0; i < have && i < n; i++) {
                Py_ssize_t owner = (r + i) % n;
                memcpy(recv + owner * slot, held + i * slot, (size_t)slot);
            }
        } else {
            memcpy(recv + HEADER_SIZE, e->region, (size_t)region_len);
            memset(recv + HEADER_SIZE + region_len, 0,
                   (size_t)(slot - HEADER_SIZE - region_len));
        }
    }
    Py_END_ALLOW_THREADS
    if (status < 0) return mpi_error(e, rc);
    if (status == 0) return 0;
    if (seen == 3) {
        force_disagreement(block);
    } else if (shape == SHAPE_GATHER) {
        if (have == n) fold_slots(recv, slot, n, block);
        else force_disagreement(block); /* a peer sent short: corrupt, never decoded */
    }
    return 1;
}

/* exchange(engine, send, recv, block, shape, deadline) -> bool: False when the deadline (a
 * time.monotonic() value; < 0: none) passed first. */
static PyObject *py_exchange(PyObject *mod, PyObject *args) {
    PyObject *capsule;
    Py_buffer send, recv, block;
    int shape;
    double deadline;
    if (!PyArg_ParseTuple(args, "Oy*w*w*id", &capsule, &send, &recv, &block, &shape, &deadline))
        return NULL;
    PyObject *result = NULL;
    Engine *e = (Engine *)PyCapsule_GetPointer(capsule, "typedcoll.engine");
    if (e != NULL) {
        if (send.len < HEADER_SIZE || recv.len != send.len * e->size || block.len != AGREE_SIZE) {
            PyErr_SetString(PyExc_ValueError, "exchange: expected a slot, size slots and a block");
        } else {
            int status = engine_exchange(e, send.buf, send.len, recv.buf, block.buf, shape,
                                         deadline);
            if (status >= 0) result = PyBool_FromLong(status);
        }
    }
    PyBuffer_Release(&send);
    PyBuffer_Release(&recv);
    PyBuffer_Release(&block);
    return result;
}
#endif

/* --- the steady state --- */
typedef struct {
    PyObject *send, *recv, *block, *exchange, *engine, *ring, *ring_objects, *ring_state,
        *counts, *busy, *acquire, *release, *timeout;
    Py_ssize_t slot, size, rank, capacity, min_slot, instance;
} Fast;

/* Protocol.fast read into ``f`` (borrowed references, valid while ``state`` is held): 1, or 0
 * when the C path must not run (None, or a shape that is not ours), -1 on error. */
static int read_fast(PyObject *state, Fast *f) {
    if (!PyList_CheckExact(state) || PyList_GET_SIZE(state) != F_COUNT) return 0;
    PyObject **items = ((PyListObject *)state)->ob_item;
    f->send = items[F_SEND];
    f->recv = items[F_RECV];
    f->block = items[F_BLOCK];
    f->exchange = items[F_EXCHANGE];
    f->engine = items[F_ENGINE];
    f->ring = items[F_RING];
    f->ring_objects = items[F_RING_OBJECTS];
    f->ring_state = items[F_RING_STATE];
    f->counts = items[F_COUNTS];
    f->busy = items[F_BUSY];
    f->acquire = items[F_ACQUIRE];
    f->release = items[F_RELEASE];
    f->timeout = items[F_TIMEOUT];
    f->slot = PyLong_AsSsize_t(items[F_SLOT]);
    f->size = PyLong_AsSsize_t(items[F_SIZE]);
    f->rank = PyLong_AsSsize_t(items[F_RANK]);
    f->capacity = PyLong_AsSsize_t(items[F_CAPACITY]);
    f->min_slot = PyLong_AsSsize_t(items[F_MIN_SLOT]);
    f->instance = PyLong_AsSsize_t(items[F_INSTANCE]);
    if (PyErr_Occurred()) return -1;
    if (!PyByteArray_Check(f->send) || PyByteArray_GET_SIZE(f->send) != f->slot ||
        !PyByteArray_Check(f->recv) || PyByteArray_GET_SIZE(f->recv) != f->slot * f->size ||
        !PyByteArray_Check(f->block) || PyByteArray_GET_SIZE(f->block) != AGREE_SIZE ||
        !PyList_CheckExact(f->busy) || PyList_GET_SIZE(f->busy) != BUSY_COUNT ||
        !PyDict_CheckExact(f->counts) || f->rank < 0 || f->rank >= f->size ||
        f->slot < 2 * HEADER_SIZE ||
        (f->ring != Py_None &&
         (!PyByteArray_Check(f->ring) || f->capacity <= 0 ||
          PyByteArray_GET_SIZE(f->ring) % ENTRY_SIZE != 0 ||
          PyByteArray_GET_SIZE(f->ring) > f->capacity * ENTRY_SIZE ||
          !PyList_CheckExact(f->ring_objects) ||
          PyList_GET_SIZE(f->ring_objects) !=
              OBJECTS_PER_ENTRY * (PyByteArray_GET_SIZE(f->ring) / ENTRY_SIZE) ||
          !PyList_CheckExact(f->ring_state)))) {
        PyErr_SetString(PyExc_RuntimeError, "typedcoll: inconsistent fast-path state");
        return -1;
    }
    return 1;
}

/* Leave the channel (Channel.unclaim): the marker cleared, then the lock released. */
static int release_channel(Fast *f) {
    if (PyList_SetItem(f->busy, BUSY_IDENT, PyLong_FromLong(0)) < 0) return -1;
    PyObject *done = PyObject_CallNoArgs(f->release);
    if (done == NULL) return -1;
    Py_DECREF(done);
    return 0;
}

static int slot_log2(Py_ssize_t slot) {
    int k = 0;
    while ((Py_ssize_t)1 << (k + 1) <= slot) k++;
    return k;
}

/* Decode ``n`` bytes at ``p`` with ``decode``: a new reference, or NULL with no exception set
 * when the Python steps must judge it (too deep, or any ordinary decoding failure), or NULL with
 * an exception set for a non-Exception error (KeyboardInterrupt), which propagates. */
static PyObject *decode_or_defer(PyObject *decode, const unsigned char *p, Py_ssize_t n) {
    if (n > MAX_NESTING && !nesting_within(p, n, MAX_NESTING)) return NULL;
    PyObject *view = PyMemoryView_FromMemory((char *)p, n, PyBUF_READ);
    if (view == NULL) return NULL;
    PyObject *item = PyObject_CallOneArg(decode, view);
    Py_DECREF(view);
    if (item == NULL && PyErr_ExceptionMatches(PyExc_Exception)) PyErr_Clear();
    return item;
}

/* Every slot's payload decoded in one call of ``list_decode`` (a decoder of a list of the
 * schema): the payloads copied behind one msgpack array header. Only when every payload is
 * exactly one complete msgpack object nested within the limit, so that the concatenation cannot
 * be read across a payload's bounds. A new list; NULL without an exception when the payloads
 * must be decoded one by one (which judges any failure), NULL with one on a hard error. */
static PyObject *decode_batch(PyObject *list_decode, const unsigned char *rb, Py_ssize_t slot,
                              Py_ssize_t size) {
    if (list_decode == Py_None || size < 2 || size > UINT32_MAX) return NULL;
    Py_ssize_t cap = slot - HEADER_SIZE, total = 5;
    for (Py_ssize_t i = 0; i < size; i++) {
        const unsigned char *h = rb + i * slot;
        Py_ssize_t len = get_u32(h + LENGTH_OFFSET), end = 0;
        if (len > cap || msgpack_walk(h + HEADER_SIZE, len, MAX_NESTING - 1, &end) != 1 ||
            end != len)
            return NULL;
        total += len;
    }
    PyObject *joined = PyBytes_FromStringAndSize(NULL, total);
    if (joined == NULL) return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(joined);
    out[0] = 0xDD; /* array32, big-endian count */
    out[1] = (unsigned char)(size >> 24);
    out[2] = (unsigned char)(size >> 16);
    out[3] = (unsigned char)(size >> 8);
    out[4] = (unsigned char)size;
    Py_ssize_t at = 5;
    for (Py_ssize_t i = 0; i < size; i++) {
        const unsigned char *h = rb + i * slot;
        Py_ssize_t len = get_u32(h + LENGTH_OFFSET);
        memcpy(out + at, h + HEADER_SIZE, (size_t)len);
        at += len;
    }
    PyObject *values = PyObject_CallOneArg(list_decode, joined);
    Py_DECREF(joined);
    if (values == NULL) {
        if (PyErr_ExceptionMatches(PyExc_Exception)) PyErr_Clear();
        return NULL;
    }
    if (!PyList_CheckExact(values) || PyList_GET_SIZE(values) != size) {
        Py_DECREF(values);
        return NULL;
    }
    return values;
}

/* A value encoded as the Python steps encode it: msgspec's bytes, nested at most MAX_NESTING
 * deep, and where ``validate``, decoded back as the schema (a payload only its receiver decodes:
 * this rank must judge it, so that a bad value fails here and the Python steps flag it to every
 * rank). The bytes, or NULL: with no exception set, not the steady state; with one, what the
 * encoder or the decoder raised. */
static PyObject *encode_checked(PyObject *value, PyObject *decode, int validate) {
    PyObject *payload = PyObject_CallOneArg(ENCODE, value);
    if (payload == NULL) return NULL;
    Py_ssize_t n = PyBytes_Check(payload) ? PyBytes_GET_SIZE(payload) : -1;
    if (n < 0 || (n > MAX_NESTING &&
                  !nesting_within((const unsigned char *)PyBytes_AS_STRING(payload), n,
                                  MAX_NESTING))) {
        Py_DECREF(payload);
        return NULL;
    }
    if (validate) {
        PyObject *checked = PyObject_CallOneArg(decode, payload);
        if (checked == NULL) {
            Py_DECREF(payload);
            return NULL;
        }
        Py_DECREF(checked);
    }
    return payload;
}

/* A scatter root's (an alltoall rank's) values, each checked and encoded as core/parts.py does
 * (an instance of the record class, then encode_checked), each part the class path prefix (for
 * scatter) and the value, packed: u32 count, count u32 end offsets, the parts. NULL and no
 * exception: not the steady state (the Python steps judge it); NULL with one: a hard error. */
static PyObject *pack_parts(PyObject *values, Py_ssize_t size, PyObject *record_class,
                            PyObject *decode, PyObject *prefix, Py_ssize_t cap) {
    if ((!PyList_CheckExact(values) && !PyTuple_CheckExact(values)) ||
        PySequence_Fast_GET_SIZE(values) != size || size > cap / 4)
        return NULL;
    PyObject **encoded = PyMem_Calloc((size_t)size, sizeof(PyObject *));
    if (encoded == NULL) return PyErr_NoMemory();
    PyObject *packed = NULL;
    Py_ssize_t prefix_len = PyBytes_GET_SIZE(prefix), total = 4 + 4 * size, i;
    for (i = 0; i < size; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(values, i);
        if (record_class != Py_None) {
            int is = PyObject_IsInstance(item, record_class);
            if (is <= 0) goto done; /* an error, or "expected RankState, got dict": Python's */
        }
        if ((encoded[i] = encode_checked(item, decode, 1)) == NULL) goto done;
        total += prefix_len + PyBytes_GET_SIZE(encoded[i]);
        if (total > cap) goto done;
    }
    packed = PyBytes_FromStringAndSize(NULL, total);
    if (packed == NULL) goto done;
    {
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(packed);
        Py_ssize_t body = 4 + 4 * size, at = body;
        put_u32(out, (uint32_t)size);
        for (i = 0; i < size; i++) {
            Py_ssize_t n = PyBytes_GET_SIZE(encoded[i]);
            memcpy(out + at, PyBytes_AS_STRING(prefix), (size_t)prefix_len);
            memcpy(out + at + prefix_len, PyBytes_AS_STRING(encoded[i]), (size_t)n);
            at += prefix_len + n;
            put_u32(out + 4 + 4 * i, (uint32_t)(at - body)); /* end offsets count from the parts */
        }
    }
done:
    for (i = 0; i < size; i++) Py_XDECREF(encoded[i]);
    PyMem_Free(encoded);
    if (packed == NULL && PyErr_Occurred() && PyErr_ExceptionMatches(PyExc_Exception))
        PyErr_Clear(); /* a value that does not encode or check: the Python steps report it */
    return packed;
}

/* This rank's part of a packed payload (core/parts.py: u32 count, count u32 end offsets, the
 * parts): 1 with *part and *part_len set, 0 when the framing is not what the packer writes (the
 * Python steps judge it, from the same bytes on every rank). */
static int own_part(const unsigned char *region, Py_ssize_t len, Py_ssize_t cap, Py_ssize_t size,
                    Py_ssize_t rank, const unsigned char **part, Py_ssize_t *part_len) {
    Py_ssize_t body = 4 + 4 * size, start = 0, stop = 0, prev = 0;
    if (len > cap || len < body || get_u32(region) != (uint32_t)size) return 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        Py_ssize_t end = get_u32(region + 4 + 4 * i);
        if (end < prev) return 0;
        if (i == rank) {
            start = prev;
            stop = end;
        }
        prev = end;
    }
    if (prev != len - body) return 0;
    *part = region + body + start;
    *part_len = stop - start;
    return 1;
}

/* A rooted payload (its class path prefix, then the value) decoded, in a 1-item list. NULL and
 * no exception: not well formed, or not the class path ``expect`` (a guessed class's prefix;
 * NULL: any), or not decoded here (the Python steps judge it); NULL with one: a hard error. */
static PyObject *rooted_item(PyObject *decode, const unsigned char *p, Py_ssize_t len,
                             PyObject *expect) {
    if (len < 1 || 1 + (Py_ssize_t)p[0] > len) return NULL;
    if (expect != NULL && (PyBytes_GET_SIZE(expect) != 1 + (Py_ssize_t)p[0] ||
                           memcmp(p, PyBytes_AS_STRING(expect), (size_t)(1 + p[0])) != 0))
        return NULL;
    Py_ssize_t skip = 1 + p[0];
    PyObject *item = decode_or_defer(decode, p + skip, len - skip);
    if (item == NULL) return NULL;
    PyObject *values = PyList_New(1);
    if (values == NULL) {
        Py_DECREF(item);
        return NULL;
    }
    PyList_SET_ITEM(values, 0, item);
    return values;
}

static PyObject *steady(PyObject *proto, PyObject *value, PyObject *info, PyObject *step_obj,
                        PyObject *name, PyObject *op, long root, long reduce_op, int kind,
                        PyObject *schema, int guessed) {
    /* --- every check before anything is touched: TAKE_PY and the Python steps run all --- */
    PyObject *state = PyObject_GetAttr(proto, s_fast);
    if (state == NULL) return NULL;
    Fast f;
    int usable = read_fast(state, &f);
    if (usable <= 0) {
        Py_DECREF(state);
        return usable < 0 ? NULL : take_py();
    }
    PyObject *result = NULL, *payload = NULL, *identity = NULL, *info_fast = NULL,
             *callers = NULL;
    PyCodeObject *code = NULL;
    PyObject *via = NULL;
    int lasti = 0, observed_here = 0;
    Py_buffer data_view; /* a split array's data (KIND_ARRAYS), held until phase 2 is done */
    int have_view = 0;
    /* A collision to report, or a broken channel: the Python steps say so. */
    if (PyList_GET_ITEM(f.busy, BUSY_POISON) != Py_None ||
        PyList_GET_ITEM(f.busy, BUSY_BROKEN) != Py_False)
        goto take;
    /* A deadline needs the C engine: a Python exchange reports its timeout as an exception. */
    if (f.engine != Py_None && !PyCapsule_CheckExact(f.engine)) goto take;
    if (f.timeout != Py_None && f.engine == Py_None) goto take;
    long long step;
    {
        PyObject *s = step_obj == Py_None ? PyObject_GetAttr(proto, s_step) : Py_NewRef(step_obj);
        if (s == NULL) goto error;
        int overflow = 0;
        step = PyLong_CheckExact(s) ? PyLong_AsLongLongAndOverflow(s, &overflow) : 0;
        int bad = !PyLong_CheckExact(s) || overflow || (step_obj != Py_None && step == INT64_MIN);
        Py_DECREF(s);
        if (PyErr_Occurred()) goto error;
        if (bad) goto take;
    }
    if (name != Py_None &&
        (!PyUnicode_CheckExact(name) || PyUnicode_GET_LENGTH(name) < 1 ||
         PyUnicode_GET_LENGTH(name) > MAX_NAME))
        goto take;
    PyObject *opcode_obj = PyDict_GetItemWithError(OPS, op);
    if (opcode_obj == NULL) {
        if (PyErr_Occurred()) goto error;
        goto take;
    }
    long opcode = PyLong_AsLong(opcode_obj);
    Py_ssize_t n = 0;
    PyObject *fp = NULL, *decode = NULL, *record_class = Py_None, *prefix = NULL,
             *list_decode = Py_None, *array_fp = NULL;
    /* The schema runs user code decoding (codecs/hooks.py): the header says so, and the flag in
     * the block hands the call to the Python steps after the exchange, which settle it. */
    int hooked = 0;
    /* A split array (KIND_ARRAYS): the data's length, which phase 2 moves; < 0: none. */
    long long split_len = -1;
    if (kind == KIND_ARRAYS) {
        /* value: (inline bytes, dtype fingerprint, decoder of equal slots, the data phase 2
         * moves or None), as the Python steps would write the array's slot
         * (core/array_slots.py); info: the ndarray schema's. */
        if (!PyTuple_CheckExact(value) || PyTuple_GET_SIZE(value) != 4) goto take;
        payload = Py_NewRef(PyTuple_GET_ITEM(value, 0));
        array_fp = PyTuple_GET_ITEM(value, 1);
        list_decode = PyTuple_GET_ITEM(value, 2);
        if (PyTuple_GET_ITEM(value, 3) != Py_None) {
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(value, 3), &data_view, PyBUF_SIMPLE) < 0)
                goto error;
            have_view = 1;
            split_len = data_view.len;
        }
        info_fast = PyObject_GetAttr(info, s_fingerprint);
        if (info_fast == NULL) goto error;
        fp = info_fast;
        if (!PyBytes_Check(payload) || !PyBytes_Check(fp) || PyBytes_GET_SIZE(fp) != 8 ||
            !PyBytes_Check(array_fp) || PyBytes_GET_SIZE(array_fp) != 8 ||
            split_len > (long long)UINT32_MAX)
            goto take;
        n = PyBytes_GET_SIZE(payload);
        if (n > f.slot - HEADER_SIZE) goto take;
    } else if (kind != KIND_EMPTY) {
        /* (fingerprint, decode, record class, path prefix, decode of a list or None, whether
         * decoding runs user code) */
        info_fast = PyObject_GetAttr(info, s_fast);
        if (info_fast == NULL) goto error;
        if (!PyTuple_Check(info_fast) || PyTuple_GET_SIZE(info_fast) != 6) goto take;
        fp = PyTuple_GET_ITEM(info_fast, 0);
        decode = PyTuple_GET_ITEM(info_fast, 1);
        record_class = PyTuple_GET_ITEM(info_fast, 2);
        prefix = PyTuple_GET_ITEM(info_fast, 3);
        list_decode = PyTuple_GET_ITEM(info_fast, 4);
        hooked = PyTuple_GET_ITEM(info_fast, 5) == Py_True;
        if (!PyBytes_Check(fp) || PyBytes_GET_SIZE(fp) != 8 || !PyBytes_Check(prefix)) goto take;
    }
    int sends = kind == KIND_ALL || kind == KIND_GATHER || kind == KIND_ALLTOALL ||
                ((kind == KIND_BCAST || kind == KIND_SCATTER) && f.rank == root);
    /* A sender that checks its values by decoding them back would run their hooks here, before
     * the exchange, where an interrupt they raise would leave the peers waiting: the Python
     * steps check them, flag an interrupt to every rank and raise it after the exchange. */
    if (hooked && sends && (kind == KIND_GATHER || kind == KIND_SCATTER || kind == KIND_ALLTOALL))
        goto take;
    Py_ssize_t prefix_len = kind == KIND_BCAST && sends ? PyBytes_GET_SIZE(prefix) : 0;
    if ((kind == KIND_BCAST || kind == KIND_SCATTER) && !sends && schema == Py_None && !guessed)
        goto take; /* it takes the root's class by name */
    if (sends && (kind == KIND_SCATTER || kind == KIND_ALLTOALL)) {
        /* scatter's parts carry the class path (its receivers may name no schema) */
        payload = pack_parts(value, f.size, record_class, decode,
                             kind == KIND_SCATTER ? prefix : EMPTY_BYTES, f.slot - HEADER_SIZE);
        if (payload == NULL) {
            if (PyErr_Occurred()) goto error;
            goto take;
        }
        n = PyBytes_GET_SIZE(payload);
    } else if (sends) {
        if (record_class != Py_None) {
            int is = PyObject_IsInstance(value, record_class);
            if (is < 0) goto error;
            if (!is) goto take; /* "expected RankState, got dict", from the Python steps */
        }
        /* A value whose payload cannot fit the slot is the Python steps' to encode (phase 2
         * moves it), without being encoded here first: msgpack writes at least one byte per
         * item of a list or tuple, per character of a str, per byte of bytes, two per entry of
         * a dict. */
        Py_ssize_t at_least = PyList_CheckExact(value)    ? PyList_GET_SIZE(value)
                              : PyTuple_CheckExact(value)   ? PyTuple_GET_SIZE(value)
                              : PyUnicode_CheckExact(value) ? PyUnicode_GET_LENGTH(value)
                              : PyBytes_CheckExact(value)   ? PyBytes_GET_SIZE(value)
                              : PyDict_CheckExact(value)    ? 2 * PyDict_GET_SIZE(value)
                                                            : 0;
        if (at_least + prefix_len > f.slot - HEADER_SIZE) goto take;
        /* Only the root decodes a gather payload. */
        payload = encode_checked(value, decode, kind == KIND_GATHER);
        if (payload == NULL) {
            if (!PyErr_Occurred()) goto take;
            Py_DECREF(state);
            Py_XDECREF(info_fast);
            return take_py_after_error();
        }
        n = PyBytes_GET_SIZE(payload);
        if (n + prefix_len > f.slot - HEADER_SIZE) goto take;
    }
    /* A bitwise reduction of floats is refused by the Python steps, on every rank alike. */
    if (reduce_op >= 8 && PyFloat_CheckExact(value)) goto take;

    {
        /* Enter, or find another thread inside (then the Python steps refuse this call): the
         * lock is tested and taken in one step, with no Python code between the two. */
        PyObject *got = PyObject_CallOneArg(f.acquire, Py_False);
        if (got == NULL) goto error;
        int entered = got == Py_True;
        Py_DECREF(got);
        if (!entered) goto take;
        PyObject *me = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
        if (me == NULL || PyList_SetItem(f.busy, BUSY_IDENT, me) < 0) {
            release_channel(&f);
            goto error;
        }
    }

    /* --- from here the call is issued: no more TAKE_PY --- */
    /* An unnamed call whose site is a role branch's (rooted calls) or one its function picks:
     * its callers are part of its identity (core/callers.py). */
    if (name == Py_None)
        identity = unnamed_identity(root >= 0, &code, &lasti, &via, &callers);
    else if (user_site(&code, &lasti, &via, NULL) == 0)
        identity = name_identity(name);
    if (identity == NULL) goto error;
    {
        PyObject *where = PyLong_FromLong(lasti);
        if (where == NULL) goto error;
        if (PyList_SetItem(f.busy, BUSY_LASTI, where) < 0 ||
            PyList_SetItem(f.busy, BUSY_CODE, Py_NewRef(code ? (PyObject *)code : Py_None)) < 0)
            goto error;
    }
    long long seq;
    Py_ssize_t occurrence;
    {
        PyObject *cur = PyObject_GetAttr(proto, s_seq);
        if (cur == NULL) goto error;
        seq = PyLong_AsLongLong(cur);
        Py_DECREF(cur);
        if (PyErr_Occurred()) goto error;
        PyObject *next = PyLong_FromLongLong(seq + 1);
        if (next == NULL) goto error;
        int rc = PyObject_SetAttr(proto, s_seq, next);
        Py_DECREF(next);
        if (rc < 0) goto error;
        PyObject *count = PyDict_GetItemWithError(f.counts, identity);
        if (count == NULL && PyErr_Occurred()) goto error;
        occurrence = (count ? PyLong_AsSsize_t(count) : 0) + 1;
        PyObject *occ = PyLong_FromSsize_t(occurrence);
        if (occ == NULL) goto error;
        rc = PyDict_SetItem(f.counts, identity, occ);
        Py_DECREF(occ);
        if (rc < 0) goto error;
    }
    /* A call this rank took in a role branch sends the role identity it learned there
     * (core/roles.py): its arm, as seen from the root. */
    unsigned char role_fp[8];
    int role = 0;
    if (name == Py_None && root >= 0) {
        PyObject *roles = PyObject_GetAttr(proto, s_roles);
        if (roles == NULL) goto error;
        if (PyDict_CheckExact(roles) && PyDict_GET_SIZE(roles) > 0) {
            PyObject *pair = PyDict_GetItemWithError(roles, identity); /* borrowed */
            if (pair == NULL && PyErr_Occurred()) {
                Py_DECREF(roles);
                goto error;
            }
            if (pair != NULL && PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2) {
                PyObject *side = PyTuple_GET_ITEM(pair, f.rank == root);
                if (PyBytes_CheckExact(side) && PyBytes_GET_SIZE(side) == 8) {
                    memcpy(role_fp, PyBytes_AS_STRING(side), 8);
                    role = 1;
                }
            }
        }
        Py_DECREF(roles);
    }
    unsigned char *s = (unsigned char *)PyByteArray_AS_STRING(f.send);
    if (prefix_len) memcpy(s + HEADER_SIZE, PyBytes_AS_STRING(prefix), (size_t)prefix_len);
    if (n) memcpy(s + HEADER_SIZE + prefix_len, PyBytes_AS_STRING(payload), (size_t)n);
    s[0] = MAGIC;
    s[1] = (unsigned char)opcode;
    s[2] = (unsigned char)reduce_op;
    s[3] = (unsigned char)slot_log2(f.slot);
    put_u32(s + 4, (uint32_t)(int32_t)root); /* NO_ROOT from every entry whose op has none */
    put_u64(s + 8, (uint64_t)seq);
    put_u64(s + 16, (uint64_t)step);
    if (fp != NULL) memcpy(s + 24, PyBytes_AS_STRING(fp), 8);
    else memset(s + 24, 0, 8);
    if (array_fp != NULL) memcpy(s + 32, PyBytes_AS_STRING(array_fp), 8);
    else memset(s + 32, 0, 8);
    memcpy(s + 40, role ? role_fp : (const unsigned char *)PyBytes_AS_STRING(identity), 8);
    put_u32(s + 48, (uint32_t)f.instance);
    put_u32(s + 52, (uint32_t)f.slot);
    s[FLAGS_OFFSET] = (unsigned char)((split_len < 0 ? 0 : FLAG_OVERFLOW | FLAG_SPLIT_ARRAY) |
                                      (guessed ? FLAG_GUESSED : 0) | (role ? FLAG_ROLE : 0) |
                                      (hooked ? FLAG_DECODE_HOOK : 0));
    s[57] = s[58] = s[59] = 0;
    put_u32(s + LENGTH_OFFSET, (uint32_t)(split_len < 0 ? n + prefix_len : split_len));
    if (record_start(f.ring, f.ring_objects, f.ring_state, f.capacity, seq, opcode,
                     kind == KIND_EMPTY ? Py_None : info, code, lasti, step, n + prefix_len,
                     name, occurrence, via, callers, root, reduce_op) < 0)
        goto error;

    int shape = kind == KIND_BCAST || kind == KIND_EMPTY || kind == KIND_SCATTER ? SHAPE_REDUCE
                                                                                : SHAPE_GATHER;
    double deadline = -1;
    if (f.timeout != Py_None) {
        double t = PyFloat_AsDouble(f.timeout);
        if (t == -1 && PyErr_Occurred()) goto error;
        deadline = monotonic() + t;
    }
    int timed_out = 0;
    unsigned char *rb = (unsigned char *)PyByteArray_AS_STRING(f.recv);
    unsigned char *block = (unsigned char *)PyByteArray_AS_STRING(f.block);
#ifdef HAVE_ENGINE
    if (f.engine != Py_None) {
        Engine *e = (Engine *)PyCapsule_GetPointer(f.engine, "typedcoll.engine");
        if (e == NULL) goto error;
        int status = engine_exchange(e, s, f.slot, rb, block, shape, deadline);
        if (status < 0) goto error;
        timed_out = status == 0;
    } else
#endif
    {
        PyObject *shape_obj = PyLong_FromLong(shape);
        if (shape_obj == NULL) goto error;
        PyObject *done = PyObject_CallFunctionObjArgs(f.exchange, f.send, f.recv, f.block,
                                                      shape_obj, Py_None, NULL);
        Py_DECREF(shape_obj);
        if (done == NULL) goto error;
        /* False: the backend failed the exchange (fast.py keeps why); the Python steps report
         * it as they report a deadline that passed. */
        timed_out = done == Py_False;
        Py_DECREF(done);
    }
    /* Buffers may have been replaced by a thread that ran Python code meanwhile? No: busy
     * keeps other threads out, and the protocol's buffers change only on its own thread. */
    rb = (unsigned char *)PyByteArray_AS_STRING(f.recv);
    block = (unsigned char *)PyByteArray_AS_STRING(f.block);
    /* A split array's steady state has the two flags of every rank's split array set. */
    int split_steady = split_len >= 0 && block[AGREE_FLAGS] == (FLAG_OVERFLOW | FLAG_SPLIT_ARRAY);
    /* Receivers that guessed the root's class, ranks that sent a role identity, all right (the
     * headers agree): steady too. */
    int guess_steady = (block[AGREE_FLAGS] & ~(FLAG_GUESSED | FLAG_ROLE)) == 0;
    if (timed_out || (block[AGREE_FLAGS] != 0 && !split_steady && !guess_steady) ||
        !block_agreed(block))
        goto resume;

    /* --- the steady state: feed the slot rule (as every rank does, whatever happens next),
     * then decode what this rank needs --- */
    Py_ssize_t cap = f.slot - HEADER_SIZE;
    uint32_t or_len = get_u32(block + AGREE_LENGTH);
    if (f.slot != f.min_slot || HEADER_SIZE + (Py_ssize_t)or_len > f.slot) {
        PyObject *pol = PyObject_GetAttr(proto, s_policy);
        PyObject *len_obj = pol ? PyLong_FromUnsignedLong(or_len) : NULL;
        PyObject *observed = len_obj ? PyObject_CallMethodOneArg(pol, s_observe, len_obj) : NULL;
        Py_XDECREF(len_obj);
        PyObject *size_now = observed ? PyObject_GetAttr(pol, s_size) : NULL;
        Py_XDECREF(observed);
        Py_XDECREF(pol);
        if (size_now == NULL) goto error;
        Py_ssize_t new_size = PyLong_AsSsize_t(size_now);
        Py_DECREF(size_now);
        /* A new slot size takes effect at the next call, through the Python steps. */
        if (new_size != f.slot && PyObject_SetAttr(proto, s_fast, Py_None) < 0) goto error;
    }
    observed_here = 1;
    PyObject *values = NULL;
    if (kind == KIND_ALLTOALL) {
        /* This rank's part of every rank's packed parts (core/parts.py). */
        values = PyList_New(f.size);
        if (values == NULL) goto error;
        for (Py_ssize_t r = 0; r < f.size; r++) {
            const unsigned char *h = rb + r * f.slot, *part;
            Py_ssize_t part_len;
            PyObject *item = own_part(h + HEADER_SIZE, get_u32(h + LENGTH_OFFSET), cap, f.size,
                                      f.rank, &part, &part_len)
                ? decode_or_defer(decode, part, part_len) : NULL;
            if (item == NULL) {
                Py_DECREF(values);
                if (PyErr_Occurred()) goto error;
                goto resume;
            }
            PyList_SET_ITEM(values, r, item);
        }
    }
    if (kind == KIND_ARRAYS && split_len >= 0) {
        /* Every rank split an array of this rank's dtype and shape: each slot holds this
         * rank's prefix, both flags and this length. Phase 2 then runs here, where the engine
         * can run it as the Python steps would (no deadline); anything else is theirs. Past
         * that call there is no handing over: phase 2 is done. */
#ifdef HAVE_ENGINE
        Engine *e = NULL;
        if (f.engine != Py_None)
            e = (Engine *)PyCapsule_GetPointer(f.engine, "typedcoll.engine");
        if (e == NULL) {
            if (PyErr_Occurred()) goto error;
            goto resume;
        }
        if (f.timeout != Py_None || e->allgather == NULL || split_len > INT32_MAX ||
            split_len > PY_SSIZE_T_MAX / f.size)
            goto resume;
        for (Py_ssize_t r = 0; r < f.size; r++) {
            const unsigned char *h = rb + r * f.slot;
            if (h[FLAGS_OFFSET] != (FLAG_OVERFLOW | FLAG_SPLIT_ARRAY) ||
                (long long)get_u32(h + LENGTH_OFFSET) != split_len ||
                memcmp(h + HEADER_SIZE, PyBytes_AS_STRING(payload), (size_t)n) != 0)
                goto resume;
        }
        PyObject *data = engine_allgather(e, data_view.buf, (Py_ssize_t)split_len);
        if (data == NULL) goto error;
        values = PyObject_CallFunction(list_decode, "OOn", payload, data, f.size);
        Py_DECREF(data);
        if (values == NULL) goto error;
        if (!PyList_CheckExact(values) || PyList_GET_SIZE(values) != f.size) {
            Py_DECREF(values);
            PyErr_SetString(PyExc_RuntimeError, "typedcoll: equal split arrays did not decode");
            goto error;
        }
#else
        goto resume;
#endif
    } else if (kind == KIND_ARRAYS) {
        /* The steady state of a control plane: every rank sent the same prefix (dtype and
         * shape) and so the same length. The data regions, copied behind each other into one
         * buffer, are decoded in one call; anything else is the Python steps' to decode. */
        Py_ssize_t len0 = get_u32(rb + LENGTH_OFFSET);
        Py_ssize_t k = len0 < 2 ? 0 : 2 + (Py_ssize_t)(rb[HEADER_SIZE] | rb[HEADER_SIZE + 1] << 8);
        if (len0 < 2 || len0 > cap || k > len0) goto resume;
        for (Py_ssize_t r = 1; r < f.size; r++) {
            const unsigned char *h = rb + r * f.slot;
            if ((Py_ssize_t)get_u32(h + LENGTH_OFFSET) != len0 ||
                memcmp(h + HEADER_SIZE, rb + HEADER_SIZE, (size_t)k) != 0)
                goto resume;
        }
        PyObject *head = PyBytes_FromStringAndSize((const char *)rb + HEADER_SIZE, k);
        PyObject *data = head ? PyByteArray_FromStringAndSize(NULL, f.size * (len0 - k)) : NULL;
        if (data == NULL) {
            Py_XDECREF(head);
            goto error;
        }
        char *d = PyByteArray_AS_STRING(data);
        for (Py_ssize_t r = 0; r < f.size; r++)
            memcpy(d + r * (len0 - k), rb + r * f.slot + HEADER_SIZE + k, (size_t)(len0 - k));
        values = PyObject_CallFunction(list_decode, "OOn", head, data, f.size);
        Py_DECREF(head);
        Py_DECREF(data);
        if (values == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) goto error;
            PyErr_Clear();
            goto resume;
        }
        if (!PyList_CheckExact(values) || PyList_GET_SIZE(values) != f.size) {
            Py_DECREF(values);
            goto resume;
        }
    }
    if (kind == KIND_ALL || (kind == KIND_GATHER && f.rank == root)) {
        values = decode_batch(list_decode, rb, f.slot, f.size);
        if (values == NULL && PyErr_Occurred()) goto error;
    }
    if (values == NULL && (kind == KIND_ALL || (kind == KIND_GATHER && f.rank == root))) {
        values = PyList_New(f.size);
        if (values == NULL) goto error;
        for (Py_ssize_t i = 0; i < f.size; i++) {
            const unsigned char *h = rb + i * f.slot;
            Py_ssize_t len = get_u32(h + LENGTH_OFFSET);
            PyObject *item = len <= cap ? decode_or_defer(decode, h + HEADER_SIZE, len) : NULL;
            if (item == NULL) {
                Py_DECREF(values);
                if (PyErr_Occurred()) goto error;
                goto resume;
            }
            PyList_SET_ITEM(values, i, item);
        }
    } else if (kind == KIND_BCAST || kind == KIND_SCATTER) {
        /* The root's payload; for scatter, this rank's part of the root's packed parts. */
        const unsigned char *part = rb + HEADER_SIZE;
        Py_ssize_t part_len = or_len;
        int framed = kind == KIND_BCAST ? part_len <= cap
                                         : own_part(rb + HEADER_SIZE, or_len, cap, f.size, f.rank,
                                                    &part, &part_len);
        values = framed ? rooted_item(decode, part, part_len, guessed ? prefix : NULL) : NULL;
        if (values == NULL) {
            if (PyErr_Occurred()) goto error;
            goto resume;
        }
    }
    if (record_complete(f.ring, f.ring_state, f.capacity) < 0) {
        Py_XDECREF(values);
        goto error;
    }
    if (release_channel(&f) < 0) {
        Py_XDECREF(values);
        goto error;
    }
    if (kind == KIND_ALL || kind == KIND_ALLTOALL || kind == KIND_ARRAYS) {
        result = values;
    } else {
        result = PyList_New(1);
        if (result == NULL) {
            Py_XDECREF(values);
            goto error;
        }
        PyList_SET_ITEM(result, 0, kind == KIND_EMPTY || (kind == KIND_GATHER && f.rank != root)
                                       ? Py_NewRef(Py_None)
                                   : kind == KIND_BCAST || kind == KIND_SCATTER
                                       ? Py_NewRef(PyList_GET_ITEM(values, 0))
                                                        : Py_NewRef(values));
        Py_XDECREF(values);
    }
    goto cleanup;
resume:
    /* Exchanged, not the steady state: the Python steps finish from the same bytes (the
     * channel stays busy until they do). */
    result = Py_BuildValue("(OiOOLnNOO)", code ? (PyObject *)code : Py_None, lasti,
                           via ? via : Py_None, callers ? callers : EMPTY_TUPLE,
                           seq, occurrence,
                           deadline < 0 ? Py_NewRef(Py_None) : PyFloat_FromDouble(deadline),
                           timed_out ? Py_True : Py_False, observed_here ? Py_True : Py_False);
    goto cleanup;
take:
    result = take_py();
    goto cleanup;
error:
    result = NULL;
cleanup:
    if (have_view) PyBuffer_Release(&data_view);
    Py_XDECREF(code);
    Py_XDECREF(via);
    Py_XDECREF(callers);
    Py_XDECREF(identity);
    Py_XDECREF(payload);
    Py_XDECREF(info_fast);
    Py_DECREF(state);
    return result;
}

/* --- entry points (core/fast.py) --- */
static PyObject *schema_info(PyObject *value, PyObject *schema) {
    return lookup_info(schema == Py_None ? (PyObject *)Py_TYPE(value) : schema);
}

/* allgather(protocol, value, schema, step, name, op[, reduce_code, root]): "allgather",
 * "flush", or "alltoall" (the value: a sequence of one part per rank; its schema, if none is
 * named, that of its first item; the Python steps call it only up to the ranks of a GATHER
 * alltoall); with a reduce op code and a root (NO_ROOT: none), the mpi4py drop-in's GATHER
 * calls of values under ``Any`` (compat/objects.py): "allreduce" and "reduce" decoded on every
 * rank, "gather" on the root only, the header naming both as the Python steps write them */
static PyObject *allgather_impl(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 && nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "allgather expects 6 or 8 arguments");
        return NULL;
    }
    int kind = KIND_ALL;
    long code = 0, root = NO_ROOT;
    if (nargs == 8) {
        int overflow = 0;
        code = PyLong_AsLong(args[6]);
        root = PyLong_AsLongAndOverflow(args[7], &overflow);
        if (overflow || ((code == -1 || root == -1) && PyErr_Occurred())) {
            PyErr_Clear();
            return take_py();
        }
        if (code < 0 || code > 255 || root < NO_ROOT) return take_py();
        if (PyUnicode_CompareWithASCIIString(args[5], "gather") == 0) kind = KIND_GATHER;
    }
    PyObject *typed = args[1];
    if (PyUnicode_CompareWithASCIIString(args[5], "alltoall") == 0) {
        kind = KIND_ALLTOALL; /* the value: a sequence of one part per rank */
        if (args[2] == Py_None) {
            if ((!PyList_CheckExact(typed) && !PyTuple_CheckExact(typed)) ||
                PySequence_Fast_GET_SIZE(typed) < 1)
                return take_py();
            typed = PySequence_Fast_GET_ITEM(typed, 0);
        }
    }
    PyObject *info = schema_info(typed, args[2]);
    if (info == NULL) return PyErr_Occurred() ? NULL : take_py();
    return steady(args[0], args[1], info, args[3], args[4], args[5], root, code, kind,
                  args[2], 0);
}

/* 1 when this rank is not ``root`` of a communicator the C path serves, 0 when it is (or the C
 * path does not serve it: steady says so), -1 on error. */
static int is_receiver(PyObject *proto, long root) {
    PyObject *state = PyObject_GetAttr(proto, s_fast);
    if (state == NULL) return -1;
    int receiver = 0;
    if (PyList_CheckExact(state) && PyList_GET_SIZE(state) == F_COUNT) {
        Py_ssize_t rank = PyLong_AsSsize_t(PyList_GET_ITEM(state, F_RANK));
        if (rank == -1 && PyErr_Occurred()) receiver = -1;
        else receiver = rank != root;
    }
    Py_DECREF(state);
    return receiver;
}

/* The root's class a receiver that names no schema took at this call last time (a new
 * reference to its SchemaInfo), or NULL: with an exception on error, without one when there is
 * none (or the name is not one the C path takes). The identity is found as steady finds it. */
static PyObject *guessed_info(PyObject *proto, PyObject *name) {
    PyObject *identity;
    if (name == Py_None) {
        PyCodeObject *code = NULL;
    PyObject *via = NULL;
        PyObject *levels = NULL;
        int lasti = 0;
        identity = unnamed_identity(1, &code, &lasti, &via, &levels); /* a rooted call */
        Py_XDECREF(levels);
        Py_XDECREF(code);
        Py_XDECREF(via);
    } else if (PyUnicode_CheckExact(name) && PyUnicode_GET_LENGTH(name) >= 1 &&
               PyUnicode_GET_LENGTH(name) <= MAX_NAME) {
        identity = name_identity(name);
    } else {
        return NULL;
    }
    if (identity == NULL) return NULL;
    PyObject *guesses = PyObject_GetAttr(proto, s_guesses), *info = NULL;
    if (guesses != NULL && PyDict_CheckExact(guesses)) {
        info = PyDict_GetItemWithError(guesses, identity);
        Py_XINCREF(info);
    }
    Py_XDECREF(guesses);
    Py_DECREF(identity);
    return info;
}

/* rooted(protocol, value, schema, step, name, op, root): "gather", "bcast" or "scatter" (the
 * value: the root's sequence; its schema, if none is named, that of its first item) */
static PyObject *rooted_impl(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "rooted expects 7 arguments");
        return NULL;
    }
    int overflow = 0;
    long root = PyLong_AsLongAndOverflow(args[6], &overflow);
    if (overflow || (root == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return take_py();
    }
    int kind;
    if (PyUnicode_CompareWithASCIIString(args[5], "gather") == 0) kind = KIND_GATHER;
    else if (PyUnicode_CompareWithASCIIString(args[5], "bcast") == 0) kind = KIND_BCAST;
    else if (PyUnicode_CompareWithASCIIString(args[5], "scatter") == 0) kind = KIND_SCATTER;
    else return take_py();
    if (kind != KIND_GATHER && args[2] == Py_None) {
        /* A receiver that names no schema: the root's class it took here last time, if any
         * (core/guesses.py); the root itself goes on below. */
        int receiver = is_receiver(args[0], root);
        if (receiver < 0) return NULL;
        if (receiver) {
            PyObject *guess = guessed_info(args[0], args[4]);
            if (guess == NULL) return PyErr_Occurred() ? NULL : take_py();
            PyObject *out = steady(args[0], args[1], guess, args[3], args[4], args[5], root, 0,
                                   kind, Py_None, 1);
            Py_DECREF(guess);
            return out;
        }
    }
    PyObject *typed = args[1];
    if (kind == KIND_SCATTER && args[2] == Py_None) {
        if ((!PyList_CheckExact(typed) && !PyTuple_CheckExact(typed)) ||
            PySequence_Fast_GET_SIZE(typed) < 1)
            return take_py();
        typed = PySequence_Fast_GET_ITEM(typed, 0);
    }
    PyObject *info = schema_info(typed, args[2]);
    if (info == NULL) return PyErr_Occurred() ? NULL : take_py();
    return steady(args[0], args[1], info, args[3], args[4], args[5], root, 0, kind, args[2], 0);
}

/* allreduce(protocol, value, step, name, reduce_code[, root]): Python ints and floats; with a
 * root, the reduce: gathered to the root, which combines (None elsewhere) */
static PyObject *allreduce_impl(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "allreduce expects 5 or 6 arguments");
        return NULL;
    }
    long code = PyLong_AsLong(args[4]);
    if (code == -1 && PyErr_Occurred()) return NULL;
    if (code < 1 || code > 255) return take_py();
    long root = NO_ROOT;
    if (nargs == 6) {
        int overflow = 0;
        root = PyLong_AsLongAndOverflow(args[5], &overflow);
        if (overflow || (root == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return take_py();
        }
    }
    PyObject *info = lookup_info((PyObject *)Py_TYPE(args[1]));
    if (info == NULL) return PyErr_Occurred() ? NULL : take_py();
    return steady(args[0], args[1], info, args[2], args[3],
                  nargs == 6 ? s_reduce : s_allreduce, root, code,
                  nargs == 6 ? KIND_GATHER : KIND_ALL, Py_None, 0);
}

/* arrays(protocol, encoded, info, step, name): allgather of a numpy array, inline where its
 * payload fits the slot, else its dtype and shape inline and its data in phase 2; encoded:
 * (inline bytes, dtype fingerprint, decoder of equal slots, the data or None), see
 * core/array_slots.py */
static PyObject *arrays_impl(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "arrays expects 5 arguments");
        return NULL;
    }
    return steady(args[0], args[1], args[2], args[3], args[4], s_allgather, NO_ROOT, 0,
                  KIND_ARRAYS, Py_None, 0);
}

/* empty(protocol, step, name): the barrier */
static PyObject *empty_impl(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "empty expects 3 arguments");
        return NULL;
    }
    return steady(args[0], Py_None, Py_None, args[1], args[2], s_barrier, NO_ROOT, 0,
                  KIND_EMPTY, Py_None, 0);
}

/* An entry point that raised: ``protocol.failed(exc)`` (release the channel, record, tell the
 * hooks) as the Python steps do, then the exception goes on; should ``failed`` itself raise,
 * its exception goes on instead, with the first as its context (as in Python). */
static void tell_failed(PyObject *proto) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL) PyException_SetTraceback(value, tb);
    PyObject *done = PyObject_CallMethodOneArg(proto, s_failed, value);
    if (done != NULL) {
        Py_DECREF(done);
        PyErr_Restore(type, value, tb);
        return;
    }
    PyObject *type2, *value2, *tb2;
    PyErr_Fetch(&type2, &value2, &tb2);
    PyErr_NormalizeException(&type2, &value2, &tb2);
    PyException_SetContext(value2, value); /* steals value */
    Py_XDECREF(type);
    Py_XDECREF(tb);
    PyErr_Restore(type2, value2, tb2);
}

/* The entry points as core/fast.py and TypedComm call them: each tells the protocol when it
 * raises (args[0]: the protocol). */
#define GUARDED(entry)                                                                      \
    static PyObject *entry(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {       \
        PyObject *out = entry##_impl(mod, args, nargs);                                     \
        if (out == NULL && nargs > 0) tell_failed(args[0]);                                 \
        return out;                                                                         \
    }
GUARDED(allgather)
GUARDED(rooted)
GUARDED(allreduce)
GUARDED(arrays)
GUARDED(empty)

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "Bind the protocol's tables (once, at import)."},
    {"allgather", (PyCFunction)(void (*)(void))allgather, METH_FASTCALL,
     "The steady state of allgather, the flush and alltoall; see the module comment."},
    {"rooted", (PyCFunction)(void (*)(void))rooted, METH_FASTCALL,
     "The steady state of gather (GATHER exchange), bcast and scatter; see the module comment."},
    {"allreduce", (PyCFunction)(void (*)(void))allreduce, METH_FASTCALL,
     "The steady state of allreduce of Python numbers."},
    {"arrays", (PyCFunction)(void (*)(void))arrays, METH_FASTCALL,
     "The steady state of allgather of a numpy array; see the module comment."},
    {"empty", (PyCFunction)(void (*)(void))empty, METH_FASTCALL, "The steady state of barrier."},
    {"nesting_ok", py_nesting_ok, METH_VARARGS,
     "nesting_ok(buf, limit=MAX_NESTING): the twin of codecs.nesting.nesting_ok."},
#ifdef HAVE_ENGINE
    {"engine", engine, METH_VARARGS, "Bind the MPI exchange over a communicator."},
    {"exchange", py_exchange, METH_VARARGS,
     "exchange(engine, send, recv, block, shape, deadline) -> False when the deadline passed."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC PyInit__speedups(void) {
    INTERN(s_seq, "seq");
    INTERN(s_comprehensions[0], "<listcomp>");
    INTERN(s_comprehensions[1], "<setcomp>");
    INTERN(s_comprehensions[2], "<dictcomp>");
    INTERN(s_comprehensions[3], "<genexpr>");
    INTERN(s_step, "step");
    INTERN(s_policy, "policy");
    INTERN(s_observe, "observe");
    INTERN(s_size, "size");
    INTERN(s_fast, "fast");
    INTERN(s_exchange, "exchange");
    INTERN(s_fingerprint, "fingerprint");
    INTERN(s_failed, "failed");
    INTERN(s_guesses, "guesses");
    INTERN(s_roles, "roles");
    INTERN(s_allgather, "allgather");
    INTERN(s_allreduce, "allreduce");
    INTERN(s_reduce, "reduce");
    INTERN(s_barrier, "barrier");
    if ((NAME_CACHE = PyDict_New()) == NULL ||
        (EMPTY_BYTES = PyBytes_FromStringAndSize(NULL, 0)) == NULL ||
        (EMPTY_TUPLE = PyTuple_New(0)) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *fields = PyTuple_New(F_COUNT);
    if (fields == NULL) goto fail;
    for (int i = 0; i < F_COUNT; i++) {
        PyObject *s = PyUnicode_FromString(FAST_FIELDS[i]);
        if (s == NULL) {
            Py_DECREF(fields);
            goto fail;
        }
        PyTuple_SET_ITEM(fields, i, s);
    }
    if (PyModule_AddObject(m, "FAST_FIELDS", fields) < 0) {
        Py_DECREF(fields);
        goto fail;
    }
    /* What core/fast.py compares with core/wire.py and core/recorder.py before binding. */
    if (PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "FORWARDING_FORM", FORWARDING_FORM) < 0 ||
        PyModule_AddIntConstant(m, "CHAIN_MAX", CHAIN_MAX) < 0 ||
        PyModule_AddIntConstant(m, "CHECKED", CHECKED) < 0 ||
        PyModule_AddIntConstant(m, "AGREE_SIZE", AGREE_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "MAGIC", MAGIC) < 0 ||
        PyModule_AddIntConstant(m, "FLAGS_OFFSET", FLAGS_OFFSET) < 0 ||
        PyModule_AddIntConstant(m, "LENGTH_OFFSET", LENGTH_OFFSET) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_LOCAL_ERROR", FLAG_LOCAL_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_OVERFLOW", FLAG_OVERFLOW) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_WILD_SCHEMA", FLAG_WILD_SCHEMA) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_SPLIT_ARRAY", FLAG_SPLIT_ARRAY) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_GUESSED", FLAG_GUESSED) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_ROLE", FLAG_ROLE) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_DECODE_HOOK", FLAG_DECODE_HOOK) < 0 ||
        PyModule_AddIntConstant(m, "GATHER", SHAPE_GATHER) < 0 ||
        PyModule_AddIntConstant(m, "MAX_NESTING", MAX_NESTING) < 0 ||
        PyModule_AddIntConstant(m, "MAX_NAME", MAX_NAME) < 0 ||
        PyModule_AddIntConstant(m, "ENTRY_SIZE", ENTRY_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "OBJECTS_PER_ENTRY", OBJECTS_PER_ENTRY) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
