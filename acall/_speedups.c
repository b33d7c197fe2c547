/* Native helpers for acall's JSON encoding, and a fast constructor for its records.
 *
 * plain_tree(obj) walks a value and tells whether it is built only of exact dict, list,
 * tuple, str, int, float, bool and None (the values a fast encoder may take without
 * changing what json.dumps would write), and whether a dict key is a NaN or infinite
 * float (which encoders write differently).
 *
 * args_text(serialized_args) builds the bytes the canonical args_id hashes: for each
 * key in sorted order, JSON(key) "=" JSON(value) ";" in UTF-8, where JSON(s) is
 * json.dumps(s, ensure_ascii=False). Anything it does not take (a non-dict, a key or
 * value that is not an exact str, a lone surrogate) raises, and the caller's Python
 * path decides.
 *
 * escape_ascii(s, start, stop) returns the JSON escape of s[start:stop] exactly as
 * json.encoder.encode_basestring_ascii writes it, without the surrounding quotes:
 * '"' and '\\' and the five short control escapes get a backslash, every other
 * character outside ' '..'~' becomes \uXXXX (lowercase hex; a surrogate pair above
 * U+FFFF). The work runs with the GIL released, so a worker thread escaping a large
 * string leaves the GIL to the event loop and to other threads: a str is immutable,
 * and the caller's reference keeps it alive while the GIL is released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>

/* The 3.12 names of two structmember.h constants, for 3.11 too. */
#ifndef Py_T_OBJECT_EX
#define Py_T_OBJECT_EX T_OBJECT_EX
#endif
#ifndef Py_READONLY
#define Py_READONLY READONLY
#endif

/* Below this many characters, releasing and retaking the GIL costs more than it frees. */
#define GIL_RELEASE_MIN 8192

static const char HEX[] = "0123456789abcdef";

/* Output length of each character below 128: 1 (as is), 2 (short escape), 6 (\u00XX). */
static unsigned char ASCII_LEN[128];
/* The letter of each short escape, 0 for none. */
static char SHORT[128];

static void init_tables(void) {
    for (int c = 0; c < 128; c++) {
        ASCII_LEN[c] = (c >= 0x20 && c <= 0x7e) ? 1 : 6;
        SHORT[c] = 0;
    }
    SHORT['"'] = '"'; SHORT['\\'] = '\\'; SHORT['\n'] = 'n'; SHORT['\r'] = 'r';
    SHORT['\t'] = 't'; SHORT['\b'] = 'b'; SHORT['\f'] = 'f';
    for (int c = 0; c < 128; c++) {
        if (SHORT[c]) ASCII_LEN[c] = 2;
    }
}

static inline char *put_u(char *p, Py_UCS4 c) {
    p[0] = '\\';
    p[1] = 'u';
    p[2] = HEX[(c >> 12) & 0xf];
    p[3] = HEX[(c >> 8) & 0xf];
    p[4] = HEX[(c >> 4) & 0xf];
    p[5] = HEX[c & 0xf];
    return p + 6;
}

static inline Py_ssize_t char_len(Py_UCS4 c) {
    if (c < 128) return ASCII_LEN[c];
    return c >= 0x10000 ? 12 : 6;
}

static inline char *put_char(char *p, Py_UCS4 c) {
    if (c < 128) {
        switch (ASCII_LEN[c]) {
        case 1:
            *p = (char)c;
            return p + 1;
        case 2:
            p[0] = '\\';
            p[1] = SHORT[c];
            return p + 2;
        default:
            return put_u(p, c);
        }
    }
    if (c >= 0x10000) {
        Py_UCS4 v = c - 0x10000;
        p = put_u(p, 0xd800 | (v >> 10));
        return put_u(p, 0xdc00 | (v & 0x3ff));
    }
    return put_u(p, c);
}

#define ESCAPE_LOOPS(T)                                                   \
    static Py_ssize_t size_##T(const T *s, Py_ssize_t n) {                \
        Py_ssize_t out = 0;                                               \
        for (Py_ssize_t i = 0; i < n; i++) out += char_len(s[i]);         \
        return out;                                                       \
    }                                                                     \
    static void fill_##T(const T *s, Py_ssize_t n, char *p) {             \
        for (Py_ssize_t i = 0; i < n; i++) p = put_char(p, s[i]);         \
    }
