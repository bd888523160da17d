"""Config loading: every recipe validates, and every error names the full key and what is allowed."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from qat.losses import FeatureMSEConfig, OutputMSEConfig
from qat.methods import METHODS, Method, register_method
from train.config import CONFIG_DIR, ConfigError, load_config, to_yaml


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_every_recipe_validates(recipe: str) -> None:
    # Recipes for user-supplied weights leave teacher.path unset on purpose.
    cfg = load_config([f"config={recipe}", "teacher.path=/some/local/model"])
    assert recipe.startswith(f"{cfg.method}_")  # recipes are named <method>_<setting>.yaml
    if cfg.method == "efficientdm":
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
    assert cfg.efficientdm.lora_lr == pytest.approx(1 / 2500)


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
        assert getattr(fast.efficientdm, name) == pytest.approx(4 * getattr(base.efficientdm, name)), name
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
        (["losses.output_mse.target=x"],
         r"losses\.output_mse\.target: must be one of \['cfg', 'branches'\], got 'x'"),
        (["trajectories.loss_target=x"],  # the old key reports under its new name
         r"losses\.output_mse\.target: must be one of \['cfg', 'branches'\], got 'x'"),
        (["teacher.conditioning=text"], r"teacher\.conditioning: .*\['class', 'prompt_embeds', 'prompts', 'none'\]"),
        (["teacher.dtype=fp16"], r"teacher\.dtype: .*\['fp32', 'bf16'\]"),
        (["trainer.precision=8bit"], r"trainer\.precision: '8bit' is not allowed"),
        (["efficientdm.family=unet3d"],
         r"efficientdm\.family: must be one of \['cogvideox', 'dit', 'pixart', 'unet', 'wan', 'auto'\], "
         r"got 'unet3d'"),
        (["efficientdm.weight_bits=1"], r"efficientdm\.weight_bits: must be in \[2, 8\], got 1"),
        (["trajectories.eta=1.5"], r"trajectories\.eta: 1.5 is outside \[0, 1\]"),
        (["trajectories.batch_size=0"], r"trajectories\.batch_size: must be >= 1"),
        (["method=mpqdm"],
         r"method: 'mpqdm' is not allowed; choose one of \['bidm', 'binarydm', 'efficientdm', 'qvgen'\]"),
        (["efficientdm.num_timesteps=50"],
         r"efficientdm\.num_timesteps: 50 must equal trajectories\.num_steps \(20\)"),
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


def test_every_problem_of_one_config_is_reported_at_once() -> None:
    # an unknown key, a wrong type, a bad method-section value, bad cross-section values, an unknown loss and a bad
    # loss setting, in different sections: one ConfigError lists each, under its full key
    argv = ["config=efficientdm_digits.yaml", "trainer.max_stepz=3", "trainer.max_steps=abc",
            "efficientdm.weight_bits=1", "teacher.conditioning=none", "performance.compile_blocks=true",
            "losses.nope.weight=1", "losses.output_mse.target=x"]
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    expected = [
        r"trainer\.max_stepz: unknown key \(from command line\); allowed keys here: \[.*'max_steps'.*\]; "
        r"did you mean 'max_steps'\?",
        r"trainer\.max_steps: Value 'abc' of type 'str' could not be converted to Integer \(from command line\)",
        r"efficientdm\.weight_bits: must be in \[2, 8\], got 1",
        r"trajectories\.guidance_scale: classifier-free guidance needs conditioning",
        r"performance\.compile_blocks: .*needs performance\.compile=true",
        r"losses\.nope: unknown loss \(from command line\); registered losses: \['attention_kl', 'basis_l1', "
        r"'feature_mse', 'lrm', 'output_mse', 'relation', 'spd'\]",
        r"losses\.output_mse\.target: must be one of \['cfg', 'branches'\], got 'x'",
    ]
    errors = info.value.errors
    assert len(errors) == len(expected), errors
    for pattern in expected:
        assert sum(bool(re.fullmatch(pattern + ".*", e)) for e in errors) == 1, (pattern, errors)
    message = str(info.value)
    assert message.startswith(f"{len(expected)} problems in the config:\n")
    assert all(f"\n  - {e}" in message for e in errors)


def test_method_cross_section_check_runs_beside_other_problems() -> None:
    # efficientdm.num_timesteps is checked against trajectories.num_steps even when other sections have errors
    with pytest.raises(ConfigError) as info:
        load_config(["config=efficientdm_digits.yaml", "trainer.max_steps=abc", "efficientdm.num_timesteps=50"])
    assert len(info.value.errors) == 2, info.value.errors
    assert info.value.errors[0].startswith("trainer.max_steps: Value 'abc'")
    assert re.fullmatch(r"efficientdm\.num_timesteps: 50 must equal trajectories\.num_steps \(20\).*",
                        info.value.errors[1])


def test_one_problem_is_the_whole_message() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(["config=efficientdm_digits.yaml", "trajectories.eta=1.5"])
    assert info.value.errors == ["trajectories.eta: 1.5 is outside [0, 1]"]
    assert str(info.value) == "trajectories.eta: 1.5 is outside [0, 1]"


def test_old_keys_load_into_their_new_places_with_a_warning() -> None:
    with pytest.warns(UserWarning) as record:
        cfg = load_config(["config=efficientdm_digits.yaml", "optim.lora_lr=0.2", "trajectories.loss_target=branches"])
    assert cfg.efficientdm.lora_lr == pytest.approx(0.2)
    assert cfg.losses.output_mse.target == "branches"
    assert [c.target for c in cfg.loss_configs if c.name == "output_mse"] == ["branches"]
    assert not hasattr(cfg.optim, "lora_lr") and not hasattr(cfg.trajectories, "loss_target")
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert any("optim.lora_lr" in m and "efficientdm.lora_lr" in m for m in messages), messages
    assert any("trajectories.loss_target" in m and "losses.output_mse.target" in m for m in messages), messages


def test_old_keys_in_a_recipe_file_move_too(tmp_path: Path) -> None:
    recipe = tmp_path / "old.yaml"
    recipe.write_text("teacher:\n  path: /m\noptim:\n  lora_lr: 0.3\n  act_step_lr: 0.01\n  warmup_steps: 5\n"
                      "trajectories:\n  loss_target: branches\n")
    with pytest.warns(UserWarning, match=r"optim\.lora_lr \(from .*old\.yaml\) is now efficientdm\.lora_lr"):
        cfg = load_config([f"config={recipe}"])
    assert cfg.efficientdm.lora_lr == pytest.approx(0.3) and cfg.efficientdm.act_step_lr == pytest.approx(0.01)
    assert cfg.optim.warmup_steps == 5 and cfg.losses.output_mse.target == "branches"


_TOP_LEVEL = r"allowed keys here: \[.*'efficientdm'.*'trajectories'\]"


@pytest.mark.parametrize("section", ["qvgen", "bidm", "mpqdm"])
def test_section_of_an_unknown_method_is_refused(section: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{section}: unknown key \(from command line\); {_TOP_LEVEL}"):
        load_config(["config=efficientdm_digits.yaml", f"{section}.weight_bits=2"])


def test_section_of_another_registered_method_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass
    class ToyConfig:
        weight_bits: int = 2

    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))  # the registration is undone after the test

    @register_method("toy_method")
    class ToyMethod(Method):
        config_class = ToyConfig

        def build_student(self, denoiser, family):  # pragma: no cover - never built here
            raise NotImplementedError

    # this run's method is efficientdm: the toy method's section is not part of its schema
    with pytest.raises(ConfigError) as info:
        load_config(["config=efficientdm_digits.yaml", "toy_method.weight_bits=3"])
    assert len(info.value.errors) == 1
    assert re.fullmatch(rf"toy_method: unknown key \(from command line\); {_TOP_LEVEL}; it is the section of "
                        r"method 'toy_method', but this run's method is 'efficientdm'(; did you mean '\w+'\?)?",
                        info.value.errors[0])
    assert "'toy_method'" not in info.value.errors[0].split("allowed keys here:")[1].split("]")[0]
    # and the other way round: a toy run refuses efficientdm's section
    with pytest.raises(ConfigError) as info:
        load_config(["method=toy_method", "teacher.path=/m", "efficientdm.lora_rank=3"])
    assert len(info.value.errors) == 1
    assert re.fullmatch(r"efficientdm: unknown key \(from command line\); allowed keys here: \[.*'toy_method'.*\]; "
                        r"it is the section of method 'efficientdm', but this run's method is 'toy_method'"
                        r"(; did you mean '\w+'\?)?", info.value.errors[0])
    cfg = load_config(["method=toy_method", "teacher.path=/m", "toy_method.weight_bits=3"])
    assert type(cfg).__name__ == "RunConfig_toy_method" and cfg.method_config == ToyConfig(weight_bits=3)


def test_feature_loss_loads_and_needs_taps() -> None:
    cfg = load_config(["config=efficientdm_digits.yaml", "losses.feature_mse.taps=[mid_block]",
                       "losses.feature_mse.weight=0.5"])
    assert cfg.loss_configs == [OutputMSEConfig(weight=1.0, target="cfg"),
                                FeatureMSEConfig(weight=0.5, taps=["mid_block"])]
    # weight 0 switches a term off
    off = load_config(["config=efficientdm_digits.yaml", "losses.output_mse.weight=0", "losses.feature_mse.weight=1",
                       "losses.feature_mse.taps=[mid_block]"])
    assert off.loss_configs == [FeatureMSEConfig(weight=1.0, taps=["mid_block"])]
    with pytest.raises(ConfigError) as info:
        load_config(["config=efficientdm_digits.yaml", "losses.feature_mse.weight=1"])
    assert len(info.value.errors) == 1
    assert re.fullmatch(r"losses\.feature_mse\.taps: needs at least one module-name pattern.*", info.value.errors[0])


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_saved_config_reloads(recipe: str, tmp_path: Path) -> None:
    # what a run saves as <output_dir>/config.yaml loads back to the same config (with a method section and losses)
    cfg = load_config([f"config={recipe}", "teacher.path=/some/local/model", "losses.feature_mse.weight=0.5",
                       "losses.feature_mse.taps=[mid_block]", "losses.output_mse.target=branches"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    again = load_config([f"config={saved}"])
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert type(again).__name__ == type(cfg).__name__ == f"RunConfig_{cfg.method}"
