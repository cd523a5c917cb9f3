"""Zero-shot tasks and their prompts: the reference prompts of the CXR-CLIP protocol
(``docs/compatibility.md`` section 5), GLoRIA's CheXpert prompt bank (a JSON data file of ``cxr_search``), and
the prompts of the separately reported variants.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import cxr_search
from cxr_search.errors import ConfigError, DatasetError
from cxr_search.labels import VINDR_CLASSES

#: Reference RSNA zero-shot prompts: (negative, positive).
RSNA_PROMPTS: Tuple[str, str] = ("No evidence of pneumonia", "Findings suggesting pneumonia.")


def binary_prompts(class_name: str) -> Tuple[str, str]:
    """Zero-shot binary prompts of the reference protocol (VinDr-CXR, SIIM): ``("No {class}", "{class}")``.

    Args:
        class_name: The class name exactly as the protocol spells it (e.g. ``"Nodule/Mass"``).

    Returns:
        (negative prompt, positive prompt).
    """
    return (f"No {class_name}", class_name)


#: Task name -> the manifest ``dataset`` it evaluates.
TASK_DATASETS: Dict[str, str] = {
    "vindr": "vindr-cxr",
    "rsna": "rsna-pneumonia",
    "siim": "siim-acr",
    "chexpert5x200": "chexpert5x200",
}
TASKS: Tuple[str, ...] = tuple(TASK_DATASETS)

#: CheXpert 5x200 classes in GLoRIA's order (the order of the prompt bank and of argmax ties).
CHEXPERT5X200_CLASSES: Tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

#: (negative, positive) prompts for a class whose name is a negation ("No finding" = normal study).
#: Our wording: the positive side is the usual radiology phrase for a normal study, the negative
#: side names an abnormal one without naming any finding.
NEGATION_SAFE_PROMPTS: Tuple[str, str] = (
    "Abnormal chest radiograph with findings.",
    "No acute cardiopulmonary abnormality.",
)

#: The GLoRIA prompt bank, shipped as package data of ``cxr_search``.
PROMPT_BANK_FILE = Path(cxr_search.__file__).resolve().parent / "data" / "gloria_chexpert_prompts.json"


def check_task(task: str) -> str:
    """Return ``task`` if known.

    Raises:
        ConfigError: Unknown task (the valid ones are named).
    """
    if task not in TASK_DATASETS:
        raise ConfigError(f"unknown zero-shot task {task!r}; choose one of {', '.join(TASKS)}")
    return task



@lru_cache(maxsize=1)
def _bank_text() -> str:
    try:
        return PROMPT_BANK_FILE.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{PROMPT_BANK_FILE}: GLoRIA prompt bank missing ({exc}); reinstall cxr-search") from exc


def load_prompt_bank() -> Dict[str, Any]:
    """The GLoRIA prompt bank data file (lists, join order, attribution, corrections) as a dict."""
    return json.loads(_bank_text())


def gloria_chexpert_prompts(*, verbatim: bool = False) -> Dict[str, List[str]]:
    """Every GLoRIA CheXpert prompt per class (489 in all, duplicates kept).

    Each class's three lists are combined in the class's ``order`` (first list outermost) and
    joined with single spaces, as GLoRIA's ``generate_chexpert_class_prompts`` does.

    Args:
        verbatim: GLoRIA's strings unchanged (original spelling, ends not stripped). By default
            the two spelling corrections of the CXR-CLIP reference evaluator are applied and the
            ends stripped, as that evaluator does (the strings its published numbers used).

    Returns:
        class -> prompts, classes in :data:`CHEXPERT5X200_CLASSES` order.
    """
    bank = load_prompt_bank()
    fixes: Mapping[str, str] = {} if verbatim else bank["corrections"]["replace"]
    out: Dict[str, List[str]] = {}
    for name in CHEXPERT5X200_CLASSES:
        spec = bank["classes"][name]
        first, second, third = (spec[key] for key in spec["order"])
        prompts = []
        for a in first:
            for b in second:
                for c in third:
                    parts = [fixes.get(p, p) for p in (a, b, c)]
                    text = f"{parts[0]} {parts[1]} {parts[2]}"
                    prompts.append(text if verbatim else text.strip())
        out[name] = prompts
    return out


def reference_binary_prompts(task: str) -> Dict[str, Tuple[str, str]]:
    """class -> (negative, positive) prompts of a binary task's reference protocol."""
    check_task(task)
    if task == "vindr":
        return {name: binary_prompts(name) for name in VINDR_CLASSES}
    if task == "siim":
        return {"Pneumothorax": binary_prompts("Pneumothorax")}
    if task == "rsna":
        return {"Pneumonia": RSNA_PROMPTS}
    raise ConfigError(f"task {task!r} is not a binary task")


def sentence_prompts(class_name: str) -> Tuple[str, str]:
    """(negative, positive) of the sentence variant: ``("There is no {class}.", "There is {class}.")``."""
    return (f"There is no {class_name}.", f"There is {class_name}.")


def is_negated_class(class_name: str) -> bool:
    """Whether a class name is itself a negation ("No finding", "No Finding")."""
    return class_name.strip().lower().startswith("no ")



__all__ = [
    "CHEXPERT5X200_CLASSES",
    "NEGATION_SAFE_PROMPTS",
    "PROMPT_BANK_FILE",
    "TASKS",
    "TASK_DATASETS",
    "check_task",
    "gloria_chexpert_prompts",
    "is_negated_class",
    "load_prompt_bank",
    "reference_binary_prompts",
    "sentence_prompts",
]
