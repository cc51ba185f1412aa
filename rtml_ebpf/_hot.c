/*
 * rtml_ebpf._hot - the hot-path check as a C callable.
 *
 * Verdict(buffer, offset, ahead=None) reads one byte of a buffer (the mmapped BPF slot, or the
 * agent's page) each time it is called and returns True when it is nonzero, or when the first
 * byte of ``ahead`` is (a limiter's "limit within N ms at this rate" flag, set by its monitor). It is what
 * Limiter.is_mem_limit_reached is bound to: one vectorcall, one load, no Python frame (a
 * functools.partial over operator.getitem costs about twice as much). It holds the buffer
 * export for as long as it lives, so the mapping cannot be closed under it.
 *
 * Built against the limited API of 3.10 (one abi3 module for every CPython from 3.10 on, see
 * setup.py), so the type is a heap type made from a spec, and the parts of the vectorcall and
 * buffer protocols that joined the limited API only later are declared here (below).
 *
 * Optional: without a compiler or Python headers the package falls back to the partial.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <time.h>

#if defined(Py_LIMITED_API) && Py_LIMITED_API + 0 < 0x030C0000
/* Vectorcall joined the limited API in 3.12, with the values it has had since 3.8 (PEP 590):
 * the flag bit, and the offset bit in nargsf. CPython 3.10 and 3.11 read the flag and
 * tp_vectorcall_offset (set from the __vectorcalloffset__ member) on heap types as on any. */
#ifndef Py_TPFLAGS_HAVE_VECTORCALL
#define Py_TPFLAGS_HAVE_VECTORCALL (1UL << 11)
#endif
#define RTML_VECTORCALL_ARGUMENTS_OFFSET ((size_t)1 << (8 * sizeof(size_t) - 1))
#define RTML_NARGS(n) ((Py_ssize_t)((n) & ~RTML_VECTORCALL_ARGUMENTS_OFFSET))
#else
#define RTML_NARGS(n) PyVectorcall_NARGS(n)
#endif

#if defined(Py_LIMITED_API) && Py_LIMITED_API + 0 < 0x030B0000
/* The buffer protocol joined the limited API in 3.11 with the struct and the two functions
 * CPython has exported unchanged since 3.0 (PEP 3118); 3.10 exports them too. Declared here so
 * the one abi3 module also runs on 3.10 (scripts/dist.sh checks every Python* symbol it imports
 * against each supported interpreter's exports). */
typedef struct {
	void *buf;
	PyObject *obj;
	Py_ssize_t len;
	Py_ssize_t itemsize;
	int readonly;
	int ndim;
	char *format;
	Py_ssize_t *shape;
	Py_ssize_t *strides;
	Py_ssize_t *suboffsets;
	void *internal;
} Py_buffer;
#define PyBUF_SIMPLE 0
#define PyBUF_WRITABLE 0x0001
PyAPI_FUNC(int) PyObject_GetBuffer(PyObject *obj, Py_buffer *view, int flags);
PyAPI_FUNC(void) PyBuffer_Release(Py_buffer *view);
#endif

typedef PyObject *(*verdict_vectorcall)(PyObject *, PyObject *const *, size_t, PyObject *);

typedef struct {
	PyObject_HEAD
	const volatile unsigned char *byte;
	const volatile unsigned char *ahead;	/* NULL: no forecast */
	Py_buffer view;
	Py_buffer ahead_view;
	PyObject *watch;	/* what keeps the verdict meaningful (the Watch / lease), held */
	verdict_vectorcall vectorcall;
} Verdict;

static PyObject *verdict_answer(PyObject *self)
{
	Verdict *v = (Verdict *)self;
	if (*v->byte || (v->ahead && *v->ahead))
		Py_RETURN_TRUE;
	Py_RETURN_FALSE;
}

/* The hot path: what `lim.is_mem_limit_reached()` runs. */
static PyObject *verdict_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
	(void)args;
	if (RTML_NARGS(nargsf) != 0 || (kwnames && PyTuple_Size(kwnames))) {
		PyErr_SetString(PyExc_TypeError, "the check takes no arguments");
		return NULL;
	}
	return verdict_answer(self);
}

/* tp_call, for callers that do not use vectorcall (PyObject_Call with a tuple) */
static PyObject *verdict_tp_call(PyObject *self, PyObject *args, PyObject *kwargs)
{
	if (PyTuple_Size(args) != 0 || (kwargs && PyDict_Size(kwargs))) {
		PyErr_SetString(PyExc_TypeError, "the check takes no arguments");
		return NULL;
	}
	return verdict_answer(self);
}

