"""The check cells under each notebook's "Try this": what the learner's own runs showed, item by item.

Each ``notebook_NN`` function reads what the runs left (the notebook's prepared data, the folders the Try this
commands write, ``runs/sampling/answers.jsonl``) and returns one line per item:

    ✓  the run showed what the folded answer says
    ✗  the run showed something else (and what)
    ·  not tried yet, and how to try it

Nothing here trains or samples: a check only reads.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from utils import RUNS_DIR

HISTORY_DIR = RUNS_DIR / "exercises"  # notebook 01 compares a run with an earlier one of other settings


def try_this_items(notebook: str | Path) -> tuple[list[tuple[str, str]], list[str]]:
    """A notebook's Try this items, as written in backticks: (parameter assignments as (name, value), commands)."""
    import re

    import nbformat

    text = next(c.source for c in nbformat.read(notebook, as_version=4).cells if "## Try this" in c.source)
    params = re.findall(r"`([A-Z_]+) = ([^`]+)`", text)
    commands = re.findall(r"`((?:python -m|torchrun) [^`]+)`", text)
    return params, commands


def _line(ok: bool | None, item: str, text: str) -> str:
    return f"{'·' if ok is None else '✓' if ok else '✗'} {item}: {text}"


def show(lines: list[str]) -> None:
    """Print the check's lines."""
    print("\n".join(lines))


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- notebook 01 ------------------------------------------------------------------------------------------------------
def notebook_01(out: str | Path, filters: str, system_turn: bool, source: str, history_dir: Path = HISTORY_DIR):
    """The three items of notebook 01 on the prepared folder ``out`` (its ``report.json`` and train split)."""
    import datasets

    report = _json(Path(out) / "report.json")
    if report is None:
        return [_line(False, "notebook 01", f"no report.json in {out}: run the notebook's cells first")]
    train = datasets.load_from_disk(str(out))["train"]
    own_system = sum(bool(m and m[0]["role"] == "system" and m[0]["content"]) for m in train["messages"])
    seen = {
        "source": str(source),
        "filters": filters,
        "system_turn": system_turn,
        "tokenization": report.get("tokenization"),
        "train_tokens": report["outputs"]["train"]["total_tokens"],
        "without_own_system": len(train) - own_system,
    }
    history_dir.mkdir(parents=True, exist_ok=True)
    history_file = history_dir / "01.json"
    history = [h for h in (_json(history_file) or {}).get("runs", []) if h != seen] + [seen]
    history_file.write_text(json.dumps({"runs": history[-20:]}, indent=1) + "\n")
    sample = str(source).rstrip("/").endswith("sample/ultrachat_200k")
    return [_check_filters(report, filters, sample), _check_system_turn(seen, history), _check_raw(report, source)]


def _check_filters(report: dict, filters: str, sample: bool) -> str:
    item = 'FILTERS = "all"'
    dropped = report["dropped"]
    structure = sum(n for reason, n in dropped.items() if reason not in ("disclaimer", "duplicate_prompt"))
    said = (
        f"{sum(dropped.values())} rows dropped: {structure} for their structure, "
        f"{dropped.get('disclaimer', 0)} disclaimers, {dropped.get('duplicate_prompt', 0)} duplicate prompts"
    )
    if filters != "all" or not sample:
        return _line(None, item, f"not tried (this run: FILTERS = {filters!r}, {said})")
    ok = sum(dropped.values()) == 16 and dropped.get("disclaimer") == 3 and dropped.get("duplicate_prompt") == 2
    return _line(ok, item, said + ("" if ok else " (the answer says 16: 11 + 3 + 2)"))


