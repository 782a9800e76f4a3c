"""Match delivery folders to the plan's treatment beams, and choose one delivery per beam.

PlanInfo.txt's DICOM_BEAM_NUMBER is the only link from a delivery folder to a beam; a
beam with several deliveries (several fractions) gets the one the delivery policy names.
"""

from __future__ import annotations

from config.settings import DeliveryPolicy
from tasks.casefolder.deliveries import PLANINFO_NAME, DeliveryRecord
from tasks.casefolder.model import Beam, Delivery
from tasks.casefolder.plan import Plan, PlanBeam
from tasks.casefolder.problems import Problems


def _choose(
    beam: PlanBeam, records: list[DeliveryRecord], policy: DeliveryPolicy, problems: Problems
) -> Delivery | None:
    """The delivery of `beam` that the policy names; None (with problems) when there is none."""
    label = f"beam {beam.number} {beam.name!r}"
    if policy == "single" and len(records) > 1:
        folders = ", ".join(repr(record.delivery.folder) for record in records)
        problems.add(label, f"{len(records)} delivery folders ({folders}); policy 'single' allows one")
        return None
    ordered = sorted(records, key=lambda r: (r.delivery.irradiation_time, r.delivery.folder))
    if policy == "latest_complete":
        ordered.reverse()
    for record in ordered:
        if not record.layer_mismatches(beam.layers):
            return record.delivery
    for record in ordered:
        for reason in record.layer_mismatches(beam.layers):
            problems.add(f"delivery folder {record.delivery.folder!r} ({label})", reason)
    return None


def match_deliveries(
    plan: Plan,
    records: list[DeliveryRecord],
    claimed: set[int],
    policy: DeliveryPolicy,
    problems: Problems,
) -> tuple[list[Beam], list[int]]:
    """Map deliveries to beams by DICOM_BEAM_NUMBER and pick one per beam by policy.

    Returns the matched beams and the treatment beams that have no delivery folder.
    `claimed` holds the beam numbers named by delivery folders that had problems of
    their own, so such a beam is not also reported as having no delivery folder.
    """
    by_beam: dict[int, list[DeliveryRecord]] = {}
    for record in records:
        delivery = record.delivery
        number = delivery.beam_number
        where = f"delivery folder {delivery.folder!r} {PLANINFO_NAME}"
        if number in plan.unusable:
            continue
        if plan.patient_id and delivery.patient_id != plan.patient_id:
            problems.add(
                where,
                f"DICOM_PATIENT_ID {delivery.patient_id!r} (beam {number}) differs from the "
                f"plan's PatientID {plan.patient_id!r}",
            )
        if number in plan.excluded:
            beam = plan.excluded[number]
            problems.add(
                where,
                f"DICOM_BEAM_NUMBER {number} is {beam.name!r}, which is not treated "
                f"({beam.reason}): extra delivery folder",
            )
        elif number not in plan.treatment:
            problems.add(
                where, f"DICOM_BEAM_NUMBER {number} is not a beam of the plan: extra delivery folder"
            )
        else:
            by_beam.setdefault(number, []).append(record)
    beams = []
    missing = []
    for number, plan_beam in sorted(plan.treatment.items()):
        candidates = by_beam.get(number, [])
        if not candidates and number not in claimed:
            missing.append(number)
            problems.add(
                f"beam {number} {plan_beam.name!r}",
                f"no delivery folder (no {PLANINFO_NAME} with DICOM_BEAM_NUMBER {number})",
            )
        delivery = _choose(plan_beam, candidates, policy, problems) if candidates else None
        if delivery is not None:
            passed_over = sorted(
                (record.delivery for record in candidates if record.delivery != delivery),
                key=lambda other: (other.irradiation_time, other.folder),
            )
            beams.append(
                Beam(
                    number=number,
                    name=plan_beam.name,
                    gantry_angle=plan_beam.gantry_angle,
                    isocenter_mm=plan_beam.isocenter_mm,
                    layers=plan_beam.layers,
                    scan_mode=plan_beam.scan_mode,
                    meterset=plan_beam.meterset,
                    delivery=delivery,
                    passed_over=passed_over,
                    range_shifters=plan_beam.range_shifters,
                    blocks=plan_beam.blocks,
                )
            )
    return beams, missing
