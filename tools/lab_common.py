"""What the kernel labs in tools/ share: one timed, checked row per variant (not shipped)."""
from omni_compile.bench import bench_ms, graph_ms, rel_err


def timed_row(rows, label, name, fn, ref, flops=None, check=None, keep_failures=False, note=None, **fields):
    """Run ``fn`` once, compare its output (the first element of a tuple) with ``ref`` (relative error),
    add ``check(out)``'s dict of further checks, time it, append the row to ``rows`` and print it; returns
    the row, or None when the variant fails to compile or run (printed, and recorded as a row with
    ``failed`` when ``keep_failures``), so one broken variant does not end a device call.
    ``note(row)`` adds text to the printed line.

    ``ms`` is the kernel time from replays of a captured CUDA graph where capture works (``graph_ms``),
    ``wall_ms`` the call from Python (``bench_ms``): at 4608 tokens a Python launch of the attention wrapper
    (~0.1 ms of host time) outlasts a sparse kernel, so wall times there compared host overheads (the session
    9 and first session 10 order-lab rows; the lab's own launcher is leaner than the shipped one)."""
    try:
        out = fn()
        err = rel_err(out[0] if isinstance(out, tuple) else out, ref)
        checks = check(out) if check else {}
        wall = bench_ms(fn)
        graph = graph_ms(fn)
        ms = graph if graph == graph else wall
    except Exception as e:
        print(f"{label} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        if keep_failures:
            rows.append(dict(fields, name=name, failed=repr(e)[:500]))
        return None
    row = dict(fields, name=name, ms=ms, wall_ms=wall, err=err, **checks)
    if flops:
        row["tflops"] = flops / ms / 1e9
    rows.append(row)
    tf = f" {row['tflops']:5.0f} TF/s" if flops else ""
    extra = "".join(f" {k} {v}" for k, v in checks.items())
    print(f"{label} {name:40s} {ms:8.4f} ms (wall {wall:8.4f}){tf}{' ' + note(row) if note else ''} err {err:.1e}{extra}", flush=True)
    return row
