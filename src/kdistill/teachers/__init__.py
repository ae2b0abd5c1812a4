"""Where the teacher signal comes from: one module per teacher kind, each registered with what it offers.

* :mod:`~kdistill.teachers.local` — a model next to the student (every signal, hidden states, text);
* :mod:`~kdistill.teachers.cache` — an offline top-k cache (``kdistill cache-teacher``);
* :mod:`~kdistill.teachers.served` — a vLLM server's top-k log-probs over HTTP;
* :mod:`~kdistill.teachers.text` — an OpenAI-compatible API: answers and ratings only;
* :mod:`~kdistill.teachers.multi` — several of the above, mixed;
* :mod:`~kdistill.teachers.cross` — any of the above with another tokenizer than the student's
  (``loss.cross_tokenizer``; its numbers from :mod:`~kdistill.teachers.cross_sources`);
* :mod:`~kdistill.teachers.api` — the HTTP client they share (retries, backoff, secrets);
* :mod:`~kdistill.teachers.build` — a config's ``teacher:`` / ``teachers:`` -> a teacher.
"""

from kdistill.teachers.base import (OFFERS, BuildEnv, HeldOut, Teacher, TeacherSignal, kind_names, register_teacher,
                                   teacher_kinds, unregister_teacher)
from kdistill.teachers.build import build_teacher, load_teacher_weights, primary_teacher, teacher_configs
from kdistill.teachers.cache import CachedTeacher
from kdistill.teachers.local import LocalTeacher
from kdistill.teachers.multi import MultiTeacher
from kdistill.teachers.served import ServedTeacher
from kdistill.teachers.text import ApiTextTeacher

__all__ = [
    "OFFERS", "ApiTextTeacher", "BuildEnv", "CachedTeacher", "HeldOut", "LocalTeacher", "MultiTeacher", "ServedTeacher",
    "Teacher", "TeacherSignal", "build_teacher", "load_teacher_weights", "primary_teacher", "register_teacher",
    "teacher_configs", "teacher_kinds", "kind_names", "unregister_teacher",
]