ESCAPE_LOOPS(Py_UCS1)
ESCAPE_LOOPS(Py_UCS2)
ESCAPE_LOOPS(Py_UCS4)

static Py_ssize_t escaped_size(int kind, const void *data, Py_ssize_t n) {
    switch (kind) {
    case PyUnicode_1BYTE_KIND:
        return size_Py_UCS1((const Py_UCS1 *)data, n);
    case PyUnicode_2BYTE_KIND:
        return size_Py_UCS2((const Py_UCS2 *)data, n);
    default:
        return size_Py_UCS4((const Py_UCS4 *)data, n);
    }
}

static void escape_into(int kind, const void *data, Py_ssize_t n, char *p) {
    switch (kind) {
    case PyUnicode_1BYTE_KIND:
        fill_Py_UCS1((const Py_UCS1 *)data, n, p);
        break;
    case PyUnicode_2BYTE_KIND:
        fill_Py_UCS2((const Py_UCS2 *)data, n, p);
        break;
    default:
        fill_Py_UCS4((const Py_UCS4 *)data, n, p);
    }
}

static PyObject *escape_ascii(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "escape_ascii(s, start=0, stop=len(s))");
        return NULL;
    }
    PyObject *s = args[0];
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "escape_ascii() needs a str, not %.100s",
                     Py_TYPE(s)->tp_name);
        return NULL;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(s);
    Py_ssize_t start = 0, stop = length;
    if (nargs > 1 && (start = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred()) return NULL;
    if (nargs > 2 && (stop = PyLong_AsSsize_t(args[2])) == -1 && PyErr_Occurred()) return NULL;
    if (start < 0 || stop < start || stop > length) {
        PyErr_Format(PyExc_ValueError, "bad range [%zd:%zd] of a str of length %zd", start,
                     stop, length);
        return NULL;
    }
    int kind = PyUnicode_KIND(s);
    const char *data = (const char *)PyUnicode_DATA(s) + start * kind;
    Py_ssize_t n = stop - start, size;
    int release = n >= GIL_RELEASE_MIN;

    PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
    size = escaped_size(kind, data, n);
    if (release) PyEval_RestoreThread(ts);

    PyObject *out = PyUnicode_New(size, 127);
    if (out == NULL) return NULL;
    char *p = (char *)PyUnicode_1BYTE_DATA(out);

    ts = release ? PyEval_SaveThread() : NULL;
    escape_into(kind, data, n, p);
    if (release) PyEval_RestoreThread(ts);
    return out;
}

/* ---------------------------------------------------------------- args_text */

/* UTF-8 length of one character as json.dumps(ensure_ascii=False) writes it; -1 for a
 * surrogate (not encodable). */
static inline Py_ssize_t utf8_json_len(Py_UCS4 c) {
    if (c < 0x80) return c == 0x7f ? 1 : ASCII_LEN[c]; /* DEL stays as it is here */
    if (c < 0x800) return 2;
    if (c >= 0xd800 && c <= 0xdfff) return -1;
    return c < 0x10000 ? 3 : 4;
}

static inline char *put_utf8_json(char *p, Py_UCS4 c) {
    if (c < 0x80) {
        if (c == 0x7f) {
            *p = (char)c;
            return p + 1;
        }
        return put_char(p, c);
    }
    if (c < 0x800) {
        p[0] = (char)(0xc0 | (c >> 6));
        p[1] = (char)(0x80 | (c & 0x3f));
        return p + 2;
    }
    if (c < 0x10000) {
        p[0] = (char)(0xe0 | (c >> 12));
        p[1] = (char)(0x80 | ((c >> 6) & 0x3f));
        p[2] = (char)(0x80 | (c & 0x3f));
        return p + 3;
    }
    p[0] = (char)(0xf0 | (c >> 18));
    p[1] = (char)(0x80 | ((c >> 12) & 0x3f));
    p[2] = (char)(0x80 | ((c >> 6) & 0x3f));
    p[3] = (char)(0x80 | (c & 0x3f));
    return p + 4;
}

