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
#include <string.h>
#include <limits.h>
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

/* The fence and the sums, over a view of at least LEDGER_BYTES: reserved, inflight, learning (every
 * row but own), largest, per_kib (every row). */
static void sums_of(const long long *q, Py_ssize_t own, long long out[5])
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
	out[0] = reserved;
	out[1] = inflight;
	out[2] = learning;
	out[3] = largest;
	out[4] = per_kib;
}

static PyObject *sum_rows(const long long *q, Py_ssize_t own)
{
	long long v[5];

	sums_of(q, own, v);
	return Py_BuildValue("(LLLLL)", v[0], v[1], v[2], v[3], v[4]);
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
/* Write own row of the ledger in ``buffer`` (v: reserved, inflight, learning, largest, per_kib; and the
 * time), leaving ``view`` held for the sums (the caller releases it). */
static int claim_row(PyObject *buffer, Py_ssize_t own, const long long v[5], Py_buffer *view)
{
	struct timespec now;

	if (own < 0 || own >= LEDGER_ROWS) {
		PyErr_Format(PyExc_ValueError, "row %zd outside a ledger of %d rows", own, LEDGER_ROWS);
		return -1;
	}
	if (ledger_view(buffer, view, PyBUF_WRITABLE) < 0)
		return -1;
	long long *row = (long long *)view->buf + LEDGER_HEADER + own * LEDGER_FIELDS;
	clock_gettime(CLOCK_MONOTONIC, &now);
	__atomic_store_n(&row[6], v[3], __ATOMIC_RELAXED);
	__atomic_store_n(&row[7], v[4], __ATOMIC_RELAXED);
	__atomic_store_n(&row[2], v[0] > 0 ? v[0] : 0, __ATOMIC_RELAXED);
	__atomic_store_n(&row[3], v[1], __ATOMIC_RELAXED);
	__atomic_store_n(&row[4], v[2], __ATOMIC_RELAXED);
	__atomic_store_n(&row[5], (long long)now.tv_sec * 1000000000LL + now.tv_nsec, __ATOMIC_RELAXED);
	return 0;
}

static PyObject *ledger_claim(PyObject *module, PyObject *args)
{
	(void)module;
	PyObject *buffer, *out;
	Py_ssize_t own;
	long long v[5];
	Py_buffer view;

	if (!PyArg_ParseTuple(args, "OnLLLLL", &buffer, &own, &v[0], &v[1], &v[2], &v[3], &v[4]))
		return NULL;
	if (claim_row(buffer, own, v, &view) < 0)
		return NULL;
	out = sum_rows((const long long *)view.buf, own);
	PyBuffer_Release(&view);
	return out;
}

/*
 * Room(words, config_words, usage, limit, headroom, high, high_room, inactive_delta, inactive_base,
 *      working_set, trip_ppm, trip_bytes, unlimited_pages, page_size)
 * - one watched slot's room, read where admission asks on every request (rtml_ebpf/ebpf/words.py
 * room_from_pages, the same arithmetic: keep the two in step). ``words``/``config_words``: the int64
 * views of the slots and configs maps; the next seven are word indexes in them; ``trip_ppm`` and
 * ``trip_bytes``: the rule's trip threshold (-1: not set). It holds both buffers for as long as it
 * lives, as Verdict does: the mapping cannot go away under it. Whether it still reads the right
 * cgroup is its owner's to say (the backend drops it when the slot is released).
 *
 * Calling it returns (bytes before the rule trips, bytes before the OOM killer acts), None where
 * unlimited. fits(rows, own_row, reserved, inflight, learning, largest, per_kib, estimate) is
 * admission's decision for a request whose estimate is known: ledger_claim, then the room, then
 * "estimate + ours + the others' <= room" (or no room to keep). (others' reserved, bytes before the
 * OOM killer or None) when it fits; None when it does not (the caller decides again, slowly).
 */
typedef struct {
	PyObject_HEAD
	Py_buffer words;
	Py_buffer config;
	Py_ssize_t at[7];	/* usage, limit, headroom, high, high_room, inactive_delta; config: inactive_base */
	int working_set;
	long long trip_ppm, trip_bytes, unlimited, page;
	verdict_vectorcall vectorcall;
} Room;

#define ROOM_NONE LLONG_MIN

static inline long long room_word(const Py_buffer *b, Py_ssize_t i)
{
	return __atomic_load_n((const long long *)b->buf + i, __ATOMIC_RELAXED);
}

/* bytes before the trip (ROOM_NONE: unlimited) and before the OOM killer (ROOM_NONE: unlimited) */
static void room_read(const Room *r, long long *room, long long *limit_room)
{
	long long usage = room_word(&r->words, r->at[0]), limit = room_word(&r->words, r->at[1]);
	long long headroom = room_word(&r->words, r->at[2]), high = room_word(&r->words, r->at[3]);
	long long high_room = room_word(&r->words, r->at[4]);
	long long inactive = room_word(&r->config, r->at[6]) + room_word(&r->words, r->at[5]);
	long long top = limit < high ? limit : high, left = headroom < high_room ? headroom : high_room;
	long long used = top >= r->unlimited ? usage : top - left, trip;

	*limit_room = limit >= r->unlimited ? ROOM_NONE : headroom * r->page;
	if (r->working_set) {
		used -= inactive;
		if (used < 0)
			used = 0;
	}
	if (r->trip_bytes >= 0) {
		trip = r->trip_bytes;
	} else if (top >= r->unlimited || r->trip_ppm < 0) {
		*room = ROOM_NONE;
		return;
	} else {
		/* top * page * ppm // 10^6 without overflowing: split the bytes at 10^6 */
		long long bytes = top * r->page;
		trip = bytes / 1000000 * r->trip_ppm + bytes % 1000000 * r->trip_ppm / 1000000;
	}
	*room = trip - used * r->page;
}

static PyObject *room_value(long long v)
{
	if (v == ROOM_NONE)
		Py_RETURN_NONE;
	return PyLong_FromLongLong(v);
}

static PyObject *room_answer(PyObject *self)
{
	long long room, limit_room;
	PyObject *a, *b, *out;

	room_read((const Room *)self, &room, &limit_room);
	a = room_value(room);
	b = room_value(limit_room);
	out = a && b ? PyTuple_Pack(2, a, b) : NULL;
	Py_XDECREF(a);
	Py_XDECREF(b);
	return out;
}

static PyObject *room_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
	(void)args;
	if (RTML_NARGS(nargsf) != 0 || (kwnames && PyTuple_Size(kwnames))) {
		PyErr_SetString(PyExc_TypeError, "the room takes no arguments");
		return NULL;
	}
	return room_answer(self);
}

