"""Patient-specific QA: each beam's recalculated dose against its TPS dose or array measurement (gamma)."""
