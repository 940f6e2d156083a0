"""Notebook 02 as a script, in the shape of TRL's ``trl/scripts/sft.py``: QLoRA SFT of Mistral-7B (or the embedded
tiny Mistral) with TRL's SFTTrainer.

    python -m utils.sft --config configs/sft_qlora.yaml [--field value ...]
    python -m utils.sft --config configs/sft_qlora.yaml --profile smoke --output_dir runs/qlora --max_steps 30
    python -m utils.sft --config configs/sft_qlora.yaml --gpu t4 --plan [--json plan.json]   # no GPU needed

The recipe (YAML), the hardware profile and the command line are resolved by ``utils.recipe`` (TRL's parser); any
``SFTConfig``/``ModelConfig`` field can be given as ``--field value``. Re-running with the same ``--output_dir``
resumes from its newest checkpoint that loads, recognises a finished run (and then changes nothing, or only merges
the saved adapter when its merged model is missing), and refuses settings that differ from the folder's
(``--fresh true`` starts over).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import sys
import time
from pathlib import Path

from utils import ConfigError
from utils.recipe import Args, is_main_process, resolve
from utils.runs import RunError

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space left, a file size limit, a quota


def trainer_for(args: Args, tokenizer=None, data: dict | None = None):
    """TRL's ``SFTTrainer`` for this run, built as notebook 02 builds it: the tokenizer, the prepared data, the base
    (4-bit when the recipe says so, on this process's GPU), LoRA, and the collection's callbacks. A benchmark may pass
    its own ``tokenizer`` and ``data`` (``{"train": Dataset of input_ids}``)."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from utils.assets import load_tokenizer
    from utils.model import keep_standard_4bit_layout
    from utils.training import load_training_data, model_id, run_callbacks, with_additions

    script_args, training_args, model_args, run_args = args
    quantization = get_quantization_config(model_args)
    with PartialState().main_process_first():  # rank 0 builds the cached assets and the prepared data first
        tokenizer = tokenizer or load_tokenizer(model_id(args), revision=model_args.model_revision)  # None: embedded
        data = data or load_training_data(args, tokenizer)
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            dtype=getattr(torch, model_args.dtype),
            attn_implementation=model_args.attn_implementation,
            quantization_config=quantization,
            # 4-bit weights live on this process's GPU (None on a CPU)
            device_map={"": PartialState().local_process_index} if quantization and torch.cuda.is_available() else None,
        )
    keep_standard_4bit_layout(model)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data.get("test") if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=run_callbacks(args, data),
    )
    return with_additions(trainer, args)


def main(args: Args) -> dict | None:
    """Train (or resume) the run of ``args``, save its adapter (or model), merge it when asked; the report, or None
    for a finished run (which is left alone, but for a merge it lacks)."""
    import torch

    from utils.model import merge_adapter, merge_dtype, merged_is_whole
    from utils.training import finish_from_checkpoint, finish_run, start_run, stop_if_diverged

    script_args, training_args, model_args, run_args = args
    # huggingface_hub reads the token from HF_TOKEN; left in the arguments, the Trainer would pickle it into
    # training_args.bin in every checkpoint and in the adapter folder, the folders people share
    if token := getattr(training_args, "hub_token", None):
        os.environ["HF_TOKEN"], training_args.hub_token = token, None
    out = Path(training_args.output_dir)
    run = start_run(args)
    report = None
    if not run.finished:
        try:
            trainer = trainer_for(args)
            if run.resume_is_final:  # its last step is saved already: Trainer.train would take one step more
                finish_from_checkpoint(trainer, run.resume_from)
            else:
                trainer.train(resume_from_checkpoint=run.resume_from)
            stop_if_diverged(trainer, run)
            trainer.save_model(str(out / ("adapter" if model_args.use_peft else "model")))
            report = finish_run(trainer, run)
        except BaseException as exc:
            run.fail(f"stopped: {type(exc).__name__}")  # never left "running"; a re-run resumes or starts over
            if why := _disk_full(exc):
                raise RunError(
                    f"no room left to write in {out} ({why}): free space, then run again to resume from the newest "
                    "whole checkpoint"
                ) from None
            raise
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        report["final_loss"] = losses[-1] if losses else None
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    elif is_main_process() and (saved := run.saved_report()):
        print(f"its report: {saved['steps']} steps, {_speed(saved)}, {saved['train_runtime_s']} s ({run.path})")
    if run_args.merge and model_args.use_peft and is_main_process() and not merged_is_whole(out / "merged"):
        if run.finished:
            print(f"{out / 'merged'} is missing or incomplete: merging the saved adapter into it")
        try:
            merge_adapter(model_args.model_name_or_path, out / "adapter", out / "merged", merge_dtype(model_args))
        except Exception as exc:  # a full disk or a file size limit: the merge left nothing behind
            if not (why := _disk_full(exc)):
                raise
            raise RunError(
                f"could not write the merged model to {out / 'merged'} ({why}); the adapter is saved in "
                f"{out / 'adapter'}: free space, then run again to merge it"
            ) from None
    return report


