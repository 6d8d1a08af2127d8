/*
 * Fast path of the mediator's guest PTE -> host PTE translation.
 *
 * The Python module nodes.mediator.translate documents the contract; this file implements the
 * same rules as translate_entries_python() in one pass over the guest entries, with the GIL
 * released so other mediator threads keep running while a large GGTT range is translated.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Must match nodes.hw: bits 45:12 hold the frame number, bit 0 is "present". */
#define PAGE_SHIFT 12
#define PTE_PRESENT UINT64_C(1)
#define PTE_ADDR_MASK (((UINT64_C(1) << 46) - 1) & ~((UINT64_C(1) << PAGE_SHIFT) - 1))
/* The largest frame number whose address still fits in PTE_ADDR_MASK. */
#define MAX_MFN (PTE_ADDR_MASK >> PAGE_SHIFT)

#define CACHE_MISS UINT64_C(0)
#define CACHE_INVALID UINT64_C(0xFFFFFFFFFFFFFFFF)

/*
 * Take a buffer of 64-bit words from `obj`, naming `name` in every error so the caller can
 * tell which of the five arguments was wrong. On success the caller owns `view`.
 */
static int
get_words(PyObject *obj, const char *name, int writable, Py_buffer *view)
{
    /* Ask for strides rather than C_CONTIGUOUS so a strided array gets our own message
     * instead of the exporter's generic one. */
    if (PyObject_GetBuffer(obj, view, PyBUF_RECORDS_RO) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s: expected a buffer of 64-bit words (e.g. a numpy uint64 array), got %.100s",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (view->itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "%s: itemsize must be 8 (uint64), got %zd",
                     name, view->itemsize);
        goto fail;
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s: buffer must be C-contiguous", name);
        goto fail;
    }
    if (writable && view->readonly) {
        PyErr_Format(PyExc_ValueError, "%s: buffer is read-only, it must be writable", name);
        goto fail;
    }
    return 0;
fail:
    PyBuffer_Release(view);
    return -1;
}

/* True when the byte ranges [a, a+alen) and [b, b+blen) share at least one byte. */
static int
overlaps(const void *a, Py_ssize_t alen, const void *b, Py_ssize_t blen)
{
    uintptr_t a0 = (uintptr_t)a, b0 = (uintptr_t)b;
    if (alen <= 0 || blen <= 0)
        return 0;
    return a0 < b0 + (uintptr_t)blen && b0 < a0 + (uintptr_t)alen;
}

/* Look-ahead of the cache prefetch, in entries. The cache (2 MiB for 1 GiB of guest memory)
 * does not fit in L2 and guest gfns are scattered, so every lookup is a cache-line miss; asking
 * for the line this many entries early overlaps those misses (about 6.5 -> 4 ms per 1M entries
 * with a 256K-gfn cache). 8 was clearly slower; 24 and 32 were no faster than 16. */
#define PREFETCH_AHEAD 16

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch((p))
#define NOINLINE __attribute__((noinline))
#else
#define PREFETCH(p) ((void)0)
#define NOINLINE
#endif

/* Running totals of one batch; n_ok is derived at the end. */
struct counts {
    Py_ssize_t scratch, not_present, missing;
};

/*
 * One entry. Everything that depends on the entry's class (not present / scratch / ok) is
 * computed with masks instead of branches: in a real GGTT the classes are interleaved, and
 * mispredicted branches would cost more than the few extra ALU operations. Only the "miss"
 * store stays a branch; misses are rare and well predicted (the caller pins and retries).
 */
