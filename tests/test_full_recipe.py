"""Notebook 03: the card's recipe, the accelerate configs, the calculator, the estimator, a 2-process CPU run."""

import json
import re
import subprocess
import sys

import pytest

from utils import DATA_DIR, REPO_ROOT, scaling
from utils.hardware import PROFILES
from utils.recipe import resolve

FULL = str(REPO_ROOT / "configs" / "sft_full.yaml")
CARD = REPO_ROOT.parent / "shared" / "seed" / "mistral-7b-sft-beta_model_card.md"
REFERENCE = json.loads((DATA_DIR / "card_reference.json").read_text())
MEASURED = DATA_DIR / "measurements" / "h200_qlora.json"


def card_hyperparameters() -> dict:
    """The model card's "Training hyperparameters" list, or the reference file where the card is not beside us."""
    if not CARD.is_file():
        return {k: str(v) for k, v in REFERENCE["hyperparameters"].items()}
    section = CARD.read_text().split("### Training hyperparameters")[1].split("###")[0]
    return dict(re.findall(r"^- (\w+): (.+)$", section, flags=re.M))


def test_reference_file_matches_the_card():
    if not CARD.is_file():
        pytest.skip(f"model card not found at {CARD}")
    card = card_hyperparameters()
    ref = REFERENCE["hyperparameters"]
    for key, text in card.items():
        assert str(ref[key]) == text or float(ref[key]) == float(text), key
    assert "Loss: 0.9399" in CARD.read_text() and REFERENCE["final_eval_loss"] == 0.9399
    assert "| 0.9367        | 0.67  | 272  | 0.9397          |" in CARD.read_text()
    assert REFERENCE["training_results"] == [
        {"training_loss": 0.9367, "epoch": 0.67, "step": 272, "validation_loss": 0.9397}
    ]


def test_full_recipe_has_every_card_value():
    card = card_hyperparameters()
    script_args, args, model_args, run_args = resolve(["--config", FULL], None).build()
    devices = int(card["num_devices"])
    assert args.learning_rate == float(card["learning_rate"])
    assert args.per_device_train_batch_size == int(card["train_batch_size"])
    assert args.per_device_eval_batch_size == int(card["eval_batch_size"])
    assert args.seed == int(card["seed"])
    assert args.gradient_accumulation_steps == int(card["gradient_accumulation_steps"])
    assert run_args.global_batch_size == int(card["total_train_batch_size"])
    assert args.per_device_train_batch_size * devices * args.gradient_accumulation_steps == run_args.global_batch_size
    assert args.per_device_eval_batch_size * devices == int(card["total_eval_batch_size"])
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert "betas=(0.9,0.999) and epsilon=1e-08" in card["optimizer"]
    assert args.lr_scheduler_type == card["lr_scheduler_type"] == "cosine"
    assert args.warmup_steps == float(card["lr_scheduler_warmup_ratio"])
    assert args.num_train_epochs == int(card["num_epochs"])
    # what the handbook's full recipe adds
    assert model_args.use_peft is False and model_args.load_in_4bit is False and model_args.dtype == "bfloat16"
    assert (args.max_length, args.packing, args.activation_checkpointing) == (2048, True, True)
    assert args.eval_strategy == "epoch" and script_args.dataset_test_split == "test"


@pytest.mark.parametrize("gpus, per_device, accumulation", [(16, 8, 4), (8, 8, 8), (2, 4, 64), (1, 8, 64)])
def test_accumulation_keeps_512(gpus, per_device, accumulation):
    assert scaling.accumulation_for(512, gpus, per_device) == accumulation


def test_accumulation_rejects_what_cannot_divide():
    with pytest.raises(ValueError, match="not a multiple of 8 per device x 3 GPUs = 24"):
        scaling.accumulation_for(512, 3, 8)


def test_global_batch_sets_accumulation_from_world_size():
    from utils.hardware import GPU_PROFILES, shape
    from utils.recipe import resolve

    settings = resolve(["--config", FULL], GPU_PROFILES[-1], shape("h100").hardware(), processes=8)
    assert settings.values["per_device_train_batch_size"] == 8  # the card's (the recipe's), not the profile's 4
    assert settings.values["gradient_accumulation_steps"] == 8  # 8 per device x 8 GPUs x 8 = 512
    assert settings.sources["gradient_accumulation_steps"] == "recipe"  # from its global_batch_size


def test_steps_per_epoch():
    assert scaling.steps_per_epoch(512, 512) == 1
    assert scaling.steps_per_epoch(513, 512) == 2
    assert scaling.steps_per_epoch(139_264, 512) == 272


def test_model_states_reproduce_the_zero_paper():
    """Rajbhandari et al. 2020, Fig. 1: 7.5B parameters, 64 GPUs, K=12."""
    gb = lambda parts: round(sum(parts) / 1e9, 1)  # noqa: E731
    psi = 7_500_000_000
    assert gb(scaling.model_states_bytes(psi, "ddp", 64)) == 120.0
    assert gb(scaling.model_states_bytes(psi, "zero1", 64)) == 31.4
    assert gb(scaling.model_states_bytes(psi, "zero2", 64)) == 16.6
    assert gb(scaling.model_states_bytes(psi, "zero3", 64)) == 1.9


