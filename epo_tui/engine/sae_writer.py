"""Random sae-lens SAEs on disk, for tests and the offline demo.

Built with sae-lens's own config and SAE classes and saved with its `save_model` (cfg.json +
sae_weights.safetensors), plus a `sparsity.safetensors` of log10 firing rates as sae-lens's trainer
writes it. Every parameter is random (b_enc, b_dec, a positive JumpReLU threshold, gated biases and
magnitude scales, uneven decoder norms), so parity tests exercise all of them.

Every architecture sae-lens can run: the inference ones, the transcoders (the decoder d_out wide),
and the training-only batchtopk kinds, saved either as sae-lens's trainer saves them at the end
(`save_inference_model`: a JumpReLU folder) or as a training checkpoint (`training_layout`: the
training config and its `topk_threshold`).

Shapes: D d_in, O d_out, S d_sae, N sampled inputs.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

ARCHITECTURES = ("standard", "jumprelu", "topk", "abstopk", "gated", "batchtopk", "matryoshka_batchtopk",
                 "transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
TRAINING_ONLY = ("batchtopk", "matryoshka_batchtopk")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")


def write_random_sae(
    folder: Path | str,
    d_in: int,
    d_sae: int,
    hook_name: str,
    architecture: str = "standard",
    seed: int = 0,
    k: int = 8,
    apply_b_dec_to_input: bool | None = None,
    normalize_activations: str = "none",
    model_name: str = "tiny",
    dtype: str = "float32",
    rescale_acts_by_decoder_norm: bool = False,
    model_from_pretrained_kwargs: dict[str, Any] | None = None,
    neuronpedia_id: str | None = None,
    write_sparsity: bool = True,
    input_norm: float | None = None,
    d_out: int | None = None,
    hook_name_out: str | None = None,
    hf_hook_name: str | None = None,
    hf_hook_name_out: str | None = None,
    reshape_activations: str = "none",
    training_layout: bool = False,
) -> Path:
    """Writes a random sae-lens SAE into `folder` and returns the folder.

    Scaled for inputs of norm `input_norm` (default sqrt(d_in), e.g. standard normal rows): encoder
    columns have norm sqrt(d_in) / input_norm, so pre-activations are ~N(b_enc, 1) and roughly a
    third of the latents fire. With a run-time normalization the inputs are rescaled to norm ~sqrt(d_in)
    anyway: leave `input_norm` unset then.

    `apply_b_dec_to_input` defaults to True for SAEs and False for transcoders (sae-lens refuses it
    there). Transcoders write `d_out` wide (default d_in) to `hook_name_out`. batchtopk kinds: `k` is
    the average number of latents kept, rescale_acts_by_decoder_norm is sae-lens's training default
    (True); the folder holds what the trainer saves for inference, or with `training_layout` the
    training checkpoint itself.
    """
    import torch
    from safetensors.torch import save_file
    from sae_lens import SAE
    from sae_lens.constants import SPARSITY_FILENAME
    from sae_lens.registry import get_sae_class, get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if architecture in ("topk", "abstopk", *TRAINING_ONLY) and not 0 < k <= d_sae:
        raise ValueError(f"k must be in 1..{d_sae}, got {k}")
    transcoder = architecture in TRANSCODERS
    if apply_b_dec_to_input is None:
        apply_b_dec_to_input = not transcoder
    folder = Path(folder)
    metadata = SAEMetadata(
        model_name=model_name,
        hook_name=hook_name,
        hook_head_index=None,
        prepend_bos=True,
        context_size=128,
        model_from_pretrained_kwargs=model_from_pretrained_kwargs or {},
        **({"neuronpedia_id": neuronpedia_id} if neuronpedia_id else {}),
        **{key: value for key, value in (("hook_name_out", hook_name_out), ("hf_hook_name", hf_hook_name),
                                         ("hf_hook_name_out", hf_hook_name_out)) if value is not None},
    )
    common: dict[str, Any] = dict(d_in=d_in, d_sae=d_sae, dtype=dtype, device="cpu",
                                  apply_b_dec_to_input=apply_b_dec_to_input,
                                  normalize_activations=normalize_activations,
                                  reshape_activations=reshape_activations, metadata=metadata)
    if transcoder:
        common["d_out"] = d_out or d_in
    if architecture in ("topk", "abstopk"):
        common.update(k=k, rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm)
    if architecture in TRAINING_ONLY:
        common["k"] = float(k)  # rescale_acts_by_decoder_norm: the training default (True)
        if architecture == "matryoshka_batchtopk":
            common["matryoshka_widths"] = [d_sae // 4, d_sae // 2, d_sae]
    with warnings.catch_warnings():  # sae-lens warns about model_from_pretrained_kwargs
        warnings.simplefilter("ignore")
        registry = get_sae_training_class if architecture in TRAINING_ONLY else get_sae_class
        sae_class, config_class = registry(architecture)
        sae = sae_class(config_class(**common))

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    def put(name: str, value: torch.Tensor) -> None:
        getattr(sae, name).data = value.to(sae.dtype)

    out = (d_out or d_in) if transcoder else d_in
    scale = 1.0 if input_norm is None else input_norm / math.sqrt(d_in)  # input size per dimension
    with torch.no_grad():
        W_enc_DxS = randn(d_in, d_sae)
        put("W_enc", W_enc_DxS / (W_enc_DxS.norm(dim=0, keepdim=True) * scale))
        # uneven decoder norms, so decoder-norm rescaling and folding change something
        put("W_dec", randn(d_sae, out) / math.sqrt(out) * (0.5 + rand(d_sae, 1)))
        put("b_dec", 0.1 * (1.0 if transcoder else scale) * randn(out))
        if architecture == "gated":
            # magnitude and gate paths disagree often: open gates on negative magnitudes and the reverse
            put("b_gate", -0.3 + 0.3 * randn(d_sae))
            put("r_mag", 0.3 * randn(d_sae))
            put("b_mag", 0.3 * randn(d_sae))
        elif "jumprelu" in architecture:
            put("b_enc", 0.2 * randn(d_sae))
            put("threshold", 0.3 + 0.5 * rand(d_sae))
        elif architecture == "abstopk":  # signed activations: latents far from 0 on both sides
            put("b_enc", 0.3 * randn(d_sae))
        else:
            put("b_enc", -0.4 + 0.3 * randn(d_sae))
        if "skip" in architecture:
            put("W_skip", randn(out, d_in) / math.sqrt(d_in))
        if architecture in TRAINING_ONLY:  # the batch threshold the trainer learned, in rescaled units
            sae.topk_threshold = torch.tensor(0.4 + 0.2 * float(rand(1)), dtype=torch.double)

    if architecture in TRAINING_ONLY and not training_layout:
        sae.save_inference_model(folder)
        sae = SAE.load_from_disk(folder)
    else:
        sae.save_model(folder)
    if write_sparsity:
        if reshape_activations == "hook_z":
            sae.turn_off_forward_pass_hook_z_reshaping()  # sampled rows are already d_in wide
        with torch.no_grad():
            x_NxD = scale * randn(512, d_in)
            fired_S = (sae.encode(x_NxD) > 0).float().mean(0)
        # the same key and log10 convention as sae-lens's trainer (SAETrainer.log_feature_sparsity)
        save_file({"sparsity": torch.log10(fired_S + 1e-10).contiguous()}, folder / SPARSITY_FILENAME)
    return folder
