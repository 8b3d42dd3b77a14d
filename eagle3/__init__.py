"""Aerie: EAGLE-3 draft training against a live target. Pure PyTorch algorithm core (no ray, no mlflow)."""