static inline uint64_t
translate_one(uint64_t e, const uint64_t *cache, uint64_t ncache, uint64_t scratch_addr,
              uint64_t *restrict missing, struct counts *c)
{
    const uint64_t present = e & PTE_PRESENT;
    const uint64_t gfn = (e & PTE_ADDR_MASK) >> PAGE_SHIFT;
    /* All ones when gfn is inside the cache. Out of range reads slot 0 (always in bounds) and
     * then ORs in all ones, which is exactly CACHE_INVALID. */
    const uint64_t in_range = (uint64_t)0 - (uint64_t)(gfn < ncache);
    const uint64_t v = cache[gfn & in_range] | ~in_range;
    /* Not present and invalid both point at scratch. A present entry keeps its flag bits (an
     * invalid one stays present); a not-present one is the scratch frame alone, as the
     * kernel builds it from zero (emulate_ggtt_mmio_write). */
    const uint64_t use_scratch = (present ^ 1) | (uint64_t)(v == CACHE_INVALID);
    const uint64_t miss = present & (uint64_t)(v == CACHE_MISS);
    const uint64_t scratch_m = (uint64_t)0 - use_scratch;      /* all ones when scratch */
    const uint64_t addr = (scratch_addr & scratch_m)
                          | ((v << PAGE_SHIFT) & PTE_ADDR_MASK & ~scratch_m);

    c->not_present += (Py_ssize_t)(present ^ 1);
    c->scratch += (Py_ssize_t)(present & use_scratch);
    if (miss)
        missing[c->missing++] = gfn;
    /* A miss produces 0 so a half-translated range never maps a stale page. */
    const uint64_t flags = e & ~PTE_ADDR_MASK & ((uint64_t)0 - present);
    return (flags | addr) & (miss - 1);
}

/*
 * The whole batch, run without the GIL. Kept out of line so its registers are not shared with
 * the argument parsing around it.
 *
 * `restrict` on missing is sound because the caller rejected every overlap with it; guest and
 * out may be the same buffer (in place), which is fine since guest[i] is read before out[i] is
 * written and never read again.
 */
static NOINLINE void
translate_loop(const uint64_t *guest, Py_ssize_t n, const uint64_t *cache, uint64_t ncache,
               uint64_t scratch_addr, uint64_t *out, uint64_t *restrict missing,
               struct counts *totals)
{
    /* An empty cache still needs one readable slot: every gfn is then out of range and the
     * masked index 0 lands here. */
    static const uint64_t empty_cache[1] = {CACHE_INVALID};
    struct counts c = {0, 0, 0};
    Py_ssize_t i = 0;

    if (ncache == 0)
        cache = empty_cache;

    /* Main part: prefetch the cache slot of a later entry, clamped like the real lookup so no
     * wild address is ever formed. The tail runs without look-ahead so nothing reads past
     * guest[n - 1]. */
    for (; i < n - PREFETCH_AHEAD; i++) {
        const uint64_t ahead = (guest[i + PREFETCH_AHEAD] & PTE_ADDR_MASK) >> PAGE_SHIFT;
        PREFETCH(&cache[ahead & ((uint64_t)0 - (uint64_t)(ahead < ncache))]);
        out[i] = translate_one(guest[i], cache, ncache, scratch_addr, missing, &c);
    }
    for (; i < n; i++)
        out[i] = translate_one(guest[i], cache, ncache, scratch_addr, missing, &c);
    *totals = c;
}

PyDoc_STRVAR(translate_entries_doc,
"translate_entries(guest, cache, scratch_mfn, out, missing) -> (n_ok, n_scratch, n_not_present, n_missing)\n"
"\n"
"Translate guest PTEs to host PTEs through the gfn->mfn cache; see nodes.mediator.translate.");

