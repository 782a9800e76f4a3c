"""The clinic's interpreter (plan + machine logs -> per-layer CSVs): how it is run and checked."""