def _disk_full(exc: BaseException) -> str | None:
    """Why a write failed for want of room, or None for any other error; as an ``OSError`` or as the Rust libraries
    (safetensors, tokenizers) report it: "... (os error 27)"."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return exc.strerror
    for code in DISK_FULL:
        if f"(os error {code})" in str(exc):
            return f"{os.strerror(code)} (os error {code})"
    return None


def _speed(report: dict) -> str:
    speed = report.get("tokens_per_second")
    return f"{speed} tokens/s in the steps after the first" if speed else "too few steps for a speed"


# --- the command line ----------------------------------------------------------------------------------------------
def _own_flags(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """This command's own flags (``--plan``, ``--gpu SHAPE``, ``--json FILE``), which are not settings, and the rest."""
    flags: dict[str, str | bool] = {}
    rest, args = [], iter(argv)
    for arg in args:
        name, equals, value = arg.partition("=")
        if name == "--plan":
            flags[name] = True
        elif name in ("--gpu", "--json"):
            flags[name] = value if equals else next(args, "")
            if not flags[name]:
                raise ConfigError(f"{name} needs a value")
        else:
            rest.append(arg)
    return flags, rest


def cli(argv: list[str] | None = None) -> int:
    """``python -m utils.sft``: every mistake a user can make is one line and exit 2, before any weights load."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        flags, argv = _own_flags(argv)
        planning, gpu, json_path = flags.get("--plan", False), flags.get("--gpu"), flags.get("--json")
        if json_path:  # checked before the plan is made
            folder = Path(json_path).parent
            if Path(json_path).is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
                raise ConfigError(f"--json {json_path}: not a file in an existing, writable folder")
        if gpu and not planning:
            raise ConfigError("--gpu plans a run for another GPU: add --plan (training needs the GPU itself)")
        hardware = processes = None
        if gpu:
            from utils.hardware import shape

            target = shape(gpu)
            hardware, processes = target.hardware(), target.count
        settings = resolve(argv, "auto", hardware, processes, dataset=not planning)
        if planning:
            from utils.plan import plan, print_plan

            result = plan(settings, settings.hardware)
            print_plan(result)
            if json_path:
                Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
            return 0
        if is_main_process():
            from utils.inspection import print_recipe_changes

            print_recipe_changes(argv, settings)
        start = time.perf_counter()
        report = main(settings.build())
    except (ConfigError, ValueError, RuntimeError, OSError) as exc:
        from tqdm.auto import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar the error cut short ends its line first
            bar.close()
        text = str(exc).strip().splitlines()
        print(f"error: {text[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2
    if report is not None and is_main_process():
        final = report.get("final_loss")
        print(
            f"done: {report['steps']} steps in {time.perf_counter() - start:.0f} s (loading and saving included), "
            f"final loss {final if final is not None else float('nan'):.4f}, {_speed(report)} -> "
            f"{settings.values['output_dir']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli())
