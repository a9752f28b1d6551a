"""The three kinds of feedback set the labelling page serves, and the files it writes.

A folder holds one set, recognised by its input file:

    pairs.json        a D3PO round (written by a run with `args.labels`): one pair per row,
                      {"prompt", "a", "b", "a_file", "b_file"} (or "a_value"/"b_value" for
                      non-image samples). Answers a / b / tie. Writes labels.json, the file
                      the run reads, once every pair is answered.
    images.jsonl      a KTO set: {"prompt", "image"} per line. Answers desirable /
                      undesirable / skip. Writes labels.jsonl ({"prompt", "image",
                      "desirable"}, skipped images left out), what diffusion-kto reads.
    candidates.jsonl  DPO candidates: {"prompt", "images": [two or more]} per line. The
                      answer is the best and the worst image (or skip). Writes pairs.jsonl
                      ({"prompt", "chosen", "rejected"}), what diffusion-dpo reads.

Image paths are relative to the folder and must stay inside it. Every answer is kept in
answers.json (in the order given: undo drops the last, reopening continues) and the
output is rewritten from it; both are written atomically (temporary file + os.replace).
A D3PO round's labels.json exists only while every pair is answered: the trainer needs
all of them, so a half-labelled round is never read as a finished one. An offline set is
usable at any size, so its JSONL is rewritten after every answer.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..data import human
from ..data.feedback import FeedbackError, _raise, _read_rows


class LabelSetError(ValueError):
    """A folder that holds no usable feedback set; the message names the problem and the fix."""


def inside(root: Path, rel) -> Path | None:
    """`root/rel` as a real path if it is a file inside `root` (symlinks resolved), else None."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel):
        return None
    path = (root / rel).resolve()
    return path if path.is_relative_to(root) and path.is_file() else None


class FeedbackSet:
    """Items to answer ({"id", "prompt", "images": [paths], ...}), the answers so far, the output file."""

    kind = ""
    output = ""
    buttons: list[dict] = []  # {"answer", "label", "key"}: what the page offers for each item

    def __init__(self, folder: Path, items: list[dict]):
        self.folder, self.items = folder, items
        self.by_id = {it["id"]: it for it in items}
        if len(self.by_id) != len(items):
            raise LabelSetError(f"{folder}: the set lists the same item twice; list each pair/image once")
        self.answers: dict[str, object] = {}
        path = folder / human.ANSWERS_FILE
        if path.exists():
            self._load_answers(path)
        if self.answers and not (folder / self.output).exists():
            self.save()  # an output removed by hand: written again from the answers

    def _load_answers(self, path: Path) -> None:
        try:
            rows = json.loads(path.read_text())
            for row in rows:
                self.answers[row["id"]] = self.check(row["id"], row["answer"])
        except OSError as e:
            raise LabelSetError(f"{path} cannot be read ({e})") from None
        except (ValueError, TypeError, KeyError) as e:
            raise LabelSetError(f"{path} does not fit this set ({e}): it holds the answers of another set; "
                                "move it away to start over") from None

    # ---- answers ----
    def check(self, item_id, answer):
        """The answer as stored, or ValueError naming what is wrong."""
        if item_id not in self.by_id:
            raise ValueError(f"unknown item id {item_id!r}")
        choices = [b["answer"] for b in self.buttons]
        if answer not in choices:
            raise ValueError(f"answer must be one of {', '.join(map(repr, choices))}, got {answer!r}")
        return answer

    def answer(self, item_id, answer) -> None:
        answer = self.check(item_id, answer)
        if item_id in self.answers:
            raise ValueError(f"item {item_id!r} is already answered (undo to change it)")
        self.answers[item_id] = answer
        try:
            self.save()
        except OSError:
            del self.answers[item_id]  # not on disk: not given
            raise

    def undo(self) -> None:
        if not self.answers:
            raise ValueError("nothing to undo")
        self.answers.pop(next(reversed(self.answers)))
        self.save()

    @property
    def complete(self) -> bool:
        return len(self.answers) == len(self.items)

    # ---- files ----
    def save(self) -> None:
        """answers.json, then the output rewritten from it (removed when it would be empty or partial)."""
        atomic_write_text(self.folder / human.ANSWERS_FILE,
                          json.dumps([{"id": k, "answer": v} for k, v in self.answers.items()], indent=1))
        text, out = self.output_text(), self.folder / self.output
        if text is not None:
            atomic_write_text(out, text)
        elif out.exists():
            out.unlink()

    def output_text(self) -> str | None:
        rows = [r for it in self.items if it["id"] in self.answers
                for r in [self.output_row(it, self.answers[it["id"]])] if r is not None]
        return "".join(json.dumps(r) + "\n" for r in rows) if rows else None

    def output_row(self, item: dict, answer) -> dict | None:
        raise NotImplementedError

    # ---- the page ----
    def next_message(self) -> str:
        raise NotImplementedError

    def state(self) -> dict:
        todo = next((it for it in self.items if it["id"] not in self.answers), None)
        return {"kind": self.kind, "folder": _shown(self.folder), "done": len(self.answers), "total": len(self.items),
                "item": todo, "buttons": self.buttons, "can_undo": bool(self.answers),
                "written": self.output if (self.folder / self.output).exists() else None,
                "next": self.next_message() if todo is None else None}


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when inside it."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


