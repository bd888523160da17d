"""Tiny random teachers of every model family, saved in the diffusers layout (no network, a few seconds on a CPU).

Each ``make_*`` writes ``<root>/{unet or transformer, scheduler, ...}`` and returns the command-line overrides that
point the family's recipe at it. Text encoders are random transformers models with a CLIP-style tokenizer whose
vocabulary (letters) is written here, so nothing is downloaded.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtTransformer2DModel,
    PNDMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)
from safetensors.torch import save_file

PROMPTS = ["a red fox in the snow", "a bowl of ramen", "an old lighthouse in a storm"]


def write_tokenizer(path: Path, max_length: int = 77) -> int:
    """A CLIP BPE tokenizer over single letters (no merges); returns its vocabulary size."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length).save_pretrained(str(path))
    return len(vocab)


def write_clip_encoder(root: Path, width: int, max_length: int = 8) -> None:
    """``text_encoder/`` (random CLIPTextModel) and ``tokenizer/`` of a Stable Diffusion layout."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = write_tokenizer(root / "tokenizer", max_length)
    torch.manual_seed(1)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=width)
    CLIPTextModel(cfg).save_pretrained(str(root / "text_encoder"))


def write_t5_encoder(root: Path, width: int) -> None:
    """``text_encoder/`` (random T5EncoderModel) and a letter tokenizer (the encoder only needs ids < vocab)."""
    from transformers import T5Config, T5EncoderModel

    vocab = write_tokenizer(root / "tokenizer")
    torch.manual_seed(1)
    cfg = T5Config(vocab_size=vocab, d_model=width, d_kv=4, d_ff=2 * width, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=1)
    T5EncoderModel(cfg).save_pretrained(str(root / "text_encoder"))


def write_prompts(path: Path) -> Path:
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")  # a blank line is skipped
    return path


def tiny_sd_unet() -> UNet2DConditionModel:
    """SD-style UNet2DConditionModel: 4 latent channels, 8x8, cross-attention width 8."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )


def tiny_dit() -> DiTTransformer2DModel:
    """DiT with learned sigma (8 output channels), 10 classes (+ null), one block."""
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def tiny_pixart() -> PixArtTransformer2DModel:
    """PixArt with resolution / aspect-ratio conditions (as the 1024 model), caption width 6, one block."""
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=8,
                                    num_layers=1, cross_attention_dim=12, sample_size=8, patch_size=2,
                                    caption_channels=6, use_additional_conditions=True, norm_num_groups=1)


def tiny_cogvideox() -> CogVideoXTransformer3DModel:
    """CogVideoX 1.0 layout (sin-cos positions): 2 latent frames of 8x8, 3 text tokens of width 6, one block."""
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=6, num_layers=1, sample_width=8,
                                       sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=3)


def tiny_wan() -> WanTransformer3DModel:
    """Wan 2.1 layout: patch (1, 2, 2), Conv3d patch embedding, text width 6, one block."""
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=6, in_channels=4,
                                 out_channels=4, text_dim=6, freq_dim=8, ffn_dim=16, num_layers=1, rope_max_seq_len=32)


#: family -> tiny model builder
TINY_MODELS = {"unet": tiny_sd_unet, "dit": tiny_dit, "pixart": tiny_pixart, "cogvideox": tiny_cogvideox,
               "wan": tiny_wan}


def make_sd(root: Path) -> list[str]:
    """SD layout: the tiny UNet, a random CLIP encoder + prompt file (cached embeddings), PNDM scheduler."""
    tiny_sd_unet().save_pretrained(str(root / "unet"))
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                  steps_offset=1, set_alpha_to_one=False).save_pretrained(str(root / "scheduler"))
    write_clip_encoder(root, width=8)
    prompts = write_prompts(root / "prompts.txt")
    return [f"teacher.prompt_file={prompts}", f"teacher.prompt_embeds_cache={root / 'cache.safetensors'}"]


def make_dit(root: Path) -> list[str]:
    """DiT layout: the tiny DiT (labels embedded by the model), DDIM scheduler."""
    tiny_dit().save_pretrained(str(root / "transformer"))
    DDIMScheduler(beta_schedule="linear").save_pretrained(str(root / "scheduler"))
    return ["monitor.sample_labels=[3,7]"]


def make_pixart(root: Path) -> list[str]:
    """PixArt layout: the tiny PixArt, a random T5 encoder (mask to encoder and model) + prompt file, DPM-Solver."""
    tiny_pixart().save_pretrained(str(root / "transformer"))
    DPMSolverMultistepScheduler().save_pretrained(str(root / "scheduler"))
    write_t5_encoder(root, width=6)
    prompts = write_prompts(root / "prompts.txt")
    return [f"teacher.prompt_file={prompts}", "teacher.max_sequence_length=12", "eval.scheduler=dpmsolver"]


def make_cogvideox(root: Path) -> list[str]:
    """CogVideoX layout: the tiny CogVideoX, precomputed text embeddings of max_text_seq_length tokens, v-prediction
    CogVideoXDDIMScheduler with zero terminal SNR."""
    tiny_cogvideox().save_pretrained(str(root / "transformer"))
    CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
                           timestep_spacing="trailing", set_alpha_to_one=True).save_pretrained(str(root / "scheduler"))
    torch.manual_seed(2)
    embeds = root / "prompt_embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(3, 3, 6), "negative_prompt_embeds": torch.randn(1, 3, 6)}, str(embeds))
    return ["teacher.conditioning=prompt_embeds", f"teacher.prompt_embeds_path={embeds}",
            "eval.scheduler=CogVideoXDDIMScheduler"]


def make_wan(root: Path) -> list[str]:
    """Wan layout: the tiny Wan (4 channels x 2 frames x 8x8), a random T5 encoder (padding states zeroed) + prompt
    file, flow-matching UniPC scheduler."""
    tiny_wan().save_pretrained(str(root / "transformer"))
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            num_train_timesteps=1000).save_pretrained(str(root / "scheduler"))
    write_t5_encoder(root, width=6)
    prompts = write_prompts(root / "prompts.txt")
    return [f"teacher.prompt_file={prompts}", "teacher.max_sequence_length=10", "teacher.sample_shape=[4,2,8,8]",
            "eval.scheduler=UniPCMultistepScheduler"]


#: family -> (recipe, teacher builder)
FAMILY_CASES = {
    "unet": ("efficientdm_sd15.yaml", make_sd),
    "dit": ("efficientdm_dit_xl2.yaml", make_dit),
    "pixart": ("efficientdm_pixart_alpha.yaml", make_pixart),
    "cogvideox": ("efficientdm_cogvideox_2b.yaml", make_cogvideox),
    "wan": ("efficientdm_wan21_1_3b.yaml", make_wan),
}