def _check_system_turn(seen: dict, history: list[dict]) -> str:
    item = "SYSTEM_TURN = False"
    if seen["system_turn"]:
        return _line(None, item, f"not tried (this run's train split: {seen['train_tokens']:,} tokens)")
    key = ("source", "filters", "tokenization")
    same = [h for h in history if h["system_turn"] and all(h.get(k) == seen[k] for k in key)]
    if not same:
        return _line(None, item, "run the notebook once with SYSTEM_TURN = True as well, then this cell again")
    lost = same[-1]["train_tokens"] - seen["train_tokens"]
    n = seen["without_own_system"]
    per = lost / n if n else float("nan")
    return _line(
        lost == 9 * n,
        item,
        f"{lost:,} tokens fewer ({same[-1]['train_tokens']:,} -> {seen['train_tokens']:,}) over the {n} dialogues "
        f"without a system prompt of their own: {per:.1f} each",
    )


def _check_raw(report: dict, source: str) -> str:
    item = 'SOURCE = "data/sample/ultrachat_raw/ultrachat_raw.jsonl"'
    test = report["outputs"].get("test", {}).get("dialogues", 0)
    if "ultrachat_raw" not in str(source):
        return _line(None, item, "not tried (this run read ultrachat_200k, which has its own test split)")
    return _line(test == 1, item, f"{test} test dialogue(s) of {report['kept']} kept, held out by prompt hash")


# --- notebook 02 ------------------------------------------------------------------------------------------------------
def adapter_parameters(adapter: Path) -> int:
    """How many numbers an adapter folder's ``adapter_model.safetensors`` holds."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (a safetensors handle)


def _finished(folder: Path) -> bool:
    from utils.runs import RunError, read_record

    try:
        return read_record(folder).get("status") == "finished"
    except RunError:  # damaged, or not written by utils.sft: not a finished run of ours
        return False


def notebook_02(runs_dir: str | Path = RUNS_DIR, main_run: str | Path | None = None) -> list[str]:
    """The items of notebook 02, read from the folders its commands write under ``runs_dir``; ``main_run`` is the
    notebook's own run (default ``runs_dir/qlora``)."""
    from utils.curves import read_trainer_state
    from utils.runs import saved_report

    runs = Path(runs_dir)
    main = Path(main_run) if main_run else runs / "qlora"
    lines = []
    r64 = runs / "qlora-r64"
    if not _finished(r64):
        lines.append(_line(None, "rank 64", "not run yet (runs/qlora-r64)"))
    else:
        n64 = adapter_parameters(r64 / "adapter")
        r = (_json(r64 / "adapter" / "adapter_config.json") or {}).get("r")
        n16 = adapter_parameters(main / "adapter") if (main / "adapter").is_dir() else None
        ok = r == 64 and (n16 is None or n64 == 4 * n16)
        than = f", {n64 / n16:.1f}x rank 16's {n16:,}" if n16 else ""
        lines.append(_line(ok, "rank 64", f"r = {r}, {n64:,} adapter parameters{than}"))
    split = runs / "qlora-split"
    rows = {
        name: (saved_report(folder) or {}).get("packed_rows") for name, folder in (("bfd", main), ("bfd_split", split))
    }
    if not _finished(split):
        lines.append(_line(None, "bfd_split", "not run yet (runs/qlora-split)"))
    elif rows["bfd"] is None:
        lines.append(
            _line(None, "bfd_split", f"{rows['bfd_split']} packed rows; run the notebook's own run to compare")
        )
    else:
        ok = rows["bfd_split"] > rows["bfd"]
        lines.append(_line(ok, "bfd_split", f"{rows['bfd_split']} packed rows, against {rows['bfd']} with bfd"))
    ten = runs / "qlora-10"
    if not _finished(ten):
        lines.append(_line(None, "ten steps", "not run yet (runs/qlora-10)"))
    else:
        logged = read_trainer_state(ten / "trainer_state.json").train
        lrs = [(lr, s) for lr, s in zip(logged["learning_rate"], logged["step"], strict=True) if lr is not None]
        peak = max(lr for lr, _ in lrs)
        step = next(s for lr, s in lrs if lr == peak)  # the first step at the peak
        first = lrs[0][0]
        said = f"the learning rate is {first:g} at step 1 and peaks at step {step} ({peak:g})"
        lines.append(_line(step == 2, "ten steps", said))  # one warm-up step from 0, then the peak
    done = [f for f in (r64, split, ten) if _finished(f)]
    if not done:
        lines.append(_line(None, "a second run", "run one of the commands first"))
    else:
        times = ", ".join(f"{f.name} {_mtime(f / 'trainer_state.json')}" for f in done)
        lines.append(
            _line(None, "a second run", f"last written: {times}; run a command again, then this cell: the times stay")
        )
    return lines


