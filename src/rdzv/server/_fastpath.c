/*
 * rdzv.server._fastpath: the TCPStore server's hot path in C.
 *
 * One call of Executor.run(buf, pos, extended) decodes the complete requests of ``buf`` from
 * ``pos`` on and executes those that are *simple*: SET, GET, ADD, CHECK, WAIT and MULTI_GET
 * (and, once a client negotiated extensions, EXT_ADD and EXT_GET_WAIT) whose outcome needs
 * nothing but the engine's dictionaries: no waiter to wake, no key bound to a connection or
 * lease, no barrier to release, no error to report, no wait to park. It stops at the first
 * request that is not simple, incomplete, or over a limit, *before* changing anything for
 * it, and returns how far it got plus the concatenated replies. Two requests change a
 * connection's state and are taken only by a connection's Receiver: its first request,
 * VALIDATE (whole, with the right magic), and a WAIT on one absent key, which the Receiver
 * parks with the engine's ``park`` (FastPathTables) and records on the connection (the
 * reply on wake-up is the Python path's). The server then hands the
 * rest of the bytes to the Python parser and handlers (rdzv.wire / rdzv.server), which
 * implement every request; this module only short-cuts the common ones, with byte-identical
 * replies and state changes (tests/server/test_fastpath.py checks both paths against each
 * other). The rules mirror rdzv.engine.Engine and the handlers in rdzv.server; see
 * rdzv/server/fastpath.py for the Python side.
 *
 * Wire format: docs/protocol.md (torch's TCPStore: one opcode byte, u64 little-endian
 * lengths and counts, i64 little-endian integers).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#ifndef _WIN32
#include <sys/socket.h>
#include <sys/types.h>
#define HAVE_SEND 1
#endif

/* Opcodes (rdzv.wire.Op). */
enum {
    OP_VALIDATE = 0,
    OP_SET = 1,
    OP_GET = 3,
    OP_ADD = 4,
    OP_CHECK = 5,
    OP_WAIT = 6,
    OP_MULTI_GET = 10,
    OP_PING = 13,
    OP_EXT_ADD = 0x80,
    OP_EXT_GET_WAIT = 0x82,
};

/* Lists of more keys than this go to the Python parser (which also enforces the request
 * size limit from 17 keys on; rdzv.wire.RequestParser._p_list). */
#define MAX_LIST 16

/* The PING nonce by which an rdzv client negotiates extensions (rdzv.wire.RDZV_PING_NONCE). */
#define RDZV_PING_NONCE 0x72647A76u

/* The magic of VALIDATE, a connection's first request (rdzv.wire.VALIDATE_MAGIC). */
#define VALIDATE_MAGIC 0x3C85F7CEu

#define REPLY_STOP_WAITING 0x00
#define REPLY_CHECK_READY 0x00
#define REPLY_CHECK_NOT_READY 0x01
#define REPLY_EXT_OK 0x00

/* Most latency buckets Executor.enable_counting() accepts. */
#define MAX_BUCKETS 32

/* Outcome of one request. */
#define STEP_STOP (-1)  /* not taken: nothing changed, the Python path takes over here */
#define STEP_ERROR (-2) /* a Python exception is set (out of memory) */

static PyObject *validated_name;  /* "validated" (interned) */
static PyObject *add_waiter_name; /* "add_waiter" (interned) */
static PyObject *one;             /* the int 1 */
static PyObject *waiters_name;    /* "waiters" (interned) */
static PyObject *wait_keys_name;  /* "wait_keys" (interned) */
static PyObject *owner_name;      /* "owner" (interned) */
static PyObject *transport_name;  /* "transport" (interned) */
static PyObject *is_closing_name; /* "is_closing" (interned) */
static PyObject *refresh_name;    /* "refresh" (interned) */
static PyObject *stop_waiting;    /* b"\x00", the reply to a woken WAIT */

/* What a Receiver lets the executor do beyond the stateless requests. */
typedef struct {
    PyObject *owner; /* owner of a WAIT waiter parked here, (connection, kind); NULL: none */
    PyObject *receiver; /* the Receiver parking it (its ``woken`` is the waiter's callback) */
    int parked;      /* set when a WAIT was parked: the executor stops after it */
} Ctx;

static PyMethodDef receiver_woken_def; /* the callback of the waiters a Receiver parks */

/* ------------------------------------------------------------------------ reply buffer */
typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
    char small[512];
} Out;

static int
out_reserve(Out *out, Py_ssize_t extra)
{
    Py_ssize_t need = out->len + extra;
    if (need <= out->cap) {
        return 0;
    }
    Py_ssize_t cap = out->cap * 2;
    if (cap < need) {
        cap = need;
    }
    char *grown;
    if (out->buf == out->small) {
        grown = PyMem_Malloc((size_t)cap);
        if (grown != NULL) {
            memcpy(grown, out->buf, (size_t)out->len);
        }
    }
    else {
        grown = PyMem_Realloc(out->buf, (size_t)cap);
    }
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->buf = grown;
    out->cap = cap;
    return 0;
}

static int
out_bytes(Out *out, const char *data, Py_ssize_t n)
{
    if (out_reserve(out, n) < 0) {
        return -1;
    }
    memcpy(out->buf + out->len, data, (size_t)n);
    out->len += n;
    return 0;
}

static int
out_u64(Out *out, uint64_t v)
{
    char le[8];
    for (int i = 0; i < 8; i++) {
        le[i] = (char)(v >> (8 * i));
    }
    return out_bytes(out, le, 8);
}

static int
out_byte(Out *out, char b)
{
    return out_bytes(out, &b, 1);
}

/* A blob: u64 length + bytes. */
static int
out_blob(Out *out, PyObject *value)
{
    Py_ssize_t n = PyBytes_GET_SIZE(value);
    if (out_u64(out, (uint64_t)n) < 0) {
        return -1;
    }
    return out_bytes(out, PyBytes_AS_STRING(value), n);
}

/* ------------------------------------------------------------------------ frame reading */
static uint32_t
read_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t
read_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) {
        v |= (uint64_t)p[i] << (8 * i);
    }
    return v;
}

/* A blob at *pos: sets *start and *len and advances *pos. 0 when incomplete or over limit. */
static int
read_blob(const unsigned char *p, Py_ssize_t *pos, Py_ssize_t end, Py_ssize_t limit,
          Py_ssize_t *start, Py_ssize_t *len)
{
    if (end - *pos < 8) {
        return 0;
    }
    uint64_t n = read_u64(p + *pos);
    if (n > (uint64_t)limit || (uint64_t)(end - *pos - 8) < n) {
        return 0;
    }
    *start = *pos + 8;
    *len = (Py_ssize_t)n;
    *pos = *start + *len;
    return 1;
}