static PyObject *room_tp_call(PyObject *self, PyObject *args, PyObject *kwargs)
{
	if (PyTuple_Size(args) != 0 || (kwargs && PyDict_Size(kwargs))) {
		PyErr_SetString(PyExc_TypeError, "the room takes no arguments");
		return NULL;
	}
	return room_answer(self);
}

static PyObject *room_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
	PyObject *words, *config;
	Py_ssize_t at[7];
	int working_set;
	long long ppm, nbytes, unlimited, page;
	static char *kwlist[] = {"words", "config_words", "usage", "limit", "headroom", "high", "high_room",
				 "inactive_delta", "inactive_base", "working_set", "trip_ppm", "trip_bytes",
				 "unlimited_pages", "page_size", NULL};

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnnnnnnnpLLLL", kwlist, &words, &config, &at[0], &at[1],
					 &at[2], &at[3], &at[4], &at[5], &at[6], &working_set, &ppm, &nbytes,
					 &unlimited, &page))
		return NULL;
	allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
	Room *self = (Room *)alloc(type, 0);
	if (!self)
		return NULL;
	self->config.obj = NULL;
	if (PyObject_GetBuffer(words, &self->words, PyBUF_SIMPLE) < 0) {
		self->words.obj = NULL;
		Py_DECREF(self);
		return NULL;
	}
	if (PyObject_GetBuffer(config, &self->config, PyBUF_SIMPLE) < 0) {
		self->config.obj = NULL;
		Py_DECREF(self);
		return NULL;
	}
	for (int i = 0; i < 7; i++) {
		const Py_buffer *b = i == 6 ? &self->config : &self->words;
		if (at[i] < 0 || (at[i] + 1) * (Py_ssize_t)sizeof(long long) > b->len) {
			PyErr_Format(PyExc_ValueError, "word %zd outside a buffer of %zd bytes", at[i], b->len);
			Py_DECREF(self);
			return NULL;
		}
		self->at[i] = at[i];
	}
	if (page <= 0 || unlimited <= 0) {
		PyErr_SetString(PyExc_ValueError, "page_size and unlimited_pages must be positive");
		Py_DECREF(self);
		return NULL;
	}
	self->working_set = working_set;
	self->trip_ppm = ppm;
	self->trip_bytes = nbytes;
	self->unlimited = unlimited;
	self->page = page;
	self->vectorcall = room_call;
	return (PyObject *)self;
}

static void room_dealloc(PyObject *obj)
{
	Room *self = (Room *)obj;
	PyTypeObject *type = Py_TYPE(obj);
	if (self->words.obj)
		PyBuffer_Release(&self->words);
	if (self->config.obj)
		PyBuffer_Release(&self->config);
	freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
	tp_free(obj);
	Py_DECREF(type);
}

