"""Templates of the generated sparse kernels (see ``tools/generate_kernels.py``).

Each function returns the source of one kernel (or a group) for one variant: ``sfx`` is
``""`` for the parallel build and ``"_1"`` for its serial twin, ``deco`` its ``@njit`` line.
"""

from __future__ import annotations

#: (panel width in output columns, nonzeros unrolled): width × unroll = 32 accumulators, i.e.
#: four ymm chains. Eight chains would saturate both FMA ports but took LLVM ~15 s to compile.
SHAPES = ((16, 2), (8, 4))
#: Columns per ``tile64`` call: eight ``f32x8`` accumulators.
TILE = 64
#: Column widths of the 4 × 1 block-sparse tile kernels (16: eight accumulators; 8 for
#: narrower batches, two blocks per step).
BSR_WIDTHS = (16, 8)

_DECO = "@njit(parallel={par}, fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True)"


def decorator(parallel: bool) -> str:
    """The ``@njit`` line of the parallel build or of its serial twin."""
    return _DECO.format(par=parallel)


_SPMV = """

{deco}
def csr_spmv{sfx}(indptr, indices, data, scale, x, out, bias, act):  # noqa: D103
    for i in prange(indptr.shape[0] - 1):
        a0 = a1 = a2 = a3 = np.float32(0.0)
        j = np.uint64(indptr[i])
        end = np.uint64(indptr[i + 1])
        while j + np.uint64(4) <= end:
            a0 += np.float32(data[j]) * x[indices[j]]
            a1 += np.float32(data[j + np.uint64(1)]) * x[indices[j + np.uint64(1)]]
            a2 += np.float32(data[j + np.uint64(2)]) * x[indices[j + np.uint64(2)]]
            a3 += np.float32(data[j + np.uint64(3)]) * x[indices[j + np.uint64(3)]]
            j += np.uint64(4)
        while j < end:
            a0 += np.float32(data[j]) * x[indices[j]]
            j += np.uint64(1)
        out[i] = ((a0 + a1) + (a2 + a3)) * scale[i]
    if act or bias.shape[0]:
        finish_vector(out, bias, act)


{deco}
def csr_spmv8{sfx}(indptr, indices, data, scale, x, out, bias, act):  # noqa: D103
    for i in prange(indptr.shape[0] - 1):
        j = np.uint64(indptr[i])
        end = np.uint64(indptr[i + 1])
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
        while j < end:
            a0 += np.float32(data[j]) * x[indices[j]]
            a1 += np.float32(data[j + np.uint64(1)]) * x[indices[j + np.uint64(1)]]
            a2 += np.float32(data[j + np.uint64(2)]) * x[indices[j + np.uint64(2)]]
            a3 += np.float32(data[j + np.uint64(3)]) * x[indices[j + np.uint64(3)]]
            a4 += np.float32(data[j + np.uint64(4)]) * x[indices[j + np.uint64(4)]]
            a5 += np.float32(data[j + np.uint64(5)]) * x[indices[j + np.uint64(5)]]
            a6 += np.float32(data[j + np.uint64(6)]) * x[indices[j + np.uint64(6)]]
            a7 += np.float32(data[j + np.uint64(7)]) * x[indices[j + np.uint64(7)]]
            j += np.uint64(8)
        out[i] = (((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))) * scale[i]
    if act or bias.shape[0]:
        finish_vector(out, bias, act)


{deco}
def csr_cols{sfx}(indptr, indices, data, scale, xt, out, col0, bias, act):  # noqa: D103
    epi = act != 0 or bias.shape[0] != 0
    for i in prange(indptr.shape[0] - 1):
        s = np.float32(scale[i])
        start = np.uint64(indptr[i])
        end = np.uint64(indptr[i + 1])
        for b in range(col0, xt.shape[1]):
            a0 = a1 = np.float32(0.0)
            j = start
            while j + np.uint64(2) <= end:
                a0 += np.float32(data[j]) * xt[indices[j], b]
                a1 += np.float32(data[j + np.uint64(1)]) * xt[indices[j + np.uint64(1)], b]
                j += np.uint64(2)
            if j < end:
                a0 += np.float32(data[j]) * xt[indices[j], b]
            out[i, b] = (a0 + a1) * s
        if epi:
            finish_block(out, i, i + 1, col0, xt.shape[1], bias, act)
"""


