"""A language model paired with the SAE that reads one of its hooks, checked to fit together."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from epo_tui.config import Config
from epo_tui.engine import sharding
from epo_tui.engine.language_model import LanguageModel, load_model
from epo_tui.engine.models.hooks import HookPoint
from epo_tui.engine.sae import SAEParams, check_feature_index
from epo_tui.engine.sae_loading import load_sae_with_density
from epo_tui.errors import UserError


# sae-lens trains on TransformerLens models unless its metadata names another model class.
TRANSFORMER_LENS_CLASSES = (None, "HookedTransformer")


@dataclass
class ModelWithSAE:
    """The model runs as the SAE's training run ran it (TransformerLens conventions when it used TL)."""

    model: LanguageModel
    sae: SAEParams
    log10_density_S: np.ndarray | None = None  # how often each latent fires (None: the SAE ships no record)
    _replicas: dict = field(default_factory=dict, repr=False)  # (params, sae) placed, per mesh

    @property
    def mesh(self) -> Mesh:
        """The mesh the model was loaded onto ([model] model_parallel); all local devices along "data"
        for a model built without one."""
        return self.model.mesh if self.model.mesh is not None else sharding.make_mesh(1)

    def placed(self, mesh: Mesh) -> tuple[dict, SAEParams]:
        """(params, sae) on `mesh`, each leaf split along "model" as its name says (engine/sharding.py)
        and whole along "data"; placed once per mesh (a batch reuses them per feature)."""
        if mesh not in self._replicas:
            self._replicas[mesh] = sharding.place((self.model.params, self.sae), mesh)
        return self._replicas[mesh]

    @property
    def trained_on_transformer_lens(self) -> bool:
        return trained_on_transformer_lens(self.sae)

    @property
    def center_writes(self) -> bool:
        """Whether the SAE saw TransformerLens's centred residual (GPT-2 res-jb) or the raw one."""
        family_default = self.model.family.CENTERS_WRITES_BY_DEFAULT and self.trained_on_transformer_lens
        return family_default if self.sae.center_writes is None else self.sae.center_writes and family_default

    def forward(self, tokens_or_onehot, logits: bool = True):
        """(logits_BxLxV | None, sae_input_BxLxD): the model's logits and the SAE's hook activations."""
        logits_out, acts = self.model.forward(tokens_or_onehot, hooks=(self.sae.read_hook,),
                                              logits=logits, center_writes=self.center_writes)
        return logits_out, acts[self.sae.read_hook]


def load_model_with_sae(config: Config, feature: int | None = None,
                        feature_source: str | None = None) -> ModelWithSAE:
    """Loads both (SAE first: its errors are quicker to find), checks hook, width and feature index.

    `feature_source` names where the feature came from in errors (default: the config file).
    """
    with sharding.on_host():  # placed beside the model's weights below, split along its latents
        sae, density = load_sae_with_density(config.sae, source=config.source)
    if feature is not None:
        check_feature_index(sae, feature, source=feature_source or config.source)
    model = load_model(config.model, source=config.source, sae=sae)
    check_sae_fits(sae, model)
    if trained_on_transformer_lens(sae):
        model = dataclasses.replace(model, cfg=model.family.transformer_lens_config(model.cfg))
    return ModelWithSAE(model=model, sae=sharding.place(sae, model.mesh), log10_density_S=density)


def trained_on_transformer_lens(sae: SAEParams) -> bool:
    """Whether the SAE's activations came from TransformerLens (and so need its processing): not when its
    config names a transformers module, nor when its metadata names another model class."""
    return sae.hf_hook_name is None and sae.model_class_name in TRANSFORMER_LENS_CLASSES


def check_sae_fits(sae: SAEParams, model: LanguageModel) -> HookPoint:
    """The model's HookPoint the SAE reads, or a UserError: the hook is not in the model, or its width
    is not the SAE's d_in."""
    try:
        point = model.hook_point(sae.read_hook)
    except UserError as err:
        raise UserError(f"sae: {err}") from None
    width = model.hook_width(sae.read_hook)
    if width != sae.d_in:
        names = " * ".join(point.width_fields)
        raise UserError(f"sae: the SAE reads {sae.d_in}-wide activations at '{sae.read_hook}' but model "
                        f"'{model.name}' has {names} = {width} there")
    return point


def as_batch(token_ids: list[int]) -> jnp.ndarray:
    return jnp.asarray([token_ids], dtype=jnp.int32)
