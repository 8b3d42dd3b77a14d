"""jobs.config: every field validated once at load, errors naming the field, the value and what it should be."""

import dataclasses
import typing

import pytest

from jobs.config import PRESETS, ConfigError, JobConfig, load_config, load_config_dict, model_settings_diff, to_dict


def error(*overrides: str, preset: str | None = "tiny", file=None) -> str:
    """The ConfigError message that loading these settings raises."""
    with pytest.raises(ConfigError) as info:
        load_config(preset, None if file is None else str(file), list(overrides))
    return str(info.value)


# ------------------------------------------------------------------ the cases of issue 10


def test_lr_in_e_notation_is_a_float():
    """The README's own `--set optim.lr=3e-4`: YAML 1.2 reads it as a number (YAML 1.1 read a string)."""
    lr = load_config("tiny", overrides=["optim.lr=3e-4"]).optim.lr
    assert lr == 0.0003 and type(lr) is float


def test_min_lr_ratio_in_e_notation_is_a_float():
    ratio = load_config("tiny", overrides=["optim.min_lr_ratio=1e-2"]).optim.min_lr_ratio
    assert ratio == 0.01 and type(ratio) is float


def test_min_lr_ratio_above_one():
    assert "optim.min_lr_ratio=2: should be less than or equal to 1" in error("optim.min_lr_ratio=2")


def test_ttt_length_not_an_int():
    assert "ttt.length=2.5: should be a valid integer" in error("ttt.length=2.5")


def test_int_from_text():
    assert "optim.epochs='abc': should be a valid integer" in error("optim.epochs=abc")
    assert "optim.epochs='3': should be a valid integer" in error('optim.epochs="3"')  # quoted: text, not a number


def test_export_format_choice():
    assert "export_format='vlm': should be 'vllm', 'sglang' or 'speculators'" in error("export_format=vlm")


def test_betas_not_a_list():
    assert "optim.betas=0.9: should be a list" in error("optim.betas=0.9")


def test_betas_wrong_length():
    assert "optim.betas=[0.9]: should have 2 items, not 1" in error("optim.betas=[0.9]")
    assert "optim.betas=[0.9, 0.95, 0.99]: should have at most 2 items, not 3" in error("optim.betas=[0.9,0.95,0.99]")


def test_beta_out_of_range():
    assert "optim.betas[1]=1.0: should be less than 1" in error("optim.betas=[0.9, 1.0]")


def test_aux_layer_ids_wrong_length():
    assert "target.aux_layer_ids=[1, 2]: should have at least 3 items, not 2" in error("target.aux_layer_ids=[1,2]")


def test_lr_nan():
    assert "optim.lr=nan: should be a finite number" in error("optim.lr=.nan")


def test_inf():
    """No upper bound on draft_temperature: finiteness is what refuses it (checked inside a nested eagle3 config)."""
    assert "ttt.draft_temperature=inf: should be a finite number" in error("ttt.draft_temperature=.inf")


@pytest.mark.parametrize("raw", ["maybe", "1.7", "1", "yes", "on"])
def test_bool_is_true_or_false(raw):
    """Only true/false: not 1, and not YAML 1.1's yes/on (strings in YAML 1.2)."""
    shown = repr(float(raw) if raw == "1.7" else int(raw) if raw == "1" else raw)
    assert f"optim.bf16={shown}: should be 'auto' or true or false" in error(f"optim.bf16={raw}")


def test_grad_clip_negative():
    assert "optim.grad_clip=-1: should be greater than or equal to 0" in error("optim.grad_clip=-1")


def test_negative_int():
    assert "optim.warmup_steps=-3: should be greater than or equal to 0" in error("optim.warmup_steps=-3")


@pytest.mark.parametrize("name", ["../../x", "/abs/run", "a/b", "..", "."])
def test_name_is_one_folder(name):
    msg = error(f"name={name}")
    assert f"name={name!r}: should be a folder name: 1 to 128 letters, digits, '.', '_' or '-'" in msg
    assert "no '/', not '.' or '..'" in msg


def test_name_and_output_dir_accepted(tmp_path):
    cfg = load_config("tiny", overrides=["name=run-1.b_2", f"output_dir={tmp_path}"])
    assert cfg.run_dir == tmp_path / "run-1.b_2"
    assert load_config("tiny", overrides=["output_dir=rel/runs"]).run_dir.is_absolute()


