"""A run's settings and where each came from: TRL's defaults < the hardware profile < the recipe < the command line.
A GPU profile fills only what neither recipe nor command line set; the embedded default (``smoke``) replaces the 7B
model, data, precision and scale. Resolving builds no TRL dataclass, touches no GPU: ``--plan`` uses it for any GPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils import ConfigError
from utils.assets import TINY_MODEL_DIR
from utils.data.prepared import check_cache
from utils.data.sources import SourceError, local_path, open_source
from utils.hardware import HUB_DATASET, Hardware, Profile, attention_problem, choose_profile, detect_hardware
from utils.scaling import accumulation_for

DEFAULT, PROFILE, RECIPE, CLI = "default", "profile", "recipe", "command line"
MISTRAL_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped", "card")  # TRL's, and the card's (TRL 0.7.x's, utils.card_era)
# TRL's ScriptArguments (the dataset), SFTConfig, ModelConfig (model, 4-bit, LoRA), and our RunArguments
Args = namedtuple("Args", "script training model run")


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class RunArguments:
    """Options of this collection that TRL's dataclasses do not have."""

    profile: str = _option("auto", "auto, smoke, or a GPU profile (utils/hardware.py)")
    merge: bool = _option(True, "merge the adapter into a 16-bit base after training")
    global_batch_size: int | None = _option(None, "sequences per optimizer step over all GPUs; sets the accumulation")
    fresh: bool = _option(False, "start over in output_dir, removing its earlier run")
    card_schedule: bool = _option(
        False,
        "the card's schedule: the cosine planned over the steps TRL 0.7.x planned from the dialogue count, stopped "
        "when the packed data ends (272 of 406 for the card; exactly so with packing_strategy card)",
    )
    dataset_revision: str = _option("main", "Hub dataset commit or tag to prepare")


@dataclass
class Settings:
    """A run's values by field name, where each came from, and the profile, world size and machine they are for."""

    values: dict[str, Any]
    sources: dict[str, str]
    profile: Profile | None
    world_size: int = 1
    hardware: Hardware | None = None
    notes: list[str] = field(default_factory=list)  # adjustments worth a line (a capped length, evaluation off)

    def to_json(self) -> dict:
        """``{"profile": NAME, "settings": {FIELD: {"value": V, "from": SOURCE}}}``: enums by value, no token."""

        def plain(name: str) -> Any:
            value = getattr(self.values[name], "value", self.values[name])
            if name == "hub_token" and value:
                return "<set>"
            return value if isinstance(value, str | int | float | bool | list | dict | type(None)) else str(value)

        return {
            "profile": self.profile.name if self.profile else None,
            "settings": {k: {"value": plain(k), "from": s} for k, s in sorted(self.sources.items())},
        }

    def fields(self, kind) -> dict[str, Any]:
        """The values that are fields of the dataclass ``kind``: ``kind(**settings.fields(kind))``."""
        names = {f.name for f in dataclasses.fields(kind) if f.init}
        return {k: v for k, v in self.values.items() if k in names}

    def build(self) -> Args:
        """TRL's dataclasses and ours. An SFTConfig picks its device, which initialises CUDA (transformers 5.24): build
        it in the process that trains, after ``accelerate.notebook_launcher`` has forked."""
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


def split_config(argv: list[str], name: str = "config") -> tuple[str | None, list[str]]:
    """(the value of the last ``--NAME VALUE`` or ``--NAME=VALUE``, or None; the other arguments)."""
    value, rest, args = None, [], iter(argv)
    for arg in args:
        flag, equals, given = arg.partition("=")
        if flag != f"--{name}":
            rest.append(arg)
        elif not (value := given if equals else next(args, None)):
            raise ConfigError(f"--{name} needs a value")
    return value, rest


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


def world_size() -> int:  # as torchrun, accelerate and notebook_launcher announce it
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:  # rank 0, or a single process
    return int(os.environ.get("RANK", "0")) == 0


def resolve(
    argv: list[str],
    profile: Profile | str | None = "auto",
    hardware: Hardware | None = None,
    processes: int | None = None,
    dataset: bool | None = None,
) -> Settings:
    """The checked settings of ``argv`` for ``hardware`` and ``processes`` (default: this machine's), or a one-line
    ConfigError (ValueError for the profile or the global batch). ``profile``: a Profile, None for the recipe as
    written, or the name to choose when neither ``--profile`` nor the recipe names one: a chosen one is announced with
    the notes (rank 0) and its dataset checked unless ``dataset`` is False (a plan for another machine)."""
    path, cli = split_config(list(argv))
    recipe = read_recipe(path) if path else {}
    chosen, announce = isinstance(profile, str), isinstance(profile, str) and is_main_process()
    if chosen:
        profile = split_config(cli, "profile")[0] or recipe.get("profile") or profile
    hw = hardware or detect_hardware(check_hub=chosen and profile != "smoke")
    if chosen:
        profile = choose_profile(profile, hw, model=split_config(cli, "model_name_or_path")[0], verbose=announce)
    processes = processes or world_size()
    parser = _parser()
    if unknown := sorted(set(recipe) - {action.dest for action in parser._actions}):
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
    _check_values(values, hw, sources)
    positions = _model_positions(values["model_name_or_path"])
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
    if name in given:
        return CLI
    if name in standins or (name in suggested and name not in recipe):
        return PROFILE
    if name in recipe:
        return PROFILE if layered.get(name) != recipe[name] else RECIPE
    return DEFAULT


