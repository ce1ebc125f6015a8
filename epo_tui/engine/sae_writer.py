"""Random sae-lens SAEs on disk, for tests and the offline demo.

Built with sae-lens's own config and SAE classes and saved with its `save_model` (cfg.json +
sae_weights.safetensors), plus a `sparsity.safetensors` of log10 firing rates as sae-lens's trainer
writes it. Every parameter is random (b_enc, b_dec, a positive JumpReLU threshold, uneven decoder
norms), so parity tests exercise all of them.

Shapes: D d_in, S d_sae, N sampled inputs.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

ARCHITECTURES = ("standard", "jumprelu", "topk")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")


def write_random_sae(
    folder: Path | str,
    d_in: int,
    d_sae: int,
    hook_name: str,
    architecture: str = "standard",
    seed: int = 0,
    k: int = 8,
    apply_b_dec_to_input: bool = True,
    normalize_activations: str = "none",
    model_name: str = "tiny",
    dtype: str = "float32",
    rescale_acts_by_decoder_norm: bool = False,
    model_from_pretrained_kwargs: dict[str, Any] | None = None,
    neuronpedia_id: str | None = None,
    write_sparsity: bool = True,
    input_norm: float | None = None,
) -> Path:
    """Writes a random sae-lens SAE into `folder` and returns the folder.

    Scaled for inputs of norm `input_norm` (default sqrt(d_in), e.g. standard normal rows): encoder
    columns have norm sqrt(d_in) / input_norm, so pre-activations are ~N(b_enc, 1) and roughly a
    third of the latents fire. With a run-time normalization the inputs are rescaled to norm ~sqrt(d_in)
    anyway: leave `input_norm` unset then.
    """
    import torch
    from safetensors.torch import save_file
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.constants import SPARSITY_FILENAME
    from sae_lens.saes.sae import SAEMetadata

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if architecture == "topk" and not 0 < k <= d_sae:
        raise ValueError(f"k must be in 1..{d_sae}, got {k}")
    folder = Path(folder)
    metadata = SAEMetadata(
        model_name=model_name,
        hook_name=hook_name,
        hook_head_index=None,
        prepend_bos=True,
        context_size=128,
        model_from_pretrained_kwargs=model_from_pretrained_kwargs or {},
        **({"neuronpedia_id": neuronpedia_id} if neuronpedia_id else {}),
    )
    common = dict(d_in=d_in, d_sae=d_sae, dtype=dtype, device="cpu",
                  apply_b_dec_to_input=apply_b_dec_to_input,
                  normalize_activations=normalize_activations, metadata=metadata)
    with warnings.catch_warnings():  # sae-lens warns about model_from_pretrained_kwargs
        warnings.simplefilter("ignore")
        if architecture == "standard":
            sae = StandardSAE(StandardSAEConfig(**common))
        elif architecture == "jumprelu":
            sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
        else:
            sae = TopKSAE(TopKSAEConfig(k=k, rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm,
                                        **common))

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    scale = 1.0 if input_norm is None else input_norm / math.sqrt(d_in)  # input size per dimension
    with torch.no_grad():
        W_enc_DxS = randn(d_in, d_sae)
        W_enc_DxS /= W_enc_DxS.norm(dim=0, keepdim=True) * scale
        sae.W_enc.data = W_enc_DxS.to(sae.dtype)
        # uneven decoder norms, so decoder-norm rescaling and folding change something
        W_dec_SxD = randn(d_sae, d_in) / math.sqrt(d_in) * (0.5 + rand(d_sae, 1))
        sae.W_dec.data = W_dec_SxD.to(sae.dtype)
        sae.b_dec.data = (0.1 * scale * randn(d_in)).to(sae.dtype)
        if architecture == "jumprelu":
            sae.b_enc.data = (0.2 * randn(d_sae)).to(sae.dtype)
            sae.threshold.data = (0.3 + 0.5 * rand(d_sae)).to(sae.dtype)
        else:
            sae.b_enc.data = (-0.4 + 0.3 * randn(d_sae)).to(sae.dtype)

    sae.save_model(folder)
    if write_sparsity:
        with torch.no_grad():
            x_NxD = scale * randn(512, d_in)
            fired_S = (sae.encode(x_NxD) > 0).float().mean(0)
        # the same key and log10 convention as sae-lens's trainer (SAETrainer.log_feature_sparsity)
        save_file({"sparsity": torch.log10(fired_S + 1e-10).contiguous()}, folder / SPARSITY_FILENAME)
    return folder