@pytest.mark.parametrize(
    "strategy, gpus, gb, fits",
    [
        ("zero3", 8, 80, True),  # the alignment-handbook's 8 x A100 80GB
        ("ddp", 8, 80, False),  # 16 bytes/parameter on every GPU
        ("zero3", 16, 24, True),
        ("zero3", 8, 16, False),
        ("zero3_offload", 8, 16, False),  # 15.9 GiB: more than the 14.7 GiB a "16 GB" T4 has
        ("zero3_offload", 8, 24, True),
        ("fsdp", 8, 40, True),
        ("fsdp", 4, 40, False),  # 39.5 GiB: over the 39.4 GiB an A100 40GB has
        ("zero2", 2, 40, False),
    ],
)
def test_fit_verdicts(strategy, gpus, gb, fits):
    assert scaling.estimate(strategy, gpus, gb, per_device_batch=8).fits is fits


def test_fit_compares_gib_with_gib():
    """A "16 GB" GPU reports 14.7 GiB: the fit table's columns say so, and the CUDA reserve has its own column."""
    table = scaling.fit_table()
    row = table[(table.strategy == "zero3_offload") & (table.gpus == 8)].iloc[0]
    assert row["GiB per GPU"] == pytest.approx(15.9, abs=0.05) and row["16 GB (14.7 GiB)"] == "-"
    assert row["reserve"] == scaling.RESERVE_GIB and row["activations"] < row["GiB per GPU"] - row["reserve"]


def test_estimate_parts():
    e = scaling.estimate("zero3", 8, 80, per_device_batch=8)
    assert e.weights == pytest.approx(2 * 7_241_732_096 / 8 / 2**30)
    assert e.optimizer == pytest.approx(6 * e.weights)
    assert 8 < e.activations < 12 and e.total == pytest.approx(26.0, abs=0.1)
    table = scaling.fit_table()
    assert len(table) == len(scaling.STRATEGIES) * 5
    assert table[(table.strategy == "ddp")]["80 GB (79.1 GiB)"].eq("-").all()


@pytest.mark.parametrize(
    "name, kind, processes, machines",
    [
        ("deepspeed_zero3.yaml", "DEEPSPEED", 8, 1),
        ("deepspeed_zero3_2nodes.yaml", "DEEPSPEED", 16, 2),
        ("fsdp.yaml", "FSDP", 8, 1),
        ("ddp.yaml", "MULTI_GPU", 2, 1),
    ],
)
def test_accelerate_configs_load(name, kind, processes, machines):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate" / name))
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == (kind, processes, machines)
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 3
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "MistralDecoderLayer"


def test_two_process_cpu_run(tmp_path):
    out = tmp_path / "full"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "utils.sft",
            "--config",
            FULL,
            "--profile",
            "smoke",
            "--output_dir",
            str(out),
            "--max_steps",
            "4",
            "--save_steps",
            "2",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [json.loads(p.read_text()) for p in sorted((out / "rank_logs").glob("rank*.json"))]
    assert [(log["rank"], log["world_size"], log["global_step"]) for log in logs] == [(0, 2, 4), (1, 2, 4)]
    assert logs[0]["losses"] == logs[1]["losses"] and len(logs[0]["losses"]) == 4
    assert "[rank 1/2] step 4 loss" in result.stdout and "[rank 0/2] step 4 loss" in result.stdout
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "model" / "model.safetensors").is_file()
    assert result.stdout.count("done: 4 steps") == 1  # only rank 0 reports
    assert result.stdout.count("Profile: smoke") == 1  # and says which profile it chose


def test_the_recipe_resolves_in_a_child_process_the_same():
    """Kaggle's 2 x T4 path: importing TRL imports bitsandbytes, which initialises CUDA, after which
    notebook_launcher cannot fork; notebook 03 reads the recipe through a child process, and must see the same."""
    from utils.plan import plan_in_child
    from utils.recipe import resolve

    argv = ["--config", FULL, "--profile", "smoke"]
    child = plan_in_child(argv)
    here = resolve(argv, PROFILES["smoke"]).to_json()
    assert child["settings"] == here["settings"] and child["profile"] == "smoke"
    assert (child["settings"]["learning_rate"]["value"], child["settings"]["global_batch_size"]["value"]) == (
        5e-3,
        None,
    )  # the smoke profile's scale stands in for the card's
    card = plan_in_child(["--config", FULL], gpu="h100")["settings"]
    assert (card["learning_rate"]["value"], card["lr_scheduler_type"]["value"], card["global_batch_size"]["value"]) == (
        2e-5,
        "cosine",
        512,
    )


