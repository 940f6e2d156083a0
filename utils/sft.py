"""Notebook 02 as a script, in the shape of TRL's ``trl/scripts/sft.py``: ``python -m utils.sft --config
configs/sft_qlora.yaml [--field value ...] [--plan [--gpu t4] [--json plan.json]]`` (``utils.recipe`` resolves the
settings). Re-running into the same ``--output_dir`` resumes from its newest checkpoint that loads, leaves a finished
run alone (merging its adapter if the merged model is missing), and refuses other settings (``--fresh true``)."""

from __future__ import annotations

import errno
import gc
import json
import os
import sys
import time
from pathlib import Path

from utils import ConfigError
from utils.assets import load_tokenizer
from utils.hardware import shape
from utils.inspection import print_recipe_changes
from utils.model import keep_standard_4bit_layout, merge_adapter, merge_dtype, merged_is_whole
from utils.plan import plan, print_plan
from utils.recipe import Args, is_main_process, resolve, split_config
from utils.runs import RunError


def trainer_for(args: Args, tokenizer=None, data: dict | None = None):
    """TRL's ``SFTTrainer`` for this run as notebook 02 builds it; a benchmark may pass its own ``tokenizer`` and
    ``data`` (``{"train": Dataset of input_ids}``)."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from utils.training import load_training_data, model_id, run_callbacks, with_additions

    training_args, model_args = args.training, args.model
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
    """Train (or resume) the run, save its adapter (or model), merge it when asked: the report, or None if finished."""
    import torch

    from utils.training import finish_from_checkpoint, finish_run, start_run, stop_if_diverged

    training_args, model_args = args.training, args.model
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
        report["final_loss"] = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    elif is_main_process() and (saved := run.saved_report()):
        print(f"its report: {saved['steps']} steps, {_speed(saved)}, {saved['train_runtime_s']} s ({run.path})")
    if args.run.merge and model_args.use_peft and is_main_process() and not merged_is_whole(out / "merged"):
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
    """Why a write failed for want of room (no space, a file size limit, a quota), or None; as an ``OSError`` or as
    the Rust libraries (safetensors, tokenizers) report it: "... (os error 27)"."""
    full = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    if isinstance(exc, OSError) and exc.errno in full:
        return exc.strerror
    return next((f"{os.strerror(code)} (os error {code})" for code in full if f"(os error {code})" in str(exc)), None)


def _speed(report: dict) -> str:
    speed = report.get("tokens_per_second")
    return f"{speed} tokens/s in the steps after the first" if speed else "too few steps for a speed"


def cli(argv: list[str] | None = None) -> int:
    """``python -m utils.sft``: every mistake a user can make is one line and exit 2, before any weights load."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        gpu, argv = split_config(argv, "gpu")  # this command's own flags, which are not settings
        json_path, argv = split_config(argv, "json")
        planning = "--plan" in argv
        argv = [arg for arg in argv if arg != "--plan"]
        if json_path:  # checked before the plan is made
            folder = Path(json_path).parent
            if Path(json_path).is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
                raise ConfigError(f"--json {json_path}: not a file in an existing, writable folder")
        if gpu and not planning:
            raise ConfigError("--gpu plans a run for another GPU: add --plan (training needs the GPU itself)")
        hardware = processes = None
        if gpu:
            target = shape(gpu)
            hardware, processes = target.hardware(), target.count
        settings = resolve(argv, "auto", hardware, processes, dataset=not planning)
        if planning:
            result = plan(settings, settings.hardware)
            print_plan(result)
            if json_path:
                Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
            return 0
        if is_main_process():
            print_recipe_changes(argv, settings)
        start = time.perf_counter()
        report = main(settings.build())
    except (ValueError, RuntimeError, OSError) as exc:  # ConfigError is a ValueError
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
