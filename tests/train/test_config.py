"""Config loading: every recipe validates, and every error names the full key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import CONFIG_DIR, ConfigError, load_config


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_every_recipe_validates(recipe: str) -> None:
    # Recipes for user-supplied weights leave teacher.path unset on purpose.
    cfg = load_config([f"config={recipe}", "teacher.path=/some/local/model"])
    assert cfg.efficientdm.num_timesteps == cfg.trajectories.num_steps


def test_recipes_exist() -> None:
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"efficientdm_digits.yaml", "efficientdm_ldm4.yaml"} <= names


def test_recipe_by_name_without_suffix_and_by_path() -> None:
    by_name = load_config(["config=efficientdm_digits"])
    by_path = load_config([f"config={CONFIG_DIR / 'efficientdm_digits.yaml'}"])
    assert by_name == by_path


def test_ldm4_recipe_has_the_paper_setting() -> None:
    cfg = load_config(["config=efficientdm_ldm4.yaml", "teacher.path=/m"])
    e, t = cfg.efficientdm, cfg.trajectories
    assert (e.weight_bits, e.act_bits, e.lora_rank) == (4, 4, 32)
    assert (t.num_steps, t.eta, t.guidance_scale, t.batch_size) == (100, 1.0, 1.5, 2)
    assert cfg.trainer.max_steps == 16000
    assert cfg.optim.lora_lr == pytest.approx(1 / 2500)


def test_ldm4_recipe_fast_settings_validate_and_keep_the_paper_samples() -> None:
    # the header's "Faster on a GPU" override lines are what users paste; they must load and train as many (x_t, t)
    # samples as the paper's schedule, with the measured learning-rate multiplier (docs/performance.md)
    lines = (CONFIG_DIR / "efficientdm_ldm4.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Faster on a GPU"))
    overrides = []
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            break
        overrides += line[1:].split()
    base = load_config(["config=efficientdm_ldm4.yaml", "teacher.path=/m"])
    fast = load_config(["config=efficientdm_ldm4.yaml", "teacher.path=/m", *overrides])
    samples = base.trainer.max_steps * base.trajectories.batch_size
    assert fast.trainer.max_steps * fast.trajectories.batch_size == samples
    assert fast.trajectories.mode == "cached"
    assert fast.trajectories.num_trajectories * fast.trajectories.num_steps >= samples
    for name in ("lora_lr", "act_step_lr", "weight_step_lr"):
        assert getattr(fast.optim, name) == pytest.approx(4 * getattr(base.optim, name)), name
    assert fast.performance.compile and fast.performance.compile_blocks
    assert fast.performance.compile_mode == "reduce-overhead" and fast.trainer.precision == "bf16-mixed"


def test_override_reaches_trainer_section() -> None:
    cfg = load_config(["config=efficientdm_digits.yaml", "trainer.max_steps=20", "output_dir=/tmp/x"])
    assert cfg.trainer.max_steps == 20 and cfg.output_dir == "/tmp/x"


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["trainer.max_stepz=3"], r"trainer\.max_stepz: unknown key .*'max_steps'"),
        (["efficientdm.rank=3"], r"efficientdm\.rank: unknown key .*lora_rank"),
        (["trainer.max_steps=abc"], r"trainer\.max_steps: .*could not be converted to Integer"),
        (["trajectories.mode=offline"],
         r"trajectories\.mode: 'offline' is not allowed; choose one of \['online', 'cached'\]"),
        (["trajectories.loss_target=x"], r"trajectories\.loss_target: .*\['cfg', 'branches'\]"),
        (["teacher.conditioning=text"], r"teacher\.conditioning: .*\['class', 'prompt_embeds', 'prompts', 'none'\]"),
        (["teacher.dtype=fp16"], r"teacher\.dtype: .*\['fp32', 'bf16'\]"),
        (["trainer.precision=8bit"], r"trainer\.precision: '8bit' is not allowed"),
        (["efficientdm.family=unet3d"],
         r"efficientdm\.family must be one of \['cogvideox', 'dit', 'pixart', 'unet', 'wan', 'auto'\]"),
        (["efficientdm.weight_bits=1"], r"efficientdm\.weight_bits: 1 is outside \[2, 8\]"),
        (["trajectories.eta=1.5"], r"trajectories\.eta: 1.5 is outside \[0, 1\]"),
        (["trajectories.batch_size=0"], r"trajectories\.batch_size: must be >= 1"),
        (["method=qvgen"], r"method: 'qvgen' is not allowed; choose one of \['efficientdm'\]"),
        (["efficientdm.num_timesteps=50"], r"efficientdm\.num_timesteps \(50\) must equal trajectories\.num_steps"),
        (["teacher.conditioning=prompt_embeds"], r"teacher\.prompt_embeds_path: required"),
        (["teacher.conditioning=none"], r"trajectories\.guidance_scale: classifier-free guidance needs conditioning"),
        (["resume=/no/such.ckpt"], r"resume: '/no/such.ckpt' is neither 'last', 'auto' nor an existing checkpoint"),
        (["optim.betas=[0.9]"], r"optim\.betas: needs two values"),
        (["trainer.profiler=fancy"],
         r"trainer\.profiler: 'fancy' is not allowed; choose one of \[None, 'simple', 'advanced', 'pytorch'\]"),
        (["performance.compile_kernels=maybe"], r"performance\.compile_kernels: .*maybe"),
        (["performance.compile_blocks=true"], r"performance\.compile_blocks: .*needs performance\.compile=true"),
        (["performance.compile=true", "performance.compile_mode=fast"],
         r"performance\.compile_mode: 'fast' is not allowed; choose one of \['default', 'reduce-overhead', "
         r"'max-autotune', 'max-autotune-no-cudagraphs'\]"),
        (["performance.compile_mode=reduce-overhead"],
         r"performance\.compile_mode: .*needs performance\.compile=true"),
        (["performance.compile=true", "performance.compile_backend=aot_eager",
          "performance.compile_mode=max-autotune"],
         r"performance\.compile_mode: .*performance\.compile_backend=inductor"),
    ],
)
def test_error_messages_name_the_key(argv: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(["config=efficientdm_digits.yaml", *argv])


def test_unknown_key_in_a_recipe_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"trainer\.max_step: unknown key \(from .*bad\.yaml\)"):
        load_config([f"config={bad}"])


def test_missing_required_teacher_path() -> None:
    with pytest.raises(ConfigError, match=r"teacher\.path: required but not set"):
        load_config(["config=efficientdm_ldm4.yaml"])


def test_unknown_recipe_lists_known_recipes() -> None:
    with pytest.raises(ConfigError, match=r"known recipes: \[.*efficientdm_digits\.yaml"):
        load_config(["config=no_such_recipe"])


def test_argument_without_equals() -> None:
    with pytest.raises(ConfigError, match=r"argument 'trainer' is not key=value"):
        load_config(["config=efficientdm_digits.yaml", "trainer"])
