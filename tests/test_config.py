"""The configuration contract: --key=value, YAML defaults, --help, type checks."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from selfexplain.config import constant_comments, make_config, module_constants, parse_argv
from selfexplain.errors import UserError

DEFAULTS = {"TOP_K": 20, "LR": 1e-3, "OUT_DIR": "runs/x", "RESUME": False, "ONLY": None, "SIZES": [1, 2]}


def test_keys_are_case_insensitive_and_values_parse_as_literals():
    cfg = make_config(DEFAULTS, {"top_k": "32", "Lr": "0.5", "resume": "True", "only": "[1, 2]"})
    assert cfg.TOP_K == 32 and cfg.LR == 0.5 and cfg.RESUME is True and cfg.ONLY == [1, 2]


def test_a_switch_takes_yes_no_on_off_and_1_0_as_a_shell_user_writes_them():
    for word, value in (("yes", True), ("No", False), ("on", True), ("OFF", False), ("1", True), ("0", False)):
        assert make_config(DEFAULTS, {"resume": word}).RESUME is value
    for bad in ("2", "maybe", "0.5"):
        with pytest.raises(UserError, match="RESUME expects True or False"):
            make_config(DEFAULTS, {"resume": bad})


def test_a_mistyped_choice_names_the_choices_and_the_closest_one():
    from selfexplain.data import dataset_spec
    from selfexplain.llm_backends import make_backend

    with pytest.raises(UserError, match=r"BACKEND must be one of auto, replicate, openai, offline, got 'offlne'; "
                                        r"did you mean 'offline'\?"):
        make_backend("offlne", "")
    with pytest.raises(UserError, match=r"DATASET must be one of .*got 'tu_berlin'; did you mean 'tu-berlin'"):
        dataset_spec("tu_berlin", None, 64)
    with pytest.raises(UserError, match=r"got 'xyz'$"):  # nothing close: no guess
        make_backend("xyz", "")
    import train_sae

    with pytest.raises(UserError, match=r"ARCH must be one of topk, batchtopk, got 'batchtop'; did you mean "):
        train_sae.main(arch="batchtop")  # refused before any checkpoint is read
    with pytest.raises(UserError, match=r"DEAD_LATENTS must be one of .*did you mean 'auxk'"):
        train_sae.main(dead_latents="aux_k")


def test_a_choice_in_other_case_is_read_as_that_choice():
    """Keys were case-blind and values not: --arch=BatchTopK (the paper's spelling) was refused."""
    import train_sae

    cases = {"train_sae": (("arch", "BatchTopK", "batchtopk"), ("dead_latents", "AuxK", "auxk"),
                           ("init", "Channels", "channels")),
             "train_standard_cnn": (("dataset", "Synthetic", "synthetic"), ("synthetic_style", "VARIED", "varied")),
             "sae_summary_to_llm": (("backend", "OpenAI", "openai"), ("image_input", "None", "none")),
             "why_did_you": (("agg", "Max", "max"),)}
    for script, settings in cases.items():  # each script alone: its own imports must register its choices
        code = (f"import {script} as s; from selfexplain.config import make_config, module_constants; "
                f"print([make_config(module_constants(vars(s)), {{k: v}})[k.upper()] for k, v, _ in {settings!r}])")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == repr([meant for _, _, meant in settings]), script
    with pytest.raises(UserError, match=r"ARCH must be one of topk, batchtopk, got 'batch'"):  # still checked
        make_config(module_constants(vars(train_sae)), {"ARCH": "batch"})


def test_settings_are_the_constants_a_script_assigns_itself():
    """why_did_you imports config.BOOL_WORDS: --help listed it and main(bool_words=[]) was a type error."""
    import why_did_you

    assert "BOOL_WORDS" not in module_constants(vars(why_did_you)) and "IMAGE" in module_constants(vars(why_did_you))
    with pytest.raises(UserError, match="unknown setting 'bool_words'"):
        why_did_you.main(bool_words=[])
    assert "BOOL_WORDS" in module_constants({"BOOL_WORDS": {}})  # no source file (a notebook's globals): all of them


def test_a_text_setting_refuses_an_object_that_is_not_text(tmp_path):
    assert make_config(DEFAULTS, {"out_dir": tmp_path}).OUT_DIR == str(tmp_path)  # a Path is text
    with pytest.raises(UserError, match="OUT_DIR expects text \\(a string or a path\\), got a dict"):
        make_config(DEFAULTS, {"out_dir": {"a": 1}})


def test_string_settings_keep_raw_text():
    assert make_config(DEFAULTS, {"out_dir": "123"}).OUT_DIR == "123"


def test_int_accepted_for_float_but_not_string_for_int():
    assert make_config(DEFAULTS, {"lr": 1}).LR == 1.0
    with pytest.raises(UserError, match="TOP_K expects int"):
        make_config(DEFAULTS, {"top_k": "many"})


def test_none_is_refused_where_the_default_is_not_none(tmp_path):
    """`--epochs=None` or an empty YAML key was a TypeError traceback from deep inside a stage."""
    with pytest.raises(UserError, match="TOP_K expects int, got None"):
        make_config(DEFAULTS, {"top_k": None})
    path = tmp_path / "c.yaml"
    path.write_text("lr:\n")
    with pytest.raises(UserError, match="LR expects float, got None"):
        make_config(DEFAULTS, parse_argv([f"--config={path}"])[0])
    assert make_config({"LIMIT": None}, {"limit": None}).LIMIT is None  # a None default takes None


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError) as err:
        make_config(DEFAULTS, {"topk": 3})
    assert "top_k" in str(err.value) and "out_dir" in str(err.value)