/* ------------------------------------------------------------------------ the executor */
typedef struct {
    PyObject_HEAD
    /* The engine's tables, from rdzv.engine.Engine.fastpath_tables() (FastPathTables, whose
     * docstring states what may be read and written here). */
    PyObject *data;     /* key -> value; written only for keys in none of the three below */
    PyObject *queues;   /* key -> non-empty deque; read only */
    PyObject *waiters;  /* key -> registered waiters; read only */
    PyObject *barriers; /* key -> parked barrier waiters; read only */
    PyObject *bound;    /* key -> owner or lease of a bound key; read only */
    PyObject *park;     /* park(key, callback, owner) -> Waiter, for an absent key */
    PyObject *on_fire;  /* callback of the WAIT waiters parked here; None: no parking */
    Py_ssize_t max_key;
    Py_ssize_t max_value;
    Py_ssize_t max_keys;
    /* Busy polling (rdzv.server.fastpath.BusyPoller): reads seen by the receivers, whether the
     * poller runs, and what to call on a read while it does not (None: no polling). */
    unsigned long long activity;
    unsigned long long epoch;  /* the poller's current period */
    Py_ssize_t distinct;       /* receivers that read in this period */
    char polling;
    PyObject *on_activity;
    /* Metrics (rdzv.observe reads them with counters()): off until enable_counting(). */
    char counting;
    unsigned long long ops[256];                /* requests executed here, by opcode */
    Py_ssize_t nbounds;                         /* latency bucket upper bounds, ns */
    unsigned long long bounds[MAX_BUCKETS];
    unsigned long long buckets[MAX_BUCKETS + 1]; /* reads per bucket; the last is +Inf */
    unsigned long long latency_sum_ns;
} Executor;

/* 1 if ``key`` is a key of ``dict``, 0 if not, -1 on error. */
static int
has(PyObject *dict, PyObject *key)
{
    if (PyDict_GET_SIZE(dict) == 0) {
        return 0;
    }
    return PyDict_Contains(dict, key);
}

/* Present = holds a value or names a non-empty queue (Engine._present). -1 on error. */
static int
present(Executor *self, PyObject *key)
{
    int found = PyDict_Contains(self->data, key);
    if (found != 0) {
        return found;
    }
    PyObject *queue = PyDict_GetItemWithError(self->queues, key); /* borrowed */
    if (queue == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_ssize_t n = PyObject_Length(queue);
    return n < 0 ? -1 : n > 0;
}

/* 1 if writing ``key`` needs the Python path (waiters to wake, a binding to drop, a barrier
 * to release), 0 if not, -1 on error. */
static int
guarded(Executor *self, PyObject *key, int barrier_too)
{
    int hit = has(self->waiters, key);
    if (hit == 0) {
        hit = has(self->bound, key);
    }
    if (hit == 0 && barrier_too) {
        hit = has(self->barriers, key);
    }
    return hit;
}

/* Parse a counter written as optional '-' then 1-19 ASCII digits (what ADD writes); 0 when
 * the value has any other shape or leaves int64 (the Python path then parses strtoll-style
 * or reports the error). */
static int
parse_counter(PyObject *raw, int64_t *out)
{
    const char *s = PyBytes_AS_STRING(raw);
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    Py_ssize_t i = 0;
    int negative = 0;
    if (n > 0 && s[0] == '-') {
        negative = 1;
        i = 1;
    }
    if (i == n || n - i > 19) {
        return 0;
    }
    int64_t v = 0;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return 0;
        }
        int digit = s[i] - '0';
        if (__builtin_mul_overflow(v, 10, &v) ||
            __builtin_add_overflow(v, negative ? -digit : digit, &v)) {
            return 0;
        }
    }
    *out = v;
    return 1;
}

static Py_ssize_t
step_set(Executor *self, const unsigned char *p, Py_ssize_t pos, Py_ssize_t end)
{
    Py_ssize_t ks, kn, vs, vn;
    if (!read_blob(p, &pos, end, self->max_key, &ks, &kn) ||
        !read_blob(p, &pos, end, self->max_value, &vs, &vn)) {
        return STEP_STOP;
    }
    PyObject *key = PyBytes_FromStringAndSize((const char *)p + ks, kn);
    if (key == NULL) {
        return STEP_ERROR;
    }
    int hit = guarded(self, key, 0);
    if (hit != 0) {
        Py_DECREF(key);
        return hit < 0 ? STEP_ERROR : STEP_STOP;
    }
    PyObject *value = PyBytes_FromStringAndSize((const char *)p + vs, vn);
    int rc = value == NULL ? -1 : PyDict_SetItem(self->data, key, value);
    Py_DECREF(key);
    Py_XDECREF(value);
    return rc < 0 ? STEP_ERROR : pos;
}

static Py_ssize_t
step_get(Executor *self, const unsigned char *p, Py_ssize_t pos, Py_ssize_t end, Out *out,
         int wait)
{
    Py_ssize_t ks, kn;
    if (!read_blob(p, &pos, end, self->max_key, &ks, &kn)) {
        return STEP_STOP;
    }
    PyObject *key = PyBytes_FromStringAndSize((const char *)p + ks, kn);
    if (key == NULL) {
        return STEP_ERROR;
    }
    PyObject *value = PyDict_GetItemWithError(self->data, key); /* borrowed */
    Py_DECREF(key);
    if (value == NULL) {
        if (PyErr_Occurred()) {
            return STEP_ERROR;
        }
        if (wait) {
            return STEP_STOP; /* EXT_GET_WAIT parks: the Python path */
        }
        return out_u64(out, 0) < 0 ? STEP_ERROR : pos; /* missing: an empty blob */
    }
    if (wait && out_byte(out, REPLY_EXT_OK) < 0) {
        return STEP_ERROR;
    }
    return out_blob(out, value) < 0 ? STEP_ERROR : pos;
}

