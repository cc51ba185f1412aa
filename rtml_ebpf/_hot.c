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
 * Optional: without a compiler or Python headers the package falls back to the partial.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

typedef struct {
	PyObject_HEAD
	const volatile unsigned char *byte;
	const volatile unsigned char *ahead;	/* NULL: no forecast */
	Py_buffer view;
	Py_buffer ahead_view;
	PyObject *watch;	/* what keeps the verdict meaningful (the Watch / lease), held */
	vectorcallfunc vectorcall;
} Verdict;

static PyObject *verdict_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
	if (PyVectorcall_NARGS(nargsf) != 0 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
		PyErr_SetString(PyExc_TypeError, "the check takes no arguments");
		return NULL;
	}
	Verdict *v = (Verdict *)self;
	if (*v->byte || (v->ahead && *v->ahead))
		Py_RETURN_TRUE;
	Py_RETURN_FALSE;
}

static PyObject *verdict_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
	PyObject *buffer, *ahead = Py_None;
	Py_ssize_t offset = 0;
	static char *kwlist[] = {"buffer", "offset", "ahead", NULL};

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|nO", kwlist, &buffer, &offset, &ahead))
		return NULL;
	Verdict *self = (Verdict *)type->tp_alloc(type, 0);
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

static void verdict_dealloc(Verdict *self)
{
	if (self->view.obj)
		PyBuffer_Release(&self->view);
	if (self->ahead_view.obj)
		PyBuffer_Release(&self->ahead_view);
	Py_XDECREF(self->watch);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* verdict[0]: the same answer, for code that indexes a flag */
static PyObject *verdict_item(PyObject *self, Py_ssize_t i)
{
	if (i != 0) {
		PyErr_SetString(PyExc_IndexError, "a verdict has one item");
		return NULL;
	}
	return verdict_call(self, NULL, 0, NULL);
}

static PySequenceMethods verdict_as_sequence = {
	.sq_item = verdict_item,
};

static PyMemberDef verdict_members[] = {
	{"watch", T_OBJECT, offsetof(Verdict, watch), 0, "the handle this verdict belongs to (kept alive)"},
	{NULL},
};

static PyTypeObject VerdictType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "rtml_ebpf._hot.Verdict",
	.tp_basicsize = sizeof(Verdict),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
	.tp_doc = "Verdict(buffer, offset=0, ahead=None): calling it returns whether the byte at offset (or ahead[0]) is nonzero.",
	.tp_new = verdict_new,
	.tp_dealloc = (destructor)verdict_dealloc,
	.tp_call = PyVectorcall_Call,
	.tp_vectorcall_offset = offsetof(Verdict, vectorcall),
	.tp_as_sequence = &verdict_as_sequence,
	.tp_members = verdict_members,
};

static struct PyModuleDef hot_module = {
	PyModuleDef_HEAD_INIT, "_hot", "The hot-path check as a C callable.", -1, NULL,
};

PyMODINIT_FUNC PyInit__hot(void)
{
	if (PyType_Ready(&VerdictType) < 0)
		return NULL;
	PyObject *m = PyModule_Create(&hot_module);
	if (!m)
		return NULL;
	Py_INCREF(&VerdictType);
	if (PyModule_AddObject(m, "Verdict", (PyObject *)&VerdictType) < 0) {
		Py_DECREF(&VerdictType);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
