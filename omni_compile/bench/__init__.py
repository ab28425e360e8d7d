"""Benchmarks, quality evaluation and figures: what measures the library, kept out of its import graph
(nothing in the runtime, the ops or the passes imports this package).

* ``python -m omni_compile.bench`` (:mod:`.kernels`): the ops against cuDNN SDPA, FlexAttention and cuBLAS
  on a GPU;
* ``python -m omni_compile.bench.e2e`` (:mod:`.e2e`): denoising loops of full-size FLUX.1-dev and
  HunyuanVideo, Inductor dense against ``backend="flashomni"`` settings;
* ``python -m omni_compile.bench.quality`` (:mod:`.quality`): PSNR / SSIM / object accuracy of each setting
  on the learned zoo model against its dense images;
* :mod:`.figures`: every PNG the project draws; :mod:`.presets`: the shipped strategies at a given size.

Results and their commands: docs/benchmarks.md.
"""
