"""Notebook 02 as a script: QLoRA SFT of Mistral-7B (or the embedded tiny Mistral) with TRL's SFTTrainer.

    python -m utils.sft --config configs/sft_qlora.yaml [--field value ...]
    python -m utils.sft --config configs/sft_qlora.yaml --profile smoke --output_dir runs/qlora --max_steps 30
    python -m utils.sft --config configs/sft_qlora.yaml --gpu t4 --plan [--json plan.json]   # no GPU needed

The recipe (YAML), the hardware profile and the command line are resolved in one place (``utils.recipe``); any
``SFTConfig``/``ModelConfig`` field can be given as ``--field value``. Re-running with the same ``--output_dir``
resumes from its newest checkpoint that loads, recognises a finished run (and then changes nothing), and refuses
settings that differ from the folder's (``--fresh true`` starts over).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

from utils.hardware import Hardware
from utils.recipe import Args, ConfigError, Settings, check, read_recipe, resolve, split_config

OWN_FLAGS = {"--plan": 0, "--gpu": 1, "--json": 1}  # options of this command, not settings


def settings_for(argv: list[str], gpu: str | None = None, plan: bool = False) -> tuple[Settings, Hardware]:
    """The resolved and checked settings for ``argv`` on this machine, or on the GPU shape ``gpu`` (``SHAPES``).

    Prints the profile line. Raises ConfigError (or ValueError/RuntimeError from the profile choice) in one line.
    A ``plan`` does not check the dataset: it is for a machine where the data will be prepared.
    """
    from utils.hardware import choose_profile, detect_hardware

    path, cli = split_config(argv)
    requested = _cli_value(cli, "profile") or (read_recipe(path).get("profile") if path else None) or "auto"
    model = _cli_value(cli, "model_name_or_path")
    if gpu:
        from utils.hardware import shape

        target = shape(gpu)
        hardware, processes = target.hardware(), target.count
    else:
        hardware, processes = detect_hardware(check_hub=requested != "smoke"), None
    main = _is_main_process()  # with several processes, rank 0 alone says what was chosen
    profile = choose_profile(requested, hardware, model=model, verbose=main)
    settings = resolve(argv, profile, hardware, processes)
    check(settings, dataset=not plan)
    for note in settings.notes if main else []:
        print(note)
    return settings, hardware


def _cli_value(cli: list[str], name: str) -> str | None:
    for i, arg in enumerate(cli):
        if arg == f"--{name}" and i + 1 < len(cli):
            return cli[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _own_flags(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """This command's own flags (``--plan``, ``--gpu SHAPE``, ``--json FILE``) and the rest of ``argv``."""
    flags: dict[str, str | bool] = {}
    rest, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in OWN_FLAGS:
            if OWN_FLAGS[name] == 0:
                flags[name], i = True, i + 1
            elif "=" in argv[i]:
                flags[name], i = argv[i].split("=", 1)[1], i + 1
            elif i + 1 < len(argv):
                flags[name], i = argv[i + 1], i + 2
            else:
                raise ConfigError(f"{name} needs a value")
        else:
            rest.append(argv[i])
            i += 1
    return flags, rest


def main(argv: list[str] | None = None) -> int:
    from utils.data.output import OutputError
    from utils.data.sources import SourceError
    from utils.runs import RunError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        flags, argv = _own_flags(argv)
        settings, hardware = settings_for(argv, flags.get("--gpu"), bool(flags.get("--plan")))
    except (ConfigError, ValueError, RuntimeError, OSError) as exc:
        return _error(exc)
    if flags.get("--plan"):
        return _plan(settings, hardware, flags.get("--json"))
    if flags.get("--gpu"):
        return _error(ConfigError("--gpu plans a run for another GPU: add --plan (training needs the GPU itself)"))
    if _is_main_process():
        from utils.inspection import print_recipe_changes

        print_recipe_changes(argv, settings)
    start = time.perf_counter()
    try:
        report, args = train(settings, argv)
    except (RunError, SourceError, OutputError, ConfigError) as exc:
        return _error(exc)
    if report is None:
        return 0
    out = Path(args.training.output_dir)
    if args.run.merge and args.model.use_peft and _is_main_process():
        from utils.model import merge_adapter, merge_dtype

        merge_adapter(args.model.model_name_or_path, out / "adapter", out / "merged", merge_dtype(args.model))
    if _is_main_process():
        final, speed = report.get("final_loss"), report.get("tokens_per_second")
        print(
            f"done: {report['steps']} steps in {time.perf_counter() - start:.0f} s (loading and saving included), "
            f"final loss {final if final is not None else float('nan'):.4f}, "
            + (f"{speed} tokens/s in the steps after the first" if speed else "too few steps for a speed")
            + f" -> {out}"
        )
    return 0


def train(settings: Settings, argv: list[str]) -> tuple[dict | None, Args]:
    """Build, run and finish the training of ``settings``; (None, args) for a finished run, which is left alone.

    The trainer is freed before returning, so that a merge after it has the GPU to itself.
    """
    import torch

    from utils.training import build_trainer, run_training, start_run

    args = settings.build()
    _token_to_environment(args)
    run = start_run(args)
    if run.finished:
        saved = run.saved_report()
        if saved and _is_main_process():
            print(
                f"its report: {saved['steps']} steps, {saved['tokens_per_second']} tokens/s, "
                f"{saved['train_runtime_s']} s ({run.path / 'speed.json'})"
            )
        return None, args
    try:
        trainer = build_trainer(args)
        report = run_training(trainer, run)
    except BaseException as exc:
        run.fail(f"stopped: {type(exc).__name__}")  # never left "running"; a re-run resumes or starts over
        raise
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    report["final_loss"] = losses[-1] if losses else None
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report, args


def _token_to_environment(args: Args) -> None:
    """Move ``--hub_token`` to ``HF_TOKEN``, where huggingface_hub reads it: the Trainer pickles its arguments into
    ``training_args.bin`` in every checkpoint and in the adapter folder, the folders people share."""
    import os

    token = getattr(args.training, "hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
        args.training.hub_token = None


def _is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate/notebook_launcher run (from its environment), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def _plan(settings: Settings, hardware: Hardware, json_path: str | bool | None) -> int:
    from utils.plan import plan, print_plan

    result = plan(settings, hardware)
    print_plan(result)
    if isinstance(json_path, str):
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _error(exc: BaseException) -> int:
    text = str(exc).strip().splitlines()
    print(f"error: {text[0] if text else type(exc).__name__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
