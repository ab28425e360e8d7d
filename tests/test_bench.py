"""omni_compile.bench's random symbols (the kernels' benchmark needs a GPU; its masks do not)."""
import torch

from omni_compile.bench import make_symbols


def test_equal_and_varied_masks_keep_the_asked_fraction():
    """Equal masks keep exactly round(keep·n) key blocks in every tile; varied ones draw each tile's count
    from 1 .. 2·round(keep·n) - 1 (so tiles differ, none is empty) with about the same density."""
    n = 4608 // 128
    for keep in (0.1, 0.2, 0.5):
        kept = round(keep * n)
        equal = make_symbols(4608, keep, device="cpu")
        varied = make_symbols(4608, keep, device="cpu", varied=True)
        c_eq, c_var = equal.kv_schedule()[1], varied.kv_schedule()[1]
        assert (c_eq == kept).all()
        assert c_var.min() >= 1 and c_var.max() <= min(n, 2 * kept - 1) and c_var.unique().numel() > 1
        assert abs(varied.density() - equal.density()) < 0.02
