/* Native helpers for acall's JSON encoding.
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

static PyMethodDef methods[] = {
    {"escape_ascii", (PyCFunction)(void (*)(void))escape_ascii, METH_FASTCALL,
     "escape_ascii(s, start=0, stop=len(s)) -> str\n\n"
     "json.encoder.encode_basestring_ascii(s[start:stop])[1:-1], computed with the GIL\n"
     "released for large ranges."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "acall._speedups", "Native helpers for acall's JSON encoding.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    init_tables();
    return PyModule_Create(&module);
}