def test_name_that_yaml_reads_as_a_number():
    assert "name=2024: should be a string (quote text" in error("name=2024")
    assert load_config("tiny", overrides=['name="2024"']).name == "2024"


def test_target_choices():
    assert "target.dtype='fp8': should be 'auto', 'float32', 'bfloat16' or 'float16'" in error("target.dtype=fp8")
    assert "target.device='tpu': should be 'auto', 'cpu' or 'cuda'" in error("target.device=tpu")
    assert "target.backend='sglang': should be 'hf' or 'vllm'" in error("target.backend=sglang")


def test_data_path_forms():
    assert "data.path='': expected a path, a glob or a list of them" in error('data.path=""')
    assert "data.path=[]: expected a path, a glob or a list of them" in error("data.path=[]")
    assert load_config("tiny", overrides=["data.path=[a.jsonl, 'b/*.parquet']"]).data.path == ["a.jsonl", "b/*.parquet"]


def test_eval_target_dtype():
    assert load_config("tiny").eval.target_dtype == "float32"
    assert load_config("tiny", overrides=["eval.target_dtype=bfloat16"]).eval.target_dtype == "bfloat16"
    assert "eval.target_dtype='fp8': should be 'float32', 'bfloat16' or 'float16'" in error("eval.target_dtype=fp8")


def test_eval_prompts(tmp_path):
    from jobs.eval import eval_prompts_path
    from jobs.heldout import HELDOUT_PATH

    assert eval_prompts_path(load_config("tiny", overrides=["eval.prompts=heldout"]).eval.prompts) == HELDOUT_PATH
    f = tmp_path / "p.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert load_config("tiny", overrides=[f"eval.prompts={f}"]).eval.prompts == str(f)
    assert (f"eval.prompts='{tmp_path}/nope.jsonl' is not a file; give a .jsonl/.json prompt file, 'heldout' (the "
            "project's held-out prompts) or '' (the records after the training data)") in error(
                f"eval.prompts={tmp_path}/nope.jsonl")


def test_several_wrong_fields_in_one_message():
    msg = error("optim.lr=-1", "ttt.length=0", "eval.method=beam")
    assert msg.splitlines() == ["invalid config:",
                                "  ttt.length=0: should be greater than or equal to 1",
                                "  optim.lr=-1: should be greater than 0",
                                "  eval.method='beam': should be 'chain' or 'tree'"]


def test_cross_field_check_of_post_init():
    assert "ttt.survival_weights only applies to ttt.token_feedback=draft" in error("ttt.survival_weights=true")


# ------------------------------------------------------------------ keys, presets, --set, files


def test_unknown_key():
    msg = error("optim.lrr=1")
    assert "unknown key 'optim.lrr' (= 1); known keys of optim: lr, min_lr_ratio, warmup_steps" in msg
    assert "unknown key 'bogus' (= 1); known keys at the top level: name, output_dir" in error("bogus=1")


def test_section_not_a_mapping():
    assert "optim=3: should be a section, a mapping of lr, min_lr_ratio" in error("optim=3")
    assert "--set optim.lr.x: optim.lr is not a section" in error("optim.lr.x=1")


def test_unknown_preset():
    assert error(preset="nope") == ("unknown preset 'nope'; choose one of tiny, smollm2-sharegpt-cpu, "
                                    "smollm2-sharegpt-cpu-official, smollm2-sharegpt-cpu-1h, smollm2-sharegpt-cpu-draft, "
                                    "llama3-8b-8gpu")


def test_set_without_equals():
    assert "--set 'optim.lr': expected section.field=value, e.g. --set optim.lr=3e-4" in error("optim.lr")


def test_set_value_not_yaml():
    msg = error("name=[x")
    assert "--set 'name=[x': the value is not valid YAML at line 1, column 3: expected ',' or ']'" in msg


def test_set_yaml_1_2_scalars():
    cfg = load_config("tiny", overrides=["tracking.experiment=no", "optim.epochs=010", "tracking.uri="])
    assert cfg.tracking.experiment == "no" and cfg.optim.epochs == 10 and cfg.tracking.uri == ""


