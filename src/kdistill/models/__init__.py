"""Models: loading (hub id, folder, .gguf), introspection, and students cut from teachers.

* :mod:`~kdistill.models.load` — ``load_model(spec) -> (model, tokenizer)``;
* :mod:`~kdistill.models.introspect` — hidden states, decoder blocks, EOS tokens, parameter counts;
* :mod:`~kdistill.models.cut` — depth cuts: which blocks a student keeps;
* :mod:`~kdistill.models.width` — width pruning: MLP channels, head groups, hidden channels;
* :mod:`~kdistill.models.moe` — mixture-of-experts: active parameters, dense students;
* :mod:`~kdistill.models.lora` — LoRA students (peft);
* :mod:`~kdistill.models.vocab` — do teacher and student share a vocabulary;
* :mod:`~kdistill.models.student` — the training wrapper and stage save/load.
"""

from kdistill.models.cut import cut_student, layer_importance, select_layers
from kdistill.models.introspect import (block_outputs, count_params, cut_at_eos, decoder_layers, decoder_states,
                                        eos_ids, final_hidden, hf_model, num_layers, output_vocab_size,
                                        supports_hidden)
from kdistill.models.moe import param_counts
from kdistill.models.load import cache_dir, demo_teacher_path, load_model, load_tokenizer, resolve_source
from kdistill.models.student import StudentLM, load_saved, model_label_logprobs, save_model
from kdistill.models.vocab import check_vocab, tokenizer_fingerprint

__all__ = [
    "StudentLM", "block_outputs", "cache_dir", "check_vocab", "count_params", "cut_at_eos", "cut_student",
    "decoder_layers", "decoder_states", "demo_teacher_path", "eos_ids", "final_hidden", "hf_model",
    "layer_importance", "load_model", "load_saved", "load_tokenizer", "model_label_logprobs", "num_layers",
    "output_vocab_size", "param_counts", "resolve_source", "save_model", "select_layers", "supports_hidden",
    "tokenizer_fingerprint",
]