class D3PORound(FeedbackSet):
    kind, output = "d3po", "labels.json"
    buttons = [{"answer": "a", "label": "A", "key": "ArrowLeft"}, {"answer": "b", "label": "B", "key": "ArrowRight"},
               {"answer": "tie", "label": "tie", "key": "ArrowDown"}]

    def __init__(self, folder: Path, files: list[Path]):
        rows = [r for f in files for r in _json(f, list)]
        items, errors = [], []
        for n, row in enumerate(rows):
            if not isinstance(row, dict) or not {"prompt", "a", "b"} <= set(row):
                errors.append(f"row {n}: needs keys prompt, a, b")
                continue
            item = {"id": f"{row['a']}|{row['b']}", "prompt": row["prompt"], "a": row["a"], "b": row["b"],
                    "images": [row.get(f"{s}_file") for s in "ab"], "values": [row.get(f"{s}_value") for s in "ab"]}
            if row.get("a_file") or row.get("b_file"):
                errors += [f"row {n}: image {p!r} is not a file inside the folder"
                           for p in item["images"] if inside(folder, p) is None]
            items.append(item)
        _raise(folder / files[0].name, errors, len(items))
        info = _json(folder / human.ROUND_FILE, dict) if (folder / human.ROUND_FILE).exists() else {}
        self.run = info.get("run")
        if not (folder / human.ANSWERS_FILE).exists() and (folder / self.output).exists():
            self._import_labels(folder, items)
        super().__init__(folder, items)

    def _import_labels(self, folder: Path, items: list[dict]) -> None:
        """A labels.json written by hand, before the page was used: start from its answers."""
        labels = _json(folder / self.output, list)
        known = {it["id"] for it in items}
        rows = [{"id": f"{r.get('a')}|{r.get('b')}", "answer": r.get("choice")} for r in labels if isinstance(r, dict)]
        if len(rows) != len(labels) or not {r["id"] for r in rows} <= known or \
                any(r["answer"] not in human.CHOICES for r in rows):
            raise LabelSetError(f"{folder / self.output} labels pairs that are not in this round, or has a choice "
                                "other than a, b, tie: move it away to label the round afresh")
        atomic_write_text(folder / human.ANSWERS_FILE, json.dumps(rows, indent=1))

    def output_text(self) -> str | None:
        if not self.complete:
            return None  # the trainer reads labels.json as the whole round
        return json.dumps([{"prompt": it["prompt"], "a": it["a"], "b": it["b"], "choice": self.answers[it["id"]]}
                           for it in self.items], indent=1)

    def next_message(self) -> str:
        run = f"diffalign train --resume {_shown(Path(self.run))}" if self.run else "diffalign train --resume RUN"
        where = "" if self.run else " (RUN: the run folder that wrote this round)"
        return f"done: {self.output} is written; resume with `{run}`{where}"


class KTOSet(FeedbackSet):
    kind, output = "kto", "labels.jsonl"
    buttons = [{"answer": "desirable", "label": "desirable", "key": "ArrowLeft"},
               {"answer": "undesirable", "label": "undesirable", "key": "ArrowRight"},
               {"answer": "skip", "label": "skip", "key": "ArrowDown"}]

    def __init__(self, folder: Path, path: Path):
        rows = _jsonl(folder, path, ("prompt", "image"), lambda r: [r["image"]])
        super().__init__(folder, [{"id": r["image"], "prompt": r["prompt"], "images": [r["image"]]} for r in rows])

    def output_row(self, item, answer):
        return None if answer == "skip" else {"prompt": item["prompt"], "image": item["images"][0],
                                              "desirable": answer == "desirable"}

    def next_message(self) -> str:
        return _offline_message(self, "diffusion_kto")