def _standins(profile: Profile, recipe: dict, suggested: dict) -> dict[str, Any]:
    """Smoke's model, data and settings in place of the recipe's; without the Hub, the sample for a remote dataset."""
    standins: dict[str, Any] = {}
    dataset = recipe.get("dataset_name")
    if (dataset is None or local_path(str(dataset)) is None) and profile.dataset != HUB_DATASET:
        standins["dataset_name"] = profile.dataset  # the shipped sample: smoke, or a GPU without the Hub
    if profile.is_smoke:
        standins["model_name_or_path"] = str(TINY_MODEL_DIR)
        standins.update(suggested)
    elif profile.model_id and recipe.get("model_name_or_path") != profile.model_id:
        standins["model_name_or_path"] = profile.model_id
    return standins


def _derive(settings: Settings, given: set[str]) -> None:
    """Accumulation from a global batch (for a run, not the recipe as written) and a list of one LoRA module."""
    v, s = settings.values, settings.sources
    if v.get("global_batch_size") and "gradient_accumulation_steps" not in given and settings.profile:
        per_device = v["per_device_train_batch_size"]
        v["gradient_accumulation_steps"] = accumulation_for(v["global_batch_size"], settings.world_size, per_device)
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


def _check_values(v: dict[str, Any], hw: Hardware, s: dict[str, str]) -> None:
    """ConfigError for a number out of range, a precision or attention this machine cannot run, unknown LoRA modules."""
    for name in ("bf16", "dtype"):
        if hw.cuda and not hw.bf16 and v.get(name) in (True, "bfloat16"):
            raise ConfigError(
                f"{name}={v[name]} (from the {s[name]}) needs a GPU with bfloat16 (compute capability 8.0+); "
                f"this {hw.gpu_name} has none: use fp16 / float16, or leave it to the profile"
            )
    if problem := attention_problem(v.get("attn_implementation"), hw):
        attn = v["attn_implementation"]
        raise ConfigError(f"attn_implementation={attn} (from the {s['attn_implementation']}): {problem}")
    batch = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
    positive = ("max_length", *batch, "logging_steps", "save_steps", "learning_rate")
    musts = {name: (_finite(v.get(name)) and v[name] > 0, "a positive number") for name in positive}
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "adam_epsilon"):
        musts[name] = (_finite(v.get(name)) and v[name] >= 0, "a finite number of 0 or more")
    for name in ("adam_beta1", "adam_beta2"):
        musts[name] = (_finite(v[name]) and 0 <= v[name] < 1, "in [0, 1)")
    epochs, steps = v["num_train_epochs"], v["max_steps"]
    musts["max_steps"] = (_finite(steps) and steps == int(steps), "a whole number (-1: set by num_train_epochs)")
    musts["num_train_epochs"] = (
        _finite(steps) and steps > 0 or _finite(epochs) and epochs > 0,
        "positive (or set max_steps)",
    )
    musts["seed"] = (_finite(v["seed"]) and v["seed"] >= 0, "0 or more")
    if v["use_peft"]:
        musts["lora_r"] = (_finite(v["lora_r"]) and v["lora_r"] >= 1, "a whole number of 1 or more")
        musts["lora_alpha"] = (_finite(v["lora_alpha"]) and v["lora_alpha"] > 0, "positive")
        musts["lora_dropout"] = (_finite(v["lora_dropout"]) and 0 <= v["lora_dropout"] < 1, "in [0, 1)")
    for name, (ok, what) in musts.items():
        if not ok:
            raise ConfigError(f"{name} must be {what}, got {v.get(name)}")
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
        modules = v["lora_target_modules"] or []
        unknown = [m for m in modules if m not in MISTRAL_LINEAR_MODULES and m != "all-linear"]
        if unknown or not modules:
            raise ConfigError(
                f"unknown LoRA target module(s) {', '.join(unknown) or '(none given)'}; Mistral's "
                f"linear layers are {', '.join(MISTRAL_LINEAR_MODULES)}"
            )


def _finite(x: Any) -> bool:
    """A real number: not a YAML ``null`` or a string, so that the range checks say so in one line."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _model_positions(model: str) -> int | None:
    """``max_position_embeddings`` of a model whose config is on this machine (a folder, the HF cache), or None."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True, trust_remote_code=False)
        return int(config.max_position_embeddings)
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _check_dataset(settings: Settings) -> None:
    """ConfigError for a dataset that cannot be read; evaluation off (with a note) without a test split."""
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
