"""The check cells under each notebook's "Try this": what the learner's own runs showed, item by item.

Each ``notebook_NN`` function reads what the runs left (the notebook's prepared data, the folders the Try this
commands write, ``runs/sampling/answers.jsonl``) and returns one line per item:

    ✓  the run showed what the folded answer says
    ✗  the run showed something else (and what)
    ·  not tried yet, and how to try it

Nothing here trains or samples: a check only reads.
"""

from __future__ import annotations

import functools
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


class _Unreadable(Exception):
    """A file a check needs but cannot read: the item's line names the file and says why, in place of a verdict."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.reason = reason


def _item(name: str):
    """A check of one item: it gets the item's name first; a file it cannot read marks the item instead of failing."""

    def decorate(check):
        @functools.wraps(check)
        def marked(*args):
            try:
                return check(name, *args)
            except _Unreadable as e:
                return _line(None, name, str(e))

        return marked

    return decorate


def _reason(error: Exception) -> str:
    """Why a file could not be read, in a few words."""
    if isinstance(error, FileNotFoundError):
        return "there is no such file"
    if isinstance(error, IsADirectoryError):
        return "it is a folder"
    if isinstance(error, json.JSONDecodeError):
        return f"it is not JSON ({error.msg} at line {error.lineno})"
    if isinstance(error, UnicodeDecodeError):
        return "it is not UTF-8 text"
    return (error.strerror if isinstance(error, OSError) else None) or str(error)


_KINDS = {  # what a JSON value is, in words
    dict: "a JSON object",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true or false",
    type(None): "null",
}
_WANTED = {**_KINDS, int: "a whole number"}  # what a check wants of a field


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``, or _Unreadable with the reason."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise _Unreadable(path, _reason(e)) from None
    if not isinstance(data, dict):
        raise _Unreadable(path, f"it holds {_KINDS[type(data)]}, not a JSON object")
    return data


_REQUIRED = object()


def _field(data: dict, path: Path, *keys: str, kind: type = int, default=_REQUIRED):
    """``data[keys[0]][keys[1]]...`` (read from ``path``) when it is a ``kind``; ``default`` where a key is missing,
    if one is given; _Unreadable otherwise."""
    value, name = data, ".".join(keys)
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            if default is not _REQUIRED:
                return default
            raise _Unreadable(path, f"it has no {name}")
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _Unreadable(path, f"its {name} is {_KINDS[type(value)]}, not {_WANTED[kind]}")
    return value


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- notebook 01 ------------------------------------------------------------------------------------------------------
def notebook_01(out: str | Path, filters: str, system_turn: bool, source: str, history_dir: Path = HISTORY_DIR):
    """The three items of notebook 01 on the prepared folder ``out`` (its ``report.json`` and train split). Each run
    is remembered in ``history_dir/01.json`` (the last 20), to compare a run with an earlier one of other settings."""
    out = Path(out)
    path = out / "report.json"
    if not path.exists():
        return [_line(False, "notebook 01", f"no report.json in {out}: run the notebook's cells first")]
    try:
        report = _read_json(path)
    except _Unreadable as e:
        return [_line(False, "notebook 01", f"{e}: run the notebook's cells again")]
    sample = str(source).rstrip("/").endswith("sample/ultrachat_200k")
    return [
        _check_filters(report, path, filters, sample),
        _check_system_turn(out, report, filters, system_turn, source, history_dir),
        _check_raw(report, path, source),
    ]


@_item('FILTERS = "all"')
def _check_filters(item: str, report: dict, path: Path, filters: str, sample: bool) -> str:
    dropped = _field(report, path, "dropped", kind=dict)
    if not all(_is_number(n) for n in dropped.values()):
        raise _Unreadable(path, "its dropped counts are not all numbers")
    structure = sum(n for reason, n in dropped.items() if reason not in ("disclaimer", "duplicate_prompt"))
    said = (
        f"{sum(dropped.values())} rows dropped: {structure} for their structure, "
        f"{dropped.get('disclaimer', 0)} disclaimers, {dropped.get('duplicate_prompt', 0)} duplicate prompts"
    )
    if filters != "all" or not sample:
        return _line(None, item, f"not tried (this run: FILTERS = {filters!r}, {said})")
    ok = sum(dropped.values()) == 16 and dropped.get("disclaimer") == 3 and dropped.get("duplicate_prompt") == 2
    return _line(ok, item, said + ("" if ok else " (the answer says 16: 11 + 3 + 2)"))