static Py_ssize_t
step_add(Executor *self, const unsigned char *p, Py_ssize_t pos, Py_ssize_t end, Out *out,
         int ext)
{
    Py_ssize_t ks, kn;
    if (!read_blob(p, &pos, end, self->max_key, &ks, &kn) || end - pos < 8) {
        return STEP_STOP;
    }
    int64_t amount = (int64_t)read_u64(p + pos);
    pos += 8;
    PyObject *key = PyBytes_FromStringAndSize((const char *)p + ks, kn);
    if (key == NULL) {
        return STEP_ERROR;
    }
    Py_ssize_t result = STEP_STOP;
    int hit = guarded(self, key, 1);
    if (hit != 0) {
        result = hit < 0 ? STEP_ERROR : STEP_STOP;
        goto done;
    }
    int64_t total = amount;
    PyObject *old = PyDict_GetItemWithError(self->data, key); /* borrowed */
    if (old == NULL && PyErr_Occurred()) {
        result = STEP_ERROR;
        goto done;
    }
    if (old != NULL) {
        int64_t current;
        if (!parse_counter(old, &current) || __builtin_add_overflow(current, amount, &total)) {
            goto done; /* unusual text or overflow: the Python path */
        }
    }
    char text[24];
    int len = snprintf(text, sizeof text, "%lld", (long long)total);
    PyObject *stored = PyBytes_FromStringAndSize(text, len);
    if (stored == NULL || PyDict_SetItem(self->data, key, stored) < 0) {
        Py_XDECREF(stored);
        result = STEP_ERROR;
        goto done;
    }
    Py_DECREF(stored);
    if ((ext && out_byte(out, REPLY_EXT_OK) < 0) || out_u64(out, (uint64_t)total) < 0) {
        result = STEP_ERROR;
        goto done;
    }
    result = pos;
done:
    Py_DECREF(key);
    return result;
}

/* CHECK, WAIT, MULTI_GET: a u64 count and that many key blobs. */
/* Park a WAIT on the absent key p[start:start+len]: the engine registers the waiter
 * (``park(key, callback, owner)``, FastPathTables.park, the callback the receiver's
 * ``woken``), then the connection, owner[0], records it (``add_waiter(waiter, 1)``, as the
 * Python WAIT handler does). */
static Py_ssize_t
park_wait(Executor *self, const unsigned char *p, Py_ssize_t start, Py_ssize_t len,
          Py_ssize_t pos, Ctx *ctx)
{
    PyObject *key = PyBytes_FromStringAndSize((const char *)p + start, len);
    if (key == NULL) {
        return STEP_ERROR;
    }
    PyObject *callback = PyCFunction_New(&receiver_woken_def, ctx->receiver);
    if (callback == NULL) {
        Py_DECREF(key);
        return STEP_ERROR;
    }
    PyObject *owner = Py_NewRef(ctx->owner); /* the receiver's: kept alive for the calls */
    PyObject *waiter = PyObject_CallFunctionObjArgs(self->park, key, callback, owner, NULL);
    Py_DECREF(callback);
    Py_DECREF(key);
    PyObject *added = NULL;
    if (waiter != NULL) {
        added = PyObject_CallMethodObjArgs(PyTuple_GET_ITEM(owner, 0), add_waiter_name, waiter,
                                           one, NULL);
        Py_DECREF(waiter);
    }
    Py_DECREF(owner);
    if (added == NULL) {
        return STEP_ERROR;
    }
    Py_DECREF(added);
    ctx->parked = 1;
    return pos;
}

static Py_ssize_t
step_list(Executor *self, const unsigned char *p, Py_ssize_t pos, Py_ssize_t end, Out *out,
          int op, Ctx *ctx)
{
    if (end - pos < 8) {
        return STEP_STOP;
    }
    uint64_t count = read_u64(p + pos);
    if (count > MAX_LIST || count > (uint64_t)self->max_keys) {
        return STEP_STOP;
    }
    pos += 8;
    Py_ssize_t starts[MAX_LIST], lens[MAX_LIST];
    Py_ssize_t n = (Py_ssize_t)count;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!read_blob(p, &pos, end, self->max_key, &starts[i], &lens[i])) {
            return STEP_STOP;
        }
    }
    Py_ssize_t mark = out->len; /* replies of a MULTI_GET are undone on error */
    int all = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyBytes_FromStringAndSize((const char *)p + starts[i], lens[i]);
        if (key == NULL) {
            return STEP_ERROR;
        }
        int rc;
        if (op == OP_MULTI_GET) {
            PyObject *value = PyDict_GetItemWithError(self->data, key); /* borrowed */
            if (value != NULL) {
                rc = out_blob(out, value);
            }
            else {
                rc = PyErr_Occurred() ? -1 : out_u64(out, 0);
            }
        }
        else {
            rc = present(self, key);
            if (rc == 0) {
                all = 0;
            }
        }
        Py_DECREF(key);
        if (rc < 0) {
            out->len = mark;
            return STEP_ERROR;
        }
        if (!all) {
            break;
        }
    }
    if (op == OP_CHECK) {
        return out_byte(out, all ? REPLY_CHECK_READY : REPLY_CHECK_NOT_READY) < 0 ? STEP_ERROR
                                                                                   : pos;
    }
    if (op == OP_WAIT) {
        if (!all) {
            /* One key, on a connection with an owner for its waiter: parked here; more
             * keys, or no owner or callback: the Python path parks the waiter. */
            if (n == 1 && ctx->owner != NULL && ctx->receiver != NULL && self->on_fire != NULL &&
                self->on_fire != Py_None) {
                return park_wait(self, p, starts[0], lens[0], pos, ctx);
            }
            return STEP_STOP;
        }
        return out_byte(out, REPLY_STOP_WAITING) < 0 ? STEP_ERROR : pos;
    }
    return pos;
}

/* PING (the handshake's second request, after VALIDATE): a torch client's nonce is echoed.
 * rdzv's nonce negotiates the extensions (connection state): the Python path. */
static Py_ssize_t
step_ping(const unsigned char *p, Py_ssize_t pos, Py_ssize_t end, Out *out)
{
    if (end - pos < 4) {
        return STEP_STOP;
    }
    uint32_t nonce = (uint32_t)p[pos] | (uint32_t)p[pos + 1] << 8 | (uint32_t)p[pos + 2] << 16 |
                     (uint32_t)p[pos + 3] << 24;
    if (nonce == RDZV_PING_NONCE) {
        return STEP_STOP;
    }
    return out_bytes(out, (const char *)p + pos, 4) < 0 ? STEP_ERROR : pos + 4;
}

