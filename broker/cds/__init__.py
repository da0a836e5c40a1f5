"""HL7 CDS Hooks 2.0 at `/cds-services`: the prior lookup where the order is placed.

Discovery, the `order-select` and `order-sign` services (cards from `lookup.find_priors`: the
relevant prior, why it matters, its dose and what a repeat would cost, links to the viewer and the
lookup page, a suggestion to drop the draft order, override reasons) and the feedback endpoint,
whose accepted suggestions become avoided repeats (`lookup.record_avoided`).

Owns the tables `cds_card` (cards issued, so feedback can name what was accepted) and
`cds_feedback`. Exposes `routes.router` (mounted by the app) and `service`.
May import every layer below the interfaces (lookup, identity, index, facilities and under); never
dicomweb, dimse, fhir, web, app or cli.
"""