# Per block of input rows, the next block's rows (or the next tile's / panel's first block)
# are prefetched, `per` rows for each output row of this block: shared by tile64 and the
# 4 × 1 block tiles (``base``: this tile's first column, ``step``: columns to the next,
# ``count``: tiles or panels, ``row``: the row loop's variable).
_NEXT_BLOCK = """            last = kb + 1 == nkb
            nk0 = 0 if last else (kb + 1) * pfk
            nb0 = {base} + np.uint64({step}) if last else {base}
            nk1 = min(nk0 + pfk, kdim) if p + 1 < {count} or not last else 0
            for {row} in range(r0, r1):
                k0 = nk0 + ({row} - r0) * per
                for kk in range(k0, min(k0 + per, nk1)):
                    a = np.uint64(kk) * bu + nb0
{prefetch}"""


def _next_block(base: str, step: str, count: str, row: str) -> str:
    lines = "\n".join(f"{' ' * 20}prefetch(b, a + np.uint64({16 * k}))" for k in range(4))
    return _NEXT_BLOCK.format(base=base, step=step, count=count, row=row, prefetch=lines)


_TILE = """

{deco}
{signature}
    nb = bounds.shape[0] - 1
    m = scale.shape[0]
    nu = np.uint64(n)
    bu = np.uint64(bs)
    kdim = b.shape[0] // bs
    epi = act != 0 or bias.shape[0] != 0
    for t in prange(ntile * nb):
        p = t // nb
        r0 = bounds[t - p * nb]
        r1 = bounds[t - p * nb + 1]
        n0 = np.uint64(col0 + p * {tile})
        # Input rows of the next block to prefetch per output row (spread over the rows).
        per = (pfk + r1 - r0 - 1) // (r1 - r0) if pfk and r1 > r0 else 0
        for kb in range(nkb):
{next_block}
                q = np.uint64(i) * nu + n0
                if kb:
{load}
                else:
{zero}
                r = np.uint64(kb * m + i)
                j = np.uint64(indptr[r])
                end = np.uint64(indptr[r + np.uint64(1)])
                while j < end:
                    v = data[j]
                    o = np.uint64(indices[j]) * bu + n0
{fma}
                    j += np.uint64(1)
                s = scale[i] if kb == nkb - 1 else np.float32(1.0)
{store}
        if epi:  # this task's rows, in L2 (blocks of a few hundred rows × 64 columns)
            finish_flat(out, r0, r1, n, np.int64(n0), {tile}, bias, act)
"""


def tile(sfx: str, deco: str) -> str:
    """``tile64`` (suffix ``sfx``) under the decorator ``deco``."""
    # Eight accumulators: 64 columns, and eight independent FMA chains (latency 4 × 2 ports).
    # Input-row blocks (nkb > 1) keep each block's slab of b in cache while every row of
    # the range streams past it; partial sums wait in ``out`` between blocks. A K × N input
    # with N in the thousands (conv-as-GEMM) puts every slab row on its own page, beyond
    # the hardware prefetchers: each first touch waited for L3 (~3 of ~7 ns per nonzero
    # and tile), so the rows of the next block are prefetched, four lines per row, a few
    # per output row of this block. 256 × 1152 × 3136 at 90%: 10.3 → 8.3 ms.
    acc = [f"a{k}" for k in range(8)]
    pad = " " * 20
    load = "\n".join(f"{pad}{a} = vload(out, q + np.uint64({8 * k}))" for k, a in enumerate(acc))
    zero = pad + " = ".join(acc) + " = vzero()"
    fma = "\n".join(
        f"{pad}{a} = vfma({a}, v, b, o + np.uint64({8 * k}))" for k, a in enumerate(acc)
    )
    store = "\n".join(
        f"                vstore(out, q + np.uint64({8 * k}), {a}, s)" for k, a in enumerate(acc)
    )
    args = "indptr, indices, data, scale, b, bs, n, out, col0, ntile, bounds, nkb, pfk, bias, act"
    signature = f"def tile64{sfx}({args}):  # noqa: D103"
    return _TILE.format(
        deco=deco,
        tile=TILE,
        signature=signature,
        next_block=_next_block("n0", str(TILE), "ntile", "i"),
        load=load,
        zero=zero,
        fma=fma,
        store=store,
    )


