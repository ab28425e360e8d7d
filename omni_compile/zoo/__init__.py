"""``omni_compile.zoo``: a small text-to-image FLUX DiT with learned weights, trained by this repo.

* ``data``: procedural shapes dataset + caption grammar + tokenizer (generated on the fly, on device);
* ``model``: tiny text encoder + diffusers ``FluxTransformer2DModel`` (pixel space, 1,024 image tokens);
* ``train``: ``python -m omni_compile.zoo.train --out DIR`` (rectified flow, time-budgeted);
* ``sampler``: ``load_zoo()`` (the weights shipped in ``omni_compile/zoo/weights``) and ``sample()``
  (FlowMatchEuler, classifier-free guidance batched or as two calls);
* ``detector``: rule-based shape/colour/position/size detector (the quality metric);
* ``evaluate``: ``python -m omni_compile.zoo.evaluate --out DIR`` (sample grid, detector accuracy,
  attention-structure report).

See ``docs/zoo.md``. diffusers is needed for the model, sampler, training and evaluation (not for
``data`` / ``detector``).
"""

from .model import default_weights_dir  # noqa: F401

__all__ = ["data", "detector", "model", "sampler", "train", "evaluate", "default_weights_dir"]