static Py_ssize_t
step(Executor *self, const unsigned char *p, Py_ssize_t pos, Py_ssize_t end, Out *out,
     int extended, Ctx *ctx)
{
    int op = p[pos];
    pos += 1;
    switch (op) {
    case OP_SET:
        return step_set(self, p, pos, end);
    case OP_GET:
        return step_get(self, p, pos, end, out, 0);
    case OP_ADD:
        return step_add(self, p, pos, end, out, 0);
    case OP_CHECK:
    case OP_WAIT:
    case OP_MULTI_GET:
        return step_list(self, p, pos, end, out, op, ctx);
    case OP_PING:
        return step_ping(p, pos, end, out);
    case OP_EXT_ADD:
        return extended ? step_add(self, p, pos, end, out, 1) : STEP_STOP;
    case OP_EXT_GET_WAIT:
        return extended ? step_get(self, p, pos, end, out, 1) : STEP_STOP;
    default:
        return STEP_STOP;
    }
}

static void
out_init(Out *out)
{
    out->buf = out->small;
    out->len = 0;
    out->cap = (Py_ssize_t)sizeof out->small;
}

static void
out_free(Out *out)
{
    if (out->buf != out->small) {
        PyMem_Free(out->buf);
    }
    out_init(out);
}

/* Execute the simple requests of p[*pos:end] into ``out`` while it is shorter than
 * ``reply_limit``, up to and including a parked WAIT (ctx->parked); advances *pos past
 * them. -1 with an exception set on error. */
static int
execute(Executor *self, const unsigned char *p, Py_ssize_t *pos, Py_ssize_t end, Out *out,
        int extended, Py_ssize_t reply_limit, Ctx *ctx)
{
    while (*pos < end && out->len < reply_limit && !ctx->parked) {
        Py_ssize_t next = step(self, p, *pos, end, out, extended, ctx);
        if (next == STEP_ERROR) {
            return -1;
        }
        if (next == STEP_STOP) {
            break;
        }
        if (self->counting) {
            self->ops[p[*pos]]++;
        }
        *pos = next;
    }
    return 0;
}

PyDoc_STRVAR(run_doc,
"run(buf, pos, extended, reply_limit) -> (pos, reply)\n\n"
"Execute the simple requests of ``buf`` (bytes) from offset ``pos`` on, in order, while\n"
"``reply`` is shorter than ``reply_limit`` bytes; ``extended``: the client negotiated\n"
"rdzv's extensions. Returns the offset of the first request not executed (``len(buf)``\n"
"when all were) and their concatenated replies (bytes, or None when there are none).\n"
"Raises TypeError if ``buf`` is not bytes, ValueError if ``pos`` is outside it,\n"
"MemoryError when out of memory.");

static PyObject *
executor_run(Executor *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->data == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Executor.run() before __init__()");
        return NULL;
    }
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "run() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *buf = args[0];
    if (!PyBytes_Check(buf)) {
        PyErr_Format(PyExc_TypeError, "run(): buf must be bytes, not %.100s",
                     Py_TYPE(buf)->tp_name);
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int extended = PyObject_IsTrue(args[2]);
    if (extended < 0) {
        return NULL;
    }
    Py_ssize_t reply_limit = PyLong_AsSsize_t(args[3]);
    if (reply_limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t end = PyBytes_GET_SIZE(buf);
    if (pos < 0 || pos > end) {
        PyErr_Format(PyExc_ValueError, "run(): pos %zd is outside the buffer (0..%zd)", pos,
                     end);
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(buf);
    Out out;
    out_init(&out);
    PyObject *result = NULL;
    Ctx ctx = {NULL, NULL, 0}; /* run() never parks */
    if (execute(self, p, &pos, end, &out, extended, reply_limit, &ctx) == 0) {
        if (out.len == 0) {
            result = Py_BuildValue("(nO)", pos, Py_None);
        }
        else {
            result = Py_BuildValue("(ny#)", pos, out.buf, out.len);
        }
    }
    out_free(&out);
    return result;
}

PyDoc_STRVAR(enable_counting_doc,
"enable_counting(bounds_ns)\n\n"
"Start counting: requests executed here by opcode, and the time of each receiver call\n"
"(one read: its requests and replies) in a histogram whose bucket upper bounds are\n"
"``bounds_ns`` (an increasing sequence of at most 32 ints, nanoseconds; a last bucket\n"
"counts the rest). Resets the counters. Raises ValueError for bounds that are not\n"
"increasing or too many, TypeError if they are not ints.");

static PyObject *
executor_enable_counting(Executor *self, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "enable_counting(): bounds_ns must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_BUCKETS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "enable_counting(): at most %d bounds, got %zd",
                     MAX_BUCKETS, n);
        return NULL;
    }
    unsigned long long bounds[MAX_BUCKETS];
    for (Py_ssize_t i = 0; i < n; i++) {
        bounds[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (bounds[i] == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (i > 0 && bounds[i] <= bounds[i - 1]) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "enable_counting(): bounds must increase");
            return NULL;
        }
    }
    Py_DECREF(seq);
    memcpy(self->bounds, bounds, sizeof(bounds[0]) * (size_t)n);
    self->nbounds = n;
    memset(self->ops, 0, sizeof self->ops);
    memset(self->buckets, 0, sizeof self->buckets);
    self->latency_sum_ns = 0;
    self->counting = 1;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(counters_doc,
"counters() -> (ops, buckets, latency_sum_ns)\n\n"
"What was counted since enable_counting(): ``ops`` a dict opcode -> requests executed\n"
"here (opcodes never seen are absent), ``buckets`` a tuple of reads per latency bucket\n"
"(len(bounds_ns) + 1, not cumulative; the last is above every bound), and the sum of\n"
"those reads' times in nanoseconds. All zero while counting is off.");

static PyObject *
executor_counters(Executor *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *ops = PyDict_New();
    if (ops == NULL) {
        return NULL;
    }
    for (int op = 0; op < 256; op++) {
        if (self->ops[op] == 0) {
            continue;
        }
        PyObject *k = PyLong_FromLong(op);
        PyObject *v = PyLong_FromUnsignedLongLong(self->ops[op]);
        int rc = (k == NULL || v == NULL) ? -1 : PyDict_SetItem(ops, k, v);
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (rc < 0) {
            Py_DECREF(ops);
            return NULL;
        }
    }
    PyObject *buckets = PyTuple_New(self->nbounds + 1);
    if (buckets == NULL) {
        Py_DECREF(ops);
        return NULL;
    }
    for (Py_ssize_t i = 0; i <= self->nbounds; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(self->buckets[i]);
        if (v == NULL) {
            Py_DECREF(ops);
            Py_DECREF(buckets);
            return NULL;
        }
        PyTuple_SET_ITEM(buckets, i, v);
    }
    return Py_BuildValue("(NNK)", ops, buckets, self->latency_sum_ns);
}

static unsigned long long
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

/* Count one read that took ``ns`` nanoseconds in the latency histogram. */
static void
observe_latency(Executor *self, unsigned long long ns)
{
    Py_ssize_t i = 0;
    while (i < self->nbounds && ns > self->bounds[i]) {
        i++;
    }
    self->buckets[i]++;
    self->latency_sum_ns += ns;
}

/* The fields of rdzv.engine.FastPathTables, in order; the five dictionaries come first. */
#define TABLE_FIELDS 6
#define TABLE_DICTS 5

static int
executor_init(Executor *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tables", "max_key_bytes", "max_value_bytes", "max_keys", NULL};
    PyObject *tables;
    Py_ssize_t max_key, max_value, max_keys;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!nnn", kwlist, &PyTuple_Type, &tables,
                                     &max_key, &max_value, &max_keys)) {
        return -1;
    }
    if (PyTuple_GET_SIZE(tables) != TABLE_FIELDS) {
        PyErr_SetString(PyExc_TypeError,
                        "Executor(): tables must be an rdzv.engine.FastPathTables "
                        "(Engine.fastpath_tables())");
        return -1;
    }
    for (Py_ssize_t i = 0; i < TABLE_DICTS; i++) {
        if (!PyDict_CheckExact(PyTuple_GET_ITEM(tables, i))) {
            PyErr_Format(PyExc_TypeError, "Executor(): field %zd of tables is not a dict", i);
            return -1;
        }
    }
    if (!PyCallable_Check(PyTuple_GET_ITEM(tables, TABLE_DICTS))) {
        PyErr_SetString(PyExc_TypeError, "Executor(): tables.park is not callable");
        return -1;
    }
    if (max_key < 0 || max_value < 0 || max_keys < 0) {
        PyErr_SetString(PyExc_ValueError, "Executor(): limits must be >= 0");
        return -1;
    }
    Py_XSETREF(self->data, Py_NewRef(PyTuple_GET_ITEM(tables, 0)));
    Py_XSETREF(self->queues, Py_NewRef(PyTuple_GET_ITEM(tables, 1)));
    Py_XSETREF(self->waiters, Py_NewRef(PyTuple_GET_ITEM(tables, 2)));
    Py_XSETREF(self->barriers, Py_NewRef(PyTuple_GET_ITEM(tables, 3)));
    Py_XSETREF(self->bound, Py_NewRef(PyTuple_GET_ITEM(tables, 4)));
    Py_XSETREF(self->park, Py_NewRef(PyTuple_GET_ITEM(tables, 5)));
    self->max_key = max_key;
    self->max_value = max_value;
    self->max_keys = max_keys;
    self->activity = 0;
    self->epoch = 1; /* receivers start at 0: their first read counts */
    self->distinct = 0;
    self->polling = 0;
    Py_XSETREF(self->on_activity, Py_NewRef(Py_None));
    Py_XSETREF(self->on_fire, Py_NewRef(Py_None));
    self->counting = 0;
    self->nbounds = 0;
    memset(self->ops, 0, sizeof self->ops);
    memset(self->buckets, 0, sizeof self->buckets);
    self->latency_sum_ns = 0;
    return 0;
}