def panel(width: int, unroll: int, sfx: str, deco: str) -> str:
    """``panel{width}`` unrolled ``unroll`` nonzeros deep."""
    acc = [[f"a{u}_{k}" for k in range(width)] for u in range(unroll)]
    lines = [
        "",
        "",
        deco,
        f"def panel{width}{sfx}(indptr, indices, data, scale, xp, out, col0, npan, rb, bias, act):"
        "  # noqa: D103",
        "    m = indptr.shape[0] - 1",
        "    epi = act != 0 or bias.shape[0] != 0",
        "    kdim = xp.shape[0] // npan",
        "    nrb = (m + rb - 1) // rb",
        "    for t in prange(npan * nrb):",
        "        p = t // nrb",
        "        r0 = (t - p * nrb) * rb",
        "        base = np.uint64(p * kdim)",
        f"        c0 = col0 + p * {width}",
        "        for i in range(r0, min(r0 + rb, m)):",
    ]
    for row in acc:
        for k in range(0, width, 8):
            lines.append("            " + " = ".join(row[k : k + 8]) + " = np.float32(0.0)")
    lines += [
        "            j = np.uint64(indptr[i])",
        "            end = np.uint64(indptr[i + 1])",
        f"            while j + np.uint64({unroll}) <= end:",
    ]
    for u in range(unroll):
        lines.append(f"                q = j + np.uint64({u})")
        lines.append("                v = np.float32(data[q])")
        lines.append("                xr = xp[indices[q] + base]")
        for k in range(width):
            lines.append(f"                {acc[u][k]} += v * xr[{k}]")
    lines += [
        f"                j += np.uint64({unroll})",
        "            while j < end:",
        "                v = np.float32(data[j])",
        "                xr = xp[indices[j] + base]",
    ]
    for k in range(width):
        lines.append(f"                {acc[0][k]} += v * xr[{k}]")
    lines += ["                j += np.uint64(1)", "            s = np.float32(scale[i])"]
    lines.append("            o = out[i]")
    for k in range(width):
        total = " + ".join(acc[u][k] for u in range(unroll))
        lines.append(f"            o[c0 + {k}] = ({total}) * s")
    lines += [
        "        if epi:  # this task's rows, just stored",
        f"            finish_block(out, r0, min(r0 + rb, m), c0, c0 + {width}, bias, act)",
    ]
    return "\n".join(lines) + "\n"


