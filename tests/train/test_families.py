"""Model families (train.models.families): SD UNet with a prompt file, DiT, PixArt, CogVideoX and Wan, tiny models.

Per family: the quantization rules hit the intended layers, and one end-to-end run of the family's recipe through
``train.cli.main`` (prepare, calibrate, two training steps, evaluation in the sampling pipeline, export) whose export
reloads to exactly the trained student. Plus the adapters' argument handling, prompt encoding and caching, and the
flow-matching trajectory step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import qat
from qat.families import FAMILY_RULES
from qat.methods.efficientdm import EfficientDMConfig, efficientdm_spec
from qat.prepare import match
from tests.train.conftest import fast_overrides
from tests.train.family_fixtures import FAMILY_CASES, PROMPTS, TINY_MODELS, make_pixart, make_sd, make_wan
from train.cli import build_student, main
from train.config import CONFIG_DIR, ConfigError, load_config
from train.eval.evaluate import generate
from train.models.families import FAMILIES, denoise, family_for_class, family_of, get_family, set_family
from train.models.pipeline import QATDiffusionPipeline, flow_step, make_scheduler, sample_seeds
from train.models.teacher import load_teacher


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two intra-op threads on the 2-core CI box make the fake quantizers' rounding many times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- registry and quantization rules ----------------------------------------------------------------------------------
def test_family_is_detected_from_the_class_and_can_be_overridden() -> None:
    for name, build in TINY_MODELS.items():
        assert family_of(build()).name == name
        assert family_of(torch.compile(build())).name == name  # a compile wrapper is seen through
    assert family_for_class(type("MyUNet", (UNet2DConditionModel,), {})).name == "unet"  # along the MRO
    with pytest.raises(ValueError, match=r"Linear is not a known denoiser family; known: unet .*teacher\.family"):
        family_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"teacher\.family: unknown family 'sdxl'; known: unet"):
        get_family("sdxl")
    model = nn.Linear(2, 2)
    set_family(model, "dit")
    assert family_of(model).name == "dit"
    assert set(FAMILIES) == set(FAMILY_RULES)  # one rule set per adapter


SPECIAL = {
    "unet": {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"},
    "dit": {"pos_embed.proj", "proj_out_2", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1",
            "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2"},
    "pixart": {"pos_embed.proj", "proj_out", "caption_projection.linear_1", "caption_projection.linear_2"}
    | {f"adaln_single.emb.{e}_embedder.linear_{i}" for e in ("timestep", "resolution", "aspect_ratio")
       for i in (1, 2)},
    "cogvideox": {"patch_embed.proj", "patch_embed.text_proj", "time_embedding.linear_1", "time_embedding.linear_2",
                  "proj_out"},
    "wan": {f"condition_embedder.{e}_embedder.linear_{i}" for e in ("time", "text") for i in (1, 2)} | {"proj_out"},
}
SHORTCUTS = {
    "unet": {"down_blocks.1.resnets.0.conv_shortcut"}
    | {f"up_blocks.{b}.resnets.{r}.conv_shortcut" for b in (0, 1) for r in (0, 1)},
}
DOWNSAMPLERS = {"unet": {"down_blocks.0.downsamplers.0.conv"}}
EXCLUDED = {f: SHORTCUTS.get(f, set()) | DOWNSAMPLERS.get(f, set()) for f in ("unet",)}
MODULATION = {
    "unet": {"down_blocks.0.resnets.0.time_emb_proj", "down_blocks.1.resnets.0.time_emb_proj",
             "mid_block.resnets.0.time_emb_proj", "mid_block.resnets.1.time_emb_proj"}
    | {f"up_blocks.{b}.resnets.{r}.time_emb_proj" for b in (0, 1) for r in (0, 1)},
    "dit": {"transformer_blocks.0.norm1.linear", "proj_out_1"},
    "pixart": {"adaln_single.linear"},
    "cogvideox": {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm2.linear", "norm_out.linear"},
    "wan": {"condition_embedder.time_proj"},
}


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_rules_quantize_the_intended_layers(family: str) -> None:
    model = TINY_MODELS[family]()
    modules = dict(model.named_modules())
    layers = {n for n, m in modules.items() if type(m) in (nn.Linear, nn.Conv2d)}
    rules = FAMILY_RULES[family]
    for pattern in rules.edges + rules.shortcuts + rules.downsamplers + rules.modulation:  # no dead pattern
        assert any(match(n, pattern) for n in modules if n), pattern
    assert {n for n in layers if any(match(n, p) for p in rules.shortcuts)} == SHORTCUTS.get(family, set())
    assert {n for n in layers if any(match(n, p) for p in rules.downsamplers)} == DOWNSAMPLERS.get(
        family, set())
    assert {n for n in modules if n and any(match(n, p) for p in rules.modulation)} == MODULATION[family]

    report = qat.prepare(model, efficientdm_spec(EfficientDMConfig(family=family, num_timesteps=4, lora_rank=2)))
    w8 = {r[0] for r in report.rows if r[2] == "8"}
    lora = {r[0] for r in report.rows if r[4] > 0}
    assert w8 == SPECIAL[family]
    assert set(report.excluded) == EXCLUDED.get(family, set())
    assert lora == layers - w8 - set(report.excluded)  # everything else: QALoRA W4A4
    assert MODULATION[family] <= lora and all(r[2:4] == ("4", "4") for r in report.rows if r[0] in lora)
    if family == "wan":  # no quantized Conv3d: the patch embedding stays a float layer
        assert type(model.patch_embedding) is nn.Conv3d

    for mode, where in (("fp", "excluded"), ("special", "w8")):
        m2 = TINY_MODELS[family]()
        rep = qat.prepare(m2, efficientdm_spec(EfficientDMConfig(family=family, num_timesteps=4, lora_rank=2,
                                                                 modulation=mode)))
        got = set(rep.excluded) if where == "excluded" else {r[0] for r in rep.rows if r[2] == "8"}
        assert MODULATION[family] <= got, mode


# -- adapters ---------------------------------------------------------------------------------------------------------
def test_dit_adapter_passes_labels_and_drops_the_learned_variance() -> None:
    model = TINY_MODELS["dit"]().eval()
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 10])  # 10 = null class
    out = denoise(model, x, t, labels.float())  # the trainer hands contexts over as floats
    ref = model(x, timestep=t, class_labels=labels).sample
    assert out.shape == x.shape and torch.equal(out, ref[:, :4])


def test_pixart_adapter_splits_the_mask_and_adds_size_conditions() -> None:
    model = TINY_MODELS["pixart"]().eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    states, mask = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    out = denoise(model, x, t, torch.cat([states, mask[..., None].float()], -1))
    added = {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    ref = model(x, encoder_hidden_states=states, timestep=t, added_cond_kwargs=added,
                encoder_attention_mask=mask).sample[:, :4]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(out, denoise(model, x, t, states))  # the mask matters
    with pytest.raises(ValueError, match=r"pixart: text states have 9 features, the model takes 6"):
        denoise(model, x, t, torch.randn(2, 5, 9))


def test_video_adapters_keep_their_layouts() -> None:
    cog, wan = TINY_MODELS["cogvideox"]().eval(), TINY_MODELS["wan"]().eval()
    x = torch.randn(2, 2, 4, 8, 8)  # CogVideoX: (B, F, C, H, W)
    assert denoise(cog, x, torch.tensor([1, 900]), torch.randn(2, 3, 6)).shape == x.shape
    assert get_family("cogvideox").as_images(x).shape == (2, 4, 8, 16)  # frames side by side
    with pytest.raises(ValueError, match=r"text states have 5 tokens.*max_text_seq_length=3"):
        denoise(cog, x, torch.tensor([1, 900]), torch.randn(2, 5, 6))
    y = torch.randn(2, 4, 2, 8, 8)  # Wan: (B, C, F, H, W), float flow timesteps
    assert denoise(wan, y, torch.tensor([999.0, 12.5]), torch.randn(2, 7, 6)).shape == y.shape
    torch.testing.assert_close(get_family("wan").as_images(y)[:, :, :, 8:], y[:, :, 1])  # second frame


# -- prompts ----------------------------------------------------------------------------------------------------------
def _teacher(recipe: str, root: Path, extra: list[str], *more: str):
    cfg = load_config([f"config={recipe}", f"teacher.path={root}", *extra, *more])
    return load_teacher(cfg.teacher)


def test_prompt_file_is_encoded_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import train.models.text

    root = tmp_path / "sd"
    root.mkdir()
    extra = make_sd(root)
    teacher = _teacher("efficientdm_sd15.yaml", root, extra)
    assert teacher.num_classes == len(PROMPTS)  # the blank line is skipped
    assert teacher.prompt_embeds.shape == (3, 8, 8) and teacher.negative_prompt_embeds.shape == (1, 8, 8)
    assert teacher.prompt_attention_mask is None  # SD's UNet takes no mask
    cond, uncond = teacher.contexts(torch.tensor([2, 0]))
    assert cond.shape == (2, 8, 8) and torch.equal(uncond[0], uncond[1])
    assert not torch.equal(cond[0], cond[1])
    # a second load reads the cache and never builds the encoder
    monkeypatch.setattr(train.models.text, "encode_prompts", lambda *a, **k: pytest.fail("cache not used"))
    again = _teacher("efficientdm_sd15.yaml", root, extra)
    assert torch.equal(again.prompt_embeds, teacher.prompt_embeds)
    monkeypatch.undo()
    (root / "prompts.txt").write_text("a new prompt\n")  # other prompts: re-encoded
    assert _teacher("efficientdm_sd15.yaml", root, extra).num_classes == 1
    # the negative prompt is encoded like the prompts
    neg = _teacher("efficientdm_sd15.yaml", root, extra, "teacher.negative_prompt=blurry")
    assert not torch.equal(neg.negative_prompt_embeds, teacher.negative_prompt_embeds)


def test_text_conventions_of_pixart_and_wan(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    pixart = _teacher("efficientdm_pixart_alpha.yaml", tmp_path / "p", make_pixart(tmp_path / "p"),
                      "teacher.max_sequence_length=30")
    mask = pixart.prompt_attention_mask
    assert mask.shape == (3, 30) and mask[:, 0].all() and not mask.all()  # padded prompts
    assert mask.sum(1).tolist() == [18, 14, 25]  # one token per letter, word ends included, + start and end
    cond, uncond = pixart.contexts(torch.tensor([0, 1]))
    assert cond.shape == (2, 30, 7) and torch.equal(cond[..., -1], mask[:2].float())  # mask as the last feature
    assert torch.equal(uncond[0, :, -1], pixart.negative_prompt_attention_mask[0].float())

    (tmp_path / "w").mkdir()
    wan = _teacher("efficientdm_wan21_1_3b.yaml", tmp_path / "w", make_wan(tmp_path / "w"),
                   "teacher.max_sequence_length=30")
    assert wan.prompt_attention_mask is None and wan.prompt_embeds.shape == (3, 30, 6)
    nonzero = (wan.prompt_embeds.abs().sum(-1) > 0).sum(1)
    assert nonzero.tolist() == mask.sum(1).tolist()  # the states of padding tokens are zero, the others are not
    assert (wan.prompt_embeds.abs().sum(-1) > 0).long().equal(mask)
    assert wan.is_flow and wan.ddim(4).timesteps.is_floating_point()  # flow-matching trajectories, times 1000 sigma
    with pytest.raises(ValueError, match=r"eval\.scheduler: 'ddim' cannot sample the flow-matching teacher"):
        make_scheduler("ddim", wan.scheduler)


def test_missing_text_encoder_and_wrong_conditioning_are_explained(tmp_path: Path) -> None:
    import shutil

    (tmp_path / "sd").mkdir()
    extra = make_sd(tmp_path / "sd")
    shutil.rmtree(tmp_path / "sd" / "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"text_encoder/config\.json does not exist \(teacher\."
                                                r"text_encoder_subfolder\).*CLIPTextModel or T5EncoderModel"):
        _teacher("efficientdm_sd15.yaml", tmp_path / "sd", extra)
    (tmp_path / "p").mkdir()
    extra = make_pixart(tmp_path / "p")
    with pytest.raises(ConfigError, match=r"family 'pixart' is text-conditioned; set teacher\.conditioning to "
                                          r"'prompts'"):
        _teacher("efficientdm_pixart_alpha.yaml", tmp_path / "p", extra, "teacher.conditioning=none",
                 "trajectories.guidance_scale=1.0")
    with pytest.raises(ConfigError, match=r"family 'dit' is class-conditional"):
        _teacher("efficientdm_pixart_alpha.yaml", tmp_path / "p", extra, "teacher.family=dit")
    (tmp_path / "w").mkdir()
    extra = [e for e in make_wan(tmp_path / "w") if not e.startswith("teacher.sample_shape")]
    with pytest.raises(ValueError, match=r"teacher\.sample_shape: WanTransformer3DModel's config has no sample size"):
        _teacher("efficientdm_wan21_1_3b.yaml", tmp_path / "w", extra, "teacher.sample_shape=null")


# -- flow-matching trajectories ---------------------------------------------------------------------------------------
def test_flow_step_is_euler_at_eta_0_and_keeps_the_marginal_at_eta_1() -> None:
    gen = torch.Generator().manual_seed(0)
    x0, eps, z = (torch.randn(200_000, generator=gen) for _ in range(3))
    s, s_next = 0.8, 0.5
    x = (1 - s) * x0 + s * eps
    v = eps - x0  # the exact velocity
    torch.testing.assert_close(flow_step(v, x, s, s_next, 0.0, z), x + (s_next - s) * v)
    # eta 1: x' = (1 - s') x0 + s' * (unit Gaussian), independent of where eps pointed
    noise_part = (flow_step(v, x, s, s_next, 1.0, z) - (1 - s_next) * x0) / s_next
    assert abs(float(noise_part.std()) - 1.0) < 0.01 and abs(float(noise_part.mean())) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([noise_part, z]))[0, 1])) > 0.5  # fresh noise enters
    torch.testing.assert_close(flow_step(v, x, s, 0.0, 1.0, z), x0)  # the last step lands on x0


# -- end to end, one per family ---------------------------------------------------------------------------------------
def test_every_recipe_runs_in_a_test() -> None:
    from tests.train.test_bidm_train import RECIPES_RUN_HERE as BIDM_RECIPES
    from tests.train.test_binarydm_train import RECIPES_RUN_HERE
    from tests.train.test_qvgen_train import RECIPES_RUN_HERE as QVGEN_RECIPES
    from tests.train.test_train import class_unet_recipes

    covered = set(class_unet_recipes()) | {recipe for recipe, _ in FAMILY_CASES.values()}
    covered |= RECIPES_RUN_HERE | BIDM_RECIPES | QVGEN_RECIPES
    assert covered == {p.name for p in CONFIG_DIR.glob("*.yaml")}


#: the pipeline scheduler that reproduces each family's trajectory sampler
TRAJECTORY_SAMPLER = {"cogvideox": "CogVideoXDDIMScheduler", "wan": "FlowMatchEulerDiscreteScheduler"}


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_family_end_to_end(family: str, tmp_path: Path) -> None:
    recipe, make = FAMILY_CASES[family]
    root = tmp_path / "teacher"
    root.mkdir()
    run = main([f"config={recipe}", *fast_overrides(root, tmp_path / "run"), *make(root), "eval.enabled=true"])

    # two training steps: finite losses, the LoRA factors left their zero init
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    state = load_file(str(run / "student" / "student.safetensors"))
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and sum(bool(v.abs().sum() > 0) for v in lora_b) > len(lora_b) // 2
    # the run evaluated PTQ and QAT students in the sampling pipeline against the FP teacher
    variants = json.loads((run / "report.json").read_text())["variants"]
    for name in ("ptq", "qat"):
        assert math.isfinite(variants[name]["eps_mse"]) and len(variants[name]["eps_mse_by_step"]) == 4
        assert variants[name]["psnr_vs_fp"] > 0

    # the trained student, rebuilt from the run, and its export reloaded without training code
    cfg = load_config([f"config={run / 'config.yaml'}"])
    teacher = load_teacher(cfg.teacher)
    student, _ = build_student(cfg, teacher)
    student.load_state_dict(state, strict=True)
    student.eval()
    loaded = qat.load_quantized(run / "export")
    assert family_of(loaded).name == family == teacher.family
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *teacher.sample_shape, generator=gen)
    t = teacher.ddim(cfg.trajectories.num_steps).timesteps[[0, -1]]
    cond = teacher.contexts(torch.tensor([0, 1]))[0].float()  # (bf16 teachers' states, fp32 students)
    with torch.no_grad(), qat.timestep(student, t), qat.timestep(loaded, t):
        a, b = denoise(student, x, t, cond), denoise(loaded, x, t, cond)
    assert a.shape == x.shape and float((a - b).abs().max()) <= 1e-6

    # sampling through the pipeline: the export samples as the student does, and the pipeline (timestep read by
    # the hook, family adapter) reproduces the training sampler (explicit timesteps)
    guidance = cfg.trajectories.guidance_scale
    kwargs = dict(scheduler=cfg.eval.scheduler, num_steps=3, guidance=guidance, seed=5)
    s_student, s_loaded = generate(student, teacher, [0, 1], **kwargs), generate(loaded, teacher, [0, 1], **kwargs)
    assert s_student.images.shape == (2, *teacher.as_images(x).shape[1:])
    assert torch.isfinite(s_student.images).all()
    torch.testing.assert_close(s_loaded.images, s_student.images, atol=1e-5, rtol=0)
    labels, noise, _ = sample_seeds([0, 1], teacher.num_classes, 5, teacher.sample_shape)
    cond, uncond = teacher.contexts(labels)
    ref = QATDiffusionPipeline.from_teacher(teacher, unet=student, scheduler=teacher.ddim(3)).denoise_loop(
        noise, cond, uncond, guidance)
    pipe = QATDiffusionPipeline.from_teacher(teacher, unet=student, scheduler=TRAJECTORY_SAMPLER.get(family, "ddim"))
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(pipe(noise, labels, num_inference_steps=3, guidance_scale=guidance).images, ref,
                               atol=1e-5, rtol=0)


def test_throughput_bench_runs_on_tiny_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench/family_throughput.py --tiny``: the GPU table's script, checked on the CPU."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "bench" / "family_throughput.py"
    spec = importlib.util.spec_from_file_location("family_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "family_throughput", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    assert set(bench.SPECS) == set(FAMILIES)
    rows = bench.main(["--tiny", "--families", "dit,cogvideox", "--warmup", "0", "--steps", "1"])
    assert [r["family"] for r in rows] == ["dit", "cogvideox"]
    for r in rows:
        assert r["traj_samples_per_s"] > 0 and r["qat_samples_per_s"] > 0 and r["trainable_M"] > 0
    assert rows[1]["grad_ckpt"] and rows[1]["sample_shape"] == [2, 4, 8, 8]  # video: checkpointed, with frames


class _Block(nn.Module):
    """A stand-in region: the given convolutions, plus peft-style adapters that must not count."""

    def __init__(self, *convs: nn.Conv2d) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.lora_A = nn.ModuleDict({"default": nn.Conv2d(8, 4, 3)})  # an adapter: small and k x k
        self.lora_B = nn.ModuleDict({"default": nn.Conv2d(4, 8, 1)})


def test_channels_last_is_chosen_by_the_convolutions_as_inductor_does() -> None:
    """``prefers_channels_last`` applies inductor's structural layout rules (no grouped convolution, no ``k x k``
    convolution that halves the channels, not all channels small) and ignores adapters."""
    from train.models.families import prefers_channels_last

    assert prefers_channels_last(_Block(nn.Conv2d(384, 384, 1), nn.Conv2d(384, 384, 1)))  # a transformer region
    assert prefers_channels_last(_Block(nn.Conv2d(384, 576, 3, padding=1), nn.Conv2d(384, 576, 1)))
    assert not prefers_channels_last(_Block(nn.Conv2d(768, 384, 3, padding=1)))  # an up block's concatenated skip
    assert prefers_channels_last(_Block(nn.Conv2d(768, 384, 1)))  # halving is allowed for 1 x 1
    assert not prefers_channels_last(_Block(nn.Conv2d(384, 384, 3, groups=2)))  # grouped
    assert prefers_channels_last(_Block(nn.Conv2d(384, 384, 3, groups=384)))  # depthwise is not "grouped"
    assert not prefers_channels_last(_Block(nn.Conv2d(64, 64, 3), nn.Conv2d(32, 64, 1)))  # all small
    assert not prefers_channels_last(_Block())  # no convolution but the adapters: nothing to lay out
    assert not prefers_channels_last(nn.Linear(384, 384))


def test_region_compile_kwargs_force_the_layout_only_where_it_applies() -> None:
    """A mode becomes its inductor options (``torch.compile`` takes one or the other) plus the forced layout; other
    backends, dynamic shapes and blocks without a channels-last preference keep the caller's arguments."""
    from torch._inductor import list_mode_options

    from train.models.families import region_compile_kwargs

    wide, small = _Block(nn.Conv2d(384, 384, 1)), _Block(nn.Conv2d(32, 32, 3))
    kwargs = region_compile_kwargs(wide, mode="reduce-overhead", dynamic=False)
    assert "mode" not in kwargs and kwargs["dynamic"] is False
    assert kwargs["options"] == {**list_mode_options("reduce-overhead", False), "force_layout_optimization": True}
    assert kwargs["options"]["triton.cudagraphs"] is True  # CUDA graphs kept
    assert region_compile_kwargs(wide) == {"options": {"force_layout_optimization": True}}
    assert region_compile_kwargs(wide, mode="default", options=None) == {
        "options": {"force_layout_optimization": True}}
    for block, kw in ((wide, {"backend": "aot_eager"}), (wide, {"mode": "reduce-overhead", "dynamic": True}),
                      (small, {"mode": "reduce-overhead"})):
        assert region_compile_kwargs(block, **kw) == kw
    torch.compile(nn.Conv2d(384, 384, 1), **kwargs)  # torch.compile accepts the result (compiles lazily)


def test_compile_repeated_blocks_lays_out_each_region(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every region of a UNet is compiled with its own layout decision; ``layout_by_convolutions=False`` passes the
    arguments through (inductor's own heuristic)."""
    from train.models.families import compile_repeated_blocks, prefers_channels_last

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(96, 192), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    seen: dict[str, dict] = {}
    names = {id(m): n for n, m in unet.named_modules()}
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: seen.__setitem__(names[id(self)], kw))
    n = compile_repeated_blocks(unet, mode="reduce-overhead")
    assert len(seen) == n > 0
    forced = {name for name, kw in seen.items() if kw.get("options", {}).get("force_layout_optimization")}
    assert forced == {name for name in seen if prefers_channels_last(unet.get_submodule(name))}
    assert "down_blocks.1.attentions.0" in forced and "up_blocks.1.resnets.0" not in forced  # 1x1 vs halving 3x3
    assert all(kw == {"mode": "reduce-overhead", "dynamic": False} for name, kw in seen.items() if name not in forced)
    seen.clear()
    compile_repeated_blocks(unet, mode="reduce-overhead", layout_by_convolutions=False)
    assert all(kw == {"mode": "reduce-overhead", "dynamic": False} for kw in seen.values())
