"""Sampling of chest radiograph findings and their ground truth.

A study's findings are a small set of :class:`Finding` objects with the attributes a radiologist
would report (side, size, zone). The same object drives the renderer (so the image shows it) and the
report generator (so the text says it), which keeps image, report and ground truth consistent by
construction.

Conventions: ``side`` is the *patient's* side ("right" / "left" / "bilateral"); on a frontal view the
patient's right lies on the viewer's left. Zones are "upper" / "middle" / "lower" lung zones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

#: Keys of the rendered findings, in a fixed order (ground-truth column order).
FINDINGS: Tuple[str, ...] = (
    "cardiomegaly",
    "pleural_effusion",
    "pneumothorax",
    "consolidation",
    "lung_lesion",
    "atelectasis",
    "edema",
    "support_devices",
)

#: Incidental, persistent or technical features that make studies distinguishable.
EXTRAS: Tuple[str, ...] = (
    "sternotomy",
    "scoliosis",
    "granuloma",
    "rib_fracture",
    "low_volumes",
    "hyperinflation",
)

#: CheXpert-style label name of every finding key.
CHEXPERT_NAME: Dict[str, str] = {
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "lung_lesion": "Lung Lesion",
    "atelectasis": "Atelectasis",
    "edema": "Edema",
    "support_devices": "Support Devices",
    "rib_fracture": "Fracture",
}

#: The 14 CheXpert labels in the column order of MIMIC-CXR-JPG's ``chexpert.csv``.
CHEXPERT_LABELS: Tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

DEVICES: Tuple[str, ...] = ("ett", "cvc", "pacemaker", "ngt")

# Relative sampling weights: roughly balanced so that every finding is common enough to learn.
_WEIGHTS: Dict[str, float] = {
    "cardiomegaly": 1.0,
    "pleural_effusion": 1.2,
    "pneumothorax": 0.85,
    "consolidation": 1.0,
    "lung_lesion": 0.9,
    "atelectasis": 1.0,
    "edema": 0.85,
    "support_devices": 1.0,
}

# Cardiothoracic ratio ranges by cardiomegaly grade (normal hearts: 0.39-0.48).
CTR_RANGE: Dict[str, Tuple[float, float]] = {
    "normal": (0.39, 0.48),
    "mild": (0.55, 0.59),
    "moderate": (0.60, 0.65),
    "marked": (0.66, 0.72),
}


@dataclass(frozen=True)
class Finding:
    """One finding of a study.

    Attributes:
        name: Key from :data:`FINDINGS`.
        side: Patient side: "right", "left" or "bilateral" (None when not lateralised).
        size: Grade: small/moderate/large (effusion, pneumothorax), mild/moderate/marked
            (cardiomegaly), mild/moderate/severe (edema), nodule/mass (lung lesion).
        zone: "upper", "middle" or "lower" lung zone (consolidation, lesion, atelectasis).
        pattern: Sub-type: lobar/patchy (consolidation), plate/linear (atelectasis).
        size_cm: Diameter of a lung lesion in centimetres.
        devices: Support devices present (subset of :data:`DEVICES`).
        device_side: Side of the central line's access ("right"/"left").
        uncertain: The report hedges ("possible", "may represent"); still present in the image.
        ctr: Cardiothoracic ratio the renderer draws (cardiomegaly only).
    """

    name: str
    side: Optional[str] = None
    size: Optional[str] = None
    zone: Optional[str] = None
    pattern: Optional[str] = None
    size_cm: Optional[float] = None
    devices: Tuple[str, ...] = ()
    device_side: Optional[str] = None
    uncertain: bool = False
    ctr: Optional[float] = None


@dataclass(frozen=True)
class StudyFindings:
    """All findings of one study plus incidental features.

    Attributes:
        findings: The pathological findings and devices (empty for a normal study).
        extras: Incidental features (keys of :data:`EXTRAS`) that are drawn and reported.
        ctr: Cardiothoracic ratio of the heart as rendered.
        granuloma_pos: Normalised (side, zone) of a calcified granuloma when present.
    """

    findings: Tuple[Finding, ...] = ()
    extras: Tuple[str, ...] = ()
    ctr: float = 0.44
    granuloma_pos: Optional[Tuple[str, str]] = None

    def get(self, name: str) -> Optional[Finding]:
        """The finding called ``name`` or None."""
        for f in self.findings:
            if f.name == name:
                return f
        return None

    def has(self, name: str) -> bool:
        """Whether the finding or extra called ``name`` is present."""
        return self.get(name) is not None or name in self.extras

    @property
    def is_normal(self) -> bool:
        """No finding and no device (incidental extras allowed)."""
        return not self.findings

    @property
    def no_finding(self) -> bool:
        """CheXpert "No Finding": nothing pathological (support devices do not count)."""
        return all(f.name == "support_devices" for f in self.findings) and "rib_fracture" not in self.extras

    def labels(self) -> List[str]:
        """CheXpert-style names of the positive labels ("No Finding" alone when none)."""
        out = [CHEXPERT_NAME[f.name] for f in sorted(self.findings, key=lambda f: FINDINGS.index(f.name))]
        if "rib_fracture" in self.extras:
            out.append("Fracture")
        if self.no_finding:
            out.insert(0, "No Finding")
        return out

    def with_finding(self, finding: Finding) -> "StudyFindings":
        """A copy with ``finding`` added (replacing one of the same name); for tests and demos."""
        rest = tuple(f for f in self.findings if f.name != finding.name)
        ctr = self.ctr
        if finding.name == "cardiomegaly" and finding.ctr is not None:
            ctr = finding.ctr
        return StudyFindings(rest + (finding,), self.extras, ctr, self.granuloma_pos)


@dataclass(frozen=True)
class PatientTraits:
    """Per-patient properties that persist across a patient's studies."""

    sex: str
    age: int
    extras: Tuple[str, ...] = ()
    granuloma_pos: Optional[Tuple[str, str]] = None
    base_ctr: float = 0.44