def test_yaml_supplies_defaults_and_command_line_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("top_k: 8\nlr: 0.1\n")
    overrides, wants_help = parse_argv([f"--config={path}", "--TOP_K=16"])
    cfg = make_config(DEFAULTS, overrides)
    assert not wants_help and cfg.TOP_K == 16 and cfg.LR == 0.1


def test_missing_yaml_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_argv([f"--config={tmp_path / 'nope.yaml'}"])


def test_comments_are_read_from_the_constants_block():
    src = 'TOP_K = 20  # active latents\nOUT_DIR = "x"   # where things go\nx = 1\n'
    assert constant_comments(src) == {"TOP_K": "active latents", "OUT_DIR": "where things go"}


def test_module_constants_skip_private_and_non_plain():
    ns = {"A": 1, "_B": 2, "C": object(), "lower": 3, "D": "s"}
    assert module_constants(ns) == {"A": 1, "D": "s"}


def test_cli_help_bad_key_and_effective_config(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "train_standard_cnn.py", *a], capture_output=True, text=True)
    helped = run("--help")
    assert helped.returncode == 0 and "--image_size" in helped.stdout and "multiple of 32" in helped.stdout
    bad = run("--imagesize=64")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "unknown setting 'imagesize'; did you mean 'image_size'?" in bad.stderr
    wrong = run("--epochs=two")
    assert wrong.returncode == 2 and "EPOCHS expects int" in wrong.stderr