@pytest.mark.parametrize("every", [1, 2, 0])
def test_qlora_memory_estimate_is_within_15_percent_of_the_h200_measurements(every):
    parts = scaling.qlora_memory(every)
    assert list(parts) == ["weights", "LoRA gradients", "optimizer", "activations"]
    measured = scaling.measured_qlora_gib()[every]
    assert abs(sum(parts.values()) - measured) / measured < 0.15
    assert scaling.lora_parameters() == 41_943_040  # r16 on all 7 projections of 32 layers


@pytest.mark.parametrize("device", ["NVIDIA H200", "NVIDIA H100 80GB HBM3"])
def test_the_memory_plot_names_the_gpu_the_file_was_measured_on(device, monkeypatch):
    """Notebook 02's figure: each bar per GPU profile, and the measurement labelled by the file's own device."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.setattr(scaling, "h200_measurements", lambda: {**json.loads(MEASURED.read_text()), "device": device})
    fig = scaling.plot_qlora_memory()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[-1] == "80 GB and more (A100/H100 80GB, H200):\nno activation checkpointing" and len(labels) == 4
    notes = [t.get_text() for t in ax.texts]
    assert notes[-1] == f"69.2 GiB estimated,\n68.4 GiB measured on the {device}"
    assert all(note.endswith(f"measured on the {device}") for note in notes) and len(notes) == 4
    assert f"measured on one {device}" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_zero_table_is_split_into_parts():
    table = scaling.fit_table()
    row = table[(table.strategy == "zero3") & (table.gpus == 8)].iloc[0]
    assert row["weights"] + row["gradients"] + row["optimizer"] + row["activations"] + row["reserve"] == pytest.approx(
        row["GiB per GPU"], abs=0.2
    )


def test_one_ultrachat_reference_and_the_estimate_as_its_check():
    """Notebook 03 counts steps on the reference size of ultrachat_200k (the card's packed rows): the card's trainer
    stops there at the card's step and epoch; TRL 1.x steps on the last, incomplete global batch too (one more step,
    the only reason two counts appear). The offline estimate from the dataset's published size is 5% over: a check."""
    from utils import card_era
    from utils.hardware import ULTRACHAT_PACKED_ROWS, ULTRACHAT_TOKENS

    dialogues, point = REFERENCE["schedule"]["train_dialogues"], REFERENCE["training_results"][0]
    card = card_era.card_run(ULTRACHAT_PACKED_ROWS, dialogues)
    assert (card.optimizer_steps, round(card.epoch, 2)) == (point["step"], point["epoch"]) == (272, 0.67)
    assert ULTRACHAT_TOKENS == ULTRACHAT_PACKED_ROWS * 2048 and round(ULTRACHAT_TOKENS / 1e6, 1) == 285.6
    assert (scaling.steps_per_epoch(ULTRACHAT_PACKED_ROWS, 512), ULTRACHAT_PACKED_ROWS % 512) == (273, 192)
    estimate = scaling.ULTRACHAT_PACKED_ESTIMATE
    assert card_era.card_run(estimate, dialogues).optimizer_steps == 286  # docs/card_era.md's ~286
    assert scaling.steps_per_epoch(estimate, 512) == 287  # the same rows counted TRL 1.x's way


def test_the_memory_figure_stacks_what_must_fit_against_what_a_gpu_reports():
    """Each bar is every part of the estimate, the CUDA reserve too; the dotted lines are at the GiB a GPU of each
    size class reports (utils.hardware.SHAPES), not at its GB."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import to_hex

    from utils.hardware import SHAPES

    fig = scaling.plot_full_memory(per_device_batch=8, gpus=8)
    bars, lines = fig.axes[:2]
    ends: dict[float, float] = {}
    for patch in bars.patches:
        row = round(patch.get_y() + patch.get_height() / 2, 3)
        ends[row] = max(ends.get(row, 0.0), patch.get_x() + patch.get_width())
    totals = [scaling.estimate(s, 8, 0, per_device_batch=8).total for s in scaling.STRATEGIES]
    assert [round(ends[row], 1) for row in sorted(ends)] == pytest.approx([round(t, 1) for t in totals], abs=0.15)
    reserve = [p.get_width() for p in bars.patches if to_hex(p.get_facecolor()) == scaling.PARTS["reserve"].lower()]
    assert reserve == [scaling.RESERVE_GIB] * len(scaling.STRATEGIES)
    assert "CUDA reserve (2.5 GiB)" in [t.get_text() for t in bars.get_legend().get_texts()]
    capacities = [SHAPES[name].memory_gib for name in ("t4", "l4", "a100-40gb", "h100")]
    assert capacities == [14.7, 22.5, 39.4, 79.1]
    assert [line.get_xdata()[0] for line in bars.lines] == capacities
    assert [line.get_ydata()[0] for line in lines.lines if list(line.get_xdata()) == [0, 1]] == capacities
    assert {"16 GB:\n14.7 GiB", "80 GB:\n79.1 GiB"} <= {t.get_text() for t in lines.texts}
