"""Where the teacher signal comes from.

A teacher turns a batch (``input_ids``/``attention_mask`` ``[batch, seq]``) into a
:class:`TeacherSignal` for the student's positions: final hidden states + output layer (the fused
loss's input), full logits, or top-k log-probs (an offline cache). Methods ask for what they
can use; the loss functions accept all three.
"""

from kdistill.teachers.local import LocalTeacher, TeacherSignal, supports_hidden

__all__ = ["LocalTeacher", "TeacherSignal", "supports_hidden"]