/* fits(rows, own_row, reserved, inflight, learning, largest, per_kib, estimate) */
static PyObject *room_fits(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	long long v[6], sums[5], room, limit_room;
	Py_ssize_t own;
	Py_buffer view;
	PyObject *others, *lr, *out;

	if (nargs != 8) {
		PyErr_SetString(PyExc_TypeError, "fits(rows, own_row, reserved, inflight, learning, largest, per_kib, "
				"estimate)");
		return NULL;
	}
	own = PyLong_AsSsize_t(args[1]);
	for (int i = 0; i < 6; i++)
		v[i] = PyLong_AsLongLong(args[2 + i]);
	if (PyErr_Occurred())
		return NULL;
	long long claim[5] = {v[0] + v[5], v[1] + 1, v[2], v[3], v[4]};
	if (claim_row(args[0], own, claim, &view) < 0)
		return NULL;
	sums_of((const long long *)view.buf, own, sums);
	PyBuffer_Release(&view);
	room_read((const Room *)self, &room, &limit_room);
	if (room != ROOM_NONE && v[5] + v[0] + sums[0] > room)
		Py_RETURN_NONE;
	others = PyLong_FromLongLong(sums[0]);
	lr = room_value(limit_room);
	out = others && lr ? PyTuple_Pack(2, others, lr) : NULL;
	Py_XDECREF(others);
	Py_XDECREF(lr);
	return out;
}

static PyMethodDef room_methods[] = {
	{"fits", (PyCFunction)(void (*)(void))room_fits, METH_FASTCALL,
	 "fits(rows, own_row, reserved, inflight, learning, largest, per_kib, estimate) -> (others' reserved, "
	 "bytes before the OOM killer or None) when the request fits, else None: the ledger claimed (the "
	 "request's estimate added to reserved, one more in flight), then the room looked at."},
	{NULL, NULL, 0, NULL},
};

static PyMemberDef room_members[] = {
	{"__vectorcalloffset__", T_PYSSIZET, offsetof(Room, vectorcall), READONLY, NULL},
	{NULL},
};

static PyType_Slot room_slots[] = {
	{Py_tp_doc, (void *)"Room(words, config_words, ...): calling it returns (bytes before the rule trips, bytes "
			    "before the OOM killer acts) of one watched slot, None where unlimited."},
	{Py_tp_new, (void *)room_new},
	{Py_tp_dealloc, (void *)room_dealloc},
	{Py_tp_call, (void *)room_tp_call},
	{Py_tp_methods, (void *)room_methods},
	{Py_tp_members, (void *)room_members},
	{0, NULL},
};

static PyType_Spec room_spec = {
	.name = "rtml_ebpf._hot.Room",
	.basicsize = sizeof(Room),
	.flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
	.slots = room_slots,
};

/*
 * Window(n) - the last n values, also kept sorted: the admission estimator's window of one route's
 * measured costs (rtml_ebpf/admission/estimator.py _Window, the same contract). add(v) is per
 * finished request: a binary search and a move of at most n words, where the Python window made a
 * bisect, a deque append and a list insertion through a dozen bytecodes. rank(q) is the nearest-rank
 * quantile (the smallest value with at least a fraction q of the values at or below it). Values are
 * clamped to int64 (bytes). Not thread-safe on its own: the estimator holds its lock.
 */
typedef struct {
	PyObject_HEAD
	Py_ssize_t n, count, head, cap;	/* head: the oldest value's index once the ring is full */
	long long *ring, *sorted;
} Window;

static PyObject *window_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
	Py_ssize_t n;
	static char *kwlist[] = {"n", NULL};

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "n", kwlist, &n))
		return NULL;
	if (n < 1) {
		PyErr_SetString(PyExc_ValueError, "a window holds at least one value");
		return NULL;
	}
	allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
	Window *self = (Window *)alloc(type, 0);
	if (!self)
		return NULL;
	self->n = n;
	self->cap = n < 64 ? n : 64;	/* grows to n as values come: a large n costs nothing until used */
	self->ring = PyMem_Malloc(self->cap * sizeof(long long));
	self->sorted = PyMem_Malloc(self->cap * sizeof(long long));
	if (!self->ring || !self->sorted) {
		Py_DECREF(self);
		return PyErr_NoMemory();
	}
	return (PyObject *)self;
}

static void window_dealloc(PyObject *obj)
{
	Window *self = (Window *)obj;
	PyTypeObject *type = Py_TYPE(obj);
	PyMem_Free(self->ring);
	PyMem_Free(self->sorted);
	freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
	tp_free(obj);
	Py_DECREF(type);
}