def sample_patient(rng: np.random.Generator) -> PatientTraits:
    """Draw a patient's sex, age and persistent incidental features."""
    sex = "F" if rng.random() < 0.48 else "M"
    age = int(np.clip(rng.normal(62, 16), 19, 96))
    extras: List[str] = []
    p_age = (age - 20) / 80.0
    if rng.random() < 0.07 + 0.08 * p_age:
        extras.append("sternotomy")
    if rng.random() < 0.07:
        extras.append("scoliosis")
    granuloma_pos = None
    if rng.random() < 0.07:
        extras.append("granuloma")
        granuloma_pos = (str(rng.choice(["right", "left"])), str(rng.choice(["upper", "middle", "lower"])))
    if rng.random() < 0.06:
        extras.append("rib_fracture")
    base_ctr = float(rng.uniform(*CTR_RANGE["normal"]))
    return PatientTraits(sex, age, tuple(extras), granuloma_pos, base_ctr)


def _choice(rng: np.random.Generator, options: Sequence[str], p: Sequence[float]) -> str:
    p_arr = np.asarray(p, dtype=float)
    return str(options[int(rng.choice(len(options), p=p_arr / p_arr.sum()))])


def _sample_one(rng: np.random.Generator, name: str, chosen: Dict[str, Finding], portable: bool) -> Finding:
    """Attributes of one finding, given those already chosen (to avoid impossible combinations)."""
    if name == "cardiomegaly":
        size = _choice(rng, ["mild", "moderate", "marked"], [0.4, 0.4, 0.2])
        return Finding(name, size=size, ctr=float(rng.uniform(*CTR_RANGE[size])))
    if name == "pleural_effusion":
        bilat = 0.5 if "edema" in chosen or "cardiomegaly" in chosen else 0.22
        side = _choice(rng, ["right", "left", "bilateral"], [(1 - bilat) * 0.55, (1 - bilat) * 0.45, bilat])
        ptx = chosen.get("pneumothorax")
        if ptx is not None and ptx.side in (side, "bilateral") or (ptx is not None and side == "bilateral"):
            side = "left" if ptx.side == "right" else "right"
        size = _choice(rng, ["small", "moderate", "large"], [0.38, 0.34, 0.28])
        uncertain = size == "small" and rng.random() < 0.2
        return Finding(name, side=side, size=size, uncertain=uncertain)
    if name == "pneumothorax":
        side = _choice(rng, ["right", "left"], [0.5, 0.5])
        eff = chosen.get("pleural_effusion")
        if eff is not None and eff.side == side:
            side = "left" if side == "right" else "right"
        size = _choice(rng, ["small", "moderate", "large"], [0.34, 0.36, 0.30])
        return Finding(name, side=side, size=size)
    if name in ("consolidation", "lung_lesion"):
        side = _choice(rng, ["right", "left"], [0.55, 0.45])
        zone = _choice(rng, ["upper", "middle", "lower"], [0.32, 0.28, 0.40])
        other = chosen.get("lung_lesion" if name == "consolidation" else "consolidation")
        if other is not None and other.side == side and other.zone == zone:
            side = "left" if side == "right" else "right"
        if name == "consolidation":
            pattern = _choice(rng, ["lobar", "patchy"], [0.5, 0.5])
            uncertain = pattern == "patchy" and rng.random() < 0.2
            return Finding(name, side=side, zone=zone, pattern=pattern, uncertain=uncertain)
        kind = _choice(rng, ["nodule", "mass"], [0.6, 0.4])
        size_cm = float(rng.uniform(2.0, 3.0) if kind == "nodule" else rng.uniform(3.8, 6.5))
        return Finding(name, side=side, zone=zone, size=kind, size_cm=round(size_cm, 1))
    if name == "atelectasis":
        eff = chosen.get("pleural_effusion")
        if eff is not None and rng.random() < 0.7:
            side = eff.side
        else:
            side = _choice(rng, ["right", "left", "bilateral"], [0.3, 0.3, 0.4])
        pattern = _choice(rng, ["plate", "linear"], [0.55, 0.45])
        uncertain = rng.random() < 0.12
        return Finding(name, side=side, zone="lower", pattern=pattern, uncertain=uncertain)
    if name == "edema":
        size = _choice(rng, ["mild", "moderate", "severe"], [0.4, 0.4, 0.2])
        return Finding(name, side="bilateral", size=size, uncertain=size == "mild" and rng.random() < 0.15)
    if name == "support_devices":
        p_dev = np.array([0.6, 0.5, 0.3, 0.45]) if portable else np.array([0.1, 0.35, 0.6, 0.1])
        devs = tuple(d for d, p in zip(DEVICES, p_dev, strict=False) if rng.random() < p)
        if not devs:
            devs = (DEVICES[int(rng.choice(4, p=p_dev / p_dev.sum()))],)
        device_side = _choice(rng, ["right", "left"], [0.75, 0.25])
        return Finding(name, devices=devs, device_side=device_side)
    raise ValueError(f"unknown finding {name!r}")


