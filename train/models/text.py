"""Prompts -> text-encoder states, once at load: the ``prompts`` conditioning of text-to-image/video teachers.

The teacher directory holds the text encoder and tokenizer in the diffusers layout (``text_encoder/`` with a
transformers ``config.json`` + weights, ``tokenizer/``); a prompt file holds one prompt per line. The prompts and the
negative prompt are tokenized to a fixed length and encoded the way the family's own diffusers pipeline does it
(:class:`train.models.families.TextConvention`: CLIP last hidden state for Stable Diffusion; T5 states with the
attention mask for PixArt; T5 padded to ``max_text_seq_length`` for CogVideoX; umT5 with padding states zeroed for
Wan). The result has the layout of a ``prompt_embeds`` file (:func:`save_prompt_embeds`), and can be cached in one so
that later runs and the other processes skip the encoder (``teacher.prompt_embeds_cache``).

Nothing is downloaded (``local_files_only``); a missing folder or file stops with what to put where.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from train.models.families import Family

__all__ = ["read_prompts", "encode_prompts", "load_or_encode_prompts", "save_prompt_embeds", "PROMPT_KEYS"]

#: tensors of a prompt-embeddings file (masks optional)
PROMPT_KEYS = ("prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask", "negative_prompt_attention_mask")


def read_prompts(path: Path) -> list[str]:
    """The prompts of a text file, one per line (surrounding whitespace stripped, blank lines skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file (teacher.prompt_file) not found: {path} does not exist. Write one "
                                "prompt per line into a text file and set teacher.prompt_file to it")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"teacher.prompt_file: {path} holds no prompt (one prompt per line)")
    return prompts


def _max_length(family: Family, tokenizer: object, denoiser_config: object, override: int | None) -> int:
    """Tokens per prompt: the config override, else the family convention, else the tokenizer's own limit."""
    conv = family.text
    if override is not None:
        return override
    if conv.length_key is not None:
        return int(getattr(denoiser_config, conv.length_key))
    if conv.max_length is not None:
        return conv.max_length
    limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
    if not 0 < limit < 100_000:  # transformers' "no limit" sentinel is 1e30
        raise ValueError("teacher.max_sequence_length: the tokenizer states no maximum length; set it (e.g. 77 for "
                         "CLIP, 120 for PixArt-alpha, 300 for PixArt-Sigma, 512 for Wan)")
    return limit


def _load_encoder(root: Path, text_subfolder: str, tok_subfolder: str, dtype: torch.dtype,
                  device: torch.device | str) -> tuple[object, torch.nn.Module]:
    import transformers

    text_dir, tok_dir = root / text_subfolder, root / tok_subfolder
    layout = (f"expected {text_dir}/config.json + model.safetensors (a transformers text encoder such as "
              f"CLIPTextModel or T5EncoderModel, save_pretrained layout) and {tok_dir}/ (its tokenizer files)")
    for path, key in ((text_dir / "config.json", "teacher.text_encoder_subfolder"),
                      (tok_dir, "teacher.tokenizer_subfolder")):
        if not path.exists():
            raise FileNotFoundError(f"text encoder files for teacher.conditioning=prompts not found: {path} does not "
                                    f"exist ({key}). Copy the model's text encoder and tokenizer there: {layout}; or "
                                    "use teacher.conditioning=prompt_embeds with precomputed embeddings")
    if not any(text_dir.glob("*.safetensors")) and not any(text_dir.glob("*.bin")):
        raise FileNotFoundError(f"text encoder weights not found in {text_dir}: {layout}")
    archs = json.loads((text_dir / "config.json").read_text()).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"teacher.text_encoder_subfolder: {text_dir}/config.json names no transformers class in "
                         f"'architectures' (got {archs}); expected e.g. ['CLIPTextModel'] or ['T5EncoderModel']")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    encoder = cls.from_pretrained(str(text_dir), local_files_only=True, dtype=dtype).to(device).eval()
    return tokenizer, encoder


