"""One module per ``kdistill`` command, each a thin layer over the libraries.

* :mod:`~kdistill.commands.run` — ``kdistill run`` and ``kdistill eval`` (:mod:`kdistill.run`);
* :mod:`~kdistill.commands.generate` — ``kdistill generate`` (:mod:`kdistill.answers`);
* :mod:`~kdistill.commands.cache_teacher` — ``kdistill cache-teacher`` (:mod:`kdistill.topk_cache`);
* :mod:`~kdistill.commands.demo` — ``kdistill demo``, the embedded default.
"""
