"""One place that turns a recipe file, a hardware profile and the command line into a run's settings, and says where
each value came from.

Order, lowest first: TRL's defaults < the hardware profile < the recipe file < the command line. A GPU profile fills
only what neither the recipe nor the command line set: a batch written in the recipe stays the recipe's. The
embedded default (profile ``smoke``) is the one exception: it stands in for the recipe's 7B model and its data, so
its model, data, precision and scale replace the recipe's (the command line still wins).

    settings = resolve(["--config", "configs/sft_qlora.yaml", "--max_steps", "10"])
    settings.sources["learning_rate"]                    # "recipe"
    script_args, training_args, model_args, run_args = settings.build()   # TRL's dataclasses

Resolving creates no TRL dataclass and touches no GPU: ``--plan`` uses it for GPUs this machine does not have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from utils import ConfigError
from utils.hardware import HUB_DATASET, Hardware, Profile

DEFAULT, PROFILE, RECIPE, CLI = "default", "profile", "recipe", "command line"
SECRETS = ("hub_token",)  # never printed or written
MISTRAL_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped", "card")  # TRL's, and the card's (TRL 0.7.x's, utils.card_era)
POSITIVE = (
    "max_length",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "logging_steps",
    "save_steps",
    "learning_rate",
)


@dataclass
class RunArguments:
    """Options of this collection that TRL's dataclasses do not have."""

    profile: str = field(default="auto", metadata={"help": "auto, smoke, or a GPU profile (utils/hardware.py)"})
    merge: bool = field(default=True, metadata={"help": "merge the adapter into a 16-bit base after training"})
    global_batch_size: int | None = field(
        default=None, metadata={"help": "sequences per optimizer step over all GPUs; sets the accumulation (card: 512)"}
    )
    fresh: bool = field(default=False, metadata={"help": "start over in output_dir, removing its earlier run"})
    card_schedule: bool = field(
        default=False,
        metadata={
            "help": "the card's schedule: plan the cosine over the steps transformers 4.35 planned from the "
            "dialogue count, as under TRL 0.7.x (batches per process // accumulation), and stop when the packed data "
            "ends (272 of 406 for the card; exactly so with packing_strategy card)"
        },
    )
    dataset_revision: str = field(default="main", metadata={"help": "Hub dataset commit or tag to prepare"})


class Args(NamedTuple):
    """TRL's argument objects for one run (and ours): ``script, training, model, run = args`` unpacks them."""

    script: Any  # trl.ScriptArguments: the dataset and its splits
    training: Any  # trl.SFTConfig
    model: Any  # trl.ModelConfig: model, 4-bit quantization, LoRA
    run: RunArguments


@dataclass
class Settings:
    """A run's settings by field name, where each came from, and the profile, world size and machine they are for."""

    values: dict[str, Any]
    sources: dict[str, str]
    profile: Profile | None
    world_size: int = 1
    notes: list[str] = field(default_factory=list)  # adjustments worth a line (a capped length, evaluation off)
    hardware: Hardware | None = None

    def to_json(self) -> dict:
        """``{"profile": NAME, "settings": {FIELD: {"value": V, "from": SOURCE}}}``, enums by their value."""

        def plain(name: str) -> Any:
            value = getattr(self.values[name], "value", self.values[name])
            if name in SECRETS and value:
                return "<set>"
            return value if isinstance(value, str | int | float | bool | list | dict | type(None)) else str(value)

        return {
            "profile": self.profile.name if self.profile else None,
            "settings": {k: {"value": plain(k), "from": s} for k, s in sorted(self.sources.items())},
        }

    def fields(self, kind) -> dict[str, Any]:
        """The values that are fields of the dataclass ``kind``, to build ``kind(**settings.fields(kind))``."""
        names = {f.name for f in dataclasses.fields(kind) if f.init}
        return {k: v for k, v in self.values.items() if k in names}

    def build(self) -> Args:
        """TRL's ScriptArguments, SFTConfig and ModelConfig, and our RunArguments, from these values.

        Creating an ``SFTConfig`` picks its device, which initialises CUDA (transformers 5.24 ``_setup_devices``):
        call it in the process that trains, after ``accelerate.notebook_launcher`` has forked.
        """
        args = Args(*(kind(**self.fields(kind)) for kind in _argument_classes()))
        if isinstance(args.model.lora_target_modules, str):  # ModelConfig turns a one-item list into a string
            args.model.lora_target_modules = [args.model.lora_target_modules]
        return args