def sample_findings(
    rng: np.random.Generator,
    *,
    patient: Optional[PatientTraits] = None,
    portable: bool = False,
    p_normal: float = 0.33,
) -> StudyFindings:
    """Draw the findings of one study.

    About a third of studies are normal; the others have one to three findings, with realistic
    co-occurrence (oedema with cardiomegaly and bilateral effusions, effusion with basal atelectasis,
    devices on portable films) but frequencies balanced enough to learn each one.

    Args:
        rng: Random generator (the only source of randomness).
        patient: Persistent traits; a fresh patient is drawn when None.
        portable: The study is a portable AP film (devices and oedema more likely).
        p_normal: Probability of a study without findings.

    Returns:
        The study's findings.
    """
    if patient is None:
        patient = sample_patient(rng)
    extras = list(patient.extras)
    # Lung volumes are a property of the film (inspiration), not of the patient.
    r = rng.random()
    if r < 0.08:
        extras.append("low_volumes")
    elif r < 0.14:
        extras.append("hyperinflation")
    chosen: Dict[str, Finding] = {}
    if rng.random() >= p_normal:
        n = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.20]))
        weights = dict(_WEIGHTS)
        if portable:
            weights["support_devices"] *= 2.0
            weights["edema"] *= 1.4
        for _ in range(n):
            names = [k for k in FINDINGS if k not in chosen and weights[k] > 0]
            w = np.array([weights[k] for k in names])
            name = names[int(rng.choice(len(names), p=w / w.sum()))]
            chosen[name] = _sample_one(rng, name, chosen, portable)
            if name == "edema":
                weights["cardiomegaly"] *= 2.0
                weights["pleural_effusion"] *= 1.6
            elif name == "pleural_effusion":
                weights["atelectasis"] *= 1.8
                if chosen[name].side == "bilateral":
                    weights["pneumothorax"] = 0.0
    ctr = chosen["cardiomegaly"].ctr if "cardiomegaly" in chosen else patient.base_ctr
    findings = tuple(chosen[k] for k in FINDINGS if k in chosen)
    return StudyFindings(findings, tuple(e for e in EXTRAS if e in extras), float(ctr), patient.granuloma_pos)


