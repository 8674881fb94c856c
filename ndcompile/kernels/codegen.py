"""C source for the fused two-mode NdLinear kernel, specialised to one layer shape.

The kernel computes, for every batch row ``b`` of ``x`` (``(rows, d1, d2)``,
contiguous)::

    y[b] = bias + sum_r W1[r] @ x[b] @ W2[r]^T          # (h1, h2)

with both contractions of a row done while the row is in L1: the mode-2 products
``x[b] @ W2[r]^T`` of all ``R`` terms are stacked into a ``(R*d1, h2)`` scratch
block, and the mode-1 contraction is one product of the stacked first factors
``(h1, R*d1)`` with that block, whose result goes straight to ``y[b]`` (with
non-temporal stores for large outputs). A library GEMM per mode instead writes the
intermediate for the whole batch to memory and reads it back, and cannot overlap
its output traffic with its arithmetic.

Both products run through one register-blocked micro-kernel written with GCC
vector extensions (``vector_size``), so the same source compiles to AVX-512, AVX2
or NEON registers; the block sizes follow the vector width and register count the
build probed (:mod:`ndcompile.kernels.build`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MAX_SCRATCH_BYTES",
    "KernelShape",
    "VectorUnit",
    "kernel_flops",
    "kernel_order",
    "kernel_source",
    "padded_columns",
    "probe_source",
    "scratch_elements",
]

#: Rows of the left operand per register block.
ROW_BLOCK = 6
#: The largest per-thread scratch block (one row's intermediate) a kernel keeps on
#: its stack; beyond it a row no longer fits the core's cache and the library
#: GEMMs' blocking is the better schedule.
MAX_SCRATCH_BYTES = 64 << 10

_C_TYPES = {"float32": "float", "float64": "double"}
_ITEM_BYTES = {"float32": 4, "float64": 8}


@dataclass(frozen=True)
class VectorUnit:
    """What the compiler targets on this machine: vector bytes and register count."""

    bytes: int
    registers: int
    stream: str  # "avx512", "avx" or "" (non-temporal store intrinsics available)

    def lanes(self, dtype: str) -> int:
        """Elements of ``dtype`` per vector."""
        return self.bytes // _ITEM_BYTES[dtype]


@dataclass(frozen=True)
class KernelShape:
    """One specialisation: mode sizes, Kronecker rank and element type."""

    d1: int
    d2: int
    h1: int
    h2: int
    rank: int
    dtype: str  # "float32" or "float64"

    @property
    def name(self) -> str:
        """The exported C symbol."""
        return f"ndc_kron2_{self.dtype}_{self.d1}x{self.d2}_{self.h1}x{self.h2}_r{self.rank}"


def probe_source() -> str:
    """A C unit that reports the vector width and register file it was compiled for."""
    return """