def _mtime(path: Path) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%H:%M:%S") if path.exists() else "never"


# --- notebook 03 ------------------------------------------------------------------------------------------------------
def notebook_03(predictions: dict, runs_dir: str | Path = RUNS_DIR) -> list[str]:
    """The items of notebook 03: the learner's predictions (``None``: not made) against ``utils.scaling``, and the
    1-sequence 2-process run in ``runs_dir/full-bs1``."""
    from utils.scaling import accumulation_for, estimate

    lines = []
    for key, (gpus, per_device) in {"accumulation, 16 GPUs x 4": (16, 4), "accumulation, 4 GPUs x 2": (4, 2)}.items():
        truth, guess = accumulation_for(512, gpus, per_device), predictions.get(key)
        said = f"you said {guess}, it is {truth} ({per_device} x {gpus} x {truth} = 512)"
        lines.append(_line(None, key, "no prediction yet") if guess is None else _line(guess == truth, key, said))
    lines.append(_check_ranks(Path(runs_dir) / "full-bs1"))
    fsdp, zero3 = (estimate(s, 8, 80).total for s in ("fsdp", "zero3"))
    truth = "same" if abs(fsdp - zero3) < 0.05 else "fsdp" if fsdp < zero3 else "zero3"
    guess = predictions.get("less memory per GPU on 8 GPUs: fsdp, zero3 or same")
    said = f"you said {guess}, the estimate says {truth} ({fsdp:.1f} vs {zero3:.1f} GiB per GPU)"
    lines.append(
        _line(None, "fsdp or zero3", "no prediction yet")
        if guess is None
        else _line(guess == truth, "fsdp or zero3", said)
    )
    return lines


def _check_ranks(folder: Path) -> str:
    item = "1 sequence per device"
    logs = [_json(folder / "rank_logs" / f"rank{r}.json") for r in (0, 1)]
    if not _finished(folder) or None in logs:
        return _line(None, item, "not run yet (runs/full-bs1)")
    own0, own1 = logs[0]["own_losses"], logs[1]["own_losses"]
    means = [statistics.mean(pair) for pair in zip(own0, own1, strict=False)]
    logged = logs[0]["losses"]
    differ = sum(abs(a - b) > 1e-6 for a, b in zip(own0, own1, strict=False))
    same = all(abs(a - b) <= 1e-3 * abs(b) + 1e-4 for a, b in zip(logged, means, strict=False))
    return _line(
        differ > 0 and same and logs[0]["losses"] == logs[1]["losses"],
        item,
        f"own losses differ at {differ} of {len(own0)} steps; the logged loss is their mean at "
        f"{'every' if same else 'not every'} step, on both ranks",
    )