/* Quoted JSON length of s, or -1 (with an exception set) if it holds a surrogate. */
static Py_ssize_t json_utf8_size(PyObject *s) {
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    Py_ssize_t n = PyUnicode_GET_LENGTH(s), size = 2;
    if (PyUnicode_IS_ASCII(s)) {
        const Py_UCS1 *a = (const Py_UCS1 *)data;
        for (Py_ssize_t i = 0; i < n; i++) size += utf8_json_len(a[i]);
        return size;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t d = utf8_json_len(PyUnicode_READ(kind, data, i));
        if (d < 0) {
            PyErr_SetString(PyExc_ValueError, "a lone surrogate cannot be encoded as UTF-8");
            return -1;
        }
        size += d;
    }
    return size;
}

static char *put_json_utf8(char *p, PyObject *s) {
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    *p++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) p = put_utf8_json(p, PyUnicode_READ(kind, data, i));
    *p++ = '"';
    return p;
}

static PyObject *args_text(PyObject *self, PyObject *args) {
    /* Exact dict, exact str keys and values only: then hashing, comparing and sorting
     * them never runs Python code, so nothing can change the dict between measuring the
     * output and writing it (subclasses are left to the Python rule). */
    if (!PyDict_CheckExact(args)) {
        PyErr_SetString(PyExc_TypeError, "args_text() needs a dict");
        return NULL;
    }
    Py_ssize_t pos = 0, total = 0;
    PyObject *key, *value;
    while (PyDict_Next(args, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key) || !PyUnicode_CheckExact(value)) {
            PyErr_SetString(PyExc_TypeError, "args_text() needs exact str keys and values");
            return NULL;
        }
        Py_ssize_t k = json_utf8_size(key), v = json_utf8_size(value);
        if (k < 0 || v < 0) return NULL;
        total += k + v + 2; /* "=" and ";" */
    }
    PyObject *keys = PyDict_Keys(args);
    if (keys == NULL) return NULL;
    PyObject *out = NULL;
    if (PyList_Sort(keys) < 0) goto done;
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) goto done;
    char *p = PyBytes_AS_STRING(out);
    Py_ssize_t n = PyList_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < n; i++) {
        key = PyList_GET_ITEM(keys, i);
        value = PyDict_GetItemWithError(args, key);
        if (value == NULL) { /* cannot happen: no Python code ran since the first pass */
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "arguments changed");
            Py_CLEAR(out);
            goto done;
        }
        p = put_json_utf8(p, key);
        *p++ = '=';
        p = put_json_utf8(p, value);
        *p++ = ';';
    }
done:
    Py_DECREF(keys);
    return out;
}

/* Nesting deeper than this is left to the exact encoder (which reports what it must). */
#define PLAIN_MAX_DEPTH 1000
#define NOT_PLAIN -1
#define NONFINITE_KEY 1

static int plain_key(PyObject *key) {
    PyTypeObject *t = Py_TYPE(key);
    if (t == &PyUnicode_Type || t == &PyLong_Type || t == &PyBool_Type || key == Py_None) return 0;
    if (t == &PyFloat_Type) return isfinite(PyFloat_AS_DOUBLE(key)) ? 0 : NONFINITE_KEY;
    return NOT_PLAIN;
}

/* NOT_PLAIN, or the flags found in obj and below it. */
static int plain_walk(PyObject *obj, int depth) {
    PyTypeObject *t = Py_TYPE(obj);
    if (t == &PyUnicode_Type || t == &PyLong_Type || t == &PyFloat_Type || t == &PyBool_Type ||
        obj == Py_None)
        return 0;
    if (depth >= PLAIN_MAX_DEPTH) return NOT_PLAIN;
    int flags = 0, r;
    if (t == &PyList_Type || t == &PyTuple_Type) {
        Py_ssize_t n = Py_SIZE(obj);
        PyObject **items = t == &PyList_Type ? ((PyListObject *)obj)->ob_item
                                             : ((PyTupleObject *)obj)->ob_item;
        for (Py_ssize_t i = 0; i < n; i++) {
            if ((r = plain_walk(items[i], depth + 1)) == NOT_PLAIN) return NOT_PLAIN;
            flags |= r;
        }
        return flags;
    }
    if (t == &PyDict_Type) {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(obj, &pos, &key, &value)) {
            if ((r = plain_key(key)) == NOT_PLAIN) return NOT_PLAIN;
            flags |= r;
            if ((r = plain_walk(value, depth + 1)) == NOT_PLAIN) return NOT_PLAIN;
            flags |= r;
        }
        return flags;
    }
    return NOT_PLAIN;
}