@_item("SYSTEM_TURN = False")
def _check_system_turn(
    item: str, out: Path, report: dict, filters: str, system_turn: bool, source: str, history_dir: Path
) -> str:
    seen = {
        "source": str(source),
        "filters": filters,
        "system_turn": system_turn,
        "tokenization": report.get("tokenization"),
        "train_tokens": _field(report, out / "report.json", "outputs", "train", "total_tokens"),
        "without_own_system": _without_own_system(out),
    }
    history, trouble = _remember(seen, history_dir)
    also = f"; {trouble}" if trouble else ""
    if system_turn:
        return _line(None, item, f"not tried (this run's train split: {seen['train_tokens']:,} tokens){also}")
    key = ("source", "filters", "tokenization")
    same = [
        h
        for h in history
        if h.get("system_turn") is True and _is_number(h.get("train_tokens")) and all(h.get(k) == seen[k] for k in key)
    ]
    if not same:
        if trouble:
            return _line(None, item, f"cannot compare with an earlier run: {trouble}")
        return _line(None, item, "run the notebook once with SYSTEM_TURN = True as well, then this cell again")
    lost = same[-1]["train_tokens"] - seen["train_tokens"]
    n = seen["without_own_system"]
    per = lost / n if n else float("nan")
    return _line(
        lost == 9 * n,
        item,
        f"{lost:,} tokens fewer ({same[-1]['train_tokens']:,} -> {seen['train_tokens']:,}) over the {n} dialogues "
        f"without a system prompt of their own: {per:.1f} each{also}",
    )


def _without_own_system(out: Path) -> int:
    """How many train dialogues of the prepared folder ``out`` have no system prompt of their own."""
    import datasets

    try:
        train = datasets.load_from_disk(str(out))["train"]
    except (OSError, KeyError):  # FileNotFoundError: no dataset saved there; KeyError: no train split
        raise _Unreadable(out, "there is no prepared train split in it") from None
    return len(train) - sum(bool(m and m[0]["role"] == "system" and m[0]["content"]) for m in train["messages"])


def _remember(seen: dict, folder: Path) -> tuple[list[dict], str | None]:
    """The runs notebook 01 remembers in ``folder/01.json``, ``seen`` last, and why ``seen`` could not be added, if
    so: a damaged file, or a file where the folder goes, is left as it is (it may hold the learner's own data)."""
    file = folder / "01.json"
    if folder.exists() and not folder.is_dir():
        return [seen], (
            f"{folder} is a file, not a folder, so this run is not remembered; the file is left as it is: move it away"
        )
    try:
        runs = _field(_read_json(file), file, "runs", kind=list, default=[]) if file.exists() else []
        if not all(isinstance(h, dict) for h in runs):
            raise _Unreadable(file, "its runs are not all JSON objects")
    except _Unreadable as e:
        return [seen], (
            f"{file} is damaged ({e.reason}), so this run is not remembered; the file is left as it is: repair or "
            "remove it"
        )
    history = [h for h in runs if h != seen] + [seen]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / ".01.json.partial"  # written whole, then swapped in: a stopped write damages nothing
        partial.write_text(json.dumps({"runs": history[-20:]}, indent=1) + "\n")
        partial.replace(file)
    except OSError as e:
        return history, f"cannot write {file} ({_reason(e)}), so this run is not remembered"
    return history, None


@_item('SOURCE = "data/sample/ultrachat_raw/ultrachat_raw.jsonl"')
def _check_raw(item: str, report: dict, path: Path, source: str) -> str:
    if "ultrachat_raw" not in str(source):
        return _line(None, item, "not tried (this run read ultrachat_200k, which has its own test split)")
    test = _field(report, path, "outputs", "test", "dialogues", default=0)
    return _line(
        test == 1, item, f"{test} test dialogue(s) of {_field(report, path, 'kept')} kept, held out by prompt hash"
    )


# --- notebook 02 ------------------------------------------------------------------------------------------------------
def adapter_parameters(adapter: Path) -> int:
    """How many numbers an adapter folder's ``adapter_model.safetensors`` holds (_Unreadable when it cannot say)."""
    from safetensors import SafetensorError, safe_open

    weights = adapter / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (a safetensors handle)
    except (OSError, SafetensorError) as e:
        raise _Unreadable(weights, _reason(e)) from None


def _finished(folder: Path) -> bool:
    from utils.runs import RunError, read_record

    try:
        return read_record(folder).get("status") == "finished"
    except RunError:  # damaged, or not written by utils.sft: not a finished run of ours
        return False