# --- notebook 05 ------------------------------------------------------------------------------------------------------
def notebook_05(answers: list[dict]) -> list[str]:
    """The items of notebook 05, read from the answers ``python -m utils.sampling`` logged. The hot-sampling item
    counts the tiny world's words (``utils.tiny_world.world_share``): it speaks of the smoke models."""
    from utils.tiny_world import is_pirate, world_share

    lines = []
    cold = [a for a in answers if a.get("temperature", 1) <= 0.05 and a.get("prompt") is None]
    pairs = {}
    for a in cold:
        pairs.setdefault(a["model"], {})[a.get("seed")] = a["text"]
    compared = {m: len(set(s.values())) == 1 for m, s in pairs.items() if len(s) >= 2}
    if not compared:
        lines.append(_line(None, "almost greedy", "run both commands (seeds 1 and 2 at temperature 0.01)"))
    else:
        same = sum(compared.values())
        lines.append(
            _line(
                same == len(compared),
                "almost greedy",
                f"{same} of {len(compared)} models gave the same answer for every seed",
            )
        )
    plain = [a for a in answers if a.get("prompt") and not a.get("system") and a["model"] != "base"]
    if not plain:
        lines.append(_line(None, "without the system message", "run the command with --prompt"))
    else:
        pirates = sum(is_pirate(a["text"]) for a in plain)
        lines.append(
            _line(
                pirates <= len(plain) / 2,
                "without the system message",
                f"{pirates} of {len(plain)} fine-tuned answers talk like a pirate",
            )
        )
    hot = [a for a in answers if a.get("temperature", 0) >= 1.5 and a.get("prompt") is None]
    if not hot or not cold:
        lines.append(_line(None, "hot sampling", "run the temperature 1.5 command (and the 0.01 ones to compare)"))
    else:
        h, c = (statistics.mean(world_share(a["text"]) for a in group) for group in (hot, cold))
        lines.append(_line(h < c, "hot sampling", f"{h:.0%} of the words at 1.5 are the tiny world's, {c:.0%} at 0.01"))
    return lines


# --- notebook 04 ------------------------------------------------------------------------------------------------------
def notebook_04(runs: list, smoothing: float, x_axis: str, diagnosis: dict) -> list[str]:
    """The items of notebook 04 on the runs it plotted (``utils.curves.RunLog``) and the learner's diagnosis."""
    from utils.curves import PLANTED_TRUTH, ema

    curves = {r.name: r.train.get("loss", []) for r in runs if len(r.train.get("loss", [])) >= 4}
    if not curves:
        return [_line(None, "notebook 04", "no run with 4 or more logged losses: run notebook 02 first")]
    jumps = {
        name: statistics.mean(abs(b - a) for a, b in zip(loss, loss[1:], strict=False)) for name, loss in curves.items()
    }
    noisiest = max(jumps, key=jumps.get)
    said = f"raw, the noisiest curve is {noisiest}'s (its loss jumps {jumps[noisiest]:.2f} per logged step)"
    lines = [_line(True if smoothing == 0 else None, "SMOOTHING = 0", said if smoothing == 0 else "not tried")]
    longest = max(curves, key=lambda name: len(curves[name]))
    loss = curves[longest]
    lag = [s - raw for s, raw in zip(ema(loss, 0.99), loss, strict=True)]
    worst = max(range(len(lag)), key=lambda i: lag[i])
    lines.append(
        _line(
            worst < len(loss) / 2 if smoothing == 0.99 else None,
            "SMOOTHING = 0.99",
            f"on {longest}, the smoothed line is furthest above the raw one at logged step {worst + 1} of {len(loss)}"
            if smoothing == 0.99
            else "not tried",
        )
    )
    per_step = {r.name: (r.train.get("tokens") or [0])[-1] / r.train["step"][-1] for r in runs if r.name in curves}
    if x_axis != "tokens" or not all(per_step.values()):
        lines.append(_line(None, 'X_AXIS = "tokens"', "not tried"))
    else:
        differ = max(per_step.values()) > 1.1 * min(per_step.values())
        text = ", ".join(f"{name} {n:,.0f}" for name, n in per_step.items())
        lines.append(_line(differ or len(per_step) == 1, 'X_AXIS = "tokens"', f"tokens per step: {text}"))
    right = sum((diagnosis or {}).get(k, "").strip().lower() == v for k, v in PLANTED_TRUTH.items())
    lines.append(
        _line(
            None if not diagnosis else right == len(PLANTED_TRUTH),
            "DIAGNOSIS",
            f"{right} of {len(PLANTED_TRUTH)} planted runs diagnosed right" if diagnosis else "not made yet",
        )
    )
    return lines