class CandidateSet(FeedbackSet):
    kind, output = "candidates", "pairs.jsonl"
    buttons = [{"answer": "skip", "label": "skip", "key": "ArrowDown"}]

    def __init__(self, folder: Path, path: Path):
        def images(r):
            if not isinstance(r["images"], list) or len(r["images"]) < 2:
                raise ValueError("'images' must be a list of two or more image paths")
            return r["images"]

        rows = _jsonl(folder, path, ("prompt", "images"), images)
        super().__init__(folder, [{"id": "|".join(r["images"]), "prompt": r["prompt"], "images": r["images"]}
                                  for r in rows])

    def check(self, item_id, answer):
        """"skip", or {"best": i, "worst": j}: two different image indices."""
        if item_id in self.by_id and isinstance(answer, dict):
            n = len(self.by_id[item_id]["images"])
            best, worst = answer.get("best"), answer.get("worst")
            if set(answer) != {"best", "worst"} or not all(type(i) is int and 0 <= i < n for i in (best, worst)):
                raise ValueError(f"answer must be {{'best': i, 'worst': j}} with image indices in 0..{n - 1}, "
                                 f"got {answer!r}")
            if best == worst:
                raise ValueError("the best and the worst image must differ")
            return {"best": best, "worst": worst}
        return super().check(item_id, answer)

    def output_row(self, item, answer):
        if answer == "skip":
            return None
        return {"prompt": item["prompt"], "chosen": item["images"][answer["best"]],
                "rejected": item["images"][answer["worst"]]}

    def next_message(self) -> str:
        return _offline_message(self, "diffusion_dpo")


def _offline_message(s: FeedbackSet, method: str) -> str:
    out = s.folder / s.output
    if not out.exists():
        return f"done: every item was skipped, so no {s.output} was written"
    return (f"done: {s.output} is written; train on it with a {method.replace('_', '-')} config for your model "
            f"(examples: configs/{method}_*.yaml): `diffalign train CONFIG --set args.data={_shown(out)}`")


# ---- reading the input files ----
def _json(path: Path, kind: type):
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise LabelSetError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, kind):
        raise LabelSetError(f"{path} must hold a JSON {kind.__name__}, got {type(data).__name__}")
    return data


def _jsonl(folder: Path, path: Path, keys: tuple[str, ...], images) -> list[dict]:
    """Rows of an input JSONL with `keys`, a string prompt and `images(row)` inside the folder; every bad
    row is named by line number."""
    _, rows, errors = _read_rows(path)
    good = []
    for i, row in rows:
        missing = [k for k in keys if k not in row]
        try:
            if missing:
                raise ValueError(f"missing key(s) {', '.join(missing)}")
            if not isinstance(row["prompt"], str):
                raise ValueError("'prompt' must be a string")
            bad = [p for p in images(row) if inside(folder, p) is None]
        except ValueError as e:
            errors.append(f"line {i}: {e}")
            continue
        errors += [f"line {i}: image {p!r} is not a file inside {folder} (copy the images into the folder)"
                   for p in bad]
        good.append(row)
    try:
        _raise(path, errors, len(good))
    except FeedbackError as e:
        raise LabelSetError(str(e)) from None
    return good


INPUTS = {"pairs.json": D3PORound, "images.jsonl": KTOSet, "candidates.jsonl": CandidateSet}


def open_set(folder) -> FeedbackSet:
    """The feedback set in `folder`; a D3PO labels folder (args.labels) opens its newest round."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LabelSetError(f"{folder} is not a folder: give the folder of a feedback set (a D3PO round "
                            "DIR/epoch-NNNN, or a folder with images.jsonl or candidates.jsonl)")
    folder = folder.resolve()
    rounds = sorted(folder.glob("pairs-*.json"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    found = [name for name in INPUTS if (folder / name).exists()] + (["pairs-<rank>.json"] if rounds else [])
    if len(found) > 1:
        raise LabelSetError(f"{folder} holds more than one feedback set ({', '.join(found)}): keep one per folder")
    if not found:
        subs = sorted(p for p in folder.glob("epoch-*") if p.is_dir() and any(p.glob("pairs*.json")))
        if subs:
            todo = [p for p in subs if not (p / "labels.json").exists()]
            return open_set((todo or subs)[-1])
        raise LabelSetError(f"{folder} holds no feedback set: expected pairs.json (a D3PO round, written by a run "
                            "with args.labels), images.jsonl (a KTO set) or candidates.jsonl (DPO candidates); "
                            "`diffalign data images|candidates` writes the last two")
    if found[0] == "pairs-<rank>.json":
        return D3PORound(folder, rounds)
    kind = INPUTS[found[0]]
    return kind(folder, [folder / found[0]]) if kind is D3PORound else kind(folder, folder / found[0])