_BSR_SPMV = """

{deco}
def bsr4_spmv{sfx}(indptr, indices, data, x, out):  # noqa: D103
    for br in prange(indptr.shape[0] - 1):
        a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = np.float32(0.0)
        j = np.uint64(indptr[br])
        end = np.uint64(indptr[br + 1])
        while j + np.uint64(2) <= end:
            d = j * np.uint64(4)
            u = x[indices[j]]
            w = x[indices[j + np.uint64(1)]]
            a0 += data[d] * u
            a1 += data[d + np.uint64(1)] * u
            a2 += data[d + np.uint64(2)] * u
            a3 += data[d + np.uint64(3)] * u
            c0 += data[d + np.uint64(4)] * w
            c1 += data[d + np.uint64(5)] * w
            c2 += data[d + np.uint64(6)] * w
            c3 += data[d + np.uint64(7)] * w
            j += np.uint64(2)
        if j < end:
            d = j * np.uint64(4)
            u = x[indices[j]]
            a0 += data[d] * u
            a1 += data[d + np.uint64(1)] * u
            a2 += data[d + np.uint64(2)] * u
            a3 += data[d + np.uint64(3)] * u
        r = np.uint64(br) * np.uint64(4)
        out[r] = a0 + c0
        out[r + np.uint64(1)] = a1 + c1
        out[r + np.uint64(2)] = a2 + c2
        out[r + np.uint64(3)] = a3 + c3
"""


_BSR_TILE = """

{deco}
{signature}
    nb = bounds.shape[0] - 1
    one = np.float32(1.0)
    mb = (indptr.shape[0] - 1) // nkb
    nu = np.uint64(n)
    bu = np.uint64(bs)
    kdim = b.shape[0] // bs
    npan = (ntile + pt - 1) // pt
    for t in prange(npan * nb):
        p = t // nb
        r0 = bounds[t - p * nb]
        r1 = bounds[t - p * nb + 1]
        c0 = np.uint64(col0 + p * pt * {width})
        per = (pfk + r1 - r0 - 1) // (r1 - r0) if pfk and r1 > r0 else 0
        for kb in range(nkb):
{next_block}
                r = np.uint64(kb * mb + br)
                start = np.uint64(indptr[r])
                end = np.uint64(indptr[r + np.uint64(1)])
                for s in range(p * pt, min(p * pt + pt, ntile)):
                    n0 = np.uint64(col0 + s * {width})
                    q = np.uint64(br * 4) * nu + n0
                    q1 = q + nu
                    q2 = q1 + nu
                    q3 = q2 + nu
                    if kb:
{load}
                    else:
{zero}
{zero2}
                    j = start
                    while j + np.uint64({unroll}) <= end:
{body}
                        j += np.uint64({unroll})
{tail}
{store}
"""


def bsr_tile(width: int, sfx: str, deco: str) -> str:
    """``bsr4_tile{width}`` (suffix ``sfx``) under the decorator ``deco``."""
    # 4 rows × width columns of accumulators; two blocks per iteration (two accumulator
    # sets) when one set would leave fewer than eight FMA chains in flight. K-blocked
    # (nkb > 1) and prefetching (pfk > 0) as tile64; see layouts.block_rows.
    vecs = width // 8
    unroll = 2 if 4 * vecs < 8 else 1
    acc = {
        (u, r, k): f"{'ac'[u]}{r}_{k}" for u in range(unroll) for r in range(4) for k in range(vecs)
    }
    pad = " " * 24
    row = "{q} + np.uint64({off})"
    rows = ("q", "q1", "q2", "q3")

    def block(u: int, pad: str) -> list[str]:
        lines = [
            f"{pad}o = np.uint64(indices[j + np.uint64({u})]) * bu + n0",
            f"{pad}d = (j + np.uint64({u})) * np.uint64(4)",
        ]
        lines += [f"{pad}x{k} = vload(b, o + np.uint64({8 * k}))" for k in range(vecs)]
        for r in range(4):
            lines.append(f"{pad}v = data[d + np.uint64({r})]")
            lines += [f"{pad}{acc[u, r, k]} = vfmav({acc[u, r, k]}, v, x{k})" for k in range(vecs)]
        return lines

    body = [line for u in range(unroll) for line in block(u, pad)]
    tail = ["                    if j < end:", *block(0, pad)] if unroll > 1 else []
    load = [
        f"{pad}{acc[0, r, k]} = vload(out, {row.format(q=rows[r], off=8 * k)})"
        for r in range(4)
        for k in range(vecs)
    ]
    first = [acc[0, r, k] for r in range(4) for k in range(vecs)]
    second = [acc[1, r, k] for r in range(4) for k in range(vecs)] if unroll > 1 else []
    store = []
    for r in range(4):
        for k in range(vecs):
            total = acc[0, r, k] if unroll == 1 else f"vadd({acc[0, r, k]}, {acc[1, r, k]})"
            store.append(
                f"                    vstore(out, {row.format(q=rows[r], off=8 * k)}, {total}, one)"
            )
    args = "indptr, indices, data, b, bs, n, out, col0, ntile, bounds, pt, nkb, pfk"
    return _BSR_TILE.format(
        deco=deco,
        signature=f"def bsr4_tile{width}{sfx}({args}):  # noqa: D103",
        width=width,
        unroll=unroll,
        next_block=_next_block("c0", f"pt * {width}", "npan", "br"),
        load="\n".join(load),
        zero=pad + " = ".join(first) + " = vzero()",
        zero2=(" " * 20 + " = ".join(second) + " = vzero()") if second else "",
        body="\n".join(body),
        tail="\n".join(tail),
        store="\n".join(store),
    )