static PyObject *plain_tree(PyObject *self, PyObject *obj) {
    return PyLong_FromLong(plain_walk(obj, 0));
}

/* ---------------------------------------------------------------- SlotMaker
 *
 * SlotMaker(cls, names) is a callable making instances of a class with __slots__ by
 * storing its positional arguments straight into the named slots, one per name, in
 * order: what a frozen attrs __init__ does through object.__setattr__ once per field,
 * at a fraction of the cost. The names must be distinct writable object slots of cls
 * (member descriptors of cls or a base); the caller checks that they are all of the
 * instance's slots (a slot left out would read as unset) and that cls has nothing
 * else to run at construction.
 *
 * SlotMaker(cls, names, acyclic) also takes each instance out of the cyclic garbage
 * collector when every value it holds is untracked (strings, numbers, None, instances
 * that were untracked the same way) or of one of the types in the tuple acyclic (whose
 * instances the caller knows never lead back, such as enum members): like a tuple of
 * atoms, such an instance can be in no reference cycle, and the collector need not
 * walk it at every collection. The class must be frozen (nothing stores into the
 * slots later).
 */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyTypeObject *cls;
    Py_ssize_t count;
    Py_ssize_t *offsets;
    PyObject *acyclic; /* tuple of types, or NULL: never untrack */
} SlotMaker;

static PyObject *slot_maker_call(PyObject *callable, PyObject *const *args, size_t nargsf,
                                 PyObject *kwnames) {
    SlotMaker *self = (SlotMaker *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        PyErr_Format(PyExc_TypeError, "%s maker takes positional arguments only",
                     self->cls->tp_name);
        return NULL;
    }
    if (nargs != self->count) {
        PyErr_Format(PyExc_TypeError, "%s maker takes %zd arguments (%zd given)",
                     self->cls->tp_name, self->count, nargs);
        return NULL;
    }
    /* Zeroed memory: every slot starts empty, so nothing is overwritten below. */
    PyObject *obj = self->cls->tp_alloc(self->cls, 0);
    if (obj == NULL) return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        *(PyObject **)((char *)obj + self->offsets[i]) = Py_NewRef(args[i]);
    }
    if (self->acyclic != NULL) {
        Py_ssize_t trusted = PyTuple_GET_SIZE(self->acyclic);
        for (Py_ssize_t i = 0; i < nargs; i++) {
            PyObject *value = args[i];
            if (!PyObject_IS_GC(value) || !PyObject_GC_IsTracked(value)) continue;
            Py_ssize_t j = 0;
            while (j < trusted && PyTuple_GET_ITEM(self->acyclic, j) != (PyObject *)Py_TYPE(value))
                j++;
            if (j == trusted) return obj; /* a tracked value of another type: stays tracked */
        }
        PyObject_GC_UnTrack(obj);
    }
    return obj;
}

static PyObject *slot_maker_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *cls, *names, *acyclic = NULL;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0) {
        PyErr_SetString(PyExc_TypeError, "SlotMaker(cls, names) takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!|O!:SlotMaker", &PyType_Type, &cls, &PyTuple_Type, &names,
                          &PyTuple_Type, &acyclic))
        return NULL;
    for (Py_ssize_t i = 0; acyclic != NULL && i < PyTuple_GET_SIZE(acyclic); i++) {
        if (!PyType_Check(PyTuple_GET_ITEM(acyclic, i))) {
            PyErr_SetString(PyExc_TypeError, "SlotMaker: acyclic must be a tuple of types");
            return NULL;
        }
    }
    Py_ssize_t count = PyTuple_GET_SIZE(names);
    SlotMaker *self = (SlotMaker *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->vectorcall = slot_maker_call;
    self->cls = (PyTypeObject *)Py_NewRef(cls);
    self->acyclic = Py_XNewRef(acyclic);
    self->count = 0;
    self->offsets = PyMem_New(Py_ssize_t, count > 0 ? count : 1);
    if (self->offsets == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        if (!PyUnicode_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "SlotMaker: names must be str");
            Py_DECREF(self);
            return NULL;
        }
        /* A member descriptor found on the class is returned as itself. */
        PyObject *descr = PyObject_GetAttr(cls, name);
        if (descr == NULL) {
            Py_DECREF(self);
            return NULL;
        }
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
                 PyType_IsSubtype((PyTypeObject *)cls, PyDescr_TYPE(descr));
        PyMemberDef *member = ok ? ((PyMemberDescrObject *)descr)->d_member : NULL;
        ok = ok && member->type == Py_T_OBJECT_EX && !(member->flags & Py_READONLY);
        Py_ssize_t offset = ok ? member->offset : 0;
        Py_DECREF(descr);
        for (Py_ssize_t j = 0; ok && j < i; j++) ok = self->offsets[j] != offset;
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "SlotMaker: %R is not a distinct writable slot of %R",
                         name, cls);
            Py_DECREF(self);
            return NULL;
        }
        self->offsets[i] = offset;
        self->count = i + 1;
    }
    return (PyObject *)self;
}