def _argument_classes() -> tuple:
    from trl import ModelConfig, ScriptArguments, SFTConfig

    return ScriptArguments, SFTConfig, ModelConfig, RunArguments


def _parser():
    """TRL's parser over the four argument classes, raising ConfigError (one line) instead of printing usage."""
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message: str):
            raise ConfigError(message.strip().splitlines()[-1])

    parser = Parser(_argument_classes())
    for action in (a for a in parser._actions if a.dest == "packing_strategy" and a.choices):
        action.choices = [*action.choices, "card"]  # the card's packing (utils.training.pack_like_the_card)
    return parser


# --- the recipe file and the command line ------------------------------------------------------------------------
def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the ``--config`` file, the remaining arguments)."""
    rest, path, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            path, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return path, rest


def _cli_value(cli: list[str], name: str) -> str | None:
    for i, arg in enumerate(cli):
        if arg == f"--{name}" and i + 1 < len(cli):
            return cli[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def read_recipe(name: str) -> dict[str, Any]:
    """The recipe file's ``field: value`` mapping, or ConfigError naming the file and what is wrong with it."""
    import yaml

    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"config file {name} not found")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"config file {name} is not valid YAML{where}: {problem}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config file {name} must hold 'field: value' lines, got {type(content).__name__}")
    content.pop("env", None)  # TRL's parser sets these environment variables; they are not settings
    return content


def world_size() -> int:
    """Processes in this run, as torchrun, accelerate and notebook_launcher announce it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate/notebook_launcher run (from its environment), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


# --- resolving -----------------------------------------------------------------------------------------------------
def resolve(
    argv: list[str],
    profile: Profile | str | None = "auto",
    hardware: Hardware | None = None,
    processes: int | None = None,
    dataset: bool | None = None,
) -> Settings:
    """The checked settings of ``argv`` (``--config FILE`` and ``--field value`` overrides) for ``hardware`` (default:
    this machine) and ``processes`` (default: the world size from the environment); ConfigError (or ValueError from
    the profile choice) in one line for anything that cannot work.

    ``profile`` is a Profile, None for the recipe as written (with only what the machine requires), or the name to
    choose when neither ``--profile`` nor the recipe names one: a profile chosen here is announced, with the notes
    (rank 0 alone). ``dataset``: check the dataset and its splits (default: for a chosen profile; a plan, made for a
    machine where the data will be prepared, does not).
    """
    from utils.hardware import choose_profile, detect_hardware

    path, cli = split_config(list(argv))
    recipe = read_recipe(path) if path else {}
    chosen, announce = isinstance(profile, str), isinstance(profile, str) and is_main_process()
    if chosen:
        profile = _cli_value(cli, "profile") or recipe.get("profile") or profile
    hw = hardware or detect_hardware(check_hub=chosen and profile != "smoke")
    if chosen:
        profile = choose_profile(profile, hw, model=_cli_value(cli, "model_name_or_path"), verbose=announce)
    processes = processes or world_size()
    parser = _parser()
    unknown = sorted(set(recipe) - {action.dest for action in parser._actions})
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting {unknown[0]!r} (not a field of TRL's SFT scripts)")

    suggested = dict(profile.settings()) if profile else {}
    if not hw.cuda:  # what the machine requires: a CPU trains in fp32, and its processes talk over gloo
        suggested.update(use_cpu=True, bf16=False, fp16=False)
        if processes > 1:
            suggested["ddp_backend"] = "gloo"
    standins = _standins(profile, recipe, suggested) if profile else {}
    layered = {**{k: v for k, v in suggested.items() if k not in recipe}, **recipe, **standins}
    kwargs = "activation_checkpointing_kwargs"  # merged key by key: the profile adds every_n_layers to the recipe's
    if kwargs in suggested and isinstance(recipe.get(kwargs), dict) and kwargs not in standins:
        layered[kwargs] = {**suggested[kwargs], **recipe[kwargs]}
    parser.set_defaults_with_config(**layered)
    values = vars(parser.parse_args(cli))

    given = {a[2:].split("=")[0] for a in cli if a.startswith("--") and len(a) > 2}
    sources = {name: _source(name, given, standins, suggested, recipe, layered) for name in values}
    settings = Settings(values, sources, profile, processes, hardware=hw)
    _derive(settings, given)
    _check_hardware(settings, hw)
    _check_values(values)
    positions = model_positions(values["model_name_or_path"])
    if positions and values["max_length"] > positions:
        settings.notes.append(
            f"max_length {values['max_length']} is more than the model's {positions} positions: capped at {positions}."
        )
        values["max_length"] = positions
    if dataset or (dataset is None and chosen):
        _check_dataset(settings)
    for note in settings.notes if announce else []:
        print(note)
    return settings


def _source(name: str, given: set, standins: dict, suggested: dict, recipe: dict, layered: dict) -> str:
    """Where a setting's value came from: the command line, the profile (a stand-in, or what the recipe left unset or
    the profile replaced), the recipe, or TRL's default."""
    if name in given:
        return CLI
    if name in standins or (name in suggested and name not in recipe):
        return PROFILE
    if name in recipe:
        return PROFILE if layered.get(name) != recipe[name] else RECIPE
    return DEFAULT


