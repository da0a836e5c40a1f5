"""How the lookup's answer is shown: words for ages and doses, the cumulative dose chart's
geometry, the natural-background comparison. Presentation only: every fact comes from the
lookup service's answer (`PriorsAnswer`), nothing here decides relevance or dose."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from broker.lookup.schemas import DoseOut, PriorOut, PriorsAnswer

# Natural background radiation, for a dose in plain words: about 3 mSv a year, the figure
# RadiologyInfo.org (ACR and RSNA) uses to compare an exam's dose with "days of natural
# background radiation" (NCRP Report No. 160, 2009, gives 3.1 mSv a year in the United States).
BACKGROUND_MSV_PER_YEAR = 3.0
BACKGROUND_SOURCE = (
    "about 3 mSv a year, the comparison RadiologyInfo.org (American College of Radiology and "
    "RSNA) uses; NCRP Report No. 160 (2009) gives 3.1 mSv a year in the United States"
)
CHILD_UNDER_YEARS = 18

# Colours that keep a 3:1 contrast against white (WCAG 1.4.11) and differ for common colour
# blindness (Okabe-Ito, darkened); each facility also gets its own marker shape.
PALETTE = ("#0072B2", "#B35900", "#007A5E", "#A4317A", "#5B4B9A", "#8A6D00")
SHAPES = ("circle", "square", "diamond", "triangle")


def age_words(days: int | None) -> str:
    """'today', '9 days ago', '3 months ago', '2 years ago'; '' when unknown."""
    if days is None:
        return ""
    if days < 0:
        return "dated in the future"
    if days == 0:
        return "today"
    if days == 1:
        return "yesterday"
    if days < 60:
        return f"{days} days ago"
    if days < 730:
        return f"{round(days / 30.44)} months ago"
    return f"{days // 365} years ago"


def msv(value: float | None) -> str:
    if value is None:
        return "unknown"
    return f"{value:.2f} mSv" if value < 1 else f"{value:.1f} mSv"


def background_days(value: float | None) -> str:
    """The dose as days of natural background radiation, in words."""
    if value is None:
        return "not known"
    days = value / BACKGROUND_MSV_PER_YEAR * 365
    if days < 1:
        return "less than a day"
    if days < 60:
        return f"about {round(days)} day{'s' if round(days) != 1 else ''}"
    if days < 730:
        return f"about {round(days / 30.44)} months"
    return f"about {days / 365:.1f} years"


def dose_parts(dose: DoseOut | None) -> list[str]:
    """The measured quantities of a study's dose, each with its unit."""
    if dose is None:
        return []
    parts = []
    if dose.dlp_mgy_cm is not None:
        parts.append(f"DLP {dose.dlp_mgy_cm:.0f} mGy·cm")
    if dose.ctdivol_mgy is not None:
        parts.append(f"CTDIvol {dose.ctdivol_mgy:.1f} mGy")
    if dose.dap_gy_cm2 is not None:
        parts.append(f"DAP {dose.dap_gy_cm2:.2f} Gy·cm²")
    return parts


def is_child(answer: PriorsAnswer, today: date) -> bool:
    """Under 18 today, by the age at exam the answer's doses carry (none known: not marked)."""
    for p in answer.priors:
        if p.dose is not None and p.dose.age_at_exam_years is not None and p.study_date is not None:
            years = p.dose.age_at_exam_years + (today - p.study_date).days / 365.25
            return years < CHILD_UNDER_YEARS
    return False


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    colour: str
    shape: str
    label: str


@dataclass(frozen=True)
class Chart:
    """The 12-month cumulative effective dose as an SVG step line with one marker per study,
    coloured (and shaped) by facility. Coordinates are in the SVG's own units."""

    width: int
    height: int
    left: int
    bottom: int
    path: str
    points: list[Point]
    legend: list[tuple[str, str, str]]  # facility, colour, shape
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str]]
    summary: str


def dose_chart(answer: PriorsAnswer, today: date, facility_names: dict[str, str]) -> Chart | None:
    """The studies the answer's 12-month cumulative dose counts (confirmed, dated since
    `cumulative.since`, with an estimate), accumulated in date order; None when there are none."""
    cum = answer.cumulative_12_months
    if cum is None:
        return None
    counted = sorted(
        (
            p
            for p in answer.priors
            if p.link == "confirmed"
            and p.study_date is not None
            and cum.since <= p.study_date <= today
            and p.dose is not None
            and p.dose.effective_dose_msv is not None
        ),
        key=lambda p: p.study_date or date.min,
    )
    if not counted:
        return None
    width, height, left, right, top, bottom = 640, 220, 56, 16, 12, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    span = max((today - cum.since).days, 1)
    total = sum(p.dose.effective_dose_msv or 0.0 for p in counted if p.dose is not None)
    top_value = _nice_ceiling(total)

    def x_of(d: date) -> float:
        return round(left + plot_w * (d - cum.since).days / span, 1)

    def y_of(v: float) -> float:
        return round(top + plot_h * (1 - v / top_value), 1)

    facilities = list(dict.fromkeys(p.facility for p in counted))
    style = {
        f: (PALETTE[i % len(PALETTE)], SHAPES[i % len(SHAPES)]) for i, f in enumerate(sorted(facilities))
    }
    running = 0.0
    path = [f"M{x_of(cum.since)},{y_of(0)}"]
    points: list[Point] = []
    for p in counted:
        assert p.study_date is not None and p.dose is not None and p.dose.effective_dose_msv is not None
        x = x_of(p.study_date)
        path.append(f"H{x}")
        running += p.dose.effective_dose_msv
        path.append(f"V{y_of(running)}")
        colour, shape = style[p.facility]
        name = facility_names.get(p.facility, p.facility)
        points.append(
            Point(
                x=x,
                y=y_of(running),
                colour=colour,
                shape=shape,
                label=f"{p.study_date.isoformat()} {name}: {p.description or p.modality}, "
                f"{msv(p.dose.effective_dose_msv)} (total {msv(running)})",
            )
        )
    path.append(f"H{x_of(today)}")
    y_ticks = [(y_of(top_value * i / 4), f"{top_value * i / 4:g}") for i in range(5)]
    x_ticks = []
    month = date(cum.since.year, cum.since.month, 1)
    while month <= today:
        if month >= cum.since:
            x_ticks.append((x_of(month), month.strftime("%b %y")))
        month = (month + timedelta(days=32)).replace(day=1)
    x_ticks = x_ticks[::2] if len(x_ticks) > 7 else x_ticks
    summary = (
        f"Cumulative effective dose over the last 12 months: {msv(total)} from {len(counted)} "
        f"stud{'y' if len(counted) == 1 else 'ies'} at {len(facilities)} "
        f"facilit{'y' if len(facilities) == 1 else 'ies'}."
    )
    return Chart(
        width=width,
        height=height,
        left=left,
        bottom=height - bottom,
        path="".join(path),
        points=points,
        legend=[(facility_names.get(f, f), *style[f]) for f in sorted(facilities)],
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        summary=summary,
    )


def _nice_ceiling(value: float) -> float:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        if value <= step:
            return float(step)
    return float(int(value) + 1)


def split(priors: list[PriorOut]) -> tuple[list[PriorOut], list[PriorOut]]:
    """(relevant, the rest), in the answer's order."""
    return [p for p in priors if p.relevant], [p for p in priors if not p.relevant]
