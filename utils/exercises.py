"""The check cells under each notebook's "Try this": a line per item, ✓ the learner's run showed the folded answer, ✗ it
showed something else, · not tried yet. A file a check cannot read marks its item with the reason instead of failing."""

from __future__ import annotations

import datetime
import itertools
import json
import math
import statistics
from pathlib import Path

from utils import RUNS_DIR
from utils.curves import PLANTED_TRUTH, diagnosis_of, ema, read_trainer_state
from utils.runs import REPORT_FILE, RunError, read_record
from utils.scaling import accumulation_for, estimate
from utils.tiny_world import is_pirate, loss_ends, world_share

HISTORY_DIR = RUNS_DIR / "exercises"  # notebook 01 compares a run with an earlier one of other settings
_KINDS = {dict: "a JSON object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}
_WORDS = {
    FileNotFoundError: "there is no such file",
    IsADirectoryError: "it is a folder",
    UnicodeDecodeError: "it is not UTF-8 text",
}


def show(lines: list[str]) -> None:
    print("\n".join(lines))


class _Unreadable(Exception):
    """A file a check needs but cannot read, ``(path, why)``: its item's line says so in place of a verdict."""

    def __str__(self) -> str:
        return f"cannot read {self.args[0]}: {self.args[1]}"


def _line(ok: bool | None, item: str, text: str) -> str:
    return f"{'·' if ok is None else '✓' if ok else '✗'} {item}: {text}"


def _check(item: str, check, *args, run: Path | None = None) -> str:
    """The item's line from ``check(*args)``'s (ok, text); "not run yet" until the run folder ``run`` has finished."""
    if run and not _finished(run):
        return _line(None, item, f"not run yet (runs/{run.name})")
    try:
        ok, text = check(*args)
    except _Unreadable as e:
        ok, text = None, str(e)
    return _line(ok, item, text)


def _reason(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"it is not JSON ({error.msg} at line {error.lineno})"
    return _WORDS.get(type(error)) or getattr(error, "strerror", None) or str(error)


def _json(path: Path, *keys: str, kind: type = int, default=None):
    """``path``'s JSON object (``kind=dict``), or its ``[keys[0]][keys[1]]...`` as a ``kind`` (``default``: if none)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise _Unreadable(path, _reason(e)) from None
    if not isinstance(value, dict):
        raise _Unreadable(path, f"it holds {_KINDS.get(type(value), 'a number')}, not a JSON object")
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            if default is None:
                raise _Unreadable(path, f"it has no {'.'.join(keys)}")
            return default
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        wanted = "a whole number" if kind is int else _KINDS[kind]
        raise _Unreadable(path, f"its {'.'.join(keys)} is {_KINDS.get(type(value), 'a number')}, not {wanted}")
    return value


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- notebook 01 ------------------------------------------------------------------------------------------------------
def notebook_01(out: str | Path, filters: str, system_turn: bool, source: str, history_dir: Path = HISTORY_DIR):
    """Notebook 01's items on the prepared folder ``out``; the last 20 runs are kept in ``history_dir/01.json``."""
    out = Path(out)
    path = out / "report.json"
    if not path.exists():
        return [_line(False, "notebook 01", f"no report.json in {out}: run the notebook's cells first")]
    try:
        _json(path, kind=dict)
    except _Unreadable as e:
        return [_line(False, "notebook 01", f"{e}: run the notebook's cells again")]
    sample = str(source).rstrip("/").endswith("sample/ultrachat_200k")
    return [
        _check('FILTERS = "all"', _filters, path, filters, sample),
        _check("SYSTEM_TURN = False", _system_turn, path, filters, system_turn, source, history_dir),
        _check('SOURCE = "data/sample/ultrachat_raw/ultrachat_raw.jsonl"', _raw, path, source),
    ]


def _filters(path: Path, filters: str, sample: bool):
    dropped = _json(path, "dropped", kind=dict)
    if not all(_is_number(n) for n in dropped.values()):
        raise _Unreadable(path, "its dropped counts are not all numbers")
    disclaimers, duplicates = dropped.get("disclaimer", 0), dropped.get("duplicate_prompt", 0)
    total = sum(dropped.values())
    said = f"{total} rows dropped: {total - disclaimers - duplicates} for their structure, {disclaimers} disclaimers, "
    said += f"{duplicates} duplicate prompts"
    if filters != "all" or not sample:
        return None, f"not tried (this run: FILTERS = {filters!r}, {said})"
    ok = (total, disclaimers, duplicates) == (16, 3, 2)
    return ok, said + ("" if ok else " (the answer says 16: 11 + 3 + 2)")


def _system_turn(path: Path, filters: str, system_turn: bool, source: str, history_dir: Path):
    import datasets

    tokenization, tokens = _json(path, kind=dict).get("tokenization"), _json(path, "outputs", "train", "total_tokens")
    try:
        train = datasets.load_from_disk(str(path.parent))["train"]
    except (OSError, KeyError):  # FileNotFoundError: no dataset saved there; KeyError: no train split
        raise _Unreadable(path.parent, "there is no prepared train split in it") from None
    own = sum(bool(m and m[0]["role"] == "system" and m[0]["content"]) for m in train["messages"])  # a system prompt
    seen = {"source": str(source), "filters": filters, "system_turn": system_turn, "tokenization": tokenization}
    seen |= {"train_tokens": tokens, "without_own_system": len(train) - own}
    history, trouble = _remember(seen, history_dir)
    also = f"; {trouble}" if trouble else ""
    if system_turn:
        return None, f"not tried (this run's train split: {seen['train_tokens']:,} tokens){also}"
    earlier = [h for h in history if h.get("system_turn") is True and _is_number(h.get("train_tokens"))]
    same = [h for h in earlier if all(h.get(k) == seen[k] for k in ("source", "filters", "tokenization"))]
    if not same:
        if trouble:
            return None, f"cannot compare with an earlier run: {trouble}"
        return None, "run the notebook once with SYSTEM_TURN = True as well, then this cell again"
    before, after, n = same[-1]["train_tokens"], seen["train_tokens"], seen["without_own_system"]
    per = (before - after) / n if n else float("nan")
    said = f"{before - after:,} tokens fewer ({before:,} -> {after:,}) over the {n} dialogues without a system prompt"
    return before - after == 9 * n, f"{said} of their own: {per:.1f} each{also}"


def _remember(seen: dict, folder: Path) -> tuple[list[dict], str | None]:
    """The runs remembered in ``folder/01.json``, ``seen`` last, and why ``seen`` was not added, if so: a damaged
    file, or a file where the folder goes, is left as it is (it may hold the learner's own data)."""
    file = folder / "01.json"
    if folder.exists() and not folder.is_dir():
        left = "the file is left as it is: move it away"
        return [seen], f"{folder} is a file, not a folder, so this run is not remembered; {left}"
    try:
        runs = _json(file, "runs", kind=list, default=[]) if file.exists() else []
        if not all(isinstance(h, dict) for h in runs):
            raise _Unreadable(file, "its runs are not all JSON objects")
    except _Unreadable as e:
        left = "the file is left as it is: repair or remove it"
        return [seen], f"{file} is damaged ({e.args[1]}), so this run is not remembered; {left}"
    history = [h for h in runs if h != seen] + [seen]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / ".01.json.partial"  # written whole, then swapped in: a stopped write damages nothing
        partial.write_text(json.dumps({"runs": history[-20:]}, indent=1) + "\n")
        partial.replace(file)
    except OSError as e:
        return history, f"cannot write {file} ({_reason(e)}), so this run is not remembered"
    return history, None


def _raw(path: Path, source: str):
    if "ultrachat_raw" not in str(source):
        return None, "not tried (this run read ultrachat_200k, which has its own test split)"
    test = _json(path, "outputs", "test", "dialogues", default=0)
    return test == 1, f"{test} test dialogue(s) of {_json(path, 'kept')} kept, held out by prompt hash"


# --- notebook 02 ------------------------------------------------------------------------------------------------------
def notebook_02(runs_dir: str | Path = RUNS_DIR, main_run: str | Path | None = None) -> list[str]:
    """Notebook 02's items, from its commands' run folders in ``runs_dir`` and its own run (``runs_dir/qlora``)."""
    runs = Path(runs_dir)
    main = Path(main_run) if main_run else runs / "qlora"
    r64, split, ten, answers = (runs / f"qlora-{name}" for name in ("r64", "split", "10", "answers"))
    lines = [
        _check("rank 64", _rank_64, r64, main, run=r64),
        _check("bfd_split", _split, split, main, run=split),
        _check("ten steps", _ten_steps, ten, run=ten),
        _check("answers only", _answers_only, answers, main, run=answers),
    ]
    states = [f / "trainer_state.json" for f in (r64, split, ten, answers) if _finished(f)]
    when = [f"{datetime.datetime.fromtimestamp(s.stat().st_mtime):%H:%M:%S}" if s.exists() else "never" for s in states]
    times = ", ".join(f"{s.parent.name} {t}" for s, t in zip(states, when, strict=True))
    said = f"last written: {times}; run a command again, then this cell: the times stay"
    return [*lines, _line(None, "a second run", said if states else "run one of the commands first")]


def _finished(folder: Path) -> bool:
    try:
        return read_record(folder).get("status") == "finished"
    except RunError:  # damaged, or not written by utils.sft: not a finished run of ours
        return False


def _adapter_size(adapter: Path) -> int:
    from safetensors import SafetensorError, safe_open

    weights = adapter / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (a safetensors handle)
    except (OSError, SafetensorError) as e:
        raise _Unreadable(weights, _reason(e)) from None


def _rank_64(r64: Path, main: Path):
    n64, r = _adapter_size(r64 / "adapter"), _json(r64 / "adapter" / "adapter_config.json", "r")
    n16 = _adapter_size(main / "adapter") if (main / "adapter" / "adapter_model.safetensors").exists() else None
    than = f", {n64 / n16:.1f}x rank 16's {n16:,}" if n16 else ""
    return r == 64 and (n16 is None or n64 == 4 * n16), f"r = {r}, {n64:,} adapter parameters{than}"


def _split(split: Path, main: Path):
    rows = _json(split / REPORT_FILE, "packed_rows")
    if not (main / REPORT_FILE).exists():
        return None, f"{rows} packed rows; run the notebook's own run to compare"
    bfd = _json(main / REPORT_FILE, "packed_rows")
    return rows > bfd, f"{rows} packed rows, against {bfd} with bfd"


def _logged(folder: Path) -> dict[str, list]:
    state = folder / "trainer_state.json"
    try:
        return read_trainer_state(state).train
    except (OSError, ValueError) as e:  # ValueError: not JSON, or its log is not numbers
        raise _Unreadable(state, _reason(e)) from None


def _ten_steps(ten: Path):
    logged = _logged(ten)
    lrs = [(lr, s) for lr, s in zip(logged["learning_rate"], logged["step"], strict=True) if _is_number(lr)]
    if not lrs:
        raise _Unreadable(ten / "trainer_state.json", "it logged no learning rate")
    peak, step = max(lrs, key=lambda pair: pair[0])  # max keeps the first of equals: the first step at the peak
    said = f"the learning rate is {lrs[0][0]:g} at step 1 and peaks at step {step} ({peak:g})"
    return step == 2, said  # one warm-up step from 0, then the peak


def _answers_only(answers: Path, main: Path):
    if read_record(answers)["settings"].get("assistant_only_loss") is not True:  # a finished run: its record is read
        return False, "runs/qlora-answers was trained on every token: run the command as written"
    ends = loss_ends(_logged(answers)["loss"])
    if ends is None:
        return None, "too few logged steps for the median of a last tenth: run the command as written"
    said = f"its training loss ends at {ends[1]:.3f} (median of the last tenth of the steps)"
    theirs = loss_ends(_logged(main)["loss"]) if _finished(main) else None
    if theirs is None:
        return None, f"{said}; run the notebook's own run to compare"
    return ends[1] < theirs[1], f"{said}, against {theirs[1]:.3f} with the loss on every token"


# --- notebook 03 ------------------------------------------------------------------------------------------------------
def notebook_03(predictions: dict, runs_dir: str | Path = RUNS_DIR) -> list[str]:
    """Notebook 03's items: the predictions (None: not made) against ``utils.scaling``, and ``runs_dir/full-bs1``."""
    lines = []
    for item, (gpus, per_device) in {"accumulation, 16 GPUs x 4": (16, 4), "accumulation, 4 GPUs x 2": (4, 2)}.items():
        truth, guess = accumulation_for(512, gpus, per_device), predictions.get(item)
        said = f"you said {guess}, it is {truth} ({per_device} x {gpus} x {truth} = 512)"
        lines.append(_predicted(item, guess, truth, said))
    folder = Path(runs_dir) / "full-bs1"
    lines.append(_check("1 sequence per device", _ranks, folder, run=folder))
    fsdp, zero3 = (estimate(s, 8, 80).total for s in ("fsdp", "zero3"))
    truth = "same" if abs(fsdp - zero3) < 0.05 else "fsdp" if fsdp < zero3 else "zero3"
    guess = predictions.get("less memory per GPU on 8 GPUs: fsdp, zero3 or same")
    said = f"you said {guess}, the estimate says {truth} ({fsdp:.1f} vs {zero3:.1f} GiB per GPU)"
    return [*lines, _predicted("fsdp or zero3", guess, truth, said)]


def _predicted(item: str, guess, truth, said: str) -> str:
    return _line(None, item, "no prediction yet") if guess is None else _line(guess == truth, item, said)


def _ranks(folder: Path):
    files = [folder / "rank_logs" / f"rank{r}.json" for r in (0, 1)]
    if not all(f.exists() for f in files):
        return None, "not run yet (runs/full-bs1)"
    read = []
    for file in files:
        own, logged = (_json(file, key, kind=list) for key in ("own_losses", "losses"))
        if not all(_is_number(x) for x in own + logged):
            raise _Unreadable(file, "its losses are not all numbers")
        read.append((own, logged))
    (own0, logged0), (own1, logged1) = read
    means = [statistics.mean(pair) for pair in zip(own0, own1, strict=False)]
    differ = sum(abs(a - b) > 1e-6 for a, b in zip(own0, own1, strict=False))
    same = all(abs(a - b) <= 1e-3 * abs(b) + 1e-4 for a, b in zip(logged0, means, strict=False))
    said = f"the logged loss is their mean at {'every' if same else 'not every'} step, on both ranks"
    return differ > 0 and same and logged0 == logged1, f"own losses differ at {differ} of {len(own0)} steps; {said}"


# --- notebook 04 ------------------------------------------------------------------------------------------------------
def notebook_04(runs: list, smoothing: float, x_axis: str, diagnosis: dict) -> list[str]:
    """The items of notebook 04 on the runs it plotted (``utils.curves.RunLog``) and the learner's diagnosis."""
    curves = {r.name: r.train.get("loss", []) for r in runs if len(r.train.get("loss", [])) >= 4}
    if not curves:
        return [_line(None, "notebook 04", "no run with 4 or more logged losses: run notebook 02 first")]
    jumps = {name: statistics.mean(abs(b - a) for a, b in itertools.pairwise(loss)) for name, loss in curves.items()}
    noisiest = max(jumps, key=jumps.get)
    said = f"raw, the noisiest curve is {noisiest}'s (its loss jumps {jumps[noisiest]:.2f} per logged step)"
    items = {"SMOOTHING = 0": (True, said) if smoothing == 0 else (None, "not tried")}
    longest, loss = max(curves.items(), key=lambda pair: len(pair[1]))
    lag = [s - raw for s, raw in zip(ema(loss, 0.99), loss, strict=True)]
    worst = max(range(len(lag)), key=lambda i: lag[i])
    said = f"on {longest}, the smoothed line is furthest above the raw one at logged step {worst + 1} of {len(loss)}"
    items["SMOOTHING = 0.99"] = (worst < len(loss) / 2, said) if smoothing == 0.99 else (None, "not tried")
    per_step = {r.name: _tokens_per_step(r) for r in runs if r.name in curves}
    silent = ", ".join(name for name, n in per_step.items() if not n)
    text = ", ".join(f"{name} {n:,.0f}" for name, n in per_step.items())
    differ = max(per_step.values()) > 1.1 * min(per_step.values()) or len(per_step) == 1
    tokens = (None, f"no token counts logged by {silent}") if silent else (differ, f"tokens per step: {text}")
    items['X_AXIS = "tokens"'] = tokens if x_axis == "tokens" else (None, "not tried")
    right = sum(diagnosis_of((diagnosis or {}).get(k) or "") == v for k, v in PLANTED_TRUTH.items())
    said = f"{right} of {len(PLANTED_TRUTH)} planted runs diagnosed right"
    items["DIAGNOSIS"] = (right == len(PLANTED_TRUTH), said) if diagnosis else (None, "not made yet")
    return [_line(ok, item, text) for item, (ok, text) in items.items()]


def _tokens_per_step(run) -> float:
    """Tokens per optimizer step at a run's last logged token count (0 when it logged none)."""
    logged = zip(run.train.get("tokens", []), run.train.get("step", []), strict=False)
    counts = [(n, step) for n, step in logged if _is_number(n) and _is_number(step) and step > 0]
    return counts[-1][0] / counts[-1][1] if counts else 0


# --- notebook 05 ------------------------------------------------------------------------------------------------------
def notebook_05(answers: list[dict]) -> list[str]:
    """Notebook 05's items from the logged answers; hot sampling counts the tiny world's words (the smoke models)."""
    card = [a for a in answers if a.get("prompt") is None]  # answers to the card's prompt
    sampled = [a for a in card if _is_number(a.get("temperature"))]
    odd = [a for a in card if not _is_number(a.get("temperature"))]  # left out of the items on temperature
    cold, hot = [a for a in sampled if a["temperature"] <= 0.05], [a for a in sampled if a["temperature"] >= 1.5]
    seeds = {}
    for a in cold:
        seeds.setdefault(a["model"], {})[repr(a.get("seed"))] = a["text"]
    compared = {model: len(set(texts.values())) == 1 for model, texts in seeds.items() if len(texts) >= 2}
    same = sum(compared.values())
    said = f"{same} of {len(compared)} models gave the same answer for every seed"
    how = "run both commands (seeds 1 and 2 at temperature 0.01)"
    items = {"almost greedy": (same == len(compared), said) if compared else (None, how)}
    plain = [a for a in answers if a.get("prompt") and not a.get("system") and a["model"] != "base"]
    pirates = sum(is_pirate(a["text"]) for a in plain)
    said = f"{pirates} of {len(plain)} fine-tuned answers talk like a pirate"
    how = "run the command with --prompt"
    items["without the system message"] = (pirates <= len(plain) / 2, said) if plain else (None, how)
    items["hot sampling"] = None, "run the temperature 1.5 command (and the 0.01 ones to compare)"
    if hot and cold:
        h, c = (statistics.mean(world_share(a["text"]) for a in group) for group in (hot, cold))
        items["hot sampling"] = h < c, f"{h:.0%} of the words at 1.5 are the tiny world's, {c:.0%} at 0.01"
    if odd:
        values = " or ".join(sorted({repr(a.get("temperature")) for a in odd}))
        said = f"{len(odd)} answer{'s' if len(odd) > 1 else ''} logged with temperature {values}, not a number"
        items["answer log"] = None, f"{said}: left out of almost greedy and hot sampling"
    return [_line(ok, item, text) for item, (ok, text) in items.items()]