def _standins(profile: Profile, recipe: dict, suggested: dict) -> dict[str, Any]:
    """Smoke's model, data and settings in place of the recipe's; without the Hub, the sample for a remote dataset."""
    from utils.data.sources import local_path

    standins: dict[str, Any] = {}
    dataset = recipe.get("dataset_name")
    if (dataset is None or local_path(str(dataset)) is None) and profile.dataset != HUB_DATASET:
        standins["dataset_name"] = profile.dataset  # the shipped sample: smoke, or a GPU without the Hub
    if profile.is_smoke:
        from utils.assets import TINY_MODEL_DIR

        standins["model_name_or_path"] = str(TINY_MODEL_DIR)
        standins.update(suggested)
    elif profile.model_id and recipe.get("model_name_or_path") != profile.model_id:
        standins["model_name_or_path"] = profile.model_id
    return standins


def _derive(settings: Settings, given: set[str]) -> None:
    """Values that follow from others: accumulation from a global batch (for a run, not the recipe as written), and
    a list from one command-line LoRA module."""
    v, s = settings.values, settings.sources
    if v.get("global_batch_size") and "gradient_accumulation_steps" not in given and settings.profile:
        from utils.scaling import accumulation_for

        try:
            v["gradient_accumulation_steps"] = accumulation_for(
                v["global_batch_size"], settings.world_size, v["per_device_train_batch_size"]
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        s["gradient_accumulation_steps"] = s["global_batch_size"]
    if isinstance(v.get("lora_target_modules"), str):  # one value on the command line arrives as a string
        v["lora_target_modules"] = [m for m in v["lora_target_modules"].split(",") if m]
    for old, new in (  # transformers 5's deprecated names (TRL's SFTConfig still sets the old one): one name each
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ):
        if v.get(new) is None and v.get(old) is not None:
            v[new], s[new] = v[old], s[old]
        v[old] = None


def _check_hardware(settings: Settings, hw: Hardware) -> None:
    """ConfigError for a precision or attention kernel the machine cannot run, naming where the value came from."""
    from utils.hardware import attention_problem

    v, s = settings.values, settings.sources
    for name in ("bf16", "dtype"):
        if hw.cuda and not hw.bf16 and v.get(name) in (True, "bfloat16"):
            raise ConfigError(
                f"{name}={v[name]} (from the {s[name]}) needs a GPU with bfloat16 (compute capability 8.0+); "
                f"this {hw.gpu_name} has none: use fp16 / float16, or leave it to the profile"
            )
    if problem := attention_problem(v.get("attn_implementation"), hw):
        raise ConfigError(
            f"attn_implementation={v['attn_implementation']} (from the {s['attn_implementation']}): {problem}"
        )


# --- checks before any weights load -------------------------------------------------------------------------------
def _check_values(v: dict[str, Any]) -> None:
    """ConfigError unless every number is finite and in range and LoRA can build an adapter on Mistral's linear
    layers."""
    for name in POSITIVE:
        value = v.get(name)
        if value is None or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value}")
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "adam_epsilon"):
        value = v.get(name)
        if value is None or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number of 0 or more, got {value}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= v[name] < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {v[name]}")
    epochs = v["num_train_epochs"]
    if v["max_steps"] <= 0 and (not math.isfinite(epochs) or epochs <= 0):
        raise ConfigError(f"num_train_epochs must be positive (or set max_steps), got {epochs}")
    if v["seed"] < 0:
        raise ConfigError(f"seed must be 0 or more, got {v['seed']}")
    if v.get("card_schedule") and v["max_steps"] > 0:  # it sets max_steps itself, and run.json would record the other
        raise ConfigError(
            f"card_schedule plans its own steps (dialogues / global batch, as TRL 0.7.x did), so max_steps "
            f"{v['max_steps']} would be ignored: leave max_steps unset, or set card_schedule false"
        )
    if v.get("packing_strategy") not in PACKING_STRATEGIES:
        raise ConfigError(
            f"packing_strategy must be one of {', '.join(PACKING_STRATEGIES)}, got {v.get('packing_strategy')!r}"
        )
    if v["use_peft"]:
        if v["lora_r"] is None or v["lora_r"] < 1:
            raise ConfigError(f"lora_r must be a whole number of 1 or more, got {v['lora_r']}")
        if not math.isfinite(v["lora_alpha"]) or v["lora_alpha"] <= 0:
            raise ConfigError(f"lora_alpha must be positive, got {v['lora_alpha']}")
        if not 0 <= v["lora_dropout"] < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {v['lora_dropout']}")
        modules = v["lora_target_modules"] or []
        unknown = [m for m in modules if m not in MISTRAL_LINEAR_MODULES and m != "all-linear"]
        if unknown or not modules:
            raise ConfigError(
                f"unknown LoRA target module(s) {', '.join(unknown) or '(none given)'}; Mistral's "
                f"linear layers are {', '.join(MISTRAL_LINEAR_MODULES)}"
            )