static PyObject *verdict_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
	PyObject *buffer, *ahead = Py_None;
	Py_ssize_t offset = 0;
	static char *kwlist[] = {"buffer", "offset", "ahead", NULL};

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|nO", kwlist, &buffer, &offset, &ahead))
		return NULL;
	allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
	Verdict *self = (Verdict *)alloc(type, 0);
	if (!self)
		return NULL;
	self->ahead_view.obj = NULL;
	if (PyObject_GetBuffer(buffer, &self->view, PyBUF_SIMPLE) < 0) {
		self->view.obj = NULL;
		Py_DECREF(self);
		return NULL;
	}
	if (ahead != Py_None) {
		if (PyObject_GetBuffer(ahead, &self->ahead_view, PyBUF_SIMPLE) < 0) {
			self->ahead_view.obj = NULL;
			Py_DECREF(self);
			return NULL;
		}
		if (self->ahead_view.len < 1) {
			PyErr_SetString(PyExc_ValueError, "ahead must hold at least one byte");
			Py_DECREF(self);
			return NULL;
		}
		self->ahead = (const volatile unsigned char *)self->ahead_view.buf;
	}
	if (offset < 0 || offset >= self->view.len) {
		PyErr_Format(PyExc_ValueError, "offset %zd outside a buffer of %zd bytes", offset, self->view.len);
		Py_DECREF(self);
		return NULL;
	}
	self->byte = (const volatile unsigned char *)self->view.buf + offset;
	self->vectorcall = verdict_call;
	return (PyObject *)self;
}

static void verdict_dealloc(PyObject *obj)
{
	Verdict *self = (Verdict *)obj;
	PyTypeObject *type = Py_TYPE(obj);
	if (self->view.obj)
		PyBuffer_Release(&self->view);
	if (self->ahead_view.obj)
		PyBuffer_Release(&self->ahead_view);
	Py_XDECREF(self->watch);
	freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
	tp_free(obj);
	Py_DECREF(type);	/* instances of a heap type hold their type */
}

/* verdict[0]: the same answer, for code that indexes a flag */
static PyObject *verdict_item(PyObject *self, Py_ssize_t i)
{
	if (i != 0) {
		PyErr_SetString(PyExc_IndexError, "a verdict has one item");
		return NULL;
	}
	return verdict_answer(self);
}

static PyMemberDef verdict_members[] = {
	{"watch", T_OBJECT, offsetof(Verdict, watch), 0, "the handle this verdict belongs to (kept alive)"},
	{"__vectorcalloffset__", T_PYSSIZET, offsetof(Verdict, vectorcall), READONLY, NULL},
	{NULL},
};

static PyType_Slot verdict_slots[] = {
	{Py_tp_doc, (void *)"Verdict(buffer, offset=0, ahead=None): calling it returns whether the byte at offset "
			    "(or ahead[0]) is nonzero."},
	{Py_tp_new, (void *)verdict_new},
	{Py_tp_dealloc, (void *)verdict_dealloc},
	{Py_tp_call, (void *)verdict_tp_call},
	{Py_sq_item, (void *)verdict_item},
	{Py_tp_members, (void *)verdict_members},
	{0, NULL},
};

static PyType_Spec verdict_spec = {
	.name = "rtml_ebpf._hot.Verdict",
	.basicsize = sizeof(Verdict),
	.flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
	.slots = verdict_slots,
};

/*
 * ledger_others(buffer, own_row) - the admission ledger's sums (rtml_ebpf/admission/ledger.py)
 * for one decision: (reserved, inflight, learning) of every row but ``own_row``, and the
 * (largest, per_kib) of every row, own included. The layout is ledger.py's: a header of 8 int64
 * (word 3: rows in use), then rows of 8 int64 (2 reserved, 3 inflight, 4 learning, 6 largest,
 * 7 per_kib). A full fence first: the caller has just written its own row (its claim), and the
 * claim is safe only if no load below is ordered before that store (x86 lets a load pass an
 * earlier store; see ledger.py, "claim, then look"). Rows are single-writer and every word is an
 * aligned 8-byte store, so each load sees one whole value.
 */
#define LEDGER_HEADER 8
#define LEDGER_FIELDS 8
#define LEDGER_USED 3
#define LEDGER_ROWS 128

#define LEDGER_BYTES ((Py_ssize_t)((LEDGER_HEADER + LEDGER_ROWS * LEDGER_FIELDS) * sizeof(long long)))

