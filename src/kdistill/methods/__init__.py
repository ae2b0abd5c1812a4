"""Distillation methods: one module per method, each a :class:`Method` subclass registered by name.

* :mod:`~kdistill.methods.logit` — white-box KD on the teacher's token distributions (``logit``);
* :mod:`~kdistill.methods.on_policy` — generalized KD on the student's own samples (``on_policy``);
* :mod:`~kdistill.methods.sequence` — black-box KD on the teacher's written answers (``sequence``);
* :mod:`~kdistill.methods.candidates` — sample, score, keep the best, fine-tune
  (``on_policy_filter``, ``self_distill``);
* :mod:`~kdistill.methods.zephyr` — dSFT -> AI feedback -> dDPO (``zephyr``);
* :mod:`~kdistill.methods.dpo` — DPO on preference pairs (``dpo``);
* :mod:`~kdistill.methods.progressive` — shrink in stages, distilling at each size (``progressive``).

A new method is one module: a :class:`Method` subclass with its declarations (see
:mod:`kdistill.methods.base`) and ``@register``. Importing this package registers the built-in ones.
"""

# registration order is the order `method:` values are listed in messages
from kdistill.methods import logit, on_policy, sequence  # noqa: F401  isort: skip
from kdistill.methods import candidates, zephyr, dpo, progressive  # noqa: F401  isort: skip
from kdistill.methods.base import (Method, RunContext, build_method, method_class, method_names, method_sections,
                                   register, registry_version, unregister)

__all__ = ["Method", "RunContext", "build_method", "method_class", "method_names", "method_sections", "register",
           "registry_version", "unregister"]