def notebook_02(runs_dir: str | Path = RUNS_DIR, main_run: str | Path | None = None) -> list[str]:
    """The items of notebook 02, read from the folders its commands write under ``runs_dir``; ``main_run`` is the
    notebook's own run (default ``runs_dir/qlora``)."""
    runs = Path(runs_dir)
    main = Path(main_run) if main_run else runs / "qlora"
    r64, split, ten, answers = runs / "qlora-r64", runs / "qlora-split", runs / "qlora-10", runs / "qlora-answers"
    lines = [_check_rank_64(r64, main), _check_split(split, main), _check_ten_steps(ten)]
    lines.append(_check_answers_only(answers, main))
    done = [f for f in (r64, split, ten, answers) if _finished(f)]
    if not done:
        lines.append(_line(None, "a second run", "run one of the commands first"))
    else:
        times = ", ".join(f"{f.name} {_mtime(f / 'trainer_state.json')}" for f in done)
        lines.append(
            _line(None, "a second run", f"last written: {times}; run a command again, then this cell: the times stay")
        )
    return lines


@_item("rank 64")
def _check_rank_64(item: str, r64: Path, main: Path) -> str:
    if not _finished(r64):
        return _line(None, item, "not run yet (runs/qlora-r64)")
    n64 = adapter_parameters(r64 / "adapter")
    config = r64 / "adapter" / "adapter_config.json"
    r = _field(_read_json(config), config, "r")
    n16 = adapter_parameters(main / "adapter") if (main / "adapter" / "adapter_model.safetensors").exists() else None
    ok = r == 64 and (n16 is None or n64 == 4 * n16)
    than = f", {n64 / n16:.1f}x rank 16's {n16:,}" if n16 else ""
    return _line(ok, item, f"r = {r}, {n64:,} adapter parameters{than}")


@_item("bfd_split")
def _check_split(item: str, split: Path, main: Path) -> str:
    from utils.runs import REPORT_FILE

    if not _finished(split):
        return _line(None, item, "not run yet (runs/qlora-split)")
    rows = _field(_read_json(split / REPORT_FILE), split / REPORT_FILE, "packed_rows")
    if not (main / REPORT_FILE).exists():
        return _line(None, item, f"{rows} packed rows; run the notebook's own run to compare")
    bfd = _field(_read_json(main / REPORT_FILE), main / REPORT_FILE, "packed_rows")
    return _line(rows > bfd, item, f"{rows} packed rows, against {bfd} with bfd")


@_item("ten steps")
def _check_ten_steps(item: str, ten: Path) -> str:
    from utils.curves import read_trainer_state

    if not _finished(ten):
        return _line(None, item, "not run yet (runs/qlora-10)")
    state = ten / "trainer_state.json"
    try:
        logged = read_trainer_state(state).train
    except (OSError, ValueError) as e:  # ValueError: not JSON, or its log is not numbers
        raise _Unreadable(state, _reason(e)) from None
    lrs = [(lr, s) for lr, s in zip(logged["learning_rate"], logged["step"], strict=True) if _is_number(lr)]
    if not lrs:
        raise _Unreadable(state, "it logged no learning rate")
    peak = max(lr for lr, _ in lrs)
    step = next(s for lr, s in lrs if lr == peak)  # the first step at the peak
    said = f"the learning rate is {lrs[0][0]:g} at step 1 and peaks at step {step} ({peak:g})"
    return _line(step == 2, item, said)  # one warm-up step from 0, then the peak


def _end_loss(folder: Path) -> float | None:
    """The median of the last tenth of a run's logged losses (``utils.tiny_world.loss_ends``); None when it logged
    too few."""
    from utils.curves import read_trainer_state
    from utils.tiny_world import loss_ends

    state = folder / "trainer_state.json"
    try:
        losses = read_trainer_state(state).train["loss"]
    except (OSError, ValueError) as e:  # ValueError: not JSON, or its log is not numbers
        raise _Unreadable(state, _reason(e)) from None
    ends = loss_ends(losses)
    return ends[1] if ends else None


@_item("answers only")
def _check_answers_only(item: str, answers: Path, main: Path) -> str:
    if not _finished(answers):
        return _line(None, item, "not run yet (runs/qlora-answers)")
    settings = _field(_read_json(answers / "run.json"), answers / "run.json", "settings", kind=dict)
    if settings.get("assistant_only_loss") is not True:
        return _line(False, item, "runs/qlora-answers was trained on every token: run the command as written")
    end = _end_loss(answers)
    if end is None:
        return _line(None, item, "too few logged steps for the median of a last tenth: run the command as written")
    said = f"its training loss ends at {end:.3f} (median of the last tenth of the steps)"
    theirs = _end_loss(main) if _finished(main) else None
    if theirs is None:
        return _line(None, item, f"{said}; run the notebook's own run to compare")
    return _line(end < theirs, item, f"{said}, against {theirs:.3f} with the loss on every token")


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