/* The fence and the sums, over a view of at least LEDGER_BYTES. */
static PyObject *sum_rows(const long long *q, Py_ssize_t own)
{
	long long reserved = 0, inflight = 0, learning = 0, largest = 0, per_kib = 0;

	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	long long used = __atomic_load_n(&q[LEDGER_USED], __ATOMIC_RELAXED);
	if (used < 0 || used > LEDGER_ROWS)
		used = LEDGER_ROWS;
	for (long long r = 0; r < used; r++) {
		const long long *row = q + LEDGER_HEADER + r * LEDGER_FIELDS;
		long long big = __atomic_load_n(&row[6], __ATOMIC_RELAXED);
		long long kib = __atomic_load_n(&row[7], __ATOMIC_RELAXED);
		if (big > largest)
			largest = big;
		if (kib > per_kib)
			per_kib = kib;
		if (r == own)
			continue;
		reserved += __atomic_load_n(&row[2], __ATOMIC_RELAXED);
		inflight += __atomic_load_n(&row[3], __ATOMIC_RELAXED);
		learning += __atomic_load_n(&row[4], __ATOMIC_RELAXED);
	}
	return Py_BuildValue("(LLLLL)", reserved, inflight, learning, largest, per_kib);
}

static int ledger_view(PyObject *buffer, Py_buffer *view, int flags)
{
	if (PyObject_GetBuffer(buffer, view, flags) < 0)
		return -1;
	if (view->len < LEDGER_BYTES) {
		PyBuffer_Release(view);
		PyErr_SetString(PyExc_ValueError, "a ledger buffer is smaller than the ledger");
		return -1;
	}
	return 0;
}

static PyObject *ledger_others(PyObject *module, PyObject *args)
{
	PyObject *buffer, *out;
	Py_ssize_t own;
	Py_buffer view;

	(void)module;
	if (!PyArg_ParseTuple(args, "On", &buffer, &own))
		return NULL;
	if (ledger_view(buffer, &view, PyBUF_SIMPLE) < 0)
		return NULL;
	out = sum_rows((const long long *)view.buf, own);
	PyBuffer_Release(&view);
	return out;
}

/*
 * ledger_claim(buffer, own_row, reserved, inflight, learning, largest, per_kib) - the request
 * path's claim: this process's row written (reserved, inflight, learning, largest, per_kib, and
 * the time of the write on CLOCK_MONOTONIC, Python's time.monotonic_ns), then ledger_others'
 * fence and sums. The caller is the row's only writer (Admission holds its lock).
 */
static PyObject *ledger_claim(PyObject *module, PyObject *args)
{
	(void)module;
	PyObject *buffer, *out;
	Py_ssize_t own;
	long long v[5];
	Py_buffer view;
	struct timespec now;

	if (!PyArg_ParseTuple(args, "OnLLLLL", &buffer, &own, &v[0], &v[1], &v[2], &v[3], &v[4]))
		return NULL;
	if (own < 0 || own >= LEDGER_ROWS) {
		PyErr_Format(PyExc_ValueError, "row %zd outside a ledger of %d rows", own, LEDGER_ROWS);
		return NULL;
	}
	if (ledger_view(buffer, &view, PyBUF_WRITABLE) < 0)
		return NULL;
	long long *row = (long long *)view.buf + LEDGER_HEADER + own * LEDGER_FIELDS;
	clock_gettime(CLOCK_MONOTONIC, &now);
	__atomic_store_n(&row[6], v[3], __ATOMIC_RELAXED);
	__atomic_store_n(&row[7], v[4], __ATOMIC_RELAXED);
	__atomic_store_n(&row[2], v[0] > 0 ? v[0] : 0, __ATOMIC_RELAXED);
	__atomic_store_n(&row[3], v[1], __ATOMIC_RELAXED);
	__atomic_store_n(&row[4], v[2], __ATOMIC_RELAXED);
	__atomic_store_n(&row[5], (long long)now.tv_sec * 1000000000LL + now.tv_nsec, __ATOMIC_RELAXED);
	out = sum_rows((const long long *)view.buf, own);
	PyBuffer_Release(&view);
	return out;
}

static PyMethodDef hot_methods[] = {
	{"ledger_claim", ledger_claim, METH_VARARGS,
	 "ledger_claim(buffer, own_row, reserved, inflight, learning, largest, per_kib) -> ledger_others(buffer, "
	 "own_row), after writing the row (the admission ledger's request path)."},
	{"ledger_others", ledger_others, METH_VARARGS,
	 "ledger_others(buffer, own_row) -> (reserved, inflight, learning, largest, per_kib): the admission "
	 "ledger's sums after a full fence (others' rows; largest and per_kib of every row)."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef hot_module = {
	PyModuleDef_HEAD_INIT, "_hot", "The hot-path check as a C callable, and the admission ledger's sums.", -1,
	hot_methods,
};

PyMODINIT_FUNC PyInit__hot(void)
{
	PyObject *m = PyModule_Create(&hot_module);
	if (!m)
		return NULL;
	PyObject *type = PyType_FromSpec(&verdict_spec);
	if (!type || PyModule_AddObject(m, "Verdict", type) < 0) {
		Py_XDECREF(type);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