def spmv(sfx: str, deco: str) -> str:
    """``csr_spmv``, ``csr_spmv8`` and ``csr_cols`` (suffix ``sfx``) under ``deco``."""
    return _SPMV.format(deco=deco, sfx=sfx)


def bsr_spmv(sfx: str, deco: str) -> str:
    """``bsr4_spmv`` (suffix ``sfx``) under ``deco``."""
    return _BSR_SPMV.format(deco=deco, sfx=sfx)


#: Data and index types of the task functions (``_gomp.py``): (type code, numpy name).
TASK_DATA = (("f", "float32"), ("b", "int8"))
TASK_INDEX = (("H", "uint16"), ("I", "uint32"))

# A task function is what each of torch's OpenMP threads runs for a kernel call
# (``_gomp.py``): it reads the arrays from a block of int64 words (0: the address of the
# block that holds the counters, 1: the number of parts, 2: the task count, 3: the number
# 1, 4: the address of libgomp's ``omp_get_thread_num``, or this thread's number itself
# (below 4096, never an address) where each thread gets its own copy of the words
# (``_pool.py``), then address and size of each array, then the scalars; the counting
# block goes on with one 64-byte line per part: its task counters, first task, end task)
# and runs the serial twin on one task at a time until none are left.
_TASK_HEAD = """

def {name}_task_{code}(blk):  # noqa: D103
    a = carray(blk, {words}, np.int64)
    indptr = carray(as_ptr(a[5]), a[6], np.int64)
    indices = carray(as_ptr(a[7]), a[8], np.{index})
    data = carray(as_ptr(a[9]), a[10], np.{data})
    scale = carray(as_ptr(a[11]), a[12], np.float32)
"""

_TASK_LOOP = """    # Thread i owns part i (rows of about equal nonzeros, the same on every call, so
    # its share of the weight stays in its core's L2) and takes its tasks from the front;
    # then it takes the other parts' tasks from their back (a thread slowed by other
    # work leaves them to the others). A part's two counts share its first word (front:
    # low 32 bits), so each task runs once however many threads libgomp gave.
    nparts = a[1]
    who = a[4]
    own = (who if who < 4096 else thread_num(who)) % nparts
    k = 0
    while k < nparts:
        q = own + k
        if q >= nparts:
            q -= nparts
        line = a[0] + ({words} + 8 * q) * 8
        part = carray(as_ptr(line), 3, np.int64)
        count = part[2] - part[1]
        taken = fetch_add(line, np.int64(1) if k == 0 else np.int64(1) << np.int64(32))
        front = taken & np.int64(0xFFFFFFFF)
        behind = taken >> np.int64(32)
        if front + behind >= count:
            k += 1
            continue
        t = part[1] + (front if k == 0 else count - 1 - behind)
"""