def model_positions(model: str) -> int | None:
    """``max_position_embeddings`` from a local model folder's config.json (or the HF cache's), or None."""
    from huggingface_hub import try_to_load_from_cache

    from utils.hardware import local_model

    local = local_model(model)
    if local is None:
        return None
    config = Path(local) / "config.json"
    try:
        config = config if config.is_file() else Path(try_to_load_from_cache(local, "config.json"))
        return int(json.loads(config.read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_dataset(settings: Settings) -> None:
    """ConfigError for a dataset that cannot be read; evaluation turned off (with a note) where there is no test
    split to evaluate on."""
    from utils.data.prepared import check_cache
    from utils.data.sources import SourceError, local_path, open_source

    v = settings.values
    name = v["dataset_name"]
    if not name:
        raise ConfigError("no dataset: set dataset_name to the folder notebook 01 wrote (data/processed/ultrachat)")
    path = local_path(name)
    if path is None or not (path / "dataset_dict.json").is_file():
        try:  # a source notebook 01's pipeline can prepare: a .jsonl/.json/.parquet file or folder, or a Hub id
            open_source(name)
        except SourceError as exc:
            raise ConfigError(
                f"dataset {name}: {exc}. Run notebook 01 or `python -m utils.prepare_data --out "
                "data/processed/ultrachat` first"
            ) from None
        check_cache()  # where its prepared copy will go
        return
    try:
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    except (OSError, ValueError, AttributeError):
        raise ConfigError(f"dataset {path}: its dataset_dict.json is damaged; prepare it again") from None
    if v["dataset_train_split"] not in splits:
        raise ConfigError(
            f"dataset {path} has no {v['dataset_train_split']!r} split (it has {', '.join(splits) or 'none'})"
        )
    if v["dataset_test_split"] not in splits and str(getattr(v["eval_strategy"], "value", v["eval_strategy"])) != "no":
        v["eval_strategy"] = "no"
        settings.notes.append(
            f"Note: dataset {path} has no {v['dataset_test_split']!r} split, so evaluation is off (eval_strategy no)."
        )