def test_scripts_import_without_side_effects(tmp_path):
    code = ("import os; import train_standard_cnn, train_sae, sae_summarize, sae_summary_to_llm, why_did_you; "
            "print(sorted(os.listdir('.')))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


def test_a_value_after_a_space_and_a_repeated_key_are_refused():
    from selfexplain.config import parse_argv

    overrides, _ = parse_argv(["--overlay", "--resume"])           # `--overlay why.png`: the value went astray
    with pytest.raises(UserError, match="OVERLAY needs a value: --overlay=VALUE"):
        make_config({"OVERLAY": "", "RESUME": False}, overrides)
    assert make_config({"OVERLAY": "", "RESUME": False}, {"resume": True}).RESUME is True  # yes/no flags stay bare
    with pytest.raises(UserError, match="--image is given twice"):
        parse_argv(["--image=test:0", "--IMAGE=test:1"])


def _run_cli_exit(main, capsys) -> tuple[int, str]:
    from selfexplain.config import run_cli

    with pytest.raises(SystemExit) as stop:
        run_cli(main, {"__name__": "t", "__file__": "t.py"}, [])
    return stop.value.code, capsys.readouterr().err


def test_environment_errors_and_sigterm_end_in_one_line(capsys):
    def unwritable():
        raise PermissionError(13, "Permission denied", "/ro/report/neurons.jsonl")

    def terminated():
        raise SystemExit(143)  # what distributed.exit_on_sigterm raises

    code, err = _run_cli_exit(unwritable, capsys)
    assert code == 2 and err == "t.py: error: Permission denied: /ro/report/neurons.jsonl\n"
    code, err = _run_cli_exit(terminated, capsys)
    assert code == 143 and err == "terminated\n"


def test_a_reader_that_leaves_the_pipe_gets_no_traceback():
    code = ("import sys; sys.path.insert(0, '.')\n"
            "from selfexplain.config import run_cli\n"
            "def main():\n    for _ in range(200000): print('x' * 100)\n"
            "run_cli(main, {'__name__': 't', '__file__': 't.py'}, [])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # `| head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and "Traceback" not in err


@pytest.mark.parametrize("script, bad", [
    ("train_standard_cnn", {"seed": -1}), ("train_standard_cnn", {"lr": -1.0}),
    ("train_standard_cnn", {"label_smoothing": 2.0}), ("train_standard_cnn", {"weight_decay": -0.1}),
    ("train_sae", {"seed": -1}), ("train_sae", {"threshold_rate": 5.0}), ("train_sae", {"auxk_coef": -1.0}),
    ("train_sae", {"warmup_fraction": 2.0}), ("sae_summarize", {"top_classes": -1}),
    ("sae_summarize", {"anti_classes": -2}), ("sae_summarize", {"heat_alpha": 5.0}),
    ("sae_summarize", {"max_per_class": -3}),  # session 23: it summarised every image
])
def test_out_of_range_settings_are_one_line_errors_naming_them(script, bad, tmp_path):
    """A negative SEED was a traceback after the token pass; TOP_CLASSES=-1 a Python slice; HEAT_ALPHA=5 a
    uint8 overflow in the thumbnails."""
    import importlib

    stage = importlib.import_module(script)
    name = next(iter(bad)).upper()
    with pytest.raises(UserError, match=f"^{name} must be|LR > 0"):
        stage.main(out_dir=str(tmp_path / "out"), **bad)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_list_setting_takes_a_bare_comma_list(tmp_path):
    """--baselines=[pca,channels] read as ['[pca,channels]'] and was refused; only Python quoting worked."""
    from selfexplain.config import coerce, parse_argv

    overrides, _ = parse_argv(["--baselines=[pca,channels]"])
    assert coerce("BASELINES", overrides["baselines"], ["channels"]) == ["pca", "channels"]
    assert coerce("BASELINES", "nmf", ["channels"]) == ["nmf"] and coerce("SWEEP_K", "[4, 8]", [8]) == [4, 8]
    assert coerce("BASELINES", parse_argv(["--baselines=[]"])[0]["baselines"], ["channels"]) == []


def test_a_yaml_file_naming_a_setting_twice_is_refused(tmp_path):
    from selfexplain.config import load_yaml_overrides

    path = tmp_path / "my.yaml"
    path.write_text("EPOCHS: 1\nepochs: 2\n")
    with pytest.raises(UserError, match="sets epochs twice"):
        load_yaml_overrides(str(path))


def test_the_precision_amp_chose_is_named_and_fp16_on_a_cpu_warned():
    import torch

    from selfexplain.distributed import precision_note

    cpu = torch.device("cpu")
    assert precision_note(cpu, "off") == "precision fp32 (AMP=off)"
    assert precision_note(cpu, "bf16") == "precision bf16 (AMP=bf16)"
    assert "warning: fp16 autocast on a CPU" in precision_note(cpu, "fp16")
    assert precision_note(cpu, "auto").startswith(("precision bf16 (AMP=auto)", "precision fp32 (AMP=auto)"))