def test_yaml_file_is_yaml_1_2(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  min_lr_ratio: 1e-2\n  betas: [0.8, 0.9]\ntracking:\n  experiment: on\n")
    cfg = load_config("tiny", str(path))
    assert (cfg.optim.lr, cfg.optim.min_lr_ratio, cfg.optim.betas) == (3e-4, 0.01, (0.8, 0.9))
    assert cfg.tracking.experiment == "on"


def test_yaml_file_missing(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error(file=path) == f"--config {path}: cannot read it (No such file or directory)"


def test_yaml_file_a_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- optim\n- ttt\n")
    assert error(file=path) == (f"--config {path}: expected a mapping of sections (e.g. `optim: {{lr: 3.0e-4}}`), "
                                "got a list: ['optim', 'ttt']")


def test_yaml_file_a_scalar(tmp_path):
    path = tmp_path / "scalar.yaml"
    path.write_text("3e-4\n")
    assert error(file=path).startswith(f"--config {path}: expected a mapping of sections")


def test_yaml_file_malformed(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1\n   warmup_steps: 3\n")
    assert error(file=path).startswith(f"--config {path}: malformed YAML at line 3, column ")


def test_yaml_file_bad_value_names_the_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  bf16: no\n")  # YAML 1.1 read false; 1.2 reads the string 'no'
    assert "optim.bf16='no': should be 'auto' or true or false" in error(file=path)


# ------------------------------------------------------------------ positive: presets, round trip, frozen


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_and_round_trips(preset):
    cfg = load_config(preset)
    assert load_config_dict(to_dict(cfg)) == cfg


def test_load_config_dict_validates():
    d = to_dict(load_config("tiny"))
    d["ttt"]["length"] = 2.5
    with pytest.raises(ConfigError, match=r"ttt\.length=2\.5: should be a valid integer"):
        load_config_dict(d)
    with pytest.raises(ConfigError, match="a config must be a mapping of sections, got a list"):
        load_config_dict([])


def test_configs_stay_frozen_dataclasses():
    cfg = load_config("tiny")
    assert type(cfg) is JobConfig and dataclasses.is_dataclass(cfg.ttt)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_every_number_field_declares_its_range():
    """Each int/float field of every section says which values it takes (Annotated[..., Ge(0)] and the like)."""

    def bare_number(t) -> bool:  # int or float without Annotated metadata, alone or in a union (Optional)
        if typing.get_origin(t) is typing.Annotated:
            return False
        return t in (int, float) or any(bare_number(a) for a in typing.get_args(t))

    def numbers_without_metadata(cls, where=""):
        for f in dataclasses.fields(cls):
            t = typing.get_type_hints(cls, include_extras=True)[f.name]
            if dataclasses.is_dataclass(t):
                yield from numbers_without_metadata(t, f"{where}{f.name}.")
            elif bare_number(t):
                yield where + f.name

    assert list(numbers_without_metadata(JobConfig)) == []


# ------------------------------------------------------------------ model_settings_diff


def test_model_settings_diff_lists_model_changes():
    base = to_dict(load_config("tiny"))
    changed = to_dict(load_config("tiny", overrides=[
        "optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "ttt.length=4", "ttt.token_feedback=draft", "data.max_length=128",
        "data.regen_temperature=0.5", "draft.vocab_size=1000", "target.dtype=bfloat16", "trainer.num_workers=2",
        "export_format=sglang"]))
    assert model_settings_diff(base, changed) == [
        "data.max_length", "data.regen_temperature", "draft.vocab_size", "export_format", "optim.betas", "optim.lr",
        "target.dtype", "trainer.num_workers", "ttt.length", "ttt.token_feedback"]


def test_model_settings_diff_ignores_resumable_changes():
    """Extending the run, changing how it computes or where it runs and what it logs is a legitimate resume."""
    base = to_dict(load_config("tiny"))
    changed = to_dict(load_config("tiny", overrides=[
        "optim.max_steps=100", "optim.epochs=3", "optim.max_target_tokens=10000", "optim.bf16=true",
        "ttt.attention_kernel=chunked", "ttt.grad_checkpoint=true", "data.on_bad_record=error", "target.num_actors=2",
        "target.backend=vllm", "trainer.checkpoint_every=10", "tracking.uri=http://x:5000", "eval.enabled=true",
        "faults.crash_worker_at_step=3", "output_dir=elsewhere"]))
    assert model_settings_diff(base, changed) == []
    assert model_settings_diff(base, base) == []


def test_model_settings_diff_counts_a_key_on_one_side():
    base = to_dict(load_config("tiny"))
    old = {**base, "ttt": {k: v for k, v in base["ttt"].items() if k != "step_decay"}}
    assert model_settings_diff(old, base) == ["ttt.step_decay"]
