"""Config sections of how a student is built beyond a depth cut: ``student.init.width``,
``student.init.search`` and ``student.lora`` (used by :mod:`kdistill.settings`' ``student:``).

Same rules as every section: unknown keys are errors that name the key.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from kdistill.section import Section

AXIS = Literal["mlp", "heads", "hidden"]


class WidthConfig(Section):
    """Width pruning (Minitron-style, :mod:`kdistill.models.width`): the share of each kind of unit
    the student keeps, ranked by activation importance on training rows; a missing key keeps all."""

    mlp: Optional[float] = Field(None, gt=0.0, le=1.0, description="share of MLP intermediate channels kept")
    heads: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="share of attention head groups kept (a KV head with its query heads)")
    hidden: Optional[float] = Field(None, gt=0.0, le=1.0, description="share of hidden (embedding) channels kept")

    def fractions(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class CandidateConfig(Section):
    """One depth/width split the cut search tries."""

    num_layers: Optional[int] = Field(None, ge=1, description="blocks kept (none = all)")
    width: Optional[WidthConfig] = None


class SearchConfig(Section):
    """Cut search (:mod:`kdistill.cut_search`): candidate depth/width splits at a parameter budget,
    each distilled for ``probe_steps`` and scored by its KL to the teacher on training rows held
    out from the probe; the best is built afresh and distilled by the run."""

    target_params: float = Field(..., gt=0.0, description="budget: a share of the teacher's parameters (<= 1) "
                                 "or a count (> 1)")
    candidates: Optional[list[CandidateConfig]] = Field(
        None, description="the splits to try; none = generated: depth-only, width-only and depth+width mixes")
    depth_levels: int = Field(4, ge=2, le=12, description="generated candidates: depths from the depth-only cut "
                              "to all blocks")
    axes: list[AXIS] = Field(["mlp", "hidden"], min_length=1,
                             description="generated candidates: the width axes pruned (to one common fraction)")
    probe_steps: int = Field(20, ge=1, description="distillation steps per candidate")
    probe_eval_rows: int = Field(32, ge=1, description="training rows held out from the probe to score it")
    learning_rate: Optional[float] = Field(None, gt=0.0, description="probe learning rate (none = train.learning_rate)")
    tolerance: float = Field(0.02, ge=0.0, le=0.5, description="a given candidate may exceed the budget by this share")


class LoraConfig(Section):
    """A LoRA student (:mod:`kdistill.models.lora`, with peft): only the adapters train."""

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0.0, description="scaling numerator (the update is alpha/r · B·A)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="module names given adapters; all-linear = every linear layer but the output layer")
    modules_to_save: list[str] = Field(default_factory=list,
                                       description="modules trained in full beside the adapters (e.g. [lm_head])")
    merge: bool = Field(True, description="save the student with the adapters merged in (false: the adapter folder)")

    @model_validator(mode="after")
    def _targets(self) -> "LoraConfig":
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("student.lora.target_modules: give at least one module name (or all-linear)")
        return self