def chexpert_vector(sf: StudyFindings, mentioned: Dict[str, float]) -> Dict[str, str]:
    """The 14 CheXpert labels as the strings of MIMIC-CXR-JPG's ``chexpert.csv``.

    Args:
        sf: The study's findings.
        mentioned: Labels the report mentions, mapped to 1.0 / 0.0 / -1.0 (from the report
            generator); labels it does not mention are blank, as the CheXpert labeler leaves them.

    Returns:
        Label name -> "1.0", "0.0", "-1.0" or "".
    """
    out: Dict[str, str] = {}
    for label in CHEXPERT_LABELS:
        if label == "No Finding":
            out[label] = "1.0" if sf.no_finding else ""
            continue
        v = mentioned.get(label)
        out[label] = "" if v is None else f"{float(v):.1f}"
    return out


def ground_truth_columns() -> List[str]:
    """Finding and attribute columns of ``ground_truth.csv`` (after the identifier columns)."""
    cols = ["no_finding", *FINDINGS, *EXTRAS]
    cols += [
        "ctr",
        "cardiomegaly_size",
        "pleural_effusion_side",
        "pleural_effusion_size",
        "pneumothorax_side",
        "pneumothorax_size",
        "consolidation_side",
        "consolidation_zone",
        "consolidation_pattern",
        "lung_lesion_side",
        "lung_lesion_zone",
        "lung_lesion_size",
        "lung_lesion_size_cm",
        "atelectasis_side",
        "atelectasis_zone",
        "edema_size",
        "support_devices_kind",
        "uncertain",
        "labels",
    ]
    return cols


def ground_truth_values(sf: StudyFindings) -> Dict[str, str]:
    """One study's ground-truth cells (strings) keyed by :func:`ground_truth_columns`."""
    row: Dict[str, str] = {"no_finding": str(int(sf.no_finding))}
    for name in FINDINGS:
        row[name] = str(int(sf.get(name) is not None))
    for name in EXTRAS:
        row[name] = str(int(name in sf.extras))
    row["ctr"] = f"{sf.ctr:.3f}"

    def attr(name: str, a: str) -> str:
        f = sf.get(name)
        v = getattr(f, a) if f is not None else None
        return "" if v is None else str(v)

    row["cardiomegaly_size"] = attr("cardiomegaly", "size")
    for name in ("pleural_effusion", "pneumothorax"):
        row[f"{name}_side"] = attr(name, "side")
        row[f"{name}_size"] = attr(name, "size")
    row["consolidation_side"] = attr("consolidation", "side")
    row["consolidation_zone"] = attr("consolidation", "zone")
    row["consolidation_pattern"] = attr("consolidation", "pattern")
    row["lung_lesion_side"] = attr("lung_lesion", "side")
    row["lung_lesion_zone"] = attr("lung_lesion", "zone")
    row["lung_lesion_size"] = attr("lung_lesion", "size")
    row["lung_lesion_size_cm"] = attr("lung_lesion", "size_cm")
    row["atelectasis_side"] = attr("atelectasis", "side")
    row["atelectasis_zone"] = attr("atelectasis", "zone")
    row["edema_size"] = attr("edema", "size")
    dev = sf.get("support_devices")
    row["support_devices_kind"] = "|".join(dev.devices) if dev is not None else ""
    row["uncertain"] = "|".join(f.name for f in sf.findings if f.uncertain)
    row["labels"] = "|".join(sf.labels())
    return row


__all__ = [
    "CHEXPERT_LABELS",
    "CHEXPERT_NAME",
    "CTR_RANGE",
    "DEVICES",
    "EXTRAS",
    "FINDINGS",
    "Finding",
    "PatientTraits",
    "StudyFindings",
    "chexpert_vector",
    "ground_truth_columns",
    "ground_truth_values",
    "sample_findings",
    "sample_patient",
]