int ndc_vector_bytes(void) {
#if defined(__AVX512F__)
  return 64;
#elif defined(__AVX__)
  return 32;
#else
  return 16;
#endif
}
int ndc_vector_registers(void) {
#if defined(__AVX512F__) || defined(__aarch64__)
  return 32;
#else
  return 16;
#endif
}
int ndc_stream_kind(void) {
#if defined(__AVX512F__)
  return 2;
#elif defined(__AVX__)
  return 1;
#else
  return 0;
#endif
}
"""


def _blocks(cols: int, lanes: int, registers: int) -> tuple[int, int]:
    """Vectors per column block and rows per row block that fit the register file."""
    vectors = cols // lanes
    nb = 4 if registers >= 32 else 2
    while vectors % nb:
        nb -= 1
    rb = ROW_BLOCK
    while rb > 1 and rb * nb + nb + 1 > registers:
        rb -= 1
    return nb, rb


def _micro(name: str, rows: int, nb: int) -> str:
    """A micro-kernel: ``rows`` x ``nb`` vectors of ``out = init + a @ b`` over ``k``.

    The accumulators stay in registers for the whole ``k`` loop; each step loads
    ``nb`` vectors of ``b`` and broadcasts one element of ``a`` per row.
    """
    lines = [
        f"static inline INLINE void {name}(const T *restrict a, long lda, const T *restrict b,",
        "    long ldb, long k, const T *restrict init, T *restrict out, long ldo,",
        "    int stream) {",
    ]
    for r in range(rows):
        for v in range(nb):
            start = f"init + {r} * ldo + {v} * LANES"
            lines.append(f"  vec c{r}_{v} = init ? LOADU({start}) : (vec){{0}};")
    lines.append("  for (long p = 0; p < k; p++) {")
    for v in range(nb):
        lines.append(f"    vec b{v} = LOADU(b + p * ldb + {v} * LANES);")
    for r in range(rows):
        lines.append(f"    vec a{r} = BCAST(a[{r} * lda + p]);")
        for v in range(nb):
            lines.append(f"    c{r}_{v} += a{r} * b{v};")
    lines.append("  }")
    lines.append("  if (stream) {")
    for r in range(rows):
        for v in range(nb):
            lines.append(f"    STREAM(out + {r} * ldo + {v} * LANES, c{r}_{v});")
    lines.append("  } else {")
    for r in range(rows):
        for v in range(nb):
            lines.append(f"    STOREU(out + {r} * ldo + {v} * LANES, c{r}_{v});")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines)


def _product(name: str, rows: int, cols: int, nb: int, rb: int, lanes: int) -> str:
    """``out (rows, cols) = init + a (rows, k) @ b (k, cols)`` by register blocks."""
    width = nb * lanes
    body = [
        f"static inline INLINE void {name}(const T *restrict a, long lda, const T *restrict b,",
        "    long ldb, long k, const T *restrict init, T *restrict out, long ldo,",
        "    int stream) {",
        f"  for (long n = 0; n < {cols}; n += {width}) {{",
        "    long i = 0;",
        f"    for (; i + {rb} <= {rows}; i += {rb})",
        f"      mk_{rb}_{nb}(a + i * lda, lda, b + n, ldb, k, init ? init + i * ldo + n : 0,",
        "           out + i * ldo + n, ldo, stream);",
    ]
    rest = rows % rb
    if rest:
        body += [
            f"    mk_{rest}_{nb}(a + i * lda, lda, b + n, ldb, k, init ? init + i * ldo + n : 0,",
            "         out + i * ldo + n, ldo, stream);",
        ]
    body += ["  }", "}"]
    return "\n".join(body)


def kernel_flops(shape: KernelShape, order: str) -> int:
    """Multiply-adds times two per batch row of ``shape`` contracted in ``order``."""
    d1, d2, h1, h2, r = shape.d1, shape.d2, shape.h1, shape.h2, shape.rank
    if order == "21":
        return 2 * r * (d1 * d2 * h2 + h1 * d1 * h2)
    return 2 * r * (h1 * d1 * d2 + h1 * d2 * h2)


def padded_columns(shape: KernelShape, unit: VectorUnit) -> int:
    """``h2`` rounded up to whole vectors (the columns the products compute)."""
    lanes = unit.lanes(shape.dtype)
    return -(-shape.h2 // lanes) * lanes


def scratch_elements(shape: KernelShape, order: str, width: int | None = None) -> int:
    """Elements of the per-thread scratch (one row's intermediate, and its padded result).

    Args:
        shape: The specialisation.
        order: ``"21"`` or ``"12"``.
        width: The products' columns, ``h2`` padded to whole vectors (default ``h2``).
    """
    width = shape.h2 if width is None else width
    padded = shape.h1 * width if width != shape.h2 else 0
    return _intermediate_elements(shape, order, width) + padded


def _intermediate_elements(shape: KernelShape, order: str, width: int) -> int:
    """Elements of one row's intermediate: ``(R*d1, width)`` or ``(h1, R*d2)``."""
    if order == "21":
        return shape.rank * shape.d1 * width
    return shape.h1 * shape.rank * shape.d2


def kernel_order(shape: KernelShape, unit: VectorUnit) -> str | None:
    """The cheaper mode order the vector unit can run: ``"21"``, ``"12"`` or None.

    ``"21"`` contracts mode 2 first (its products have ``h2`` columns), ``"12"``
    mode 1 first (``d2`` columns, then ``h2``); one row's scratch must fit
    :data:`MAX_SCRATCH_BYTES`. When ``h2`` is not a whole number of vectors only
    ``"21"`` runs, with the columns padded to whole vectors (at most a quarter more:
    20 columns of 16 lanes would waste 37% and measured slower than the library
    GEMMs); the padded second factor has zero columns there, and each row is
    computed in scratch and copied out.
    """
    lanes = unit.lanes(shape.dtype)
    item = _ITEM_BYTES[shape.dtype]
    width = padded_columns(shape, unit)
    if width * 4 > shape.h2 * 5:
        return None  # padding would waste more than a quarter of the work
    orders = ["21", "12"] if shape.d2 % lanes == 0 and width == shape.h2 else ["21"]
    fits = [o for o in orders if scratch_elements(shape, o, width) * item <= MAX_SCRATCH_BYTES]
    return min(fits, key=lambda o: kernel_flops(shape, o), default=None)


def kernel_source(shape: KernelShape, unit: VectorUnit) -> str:
    """The C source of ``shape``'s kernel for ``unit``.

    The exported function is ``void NAME(const T *x, const T *w1, const T *w2t,
    const T *bias, T *y, long rows, int threads, int stream)`` where ``x`` is
    ``(rows, d1, d2)``, ``w1`` the first factors (order ``"21"``: stacked
    ``(h1, R, d1)``; order ``"12"``: ``(R, h1, d1)``), ``w2t`` the transposed second
    factors ``(R, d2, h2)``, ``bias`` ``(h1, h2)`` or NULL, and ``y``
    ``(rows, h1, h2)``; all contiguous.

    Raises:
        ValueError: No order fits the vector unit (see :func:`kernel_order`), or
            the dtype is not float32/float64.
    """
    if shape.dtype not in _C_TYPES:
        raise ValueError(f"no fused kernel for dtype {shape.dtype}")
    order = kernel_order(shape, unit)
    if order is None:
        raise ValueError(f"no fused kernel order fits {shape} on {unit}")
    lanes = unit.lanes(shape.dtype)
    d1, d2, h1, h2, rank = shape.d1, shape.d2, shape.h1, shape.h2, shape.rank
    t = _C_TYPES[shape.dtype]
    stream = {
        ("avx512", "float"): "_mm512_stream_ps((float *)(p), (__m512)(v))",
        ("avx512", "double"): "_mm512_stream_pd((double *)(p), (__m512d)(v))",
        ("avx", "float"): "_mm256_stream_ps((float *)(p), (__m256)(v))",
        ("avx", "double"): "_mm256_stream_pd((double *)(p), (__m256d)(v))",
    }.get((unit.stream, t), "STOREU(p, v)")
    hp = padded_columns(shape, unit)
    scratch = [f"    T t[{_intermediate_elements(shape, order, hp)}] ALIGNED;"]
    if order == "21":
        # t (R*d1, hp) = x @ W2[r]^T stacked over r; y = W1 (h1, R*d1) @ t.
        products = [("first", d1, hp), ("second", h1, hp)]
        k2 = rank * d1
        steps = [
            f"      for (int r = 0; r < {rank}; r++)",
            f"        first(xb, {d2}, w2t + r * {d2 * hp}, {hp}, {d2}, 0, "
            f"t + r * {d1 * hp}, {hp}, 0);",
        ]
        if hp == h2:
            steps.append(f"      second(w1, {k2}, t, {h2}, {k2}, bias, yb, {h2}, stream);")
        else:  # padded columns: the row in scratch, its h2 columns copied out
            scratch.append(f"    T out[{h1 * hp}] ALIGNED;")
            steps += [
                f"      second(w1, {k2}, t, {hp}, {k2}, bias, out, {hp}, 0);",
                f"      for (int j = 0; j < {h1}; j++)",
                f"        memcpy(yb + j * {h2}, out + j * {hp}, {h2} * sizeof(T));",
            ]
    else:
        # t (h1, R*d2): columns r*d2.. hold W1[r] @ x; y = t @ W2^T stacked (R*d2, h2).
        products = [("first", h1, d2), ("second", h1, h2)]
        k2 = rank * d2
        steps = [
            f"      for (int r = 0; r < {rank}; r++)",
            f"        first(w1 + r * {h1 * d1}, {d1}, xb, {d2}, {d1}, 0, t + r * {d2}, {k2}, 0);",
            f"      second(t, {k2}, w2t, {h2}, {k2}, bias, yb, {h2}, stream);",
        ]
    blocks = {name: _blocks(cols, lanes, unit.registers) for name, _, cols in products}
    micros = sorted(
        {(rb, nb) for (nb, rb) in blocks.values()}
        | {(rows % blocks[name][1], blocks[name][0]) for name, rows, _ in products}
    )
    parts = [
        "#include <stddef.h>",
        "#include <string.h>",
        "#include <immintrin.h>" if unit.stream else "",
        f"typedef {t} T;",
        "#define INLINE __attribute__((always_inline))",
        "#define ALIGNED __attribute__((aligned(64)))",
        f"typedef T vec __attribute__((vector_size({unit.bytes})));",
        f"#define LANES {lanes}",
        "static inline vec LOADU(const T *p) { vec v; memcpy(&v, p, sizeof v); return v; }",
        "static inline void STOREU(T *p, vec v) { memcpy(p, &v, sizeof v); }",
        f"static inline vec BCAST(T s) {{ return (vec){{{', '.join(['s'] * lanes)}}}; }}",
        f"#define STREAM(p, v) {stream}",
        # Non-temporal stores are weakly ordered: fence them before the threads join.
        f"#define FENCE() {'_mm_sfence()' if unit.stream else '(void)0'}",
        *(_micro(f"mk_{r}_{nb}", r, nb) for r, nb in micros if r),
        *(_product(name, rows, cols, *blocks[name], lanes) for name, rows, cols in products),
        f"void {shape.name}(const T *x, const T *w1, const T *w2t, const T *bias, T *y,",
        "    long rows, int threads, int stream) {",
        "#pragma omp parallel num_threads(threads) if (threads > 1)",
        "  {",
        *scratch,
        "#pragma omp for schedule(static)",
        "    for (long b = 0; b < rows; b++) {",
        f"      const T *xb = x + b * {d1 * d2};",
        f"      T *yb = y + b * {h1 * h2};",
        *steps,
        "    }",
        "    if (stream) FENCE();",
        "  }",
        "}",
    ]
    return "\n".join(p for p in parts if p) + "\n"