static PyObject *
translate_entries(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer guest_v, cache_v, out_v, missing_v;
    PyObject *scratch_obj, *result = NULL;
    long long scratch_ll;
    int overflow = 0;
    Py_ssize_t n;
    struct counts c = {0, 0, 0};
    Py_ssize_t guest_bytes;

    (void)self;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError,
                     "translate_entries() takes exactly 5 arguments "
                     "(guest, cache, scratch_mfn, out, missing), %zd given", nargs);
        return NULL;
    }

    /* Validate the scalar first: it needs no cleanup. */
    scratch_obj = PyNumber_Index(args[2]);
    if (scratch_obj == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "scratch_mfn: expected an int, got %.100s",
                     Py_TYPE(args[2])->tp_name);
        return NULL;
    }
    scratch_ll = PyLong_AsLongLongAndOverflow(scratch_obj, &overflow);
    Py_DECREF(scratch_obj);
    if (scratch_ll == -1 && PyErr_Occurred())
        return NULL;
    if (overflow != 0 || scratch_ll < 0 || (unsigned long long)scratch_ll > MAX_MFN) {
        PyErr_Format(PyExc_ValueError,
                     "scratch_mfn: must be in 0..0x%llx so it fits PTE bits 45:12",
                     (unsigned long long)MAX_MFN);
        return NULL;
    }

    if (get_words(args[0], "guest", 0, &guest_v) < 0)
        return NULL;
    if (get_words(args[1], "cache", 0, &cache_v) < 0)
        goto release_guest;
    if (get_words(args[3], "out", 1, &out_v) < 0)
        goto release_cache;
    if (get_words(args[4], "missing", 1, &missing_v) < 0)
        goto release_out;

    n = guest_v.len / 8;
    guest_bytes = guest_v.len;
    if (out_v.len / 8 < n) {
        PyErr_Format(PyExc_ValueError, "out: has %zd entries, needs at least len(guest) = %zd",
                     out_v.len / 8, n);
        goto release_all;
    }
    if (missing_v.len / 8 < n) {
        PyErr_Format(PyExc_ValueError,
                     "missing: has %zd entries, needs at least len(guest) = %zd",
                     missing_v.len / 8, n);
        goto release_all;
    }
    /* Only the parts we touch matter: out[:n] and missing[:n]. Writing into an input would
     * make the result depend on iteration order, so refuse it; out == guest (in place) is the
     * one safe exception. */
    if (out_v.buf != guest_v.buf && overlaps(out_v.buf, guest_bytes, guest_v.buf, guest_bytes)) {
        PyErr_SetString(PyExc_ValueError,
                        "out: overlaps guest (only out and guest being the very same buffer is allowed)");
        goto release_all;
    }
    if (overlaps(out_v.buf, guest_bytes, cache_v.buf, cache_v.len)) {
        PyErr_SetString(PyExc_ValueError, "out: overlaps cache");
        goto release_all;
    }
    if (overlaps(missing_v.buf, guest_bytes, guest_v.buf, guest_bytes)
        || overlaps(missing_v.buf, guest_bytes, cache_v.buf, cache_v.len)
        || overlaps(missing_v.buf, guest_bytes, out_v.buf, guest_bytes)) {
        PyErr_SetString(PyExc_ValueError, "missing: overlaps guest, cache or out");
        goto release_all;
    }

    /* The buffers stay exported (and so alive and unresized) until released below, so the
     * loop can run without the GIL. */
    Py_BEGIN_ALLOW_THREADS
    translate_loop((const uint64_t *)guest_v.buf, n, (const uint64_t *)cache_v.buf,
                   (uint64_t)(cache_v.len / 8), (uint64_t)scratch_ll << PAGE_SHIFT,
                   (uint64_t *)out_v.buf, (uint64_t *)missing_v.buf, &c);
    Py_END_ALLOW_THREADS

    result = Py_BuildValue("(nnnn)", n - c.scratch - c.not_present - c.missing, c.scratch,
                           c.not_present, c.missing);
release_all:
    PyBuffer_Release(&missing_v);
release_out:
    PyBuffer_Release(&out_v);
release_cache:
    PyBuffer_Release(&cache_v);
release_guest:
    PyBuffer_Release(&guest_v);
    return result;
}

static PyMethodDef ctranslate_methods[] = {
    {"translate_entries", (PyCFunction)(void (*)(void))translate_entries, METH_FASTCALL,
     translate_entries_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef ctranslate_module = {
    PyModuleDef_HEAD_INIT,
    "nodes.mediator._ctranslate",
    "C implementation of nodes.mediator.translate.translate_entries.",
    0,
    ctranslate_methods,
    NULL, NULL, NULL, NULL,
};

static int
add_u64(PyObject *m, const char *name, uint64_t value)
{
    PyObject *v = PyLong_FromUnsignedLongLong(value);
    int rc;
    if (v == NULL)
        return -1;
    rc = PyModule_AddObjectRef(m, name, v);
    Py_DECREF(v);
    return rc;
}

PyMODINIT_FUNC
PyInit__ctranslate(void)
{
    PyObject *m = PyModule_Create(&ctranslate_module);
    if (m == NULL)
        return NULL;
    /* Exported so the tests can check that Python and C agree on the sentinels. */
    if (add_u64(m, "CACHE_MISS", CACHE_MISS) < 0
        || add_u64(m, "CACHE_INVALID", CACHE_INVALID) < 0
        || add_u64(m, "PTE_ADDR_MASK", PTE_ADDR_MASK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