static void slot_maker_dealloc(PyObject *obj) {
    SlotMaker *self = (SlotMaker *)obj;
    Py_XDECREF(self->cls);
    Py_XDECREF(self->acyclic);
    PyMem_Free(self->offsets);
    Py_TYPE(obj)->tp_free(obj);
}

static PyTypeObject SlotMakerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "acall._speedups.SlotMaker",
    .tp_basicsize = sizeof(SlotMaker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "SlotMaker(cls, names, acyclic=None)\n\nA callable: maker(*values) makes an "
              "instance of cls\nwith each named slot set to the value in the same position;\n"
              "with a tuple of types acyclic, one that holds only untracked values or\n"
              "instances of those types is untracked from the cyclic garbage collector.",
    .tp_new = slot_maker_new,
    .tp_dealloc = slot_maker_dealloc,
    .tp_vectorcall_offset = offsetof(SlotMaker, vectorcall),
    .tp_call = PyVectorcall_Call,
};

/* ---------------------------------------------------------------- is_key
 *
 * is_key(obj): whether obj is a str of 1 to 256 characters from A-Z, a-z, 0-9 and
 * '_', '.', ':', '-' (acall.stores.base.KEY_PATTERN), checked with a table: invocation
 * ids, queue names and content keys are checked several times for every invocation.
 */

static unsigned char key_chars[256];

static void init_key_chars(void) {
    const char *allowed = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-";
    for (const char *c = allowed; *c; c++) key_chars[(unsigned char)*c] = 1;
}

static PyObject *is_key(PyObject *module, PyObject *obj) {
    if (!PyUnicode_Check(obj) || !PyUnicode_IS_ASCII(obj)) Py_RETURN_FALSE;
    Py_ssize_t n = PyUnicode_GET_LENGTH(obj);
    if (n < 1 || n > 256) Py_RETURN_FALSE;
    const Py_UCS1 *data = PyUnicode_1BYTE_DATA(obj);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!key_chars[data[i]]) Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"is_key", is_key, METH_O,
     "is_key(obj) -> bool\n\n"
     "Whether obj is a str of 1 to 256 characters from A-Z, a-z, 0-9 and '_', '.',\n"
     "':', '-' (what acall.stores.base.KEY_PATTERN matches in full)."},
    {"args_text", args_text, METH_O,
     "args_text(serialized_args) -> bytes\n\n"
     "For each key in sorted order, JSON(key) + '=' + JSON(value) + ';' in UTF-8, where\n"
     "JSON(s) is json.dumps(s, ensure_ascii=False): what the canonical args_id hashes."},
    {"plain_tree", plain_tree, METH_O,
     "plain_tree(obj) -> int\n\n"
     "-1 if obj holds anything but exact dict, list, tuple, str, int, float, bool and\n"
     "None (or nests deeper than 1000 levels); else 1 if a dict key is a NaN or\n"
     "infinite float, else 0."},
    {"escape_ascii", (PyCFunction)(void (*)(void))escape_ascii, METH_FASTCALL,
     "escape_ascii(s, start=0, stop=len(s)) -> str\n\n"
     "json.encoder.encode_basestring_ascii(s[start:stop])[1:-1], computed with the GIL\n"
     "released for large ranges."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "acall._speedups",
    "Native helpers for acall's JSON encoding, and a fast constructor for its records.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    init_tables();
    init_key_chars();
    if (PyType_Ready(&SlotMakerType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    if (PyModule_AddObjectRef(mod, "SlotMaker", (PyObject *)&SlotMakerType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