static int
executor_traverse(Executor *self, visitproc visit, void *arg)
{
    Py_VISIT(self->data);
    Py_VISIT(self->queues);
    Py_VISIT(self->waiters);
    Py_VISIT(self->barriers);
    Py_VISIT(self->bound);
    Py_VISIT(self->park);
    Py_VISIT(self->on_activity);
    Py_VISIT(self->on_fire);
    return 0;
}

static int
executor_clear(Executor *self)
{
    Py_CLEAR(self->data);
    Py_CLEAR(self->queues);
    Py_CLEAR(self->waiters);
    Py_CLEAR(self->barriers);
    Py_CLEAR(self->bound);
    Py_CLEAR(self->park);
    Py_CLEAR(self->on_activity);
    Py_CLEAR(self->on_fire);
    return 0;
}

static void
executor_dealloc(Executor *self)
{
    PyObject_GC_UnTrack(self);
    executor_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef executor_members[] = {
    {"activity", T_ULONGLONG, offsetof(Executor, activity), READONLY,
     "int: reads handled by the receivers so far (wraps at 2**64)"},
    {"epoch", T_ULONGLONG, offsetof(Executor, epoch), 0,
     "int: the busy poller's period; a receiver's first read in a period counts in "
     "``distinct``"},
    {"distinct", T_PYSSIZET, offsetof(Executor, distinct), 0,
     "int: receivers (connections) that read in this period"},
    {"polling", T_BOOL, offsetof(Executor, polling), 0,
     "bool: the busy poller runs; the receivers call ``on_activity`` while it is False"},
    {"on_activity", T_OBJECT, offsetof(Executor, on_activity), 0,
     "callable() or None: called (after ``polling`` is set) on a read while not polling"},
    {"on_fire", T_OBJECT, offsetof(Executor, on_fire), 0,
     "callable(Waiter) or None: the callback of the WAIT waiters the receivers park (a WAIT "
     "on one absent key, on a connection whose receiver has an ``owner``); None: the Python "
     "path parks every WAIT"},
    {"counting", T_BOOL, offsetof(Executor, counting), READONLY,
     "bool: enable_counting() was called"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef executor_methods[] = {
    {"run", (PyCFunction)(void (*)(void))executor_run, METH_FASTCALL, run_doc},
    {"enable_counting", (PyCFunction)executor_enable_counting, METH_O, enable_counting_doc},
    {"counters", (PyCFunction)executor_counters, METH_NOARGS, counters_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(executor_doc,
"Executor(tables, max_key_bytes, max_value_bytes, max_keys)\n\n"
"Executes simple TCPStore requests directly on an engine's dictionaries: ``tables`` is\n"
"rdzv.engine.Engine.fastpath_tables(), whose docstring states what may be touched and how\n"
"(see rdzv.server.fastpath).");

static PyTypeObject ExecutorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rdzv.server._fastpath.Executor",
    .tp_basicsize = sizeof(Executor),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = executor_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)executor_init,
    .tp_traverse = (traverseproc)executor_traverse,
    .tp_clear = (inquiry)executor_clear,
    .tp_dealloc = (destructor)executor_dealloc,
    .tp_methods = executor_methods,
    .tp_members = executor_members,
};

/* ------------------------------------------------------------------------ the receiver */

/* What the transport calls with received bytes (the protocol's ``data_received``): runs
 * the executor on them, writes the replies, and hands whatever it did not take to ``slow``
 * (the Python path), which also decides, through ``enabled``, whether the next bytes may
 * take the fast path at all. */
typedef struct {
    PyObject_HEAD
    PyObject *executor; /* Executor */
    PyObject *slow;     /* callable(bytes) */
    PyObject *write;    /* callable(bytes), the transport's write; None until connected */
    PyObject *buffered; /* callable() -> int, the transport's get_write_buffer_size */
    PyObject *parser;   /* the connection's request parser: ``validated`` set after VALIDATE */
    PyObject *owner;    /* (connection, kind): owner of a WAIT waiter parked here, or None */
    int fd;             /* the plain TCP socket to send on directly, -1: always ``write`` */
    char enabled;
    char extended;
    char validate;      /* the first request, VALIDATE, is still to come */
    char parked;        /* a WAIT parked by the last read, nothing received since */
    char maybe_queued;  /* the transport may hold unsent bytes: ask ``buffered`` first */
    Py_ssize_t reply_limit;
    unsigned long long seen_epoch; /* the executor's epoch of this receiver's last read */
    vectorcallfunc vectorcall;
} Receiver;

/* 1 if the transport holds unsent bytes (they must go first), 0 if not, -1 on error.
 *
 * The transport is asked (a Python call) only when it may hold any: bytes reach it only
 * through ``write`` (this receiver's fallback) or the Python path, and every turn of the
 * Python path for this connection goes through ``slow`` or ends by setting ``enabled``
 * (Connection.refresh), which set ``maybe_queued``; the C path's own sends go straight to
 * the socket. Once the transport answers 0, it holds nothing until one of those again. */
static int
transport_busy(Receiver *self)
{
    if (!self->maybe_queued) {
        return 0;
    }
    PyObject *size = PyObject_CallNoArgs(self->buffered);
    if (size == NULL) {
        return -1;
    }
    int busy = PyObject_IsTrue(size);
    Py_DECREF(size);
    if (busy == 0) {
        self->maybe_queued = 0;
    }
    return busy;
}

/* Hand ``data`` to the Python path, which may write to the transport. */
static PyObject *
call_slow(Receiver *self, PyObject *data)
{
    self->maybe_queued = 1;
    return PyObject_CallOneArg(self->slow, data);
}

/* Send the replies in ``out``: straight to the socket when the transport has nothing
 * queued (the transport's own write does the same syscall with more steps), the rest (or
 * all, on an error the transport will then report) through the transport. */
static int
deliver(Receiver *self, Out *out)
{
    Py_ssize_t sent = 0;
#ifdef HAVE_SEND
    if (self->fd >= 0 && self->buffered != Py_None) {
        int busy = transport_busy(self);
        if (busy < 0) {
            return -1;
        }
        if (!busy) {
            ssize_t n;
            do {
                n = send(self->fd, out->buf, (size_t)out->len, MSG_DONTWAIT | MSG_NOSIGNAL);
            } while (n < 0 && errno == EINTR);
            if (n == out->len) {
                return 0;
            }
            if (n > 0) {
                sent = n;
            }
        }
    }
#endif
    PyObject *reply = PyBytes_FromStringAndSize(out->buf + sent, out->len - sent);
    if (reply == NULL) {
        return -1;
    }
    self->maybe_queued = 1;
    /* May call back into the protocol (pause_writing clears ``enabled``). */
    PyObject *written = PyObject_CallOneArg(self->write, reply);
    Py_DECREF(reply);
    if (written == NULL) {
        return -1;
    }
    Py_DECREF(written);
    return 0;
}

static PyObject *
receiver_feed(Receiver *self, PyObject *data)
{
    Executor *ex = (Executor *)self->executor;
    ex->activity++;
    if (!ex->polling && ex->on_activity != NULL && ex->on_activity != Py_None) {
        ex->polling = 1;
        PyObject *started = PyObject_CallNoArgs(ex->on_activity);
        if (started == NULL) {
            return NULL;
        }
        Py_DECREF(started);
    }
    if (self->seen_epoch != ex->epoch) {
        self->seen_epoch = ex->epoch;
        ex->distinct++;
    }
    self->parked = 0; /* anything received after a parked WAIT: its reply is Python's */
    if (!self->enabled || !PyBytes_CheckExact(data) || self->write == Py_None) {
        self->validate = 0; /* the Python parser checks VALIDATE from now on */
        return call_slow(self, data);
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t end = PyBytes_GET_SIZE(data);
    Py_ssize_t pos = 0;
    if (self->validate) {
        self->validate = 0;
        if (end < 5 || p[0] != OP_VALIDATE || read_u32(p + 1) != VALIDATE_MAGIC) {
            /* In pieces, or not a VALIDATE: the Python parser takes it (and the errors). */
            return call_slow(self, data);
        }
        if (self->parser != NULL && self->parser != Py_None &&
            PyObject_SetAttr(self->parser, validated_name, Py_True) < 0) {
            return NULL;
        }
        if (ex->counting) {
            ex->ops[OP_VALIDATE]++;
        }
        pos = 5; /* no reply (torch's server sends none) */
    }
    Ctx ctx = {self->owner == Py_None ? NULL : self->owner, (PyObject *)self, 0};
    if (ctx.owner != NULL && (!PyTuple_Check(ctx.owner) || PyTuple_GET_SIZE(ctx.owner) < 1)) {
        PyErr_SetString(PyExc_TypeError, "Receiver.owner must be a (connection, ...) tuple");
        return NULL;
    }
    Out out;
    out_init(&out);
    for (;;) {
        if (execute(ex, p, &pos, end, &out, self->extended, self->reply_limit, &ctx) < 0) {
            out_free(&out);
            return NULL;
        }
        if (ctx.parked) {
            self->enabled = 0; /* a parked wait: the Python path until it is woken */
        }
        if (out.len == 0) {
            break; /* stopped at a request the Python path must take */
        }
        int full = out.len >= self->reply_limit;
        int rc = deliver(self, &out);
        out_free(&out);
        if (rc < 0) {
            return NULL;
        }
        if (!full || pos == end || !self->enabled) {
            break;
        }
    }
    out_free(&out);
    if (pos == end) {
        self->parked = (char)ctx.parked;
        Py_RETURN_NONE;
    }
    PyObject *rest = pos == 0 ? Py_NewRef(data)
                              : PyBytes_FromStringAndSize((const char *)p + pos, end - pos);
    if (rest == NULL) {
        return NULL;
    }
    PyObject *result = call_slow(self, rest);
    Py_DECREF(rest);
    return result;
}

/* Answer ``waiter``, a WAIT this receiver parked, woken by another connection's write:
 * when nothing reached the connection since it was parked (``parked``), the waiter is
 * still its only one and still owned (not dropped by a close or CANCEL_WAIT), and its
 * plain TCP transport is open with nothing queued, this is all the Python path
 * (StoreServer._reply_to) would do: forget the waiter (``connection.waiters``,
 * ``wait_keys``), send STOP_WAITING and re-enable the receiver (Connection.refresh: the
 * state that enabled it when the WAIT was parked is unchanged). 1 when answered, 0 when
 * it must take the Python path (nothing changed), -1 with an exception set. */
static int
answer_woken(Receiver *self, PyObject *waiter)
{
    if (!self->parked || self->fd < 0 || self->buffered == NULL || self->buffered == Py_None ||
        self->write == NULL || self->write == Py_None || self->owner == NULL ||
        !PyTuple_Check(self->owner) || PyTuple_GET_SIZE(self->owner) < 1) {
        return 0;
    }
    PyObject *owner = PyObject_GetAttr(waiter, owner_name);
    if (owner == NULL) {
        return -1;
    }
    int same = owner == self->owner;
    Py_DECREF(owner);
    if (!same) {
        return 0; /* dropped, or not parked here */
    }
    int result = -1;
    PyObject *conn = Py_NewRef(PyTuple_GET_ITEM(self->owner, 0));
    PyObject *waiters = NULL, *keys = NULL, *left = NULL, *transport = NULL, *closing = NULL;
    waiters = PyObject_GetAttr(conn, waiters_name);
    if (waiters == NULL) {
        goto done;
    }
    if (!PyDict_CheckExact(waiters) || PyDict_GET_SIZE(waiters) != 1) {
        result = 0;
        goto done;
    }
    PyObject *named = PyDict_GetItemWithError(waiters, waiter); /* borrowed */
    if (named == NULL) {
        result = PyErr_Occurred() ? -1 : 0;
        goto done;
    }
    keys = PyObject_GetAttr(conn, wait_keys_name);
    if (keys == NULL || (left = PyNumber_Subtract(keys, named)) == NULL) {
        goto done;
    }
    transport = PyObject_GetAttr(conn, transport_name);
    if (transport == NULL || (closing = PyObject_CallMethodNoArgs(transport, is_closing_name)) == NULL) {
        goto done;
    }
    int shut = PyObject_IsTrue(closing);
    if (shut != 0) {
        result = shut < 0 ? -1 : 0; /* closing: its descriptor may be gone */
        goto done;
    }
    int busy = transport_busy(self);
    if (busy != 0) {
        result = busy < 0 ? -1 : 0; /* queued replies go first: the Python path */
        goto done;
    }
    /* Decided: from here on, act. */
    self->parked = 0;
    if (PyDict_DelItem(waiters, waiter) < 0 || PyObject_SetAttr(conn, wait_keys_name, left) < 0) {
        goto done;
    }
#ifdef HAVE_SEND
    ssize_t n;
    do {
        n = send(self->fd, "", 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n == 1) {
        self->enabled = 1;
        result = 1;
        goto done;
    }
#endif
    /* Not sent (a full socket buffer, an error the transport will report): the transport
     * writes it, and the connection decides whether the receiver may run again. */
    self->maybe_queued = 1;
    PyObject *written = PyObject_CallOneArg(self->write, stop_waiting);
    if (written == NULL) {
        goto done;
    }
    Py_DECREF(written);
    PyObject *refreshed = PyObject_CallMethodNoArgs(conn, refresh_name);
    if (refreshed == NULL) {
        goto done;
    }
    Py_DECREF(refreshed);
    result = 1;
done:
    Py_XDECREF(closing);
    Py_XDECREF(transport);
    Py_XDECREF(left);
    Py_XDECREF(keys);
    Py_XDECREF(waiters);
    Py_DECREF(conn);
    return result;
}

/* The callback of the waiters this receiver parks (``woken(waiter)``, called by the engine
 * when the key is written): answered here when answer_woken can, else handed to the
 * executor's ``on_fire`` (the server's, which replies after the waking request). */
static PyObject *
receiver_woken(PyObject *op, PyObject *waiter)
{
    Receiver *self = (Receiver *)op;
    Py_INCREF(self);
    PyObject *result = NULL;
    int rc = answer_woken(self, waiter);
    if (rc > 0) {
        result = Py_NewRef(Py_None);
    }
    else if (rc == 0) {
        PyObject *on_fire = self->executor == NULL ? NULL : ((Executor *)self->executor)->on_fire;
        if (on_fire == NULL || on_fire == Py_None) {
            PyErr_SetString(PyExc_RuntimeError, "Receiver.woken: the executor has no on_fire");
        }
        else {
            self->maybe_queued = 1; /* the server's reply goes through the transport */
            result = PyObject_CallOneArg(on_fire, waiter);
        }
    }
    Py_DECREF(self);
    return result;
}

static PyMethodDef receiver_woken_def = {
    "woken", (PyCFunction)receiver_woken, METH_O,
    "woken(waiter): the engine's callback of a WAIT waiter this receiver parked"};

/* receiver_feed, timed into the executor's latency histogram while it counts. */
static PyObject *
receiver_feed_counted(Receiver *self, PyObject *data)
{
    Executor *ex = (Executor *)self->executor;
    if (!ex->counting) {
        return receiver_feed(self, data);
    }
    Py_INCREF(ex); /* the feed may drop the connection's references */
    unsigned long long start = now_ns();
    PyObject *result = receiver_feed(self, data);
    observe_latency(ex, now_ns() - start);
    Py_DECREF(ex);
    return result;
}

static PyObject *
receiver_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                    PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_Format(PyExc_TypeError, "Receiver() takes exactly one argument, the data");
        return NULL;
    }
    Receiver *self = (Receiver *)callable;
    if (self->slow == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver called before __init__()");
        return NULL;
    }
    return receiver_feed_counted(self, args[0]);
}

static int
receiver_init(Receiver *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"executor", "slow", "reply_limit", NULL};
    PyObject *executor, *slow;
    Py_ssize_t reply_limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!On", kwlist, &ExecutorType, &executor,
                                     &slow, &reply_limit)) {
        return -1;
    }
    if (!PyCallable_Check(slow)) {
        PyErr_SetString(PyExc_TypeError, "Receiver(): slow must be callable");
        return -1;
    }
    if (reply_limit < 1) {
        PyErr_SetString(PyExc_ValueError, "Receiver(): reply_limit must be >= 1");
        return -1;
    }
    Py_XSETREF(self->executor, Py_NewRef(executor));
    Py_XSETREF(self->slow, Py_NewRef(slow));
    Py_XSETREF(self->write, Py_NewRef(Py_None));
    Py_XSETREF(self->buffered, Py_NewRef(Py_None));
    Py_XSETREF(self->parser, Py_NewRef(Py_None));
    Py_XSETREF(self->owner, Py_NewRef(Py_None));
    self->fd = -1;
    self->enabled = 0;
    self->extended = 0;
    self->validate = 0;
    self->parked = 0;
    self->maybe_queued = 1;
    self->reply_limit = reply_limit;
    self->seen_epoch = 0;
    self->vectorcall = receiver_vectorcall;
    return 0;
}