/* the first index in sorted[0:count] whose value is > v (right) or >= v (left) */
static Py_ssize_t window_search(const Window *w, long long v, int right)
{
	Py_ssize_t lo = 0, hi = w->count;
	while (lo < hi) {
		Py_ssize_t mid = (lo + hi) / 2;
		if (w->sorted[mid] < v || (right && w->sorted[mid] == v))
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static PyObject *window_add(PyObject *self, PyObject *arg)
{
	Window *w = (Window *)self;
	int overflow;
	long long v = PyLong_AsLongLongAndOverflow(arg, &overflow);
	Py_ssize_t at;

	if (v == -1 && PyErr_Occurred())
		return NULL;
	if (overflow)
		v = overflow > 0 ? LLONG_MAX : LLONG_MIN;
	if (w->count == w->n) {
		/* full: the oldest leaves the sorted copy, the new one takes its place in the ring */
		at = window_search(w, w->ring[w->head], 0);
		memmove(w->sorted + at, w->sorted + at + 1, (w->count - at - 1) * sizeof(long long));
		w->count--;
		w->ring[w->head] = v;
		w->head = (w->head + 1) % w->n;
	} else {
		if (w->count == w->cap) {
			Py_ssize_t cap = w->cap * 2 < w->n ? w->cap * 2 : w->n;
			long long *ring = PyMem_Realloc(w->ring, cap * sizeof(long long));
			if (!ring)
				return PyErr_NoMemory();
			w->ring = ring;
			long long *sorted = PyMem_Realloc(w->sorted, cap * sizeof(long long));
			if (!sorted)
				return PyErr_NoMemory();
			w->sorted = sorted;
			w->cap = cap;
		}
		w->ring[w->count] = v;	/* filling: head stays 0 */
	}
	at = window_search(w, v, 1);
	memmove(w->sorted + at + 1, w->sorted + at, (w->count - at) * sizeof(long long));
	w->sorted[at] = v;
	w->count++;
	return PyLong_FromSsize_t(w->count);
}

static PyObject *window_rank(PyObject *self, PyObject *arg)
{
	Window *w = (Window *)self;
	double q = PyFloat_AsDouble(arg);

	if (q == -1.0 && PyErr_Occurred())
		return NULL;
	if (w->count == 0) {
		PyErr_SetString(PyExc_IndexError, "an empty window has no quantile");
		return NULL;
	}
	/* max(1, ceil(q * count)) - 1, as nearest_rank computes it (the same double product) */
	double x = q * (double)w->count;
	long long k = (long long)x;
	if ((double)k < x)
		k++;
	if (k < 1)
		k = 1;
	if (k > w->count)
		k = w->count;
	return PyLong_FromLongLong(w->sorted[k - 1]);
}

static PyObject *window_ordered(PyObject *self, void *closure)
{
	Window *w = (Window *)self;
	(void)closure;
	PyObject *out = PyList_New(w->count);
	if (!out)
		return NULL;
	for (Py_ssize_t i = 0; i < w->count; i++) {
		PyObject *v = PyLong_FromLongLong(w->sorted[i]);
		if (!v) {
			Py_DECREF(out);
			return NULL;
		}
		PyList_SetItem(out, i, v);
	}
	return out;
}

static Py_ssize_t window_len(PyObject *self)
{
	return ((Window *)self)->count;
}

static PyMethodDef window_methods[] = {
	{"add", window_add, METH_O, "add(v) -> how many values the window holds now (the oldest leaves when full)."},
	{"rank", window_rank, METH_O, "rank(q) -> the nearest-rank q quantile of the values."},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef window_getset[] = {
	{"ordered", window_ordered, NULL, "the values, sorted (a new list)", NULL},
	{NULL},
};

static PyType_Slot window_slots[] = {
	{Py_tp_doc, (void *)"Window(n): the last n values, also kept sorted (the admission estimator's)."},
	{Py_tp_new, (void *)window_new},
	{Py_tp_dealloc, (void *)window_dealloc},
	{Py_tp_methods, (void *)window_methods},
	{Py_tp_getset, (void *)window_getset},
	{Py_sq_length, (void *)window_len},
	{0, NULL},
};

static PyType_Spec window_spec = {
	.name = "rtml_ebpf._hot.Window",
	.basicsize = sizeof(Window),
	.flags = Py_TPFLAGS_DEFAULT,
	.slots = window_slots,
};

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
	type = PyType_FromSpec(&room_spec);
	if (!type || PyModule_AddObject(m, "Room", type) < 0) {
		Py_XDECREF(type);
		Py_DECREF(m);
		return NULL;
	}
	type = PyType_FromSpec(&window_spec);
	if (!type || PyModule_AddObject(m, "Window", type) < 0) {
		Py_XDECREF(type);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