@torch.no_grad()
def _encode(tokenizer: object, encoder: torch.nn.Module, family: Family, prompts: list[str], max_length: int,
            batch_size: int = 16) -> tuple[Tensor, Tensor, int]:
    """States ``(N, L, D)``, attention masks ``(N, L)`` and the number of truncated prompts."""
    conv = family.text
    device = next(encoder.parameters()).device
    states, masks, truncated = [], [], 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        tok = tokenizer(chunk, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        full = tokenizer(chunk, padding="longest", return_tensors="pt")
        truncated += int((full.attention_mask.sum(1) > max_length).sum())
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        out = encoder(input_ids=ids, attention_mask=mask if conv.encoder_mask else None)[0]  # last hidden state
        if conv.zero_pad:  # Wan: states of padding tokens are zero
            out = out * mask[..., None].to(out.dtype)
        states.append(out.float().cpu())
        masks.append(mask.cpu())
    return torch.cat(states), torch.cat(masks), truncated


def encode_prompts(root: Path, text_subfolder: str, tok_subfolder: str, family: Family, denoiser_config: object,
                   prompts: list[str], negative_prompt: str, max_length: int | None, dtype: torch.dtype,
                   device: torch.device | str) -> dict[str, Tensor]:
    """Encodes ``prompts`` and ``negative_prompt`` with the teacher's local text encoder.

    Returns:
        ``prompt_embeds (N, L, D)``, ``negative_prompt_embeds (1, L, D)`` (float32) and, for families whose
        denoiser takes the mask, ``prompt_attention_mask (N, L)`` / ``negative_prompt_attention_mask (1, L)``.
    """
    if family.text is None:
        raise ValueError(f"teacher.conditioning: family {family.name!r} is not text-conditioned; use 'class'")
    tokenizer, encoder = _load_encoder(root, text_subfolder, tok_subfolder, dtype, device)
    length = _max_length(family, tokenizer, denoiser_config, max_length)
    embeds, masks, truncated = _encode(tokenizer, encoder, family, prompts, length)
    neg, neg_mask, _ = _encode(tokenizer, encoder, family, [negative_prompt], length)
    if truncated:
        print(f"prompts: {truncated} of {len(prompts)} prompts are longer than {length} tokens and were truncated")
    out = {"prompt_embeds": embeds, "negative_prompt_embeds": neg}
    if family.text.model_mask:
        out["prompt_attention_mask"], out["negative_prompt_attention_mask"] = masks, neg_mask
    del encoder
    return out


def _fingerprint(root: Path, text_subfolder: str, tok_subfolder: str, prompts: list[str], negative_prompt: str,
                 max_length: int | None, family: Family) -> str:
    """Hash of everything the embeddings depend on (prompts, lengths, encoder config and tokenizer files)."""
    h = hashlib.sha256()
    h.update(json.dumps([prompts, negative_prompt, max_length, family.name]).encode())
    h.update((root / text_subfolder / "config.json").read_bytes())
    for f in sorted((root / tok_subfolder).glob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    for f in sorted((root / text_subfolder).glob("*.safetensors")):  # weights by size and time, not by content
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def save_prompt_embeds(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Writes a prompt-embeddings file atomically (a complete file or none, when processes race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_or_encode_prompts(root: Path, text_subfolder: str, tok_subfolder: str, family: Family,
                           denoiser_config: object, prompt_file: Path, negative_prompt: str, max_length: int | None,
                           cache: Path | None, dtype: torch.dtype, device: torch.device | str) -> dict[str, Tensor]:
    """:func:`encode_prompts` for the prompts of ``prompt_file``, through the cache file ``cache`` when given.

    A cache whose fingerprint (prompts, negative prompt, length, encoder config, tokenizer files, weight files'
    sizes and times) matches is read instead of running the encoder; otherwise the prompts are encoded and the
    cache is (re)written.
    """
    prompts = read_prompts(prompt_file)
    # a missing encoder is reported before the fingerprint is taken
    if not (root / text_subfolder / "config.json").is_file() or not (root / tok_subfolder).exists():
        _load_encoder(root, text_subfolder, tok_subfolder, dtype, "cpu")
    key = _fingerprint(root, text_subfolder, tok_subfolder, prompts, negative_prompt, max_length, family)
    if cache is not None and cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") == key:
                return {k: f.get_tensor(k) for k in f.keys()}
        print(f"prompts: {cache} was made from other prompts or another encoder; re-encoding")
    tensors = encode_prompts(root, text_subfolder, tok_subfolder, family, denoiser_config, prompts, negative_prompt,
                             max_length, dtype, device)
    if cache is not None:
        save_prompt_embeds(cache, tensors, {"fingerprint": key, "num_prompts": str(len(prompts))})
    return tensors