static int
receiver_traverse(Receiver *self, visitproc visit, void *arg)
{
    Py_VISIT(self->executor);
    Py_VISIT(self->slow);
    Py_VISIT(self->write);
    Py_VISIT(self->buffered);
    Py_VISIT(self->parser);
    Py_VISIT(self->owner);
    return 0;
}

static int
receiver_clear(Receiver *self)
{
    Py_CLEAR(self->executor);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->write);
    Py_CLEAR(self->buffered);
    Py_CLEAR(self->parser);
    Py_CLEAR(self->owner);
    return 0;
}

static void
receiver_dealloc(Receiver *self)
{
    PyObject_GC_UnTrack(self);
    receiver_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ``write`` and ``buffered``: a callable or None (closure: offset of the field). */
static PyObject *
receiver_get_callable(Receiver *self, void *closure)
{
    PyObject *value = *(PyObject **)((char *)self + (size_t)closure);
    return Py_NewRef(value != NULL ? value : Py_None);
}

static int
receiver_set_callable(Receiver *self, PyObject *value, void *closure)
{
    if (value == NULL || (value != Py_None && !PyCallable_Check(value))) {
        PyErr_SetString(PyExc_TypeError, "Receiver: expected a callable or None");
        return -1;
    }
    Py_XSETREF(*(PyObject **)((char *)self + (size_t)closure), Py_NewRef(value));
    return 0;
}

static PyObject *
receiver_get_enabled(Receiver *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->enabled);
}