_ONE = """    # 1 read at run time: with a literal 1 numba compiled a 3× slower twin.
    one = a[3]
"""

# Tasks are numbered row block major (then column tile or panel), so that a part is a
# range of row blocks.
_TILE_TASK = (
    _ONE
    + """
    b = carray(as_ptr(a[13]), a[14], np.float32)
    out = carray(as_ptr(a[15]), a[16], np.float32)
    bounds = carray(as_ptr(a[17]), a[18], np.int64)
    bias = carray(as_ptr(a[19]), a[20], np.float32)
    ntile = a[2] // (bounds.shape[0] - 1)
{loop}        j = t // ntile
        c0 = a[23] + (t - j * ntile) * {tile}
        tile64_1(
            indptr,
            indices,
            data,
            scale,
            b,
            a[21],
            a[22],
            out,
            c0,
            one,
            bounds[j : j + 2],
            a[24],
            a[25],
            bias,
            a[26],
        )
"""
)

_PANEL_TASK = (
    _ONE
    + """
    m = a[6] - 1
    kdim = a[21]
    npan = a[24]
    xp = carray(as_ptr(a[13]), (npan * kdim, {width}), np.float32)
    out = carray(as_ptr(a[15]), (m, a[22]), np.float32)
    bounds = carray(as_ptr(a[17]), a[18], np.int64)
    bias = carray(as_ptr(a[19]), a[20], np.float32)
{loop}        j = t // npan
        p = t - j * npan
        r0 = bounds[j]
        r1 = bounds[j + 1]
        xs = xp[p * kdim : (p + 1) * kdim]
        c0 = a[23] + p * {width}
        rows = indptr[r0 : r1 + 1]
        rb = max(r1 - r0, one)
        part = (scale[r0:r1], xs, out[r0:r1], c0, one, rb, bias[r0:r1], a[25])
        panel{width}_1(rows, indices, data, *part)
"""
)

_SPMV_TASK = """    x = carray(as_ptr(a[13]), a[14], np.float32)
    out = carray(as_ptr(a[15]), a[16], np.float32)
    bounds = carray(as_ptr(a[17]), a[18], np.int64)
    bias = carray(as_ptr(a[19]), a[20], np.float32)
{loop}        r0 = bounds[t]
        r1 = bounds[t + 1]
        rows = indptr[r0 : r1 + 1]
        {name}_1(rows, indices, data, scale[r0:r1], x, out[r0:r1], bias[r0:r1], a[21])
"""

#: Words of each task function's block before its parts' lines.
TASK_WORDS = {"tile64": 27, "panel": 26, "spmv": 22}


def tasks() -> str:
    """The task functions of ``tile64``, the panels and the SpMVs, per data/index type."""
    parts = []
    for dcode, dname in TASK_DATA:
        for icode, iname in TASK_INDEX:
            fmt = {"code": dcode + icode, "index": iname, "data": dname}
            parts.append(_TASK_HEAD.format(name="tile64", words=TASK_WORDS["tile64"], **fmt))
            loop = _TASK_LOOP.format(words=TASK_WORDS["tile64"])
            parts.append(_TILE_TASK.format(loop=loop, tile=TILE))
            for width, _ in SHAPES:
                parts.append(
                    _TASK_HEAD.format(name=f"panel{width}", words=TASK_WORDS["panel"], **fmt)
                )
                loop = _TASK_LOOP.format(words=TASK_WORDS["panel"])
                parts.append(_PANEL_TASK.format(loop=loop, width=width))
            for name in ("csr_spmv", "csr_spmv8"):
                parts.append(_TASK_HEAD.format(name=name, words=TASK_WORDS["spmv"], **fmt))
                loop = _TASK_LOOP.format(words=TASK_WORDS["spmv"])
                parts.append(_SPMV_TASK.format(loop=loop, name=name))
    return "".join(parts)