@_item("1 sequence per device")
def _check_ranks(item: str, folder: Path) -> str:
    files = [folder / "rank_logs" / f"rank{r}.json" for r in (0, 1)]
    if not _finished(folder) or not all(f.exists() for f in files):
        return _line(None, item, "not run yet (runs/full-bs1)")
    (own0, logged0), (own1, logged1) = (_rank_losses(f) for f in files)
    means = [statistics.mean(pair) for pair in zip(own0, own1, strict=False)]
    differ = sum(abs(a - b) > 1e-6 for a, b in zip(own0, own1, strict=False))
    same = all(abs(a - b) <= 1e-3 * abs(b) + 1e-4 for a, b in zip(logged0, means, strict=False))
    return _line(
        differ > 0 and same and logged0 == logged1,
        item,
        f"own losses differ at {differ} of {len(own0)} steps; the logged loss is their mean at "
        f"{'every' if same else 'not every'} step, on both ranks",
    )


def _rank_losses(file: Path) -> tuple[list, list]:
    """A rank's own losses and the losses it logged (the mean over ranks), from its ``rank_logs/rankN.json``."""
    log = _read_json(file)
    own, logged = (_field(log, file, key, kind=list) for key in ("own_losses", "losses"))
    if not all(_is_number(x) for x in own + logged):
        raise _Unreadable(file, "its losses are not all numbers")
    return own, logged


# --- notebook 05 ------------------------------------------------------------------------------------------------------
def notebook_05(answers: list[dict]) -> list[str]:
    """The items of notebook 05, read from the answers ``python -m utils.sampling`` logged. The hot-sampling item
    counts the tiny world's words (``utils.tiny_world.world_share``): it speaks of the smoke models."""
    from utils.tiny_world import is_pirate, world_share

    lines = []
    sampled, odd = [], []  # answers to the card's prompt, with and without a number for their temperature
    for a in answers:
        if a.get("prompt") is None:
            (sampled if _is_number(a.get("temperature")) else odd).append(a)
    cold = [a for a in sampled if a["temperature"] <= 0.05]
    pairs = {}
    for a in cold:
        pairs.setdefault(a["model"], {})[repr(a.get("seed"))] = a["text"]
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
    hot = [a for a in sampled if a["temperature"] >= 1.5]
    if not hot or not cold:
        lines.append(_line(None, "hot sampling", "run the temperature 1.5 command (and the 0.01 ones to compare)"))
    else:
        h, c = (statistics.mean(world_share(a["text"]) for a in group) for group in (hot, cold))
        lines.append(_line(h < c, "hot sampling", f"{h:.0%} of the words at 1.5 are the tiny world's, {c:.0%} at 0.01"))
    if odd:
        values = " or ".join(sorted({repr(a.get("temperature")) for a in odd}))
        said = f"{len(odd)} answer{'s' if len(odd) > 1 else ''} logged with temperature {values}, not a number"
        lines.append(_line(None, "answer log", f"{said}: left out of almost greedy and hot sampling"))
    return lines


# --- notebook 04 ------------------------------------------------------------------------------------------------------
def notebook_04(runs: list, smoothing: float, x_axis: str, diagnosis: dict) -> list[str]:
    """The items of notebook 04 on the runs it plotted (``utils.curves.RunLog``) and the learner's diagnosis."""
    from utils.curves import PLANTED_TRUTH, diagnosis_of, ema

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
    per_step = {r.name: _tokens_per_step(r) for r in runs if r.name in curves}
    if x_axis != "tokens":
        lines.append(_line(None, 'X_AXIS = "tokens"', "not tried"))
    elif not all(per_step.values()):
        silent = ", ".join(name for name, n in per_step.items() if not n)
        lines.append(_line(None, 'X_AXIS = "tokens"', f"no token counts logged by {silent}"))
    else:
        differ = max(per_step.values()) > 1.1 * min(per_step.values())
        text = ", ".join(f"{name} {n:,.0f}" for name, n in per_step.items())
        lines.append(_line(differ or len(per_step) == 1, 'X_AXIS = "tokens"', f"tokens per step: {text}"))
    right = sum(diagnosis_of((diagnosis or {}).get(k) or "") == v for k, v in PLANTED_TRUTH.items())
    lines.append(
        _line(
            None if not diagnosis else right == len(PLANTED_TRUTH),
            "DIAGNOSIS",
            f"{right} of {len(PLANTED_TRUTH)} planted runs diagnosed right" if diagnosis else "not made yet",
        )
    )
    return lines


def _tokens_per_step(run) -> float:
    """Tokens per optimizer step at a run's last logged token count (0 when it logged none)."""
    logged = zip(run.train.get("tokens", []), run.train.get("step", []), strict=False)
    counts = [(n, step) for n, step in logged if _is_number(n) and _is_number(step) and step > 0]
    return counts[-1][0] / counts[-1][1] if counts else 0