/* Set by the Python side (Connection.refresh) after each of its turns, which may have
 * written to the transport: the next direct send asks the transport first. */
static int
receiver_set_enabled(Receiver *self, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL || !PyBool_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "Receiver.enabled: expected a bool");
        return -1;
    }
    self->enabled = (char)(value == Py_True);
    self->maybe_queued = 1;
    return 0;
}

static PyGetSetDef receiver_getset[] = {
    {"enabled", (getter)receiver_get_enabled, (setter)receiver_set_enabled,
     "bool: the next bytes may take the fast path (set by the Python side, which also "
     "makes the next direct send ask ``buffered`` first)",
     NULL},
    {"write", (getter)receiver_get_callable, (setter)receiver_set_callable,
     "callable(bytes) writing replies (the transport's write), or None",
     (void *)offsetof(Receiver, write)},
    {"buffered", (getter)receiver_get_callable, (setter)receiver_set_callable,
     "callable() -> int: bytes the transport holds unsent (get_write_buffer_size), or None",
     (void *)offsetof(Receiver, buffered)},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef receiver_members[] = {
    {"extended", T_BOOL, offsetof(Receiver, extended), 0,
     "bool: the client negotiated rdzv's extensions"},
    {"validate", T_BOOL, offsetof(Receiver, validate), 0,
     "bool: the connection's first request, VALIDATE, is still to come: the receiver takes "
     "it when it arrives whole with the right magic (and sets ``parser.validated``), else "
     "hands it to ``slow``; cleared either way"},
    {"parser", T_OBJECT, offsetof(Receiver, parser), 0,
     "the connection's request parser (its ``validated`` is set True when the receiver "
     "takes VALIDATE), or None"},
    {"owner", T_OBJECT, offsetof(Receiver, owner), 0,
     "tuple (connection, ...) or None: the owner of the waiter of a WAIT on one absent key "
     "sent on this connection, which the receiver parks (the engine's park, then "
     "``connection.add_waiter(waiter, 1)``) and then disables itself; None: the Python "
     "path parks"},
    {"fd", T_INT, offsetof(Receiver, fd), 0,
     "int: the plain TCP socket replies may be sent on directly when ``buffered()`` is 0 "
     "(-1: never; TLS connections must keep -1)"},
    {NULL, 0, 0, 0, NULL},
};

PyDoc_STRVAR(receiver_doc,
"Receiver(executor, slow, reply_limit)\n\n"
"A connection's data_received: receiver(data) executes the simple requests of ``data``\n"
"(bytes) with ``executor`` while ``enabled``, writes their replies with ``write``, and\n"
"calls ``slow(rest)`` with the bytes from the first request it did not take (or all of\n"
"``data`` when disabled). See rdzv.server.fastpath.");

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rdzv.server._fastpath.Receiver",
    .tp_basicsize = sizeof(Receiver),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = receiver_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)receiver_init,
    .tp_traverse = (traverseproc)receiver_traverse,
    .tp_clear = (inquiry)receiver_clear,
    .tp_dealloc = (destructor)receiver_dealloc,
    .tp_vectorcall_offset = offsetof(Receiver, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_members = receiver_members,
    .tp_getset = receiver_getset,
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rdzv.server._fastpath",
    .m_doc = "The TCPStore server's hot path in C (see rdzv.server.fastpath).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    validated_name = PyUnicode_InternFromString("validated");
    add_waiter_name = PyUnicode_InternFromString("add_waiter");
    one = PyLong_FromLong(1);
    waiters_name = PyUnicode_InternFromString("waiters");
    wait_keys_name = PyUnicode_InternFromString("wait_keys");
    owner_name = PyUnicode_InternFromString("owner");
    transport_name = PyUnicode_InternFromString("transport");
    is_closing_name = PyUnicode_InternFromString("is_closing");
    refresh_name = PyUnicode_InternFromString("refresh");
    stop_waiting = PyBytes_FromStringAndSize("", 1);
    if (validated_name == NULL || add_waiter_name == NULL || one == NULL ||
        waiters_name == NULL || wait_keys_name == NULL || owner_name == NULL ||
        transport_name == NULL || is_closing_name == NULL || refresh_name == NULL ||
        stop_waiting == NULL) {
        return NULL;
    }
    if (PyType_Ready(&ExecutorType) < 0 || PyType_Ready(&ReceiverType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&fastpath_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Executor", (PyObject *)&ExecutorType) < 0 ||
        PyModule_AddObjectRef(module, "Receiver", (PyObject *)&ReceiverType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
